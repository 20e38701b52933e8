"""Library measures vs the independent float64 NumPy reference (tests/numpy_reference.py)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_reference as R  # noqa: E402

import alignment_callback.functional as F  # noqa: E402

# --------------------------------------------------------------------------- data


def _normalize(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _make_case(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic float64 test pairs. Rows are L2-normalized (PRH convention) unless 'raw'."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    rng = np.random.default_rng(seed)
    if name == "indep_n50_d20x30":
        return _normalize(rng.standard_normal((50, 20))), _normalize(rng.standard_normal((50, 30)))
    if name in ("linear_n50_d20x30", "linear_n50_d30x20_swapped"):
        x = rng.standard_normal((50, 20))
        y = x @ rng.standard_normal((20, 30)) / np.sqrt(20) + 0.5 * rng.standard_normal((50, 30))
        x, y = _normalize(x), _normalize(y)
        return (y, x) if name.endswith("swapped") else (x, y)
    if name == "indep_n40_d200":
        x, y = rng.standard_normal((40, 200)), rng.standard_normal((40, 200))
        return _normalize(x), _normalize(y)
    if name == "linear_n40_d200":
        x = rng.standard_normal((40, 200))
        w = rng.standard_normal((200, 200)) / np.sqrt(200)
        y = x @ w + 0.3 * rng.standard_normal((40, 200))
        return _normalize(x), _normalize(y)
    if name == "same_n50_d20":
        x = _normalize(rng.standard_normal((50, 20)))
        return x, x.copy()
    if name == "raw_linear_n50_d12x16":
        # not normalized, non-zero column means: checks that nothing normalizes silently
        x = 0.3 * rng.standard_normal((50, 12)) + 0.2
        y = x @ rng.standard_normal((12, 16)) / np.sqrt(12) + 0.15 * rng.standard_normal((50, 16))
        return x, y
    if name == "indep_n1024_d64":
        return (
            _normalize(rng.standard_normal((1024, 64))),
            _normalize(rng.standard_normal((1024, 64))),
        )
    if name == "linear_n1024_d64":
        x = rng.standard_normal((1024, 64))
        y = x @ rng.standard_normal((64, 64)) / 8.0 + 0.5 * rng.standard_normal((1024, 64))
        return _normalize(x), _normalize(y)
    raise KeyError(name)


_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def case(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in _CACHE:
        _CACHE[name] = _make_case(name)
    return _CACHE[name]


SMALL_CASES = [
    "indep_n50_d20x30",
    "linear_n50_d20x30",
    "linear_n50_d30x20_swapped",
    "indep_n40_d200",
    "linear_n40_d200",
    "same_n50_d20",
    "raw_linear_n50_d12x16",
]

# (measure name, kwargs)
MEASURES = [
    ("linear_cka", {}),
    ("rbf_cka", {"sigma": 1.0}),
    ("rbf_cka", {"sigma": 0.5}),
    ("rbf_cka", {"sigma": "median"}),
    ("unbiased_cka", {}),
    ("mutual_knn", {"k": 10}),
    ("mutual_knn", {"k": 5}),
    ("cycle_knn", {"k": 10}),
    ("cycle_knn", {"k": 5}),
    ("cknna", {"k": 10}),
    ("cknna", {"k": 5}),
    ("svcca", {"cca_dim": 10}),
    ("svcca", {"cca_dim": 5}),
    ("lcs_knn", {"k": 10}),
    ("lcs_knn", {"k": 5}),
    ("edit_distance_knn", {"k": 10}),
    ("edit_distance_knn", {"k": 5}),
    ("rsa", {}),
]
KNN_MEASURES = {"mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn"}
# measures whose value is exactly 1 for identical x = y
ONE_AT_IDENTITY = [m for m in MEASURES]


def _mid(m) -> str:
    name, kw = m
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


def lib(name: str, x: np.ndarray, y: np.ndarray, **kw) -> torch.Tensor:
    return getattr(F, name)(torch.tensor(x), torch.tensor(y), **kw)


def ref(name: str, x: np.ndarray, y: np.ndarray, **kw) -> float:
    return getattr(R, name)(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), **kw)


def _min_knn_gap(a: np.ndarray, k: int) -> float:
    """Smallest relative gap between consecutive sorted similarities among the top k+1 of each
    row (self excluded): neighbor order/sets are stable under perturbations below it."""
    a = np.asarray(a, dtype=np.float64)
    G = a @ a.T
    np.fill_diagonal(G, -np.inf)
    top = -np.sort(-G, axis=1)[:, : k + 1]
    scale = np.max(np.abs(top))
    return float(np.min(np.abs(np.diff(top, axis=1))) / scale)


# --------------------------------------------------------------------------- float64 vs reference


@pytest.mark.parametrize("cname", SMALL_CASES)
@pytest.mark.parametrize("measure", MEASURES, ids=_mid)
def test_matches_numpy_reference_float64(measure, cname):
    name, kw = measure
    x, y = case(cname)
    got = lib(name, x, y, **kw)
    expected = ref(name, x, y, **kw)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-9), (name, kw, cname)


LARGE = [
    ("linear_cka", {}),
    ("unbiased_cka", {}),
    ("rbf_cka", {"sigma": "median"}),
    ("mutual_knn", {"k": 10}),
    ("cycle_knn", {"k": 10}),
    ("cknna", {"k": 10}),
]


@pytest.mark.parametrize("cname", ["indep_n1024_d64", "linear_n1024_d64"])
@pytest.mark.parametrize("measure", LARGE, ids=_mid)
def test_matches_numpy_reference_n1024(measure, cname):
    name, kw = measure
    x, y = case(cname)
    got = lib(name, x, y, **kw).item()
    expected = ref(name, x, y, **kw)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), (name, kw, cname)


def test_unbiased_cka_can_be_negative_and_is_not_clamped():
    rng = np.random.default_rng(7)  # fixed data, unbiased CKA about -0.029
    x, y = rng.standard_normal((60, 10)), rng.standard_normal((60, 10))
    expected = R.unbiased_cka(x, y)
    got = lib("unbiased_cka", x, y).item()
    if expected >= 0:  # pragma: no cover - data is fixed; guards a change of the generator
        pytest.fail(f"test data no longer gives a negative unbiased CKA ({expected})")
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert got < 0


@pytest.mark.parametrize(
    "name, defaults",
    [
        ("rbf_cka", {"sigma": 1.0}),
        ("mutual_knn", {"k": 10}),
        ("cycle_knn", {"k": 10}),
        ("cknna", {"k": 10}),
        ("svcca", {"cca_dim": 10}),
        ("lcs_knn", {"k": 10}),
        ("edit_distance_knn", {"k": 10}),
    ],
)
def test_default_keyword_values(name, defaults):
    x, y = case("linear_n50_d20x30")
    assert lib(name, x, y).item() == pytest.approx(ref(name, x, y, **defaults), rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------- identical inputs


@pytest.mark.parametrize("cname", ["same_n50_d20", "indep_n40_d200"])
@pytest.mark.parametrize("measure", ONE_AT_IDENTITY, ids=_mid)
def test_identical_inputs_score_one(measure, cname):
    name, kw = measure
    x, _ = case(cname)
    got = lib(name, x, x.copy(), **kw).item()
    assert got == pytest.approx(1.0, abs=1e-6), (name, kw, cname)


# --------------------------------------------------------------------------- float32


@pytest.mark.parametrize(
    "cname", ["indep_n50_d20x30", "linear_n50_d20x30", "linear_n40_d200", "same_n50_d20"]
)
@pytest.mark.parametrize("measure", MEASURES, ids=_mid)
def test_float32_inputs_agree(measure, cname):
    name, kw = measure
    x, y = case(cname)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    if name in KNN_MEASURES:
        # guard: neighbor lists must not hinge on float32 rounding for this fixed data
        gap = min(_min_knn_gap(x32, kw["k"]), _min_knn_gap(y32, kw["k"]))
        if cname != "same_n50_d20":
            assert gap > 2e-6, f"test data has near-tied neighbors (gap {gap}); change the seed"
    got = getattr(F, name)(torch.from_numpy(x32), torch.from_numpy(y32), **kw)
    assert got.is_floating_point()
    expected = ref(name, x32, y32, **kw)
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-4), (name, kw, cname)


# --------------------------------------------------------------------------- output contract


@pytest.mark.parametrize("measure", MEASURES, ids=_mid)
def test_output_is_0dim_and_dtype(measure):
    name, kw = measure
    x, y = case("linear_n50_d20x30")
    out64 = lib(name, x, y, **kw)
    assert isinstance(out64, torch.Tensor)
    assert out64.dim() == 0
    assert out64.dtype == torch.float64
    out32 = getattr(F, name)(
        torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), **kw
    )
    assert isinstance(out32, torch.Tensor)
    assert out32.dim() == 0
    assert out32.is_floating_point()


@pytest.mark.parametrize("measure", MEASURES, ids=_mid)
def test_global_rng_state_unchanged(measure):
    name, kw = measure
    x, y = case("linear_n50_d20x30")
    torch.manual_seed(1234)
    before = torch.get_rng_state().clone()
    lib(name, x, y, **kw)
    x32, y32 = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    getattr(F, name)(x32, y32, **kw)
    after = torch.get_rng_state()
    assert torch.equal(before, after), f"{name} changed the global torch RNG state"


@pytest.mark.parametrize("measure", MEASURES, ids=_mid)
def test_inputs_not_modified(measure):
    name, kw = measure
    x, y = case("raw_linear_n50_d12x16")
    tx, ty = torch.tensor(x), torch.tensor(y)
    cx, cy = tx.clone(), ty.clone()
    getattr(F, name)(tx, ty, **kw)
    assert torch.equal(tx, cx) and torch.equal(ty, cy)


# --------------------------------------------------------------------------- HSIC on grams


def _grams(kind: str):
    x, y = case("linear_n50_d20x30")
    if kind == "linear":
        return R.linear_gram(x), R.linear_gram(y)
    if kind == "rbf":
        return R.rbf_gram(x, 1.0), R.rbf_gram(y, 0.7)
    if kind == "raw_linear":
        xr, yr = case("raw_linear_n50_d12x16")
        return R.linear_gram(xr), R.linear_gram(yr)
    if kind == "masked_nonsymmetric":
        K, L = R.linear_gram(x), R.linear_gram(y)
        M = R.knn_mask(K, 5) * R.knn_mask(L, 5)
        assert not np.allclose(M, M.T)
        return M * K, M * L
    if kind == "masked_self":
        K = R.linear_gram(x)
        MK = R.knn_mask(K, 10)
        return MK * K, MK * K
    if kind == "random_nonsymmetric":
        rng = np.random.default_rng(7)
        return rng.standard_normal((30, 30)), rng.standard_normal((30, 30))
    raise KeyError(kind)


GRAM_KINDS = [
    "linear",
    "rbf",
    "raw_linear",
    "masked_nonsymmetric",
    "masked_self",
    "random_nonsymmetric",
]


def _hsic_tol(K, L) -> float:
    return 1e-12 * float(np.linalg.norm(K) * np.linalg.norm(L))


SYMMETRIC_GRAM_KINDS = ["linear", "rbf", "raw_linear"]


# hsic_biased is specified on (symmetric) gram matrices only; masked/non-symmetric inputs are
# exercised for hsic_unbiased, which CKNNA feeds with non-symmetric masked grams.
@pytest.mark.parametrize("kind", SYMMETRIC_GRAM_KINDS)
def test_hsic_biased_matches_numpy(kind):
    K, L = _grams(kind)
    got = F.hsic_biased(torch.tensor(K), torch.tensor(L))
    assert got.dim() == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(R.hsic_biased(K, L), rel=1e-6, abs=_hsic_tol(K, L))
    # and the self-term
    assert F.hsic_biased(torch.tensor(K), torch.tensor(K)).item() == pytest.approx(
        R.hsic_biased(K, K), rel=1e-6
    )


@pytest.mark.parametrize("kind", GRAM_KINDS)
def test_hsic_unbiased_matches_numpy(kind):
    K, L = _grams(kind)
    got = F.hsic_unbiased(torch.tensor(K), torch.tensor(L))
    assert got.dim() == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(R.hsic_unbiased(K, L), rel=1e-6, abs=_hsic_tol(K, L))


def _exact_hsic_unbiased(K, L):
    """Song et al.'s estimator in exact rational arithmetic (integer grams)."""
    from fractions import Fraction

    n = len(K)
    kt = [[0 if i == j else int(K[i][j]) for j in range(n)] for i in range(n)]
    lt = [[0 if i == j else int(L[i][j]) for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    cross = sum(sum(kt[i][j] for i in range(n)) * sum(lt[j][m] for m in range(n))
                for j in range(n))
    total = Fraction(sum(map(sum, kt)) * sum(map(sum, lt)), (n - 1) * (n - 2))
    return (trace + total - Fraction(2 * cross, n - 2)) / (n * (n - 3))


@pytest.mark.parametrize("offset", [0, 2**20, 2**26, 2**30])
def test_hsic_of_grams_with_a_large_constant_offset(offset):
    """Un-centered grams: HSIC_u ignores a constant added to the off-diagonal entries, but the
    formula's terms cancelled its digits (relative error 0.17 at 2**26, the value 0 at 2**30);
    integer grams above 2**24 gave a float32 0 for biased HSIC."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randint(-3, 4, (12, 3), generator=g) for _ in range(2))
    k, l = offset + s @ s.T, offset + t @ t.T  # int64
    exact = float(_exact_hsic_unbiased(k.tolist(), l.tolist()))
    for kk, ll in ((k, l), (k.double(), l.double())):
        got = F.hsic_unbiased(kk, ll)  # integers that float32 holds exactly stay float32
        assert (got.dtype == torch.float64) == (kk.is_floating_point() or offset > 2**20)
        rel = 1e-9 if got.dtype == torch.float64 else 1e-6
        assert float(got) == pytest.approx(exact, rel=rel)
    # centering takes the offset away
    biased = R.hsic_biased((s @ s.T).double().numpy(), (t @ t.T).double().numpy())
    got = F.hsic_biased(k, l)
    rel = 1e-9 if got.dtype == torch.float64 else 1e-6
    assert float(got) == pytest.approx(biased, rel=rel)


def test_hsic_grams_are_checked_like_features():
    """Detached (no graph kept), NumPy refused by name, NaN blamed on the gram holding it."""
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    k = x @ x.T
    assert F.hsic_unbiased(k, k).grad_fn is None and F.hsic_biased(k, k).grad_fn is None
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        F.hsic_biased(k.detach().numpy(), k)
    bad = k.detach().clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="^l contains NaN/Inf"):
        F.hsic_unbiased(k, bad)


def test_hsic_unbiased_is_not_symmetrised_for_nonsymmetric_input():
    """tr(K~L~) = sum_ij K~_ij L~_ji: for non-symmetric grams it differs from sum_ij K~_ij L~_ij."""
    K, L = _grams("masked_nonsymmetric")
    sym = R.hsic_unbiased((K + K.T) / 2, (L + L.T) / 2)
    exact = R.hsic_unbiased(K, L)
    assert abs(sym - exact) > 1e-6 * abs(exact)  # the test data does distinguish the two
    got = F.hsic_unbiased(torch.tensor(K), torch.tensor(L)).item()
    assert got == pytest.approx(exact, rel=1e-6, abs=_hsic_tol(K, L))


# --------------------------------------------------------------------------- reference self-checks
# Checks of numpy_reference.py itself against independent formulations.


def test_reference_hsic_unbiased_equals_u_statistic():
    """Song et al.: for symmetric grams, eq. 5 equals the mean over ordered distinct 4-tuples of
    K_ij L_ij + K_ij L_qr - 2 K_ij L_iq."""
    rng = np.random.default_rng(0)
    n = 7
    K = R.linear_gram(rng.standard_normal((n, 3)))
    L = R.linear_gram(rng.standard_normal((n, 4)))
    vals = [
        K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        for i, j, q, r in itertools.permutations(range(n), 4)
    ]
    assert R.hsic_unbiased(K, L) == pytest.approx(np.mean(vals), rel=1e-12)


def test_reference_hsic_unbiased_loop_formula():
    rng = np.random.default_rng(3)
    n = 9
    K, L = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    tr = sum(Kt[i, j] * Lt[j, i] for i in range(n) for j in range(n))
    sK, sL = Kt.sum(), Lt.sum()
    sKL = sum(Kt[i, j] * Lt[j, q] for i in range(n) for j in range(n) for q in range(n))
    val = (tr + sK * sL / ((n - 1) * (n - 2)) - 2 * sKL / (n - 2)) / (n * (n - 3))
    assert R.hsic_unbiased(K, L) == pytest.approx(val, rel=1e-12)


def test_reference_linear_cka_feature_space_formula():
    x, y = case("raw_linear_n50_d12x16")
    xc, yc = x - x.mean(0), y - y.mean(0)
    val = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert R.linear_cka(x, y) == pytest.approx(val, rel=1e-12)


def test_reference_rsa_matches_scipy_spearman():
    stats = pytest.importorskip("scipy.stats")
    from scipy.spatial.distance import pdist

    x, y = case("raw_linear_n50_d12x16")
    val = stats.spearmanr(pdist(x, "cosine"), pdist(y, "cosine")).statistic
    assert R.rsa(x, y) == pytest.approx(val, rel=1e-10)
    v = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    np.testing.assert_allclose(R.average_ranks(v), stats.rankdata(v))


def test_reference_knn_and_sequence_helpers():
    x, _ = case("raw_linear_n50_d12x16")
    G = x @ x.T
    np.fill_diagonal(G, -np.inf)
    np.testing.assert_array_equal(R.knn_indices(x, 7), np.argsort(-G, axis=1)[:, :7])
    assert R.lcs_length([1, 2, 3, 4], [2, 4, 3]) == 2
    assert R.levenshtein([1, 2, 3], [1, 3, 2]) == 2
    assert R.levenshtein("kitten", "sitting") == 3


def test_reference_svcca_rotation_invariant_and_cca_form():
    x, y = case("linear_n50_d20x30")
    # scaling all columns by the same factor and adding column offsets changes nothing
    base = R.svcca(x, y, cca_dim=10)
    assert R.svcca(3.0 * x + 1.0, y, cca_dim=10) == pytest.approx(base, rel=1e-10)
    # cca_dim = d of both sides -> plain CCA on standardized data: mean of canonical correlations
    xs = (x - x.mean(0)) / x.std(0)
    ys = (y - y.mean(0)) / y.std(0)
    qx, _ = np.linalg.qr(xs)
    qy, _ = np.linalg.qr(ys[:, :20])
    rho = np.linalg.svd(qx.T @ qy, compute_uv=False)
    assert R.svcca(x, y[:, :20], cca_dim=20) == pytest.approx(rho.mean(), rel=1e-10)


def test_hsic_biased_non_symmetric_matches_numpy():
    """tr(K H L H) for non-symmetric matrices (tr(KᵀHLH) would differ here)."""
    rng = np.random.default_rng(7)
    K, L = rng.standard_normal((30, 30)), rng.standard_normal((30, 30))
    got = F.hsic_biased(torch.tensor(K), torch.tensor(L)).item()
    assert got == pytest.approx(R.hsic_biased(K, L), rel=1e-9)
    assert abs(R.hsic_biased(K.T, L) - R.hsic_biased(K, L)) > 1.0  # the data tells them apart


def test_hsic_rejects_nan_grams():
    K = torch.eye(6, dtype=torch.float64)
    L = K.clone()
    L[0, 1] = float("nan")
    for fn in (F.hsic_biased, F.hsic_unbiased):
        with pytest.raises(ValueError, match="NaN/Inf"):
            fn(K, L)


@pytest.mark.parametrize("size", [1, 2, 7, 8, 64, 1000])
@pytest.mark.parametrize("values", ["continuous", "few distinct", "constant"])
def test_median_equals_numpy(size: int, values: str) -> None:
    """kernels.median (one selection plus a pass for the upper middle value) equals NumPy's
    median, odd and even counts, with and without ties among the middle values."""
    from alignment_callback.functional.kernels import median

    rng = np.random.default_rng(size)
    if values == "continuous":
        a = rng.standard_normal(size)
    elif values == "few distinct":
        a = rng.integers(0, 3, size).astype(float)
    else:
        a = np.full(size, 2.5)
    for dtype in (torch.float32, torch.float64):
        t = torch.tensor(a, dtype=dtype)
        assert float(median(t.reshape(-1, 1) if size % 2 else t)) == pytest.approx(
            float(np.median(t.double().numpy())), rel=1e-7 if dtype == torch.float32 else 1e-15)
    ints = torch.tensor(np.round(4 * a)).long()
    assert float(median(ints)) == float(np.median(ints.numpy()))


@pytest.mark.parametrize("block", [1, 50, 1000, 1 << 22])
def test_rsa_rank_matrix_filled_in_blocks_of_rows_matches_numpy(monkeypatch, block):
    """The upper triangle of the rank matrix is filled a block of rows at a time (few kernel
    launches on a GPU): one row per block, uneven last blocks and a single block give the
    same RSA as NumPy's Spearman correlation of the condensed distances."""
    from alignment_callback.functional import gram_measures

    monkeypatch.setattr(gram_measures, "_TRIANGLE_BLOCK", block)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 5, generator=g, dtype=torch.float64)
    y = x + torch.randn(37, 5, generator=g, dtype=torch.float64)
    assert float(F.rsa(x, y)) == pytest.approx(R.rsa(x.numpy(), y.numpy()), rel=1e-10)
