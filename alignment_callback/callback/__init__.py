"""Lightning orchestration: :class:`AlignmentCallback`."""

from alignment_callback.callback.alignment_callback import AlignmentCallback

__all__ = ["AlignmentCallback"]
