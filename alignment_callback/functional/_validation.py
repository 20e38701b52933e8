"""Input and argument checks shared by the whole library: one place, one message per mistake.

Every check names the argument it is about, so a wrong ``seed=`` reads
``seed must be an integer in [0, 2**63 - 1], got 1.5`` wherever it was passed (the functional
API, the metric objects, the callback or the command line).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import numbers
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

AUTO = "auto"
MAX_SEED = 2**63 - 1
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the files of the decorators wrapping the library's functions (no_grad, contextmanager)
_WRAPPERS = frozenset(os.path.abspath(f) for f in (contextlib.__file__, functools.__file__,
                                                  torch.utils._contextlib.__file__))
# torchmetrics' wrappers of update / compute / forward (metric objects, collections), found
# without importing it
_SPEC = importlib.util.find_spec("torchmetrics")
if _SPEC is not None and _SPEC.origin:
    _TORCHMETRICS = os.path.dirname(os.path.abspath(_SPEC.origin))
    _WRAPPERS |= {os.path.join(_TORCHMETRICS, "metric.py"),
                  os.path.join(_TORCHMETRICS, "collections.py")}


@contextlib.contextmanager
def errors_named(where: str) -> Iterator[None]:
    """``ValueError``s raised inside start with ``where`` ("y layer 'b': ..."), same type."""
    try:
        yield
    except ValueError as err:
        err.args = (f"{where}: {err.args[0] if err.args else ''}", *err.args[1:])
        raise


def per_side(prepare: Callable[..., Any], x: Tensor, y: Tensor, *args: Any,
             **kwargs: Any) -> tuple[Any, Any]:
    """``prepare(x, *args, **kwargs)`` and the same of ``y``, in that order; a ``ValueError``
    from either names its side ("y: zero-variance representation: ..."), as
    ``calibrated_alignment``'s do.  Only per-side preparation belongs inside: errors about the
    pair or the parameters are raised before it, unnamed."""
    with errors_named("x"):
        sx = prepare(x, *args, **kwargs)
    with errors_named("y"):
        sy = prepare(y, *args, **kwargs)
    return sx, sy


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised in this library point at the first
    caller outside it (and outside the decorators wrapping its functions), however deep in
    the library it was raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(_PACKAGE + os.sep) and name not in _WRAPPERS:
            return level
        frame, level = frame.f_back, level + 1
    return level


#: float32 holds every integer of magnitude up to 2**24 exactly
FLOAT32_EXACT_INTEGERS = 2**24


def as_float(x: Tensor, name: str = "x") -> Tensor:
    """``x`` detached, as a floating tensor of at least float32 precision (float64 stays
    float64); gradients are never tracked through a measure.

    Integers become float32, which holds every integer up to 2**24 exactly, unless one of
    them is larger in magnitude (float32 rounds 10**8 + 1 to 10**8): such int32 / int64 /
    uint32 / uint64 values become float64 (on a device without float64, such as Apple's MPS,
    float32).  Integers float32 holds keep float32, so their results (and the tie-breaking
    keys of the kNN measures, drawn from the data and its dtype) do not depend on the integer
    type.  Complex input is refused, and so is a meta tensor (``device="meta"``), which has a
    shape but no values.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():  # .to(float32) would drop the imaginary part with a warning only
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (device='meta'): meta tensors hold no data, "
                         "so there is nothing to measure; pass a tensor on a real device")
    x = x.detach()
    if x.dtype == torch.float64:
        return x
    if (x.dtype != torch.bool and not x.is_floating_point() and torch.iinfo(x.dtype).bits > 16
            and x.device.type != "mps" and x.numel() > 0):
        wide = x.to(torch.float64)
        if bool(wide.abs().max() > FLOAT32_EXACT_INTEGERS):
            return wide
    return x.to(torch.float32)


def as_scalar(value: Any, what: str, like: Tensor | None = None) -> Tensor:
    """``value`` (a number or a one-element tensor or array) as a 0-dim real tensor, in
    ``like``'s dtype and on its device when given; a ``TypeError`` / ``ValueError`` naming
    ``what`` (``"score"``, ``"the measure callable's value"``) for anything else."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"{what} must be one real number, got {type(value).__name__}")
    try:  # a Python float through NumPy: float64, not torch's default float32
        out = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{what} must be one real number, got {type(value).__name__}") from error
    if out.is_meta:
        raise TypeError(f"{what} must be one real number, got a meta tensor (device='meta'), "
                        "which holds no value")
    if out.is_complex() or out.dtype == torch.bool:
        raise TypeError(f"{what} must be one real number, got a {out.dtype} value")
    if out.numel() != 1:
        raise ValueError(f"{what} must be one number, got a value of shape {tuple(out.shape)}")
    return out.reshape(()) if like is None else out.reshape(()).to(like.device, like.dtype)


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer (not a bool; floats such as 5.0 are not integers here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(seed: Any, name: str = "seed") -> int:
    """A permutation seed: an integer in ``[0, 2**63 - 1]``."""
    if not is_integer(seed) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1], got {seed!r}")
    return int(seed)


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (bools and floats such as 2.7 are refused)."""
    if not is_integer(value) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_num_permutations(value: Any, name: str = "num_permutations") -> int:
    """The number of permutations K: a positive integer."""
    return check_positive_int(value, name)


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """The level α of the threshold: a real number in (0, 1)."""
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def check_max_score(value: Any, name: str = "max_score") -> float | str | None:
    """s_max: ``"auto"`` (the measure's own), ``None`` (unbounded) or a finite number."""
    if value is None or value == AUTO and isinstance(value, str):
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be 'auto', None or a finite number, got {value!r}")
    return float(value)


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite.  A sum of finite numbers is finite unless it
    overflows: one cheap reduction, and the element check only when the sum is NaN or Inf."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_matrix(x: Tensor, name: str = "x") -> Tensor:
    """Check ``x`` is a finite 2-D (n, d) tensor with n >= 2 and d >= 1; return it as float."""
    x = as_float(x, name)
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (n_samples, n_features) after preprocessing, got shape "
            f"{tuple(x.shape)}; use prepare_features(x, pool=...) to reduce it"
        )
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples (rows), got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")
    return x


def as_number(value: Any, name: str) -> float:
    """A 0-dim tensor or array as a Python float (``name`` in the error for a complex one)."""
    if getattr(value, "dtype", None) is not None and "complex" in str(value.dtype):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


class ShapeOptionError(ValueError):
    """A measure option the data's shape cannot take (such as SVCCA's ``cca_dim`` above a
    layer's width): a property of the probe's size and the layers chosen, not of the values."""


def check_bandwidth(sigma: Any, name: str = "sigma") -> float | str:
    """Refuse an RBF bandwidth that is neither ``"median"`` nor a finite positive number (a
    one-element real tensor counts as its number): a parameter error, raised by ``rbf_gram``,
    by the measures calling it before either side is prepared, and by ``get_measure``.
    Returns ``"median"``, a Python int as given, or the number as a float."""
    if isinstance(sigma, str):
        if sigma != "median":
            raise ValueError(f"{name} must be a finite positive number or 'median', got {sigma!r}")
        return sigma
    if isinstance(sigma, Tensor) and sigma.numel() == 1 and not sigma.is_complex():
        sigma = float(sigma)
    if (isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma > 0
            or not math.isfinite(sigma)):
        raise ValueError(f"{name} must be a finite positive number or 'median', got {sigma!r}")
    return sigma if isinstance(sigma, int) else float(sigma)


def check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Check a paired (x, y) input: both valid matrices with the same number of rows and device."""
    x = check_matrix(x, "x")
    y = check_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of samples (rows): got {x.shape[0]} and "
            f"{y.shape[0]}"
        )
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices: {x.device} and {y.device}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def check_k(n: int, k: int, minimum: int = 1, measure: str = "kNN measure") -> int:
    """Check the neighbor count: ``minimum <= k < n`` (self is excluded, so n > k is needed)."""
    if not is_integer(k):  # the words and type of get_measure's parameter check
        raise ValueError(f"{measure}: k must be an integer >= {minimum}, got {k!r}")
    k = int(k)
    if k < minimum:
        raise ValueError(f"{measure} needs k >= {minimum}, got k={k}")
    if n <= k:
        raise ValueError(
            f"{measure} needs more samples than neighbors: n={n} is too small for k={k} "
            f"(need n > k)"
        )
    return k


def check_device(device: Any, name: str = "device") -> torch.device | None:
    """None, or the ``torch.device`` named by ``device`` (a device or a string such as
    ``"cuda:0"``); a CUDA device must exist on this machine."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be None, a torch.device or a device string such as 'cpu' "
                        f"or 'cuda:0', got {type(device).__name__}")
    try:
        out = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name}={device!r} is not a device: {err}") from err
    if out.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (out.index or 0) >= count:
            raise ValueError(f"{name}={device!r}: this machine has {count} CUDA device(s)")
    return out


def resource_error(error: BaseException) -> bool:
    """Out of memory (host or device: torch raises ``RuntimeError`` subclasses, and CUDA
    libraries their own status errors), or another CUDA error: not the fault of the data,
    the probe or a setting (a pool, a layer), so not reported as one."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(
        part in text for part in ("out of memory", "cuda error", "alloc", "cublas", "cudnn",
                                  "cusolver"))
