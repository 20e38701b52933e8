"""Regression tests for an audit of the measures against definitions written from scratch.

* SVCCA: centering left an exactly constant column a rounding residue, which the per-column
  power-of-two scaling blew up into a unit-variance noise feature (0.64 became 0.45);
* one large constant feature (2e5 in float32) made a varying representation "zero-variance"
  for the linear-kernel and SVD-based measures (the rounding floor used the uncentered norm);
* the SVD-based measures (Procrustes, shape, Bures, CCA, PWCCA) were not rescaled exactly and
  refused x·1e20 (float32) or x·1e-170 (float64) as "all samples identical";
* ``bures_similarity``'s zero-variance error named ``procrustes_similarity``.

Every expectation is the measure's own value on the same data without the constant column, or
unscaled: by definition a constant feature adds nothing after centering, and these measures
are invariant to isotropic scaling.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import alignment_callback.functional as F

SCALE_FREE = ["procrustes_similarity", "shape_metric", "bures_similarity", "cca_similarity",
              "pwcca", "linear_cka", "svcca"]
CONSTANT_FREE = ["linear_cka", "unbiased_cka", "rv_coefficient", "procrustes_similarity",
                 "shape_metric", "bures_similarity", "cca_similarity", "pwcca", "svcca"]
PARAMS = {"svcca": {"cca_dim": 4}}


def _pair(dtype: torch.dtype, n: int = 40, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, d, generator=g, dtype=torch.float64) + torch.randn(
        n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _with_constant(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.cat([torch.full((x.shape[0], 1), value, dtype=x.dtype), x], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("value", [3.7, -0.17, 0.1])
def test_svcca_ignores_an_exactly_constant_feature(dtype, value):
    x, y = _pair(dtype)
    expected = float(F.svcca(x, y, cca_dim=4))
    assert float(F.svcca(_with_constant(x, value), y, cca_dim=4)) == pytest.approx(expected,
                                                                                abs=1e-6)
    wide, _ = _pair(dtype, n=12, d=30)  # d > n: the gram route
    other, _ = _pair(dtype, n=12, d=8)
    assert float(F.svcca(_with_constant(wide, value), other, cca_dim=4)) == pytest.approx(
        float(F.svcca(wide, other, cca_dim=4)), abs=1e-6)


@pytest.mark.parametrize("name", CONSTANT_FREE)
def test_one_large_constant_feature_is_not_zero_variance(name):
    x, y = _pair(torch.float32)
    kw = PARAMS.get(name, {})
    expected = float(getattr(F, name)(x, y, **kw))
    got = float(getattr(F, name)(_with_constant(x, 2e5), y, **kw))
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 1e-30),
                                         (torch.float64, 1e160), (torch.float64, 1e-170)],
                         ids=["f32-1e20", "f32-1e-30", "f64-1e160", "f64-1e-170"])
@pytest.mark.parametrize("name", SCALE_FREE)
def test_scale_free_measures_at_extreme_magnitudes(name, dtype, scale):
    x, y = _pair(dtype)
    kw = PARAMS.get(name, {})
    expected = float(getattr(F, name)(x, y, **kw))
    assert float(getattr(F, name)(x * scale, y * scale, **kw)) == pytest.approx(expected,
                                                                                abs=1e-6)


def _shape_numpy(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """1 − θ/(π/2), θ = arccos ‖Z_xᵀZ_y‖_* with Z ∝ U(αS + 1 − α) of the centered data."""
    def factor(m: np.ndarray) -> np.ndarray:
        u, s, _ = np.linalg.svd(m - m.mean(0), full_matrices=False)
        keep = s > s[0] * max(m.shape) * np.finfo(np.float64).eps
        z = u[:, keep] * (alpha * s[keep] + 1.0 - alpha)
        return z / np.linalg.norm(z)

    cos = np.linalg.svd(factor(x).T @ factor(y), compute_uv=False).sum()
    return 1.0 - float(np.arccos(min(cos, 1.0))) / (np.pi / 2)


def test_shape_metric_with_partial_whitening_keeps_its_scale():
    """0 < alpha < 1 is not scale-free: x's own singular values enter g(s) = αs + 1 − α, so an
    x the measure rescales internally (magnitudes 2**40) must still give x's value."""
    x, y = _pair(torch.float64)
    big = x * 2.0 ** 40
    expected = _shape_numpy(big.numpy(), y.numpy(), 0.5)
    assert float(F.shape_metric(big, y, alpha=0.5)) == pytest.approx(expected, abs=1e-9)
    assert expected != pytest.approx(_shape_numpy(x.numpy(), y.numpy(), 0.5), abs=1e-5)


def test_bures_names_itself_in_the_zero_variance_error():
    x, y = _pair(torch.float32)
    with pytest.raises(ValueError, match="bures_similarity is undefined"):
        F.bures_similarity(torch.ones_like(x), y)


def test_integer_parameters_take_numpy_integers_and_refuse_floats_in_both_forms():
    """An integer parameter (k, cca_dim, dims, folds, num_bootstrap) takes Python and NumPy
    integers and refuses a float such as 5.0 or a bool, alike in the function and in
    ``get_measure`` (the function forms took 5.0 while get_measure refused k=5.0 and
    cca_dim=3.0 but took folds=4.0); numpy scalars are accepted as real parameters."""
    from alignment_callback.functional.bootstrap import bootstrap_interval

    x, y = _pair(torch.float64)
    pairs = [
        (F.mutual_knn(x, y, k=np.int64(5)), F.mutual_knn(x, y, k=5)),
        (F.svcca(x, y, cca_dim=np.int32(3)), F.svcca(x, y, cca_dim=3)),
        (F.linear_predictivity(x, y, folds=np.int64(4)), F.linear_predictivity(x, y, folds=4)),
        (F.linear_predictivity(x, y, ridge=np.float32(0.5)), F.linear_predictivity(x, y, 0.5)),
        (F.rbf_cka(x, y, sigma=np.float32(2.0)), F.rbf_cka(x, y, sigma=2.0)),
        (F.shape_metric(x, y, alpha=np.float64(0.5)), F.shape_metric(x, y, alpha=0.5)),
    ]
    for got, expected in pairs:
        assert float(got) == float(expected)
    F.get_measure("rbf_cka", sigma=np.float32(2.0))
    F.get_measure("shape_metric", alpha=np.float32(0.5))
    F.get_measure("mutual_knn", k=np.int64(5))
    with pytest.raises(ValueError, match="sigma must be a finite positive number"):
        F.rbf_cka(x, y, sigma=True)
    for bad in (5.0, True, "5"):
        for name in ("mutual_knn", "cycle_knn", "cknna"):
            with pytest.raises(ValueError, match=f"{name}: k must be an integer"):
                getattr(F, name)(x, y, k=bad)
            with pytest.raises(ValueError, match="k must be an integer"):
                F.get_measure(name, k=bad)
        with pytest.raises(ValueError, match="cca_dim must be a"):
            F.svcca(x, y, cca_dim=bad)
        with pytest.raises(ValueError, match="cca_dim must be an integer"):
            F.get_measure("svcca", cca_dim=bad)
        with pytest.raises(ValueError, match="dims must be a positive integer"):
            F.cca_similarity(x, y, dims=bad)
        with pytest.raises(ValueError, match="folds must be an integer >= 2"):
            F.linear_predictivity(x, y, folds=bad)
        with pytest.raises(ValueError, match="folds must be an integer"):
            F.get_measure("linear_predictivity", folds=bad)
        with pytest.raises(ValueError, match="num_bootstrap must be an integer >= 2"):
            bootstrap_interval(x, y, "linear_cka", num_bootstrap=bad)


# ----------------------------------------------------------- from an audit of the docs (8th)
def test_too_few_permutations_for_alpha_warn():
    """K <= 18 at alpha = 0.05: τ is the largest of {s, null} for any data, so every calibrated
    score is 0 and p >= 1/(K + 1) > alpha; that was silent."""
    from alignment_callback.functional.calibration import threshold_index

    x, y = _pair(torch.float32)
    for k in (9, 18):
        assert threshold_index(k, 0.05) == k  # the condition, from the τ rule
        with pytest.warns(UserWarning, match=rf"num_permutations={k} is too few.*>= 19"):
            r = F.calibrated_alignment(x, y, "linear_cka", num_permutations=k)
        assert float(r.calibrated) == 0.0
    assert threshold_index(19, 0.05) == 18
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(F.calibrated_alignment(x, y, "linear_cka", num_permutations=19).calibrated) > 0


def test_a_list_of_measures_with_one_label_asks_for_a_dict_and_the_engine_checks_its_device():
    from alignment_callback.engine import AlignmentEngine

    with pytest.raises(ValueError, match=r"two measures are labeled '<lambda>'.*dict"):
        AlignmentEngine([lambda x, y: x.sum(), lambda x, y: y.sum()])
    with pytest.raises(ValueError, match="'mutual_knn' is given twice"):
        AlignmentEngine(["mutual_knn", "mutual_knn"])
    with pytest.raises(ValueError, match="two measures are labeled 'mutual_knn'"):
        AlignmentEngine(["mutual_knn", F.get_measure("mutual_knn", k=5)])
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=rf"device='{missing}': this machine has"):
        AlignmentEngine(["linear_cka"], device=missing)


def test_a_regex_layer_that_matches_nothing_says_it_must_match_the_whole_name():
    from alignment_callback.hooks import resolve_layers

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"layer 're:.*' matched none.*must match the whole"):
        resolve_layers(model, "re:\\.0")


# ------------------------------------------------------- from an audit of the pipeline (9th)
def test_too_few_permutations_warn_once_pointing_at_the_callers_line():
    """One call warned twice (aggregate and per-pair), both pointing inside the library."""
    x, y = _pair(torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.calibrated_alignment(x, y, "linear_cka", num_permutations=5)
    few = [w for w in caught if "is too few" in str(w.message)]
    assert len(few) == 1 and few[0].filename == __file__, [(w.filename, w.lineno) for w in few]


def test_calibrate_takes_counts_and_refuses_a_matrix_null():
    """Integer statistics (counts) crashed in torch's mean; a (K, 3) null was read as 3K
    permutations."""
    from alignment_callback.functional import calibrate

    rng = np.random.default_rng(0)
    null = rng.integers(0, 20, size=99)
    res = calibrate(torch.tensor(17), torch.from_numpy(null), max_score=None)
    assert float(res.p_value) == pytest.approx((1 + (null >= 17).sum()) / 100, abs=1e-12)
    assert float(res.null_mean) == pytest.approx(null.mean(), abs=1e-12)
    with pytest.raises(ValueError, match=r"one value per permutation, shape \(K,\), got shape "
                                         r"\(99, 3\)"):
        calibrate(0.5, torch.rand(99, 3))


@pytest.mark.parametrize("measure, why", [
    ("rsa", "all-zero feature vector"), ("linear_cka", "zero-variance"),
    ("mutual_knn", "every row of the representation is identical"),
    ("procrustes_similarity", "zero-variance")])
def test_a_layer_that_cannot_be_prepared_is_named(measure, why):
    """With dozens of layers, "zero-variance representation" alone did not say which."""
    g = torch.Generator().manual_seed(0)
    good = lambda d: torch.randn(30, d, generator=g)  # noqa: E731
    bad = torch.ones(30, 4) if measure != "rsa" else good(4)
    bad[5] = 0.0 if measure == "rsa" else bad[5]
    with pytest.raises(ValueError, match=rf"^y layer 'ref\.bad': .*{why}"):
        F.calibrated_layer_alignment({"enc.0": good(5), "enc.1": good(5)},
                                     {"ref.a": good(4), "ref.bad": bad}, measure,
                                     num_permutations=19)
    with pytest.raises(ValueError, match=rf"^y: .*{why}"):  # a single tensor: the side alone
        F.calibrated_alignment(good(5), bad, measure, num_permutations=19)


def test_layer_names_that_are_one_name_as_strings_are_refused():
    """{1: a, "1": b} silently lost a layer (and changed the max over layers)."""
    a, b = torch.randn(20, 3), torch.randn(20, 3)
    with pytest.raises(ValueError, match=r"x layers: the names \[1, '1'\] are one name"):
        F.calibrated_layer_alignment({1: a, "1": b}, [a], "linear_cka", num_permutations=19)


# ------------------------------------------------------- from an audit of the moments (9th)
def test_a_tiny_alpha_warns_at_once_with_the_permutations_it_needs():
    """The K it needs was found by counting up from K + 1: 14 s at alpha = 1e-7, a hang at
    1e-300.  Checked against the τ rule for a range of alphas."""
    import time

    from alignment_callback.functional import calibrate
    from alignment_callback.functional.calibration import few_permutations, threshold_index

    for alpha in (0.05, 0.01, 1 / 3, 1e-3, 1e-7):
        need = int(few_permutations(99, alpha).rsplit(">= ", 1)[1]) if 100 * alpha < 1 else None
        if need is not None:
            assert threshold_index(need, alpha) < need
            assert threshold_index(need - 1, alpha) == need - 1
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="is too few for alpha=1e-300"):
        calibrate(0.9, torch.rand(500), alpha=1e-300)
    assert time.perf_counter() - start < 5.0


def test_empty_pairs_are_refused_naming_pairs():
    """pairs={} failed at the first step with "tensors used as indices must be long"."""
    from alignment_callback.engine import AlignmentEngine
    from alignment_callback.functional.aggregation import MappedAggregate

    with pytest.raises(ValueError, match="pairs is empty"):
        AlignmentEngine(["linear_cka"], pairs={})
    with pytest.raises(ValueError, match="pairs is empty"):
        MappedAggregate({}, ["a"], ["b"])


# ------------------------------------------------- the registry's symmetry and invariance claims
def _anisotropic(seed: int = 3):
    g = np.random.default_rng(seed)
    x = g.standard_normal((40, 6)) * np.array([3, 2, 1.5, 1, 0.5, 0.2])
    y = x[:, :5] @ g.standard_normal((5, 5)) + 0.8 * g.standard_normal((40, 5))
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("name", sorted(F.BUILTIN_MEASURES))
def test_the_symmetric_flag_is_what_the_measure_does(name):
    """cknna was flagged symmetric; its unbiased HSIC's cross term reads non-symmetric masked
    grams, so swapping x and y changes it (0.5647 against 0.5344 here)."""
    x, y = _anisotropic()
    options = {"k": 5} if "knn" in name else {"cca_dim": 3} if name == "svcca" else {}
    measure = F.get_measure(name, **options)
    forward, backward = float(measure(x, y)), float(measure(y, x))
    assert (abs(forward - backward) < 1e-10) == measure.info.symmetric, (forward, backward)


def test_svcca_is_rotation_invariant_only_when_it_keeps_every_direction():
    """svcca standardizes each feature before its SVD: a rotation changes the top directions
    it keeps (the registry claimed rotation invariance), not the full-rank CCA it becomes."""
    x, y = _anisotropic()
    x = x[:, :5]  # full rank 5 on both sides
    q = torch.from_numpy(np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))[0])
    assert abs(float(F.svcca(x @ q, y, cca_dim=2)) - float(F.svcca(x, y, cca_dim=2))) > 0.05
    assert float(F.svcca(x @ q, y, cca_dim=5)) == pytest.approx(float(F.svcca(x, y, cca_dim=5)),
                                                                abs=1e-10)
    assert "rotation and invertible linear maps when cca_dim >= the rank" in \
        F.get_measure("svcca").info.invariances


@pytest.mark.parametrize("name", ["hsic_biased", "hsic_unbiased"])
def test_hsic_of_huge_or_tiny_grams_is_their_value_not_nan(name):
    """HSIC is bilinear: K·2³⁷·…, L·2⁻³⁷·… (float32, entries near float32's largest) have the
    value of K, L, but the sums of products overflowed to inf − inf = NaN; a value beyond
    float32's range is ±inf (or 0 below it), never NaN."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g)
    k, l = x @ x.T, y @ y.T
    hsic = getattr(F, name)
    exact = float(hsic(k.double(), l.double()))
    big, small = 2.0 ** 120, 2.0 ** -120  # powers of two: the scaled grams are exact
    assert float(hsic(k * big, l * small)) == pytest.approx(exact, rel=1e-5)
    assert float(hsic(k * small, l * big)) == pytest.approx(exact, rel=1e-5)
    assert float(hsic(k * 2.0 ** 70, l * 2.0 ** 70)) == (np.inf if exact > 0 else -np.inf)
    assert float(hsic(k * 2.0 ** -80, l * 2.0 ** -80)) == 0.0
    assert float(hsic(k, l)) == float(hsic(k.clone(), l.clone()))  # moderate: not rescaled


def test_calibrate_refuses_a_meta_tensor_naming_it():
    """calibrate() with a meta score or null failed inside ("Tensor.item() cannot be called on
    meta tensors", "Cannot copy out of meta tensor"), naming neither."""
    with pytest.raises(ValueError, match="score is a meta tensor"):
        F.calibrate(torch.tensor(0.5, device="meta"), torch.rand(19))
    with pytest.raises(ValueError, match="null is a meta tensor"):
        F.calibrate(0.5, torch.rand(19, device="meta"))
