"""Exact rescaling by powers of two, so extreme magnitudes neither overflow nor underflow.

Multiplying by 2**e changes only the exponent of every float, so every product, sum, norm and
ratio computed afterward equals the unscaled one times a power of two, bit for bit (as long as
nothing overflowed or underflowed before).  Scale-invariant measures (cosines, rankings, CKA)
therefore give identical results on ``x`` and ``x · c``, including ``c = 1e20`` in float32, where
``x @ x.T`` or ``‖x‖²`` would otherwise overflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SAFE_EXPONENT = 16  # largest magnitudes in [2**-16, 2**16] are left as they are


def _exponent_to_unit(maxabs: Tensor) -> Tensor:
    """``e`` with ``maxabs · 2**-e`` in [0.5, 1) (0 where ``maxabs`` is 0 or already safe)."""
    _, e = torch.frexp(maxabs)
    safe = (maxabs == 0) | ((e >= -SAFE_EXPONENT) & (e <= SAFE_EXPONENT))
    return torch.where(safe, torch.zeros_like(e), e)


def times_power_of_two(x: Tensor, e: Tensor) -> Tensor:
    """``x · 2**e`` for integer exponents ``e`` (broadcast against ``x``), exact unless the
    result overflows or underflows.

    ``torch.ldexp(x, e)`` multiplies by ``2**e`` itself, which is inf from ``e = 128``
    (float32) or ``1024`` (float64) on, although ``x · 2**e`` may be small: a subnormal ``x``
    (float32 ``|x| < 2**-126``) needs such a factor to reach [0.5, 1).  The power is applied
    in steps whose factors are finite and nonzero; every step is exact while its products are
    (a single step where that is enough, as ``torch.ldexp``).
    """
    info = torch.finfo(x.dtype)
    hi = math.frexp(info.max)[1] - 1  # 2**hi: the largest finite power of two
    lo = math.frexp(info.tiny * info.eps)[1] - 1  # 2**lo: the smallest subnormal
    while True:
        step = e.clamp(lo, hi)
        x = torch.ldexp(x, step.to(x.dtype))
        e = e - step
        if not bool((e != 0).any()):
            return x


def rescale_exactly(x: Tensor, per_row: bool = False) -> Tensor:
    """``x · 2**-e`` with the largest ``|x|`` (of the matrix, or of each row) in [0.5, 1).

    Returns ``x`` itself when its magnitudes are already moderate (in ``[2**-16, 2**16]``), so
    ordinary inputs are not copied.  Subnormal magnitudes are scaled up exactly too.
    """
    if x.numel() == 0:
        return x
    if not per_row:  # one magnitude, decided on the host: one read instead of a dozen small ops
        e = math.frexp(float(x.abs().amax()))[1]
        if -SAFE_EXPONENT <= e <= SAFE_EXPONENT or not x.is_floating_point():
            return x
        return times_power_of_two(x, torch.tensor(-e, device=x.device))
    e = _exponent_to_unit(x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True))
    if not bool((e != 0).any()):
        return x
    return times_power_of_two(x, -e) if x.is_floating_point() else x


def center_columns(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column-centered ``x``, and ``x`` with its constant columns zeroed.

    A column whose values are all equal is constant: it is centered to exactly zero (the mean's
    rounding would leave residue, which a per-column rescaling or standardization would blow up
    into a spurious feature), and it is zero in the second tensor, from which callers take the
    norm that bounds centering's rounding (one large constant feature would otherwise hide the
    variance of all the others).
    """
    constant = (x == x[:1]).all(0, keepdim=True)
    xc = x - x.mean(0, keepdim=True)
    if x.is_floating_point():  # the mean, rounded, is off by up to half an ulp of a large
        # offset (0.03 at 1e6 in float32, a few % of a unit spread): subtract what it left too
        # (exact where the offset dominates, x − mean losing no digit), a second pass
        xc = xc - xc.mean(0, keepdim=True)
    return xc.masked_fill(constant, 0), x.masked_fill(constant, 0)


def equilibrate_columns(xc: Tensor) -> tuple[Tensor, Tensor]:
    """``xc`` with each column times a power of two (exact) so that its largest ``|value|`` is
    in [0.5, 1) (zero columns left as they are), and the exponents ``e`` (1, d): ``xc`` is the
    result times ``2**e``.  Measures that depend on the column space only (CCA, whitening) are
    unchanged, but a float32 SVD no longer loses the directions of small columns next to a
    much larger one (a rank tolerance relative to the largest singular value)."""
    _, exponent = torch.frexp(xc.abs().amax(0, keepdim=True))
    return times_power_of_two(xc, -exponent), exponent  # in steps: a subnormal column needs > 2**127


#: Centering's rounding of a column, in units of ``eps·‖x_j‖``: a column varies when its
#: centered values exceed it (a sum of n values rounds by far less).
CENTERING_ULPS = 1e2


def has_variance(xc: Tensor, varying: Tensor) -> bool:
    """Whether some column of the column-centered ``xc`` varies by more than centering's
    rounding of that column's own values (``CENTERING_ULPS·eps·‖x_j‖``, with ``varying`` the
    uncentered columns, constant ones zeroed: :func:`center_columns`).  Column by column, so
    one feature with a large offset (a transformer's massive activations) does not make the
    variance of all the others look like its rounding."""
    bound = CENTERING_ULPS * torch.finfo(xc.dtype).eps
    own = torch.linalg.vector_norm(xc, dim=0)
    return bool((own > bound * torch.linalg.vector_norm(varying, dim=0)).any())
