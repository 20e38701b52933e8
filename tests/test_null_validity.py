"""Statistical validity of the permutation calibration (docs/calibration.md).

(a) Under independence the test is valid: P(p <= alpha) <= alpha and P(calibrated > 0) <= alpha,
    for every measure, at small and large d/n.
(b) A planted shared signal is detected.
(c) The width confounder: raw linear CKA of independent data grows like d/(n + d), calibrated
    stays 0; exact permutation means of linear CKA and mutual kNN.

Everything uses fixed seeds, so the outcomes are deterministic; the tolerances are 3-sigma
binomial / standard-error bands.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from tests import numpy_reference  # noqa: E402



ALPHA = 0.05
KNN = {"mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn"}
CONTINUOUS = {"linear_cka", "rbf_cka", "unbiased_cka", "rsa", "svcca"}
MEASURES = sorted(numpy_reference.MEASURES)  # the default suite plus rsa and svcca (new
# families: tests/test_family_measures.py)
N = 64


def _kw(name: str) -> dict:
    return {"cca_dim": 5} if name == "svcca" else {}


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, dim=1)


def _independent(n: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, d, generator=g, dtype=dtype)
    return x, y


def _band(rate_level: float, reps: int) -> float:
    return rate_level + 3.0 * math.sqrt(rate_level * (1.0 - rate_level) / reps)


# --------------------------------------------------------------------------- (a) validity


@pytest.mark.parametrize("d", [16, 64, 256])  # d/n = 0.25, 1, 4
@pytest.mark.parametrize("name", MEASURES)
def test_type_one_error_under_independence(name, d):
    R, K = 150, 39  # p = (1 + c)/40: mass exactly 0.05, 0.2 and 0.5 at the levels tested
    p_values, calibrated = [], []
    for r in range(R):
        x, y = _independent(N, d, seed=100_000 * d + r)
        res = F.calibrated_alignment(_normalize(x), _normalize(y), name, num_permutations=K,
                                     alpha=ALPHA, seed=r, **_kw(name))
        p_values.append(float(res.p_value))
        calibrated.append(float(res.calibrated))
    p = np.array(p_values)
    cal = np.array(calibrated)
    assert np.all((p >= 1 / (K + 1) - 1e-12) & (p <= 1 + 1e-12))
    assert np.mean(p <= ALPHA) <= _band(ALPHA, R), np.mean(p <= ALPHA)
    assert np.mean(cal > 0) <= _band(ALPHA, R), np.mean(cal > 0)
    assert np.median(cal) == 0.0
    # super-uniform at other levels too
    for level in (0.2, 0.5):
        assert np.mean(p <= level) <= _band(level, R)
    if name in CONTINUOUS:
        # no ties: p is (close to) uniform, so the test is not trivially conservative either
        for level in (0.2, 0.5):
            assert np.mean(p <= level) >= level - 3.0 * math.sqrt(level * (1 - level) / R)


# --------------------------------------------------------------------------- (b) power


@pytest.mark.parametrize("name", MEASURES)
def test_planted_signal_is_detected(name):
    g = torch.Generator().manual_seed(7)
    n, d = 64, 32
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 48, generator=g, dtype=torch.float64) / d**0.5
    y = x @ w + 0.1 * torch.randn(n, 48, generator=g, dtype=torch.float64)
    K = 200
    res = F.calibrated_alignment(_normalize(x), _normalize(y), name, num_permutations=K,
                                 seed=1, **_kw(name))
    assert float(res.p_value) == pytest.approx(1 / (K + 1), abs=1e-15)
    assert float(res.percentile) == 100.0
    assert float(res.effect_size) > 3.0
    if name in ("linear_cka", "rbf_cka", "unbiased_cka", "rsa"):
        assert float(res.calibrated) > 0.5
    else:
        assert float(res.calibrated) > 0.0
    assert float(res.raw) > float(res.threshold)


def test_planted_signal_float32():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 32, generator=g)
    y = x @ torch.randn(32, 32, generator=g) / 32**0.5 + 0.1 * torch.randn(64, 32, generator=g)
    for name in ("linear_cka", "mutual_knn", "cknna"):
        res = F.calibrated_alignment(_normalize(x), _normalize(y), name, num_permutations=100)
        assert res.raw.dtype == torch.float32
        assert float(res.p_value) == pytest.approx(1 / 101, abs=1e-7)
        assert float(res.calibrated) > 0


# --------------------------------------------------------------------------- (c) width confounder


def test_width_confounder_raw_grows_calibrated_stays_zero():
    n, R, K = 64, 20, 100
    means, cal_rates, cal_medians = [], [], []
    for ratio in (0.25, 1, 4, 8):
        d = int(ratio * n)
        raws, cals = [], []
        for r in range(R):
            x, y = _independent(n, d, seed=7_000_000 + 1000 * d + r)
            res = F.calibrated_alignment(x, y, "linear_cka", num_permutations=K, seed=r)
            raws.append(float(res.raw))
            cals.append(float(res.calibrated))
        means.append(np.mean(raws))
        cal_rates.append(np.mean(np.array(cals) > 0))
        cal_medians.append(np.median(cals))
        # docs/calibration.md: raw linear CKA of independent Gaussians ~ d / (n + d)
        assert np.mean(raws) == pytest.approx(d / (n + d), abs=0.03), (d, np.mean(raws))
    assert all(b > a for a, b in zip(means, means[1:])), means  # strictly increasing
    assert means[-1] > 0.85  # "looks aligned" ...
    assert cal_medians == [0.0, 0.0, 0.0, 0.0]  # ... but calibrated stays 0
    assert max(cal_rates) <= _band(ALPHA, R), cal_rates


def _centered_linear_gram(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(0, keepdims=True)
    return xc @ xc.T


@pytest.mark.parametrize("case", ["independent", "related", "normalized"])
def test_linear_cka_permutation_mean_exact_formula(case):
    g = torch.Generator().manual_seed({"independent": 1, "related": 2, "normalized": 3}[case])
    n = 48
    x = torch.randn(n, 20, generator=g, dtype=torch.float64) + 0.3
    if case == "related":
        y = x[:, :12] ** 2 + 0.5 * torch.randn(n, 12, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(n, 12, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 12, dtype=torch.float64)
    if case == "normalized":
        x, y = _normalize(x), _normalize(y)
    K = 2000
    null = F.permutation_null(x, y, "linear_cka", K, seed=5).numpy()
    kc, lc = _centered_linear_gram(x.numpy()), _centered_linear_gram(y.numpy())
    expected = np.trace(kc) * np.trace(lc) / ((n - 1) * np.linalg.norm(kc) * np.linalg.norm(lc))
    se = null.std(ddof=1) / math.sqrt(K)
    assert abs(null.mean() - expected) <= 3.5 * se, (null.mean(), expected, se)
    assert se < 0.01 * expected  # the check is sharp: the band is far narrower than the value


@pytest.mark.parametrize("d", [4, 64])
def test_mutual_knn_expected_value_under_independence(d):
    n, k, R = 32, 5, 600
    vals = np.empty(R)
    for r in range(R):
        x, y = _independent(n, d, seed=50_000 * d + r)
        vals[r] = float(F.mutual_knn(_normalize(x), _normalize(y), k=k))
    expected = k / (n - 1)
    se = vals.std(ddof=1) / math.sqrt(R)
    assert abs(vals.mean() - expected) <= 3 * se, (vals.mean(), expected, se)
    assert se < 0.05 * expected


def test_mutual_knn_permutation_mean_is_k_over_n_minus_1():
    # for any fixed data, pi^{-1}(N_Y(pi(i))) is a uniform k-subset of the other rows
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 10, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(40, 10, generator=g, dtype=torch.float64)  # related data
    K, k = 4000, 6
    null = F.permutation_null(x, y, "mutual_knn", K, seed=2, k=k).numpy()
    se = null.std(ddof=1) / math.sqrt(K)
    assert abs(null.mean() - k / 39) <= 3 * se, (null.mean(), k / 39, se)
    assert float(F.mutual_knn(x, y, k=k)) > k / 39 + 10 * null.std()
