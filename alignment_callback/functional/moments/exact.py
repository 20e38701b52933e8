"""Exact permutation moments of ``T(π) = Σ_ij A_ij B_π(i)π(j)`` from the invariants of A and B.

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
coefficient, written for arbitrary (also non-symmetric) matrices.  The partitions and the
multigraph contractions are in ``moments.patterns``, the invariants in
``moments.invariants``, ``moments.features`` and ``moments.knn``.

References
----------
* Kazi-Aoual, F., Hitier, S., Sabatier, R., Lebreton, J.-D. (1995).  Refined approximations
  to permutation tests for multivariate inference.  Computational Statistics & Data
  Analysis 20(6), 643–656.
* Josse, J., Pagès, J., Husson, F. (2008).  Testing the significance of the RV coefficient.
  Computational Statistics & Data Analysis 53(1), 82–91.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache
from typing import Any

import numpy as np

from alignment_callback.functional.moments.invariants import (
    GramInvariants,
    Invariants,
    PermutationMoments,
)
from alignment_callback.functional.moments.patterns import _program


def _sum(terms: list, exact: bool = False) -> Any:
    """Exactly rounded float sum (``math.fsum``), or the exact sum of ``Fraction`` terms."""
    return sum(terms, Fraction(0)) if exact else math.fsum(terms)


@cache
def _flat_program(r: int, directed: bool) -> tuple:
    """The moment program as arrays for the float path: the distinct component keys, for each
    at-least sum the indices of its keys (padded with the index of a trailing 1.0, factors in
    the program's order), and the Möbius rows flattened (column indices, integer weights as
    float64, row boundaries)."""
    prog = _program(r)
    keys = prog.keys_directed if directed else prog.keys_undirected
    distinct = sorted({key for ks in keys for key in ks})
    where = {key: i for i, key in enumerate(distinct)}
    width = max(len(ks) for ks in keys)
    factors = np.full((len(keys), width), len(distinct), dtype=np.intp)
    for q, ks in enumerate(keys):
        factors[q, :len(ks)] = [where[key] for key in ks]
    columns = [q for row in prog.mobius for q, _ in row]
    weights = [float(mu) for row in prog.mobius for _, mu in row]
    ends = np.cumsum([len(row) for row in prog.mobius]).tolist()
    return (distinct, factors, np.asarray(columns, dtype=np.intp),
            np.asarray(weights, dtype=np.float64), list(zip([0] + ends[:-1], ends)))


def _float_pattern_sums(inv: Invariants, r: int, directed: bool) -> list | None:
    """:func:`_pattern_sums` for float invariants with array arithmetic: every product is
    formed in the same order and rounded the same way, and ``math.fsum`` of a multiset is
    order-independent (zero terms add nothing), so the sums equal the loop's bit for bit.
    ``None`` where a value is not finite (the loop's zero short-cuts then matter)."""
    distinct, factors, columns, weights, bounds = _flat_program(r, directed)
    values = np.array([inv.value(key, directed) for key in distinct] + [1.0], dtype=np.float64)
    if not np.isfinite(values).all():
        return None
    at_least = values[factors[:, 0]]
    for t in range(1, factors.shape[1]):
        at_least = at_least * values[factors[:, t]]
    terms = (weights * at_least[columns]).tolist()
    return [math.fsum(terms[lo:hi]) for lo, hi in bounds]


def _pattern_sums(inv: Invariants, r: int, directed: bool) -> list:
    """Exact-pattern sums ``S(p)`` for the partitions of 2r positions (cached per object)."""
    cache_key = (r, directed)
    if cache_key not in inv._cache:
        exact = isinstance(inv.norm, Fraction)
        sums = None if exact else _float_pattern_sums(inv, r, directed)
        if sums is not None:
            inv._cache[cache_key] = sums
            return sums
        prog = _program(r)
        keys = prog.keys_directed if directed else prog.keys_undirected
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
    falling = [_falling(n, m) for m in range(2 * r + 1)]
    falling = [Fraction(f) for f in falling] if exact else [float(f) for f in falling]
    out = []
    for p, m in enumerate(prog.blocks):
        if m > n or sa[p] == 0 or sb[p] == 0:
            continue
        out.append(sa[p] * sb[p] / falling[m])
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
    n : int, default=None
        Number of samples (checked against the invariants when given).

    Returns
    -------
    PermutationMoments
        ``mean``, ``variance`` and ``skewness`` of T (skewness 0 when the variance is 0).

    Example
    -------
    >>> import itertools, torch
    >>> from alignment_callback.functional.moments import gram_invariants
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
    >>> from alignment_callback.functional.moments import gram_invariants
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
    >>> from alignment_callback.functional.moments import feature_invariants
    >>> pair_leverage(feature_invariants(x), feature_invariants(y)) < 0.1
    True
    >>> x[0] *= 30; y[0] *= 30  # one outlying sample on each side
    >>> pair_leverage(feature_invariants(x), feature_invariants(y)) > 10
    True
    """
    if inv_a.frob_sq <= 0 or inv_b.frob_sq <= 0:
        return 0.0
    return inv_a.n * (inv_a.max_row_sq / inv_a.frob_sq) * (inv_b.max_row_sq / inv_b.frob_sq)
