"""What a run will do: the measures and their options, the settings that change results, the
files and pairs of a ``matrix`` and which of them are already done.

Nothing here loads features or computes a score.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from alignment_callback.functional.registry import REGISTRY, Measure, canonical_name

DEFAULT_MEASURES: tuple[str, ...] = ("linear_cka", "mutual_knn", "cknna")
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_FRACTION = 0.8


class CLIError(ValueError):
    """Bad command-line input (reported as ``error: ...`` with exit code 2)."""


# ---------------------------------------------------------------------------- registry text
def measure_names_text() -> str:
    """The registered measures and their aliases, for ``--help`` and errors."""
    names = ", ".join(REGISTRY)
    aliases = [f"{a} ({info.name})" for info in REGISTRY.values() for a in info.aliases]
    return names + (f"; aliases: {', '.join(aliases)}" if aliases else "")


def parameter_owners() -> dict[str, list[str]]:
    """``{parameter name: [measures declaring it]}`` from the registry."""
    owners: dict[str, list[str]] = {}
    for info in REGISTRY.values():
        for p in info.params:
            owners.setdefault(p.name, []).append(info.name)
    return owners


def shorthand_help(name: str, what: str) -> str:
    """Help of ``--k`` / ``--sigma``: who declares the parameter and its default (registry)."""
    owners = parameter_owners().get(name, [])
    default = next((p.default for info in REGISTRY.values() for p in info.params
                    if p.name == name), None)
    return (f"same as --option {name}={what} for the measures that declare {name} "
            f"({', '.join(owners) or 'none'}; default {default}); ignored by the others")


def parameters_text() -> str:
    """``name (measures): help`` for every declared parameter, for ``--help``."""
    helps = {p.name: p.help for info in REGISTRY.values() for p in info.params}
    return "; ".join(f"{name} ({', '.join(ms)}): {helps[name]}"
                     for name, ms in parameter_owners().items())


# --------------------------------------------------------------------------------- measures
def parse_value(text: str) -> Any:
    """A ``--option`` value: a Python literal (``3``, ``0.5``, ``None``, ``[0.1, 1]``) or, if
    it is none, the text itself (``median``, ``rbf``); ``none``/``null``/``true``/``false`` are
    read as ``None``/``True``/``False``.

    >>> parse_value("3"), parse_value("0.5"), parse_value("median"), parse_value("none")
    (3, 0.5, 'median', None)
    """
    words = {"none": None, "null": None, "true": True, "false": False}
    if text.strip().lower() in words:
        return words[text.strip().lower()]
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


@dataclass(frozen=True)
class OptionValue:
    """One measure option from the command line: its value and how it was written."""

    name: str
    value: Any
    source: str  # e.g. "--option alpha=0.5" or "--k 5"


def requested_options(args: argparse.Namespace) -> dict[str, OptionValue]:
    """``--k``, ``--sigma`` and every ``--option NAME=VALUE``, by parameter name."""
    out: dict[str, OptionValue] = {}

    def add(opt: OptionValue) -> None:
        if opt.name in out and out[opt.name].value != opt.value:
            raise CLIError(f"{opt.source}: {opt.name} is also given by {out[opt.name].source}")
        out[opt.name] = opt

    if getattr(args, "k", None) is not None:
        add(OptionValue("k", args.k, f"--k {args.k}"))
    if getattr(args, "sigma", None) is not None:
        add(OptionValue("sigma", args.sigma, f"--sigma {args.sigma}"))
    for text in getattr(args, "option", None) or []:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise CLIError(f"--option {text}: expected NAME=VALUE (e.g. --option alpha=0.5)")
        add(OptionValue(name, parse_value(value), f"--option {text}"))
    return out


def _measure_words(args: argparse.Namespace) -> tuple[list[str], str]:
    """The names given to ``--measure`` (and the deprecated ``--metric``) and the word used."""
    given = list(getattr(args, "measure", None) or [])
    old = list(getattr(args, "metric", None) or [])
    word = "metric" if old and not given else "measure"
    items = given + old
    if not items:
        return list(DEFAULT_MEASURES), word
    names = [name.strip() for item in items for name in item.split(",") if name.strip()]
    if not names:
        raise CLIError(f"--{word}: no {word} given")
    return names, word


def _finite(value: Any) -> bool:
    """No infinite or NaN number in an option's value (a number or a list of them)."""
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def choose_measures(args: argparse.Namespace) -> dict[str, Measure]:
    """The chosen measures bound to their options: ``{canonical name: Measure}``.

    Names come from ``--measure`` / ``--metric`` (aliases accepted, duplicates dropped);
    options from ``--k``, ``--sigma`` and ``--option NAME=VALUE``, each checked by the
    registry's declaration and applied to every chosen measure that declares that parameter.
    ``--k`` and ``--sigma`` are ignored by measures without such a parameter; a ``--option``
    that no chosen measure declares is an error.
    """
    names, word = _measure_words(args)
    chosen: list[str] = []
    for name in names:
        try:
            canon = canonical_name(name)
        except ValueError as err:
            hint = str(err).split("Built-ins:")[0].strip().rstrip(";")
            hint = hint.replace("unknown measure", f"unknown {word}")
            end = " " if hint.endswith(("?", ".")) else ". "  # not "?. Measures"
            raise CLIError(f"--{word}: {hint}{end}Measures: {measure_names_text()}") from None
        if canon not in chosen:
            chosen.append(canon)
    options = requested_options(args)
    owners = parameter_owners()
    for opt in options.values():
        if opt.source.startswith("--option") and not any(
                opt.name in {p.name for p in REGISTRY[m].params} for m in chosen):
            where = (f"it is a parameter of {', '.join(owners[opt.name])}" if opt.name in owners
                     else f"no measure declares it; parameters: {', '.join(owners)}")
            raise CLIError(f"{opt.source}: none of the chosen measures ({', '.join(chosen)}) "
                           f"has a parameter {opt.name!r}; {where}")
    out: dict[str, Measure] = {}
    for name in chosen:
        info = REGISTRY[name]
        kwargs = {}
        for p in info.params:
            if p.name in options:
                opt = options[p.name]
                try:
                    kwargs[p.name] = p.check(opt.value, f"{name}: {p.name}")
                except (ValueError, TypeError) as err:
                    raise CLIError(f"{opt.source}: {err}") from None
                if not _finite(kwargs[p.name]):  # e.g. --sigma inf: no data could fix it
                    raise CLIError(f"{opt.source}: {name}: {p.name} must be finite, got "
                                   f"{opt.value!r}")
        out[name] = info.bind(**kwargs)
    return out


def ignored_shorthand_note(args: argparse.Namespace) -> str | None:
    """The note printed when ``--k`` / ``--sigma`` was given but no chosen measure has that
    parameter (ignored, as documented, but said: ``--option`` would be an error)."""
    chosen = sorted({canonical_name(name) for name in _measure_words(args)[0]})
    ignored = [opt.source for opt in requested_options(args).values()
               if not opt.source.startswith("--option")
               and not any(opt.name in {p.name for p in REGISTRY[m].params} for m in chosen)]
    if not ignored:
        return None
    return (f"note: {' and '.join(ignored)} ignored: none of the chosen measures "
            f"({', '.join(chosen)}) has that parameter")


def deprecation_note(args: argparse.Namespace) -> str | None:
    """The note printed when the deprecated ``--metric`` was used."""
    if getattr(args, "metric", None):
        return "note: --metric is deprecated; use --measure (same meaning)"
    return None


# ---------------------------------------------------------------------------------- settings
def check_args(args: argparse.Namespace, measures: dict[str, Measure] | None = None) -> None:
    """Range checks of the calibration options, and ``--null moments`` against the chosen
    ``measures`` and ``--groups``, before any file is read; each error names its option."""
    if args.permutations < 1:
        raise CLIError(f"--permutations must be >= 1, got {args.permutations}")
    if not 0.0 < args.alpha < 1.0:
        raise CLIError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.clamp_quantile is not None and not 0.0 < args.clamp_quantile <= 1.0:
        raise CLIError(f"--clamp-quantile must be in (0, 1], got {args.clamp_quantile}")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise CLIError(f"--bootstrap must be 0 (off) or >= 2 (one replicate gives an interval of "
                       f"width 0), got {args.bootstrap}")
    _check_seed(args.seed, args.bootstrap)
    _check_null(args, measures or {})
    _check_timeout(getattr(args, "dist_timeout", None))
    out = getattr(args, "out", None)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out}: exists and is not a directory")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--device cuda was requested but CUDA is not available")


def _check_seed(seed: int, bootstrap: int) -> None:
    """``--seed`` is a permutation seed, and with ``--bootstrap B`` replicate b (0-based) uses
    seed + 1 + b, which must stay a seed too."""
    from alignment_callback.functional._validation import MAX_SEED, check_seed

    try:
        check_seed(seed, "--seed")
    except ValueError as err:
        raise CLIError(str(err)) from err
    if seed + bootstrap > MAX_SEED:
        raise CLIError(f"--seed must be at most 2**63 - 1 - {bootstrap} = {MAX_SEED - bootstrap} "
                       f"with --bootstrap {bootstrap} (bootstrap replicate b uses seed + 1 + b), "
                       f"got {seed}")


def _check_timeout(timeout: float | None) -> None:
    """``--dist-timeout`` (``matrix`` only): seconds in (0, MAX_TIMEOUT_S]."""
    from alignment_callback.reporting.distributed import MAX_TIMEOUT_S

    if timeout is None:
        return
    if not timeout > 0:  # NaN too
        raise CLIError(f"--dist-timeout must be > 0, got {timeout}")
    if not timeout <= MAX_TIMEOUT_S:
        raise CLIError(f"--dist-timeout must be at most {MAX_TIMEOUT_S} seconds (about 31 "
                       f"years; torch.distributed's clock overflows beyond), got {timeout:g}")


def _check_null(args: argparse.Namespace, measures: dict[str, Measure]) -> None:
    """``--null moments`` needs an analytic null for every measure and single-row permutations
    (the number of layer pairs is checked once the files are read, :func:`moments_layers`)."""
    if args.null != "moments":
        return
    if args.groups:
        raise CLIError("--null moments cannot be used with --groups: the moments are those of a "
                       "uniform permutation of single rows, not of the block permutations that "
                       "groups ask for; use --null permutation, or --null auto (which uses "
                       "permutations with groups)")
    without = [name for name, m in measures.items() if not m.info.analytic]
    if without:
        analytic = [name for name, info in REGISTRY.items() if info.analytic]
        raise CLIError(f"--null moments cannot calibrate --measure {', '.join(without)}: "
                       f"{'it has' if len(without) == 1 else 'they have'} no analytic null (only "
                       f"the gram family has: {', '.join(analytic)}); use --null permutation, or "
                       "--null auto to use moments where they apply")


def moments_layers(null: str, layers: Sequence[int], paths: Sequence[Any]) -> None:
    """``--null moments`` calibrates a single layer pair: refuse files of several layers (the
    aggregate over layer pairs needs their joint permutation null), naming the first."""
    if null != "moments":
        return
    for count, path in zip(layers, paths):
        if count > 1:
            raise CLIError(f"--null moments calibrates one layer pair, but {path} has {count} "
                           "layers: an aggregate over several layer pairs (--aggregate) needs "
                           "their joint permutation null; use --null permutation, or --null auto "
                           "to use moments where they apply (on files of one layer)")


def topk_note(aggregate: str, pairs: int) -> str | None:
    """The note for ``--aggregate top<m>`` with m above the number of layer pairs: m is clamped
    to it, so the aggregate is their mean."""
    if not aggregate.startswith("top") or int(aggregate[3:]) <= pairs:
        return None
    return (f"--aggregate {aggregate} over {pairs} layer pair(s): m is clamped to the number "
            "of pairs, so the aggregate is their mean (the same as --aggregate mean)")


def warn_bootstrap(bootstrap: int) -> None:
    """Warn when ``--bootstrap B`` is too few for the 95 % interval's ends (the library's
    warning, :func:`~alignment_callback.functional.bootstrap.few_replicates`, in the
    command line's words; the library's own is not repeated for every pair)."""
    from alignment_callback.functional.bootstrap import enough_replicates

    need = enough_replicates(BOOTSTRAP_CONFIDENCE)
    if not 0 < bootstrap < need:
        return
    tail = 100.0 * (1.0 - BOOTSTRAP_CONFIDENCE) / 2.0
    print(f"warning: with --bootstrap {bootstrap} the {BOOTSTRAP_CONFIDENCE:.0%} interval's ends, "
          f"the {tail:g}% and {100.0 - tail:g}% quantiles of the replicates, are interpolated "
          "between the most extreme replicates, so the interval is too narrow and changes with "
          f"--seed; --bootstrap >= {need} avoids this", file=sys.stderr, flush=True)


def run_settings(args: argparse.Namespace, groups: Any) -> dict[str, Any]:
    """Settings that change results (the measures' options are recorded per measure), as
    given: what the outputs record.  A stored pair is reused when its :func:`resume_key`
    matches."""
    from alignment_callback.reporting.io import labels_digest

    return {
        "permutations": args.permutations, "alpha": args.alpha, "aggregate": args.aggregate,
        "null": args.null,
        "seed": args.seed, "pool": args.pool, "clamp_quantile": args.clamp_quantile,
        "normalize": not args.no_normalize, "groups": labels_digest(groups),
        "bootstrap": args.bootstrap,
        "bootstrap_fraction": BOOTSTRAP_FRACTION if args.bootstrap else None,
    }


#: Settings that ``--null moments`` does not use: no permutation is drawn, so K and the seed
#: change no result (the seed still draws the ``--bootstrap`` subsamples)
_UNUSED_BY_MOMENTS: tuple[str, ...] = ("permutations", "seed")


def resume_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of :func:`run_settings` that decides whether a stored pair is reused: all of
    it, except ``permutations`` and ``seed`` with ``null == "moments"`` (``seed`` only without
    ``--bootstrap``).  ``"auto"`` keeps both: it may fall back to permutations.

    >>> resume_key({"null": "moments", "permutations": 500, "seed": 0, "bootstrap": 0})
    {'null': 'moments', 'bootstrap': 0}
    >>> resume_key({"null": "moments", "permutations": 500, "seed": 0, "bootstrap": 40})
    {'null': 'moments', 'seed': 0, 'bootstrap': 40}
    """
    if settings.get("null") != "moments":
        return dict(settings)
    unused = [k for k in _UNUSED_BY_MOMENTS if not (k == "seed" and settings.get("bootstrap"))]
    return {k: v for k, v in settings.items() if k not in unused}


def measure_kwargs(measures: dict[str, Measure]) -> dict[str, dict[str, Any]]:
    """``{measure: its bound options}`` (defaults included), as recorded with every result."""
    return {name: m.kwargs for name, m in measures.items()}


def describe_settings(args: argparse.Namespace, measures: dict[str, Measure],
                      groups: Any) -> dict[str, Any]:
    """The ``settings`` entry of ``alignment.json`` / ``matrix.json``."""
    return {"metrics": list(measures), "measures": measure_kwargs(measures),
            "device": args.device, "groups_file": args.groups, **run_settings(args, groups)}


def out_folder(path: str | Path) -> Path:
    """Create the ``--out`` folder (and its parents); a failure is a :class:`CLIError` naming
    ``--out`` (a path under a regular file, no permission, a read-only filesystem)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {path}: cannot create the output folder ({os_reason(err)})"
                       ) from err
    return out


def os_reason(err: OSError) -> str:
    """The reason of a failed file operation, without the errno and the path Python adds."""
    if isinstance(err, FileExistsError) and err.filename:  # mkdir(exist_ok=True): not a folder
        return f"{err.filename} exists and is not a folder"
    return err.strerror or " ".join(str(err).split()) or type(err).__name__


def warn_resolution(num_permutations: int, tests: int, alpha: float,
                    null: str = "permutation") -> None:
    """Warn on stderr when 1/(K + 1), the smallest attainable p-value, is too coarse for
    ``alpha`` (:func:`resolution_note`)."""
    note = resolution_note(num_permutations, tests, alpha, null)
    if note:
        print(f"warning: {note}", file=sys.stderr, flush=True)


def resolution_note(num_permutations: int, tests: int, alpha: float,
                    null: str = "permutation") -> str:
    """Why 1/(K + 1), the smallest attainable p-value, is too coarse for ``alpha`` ("" when
    it is not).

    Every test needs 1/(K + 1) <= alpha (else no p-value reaches alpha, τ is the largest of a
    score and its null, and every calibrated score is 0).  After Benjamini–Hochberg over m
    tests, r pairs at the smallest p get q = m / (r (K + 1)), so a pair is only detectable
    together with at least r = ⌈m / (alpha (K + 1))⌉ such pairs.  Nothing to warn with
    ``null="moments"`` (no permutations: the p-values are continuous); with ``"auto"`` the
    warning is about the results calibrated by permutations.
    """
    smallest = 1.0 / (num_permutations + 1)
    if null == "moments" or max(tests, 1) * smallest <= alpha:
        return ""
    need = math.ceil(max(tests, 1) / alpha - 1e-9) - 1
    if tests <= 1 or smallest > alpha:
        detail = (f"no p-value can reach alpha={alpha}: the threshold τ is the largest of a "
                  "score and its null, and every calibrated score is 0")
    else:
        r = math.ceil(tests * smallest / alpha - 1e-9)
        detail = (f"after Benjamini-Hochberg over {tests} pairs a pair is only significant if at "
                  f"least {r} pairs reach that smallest p")
    which = " (for the results --null auto calibrates by permutations)" if null == "auto" else ""
    return (f"with K={num_permutations} permutations the smallest p-value is "
            f"1/{num_permutations + 1}{which}, so {detail}; --permutations >= {need} avoids this")


# ------------------------------------------------------------------------------------ matrix
@dataclass(frozen=True)
class PairTask:
    """One pair to compute: X file ``i`` against Y file ``j``, for the ``missing`` measures."""

    i: int
    j: int
    missing: tuple[str, ...]


@dataclass
class MatrixPlan:
    """The files, pairs and measures of a ``matrix`` run, and what is already done."""

    files_x: list[Path]
    files_y: list[Path]
    names_x: list[str]
    names_y: list[str]
    key_x: list[str]
    key_y: list[str]
    fingerprints: dict[str, list[int]]
    measures: dict[str, Measure]
    settings: dict[str, Any]
    done: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)

    @property
    def kwargs(self) -> dict[str, dict[str, Any]]:
        return measure_kwargs(self.measures)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Every (X index, Y index) pair, X-major (the order of the outputs)."""
        return [(i, j) for i in range(len(self.files_x)) for j in range(len(self.files_y))]

    def is_self(self, i: int, j: int) -> bool:
        """Whether pair (i, j) is a file against itself (a folder against itself: the
        diagonal), which is aligned by construction and left out of Benjamini–Hochberg."""
        return self.key_x[i] == self.key_y[j]

    @property
    def tested_pairs(self) -> int:
        """The pairs in the Benjamini–Hochberg family: those of two different files."""
        return sum(not self.is_self(i, j) for i, j in self.pairs)

    def pending(self) -> list[PairTask]:
        """Pairs with measures not done yet, Y-major: each Y file is prepared once for the X
        files that follow it."""
        tasks = []
        for j in range(len(self.files_y)):
            for i in range(len(self.files_x)):
                have = self.done.get((self.key_x[i], self.key_y[j]), {})
                missing = tuple(m for m in self.measures if m not in have)
                if missing:
                    tasks.append(PairTask(i, j, missing))
        return tasks

    def record(self, i: int, j: int, measure: str) -> dict:
        return self.done[(self.key_x[i], self.key_y[j])][measure]

    def is_complete(self) -> bool:
        return not self.pending()


def plan_matrix(args: argparse.Namespace, measures: dict[str, Measure], groups: Any) -> MatrixPlan:
    """List both folders, fingerprint the files; ``done`` is filled by the store."""
    from alignment_callback.reporting.io import file_fingerprint, list_feature_files, model_names

    files_x, files_y = list_feature_files(args.dir_x), list_feature_files(args.dir_y)
    key_x = [str(f.resolve()) for f in files_x]
    key_y = [str(f.resolve()) for f in files_y]
    return MatrixPlan(
        files_x=files_x, files_y=files_y, names_x=model_names(files_x),
        names_y=model_names(files_y), key_x=key_x, key_y=key_y,
        fingerprints={k: file_fingerprint(k) for k in key_x + key_y}, measures=measures,
        settings=run_settings(args, groups),
    )


def shard(tasks: Sequence[PairTask], rank: int, world_size: int) -> list[PairTask]:
    """The tasks of process ``rank``: every ``world_size``-th, starting at ``rank``.

    >>> [t.i for t in shard([PairTask(i, 0, ("m",)) for i in range(5)], 1, 2)]
    [1, 3]
    """
    return list(tasks[rank::world_size])


__all__ = [
    "BOOTSTRAP_CONFIDENCE",
    "BOOTSTRAP_FRACTION",
    "CLIError",
    "DEFAULT_MEASURES",
    "MatrixPlan",
    "PairTask",
    "check_args",
    "choose_measures",
    "moments_layers",
    "os_reason",
    "out_folder",
    "plan_matrix",
    "resume_key",
    "run_settings",
    "shard",
    "topk_note",
    "warn_bootstrap",
    "resolution_note",
    "warn_resolution",
]
