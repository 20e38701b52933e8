"""``null="auto"`` on tied (duplicate) samples: the permutation null.

Two identical rows on either side (one-hot labels, integer codes) make the permutation null
lumpy, a few atoms, where the moment-matched Pearson III null is continuous and was validated
on continuous data only: ``"auto"`` then draws permutations (identical to ``null="permutation"``
with the same seed), while continuous data keeps the moments exactly as before.  The tie flag
is computed once per side and kept with its invariants, so a cached reference (metric objects,
the engine behind the callback) computes it once.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional import moments as mo
from alignment_callback.functional import pipeline
from alignment_callback.functional.registry import get_measure
from alignment_callback.metrics import CalibratedAlignment

GRAM = ("linear_cka", "rbf_cka", "unbiased_cka", "rsa")
K = 99
FIELDS = ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std", "effect_size",
          "percentile", "null")


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).double()


def tied_pair(kind: str, seed: int = 0, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Data with duplicate rows on one or both sides, where the old rule took the moments."""
    g = torch.Generator().manual_seed(seed)
    if kind == "one_hot":  # both sides one-hot labels
        return (one_hot(torch.randint(0, 5, (n,), generator=g), 5),
                one_hot(torch.randint(0, 6, (n,), generator=g), 6))
    if kind == "integer":  # small integer codes (no zero row): 27 distinct rows, n = 40
        return (torch.randint(1, 4, (n, 3), generator=g).double(),
                torch.randint(1, 4, (n, 3), generator=g).double())
    # y one-hot labels, x continuous: ties on one side are enough
    return (torch.randn(n, 6, generator=g, dtype=torch.float64),
            one_hot(torch.randint(0, 6, (n,), generator=g), 6))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def assert_same(a, b) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------- the tie flag
def test_has_tied_rows_matches_numpy_unique():
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        n, d, levels = 5 + trial % 7, 1 + trial % 4, 2 + trial % 3
        x = torch.randint(0, levels, (n, d), generator=g).double()
        expected = len(np.unique(x.numpy(), axis=0)) < n
        assert mo.has_tied_rows(x) is expected
        assert mo.has_tied_rows(x.float()) is expected
    x = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [2.0, 3.0]])  # -0.0 == 0.0
    assert mo.has_tied_rows(x)
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0 + 2.0 ** -50]], dtype=torch.float64)  # one ulp apart
    assert not mo.has_tied_rows(x)
    assert not mo.has_tied_rows(torch.randn(200, 3, generator=g))


def test_distinct_rows_compare_only_rows_whose_hashes_collide(monkeypatch):
    """Equal to ``torch.unique(dim=0)`` (rows, order, inverse) on every dtype; when hashes
    collide (forced here) only the colliding rows are compared, and all rows are sorted only
    when two are identical.  Before, any collision sorted every row: 2·10⁶ float32 rows of
    width 2, all distinct, took 40 s of a 49 s moments call (a hash linear in the rows' bits
    collided about a hundred times)."""
    from alignment_callback.functional import neighbors

    def unique(x):
        distinct, copies = torch.unique(x + 0.0, dim=0, return_inverse=True)
        return (x, None) if distinct.shape[0] == x.shape[0] else (distinct, copies)

    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for x in (torch.randn(50, 3, generator=g), torch.randint(-1, 2, (50, 2), generator=g),
                  torch.randn(9, 4, generator=g)[torch.randint(0, 9, (30,), generator=g)]):
            (a, i), (b, j) = neighbors.distinct_rows(x.to(dtype)), unique(x.to(dtype))
            assert torch.equal(a, b) and (i is None) == (j is None)
            assert i is None or torch.equal(i, j)
    sorted_rows = []
    real_unique = torch.unique

    def spy(x, *args, **kwargs):
        if kwargs.get("dim") == 0:
            sorted_rows.append(x.shape[0])
        return real_unique(x, *args, **kwargs)

    monkeypatch.setattr(torch, "unique", spy)
    original = neighbors._row_hashes
    monkeypatch.setattr(neighbors, "_row_hashes",  # rows 3 and 7 share a hash
                        lambda bits: torch.where(torch.arange(len(bits)) == 7,
                                                 original(bits)[3], original(bits)))
    x = torch.randn(100, 2, generator=g)
    assert neighbors.distinct_rows(x)[1] is None and sorted_rows == [2]
    x[7] = x[3]
    sorted_rows.clear()
    distinct, copies = neighbors.distinct_rows(x)
    assert sorted_rows == [2, 100] and distinct.shape[0] == 99
    assert torch.equal(distinct[copies], x)


def test_tie_flag_is_kept_with_the_invariants_and_skips_them_under_auto(monkeypatch):
    """The flag is computed once per side from its features (the same for the feature-space
    and the n×n route of linear CKA) and kept in ``side.invariants``; with ties, ``"auto"``
    computes no invariants at all (they would be discarded)."""
    x, y = tied_pair("one_side", seed=5)
    for null in ("auto", "permutation"):
        xside, yside = pipeline._sides(x, y, [get_measure("linear_cka")], null)
        assert pipeline._tied_sides(xside, yside) == "y has"
        assert xside.invariants == {("tied_rows", 0): False}
        assert yside.invariants == {("tied_rows", 0): True}

    def no_invariants(state):
        raise AssertionError("invariants computed for a tied pair under null='auto'")

    monkeypatch.setattr(pipeline, "invariants", no_invariants)
    res = quiet(F.calibrated_alignment, x, y, "linear_cka", K, null="auto")
    assert res.null_method == "permutation"


def test_pearson3_valid_excludes_ties():
    assert mo.pearson3_valid(64, 0.5, 0.1)
    assert mo.pearson3_valid(64, 0.5, 0.1, tied=False)
    assert not mo.pearson3_valid(64, 0.5, 0.1, tied=True)
    ok = mo.pearson3_valid(64, torch.tensor([0.1, 0.1, 3.0]), torch.tensor([0.1, 0.1, 0.1]),
                           torch.tensor([False, True, False]))
    assert ok.tolist() == [True, False, False]


# ----------------------------------------------------------------- auto: permutations on ties
@pytest.mark.parametrize("kind", ["one_hot", "integer", "one_side"])
@pytest.mark.parametrize("measure", GRAM)
def test_auto_on_tied_rows_is_the_permutation_null(measure, kind):
    x, y = tied_pair(kind)
    auto = quiet(F.calibrated_alignment, x, y, measure, K, null="auto", seed=4)
    perm = F.calibrated_alignment(x, y, measure, K, null="permutation", seed=4)
    assert auto.null_method == perm.null_method == "permutation"
    assert auto.null.numel() == K
    assert_same(auto, perm)
    # the explicit request keeps the moments, with a warning that names the ties
    with pytest.warns(RuntimeWarning, match=r"no tied samples; here n=40 and .* tied \(identical\)"
                                            r" rows, which make the null lumpy"):
        moments = F.calibrated_alignment(x, y, measure, K, null="moments", seed=4)
    assert moments.null_method == "moments" and moments.null.numel() == 0


def test_auto_on_tied_rows_in_a_layer_list_and_several_measures():
    x, y = tied_pair("one_hot", seed=2)
    auto = quiet(F.calibrate_measures, {"a": x}, {"b": y}, list(GRAM), num_permutations=K,
                 null="auto", seed=5)
    perm = F.calibrate_measures({"a": x}, {"b": y}, list(GRAM), num_permutations=K, seed=5)
    for m in GRAM:
        assert auto[m].null_method == "permutation"
        assert_same(auto[m], perm[m])


# ---------------------------------------------------------------- continuous data: unchanged
@pytest.mark.parametrize("measure", GRAM)
def test_auto_on_continuous_data_keeps_the_moments(measure):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = 0.2 * x[:, :5] + torch.randn(64, 5, generator=g, dtype=torch.float64)
    assert not mo.has_tied_rows(x) and not mo.has_tied_rows(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # inside the validated range
        auto = F.calibrated_alignment(x, y, measure, K, null="auto")
        moments = F.calibrated_alignment(x, y, measure, K, null="moments")
    assert auto.null_method == moments.null_method == "moments"
    assert_same(auto, moments)


# ----------------------------------------------- statistical: size of "auto" on tied data
@pytest.mark.parametrize("measure,jitter,first", [("rsa", 0.0, 1000), ("linear_cka", 1e-6, 5000)],
                         ids=["tied", "nearly_tied"])
def test_auto_false_positive_rate_on_tied_data_is_at_most_alpha(measure, jitter, first):
    """Independent one-hot labels, balanced: 2 classes of 16 against 16 pairs (n = 32).  The
    null of the score has 9 atoms; the Pearson III p-value of the atom at +1.1 σ is 0.133
    while 26 % of the permutations reach it, so at α = 0.14 the moments reject 26 % of
    independent draws (91 of these 400, against a bound of 76).  The permutation null keeps
    the rate at most α (16 of 400).  With 1e-6 noise on every entry (a saturated softmax is as
    close) no two rows were identical, so "auto" took the moments (26.5 % rejected at
    α = 0.15): rows within NEAR_TIE_RTOL of the rows' RMS distance now count as tied."""
    n, alpha, draws, k = 32, 0.14, 400, 200
    rejected, methods = 0, set()
    for draw in range(draws):
        g = torch.Generator().manual_seed(first + draw)
        x = one_hot(torch.randperm(n, generator=g) % 2, 2)
        y = one_hot(torch.randperm(n, generator=g) % 16, 16)
        x, y = (t + jitter * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (x, y))
        res = quiet(F.calibrated_alignment, x, y, measure, k, alpha=alpha, null="auto",
                    seed=draw)
        methods.add(res.null_method)
        rejected += float(res.p_value) <= alpha
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws)
    assert rejected / draws <= bound
    assert methods == {"permutation"}


def test_near_ties_are_found_without_the_distance_matrix():
    """Against the brute-force nearest pair: tied when the closest two rows are within rtol of
    the RMS pairwise distance, on clustered and continuous data."""
    g = torch.Generator().manual_seed(4)
    for trial in range(30):
        n, d = 20 + 7 * trial, 1 + trial % 6
        centers = torch.randn(max(2, trial), d, generator=g, dtype=torch.float64)
        x = centers[torch.randint(0, len(centers), (n,), generator=g)]
        x = x + 10.0 ** -(trial % 8) * torch.randn(n, d, generator=g, dtype=torch.float64)
        dist = torch.cdist(x, x)
        rms = math.sqrt(float((dist ** 2).sum()) / (n * (n - 1)))
        closest = float(dist[~torch.eye(n, dtype=torch.bool)].min())
        rtol = 1e-3
        if abs(closest / rms - rtol) < 1e-2 * rtol:
            continue  # too close to the threshold to tell
        assert mo.has_tied_rows(x, rtol=rtol) is (closest <= rtol * rms), (trial, closest / rms)
    assert not mo.has_tied_rows(x, rtol=0.0) or len(np.unique(x.numpy(), axis=0)) < n


# ------------------------------------------------------------ cached references get it too
def test_calibrated_alignment_metric_with_a_cached_tied_reference(monkeypatch):
    g = torch.Generator().manual_seed(11)
    y = one_hot(torch.randint(0, 6, (48,), generator=g), 6)
    x = torch.randn(48, 6, generator=g, dtype=torch.float64)
    calls = []
    check = pipeline.has_tied_rows
    monkeypatch.setattr(pipeline, "has_tied_rows",
                        lambda t, **kw: calls.append(t.shape) or check(t, **kw))
    metric = CalibratedAlignment("linear_cka", null="auto", num_permutations=K,
                                 preprocess=False)
    metric.set_reference(y)
    for step in range(3):
        metric.update(x + step)
        out = quiet(metric.compute)
        expected = F.calibrated_alignment(x + step, y, "linear_cka", K, null="permutation")
        assert metric.last_result.null_method == "permutation"
        for name in FIELDS[:-1]:
            assert torch.equal(out[name], getattr(expected, name)), name
        metric.reset()
    assert len(calls) == 4  # the reference once, the model side at each compute

    # a continuous cached reference, then model rows with ties: decided per compute
    z = torch.randn(48, 6, generator=g, dtype=torch.float64)
    metric = CalibratedAlignment("linear_cka", null="auto", num_permutations=K,
                                 preprocess=False)
    metric.set_reference(z)
    metric.update(x)
    metric.compute()
    assert metric.last_result.null_method == "moments"
    metric.reset()
    metric.update(y)
    quiet(metric.compute)
    assert metric.last_result.null_method == "permutation"
    expected = F.calibrated_alignment(y, z, "linear_cka", K, null="permutation")
    assert torch.equal(metric.last_result.p_value, expected.p_value)


def test_engine_with_a_cached_tied_reference():
    x, y = tied_pair("one_side", seed=3, n=48)
    engine = AlignmentEngine(["rsa", "linear_cka"], null="auto", preprocess=False,
                             num_permutations=K)
    engine.set_reference({"y": y})
    for step in range(2):
        results = quiet(engine.step, {"x": x + step}, epoch=step).results
        for m in ("rsa", "linear_cka"):
            expected = F.calibrated_alignment(x + step, y, m, K, null="permutation")
            assert results[m].null_method == "permutation"
            for name in FIELDS:
                assert torch.equal(getattr(results[m], name), getattr(expected, name)), (m, name)
    assert engine.reference.invariants[("tied_rows", 0)] is True
