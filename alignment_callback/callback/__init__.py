"""Lightning orchestration: :class:`AlignmentCallback`, :class:`AlignmentPlateau` and the
presets.

Imported lazily, so the Lightning-free parts (``alignment_callback.callback.distributed``, used
by processes that only share a permutation null) do not pay for importing Lightning.
"""

from alignment_callback._lazy import lazy_exports

_LAZY = {
    "AlignmentCallback": "alignment_callback.callback.alignment_callback",
    "FrozenReferenceError": "alignment_callback.callback.alignment_callback",
    "ProbeInputError": "alignment_callback.callback.alignment_callback",
    "AlignmentPlateau": "alignment_callback.callback.plateau",
    "PRESETS": "alignment_callback.callback.presets",
    "resolve_preset": "alignment_callback.callback.presets",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
