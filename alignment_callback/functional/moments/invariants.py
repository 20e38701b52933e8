"""Permutation invariants of a matrix, and the containers of invariants and moments.

Cancellation is avoided by splitting off the permutation-invariant part first:
``A = A₀ + α I + β (J − I)`` with ``α = tr A / n`` and β the mean off-diagonal entry, so that
``T(π) = nα_Aα_B + n(n−1)β_Aβ_B + ⟨A₀, B₀^π⟩`` where the last term has mean 0.  Invariants
are those of A₀ (zero trace, zero total), in float64, and the moment combination uses
``math.fsum`` on the expanded products (``moments.exact``).

Invariants of a symmetric A₀ (d = diag A₀, r = row sums, q = row sums of A₀∘A₀), 15 numbers:
``Σd², ‖A₀‖², Σdr, Σr², Σd³, Σ_ij A₀_ij³, Σ d_i q_i, dᵀA₀d, tr A₀³, Σd²r, dᵀA₀r, Σdr²,
Σqr, rᵀA₀r, Σr³``; when the row sums vanish (every centered gram) only the first two, Σd³,
ΣA₀³, Σdq, dᵀA₀d and tr A₀³ are non-zero.  Cost: O(n²) plus half an n×n matmul (tr A₀³).  A
general (non-symmetric) matrix has one invariant per connected multigraph with ≤ 3 edges
(:func:`matrix_invariants`).  From column-centered features see ``moments.features``; from kNN
neighbor lists, ``moments.knn``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from alignment_callback.functional._scaling import center_columns
from alignment_callback.functional._validation import all_finite
from alignment_callback.functional.kernels import symmetrize_
from alignment_callback.functional.moments.patterns import (
    _F64,
    _SYMMETRIC_FIELD,
    Key,
    _all_keys,
    _canonical,
    _contract,
    _DenseBackend,
)
from alignment_callback.functional.neighbors import distinct_rows

_EPS = torch.finfo(_F64).eps

# ----------------------------------------------------------------------------------------------
# Invariant containers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GramInvariants:
    """Permutation invariants of a symmetric n×n matrix A (all Python floats, float64).

    ``A = A₀ + α I + β (J − I)`` with ``α = diag_mean`` (tr A / n) and ``β = offdiag_mean``;
    the other numbers are contractions of the "centered" part A₀ (zero trace, zero total),
    with ``d = diag A₀``, ``r = A₀ 1`` and ``q = (A₀∘A₀) 1``:

    ``diag_sq = Σd²``, ``frob_sq = ‖A₀‖²``, ``diag_rowsum = Σ d r``, ``rowsum_sq = Σ r²``,
    ``diag_cube = Σd³``, ``cube = Σ_ij A₀_ij³``, ``diag_frob = Σ d q``, ``diag_quad = dᵀA₀d``,
    ``trace_cube = tr A₀³``, ``diag_sq_rowsum = Σ d² r``, ``diag_a_rowsum = dᵀA₀r``,
    ``diag_rowsum_sq = Σ d r²``, ``sq_rowsum = Σ q r``, ``rowsum_quad = rᵀA₀r``,
    ``rowsum_cube = Σ r³``.  The row-sum terms are exactly 0 for centered grams.
    ``norm`` is ‖A‖_F of the original matrix (the cosine's denominator).  Two diagnostics
    (not used by the moments): ``max_diag_sq = max_i d_i²`` and ``max_row_sq = max_i q_i``,
    for :func:`pair_leverage`.
    """

    n: int
    norm: float
    diag_mean: float
    offdiag_mean: float
    diag_sq: float
    frob_sq: float
    diag_cube: float
    cube: float
    diag_frob: float
    diag_quad: float
    trace_cube: float
    diag_rowsum: float = 0.0
    rowsum_sq: float = 0.0
    diag_sq_rowsum: float = 0.0
    diag_a_rowsum: float = 0.0
    diag_rowsum_sq: float = 0.0
    sq_rowsum: float = 0.0
    rowsum_quad: float = 0.0
    rowsum_cube: float = 0.0
    max_diag_sq: float = math.nan
    max_row_sq: float = math.nan
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    symmetric = True
    centered = True

    def value(self, key: Key, directed: bool = False) -> float:
        """Contraction of A₀ along the connected multigraph ``key``."""
        name = _SYMMETRIC_FIELD[_canonical(list(key), False) if directed else key]
        if name in ("trace", "total"):
            return 0.0
        return getattr(self, name)

    def as_exact(self) -> GramInvariants:
        """A copy with every number as an exact ``Fraction`` (for precision checks)."""
        kw = {f: (Fraction(getattr(self, f)) if f not in ("n", "max_diag_sq", "max_row_sq")
                  else getattr(self, f))
              for f in self.__dataclass_fields__ if f != "_cache"}
        return GramInvariants(**kw)


@dataclass(frozen=True)
class GraphInvariants:
    """Permutation invariants of a general (possibly non-symmetric) n×n matrix.

    ``values`` maps each connected multigraph (canonical directed edge tuple, ≤ 3 edges) to
    its contraction.  With ``centered=True`` the contractions are those of
    ``A₀ = A − α I − β (J − I)`` (``α = diag_mean``, ``β = offdiag_mean``); with
    ``centered=False`` (kNN graphs) those of A itself.  ``norm`` is ‖A‖_F.
    """

    n: int
    norm: float
    diag_mean: float
    offdiag_mean: float
    values: Mapping[Key, float]
    centered: bool = True
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    symmetric = False

    def value(self, key: Key, directed: bool = True) -> float:
        """Contraction along the connected multigraph ``key`` (directed canonical form)."""
        return self.values[key]

    def as_exact(self) -> GraphInvariants:
        """A copy with every number as an exact ``Fraction`` (for precision checks)."""
        return GraphInvariants(self.n, Fraction(self.norm), Fraction(self.diag_mean),
                               Fraction(self.offdiag_mean),
                               MappingProxyType({k: Fraction(v) for k, v in self.values.items()}),
                               self.centered)


Invariants = Any  # GramInvariants | GraphInvariants


@dataclass(frozen=True)
class PermutationMoments:
    """Mean, variance and skewness of a permutation distribution of a statistic T.

    Attributes
    ----------
    mean : float
        μ = E[T] over the uniform permutations.
    variance : float
        σ² = E[(T − μ)²]; ``std`` is σ (0 for a variance rounded below 0).
    skewness : float
        E[(T − μ)³]/σ³, invariant under positive scaling of T.

    Examples
    --------
    >>> m = PermutationMoments(mean=0.1, variance=0.0004, skewness=0.8)
    >>> m.std
    0.02
    >>> m.scaled(10.0).mean, round(m.scaled(10.0).std, 12), m.scaled(10.0).skewness
    (1.0, 0.2, 0.8)
    """

    mean: float
    variance: float
    skewness: float

    @property
    def std(self) -> float:
        return math.sqrt(max(self.variance, 0.0))

    def scaled(self, factor: float) -> PermutationMoments:
        """Moments of ``factor · T`` (factor > 0)."""
        return PermutationMoments(self.mean * factor, self.variance * factor * factor,
                                  self.skewness)


# ----------------------------------------------------------------------------------------------
# Tied samples
# ----------------------------------------------------------------------------------------------


#: Rows closer than this fraction of the rows' root-mean-square pairwise distance count as tied
#: (a one-hot label with 1e-6 noise, a saturated softmax): their null is as lumpy as exact ties'.
NEAR_TIE_RTOL = 1e-4
#: Near ties are looked for up to this many rows (beyond, only exact ties: the search's cost).
NEAR_TIE_MAX_N = 4096


def has_tied_rows(x: Tensor, rtol: float = 0.0) -> bool:
    """Whether two rows (samples) of ``x`` are identical, compared exactly (``-0.0 == 0.0``),
    or with ``rtol > 0`` closer than ``rtol`` times the root-mean-square distance between rows.

    Tied samples (one-hot labels, integer codes, repeated inputs) make the permutation null
    lumpy: swapping two of them leaves every score unchanged, and with many ties the null has
    few distinct values (atoms) where the moment-matched Pearson III is continuous, outside
    the range where it was validated (:func:`pearson3_valid`).  Any gram of the rows (linear,
    RBF, U-centered, ranked distances) then has tied rows too.  Answered by
    :func:`~alignment_callback.functional.neighbors.distinct_rows`, as for the kNN search: a
    hash of each row's bits, O(n·d), an exact comparison of the rows whose hashes are equal, and
    a sort of all rows only when two rows are identical; a fraction of the invariants'
    O(n·d²); a few host syncs.

    Parameters
    ----------
    x : Tensor
        (n, d) features.
    rtol : float, default=0.0
        Near ties: rows within ``rtol·sqrt(mean_{i<j} ‖x_i − x_j‖²)`` of each other count too
        (:data:`NEAR_TIE_RTOL` is what ``null="auto"`` uses), for at most
        :data:`NEAR_TIE_MAX_N` rows (more: exact ties only).  Found without the n×n distances:
        the rows are sorted by a fixed random projection, and only pairs whose projections are
        that close (a necessary condition) are compared, first on 7 more projections, then in
        full.

    Returns
    -------
    bool

    Example
    -------
    >>> import torch
    >>> has_tied_rows(torch.eye(3)[torch.tensor([0, 1, 2, 1])])  # one-hot labels, a repeat
    True
    >>> has_tied_rows(torch.randn(5, 2, generator=torch.Generator().manual_seed(0)))
    False
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D (n, d) tensor, got {getattr(x, 'shape', x)}")
    if distinct_rows(x)[1] is not None:
        return True
    return rtol > 0 and 1 < x.shape[0] <= NEAR_TIE_MAX_N and _near_tie(x, rtol)


def _near_tie(x: Tensor, rtol: float) -> bool:
    """Two rows closer than ``rtol`` times the rows' RMS pairwise distance (see
    :func:`has_tied_rows`)."""
    n = x.shape[0]
    xc, _ = center_columns(x if x.is_floating_point() else x.double())
    delta = rtol * math.sqrt(2.0 * float((xc * xc).sum(dtype=torch.float64)) / (n - 1))
    if delta == 0.0:  # (the RMS pairwise distance above)
        return False
    g = torch.Generator().manual_seed(0)
    u = torch.randn(x.shape[1], 8, generator=g, dtype=torch.float64)
    proj = xc @ (u / u.norm(dim=0, keepdim=True)).to(xc.device, xc.dtype)  # |Δ proj| <= ‖Δ row‖
    reach = 2.0 * delta  # on each projection, with room for its rounding
    first, order = torch.sort(proj[:, 0])
    for k in range(1, n):  # sorted: pairs k apart are at least as far as pairs k - 1 apart
        close = (first[k:] - first[:-k] <= reach).nonzero().flatten()
        if close.numel() == 0:
            return False
        a, b = order[close], order[close + k]
        near = ((proj[a] - proj[b]).abs() <= reach).all(1)
        a, b = a[near], b[near]
        for start in range(0, a.numel(), 4096):  # the survivors, compared in full
            diff = xc[a[start:start + 4096]] - xc[b[start:start + 4096]]
            if bool((torch.linalg.vector_norm(diff, dim=1) <= delta).any()):
                return True
    return False


# ----------------------------------------------------------------------------------------------
# Invariants of a dense matrix
# ----------------------------------------------------------------------------------------------


def _split_invariant_part(a: Tensor) -> tuple[Tensor, float, float]:
    """``A₀ = A − αI − β(J − I)`` in float64 with ``α = tr A/n``, ``β`` the off-diagonal mean."""
    n = a.shape[0]
    a = a.to(_F64)
    tr = torch.diagonal(a).sum()
    alpha = tr / n
    beta = (a.sum() - tr) / (n * (n - 1))
    a0 = a - beta
    a0.diagonal().sub_(alpha - beta)
    return a0, float(alpha), float(beta)


def _check_square(a: Tensor, name: str = "a") -> None:
    if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square 2-D tensor, got {getattr(a, 'shape', a)}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs n >= 2, got n={a.shape[0]}")
    if not all_finite(a):
        raise ValueError(f"{name} contains NaN/Inf values")


def _max_asymmetry(a: Tensor, tile: int = 256) -> float:
    """``max |A − Aᵀ|``, tile by tile (reading a transposed n×n matrix whole is slow)."""
    n, worst = a.shape[0], a.new_zeros(())
    for s in range(0, n, tile):
        for t in range(s, n, tile):
            diff = a[s:s + tile, t:t + tile] - a[t:t + tile, s:s + tile].T
            worst = torch.maximum(worst, diff.abs().max())
    return float(worst)  # one host sync


def _trace_cube(a: Tensor, rows: int = 256) -> float:
    """``tr A³ = Σ_ij (A²)_ij A_ij`` of a symmetric A from the upper triangle of A²: for rows
    ``s..s+b`` the block ``A[s:s+b] A[s:]ᵀ`` of A², its leading b×b part counted once and the
    rest twice (≈ n³/2 multiply-adds instead of n³, O(rows·n) memory); one host sync."""
    total = a.new_zeros((), dtype=_F64)
    for s in range(0, a.shape[0], rows):
        block = a[s:s + rows]
        prod = block @ a[s:].T
        prod *= block[:, s:]
        b = prod.shape[0]
        total += prod[:, :b].sum() + 2.0 * prod[:, b:].sum()
    return float(total)


def gram_invariants(a: Tensor) -> GramInvariants:
    """Permutation invariants of a symmetric n×n matrix (for :func:`permutation_moments`).

    Works for any symmetric matrix (doubly-centered or U-centered grams, RSA's centered rank
    matrix with non-zero row sums, ...).  The matrix is split as
    ``A = A₀ + αI + β(J − I)`` and the 15 contractions of A₀ listed in
    :class:`GramInvariants` are computed in float64; when the row sums of A₀ vanish to rounding
    (every doubly-centered gram) the row-sum terms are set to exactly 0 and skipped.

    Cost: O(n²) time plus half an n×n matmul (``tr A₀³`` from the upper triangle of A₀²); a
    few n×n float64 temporaries.

    Parameters
    ----------
    a : Tensor
        (n, n) symmetric matrix, any float dtype and device; n >= 2.

    Returns
    -------
    GramInvariants

    Example
    -------
    >>> import torch
    >>> from alignment_callback.functional.kernels import center_gram
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    >>> inv = gram_invariants(center_gram(x @ x.T))
    >>> inv.n, inv.rowsum_sq
    (6, 0.0)
    """
    _check_square(a)
    n = a.shape[0]
    a64 = a.to(_F64, copy=True)
    asym = _max_asymmetry(a64)
    scale = float(a64.abs().max())
    tol = 10 * math.sqrt(torch.finfo(a.dtype).eps) if a.is_floating_point() else 0.0
    if asym > tol * max(scale, 1e-300):
        raise ValueError("gram_invariants needs a symmetric matrix; use matrix_invariants")
    symmetrize_(a64)
    a0, alpha, beta = _split_invariant_part(a64)
    d = torch.diagonal(a0).clone()
    r = a0.sum(1)
    sq = a0 * a0
    q = sq.sum(1)
    flat = a0.reshape(-1)
    inv: dict[str, float] = {
        "diag_sq": float(d @ d),
        "frob_sq": float(q.sum()),
        "diag_cube": float((d * d * d).sum()),
        "cube": float(torch.dot(sq.reshape(-1), flat)),
        "diag_frob": float(d @ q),
        "diag_quad": float(d @ (a0 @ d)),
        "trace_cube": _trace_cube(a0),
        "max_diag_sq": float((d * d).max()),
        "max_row_sq": float(q.max()),
    }
    del sq
    amax = float(a0.abs().max())
    if float(r.abs().max()) > 64.0 * _EPS * n * max(amax, 1e-300):
        ar = a0 @ r
        inv.update(
            diag_rowsum=float(d @ r), rowsum_sq=float(r @ r), diag_sq_rowsum=float((d * d) @ r),
            diag_a_rowsum=float(d @ ar), diag_rowsum_sq=float(d @ (r * r)),
            sq_rowsum=float(q @ r), rowsum_quad=float(r @ ar), rowsum_cube=float((r * r) @ r),
        )
    return GramInvariants(n=n, norm=float(a64.norm()), diag_mean=alpha, offdiag_mean=beta, **inv)


def matrix_invariants(a: Tensor) -> GraphInvariants:
    """Permutation invariants of a general (possibly non-symmetric) dense n×n matrix.

    Every connected multigraph with ≤ 3 edges (orientation kept) is contracted against
    ``A₀ = A − αI − β(J − I)`` by leaf elimination (O(n²)) or a triangle trace (one n×n
    matmul).  Use :func:`gram_invariants` for symmetric matrices (fewer, named numbers) and
    :func:`knn_graph_invariants` for kNN graphs given as neighbor lists (O(n·k)).

    Parameters
    ----------
    a : Tensor
        (n, n) matrix; n >= 2.

    Returns
    -------
    GraphInvariants

    Example
    -------
    >>> import torch
    >>> a = torch.tensor([[0., 1., 0.], [0., 0., 1.], [1., 0., 0.]])  # a directed 3-cycle
    >>> from alignment_callback.functional.moments import permutation_moments
    >>> m = permutation_moments(matrix_invariants(a), matrix_invariants(a.T))
    >>> [round(v, 12) for v in (m.mean, m.variance, m.skewness)]  # T = 0 or 3, each w.p. 1/2
    [1.5, 2.25, 0.0]
    """
    _check_square(a)
    a0, alpha, beta = _split_invariant_part(a)
    backend = _DenseBackend(a0)
    values = {}
    for key in _all_keys(True):
        if key in (((0, 0),), ((0, 1),)):
            values[key] = 0.0  # tr A₀ = 1ᵀA₀1 = 0 exactly
        else:
            values[key] = _contract(key, backend)
    return GraphInvariants(a.shape[0], float(a.to(_F64).norm()), alpha, beta,
                           MappingProxyType(values), centered=True)
