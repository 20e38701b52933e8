"""k-nearest-neighbor lists and the index tricks the fast nulls use (METHOD.md sections 3, 5).

Neighbors are the k rows with the largest inner product, self excluded, ordered by decreasing
similarity. On L2-normalized rows this is cosine similarity. Ties are broken by ``torch.topk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_BLOCK_ELEMENTS = 1 << 24  # gram rows computed at a time for top-k: ~64 MB in float32


def knn(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k neighbors of every row of ``x`` by inner product, self excluded.

    Returns ``(indices, values)``, both (n, k), ordered by decreasing inner product.
    The gram is computed in row blocks, so memory stays O(n·block) rather than O(n²).
    """
    n = x.shape[0]
    rows = max(1, min(n, _BLOCK_ELEMENTS // max(n, 1)))
    idx_parts, val_parts = [], []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        g = x[start:stop] @ x.T
        ar = torch.arange(stop - start, device=x.device)
        g[ar, ar + start] = -torch.inf
        vals, idx = torch.topk(g, k, dim=1, largest=True, sorted=True)
        idx_parts.append(idx)
        val_parts.append(vals)
    return torch.cat(idx_parts), torch.cat(val_parts)


_DENSE_TABLE_BYTES = 1 << 28  # n×n slot + membership tables for O(1) look-ups while they fit in 256 MB


@dataclass(frozen=True)
class NeighborState:
    """Neighbor lists of one representation, prepared once and reused for every permutation.

    Attributes:
        n: number of samples.
        indices: (n, k) neighbor indices, most similar first.
        values: (n, k) inner products ``⟨x_i, x_j⟩`` for those neighbors.
        table: (n, n) int16/int32 with ``t + 1`` where ``j = indices[i, t]`` and 0 elsewhere
            (when it fits in memory), else ``None``.
        member: (n, n) bool, ``j ∈ N(i)`` (with ``table``), else ``None``: membership tests
            are one ``torch.take`` per query batch.
        keys, key_slot: sorted pair keys ``i·n + j`` and the flat slot ``i·k + t`` of each,
            used for look-ups when there is no table.
        reciprocal: (n, k) bool, ``i ∈ N(j)`` for ``j = indices[i, t]``.
        self_hsic: CKNNA's permutation-invariant self term ``HSIC_u(M⊙K, M⊙K)``, when
            prepared for CKNNA.
    """

    n: int
    indices: Tensor
    values: Tensor
    table: Tensor | None
    member: Tensor | None
    keys: Tensor | None
    key_slot: Tensor | None
    reciprocal: Tensor
    self_hsic: Tensor | None = None

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def row_keys(state: NeighborState, cols: Tensor) -> Tensor:
    """Flat keys ``i·n + cols[..., i, :]`` of (…, n, m) column indices whose row is their position."""
    base = torch.arange(0, state.n * state.n, state.n, device=cols.device)
    return cols + base.view(-1, 1)


def contains(state: NeighborState, keys: Tensor) -> Tensor:
    """``j ∈ N(i)`` for flat keys ``i·n + j`` (any shape) → bool of the same shape."""
    if state.member is not None:
        return torch.take(state.member, keys)
    pos = torch.searchsorted(state.keys, keys.reshape(-1)).clamp_max_(state.keys.numel() - 1)
    return (state.keys[pos] == keys.reshape(-1)).view(keys.shape)


def lookup(state: NeighborState, rows: Tensor, cols: Tensor, slots: bool = True
           ) -> tuple[Tensor, Tensor | None]:
    """Is ``cols`` a neighbor of ``rows`` in ``state``? Returns ``(found, flat_slot)``.

    ``flat_slot = rows·k + t`` indexes ``state.indices.flatten()`` where found; elsewhere it is
    a valid but meaningless index, so callers mask with ``found``.  ``slots=False`` skips it.
    """
    q = rows * state.n + cols
    if not slots:
        return contains(state, q), None
    if state.table is not None:
        t = torch.take(state.table, q)
        return t > 0, rows * state.k + (t.long() - 1).clamp_min_(0)
    pos = torch.searchsorted(state.keys, q).clamp_max_(state.keys.numel() - 1)
    return state.keys[pos] == q, state.key_slot[pos]


def neighbor_state(x: Tensor, k: int) -> NeighborState:
    """Prepare :class:`NeighborState` for ``x`` (n, d) with ``k`` neighbors."""
    n = x.shape[0]
    indices, values = knn(x, k)
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    table = member = keys = order = None
    dtype = torch.int16 if k < 2**15 - 1 else torch.int32
    if n * n * (3 if dtype == torch.int16 else 5) <= _DENSE_TABLE_BYTES:
        table = torch.zeros(n, n, dtype=dtype, device=x.device)
        slots = torch.arange(1, k + 1, dtype=dtype, device=x.device).repeat(n)
        table[rows, indices.flatten()] = slots
        member = table > 0
    else:
        keys, order = torch.sort(rows * n + indices.flatten())
    empty = torch.empty(0, dtype=torch.bool, device=x.device)
    partial = NeighborState(n, indices, values, table, member, keys, order, empty)
    found = contains(partial, indices * n + torch.arange(n, device=x.device).view(n, 1))
    return NeighborState(n, indices, values, table, member, keys, order, found)


def remap_neighbors(state: NeighborState, perms: Tensor, inverse: Tensor) -> Tensor:
    """Neighbor lists of ``y[π]`` from those of ``y``: ``N_{Y[π]}(i) = π⁻¹(N_Y(π(i)))``.

    ``perms`` and ``inverse`` are (B, n); returns (B, n, k). Order within each list is kept.
    """
    b, n = perms.shape
    moved = state.indices[perms]  # (B, n, k): N_Y(π(i))
    return torch.gather(inverse, 1, moved.reshape(b, -1)).view(b, n, -1)


def _pairwise_equal(a: Tensor, b: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``eq[i, j, m] = a[m, i] == b[m, j]`` with the batch flattened last (contiguous DP rows)."""
    batch = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1]).T
    b2 = b.reshape(-1, b.shape[-1]).T
    return a2.unsqueeze(1) == b2.unsqueeze(0), batch


def _lcs_dp(eq: Tensor) -> Tensor:
    ka, kb, m = eq.shape
    prev = torch.zeros(kb + 1, m, dtype=torch.int16, device=eq.device)
    for i in range(ka):
        cur = torch.zeros_like(prev)
        for j in range(kb):
            best = torch.maximum(prev[j + 1], cur[j])
            cur[j + 1] = torch.where(eq[i, j], prev[j] + 1, best)
        prev = cur
    return prev[kb]


def _levenshtein_dp(eq: Tensor) -> Tensor:
    ka, kb, m = eq.shape
    prev = torch.arange(kb + 1, dtype=torch.int16, device=eq.device)[:, None].repeat(1, m)
    for i in range(ka):
        cur = torch.empty_like(prev)
        cur[0] = i + 1
        for j in range(kb):
            step = torch.minimum(prev[j + 1], cur[j]) + 1
            cur[j + 1] = torch.minimum(step, prev[j] + (~eq[i, j]))
        prev = cur
    return prev[kb]


def lcs_length(a: Tensor, b: Tensor) -> Tensor:
    """Longest-common-subsequence length of paired sequences ``a[..., :]`` and ``b[..., :]``."""
    eq, batch = _pairwise_equal(a, b)
    return _lcs_dp(eq).view(batch)


def levenshtein(a: Tensor, b: Tensor) -> Tensor:
    """Levenshtein (edit) distance of paired sequences ``a[..., :]`` and ``b[..., :]``."""
    eq, batch = _pairwise_equal(a, b)
    return _levenshtein_dp(eq).view(batch)
