"""The alignment engine: Lightning-free orchestration of one alignment step.

:class:`AlignmentEngine` owns a frozen reference's prepared state (preprocessed once, prepared
once per measure), prepares the model's activations once per layer per step and shares them
across measures, draws the permutations once for the whole run, keeps everything on the compute
device, and returns a typed :class:`StepResult`.  The callback decides *when*; the engine
computes; the command line uses it too.
"""

from alignment_callback.engine.engine import AlignmentEngine
from alignment_callback.engine.result import StepResult

__all__ = ["AlignmentEngine", "StepResult"]
