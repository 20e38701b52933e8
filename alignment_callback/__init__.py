"""alignment_callback: permutation-calibrated representational alignment for PyTorch.

``AlignmentCallback`` (Lightning), ``CalibratedAlignment`` / ``LayerAlignment`` (torchmetrics),
``ActivationRecorder`` / ``collect_activations`` (hooks), and the pure functions in
``alignment_callback.functional``.
"""

from typing import Any

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


def __getattr__(name: str) -> Any:
    """Import the heavy parts (Lightning, torchmetrics) only when used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignment_callback' has no attribute {name!r}")
