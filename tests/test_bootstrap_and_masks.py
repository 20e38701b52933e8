"""Subsample checks of ``bootstrap_interval`` and attention-mask checks of the pooling.

Every bootstrap refusal must come before anything is computed (the full-data estimate
included) and name ``fraction``; the masks of ``"mean"`` / ``"last"`` pooling must match the
activations and leave every row a token.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import alignment_callback.functional.bootstrap as bootstrap_module
from alignment_callback.functional import calibrated_alignment, calibrated_layer_alignment
from alignment_callback.functional.bootstrap import bootstrap_interval
from alignment_callback.functional.preprocessing import pool_features, prepare_features


def _pair(n: int, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x + 0.7 * torch.randn(n, d, generator=g)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts the calibrations ``bootstrap_interval`` runs (the estimate and each replicate)."""
    seen: list[int] = []

    def counting(*args, **kwargs):
        seen.append(1)
        return calibrated_alignment(*args, **kwargs)

    monkeypatch.setattr(bootstrap_module, "calibrated_alignment", counting)
    return seen


# ----------------------------------------------------------------- 1. subsample = whole data
@pytest.mark.parametrize("n, fraction", [(10, 0.96), (10, 0.99), (4, 0.9)])
def test_a_fraction_that_keeps_every_row_is_refused(calls, n, fraction):
    x, y = _pair(n)
    with pytest.raises(ValueError, match=rf"fraction={fraction} .*whole data"):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=3, num_permutations=9,
                           fraction=fraction)
    assert calls == []


@pytest.mark.parametrize("n, fraction", [(3, 0.1), (2, 0.5), (40, 0.01)])
def test_a_fraction_below_two_rows_is_refused_not_raised_to_two(calls, n, fraction):
    x, y = _pair(n)
    with pytest.raises(ValueError, match=rf"fraction={fraction} keeps .* needs at least 2"):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=3, num_permutations=9,
                           fraction=fraction)
    assert calls == []


def test_grouped_subsample_keeping_every_group_is_refused(calls):
    x, y = _pair(40)
    two_groups = [i % 2 for i in range(40)]  # round(0.8 · 2) = 2: both groups, every time
    with pytest.raises(ValueError, match=r"fraction=0.8 with groups .*2 of the 2 groups.*whole"):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=3, num_permutations=9,
                           groups=two_groups)
    assert calls == []


def test_valid_fractions_still_subsample_as_before():
    x, y = _pair(40)
    res = bootstrap_interval(x, y, "linear_cka", num_bootstrap=3, num_permutations=19, seed=2)
    assert res.subsample_size == 32
    gen = torch.Generator().manual_seed(2)
    for b in range(3):  # the documented draw: m rows of randperm, replicate seed seed + 1 + b
        idx = torch.sort(torch.randperm(40, generator=gen)[:32]).values
        ref = calibrated_alignment(x[idx], y[idx], "linear_cka", num_permutations=19, seed=3 + b)
        assert float(res.replicates[b]) == float(ref.calibrated)


# ------------------------------------------------- 2. a replicate's groups must be permutable
def test_grouped_replicates_without_two_equal_size_groups_are_refused_up_front(calls):
    sizes = [5, 5, 6, 7, 8]  # valid on all the data (the two 5s), not on most 4-group subsets
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x, y = _pair(len(labels))
    calibrated_alignment(x, y, "linear_cka", num_permutations=9, groups=labels)  # fine in full
    calls.clear()
    with pytest.raises(ValueError, match=r"fraction=0.8 with groups .*no two groups of the same "
                                         r"size.*no block permutation"):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=10, num_permutations=9,
                           groups=labels)
    assert calls == []


def test_grouped_replicates_keep_whole_groups_and_block_permutations(calls):
    labels = np.repeat(np.arange(12), [2] * 6 + [3] * 6)  # 12 groups, two sizes
    x, y = _pair(len(labels))
    res = bootstrap_interval(x, y, "linear_cka", num_bootstrap=4, num_permutations=9,
                             groups=labels)
    assert len(calls) == 5 and res.replicates.shape == (4,)
    # round(0.8 · 12) = 10 of the 12 groups (30 rows): two dropped, 24 to 26 rows kept; the
    # smallest replicate's count is reported
    assert 24 <= res.subsample_size <= 26
    assert res.low <= res.high


# ------------------------------------------------------------ 3. too few rows for the measure
def test_too_few_subsample_rows_for_the_measure_are_reported_before_computing(calls):
    x, y = _pair(12)
    with pytest.raises(ValueError, match=r"fraction=0.8 keeps round\(0.8 · 12\) = 10 of the n=12 "
                                         r"rows, but mutual_knn, k=10 needs at least 11"):
        bootstrap_interval(x, y, "mutual_knn", num_bootstrap=3, num_permutations=9)
    assert calls == []
    with pytest.raises(ValueError, match=r"fraction=0.5 .* unbiased_cka needs at least 4"):
        bootstrap_interval(x[:5], y[:5], "unbiased_cka", num_bootstrap=3, num_permutations=9,
                           fraction=0.5)
    assert calls == []


def test_too_few_grouped_rows_for_the_measure_are_reported_before_computing(calls):
    labels = np.repeat(np.arange(6), 2)  # 12 rows; a replicate keeps 5 groups = 10 rows
    x, y = _pair(12)
    with pytest.raises(ValueError, match=r"fraction=0.8 with groups .*only 10 rows, but "
                                         r"mutual_knn, k=10 needs at least 11"):
        bootstrap_interval(x, y, "mutual_knn", num_bootstrap=3, num_permutations=9,
                           groups=labels)
    assert calls == []


def test_measure_keywords_are_checked_before_computing(calls):
    x, y = _pair(20)
    with pytest.raises(TypeError, match="unexpected keyword"):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=2, num_permutations=9, k=3)
    assert calls == []


# ------------------------------------------------------------------- 3b. rescaled to n
@pytest.mark.parametrize("grouped", [False, True])
def test_the_interval_is_the_replicates_rescaled_deviations_around_the_estimate(grouped):
    """low/high = estimate + sqrt(m/(n - m)) (q - mean of the replicates), m and n in groups
    with groups, clipped to [0, 1], for the estimate and replicates before their clipping at 0:
    recomputed here in NumPy from the returned replicates."""
    x, y = _pair(60, seed=3)
    groups = [i // 3 for i in range(60)] if grouped else None
    bi = bootstrap_interval(x, y, "linear_cka", num_bootstrap=30, num_permutations=49,
                            confidence=0.9, groups=groups, seed=5)
    m, n = (16, 20) if grouped else (48, 60)
    reps = bi.unclipped_replicates.numpy()
    assert np.array_equal(bi.replicates.numpy(), np.maximum(reps, 0.0))
    c = np.sqrt(m / (n - m))
    low, high = bi.unclipped_estimate + c * (np.quantile(reps, [0.05, 0.95]) - reps.mean())
    assert 0 < low < high < 1
    assert bi.low == pytest.approx(low, abs=1e-12) and bi.high == pytest.approx(high, abs=1e-12)
    near_one = bootstrap_interval(x, x + 1e-3 * y, "linear_cka", num_bootstrap=20,
                                  num_permutations=49)
    assert 0 <= near_one.low <= near_one.high <= 1.0


def test_the_interval_covers_like_a_confidence_interval():
    """Monte Carlo at n = 100 (linear CKA, moments null for speed): the 95 % interval has about
    the width of the true 95 % range of the estimate over fresh data sets, and covers the mean
    estimate as often as a 95 % interval does, within 3σ (here 71 of 80).  The unscaled
    percentile interval had half the width and covered 66 % (a quarter of the sampling
    variance: m rows drawn without replacement vary by σ²(1/m - 1/n))."""
    gen = torch.Generator().manual_seed(1)

    def draw():
        x = torch.randn(100, 4, generator=gen, dtype=torch.float64)
        return x, x + torch.randn(100, 4, generator=gen, dtype=torch.float64)

    estimates = np.array([float(calibrated_alignment(*draw(), "linear_cka", null="moments")
                                .calibrated) for _ in range(300)])
    lo, hi = np.quantile(estimates, [0.025, 0.975])
    covered, widths = [], []
    for r in range(80):
        bi = bootstrap_interval(*draw(), "linear_cka", num_bootstrap=40, null="moments", seed=r)
        covered.append(bi.low <= estimates.mean() <= bi.high)
        widths.append(bi.high - bi.low)
    assert 0.8 <= np.mean(widths) / (hi - lo) <= 1.3
    # within 3σ of the nominal 0.95 over 80 data sets (the unscaled interval: 0.66)
    assert np.mean(covered) >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / 80)


@pytest.mark.parametrize("case", ["mutual_knn", "groups", "layer_max"])
def test_the_interval_covers_like_a_confidence_interval_beyond_smooth_single_pairs(case):
    """The same Monte Carlo (n = 100, a clear signal, 80 data sets, 40 replicates) where the
    smooth-statistic argument for the √(m/(n − m)) scaling does not hold as such, each with
    the permutation null it needs (K = 39): mutual kNN (a count, not smooth in the rows),
    linear CKA with 25 groups of 4 (whole groups subsampled, block permutations) and the max of
    linear CKA over 2 × 2 layer pairs.  The interval covers the mean estimate as often as a
    95 % interval does, within 3σ, and has about the width of the estimate's true 95 % range
    (measured: 1.06×, 1.04×, 1.13×; the unscaled percentile interval is half as wide)."""
    gen = torch.Generator().manual_seed(1)
    n, measure = 100, "mutual_knn" if case == "mutual_knn" else "linear_cka"
    kw = {"num_permutations": 39}
    if case == "groups":
        kw["groups"] = torch.arange(n) // 4

    def pair():
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        if case == "groups":  # rows of a group share a component: they are not exchangeable
            shared = torch.randn(n // 4, 4, generator=gen, dtype=torch.float64)
            x = x + shared.repeat_interleave(4, 0)
        return x, x + torch.randn(n, 4, generator=gen, dtype=torch.float64)

    def draw():
        if case != "layer_max":
            return pair()
        (x1, y1), (x2, y2) = pair(), pair()
        return [x1, x2], [y1, y2]

    def estimate(x, y, seed):
        fn = calibrated_layer_alignment if case == "layer_max" else calibrated_alignment
        return float(fn(x, y, measure, seed=seed, **kw).calibrated)

    estimates = np.array([estimate(*draw(), seed) for seed in range(300)])
    assert np.mean(estimates > 0) > 0.95  # a clear signal: the estimates are not clipped
    lo, hi = np.quantile(estimates, [0.025, 0.975])
    covered, widths = [], []
    for r in range(80):
        bi = bootstrap_interval(*draw(), measure, num_bootstrap=40, seed=r, **kw)
        covered.append(bi.low <= estimates.mean() <= bi.high)
        widths.append(bi.high - bi.low)
    assert 0.8 <= np.mean(widths) / (hi - lo) <= 1.4, np.mean(widths) / (hi - lo)
    assert np.mean(covered) >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / 80), np.mean(covered)


@pytest.mark.parametrize("max_score", ["auto", None])
def test_the_unclipped_estimate_is_the_excess_over_tau_before_clipping(max_score):
    """``unclipped_estimate`` is (s - τ)/(1 - τ) (s - τ with max_score=None) of the same
    calibration, computed here from its raw score and τ: negative for independent data, where
    the calibrated estimate is 0, and the calibrated estimate itself where that is above 0."""
    g = torch.Generator().manual_seed(4)
    x, noise = torch.randn(60, 5, generator=g), torch.randn(60, 5, generator=g)
    for y in (noise, x + 0.5 * noise):
        bi = bootstrap_interval(x, y, "linear_cka", num_bootstrap=2, num_permutations=99,
                                seed=3, max_score=max_score)
        full = calibrated_alignment(x, y, "linear_cka", num_permutations=99, seed=3,
                                    max_score=max_score)
        s, tau = float(full.raw), float(full.threshold)
        excess = s - tau if max_score is None else (s - tau) / (1.0 - tau)
        assert bi.estimate == float(full.calibrated)
        assert bi.estimate == pytest.approx(max(excess, 0.0), abs=1e-6)
        assert bi.unclipped_estimate == pytest.approx(excess, abs=1e-7)
        assert (excess < 0) if y is noise else (excess > 0.1)


def test_a_threshold_near_the_maximum_cannot_make_the_unclipped_values_explode():
    """(s - τ)/(1 - τ) with τ a hair below 1 is about -(1 - s)/(1 - τ): one such replicate
    (-9000 at τ = 0.9999) would move the replicates' mean, and so the interval, arbitrarily.
    The unclipped value is bounded below by -1, and is 0 where 1 - τ is within float error of
    0 (1e-5 for float32 data), where the calibration itself reports 0."""
    unclipped = bootstrap_module._unclipped
    assert unclipped(0.0, 0.1, 0.9999, 1.0, torch.float32) == -1.0
    assert unclipped(0.0, 0.1, 1.0 - 1e-6, 1.0, torch.float32) == 0.0
    assert unclipped(0.0, 0.1, 1.0 - 1e-6, 1.0, torch.float64) == -1.0
    assert unclipped(0.0, 0.1, 0.2, 1.0, torch.float32) == pytest.approx(-0.125)
    assert unclipped(0.0, 0.1, 0.2, None, torch.float32) == pytest.approx(-0.1)  # unbounded
    assert unclipped(0.3, 0.5, 0.2, 1.0, torch.float32) == 0.3  # above 0: the calibrated score


def test_float_error_of_s_max_minus_tau_is_judged_at_the_calibration_s_precision(monkeypatch):
    """The calibration takes float64 precision (1e-11) when a layer of either side is float64;
    the bootstrap read x's first layer only, so float32 x with float64 y judged s_max - τ at
    float32's 1e-5 and could report 0 where the calibration's rule gives -1."""
    seen = []

    def spy(*args):
        seen.append(args[-1])
        return unclipped(*args)

    unclipped = bootstrap_module._unclipped
    monkeypatch.setattr(bootstrap_module, "_unclipped", spy)
    x, y = _pair(30)
    for xs, ys, expected in ((x, y.double(), torch.float64), ([x, x], [y, y.double()],
                             torch.float64), (x, y, torch.float32)):
        seen.clear()
        bootstrap_interval(xs, ys, "linear_cka", num_bootstrap=2, num_permutations=19)
        assert seen and set(seen) == {expected}


def test_weakly_aligned_pairs_get_intervals_not_zero_width():
    """Monte Carlo at n = 100, weak signal (linear CKA, moments null for speed): a third of
    the calibrated estimates are 0.  The interval formed from the clipped replicates was
    exactly [0, 0] in 14 % of the data sets and covered max(0, mean excess) in 71 %; formed
    from the excess before clipping and clipped at its ends, it is [0, 0] in 1 % and covers
    95 % (80 data sets).  Checked on 30 data sets."""
    gen = torch.Generator().manual_seed(1)

    def draw():
        x = torch.randn(100, 4, generator=gen, dtype=torch.float64)
        return x, 0.2 * x + torch.randn(100, 4, generator=gen, dtype=torch.float64)

    excess, calibrated = [], []
    for _ in range(300):
        res = calibrated_alignment(*draw(), "linear_cka", null="moments")
        s, tau = float(res.raw), float(res.threshold)
        excess.append((s - tau) / (1.0 - tau))
        calibrated.append(float(res.calibrated))
    assert 0.2 <= np.mean(np.array(calibrated) == 0) <= 0.5  # weak: many estimates are 0
    target = max(0.0, float(np.mean(excess)))
    covered, zero = [], []
    for r in range(30):
        bi = bootstrap_interval(*draw(), "linear_cka", num_bootstrap=40, null="moments", seed=r)
        covered.append(bi.low <= target <= bi.high)
        zero.append(bi.high == 0.0)
    assert np.mean(zero) <= 0.1
    assert np.mean(covered) >= 0.85


# ------------------------------------------------------------------------------ 4. masks
def _tokens(n: int = 4, t: int = 5, d: int = 3) -> torch.Tensor:
    return torch.arange(n * t * d, dtype=torch.float32).reshape(n, t, d) + 1.0


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_a_mask_of_the_wrong_shape_is_refused(pool):
    x = _tokens()
    for bad in (torch.ones(4, 4), torch.ones(3, 5), torch.ones(4, 5, 1)):
        expected = (re.escape("mask must have shape (n, T) = (4, 5)") + ".*"
                    + re.escape("(4, 5, 3)") + ".*" + re.escape(str(tuple(bad.shape))))
        with pytest.raises(ValueError, match=expected):
            pool_features(x, pool, mask=bad)
        with pytest.raises(ValueError, match="mask"):
            prepare_features(x, pool, mask=bad)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_a_mask_row_without_tokens_is_refused(pool):
    x = _tokens()
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[2] = 0
    with pytest.raises(ValueError, match=rf"mask row\(s\) \[2\] mask out every token.*{pool}"):
        pool_features(x, pool, mask=mask)
    with pytest.raises(ValueError, match=r"mask row\(s\) \[2\]"):
        prepare_features(x, pool, normalize=False, mask=mask.bool())


def test_valid_masks_pool_the_unmasked_tokens():
    x = _tokens()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
    last = pool_features(x, "last", mask=mask)
    assert torch.equal(last, x[torch.arange(4), torch.tensor([2, 4, 3, 0])])
    mean = pool_features(x, "mean", mask=mask.bool())
    ref = torch.stack([x[i][mask[i].bool()].mean(0) for i in range(4)])
    torch.testing.assert_close(mean, ref)
    # "cls" takes the first unmasked token (the CLS token of a left-padded row)
    assert torch.equal(pool_features(x, "cls", mask=mask), x[torch.arange(4), torch.tensor([0, 0, 2, 0])])
    # pools that do not use the mask ignore it, as before
    assert torch.equal(pool_features(x, "flatten", mask=torch.zeros(4, 5)), x.reshape(4, -1))


def test_mask_values_only_say_real_or_padding():
    """"nonzero = a real token": a global token marked 2 (Longformer), -1 or 0.5 counts once,
    like 1.  The mean used the values as weights (a row of 1 and -1 gave x0 - x1)."""
    x = _tokens().double()
    binary = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 0, 0, 0]])
    ref = np.stack([x[i].numpy()[binary[i].numpy() != 0].mean(0) for i in range(4)])
    for values in (binary * 2, binary * 0.5, binary * torch.tensor([1, -1, 2, 1, 1])):
        mean = pool_features(x, "mean", mask=values)
        np.testing.assert_allclose(mean.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_masked_mean_of_float16_tokens_does_not_overflow():
    """An outlier dimension of ~±340 over 400 real tokens sums past float16's 65504; the
    true mean is finite (and so is the unmasked mean).  The mean is summed and returned in
    float32 (it was rounded back to float16, an error of up to 2e-3 relative), so it equals
    the float64 mean of the same float16 values to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    x = (340 * sign + 30 * torch.randn(3, 512, 4, generator=g)).half()
    mask = torch.ones(3, 512, dtype=torch.long)
    mask[:, 400:] = 0
    mean = pool_features(x, "mean", mask=mask)
    ref = x[:, :400].double().numpy().mean(1)
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all()
    np.testing.assert_allclose(mean.double().numpy(), ref, rtol=1e-6, atol=1e-5)
    unmasked = pool_features(x, "mean")
    assert unmasked.dtype == torch.float32
    np.testing.assert_allclose(unmasked.double().numpy(), x.double().numpy().mean(1),
                               rtol=1e-6, atol=1e-5)


def test_a_seed_whose_replicate_seeds_overflow_is_refused_before_computing(calls):
    """Replicate b uses seed + 1 + b: seed = 2**63 - 1 failed after the full calibration, with
    a message about a seed the user never passed."""
    x, y = _pair(20)
    with pytest.raises(ValueError, match=r"seed must be at most 2\*\*63 - 1 - num_bootstrap.*"
                                         r"seed \+ 1 \+ b"):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=3, seed=2**63 - 1)
    assert calls == []


def test_masked_mean_of_integer_tokens_is_not_truncated():
    """The float mean was cast back to the integer dtype: the mean of 1 and 2 became 1."""
    x = torch.tensor([[[1], [2], [7]]])
    mean = pool_features(x, "mean", mask=torch.tensor([[1, 1, 0]]))
    assert mean.is_floating_point() and float(mean) == 1.5


# ------------------------------------------------- replicates the calibration cannot resolve
def test_a_replicate_that_cannot_be_calibrated_is_refused_not_counted_as_zero(calls):
    """At m = k + 1 rows every row's k neighbors are all the others: mutual kNN is 1 for every
    permutation, τ = 1 = s_max, and the replicate's calibrated score is 0 by the rule for
    unresolvable thresholds.  Mixed in as 0 next to the estimate (resolved on all n rows),
    such replicates gave an interval of width 0 at the estimate; they are refused, naming the
    replicate, τ and the fix."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(14, 8, generator=g)
    y = x + 0.3 * torch.randn(14, 8, generator=g)
    full = calibrated_alignment(x, y, "mutual_knn", k=10, num_permutations=99)
    assert 0.0 < float(full.threshold) < 1.0 and float(full.calibrated) > 0.0  # resolved
    calls.clear()
    with pytest.raises(ValueError, match=r"fraction=0.8 keeps round\(0.8 · 14\) = 11 of the "
                       r"n=14 rows, but replicate 0 of 40 cannot be calibrated on its 11 rows: "
                       r"its null threshold τ = 1 reaches the maximum 1 of mutual_knn, k=10 "
                       r".*use more rows, a smaller k or a larger fraction$"):
        bootstrap_interval(x, y, "mutual_knn", k=10, num_bootstrap=40, num_permutations=99)
    assert len(calls) == 2  # the estimate and the first replicate: nothing more is computed
    # one more row per replicate resolves them: an interval of positive width
    bi = bootstrap_interval(x, y, "mutual_knn", k=9, num_bootstrap=40, num_permutations=99)
    assert bi.high > bi.low


@pytest.mark.parametrize("name", ["confidence", "fraction"])
@pytest.mark.parametrize("value", ["0.9", None, True, float("nan"), 1.0])
def test_confidence_and_fraction_of_the_wrong_type_name_the_argument(calls, name, value):
    x, y = _pair(20)
    with pytest.raises(ValueError, match=rf"^{name} must be a number in \(0, 1\), got "):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=3, num_permutations=9,
                           **{name: value})
    assert calls == []


@pytest.mark.parametrize("empty, side", [(([], [torch.ones(3, 2)]), "x"),
                                         (([torch.ones(3, 2)], {}), "y")])
def test_empty_layer_inputs_name_their_side(empty, side):
    with pytest.raises(ValueError, match=rf"^{side} layers are empty"):
        bootstrap_interval(*empty, "linear_cka", num_bootstrap=3, num_permutations=9)
