"""torchmetrics ``Metric`` objects for calibrated alignment (usable without Lightning).

Imported lazily, so ``alignment_callback.metrics.plotting`` does not pay for torchmetrics.
"""

from typing import Any

_LAZY = {
    "CalibratedAlignment": "alignment_callback.metrics.calibrated_alignment",
    "LayerAlignment": "alignment_callback.metrics.layer_alignment",
    "plot_layer_heatmap": "alignment_callback.metrics.plotting",
    "plot_scores": "alignment_callback.metrics.plotting",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignment_callback.metrics' has no attribute {name!r}")
