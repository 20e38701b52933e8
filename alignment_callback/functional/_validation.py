"""Input checks shared by every functional measure (clear errors, never silent NaNs)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_float(x: Tensor, name: str = "x") -> Tensor:
    """Return ``x`` as a floating tensor of at least float32 precision (float64 stays float64)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.float64:
        return x
    return x.to(torch.float32)


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
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")
    return x


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
    if isinstance(k, bool) or int(k) != k:
        raise TypeError(f"k must be an integer, got {k!r}")
    k = int(k)
    if k < minimum:
        raise ValueError(f"{measure} needs k >= {minimum}, got k={k}")
    if n <= k:
        raise ValueError(
            f"{measure} needs more samples than neighbors: n={n} is too small for k={k} "
            f"(need n > k)"
        )
    return k
