"""``LayerAlignment``: aggregation-aware calibrated alignment over layer pairs."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor

from alignment_callback.functional._validation import AUTO
from alignment_callback.functional.aggregation import Aggregate
from alignment_callback.functional.registry import MeasureSpec, default_value
from alignment_callback.metrics._rows import Preprocess
from alignment_callback.metrics.base import AlignmentMetricBase
from alignment_callback.metrics.calibrated_alignment import RESULT_KEYS
from alignment_callback.metrics.plotting import plot_layer_heatmap

#: The default, marked: ``measure="linear_cka"`` next to the deprecated ``metric=`` is a conflict.
DEFAULT_MEASURE = default_value("linear_cka")


class LayerAlignment(AlignmentMetricBase):
    """Calibrated alignment of several model layers against several reference layers.

    ``update(xs, ys)`` takes ``{layer name: rows}`` for each side.  ``compute()`` builds the
    raw LA×LB matrix ``measure(x_a, y_b)`` and calibrates the aggregate (``"max"`` by default,
    or ``"mean"``, ``"top<m>"``, a callable) aggregation-aware: the same permutation is applied to
    every reference layer, the whole matrix recomputed (fast path) and aggregated
    (docs/calibration.md, Algorithm 2; Westfall–Young maxT for max).

    Returns a dict: the scalar fields of :class:`CalibratedAlignment` for the aggregate plus
    ``matrix`` (LA, LB), ``pair_calibrated`` (LA, LB: each pair against its own null, for
    heatmaps — it does not account for the selection) and ``argmax`` (2,) indices.  Names of
    the best pair: ``last_result.best_pair``.

    Parameters
    ----------
    measure : str, Measure or callable, default="linear_cka"
        As in :class:`CalibratedAlignment`.
    aggregate : {"max", "mean", "top<m>"} or callable, default="max"
        What is calibrated over the LA×LB matrix (``"top3"`` for the mean of the 3 largest; a
        callable maps the matrix to a scalar).
    num_permutations, alpha, seed, max_samples, preprocess, groups, max_score, null, **kwargs
        As in :class:`CalibratedAlignment` (same defaults).
    x_layers, y_layers : sequence of str, default=None
        Layer names of each side (None: taken from the first update, or from a loaded state
        dict, which names its layers); needed only to load a state dict saved without names.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.metrics import LayerAlignment
    >>> g = torch.Generator().manual_seed(0)
    >>> x, noise = torch.randn(64, 8, generator=g), torch.randn(64, 5, generator=g)
    >>> metric = LayerAlignment("linear_cka", num_permutations=99)
    >>> metric.update({"block1": x, "block2": noise},
    ...               {"early": torch.randn(64, 6, generator=g), "late": x[:, :4]})
    >>> out = metric.compute()
    >>> metric.last_result.best_pair, float(out["p_value"])  # the max over 2×2 pairs
    (('block1', 'late'), 0.01)
    """

    def __init__(
        self,
        measure: MeasureSpec = DEFAULT_MEASURE,
        aggregate: Aggregate = "max",
        num_permutations: int = 500,
        alpha: float = 0.05,
        seed: int = 0,
        max_samples: int | None = None,
        preprocess: Preprocess = True,
        groups: Sequence[Any] | Tensor | None = None,
        max_score: float | None | str = AUTO,
        x_layers: Sequence[str] | None = None,
        y_layers: Sequence[str] | None = None,
        null: str = "permutation",
        **kwargs: Any,
    ) -> None:
        super().__init__(measure, num_permutations, alpha, seed, max_samples, preprocess, aggregate,
                         groups, max_score, x_layers=x_layers, y_layers=y_layers, null=null,
                         **kwargs)

    def update(
        self, xs: Mapping[str, Tensor], ys: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
    ) -> None:
        """Accumulate a batch of rows for every layer of each side."""
        self._update_layers(xs, ys, index)

    def set_reference(self, ys: Mapping[str, Tensor]) -> None:
        """Cache a frozen reference's layers (all probe rows, in sample order)."""
        self._set_reference_layers(ys)

    def compute(self) -> dict[str, Tensor]:
        """Aggregation-aware calibrated result (see class docs).  For a single layer pair
        ``matrix`` and ``pair_calibrated`` come back 0-dim (torchmetrics squeezes one-element
        results); ``last_result`` keeps their (1, 1) shape."""
        r = self._compute_result()
        self.last_result = r
        out = {key: getattr(r, key) for key in RESULT_KEYS}
        out.update(matrix=r.matrix, pair_calibrated=r.pair_calibrated,
                   argmax=r.matrix.new_tensor(r.argmax, dtype=None).long())
        return out

    def forward(
        self, xs: Mapping[str, Tensor], ys: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
    ) -> Tensor | None:
        """Accumulate and return the raw aggregate of this batch alone (uncalibrated; ``None``
        / NaN as :meth:`CalibratedAlignment.forward`)."""
        self.update(xs, ys, index)
        return self._raw_batch(xs, ys)

    def plot(self, val: Any = None, ax: Any = None) -> tuple[Any, Any]:
        """Layer×layer heatmap of the raw matrix (``val``: a ``compute()`` dict or a matrix)."""
        if val is None:
            val = self.compute()
        if not isinstance(val, (Mapping, Tensor)):
            raise TypeError("plot(val): val must be one compute() result (a dict) or its "
                            f"layer×layer matrix (a tensor), got {type(val).__name__}")
        matrix = val["matrix"] if isinstance(val, Mapping) else val
        if matrix.dim() < 2:  # one layer pair: squeezed by torchmetrics' compute()
            matrix = matrix.reshape(1, 1)
        argmax = tuple(int(i) for i in val["argmax"]) if isinstance(val, Mapping) else None
        return plot_layer_heatmap(matrix, self.x_layers, self.y_layers, ax=ax, argmax=argmax,
                                  title=f"{self.measure.name}: raw, best pair outlined")
