"""Neighbourhood measures: mutual kNN, cycle kNN, CKNNA, LCS kNN, edit-distance kNN.

Every measure works on neighbour lists prepared once per representation
(:class:`~alignment_callback.functional.neighbours.NeighbourState`).  Under a permutation π of
Y's rows the neighbours of i in Y[π] are π⁻¹(N_Y(π(i))): an index remap costing O(nk) per
permutation instead of a new O(n²d) gram (METHOD.md section 5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignment_callback.functional._checks import check_k, check_pair
from alignment_callback.functional.neighbours import (
    NeighbourState,
    lcs_length,
    levenshtein,
    lookup,
    neighbour_state,
    remap_neighbours,
)


def invert(perms: Tensor) -> Tensor:
    """Inverse permutations of the rows of ``perms`` (B, n)."""
    inv = torch.empty_like(perms)
    ar = torch.arange(perms.shape[1], device=perms.device).expand_as(perms)
    return inv.scatter_(1, perms, ar)


def _rows(perms: Tensor, k: int) -> Tensor:
    b, n = perms.shape
    return torch.arange(n, device=perms.device).view(1, n, 1).expand(b, n, k)


def mutual_knn_score(sx: NeighbourState, sy: NeighbourState, perms: Tensor) -> Tensor:
    """``mean_i |N_X(i) ∩ N_{Y[π]}(i)| / k`` for each π (B, n) → (B,)."""
    r = remap_neighbours(sy, perms, invert(perms))
    found, _ = lookup(sx, _rows(perms, sy.k), r)
    return found.sum((1, 2)).to(sx.values.dtype) / (sx.n * sx.k)


def cycle_knn_score(sx: NeighbourState, sy: NeighbourState, perms: Tensor) -> Tensor:
    """``mean_i 1[∃ j ∈ N_{Y[π]}(i): i ∈ N_X(j)]`` for each π → (B,)."""
    r = remap_neighbours(sy, perms, invert(perms))
    found, _ = lookup(sx, r, _rows(perms, sy.k))
    return found.any(2).sum(1).to(sx.values.dtype) / sx.n


def _masked_hsic(a: Tensor, b: Tensor, cols: Tensor, both: Tensor, n: int) -> Tensor:
    """Unbiased HSIC of two sparse n×n matrices stored by row (METHOD.md, Song et al. eq. 5).

    ``a``, ``b``: (B, n, k) entries at (i, cols[.., i, s]) (zero where absent); ``both``: the
    entry's transpose is present in both matrices, so ``tr(ÃB̃) = Σ a·b·both`` (valid because
    the underlying grams are symmetric).  ``1ᵀÃB̃1 = Σ_j colsum(Ã)_j rowsum(B̃)_j``.
    """
    bsz = a.shape[0]
    trace = (a * b * both).sum((1, 2))
    col_a = torch.zeros(bsz, n, dtype=a.dtype, device=a.device)
    col_a.scatter_add_(1, cols.reshape(bsz, -1), a.reshape(bsz, -1))
    cross = (col_a * b.sum(2)).sum(1)
    total = trace + a.sum((1, 2)) * b.sum((1, 2)) / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)
    return total / (n * (n - 3))


def _self_hsic(s: NeighbourState) -> Tensor:
    v = s.values[None]
    return _masked_hsic(v, v, s.indices[None], s.reciprocal[None], s.n)[0]


def cknna_score(sx: NeighbourState, sy: NeighbourState, perms: Tensor) -> Tensor:
    """CKNNA for each π: ``sim(K, L_π) / sqrt(sim(K, K)·sim(L, L))`` with
    ``sim(K, L) = HSIC_u(M⊙K, M⊙L)``, ``M = M_K ⊙ M_L`` (PRH) → (B,)."""
    inv = invert(perms)
    r = remap_neighbours(sy, perms, inv)
    found, slot = lookup(sx, _rows(perms, sy.k), r)
    zero = torch.zeros((), dtype=sx.values.dtype, device=sx.values.device)
    kval = torch.where(found, sx.values.reshape(-1)[slot], zero)
    lval = torch.where(found, sy.values[perms], zero)
    both = found & sx.reciprocal.reshape(-1)[slot] & sy.reciprocal[perms]
    cross = _masked_hsic(kval, lval, r, both, sx.n)
    return cross / torch.sqrt(_self_term(sx) * _self_term(sy))


def _self_term(s: NeighbourState) -> Tensor:
    value = _self_hsic(s)
    if not bool(value > 0):
        raise ValueError(
            "cknna is undefined: the unbiased HSIC of a representation's kNN-masked gram with "
            f"itself is {float(value):.3g} <= 0 (degenerate neighbourhoods, e.g. constant data)"
        )
    return value


def lcs_knn_score(sx: NeighbourState, sy: NeighbourState, perms: Tensor) -> Tensor:
    """``mean_i LCS(N_X(i), N_{Y[π]}(i)) / k`` of the ordered neighbour lists → (B,)."""
    r = remap_neighbours(sy, perms, invert(perms))
    lcs = lcs_length(sx.indices.expand_as(r), r)
    return lcs.sum(1).to(sx.values.dtype) / (sx.n * sx.k)


def edit_distance_knn_score(sx: NeighbourState, sy: NeighbourState, perms: Tensor) -> Tensor:
    """``1 − mean_i Levenshtein(N_X(i), N_{Y[π]}(i)) / k`` → (B,)."""
    r = remap_neighbours(sy, perms, invert(perms))
    dist = levenshtein(sx.indices.expand_as(r), r)
    return 1.0 - dist.sum(1).to(sx.values.dtype) / (sx.n * sx.k)


def knn_state(x: Tensor, k: int, measure: str = "kNN measure", minimum: int = 1) -> NeighbourState:
    """Check ``k`` against n and prepare neighbour lists."""
    check_k(x.shape[0], k, minimum=minimum, measure=measure)
    return neighbour_state(x, k)


def _pair(score, x: Tensor, y: Tensor, k: int, name: str, minimum: int = 1) -> Tensor:
    x, y = check_pair(x, y)
    if name == "cknna" and x.shape[0] < 4:
        raise ValueError(f"cknna needs at least 4 samples (unbiased HSIC), got {x.shape[0]}")
    sx, sy = knn_state(x, k, name, minimum), knn_state(y, k, name, minimum)
    return score(sx, sy, torch.arange(x.shape[0], device=x.device)[None])[0]


def mutual_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Mutual kNN: ``mean_i |N_X(i) ∩ N_Y(i)| / k`` (neighbours by inner product, self
    excluded, default k = 10, needs n > k). In [0, 1]; ≈ k/(n−1) for independent data."""
    return _pair(mutual_knn_score, x, y, k, "mutual_knn")


def cycle_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Cycle kNN: ``mean_i 1[∃ j ∈ N_Y(i): i ∈ N_X(j)]`` (Y's neighbours, then X's). Not
    symmetric. Default k = 10."""
    return _pair(cycle_knn_score, x, y, k, "cycle_knn")


def cknna(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """CKNNA (PRH): CKA with unbiased HSIC restricted to mutual k-nearest-neighbour pairs of the
    linear grams. Default k = 10; needs k >= 2, n > k and n >= 4. No epsilon in the
    denominator."""
    return _pair(cknna_score, x, y, k, "cknna", minimum=2)


def lcs_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Mean over i of the longest common subsequence of the ordered neighbour lists, divided
    by k (PRH returns the unnormalised length). Default k = 10."""
    return _pair(lcs_knn_score, x, y, k, "lcs_knn")


def edit_distance_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """``1 − mean_i Levenshtein(N_X(i), N_Y(i)) / k`` on ordered neighbour lists. Default
    k = 10."""
    return _pair(edit_distance_knn_score, x, y, k, "edit_distance_knn")
