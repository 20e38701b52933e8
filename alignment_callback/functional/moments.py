"""Analytic permutation nulls: exact moments of ``T(π) = Σ_ij A_ij B_π(i)π(j)``.

Every gram-family measure (linear / RBF / unbiased CKA, RSA) is a cosine
``s = ⟨A, B⟩ / (‖A‖_F ‖B‖_F)`` of two n×n matrices, and mutual kNN is ``T/(n·k)`` with the 0/1
adjacency matrices of the kNN graphs.  Shuffling Y's rows by a uniformly random permutation π
gives the quadratic-assignment statistic ``T(π) = Σ_ij A_ij B_π(i)π(j)``; this module computes
its exact mean, variance and skewness (no sampling) and turns them into p-values and
thresholds with a moment-matched Pearson type III distribution.

Math
----
For r = 1, 2, 3, ``E[T^r] = Σ_p S_A(p) S_B(p) / (n)_|p|``, summed over the set partitions p of
the 2r index positions ``(i1, j1, …, ir, jr)``: ``S_M(p)`` is the sum of ``Π_t M[i_t, j_t]``
over the index tuples whose equality pattern is exactly p, and ``(n)_m = n(n−1)…(n−m+1)``
(the images of |p| distinct indices under a uniform permutation are a uniform tuple of
distinct indices).  Exact-pattern sums come from "at-least" sums (indices merged by p,
otherwise free) by Möbius inversion on the partition lattice,
``S(p) = Σ_{q ≥ p} μ(p, q) L(q)``, ``μ(p, q) = Π_{blocks of q} (−1)^{b−1} (b−1)!``.  An
at-least sum is the contraction of a multigraph with r ≤ 3 edges (vertex = block, edge t =
``i_t → j_t``) and factors over its connected components, so everything reduces to a few
per-matrix *invariants* (contractions of connected multigraphs with ≤ 3 edges), computed once
per representation; the moments of a pair are then an O(1) combination (Bell(6) = 203
patterns).  This is the exact-moment approach of Kazi-Aoual et al. (1995) for the RV
coefficient, written for arbitrary (also non-symmetric) matrices.

Cancellation is avoided by splitting off the permutation-invariant part first:
``A = A₀ + α I + β (J − I)`` with ``α = tr A / n`` and β the mean off-diagonal entry, so that
``T(π) = nα_Aα_B + n(n−1)β_Aβ_B + ⟨A₀, B₀^π⟩`` where the last term has mean 0.  Invariants
are those of A₀ (zero trace, zero total), in float64, and the moment combination uses
``math.fsum`` on the expanded products.

Invariants of a symmetric A₀ (d = diag A₀, r = row sums, q = row sums of A₀∘A₀), 15 numbers:
``Σd², ‖A₀‖², Σdr, Σr², Σd³, Σ_ij A₀_ij³, Σ d_i q_i, dᵀA₀d, tr A₀³, Σd²r, dᵀA₀r, Σdr²,
Σqr, rᵀA₀r, Σr³``; when the row sums vanish (every centered gram) only the first two, Σd³,
ΣA₀³, Σdq, dᵀA₀d and tr A₀³ are non-zero.  Cost: O(n²) plus one n×n matmul (tr A₀³).  From
column-centered features (A = XXᵀ) they cost O(n·d²) plus O(n·d³) for
``Σ_ij (x_iᵀx_j)³ = ‖Σ_i x_i⊗x_i⊗x_i‖²`` (or O(n²·d) blocked when that is cheaper), in
O(n·d + d²) memory.  A kNN graph given by (n, k) neighbor lists costs O(n·k) (O(n·k²) for
the triangle counts).

References
----------
* Kazi-Aoual, F., Hitier, S., Sabatier, R., Lebreton, J.-D. (1995).  Refined approximations
  to permutation tests for multivariate inference.  Computational Statistics & Data
  Analysis 20(6), 643–656.
* Josse, J., Pagès, J., Husson, F. (2008).  Testing the significance of the RV coefficient.
  Computational Statistics & Data Analysis 53(1), 82–91.
* Winkler, A. M., Ridgway, G. R., Douaud, G., Nichols, T. E., Smith, S. M. (2016).  Faster
  permutation inference in brain imaging.  NeuroImage 141, 502–516 (moment-matched gamma /
  Pearson III tails for permutation tests).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from itertools import permutations as _iter_permutations
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PEARSON3_MAX_ABS_SKEW",
    "PEARSON3_MAX_LEVERAGE",
    "PEARSON3_MIN_N",
    "GramInvariants",
    "GraphInvariants",
    "PermutationMoments",
    "cknna_mean",
    "cosine_moments",
    "cycle_knn_mean",
    "feature_invariants",
    "feature_linear_cka",
    "gram_invariants",
    "knn_graph_invariants",
    "matrix_invariants",
    "mutual_knn_moments",
    "pair_leverage",
    "pearson3_null",
    "pearson3_quantile",
    "pearson3_sf",
    "pearson3_valid",
    "permutation_moments",
]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps

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
    """Mean, variance and skewness ``E[(T−μ)³]/σ³`` of a permutation distribution."""

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


# ----------------------------------------------------------------------------------------------
# Invariants
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
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name} contains NaN/Inf values")


def gram_invariants(a: Tensor) -> GramInvariants:
    """Permutation invariants of a symmetric n×n matrix (for :func:`permutation_moments`).

    Works for any symmetric matrix (doubly-centered or U-centered grams, RSA's centered rank
    matrix with non-zero row sums, ...).  The matrix is split as
    ``A = A₀ + αI + β(J − I)`` and the 15 contractions of A₀ listed in
    :class:`GramInvariants` are computed in float64; when the row sums of A₀ vanish to rounding
    (every doubly-centered gram) the row-sum terms are set to exactly 0 and skipped.

    Cost: O(n²) time plus one n×n matmul (``tr A₀³``); a few n×n float64 temporaries.

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
    a64 = a.to(_F64)
    asym = float((a64 - a64.T).abs().max())
    scale = float(a64.abs().max())
    tol = 10 * math.sqrt(torch.finfo(a.dtype).eps) if a.is_floating_point() else 0.0
    if asym > tol * max(scale, 1e-300):
        raise ValueError("gram_invariants needs a symmetric matrix; use matrix_invariants")
    a64 = 0.5 * (a64 + a64.T)
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
        "trace_cube": float(torch.dot((a0 @ a0).reshape(-1), flat)),
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
        ``NeighborState.indices``.

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


def _centered_features(xc: Tensor) -> Tensor:
    if not isinstance(xc, Tensor) or xc.dim() != 2:
        raise ValueError(f"features must be a 2-D (n, d) tensor, got {getattr(xc, 'shape', xc)}")
    if xc.shape[0] < 2 or xc.shape[1] < 1:
        raise ValueError(f"features need n >= 2 rows and d >= 1 columns, got {tuple(xc.shape)}")
    if not bool(torch.isfinite(xc).all()):
        raise ValueError("features contain NaN/Inf values")
    x = xc.to(_F64, copy=True)
    return x.sub_(x.mean(0, keepdim=True))


def _cube_sum_tensor(x: Tensor, block_rows: int, tile: int = 16) -> float:
    """``Σ_ij (x_iᵀx_j)³ = ‖M‖²`` with ``M_abc = Σ_i x_ia x_ib x_ic`` (symmetric 3-tensor).

    Only tiles with ``a ≤ b ≤ c`` are formed — for an a-tile and a b-tile (b ≥ a), the
    products ``x_ia x_ib`` of a block of rows times ``x[:, b0:]`` — and each entry is weighted
    by its number of distinct orderings (6, 3 or 1): ≈ n·d³/3 flops, memory
    O(tile²·d + block_rows·tile²).
    """
    n, d = x.shape
    idx = torch.arange(d, device=x.device)
    orderings = torch.tensor([6.0, 3.0, 1.0], dtype=_F64, device=x.device)
    parts = []
    for a0 in range(0, d, tile):
        a1 = min(d, a0 + tile)
        for b0 in range(a0, d, tile):
            b1 = min(d, b0 + tile)
            acc = torch.zeros((a1 - a0) * (b1 - b0), d - b0, dtype=_F64, device=x.device)
            for s in range(0, n, block_rows):
                xr = x[s:s + block_rows]
                z = (xr[:, a0:a1, None] * xr[:, None, b0:b1]).reshape(xr.shape[0], -1)
                acc.addmm_(z.T, xr[:, b0:])
            ai, bi, ci = idx[a0:a1, None, None], idx[None, b0:b1, None], idx[None, None, b0:]
            equal = (ai == bi).long() + (bi == ci).long()  # orderings: 6, 3, 1
            weight = orderings[equal] * ((ai <= bi) & (bi <= ci))
            parts.append(float(torch.dot(weight.reshape(-1), (acc * acc).reshape(-1))))
    return math.fsum(parts)


def _cube_sum_gram(x: Tensor, block_rows: int) -> float:
    """``Σ_ij (x_iᵀx_j)³`` from row blocks of the gram (O(n²·d) time, O(block·n) memory)."""
    parts = []
    for s in range(0, x.shape[0], block_rows):
        g = x[s:s + block_rows] @ x.T
        parts.append(float(torch.dot(g.reshape(-1), (g * g).reshape(-1))))
    return math.fsum(parts)


def feature_invariants(xc: Tensor, block_rows: int = 1024) -> GramInvariants:
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

    Cost O(n·d²) plus S₃: O(n·d³/3) through the a ≤ b ≤ c entries of the symmetric 3-tensor
    ``Σ_i x_i⊗x_i⊗x_i``, or O(n²·d) from row blocks of the gram when ``n < d²/3`` (whichever
    is cheaper); memory O(n·d + d² + block_rows·(n + 256)), dominated by the float64 copy of
    X.  If d >= n the gram route is no dearer than O(n·d²) and is used for everything
    (``gram_invariants(X Xᵀ)``).  Measured: n = 100,000, d = 256 (float32 input) in 15 s on
    one CPU thread, peak RSS 545 MB (``benchmarks/check_moments.py --only memory``).

    Parameters
    ----------
    xc : Tensor
        (n, d) features; re-centered per column in float64 (idempotent for centered input).
    block_rows : int, default=1024
        Rows processed at a time (memory O(block_rows·(n + 256)) in the S₃ term).

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
    c_mat = x.T @ x
    a = torch.cat([x[s:s + block_rows].pow(2).sum(1) for s in range(0, n, block_rows)])
    alpha = float(a.mean())
    b = alpha / (n - 1)
    c = alpha + b
    delta = a - alpha
    frob_c = float((c_mat * c_mat).sum())
    xcx = torch.cat([((x[s:s + block_rows] @ c_mat) * x[s:s + block_rows]).sum(1)
                     for s in range(0, n, block_rows)])
    d2, d3 = float(delta @ delta), float((delta ** 3).sum())
    sum_a2, sum_a3 = float(a @ a), float((a ** 3).sum())
    q = delta * delta + (xcx - a * a) - 2.0 * b * a + (n - 1) * b * b
    xtd = x.T @ delta
    sum_delta = float(delta.sum())
    if n < dim * dim / 3:
        s3 = _cube_sum_gram(x, block_rows)
    else:
        s3 = _cube_sum_tensor(x, block_rows)
    tr_c, tr_c3 = float(c_mat.diagonal().sum()), float(torch.dot((c_mat @ c_mat).reshape(-1),
                                                                 c_mat.reshape(-1)))
    tr_g3 = math.fsum([tr_c3, -3 * c * frob_c, 3 * c * c * tr_c, -c ** 3 * n])
    return GramInvariants(
        n=n,
        norm=math.sqrt(frob_c),
        diag_mean=alpha,
        offdiag_mean=-b,
        diag_sq=d2,
        frob_sq=frob_c - n * n * alpha * alpha / (n - 1),
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


def feature_linear_cka(xc: Tensor, yc: Tensor) -> Tensor:
    """Raw linear CKA in feature space, ``‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` on column-centered
    features (re-centered in float64), O(n·(d_x + d_y)²) (through the n×n grams when
    n <= d_x + d_y, which is then cheaper); a float64 0-dim tensor.

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
    if x.shape[0] <= x.shape[1] + y.shape[1]:  # wide features: the n×n grams are cheaper
        k, l = x @ x.T, y @ y.T
        return torch.dot(k.reshape(-1), l.reshape(-1)) / (k.norm() * l.norm())
    return (x.T @ y).pow(2).sum() / ((x.T @ x).norm() * (y.T @ y).norm())


# ----------------------------------------------------------------------------------------------
# Moments
# ----------------------------------------------------------------------------------------------


def _sum(terms: list, exact: bool = False) -> Any:
    """Exactly rounded float sum (``math.fsum``), or the exact sum of ``Fraction`` terms."""
    return sum(terms, Fraction(0)) if exact else math.fsum(terms)


def _pattern_sums(inv: Invariants, r: int, directed: bool) -> list:
    """Exact-pattern sums ``S(p)`` for the partitions of 2r positions (cached per object)."""
    cache_key = (r, directed)
    if cache_key not in inv._cache:
        prog = _program(r)
        keys = prog.keys_directed if directed else prog.keys_undirected
        exact = isinstance(inv.norm, Fraction)
        at_least = []
        for ks in keys:
            v = 1
            for key in ks:
                v = v * inv.value(key, directed)
                if v == 0:
                    break
            at_least.append(v)
        sums = []
        for row in prog.mobius:
            terms = [mu * at_least[q] for q, mu in row if at_least[q] != 0]
            sums.append(_sum(terms, exact) if terms else 0.0)
        inv._cache[cache_key] = sums
    return inv._cache[cache_key]


def _falling(n: int, m: int) -> int:
    out = 1
    for t in range(m):
        out *= n - t
    return out


def _raw_terms(inv_a: Invariants, inv_b: Invariants, n: int, r: int, directed: bool) -> list:
    prog = _program(r)
    sa = _pattern_sums(inv_a, r, directed)
    sb = _pattern_sums(inv_b, r, directed)
    exact = isinstance(inv_a.norm, Fraction) and isinstance(inv_b.norm, Fraction)
    out = []
    for p, m in enumerate(prog.blocks):
        if m > n or sa[p] == 0 or sb[p] == 0:
            continue
        ff = _falling(n, m)
        out.append(sa[p] * sb[p] / (Fraction(ff) if exact else float(ff)))
    return out


def permutation_moments(inv_a: Invariants, inv_b: Invariants, n: int | None = None
                        ) -> PermutationMoments:
    """Exact mean, variance and skewness of ``T(π) = Σ_ij A_ij B_π(i)π(j)`` over all n!
    permutations π (uniform), from the invariants of A and B.

    ``E[T^r] = Σ_p S_A(p) S_B(p) / (n)_|p|`` over the set partitions p of the 2r index
    positions (r ≤ 3), see the module docstring; the invariant part
    ``nα_Aα_B + n(n−1)β_Aβ_B`` of T is added to the mean.  Central moments are formed with
    ``math.fsum`` over the expanded products.  O(1) given the invariants (the pattern sums of
    each invariants object are cached on it, so a frozen reference pays once).

    Parameters
    ----------
    inv_a, inv_b : GramInvariants or GraphInvariants
        From :func:`gram_invariants`, :func:`feature_invariants`, :func:`matrix_invariants`
        or :func:`knn_graph_invariants`.
    n : int, optional, default=None
        Number of samples (checked against the invariants when given).

    Returns
    -------
    PermutationMoments
        ``mean``, ``variance`` and ``skewness`` of T (skewness 0 when the variance is 0).

    Example
    -------
    >>> import itertools, torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(5, 5, generator=g, dtype=torch.float64); a = a + a.T
    >>> b = torch.randn(5, 5, generator=g, dtype=torch.float64); b = b + b.T
    >>> t = torch.stack([(a * b[list(p)][:, list(p)]).sum()
    ...                  for p in itertools.permutations(range(5))])
    >>> m = permutation_moments(gram_invariants(a), gram_invariants(b))
    >>> c = t - t.mean()
    >>> exhaustive = [t.mean(), c.pow(2).mean(), c.pow(3).mean() / c.pow(2).mean() ** 1.5]
    >>> [round(float(v), 8) for v in exhaustive] == [round(v, 8) for v in
    ...                                              (m.mean, m.variance, m.skewness)]
    True
    """
    if inv_a.n != inv_b.n or (n is not None and n != inv_a.n):
        raise ValueError(f"sample counts differ: {inv_a.n}, {inv_b.n}, n={n}")
    n = inv_a.n
    directed = not (inv_a.symmetric and inv_b.symmetric)
    exact = isinstance(inv_a.norm, Fraction) and isinstance(inv_b.norm, Fraction)
    t1 = _raw_terms(inv_a, inv_b, n, 1, directed)
    t2 = _raw_terms(inv_a, inv_b, n, 2, directed)
    t3 = _raw_terms(inv_a, inv_b, n, 3, directed)
    m1 = _sum(t1, exact) if t1 else 0.0
    var = _sum(t2 + [-x * y for x in t1 for y in t1], exact) if t2 else 0.0
    mu3 = _sum(t3 + [-3 * x * y for x in t1 for y in t2]
               + [2 * x * y * z for x in t1 for y in t1 for z in t1], exact) if t3 else 0.0
    shift = 0.0
    if inv_a.centered or inv_b.centered:
        shift = (n * inv_a.diag_mean * inv_b.diag_mean
                 + n * (n - 1) * inv_a.offdiag_mean * inv_b.offdiag_mean)
    var_f = max(float(var), 0.0)
    # a null with std below 1e-12 of the cosine's scale is a point mass (e.g. a
    # permutation-invariant matrix); its skewness would be rounding noise
    floor = (1e-12 * float(inv_a.norm) * float(inv_b.norm)) ** 2
    skew = float(mu3) / var_f ** 1.5 if var_f > floor else 0.0
    return PermutationMoments(float(m1) + float(shift), var_f, skew)


def cosine_moments(inv_a: Invariants, inv_b: Invariants) -> PermutationMoments:
    """Moments of the permuted cosine ``s(π) = T(π) / (‖A‖_F ‖B‖_F)``: the null of linear /
    RBF / unbiased CKA and RSA (and of mutual kNN for kNN graphs with equal k).

    Example
    -------
    >>> import torch
    >>> from alignment_callback.functional.kernels import center_gram
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = (torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in range(2))
    >>> m = cosine_moments(gram_invariants(center_gram(x @ x.T)),
    ...                    gram_invariants(center_gram(y @ y.T)))
    >>> 0 < m.mean < 1 and m.std > 0
    True
    """
    return permutation_moments(inv_a, inv_b).scaled(1.0 / (inv_a.norm * inv_b.norm))


def pair_leverage(inv_a: GramInvariants, inv_b: GramInvariants) -> float:
    """``λ = n · (max_i q^A_i / ‖A₀‖²) · (max_j q^B_j / ‖B₀‖²)`` with q the row energies of the
    centered parts: roughly the share of Var T contributed by the single rare event
    "the heaviest row of A is matched to the heaviest row of B" (probability 1/n).  About
    1/n for homogeneous rows; large when both representations have outlying samples (e.g.
    heavy-tailed features), where the null is a mixture that three moments cannot describe.

    Example
    -------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = (torch.randn(100, 10, generator=g, dtype=torch.float64) for _ in range(2))
    >>> pair_leverage(feature_invariants(x), feature_invariants(y)) < 0.1
    True
    >>> x[0] *= 30; y[0] *= 30  # one outlying sample on each side
    >>> pair_leverage(feature_invariants(x), feature_invariants(y)) > 10
    True
    """
    if inv_a.frob_sq <= 0 or inv_b.frob_sq <= 0:
        return 0.0
    return inv_a.n * (inv_a.max_row_sq / inv_a.frob_sq) * (inv_b.max_row_sq / inv_b.frob_sq)


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
    ``knn_measures.cknna_score``).

    With ``P = K∘M_K``, ``Q = L∘M_L`` the numerator's three parts are permutation statistics
    of order ≤ 2: ``tr(ÃB̃) = Σ (P∘M_Kᵀ)_ij (Q∘M_Lᵀ)_π(i)π(j)`` (mean: product of totals over
    n(n−1)), ``1ᵀÃ1·1ᵀB̃1 = T(P, M_L)·T(M_K, Q)`` and ``1ᵀÃB̃1 = Σ_ijl P_ij M_L,π(i)π(j)
    M_K,jl Q_π(j)π(l)``, whose means are ``Σ_p S(p) S'(p)/(n)_|p|`` over the partitions of
    four positions (two labelled edges; for the last one only those with j = k).  O(n·k).

    Parameters
    ----------
    indices_x, values_x : Tensor
        (n, k) neighbor indices of X and their inner products ``⟨x_i, x_j⟩``
        (``NeighborState.indices`` / ``.values``); likewise for Y.
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


# ----------------------------------------------------------------------------------------------
# Pearson type III
# ----------------------------------------------------------------------------------------------

# below: Wilson–Hilferty form of the gamma (shape 4/γ² > 1e6; its error there is < 5e-9, while
# torch's igamma loses up to 1e-6 near z ≈ −4.5 for shapes ~1e8), smooth to the normal
_WH_SKEW = 2e-3
_NORMAL_SKEW = 1e-12  # below: the normal distribution itself

#: Validity rule for the Pearson III p-value (measured in benchmarks/check_moments.py, sections
#: ``validity`` and ``pvalues``): n >= PEARSON3_MIN_N ...
PEARSON3_MIN_N = 32
#: ... and |skewness| <= PEARSON3_MAX_ABS_SKEW ...
PEARSON3_MAX_ABS_SKEW = 1.5
#: ... and pair_leverage <= PEARSON3_MAX_LEVERAGE.
PEARSON3_MAX_LEVERAGE = 0.5


def pearson3_valid(n: int, skewness: Any, leverage: Any = 0.0) -> Any:
    """Whether the moment-matched Pearson III p-value is trusted (for ``null="auto"``):
    ``n >= 32``, ``|skewness| <= 1.5`` and ``leverage <= 0.5`` (:func:`pair_leverage`).

    Measured on linear / RBF / unbiased CKA and RSA with Gaussian, Student-t₃ and
    low-rank-plus-noise data, d/n ∈ {0.1, 1, 8}, n = 8..256 (``benchmarks/check_moments.py``):
    inside the rule the P3 tail is within ~0.01 (the Monte-Carlo noise of a K = 20,000
    reference) of the permutation p-value for p ∈ [0.005, 0.5]; outside it errors reach 0.05
    (n < 32, or skew ≈ 2 with low-rank data) and 0.25 (heavy tails: an outlying sample in both
    representations makes the null a mixture, flagged by the leverage).  Floats or tensors.

    Parameters
    ----------
    n : int
        Number of samples.
    skewness : float or Tensor
        Skewness of the null (:class:`PermutationMoments`).
    leverage : float or Tensor, default=0.0
        :func:`pair_leverage` of the two representations (0 when unknown, which skips that
        part of the rule — pass it for gram measures).
    """
    if isinstance(skewness, Tensor) or isinstance(leverage, Tensor):
        skewness, leverage = _as64(skewness, leverage)
        return (skewness.abs() <= PEARSON3_MAX_ABS_SKEW) & (leverage <= PEARSON3_MAX_LEVERAGE) & (
            n >= PEARSON3_MIN_N)
    return (n >= PEARSON3_MIN_N and abs(skewness) <= PEARSON3_MAX_ABS_SKEW
            and leverage <= PEARSON3_MAX_LEVERAGE)


def _as64(*xs: Any) -> list[Tensor]:
    ts = [torch.as_tensor(x, dtype=_F64) for x in xs]
    return list(torch.broadcast_tensors(*ts))


def _wh(z: Tensor, g: Tensor) -> Tensor:
    """Wilson–Hilferty normal deviate of a standardized Pearson III (skew g ≥ 0) at z."""
    small = g < _NORMAL_SKEW
    gs = torch.where(small, torch.ones_like(g), g)
    u = (z * gs / 2).clamp_min(-1 + 1e-300)
    w = 6.0 / gs * torch.expm1(torch.log1p(u) / 3) + gs / 6
    return torch.where(small, z, w)


def _wh_inv(w: Tensor, g: Tensor) -> Tensor:
    small = g < _NORMAL_SKEW
    gs = torch.where(small, torch.ones_like(g), g)
    v = (w - gs / 6) * gs / 6
    z = 2.0 / gs * torch.expm1(3 * torch.log1p(v.clamp_min(-1.0)))
    return torch.where(small, w, z)


def _standard_tail(z: Tensor, g: Tensor, upper: bool) -> Tensor:
    """``P(Z ≥ z)`` (``upper``) or ``P(Z ≤ z)`` for the standardized Pearson III with skew
    g ≥ 0 (a shifted gamma; Wilson–Hilferty below ``_WH_SKEW``)."""
    big = g >= _WH_SKEW
    gs = torch.where(big, g, torch.ones_like(g))
    shape = 4.0 / (gs * gs)
    x = shape * (1.0 + z * gs / 2)
    incomplete = torch.special.gammaincc if upper else torch.special.gammainc
    edge = torch.ones_like(x) if upper else torch.zeros_like(x)
    exact = torch.where(x > 0, incomplete(shape, x.clamp_min(0.0)), edge)
    approx = torch.special.ndtr(-_wh(z, g) if upper else _wh(z, g))
    return torch.where(big, exact, approx)


def _standard_upper(z: Tensor, g: Tensor) -> Tensor:
    """``P(Z ≥ z)`` for the standardized Pearson III with skew g ≥ 0."""
    return _standard_tail(z, g, upper=True)


def _standard_lower(z: Tensor, g: Tensor) -> Tensor:
    """``P(Z ≤ z)`` for the standardized Pearson III with skew g ≥ 0."""
    return _standard_tail(z, g, upper=False)


def pearson3_sf(t: Any, mean: Any, std: Any, skew: Any) -> Tensor:
    """Upper tail ``P(S ≥ t)`` of the Pearson type III with the given mean, std and skewness.

    For skew γ > 0, ``S = mean + std·(G − a)/√a`` with ``G ~ Gamma(a = 4/γ², 1)``, so
    ``P(S ≥ t) = Q(a, a + z√a)`` with ``z = (t − mean)/std`` (``torch.special.gammaincc``);
    γ < 0 is the mirror image (``P(a, a − z√a)``).  For ``|γ| < 2e-3`` (a > 10⁶) the
    Wilson–Hilferty form of the gamma is used, which tends to the normal tail Φ(−z) as
    γ → 0 without dividing by γ (γ = 0 is exactly normal).  A zero std gives a point mass:
    1 for ``t <= mean`` else 0.  Broadcasts; float64.

    Parameters
    ----------
    t : float or Tensor
        Observed statistic(s).
    mean, std, skew : float or Tensor
        Moments of the null (e.g. :func:`cosine_moments`).

    Example
    -------
    >>> round(float(pearson3_sf(1.0, 0.0, 1.0, 0.0)), 6)  # normal limit
    0.158655
    >>> round(float(pearson3_sf(1.0, 0.0, 1.0, 2.0)), 6)  # exponential: exp(-2)
    0.135335
    """
    t, mean, std, skew = _as64(t, mean, std, skew)
    pos = std > 0
    z = (t - mean) / torch.where(pos, std, torch.ones_like(std))
    g = skew.abs()
    upper = torch.where(skew >= 0, _standard_upper(z, g), _standard_lower(-z, g))
    point = (t <= mean).to(_F64)
    return torch.where(pos, upper, point)


def _solve_gamma(shape: Tensor, target: Tensor, upper: bool, iters: int = 200) -> Tensor:
    """x > 0 with ``P(shape, x) = target`` (``Q`` if ``upper``): Newton on log x, safeguarded
    by a bracket (bisection whenever Newton leaves it), float64."""
    f = torch.special.gammaincc if upper else torch.special.gammainc
    sign = -1.0 if upper else 1.0  # d f / dx sign
    lo = torch.full_like(shape, -745.0)  # log x
    hi = torch.log(shape) + 1.0
    # grow hi until f(hi) is beyond the target
    for _ in range(200):
        val = f(shape, torch.exp(hi))
        beyond = (val <= target) if upper else (val >= target)
        if bool(beyond.all()):
            break
        hi = torch.where(beyond, hi, hi + 1.0 + 0.5 * hi.abs())
    # Wilson–Hilferty start
    p_lower = 1 - target if upper else target
    zn = torch.special.ndtri(p_lower.clamp(1e-300, 1 - 1e-16))
    start = shape * (1 - 1 / (9 * shape) + zn / (3 * torch.sqrt(shape))).clamp_min(1e-3) ** 3
    u = torch.log(start).clamp(lo, hi)
    for _ in range(iters):
        x = torch.exp(u)
        resid = f(shape, x) - target
        below = (resid < 0) if not upper else (resid > 0)  # root lies above u
        lo = torch.where(below, u, lo)
        hi = torch.where(below, hi, u)
        logpdf = (shape - 1) * torch.log(x) - x - torch.lgamma(shape)
        deriv = sign * torch.exp(logpdf + u)  # d f / d log x
        step = torch.where(deriv != 0, resid / torch.where(deriv != 0, deriv, 1.0),
                           torch.full_like(u, math.inf))
        new = u - step
        bad = ~torch.isfinite(new) | (new <= lo) | (new >= hi)
        new = torch.where(bad, 0.5 * (lo + hi), new)
        done = (new - u).abs() <= 1e-15 * (1 + u.abs())
        u = new
        if bool(done.all()):
            break
    return torch.exp(u)


def pearson3_quantile(prob: Any, mean: Any, std: Any, skew: Any) -> Tensor:
    """Quantile ``t`` with ``P(S ≤ t) = prob`` of the Pearson type III (see
    :func:`pearson3_sf`); e.g. the threshold ``τ = pearson3_quantile(1 − α, …)``.

    Inverts the regularized incomplete gamma by Newton's method on log x, safeguarded by a
    bracket (bisection whenever a step leaves it), in float64; for ``|skew| < 2e-3`` the
    Wilson–Hilferty form is inverted in closed form (normal quantile at skew 0).  prob 0 / 1
    give the support's ends (±inf or the gamma's finite end).  Broadcasts.

    Parameters
    ----------
    prob : float or Tensor
        Lower-tail probability in [0, 1].
    mean, std, skew : float or Tensor
        Moments of the distribution.

    Example
    -------
    >>> round(float(pearson3_quantile(0.975, 0.0, 1.0, 0.0)), 6)
    1.959964
    >>> t = pearson3_quantile(0.95, 0.1, 0.02, 1.3)
    >>> round(float(pearson3_sf(t, 0.1, 0.02, 1.3)), 10)
    0.05
    """
    prob, mean, std, skew = _as64(prob, mean, std, skew)
    if bool(((prob < 0) | (prob > 1)).any()):
        raise ValueError("prob must lie in [0, 1]")
    g = skew.abs()
    big = g >= _WH_SKEW
    gs = torch.where(big, g, torch.ones_like(g))
    shape = 4.0 / (gs * gs)
    # positive skew: P(Z <= z) = P(a, a + z√a);  negative: P(Z <= z) = Q(a, a − z√a)
    pos = skew >= 0
    interior = (prob > 0) & (prob < 1)
    pc = torch.where(interior, prob, torch.full_like(prob, 0.5))
    # x with P(a, x) = pc (positive skew) or Q(a, x) = pc (negative), each solved with the
    # smaller tail for precision; only the entries that need the gamma are solved
    upper = torch.where(pos, pc > 0.5, pc < 0.5)
    target = torch.where(torch.where(pos, pc > 0.5, pc >= 0.5), 1 - pc, pc)
    x = shape.clone()
    for tail in (True, False):
        todo = big & (upper == tail)
        if bool(todo.any()):
            x[todo] = _solve_gamma(shape[todo], target[todo], tail)
    sq = torch.sqrt(shape)
    z_exact = torch.where(pos, (x - shape) / sq, (shape - x) / sq)
    w = torch.special.ndtri(pc)
    z_wh = torch.where(pos, _wh_inv(w, g), -_wh_inv(-w, g))
    z = torch.where(big, z_exact, z_wh)
    # ends of the support
    end_hi = torch.where(pos | ~big, torch.full_like(z, math.inf), sq)   # neg skew: z <= √a
    end_lo = torch.where(~pos | ~big, torch.full_like(z, -math.inf), -sq)  # pos skew: z >= −√a
    z = torch.where(prob <= 0, end_lo, torch.where(prob >= 1, end_hi, z))
    return mean + std * z


def pearson3_null(score: Any, moments: PermutationMoments, alpha: float = 0.05
                  ) -> dict[str, Tensor]:
    """Analytic calibration of an observed cosine ``score`` against its permutation moments:
    ``p_value = pearson3_sf(score, …)``, ``threshold = pearson3_quantile(1 − alpha, …)``,
    plus ``null_mean``, ``null_std`` and ``skewness`` (float64 tensors).

    Parameters
    ----------
    score : float or Tensor
        The observed statistic on the same scale as ``moments`` (e.g. the CKA value with
        :func:`cosine_moments`).
    moments : PermutationMoments
    alpha : float, default=0.05
        Level of the threshold τ.

    Example
    -------
    >>> out = pearson3_null(0.5, PermutationMoments(0.3, 0.01, 0.0))
    >>> round(float(out["p_value"]), 4), round(float(out["threshold"]), 4)  # 2σ, normal
    (0.0228, 0.4645)
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    mu, sd, g = moments.mean, moments.std, moments.skewness
    return {
        "p_value": pearson3_sf(score, mu, sd, g),
        "threshold": pearson3_quantile(1.0 - alpha, mu, sd, g),
        "null_mean": torch.tensor(mu, dtype=_F64),
        "null_std": torch.tensor(sd, dtype=_F64),
        "skewness": torch.tensor(g, dtype=_F64),
    }
