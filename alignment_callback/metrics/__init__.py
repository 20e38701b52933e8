"""torchmetrics ``Metric`` objects for calibrated alignment (usable without Lightning)."""

from alignment_callback.metrics.calibrated_alignment import CalibratedAlignment
from alignment_callback.metrics.layer_alignment import LayerAlignment
from alignment_callback.metrics.plotting import plot_layer_heatmap, plot_scores

__all__ = ["CalibratedAlignment", "LayerAlignment", "plot_layer_heatmap", "plot_scores"]
