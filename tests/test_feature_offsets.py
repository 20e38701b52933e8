"""Features with a large offset on a few dimensions (a transformer's "massive activations")
are measured, not refused as zero variance, and float32 agrees with a float64 NumPy
computation from the definitions; features constant up to rounding are still refused.

The zero-variance tolerances scale with the rounding that centering leaves of a constant
feature (a few units of eps·|x| per entry), so an offset of 10⁴ standard deviations on one of
many float32 features stays well above them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.functional.gram_measures import linear_feature_state
from tests import numpy_reference as ref

ALL_BUT_SLOW = ("linear_cka", "unbiased_cka", "rv_coefficient", "mutual_knn", "cknna", "svcca",
                "procrustes_similarity", "shape_metric", "cca_similarity", "pwcca")


def centered64(t: torch.Tensor) -> np.ndarray:
    """The float64 NumPy reference's input, column-centered first: both CKAs are invariant to
    it, and a gram of uncentered data with an offset of 10⁴ loses 8 digits to cancellation
    even in float64."""
    a = t.double().numpy()
    return a - a.mean(0)


def massive(offset: float, n: int = 200, d: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x + torch.randn(n, d, generator=g)
    x[:, 0] += offset
    y[:, 3] -= offset
    return x, y


@pytest.mark.parametrize("offset", [1e3, 1e4])
@pytest.mark.parametrize("name", ["linear_cka", "unbiased_cka"])
def test_cka_with_massive_activations_matches_numpy(name, offset):
    x, y = massive(offset)
    got = float(F.calibrated_alignment(x, y, name, num_permutations=20).raw)
    want = getattr(ref, name)(centered64(x), centered64(y))
    assert got == pytest.approx(want, abs=2e-6)


def test_features_route_with_massive_activations():
    x, y = massive(1e4, n=300, d=16)
    from alignment_callback.functional.moments import feature_linear_cka

    sx, sy = linear_feature_state(x), linear_feature_state(y)
    got = float(feature_linear_cka(sx.features, sy.features, sx.scatter, sy.scatter))
    assert got == pytest.approx(ref.linear_cka(centered64(x), centered64(y)), abs=2e-6)


@pytest.mark.parametrize("name", ALL_BUT_SLOW + ("rsa", "rbf_cka", "bures_similarity", "shape_metric",
                                                 "linear_predictivity"))
def test_every_measure_accepts_a_massive_offset(name):
    x, y = massive(1e4, n=120, d=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r32 = F.calibrated_alignment(x, y, name, num_permutations=10)
        r64 = F.calibrated_alignment(x.double(), y.double(), name, num_permutations=10)
    assert np.isfinite(float(r32.raw))
    assert float(r32.raw) == pytest.approx(float(r64.raw), abs=1e-5)


@pytest.mark.parametrize("name", ["linear_cka", "unbiased_cka", "procrustes_similarity",
                                  "cca_similarity", "linear_predictivity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_features_are_still_refused(name, dtype):
    x = torch.full((50, 4), 0.1, dtype=dtype)
    x[:, 1] = 0.3 + 1e4  # constant columns whose centering rounds
    with pytest.raises(ValueError, match="zero-variance"):
        F.calibrated_alignment(x, torch.randn(50, 4, dtype=dtype), name, num_permutations=10)


def test_constant_features_refused_on_the_features_route():
    x = torch.full((5000, 3), 0.1)
    x[:, 2] = 1e4 + 0.7
    with pytest.raises(ValueError, match="zero-variance"):
        linear_feature_state(x)


EVERY_FEATURE = ("linear_cka", "rbf_cka", "unbiased_cka", "rsa", "rv_coefficient", "svcca",
                 "procrustes_similarity", "shape_metric", "bures_similarity", "cca_similarity",
                 "pwcca", "linear_predictivity")


@pytest.mark.parametrize("name", EVERY_FEATURE)
def test_an_offset_on_every_feature_costs_float32_no_accuracy(name):
    """Rows that share a common component 10⁴ times their spread: the float32 result equals the
    float64 one on the same numbers.  (Formulas like ‖x_i‖² + ‖x_j‖² − 2x_iᵀx_j or 1 − x̂_iᵀx̂_j
    lose (10⁴)² of float32's 10⁷ resolution here: RBF CKA and RSA were off by 1.0 and 0.6, and
    the SVD-based measures refused the data as constant.)  The kNN family is left out: its
    neighbor order is as exact as the float32 input itself (rounding errors of eps·‖x‖²
    against differences of ‖x‖·spread), not more."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 24, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(150, 24, generator=g, dtype=torch.float64)
    x, y = (x + 1e4).float(), (y + 1e4).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r32 = float(getattr(F, name)(x, y))
        r64 = float(getattr(F, name)(x.double(), y.double()))
    assert r32 == pytest.approx(r64, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", EVERY_FEATURE)
def test_one_feature_far_larger_than_the_others_hides_none_of_their_variance(name, seed):
    """One feature at 2·10⁵ (and one of y at −10⁶) beside unit-variance ones, in float32: the
    zero-variance bound was taken over every feature at once, so the rounding of the large
    one (its centered values vary by 40 units of its rounding) hid the others' variance and
    linear / unbiased CKA, Procrustes, shape, Bures, CCA, PWCCA and predictivity refused the
    data as constant.  Each feature is now held to its own rounding.  And the column mean
    rounded to float32 left up to half an ulp of the offset (0.03 at 10⁶, 1–4 % of the
    spread) in the centered column: CCA and PWCCA were off by up to 9e-4 on some seeds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 16, generator=g)
    y = x @ torch.randn(16, 12, generator=g) + torch.randn(128, 12, generator=g)
    x[:, 0] += 2e5
    y[:, 5] -= 1e6
    measure = F.get_measure(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r32, r64 = float(measure(x, y)), float(measure(x.double(), y.double()))
    assert r32 == pytest.approx(r64, abs=1e-5)


@pytest.mark.parametrize("name,options", [
    ("cca_similarity", {}), ("pwcca", {}), ("shape_metric", {"alpha": 0.0}),
    ("linear_predictivity", {"ridge": 0.0}), ("svcca", {"cca_dim": 4})])
def test_one_feature_with_a_far_larger_spread_drops_no_direction_in_float32(name, options):
    """x's feature 0 times 2¹⁷ (exact in float32): the float32 SVD's rank cut (relative to
    the largest singular value) dropped every other direction of x: CCA 0.715 for 0.704,
    predictivity 0.12 for 0.45.  Each centered column is now scaled by its own power of two
    before the SVD, which leaves these measures' column spaces as they are; float32 equals
    float64 on the same numbers, either side, and (x's column space only) the value without
    the large feature."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(200, 8, generator=g)
    y = x[:, :4] + torch.randn(200, 4, generator=g)
    wide = x.clone()
    wide[:, 0] *= 2.0 ** 17
    measure = F.get_measure(name, **options)
    for a, b in ((wide, y), (y, wide)):
        assert float(measure(a, b)) == pytest.approx(float(measure(a.double(), b.double())),
                                                      abs=1e-5)
    if name != "pwcca":  # (PWCCA weighs x's own features)
        assert float(measure(wide, y)) == pytest.approx(float(measure(x.double(), y.double())),
                                                        abs=1e-5)
