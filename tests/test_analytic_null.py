"""``null="moments"`` / ``"auto"`` through the pipeline: the analytic null (exact permutation
moments + Pearson III) agrees with a large permutation null, ``"auto"`` falls back to
permutations where the approximation is not validated, the result records which method was
used, a linear kernel at d < n never builds an n×n matrix, and n×n measures too large for
memory are refused before allocating.  The moments themselves are tested in test_moments.py."""

from __future__ import annotations

import warnings

import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional import pipeline
from alignment_callback.functional.gram_measures import FeatureState
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
    with pytest.raises(MemoryError, match=r"rbf_cka at n=512 needs about .* GiB .* only 0\.0 GiB "
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
