"""``alignment-callback``: calibrated alignment of saved features, from the command line.

``compare A B``        one feature file against another (all layers of A × all layers of B,
                       aggregation-aware calibration, METHOD.md section 4).
``matrix DIR_X DIR_Y`` every file of DIR_X against every file of DIR_Y (PRH's model-pair matrix),
                       with Benjamini–Hochberg adjusted p-values across pairs; resumable.

Exit codes: 0 success, 2 bad input (one ``error: ...`` line on stderr), 130 interrupted,
1 unexpected internal error.  ``--debug`` shows tracebacks.  See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

DEFAULT_METRICS: tuple[str, ...] = ("linear_cka", "mutual_knn", "cknna")
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_FRACTION = 0.8

EPILOG = """\
saving features (one file per model; rows = the same probe inputs, in the same order):

  import torch
  from alignment_callback import collect_activations
  feats = collect_activations(model, probe_loader, layers="encoder.layer.*", pool="mean")
  torch.save(feats, "model_a.pt")        # {layer name: (n, d) tensor}

accepted files: .pt/.pth (a tensor, a {layer: tensor} dict or a list of tensors; read with
torch.load(weights_only=True)), .npy (one array), .npz (one array per layer), .safetensors
(one tensor per layer). 3-D+ activations are pooled with --pool.

exit codes: 0 ok, 2 bad input, 130 interrupted (matrix: finished pairs are kept), 1 internal
error. Documentation: docs/cli.md
"""


class CLIError(ValueError):
    """Bad command-line input (reported as ``error: ...`` with exit code 2)."""


# --------------------------------------------------------------------------------- arguments
def _sigma(text: str) -> float | str:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'median', got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"sigma must be positive, got {text}")
    return value


def _aggregate(text: str) -> str:
    if text in ("max", "mean") or re.fullmatch(r"top[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(f"expected max, mean or topK (e.g. top3), got {text!r}")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("calibration")
    g.add_argument("--metric", action="append", metavar="M",
                   help="measure (repeatable or comma-separated; default: "
                        f"{' '.join(DEFAULT_METRICS)})")
    g.add_argument("--k", type=int, default=10, help="neighbors for kNN measures (default 10)")
    g.add_argument("--sigma", type=_sigma, default=1.0,
                   help="RBF bandwidth for rbf_cka: a number or 'median' (default 1.0)")
    g.add_argument("--permutations", type=int, default=500, metavar="K",
                   help="permutations K (default 500)")
    g.add_argument("--alpha", type=float, default=0.05,
                   help="level of the threshold tau and of the BH FDR (default 0.05)")
    g.add_argument("--aggregate", type=_aggregate, default="max",
                   help="aggregate over layer pairs: max (default), mean or topK")
    g.add_argument("--seed", type=int, default=0, help="permutation seed (default 0)")
    g.add_argument("--groups", metavar="FILE",
                   help="group labels, one per row (.npy/.txt/.csv): rows of a group are "
                        "permuted together (several captions per image, frames of a video)")
    g.add_argument("--bootstrap", type=int, default=0, metavar="B",
                   help="approximate 95%% interval of the calibrated score from B subsamples of "
                        "80%% of the rows without replacement (default 0: off; costs B "
                        "calibrations)")
    p = common.add_argument_group("features")
    p.add_argument("--pool", choices=("mean", "cls", "last", "flatten"), default="mean",
                   help="pooling of 3-D+ activations (default mean); 2-D ones are used as is")
    p.add_argument("--clamp-quantile", type=float, default=None, metavar="Q",
                   help="clamp |x| at its Q-quantile (PRH: 0.95; default off)")
    p.add_argument("--no-normalize", action="store_true",
                   help="do not L2-normalize rows (default: normalize, PRH convention)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    o = common.add_argument_group("output")
    o.add_argument("--out", default="alignment_out", metavar="DIR",
                   help="output folder (default ./alignment_out)")
    o.add_argument("--debug", action="store_true", help="show tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``alignment-callback`` argument parser."""
    from alignment_callback import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="alignment-callback",
        description="Permutation-calibrated representational alignment of saved features.",
        epilog=EPILOG, formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compare,matrix}")
    common = _common_options()
    compare = sub.add_parser(
        "compare", parents=[common], formatter_class=fmt, epilog=EPILOG,
        help="calibrated alignment of two feature files",
        description="Calibrated alignment of feature file A against feature file B: all layers "
                    "of A x all layers of B, aggregated (max by default) and calibrated "
                    "aggregation-aware. Writes alignment.json, alignment.csv and "
                    "heatmap_<metric>.png to --out.",
    )
    compare.add_argument("a", help="feature file of model A")
    compare.add_argument("b", help="feature file of model B")
    matrix = sub.add_parser(
        "matrix", parents=[common], formatter_class=fmt, epilog=EPILOG,
        help="every feature file of DIR_X against every file of DIR_Y",
        description="Model-pair matrix: every feature file of DIR_X against every feature file "
                    "of DIR_Y, with Benjamini-Hochberg adjusted p-values across all pairs (per "
                    "metric). Resumable: finished pairs are appended to --out/pairs.jsonl and "
                    "skipped on a rerun with the same settings. Writes matrix.json, matrix.csv "
                    "and matrix_<metric>.png.",
    )
    matrix.add_argument("dir_x", help="folder of feature files (rows of the matrix)")
    matrix.add_argument("dir_y", help="folder of feature files (columns of the matrix)")
    return parser


def _metrics(args: argparse.Namespace) -> list[str]:
    from alignment_callback.functional.registry import BUILTIN_MEASURES

    names: list[str] = []
    for item in args.metric or list(DEFAULT_METRICS):
        for name in item.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in BUILTIN_MEASURES:
                raise CLIError(f"unknown metric {name!r}; built-ins: "
                               f"{', '.join(sorted(BUILTIN_MEASURES))}")
            if name not in names:
                names.append(name)
    if not names:
        raise CLIError("no metric given")
    return names


def _check_args(args: argparse.Namespace) -> None:
    if args.permutations < 1:
        raise CLIError(f"--permutations must be >= 1, got {args.permutations}")
    if not 0.0 < args.alpha < 1.0:
        raise CLIError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.k < 1:
        raise CLIError(f"--k must be >= 1, got {args.k}")
    if args.clamp_quantile is not None and not 0.0 < args.clamp_quantile <= 1.0:
        raise CLIError(f"--clamp-quantile must be in (0, 1], got {args.clamp_quantile}")
    if args.bootstrap < 0:
        raise CLIError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device cuda was requested but CUDA is not available")


def metric_kwargs(metric: str, args: argparse.Namespace) -> dict[str, Any]:
    """The measure keywords the options set for ``metric`` (``k`` for kNN, ``sigma`` for RBF)."""
    from alignment_callback.functional.registry import BUILTIN_MEASURES

    params = {p.name for p in BUILTIN_MEASURES[metric].params}
    kw: dict[str, Any] = {}
    if "k" in params:
        kw["k"] = args.k
    if "sigma" in params:
        kw["sigma"] = args.sigma
    return kw


def _warn_resolution(num_permutations: int, tests: int, alpha: float) -> None:
    """Warn when 1/(K + 1), the smallest attainable p-value, is too coarse for ``alpha``.

    One test (compare) needs 1/(K + 1) <= alpha.  After Benjamini–Hochberg over m tests, r pairs
    at the smallest p get q = m / (r (K + 1)), so a pair is only detectable together with at
    least r = ⌈m / (alpha (K + 1))⌉ such pairs.
    """
    smallest = 1.0 / (num_permutations + 1)
    if tests * smallest <= alpha:
        return
    need = math.ceil(tests / alpha - 1e-9) - 1
    if tests == 1:
        detail = f"no p-value can reach alpha={alpha}"
    else:
        r = math.ceil(tests * smallest / alpha - 1e-9)
        detail = (f"after Benjamini-Hochberg over {tests} pairs a pair is only significant if at "
                  f"least {r} pairs reach that smallest p")
    print(f"warning: with K={num_permutations} permutations the smallest p-value is "
          f"1/{num_permutations + 1}, so {detail}; --permutations >= {need} avoids this",
          file=sys.stderr, flush=True)


def run_settings(args: argparse.Namespace, groups: Any) -> dict[str, Any]:
    """Settings that change results (metric keywords are recorded per metric)."""
    from alignment_callback.reporting.io import labels_digest

    return {
        "permutations": args.permutations, "alpha": args.alpha, "aggregate": args.aggregate,
        "seed": args.seed, "pool": args.pool, "clamp_quantile": args.clamp_quantile,
        "normalize": not args.no_normalize, "groups": labels_digest(groups),
        "bootstrap": args.bootstrap,
        "bootstrap_fraction": BOOTSTRAP_FRACTION if args.bootstrap else None,
    }


def _versions() -> dict[str, str]:
    import numpy
    import torch

    from alignment_callback import __version__

    return {"alignment_callback": __version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------- analysis
def _load(path: str | Path, args: argparse.Namespace) -> dict[str, Any]:
    from alignment_callback.reporting.io import load_features, preprocess_layers

    raw = load_features(path)
    return preprocess_layers(raw, pool=args.pool, clamp_quantile=args.clamp_quantile,
                             normalize=not args.no_normalize, source=path, device=args.device)


def _rows(layers: dict[str, Any]) -> int:
    return int(next(iter(layers.values())).shape[0])


def _tolist(t: Any) -> Any:
    return t.detach().double().cpu().tolist()


def analyze_pair(xa: dict, xb: dict, metric: str, args: argparse.Namespace, groups: Any,
                 keep_null: bool = False) -> dict[str, Any]:
    """Calibrated layer alignment of one pair for one metric, as a JSON-ready record."""
    from alignment_callback.functional.bootstrap import bootstrap_interval
    from alignment_callback.functional.pipeline import calibrated_layer_alignment
    from alignment_callback.reporting.io import finite_or_none

    kw = metric_kwargs(metric, args)
    res = calibrated_layer_alignment(
        xa, xb, metric, aggregate=args.aggregate, num_permutations=args.permutations,
        alpha=args.alpha, seed=args.seed, groups=groups, **kw,
    )
    rec: dict[str, Any] = {"metric": metric, "kwargs": kw, "aggregate": res.aggregate,
                           "n_samples": _rows(xa)}
    rec.update({k: finite_or_none(v) for k, v in res.as_dict().items()})
    rec.update({
        "best_pair": list(res.best_pair), "argmax": list(res.argmax),
        "x_layers": list(res.x_names), "y_layers": list(res.y_names),
        "matrix": _tolist(res.matrix), "pair_calibrated": _tolist(res.pair_calibrated),
        "pair_p_value": _tolist(res.pair_p_value), "pair_threshold": _tolist(res.pair_threshold),
        "bootstrap": None,
    })
    if keep_null:
        rec["null"] = _tolist(res.null)
    if args.bootstrap:
        bi = bootstrap_interval(
            xa, xb, metric, num_bootstrap=args.bootstrap, confidence=BOOTSTRAP_CONFIDENCE,
            seed=args.seed, num_permutations=args.permutations, alpha=args.alpha,
            fraction=BOOTSTRAP_FRACTION, groups=groups, aggregate=args.aggregate, **kw,
        )
        rec["bootstrap"] = {
            "low": bi.low, "high": bi.high, "confidence": BOOTSTRAP_CONFIDENCE,
            "fraction": BOOTSTRAP_FRACTION, "subsample_size": bi.subsample_size,
            "method": "m-out-of-n subsampling without replacement (approximate)",
            "replicates": _tolist(bi.replicates),
        }
    return rec


# --------------------------------------------------------------------------------- output
def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "nan"
    return format(v, spec)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _ci(rec: dict) -> str:
    b = rec.get("bootstrap")
    return "" if not b else f"[{b['low']:.4f}, {b['high']:.4f}]"


def _heatmap(matrix: Any, rows: Sequence[str], cols: Sequence[str], path: Path, title: str,
             xlabel: str, ylabel: str, argmax: Sequence[int] | None = None,
             marks: Any = None) -> None:
    """Save an annotated heatmap (matplotlib Agg); ``marks`` (bool matrix) adds a ``*``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from alignment_callback.metrics.plotting import plot_layer_heatmap

    fig, _ = plot_layer_heatmap(matrix, rows, cols, argmax=argmax, title=title, xlabel=xlabel,
                                ylabel=ylabel, marks=marks)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(["" if v is None else v for v in r] for r in rows)


# --------------------------------------------------------------------------------- compare
def run_compare(args: argparse.Namespace) -> int:
    """``compare A B``."""
    from alignment_callback.reporting.io import load_groups

    metrics = _metrics(args)
    _check_args(args)
    xa, xb = _load(args.a, args), _load(args.b, args)
    na, nb = _rows(xa), _rows(xb)
    if na != nb:
        raise CLIError(
            f"row mismatch: {args.a} has {na} rows but {args.b} has {nb}; both files must hold "
            "the same probe inputs in the same order"
        )
    groups = load_groups(args.groups, na) if args.groups else None
    _warn_resolution(args.permutations, 1, args.alpha)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for metric in metrics:
        t0 = time.perf_counter()
        results[metric] = analyze_pair(xa, xb, metric, args, groups, keep_null=True)
        results[metric]["seconds"] = round(time.perf_counter() - t0, 3)

    settings = {"metrics": metrics, "k": args.k, "sigma": args.sigma, "device": args.device,
                "groups_file": args.groups, **run_settings(args, groups)}
    doc = {
        "command": "compare", "created": _now(), "n_samples": na,
        "inputs": {
            "a": {"path": str(args.a), "layers": {k: list(v.shape) for k, v in xa.items()}},
            "b": {"path": str(args.b), "layers": {k: list(v.shape) for k, v in xb.items()}},
        },
        "settings": settings, "versions": _versions(), "results": results,
    }
    _write_json(out / "alignment.json", doc)
    header = ["metric", "aggregate", "raw", "threshold", "calibrated", "p_value", "null_mean",
              "null_std", "effect_size", "percentile", "best_x_layer", "best_y_layer",
              "n_samples", "num_permutations", "alpha", "ci_low", "ci_high"]
    rows = []
    for m, r in results.items():
        b = r["bootstrap"] or {}
        rows.append([m, r["aggregate"], r["raw"], r["threshold"], r["calibrated"], r["p_value"],
                     r["null_mean"], r["null_std"], r["effect_size"], r["percentile"],
                     r["best_pair"][0], r["best_pair"][1], na, args.permutations, args.alpha,
                     b.get("low"), b.get("high")])
    _write_csv(out / "alignment.csv", header, rows)
    pngs = []
    for m, r in results.items():
        png = out / f"heatmap_{m}.png"
        _heatmap(r["matrix"], r["x_layers"], r["y_layers"], png,
                 f"{m}: raw {r['aggregate']} {r['raw']:.3f}, tau {r['threshold']:.3f}, "
                 f"calibrated {r['calibrated']:.3f}, p {r['p_value']:.3g}",
                 xlabel=f"B layer ({Path(args.b).name})", ylabel=f"A layer ({Path(args.a).name})",
                 argmax=r["argmax"])
        pngs.append(png.name)

    print(f"A: {args.a} ({len(xa)} layer(s))  B: {args.b} ({len(xb)} layer(s))  n={na}")
    print(f"K={args.permutations} permutations, alpha={args.alpha}, aggregate={args.aggregate}, "
          f"seed={args.seed}" + (", grouped" if groups is not None else ""))
    headers = ["metric", "raw", "tau", "calibrated", "p", "best layer pair"]
    if args.bootstrap:
        headers.append(f"{int(BOOTSTRAP_CONFIDENCE * 100)}% interval (approx.)")
    table = []
    for m, r in results.items():
        row = [m, _fmt(r["raw"]), _fmt(r["threshold"]), _fmt(r["calibrated"]),
               _fmt(r["p_value"], ".4g"), f"{r['best_pair'][0]} ~ {r['best_pair'][1]}"]
        if args.bootstrap:
            row.append(_ci(r))
        table.append(row)
    print()
    print(_table(headers, table))
    print()
    print(f"wrote {out / 'alignment.json'}, alignment.csv, {', '.join(pngs)}")
    return 0


# --------------------------------------------------------------------------------- matrix
class _Progress:
    """tqdm bar over pairs on stderr, or a plain counter without tqdm."""

    def __init__(self, total: int) -> None:
        self.total, self.count = total, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc="pairs", unit="pair", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, label: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.count}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _append_line(path: Path, record: dict) -> None:
    """Append one JSON line and make it durable (flush + fsync)."""
    line = json.dumps(record, allow_nan=False) + "\n"
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a crash: start a fresh line
                prefix = "\n"
    with open(path, "a") as f:
        f.write(prefix + line)
        f.flush()
        os.fsync(f.fileno())


def read_pairs(path: Path, settings: dict, kwargs: dict[str, dict],
               fingerprints: dict[str, list[int]]) -> dict[tuple[str, str], dict[str, dict]]:
    """Results in ``pairs.jsonl`` valid for these settings: ``{(x_file, y_file): {metric: rec}}``.

    A line counts if its settings equal ``settings``, both files still have the recorded
    fingerprint (size, mtime), and per metric the measure keywords match; later lines win.
    Malformed lines (e.g. cut by a crash) are skipped.
    """
    done: dict[tuple[str, str], dict[str, dict]] = {}
    if not path.exists():
        return done
    settings = json.loads(json.dumps(settings))
    kwargs = json.loads(json.dumps(kwargs))
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                if rec.get("settings") != settings:
                    continue
                xf, yf = rec["x_file"], rec["y_file"]
                if (fingerprints.get(xf) != rec["x_fingerprint"]
                        or fingerprints.get(yf) != rec["y_fingerprint"]):
                    continue
                for metric, res in rec["results"].items():
                    if metric in kwargs and res.get("kwargs") == kwargs[metric]:
                        done.setdefault((xf, yf), {})[metric] = res
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return done


def run_matrix(args: argparse.Namespace) -> int:
    """``matrix DIR_X DIR_Y``."""
    import torch

    from alignment_callback.functional.fdr import benjamini_hochberg
    from alignment_callback.reporting.io import (
        file_fingerprint,
        list_feature_files,
        load_groups,
        model_names,
    )

    metrics = _metrics(args)
    _check_args(args)
    files_x, files_y = list_feature_files(args.dir_x), list_feature_files(args.dir_y)
    names_x, names_y = model_names(files_x), model_names(files_y)
    key_x = [str(f.resolve()) for f in files_x]
    key_y = [str(f.resolve()) for f in files_y]
    fingerprints = {k: file_fingerprint(k) for k in key_x + key_y}
    groups = load_groups(args.groups) if args.groups else None
    settings = run_settings(args, groups)
    kwargs = {m: metric_kwargs(m, args) for m in metrics}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "pairs.jsonl"

    done = read_pairs(jsonl, settings, kwargs, fingerprints)
    pairs = [(i, j) for i in range(len(files_x)) for j in range(len(files_y))]
    pending = []
    partial = 0
    for i, j in pairs:
        have = done.get((key_x[i], key_y[j]), {})
        missing = [m for m in metrics if m not in have]
        if missing:
            pending.append((i, j, missing))
            partial += len(missing) < len(metrics)
    total = len(pairs)
    _warn_resolution(args.permutations, total, args.alpha)
    print(f"matrix: {len(files_x)} x {len(files_y)} = {total} pairs, {len(metrics)} metric(s); "
          f"{total - len(pending)} already done in {jsonl}, {len(pending)} to compute"
          + (f" ({partial} of them only for missing metrics)" if partial else ""),
          file=sys.stderr, flush=True)

    cache: dict[str, dict] = {}
    first: list[Any] = []  # (path, rows) of the first file loaded

    def get(path: Path, key: str) -> dict:
        if key not in cache:
            feats = _load(path, args)
            n = _rows(feats)
            if not first:
                first.append((path, n))
                if groups is not None and len(groups) != n:
                    raise CLIError(f"{args.groups}: has {len(groups)} group labels but the "
                                   f"features have {n} rows")
            elif n != first[0][1]:
                raise CLIError(
                    f"row mismatch: {path} has {n} rows but {first[0][0]} has {first[0][1]}; "
                    "every file must hold the same probe inputs in the same order"
                )
            cache[key] = feats
        return cache[key]

    progress = _Progress(len(pending))
    finished = 0
    current_x: str | None = None
    try:
        for i, j, missing in pending:
            if current_x is not None and current_x != key_x[i] and current_x not in key_y:
                cache.pop(current_x, None)  # keep the Y side cached, drop finished X files
            current_x = key_x[i]
            xa, xb = get(files_x[i], key_x[i]), get(files_y[j], key_y[j])
            t0 = time.perf_counter()
            results = {m: analyze_pair(xa, xb, m, args, groups) for m in missing}
            _append_line(jsonl, {
                "x_model": names_x[i], "y_model": names_y[j], "x_file": key_x[i],
                "y_file": key_y[j], "x_fingerprint": fingerprints[key_x[i]],
                "y_fingerprint": fingerprints[key_y[j]], "settings": settings,
                "results": results, "seconds": round(time.perf_counter() - t0, 3),
                "finished_at": _now(),
            })
            finished += 1
            progress.update(f"{names_x[i]} vs {names_y[j]}")
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted: {total - len(pending) + finished} of {total} pairs done "
              f"({finished} in this run), saved in {jsonl}; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    finally:
        progress.close()

    done = read_pairs(jsonl, settings, kwargs, fingerprints)
    lx, ly = len(files_x), len(files_y)
    n_samples = done[(key_x[0], key_y[0])][metrics[0]]["n_samples"]
    summary: dict[str, Any] = {}
    csv_rows = []
    for m in metrics:
        recs = [[done[(key_x[i], key_y[j])][m] for j in range(ly)] for i in range(lx)]

        def field(name: str, recs: list = recs) -> list:
            return [[recs[i][j][name] for j in range(ly)] for i in range(lx)]

        def boot(name: str, recs: list = recs) -> list:
            return [[(recs[i][j]["bootstrap"] or {}).get(name) for j in range(ly)]
                    for i in range(lx)]

        p = torch.tensor(field("p_value"), dtype=torch.float64)
        rejected, adjusted = benjamini_hochberg(p, alpha=args.alpha)
        summary[m] = {
            "kwargs": kwargs[m], "raw": field("raw"), "threshold": field("threshold"),
            "calibrated": field("calibrated"), "p_value": field("p_value"),
            "p_bh": adjusted.tolist(), "significant_bh": rejected.tolist(),
            "effect_size": field("effect_size"), "best_pair": field("best_pair"),
            "ci_low": boot("low"), "ci_high": boot("high"),
        }
        for i in range(lx):
            for j in range(ly):
                r = recs[i][j]
                b = r["bootstrap"] or {}
                csv_rows.append([
                    names_x[i], names_y[j], m, r["aggregate"], r["raw"], r["threshold"],
                    r["calibrated"], r["p_value"], float(adjusted[i, j]), bool(rejected[i, j]),
                    r["effect_size"], r["best_pair"][0], r["best_pair"][1], b.get("low"),
                    b.get("high"),
                ])
    doc = {
        "command": "matrix", "created": _now(), "n_samples": n_samples,
        "x_models": names_x, "y_models": names_y,
        "x_files": [str(f) for f in files_x], "y_files": [str(f) for f in files_y],
        "settings": {"metrics": metrics, "k": args.k, "sigma": args.sigma,
                     "device": args.device, "groups_file": args.groups, **settings},
        "fdr": {"method": "benjamini-hochberg", "alpha": args.alpha,
                "family": "all pairs of the matrix, separately per metric"},
        "versions": _versions(), "results": summary,
        "pairs": [{"x_model": names_x[i], "y_model": names_y[j],
                   "results": {m: done[(key_x[i], key_y[j])][m] for m in metrics}}
                  for i, j in pairs],
    }
    _write_json(out / "matrix.json", doc)
    _write_csv(out / "matrix.csv",
               ["x_model", "y_model", "metric", "aggregate", "raw", "threshold", "calibrated",
                "p_value", "p_bh", "significant_bh", "effect_size", "best_x_layer",
                "best_y_layer", "ci_low", "ci_high"], csv_rows)
    for m in metrics:
        s = summary[m]
        _heatmap(s["calibrated"], names_x, names_y, out / f"matrix_{m}.png",
                 f"{m}: calibrated ({args.aggregate} over layers); * = BH q <= {args.alpha}",
                 xlabel=f"{args.dir_y}", ylabel=f"{args.dir_x}", marks=s["significant_bh"])

    print(f"K={args.permutations} permutations, alpha={args.alpha}, aggregate={args.aggregate}, "
          f"seed={args.seed}" + (", grouped" if groups is not None else "")
          + f"; * = significant after Benjamini-Hochberg across {total} pairs (q <= {args.alpha})")
    for m in metrics:
        s = summary[m]
        print(f"\n{m} (calibrated):")
        grid = [[names_x[i]] + [
            f"{s['calibrated'][i][j]:.4f}" + ("*" if s["significant_bh"][i][j] else " ")
            for j in range(ly)] for i in range(lx)]
        print(_table([""] + names_y, grid))
        print(f"{sum(map(sum, s['significant_bh']))} of {total} pairs significant after BH")
    print(f"\nwrote {out / 'matrix.json'}, matrix.csv, "
          + ", ".join(f"matrix_{m}.png" for m in metrics) + f" (per-pair results: {jsonl})")
    return 0


# --------------------------------------------------------------------------------- entry point
def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 130 interrupted, 1 bug)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        if args.command == "compare":
            return run_compare(args)
        return run_matrix(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as err:  # bad input (FeatureFileError is a ValueError)
        if args.debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything else is a bug: one line, exit 1
        if args.debug:
            raise
        print(f"error: internal error ({type(err).__name__}: {_one_line(err)}); rerun with "
              "--debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
