"""Autocast off inside the library's math, and a note when TF32 rounds float32 products.

Under ``torch.autocast`` (Lightning's ``"16-mixed"`` / ``"bf16-mixed"`` steps, a user's own
block) matrix products would run in float16 / bfloat16: measures would lose their digits,
overflow to Inf, or see a zero variance that is not there.  Every public entry point that
computes runs under :func:`no_autocast`, so inputs are computed in their own dtype (float32 or
better), as the package promises.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch


_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` in this thread (no driver call)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())
    except RuntimeError:  # a device type this build does not know
        return False


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Disable autocast on every device type where it is on (usable as a decorator); reads
    the thread's autocast state only, so it costs no driver call."""
    with contextlib.ExitStack() as stack:
        for device_type in _AUTOCAST_DEVICES:
            if _autocast_on(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


TF32_NOTE = (
    "TF32 matrix products are enabled (torch.backends.cuda.matmul.allow_tf32, or "
    "torch.set_float32_matmul_precision('high'/'medium')): float32 grams and kNN similarities "
    "on CUDA round their inputs to 10 mantissa bits, so neighbor lists and scores differ "
    "from a float32 CPU run (score and null use the same products, so the calibration "
    "stays valid). For float32 agreement pass float64 features or compute on the CPU; the "
    "library does not change this global setting, which training shares."
)


def warn_if_tf32(device: torch.device, dtype: torch.dtype) -> None:
    """Warn (once per place) when float32 products on ``device`` would run in TF32."""
    matmul = torch.backends.cuda.matmul
    if device.type == "cuda" and dtype == torch.float32 and (
            matmul.allow_tf32 or getattr(matmul, "fp32_precision", None) == "tf32"
            or torch.get_float32_matmul_precision() != "highest"):
        warnings.warn(TF32_NOTE, RuntimeWarning, stacklevel=3)
