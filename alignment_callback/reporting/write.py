"""What a run writes: JSON, CSV and PNG files, the Markdown / HTML report, console tables and
the progress bar."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from alignment_callback.reporting.plan import BOOTSTRAP_CONFIDENCE, MatrixPlan, resolution_note

COMPARE_CSV_HEADER = [
    "measure", "aggregate", "raw", "threshold", "calibrated", "p_value", "null_mean", "null_std",
    "effect_size", "percentile", "best_x_layer", "best_y_layer", "n_samples", "num_permutations",
    "alpha", "ci_low", "ci_high", "null_method", "seed", "options",
]
MATRIX_CSV_HEADER = [
    "x_model", "y_model", "measure", "aggregate", "raw", "threshold", "calibrated", "p_value",
    "p_bh", "significant_bh", "effect_size", "best_x_layer", "best_y_layer", "ci_low", "ci_high",
    "null_method", "n_samples", "num_permutations", "alpha", "seed", "options",
]



# ---------------------------------------------------------------------------------- basics
def versions() -> dict[str, str]:
    """Versions recorded in every output."""
    import numpy
    import torch

    from alignment_callback import __version__

    return {"alignment_callback": __version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a temporary file, then a rename), as UTF-8; non-finite floats
    refused."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV file as UTF-8 (layer and model names may be any text), whatever the
    locale."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(["" if v is None else v for v in r] for r in rows)


def heatmap(matrix: Any, rows: Sequence[str], cols: Sequence[str], path: Path, title: str,
            xlabel: str, ylabel: str, argmax: Sequence[int] | None = None,
            marks: Any = None) -> None:
    """Save an annotated heatmap; ``marks`` (bool matrix) adds a ``*``.  Drawn on a bare
    ``Figure`` with the Agg canvas: neither pyplot's figures nor its backend are touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from alignment_callback.metrics.plotting import _heatmap_size, plot_layer_heatmap

    fig = Figure(figsize=_heatmap_size((len(rows), len(cols))))
    FigureCanvasAgg(fig)
    plot_layer_heatmap(matrix, rows, cols, ax=fig.subplots(), argmax=argmax, title=title,
                       xlabel=xlabel, ylabel=ylabel, marks=marks)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fmt(v: Any, spec: str = ".4f") -> str:
    return "nan" if v is None else format(v, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned plain-text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _ci(rec: dict) -> str:
    b = rec.get("bootstrap")
    return "" if not b else f"[{b['low']:.4f}, {b['high']:.4f}]"


def permutations_used(record: dict, permutations: int) -> int | None:
    """K for a result calibrated by permutations; ``None`` for one from the exact moments
    (``null_method == "moments"``: no permutation drawn)."""
    return None if record.get("null_method") == "moments" else permutations


def null_settings(args: Any, records: Sequence[dict]) -> dict[str, Any]:
    """The report's settings entries for the null: ``permutations`` (K, left out when no
    result used permutations) and ``null`` (the method; with ``auto``, how many results each
    measure got from the moments)."""
    null = getattr(args, "null", "permutation")
    if null == "moments":
        return {"null": "moments: exact permutation moments + Pearson III (no permutations "
                        "drawn)"}
    if null != "auto":
        return {"permutations": args.permutations, "null": "permutation"}
    counts: dict[str, list[int]] = {}
    for r in records:
        c = counts.setdefault(str(r["measure"]), [0, 0])
        c[0] += r.get("null_method") == "moments"
        c[1] += 1
    used = ", ".join(f"{m} {k} of {n}" for m, (k, n) in counts.items())
    return {"permutations": args.permutations,
            "null": f"auto: exact moments + Pearson III where validated, else the K permutations "
                    f"(results from the moments: {used}; per result: null_method in "
                    "matrix.json / matrix.csv)"}


def calibration_line(args: Any, grouped: bool) -> str:
    """The settings line printed above a result table: the null, alpha, aggregate, seed."""
    null = getattr(args, "null", "permutation")
    what = {"moments": "null: exact permutation moments + Pearson III",
            "auto": f"null: moments where validated, else K={args.permutations} permutations"
            }.get(null, f"K={args.permutations} permutations")
    # the seed draws the permutations (and bootstrap resamples): moments draw none
    seed = ("" if null == "moments" and not getattr(args, "bootstrap", 0) else
            f", seed={args.seed}")
    return (f"{what}, alpha={args.alpha}, aggregate={args.aggregate}{seed}"
            + (", grouped" if grouped else ""))


class Progress:
    """tqdm bar over pairs on stderr, or a plain counter without tqdm (``enabled=False``:
    silent)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.count, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc="pairs", unit="pair", file=sys.stderr,
                                dynamic_ncols=True)

    def update(self, label: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.count}/{self.total}] {label}", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        """A line on stderr that does not break the bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def warn_line(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- compare
def write_compare(out: Path, args: Any, xa: dict, xb: dict, results: dict[str, dict],
                  settings: dict, seconds: float, grouped: bool) -> None:
    """``alignment.json``, ``alignment.csv``, ``heatmap_<measure>.png`` and the console table."""
    from alignment_callback.engine.report import options_text

    na = int(next(iter(xa.values())).shape[0])
    doc = {
        "command": "compare", "created": now(), "n_samples": na,
        "inputs": {
            "a": {"path": str(args.a), "layers": {k: list(v.shape) for k, v in xa.items()}},
            "b": {"path": str(args.b), "layers": {k: list(v.shape) for k, v in xb.items()}},
        },
        "settings": settings, "versions": versions(), "seconds": round(seconds, 3),
        "results": results,
    }
    write_json(out / "alignment.json", doc)
    rows = []
    for m, r in results.items():
        b = r["bootstrap"] or {}
        rows.append([m, r["aggregate"], r["raw"], r["threshold"], r["calibrated"], r["p_value"],
                     r["null_mean"], r["null_std"], r["effect_size"], r["percentile"],
                     r["best_pair"][0], r["best_pair"][1], na,
                     permutations_used(r, args.permutations), args.alpha, b.get("low"),
                     b.get("high"), r.get("null_method"), args.seed,
                     options_text(r.get("kwargs"))])
    write_csv(out / "alignment.csv", COMPARE_CSV_HEADER, rows)
    pngs = []
    for m, r in results.items():
        png = out / f"heatmap_{m}.png"
        heatmap(r["matrix"], r["x_layers"], r["y_layers"], png,
                f"{m}: raw {r['aggregate']} {r['raw']:.3f}, tau {r['threshold']:.3f}, "
                f"calibrated {r['calibrated']:.3f}, p {r['p_value']:.3g}",
                xlabel=f"B layer ({Path(args.b).name})", ylabel=f"A layer ({Path(args.a).name})",
                argmax=r["argmax"])
        pngs.append(png.name)

    print(f"A: {args.a} ({len(xa)} layer(s))  B: {args.b} ({len(xb)} layer(s))  n={na}")
    print(calibration_line(args, grouped))
    headers = ["measure", "raw", "tau", "calibrated", "p", "best layer pair"]
    analytic = getattr(args, "null", "permutation") != "permutation"
    if analytic:
        headers.append("null")
    if args.bootstrap:
        headers.append(f"{int(BOOTSTRAP_CONFIDENCE * 100)}% interval (approx.)")
    lines = []
    for m, r in results.items():
        row = [m, fmt(r["raw"]), fmt(r["threshold"]), fmt(r["calibrated"]),
               fmt(r["p_value"], ".4g"), f"{r['best_pair'][0]} ~ {r['best_pair'][1]}"]
        if analytic:
            row.append(str(r.get("null_method", "")))
        if args.bootstrap:
            row.append(_ci(r))
        lines.append(row)
    print()
    print(table(headers, lines))
    print()
    print(f"wrote {out / 'alignment.json'}, alignment.csv, {', '.join(pngs)}")


# ---------------------------------------------------------------------------------- matrix
def matrix_intro(plan: MatrixPlan, tasks: Sequence[Any], where: Any, world_size: int) -> None:
    """The first stderr line of ``matrix``: pairs, measures, what is done and what is left."""
    from alignment_callback.engine.report import count_text

    total = len(plan.pairs)
    partial = sum(len(t.missing) < len(plan.measures) for t in tasks)
    print(f"matrix: {len(plan.files_x)} x {len(plan.files_y)} = {count_text(total, 'pair')}, "
          f"{len(plan.measures)} measure(s); {total - len(tasks)} already done in {where}, "
          f"{len(tasks)} to compute"
          + (f" ({partial} of them only for missing measures)" if partial else "")
          + (f", shared among {world_size} processes" if world_size > 1 else ""),
          file=sys.stderr, flush=True)


def interrupted_line(finished: int, total: int, this_run: int, path: Path) -> None:
    print(f"interrupted: {finished} of {total} pairs done ({this_run} in this run), saved in "
          f"{path}; rerun the same command to resume", file=sys.stderr, flush=True)


def matrix_rows(plan: MatrixPlan, summary: dict[str, dict]) -> list[dict[str, Any]]:
    """One plain row per pair and measure (the report's and the CSV's content)."""
    from alignment_callback.engine.report import options_text

    rows = []
    for m, s in summary.items():
        for i, j in plan.pairs:
            r = plan.record(i, j, m)
            b = r["bootstrap"] or {}
            rows.append({
                "x": plan.names_x[i], "y": plan.names_y[j], "measure": m,
                "aggregate": r["aggregate"], "raw": r["raw"], "threshold": r["threshold"],
                "calibrated": r["calibrated"], "p_value": r["p_value"],
                "p_bh": s["p_bh"][i][j], "significant": s["significant_bh"][i][j],
                "self": plan.is_self(i, j), "n_samples": r["n_samples"],
                "num_permutations": permutations_used(r, plan.settings["permutations"]),
                "options": options_text(r.get("kwargs")),
                "effect_size": r["effect_size"], "best_pair": r["best_pair"],
                "ci_low": b.get("low"), "ci_high": b.get("high"),
                "null_method": r.get("null_method"),
            })
    return rows


def write_matrix(out: Path, args: Any, plan: MatrixPlan, summary: dict[str, dict],
                 settings: dict, pairs_files: Sequence[Path], grouped: bool) -> None:
    """``matrix.json``, ``matrix.csv``, ``matrix_<measure>.png``, ``report.md``,
    ``report.html`` and the console tables."""
    from alignment_callback.engine.report import count_text, matrix_report

    lx, ly = len(plan.files_x), len(plan.files_y)
    n_samples = plan.record(0, 0, next(iter(plan.measures)))["n_samples"]
    doc = {
        "command": "matrix", "created": now(), "n_samples": n_samples,
        "x_models": plan.names_x, "y_models": plan.names_y,
        "x_files": [str(f) for f in plan.files_x], "y_files": [str(f) for f in plan.files_y],
        "settings": settings,
        "fdr": {"method": "benjamini-hochberg", "alpha": args.alpha,
                "family": "the pairs of two different files, separately per measure (a file "
                          "against itself is aligned by construction: p_bh and significant_bh "
                          "null)",
                "pairs": plan.tested_pairs},
        "versions": versions(), "results": summary,
        "pairs": [{"x_model": plan.names_x[i], "y_model": plan.names_y[j],
                   "results": {m: plan.record(i, j, m) for m in plan.measures}}
                  for i, j in plan.pairs],
    }
    write_json(out / "matrix.json", doc)
    rows = matrix_rows(plan, summary)
    write_csv(out / "matrix.csv", MATRIX_CSV_HEADER, [
        [r["x"], r["y"], r["measure"], r["aggregate"], r["raw"], r["threshold"],
         r["calibrated"], r["p_value"], r["p_bh"], r["significant"], r["effect_size"],
         r["best_pair"][0], r["best_pair"][1], r["ci_low"], r["ci_high"], r["null_method"],
         r["n_samples"], r["num_permutations"], args.alpha, args.seed, r["options"]]
        for r in rows])
    images = []
    for m, s in summary.items():
        png = f"matrix_{m}.png"
        heatmap(s["calibrated"], plan.names_x, plan.names_y, out / png,
                f"{m}: calibrated ({args.aggregate} over layers); * = BH q <= {args.alpha}",
                xlabel=f"{args.dir_y}", ylabel=f"{args.dir_x}", marks=s["significant_bh"])
        images.append((f"{m}: calibrated scores, * = significant after BH", png))
    report_settings = {
        "n": n_samples, **null_settings(args, rows), "alpha": args.alpha,
        "aggregate": args.aggregate,
        **({} if args.null == "moments" and not args.bootstrap else {"seed": args.seed}),
        "measures": {m: plan.measures[m].kwargs for m in plan.measures},
        "x_files": [f.name for f in plan.files_x], "y_files": [f.name for f in plan.files_y],
        "preprocessing": (f"pool={args.pool}, clamp_quantile={args.clamp_quantile}, "
                          f"normalize={not args.no_normalize}"),
        "groups": args.groups or "none (rows exchangeable)",
        "bootstrap": args.bootstrap,
    }
    note = resolution_note(args.permutations, plan.tested_pairs, args.alpha, args.null)
    report = matrix_report(report_settings, rows, images, alpha=args.alpha,
                           notes=[f"Note: {note}."] if note else ())
    report.write(out / "report.md", out / "report.html")

    tested = plan.tested_pairs
    itself = (f"; a file against itself ({len(plan.pairs) - tested} pair(s)) is aligned by "
              "construction and not tested" if tested < len(plan.pairs) else "")
    bh = (f"* = significant after Benjamini-Hochberg across {count_text(tested, 'pair')} "
          f"(q <= {args.alpha})"
          if tested else "no pair of two different files to test")
    print(calibration_line(args, grouped) + f"; {bh}{itself}")
    for m, s in summary.items():
        print(f"\n{m} (calibrated):")
        grid = [[plan.names_x[i]] + [
            f"{s['calibrated'][i][j]:.4f}" + ("*" if s["significant_bh"][i][j] else " ")
            for j in range(ly)] for i in range(lx)]
        print(table([""] + plan.names_y, grid))
        found = sum(bool(v) for row in s["significant_bh"] for v in row)
        if tested:
            print(f"{found} of {count_text(tested, 'pair')} significant after BH")
    files = ", ".join(str(p) for p in pairs_files)
    print(f"\nwrote {out / 'matrix.json'}, matrix.csv, "
          + ", ".join(f"matrix_{m}.png" for m in summary)
          + f", report.md, report.html (per-pair results: {files})")


__all__ = [
    "Progress",
    "heatmap",
    "table",
    "write_compare",
    "write_csv",
    "write_json",
    "write_matrix",
]
