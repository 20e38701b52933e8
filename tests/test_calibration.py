"""Permutation calibration (docs/calibration.md) against a hand-written float64 NumPy reference
and against the authors' package ``calibrated-similarity`` (the conformance oracle)."""

from __future__ import annotations

import functools
import math

import calibrated_similarity as oracle
import numpy as np
import pytest
import torch

import alignment_callback.functional as F



# --------------------------------------------------------------------------- NumPy reference


def ref_calibrate(s: float, null, alpha: float = 0.05, smax: float | None = 1.0) -> dict:
    """docs/calibration.md, written out literally in float64 NumPy."""
    null = np.asarray(null, dtype=np.float64)
    K = null.size
    combined = np.sort(np.concatenate([[s], null]))
    rank = math.ceil((1.0 - alpha) * (K + 1))  # 1-based order statistic
    rank = min(max(rank, 1), K + 1)
    tau = combined[rank - 1]
    p = (1 + np.sum(null >= s)) / (K + 1)
    if smax is None:
        cal = max(s - tau, 0.0)
    elif s <= tau:
        cal = 0.0
    elif smax - tau <= 0:
        cal = 1.0
    else:
        cal = min((s - tau) / (smax - tau), 1.0)
    mean = null.mean()
    std = null.std(ddof=1) if K > 1 else 0.0
    if std > 0:
        z = (s - mean) / std
    else:
        z = 0.0 if s == mean else math.copysign(math.inf, s - mean)
    pct = 100.0 * (np.sum(null < s) + 0.5 * np.sum(null == s)) / K
    return {"threshold": tau, "p_value": p, "calibrated": cal, "null_mean": mean,
            "null_std": std, "effect_size": z, "percentile": pct, "raw": s}


def _assert_matches(res: F.CalibrationResult, ref: dict, atol: float = 1e-12) -> None:
    for key, want in ref.items():
        got = float(getattr(res, key))
        if math.isinf(want):
            assert got == want, (key, got, want)
        else:
            assert got == pytest.approx(want, abs=atol, rel=0), (key, got, want)


# --------------------------------------------------------------------------- calibrate() vs reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("K", [1, 2, 3, 5, 19, 20, 50, 200, 499])
@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.1, 0.5])
def test_calibrate_matches_reference_continuous(K, alpha, seed):
    rng = np.random.default_rng(1000 * K + seed)
    null = rng.uniform(0.1, 0.6, K)
    s = float(rng.uniform(0.0, 0.9))
    res = F.calibrate(torch.tensor(s, dtype=torch.float64), torch.tensor(null), alpha=alpha)
    _assert_matches(res, ref_calibrate(s, null, alpha))
    assert res.null.shape == (K,)
    assert 0.0 <= float(res.calibrated) <= 1.0
    assert 1.0 / (K + 1) - 1e-15 <= float(res.p_value) <= 1.0


@pytest.mark.parametrize("seed", range(10))
def test_calibrate_with_ties(seed):
    """Discrete null values (as kNN measures produce) and an observed value tied with some."""
    rng = np.random.default_rng(seed)
    K = int(rng.integers(10, 300))
    null = rng.integers(0, 12, K) / 40.0  # many repeated values
    s = float(rng.choice(null))  # tied with at least one null value
    for alpha in (0.05, 0.2):
        res = F.calibrate(s, torch.tensor(null), alpha=alpha)
        ref = ref_calibrate(s, null, alpha)
        _assert_matches(res, ref)
        # ties count as ">=": p includes every null value equal to s
        assert float(res.p_value) == pytest.approx((1 + np.sum(null >= s)) / (K + 1), abs=1e-15)


def test_ties_at_the_threshold_give_zero():
    null = torch.tensor([0.2] * 50 + [0.5] * 150, dtype=torch.float64)
    res = F.calibrate(0.5, null)  # tau = 0.5 = s -> calibrated 0, p = 151/201
    assert float(res.threshold) == 0.5
    assert float(res.calibrated) == 0.0
    assert float(res.p_value) == pytest.approx(151 / 201, abs=1e-15)
    assert float(res.percentile) == pytest.approx(100 * (50 + 75) / 200, abs=1e-12)


def test_method_md_example_K200_alpha005_is_191st_of_201():
    rng = np.random.default_rng(42)
    null = rng.permutation(np.arange(200, dtype=np.float64)) / 1000.0  # 0.000 .. 0.199
    s = 0.5  # the largest of the 201
    res = F.calibrate(s, torch.tensor(null), alpha=0.05)
    combined = np.sort(np.concatenate([[s], null]))
    assert float(res.threshold) == combined[190]  # 191st smallest
    assert float(res.threshold) == pytest.approx(0.190, abs=1e-15)
    assert float(res.p_value) == pytest.approx(1 / 201, abs=1e-15)
    assert float(res.calibrated) == pytest.approx((0.5 - 0.19) / (1 - 0.19), abs=1e-14)
    # s in the middle of the null: tau is still the 191st value of the combined multiset
    s = 0.1005
    res = F.calibrate(s, torch.tensor(null), alpha=0.05)
    assert float(res.threshold) == np.sort(np.concatenate([[s], null]))[190]
    assert float(res.threshold) == pytest.approx(0.189, abs=1e-15)
    assert float(res.calibrated) == 0.0
    assert float(res.p_value) == pytest.approx((1 + 99) / 201, abs=1e-15)


def test_order_statistic_not_interpolated_quantile():
    # K=19, alpha=0.05: ceil(0.95 * 20) = 19 -> tau = 19th of 20 (second largest)
    null = np.arange(1, 20, dtype=np.float64) / 100.0  # 0.01 .. 0.19
    res = F.calibrate(0.5, torch.tensor(null), alpha=0.05)
    assert float(res.threshold) == pytest.approx(0.19, abs=1e-15)
    interp = float(np.quantile(null, 0.95))
    assert abs(float(res.threshold) - interp) > 1e-4


def test_tiny_K():
    # K=1: tau is the larger of {s, s_1}: calibrated > 0 is impossible, p in {1/2, 1}
    for s, s1 in ((0.9, 0.1), (0.1, 0.9), (0.4, 0.4)):
        res = F.calibrate(s, torch.tensor([s1], dtype=torch.float64))
        _assert_matches(res, ref_calibrate(s, [s1]))
        assert float(res.calibrated) == 0.0
        assert float(res.threshold) == max(s, s1)
        assert float(res.null_std) == 0.0
    assert float(F.calibrate(0.9, torch.tensor([0.1])).p_value) == pytest.approx(0.5)
    # K=2 with alpha large enough to leave room above tau
    res = F.calibrate(0.9, torch.tensor([0.1, 0.3], dtype=torch.float64), alpha=0.5)
    # ceil(0.5 * 3) = 2 -> tau = 0.3
    assert float(res.threshold) == pytest.approx(0.3)
    assert float(res.calibrated) == pytest.approx((0.9 - 0.3) / 0.7)


def test_max_score_none_and_custom():
    rng = np.random.default_rng(3)
    null = rng.normal(2.0, 1.0, 100)
    for s in (1.0, 4.5, 10.0):
        res = F.calibrate(s, torch.tensor(null), max_score=None)
        ref = ref_calibrate(s, null, smax=None)
        _assert_matches(res, ref)
        assert float(res.calibrated) == pytest.approx(max(s - ref["threshold"], 0.0))
    # a custom bound
    res = F.calibrate(4.5, torch.tensor(null), max_score=6.0)
    _assert_matches(res, ref_calibrate(4.5, null, smax=6.0))


def test_calibrated_clamped_to_one_and_one_at_smax():
    null = torch.linspace(0.0, 0.3, 100, dtype=torch.float64)
    assert float(F.calibrate(1.0, null).calibrated) == 1.0
    assert float(F.calibrate(1.3, null).calibrated) == 1.0  # above s_max: clamped
    res = F.calibrate(0.65, null)
    tau = float(res.threshold)
    assert float(res.calibrated) == pytest.approx((0.65 - tau) / (1 - tau), abs=1e-14)
    # identical representations reach s_max = 1 -> calibrated 1
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 10, generator=g, dtype=torch.float64), dim=1)
    r = F.calibrated_alignment(x, x.clone(), "linear_cka", num_permutations=50)
    assert float(r.raw) == pytest.approx(1.0, abs=1e-12)
    assert float(r.calibrated) == pytest.approx(1.0, abs=1e-10)
    assert float(r.p_value) == pytest.approx(1 / 51, abs=1e-15)


def test_calibrated_alignment_fields_match_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 20, generator=g, dtype=torch.float64)
    y = x[:, :12] + 2.0 * torch.randn(50, 12, generator=g, dtype=torch.float64)
    for name in ("linear_cka", "mutual_knn", "rsa"):
        res = F.calibrated_alignment(x, y, name, num_permutations=120, seed=3, alpha=0.1)
        _assert_matches(res, ref_calibrate(float(res.raw), res.null.numpy(), alpha=0.1), atol=1e-12)


def test_as_dict():
    res = F.calibrate(0.5, torch.linspace(0, 0.4, 30))
    d = res.as_dict()
    assert set(d) == {"raw", "calibrated", "p_value", "threshold", "null_mean", "null_std",
                      "effect_size", "percentile"}
    assert all(isinstance(v, float) for v in d.values())
    assert d["p_value"] == pytest.approx(1 / 31)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_unit_interval_raises(alpha):
    null = torch.linspace(0, 1, 20)
    with pytest.raises(ValueError, match="alpha"):
        F.calibrate(0.5, null, alpha=alpha)
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="alpha"):
        F.calibrated_alignment(x, x, "linear_cka", num_permutations=10, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        F.calibrated_layer_alignment([x], [x], "linear_cka", num_permutations=10, alpha=alpha)


def test_nan_and_inf_raise():
    null = torch.linspace(0, 1, 20, dtype=torch.float64)
    bad = null.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        F.calibrate(0.5, bad)
    bad[3] = float("inf")
    with pytest.raises(ValueError):
        F.calibrate(0.5, bad)
    with pytest.raises(ValueError, match="NaN"):
        F.calibrate(float("nan"), null)
    with pytest.raises(ValueError):
        F.calibrate(0.5, null, max_score=float("inf"))
    with pytest.raises(ValueError):
        F.calibrate(0.5, torch.empty(0))
    # a metric producing NaN on some permutation is caught, not calibrated silently
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        F.calibrated_alignment(x, x, lambda a, b: torch.tensor(float("nan")), num_permutations=5)


# --------------------------------------------------------------------------- oracle conformance


def _perm_fn(n: int, K: int, seed: int = 0, groups=None):
    """perm_fn for the oracle that hands out our permutations in order."""
    rows = iter(F.permutations(n, K, seed, groups=groups))

    def perm_fn(n_: int, device: torch.device) -> torch.Tensor:
        assert n_ == n
        return next(rows).to(device)

    return perm_fn


def _assert_p_matches(ours, p_oracle, K: int, exact: bool) -> None:
    """p-values agree exactly, except that a null value within float32 noise (1e-5) of the
    observed score may count on one side and not the other (fast path vs recompute).
    Discrete measures (kNN counts) give bit-identical values in both, so they compare exactly."""
    near = 0 if exact else int(((ours.null - ours.raw).abs() <= 1e-5).sum())
    assert abs(float(ours.p_value) - float(p_oracle)) <= near / (K + 1) + 1e-7, (
        float(ours.p_value), float(p_oracle), near)


def _data(kind: str, n: int = 64, d: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if kind == "related":
        y = x @ torch.randn(d, d, generator=g) / d**0.5 + 1.5 * torch.randn(n, d, generator=g)
    else:
        y = torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)


ORACLE_MEASURES = {
    "linear_cka": ({}, False),
    "unbiased_cka": ({}, False),
    "rsa": ({}, False),
    "rbf_cka": ({}, False),
    "mutual_knn": ({"k": 5}, True),
    "cknna": ({"k": 5}, False),
    "cycle_knn": ({"k": 5}, True),
}


@pytest.mark.parametrize("kind,seed", [("related", 0), ("independent", 1), ("independent", 2)])
@pytest.mark.parametrize("name", sorted(ORACLE_MEASURES))
def test_calibrate_matches_oracle(name, kind, seed):
    kw, discrete = ORACLE_MEASURES[name]
    x, y = _data(kind, seed=seed)
    K, alpha = 200, 0.05
    ours = F.calibrated_alignment(x, y, name, num_permutations=K, alpha=alpha, seed=seed, **kw)
    sim = functools.partial(getattr(F, name), **kw)
    cal, p, tau = oracle.calibrate(x, y, sim, K=K, alpha=alpha, smax=1.0,
                                   perm_fn=_perm_fn(64, K, seed))
    _assert_p_matches(ours, p, K, exact=discrete)
    assert float(ours.threshold) == pytest.approx(float(tau), abs=1e-5)
    assert float(ours.calibrated) == pytest.approx(float(cal), abs=1e-5)
    if kind == "related":
        assert float(ours.p_value) == pytest.approx(1 / (K + 1))
        assert float(ours.calibrated) > 0


def test_calibrate_matches_oracle_with_groups_and_unbounded():
    x, y = _data("related", seed=5)
    labels = np.repeat(np.arange(16), 4)
    K = 100
    ours = F.calibrated_alignment(x, y, "linear_cka", num_permutations=K, seed=2, groups=labels,
                                  max_score=None, alpha=0.1)
    cal, p, tau = oracle.calibrate(x, y, F.linear_cka, K=K, alpha=0.1, smax=None,
                                   perm_fn=_perm_fn(64, K, 2, labels))
    _assert_p_matches(ours, p, K, exact=False)
    assert float(ours.threshold) == pytest.approx(float(tau), abs=1e-5)
    assert float(ours.calibrated) == pytest.approx(float(cal), abs=1e-5)
    assert float(cal) > 0


def _layer_data(kind: str, la: int, lb: int, seed: int, n: int = 48):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 10, generator=g)
    xs, ys = [], []
    for a in range(la):
        xs.append(torch.randn(n, 12, generator=g) + (base @ torch.randn(10, 12, generator=g) if kind == "related" and a == la - 1 else 0))
    for b in range(lb):
        ys.append(torch.randn(n, 8, generator=g) + (base @ torch.randn(10, 8, generator=g) if kind == "related" and b == 0 else 0))
    norm = lambda t: torch.nn.functional.normalize(t, dim=1)  # noqa: E731
    return [norm(t) for t in xs], [norm(t) for t in ys]


@pytest.mark.parametrize("kind,seed", [("related", 0), ("independent", 3)])
@pytest.mark.parametrize("agg", ["max", "mean"])
@pytest.mark.parametrize("name,la,lb", [("linear_cka", 2, 3), ("linear_cka", 3, 2),
                                        ("mutual_knn", 2, 3), ("unbiased_cka", 3, 2)])
def test_calibrate_layers_matches_oracle(name, la, lb, agg, kind, seed):
    kw = {"k": 5} if name == "mutual_knn" else {}
    xs, ys = _layer_data(kind, la, lb, seed)
    K = 50
    ours = F.calibrated_layer_alignment(xs, ys, name, aggregate=agg, num_permutations=K,
                                        seed=seed, **kw)
    sim = functools.partial(getattr(F, name), **kw)
    cal, p, tau = oracle.calibrate_layers(xs, ys, sim, agg=agg, K=K, alpha=0.05, smax=1.0,
                                          perm_fn=_perm_fn(48, K, seed))
    _assert_p_matches(ours, p, K, exact=name == "mutual_knn")
    assert float(ours.threshold) == pytest.approx(float(tau), abs=1e-5)
    assert float(ours.calibrated) == pytest.approx(float(cal), abs=1e-5)
    if kind == "related":
        assert float(ours.p_value) == pytest.approx(1 / (K + 1))


def test_calibrate_layers_matches_oracle_callable_agg():
    xs, ys = _layer_data("related", 2, 3, seed=7)

    def first_row_max(s):
        return s[0].max()

    K = 40
    ours = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate=first_row_max,
                                        num_permutations=K, seed=1)
    cal, p, tau = oracle.calibrate_layers(xs, ys, F.linear_cka, agg=first_row_max, K=K,
                                          perm_fn=_perm_fn(48, K, 1))
    _assert_p_matches(ours, p, K, exact=False)
    assert float(ours.threshold) == pytest.approx(float(tau), abs=1e-5)
    assert float(ours.calibrated) == pytest.approx(float(cal), abs=1e-5)


def test_threshold_index_is_the_exact_decimal_order_statistic():
    """⌈(1 − α)(K + 1)⌉ − 1 with α as the decimal the user wrote: floats put (1 − 0.18)·1000 at
    820.0000000000001, and τ one place too high (calibrated 0 with p <= α)."""
    from fractions import Fraction

    from alignment_callback.functional.calibration import threshold_index

    for hundredths in range(1, 50):
        alpha = hundredths / 100
        for k in range(1, 2001, 7):
            exact = Fraction(100 - hundredths, 100) * (k + 1)
            expected = min(max(math.ceil(exact) - 1, 0), k)
            assert threshold_index(k, alpha) == expected, (alpha, k)
    assert threshold_index(999, 0.18) == 819


@pytest.mark.parametrize("count", [0, 4, 9, 33])
def test_p_value_is_the_exact_ratio_in_float64_for_float32_scores(count):
    """p = (1 + c)/(K + 1) is float64 whatever the scores' dtype, so that it equals Python's
    ratio: at p = 5/100 ``float(p) <= 0.05`` holds (a float32 p read 0.0500000007)."""
    k = 99
    null = torch.cat([torch.full((count,), 0.9), torch.full((k - count,), 0.1)])
    res = F.calibrate(torch.tensor(0.5), null.to(torch.float32))
    assert res.p_value.dtype == torch.float64
    assert float(res.p_value) == (1 + count) / (k + 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    got = F.calibrated_alignment(x, x + torch.randn(60, 4, generator=g), "linear_cka",
                                 num_permutations=k, seed=0)
    assert got.raw.dtype == torch.float32 and got.p_value.dtype == torch.float64
    assert float(got.p_value) == (1 + int((got.null >= got.raw).sum())) / (k + 1)
    moments = F.calibrated_alignment(x, torch.randn(60, 4, generator=g), "linear_cka",
                                     null="moments")
    assert moments.p_value.dtype == torch.float64
