"""Benjamini–Hochberg, grouped permutation validity, and the subsampling interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control

from alignment_callback.functional import benjamini_hochberg, calibrated_alignment
from alignment_callback.functional.bootstrap import bootstrap_interval


# --------------------------------------------------------------------------------- BH
def test_bh_hand_computed():
    p = torch.tensor([0.01, 0.04, 0.03, 0.005, 0.2], dtype=torch.float64)
    # sorted 0.005, 0.01, 0.03, 0.04, 0.2 -> m p / i = 0.025, 0.025, 0.05, 0.05, 0.2
    # running min from the top: 0.025, 0.025, 0.05, 0.05, 0.2
    rejected, adjusted = benjamini_hochberg(p, alpha=0.04)
    torch.testing.assert_close(adjusted, torch.tensor([0.025, 0.05, 0.05, 0.025, 0.2],
                                                      dtype=torch.float64))
    assert rejected.tolist() == [True, False, False, True, False]
    rejected, _ = benjamini_hochberg(p, alpha=0.06)
    assert rejected.tolist() == [True, True, True, True, False]


def test_bh_equals_scipy_and_step_up_rule():
    rng = np.random.default_rng(0)
    for m in (1, 2, 7, 50, 333):
        p = np.concatenate([rng.uniform(size=m // 2), rng.uniform(0, 0.01, size=m - m // 2)])
        p[: m // 5] = np.round(p[: m // 5], 2)  # ties
        rejected, adjusted = benjamini_hochberg(torch.from_numpy(p), alpha=0.05)
        np.testing.assert_allclose(adjusted.numpy(), false_discovery_control(p, method="bh"),
                                   rtol=1e-12, atol=0)
        order = np.sort(p)
        ok = np.nonzero(order <= 0.05 * np.arange(1, m + 1) / m)[0]
        cutoff = order[ok[-1]] if ok.size else -1.0
        assert rejected.numpy().tolist() == (p <= cutoff).tolist()


def test_bh_shape_monotone_cap_and_errors():
    p = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1))
    rejected, adjusted = benjamini_hochberg(p)
    assert rejected.shape == adjusted.shape == p.shape and rejected.dtype == torch.bool
    assert adjusted.dtype == p.dtype
    flat_p, flat_q = p.reshape(-1), adjusted.reshape(-1)
    order = torch.argsort(flat_p)
    assert bool((flat_q[order].diff() >= 0).all())  # monotone in p
    assert bool((adjusted >= p).all()) and bool((adjusted <= 1).all())
    _, capped = benjamini_hochberg([0.9, 0.95, 1.0])
    assert capped.tolist() == [1.0, 1.0, 1.0]
    empty_r, empty_q = benjamini_hochberg(torch.empty(0))
    assert empty_r.numel() == 0 and empty_q.numel() == 0
    for bad in ([0.1, 1.5], [0.1, float("nan")], [-0.1]):
        with pytest.raises(ValueError, match="p-values"):
            benjamini_hochberg(bad)
    with pytest.raises(ValueError, match="alpha"):
        benjamini_hochberg([0.1], alpha=1.0)


# --------------------------------------------------------------------------------- groups
@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids oversubscription on shared CPUs (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_duplicated_rows_need_grouped_permutations(one_thread):
    """Each sample appears 3 times in x and in y (independent x and y).  Ordinary permutations
    break the copy structure the identity keeps, so the ungrouped test rejects far more often
    than alpha; block permutations of the groups hold alpha."""
    samples, copies, dim, draws, k_perm, alpha = 20, 3, 8, 200, 99, 0.05
    groups = np.repeat(np.arange(samples), copies)
    gen = torch.Generator().manual_seed(123)
    rejections = {"ungrouped": 0, "grouped": 0}
    for r in range(draws):
        x = torch.randn(samples, dim, generator=gen)[groups]
        y = torch.randn(samples, dim, generator=gen)[groups]
        for name, g in (("ungrouped", None), ("grouped", groups)):
            res = calibrated_alignment(x, y, "linear_cka", num_permutations=k_perm, alpha=alpha,
                                       seed=r, groups=g)
            rejections[name] += int(float(res.p_value) <= alpha)
    sigma = math.sqrt(alpha * (1 - alpha) / draws)
    assert rejections["ungrouped"] / draws > 0.5
    assert rejections["grouped"] / draws <= alpha + 3 * sigma


# --------------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_deterministic_and_ordered():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40, 4, generator=gen)
    x = z @ torch.randn(4, 10, generator=gen) + 0.3 * torch.randn(40, 10, generator=gen)
    y = z @ torch.randn(4, 12, generator=gen) + 0.3 * torch.randn(40, 12, generator=gen)
    state = torch.get_rng_state()
    a = bootstrap_interval(x, y, "linear_cka", num_bootstrap=8, num_permutations=50, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = bootstrap_interval(x, y, "linear_cka", num_bootstrap=8, num_permutations=50, seed=3)
    c = bootstrap_interval(x, y, "linear_cka", num_bootstrap=8, num_permutations=50, seed=4)
    assert a.low <= a.high and a.subsample_size == 32
    assert a.low == b.low and a.high == b.high and torch.equal(a.replicates, b.replicates)
    assert not torch.equal(a.replicates, c.replicates)
    full = calibrated_alignment(x, y, "linear_cka", num_permutations=50, seed=3)
    assert a.estimate == float(full.calibrated) and a.estimate > 0
    layered = bootstrap_interval({"l": x}, [y, x], "mutual_knn", num_bootstrap=4,
                                 num_permutations=50, k=5, aggregate="mean")
    assert layered.low <= layered.high and layered.replicates.shape == (4,)
    grouped = bootstrap_interval(x, y, "linear_cka", num_bootstrap=3, num_permutations=50,
                                 groups=np.repeat(np.arange(20), 2))
    assert grouped.subsample_size == 32 and grouped.low <= grouped.high
    with pytest.raises(ValueError, match="fraction"):
        bootstrap_interval(x, y, fraction=1.0)


def test_a_p_value_on_the_step_up_boundary_is_rejected():
    """p_(3) = 3·α/m exactly in decimals (0.05 = 3·0.2/12), while 12·0.05/3 rounds above 0.2."""
    p = torch.tensor([0.001, 0.01, 0.05] + [0.9] * 9, dtype=torch.float64)
    assert 12 * 0.05 / 3 > 0.2  # the rounding that made the old rule miss it
    rejected, _ = benjamini_hochberg(p, alpha=0.2)
    assert rejected.tolist() == [True] * 3 + [False] * 9


def _bh_reference(p: np.ndarray) -> np.ndarray:
    """float64 q-values from the definition q_(i) = min_{j >= i} min(m p_(j) / j, 1)."""
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order].astype(np.float64) * m / np.arange(1, m + 1)
    q = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(m)
    out[order] = q
    return out


def test_bh_of_many_float16_p_values_does_not_overflow_its_ranks():
    """Ranks above 65,504 were inf in float16, q = 0 at the top, and every hypothesis was
    rejected."""
    rng = np.random.default_rng(1)
    p = rng.uniform(size=70_000)
    p[:10] = 0.0
    p16 = torch.from_numpy(p).half()
    rejected, adjusted = benjamini_hochberg(p16, alpha=0.05)
    ref = _bh_reference(p16.double().numpy())
    assert adjusted.dtype == torch.float16
    np.testing.assert_allclose(adjusted.double().numpy(), ref, rtol=1e-3, atol=0)
    assert rejected.numpy().tolist() == (ref <= 0.05).tolist()


def test_bh_of_bfloat16_p_values_gets_no_more_than_float32_tolerance():
    """16 units of bfloat16 (12.5 %) accepted q = 0.0559 at alpha = 0.05."""
    p = torch.tensor([0.0559], dtype=torch.bfloat16)
    rejected, adjusted = benjamini_hochberg(p, alpha=0.05)
    assert float(adjusted) > 0.055 and not bool(rejected)


def test_bh_of_a_list_of_floats_is_float64():
    """A list of Python floats was converted to float32: p = 1e-50 became 0, and
    p = 0.05000009 became 0.05 and was rejected at 0.05."""
    for values in ([1e-50, 0.5], [3e-08, 0.2, 0.9], [0.05000009]):
        rejected, adjusted = benjamini_hochberg(values, alpha=0.05)
        ref = _bh_reference(np.asarray(values))
        assert adjusted.dtype == torch.float64
        np.testing.assert_allclose(adjusted.numpy(), ref, rtol=1e-15, atol=0)
        assert rejected.tolist() == (ref <= 0.05).tolist()


def test_bh_of_a_list_of_0_dim_tensors():
    """p-values gathered from results ([r.p_value for r in results]) are 0-dim tensors, on the
    GPU or in bfloat16: numpy could not read them (CUDA: "can't convert cuda:0 device type
    tensor to numpy"; bfloat16: unsupported ScalarType)."""
    values = [torch.tensor(v, dtype=torch.bfloat16) for v in (0.001, 0.01, 0.2, 0.9)]
    rejected, adjusted = benjamini_hochberg(values, alpha=0.05)
    ref = _bh_reference(np.array([float(v) for v in values]))
    assert adjusted.dtype == torch.float64 and rejected.tolist() == (ref <= 0.05).tolist()
    np.testing.assert_allclose(adjusted.numpy(), ref, rtol=1e-15)
