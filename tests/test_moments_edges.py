"""Where the analytic ("moments") null must not be used as if it were valid:

* with ``groups`` (block permutations) the null is not that of single-row permutations, so
  ``null="moments"`` is a configuration error everywhere it can be set, and ``null="auto"``
  uses the permutations;
* a statistic that does not change under permutation has a point-mass null: its moments give
  p = 1 and a calibrated 0 (with a warning), never a p-value made of rounding, and ``"auto"``
  uses the permutations.

The point-mass cases are checked against all permutations computed in NumPy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine import AlignmentEngine
from alignment_callback.metrics import CalibratedAlignment
from tests import numpy_reference as ref


def blocks(seed=0, groups=20, size=5, d=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(groups, d).repeat_interleave(size, 0) + 0.1 * r(groups * size, d)
    y = r(groups, d).repeat_interleave(size, 0) + 0.1 * r(groups * size, d)
    return x, y, torch.arange(groups).repeat_interleave(size).tolist()


def test_moments_with_groups_is_refused_everywhere():
    x, y, groups = blocks()
    with pytest.raises(ValueError, match="null='moments' cannot be used with groups"):
        F.calibrated_alignment(x, y, "linear_cka", null="moments", groups=groups)
    with pytest.raises(ValueError, match="groups"):
        F.calibrated_layer_alignment({"a": x}, {"b": y}, "linear_cka", null="moments",
                                     groups=groups)
    with pytest.raises(ValueError, match="groups"):
        CalibratedAlignment("linear_cka", null="moments", groups=groups)
    with pytest.raises(ValueError, match="groups"):
        AlignmentEngine(["linear_cka"], null="moments", groups=groups)


def test_auto_with_groups_is_the_block_permutation_null():
    """Grouped data: single-row moments would call two independent representations aligned
    (p ≈ 0); ``auto`` gives exactly the block-permutation result."""
    x, y, groups = blocks()
    perm = F.calibrated_alignment(x, y, "linear_cka", groups=groups, num_permutations=500)
    auto = F.calibrated_alignment(x, y, "linear_cka", null="auto", groups=groups,
                                  num_permutations=500)
    assert auto.null_method == "permutation"
    assert float(auto.p_value) == float(perm.p_value) > 0.05
    assert torch.equal(auto.null, perm.null)


@pytest.mark.parametrize("measure", ["mutual_knn", "cycle_knn", "cknna"])
def test_auto_with_groups_reports_the_block_null_mean_for_knn(measure):
    """The exact kNN mean is that of single-row permutations (k/(n-1) for mutual kNN); with
    groups ``auto`` reported it next to the block null's p-value: 0.04 against a block null
    around 0.74, an effect size of 56 standard deviations for independent data."""
    x, y, groups = blocks()
    kw = dict(groups=groups, num_permutations=300, k=4)
    perm = F.calibrated_alignment(x, y, measure, **kw)
    auto = F.calibrated_alignment(x, y, measure, null="auto", **kw)
    assert auto.null_method == "permutation"
    for field in ("p_value", "null_mean", "null_std", "effect_size", "null"):
        assert torch.equal(getattr(auto, field), getattr(perm, field)), field
    assert float(auto.null_mean) == pytest.approx(float(perm.null.double().mean()), abs=1e-6)


@pytest.mark.parametrize("null", ["moments", "auto"])
def test_a_custom_aggregate_is_not_replaced_by_the_pairs_moments(null):
    """A callable aggregate of one pair need not be the identity: ``-max`` turns a strong
    alignment into p = 1.  ``moments``/``auto`` ignored it (reporting the pair's own p ≈ 0 and
    aggregate "max"); now ``auto`` calibrates it by permutations and ``moments`` refuses it.
    The built-in aggregates are the identity on one pair and keep the moments, named."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = x[:, :6] + torch.randn(64, 6, generator=g, dtype=torch.float64)

    def negated(m):
        return -m.max()

    kw = dict(num_permutations=199)
    if null == "moments":
        with pytest.raises(ValueError, match="aggregate='negated'.*null='permutation'"):
            F.calibrated_layer_alignment({"a": x}, {"b": y}, "linear_cka", aggregate=negated,
                                         null=null, **kw)
    else:
        res = F.calibrated_layer_alignment({"a": x}, {"b": y}, "linear_cka", aggregate=negated,
                                           null=null, **kw)
        perm = F.calibrated_layer_alignment({"a": x}, {"b": y}, "linear_cka",
                                            aggregate=negated, **kw)
        assert res.null_method == "permutation" and res.aggregate == "negated"
        assert float(res.p_value) == float(perm.p_value) == 1.0
        assert float(res.raw) == -float(res.matrix[0, 0]) < 0
    for agg in ("mean", "top3"):
        res = F.calibrated_layer_alignment({"a": x}, {"b": y}, "linear_cka", aggregate=agg,
                                           null=null, **kw)
        assert res.null_method == "moments" and res.aggregate == agg
        assert float(res.raw) == float(res.matrix[0, 0])
    # the same through the engine's chosen pairs (a MappedAggregate around the callable)
    engine = AlignmentEngine(["linear_cka"], aggregate=negated, pairs={"a": "b"}, null=null,
                             num_permutations=199, preprocess=False)
    engine.set_reference({"b": y})
    if null == "moments":
        with pytest.raises(ValueError, match="aggregate='negated_over_pairs'"):
            engine.step({"a": x})
    else:
        res = engine.step({"a": x}).results["linear_cka"]
        assert res.null_method == "permutation" and float(res.p_value) == 1.0
    engine = AlignmentEngine(["linear_cka"], aggregate="max", pairs={"a": "b"}, null=null,
                             num_permutations=199, preprocess=False)
    engine.set_reference({"b": y})
    assert engine.step({"a": x}).results["linear_cka"].null_method == "moments"


def exhaustive_null(x: np.ndarray, y: np.ndarray, measure) -> np.ndarray:
    n = len(x)
    return np.array([measure(x, y[list(p)]) for p in itertools.permutations(range(n))])


def whitened(n: int, seed: int) -> np.ndarray:
    """An orthonormal basis of the centered space: X Xᵀ = H, the same for every permutation."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n - 1))
    a -= a.mean(0)
    q, _ = np.linalg.qr(a)
    return q


@pytest.mark.parametrize("seed", range(4))
def test_point_mass_null_gives_p_one(seed):
    n = 7
    x = whitened(n, seed)
    y = np.random.default_rng(100 + seed).standard_normal((n, 3))
    null = exhaustive_null(x, y, ref.linear_cka)
    assert np.ptp(null) < 1e-12  # the statistic is the same under every permutation
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with pytest.warns(RuntimeWarning, match="point mass"):
        r = F.calibrated_alignment(xt, yt, "linear_cka", null="moments")
    assert float(r.p_value) == 1.0 and float(r.calibrated) == 0.0
    assert float(r.null_std) == 0.0 and float(r.effect_size) == 0.0
    assert float(r.threshold) == pytest.approx(null.mean(), abs=1e-12)
    # the share of the null below the score, ties counted half: every value ties it (it said 0)
    raw = float(r.raw)
    ties = np.abs(null - raw) <= 1e-12
    assert float(r.percentile) == 100.0 * (np.mean(~ties & (null < raw)) + 0.5 * np.mean(ties))
    auto = F.calibrated_alignment(xt, yt, "linear_cka", null="auto", num_permutations=200)
    assert auto.null_method == "permutation"


def test_nearly_identity_rbf_kernel_is_not_called_aligned():
    """σ far below the distances: the RBF kernel is the identity up to e^-100, the null's std
    is ~1e-23, and the observed score differs from the null mean by rounding only."""
    g = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(200, 20, generator=g, dtype=torch.float64)
    y = 3 * torch.randn(200, 10, generator=g, dtype=torch.float64)
    auto = F.calibrated_alignment(x, y, "rbf_cka", null="auto", num_permutations=200)
    assert auto.null_method == "permutation"
    with pytest.warns(RuntimeWarning, match="point mass"):
        mom = F.calibrated_alignment(x, y, "rbf_cka", null="moments")
    assert float(mom.p_value) == 1.0 and float(mom.calibrated) == 0.0
    assert float(mom.percentile) == float(auto.percentile) == 50.0  # ties counted half


def test_a_small_but_real_null_std_is_not_a_point_mass():
    """n = 4000: a genuine null std of order 1e-4 keeps its moments p-value."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    y = 0.05 * x + torch.randn(4000, 16, generator=g, dtype=torch.float64)
    r = F.calibrated_alignment(x, y, "linear_cka", null="moments")
    assert r.null_method == "moments"
    assert 0 < float(r.null_std) < 1e-2
    assert float(r.p_value) < 1e-6 and math.isfinite(float(r.effect_size))


def test_float32_at_a_million_samples_is_not_a_point_mass():
    """Linear CKA's null std is about 1.4/n: below float32's resolution at n = 2·10⁶, while
    the observed score of aligned data is far from the null mean: a real null."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000_000, 2, generator=g)
    y = 0.05 * x + torch.randn(2_000_000, 2, generator=g)
    r = F.calibrated_alignment(x, y, "linear_cka", null="moments")
    assert 0 < float(r.null_std) < 1e-6
    assert float(r.p_value) < 1e-6 and float(r.calibrated) > 1e-3


@pytest.mark.parametrize("n", [12, 48, 128])
def test_point_mass_of_whitened_features_below_n(n):
    """d = n − 1 < n: the moments come from the features, whose invariants subtract nearly
    equal numbers for a whitened representation; the null is still found to be a point mass
    (before, rounding gave std ≈ 1e-9 with skewness ≈ ±1e7 and p = 0)."""
    x = torch.from_numpy(whitened(n, 2))
    y = torch.from_numpy(np.random.default_rng(7).standard_normal((n, 3)))
    null = F.permutation_null(x, y, "linear_cka", 300, seed=0)
    assert float(null.max() - null.min()) < 1e-12  # the same value under every permutation
    with pytest.warns(RuntimeWarning, match="point mass"):
        r = F.calibrated_alignment(x, y, "linear_cka", null="moments")
    assert float(r.p_value) == 1.0 and float(r.calibrated) == 0.0 and float(r.null_std) == 0.0
    assert float(r.raw) == pytest.approx(float(F.linear_cka(x, y)), rel=1e-12)
    assert float(r.threshold) == pytest.approx(float(null.mean()), abs=1e-12)


@pytest.mark.parametrize("delta", [1e-5, 1e-6, 1e-7, 1e-8])
def test_nearly_whitened_features_keep_exact_moments(delta):
    """Whitened plus noise of size δ: a real null whose std (≈ 3·δ/100) the feature route
    could not resolve below δ ≈ 1e-5 (skewness off by up to 1e5); the moments now equal those
    of the n×n gram route, and the p-value that of 20,000 permutations."""
    from alignment_callback.functional import moments as mo

    n = 48
    rng = np.random.default_rng(5)
    x = torch.from_numpy(whitened(n, 2) + delta * rng.standard_normal((n, n - 1)))
    y = torch.from_numpy(rng.standard_normal((n, 3)))
    xc, yc = x - x.mean(0), y - y.mean(0)
    feat = mo.cosine_moments(mo.feature_invariants(xc), mo.feature_invariants(yc))
    gram = mo.cosine_moments(mo.gram_invariants(xc @ xc.T), mo.feature_invariants(yc))
    assert feat.std == pytest.approx(gram.std, rel=1e-6)
    assert feat.skewness == pytest.approx(gram.skewness, abs=1e-4)
    null = F.permutation_null(x, y, "linear_cka", 20_000, seed=1).double()
    assert feat.std == pytest.approx(float(null.std()), rel=0.03)
    mom = F.calibrated_alignment(x, y, "linear_cka", null="moments")
    perm = F.calibrated_alignment(x, y, "linear_cka", 20_000, seed=1)
    assert abs(float(mom.p_value) - float(perm.p_value)) <= 0.01


def test_nearly_invariant_features_too_large_for_the_gram_warn(monkeypatch):
    from alignment_callback.functional.moments import features

    monkeypatch.setattr(features, "_NEAR_INVARIANT_MAX_N", 10)
    x = torch.from_numpy(whitened(12, 0))
    with pytest.warns(RuntimeWarning, match="permutation-invariant"):
        features.feature_invariants(x)


def test_moments_in_float32_near_the_maximum():
    """An RBF kernel with σ below the distances, float32: (a) s_max − τ below float32's
    resolution gives a calibrated 0, as with permutations (before, the moments path used the
    float64 bound and reported 0.88 with the warning that it was 0); (b) a null found to be a
    point mass still reports the observed score as ``raw`` (before: the null mean)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10))
    x, y = (torch.tensor(v, dtype=torch.float32) for v in (x, x + 0.3 * rng.standard_normal(x.shape)))
    with pytest.warns(RuntimeWarning, match="reaches the maximum"):
        mom = F.calibrated_alignment(x, y, "rbf_cka", null="moments", sigma=0.55)
    assert 1.0 - float(mom.threshold) < 1e-5 and float(mom.calibrated) == 0.0
    with pytest.warns(RuntimeWarning, match="point mass"):
        mom = F.calibrated_alignment(x, y, "rbf_cka", null="moments", sigma=0.5)
    observed = float(F.rbf_cka(x, y, sigma=0.5))
    assert float(mom.raw) == pytest.approx(observed, abs=1e-9)
    assert abs(float(mom.raw) - float(mom.null_mean)) > 1e-7


@pytest.mark.parametrize("seed", range(6))
def test_auto_falling_back_to_permutations_scores_on_the_null_route(seed):
    """n = 5 < 32: "auto" falls back to permutations after preparing the feature-space state;
    the observed score must come from the same n×n route as the null, so that every identity
    permutation (the same statistic) counts as reaching it."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((5, 3)))
    y = torch.from_numpy(rng.standard_normal((5, 2)))
    r = F.calibrated_alignment(x, y, "linear_cka", 2000, seed=0, null="auto")
    assert r.null_method == "permutation"
    ident = (F.permutations(5, 2000, 0) == torch.arange(5)).all(1)
    assert int(ident.sum()) > 0 and bool((r.null[ident] >= r.raw).all())


def test_a_cached_reference_keeps_its_feature_space_state_after_a_permutation_step():
    """One step outside the validated range (calibrated by permutations under "auto") turned
    the engine's cached reference into an n×n gram for every later step (O(n²) memory, the
    opposite of the features route's promise)."""
    from alignment_callback.functional.gram_measures import FeatureState

    g = torch.Generator().manual_seed(0)
    n, d = 512, 16
    engine = AlignmentEngine(["linear_cka"], num_permutations=99, null="auto", preprocess=False)
    engine.set_reference({"r": torch.randn(n, d, generator=g)})
    (measure,) = engine.measures.values()
    heavy = torch.randn(n, 1, generator=g) ** 5  # a skewed null: not validated for moments
    methods = [engine.step({"m": x}).results["linear_cka"].null_method
               for x in (torch.randn(n, d, generator=g), heavy, torch.randn(n, d, generator=g))]
    assert methods == ["moments", "permutation", "moments"]
    state = engine.reference.states[measure][0]
    assert isinstance(state, FeatureState) and tuple(state.features.shape) == (n, d)


def test_engine_steps_equal_fresh_calls_whatever_route_an_earlier_step_took():
    """A cached reference's moments invariants were kept from the first step's route (its
    feature-space state, or the n×n gram a wide model layer needs), so later steps of the other
    route differed from a fresh call in the last digits, and a matrix computed in another
    order (torchrun, a resumed run) differed from a single process."""
    g = torch.Generator().manual_seed(0)
    n = 48
    base = torch.randn(n, 8, generator=g)
    ref = {"r": base @ torch.randn(8, 8, generator=g)}
    engine = AlignmentEngine(["linear_cka"], num_permutations=49, seed=2, preprocess=False,
                             null="moments")
    engine.set_reference(ref)
    for width in (4, 70, 8, 70, 4):  # d < n, d > n (n×n route), ...
        model = {"m": torch.cat([base, torch.randn(n, 70, generator=g)], 1)[:, :width]}
        got = engine.step(model).results["linear_cka"]
        fresh = F.calibrated_layer_alignment(model, ref, "linear_cka", num_permutations=49,
                                             seed=2, null="moments")
        for field in ("raw", "threshold", "p_value", "null_mean", "null_std", "effect_size"):
            assert float(getattr(got, field)) == float(getattr(fresh, field)), (width, field)
