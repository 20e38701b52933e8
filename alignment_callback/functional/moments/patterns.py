"""Set partitions, small multigraphs and their contractions: the private machinery of the
exact moments (``moments.exact`` has the math).

``E[T^r]`` (r ≤ 3) is a sum over the set partitions of the 2r index positions; each partition's
"at-least" sum is the contraction of a multigraph with r edges, which factors over its
connected components.  :func:`_program` builds, once per r and cached, the partitions, their
block counts, the Möbius rows and the canonical keys of the components; :func:`_all_keys`
lists every connected multigraph with ≤ 3 edges that the moments need.  :func:`_contract`
contracts one of them by leaf elimination (trees) or one trace (triangles) against a backend:
:class:`_DenseBackend` (any dense square matrix) or :class:`_KnnBackend` (the 0/1 adjacency
matrix of a kNN graph given as neighbor lists, O(n·k), triangles O(n·k²)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from itertools import permutations as _iter_permutations
from typing import Any

import torch
from torch import Tensor

_F64 = torch.float64

# ----------------------------------------------------------------------------------------------
# Combinatorics: set partitions, multigraphs, canonical keys (built once, cached)
# ----------------------------------------------------------------------------------------------

Edge = tuple[int, int]
Key = tuple[Edge, ...]


def _set_partitions(m: int) -> list[tuple[int, ...]]:
    """All set partitions of ``range(m)`` as restricted growth strings (Bell(m) of them)."""
    out: list[tuple[int, ...]] = []

    def rec(prefix: list[int], top: int) -> None:
        if len(prefix) == m:
            out.append(tuple(prefix))
            return
        for v in range(top + 2):
            prefix.append(v)
            rec(prefix, max(top, v))
            prefix.pop()

    rec([], -1)
    return out


def _normalize(labels: tuple[int, ...]) -> tuple[int, ...]:
    """Relabel blocks in order of first appearance (restricted growth string)."""
    seen: dict[int, int] = {}
    return tuple(seen.setdefault(v, len(seen)) for v in labels)


def _canonical(edges: list[Edge], directed: bool) -> Key:
    """Canonical form of a small connected multigraph (min over vertex relabelings)."""
    m = 1 + max(max(e) for e in edges)
    best: Key | None = None
    for perm in _iter_permutations(range(m)):
        if directed:
            cand = tuple(sorted((perm[u], perm[v]) for u, v in edges))
        else:
            cand = tuple(sorted(tuple(sorted((perm[u], perm[v]))) for u, v in edges))
        if best is None or cand < best:
            best = cand
    assert best is not None
    return best


def _components(labels: tuple[int, ...], r: int) -> list[list[Edge]]:
    """Connected components of the multigraph with edges ``labels[2t] → labels[2t+1]``."""
    parent = list(range(max(labels) + 1))

    def find(v: int) -> int:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    edges = [(labels[2 * t], labels[2 * t + 1]) for t in range(r)]
    for u, v in edges:
        parent[find(u)] = find(v)
    groups: dict[int, list[Edge]] = {}
    for u, v in edges:
        groups.setdefault(find(u), []).append((u, v))
    comps = []
    for comp in groups.values():
        verts = sorted({w for e in comp for w in e})
        relabel = {w: i for i, w in enumerate(verts)}
        comps.append([(relabel[u], relabel[v]) for u, v in comp])
    return comps


@dataclass(frozen=True)
class _Program:
    """Moment program for ``E[T^r]``: the partitions p of 2r positions, their block counts,
    the Möbius rows ``S(p) = Σ μ L(q)`` and the component keys of each at-least sum L(q)."""

    partitions: tuple[tuple[int, ...], ...]
    blocks: tuple[int, ...]
    mobius: tuple[tuple[tuple[int, int], ...], ...]
    keys_directed: tuple[tuple[Key, ...], ...]
    keys_undirected: tuple[tuple[Key, ...], ...]


@cache
def _program(r: int) -> _Program:
    parts = _set_partitions(2 * r)
    index = {p: i for i, p in enumerate(parts)}
    mobius = []
    for p in parts:
        b = max(p) + 1
        row = []
        for sigma in _set_partitions(b):
            q = _normalize(tuple(sigma[v] for v in p))
            mu = 1
            for blk in range(max(sigma) + 1):
                size = sigma.count(blk)
                mu *= (-1) ** (size - 1) * math.factorial(size - 1)
            row.append((index[q], mu))
        mobius.append(tuple(row))
    kd, ku = [], []
    for q in parts:
        comps = _components(q, r)
        kd.append(tuple(_canonical(c, True) for c in comps))
        ku.append(tuple(_canonical(c, False) for c in comps))
    return _Program(tuple(parts), tuple(max(p) + 1 for p in parts), tuple(mobius),
                    tuple(kd), tuple(ku))


@cache
def _all_keys(directed: bool) -> tuple[Key, ...]:
    """Every connected-component key that the moments up to order 3 need."""
    keys: set[Key] = set()
    for r in (1, 2, 3):
        prog = _program(r)
        for ks in (prog.keys_directed if directed else prog.keys_undirected):
            keys.update(ks)
    return tuple(sorted(keys))


def _has_loop(key: Key) -> bool:
    return any(u == v for u, v in key)


# Undirected invariants of a symmetric matrix: representative multigraph -> field name.
# d = diag, r = row sums, q = row sums of A∘A.  "trace" and "total" are 0 for A₀.
_SYMMETRIC_GRAPHS: dict[str, list[Edge]] = {
    "trace": [(0, 0)],
    "total": [(0, 1)],
    "diag_sq": [(0, 0), (0, 0)],                      # Σ d_i²
    "frob_sq": [(0, 1), (0, 1)],                      # Σ A_ij²
    "diag_rowsum": [(0, 0), (0, 1)],                  # Σ d_i r_i
    "rowsum_sq": [(0, 1), (1, 2)],                    # Σ r_i²
    "diag_cube": [(0, 0), (0, 0), (0, 0)],            # Σ d_i³
    "cube": [(0, 1), (0, 1), (0, 1)],                 # Σ A_ij³
    "diag_frob": [(0, 0), (0, 1), (0, 1)],            # Σ d_i q_i
    "diag_quad": [(0, 0), (0, 1), (1, 1)],            # dᵀ A d
    "trace_cube": [(0, 1), (1, 2), (2, 0)],           # tr A³
    "diag_sq_rowsum": [(0, 0), (0, 0), (0, 1)],       # Σ d_i² r_i
    "diag_a_rowsum": [(0, 0), (0, 1), (1, 2)],        # dᵀ A r
    "diag_rowsum_sq": [(1, 1), (0, 1), (1, 2)],       # Σ d_i r_i²
    "sq_rowsum": [(0, 1), (0, 1), (1, 2)],            # Σ q_i r_i
    "rowsum_quad": [(0, 1), (1, 2), (2, 3)],          # rᵀ A r
    "rowsum_cube": [(0, 1), (0, 2), (0, 3)],          # Σ r_i³
}
_SYMMETRIC_FIELD: dict[Key, str] = {
    _canonical(g, False): name for name, g in _SYMMETRIC_GRAPHS.items()
}

# ----------------------------------------------------------------------------------------------
# Generic contraction of a small multigraph (dense matrices and sparse kNN graphs)
# ----------------------------------------------------------------------------------------------

_ZERO = object()  # a vertex weight that is identically zero


def _contract(key: Key, backend: Any) -> float:
    """``Σ_{v_0..v_{m−1}} Π_{(u,v) ∈ key} A[v_u, v_v]`` for a connected multigraph.

    Loops become vertex weights ``diag(A)^l``; parallel edges between u and v become the
    entrywise product ``E_uv = A_uv^p A_vu^q``.  With ≤ 3 edges the simple graph is a tree
    (leaves eliminated by matrix-vector products) or a triangle (one trace of a product).
    """
    m = 1 + max(max(e) for e in key)
    loops = [0] * m
    mult: dict[tuple[int, int], list[int]] = {}
    for u, v in key:
        if u == v:
            loops[u] += 1
        else:
            pq = mult.setdefault((min(u, v), max(u, v)), [0, 0])
            pq[0 if u < v else 1] += 1

    def oriented(u: int, v: int) -> Any:  # E with E[u-index, v-index]
        p, q = mult[(min(u, v), max(u, v))]
        return backend.edge(p, q) if u < v else backend.edge(q, p)

    if len(mult) == m - 1:  # tree
        weights = [backend.diag_power(l) for l in loops]
        if any(w is _ZERO for w in weights):
            return 0.0
        nbrs: dict[int, set[int]] = {v: set() for v in range(m)}
        for u, v in mult:
            nbrs[u].add(v)
            nbrs[v].add(u)
        alive = set(range(m))
        while len(alive) > 1:
            leaf = min(v for v in alive if len(nbrs[v]) == 1)
            (u,) = nbrs[leaf]
            msg = backend.matvec(oriented(u, leaf), weights[leaf])
            weights[u] = msg if weights[u] is None else weights[u] * msg
            alive.discard(leaf)
            nbrs[u].discard(leaf)
        (root,) = alive
        return float(backend.total(weights[root]))
    if m == 3 and len(mult) == 3 and not any(loops):
        return float(backend.tri(oriented(0, 1), oriented(1, 2), oriented(2, 0)))
    raise AssertionError(f"unexpected multigraph {key}")  # pragma: no cover


class _DenseBackend:
    """Contractions of a dense float64 matrix (any square matrix)."""

    def __init__(self, a: Tensor) -> None:
        self.a = a
        self.diag = torch.diagonal(a).clone()
        self._edges: dict[tuple[int, int], Tensor] = {}

    def diag_power(self, l: int) -> Tensor | None:
        return None if l == 0 else self.diag ** l

    def edge(self, p: int, q: int) -> Tensor:
        if (p, q) not in self._edges:
            e = self.a ** p if p else None
            if q:
                e = self.a.T ** q if e is None else e * self.a.T ** q
            self._edges[(p, q)] = e
        return self._edges[(p, q)]

    def matvec(self, e: Tensor, w: Tensor | None) -> Tensor:
        return e.sum(1) if w is None else e @ w

    def total(self, w: Tensor) -> Tensor:
        return w.sum()

    def tri(self, e1: Tensor, e2: Tensor, e3: Tensor) -> Tensor:
        return torch.dot((e1 @ e2).reshape(-1), e3.T.reshape(-1))


class _KnnBackend:
    """Contractions of the 0/1 adjacency matrix M of a directed kNN graph (zero diagonal),
    given as neighbor lists; entrywise products are M, Mᵀ or R = M∘Mᵀ (reciprocal pairs)."""

    def __init__(self, indices: Tensor, chunk: int = 1 << 22) -> None:
        n, k = indices.shape
        self.n, self.k, self.chunk = n, k, chunk
        self.indices = indices
        self.src = torch.arange(n, device=indices.device).repeat_interleave(k)
        self.dst = indices.reshape(-1)
        self.keys = torch.sort(self.src * n + self.dst).values
        self.rec = self.member(self.dst * n + self.src)  # (n·k,) reciprocal flags

    def member(self, q: Tensor) -> Tensor:
        pos = torch.searchsorted(self.keys, q).clamp_max_(self.keys.numel() - 1)
        return self.keys[pos] == q

    def diag_power(self, l: int) -> Any:
        return None if l == 0 else _ZERO

    def edge(self, p: int, q: int) -> str:
        return "R" if p and q else ("M" if p else "T")

    def matvec(self, kind: str, w: Tensor | None) -> Tensor:
        src, dst = (self.dst, self.src) if kind == "T" else (self.src, self.dst)
        vals = torch.ones(src.numel(), dtype=_F64, device=src.device) if w is None else w[dst]
        if kind == "R":
            vals = vals * self.rec.to(_F64)
        return torch.zeros(self.n, dtype=_F64, device=src.device).index_add_(0, src, vals)

    def total(self, w: Tensor) -> Tensor:
        return w.sum()

    def tri(self, e1: str, e2: str, e3: str) -> Tensor:
        """``Σ_abc E1_ab E2_bc E3_ca`` by enumerating the 2-paths b→c→a of E2, E3 ∈ {M, R}
        (out-degree ≤ k, so ≤ n·k² paths) after a rotation / transposition of the trace.

        Paths are processed for a block of start vertices b at a time, with a dense boolean
        table of E1's column block ``E1[:, b]`` (≤ 64 MB) for O(1) look-ups.
        """
        flip = {"M": "T", "T": "M", "R": "R"}
        cands = []
        for t in ((e1, e2, e3), (flip[e3], flip[e2], flip[e1])):
            for s in range(3):
                cands.append(t[s:] + t[:s])
        e1, e2, e3 = next(c for c in cands if c[1] != "T" and c[2] != "T")
        n, k = self.n, self.k
        dev = self.indices.device
        by_dst = torch.argsort(self.dst, stable=True)
        dst_sorted = self.dst[by_dst]
        rec = self.rec.view(n, k)
        block = max(1, min(n, (1 << 26) // n, max(1, self.chunk // (k * k))))
        # reused tables, cleared entry by entry (no n×block memset per block)
        t_in = torch.zeros(block, n, dtype=torch.bool, device=dev) if e1 != "T" else None
        t_out = torch.zeros(block, n, dtype=torch.bool, device=dev) if e1 != "M" else None
        total = 0
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            marks = []
            if t_in is not None:  # t_in[b - b0, a] = M[a, b]: in-edges a → b
                lo, hi = torch.searchsorted(dst_sorted, torch.tensor([b0, b1], device=dev)).tolist()
                sel = by_dst[lo:hi]
                marks.append((t_in, self.dst[sel] - b0, self.src[sel]))
            if t_out is not None:  # t_out[b - b0, a] = M[b, a]: out-edges b → a
                marks.append((t_out, self.src[b0 * k:b1 * k] - b0, self.dst[b0 * k:b1 * k]))
            for tab, r, col in marks:
                tab[r, col] = True
            b = self.src[b0 * k:b1 * k]
            c = self.dst[b0 * k:b1 * k]
            if e2 == "R":
                keep = self.rec[b0 * k:b1 * k]
                b, c = b[keep], c[keep]
            a = self.indices[c]  # (m, k): c → a
            rows = (b - b0)[:, None]
            if e1 == "M":
                hit = t_in[rows, a]
            elif e1 == "T":
                hit = t_out[rows, a]
            else:
                hit = t_in[rows, a] & t_out[rows, a]
            if e3 == "R":
                hit &= rec[c]
            total += int(hit.sum())
            for tab, r, col in marks:
                tab[r, col] = False
        return torch.tensor(float(total), dtype=_F64)
