"""Analytic permutation nulls (functional.moments): exact moments of the quadratic-assignment
statistic T(π) = Σ_ij A_ij B_π(i)π(j) against exhaustive enumeration and Monte-Carlo
permutations, the feature-space invariants, the Pearson III tail and its false-positive rate.

Heavier versions of these checks are in ``benchmarks/check_moments.py``.
"""

from __future__ import annotations

import doctest
import importlib
import itertools
import math
import pkgutil

import numpy as np
import pytest
import torch
from scipy import special, stats

import alignment_callback.functional as F
from alignment_callback.functional import moments as M
from alignment_callback.functional.gram_measures import (
    GramState,
    gram_score,
    linear_state,
    rsa_state,
    unbiased_state,
)
from alignment_callback.functional.kernels import center_gram, rbf_gram, u_center_gram
from alignment_callback.functional.knn_measures import knn_score, knn_state
from alignment_callback.functional.moments import features as MF
from alignment_callback.functional.moments import invariants as MI
from alignment_callback.functional.moments import patterns as P
from alignment_callback.functional.neighbors import knn


def neighbor_state(x, k, kind="mutual_knn", role="x"):
    return knn_state(x, k, kind, role)


def mutual_knn_score(sx, sy, perms):
    return knn_score("mutual_knn", sx, sy, perms)


def cycle_knn_score(sx, sy, perms):
    return knn_score("cycle_knn", sx, sy, perms)


def cknna_state(x, k, role="x"):
    return knn_state(x, k, "cknna", role)


def cknna_score(sx, sy, perms):
    return knn_score("cknna", sx, sy, perms)

F64 = torch.float64
ALPHA = 0.05


# ----------------------------------------------------------------------------------- helpers

def _data(kind: str, n: int, d: int, rng: np.random.Generator) -> torch.Tensor:
    if kind == "gauss":
        x = rng.standard_normal((n, d))
    elif kind == "t3":
        x = rng.standard_t(3, size=(n, d))
    else:  # low rank plus noise
        signal = rng.standard_normal((n, 3)) @ rng.standard_normal((3, d))
        x = signal + 0.3 * rng.standard_normal((n, d))
    return torch.from_numpy(x).to(F64)


def _matrix(kind: str, n: int, rng: np.random.Generator) -> torch.Tensor:
    x = _data("t3", n, 3, rng)
    xc = x - x.mean(0)
    if kind == "linear":
        return center_gram(xc @ xc.T)
    if kind == "unbiased":
        return u_center_gram(x @ x.T)
    if kind == "rbf":
        return center_gram(rbf_gram(x, "median"))
    if kind == "rsa":
        return rsa_state(x).matrix
    a = torch.from_numpy(rng.standard_normal((n, n)))
    if kind == "symmetric":
        return a + a.T
    return a  # "general": not symmetric


def _adjacency(idx: torch.Tensor) -> torch.Tensor:
    n, k = idx.shape
    m = torch.zeros(n, n, dtype=F64)
    m[torch.arange(n).repeat_interleave(k), idx.reshape(-1)] = 1.0
    return m


def _all_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = a.shape[0]
    perms = torch.tensor(list(itertools.permutations(range(n))))
    return b[perms[:, :, None], perms[:, None, :]].reshape(len(perms), -1) @ a.reshape(-1)


def _dist(t: torch.Tensor) -> tuple[float, float, float]:
    c = t - t.mean()
    var = (c * c).mean()
    skew = (c ** 3).mean() / var ** 1.5 if var > 0 else torch.zeros(())
    return float(t.mean()), float(var), float(skew)


def _assert_moments(m: M.PermutationMoments, ref: tuple[float, float, float], tol: float = 1e-9):
    mean, var, skew = ref
    assert abs(m.mean - mean) <= tol * (abs(mean) + math.sqrt(var)), (m, ref)
    assert abs(m.variance - var) <= tol * var, (m, ref)
    assert abs(m.skewness - skew) <= tol * (1 + abs(skew)), (m, ref)


def _perms(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(k, n, generator=g), dim=1)


def _mc_check(t: torch.Tensor, m: M.PermutationMoments, z_max: float = 4.5) -> None:
    """MC estimates of E[T], E[(T−μ)²], E[(T−μ)³]/σ³ with the exact μ, σ: unbiased, so each
    must lie within z_max standard errors of the exact value."""
    k = t.numel()
    c = t - m.mean
    for est, exact in ((c, 0.0), (c * c, m.variance), (c ** 3 / m.std ** 3, m.skewness)):
        se = float(est.std()) / math.sqrt(k)
        assert abs(float(est.mean()) - exact) <= z_max * se, (float(est.mean()), exact, se)


# ------------------------------------------------------------------------ combinatorics

def test_symmetric_invariant_set_is_complete() -> None:
    """The 17 named undirected multigraphs (15 fields + trace + total) are exactly the
    connected components needed up to the third moment; 42 directed ones."""
    assert set(P._all_keys(False)) == set(P._SYMMETRIC_FIELD)
    assert len(P._all_keys(False)) == 17 and len(P._all_keys(True)) == 42
    assert [len(P._program(r).partitions) for r in (1, 2, 3)] == [2, 15, 203]


# --------------------------------------------------------------------- exhaustive checks

@pytest.mark.parametrize("n", [4, 5, 6, 7])
@pytest.mark.parametrize("kind", ["linear", "unbiased", "rbf", "rsa", "symmetric"])
def test_exact_moments_equal_exhaustive_symmetric(kind: str, n: int) -> None:
    rng = np.random.default_rng(100 * n + len(kind))
    a, b = _matrix(kind, n, rng), _matrix(kind, n, rng)
    ref = _dist(_all_t(a, b))
    _assert_moments(M.permutation_moments(M.gram_invariants(a), M.gram_invariants(b), n), ref)
    # the general (directed) machinery agrees on symmetric matrices
    _assert_moments(M.permutation_moments(M.matrix_invariants(a), M.matrix_invariants(b)), ref)
    # mixed: symmetric A with the directed invariants of B
    _assert_moments(M.permutation_moments(M.gram_invariants(a), M.matrix_invariants(b)), ref)


@pytest.mark.parametrize("n", [4, 6, 7])
def test_exact_moments_equal_exhaustive_general(n: int) -> None:
    rng = np.random.default_rng(n)
    a, b = _matrix("general", n, rng), _matrix("general", n, rng)
    _assert_moments(M.permutation_moments(M.matrix_invariants(a), M.matrix_invariants(b)),
                    _dist(_all_t(a, b)))


@pytest.mark.parametrize("n,k", [(4, 1), (5, 2), (6, 2), (7, 1), (7, 3), (7, 5)])
def test_exact_moments_equal_exhaustive_knn(n: int, k: int) -> None:
    rng = np.random.default_rng(10 * n + k)
    ix, iy = knn(_data("t3", n, 2, rng), k)[0], knn(_data("gauss", n, 2, rng), k)[0]
    ax, ay = _adjacency(ix), _adjacency(iy)
    ref = _dist(_all_t(ax, ay))
    gx, gy = M.knn_graph_invariants(ix), M.knn_graph_invariants(iy)
    _assert_moments(M.permutation_moments(gx, gy), ref)
    # the sparse O(nk) invariants equal the dense ones up to the centering shift's bookkeeping
    _assert_moments(M.permutation_moments(M.matrix_invariants(ax), M.matrix_invariants(ay)), ref)
    _assert_moments(M.permutation_moments(M.matrix_invariants(ax), gy), ref)
    assert M.permutation_moments(gx, gy).mean == pytest.approx(n * k * k / (n - 1), rel=1e-12)


def test_sparse_knn_contractions_equal_dense() -> None:
    """Every directed invariant from the O(n·k) neighbor-list code equals the dense
    contraction of the adjacency matrix, also with the triangle counts split into blocks."""
    rng = np.random.default_rng(12)
    n, k = 40, 4
    idx = knn(_data("t3", n, 3, rng), k)[0]
    dense = P._DenseBackend(_adjacency(idx))
    for chunk in (1 << 22, 3 * k * k):
        sparse = P._KnnBackend(idx, chunk=chunk)
        for key in P._all_keys(True):
            expect = P._contract(key, dense)
            got = 0.0 if P._has_loop(key) else P._contract(key, sparse)
            assert got == pytest.approx(expect, abs=1e-9), key


def test_cosine_moments_are_the_moments_of_the_library_scores() -> None:
    """The cosine null equals the distribution of linear CKA / mutual kNN / cycle kNN over
    all permutations of Y's rows, as the library computes them."""
    n, rng = 7, np.random.default_rng(7)
    x, y = _data("gauss", n, 3, rng), _data("lowrank", n, 4, rng)
    perms = torch.tensor(list(itertools.permutations(range(n))))
    sx, sy = linear_state(x), linear_state(y)
    ref = _dist(gram_score(sx, sy, perms))
    ga, gb = M.gram_invariants(sx.matrix), M.gram_invariants(sy.matrix)
    _assert_moments(M.cosine_moments(ga, gb), ref)
    _assert_moments(M.cosine_moments(M.feature_invariants(x), M.feature_invariants(y)), ref)
    k = 2
    nx, ny = neighbor_state(x, k), neighbor_state(y, k, role="y")
    ref = _dist(mutual_knn_score(nx, ny, perms))
    kx, ky = M.knn_graph_invariants(nx.own.indices), M.knn_graph_invariants(ny.own.indices)
    mk = M.mutual_knn_moments(kx, ky)
    _assert_moments(mk, ref)
    assert mk.mean == pytest.approx(k / (n - 1), rel=1e-12)
    for kx, ky in ((2, 2), (1, 3), (3, 1)):
        nx, ny = neighbor_state(x, kx), neighbor_state(y, ky, role="y")
        exact = float(cycle_knn_score(nx, ny, perms).mean())
        assert M.cycle_knn_mean(nx.own.indices, ky) == pytest.approx(exact, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("n,k", [(6, 2), (7, 3)])
def test_cknna_mean_equals_exhaustive(n: int, k: int) -> None:
    rng = np.random.default_rng(n * k)
    x, y = _data("t3", n, 3, rng), _data("gauss", n, 4, rng)
    sx, sy = cknna_state(x, k), cknna_state(y, k, role="y")
    perms = torch.tensor(list(itertools.permutations(range(n))))
    exact = float(cknna_score(sx, sy, perms).mean())
    mean = M.cknna_mean(sx.own.indices, sx.own.values, sy.own.indices, sy.own.values)
    assert mean == pytest.approx(exact, rel=1e-12)


def test_knn_means_monte_carlo() -> None:
    """Cycle kNN and CKNNA means at n = 300 against 2,000 permutations (4 standard errors)."""
    n, k, rng = 300, 10, np.random.default_rng(9)
    x, y = _data("t3", n, 6, rng), _data("gauss", n, 6, rng)
    perms = _perms(n, 2000, 3)
    sx, sy = cknna_state(x, k), cknna_state(y, k, role="y")
    for exact, scores in ((M.cycle_knn_mean(sx.own.indices, k), cycle_knn_score(sx, sy, perms)),
                          (M.cknna_mean(sx.own.indices, sx.own.values, sy.own.indices, sy.own.values),
                           cknna_score(sx, sy, perms))):
        assert abs(float(scores.mean()) - exact) <= 4 * float(scores.std()) / math.sqrt(len(perms))


# --------------------------------------------------------------------------- Monte Carlo

def test_exact_moments_match_monte_carlo_n256() -> None:
    """K = 20,000 random permutations at n = 256: the MC mean, variance and third standardized
    moment (using the exact μ, σ) lie within 4.5 standard errors of the exact values."""
    n, rng = 256, np.random.default_rng(256)
    perms = _perms(n, 20_000, 1)
    # linear CKA of low-dimensional heavy-tailed data: T(π) = ‖Xᵀ Y[π]‖² (cheap per permutation)
    x, y = _data("t3", n, 6, rng), _data("lowrank", n, 5, rng)
    xc, yc = x - x.mean(0), y - y.mean(0)
    t = torch.cat([torch.einsum("nd,bne->bde", xc, yc[p]).pow(2).sum((1, 2))
                   for p in perms.split(2000)])
    m = M.permutation_moments(M.feature_invariants(xc), M.feature_invariants(yc))
    assert m.skewness > 0.5  # a clearly skewed null
    _mc_check(t, m)
    # RSA (no zero row sums) and unbiased CKA on the library's null path (n×n gathers)
    for sx, sy in ((rsa_state(x), rsa_state(y)), (unbiased_state(x), unbiased_state(y))):
        s = gram_score(GramState(sx.matrix.float(), sx.norm.float()),
                       GramState(sy.matrix.float(), sy.norm.float()), perms).double()
        _mc_check(s, M.cosine_moments(M.gram_invariants(sx.matrix), M.gram_invariants(sy.matrix)))
    # mutual kNN (k = 10): the count T over the remapped neighbor lists
    k = 10
    nx, ny = neighbor_state(x, k), neighbor_state(y, k, role="y")
    t = torch.cat([mutual_knn_score(nx, ny, q) for q in perms.split(2000)]) * (n * k)
    kx, ky = M.knn_graph_invariants(nx.own.indices), M.knn_graph_invariants(ny.own.indices)
    m = M.permutation_moments(kx, ky)
    _mc_check(t, m)


# --------------------------------------------------------------------- feature invariants

FIELDS = ("norm", "diag_mean", "offdiag_mean", "diag_sq", "frob_sq", "diag_cube", "cube",
          "diag_frob", "diag_quad", "trace_cube")


@pytest.mark.parametrize("n,d,kind", [(40, 3, "t3"), (300, 30, "gauss"), (120, 6, "lowrank"),
                                      (300, 31, "lowrank"), (200, 40, "t3"), (50, 80, "gauss")])
def test_feature_invariants_equal_gram_invariants(n: int, d: int, kind: str) -> None:
    """Both routes (3-tensor for n ≥ d²/3: the first three; blocks of the gram below: the next
    two) and d ≥ n."""
    rng = np.random.default_rng(n + d)
    x = _data(kind, n, d, rng)
    xc = x - x.mean(0)
    assert (d < n < MF._GRAM_ROUTE_FRACTION * d * d) == (d in (31, 40))
    fa, ga = M.feature_invariants(xc, block_rows=37), M.gram_invariants(xc @ xc.T)
    for f in FIELDS:
        assert getattr(fa, f) == pytest.approx(getattr(ga, f), rel=1e-10), f
    assert ga.rowsum_sq == 0.0 and fa.rowsum_sq == 0.0  # row-sum shortcut taken
    assert MF._cube_sum_tensor(xc, 29, tile=4) == pytest.approx(MF._gram_sums(xc, 29)[0],
                                                                rel=1e-12)
    # the feature-space raw linear CKA equals the library's
    y = _data("gauss", n, 5, rng)
    assert float(M.feature_linear_cka(x, y)) == pytest.approx(float(F.linear_cka(x, y)), rel=1e-10)


@pytest.mark.parametrize("n", [5, 256, 257, 600])
def test_blocked_triangle_sums_equal_numpy(n: int) -> None:
    """tr A³, Σ_ij (x_iᵀx_j)³ and the row sums Σ_j (x_iᵀx_j)² from the upper triangle's blocks
    (off-diagonal blocks counted twice) equal float64 NumPy over the whole matrix, for one and
    several blocks."""
    rng = np.random.default_rng(n)
    x = rng.standard_t(3, size=(n, 7))
    a = x @ x.T - 0.3
    want_trace, want_cube = np.trace(a @ a @ a), ((x @ x.T) ** 3).sum()
    assert MI._trace_cube(torch.from_numpy(a)) == pytest.approx(want_trace, rel=1e-12)
    assert MI._trace_cube(torch.from_numpy(a), rows=3) == pytest.approx(want_trace, rel=1e-12)
    want_squares = ((x @ x.T) ** 2).sum(1)
    for rows in (1024, 29):
        cube, squares = MF._gram_sums(torch.from_numpy(x), rows)
        assert cube == pytest.approx(want_cube, rel=1e-12)
        np.testing.assert_allclose(squares.numpy(), want_squares, rtol=1e-12)


def test_scatter_given_once_gives_the_same_numbers() -> None:
    """feature_invariants / feature_linear_cka with the scatter matrices passed in equal the
    computation without them; a scatter of the wrong shape is refused."""
    rng = np.random.default_rng(3)
    x, y = _data("t3", 500, 12, rng), _data("lowrank", 500, 9, rng)
    sx, sy = M.feature_scatter(x), M.feature_scatter(y)
    xc = x - x.mean(0)
    np.testing.assert_allclose(sx.numpy(), (xc.T @ xc).numpy(), rtol=1e-12, atol=1e-9)
    given, fresh = M.feature_invariants(x, scatter=sx), M.feature_invariants(x)
    for f in FIELDS:
        assert getattr(given, f) == pytest.approx(getattr(fresh, f), rel=1e-12), f
    assert float(M.feature_linear_cka(x, y, sx, sy)) == pytest.approx(
        float(F.linear_cka(x, y)), rel=1e-10)
    with pytest.raises(ValueError, match="scatter must be the \\(12, 12\\) matrix"):
        M.feature_invariants(x, scatter=sy)
    with pytest.raises(ValueError, match="scatter must be float64"):
        M.feature_invariants(x, scatter=sx.float())
    with pytest.raises(ValueError, match="scatter_y must be float64"):
        M.feature_linear_cka(x, y, sx, sy.float())


def test_combination_is_numerically_exact() -> None:
    """The float moment combination equals exact rational arithmetic on the same invariants
    (no cancellation), for centered grams at n = 400 and kNN graphs at n = 2000."""
    rng = np.random.default_rng(3)
    for kind, (n, d) in (("gauss", (400, 300)), ("t3", (400, 8))):
        ia = M.feature_invariants(_data(kind, n, d, rng))
        ib = M.feature_invariants(_data(kind, n, d, rng))
        mf, me = M.permutation_moments(ia, ib), M.permutation_moments(ia.as_exact(), ib.as_exact())
        _assert_moments(mf, (me.mean, me.variance, me.skewness), tol=1e-12)
    n, k = 2000, 30
    gx = M.knn_graph_invariants(knn(_data("t3", n, 5, rng), k)[0])
    gy = M.knn_graph_invariants(knn(_data("gauss", n, 5, rng), k)[0])
    mf, me = M.permutation_moments(gx, gy), M.permutation_moments(gx.as_exact(), gy.as_exact())
    _assert_moments(mf, (me.mean, me.variance, me.skewness), tol=1e-9)


def test_array_pattern_sums_equal_the_loop_bit_for_bit(monkeypatch) -> None:
    """The array form of the Möbius inversion (float invariants) gives the same pattern sums
    as the per-term loop, bit for bit: feature, gram, non-symmetric and kNN-graph invariants
    (directed and undirected programs), continuous and integer-valued data."""
    from alignment_callback.functional.moments import exact as ME

    rng = np.random.default_rng(5)
    invs = []
    for n, d in ((5, 3), (40, 12), (64, 200)):
        x = _data("t3", n, d, rng)
        invs += [M.feature_invariants(x), M.feature_invariants(torch.round(x))]
        a = torch.from_numpy(rng.standard_normal((n, n)))
        invs += [M.gram_invariants(a + a.T), M.matrix_invariants(a)]
        invs.append(M.knn_graph_invariants(knn(x, min(4, n - 1))[0]))
    pairs = [(inv, r, directed) for inv in invs for r in (1, 2, 3)
             for directed in ((False, True) if inv.symmetric else (True,))]
    fast = [ME._float_pattern_sums(inv, r, directed) for inv, r, directed in pairs]
    monkeypatch.setattr(ME, "_float_pattern_sums", lambda *args: None)
    for (inv, r, directed), got in zip(pairs, fast):
        inv._cache.clear()
        want = ME._pattern_sums(inv, r, directed)
        assert got is not None and len(got) == len(want) == {1: 2, 2: 15, 3: 203}[r]
        assert [float(v) for v in got] == [float(v) for v in want], (type(inv).__name__, r)


# ------------------------------------------------------------------------- Pearson III

@pytest.mark.parametrize("skew", [-4.0, -1.0, -0.2, -0.01, 0.01, 0.05, 0.7, 2.0, 2.83, 6.0])
def test_pearson3_matches_scipy(skew: float) -> None:
    z = np.linspace(-6, 9, 61)
    sf = M.pearson3_sf(torch.from_numpy(z), 0.3, 2.0, skew).numpy()
    np.testing.assert_allclose(sf, stats.pearson3.sf(z, skew, loc=0.3, scale=2.0), atol=1e-9)
    probs = np.array([1e-8, 0.005, 0.05, 0.3, 0.5, 0.8, 0.95, 0.995, 1 - 1e-7])
    q = M.pearson3_quantile(torch.from_numpy(probs), 0.3, 2.0, skew).numpy()
    np.testing.assert_allclose(q, stats.pearson3.ppf(probs, skew, loc=0.3, scale=2.0),
                               rtol=1e-7, atol=1e-7)
    # round trip at the level's threshold
    tau = M.pearson3_quantile(1 - ALPHA, 0.3, 2.0, skew)
    assert float(M.pearson3_sf(tau, 0.3, 2.0, skew)) == pytest.approx(ALPHA, abs=1e-10)


@pytest.mark.parametrize("skew", [-1.0, -0.01, 0.0, 0.01, 1.0, 3.0])
def test_pearson3_upper_quantile_is_exact_at_any_alpha(skew: float) -> None:
    """τ at α below 1e-16 was solved from 1 − α, which rounds: 2.4e-3 off at 3e-16 and
    infinite at 1e-17.  The upper tail is solved directly (scipy's isf as reference), and for
    ordinary α it equals the lower-tail quantile of 1 − α."""
    alphas = np.array([0.3, 0.05, 1e-3, 1e-12, 3e-16, 1e-17, 1e-30, 1e-100])
    tau = M.pearson3_quantile(torch.from_numpy(alphas), 0.06, 0.02, skew, upper=True).numpy()
    if skew == 0.0:
        z = stats.norm.isf(alphas)
    else:  # Z = (X - a)/sqrt(a) with X ~ Gamma(a), a = 4/skew^2, mirrored for negative skew
        a = 4 / skew**2
        x = special.gammainccinv(a, alphas) if skew > 0 else special.gammaincinv(a, alphas)
        z = np.sign(skew) * (x - a) / np.sqrt(a)
    np.testing.assert_allclose(tau, 0.06 + 0.02 * z, rtol=1e-9, atol=0)
    moments = M.PermutationMoments(0.06, 0.02**2, skew)
    for alpha, expected in zip(alphas, 0.06 + 0.02 * z):  # the threshold of the moments null
        assert float(M.pearson3_null(0.1, moments, alpha)["threshold"]) == pytest.approx(
            expected, rel=1e-9)
    lower = M.pearson3_quantile(torch.from_numpy(1 - alphas[:3]), 0.06, 0.02, skew).numpy()
    np.testing.assert_allclose(tau[:3], lower, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="upper-tail probability must be 0 or at least 1e-100"):
        M.pearson3_quantile(1e-120, 0.06, 0.02, skew, upper=True)  # its start is not reliable
    ends = M.pearson3_quantile(torch.tensor([0.0, 1.0], dtype=F64), 0.0, 1.0, skew, upper=True)
    low_end = -math.inf if skew <= 0 else -2 / skew
    high_end = math.inf if skew >= 0 else -2 / skew
    assert ends.tolist() == [high_end, low_end] if abs(skew) >= 2e-3 else \
        ends.tolist() == [math.inf, -math.inf]


def test_pearson3_small_skew_tends_to_normal_smoothly() -> None:
    z = torch.linspace(-5, 5, 41, dtype=F64)
    normal = torch.special.ndtr(-z)
    assert torch.equal(M.pearson3_sf(z, 0.0, 1.0, 0.0), normal)
    prev = None
    for g in (1e-13, 1e-9, 1e-6, 1e-4, 1.9e-3, 2.1e-3, 1e-2, 3e-2):
        sf = M.pearson3_sf(z, 0.0, 1.0, g)
        # first-order Edgeworth term: P3 ≈ Φ̄(z) + g/6 (z² − 1) φ(z)
        edge = normal + g / 6 * (z * z - 1) * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        assert float((sf - edge).abs().max()) <= 0.1 * g * g + 1e-12, g
        # mirror image for negative skew
        assert torch.allclose(M.pearson3_sf(-z, 0.0, 1.0, -g), 1 - sf, atol=1e-12, rtol=0)
        q = M.pearson3_quantile(torch.tensor([0.005, 0.5, 0.995], dtype=F64), 0.0, 1.0, g)
        expect = torch.tensor([0.995, 0.5, 0.005], dtype=F64)
        assert torch.allclose(M.pearson3_sf(q, 0.0, 1.0, g), expect, atol=1e-11, rtol=0)
        if prev is not None:
            assert float((sf - prev).abs().max()) <= 1e-2  # no jump between regimes
        prev = sf


@pytest.mark.parametrize("skew", [0.0037, -0.0037, 0.01, 0.3])
def test_pearson3_quantile_newton_stops_at_the_root(skew: float, monkeypatch) -> None:
    """The inverse incomplete gamma stops once a Newton step is below its tolerance, also when
    that step rounds onto the bracket's end (at skew 0.0037, a gamma of shape 3e5, it used to
    fall back to bisection there and take ~48 evaluations); the quantile is the root."""
    calls = {"n": 0}
    for name in ("gammainc", "gammaincc"):
        real = getattr(torch.special, name)

        def counted(a, x, real=real):
            calls["n"] += 1
            return real(a, x)

        monkeypatch.setattr(torch.special, name, counted)
    tau = M.pearson3_quantile(1 - ALPHA, 0.429, 7.9e-4, skew)
    assert calls["n"] <= 8, calls["n"]
    monkeypatch.undo()
    assert float(M.pearson3_sf(tau, 0.429, 7.9e-4, skew)) == pytest.approx(ALPHA, rel=1e-9)
    want = stats.pearson3.ppf(1 - ALPHA, skew, loc=0.429, scale=7.9e-4)
    assert float(tau) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_pearson3_edges() -> None:
    # support ends, point masses, broadcasting
    assert float(M.pearson3_sf(-1.5, 0.0, 1.0, 2.0)) == 1.0  # below the gamma's origin (−2/γ)
    assert float(M.pearson3_sf(1.5, 0.0, 1.0, -2.0)) == 0.0
    assert M.pearson3_quantile(torch.tensor([0.0, 1.0]), 0.0, 1.0, 2.0).tolist() == [-1.0, math.inf]
    ends = M.pearson3_quantile(torch.tensor([0.0, 1.0]), 0.0, 1.0, -2.0)
    assert ends.tolist() == [-math.inf, 1.0]
    assert M.pearson3_sf(torch.tensor([-1.0, 0.0, 1.0]), 0.0, 0.0, 1.0).tolist() == [1.0, 1.0, 0.0]
    out = M.pearson3_sf(torch.zeros(3, 1), torch.zeros(4), 1.0, torch.tensor([0.0, 0.5, -0.5, 3.0]))
    assert out.shape == (3, 4) and out.dtype == F64
    with pytest.raises(ValueError):
        M.pearson3_quantile(1.5, 0.0, 1.0, 0.0)
    assert M.pearson3_valid(64, 0.5)
    assert not M.pearson3_valid(64, 9.0) and not M.pearson3_valid(8, 0.1)


def test_pearson3_null_against_permutations() -> None:
    """Moment-matched P3 tail vs a K = 20,000 permutation tail (linear CKA, n = 128,
    Gaussian, d/n = 0.1): within 0.01 for permutation p in [0.005, 0.5]."""
    n, rng = 128, np.random.default_rng(11)
    x, y = _data("gauss", n, 13, rng), _data("gauss", n, 13, rng)
    xc, yc = x - x.mean(0), y - y.mean(0)
    perms = _perms(n, 20_000, 5)
    s = torch.cat([torch.einsum("nd,bne->bde", xc, yc[p]).pow(2).sum((1, 2))
                   for p in perms.split(2000)])
    s = s / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    m = M.cosine_moments(M.feature_invariants(x), M.feature_invariants(y))
    srt = torch.sort(s, descending=True).values
    for p in (0.005, 0.01, 0.05, 0.1, 0.25, 0.5):
        t = srt[int(p * len(s)) - 1]
        emp = float((s >= t).double().mean())
        assert abs(float(M.pearson3_sf(t, m.mean, m.std, m.skewness)) - emp) <= 0.01, p
    res = M.pearson3_null(float(M.feature_linear_cka(x, y)), m, ALPHA)
    tau_perm = float(torch.quantile(s, 1 - ALPHA))
    assert float(res["threshold"]) == pytest.approx(tau_perm, rel=0.02)


def test_pair_leverage_flags_outlying_samples() -> None:
    """About 1/n for homogeneous rows; large when both sides have an outlying sample."""
    n, rng = 200, np.random.default_rng(21)
    x, y = _data("gauss", n, 20, rng), _data("gauss", n, 20, rng)
    homogeneous = M.pair_leverage(M.feature_invariants(x), M.feature_invariants(y))
    assert homogeneous < 0.05
    x[0] *= 30
    y[5] *= 30
    outliers = M.pair_leverage(M.feature_invariants(x), M.feature_invariants(y))
    assert outliers > 10
    m = M.cosine_moments(M.feature_invariants(x), M.feature_invariants(y))
    assert M.pearson3_valid(n, m.skewness, homogeneous) or abs(m.skewness) > M.PEARSON3_MAX_ABS_SKEW
    assert not M.pearson3_valid(n, m.skewness, outliers)
    ok = M.pearson3_valid(n, torch.tensor([0.1, 0.1, 3.0]), torch.tensor([0.1, 5.0, 0.1]))
    assert ok.tolist() == [True, False, False]


@pytest.mark.slow
def test_false_positive_rate_of_moments_p_value() -> None:
    """Independent representations: P(p <= 0.05) <= 0.05 + 3σ (400 draws per cell), linear
    CKA at n = 64 and 128 over d/n ∈ {0.1, 1, 8} and Gaussian / t₃ / low-rank data (the
    p-value from the feature-space invariants), and unbiased CKA at n = 64, d/n = 1.

    Each draw samples one 128 × 1024 pair per kind, and every cell takes its first n rows
    and d columns: rows and columns are i.i.d., so a cell's 400 draws are independent draws
    of its own n × d data (cells share data, which their separate bounds allow).  The tails
    are evaluated once per cell (``pearson3_sf`` is elementwise)."""
    draws = 400
    band = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / draws)
    rng = np.random.default_rng(2024)
    cells = [(n, ratio, kind) for n in (64, 128) for ratio in (0.1, 1.0, 8.0)
             for kind in ("gauss", "t3", "lowrank")]
    null = {cell: [] for cell in [*cells, "unbiased"]}  # (score, mean, std, skewness) per draw
    for _ in range(draws):
        data = {kind: (_data(kind, 128, 1024, rng), _data(kind, 128, 1024, rng))
                for kind in ("gauss", "t3", "lowrank")}
        for n, ratio, kind in cells:
            d = max(1, round(ratio * n))
            x, y = (z[:n, :d] for z in data[kind])
            m = M.cosine_moments(M.feature_invariants(x), M.feature_invariants(y))
            s = M.feature_linear_cka(x, y)
            null[n, ratio, kind].append((float(s), m.mean, m.std, m.skewness))
        x, y = (z[:64, :64] for z in data["gauss"])
        a, b = u_center_gram(x @ x.T), u_center_gram(y @ y.T)
        m = M.cosine_moments(M.gram_invariants(a), M.gram_invariants(b))
        s = (a * b).sum() / (a.norm() * b.norm())
        null["unbiased"].append((float(s), m.mean, m.std, m.skewness))
    for cell, rows in null.items():
        hits = int((M.pearson3_sf(*torch.tensor(rows, dtype=F64).T) <= ALPHA).sum())
        assert hits / draws <= band, (cell, hits / draws)


# ----------------------------------------------------------------------------- API hygiene

def test_input_checks() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        M.gram_invariants(torch.randn(5, 5, dtype=F64) + 3 * torch.triu(torch.ones(5, 5)))
    with pytest.raises(ValueError):
        M.gram_invariants(torch.ones(3, 4))
    with pytest.raises(ValueError):
        M.knn_graph_invariants(torch.tensor([[0, 1], [0, 2], [0, 1]]))  # self neighbor
    with pytest.raises(ValueError):
        M.knn_graph_invariants(torch.tensor([[1, 1], [0, 2], [0, 1]]))  # repeated neighbor
    a = M.gram_invariants(torch.eye(4) - 0.25)
    with pytest.raises(ValueError):
        M.permutation_moments(a, M.gram_invariants(torch.eye(5) - 0.2))
    # a permutation-invariant matrix has a point-mass null
    b = M.gram_invariants(torch.eye(4) - 0.25)
    m = M.permutation_moments(a, b)
    assert m.variance == pytest.approx(0.0, abs=1e-14) and m.skewness == 0.0


def test_docstring_examples() -> None:
    mods = [importlib.import_module(f"{M.__name__}.{info.name}")
            for info in pkgutil.iter_modules(M.__path__)]
    results = [doctest.testmod(mod, optionflags=doctest.ELLIPSIS) for mod in [M, *mods]]
    assert len(mods) >= 6
    assert sum(r.attempted for r in results) >= 8 and sum(r.failed for r in results) == 0
