"""k-nearest-neighbor lists: exact search in row blocks, tie handling, and the index algebra
of the fast permutation null.

The neighbors ``N(i)`` of row i are the k other rows with the largest inner product
``⟨x_i, x_j⟩`` (cosine similarity on L2-normalized rows), most similar first.

**Ties.** Discrete data (one-hot or quantized features, dead ReLUs, duplicated probe inputs) has
exactly equal similarities.  Breaking such ties by row index would make X and Y pick "the same"
tied neighbors by accident of ordering, which inflates every kNN measure under independence.
Instead every row gets a priority key, drawn from a generator seeded per role (``"x"``: the
model side, ``"y"``: the reference side) and by a hash of the side's features (so the two
sides' keys pair up at random for each data set, as a permutation test needs), and exact ties
go to the lowest key.
Keys travel with their rows under a permutation, so neighbor lists stay permutation-equivariant
(``N_{Y[π]}(i) = π⁻¹(N_Y(π(i)))`` exactly, the fast null equals recomputation on ``Y[π]`` with
keys ``keys[π]``), and the two sides break ties independently.  Data without exact ties (any
continuous data) gets exactly the lists a plain top-k gives.

**Membership without n×n tables.**  "Is b a neighbor of a, and at which slot" is answered by a
:class:`SlotTable`: a perfect hash of each row's k neighbors (split into groups of 8–16 when
k >= 16) into about 2–4 buckets per neighbor (a multiplier per group is drawn until its
neighbors do not collide), so a look-up is a few gathers, memory is O(n·k) and the
per-permutation cost grows like n·k, whatever n is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from alignment_callback.functional._scaling import rescale_exactly

_BLOCK_ELEMENTS = 1 << 24  # similarity entries computed at a time: ~64 MB in float32
#: inner products of float32 (or narrower) rows are computed in float64 when the rows' mean
#: is longer than this many times their spread (root mean squared distance to the mean): a
#: float32 product then rounds away more of the rows' differences than the input holds
OFFSET_RATIO = 10.0
TIE_SEEDS = {"x": 20_240_521, "y": 20_240_522}  # one priority stream per side


_DIGEST_ELEMENTS = 1 << 20  # values hashed at a time (8 MB in float64)


def _digest(data: Tensor) -> int:
    """63 bits of a hash of ``data``'s values, in row order (any change of a value or of the
    row order changes it; ``-0.0`` counts as ``0.0``, an equal value).  The values are hashed
    as float64, a block of rows at a time: the same numbers in float32 and in float64 (one-hot
    rows, small integers) give the same hash, so they draw the same keys."""
    t = data.detach()
    h = hashlib.blake2b(repr(tuple(t.shape)).encode(), digest_size=8)
    if t.numel() == 0:
        return int.from_bytes(h.digest(), "little") >> 1
    rows = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    step = max(1, _DIGEST_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].to("cpu", torch.float64, copy=True)
        block.add_(0)  # -0.0 + 0 = +0.0, the other values as they are
        h.update(block.contiguous().view(torch.uint8).numpy())
    return int.from_bytes(h.digest(), "little") >> 1


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _signed(c: int) -> int:
    """The 64-bit constant ``c`` as the int64 of the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64's finalizer (Steele, Lea & Flood 2014): every input bit moves every output bit
_MIX = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _shift_right(z: Tensor, s: int) -> Tensor:
    """Logical shift of int64 bits (torch's ``>>`` copies the sign bit)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _row_hashes(bits: Tensor) -> Tensor:
    """A 64-bit hash of each row's bits: each word, offset by its column, goes through
    splitmix64's finalizer and the results are summed (wrapping around 2⁶⁴, so the same in any
    summation order).  A block of rows at a time: a few int64 copies of 2²¹ words (16 MB
    each), not of all n·d words."""
    d = bits.shape[1]
    offsets = torch.arange(1, d + 1, device=bits.device, dtype=torch.int64) * _GOLDEN
    parts = []
    for block in bits.split(max(1, (_BLOCK_ELEMENTS >> 3) // max(d, 1))):
        z = block.view(_INT_OF_SIZE[block.element_size()]).to(torch.int64) + offsets
        z = (z ^ _shift_right(z, 30)) * _MIX[0]
        z = (z ^ _shift_right(z, 27)) * _MIX[1]
        parts.append((z ^ _shift_right(z, 31)).sum(1))
    return torch.cat(parts)


def distinct_rows(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(distinct rows, index of each row's copy among them)``, or ``(x, None)`` when every row
    differs.  A hash of each row's bits in integer arithmetic (exact in any order, unlike a
    floating-point projection) settles the common case, distinct hashes, in O(n·d); the rows
    whose hash another row shares are compared exactly (``torch.unique`` over those rows only),
    and only when two rows are identical are all rows sorted (``torch.unique(dim=0)``, whose
    lexicographic order of the distinct rows is the one returned).  ``-0.0`` counts as
    ``0.0``."""
    n = x.shape[0]
    bits = (x + 0.0).contiguous()  # -0.0 + 0.0 = +0.0: equal values, equal bits
    hashes, inverse, counts = torch.unique(_row_hashes(bits), return_inverse=True,
                                           return_counts=True)
    if hashes.numel() == n:
        return x, None
    shared = (counts[inverse] > 1).nonzero().squeeze(1)  # rows whose hash is not their own
    if torch.unique(bits[shared], dim=0).shape[0] == shared.numel():
        return x, None  # hash collisions of different rows only
    distinct, copies = torch.unique(bits, dim=0, return_inverse=True)
    return distinct, copies


def tie_keys(n: int, role: str = "x", device: torch.device | str | None = None,
             data: Tensor | None = None) -> Tensor:
    """Tie-breaking priorities of n rows: a random permutation of ``0..n-1`` drawn from a
    generator seeded per role (``"x"`` or ``"y"``) and, given ``data`` (the side's (n, d)
    features), by a hash of it; the global RNG is untouched.

    Seeded by the data, the keys of the two sides pair up at random for each data set, as a
    permutation test needs: fixed streams pair the same keys for every data set of a size n,
    and on tied data that fixed pairing made the observed score atypical of its null (a
    false-positive rate of 0.6 at n = 27 on half-zero rows).  A permutation of the rows
    changes the hash, so ``mutual_knn(x, y[π])`` draws other keys than the null, which lets
    the keys travel with the rows (see :func:`knn`).

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional.neighbors import tie_keys
    >>> x = torch.eye(5)
    >>> bool((tie_keys(5, "x", data=x) == tie_keys(5, "x", data=x.clone())).all())
    True
    >>> sorted(tie_keys(5, "y", data=x).tolist())
    [0, 1, 2, 3, 4]
    """
    if role not in TIE_SEEDS:
        raise ValueError(f"role must be 'x' or 'y', got {role!r}")
    seed = TIE_SEEDS[role] if data is None else TIE_SEEDS[role] ^ _digest(data)
    keys = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return keys if device is None else keys.to(device)


def _offset_dominates(x: Tensor) -> bool:
    """Whether the rows of a float32 (or narrower) ``x`` share a component more than
    :data:`OFFSET_RATIO` times longer than their spread: ``‖m‖ > OFFSET_RATIO · s`` with ``m``
    the mean row and ``s² = mean_j ‖x_j − m‖²`` (in float64, a block of rows at a time)."""
    if x.dtype == torch.float64 or x.shape[0] < 2:
        return False
    blocks = x.split(max(1, _BLOCK_ELEMENTS // max(x.shape[1], 1)))
    mean = sum(b.double().sum(0) for b in blocks) / x.shape[0]
    spread = sum(float((b.double() - mean).square().sum()) for b in blocks) / x.shape[0]
    return float(mean.square().sum()) > OFFSET_RATIO**2 * spread


def knn(x: Tensor, k: int, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k neighbors of every row of ``x`` by inner product, self excluded.

    Parameters
    ----------
    x : Tensor of shape (n, d)
    k : int, the number of neighbors (``k < n``).
    keys : Tensor of shape (n,), default=None
        Tie-breaking priorities (lower wins an exact tie); ``None`` uses :func:`tie_keys` with
        role ``"x"``, seeded by ``x``.

    Returns
    -------
    (indices, values) : both (n, k), ordered by decreasing inner product (ties by key).
    Similarities are computed in row blocks (memory O(n·block), never n×n at once), after an
    exact power-of-two rescaling of ``x`` (see ``_scaling``), so magnitudes like 1e±30 work.
    Identical rows get bitwise identical similarities (a tie the keys break): with duplicated
    rows each block is multiplied by the distinct rows only and its columns gathered, since a
    matrix product may round a column by its position (seen on AMD EPYC, float64: two copies of
    a row an ulp apart, so rounding, not the keys, ordered them).

    Rows of float32 (or narrower) dtype that share a large component (their mean row more than
    :data:`OFFSET_RATIO` times longer than their spread: a transformer's massive activations,
    un-centered embeddings) are multiplied in float64, where products of float32 numbers are
    exact: a float32 product would round the inner products to ``eps·‖x‖²``, far coarser than
    the rows' differences that the input holds.  The values are returned in ``x``'s dtype.
    """
    n, data, dtype = x.shape[0], x, x.dtype  # default keys: seeded by x as given
    x = rescale_exactly(x)
    distinct, copies = distinct_rows(x)
    if _offset_dominates(x):
        x, distinct = x.double(), distinct.double()
    take = min(k + 1, n)  # one past the k-th shows a tie across the boundary
    # blocks of at least 2 rows: a one-row product is a matrix-vector product, which was seen
    # to round the similarities of identical float32 rows apart and so hide an exact tie (a
    # mitigation: matrix products of two or more rows kept them equal in every test)
    rows = max(2, min(n, _BLOCK_ELEMENTS // max(n, 1)))
    starts = list(range(0, n, rows))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()  # the last row joins the block before it
    priority: Tensor | None = None
    idx_parts, val_parts = [], []
    for start, stop in zip(starts, starts[1:] + [n]):
        g = x[start:stop] @ distinct.T
        if copies is not None:
            g = g[:, copies]  # the copies of a row: one computed column each
        ar = torch.arange(stop - start, device=x.device)
        g[ar, ar + start] = -torch.inf
        vals, idx = torch.topk(g, take, dim=1, largest=True, sorted=True)
        tied = (vals[:, 1:] == vals[:, :-1]).any(1)
        if bool(tied.any()):  # re-rank these rows exactly: similarity, then priority
            if priority is None:
                priority = torch.argsort((tie_keys(n, "x", data=data) if keys is None
                                          else keys).to(x.device))
            r = tied.nonzero().squeeze(1)
            sv, si = torch.sort(g[r][:, priority], dim=1, descending=True, stable=True)
            vals[r], idx[r] = sv[:, :take], priority[si[:, :take]]
        idx_parts.append(idx[:, :k])
        val_parts.append(vals[:, :k].to(dtype))
    return torch.cat(idx_parts), torch.cat(val_parts)


_HASH_BITS = 32
_HASH_MASK = (1 << _HASH_BITS) - 1
_GROUP_MULTIPLIER = 0x9E3779B1  # fixed odd multiplier of the first level (k >= 16)
_TRIES_PER_SIZE = 8  # failed draws of a group before its bucket count doubles


def _multiply_shift(b: Tensor, multiplier: Tensor | int, shift: Tensor | int) -> Tensor:
    """``((b · m) mod 2³²) >> shift``: multiply-shift hashing into ``2**(32 − shift)`` buckets."""
    return ((b * multiplier) & _HASH_MASK) >> shift


def _group_of(a: Tensor, b: Tensor, group_bits: int) -> Tensor:
    """Index of the group of row ``a`` that neighbor ``b`` falls in (``a`` itself if one)."""
    if not group_bits:
        return a
    return (a << group_bits) + _multiply_shift(b, _GROUP_MULTIPLIER, _HASH_BITS - group_bits)


@dataclass(frozen=True)
class SlotTable:
    """A two-level perfect hash of a kNN graph: is ``b ∈ N(a)``, and at which slot.

    Row a's neighbors are split into ``2**group_bits`` groups by a fixed hash of b (one group
    while k < 16); group v = (a, g) gets ``2**bits_v`` buckets, about 2–4 per neighbor, and an odd
    multiplier ``m_v`` drawn (from a fixed seed) until ``h_v(b) = ((b · m_v) mod 2³²) >>
    (32 − bits_v)`` puts its neighbors in distinct buckets (the bucket count doubles after a few
    failed draws).  An entry is ``b << slot_bits | slot`` (−1 when empty), int32 when it fits.
    A look-up is three gathers; memory is O(n·k) for every k.
    """

    params: Tensor  # (n · groups,) int64: multiplier | shift << 32
    offsets: Tensor  # (n · groups,) int64: first bucket of each group
    entries: Tensor  # (total buckets,) int32 or int64
    group_bits: int
    slot_bits: int

    def lookup(self, a: Tensor, b: Tensor) -> Tensor:
        """``slot + 1`` of ``b`` in ``N(a)`` (0 when ``b`` is not a neighbor of ``a``);
        ``a`` broadcasts against ``b`` (e.g. (B, n, 1) rows for (B, n, k) queries)."""
        v = _group_of(a, b, self.group_bits)
        p = self.params[v]
        bucket = _multiply_shift(b, p & _HASH_MASK, p >> _HASH_BITS)
        e = self.entries[self.offsets[v] + bucket].long()
        hit = (e >> self.slot_bits) == b
        return torch.where(hit, (e & ((1 << self.slot_bits) - 1)) + 1, torch.zeros_like(e))


def _bits_for(size: Tensor, per_key: int) -> Tensor:
    """``ceil(log2(per_key · size))`` (0 for empty groups)."""
    return (per_key * size).clamp_min(1).double().log2().ceil().long()


def slot_table(indices: Tensor) -> SlotTable:
    """Build the :class:`SlotTable` of (n, k) neighbor lists (deterministic)."""
    n, k = indices.shape
    slot_bits = 8 if k <= 1 << 8 and n < 1 << 23 else 16
    group_bits = max(0, (k // 8).bit_length() - 1)  # groups of 8–16 neighbors on average
    groups = n << group_bits
    if k > 1 << 16 or groups >= 1 << 31:
        raise ValueError(f"k={k}, n={n} is too large for the neighbor look-up table")
    cpu = indices.cpu().long()
    if k > 1 and bool((cpu.sort(1).values.diff(dim=1) == 0).any()):
        raise ValueError("neighbor lists must not repeat a neighbor within a row")
    b = cpu.reshape(-1)
    slot = torch.arange(k).repeat(n)
    v = _group_of(torch.arange(n).repeat_interleave(k), b, group_bits)
    size = torch.bincount(v, minlength=groups)
    bits = _bits_for(size, 2)
    multipliers = torch.ones(groups, dtype=torch.long)
    failures = torch.zeros(groups, dtype=torch.long)
    todo = size > 1  # a group of 0 or 1 neighbors never collides
    gen = torch.Generator().manual_seed(20_240_523)
    for _ in range(2000):
        if not bool(todo.any()):
            break
        multipliers[todo] = torch.randint(0, 1 << 30, (int(todo.sum()),), generator=gen) * 2 + 1
        keys = todo[v]
        kv = v[keys]
        h = _multiply_shift(b[keys], multipliers[kv], _HASH_BITS - bits[kv])
        code = torch.sort((kv << _HASH_BITS) | h).values
        todo = torch.zeros_like(todo)
        todo[code[1:][code[1:] == code[:-1]] >> _HASH_BITS] = True
        failures += todo
        bits += todo & (failures % _TRIES_PER_SIZE == 0)
    else:  # pragma: no cover - the bucket count doubles every few draws
        raise RuntimeError("could not build the neighbor look-up table")
    offsets = torch.cumsum(1 << bits, 0) - (1 << bits)
    h = _multiply_shift(b, multipliers[v], _HASH_BITS - bits[v])
    dtype = torch.int32 if slot_bits == 8 else torch.long
    entries = torch.full((int(offsets[-1] + (1 << bits[-1])),), -1, dtype=dtype)
    entries[offsets[v] + h] = ((b << slot_bits) | slot).to(dtype)
    params = multipliers | ((_HASH_BITS - bits) << _HASH_BITS)
    device = indices.device
    return SlotTable(params.to(device), offsets.to(device), entries.to(device), group_bits,
                     slot_bits)


@dataclass(frozen=True)
class NeighborLists:
    """Neighbor lists of one representation, prepared once and reused for every permutation.

    Attributes
    ----------
    indices : Tensor
        (n, k) neighbor indices, most similar first.
    values : Tensor
        (n, k) inner products ``⟨x_i, x_j⟩`` of those neighbors (of the exactly
        rescaled rows; scale-invariant measures only).
    reciprocal : Tensor
        (n, k) bool, ``i ∈ N(j)`` for ``j = indices[i, t]``.
    """

    indices: Tensor
    values: Tensor
    reciprocal: Tensor

    @cached_property
    def table(self) -> SlotTable:
        """The :class:`SlotTable` of ``indices``, built on first use (the batched torch path of
        the null looks neighbors up in it; the compiled kernels and the moments do not)."""
        return slot_table(self.indices)

    @property
    def n(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def prefix(self, k: int) -> "NeighborLists":
        """The lists of the k nearest neighbors (a prefix: the order is a total order)."""
        if k == self.k:
            return self
        return neighbor_lists_from(self.indices[:, :k].contiguous(), self.values[:, :k].contiguous())


def reciprocal_flags(indices: Tensor) -> Tensor:
    """(n, k) bool: ``i ∈ N(j)`` for ``j = indices[i, t]``, by binary search of the sorted edge
    codes ``i·n + j`` (O(n·k·log(n·k)), no table)."""
    n, k = indices.shape
    if n * k == 0:
        return torch.zeros(n, k, dtype=torch.bool, device=indices.device)
    src = torch.arange(n, device=indices.device).repeat_interleave(k)
    dst = indices.reshape(-1).long()
    codes = torch.sort(src * n + dst).values
    query = dst * n + src
    found = codes[torch.searchsorted(codes, query).clamp_max_(codes.numel() - 1)] == query
    return found.view(n, k)


def neighbor_lists_from(indices: Tensor, values: Tensor) -> NeighborLists:
    """:class:`NeighborLists` from (n, k) indices and values (computes ``reciprocal``; the
    look-up table is built when first used)."""
    return NeighborLists(indices, values, reciprocal_flags(indices))


def neighbor_lists(x: Tensor, k: int, role: str = "x") -> NeighborLists:
    """Exact k-nearest-neighbor lists of ``x`` (n, d), ties broken by the ``role``'s keys
    (seeded by ``x`` itself, see :func:`tie_keys`)."""
    indices, values = knn(x, k, tie_keys(x.shape[0], role, x.device, data=x))
    return neighbor_lists_from(indices, values)


def _lcs_dp(eq: Tensor) -> Tensor:
    """LCS lengths from ``eq`` (ka, kb, m): ``eq[s, t, r]`` = element s of a equals element t
    of b in row r."""
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
    """Levenshtein distances from ``eq`` (ka, kb, m), as :func:`_lcs_dp`."""
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


def _rows_last(eq: Tensor) -> Tensor:
    """(..., ka, kb) → (ka, kb, m) with the leading dimensions flattened last (contiguous DP)."""
    ka, kb = eq.shape[-2:]
    return eq.reshape(-1, ka, kb).permute(1, 2, 0).contiguous()


def lcs_from_matches(eq: Tensor) -> Tensor:
    """LCS length of every pair of sequences whose element equalities are ``eq`` (..., ka, kb)."""
    return _lcs_dp(_rows_last(eq)).view(eq.shape[:-2])


def levenshtein_from_matches(eq: Tensor) -> Tensor:
    """Levenshtein distance of every pair of sequences with equalities ``eq`` (..., ka, kb)."""
    return _levenshtein_dp(_rows_last(eq)).view(eq.shape[:-2])


def lcs_length(a: Tensor, b: Tensor) -> Tensor:
    """Longest-common-subsequence length of paired sequences ``a[..., :]`` and ``b[..., :]``."""
    return lcs_from_matches(a.unsqueeze(-1) == b.unsqueeze(-2))


def levenshtein(a: Tensor, b: Tensor) -> Tensor:
    """Levenshtein (edit) distance of paired sequences ``a[..., :]`` and ``b[..., :]``."""
    return levenshtein_from_matches(a.unsqueeze(-1) == b.unsqueeze(-2))
