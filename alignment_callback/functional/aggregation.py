"""Layers, aggregates over layer pairs, and the calibrated result of a layer matrix.

The raw report over layers is ``A = agg_{a,b} s(X_a, Y_b)``.  Its null applies the *same*
permutation π_k to every Y layer, recomputes the whole LA×LB matrix and aggregates it to A_k; A
is calibrated against {A_k} (the calibration paper's Algorithm 2).  For ``agg="max"`` this is
Westfall–Young maxT: it accounts for the selection of the best pair, which per-pair
calibration followed by a max does not (the depth confounder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from alignment_callback.functional._validation import as_scalar
from alignment_callback.functional.calibration import (
    CalibrationResult,
    calibrate_tensor,
    warn_unresolved,
)

#: Layers of one model: a ``{name: (n, d) tensor}`` mapping or a sequence of tensors (named
#: "0", "1", ...).
Layers = Union[Mapping[str, Tensor], Sequence[Tensor]]
Aggregate = Union[str, Callable[[Tensor], Tensor]]


def named_layers(layers: Layers, side: str = "x") -> dict[str, Tensor]:
    """``layers`` as an ordered ``{name: tensor}`` dict (see :data:`Layers`); one tensor is
    refused (wrap a single layer as ``[tensor]`` or ``{name: tensor}``)."""
    if isinstance(layers, Tensor):
        raise TypeError(f"{side} layers must be a sequence or a mapping of (n, d) tensors, not "
                        "one tensor (wrap a single layer as [tensor] or {name: tensor})")
    if isinstance(layers, Mapping):
        out = {str(k): v for k, v in layers.items()}
        if len(out) != len(layers):
            same = [k for k in layers if [str(j) for j in layers].count(str(k)) > 1]
            raise ValueError(f"{side} layers: the names {same!r} are one name as strings; "
                             "give each layer a distinct name")
    elif isinstance(layers, Sequence) and not isinstance(layers, (str, bytes)):
        out = {str(i): t for i, t in enumerate(layers)}
    else:
        raise TypeError(f"{side} layers must be a sequence or a mapping of (n, d) tensors, got "
                        f"{type(layers).__name__}")
    if not out:
        raise ValueError(f"{side} layers are empty")
    for name, t in out.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{side} layer {name!r} must be a torch.Tensor, got {type(t).__name__}")
    return out


@dataclass(frozen=True, kw_only=True)
class LayerAlignmentResult(CalibrationResult):
    """Aggregation-aware calibration of an LA×LB layer matrix.

    The fields of :class:`CalibrationResult` (``raw``, ``calibrated``, ``p_value``,
    ``threshold``, ... and ``null``, the K null aggregates) describe the aggregate; in addition:

    Attributes
    ----------
    matrix : Tensor
        Raw (LA, LB) scores ``s(X_a, Y_b)``.
    argmax : tuple[int, int]
        (a, b) indices of the best raw pair; ``best_pair`` gives their names.
    x_names, y_names : list[str]
        Layer names (indices as strings for sequences).
    pair_threshold, pair_calibrated, pair_p_value : Tensor
        (LA, LB) per-pair calibration against
        each pair's own null (does *not* account for selecting a pair; for heatmaps).
    aggregate : str
        The aggregate's name.
    measure : str
        The measure's name.
    """

    matrix: Tensor
    argmax: tuple[int, int]
    x_names: list[str]
    y_names: list[str]
    pair_threshold: Tensor
    pair_calibrated: Tensor
    pair_p_value: Tensor
    aggregate: str
    measure: str = ""

    @property
    def best_pair(self) -> tuple[str, str]:
        """Names of the arg-max layer pair."""
        return self.x_names[self.argmax[0]], self.y_names[self.argmax[1]]

    def scalar(self) -> CalibrationResult:
        """The aggregate alone, as a :class:`CalibrationResult`."""
        return CalibrationResult(**{name: getattr(self, name) for name in
                                    (*CalibrationResult.SCALARS, "null", "null_method")})


def check_aggregate(aggregate: Aggregate) -> Aggregate:
    """``aggregate`` itself, after :func:`aggregate_fn` has accepted it (a setting's check)."""
    aggregate_fn(aggregate)
    return aggregate


def aggregate_fn(aggregate: Aggregate) -> tuple[str, Callable[[Tensor], Tensor]]:
    """Resolve ``"max"``, ``"mean"``, ``"top<m>"`` (mean of the m largest, e.g. ``"top3"``; of all
    pairs when there are fewer than m) or a callable ``f(matrix (LA, LB)) -> scalar`` into a
    batched ``(B, LA, LB) -> (B,)``."""
    if isinstance(aggregate, MappedAggregate):
        return aggregate.__name__, aggregate
    if callable(aggregate):
        name = getattr(aggregate, "__name__", "custom")
        return name, _Batched(aggregate)
    if aggregate == "max":
        return "max", _max
    if aggregate == "mean":
        return "mean", _mean
    if isinstance(aggregate, str) and aggregate.startswith("top") and aggregate[3:].isdigit():
        k = int(aggregate[3:])
        if k < 1:
            raise ValueError(f"aggregate {aggregate!r} needs a positive count")
        return aggregate, _TopMean(k)
    raise ValueError(f"aggregate must be 'max', 'mean', 'top<m>' (e.g. 'top3') or a callable, got {aggregate!r}")


def _max(s: Tensor) -> Tensor:
    return s.flatten(1).amax(1)


def _mean(s: Tensor) -> Tensor:
    return s.flatten(1).mean(1)


class _TopMean:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, s: Tensor) -> Tensor:
        flat = s.flatten(1)
        return flat.topk(min(self.k, flat.shape[1]), dim=1).values.mean(1)


class _Batched:
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, s: Tensor) -> Tensor:
        return torch.stack([self._scalar(m) for m in s]).to(s.dtype)

    def _scalar(self, matrix: Tensor) -> Tensor:
        what = (f"aggregate: the callable's value for the {tuple(matrix.shape)} matrix of "
                "layer-pair scores")
        return as_scalar(self.fn(matrix), what, matrix)


class MappedAggregate:
    """An aggregate over chosen (model layer, reference layer) pairs only.

    Parameters
    ----------
    pairs : mapping model layer -> reference layer
    x_names, y_names : the layer names of the matrix's rows and columns
    aggregate : "max", "mean" or "top<m>", default="max"
        How the chosen pairs are combined.
    """

    def __init__(self, pairs: Mapping[str, str], x_names: Sequence[str], y_names: Sequence[str],
                 aggregate: Aggregate = "max") -> None:
        if not pairs:
            raise ValueError("pairs is empty: choose at least one (model layer, reference "
                             "layer) pair")
        missing = [(a, b) for a, b in pairs.items() if a not in x_names or b not in y_names]
        if missing:
            raise ValueError(f"layer pairs {missing} are not among the model layers {list(x_names)} "
                             f"x reference layers {list(y_names)}")
        inner_name, self.inner = aggregate_fn(aggregate)
        self.__name__ = f"{inner_name}_over_pairs"
        #: the inner aggregate is "max", "mean" or "top<m>" (the identity on a single pair)
        self.builtin = isinstance(aggregate, str)
        lb = len(y_names)
        self.flat = torch.tensor([list(x_names).index(a) * lb + list(y_names).index(b)
                                  for a, b in pairs.items()])

    def __call__(self, s: Tensor) -> Tensor:
        chosen = s.flatten(1)[:, self.flat.to(s.device)]
        return self.inner(chosen.unsqueeze(1))


def calibrate_layers_from_matrices(
    matrix: Tensor, null: Tensor, aggregate: Aggregate = "max", alpha: float = 0.05,
    max_score: float | None = 1.0, x_names: list[str] | None = None,
    y_names: list[str] | None = None, data_dtype: torch.dtype | None = None,
    measure: str = "", hint: str | None = None, exact: bool = False, warn_few: bool = True,
) -> LayerAlignmentResult:
    """Calibrate the aggregate of an observed (LA, LB) ``matrix`` against null matrices (K, LA, LB).

    ``exact``: the measure computes equal statistics bit for bit equal (ratios of integer
    counts), so its values are compared as they are; otherwise (and for an aggregate other than
    the max, whose sums round) null values within ``tie_tolerance`` of the score are its ties.
    ``warn_few``: warn when K is too few for ``alpha`` (False: the caller warned already).
    """
    agg_name, agg = aggregate_fn(aggregate)
    observed = agg(matrix.unsqueeze(0))[0]
    null_agg = agg(null)
    exact_max = exact and (agg_name in ("max", "max_over_pairs") or matrix.numel() == 1)
    res = calibrate_tensor(observed, null_agg, alpha, max_score, data_dtype, warn_few,
                           ties=not exact_max)
    warn_unresolved(res, max_score, measure or "the aggregate", hint)
    res.pop("unresolved")
    pairs = calibrate_tensor(matrix, null, alpha, max_score, data_dtype, warn_few=False,
                             ties=not exact)
    if isinstance(agg, MappedAggregate):  # the best of the chosen pairs only
        chosen = agg.flat.to(matrix.device)
        flat = int(chosen[torch.argmax(matrix.flatten()[chosen])])
    else:
        flat = int(torch.argmax(matrix))
    lb = matrix.shape[1]
    return LayerAlignmentResult(
        matrix=matrix, null=null_agg, argmax=(flat // lb, flat % lb),
        x_names=x_names or [str(i) for i in range(matrix.shape[0])],
        y_names=y_names or [str(i) for i in range(lb)],
        pair_threshold=pairs["threshold"].reshape(matrix.shape),
        pair_calibrated=pairs["calibrated"].reshape(matrix.shape),
        pair_p_value=pairs["p_value"].reshape(matrix.shape), aggregate=agg_name, measure=measure,
        **res,
    )
