"""Invariants of a linear-kernel gram ``X Xᵀ`` from the features, without forming it.

From column-centered features (A = XXᵀ) the invariants of ``moments.invariants`` cost
O(n·d²) plus O(n·d³) for ``Σ_ij (x_iᵀx_j)³ = ‖Σ_i x_i⊗x_i⊗x_i‖²`` (or O(n²·d/2) from blocks of
the gram's upper triangle when that is cheaper), in O(n·d + d²) memory.  Also the raw linear
CKA in feature space, and the scatter matrix XᵀX that both use.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from alignment_callback.functional._validation import all_finite
from alignment_callback.functional.moments.invariants import (
    GramInvariants,
    _trace_cube,
    gram_invariants,
)
from alignment_callback.functional.moments.patterns import _F64

#: S₃ goes through blocks of the gram (O(n²·d/2)) when ``n < fraction·d²``, else through the
#: 3-tensor (O(n·d³/6)).  Crossover measured on one CPU thread: n ≈ 0.34·d² at d = 256,
#: 0.48·d² at d = 128, 0.6·d² at d = 64 (float64).
_GRAM_ROUTE_FRACTION = 1 / 3

#: A linear kernel whose non-invariant part A₀ holds less than this share of its energy,
#: ``‖A₀‖² ≤ fraction·‖A‖²`` (A close to αI + β(J − I): whitened or equidistant samples), loses
#: its feature-space invariants to cancellation (``‖A₀‖² = ‖C‖² − n²α²/(n−1)`` and the like
#: carry absolute errors of eps·‖A‖²): they then come from the n×n gram, whose centered entries
#: keep full precision.  Measured on whitened features plus noise of size δ (n = 48–512): at
#: ‖A₀‖²/‖A‖² ≈ 5e-12 the feature route's skewness was off by 0.1–60, at 5e-10 by 1e-3.
_NEAR_INVARIANT = 1e-8
#: Largest n for that n×n fallback (a float64 gram of 512 MiB); above it the feature route is
#: kept with a warning.
_NEAR_INVARIANT_MAX_N = 8192


def _centered_features(xc: Tensor) -> Tensor:
    if not isinstance(xc, Tensor) or xc.dim() != 2:
        raise ValueError(f"features must be a 2-D (n, d) tensor, got {getattr(xc, 'shape', xc)}")
    if xc.shape[0] < 2 or xc.shape[1] < 1:
        raise ValueError(f"features need n >= 2 rows and d >= 1 columns, got {tuple(xc.shape)}")
    if not all_finite(xc):
        raise ValueError("features contain NaN/Inf values")
    x = xc.to(_F64, copy=True)
    return x.sub_(x.mean(0, keepdim=True))


def _cube_sum_tensor(x: Tensor, block_rows: int, tile: int | None = None) -> float:
    """``Σ_ij (x_iᵀx_j)³ = ‖M‖²`` with ``M_abc = Σ_i x_ia x_ib x_ic`` (symmetric 3-tensor).

    Only tiles with ``a ≤ b ≤ c`` are formed — for an a-tile and a b-tile (b ≥ a), the
    products ``x_ia x_ib`` of a block of rows times ``x[:, b0:]`` — and each entry is weighted
    by its number of distinct orderings (6, 3 or 1): n·d³/6 multiply-adds plus the tiles'
    overlap (1.2× that with tiles of 16, 1.4× with 32 at d = 256), memory
    O(tile²·d + rows·tile²).  On the CPU, blocks of at most 128 rows keep the products
    ``x_ia x_ib`` in cache; tiles of 32 columns from d = 192, else 16 (3–15 % faster than
    1024 rows and 16 columns at d = 256).
    """
    n, d = x.shape
    rows = max(1, min(block_rows, 128) if x.device.type == "cpu" else block_rows)
    tile = tile or (32 if d >= 192 else 16)
    idx = torch.arange(d, device=x.device)
    orderings = torch.tensor([6.0, 3.0, 1.0], dtype=_F64, device=x.device)
    parts = []
    for a0 in range(0, d, tile):
        a1 = min(d, a0 + tile)
        for b0 in range(a0, d, tile):
            b1 = min(d, b0 + tile)
            acc = torch.zeros((a1 - a0) * (b1 - b0), d - b0, dtype=_F64, device=x.device)
            for s in range(0, n, rows):
                xr = x[s:s + rows]
                z = (xr[:, a0:a1, None] * xr[:, None, b0:b1]).reshape(xr.shape[0], -1)
                acc.addmm_(z.T, xr[:, b0:])
            ai, bi, ci = idx[a0:a1, None, None], idx[None, b0:b1, None], idx[None, None, b0:]
            equal = (ai == bi).long() + (bi == ci).long()  # orderings: 6, 3, 1
            weight = orderings[equal] * ((ai <= bi) & (bi <= ci))
            parts.append(float(torch.dot(weight.reshape(-1), (acc * acc).reshape(-1))))
    return math.fsum(parts)


def _gram_sums(x: Tensor, block_rows: int) -> tuple[float, Tensor]:
    """``Σ_ij (x_iᵀx_j)³`` and, per row, ``Σ_j (x_iᵀx_j)² = x_iᵀ(XᵀX)x_i`` from row blocks of the
    gram's upper triangle: for rows ``s..s+b`` the block ``x[s:s+b] x[s:]ᵀ``, its leading b×b
    part counted once and the rest twice (its squares summed along rows for rows s..s+b and
    along columns for the rows after them); ≈ n²·d/2 multiply-adds, O(b·n) memory,
    b = min(block_rows, 256), one host sync."""
    rows = max(1, min(block_rows, 256))  # smaller blocks skip more of the lower triangle
    total = x.new_zeros((), dtype=_F64)
    squares = x.new_zeros(x.shape[0], dtype=_F64)
    for s in range(0, x.shape[0], rows):
        g = x[s:s + rows] @ x[s:].T
        b = g.shape[0]
        sq = g * g
        squares[s:s + b] += sq.sum(1)
        squares[s + b:] += sq[:, b:].sum(0)
        sq *= g
        total += sq[:, :b].sum() + 2.0 * sq[:, b:].sum()
    return float(total), squares


def _check_scatter(scatter: Tensor, x: Tensor, name: str) -> Tensor:
    """``scatter`` is :func:`feature_scatter` of features like ``x`` (float64, d×d, same
    device); returned as it is."""
    d = x.shape[1]
    if not isinstance(scatter, Tensor) or scatter.shape != (d, d):
        raise ValueError(f"{name} must be the ({d}, {d}) matrix XᵀX of these features, got "
                         f"shape {tuple(getattr(scatter, 'shape', ()))}")
    if scatter.dtype != _F64 or scatter.device != x.device:
        raise ValueError(f"{name} must be float64 on {x.device} (from feature_scatter), got "
                         f"{scatter.dtype} on {scatter.device}")
    return scatter


def feature_scatter(xc: Tensor) -> Tensor:
    """The scatter matrix ``C = XᵀX`` (d×d, float64) of the features re-centered per column in
    float64; ``‖C‖_F = ‖XXᵀ‖_F``.  Pass it to :func:`feature_invariants` and
    :func:`feature_linear_cka` to compute it once per representation.

    Example
    -------
    >>> import torch
    >>> x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> xc = x - x.mean(0)
    >>> bool(torch.allclose(feature_scatter(x).norm(), (xc @ xc.T).norm()))
    True
    """
    x = _centered_features(xc)
    return x.T @ x


def feature_invariants(xc: Tensor, block_rows: int = 1024, scatter: Tensor | None = None
                       ) -> GramInvariants:
    """:func:`gram_invariants` of ``A = X Xᵀ`` (X column-centered) without forming A.

    With ``a_i = ‖x_i‖²``, ``α = mean(a)``, ``b = α/(n−1)`` and ``C = XᵀX`` (d×d), A₀ has
    diagonal ``δ = a − α`` and off-diagonal entries ``x_iᵀx_j + b`` (row sums 0), so

    * ``‖A₀‖² = ‖C‖² − n²α²/(n−1)``,
    * ``q_i = δ_i² + x_iᵀCx_i − a_i² − 2b·a_i + (n−1)b²``,
    * ``dᵀA₀d = Σδ³ + ‖Xᵀδ‖² − Σ δ_i² a_i + b((Σδ)² − Σδ²)``,
    * ``Σ A₀_ij³ = Σδ³ + (S₃ − Σa³) + 3b(‖C‖² − Σa²) − 3b²nα + n(n−1)b³`` with
      ``S₃ = Σ_ij (x_iᵀx_j)³``,
    * ``tr A₀³ = tr(A − cI)³ + 3bc²n − 3b²cn² + b³n³`` with ``c = α + b`` and
      ``tr(A − cI)³ = tr C³ − 3c‖C‖² + 3c² tr C − c³n`` (A and J commute, AJ = 0).

    Two routes, whichever is cheaper.  Below ``n = d²/3``: S₃ and ``x_iᵀCx_i = Σ_j (x_iᵀx_j)²``
    from row blocks of the gram's upper triangle (O(n²·d/2)) and tr C³ from the upper triangle
    of C² (O(d³/2)).  Above: S₃ through the a ≤ b ≤ c entries of the symmetric 3-tensor
    ``Σ_i x_i⊗x_i⊗x_i`` (O(n·d³/6)), ``x_iᵀCx_i`` and ``tr C³ = ‖XC‖²`` from the product XC
    (O(n·d²)).  Plus C = XᵀX (O(n·d²)) unless given; memory O(n·d + d² +
    block_rows·(n + 256)), dominated by the float64 copy of X.  If d >= n the gram route is no
    dearer than O(n·d²) and is used for everything (``gram_invariants(X Xᵀ)``).  Measured:
    n = 100,000, d = 256 (float32 input) in 14.5 s on one CPU thread, peak RSS 718 MB of which
    321 MB before the call (``benchmarks/check_moments.py --only memory``).

    Parameters
    ----------
    xc : Tensor
        (n, d) features; re-centered per column in float64 (idempotent for centered input).
    block_rows : int, default=1024
        Rows processed at a time (at most 256 in the S₃ term, 128 on the 3-tensor route on the
        CPU; memory O(block_rows·(n + 256))).
    scatter : Tensor or None, default=None
        ``XᵀX`` from :func:`feature_scatter` (float64, on the features' device) when already
        computed; None computes it.

    Returns
    -------
    GramInvariants

    Example
    -------
    >>> import torch
    >>> x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> xc = x - x.mean(0)
    >>> a, b = feature_invariants(xc), gram_invariants(xc @ xc.T)
    >>> abs(a.trace_cube - b.trace_cube) <= 1e-10 * abs(b.trace_cube)
    True
    """
    x = _centered_features(xc)
    n, dim = x.shape
    if dim >= n:
        return gram_invariants(x @ x.T)
    c_mat = x.T @ x if scatter is None else _check_scatter(scatter, x, "scatter")
    a = torch.cat([x[s:s + block_rows].pow(2).sum(1) for s in range(0, n, block_rows)])
    alpha = float(a.mean())
    b = alpha / (n - 1)
    c = alpha + b
    delta = a - alpha
    frob_c = float((c_mat * c_mat).sum())
    frob_sq = frob_c - n * n * alpha * alpha / (n - 1)
    if frob_sq <= _NEAR_INVARIANT * frob_c:  # A ≈ αI + β(J − I): see _NEAR_INVARIANT
        if n <= _NEAR_INVARIANT_MAX_N:
            return gram_invariants(x @ x.T)
        warnings.warn(
            f"the linear kernel of these features is within {_NEAR_INVARIANT:g} of "
            f"permutation-invariant (whitened or equidistant samples) and n = {n} is too large "
            "for its n×n gram: its exact permutation moments lose precision to rounding; use "
            "null='permutation'", RuntimeWarning, stacklevel=2)
    if n < _GRAM_ROUTE_FRACTION * dim * dim:  # S₃ and x_iᵀCx_i from the gram's triangle
        s3, xcx = _gram_sums(x, block_rows)
        tr_c3 = _trace_cube(c_mat)  # tr C³ from the upper triangle of C²: d³/2
    else:  # x_iᵀCx_i and ‖XC‖² = tr C³ from one product XC per block: n·d²
        xcx, tr_c3 = [], x.new_zeros(())
        for s in range(0, n, block_rows):
            xb = x[s:s + block_rows]
            xbc = xb @ c_mat
            xcx.append((xbc * xb).sum(1))
            tr_c3 += (xbc * xbc).sum()
        xcx, tr_c3 = torch.cat(xcx), float(tr_c3)
        s3 = _cube_sum_tensor(x, block_rows)
    d2, d3 = float(delta @ delta), float((delta ** 3).sum())
    sum_a2, sum_a3 = float(a @ a), float((a ** 3).sum())
    q = delta * delta + (xcx - a * a) - 2.0 * b * a + (n - 1) * b * b
    xtd = x.T @ delta
    sum_delta = float(delta.sum())
    tr_c = float(c_mat.diagonal().sum())
    tr_g3 = math.fsum([tr_c3, -3 * c * frob_c, 3 * c * c * tr_c, -c ** 3 * n])
    return GramInvariants(
        n=n,
        norm=math.sqrt(frob_c),
        diag_mean=alpha,
        offdiag_mean=-b,
        diag_sq=d2,
        frob_sq=frob_sq,
        diag_cube=d3,
        cube=math.fsum([d3, s3, -sum_a3, 3 * b * frob_c, -3 * b * sum_a2, -3 * b * b * n * alpha,
                        n * (n - 1) * b ** 3]),
        diag_frob=float(delta @ q),
        diag_quad=math.fsum([d3, float(xtd @ xtd), -float((delta * delta) @ a),
                             b * (sum_delta * sum_delta - d2)]),
        trace_cube=math.fsum([tr_g3, 3 * b * c * c * n, -3 * b * b * c * n * n,
                              b ** 3 * n ** 3]),
        max_diag_sq=float((delta * delta).max()),
        max_row_sq=float(q.max()),
    )


def feature_linear_cka(xc: Tensor, yc: Tensor, scatter_x: Tensor | None = None,
                       scatter_y: Tensor | None = None) -> Tensor:
    """Raw linear CKA in feature space, ``‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` on column-centered
    features (re-centered in float64), O(n·(d_x + d_y)²) (through the n×n grams when
    n <= d_x + d_y, which is then cheaper); a float64 0-dim tensor.  With both scatter matrices
    given (:func:`feature_scatter`), only ``XᵀY`` is computed: O(n·d_x·d_y).

    Example
    -------
    >>> import torch
    >>> x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    >>> round(float(feature_linear_cka(x, 2 * x)), 12)
    1.0
    """
    x, y = _centered_features(xc), _centered_features(yc)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows, got {x.shape[0]}, {y.shape[0]}")
    if scatter_x is not None and scatter_y is not None:
        norm = _check_scatter(scatter_x, x, "scatter_x").norm() * _check_scatter(
            scatter_y, y, "scatter_y").norm()
        return (x.T @ y).pow(2).sum() / norm
    if x.shape[0] <= x.shape[1] + y.shape[1]:  # wide features: the n×n grams are cheaper
        k, l = x @ x.T, y @ y.T
        return torch.dot(k.reshape(-1), l.reshape(-1)) / (k.norm() * l.norm())
    return (x.T @ y).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm())
