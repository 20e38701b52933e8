"""Aggregation-aware calibration over layer pairs (the calibration paper's Algorithm 2).

The raw report is ``A = agg_{a,b} s(X_a, Y_b)``.  For each permutation π_k the *same* π_k is
applied to every Y layer, the whole LA×LB matrix is recomputed (on the fast path) and aggregated
to A_k, and A is calibrated against {A_k}.  For ``agg="max"`` this is Westfall–Young maxT: it
accounts for the selection of the best pair, which per-pair calibration followed by a max does
not (METHOD.md section 4, depth confounder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from alignment_callback.functional.calibration import AUTO, CalibrationResult, calibrate_tensor
from alignment_callback.functional.permutation import chunk_size_for, iter_permutations
from alignment_callback.functional.registry import Measure, MetricSpec, get_measure, prepare_one

Layers = Union[Sequence[Tensor], Mapping[str, Tensor]]
Aggregate = Union[str, Callable[[Tensor], Tensor]]


@dataclass(frozen=True, kw_only=True)
class LayerAlignmentResult(CalibrationResult):
    """Aggregation-aware calibration of an LA×LB layer matrix.

    The fields of :class:`CalibrationResult` (``raw``, ``calibrated``, ``p_value``,
    ``threshold``, ... and ``null``, the K null aggregates) describe the aggregate; in addition:

    Attributes:
        matrix: raw (LA, LB) scores ``s(X_a, Y_b)``.
        argmax: (a, b) indices of the best raw pair; ``best_pair`` gives their names.
        x_names, y_names: layer names (indices as strings for sequences).
        pair_threshold, pair_calibrated, pair_p_value: (LA, LB) per-pair calibration against
            each pair's own null (does *not* account for selecting a pair; for heatmaps).
        aggregate: the aggregate's name.
    """

    matrix: Tensor
    argmax: tuple[int, int]
    x_names: list[str]
    y_names: list[str]
    pair_threshold: Tensor
    pair_calibrated: Tensor
    pair_p_value: Tensor
    aggregate: str

    @property
    def best_pair(self) -> tuple[str, str]:
        """Names of the arg-max layer pair."""
        return self.x_names[self.argmax[0]], self.y_names[self.argmax[1]]


def aggregate_fn(aggregate: Aggregate) -> tuple[str, Callable[[Tensor], Tensor]]:
    """Resolve ``"max"``, ``"mean"``, ``"topK"`` (mean of the K largest, e.g. ``"top3"``) or a
    callable ``f(matrix (LA, LB)) -> scalar`` into a batched ``(B, LA, LB) -> (B,)``."""
    if callable(aggregate):
        name = getattr(aggregate, "__name__", "custom")
        return name, lambda s: torch.stack([torch.as_tensor(aggregate(m)).reshape(()) for m in s]).to(s.dtype)
    if aggregate == "max":
        return "max", lambda s: s.flatten(1).amax(1)
    if aggregate == "mean":
        return "mean", lambda s: s.flatten(1).mean(1)
    if isinstance(aggregate, str) and aggregate.startswith("top") and aggregate[3:].isdigit():
        k = int(aggregate[3:])
        if k < 1:
            raise ValueError(f"aggregate {aggregate!r} needs a positive count")

        def top(s: Tensor) -> Tensor:
            flat = s.flatten(1)
            return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)

        return aggregate, top
    raise ValueError(f"aggregate must be 'max', 'mean', 'topK' (e.g. 'top3') or a callable, got {aggregate!r}")


def _names_and_tensors(layers: Layers, side: str) -> tuple[list[str], list[Tensor]]:
    if isinstance(layers, Mapping):
        names, tensors = list(map(str, layers.keys())), list(layers.values())
    elif isinstance(layers, Tensor):
        raise TypeError(f"{side} layers must be a sequence or mapping of (n, d) tensors, not one tensor")
    else:
        tensors = list(layers)
        names = [str(i) for i in range(len(tensors))]
    if not tensors:
        raise ValueError(f"{side} layers are empty")
    return names, tensors


def layer_scores(measure: Measure, sxs: list, sys: list, perms: Tensor) -> Tensor:
    """(B, LA, LB) scores for prepared layer states, Y layers permuted by each row of ``perms``."""
    if measure.score_layers is not None:
        return measure.score_layers(sxs, sys, perms)
    rows = [torch.stack([measure.score(sx, sy, perms) for sy in sys], 1) for sx in sxs]
    return torch.stack(rows, 1)


def layer_null_from_states(
    measure: Measure, sxs: list, sys: list, n: int, num_permutations: int, seed: int,
    device: torch.device, groups: Sequence[Any] | Tensor | None = None,
) -> Tensor:
    """(K, LA, LB) null layer matrices, one shared permutation per k for all Y layers."""
    chunk = chunk_size_for(measure.perm_cost(n))
    return torch.cat([
        layer_scores(measure, sxs, sys, perms.to(device))
        for perms in iter_permutations(n, num_permutations, seed, chunk, groups)
    ])


def calibrate_layers_from_matrices(
    matrix: Tensor, null: Tensor, aggregate: Aggregate = "max", alpha: float = 0.05,
    max_score: float | None = 1.0, x_names: list[str] | None = None,
    y_names: list[str] | None = None,
) -> LayerAlignmentResult:
    """Calibrate the aggregate of an observed (LA, LB) ``matrix`` against null matrices (K, LA, LB)."""
    agg_name, agg = aggregate_fn(aggregate)
    observed = agg(matrix.unsqueeze(0))[0]
    null_agg = agg(null)
    res = calibrate_tensor(observed, null_agg, alpha, max_score)
    pairs = calibrate_tensor(matrix, null, alpha, max_score)
    flat = int(torch.argmax(matrix))
    lb = matrix.shape[1]
    return LayerAlignmentResult(
        matrix=matrix, null=null_agg, argmax=(flat // lb, flat % lb),
        x_names=x_names or [str(i) for i in range(matrix.shape[0])],
        y_names=y_names or [str(i) for i in range(lb)],
        pair_threshold=pairs["threshold"], pair_calibrated=pairs["calibrated"],
        pair_p_value=pairs["p_value"], aggregate=agg_name, **res,
    )


@torch.no_grad()
def calibrated_layer_alignment(
    xs: Layers,
    ys: Layers,
    metric: MetricSpec = "linear_cka",
    aggregate: Aggregate = "max",
    num_permutations: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence[Any] | Tensor | None = None,
    max_score: float | None | str = AUTO,
    **metric_kwargs: Any,
) -> LayerAlignmentResult:
    """Aggregation-aware calibration of ``agg_{a,b} metric(xs[a], ys[b])``.

    Args:
        xs, ys: layers of the two models, as sequences or ``{name: (n, d) tensor}`` mappings;
            all with the same n (rows paired across models).
        metric: built-in name, :class:`Measure` or callable (default linear CKA).
        aggregate: ``"max"`` (default, PRH's report), ``"mean"``, ``"topK"`` or a callable.
        num_permutations, alpha, seed, groups, max_score: as in :func:`calibrated_alignment`.

    Returns:
        :class:`LayerAlignmentResult` with the raw matrix, the calibrated aggregate, its p-value
        and threshold, and the arg-max pair.
    """
    measure = get_measure(metric, **metric_kwargs)
    x_names, xt = _names_and_tensors(xs, "x")
    y_names, yt = _names_and_tensors(ys, "y")
    n = xt[0].shape[0]
    for side, tensors, names in (("x", xt, x_names), ("y", yt, y_names)):
        for name, t in zip(names, tensors):
            if t.shape[0] != n:
                raise ValueError(
                    f"all layers must have the same number of samples: {side} layer {name!r} has "
                    f"{t.shape[0]}, expected {n}"
                )
    sxs = [prepare_one(measure, t, f"x layer {nm!r}") for nm, t in zip(x_names, xt)]
    sys = [prepare_one(measure, t, f"y layer {nm!r}") for nm, t in zip(y_names, yt)]
    device = xt[0].device
    matrix = layer_scores(measure, sxs, sys, torch.arange(n, device=device)[None])[0]
    null = layer_null_from_states(measure, sxs, sys, n, num_permutations, seed, device, groups)
    smax = measure.max_score if max_score == AUTO else max_score
    return calibrate_layers_from_matrices(matrix, null, aggregate, alpha, smax, x_names, y_names)
