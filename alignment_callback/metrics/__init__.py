"""torchmetrics ``Metric`` objects for calibrated alignment (usable without Lightning).

Imported lazily, so ``alignment_callback.metrics.plotting`` does not pay for torchmetrics.
"""

from alignment_callback._lazy import lazy_exports

_LAZY = {
    "CalibratedAlignment": "alignment_callback.metrics.calibrated_alignment",
    "LayerAlignment": "alignment_callback.metrics.layer_alignment",
    "plot_layer_heatmap": "alignment_callback.metrics.plotting",
    "plot_scores": "alignment_callback.metrics.plotting",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
