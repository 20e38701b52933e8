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
