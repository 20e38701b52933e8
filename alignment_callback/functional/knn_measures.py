"""Neighborhood measures: mutual kNN, cycle kNN, CKNNA, LCS kNN, edit-distance kNN.

Every measure works on neighbor lists prepared once per representation
(:class:`~alignment_callback.functional.neighbors.NeighborState`).  Under a permutation π of
Y's rows the neighbors of i in Y[π] are π⁻¹(N_Y(π(i))): an index remap costing O(nk) per
permutation instead of a new O(n²d) gram (METHOD.md section 5).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from alignment_callback.functional._validation import check_k, check_pair
from alignment_callback.functional.neighbors import (
    NeighborState,
    contains,
    lcs_length,
    levenshtein,
    lookup,
    neighbor_state,
    remap_neighbors,
    row_keys,
)


def invert(perms: Tensor) -> Tensor:
    """Inverse permutations of the rows of ``perms`` (B, n)."""
    inv = torch.empty_like(perms)
    ar = torch.arange(perms.shape[1], device=perms.device).expand_as(perms)
    return inv.scatter_(1, perms, ar)


def _remap(sy: NeighborState, perms: Tensor, r: Tensor | None) -> Tensor:
    return remap_neighbors(sy, perms, invert(perms)) if r is None else r


def mutual_knn_score(sx: NeighborState, sy: NeighborState, perms: Tensor,
                     r: Tensor | None = None) -> Tensor:
    """``mean_i |N_X(i) ∩ N_{Y[π]}(i)| / k`` for each π (B, n) → (B,).

    ``r``: Y's remapped lists (B, n, k) when the caller already has them (layer path).
    """
    found = contains(sx, row_keys(sx, _remap(sy, perms, r)))
    return found.sum((1, 2)).to(sx.values.dtype) / (sx.n * sx.k)


def cycle_knn_score(sx: NeighborState, sy: NeighborState, perms: Tensor,
                    r: Tensor | None = None) -> Tensor:
    """``mean_i 1[∃ j ∈ N_{Y[π]}(i): i ∈ N_X(j)]`` for each π → (B,)."""
    r = _remap(sy, perms, r)
    found = contains(sx, r * sx.n + torch.arange(sx.n, device=r.device).view(-1, 1))
    return found.any(2).sum(1).to(sx.values.dtype) / sx.n


def _masked_hsic(batch: Tensor, rows: Tensor, cols: Tensor, a: Tensor, b: Tensor, both: Tensor,
                 size: int, n: int) -> Tensor:
    """Unbiased HSIC (Song et al. eq. 5) of pairs of sparse n×n matrices given as entries.

    Entry e belongs to matrix pair ``batch[e]`` at (rows[e], cols[e]) with values a[e] (Ã) and
    b[e] (B̃) — both matrices share the sparsity pattern M (diagonal excluded).  ``both[e]``:
    the transposed entry is in M too, so ``tr(ÃB̃) = Σ a·b·both`` (the grams are symmetric).
    ``1ᵀÃB̃1 = Σ_j colsum(Ã)_j rowsum(B̃)_j``.  Returns (size,).
    """
    def total(v: Tensor) -> Tensor:
        return torch.zeros(size, dtype=v.dtype, device=v.device).index_add_(0, batch, v)

    def per_node(index: Tensor, v: Tensor) -> Tensor:
        return torch.zeros(size * n, dtype=v.dtype, device=v.device).index_add_(0, batch * n + index, v)

    trace = total(a * b * both.to(a.dtype))
    cross = (per_node(cols, a) * per_node(rows, b)).view(size, n).sum(1)
    value = trace + total(a) * total(b) / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)
    return value / (n * (n - 3))


def _self_hsic(s: NeighborState) -> Tensor:
    rows = torch.arange(s.n, device=s.indices.device).repeat_interleave(s.k)
    v = s.values.reshape(-1)
    zero = torch.zeros_like(rows)
    return _masked_hsic(zero, rows, s.indices.reshape(-1), v, v, s.reciprocal.reshape(-1), 1, s.n)[0]


def cknna_score(sx: NeighborState, sy: NeighborState, perms: Tensor,
                r: Tensor | None = None) -> Tensor:
    """CKNNA for each π: ``sim(K, L_π) / sqrt(sim(K, K)·sim(L, L))`` with
    ``sim(K, L) = HSIC_u(M⊙K, M⊙L)``, ``M = M_K ⊙ M_L`` (PRH) → (B,).

    Only the entries of M (mutual neighbors, ≈ k²/n per row under the null) are touched.
    """
    n, k = sx.n, sy.k
    keys = row_keys(sx, _remap(sy, perms, r))  # i·n + j for j ∈ N_{Y[π]}(i), (B, n, k)
    e = contains(sx, keys).view(-1).nonzero().squeeze(1)  # flat (b, i, t) of the entries in M
    q = keys.view(-1)[e]
    i, j = q // n, q % n
    b, t = e // (n * k), e % k
    _, slot = lookup(sx, i, j)  # X's slot of each entry
    src = torch.take(perms, b * n + i) * k + t  # Y's slot: row π(i), position t
    kval = sx.values.reshape(-1)[slot]
    lval = sy.values.reshape(-1)[src]
    both = sx.reciprocal.reshape(-1)[slot] & sy.reciprocal.reshape(-1)[src]
    cross = _masked_hsic(b, i, j, kval, lval, both, perms.shape[0], n)
    return cross / torch.sqrt(_self_term(sx) * _self_term(sy))


def _self_term(s: NeighborState) -> Tensor:
    return s.self_hsic if s.self_hsic is not None else _checked_self_hsic(s)


def _checked_self_hsic(s: NeighborState) -> Tensor:
    value = _self_hsic(s)
    if not bool(value > 0):
        raise ValueError(
            "cknna is undefined: the unbiased HSIC of a representation's kNN-masked gram with "
            f"itself is {float(value):.3g} <= 0 (degenerate neighborhoods, e.g. constant data)"
        )
    return value


def _ordered_list_scores(sx: NeighborState, sy: NeighborState, perms: Tensor, dp,
                         no_match: int, r: Tensor | None) -> Tensor:
    """Sum over i of ``dp(N_X(i), N_{Y[π]}(i))`` for each π → (B,).

    The k×k dynamic programme runs only on rows whose lists share an element (found with the
    cheap table look-up); elsewhere its value is ``no_match`` (LCS 0, edit distance k).  Under
    a permutation null that skips most rows.
    """
    r = _remap(sy, perms, r)
    hit = contains(sx, row_keys(sx, r)).any(2)
    b, i = hit.nonzero(as_tuple=True)
    values = torch.full(hit.shape, no_match, dtype=torch.int64, device=perms.device)
    if b.numel():
        values[b, i] = dp(sx.indices[i], r[b, i]).long()
    return values.sum(1).to(sx.values.dtype)


def lcs_knn_score(sx: NeighborState, sy: NeighborState, perms: Tensor,
                  r: Tensor | None = None) -> Tensor:
    """``mean_i LCS(N_X(i), N_{Y[π]}(i)) / k`` of the ordered neighbor lists → (B,)."""
    return _ordered_list_scores(sx, sy, perms, lcs_length, 0, r) / (sx.n * sx.k)


def edit_distance_knn_score(sx: NeighborState, sy: NeighborState, perms: Tensor,
                            r: Tensor | None = None) -> Tensor:
    """``1 − mean_i Levenshtein(N_X(i), N_{Y[π]}(i)) / k`` → (B,)."""
    return 1.0 - _ordered_list_scores(sx, sy, perms, levenshtein, sx.k, r) / (sx.n * sx.k)


def knn_layer_scores(score: Callable[..., Tensor]) -> Callable[[list, list, Tensor], Tensor]:
    """The layer path of a kNN ``score``: (B, LA, LB) for states ``sxs`` × ``sys``.

    Each Y layer's lists are remapped once per chunk of permutations (not once per pair) and
    the inverse permutations are computed once for all layers.
    """
    def layer_scores(sxs: list, sys: list, perms: Tensor) -> Tensor:
        inverse = invert(perms)
        cols = []
        for sy in sys:
            r = remap_neighbors(sy, perms, inverse)
            cols.append(torch.stack([score(sx, sy, perms, r) for sx in sxs], 1))
        return torch.stack(cols, 2)

    return layer_scores


def knn_state(x: Tensor, k: int, measure: str = "kNN measure", minimum: int = 1) -> NeighborState:
    """Check ``k`` against n and prepare neighbor lists."""
    check_k(x.shape[0], k, minimum=minimum, measure=measure)
    return neighbor_state(x, k)


def cknna_state(x: Tensor, k: int) -> NeighborState:
    """Neighbor lists for CKNNA: k >= 2, and n >= 4 for the unbiased HSIC."""
    if x.shape[0] < 4:
        raise ValueError(f"cknna needs at least 4 samples (unbiased HSIC), got {x.shape[0]}")
    state = knn_state(x, k, "cknna", minimum=2)
    return replace(state, self_hsic=_checked_self_hsic(state))


def _pair(prepare, score, x: Tensor, y: Tensor) -> Tensor:
    x, y = check_pair(x, y)
    return score(prepare(x), prepare(y), torch.arange(x.shape[0], device=x.device)[None])[0]


def mutual_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Mutual kNN: ``mean_i |N_X(i) ∩ N_Y(i)| / k`` (neighbors by inner product, self
    excluded, default k = 10, needs n > k). In [0, 1]; ≈ k/(n−1) for independent data."""
    return _pair(lambda t: knn_state(t, k, "mutual_knn"), mutual_knn_score, x, y)


def cycle_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Cycle kNN: ``mean_i 1[∃ j ∈ N_Y(i): i ∈ N_X(j)]`` (Y's neighbors, then X's). Not
    symmetric. Default k = 10."""
    return _pair(lambda t: knn_state(t, k, "cycle_knn"), cycle_knn_score, x, y)


def cknna(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """CKNNA (PRH): CKA with unbiased HSIC restricted to mutual k-nearest-neighbor pairs of the
    linear grams. Default k = 10; needs k >= 2, n > k and n >= 4. No epsilon in the
    denominator."""
    return _pair(lambda t: cknna_state(t, k), cknna_score, x, y)


def lcs_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Mean over i of the longest common subsequence of the ordered neighbor lists, divided
    by k (PRH returns the unnormalized length). Default k = 10."""
    return _pair(lambda t: knn_state(t, k, "lcs_knn"), lcs_knn_score, x, y)


def edit_distance_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """``1 − mean_i Levenshtein(N_X(i), N_Y(i)) / k`` on ordered neighbor lists. Default
    k = 10."""
    return _pair(lambda t: knn_state(t, k, "edit_distance_knn"), edit_distance_knn_score, x, y)
