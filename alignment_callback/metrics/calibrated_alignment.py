"""``CalibratedAlignment``: a permutation-calibrated similarity of two representations."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor

from alignment_callback.functional._validation import AUTO
from alignment_callback.functional.registry import MeasureSpec, default_value
from alignment_callback.metrics._rows import Preprocess
from alignment_callback.metrics.base import AlignmentMetricBase
from alignment_callback.metrics.plotting import plot_scores

RESULT_KEYS = ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std",
               "effect_size", "percentile")
#: The default, marked: ``measure="mutual_knn"`` next to the deprecated ``metric=`` is a conflict.
DEFAULT_MEASURE = default_value("mutual_knn")


class CalibratedAlignment(AlignmentMetricBase):
    """Permutation-calibrated alignment of paired rows ``x`` (model) and ``y`` (reference).

    ``update(x, y)`` accumulates paired rows (list states reduced with ``"cat"``, so DDP
    gathers them rank-major, pairs intact); ``compute()`` calibrates the score on all rows
    against ``num_permutations`` seeded permutations of the reference rows (docs/calibration.md) and
    returns a dict of 0-dim tensors ``raw, calibrated, p_value, threshold, null_mean,
    null_std, effect_size, percentile``.  The full result (with the null) is kept in
    ``last_result``.

    Parameters
    ----------
    measure : str, Measure or callable, default="mutual_knn"
        A built-in name, a ``Measure`` or a callable ``(x, y) -> score`` (``metric=`` is its
        deprecated old name: a metric is this object; giving both raises ``TypeError``).
    num_permutations : int, default=500
        K, the permutations of the reference rows in the null.
    alpha : float, default=0.05
        Level of the threshold τ.  A measure option called ``alpha`` (``shape_metric``'s
        whitening) goes through ``measure=get_measure("shape_metric", alpha=...)``: an
        ``alpha=`` other than 0.05 next to the name ``"shape_metric"`` raises ``TypeError``
        rather than silently set the level.
    seed : int, default=0
        Permutation seed: same seed, same permutations, comparable scores.
    max_samples : int or None, default=None
        Bound on this process's accumulated rows (None: unbounded); exceeding it raises
        ``ValueError`` at the update, or at ``compute()`` for rows that came otherwise (a
        ``MetricCollection`` compute group updates its metrics through the first one; merged
        or loaded rows).
    preprocess : bool, dict or callable, default=True
        ``True`` (flatten + L2-normalize rows, the PRH convention), ``False``, a dict of
        ``prepare_features`` options, or a callable on the concatenated rows.
    groups : sequence or Tensor, default=None
        A group label per sample (block permutations, docs/calibration.md); with ``index=``,
        ``groups[i]`` is the label of sample id i, else labels follow the rows' arrival order.
    max_score : float, None or "auto", default="auto"
        s_max; ``"auto"`` uses the measure's (1.0 for built-ins), None an unbounded measure.
    null : {"permutation", "moments", "auto"}, default="permutation"
        ``"moments"``: exact permutation moments with a Pearson type III null (gram family);
        ``"auto"``: the moments where they are validated, else the permutations.
    **kwargs
        The measure's options (``k``, ``sigma``, ``cca_dim``) and torchmetrics'
        (``compute_on_cpu``, ``sync_on_compute``, ...).

    ``forward(x, y)`` accumulates like ``update`` and returns the *uncalibrated* raw score of
    that batch alone (``None`` if the batch is too small for the measure or cannot be scored
    alone, e.g. an all-zero row, or the reference is cached; NaN if the batch holds NaN/Inf
    values); calibration needs the whole probe set, so
    use ``compute()`` for it.  NaN/Inf rows are accepted by ``update`` (no host sync per batch)
    and make ``compute()`` raise ``ValueError`` naming the side, the layer and the update.

    Cached-reference mode: ``set_reference(y)`` preprocesses the frozen reference once and
    keeps its grams / neighbor lists; then ``update(x, index=None)`` takes the model side
    only, and every ``compute()`` reuses the reference's prepared state; ``clear_reference()``
    drops it together with the accumulated rows.  ``index`` (sample ids) lets rows arrive in any
    order or with duplicates (DistributedSampler padding): rows are sorted by id and duplicates
    dropped before computing.  Pass it on every ``update`` since the last ``reset()`` or on
    none; mixing raises ``ValueError``.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.metrics import CalibratedAlignment
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 8, generator=g)
    >>> metric = CalibratedAlignment("linear_cka", num_permutations=99)
    >>> metric.update(x, x @ torch.randn(8, 8, generator=g))  # a linear map of x: aligned
    >>> out = metric.compute()
    >>> round(float(out["raw"]), 3), round(float(out["calibrated"]), 3), float(out["p_value"])
    (0.768, 0.735, 0.01)
    """

    def __init__(
        self,
        measure: MeasureSpec = DEFAULT_MEASURE,
        num_permutations: int = 500,
        alpha: float = 0.05,
        seed: int = 0,
        max_samples: int | None = None,
        preprocess: Preprocess = True,
        groups: Sequence[Any] | Tensor | None = None,
        max_score: float | None | str = AUTO,
        null: str = "permutation",
        **kwargs: Any,
    ) -> None:
        layered = sorted({"aggregate", "x_layers", "y_layers"} & set(kwargs))
        if layered:
            raise TypeError(f"CalibratedAlignment scores one pair of representations and takes no "
                            f"{', '.join(layered)}; use LayerAlignment to score named layers")
        super().__init__(measure, num_permutations, alpha, seed, max_samples, preprocess, "max",
                         groups, max_score, x_layers=["x"], y_layers=["y"], null=null, **kwargs)

    def update(self, x: Tensor, y: Tensor | None = None, index: Tensor | None = None) -> None:
        """Accumulate a batch: model rows ``x`` (n, ...) and reference rows ``y`` (n, ...)."""
        self._update_layers({"x": x}, None if y is None else {"y": y}, index)

    def set_reference(self, y: Tensor) -> None:
        """Cache a frozen reference (all probe rows, in sample order)."""
        self._set_reference_layers({"y": y})

    def compute(self) -> dict[str, Tensor]:
        """Calibrated result on all accumulated rows (dict of 0-dim tensors)."""
        result = self._compute_result()
        self.last_result = result
        return {key: getattr(result, key) for key in RESULT_KEYS}

    def forward(self, x: Tensor, y: Tensor | None = None, index: Tensor | None = None) -> Tensor | None:
        """Accumulate the batch and return its raw (uncalibrated) score, see class docs."""
        self.update(x, y, index)
        return self._raw_batch({"x": x}, None if y is None else {"y": y})

    def plot(self, val: Any = None, ax: Any = None) -> tuple[Any, Any]:
        """Raw and calibrated score with the threshold band; ``val`` is one ``compute()``
        result or a list of them (a curve over epochs). Default: ``compute()`` now."""
        if val is not None and not (isinstance(val, Mapping) or isinstance(val, (list, tuple))
                                    and all(isinstance(v, Mapping) for v in val)):
            raise TypeError(
                f"plot(val): val must be a compute() result (a dict) or a list of them, got "
                f"{type(val).__name__}" + (" (forward() returns the batch's raw score, which "
                                           "has no threshold to draw)"
                                           if isinstance(val, Tensor) else ""))
        return plot_scores(self.compute() if val is None else val, ax=ax,
                           title=f"{self.measure.name} (K={self.num_permutations})")
