"""alignment_callback: permutation-calibrated representational alignment for PyTorch.

``AlignmentCallback`` (Lightning), ``CalibratedAlignment`` / ``LayerAlignment`` (torchmetrics),
``ActivationRecorder`` / ``collect_activations`` (hooks), and the pure functions in
``alignment_callback.functional``.
"""

from alignment_callback._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "AlignmentCallback": "alignment_callback.callback",
    "AlignmentPlateau": "alignment_callback.callback",
    "AlignmentEngine": "alignment_callback.engine",
    "CalibratedAlignment": "alignment_callback.metrics",
    "LayerAlignment": "alignment_callback.metrics",
    "ActivationRecorder": "alignment_callback.hooks",
    "collect_activations": "alignment_callback.hooks",
}

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
