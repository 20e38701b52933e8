"""Autocast off inside the library's math.

Under ``torch.autocast`` (Lightning's ``"16-mixed"`` / ``"bf16-mixed"`` steps, a user's own
block) matrix products would run in float16 / bfloat16: measures would lose their digits,
overflow to Inf, or see a zero variance that is not there.  Every public entry point that
computes runs under :func:`no_autocast`, so inputs are computed in their own dtype (float32 or
better), as the package promises.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Disable autocast on the CPU and, where present, CUDA (usable as a decorator)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield
