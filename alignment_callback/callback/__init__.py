"""Lightning orchestration: :class:`AlignmentCallback`, :class:`AlignmentPlateau` and the
presets.

Imported lazily, so the Lightning-free parts (``alignment_callback.callback.distributed``, used
by processes that only share a permutation null) do not pay for importing Lightning.
"""

from typing import Any

_LAZY = {
    "AlignmentCallback": "alignment_callback.callback.alignment_callback",
    "FrozenReferenceError": "alignment_callback.callback.alignment_callback",
    "ProbeInputError": "alignment_callback.callback.alignment_callback",
    "AlignmentPlateau": "alignment_callback.callback.plateau",
    "PRESETS": "alignment_callback.callback.presets",
    "resolve_preset": "alignment_callback.callback.presets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignment_callback.callback' has no attribute {name!r}")
