"""Lightning orchestration: :class:`AlignmentCallback`, :class:`AlignmentPlateau` and the
presets."""

from alignment_callback.callback.alignment_callback import (
    AlignmentCallback,
    FrozenReferenceError,
    ProbeInputError,
)
from alignment_callback.callback.plateau import AlignmentPlateau
from alignment_callback.callback.presets import PRESETS, resolve_preset

__all__ = ["AlignmentCallback", "AlignmentPlateau", "FrozenReferenceError", "PRESETS",
           "ProbeInputError", "resolve_preset"]
