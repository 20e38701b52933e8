"""Exact permutation moments of the kNN-graph measures: the invariants of a kNN graph from its
neighbor lists (O(n·k), O(n·k²) for the triangle counts), the moments of mutual kNN and the
exact permutation means of cycle kNN and CKNNA.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
from torch import Tensor

from alignment_callback.functional.moments.exact import _falling, cosine_moments
from alignment_callback.functional.moments.invariants import GraphInvariants, PermutationMoments
from alignment_callback.functional.moments.patterns import (
    _F64,
    _all_keys,
    _contract,
    _has_loop,
    _KnnBackend,
    _program,
)


def knn_graph_invariants(indices: Tensor) -> GraphInvariants:
    """Permutation invariants of the directed kNN adjacency matrix M (``M_ij = 1`` iff j is
    one of i's k neighbors) from its neighbor lists, in O(n·k) (triangles O(n·k²)).

    M is not centered (``centered=False``): its invariants are small integer counts
    (out-degrees are k, in-degrees ``c_j``, reciprocal pairs ``tr M²``, 2-paths ``Σ c_j²``,
    triangles ``tr M³`` ...).  ``norm = sqrt(n·k)``, so :func:`cosine_moments` of two kNN
    graphs with the same k are the moments of mutual kNN ``T/(n·k)``.

    Parameters
    ----------
    indices : LongTensor
        (n, k) neighbor indices (distinct within a row, self excluded), as
        ``NeighborLists.indices``.

    Returns
    -------
    GraphInvariants

    Example
    -------
    >>> import torch
    >>> idx = torch.tensor([[1, 2], [2, 0], [0, 1], [0, 1]])
    >>> m = mutual_knn_moments(knn_graph_invariants(idx), knn_graph_invariants(idx))
    >>> round(m.mean, 6)  # k / (n − 1)
    0.666667
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must be (n, k), got shape {tuple(indices.shape)}")
    indices = indices.long()
    n, k = indices.shape
    if k < 1 or n <= k:
        raise ValueError(f"need 1 <= k < n, got n={n}, k={k}")
    rows = torch.arange(n, device=indices.device)[:, None]
    if bool((indices == rows).any()) or bool((indices < 0).any()) or bool((indices >= n).any()):
        raise ValueError("indices must lie in [0, n) and exclude the row itself")
    srt = torch.sort(indices, dim=1).values
    if k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("a row of indices repeats a neighbor")
    backend = _KnnBackend(indices)
    values = {}
    for key in _all_keys(True):
        values[key] = 0.0 if _has_loop(key) else _contract(key, backend)
    return GraphInvariants(n, math.sqrt(n * k), 0.0, k / (n - 1), MappingProxyType(values),
                           centered=False)


def mutual_knn_moments(inv_x: GraphInvariants, inv_y: GraphInvariants) -> PermutationMoments:
    """Moments of mutual kNN ``T/(n·k)`` under permutation (same k on both sides); the mean is
    exactly ``k/(n − 1)``.  Inputs from :func:`knn_graph_invariants`."""
    if abs(inv_x.norm - inv_y.norm) > 1e-9 * inv_x.norm:
        raise ValueError("mutual kNN moments need the same k for both graphs")
    return cosine_moments(inv_x, inv_y)


def cycle_knn_mean(indices_x: Tensor, k_y: int) -> float:
    """Exact permutation mean of cycle kNN ``mean_i 1[∃ j ∈ N_{Y[π]}(i): i ∈ N_X(j)]``.

    Given π(i) = u, the images of the ``c_i`` in-neighbors of i in X's graph are a uniform
    ``c_i``-subset of the other n − 1 indices, disjoint from the k neighbors of u in Y with
    probability ``C(n−1−k, c_i)/C(n−1, c_i)``, so
    ``E = 1 − (1/n) Σ_i C(n−1−k, c_i)/C(n−1, c_i)`` (only X's in-degrees matter).  O(n·k).

    Parameters
    ----------
    indices_x : LongTensor
        (n, k_x) neighbor lists of X.
    k_y : int
        Number of neighbors in Y's lists.

    Example
    -------
    >>> import torch
    >>> idx = torch.tensor([[1], [2], [0]])  # every in-degree is 1
    >>> cycle_knn_mean(idx, 1)  # P(π maps i's in-neighbor onto π(i)'s neighbor) = 1/2
    0.5
    """
    n = indices_x.shape[0]
    indeg = torch.bincount(indices_x.reshape(-1).long(), minlength=n).to(_F64)
    k = float(k_y)
    lg = torch.lgamma
    nn = torch.tensor(float(n), dtype=_F64, device=indeg.device)
    possible = indeg <= n - 1 - k
    c = torch.where(possible, indeg, torch.zeros_like(indeg))
    log_ratio = (lg(nn - k) - lg(nn - k - c) - lg(nn) + lg(nn - c))
    miss = torch.where(possible, torch.exp(log_ratio), torch.zeros_like(indeg))
    return float(1.0 - miss.mean())


class _Sparse:
    """A zero-diagonal sparse n×n matrix as COO entries (rows, cols, vals) with sorted keys."""

    def __init__(self, n: int, rows: Tensor, cols: Tensor, vals: Tensor) -> None:
        self.n, self.rows, self.cols, self.vals = n, rows, cols, vals.to(_F64)
        self.keys, order = torch.sort(rows * n + cols)
        self.sorted_vals = self.vals[order]

    def total(self) -> float:
        return float(self.vals.sum())

    def rowsums(self) -> Tensor:
        return torch.zeros(self.n, dtype=_F64, device=self.vals.device).index_add_(
            0, self.rows, self.vals)

    def colsums(self) -> Tensor:
        return torch.zeros(self.n, dtype=_F64, device=self.vals.device).index_add_(
            0, self.cols, self.vals)

    def at(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Entries at (rows, cols), 0 where absent."""
        q = rows * self.n + cols
        pos = torch.searchsorted(self.keys, q).clamp_max_(self.keys.numel() - 1)
        return torch.where(self.keys[pos] == q, self.sorted_vals[pos],
                           torch.zeros((), dtype=_F64, device=q.device))


def _two_edge_pattern_sums(e1: _Sparse, e2: _Sparse) -> list[float]:
    """Exact-pattern sums ``S(p)`` of ``E1[i, j]·E2[k, l]`` over the 15 partitions p of the
    positions (i, j, k, l), for zero-diagonal E1, E2 (the r = 2 program with two labels)."""
    r1, c1, r2, c2 = e1.rowsums(), e1.colsums(), e2.rowsums(), e2.colsums()
    same = float((e1.vals * e2.at(e1.rows, e1.cols)).sum())      # Σ E1_ij E2_ij
    swap = float((e1.vals * e2.at(e1.cols, e1.rows)).sum())      # Σ E1_ij E2_ji
    prog = _program(2)
    at_least = []
    for q in prog.partitions:
        i, j, k, l = q
        if i == j or k == l:
            at_least.append(0.0)  # zero diagonals
        elif len({i, j, k, l}) == 4:
            at_least.append(e1.total() * e2.total())
        elif i == k and j == l:
            at_least.append(same)
        elif i == l and j == k:
            at_least.append(swap)
        elif i == k:
            at_least.append(float(r1 @ r2))
        elif i == l:
            at_least.append(float(r1 @ c2))
        elif j == k:
            at_least.append(float(c1 @ r2))
        else:  # j == l
            at_least.append(float(c1 @ c2))
    return [math.fsum(mu * at_least[q] for q, mu in row) for row in prog.mobius]


def _masked_parts(indices: Tensor, values: Tensor) -> tuple[_Sparse, _Sparse, _Sparse]:
    """(P = K∘M, M, K∘M∘Mᵀ) of a kNN graph with neighbor values K_ij = values[i, t]."""
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    cols = indices.reshape(-1).long()
    vals = values.reshape(-1).to(_F64)
    mask = _Sparse(n, rows, cols, torch.ones_like(vals))
    recip = mask.at(cols, rows) > 0
    return (_Sparse(n, rows, cols, vals), mask,
            _Sparse(n, rows[recip], cols[recip], vals[recip]))


def _hsic_u_parts(trace: float, tot: float, cross: float, n: int) -> float:
    return (trace + tot / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def cknna_mean(indices_x: Tensor, values_x: Tensor, indices_y: Tensor, values_y: Tensor
               ) -> float:
    """Exact permutation mean of CKNNA ``HSIC_u(M⊙K, M⊙L_π) / sqrt(HSIC_u(M_K⊙K, M_K⊙K)·
    HSIC_u(M_L⊙L, M_L⊙L))`` with the mutual mask ``M = M_K ⊙ M_{L_π}`` (as
    ``knn_measures.cknna``).

    With ``P = K∘M_K``, ``Q = L∘M_L`` the numerator's three parts are permutation statistics
    of order ≤ 2: ``tr(ÃB̃) = Σ (P∘M_Kᵀ)_ij (Q∘M_Lᵀ)_π(i)π(j)`` (mean: product of totals over
    n(n−1)), ``1ᵀÃ1·1ᵀB̃1 = T(P, M_L)·T(M_K, Q)`` and ``1ᵀÃB̃1 = Σ_ijl P_ij M_L,π(i)π(j)
    M_K,jl Q_π(j)π(l)``, whose means are ``Σ_p S(p) S'(p)/(n)_|p|`` over the partitions of
    four positions (two labeled edges; for the last one only those with j = k).  O(n·k).

    Parameters
    ----------
    indices_x, values_x, indices_y, values_y : Tensor
        (n, k) neighbor indices of X and their inner products ``⟨x_i, x_j⟩``
        (``NeighborLists.indices`` / ``.values``, or :func:`~alignment_callback.functional.
        neighbors.knn`'s pair), then Y's.

    Examples
    --------
    >>> import itertools, torch
    >>> import alignment_callback.functional as F
    >>> from alignment_callback.functional.neighbors import knn
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    >>> y = torch.randn(6, 4, generator=g, dtype=torch.float64)
    >>> (ix, vx), (iy, vy) = knn(x, 2), knn(y, 2)
    >>> every = [float(F.cknna(x, y[list(p)], k=2)) for p in itertools.permutations(range(6))]
    >>> round(cknna_mean(ix, vx, iy, vy), 10) == round(sum(every) / len(every), 10)
    True
    """
    n = indices_x.shape[0]
    px, mx, rx = _masked_parts(indices_x, values_x)
    py, my, ry = _masked_parts(indices_y, values_y)
    prog = _program(2)
    ff = {m: float(_falling(n, m)) for m in set(prog.blocks)}

    def mean_of_product(a1: _Sparse, a2: _Sparse, b1: _Sparse, b2: _Sparse,
                        chain: bool) -> float:
        sa, sb = _two_edge_pattern_sums(a1, a2), _two_edge_pattern_sums(b1, b2)
        terms = [sa[i] * sb[i] / ff[m] for i, (p, m) in enumerate(zip(prog.partitions, prog.blocks))
                 if m <= n and (not chain or p[1] == p[2])]
        return math.fsum(terms)

    trace = rx.total() * ry.total() / (n * (n - 1))
    tot = mean_of_product(px, mx, my, py, chain=False)
    cross = mean_of_product(px, mx, my, py, chain=True)
    numerator = _hsic_u_parts(trace, tot, cross, n)

    def self_term(p: _Sparse, r: _Sparse) -> float:
        return _hsic_u_parts(float((r.vals * r.vals).sum()), p.total() ** 2,
                             float(p.colsums() @ p.rowsums()), n)

    denom = self_term(px, rx) * self_term(py, ry)
    if not denom > 0:
        raise ValueError("cknna is undefined: a self term HSIC_u(M⊙K, M⊙K) is <= 0")
    return numerator / math.sqrt(denom)
