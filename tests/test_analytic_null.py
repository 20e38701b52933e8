"""``null="moments"`` / ``"auto"`` through the pipeline: the analytic null (exact permutation
moments + Pearson III) agrees with a large permutation null, ``"auto"`` falls back to
permutations where the approximation is not validated, the result records which method was
used, a linear kernel at d < n never builds an n×n matrix, and n×n measures too large for
memory are refused before allocating.  The moments themselves are tested in test_moments.py.
kNN measures keep the permutation test; with ``"auto"`` the reported ``null_mean`` (exact for
mutual kNN, cycle kNN and CKNNA) and ``null_std`` (exact for mutual kNN, the K permutations'
otherwise) are checked against all 8! permutations and against 20000 of them."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional import moments as mo
from alignment_callback.functional import pipeline
from alignment_callback.functional.gram_measures import FeatureState
from alignment_callback.functional.neighbors import neighbor_lists, tie_keys
from alignment_callback.metrics import CalibratedAlignment

GRAM = ("linear_cka", "rbf_cka", "unbiased_cka", "rsa")


def data(n=256, d=32, signal=0.0, seed=0, kind="gauss"):
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(n, d, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "t3":  # heavy tails: Student t with 3 degrees of freedom
        draw = lambda: torch.distributions.StudentT(3.0).sample((n, d)).double()  # noqa: E731
        torch.manual_seed(seed)
    x = draw()
    y = signal * x[:, :d] + draw()
    return x, y


@pytest.mark.parametrize("name", GRAM)
@pytest.mark.parametrize("signal", [0.0, 0.08])
def test_moments_p_value_and_threshold_agree_with_20000_permutations(name, signal):
    x, y = data(signal=signal, seed=1)
    kw = {"sigma": "median"} if name == "rbf_cka" else {}
    perm = F.calibrated_alignment(x, y, name, 20_000, seed=0, **kw)
    mom = F.calibrated_alignment(x, y, name, null="moments", **kw)
    assert mom.null_method == "moments" and mom.null.numel() == 0
    assert float(mom.raw) == pytest.approx(float(perm.raw), rel=1e-12)
    assert abs(float(mom.p_value) - float(perm.p_value)) <= 0.01 + 0.02 * float(perm.p_value)
    assert float(mom.threshold) == pytest.approx(float(perm.threshold), rel=0.05, abs=2e-4)
    assert float(mom.null_mean) == pytest.approx(float(perm.null_mean), rel=0.01, abs=1e-4)
    assert float(mom.null_std) == pytest.approx(float(perm.null_std), rel=0.05)


def test_auto_uses_moments_where_validated_and_permutations_elsewhere():
    x, y = data(n=128, d=16, seed=2)
    assert F.calibrated_alignment(x, y, "linear_cka", 50, null="auto").null_method == "moments"
    small = F.calibrated_alignment(x[:20], y[:20], "linear_cka", 50, null="auto")
    assert small.null_method == "permutation"  # n < 32
    xs, ys = data(n=128, d=16, seed=3)
    xs[0] *= 40
    ys[0] *= 40  # an outlying sample on both sides: the null is a mixture
    assert F.calibrated_alignment(xs, ys, "linear_cka", 50, null="auto").null_method == "permutation"
    layers = F.calibrated_layer_alignment([x, x[:, :8]], [y], "linear_cka", num_permutations=20,
                                          null="auto")
    assert layers.null_method == "permutation" and layers.null.numel() == 20


def test_moments_outside_the_validated_range_warns():
    x, y = data(n=128, d=16, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the rule: silent
        F.calibrated_alignment(x, y, "linear_cka", null="moments")
    with pytest.warns(RuntimeWarning, match=r"outside the range .* here n=20"):
        small = F.calibrated_alignment(x[:20], y[:20], "linear_cka", null="moments")
    assert small.null_method == "moments"  # asked for, used, flagged
    xs, ys = data(n=128, d=16, seed=3)
    xs[0] *= 40
    ys[0] *= 40
    with pytest.warns(RuntimeWarning, match="null='auto' or null='permutation'"):
        F.calibrated_alignment(xs, ys, "linear_cka", null="moments")


def test_moments_where_they_do_not_apply_is_a_clear_error():
    x, y = data(n=64, d=8)
    with pytest.raises(ValueError, match="null='moments' cannot calibrate mutual_knn: it has no "
                                         "analytic null"):
        F.calibrated_alignment(x, y, "mutual_knn", null="moments")
    with pytest.raises(ValueError, match="needs their joint permutation null"):
        F.calibrated_layer_alignment([x, x], [y], "linear_cka", null="moments")
    with pytest.raises(ValueError, match="null must be one of"):
        F.calibrated_alignment(x, y, "linear_cka", null="analytic")


def test_auto_reports_the_exact_knn_permutation_mean():
    x, y = data(n=100, d=6, seed=4)
    res = F.calibrated_alignment(x, y, "mutual_knn", 200, null="auto", k=5)
    assert res.null_method == "permutation (exact mean)"
    assert float(res.null_mean) == pytest.approx(5 / 99, rel=1e-12)
    perm = F.calibrated_alignment(x, y, "mutual_knn", 200, k=5)
    assert float(res.p_value) == float(perm.p_value)  # the test itself is the permutation one
    assert float(perm.null_mean) == pytest.approx(5 / 99, abs=4 * float(perm.null_std) / 200**0.5)


def test_linear_kernel_at_d_below_n_stays_in_feature_space():
    x, y = data(n=600, d=20, signal=0.1, seed=5)
    measure = F.get_measure("linear_cka")
    xside, yside = pipeline._sides(x, y, [measure], "moments")
    assert isinstance(xside.states[measure][0], FeatureState)
    res = pipeline.calibrate_prepared([measure], xside, yside, F.Permutations(600, 5),
                                      null="moments")[measure]
    grams = F.calibrated_alignment(x, y, "linear_cka", 5, null="moments")
    gram_side, _ = pipeline._sides(x, y, [measure], "permutation")
    assert not isinstance(gram_side.states[measure][0], FeatureState)
    for key in ("raw", "p_value", "threshold", "calibrated"):
        assert float(getattr(res, key)) == pytest.approx(float(getattr(grams, key)), rel=1e-9, abs=1e-12)


def test_auto_falls_back_to_grams_when_the_feature_route_is_not_valid():
    x, y = data(n=200, d=10, seed=6)
    x[0] *= 50
    y[0] *= 50
    res = F.calibrated_alignment(x, y, "linear_cka", 30, null="auto")
    assert res.null_method == "permutation" and res.null.numel() == 30
    expected = F.calibrated_alignment(x, y, "linear_cka", 30)
    assert float(res.p_value) == float(expected.p_value)


def test_n_by_n_measures_too_large_for_memory_are_refused(monkeypatch):
    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: 1 << 20)  # 1 MiB free
    x, y = data(n=512, d=8)
    with pytest.raises(MemoryError, match=r"rbf_cka at n=512 needs about 8\.0 MiB .* only 1\.0 MiB "
                                          r"is available .* null='moments'"):
        F.calibrated_alignment(x, y, "rbf_cka", 10)
    # the linear kernel in feature space needs no n×n matrix
    assert F.calibrated_alignment(x, y, "linear_cka", null="moments").null_method == "moments"


def test_null_argument_reaches_every_entry_point():
    x, y = data(n=128, d=16, signal=0.1, seed=7)
    expected = F.calibrated_alignment(x, y, "unbiased_cka", null="moments")
    metric = CalibratedAlignment("unbiased_cka", null="moments", preprocess=False)
    metric.update(x, y)
    assert float(metric.compute()["p_value"]) == pytest.approx(float(expected.p_value), abs=1e-12)
    assert metric.last_result.null_method == "moments"
    engine = AlignmentEngine(["unbiased_cka", "mutual_knn"], null="auto", preprocess=False,
                             num_permutations=50)
    engine.set_reference({"y": y})
    step = engine.step({"x": x}).results
    assert step["unbiased_cka"].null_method == "moments"
    assert step["mutual_knn"].null_method == "permutation (exact mean)"
    assert float(step["unbiased_cka"].p_value) == pytest.approx(float(expected.p_value), abs=1e-12)


# ------------------------------------------------------------ kNN: null_mean and null_std
KNN = ("mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn")
EXACT_MEAN = ("mutual_knn", "cycle_knn", "cknna")  # "auto" reports their exact mean


def _np_knn_mask(a: np.ndarray, k: int, keys: np.ndarray) -> np.ndarray:
    """M_ij = 1 iff j is one of the k rows j != i of largest <a_i, a_j> (exact ties to the
    lower key), from the definition in float64."""
    sim = a @ a.T
    n = sim.shape[0]
    m = np.zeros((n, n))
    for i in range(n):
        order = np.lexsort((keys, -sim[i]))
        m[i, order[order != i][:k]] = 1.0
    return m


def _np_hsic_u(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of zero-diagonal (..., n, n) matrices."""
    n = a.shape[-1]
    trace = (a * np.swapaxes(b, -1, -2)).sum((-1, -2))
    cross = (a.sum(-2) * b.sum(-1)).sum(-1)  # 1'AB1 = sum_j colsum(A)_j rowsum(B)_j
    total = a.sum((-1, -2)) * b.sum((-1, -2))
    return (trace + total / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def _enumerated_null(name: str, x: torch.Tensor, y: torch.Tensor, k: int) -> np.ndarray:
    """The measure on y[pi] for every one of the n! permutations pi (float64 NumPy).

    Y[pi]'s neighbors are pi^-1(N_Y(pi(i))) (tie keys travel with the rows), so its kNN
    adjacency is M_Y[pi][:, pi]."""
    a, b = x.double().numpy(), y.double().numpy()
    n = a.shape[0]
    mx = _np_knn_mask(a, k, tie_keys(n, "x", data=x).numpy())
    my = _np_knn_mask(b, k, tie_keys(n, "y", data=y).numpy())
    perms = np.array(list(itertools.permutations(range(n))))
    myp = my[perms[:, :, None], perms[:, None, :]]  # (n!, n, n)
    if name == "mutual_knn":  # mean_i |N_X(i) & N_Y(i)| / k
        return (mx * myp).sum((1, 2)) / (n * k)
    if name == "cycle_knn":  # mean_i 1[exists j in N_Y(i): i in N_X(j)]
        return ((myp * mx.T).sum(2) > 0).mean(1)
    assert name == "cknna"
    gk, gl = a @ a.T, b @ b.T
    np.fill_diagonal(gk, 0.0)
    np.fill_diagonal(gl, 0.0)
    glp = gl[perms[:, :, None], perms[:, None, :]]
    mask = mx * myp
    numerator = _np_hsic_u(mask * gk, mask * glp)
    return numerator / math.sqrt(_np_hsic_u(mx * gk, mx * gk) * _np_hsic_u(my * gl, my * gl))


def _tiny(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "ternary":  # exact ties, broken by each side's keys
        return (torch.randint(-1, 2, (8, 3), generator=g).double(),
                torch.randint(-1, 2, (8, 3), generator=g).double())
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return x, 0.6 * x + torch.randn(8, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind,seed", [("gauss", 0), ("gauss", 1), ("ternary", 2)])
def test_auto_knn_moments_equal_the_enumerated_permutation_distribution(kind, seed):
    """n = 8: every one of the 8! permutations.  mutual kNN's reported null_mean and null_std
    are the mean and (population) std of the exact permutation distribution; cycle kNN's and
    CKNNA's null_mean its exact mean."""
    x, y = _tiny(kind, seed)
    for name in EXACT_MEAN:
        k = 3 if name == "cknna" else 2
        exact = _enumerated_null(name, x, y, k)
        res = F.calibrated_alignment(x, y, name, 300, seed=seed, null="auto", k=k)
        assert res.null_method == "permutation (exact mean)", name
        assert float(res.null_mean) == pytest.approx(float(exact.mean()), rel=1e-12, abs=1e-14), name
        if name == "mutual_knn":
            assert float(res.null_mean) == pytest.approx(k / 7, rel=1e-13)
            assert float(res.null_std) == pytest.approx(float(exact.std()), rel=1e-10), name
        else:  # not derived: the std of the K permutation values
            assert float(res.null_std) == pytest.approx(float(np.std(res.null.numpy(), ddof=1)),
                                                        rel=1e-12), name
        assert float(res.raw) == pytest.approx(float(getattr(F, name)(x, y, k=k)), rel=1e-12)


def test_auto_cknna_reports_the_permutation_mean_when_its_values_were_clamped():
    """CKNNA can pass 1 at small n, and calibration clamps the score and the null to [−1, 1];
    its exact mean is the unclamped statistic's (0.83 against 0.60 for the null reported at
    n = 6, k = 3), so "auto" reports the permutations' mean then."""
    rng = np.random.default_rng(0)
    perms = F.permutations(6, 200, 0)
    for _ in range(200):
        x, y = (torch.as_tensor(rng.standard_normal((6, 3))) for _ in range(2))
        plain = np.array([float(F.cknna(x, y[p], k=3)) for p in perms])
        if (plain > 1).mean() > 0.05:
            break
    assert (plain > 1).mean() > 0.05  # data whose null the clamp changes
    res = F.calibrated_alignment(x, y, "cknna", 200, null="auto", k=3)
    assert res.null_method == "permutation"
    assert float(res.null.max()) == 1.0
    assert float(res.null_mean) == pytest.approx(float(res.null.mean()), rel=1e-12)


@pytest.mark.parametrize("name", KNN)
def test_auto_reports_each_knn_measures_null_std(name):
    """Through ``calibrated_alignment(null="auto")``: mutual kNN's null_std is the functional
    moments' std (``mutual_knn_moments``), the others' the (K − 1) std of their permutation
    null; the effect size uses the reported mean and std; the test itself (null, p-value, τ,
    calibrated score) is the permutation one."""
    x, y = data(n=90, d=6, signal=0.3, seed=8)
    k, K = 5, 300
    auto = F.calibrated_alignment(x, y, name, K, seed=1, null="auto", k=k)
    perm = F.calibrated_alignment(x, y, name, K, seed=1, k=k)
    assert torch.equal(auto.null, perm.null) and auto.null.shape == (K,)
    for key in ("raw", "p_value", "threshold", "calibrated", "percentile"):
        assert float(getattr(auto, key)) == float(getattr(perm, key)), key
    sample = perm.null.numpy()
    assert float(perm.null_mean) == pytest.approx(float(sample.mean()), rel=1e-12)
    assert float(perm.null_std) == pytest.approx(float(sample.std(ddof=1)), rel=1e-10)
    lx, ly = neighbor_lists(x, k, "x"), neighbor_lists(y, k, "y")
    if name == "mutual_knn":
        m = mo.mutual_knn_moments(mo.knn_graph_invariants(lx.indices),
                                  mo.knn_graph_invariants(ly.indices))
        mean, std = m.mean, m.std
        assert std > 0 and float(auto.null_std) == pytest.approx(std, rel=1e-12)
        assert float(auto.null_std) != float(perm.null_std)  # exact, not the sample's
    else:
        std = float(perm.null_std)
        assert float(auto.null_std) == std
        if name == "cycle_knn":
            mean = mo.cycle_knn_mean(lx.indices, k)
        elif name == "cknna":
            mean = mo.cknna_mean(lx.indices, lx.values, ly.indices, ly.values)
        else:  # no exact moments: the permutation result unchanged
            assert auto.null_method == "permutation"
            assert auto.as_dict() == perm.as_dict()
            return
    assert auto.null_method == "permutation (exact mean)"
    assert float(auto.null_mean) == pytest.approx(mean, rel=1e-12)
    assert float(auto.effect_size) == pytest.approx((float(auto.raw) - mean) / std, rel=1e-9)
    assert auto.null_std.dtype == auto.raw.dtype == torch.float64


def _std_standard_error(null: np.ndarray) -> float:
    """Standard error of the sample std of K iid values: sqrt(Var(s²)) / (2s), with
    Var(s²) ≈ (m4 − s⁴ (K − 3)/(K − 1)) / K from the sample's own fourth moment."""
    k = null.size
    s2 = null.var(ddof=1)
    m4 = np.mean((null - null.mean()) ** 4)
    return math.sqrt((m4 - s2 ** 2 * (k - 3) / (k - 1)) / k) / (2.0 * math.sqrt(s2))


@pytest.mark.parametrize("name", EXACT_MEAN)
def test_auto_knn_mean_and_std_agree_with_20000_permutations(name):
    """The exact mean (and mutual kNN's exact std) against K = 20000 iid permutations at
    n = 40: within 5 standard errors (two-sided normal tail ~6e-7 per check)."""
    x, y = data(n=40, d=5, signal=0.2, seed=9)
    k, K = 4, 20_000
    res = F.calibrated_alignment(x, y, name, K, seed=2, null="auto", k=k)
    null = res.null.numpy()
    assert null.shape == (K,) and res.null_method == "permutation (exact mean)"
    sd = float(null.std(ddof=1))
    assert abs(float(res.null_mean) - float(null.mean())) <= 5.0 * sd / math.sqrt(K)
    if name == "mutual_knn":
        assert float(res.null_mean) == pytest.approx(k / 39, rel=1e-12)
        assert abs(float(res.null_std) - sd) <= 5.0 * _std_standard_error(null)
        assert abs(float(res.null_std) / sd - 1.0) < 0.05  # and the error bound is meaningful
    else:
        assert float(res.null_std) == pytest.approx(sd, rel=1e-10)
