"""The one calibration pipeline: prepare each side once, score the observed layer matrices and
their permutation nulls for several measures together, and calibrate.

Every calibrated number in the library comes from :func:`calibrate_prepared`: the functional
API (:func:`calibrated_alignment` is the 1×1 case of :func:`calibrated_layer_alignment`), the
metric objects and the engine behind the callback and the command line.

Work is shared wherever the math allows:

* each layer is prepared once per measure, and kNN measures share one neighbor list per layer
  built for the largest k (a smaller k reads a prefix);
* the permutations are drawn once (:class:`~alignment_callback.functional.permutation.Permutations`)
  and every measure reads the same ones;
* the kNN measures compute their nulls in one pass (each model layer's edges mapped through
  π once per chunk, each layer pair looked up once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from alignment_callback.functional._precision import no_autocast, warn_if_tf32
from alignment_callback.functional._memory import available_bytes as _available_bytes
from alignment_callback.functional._memory import (
    format_bytes,
    free_to_check,
    square_matrix_error,
)
from alignment_callback.functional._validation import (
    AUTO,
    check_alpha,
    check_matrix,
    check_max_score,
    errors_named,
    user_stacklevel,
)
from alignment_callback.functional.aggregation import (
    Aggregate,
    Layers,
    LayerAlignmentResult,
    MappedAggregate,
    aggregate_fn,
    calibrate_layers_from_matrices,
    named_layers,
)
from alignment_callback.functional.analytic_null import (
    analytic_fields,
    check_moments_apply,
    check_null,
    exact_knn_moments,
    invariants,
)
from alignment_callback.functional.calibration import (
    CalibrationResult,
    resolution,
    warn_above_max,
    warn_unresolved,
)
from alignment_callback.functional.gram_measures import FeatureState, stack_states
from alignment_callback.functional.knn_measures import (
    check_distinct_rows,
    knn_chunk_cost,
    knn_layer_scores,
)
from alignment_callback.functional.moments import NEAR_TIE_RTOL, has_tied_rows
from alignment_callback.functional.neighbors import neighbor_lists
from alignment_callback.functional.permutation import Permutations, chunk_size_for
from alignment_callback.functional.registry import (
    Measure,
    MeasureSpec,
    check_samples,
    check_shadowed_options,
    default_value,
    get_measure,
    measure_argument,
    measure_list,
)

Groups = Any  # a sequence / array / tensor of one group label per sample

#: The public functions' default measures, marked so that the same name given explicitly counts
#: as given (``measure=`` next to its deprecated ``metric=`` is an error).
_KNN, _CKA = default_value("mutual_knn"), default_value("linear_cka")

#: Gram-family states kept per side without streaming; a streamed layer null holds at most
#: GRAM_BLOCK reference states and one model state at a time.
GRAM_KEPT = 4
GRAM_BLOCK = 4


# --------------------------------------------------------------------------------- sides
@dataclass
class PreparedSide:
    """One side's layers, preprocessed features and prepared states for a set of measures.

    Attributes
    ----------
    role : str
        ``"x"`` (the model) or ``"y"`` (the reference): only tie-breaking depends on it.
    names : list[str]
        Layer names, in order.
    features : list[Tensor]
        The (n, d) matrices the states were prepared from.
    states : dict[Measure, list[Any]]
        Per measure, one prepared state per layer.
    label : str
        The side's name in messages (default: ``role``; the engine's ``"model"`` and
        ``"reference"``).
    """

    role: str
    names: list[str]
    features: list[Tensor]
    states: dict[Measure, list[Any]] = field(default_factory=dict)
    lazy: set[Measure] = field(default_factory=set)
    invariants: dict[tuple[Measure, int], Any] = field(default_factory=dict)
    label: str = ""

    @property
    def who(self) -> str:
        """The side's name in messages."""
        return self.label or self.role

    def invariant(self, measure: Measure, i: int, compute: Callable[[Any], Any]) -> Any:
        """Layer ``i``'s permutation invariants for ``measure`` (computed once, kept: a
        cached reference's serve every step)."""
        # keyed by the state's route too: a feature-space and an n×n state give the same
        # invariants up to rounding, and a call must not take another call's route's rounding
        route = type(self.states[measure][i]).__name__ if measure in self.states else "lazy"
        key = (measure, i, route)
        if key not in self.invariants:
            self.invariants[key] = compute(self.state(measure, i))
        return self.invariants[key]

    def state(self, measure: Measure, i: int) -> Any:
        """Layer ``i``'s state for ``measure``: kept, or prepared now and not kept (a lazy
        gram-family measure, whose n×n states are streamed to bound memory)."""
        if measure in self.states:
            return self.states[measure][i]
        return _prepared(measure, self, i)

    @property
    def n(self) -> int:
        return self.features[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.features[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.features[0].dtype

    def subset(self, rows: Tensor) -> "PreparedSide":
        """The same layers restricted to ``rows`` (states are prepared again on use)."""
        return PreparedSide(self.role, list(self.names),
                            [f[rows.to(f.device)] for f in self.features], label=self.label)


def side_features(layers: Layers | Tensor, label: str, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[list[str], list[Tensor]]:
    """Checked (n, d) matrices of one side: same n, same device, one dtype (the widest given
    or ``dtype``), detached; errors name the side and the layer.  A single tensor is one layer
    named "0" (errors then name the side alone)."""
    if isinstance(layers, Tensor):
        names, mats = ["0"], [check_matrix(layers, label)]
    else:
        layers = named_layers(layers, label)
        names = list(layers)
        mats = [check_matrix(t, f"{label} layer {name!r}") for name, t in layers.items()]
    n = mats[0].shape[0]
    for name, t in zip(names, mats):
        if t.shape[0] != n:
            raise ValueError(f"all layers must have the same number of samples: {label} layer "
                             f"{name!r} has {t.shape[0]}, expected {n}")
    if dtype is None:
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in mats) else torch.float32
    dev = torch.device(device) if device is not None else mats[0].device
    return names, [t.to(device=dev, dtype=dtype) for t in mats]


def prepare_side(names: Sequence[str], features: Sequence[Tensor], measures: Sequence[Measure],
                 role: str, side: PreparedSide | None = None, keep_gram: bool | None = None,
                 null: str = "permutation", reserve: int = 0, held: int = 0,
                 label: str = "") -> PreparedSide:
    """Prepare ``features`` for every measure not prepared yet in ``side`` (or a new side).

    kNN measures get one shared neighbor list per layer, built for their largest k.
    Gram-family states (one n×n matrix per layer) are kept when ``keep_gram`` (default: when
    the side has at most :data:`GRAM_KEPT` layers); otherwise they are *lazy*: prepared block
    by block when the null needs them and dropped after, so memory does not grow with the
    number of layers.  With an analytic ``null`` a single layer with d < n of a linear-kernel
    measure is kept as features (no n×n matrix at all).  Before n×n matrices are allocated,
    their memory is estimated and a probe too large for it is refused with a clear error;
    measures with n×n states outside the gram family (RBF Bures) are checked before any layer
    is prepared, counting every layer's state of this side.  ``reserve`` (gram family) and
    ``held`` (the others) count the states of a side that will be prepared *after* this one
    (:func:`room_for`); a side prepared already is not counted again: the memory it holds is
    no longer reported available.
    """
    side = side or PreparedSide(role, list(names), list(features), label=label)
    warn_if_tf32(side.device, side.dtype)
    if keep_gram is None:
        keep_gram = len(side.features) <= GRAM_KEPT
    todo = [m for m in dict.fromkeys(measures) if m not in side.states and m not in side.lazy]
    for m in todo:
        check_samples(m, side.n)
    for m in todo:
        if m.info.memory_check is not None:
            m.info.memory_check(side.features[0], len(side.features) - 1 + held, m.kwargs)
    shared: dict[str, list[Any]] = {}
    knn = [m for m in todo if m.info.shared == "neighbor_lists"]
    if knn:
        kmax = max(m.kwargs["k"] for m in knn)
        for m in knn:  # first the checks that name the measure (k < n, distinct rows)
            for i, f in enumerate(side.features):
                with _naming_layer(side, i):
                    check_distinct_rows(f, m.name)
        shared["neighbor_lists"] = []
        for i, f in enumerate(side.features):
            with _naming_layer(side, i):
                shared["neighbor_lists"].append(neighbor_lists(f, kmax, role))
    for m in todo:
        route = m.info.feature_state
        if (route is not None and null != "permutation" and len(side.features) == 1
                and side.features[0].shape[1] < side.n):
            with _naming_layer(side, 0):
                side.states[m] = [route(side.features[0])]
            continue
        if m.family == "gram":
            check_gram_memory(m, side.n, side.dtype, side.device,
                              len(side.features) if keep_gram else 1, reserve,
                              single_pair=len(side.features) == 1)
        if m.family == "gram" and not keep_gram:
            _prepared(m, side, 0)  # fail now (zero variance, ...), keep nothing
            side.lazy.add(m)
            continue
        if m.family == "gram":  # one (L, n, n) tensor the kernel reads as it is
            side.states[m] = stack_states((_prepared(m, side, i) for i in
                                           range(len(side.features))), len(side.features))
            continue
        lists = shared.get(m.info.shared or "")
        side.states[m] = [_prepared(m, side, i, None if lists is None else lists[i])
                          for i in range(len(side.features))]
    return side


def _naming_layer(side: PreparedSide, i: int) -> contextlib.AbstractContextManager[None]:
    """Errors raised inside name the side and, for named layers, the layer ("y layer 'b':
    rsa: a sample has an all-zero feature vector")."""
    name = side.names[i]
    return errors_named(side.who if side.names == ["0"] else f"{side.who} layer {name!r}")


def _prepared(m: Measure, side: PreparedSide, i: int, lists: Any = None) -> Any:
    with _naming_layer(side, i):
        return m.prepare(side.features[i], side.role, lists)


def check_gram_memory(measure: Measure, n: int, dtype: torch.dtype, device: torch.device,
                      kept: int, reserve: int = 0, single_pair: bool = True) -> None:
    """Refuse, before allocating, n×n matrices that would not fit: the estimate (``kept``
    states, the last one at the peak of its preparation, ``MeasureInfo.prepare_peak``, plus
    ``reserve`` for the other side's states) against the memory available, and what to do
    instead (the moments null only for a single layer pair: layer lists need permutations)."""
    if not single_pair:
        alternatives = "one layer pair with linear_cka and null='moments' (no n×n matrix)"
    elif not measure.info.feature_state:
        alternatives = ("linear_cka or rv_coefficient with null='moments' (computed from the "
                        "features, no n×n matrix)")
    else:
        alternatives = "null='moments' (computed from the features, no n×n matrix)"
    count = kept - 1 + measure.info.prepare_peak(dtype) + reserve
    error = square_matrix_error(measure.name, n, count, dtype, device,
                                _available_bytes, alternatives)
    if error is not None:
        raise error


# ----------------------------------------------------------------------------- scoring
def _clamp(measure: Measure, scores: Tensor) -> Tensor:
    """Keep a bounded measure inside its documented range (float error can step out)."""
    lo, hi = measure.info.value_range
    return scores.clamp(min=lo, max=hi) if lo is not None or hi is not None else scores


def _group_scores(measures: Sequence[Measure], xside: PreparedSide, yside: PreparedSide,
                  perms: Tensor) -> list[Tensor]:
    """(B, LA, LB) scores of each (kept) measure for the permutations ``perms`` (kNN jointly)."""
    out: dict[Measure, Tensor] = {}
    knn = [m for m in measures if m.info.group == "knn"]
    if knn:
        requests = [(m.name, xside.states[m], yside.states[m]) for m in knn]
        out.update(zip(knn, knn_layer_scores(requests, perms)))
    for m in measures:
        if m not in out:
            out[m] = m.layer_scores(xside.states[m], yside.states[m], perms)
    return [_clamp(m, out[m]) for m in measures]


def _streamed(m: Measure, xside: PreparedSide, yside: PreparedSide) -> bool:
    return m in xside.lazy or m in yside.lazy


def _chunk_groups(measures: Sequence[Measure]) -> list[list[Measure]]:
    """Measures computed together in one pass over the permutations: all kNN measures, and
    each other measure on its own."""
    knn = [m for m in measures if m.info.group == "knn"]
    groups = [knn] if knn else []
    return groups + [[m] for m in measures if m.info.group != "knn"]


def _blocks(m: Measure, xside: PreparedSide, yside: PreparedSide) -> list[tuple[range, range]]:
    """(model layers, reference layers) blocks of a streamed measure: kept states are used
    whole; otherwise at most GRAM_BLOCK reference states and one model state at a time."""
    la, lb = len(xside.features), len(yside.features)
    ys = [range(lb)] if m in yside.states else [range(b, min(lb, b + GRAM_BLOCK))
                                                for b in range(0, lb, GRAM_BLOCK)]
    xs = [range(la)] if m in xside.states else [range(a, a + 1) for a in range(la)]
    return [(xr, yr) for yr in ys for xr in xs]


def _streamed_matrices(m: Measure, xside: PreparedSide, yside: PreparedSide,
                       permutations: Permutations | None, start: int, stop: int | None
                       ) -> Tensor:
    """(B, LA, LB) scores of a streamed gram-family measure, block by block: the identity
    when ``permutations`` is None, else permutations ``start .. stop-1``."""
    n = xside.n
    out: Tensor | None = None
    for xr, yr in _blocks(m, xside, yside):
        ys = (yside.states[m] if m in yside.states
              else stack_states((yside.state(m, b) for b in yr), len(yr)))
        xs = [xside.state(m, a) for a in xr]
        if permutations is None:
            chunks: Iterable[Tensor] = [torch.arange(n, device=xside.device)[None]]
        else:
            chunks = permutations.chunks(chunk_size_for(m.perm_cost(n), xside.device),
                                          xside.device, start, stop)
        row = 0
        for p in chunks:
            block = _clamp(m, m.layer_scores(xs, ys, p))
            if out is None:
                total = 1 if permutations is None else permutations.count(start, stop)
                out = block.new_empty(total, len(xside.features), len(yside.features))
            out[row:row + len(p), xr.start:xr.stop, yr.start:yr.stop] = block
            row += len(p)
        del xs, ys
    return out


def layer_nulls(measures: Sequence[Measure], xside: PreparedSide, yside: PreparedSide,
                permutations: Permutations, start: int = 0, stop: int | None = None
                ) -> dict[Measure, Tensor]:
    """(K', LA, LB) null layer matrices of each measure for permutations ``start .. stop-1``."""
    out = {m: _streamed_matrices(m, xside, yside, permutations, start, stop)
           for m in measures if _streamed(m, xside, yside)}
    total = permutations.count(start, stop)
    for group in _chunk_groups([m for m in measures if m not in out]):
        cost = max(m.perm_cost(xside.n) for m in group)
        if group[0].info.group == "knn":
            cost = knn_chunk_cost(xside.n, cost, xside.device)
        row = 0
        for perms in permutations.chunks(chunk_size_for(cost, xside.device), xside.device,
                                          start, stop):
            for m, scores in zip(group, _group_scores(group, xside, yside, perms)):
                if m not in out:  # one buffer written chunk by chunk: no list of small results
                    out[m] = scores.new_empty((total, *scores.shape[1:]))
                out[m][row:row + len(perms)] = scores
            row += len(perms)
    empty = torch.empty(0, len(xside.features), len(yside.features), dtype=xside.dtype,
                        device=xside.device)  # a share without permutations
    return {m: empty if out.get(m) is None else out[m] for m in measures}


def observed_matrices(measures: Sequence[Measure], xside: PreparedSide, yside: PreparedSide
                      ) -> dict[Measure, Tensor]:
    """The raw (LA, LB) layer matrix of each measure."""
    out = {m: _streamed_matrices(m, xside, yside, None, 0, None)[0]
           for m in measures if _streamed(m, xside, yside)}
    kept = [m for m in measures if m not in out]
    if kept:
        ident = torch.arange(xside.n, device=xside.device)[None]
        out.update({m: s[0] for m, s in zip(kept, _group_scores(kept, xside, yside, ident))})
    return {m: out[m] for m in measures}


Gather = Callable[[dict[Measure, Tensor]], dict[Measure, Tensor]]


def _check_null_room(measures: Sequence[Measure], xside: PreparedSide, yside: PreparedSide,
                     num_permutations: int) -> None:
    """Refuse with ``MemoryError``, naming ``num_permutations``, K that would make the (K, LA, LB)
    nulls of ``measures`` larger than the memory available on their device (they are allocated
    whole, one per measure)."""
    pairs = len(xside.features) * len(yside.features)
    size = torch.tensor([], dtype=xside.dtype).element_size()
    need = len(measures) * num_permutations * pairs * size
    free = free_to_check(need, xside.device, _available_bytes)
    if free is not None and need > free:
        raise MemoryError(
            f"num_permutations={num_permutations}: the permutation nulls ({len(measures)} "
            f"measure(s) × {pairs} layer pair(s) × K) need {format_bytes(need)}, but only "
            f"{format_bytes(free)} is available on {xside.device}; use fewer permutations")


def calibrate_prepared(
    measures: Sequence[Measure],
    xside: PreparedSide,
    yside: PreparedSide,
    permutations: Permutations,
    alpha: float = 0.05,
    aggregate: Aggregate | Mapping[Measure, Aggregate] = "max",
    max_score: float | None | str = AUTO,
    share: tuple[int, int] | None = None,
    gather: Gather | None = None,
    null: str = "permutation",
    warn_few: bool = True,
) -> dict[Measure, LayerAlignmentResult]:
    """Observed matrices, nulls and calibration of several measures at once.

    Parameters
    ----------
    measures : sequence of Measure
    xside, yside : PreparedSide
        Both sides prepared for every measure (same n, same device).
    permutations : Permutations
        The permutation set (drawn once; every measure reads the same permutations).
    alpha : float, default=0.05
    aggregate : str, callable or mapping measure -> aggregate, default="max"
    max_score : float, None or "auto", default="auto"
        s_max; ``"auto"`` takes each measure's own.
    share, gather : tuple (start, stop) and callable, default=None
        Split the null over processes: this process computes the permutations in
        ``range(*share)`` and ``gather`` turns its partial nulls into the full (K, LA, LB)
        nulls in permutation order (e.g. an all-gather).
    null : {"permutation", "moments", "auto"}, default="permutation"
        ``"moments"``: the exact permutation moments and a Pearson type III null for every
        gram-family measure on a single pair (see ``analytic_null``); ``"auto"``: that where
        it is validated, permutations elsewhere.  Each result records its ``null_method``.
    warn_few : bool, default=True
        Warn when K is too few for ``alpha`` (False: the caller warned once already).

    Returns
    -------
    dict measure -> LayerAlignmentResult
    """
    alpha = check_alpha(alpha)
    max_score = check_max_score(max_score)
    if xside.n != yside.n:
        raise ValueError(f"x and y must have the same number of samples (rows): got {xside.n} "
                         f"and {yside.n}")
    if permutations.n != xside.n:
        raise ValueError(f"the permutations are of {permutations.n} samples, the data has {xside.n}")
    null = check_null(null)
    permutations.warn_if_few_blocks(alpha)
    measures = list(dict.fromkeys(measures))
    # states converted to n×n below are this call's: a cached side (the engine's or a metric's
    # reference) keeps its feature-space states for the next call
    xside, yside = _call_copy(xside), _call_copy(yside)
    for m in measures:  # feature space only when both sides are in it, for one pair
        in_features = [_in_features(side, m) for side in (xside, yside)]
        if any(in_features) and not (all(in_features) and _single_pair(xside, yside)):
            _to_grams(m, xside, yside)
    observed = observed_matrices(measures, xside, yside)
    if max_score != AUTO:  # the measures' own maxima hold by construction
        for m in measures:
            warn_above_max(float(observed[m].max()), max_score, xside.dtype, f"{m.name}'s score")
    out = _analytic_results(measures, observed, xside, yside, alpha, max_score, null,
                           permutations.groups, aggregate)
    rest = [m for m in measures if m not in out]
    # a feature-space state cannot give a permutation null: n×n after all, and the observed
    # score again from the n×n states, so that it and the null share one route (a null value
    # equal to the score in exact arithmetic must be counted as reaching it)
    converted = [m for m in rest if _in_features(xside, m) or _in_features(yside, m)]
    for m in converted:
        _to_grams(m, xside, yside)
    _check_null_room(rest, xside, yside, len(permutations))
    observed.update(observed_matrices(converted, xside, yside) if converted else {})
    start, stop = share if share is not None else (0, len(permutations))
    nulls = layer_nulls(rest, xside, yside, permutations, start, stop) if rest else {}
    if gather is not None and rest:
        nulls = gather(nulls)
    _identity_scores_observed(nulls, observed, permutations, start)
    for m in rest:
        agg = aggregate.get(m, "max") if isinstance(aggregate, Mapping) else aggregate
        smax = m.max_score if max_score == AUTO else max_score
        hint = m.info.degenerate_hint(m.kwargs) if m.info.degenerate_hint else None
        res = calibrate_layers_from_matrices(
            observed[m], nulls[m], agg, alpha, smax, list(xside.names), list(yside.names),
            data_dtype=xside.dtype, measure=m.name, hint=hint, exact=m.info.exact_scores,
            warn_few=warn_few)
        exact_mean = null == "auto" and permutations.groups is None  # block nulls: other moments
        out[m] = _with_exact_knn_moments(m, res, xside, yside) if exact_mean else res
    return {m: out[m] for m in measures}


_IDENTITY_CHANCE = 1e-12  # below this chance per draw (1/n! from n = 15 on), no identity


def _identity_scores_observed(nulls: dict[Measure, Tensor], observed: dict[Measure, Tensor],
                              permutations: Permutations, start: int) -> None:
    """Give every identity permutation in the null exactly the observed matrix: s(X, Y[id]) is
    s(X, Y) by definition and must count as reaching it in the p-value, however a batched null
    rounded it (a product over a batch of permutations can round one row differently from the
    observed call).  Only small n, or block permutations of few groups (three groups: one
    draw in six), draw the identity; ``start``: the nulls' first index (nulls of all K
    permutations after a gather)."""
    if not nulls or permutations.identity_probability() < _IDENTITY_CHANCE:
        return
    ident = torch.arange(permutations.n)
    identity = torch.cat([(chunk == ident).all(1) for chunk in
                          permutations.chunks(max(1, (1 << 22) // permutations.n))])
    for m, null in nulls.items():
        rows = identity if len(null) == len(identity) else identity[start:start + len(null)]
        if bool(rows.any()):
            null[rows.to(null.device)] = observed[m].to(null)


def _in_features(side: PreparedSide, m: Measure) -> bool:
    return isinstance(side.states.get(m, [None])[0], FeatureState)


def _call_copy(side: PreparedSide) -> PreparedSide:
    """``side`` with its own ``states`` and ``lazy`` (the invariants, keyed by the state's
    route, stay shared)."""
    return dataclasses.replace(side, states=dict(side.states), lazy=set(side.lazy))


def _to_grams(m: Measure, *sides: PreparedSide) -> None:
    """Replace feature-space states of ``m`` by n×n ones (memory checked first)."""
    for side in sides:
        if _in_features(side, m):
            del side.states[m]
            prepare_side(side.names, side.features, [m], side.role, side)


def _single_pair(xside: PreparedSide, yside: PreparedSide) -> bool:
    return len(xside.features) == 1 and len(yside.features) == 1


def _analytic_results(measures: Sequence[Measure], observed: dict[Measure, Tensor],
                      xside: PreparedSide, yside: PreparedSide, alpha: float,
                      max_score: float | None | str, null: str, groups: Any = None,
                      aggregate: Aggregate | Mapping[Measure, Aggregate] = "max"
                      ) -> dict[Measure, LayerAlignmentResult]:
    """Results from the exact moments, for the measures and pairs where ``null`` asks for them
    (none with ``groups``: block permutations have other moments; none with a custom callable
    aggregate, which need not be the identity on a single pair)."""
    out: dict[Measure, LayerAlignmentResult] = {}
    if null == "permutation" or groups is not None:
        check_moments_apply(null, measures, groups)
        return out
    for m in measures:
        agg = aggregate.get(m, "max") if isinstance(aggregate, Mapping) else aggregate
        agg_name, _ = aggregate_fn(agg)
        builtin = isinstance(agg, str) or (isinstance(agg, MappedAggregate) and agg.builtin)
        if m.info.analytic and not builtin:
            if null == "moments":
                raise ValueError(
                    f"null='moments' cannot calibrate {m.name} with aggregate={agg_name!r}: the "
                    "moments are those of the pair's score, and a custom aggregate of it needs "
                    "its own null; use null='permutation' or null='auto'")
            continue
        if not m.info.analytic or not _single_pair(xside, yside):
            if null == "moments":
                check_moments_apply(null, [m])  # no analytic null at all
                why = "the aggregate over several layer pairs needs their joint permutation null"
                raise ValueError(f"null='moments' cannot calibrate {m.name}: {why}; use "
                                 "null='permutation', or null='auto' to use moments where they "
                                 "apply")
            continue
        ties = _tied_sides(xside, yside)
        if null == "auto" and ties:  # a lumpy null: permutations, no invariants needed
            continue
        inv_x, inv_y = xside.invariant(m, 0, invariants), yside.invariant(m, 0, invariants)
        smax = m.max_score if max_score == AUTO else max_score
        fields, valid = analytic_fields(float(observed[m][0, 0]), inv_x, inv_y, alpha, smax,
                                        observed[m].dtype, observed[m].device, xside.dtype,
                                        tied=bool(ties))
        if null == "auto" and not valid:
            continue
        if float(fields["null_std"]) == 0.0 and float(fields["p_value"]) == 1.0:  # point mass
            warnings.warn(
                f"{m.name}: the permutation null is a point mass (its exact std is below the "
                "scores' precision): the statistic does not change when samples are permuted, "
                "so p = 1 and the calibrated score is 0. null='auto' or "
                "null='permutation' gives the permutation null itself",
                RuntimeWarning, stacklevel=user_stacklevel())
        elif not valid:
            warnings.warn(
                f"{m.name}: null='moments' is outside the range where its Pearson III p-value "
                "and threshold were validated (n >= 32, |skewness| <= 1.4, no sample outlying in "
                f"both representations, no tied samples; here n={xside.features[0].shape[0]}"
                f"{f' and {ties} tied (identical) rows, which make the null lumpy' if ties else ''}"
                "); they may be off by 0.05 or more. Use null='auto' or null='permutation' for an "
                "exact null",
                RuntimeWarning, stacklevel=user_stacklevel())
        unresolved = smax is not None and smax - float(fields["threshold"]) <= resolution(xside.dtype)
        fields["unresolved"] = torch.tensor(unresolved)
        hint = m.info.degenerate_hint(m.kwargs) if m.info.degenerate_hint else None
        warn_unresolved(fields, smax, m.name, hint)
        del fields["unresolved"]
        matrix = observed[m]
        out[m] = LayerAlignmentResult(
            matrix=matrix, null=matrix.new_empty(0), argmax=(0, 0), x_names=list(xside.names),
            y_names=list(yside.names), pair_threshold=fields["threshold"].reshape(1, 1),
            pair_calibrated=fields["calibrated"].reshape(1, 1),
            pair_p_value=fields["p_value"].reshape(1, 1), aggregate=agg_name, measure=m.name,
            null_method="moments", **fields)
    return out


def _tied_rows(side: PreparedSide, i: int) -> bool:
    """Whether layer ``i``'s features have tied (identical) rows, kept with the side's
    invariants (one answer for every measure and route: a cached reference computes it once)."""
    key = ("tied_rows", i)
    if key not in side.invariants:
        side.invariants[key] = has_tied_rows(side.features[i], rtol=NEAR_TIE_RTOL)
    return side.invariants[key]


def _tied_sides(xside: PreparedSide, yside: PreparedSide) -> str:
    """Which sides of a single pair have tied rows, in words ("x has", "y has", "x and y
    have"; "" for none)."""
    sides = [side.who for side in (xside, yside) if _tied_rows(side, 0)]
    return "" if not sides else " and ".join(sides) + (" have" if len(sides) == 2 else " has")


def _with_exact_knn_moments(m: Measure, res: LayerAlignmentResult, xside: PreparedSide,
                            yside: PreparedSide) -> LayerAlignmentResult:
    """``null="auto"``: a single kNN pair reports the exact permutation mean (and std)."""
    if m.info.group != "knn" or not _single_pair(xside, yside):
        return res
    if m.name == "cknna" and (abs(float(res.raw)) >= 1 or bool((res.null.abs() >= 1).any())):
        # CKNNA can leave [−1, 1] (small n, offsets) and is then clamped: the exact mean is the
        # unclamped statistic's, not that of the null and score reported (the permutations')
        return res
    exact = exact_knn_moments(m.name, xside.states[m][0], yside.states[m][0])
    if exact is None:
        return res
    mean, std = exact
    dtype, device = res.raw.dtype, res.raw.device
    std_t = res.null_std if std is None else torch.tensor(std, dtype=dtype, device=device)
    diff = float(res.raw) - mean
    sd = float(std_t)
    effect = diff / sd if sd > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return dataclasses.replace(res, null_mean=torch.tensor(mean, dtype=dtype, device=device),
                               null_std=std_t,
                               effect_size=torch.tensor(effect, dtype=dtype, device=device),
                               null_method="permutation (exact mean)")


# ------------------------------------------------------------------------ public functions
def _sides(xs: Layers | Tensor, ys: Layers | Tensor, measures: Sequence[Measure],
           null: str = "permutation") -> tuple[PreparedSide, PreparedSide]:
    x_names, xt = side_features(xs, "x")
    y_names, yt = side_features(ys, "y")
    dtype = torch.promote_types(xt[0].dtype, yt[0].dtype)
    if xt[0].device != yt[0].device:
        raise ValueError(f"x and y are on different devices: {xt[0].device} and {yt[0].device}")
    if xt[0].shape[0] != yt[0].shape[0]:
        raise ValueError(f"x and y must have the same number of samples (rows): got "
                         f"{xt[0].shape[0]} and {yt[0].shape[0]}")
    xt, yt = [t.to(dtype) for t in xt], [t.to(dtype) for t in yt]
    # x's check also counts the n×n states y will keep: refused before either side is built
    return (prepare_side(x_names, xt, measures, "x", null=null, **room_for(len(yt), measures)),
            prepare_side(y_names, yt, measures, "y", null=null))


def room_for(layers: int, measures: Sequence[Measure]) -> dict[str, int]:
    """``prepare_side``'s ``reserve`` and ``held`` for a side prepared before another side of
    ``layers`` layers: the n×n states that side will keep (a gram-family measure keeps every
    layer's up to :data:`GRAM_KEPT` layers, one at a time beyond), counted so that a probe
    too large for both sides is refused before either is built."""
    grams = sum(m.family == "gram" for m in dict.fromkeys(measures))
    return {"reserve": (layers if layers <= GRAM_KEPT else 1) * grams, "held": layers}


@torch.no_grad()
@no_autocast()
def calibrate_measures(
    xs: Layers,
    ys: Layers,
    measures: Mapping[str, MeasureSpec] | Sequence[MeasureSpec],
    aggregate: Aggregate = "max",
    num_permutations: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Groups | None = None,
    max_score: float | None | str = AUTO,
    null: str = "permutation",
) -> dict[str, LayerAlignmentResult]:
    """Calibrated layer alignment of several measures at once, sharing preparation and work.

    ``measures`` is a list of names / :class:`Measure` objects, or ``{label: measure}``; the
    result is keyed by label (the measure's name for a list).  Other arguments as in
    :func:`calibrated_layer_alignment`.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import calibrate_measures
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 8, generator=g)
    >>> res = calibrate_measures({"a": x}, {"b": x + 0.1 * torch.randn(64, 8, generator=g)},
    ...                          ["linear_cka", "mutual_knn"], num_permutations=99)
    >>> sorted(res), round(float(res["mutual_knn"].p_value), 4)
    (['linear_cka', 'mutual_knn'], 0.01)
    """
    items = (list(measures.items()) if isinstance(measures, Mapping)
             else [(None, spec) for spec in measure_list(measures)])
    resolved = [(label, get_measure(spec)) for label, spec in items]
    labels = [label or m.name for label, m in resolved]
    if len(set(labels)) != len(labels):
        raise ValueError(f"measure labels must be unique, got {labels}: pass a dict "
                         "{label: measure} to tell measures of one name apart")
    ms = [m for _, m in resolved]
    check_moments_apply(check_null(null), ms, groups)
    xside, yside = _sides(named_layers(xs, "x"), named_layers(ys, "y"), ms, null)
    perms = Permutations(xside.n, num_permutations, seed, groups)
    results = calibrate_prepared(ms, xside, yside, perms, alpha, aggregate, max_score, null=null)
    return {label: results[m] for label, m in zip(labels, ms)}


@torch.no_grad()
@no_autocast()
def calibrated_layer_alignment(
    xs: Layers,
    ys: Layers,
    measure: MeasureSpec = _CKA,
    aggregate: Aggregate = "max",
    num_permutations: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Groups | None = None,
    max_score: float | None | str = AUTO,
    null: str = "permutation",
    **measure_kwargs: Any,
) -> LayerAlignmentResult:
    """Aggregation-aware calibration of ``agg_{a,b} measure(xs[a], ys[b])``.

    Parameters
    ----------
    xs, ys : mapping name -> (n, d) tensor, or sequence of tensors (named "0", "1", ...)
        Layers of the two models, rows paired across models (same n).  One tensor is refused:
        wrap a single layer as ``[tensor]`` or ``{name: tensor}`` (or use
        :func:`calibrated_alignment` for one pair).
    measure : str, Measure or callable, default="linear_cka"
    aggregate : {"max", "mean", "top<m>"} or callable, default="max"
        ``"max"`` is PRH's report; the null of the aggregate applies the same permutation to
        every ``ys`` layer (Westfall–Young maxT for ``"max"``).
    num_permutations, alpha, seed, groups, max_score, **measure_kwargs
        As in :func:`calibrated_alignment`.
    null : {"permutation", "moments", "auto"}, default="permutation"
        ``"moments"`` only for one layer pair of a gram-family measure (the aggregate over
        several pairs needs their joint null: refused); ``"auto"``: the moments there where
        they are validated, permutations elsewhere.  The result records its ``null_method``.

    Returns
    -------
    LayerAlignmentResult
        The raw matrix, the calibrated aggregate with its p-value and threshold, the arg-max
        pair and per-pair calibration.

    References
    ----------
    Algorithm 2 (aggregation-aware calibration) of arXiv 2602.14486; Westfall & Young (1993),
    *Resampling-Based Multiple Testing*.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import calibrated_layer_alignment
    >>> g = torch.Generator().manual_seed(0)
    >>> xs = {"l1": torch.randn(50, 8, generator=g), "l2": torch.randn(50, 8, generator=g)}
    >>> res = calibrated_layer_alignment(xs, {"r": xs["l2"]}, "linear_cka", num_permutations=99)
    >>> res.best_pair, round(float(res.raw), 4), round(float(res.calibrated), 4)
    (('l2', 'r'), 1.0, 1.0)
    """
    measure = measure_argument(measure, measure_kwargs)
    check_shadowed_options(measure, "calibrated_layer_alignment", alpha=alpha)
    measure = get_measure(measure, **measure_kwargs)
    check_moments_apply(check_null(null), [measure], groups)
    xside, yside = _sides(named_layers(xs, "x"), named_layers(ys, "y"), [measure], null)
    perms = Permutations(xside.n, num_permutations, seed, groups)
    return calibrate_prepared([measure], xside, yside, perms, alpha, aggregate, max_score,
                              null=null)[measure]


@torch.no_grad()
@no_autocast()
def calibrated_alignment(
    x: Tensor,
    y: Tensor,
    measure: MeasureSpec = _KNN,
    num_permutations: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Groups | None = None,
    max_score: float | None | str = AUTO,
    null: str = "permutation",
    **measure_kwargs: Any,
) -> CalibrationResult:
    """Permutation-calibrated alignment of ``x`` (n, p) and ``y`` (n, q), rows paired.

    The observed score and K null scores ``measure(x, y[π_k])`` are computed on the fast path
    (grams / neighbor lists prepared once, gathered or remapped per permutation) and calibrated:
    τ is the ⌈(1 − α)(K + 1)⌉-th smallest of ``{s, s_1..s_K}``, the calibrated score is
    ``max((s − τ)/(s_max − τ), 0)`` and the p-value ``(1 + #{s_k ≥ s})/(K + 1)``.

    Parameters
    ----------
    x, y : Tensor of shape (n, p) and (n, q)
    measure : str, Measure or callable, default="mutual_knn"
        A built-in name (see ``BUILTIN_MEASURES``), a :class:`Measure`, or ``f(x, y)``
        (recomputed for every permutation).
    num_permutations : int, default=500
        K.
    alpha : float, default=0.05
    seed : int, default=0
        Seed of the permutations: the same seed gives the same permutations (comparable
        scores across measures and epochs).
    groups : sequence of labels, default=None
        Rows sharing a label are permuted together (several captions per image, frames of a
        video): rows of such data are not exchangeable one by one.
    max_score : float, None or "auto", default="auto"
        s_max; ``"auto"`` uses the measure's (1.0 for the built-ins).
    null : {"permutation", "moments", "auto"}, default="permutation"
        How the null is obtained: K permutations; the exact permutation moments with a
        Pearson type III distribution (gram family; no permutation drawn, and with a linear
        kernel and d < n no n×n matrix either); or moments where they are validated
        (n >= 32, moderate skew, no outlying sample on both sides, no tied (identical) rows
        on either side, no ``groups``, a null that is not a point mass) and permutations
        elsewhere.  ``result.null_method`` says which was used.  ``"moments"`` with
        ``groups`` is an error (block permutations have other moments).
    **measure_kwargs
        The measure's parameters (``k``, ``sigma``, ``cca_dim``).  A parameter named like an
        argument of this function (``shape_metric``'s ``alpha``) must be given through
        ``measure=get_measure("shape_metric", alpha=...)``: an ``alpha=`` other than the
        default next to the name ``"shape_metric"`` raises ``TypeError`` rather than set the
        level where the whitening may have been meant.  (``metric=`` is the deprecated old
        name of ``measure``; giving both raises ``TypeError``.)

    Returns
    -------
    CalibrationResult

    References
    ----------
    Algorithm 1 of "calibrated representational similarity", arXiv 2602.14486.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import calibrated_alignment
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(100, 16, generator=g)
    >>> res = calibrated_alignment(x, x + 0.5 * torch.randn(100, 16, generator=g),
    ...                            "mutual_knn", num_permutations=199)
    >>> round(float(res.p_value), 4), float(res.calibrated) > 0
    (0.005, True)
    """
    measure = measure_argument(measure, measure_kwargs)
    check_shadowed_options(measure, "calibrated_alignment", alpha=alpha)
    measure = get_measure(measure, **measure_kwargs)
    check_moments_apply(check_null(null), [measure], groups)
    xside, yside = _sides(_single(x, "x"), _single(y, "y"), [measure], null)
    perms = Permutations(xside.n, num_permutations, seed, groups)
    return calibrate_prepared([measure], xside, yside, perms, alpha, "max", max_score,
                              null=null)[measure].scalar()


def _single(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


@torch.no_grad()
@no_autocast()
def permutation_null(
    x: Tensor,
    y: Tensor,
    measure: MeasureSpec = _KNN,
    num_permutations: int = 500,
    seed: int = 0,
    groups: Groups | None = None,
    **measure_kwargs: Any,
) -> Tensor:
    """Permutation null of ``measure``: a (K,) tensor whose k-th value is
    ``measure(x, y[permutations(n, K, seed)[k]])``, clamped to the measure's range as in a
    calibration (only CKNNA can leave it: [−1, 1]; the plain function returns it unclamped).

    Built-in measures use the fast path (grams / neighbor lists computed once, then gathered
    or remapped per permutation); a plain callable is recomputed on every permuted Y.

    Parameters
    ----------
    x, y : Tensor of shape (n, ...)
        Paired rows: the model's and the reference's (``y`` is permuted).
    measure : str, Measure or callable, default="mutual_knn"
        See :func:`get_measure`.
    num_permutations : int, default=500
        K.
    seed : int, default=0
        Permutation seed (:func:`~alignment_callback.functional.permutation.permutations`
        gives the permutations themselves).
    groups : sequence or Tensor, default=None
        A group label per row: block permutations.
    **measure_kwargs
        The measure's parameters (``k``, ``sigma``, ...).

    Returns
    -------
    Tensor
        (K,) null values.

    Examples
    --------
    >>> import torch
    >>> import alignment_callback.functional as F
    >>> from alignment_callback.functional.permutation import permutations
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    >>> y = torch.randn(30, 5, generator=g, dtype=torch.float64)
    >>> null = F.permutation_null(x, y, "linear_cka", num_permutations=3, seed=1)
    >>> again = torch.stack([F.linear_cka(x, y[p]) for p in permutations(30, 3, seed=1)])
    >>> torch.allclose(null, again, rtol=1e-12, atol=0)  # the fast path is the definition
    True
    """
    measure = get_measure(measure_argument(measure, measure_kwargs), **measure_kwargs)
    xside, yside = _sides(_single(x, "x"), _single(y, "y"), [measure])
    perms = Permutations(xside.n, num_permutations, seed, groups)
    return layer_nulls([measure], xside, yside, perms)[measure][:, 0, 0]


__all__ = [
    "PreparedSide",
    "calibrate_measures",
    "calibrate_prepared",
    "calibrated_alignment",
    "calibrated_layer_alignment",
    "layer_nulls",
    "observed_matrices",
    "permutation_null",
    "prepare_side",
    "side_features",
]
