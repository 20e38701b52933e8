"""Neighborhood measures: mutual kNN, cycle kNN, CKNNA, LCS kNN, edit-distance kNN.

Every measure works on neighbor lists prepared once per representation
(:class:`~alignment_callback.functional.neighbors.NeighborLists`).  Under a permutation π of
Y's rows the neighbors of i in Y[π] are π⁻¹(N_Y(π(i))): an index remap costing O(n·k) per
permutation instead of a new O(n²·d) similarity matrix.  All kNN measures of one step share
one list per layer, built for the largest k (a smaller k reads a prefix), and
:func:`knn_layer_scores` computes several measures in one pass: each reference layer's lists
are remapped once per chunk of permutations and each (model, reference) layer pair is matched
once (k×k comparisons per row).  Nothing in a chunk synchronizes with the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from alignment_callback.functional._validation import check_k, check_pair
from alignment_callback.functional.neighbors import (
    NeighborLists,
    invert,
    lcs_from_matches,
    levenshtein_from_matches,
    match,
    neighbor_lists,
    remap,
)

KNN_KINDS = ("mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn")


@dataclass(frozen=True)
class KnnState:
    """One representation prepared for a kNN measure with ``k`` neighbors.

    Attributes:
        lists: the neighbor lists shared by every kNN measure of the representation (their
            ``k`` is the largest any of them asked for).
        own: ``lists.prefix(k)``.
        self_hsic: CKNNA's permutation-invariant self term ``HSIC_u(M⊙K, M⊙K)`` (float64), or
            ``None`` for the other measures.
    """

    lists: NeighborLists
    own: NeighborLists
    self_hsic: Tensor | None = None

    @property
    def k(self) -> int:
        return self.own.k


def check_distinct_rows(x: Tensor, measure: str) -> None:
    """A representation whose rows are all identical has no neighborhood structure."""
    if x.shape[0] > 1 and bool((x == x[:1]).all()):
        raise ValueError(
            f"{measure}: every row of the representation is identical (a constant "
            "representation), so its neighborhoods carry no information"
        )


def knn_state(x: Tensor, k: int, measure: str = "kNN measure", role: str = "x",
              lists: NeighborLists | None = None) -> KnnState:
    """Check ``k`` against n and prepare (or reuse the shared ``lists`` of) ``x``."""
    minimum = 2 if measure == "cknna" else 1
    check_k(x.shape[0], k, minimum=minimum, measure=measure)
    if lists is None:
        check_distinct_rows(x, measure)
        lists = neighbor_lists(x, k, role)
    own = lists.prefix(k)
    if measure != "cknna":
        return KnnState(lists, own)
    if x.shape[0] < 4:
        raise ValueError(f"cknna needs at least 4 samples (unbiased HSIC), got {x.shape[0]}")
    return KnnState(lists, own, _checked_self_hsic(own))


# ------------------------------------------------------------------------------- CKNNA math
def _masked_hsic(cols: Tensor, a: Tensor, b: Tensor, both: Tensor, n: int) -> Tensor:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of B pairs of sparse symmetric-pattern n×n
    matrices, in float64.

    Entry ``[p, i, t]`` sits at (i, ``cols[p, i, t]``) with value ``a`` in Ã and ``b`` in B̃
    (zero where absent); ``both``: the transposed entry is present too, so
    ``tr(ÃB̃) = Σ a·b·both`` for symmetric grams; ``1ᵀÃB̃1 = Σ_j colsum(Ã)_j rowsum(B̃)_j``.
    """
    batch = a.shape[0]
    trace = (a * b * both).sum((1, 2))
    colsum = torch.zeros(batch, n, dtype=a.dtype, device=a.device)
    colsum.scatter_add_(1, cols.reshape(batch, -1), a.reshape(batch, -1))
    cross = (colsum * b.sum(2)).sum(1)
    value = trace + a.sum((1, 2)) * b.sum((1, 2)) / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)
    return value / (n * (n - 3))


def _checked_self_hsic(own: NeighborLists) -> Tensor:
    v = own.values.double()[None]
    value = _masked_hsic(own.indices[None], v, v, own.reciprocal[None], own.n)[0]
    if not bool(value > 0):
        raise ValueError(
            "cknna is undefined: the unbiased HSIC of a representation's kNN-masked gram with "
            f"itself is {float(value):.3g} <= 0 (degenerate neighborhoods, e.g. constant data)"
        )
    return value


# ------------------------------------------------------------------- scores from one match
@dataclass
class _Match:
    """What one (model layer, reference layer) pair shares across measures in a chunk."""

    eq: Tensor  # (B, n, kmax, kmax): remapped Y list entry t == X list entry s
    remapped: Tensor  # (B, n, kmax): N_{Y[π]}(i)
    perms: Tensor
    x_lists: NeighborLists
    _cycle: Tensor | None = None

    def cycle(self) -> Tensor:
        """(B, n, kmax, kmax): ``i == N_X(j)[s]`` for ``j = remapped[.., i, t]``."""
        if self._cycle is None:
            n = self.remapped.shape[1]
            own = torch.arange(n, device=self.remapped.device).view(1, n, 1, 1)
            self._cycle = self.x_lists.indices[self.remapped] == own
        return self._cycle


def _mutual(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    found = m.eq[..., :k, :k].any(-1)
    return found.sum((1, 2)).to(sx.own.values.dtype) / (sx.own.n * k)


def _cycle_score(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    hit = m.cycle()[..., :k, :k].any(-1).any(-1)
    return hit.sum(1).to(sx.own.values.dtype) / sx.own.n


def _cknna(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    eq = m.eq[..., :k, :k]
    batch, n = eq.shape[:2]
    found = eq.any(-1)
    slot = eq.to(torch.uint8).argmax(-1)  # X's slot of each found entry
    xo, yo = sx.own, sy.own
    kval = xo.values.double().expand(batch, n, k).gather(2, slot)
    lval = yo.values.double()[m.perms]  # Y's slot: row π(i), position t
    both = found & xo.reciprocal.expand(batch, n, k).gather(2, slot) & yo.reciprocal[m.perms]
    zero = torch.zeros((), dtype=torch.float64, device=eq.device)
    a, b = torch.where(found, kval, zero), torch.where(found, lval, zero)
    cross = _masked_hsic(m.remapped[..., :k], a, b, both, n)
    return (cross / torch.sqrt(sx.self_hsic * sy.self_hsic)).to(xo.values.dtype)


def _lcs(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    total = lcs_from_matches(m.eq[..., :k, :k]).sum(1)
    return total.to(sx.own.values.dtype) / (sx.own.n * k)


def _edit(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    total = levenshtein_from_matches(m.eq[..., :k, :k]).sum(1)
    return 1.0 - total.to(sx.own.values.dtype) / (sx.own.n * k)


_SCORES = {"mutual_knn": _mutual, "cycle_knn": _cycle_score, "cknna": _cknna,
           "lcs_knn": _lcs, "edit_distance_knn": _edit}


def knn_layer_scores(requests: Sequence[tuple[str, Sequence[KnnState], Sequence[KnnState]]],
                     perms: Tensor) -> list[Tensor]:
    """Several kNN measures over layer pairs in one pass: a (B, LA, LB) tensor per request.

    Each request is ``(kind, x_states, y_states)`` (``kind`` in :data:`KNN_KINDS`); all
    requests must share the same per-layer ``lists``.  Y layers are permuted by each row of
    ``perms``; each Y layer is remapped once and each layer pair matched once per chunk.
    """
    kind0, xs0, ys0 = requests[0]
    kmax = max(s.k for _, xs, _ in requests for s in xs)
    batch, out = perms.shape[0], []
    for kind, xs, ys in requests:
        dtype = xs[0].own.values.dtype
        out.append(torch.empty(batch, len(xs), len(ys), dtype=dtype, device=perms.device))
    inverse = invert(perms)
    for b, sy in enumerate(ys0):
        remapped = remap(sy.lists, perms, inverse)[..., :kmax]
        for a, sx in enumerate(xs0):
            x_lists = sx.lists if sx.lists.k == kmax else sx.lists.prefix(kmax)
            m = _Match(match(remapped, x_lists), remapped, perms, x_lists)
            for (kind, xs, ys), o in zip(requests, out):
                o[:, a, b] = _SCORES[kind](m, xs[a], ys[b], xs[a].k)
    return out


def knn_score(kind: str, sx: KnnState, sy: KnnState, perms: Tensor) -> Tensor:
    """One measure on one pair for each permutation: (B,)."""
    return knn_layer_scores([(kind, [sx], [sy])], perms)[0][:, 0, 0]


# ------------------------------------------------------------------------- public measures
def _pair(kind: str, x: Tensor, y: Tensor, k: int) -> Tensor:
    x, y = check_pair(x, y)
    sx, sy = knn_state(x, k, kind, "x"), knn_state(y, k, kind, "y")
    return knn_score(kind, sx, sy, torch.arange(x.shape[0], device=x.device)[None])[0]


def mutual_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Mutual kNN: ``mean_i |N_X(i) ∩ N_Y(i)| / k`` (neighbors by inner product, self
    excluded, default k = 10, needs n > k). In [0, 1]; ≈ k/(n−1) for independent data."""
    return _pair("mutual_knn", x, y, k)


def cycle_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Cycle kNN: ``mean_i 1[∃ j ∈ N_Y(i): i ∈ N_X(j)]`` (Y's neighbors, then X's). Not
    symmetric. Default k = 10."""
    return _pair("cycle_knn", x, y, k)


def cknna(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """CKNNA (PRH): CKA with unbiased HSIC restricted to mutual k-nearest-neighbor pairs of the
    linear grams. Default k = 10; needs k >= 2, n > k and n >= 4. No epsilon in the
    denominator."""
    return _pair("cknna", x, y, k)


def lcs_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Mean over i of the longest common subsequence of the ordered neighbor lists, divided
    by k (PRH returns the unnormalized length). Default k = 10."""
    return _pair("lcs_knn", x, y, k)


def edit_distance_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """``1 − mean_i Levenshtein(N_X(i), N_Y(i)) / k`` on ordered neighbor lists. Default
    k = 10."""
    return _pair("edit_distance_knn", x, y, k)
