"""From feature files to result records, through the alignment engine.

One pair is one :class:`~alignment_callback.engine.AlignmentEngine` step: the reference (the
Y / B file) is prepared once for every measure, the model (the X / A file) once per step, the
permutations are drawn once and read by every measure.  In ``matrix`` each Y file is prepared
once and every X file is stepped against it.  The records hold exactly the numbers of
:func:`~alignment_callback.functional.calibrated_layer_alignment` for the same preprocessing.

Every data error names the file and the layer (or the two files and layers of a pair).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional.aggregation import LayerAlignmentResult
from alignment_callback.functional.calibration import few_permutations_unsaid
from alignment_callback.functional.pipeline import observed_matrices, prepare_side
from alignment_callback.functional.registry import Measure
from alignment_callback.reporting.io import FeatureFileError, finite_or_none
from alignment_callback.reporting.plan import (
    BOOTSTRAP_CONFIDENCE,
    BOOTSTRAP_FRACTION,
    CLIError,
    MatrixPlan,
    PairTask,
    moments_layers,
    topk_note,
)

Layers = dict[str, Tensor]
Warn = Callable[[str], None]
_DATA_ERRORS = (ValueError, torch.linalg.LinAlgError)
_QUIET = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@dataclass(frozen=True)
class Calibration:
    """The calibration options of a run (``--permutations``, ``--alpha``, ...)."""

    permutations: int
    alpha: float
    aggregate: str
    seed: int
    bootstrap: int = 0
    null: str = "permutation"

    @classmethod
    def from_args(cls, args: Any) -> "Calibration":
        return cls(args.permutations, args.alpha, args.aggregate, args.seed, args.bootstrap,
                   getattr(args, "null", "permutation"))


def _tolist(t: Tensor) -> Any:
    return t.detach().double().cpu().tolist()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------------- loading
class FeatureLoader:
    """Read, preprocess and check feature files; the first file read fixes n.

    Checks, each naming the file and the layer: a constant layer (all rows identical after
    preprocessing, up to round-off), too few rows for a chosen measure (e.g. ``k >= n``), a row count other
    than the first file's, and a ``--groups`` file of another length.  Loaded features are
    kept (``keep=True``) so that a file needed again is read once.
    """

    def __init__(self, args: Any, measures: Mapping[str, Measure], groups: Any = None,
                 device: torch.device | str | None = None) -> None:
        self.args = args
        self.measures = dict(measures)
        self.groups = groups
        self.device = device if device is not None else args.device
        self.first: tuple[Path, int] | None = None
        self.cache: dict[str, Layers] = {}

    def load(self, path: str | Path, key: str | None = None, keep: bool = True,
             check_rows: bool = True) -> Layers:
        """The preprocessed ``{layer: (n, d)}`` of ``path``."""
        key = key or str(path)
        if key in self.cache:
            return self.cache[key]
        from alignment_callback.reporting.io import load_features, preprocess_layers

        if Path(path).is_dir():
            raise FeatureFileError(f"{path}: is a directory, not a feature file (compare takes "
                                   "two files; matrix DIR_X DIR_Y compares folders)")
        raw = load_features(path)
        opts = dict(pool=self.args.pool, clamp_quantile=self.args.clamp_quantile,
                    normalize=not self.args.no_normalize)
        feats = preprocess_layers(raw, source=path, device=self.device, **opts)
        self._check_constant(path, raw, feats, opts)
        n = int(next(iter(feats.values())).shape[0])
        if self.first is None:
            self.first = (Path(path), n)
            self._check_first(Path(path), feats, n)
        elif check_rows and n != self.first[1]:
            raise CLIError(
                f"row mismatch: {path} has {n} rows but {self.first[0]} has {self.first[1]}; "
                "every file must hold the same probe inputs in the same order"
            )
        if keep:
            self.cache[key] = feats
        return feats

    def drop(self, key: str) -> None:
        self.cache.pop(key, None)

    @staticmethod
    def _constant(t: Tensor) -> bool:
        """All rows equal up to float round-off: every feature within a few ulps of its own
        largest value (one feature with a far larger offset does not hide the others')."""
        spread = (t - t[:1]).abs().amax(0)
        return bool((spread <= 64 * torch.finfo(t.dtype).eps * t.abs().amax(0)).all())

    def _check_constant(self, path: str | Path, raw: Layers, feats: Layers,
                        opts: dict[str, Any]) -> None:
        for name, t in feats.items():
            if self._constant(t):
                hint = ""
                if opts["normalize"]:
                    from alignment_callback.reporting.io import preprocess_layers

                    plain = preprocess_layers({name: raw[name]}, source=path,
                                              **{**opts, "normalize": False})[name]
                    if not self._constant(plain):
                        hint = (" after L2 row normalization (its rows differ only by a positive "
                                "scale; try --no-normalize)")
                raise FeatureFileError(
                    f"{path}: layer {name!r} is constant: all {t.shape[0]} rows are identical"
                    f"{hint}, so no similarity measure is defined for it"
                )

    def _check_first(self, path: Path, feats: Layers, n: int) -> None:
        if self.groups is not None and len(self.groups) != n:
            raise CLIError(f"{self.args.groups}: has {len(self.groups)} group labels but the "
                           f"features have {n} rows")
        short = [(name, m) for name, m in self.measures.items() if n < m.min_samples]
        if short:
            layers = list(feats)
            more = ", ..." if len(layers) > 3 else ""
            which = (f"layer {layers[0]!r}" if len(layers) == 1 else
                     f"layers {', '.join(map(repr, layers[:3]))}{more}")
            need = "; ".join(
                f"{name}" + "".join(f", {k}={v}" for k, v in m.params)
                + f" needs at least {m.min_samples}" for name, m in short)
            raise FeatureFileError(
                f"{path}: {which} {'has' if len(layers) == 1 else 'have'} {n} rows (probe "
                f"samples), too few: {need}" + (" (lower --k)" if any(
                    "k" in m.kwargs for _, m in short) else "")
            )


# ------------------------------------------------------------------------------ engine step
def make_engine(measures: Mapping[str, Measure], cal: Calibration, groups: Any = None
                ) -> AlignmentEngine:
    """An engine for already preprocessed features (``preprocess=False``)."""
    with few_permutations_unsaid():  # said in the command line's words (warn_resolution)
        return AlignmentEngine(dict(measures), num_permutations=cal.permutations,
                               alpha=cal.alpha, seed=cal.seed, aggregate=cal.aggregate,
                               groups=groups, preprocess=False, null=cal.null)


def _prepare_layer(engine: AlignmentEngine, name: str, t: Tensor, role: str,
                   dtype: torch.dtype | None = None) -> Any:
    names, feats = engine.features({name: t}, "features")
    if dtype is not None:
        feats = [f.to(dtype) for f in feats]
    return prepare_side(names, feats, list(engine.measures.values()), role)


def _layer_error(path: str | Path, name: str, role: str, err: BaseException) -> FeatureFileError:
    """``path: layer 'name': ...``: the library's own naming of the side and layer ("y layer
    'name': ", or "y: " for a layer named "0") is dropped, so that the layer is named once."""
    text = _one_line(err)
    for prefix in (f"{role} layer {name!r}: ", f"{role}: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    return FeatureFileError(f"{path}: layer {name!r}: {text}")


def _locate_layer(engine: AlignmentEngine, layers: Layers, path: str | Path, role: str,
                  dtype: torch.dtype | None = None) -> FeatureFileError | None:
    """The first layer of ``path`` whose preparation fails, as an error naming it."""
    for name, t in layers.items():
        try:
            _prepare_layer(engine, name, t, role, dtype)
        except _DATA_ERRORS as err:
            return _layer_error(path, name, role, err)
    return None


def set_reference(engine: AlignmentEngine, layers: Layers, path: str | Path) -> None:
    """Prepare the reference file once for every measure; errors name the file and layer."""
    try:
        engine.set_reference(layers)
    except _DATA_ERRORS as err:
        located = _locate_layer(engine, layers, path, "y")
        raise (located or FeatureFileError(f"{path}: {_one_line(err)}")) from err


def _locate_pair(engine: AlignmentEngine, xa: Layers, ya: Layers, x_path: str | Path,
                 y_path: str | Path, err: BaseException) -> FeatureFileError:
    dtype = torch.promote_types(next(iter(xa.values())).dtype, next(iter(ya.values())).dtype)
    located = _locate_layer(engine, xa, x_path, "x", dtype)
    if located is not None:
        return located
    measures = list(engine.measures.values())
    for b, tb in ya.items():
        try:
            yside = _prepare_layer(engine, b, tb, "y", dtype)
        except _DATA_ERRORS as e:
            return _layer_error(y_path, b, "y", e)
        for a, ta in xa.items():
            try:
                observed_matrices(measures, _prepare_layer(engine, a, ta, "x", dtype), yside)
            except _DATA_ERRORS as e:
                return FeatureFileError(f"{x_path} layer {a!r} vs {y_path} layer {b!r}: "
                                        f"{_one_line(e)}")
    return FeatureFileError(f"{x_path} vs {y_path}: {_one_line(err)}")


def _record(res: LayerAlignmentResult, measure: Measure, n: int, keep_null: bool) -> dict:
    rec: dict[str, Any] = {"measure": measure.name, "kwargs": measure.kwargs,
                           "aggregate": res.aggregate, "n_samples": n,
                           "null_method": res.null_method}
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
    return rec


#: the library's advice about ``fraction`` -> what the command line (fraction fixed) can change
_FRACTION_ADVICE = {
    "use a larger fraction, or groups with more groups of each size":
        "use groups with more groups of each size, or no --bootstrap",
    "use a larger fraction": "use more rows, options that need fewer samples (such as a "
                             "smaller --k), or no --bootstrap",
    "use a smaller fraction": "use more rows or groups, or no --bootstrap",
    "use more rows, a smaller k or a larger fraction": "use more rows, a smaller --k, or no "
                                                       "--bootstrap",
}
_FIXED_FRACTION = re.compile("|".join(map(re.escape, _FRACTION_ADVICE)))


def _bootstrap(xa: Layers, ya: Layers, measure: Measure, cal: Calibration, groups: Any) -> dict:
    from alignment_callback.functional.bootstrap import bootstrap_interval

    with warnings.catch_warnings():
        # too few replicates: said once per run in the command line's words (warn_bootstrap)
        warnings.filterwarnings("ignore", "num_bootstrap=.* is too few", UserWarning)
        try:
            bi = bootstrap_interval(
                xa, ya, measure, num_bootstrap=cal.bootstrap, confidence=BOOTSTRAP_CONFIDENCE,
                seed=cal.seed, num_permutations=cal.permutations, alpha=cal.alpha,
                fraction=BOOTSTRAP_FRACTION, groups=groups, aggregate=cal.aggregate,
                null=cal.null,
            )
        except ValueError as err:  # the library's advice names a fraction the CLI does not take
            if not str(err).startswith("fraction="):
                raise
            fixed = f"the command line's fraction is fixed at {BOOTSTRAP_FRACTION}: "
            raise ValueError(f"--bootstrap {cal.bootstrap}: " + _FIXED_FRACTION.sub(
                lambda advice: fixed + _FRACTION_ADVICE[advice.group(0)], str(err))) from None
    return {
        "low": bi.low, "high": bi.high, "confidence": BOOTSTRAP_CONFIDENCE,
        "fraction": BOOTSTRAP_FRACTION, "subsample_size": bi.subsample_size,
        "method": "m-out-of-n subsampling without replacement (approximate)",
        "replicates": _tolist(bi.replicates),
        "unclipped_estimate": bi.unclipped_estimate,
        "unclipped_replicates": _tolist(bi.unclipped_replicates),
    }


def step_pair(engine: AlignmentEngine, ya: Layers, xa: Layers, x_path: str | Path,
              y_path: str | Path, cal: Calibration, groups: Any = None, keep_null: bool = False,
              warn: Warn | None = None) -> dict[str, dict]:
    """Every measure of one pair in one engine step: ``{measure: record}``.

    ``engine`` holds ``ya`` (from ``y_path``) as its reference.  Warnings of the calibration
    (a degenerate threshold) are passed to ``warn`` prefixed with the two files.
    """
    if engine.reference is None:
        set_reference(engine, ya, y_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step = engine.step(xa)
        except _DATA_ERRORS as err:
            raise _locate_pair(engine, xa, ya, x_path, y_path, err) from err
    for w in caught:
        if issubclass(w.category, _QUIET):
            continue
        if warn is not None:
            warn(f"{x_path} vs {y_path}: {_one_line(w.message)}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    records = {}
    for name, measure in engine.measures.items():
        rec = _record(step.results[name], measure, step.n, keep_null)
        if cal.bootstrap:
            rec["bootstrap"] = _bootstrap(xa, ya, measure, cal, groups)
        records[name] = rec
    return records


def compare_pair(xa: Layers, xb: Layers, a_path: str | Path, b_path: str | Path,
                 measures: Mapping[str, Measure], cal: Calibration, groups: Any = None,
                 warn: Warn | None = None) -> dict[str, dict]:
    """``compare A B``: every measure of A (the model) against B (the reference), with nulls."""
    engine = make_engine(measures, cal, groups)
    set_reference(engine, xb, b_path)
    return step_pair(engine, xb, xa, a_path, b_path, cal, groups, keep_null=True, warn=warn)


# ----------------------------------------------------------------------------------- matrix
def pair_line(plan: MatrixPlan, task: PairTask, results: dict[str, dict], seconds: float
              ) -> dict[str, Any]:
    """The ``pairs.jsonl`` line of one finished pair."""
    import datetime

    i, j = task.i, task.j
    return {
        "x_model": plan.names_x[i], "y_model": plan.names_y[j], "x_file": plan.key_x[i],
        "y_file": plan.key_y[j], "x_fingerprint": plan.fingerprints[plan.key_x[i]],
        "y_fingerprint": plan.fingerprints[plan.key_y[j]], "settings": plan.settings,
        "results": results, "seconds": round(seconds, 3),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _load_y(plan: MatrixPlan, loader: FeatureLoader, j: int) -> Layers:
    """Y file ``j``, kept loaded only when it is an X file too (one read for both roles)."""
    key = plan.key_y[j]
    keep = key in plan.key_x
    ya = loader.load(plan.files_y[j], key, keep=keep)
    if not keep:
        loader.drop(key)  # read ahead by check_first_pair: not kept for the whole run
    return ya


def check_first_pair(tasks: list[PairTask], plan: MatrixPlan, loader: FeatureLoader,
                     cal: Calibration) -> None:
    """Before any pair is computed: read every file ``tasks`` need (X files first: the first
    fixes n), so that a bad file (rows, NaN/Inf, a constant layer, too few rows for a measure)
    fails the run before hours of pairs rather than at its column; X files are kept for
    :func:`iter_pairs`, Y files that are not X files too are read again there.  Also checks
    what depends on the files' layers (``--null moments`` needs one layer pair)."""
    if not tasks:
        return
    x_layers = {i: len(loader.load(plan.files_x[i], plan.key_x[i]))
                for i in dict.fromkeys(task.i for task in tasks)}
    y_layers = {j: len(_load_y(plan, loader, j)) for j in dict.fromkeys(task.j for task in tasks)}
    moments_layers(cal.null, [*x_layers.values(), *y_layers.values()],
                   [*(plan.files_x[i] for i in x_layers), *(plan.files_y[j] for j in y_layers)])


def iter_pairs(tasks: list[PairTask], plan: MatrixPlan, loader: FeatureLoader,
               cal: Calibration, groups: Any = None, warn: Warn | None = None,
               note: Warn | None = None) -> Iterator[tuple[PairTask, dict[str, Any]]]:
    """Compute ``tasks`` (Y-major), yielding ``(task, pairs.jsonl line)`` as each finishes.

    Each Y file is prepared once per run of consecutive tasks that share it (and the same
    missing measures); X files are read once and kept.  ``note`` gets the first pair whose
    layer pairs are fewer than ``--aggregate top<m>``'s m (once per run).
    """
    if not tasks:
        return
    loader.load(plan.files_x[tasks[0].i], plan.key_x[tasks[0].i])  # n is fixed by an X file
    current: tuple[int, tuple[str, ...]] | None = None
    engine: AlignmentEngine | None = None
    ya: Layers = {}
    noted = False
    for task in tasks:
        xa = loader.load(plan.files_x[task.i], plan.key_x[task.i])
        if (task.j, task.missing) != current:
            current = (task.j, task.missing)
            ya = _load_y(plan, loader, task.j)
            engine = None
        moments_layers(cal.null, (len(xa), len(ya)), (plan.files_x[task.i], plan.files_y[task.j]))
        text = topk_note(cal.aggregate, len(xa) * len(ya))
        if text is not None and note is not None and not noted:
            note(f"{plan.files_x[task.i]} vs {plan.files_y[task.j]}: {text}")
            noted = True
        if engine is None:
            engine = make_engine({m: plan.measures[m] for m in task.missing}, cal, groups)
            set_reference(engine, ya, plan.files_y[task.j])
        start = time.perf_counter()
        results = step_pair(engine, ya, xa, plan.files_x[task.i], plan.files_y[task.j], cal,
                            groups, warn=warn)
        yield task, pair_line(plan, task, results, time.perf_counter() - start)


def matrix_summary(plan: MatrixPlan, alpha: float) -> dict[str, dict[str, Any]]:
    """Per measure the LX×LY matrices of the records and Benjamini–Hochberg across the pairs of
    two different files: a file against itself (p = 1/(K + 1) by construction) would add a
    sure discovery and loosen the threshold of the others; its ``p_bh`` and ``significant_bh``
    are None."""
    from alignment_callback.functional.fdr import at_most_alpha, benjamini_hochberg

    lx, ly = len(plan.files_x), len(plan.files_y)
    tested = torch.tensor([[not plan.is_self(i, j) for j in range(ly)] for i in range(lx)])
    keep = tested.tolist()

    def family(values: Tensor) -> list:  # None where the pair is not tested
        return [[v if t else None for v, t in zip(row, kept, strict=True)]
                for row, kept in zip(values.tolist(), keep, strict=True)]

    summary: dict[str, Any] = {}
    for m in plan.measures:
        def field(name: str, m: str = m) -> list:
            return [[plan.record(i, j, m)[name] for j in range(ly)] for i in range(lx)]

        def boot(name: str, m: str = m) -> list:
            return [[(plan.record(i, j, m)["bootstrap"] or {}).get(name) for j in range(ly)]
                    for i in range(lx)]

        # q in float64 (tiny moments p-values do not underflow), but q <= alpha with float32's
        # slack: most p-values were computed in float32 (read in float64, float32(0.05) is
        # above 0.05), and the files do not record which were not
        p = torch.tensor(field("p_value"), dtype=torch.float64)
        adjusted = torch.full_like(p, math.nan)
        if tested.any():
            _, adjusted[tested] = benjamini_hochberg(p[tested], alpha=alpha)
        rejected = at_most_alpha(adjusted, alpha, torch.float32)
        summary[m] = {
            "kwargs": plan.measures[m].kwargs, "raw": field("raw"),
            "threshold": field("threshold"), "calibrated": field("calibrated"),
            "p_value": field("p_value"), "p_bh": family(adjusted),
            "significant_bh": family(rejected), "effect_size": field("effect_size"),
            "best_pair": field("best_pair"), "ci_low": boot("low"), "ci_high": boot("high"),
        }
    return summary


__all__ = [
    "Calibration",
    "FeatureLoader",
    "check_first_pair",
    "compare_pair",
    "iter_pairs",
    "make_engine",
    "matrix_summary",
    "pair_line",
    "set_reference",
    "step_pair",
]
