"""Benjamini–Hochberg false-discovery-rate control over many permutation p-values.

When many model pairs (or measures) are tested, some p-values fall below α by chance alone.  The
calibration paper applies Benjamini–Hochberg across its 204 model pairs (docs/cli.md, "Many
pairs: Benjamini–Hochberg"); :func:`benjamini_hochberg` is that step-up procedure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional._validation import check_alpha


def benjamini_hochberg(p_values: Tensor | Any, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """Benjamini–Hochberg step-up procedure.

    With the m p-values sorted, ``p_(1) ≤ … ≤ p_(m)``, the adjusted p-values are
    ``q_(i) = min_{j ≥ i} min(m · p_(j) / j, 1)`` (monotone in p, capped at 1) and the
    hypotheses with ``q ≤ alpha`` (up to rounding: 16 units in the last place of the input's
    precision, at most float32's) are rejected;
    this is the same set as the step-up rule
    "reject the i* smallest, i* = max{i : p_(i) ≤ i·α/m}".  Controls the false-discovery rate at
    ``alpha`` for independent or positively dependent p-values (PRDS).

    Parameters
    ----------
    p_values : Tensor, ndarray or sequence of float
        p-values in [0, 1]: a tensor, a NumPy array or a (nested) list of numbers or 0-dim
        tensors (read as float64), of any shape; all entries form one family.
    alpha : float, default=0.05
        The FDR level, in (0, 1).

    Returns
    -------
    rejected : Tensor of bool
        Whether each hypothesis is rejected (``adjusted ≤ alpha``, up to rounding).
    adjusted : Tensor
        The adjusted p-values q (computed in float64, returned in the input's floating dtype,
        float64 for other inputs).  Both outputs have the input's shape and device.

    Raises
    ------
    ValueError
        ``alpha`` outside (0, 1), or a p-value outside [0, 1] or NaN.

    References
    ----------
    Benjamini, Hochberg. Controlling the false discovery rate: a practical and powerful
    approach to multiple testing. J. R. Stat. Soc. B 57(1), 1995.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import benjamini_hochberg
    >>> p = torch.tensor([0.01, 0.04, 0.03, 0.5], dtype=torch.float64)
    >>> rejected, adjusted = benjamini_hochberg(p, alpha=0.05)
    >>> rejected.tolist(), [round(q, 4) for q in adjusted.tolist()]
    ([True, False, False, False], [0.04, 0.0533, 0.0533, 0.5])
    """
    alpha = check_alpha(alpha)
    if isinstance(p_values, Tensor):
        p = p_values
    elif isinstance(p_values, np.ndarray) and p_values.dtype.kind in "biuf":
        p = torch.as_tensor(p_values)
    else:  # a list of floats or of 0-dim tensors (on any device, in any dtype): float64 values
        try:
            p = torch.as_tensor(p_values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError("p_values must be numbers (a tensor, an array or a list), got "
                            f"{type(p_values).__name__}") from error
    if p.is_complex():
        raise TypeError(f"p_values must be real numbers, got dtype {p.dtype}")
    if not p.is_floating_point():
        p = p.to(torch.float64)
    flat = p.reshape(-1).to(torch.float64)  # ranks up to 2**53 exactly, no float16 overflow
    m = flat.numel()
    if m == 0:
        return torch.zeros(p.shape, dtype=torch.bool, device=p.device), p.clone()
    if bool(torch.isnan(flat).any()) or bool(((flat < 0) | (flat > 1)).any()):
        raise ValueError("p-values must lie in [0, 1] (no NaN)")
    order = torch.argsort(flat, stable=True)
    ranks = torch.arange(1, m + 1, dtype=flat.dtype, device=flat.device)
    scaled = flat[order] * m / ranks
    # running minimum from the largest p-value down: q_(i) = min_{j >= i} m p_(j) / j
    running_min = torch.cummin(torch.flip(scaled, [0]), 0).values
    adjusted_sorted = torch.flip(running_min, [0]).clamp(max=1.0)
    adjusted = torch.empty_like(flat)
    adjusted[order] = adjusted_sorted
    adjusted = adjusted.reshape(p.shape)
    return at_most_alpha(adjusted, alpha, p.dtype), adjusted.to(p.dtype)


def at_most_alpha(q: Any, alpha: float, dtype: torch.dtype) -> Any:
    """``q ≤ α`` up to 16 units in the last place of ``dtype``, the precision the (adjusted)
    p-values ``q`` were computed in: a p-value on the boundary p_(i) = i·α/m (e.g. p = 0.05,
    m = 12, i = 3, α = 0.2) is rejected even where m·p/i, or float32's rounding of p, lands a
    few units above α.  Coarser dtypes than float32 (float16, bfloat16) get float32's
    tolerance, not theirs (16 units of bfloat16 would accept q = 0.056 at α = 0.05).  ``q`` a
    tensor or a float.

    >>> at_most_alpha(float(torch.tensor(0.05, dtype=torch.float32)), 0.05, torch.float32)
    True
    """
    eps = min(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return q <= alpha * (1 + 16 * eps)


__all__ = ["at_most_alpha", "benjamini_hochberg"]
