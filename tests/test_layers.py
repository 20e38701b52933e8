"""Aggregation-aware layer calibration (docs/calibration.md, depth confounder)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import alignment_callback.functional as F



ALPHA = 0.05


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, dim=1)


def _stack(num: int, n: int, d: int, g: torch.Generator) -> list[torch.Tensor]:
    return [_normalize(torch.randn(n, d, generator=g)) for _ in range(num)]


def _band(level: float, reps: int) -> float:
    return level + 3.0 * math.sqrt(level * (1.0 - level) / reps)


# --------------------------------------------------------------------------- (a) depth confounder


def test_depth_confounder_aggregation_aware_vs_per_pair():
    n, d, R, K = 64, 32, 200, 39  # p = (1 + c)/40: mass exactly α = 0.05 at the level
    raw_max, thresholds, agg_fp, pair_fp, pair_cal_fp = {}, {}, {}, {}, {}
    for L in (1, 3, 6):
        raws, taus, agg_pos, pair_pos, pair_cal_pos = [], [], [], [], []
        for r in range(R):
            g = torch.Generator().manual_seed(1_000 * L + r)
            xs, ys = _stack(L, n, d, g), _stack(L, n, d, g)  # every layer independent
            res = F.calibrated_layer_alignment(xs, ys, "mutual_knn", aggregate="max",
                                               num_permutations=K, alpha=ALPHA, seed=r)
            raws.append(float(res.raw))
            taus.append(float(res.threshold))
            agg_pos.append(float(res.calibrated) > 0)
            pair_pos.append(float(res.pair_p_value.min()) <= ALPHA)
            pair_cal_pos.append(float(res.pair_calibrated.max()) > 0)
        raw_max[L], thresholds[L] = np.mean(raws), np.mean(taus)
        agg_fp[L], pair_fp[L], pair_cal_fp[L] = np.mean(agg_pos), np.mean(pair_pos), np.mean(pair_cal_pos)

    # the raw max grows with the number of layer pairs (depth confounder) ...
    assert raw_max[1] < raw_max[3] < raw_max[6], raw_max
    # ... and so does the aggregation-aware threshold, which absorbs it
    assert thresholds[1] < thresholds[3] < thresholds[6], thresholds
    # aggregation-aware calibration keeps its level at every depth
    for L in (1, 3, 6):
        assert agg_fp[L] <= _band(ALPHA, R), (L, agg_fp)
    # per-pair calibration followed by a max does not: its false-positive rate explodes
    assert pair_fp[1] <= _band(ALPHA, R)
    assert pair_fp[3] > _band(ALPHA, R), pair_fp
    assert pair_fp[6] > 3 * ALPHA, pair_fp
    assert pair_cal_fp[6] > 3 * ALPHA, pair_cal_fp
    assert pair_fp[1] < pair_fp[3] < pair_fp[6]


def test_mean_aggregate_is_valid_under_independence():
    n, d, R, K = 48, 16, 150, 39
    pos, pvals = [], []
    for r in range(R):
        g = torch.Generator().manual_seed(77_000 + r)
        res = F.calibrated_layer_alignment(_stack(3, n, d, g), _stack(3, n, d, g), "mutual_knn",
                                           aggregate="mean", num_permutations=K, seed=r)
        pos.append(float(res.calibrated) > 0)
        pvals.append(float(res.p_value))
    assert np.mean(pos) <= _band(ALPHA, R)
    assert np.mean(np.array(pvals) <= ALPHA) <= _band(ALPHA, R)
    assert np.median(pvals) > 0.3  # not degenerate


# --------------------------------------------------------------------------- (b) reporting


def _planted(n: int = 64, seed: int = 0):
    """4 x layers, 3 y layers, all independent except y[2] = f(x[1])."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 24, generator=g, dtype=torch.float64) for _ in range(4)]
    ys = [torch.randn(n, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    ys[2] = xs[1] @ torch.randn(24, 16, generator=g, dtype=torch.float64) / 24**0.5 \
        + 0.2 * torch.randn(n, 16, generator=g, dtype=torch.float64)
    return [_normalize(t) for t in xs], [_normalize(t) for t in ys]


@pytest.mark.parametrize("metric", ["linear_cka", "mutual_knn", "cknna"])
def test_argmax_points_at_planted_pair(metric):
    xs, ys = _planted()
    K = 100
    res = F.calibrated_layer_alignment(xs, ys, metric, num_permutations=K, seed=3)
    assert res.matrix.shape == (4, 3)
    assert res.argmax == (1, 2)
    assert res.best_pair == ("1", "2")
    assert res.x_names == ["0", "1", "2", "3"] and res.y_names == ["0", "1", "2"]
    assert float(res.raw) == float(res.matrix[1, 2]) == float(res.matrix.max())
    assert float(res.p_value) == pytest.approx(1 / (K + 1))
    assert float(res.calibrated) > 0
    # per pair: only the planted pair is far above its own threshold
    assert float(res.pair_calibrated[1, 2]) > 0
    assert float(res.pair_p_value[1, 2]) == pytest.approx(1 / (K + 1))
    others = torch.ones(4, 3, dtype=torch.bool)
    others[1, 2] = False
    assert float(res.pair_calibrated[others].max()) < float(res.pair_calibrated[1, 2])
    d = res.as_dict()
    assert d["raw"] == pytest.approx(float(res.raw)) and set(d) == set(res.SCALARS)


def test_names_from_dict_input():
    xs, ys = _planted(seed=1)
    xd = {f"enc.{i}": t for i, t in enumerate(xs)}
    yd = {name: t for name, t in zip(["dec.a", "dec.b", "dec.c"], ys)}
    res = F.calibrated_layer_alignment(xd, yd, "linear_cka", num_permutations=50, seed=0)
    assert res.x_names == ["enc.0", "enc.1", "enc.2", "enc.3"]
    assert res.y_names == ["dec.a", "dec.b", "dec.c"]
    assert res.argmax == (1, 2)
    assert res.best_pair == ("enc.1", "dec.c")
    # same numbers as the list input
    ref = F.calibrated_layer_alignment(xs, ys, "linear_cka", num_permutations=50, seed=0)
    torch.testing.assert_close(res.matrix, ref.matrix, atol=0, rtol=0)
    torch.testing.assert_close(res.null, ref.null, atol=0, rtol=0)


def test_raw_matrix_entries_are_the_measure():
    xs, ys = _planted(seed=2)
    res = F.calibrated_layer_alignment(xs, ys, "rbf_cka", num_permutations=20, sigma="median")
    for a, xa in enumerate(xs):
        for b, yb in enumerate(ys):
            assert float(res.matrix[a, b]) == pytest.approx(float(F.rbf_cka(xa, yb, sigma="median")), abs=1e-12)


def test_aggregates_give_the_right_raw_value():
    xs, ys = _planted(seed=4)
    kw = dict(num_permutations=30, seed=1)
    mx = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate="max", **kw)
    m = mx.matrix
    mean = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate="mean", **kw)
    top3 = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate="top3", **kw)
    top1 = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate="top1", **kw)
    top99 = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate="top99", **kw)

    def median_of_diag_block(s):
        return s[:3, :3].diagonal().median()

    call = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate=median_of_diag_block, **kw)
    vals = np.sort(m.numpy().ravel())[::-1]
    assert float(mx.raw) == pytest.approx(vals[0], abs=1e-12)
    assert float(mean.raw) == pytest.approx(vals.mean(), abs=1e-12)
    assert float(top3.raw) == pytest.approx(vals[:3].mean(), abs=1e-12)
    assert float(top1.raw) == pytest.approx(vals[0], abs=1e-12)
    assert float(top99.raw) == pytest.approx(vals.mean(), abs=1e-12)  # capped at LA*LB
    assert float(call.raw) == pytest.approx(float(np.median(np.diag(m.numpy()[:3, :3]))), abs=1e-12)
    assert mx.aggregate == "max" and mean.aggregate == "mean" and top3.aggregate == "top3"
    assert call.aggregate == "median_of_diag_block"
    # the aggregates are ordered as they must be, for the null too (same permutations)
    assert float(mean.raw) < float(top3.raw) < float(mx.raw)
    assert bool((mean.null <= top3.null + 1e-12).all()) and bool((top3.null <= mx.null + 1e-12).all())
    assert not torch.equal(mean.null, mx.null)
    # all share the raw matrix and the per-pair calibration
    for res in (mean, top3, call):
        torch.testing.assert_close(res.matrix, m, atol=0, rtol=0)
        torch.testing.assert_close(res.pair_threshold, mx.pair_threshold, atol=0, rtol=0)


@pytest.mark.parametrize("bad", ["min", "top0", "topx", 3])
def test_bad_aggregate_raises(bad):
    xs, ys = _planted()
    with pytest.raises((ValueError, TypeError)):
        F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate=bad, num_permutations=5)


def test_pair_fields_have_matrix_shape():
    xs, ys = _planted(seed=5)
    res = F.calibrated_layer_alignment(xs[:2], ys, "mutual_knn", num_permutations=40, seed=2)
    for field in (res.matrix, res.pair_threshold, res.pair_calibrated, res.pair_p_value):
        assert field.shape == (2, 3)
    assert res.null.shape == (40,)
    for name in res.SCALARS:
        assert getattr(res, name).shape == ()
    assert bool(((res.pair_p_value >= 1 / 41 - 1e-12) & (res.pair_p_value <= 1)).all())
    assert bool(((res.pair_calibrated >= 0) & (res.pair_calibrated <= 1)).all())
    # per-pair thresholds are each pair's own permutation-null threshold
    for a in range(2):
        for b in range(3):
            single = F.calibrated_alignment(xs[a], ys[b], "mutual_knn", num_permutations=40, seed=2)
            assert float(res.pair_threshold[a, b]) == pytest.approx(float(single.threshold), abs=1e-12)
            assert float(res.pair_p_value[a, b]) == pytest.approx(float(single.p_value), abs=1e-12)


def test_single_pair_equals_calibrated_alignment():
    xs, ys = _planted(seed=6)
    for metric in ("linear_cka", "mutual_knn"):
        lay = F.calibrated_layer_alignment([xs[1]], [ys[2]], metric, num_permutations=60, seed=4)
        one = F.calibrated_alignment(xs[1], ys[2], metric, num_permutations=60, seed=4)
        for name in ("raw", "calibrated", "p_value", "threshold"):
            assert float(getattr(lay, name)) == pytest.approx(float(getattr(one, name)), abs=1e-12)
        torch.testing.assert_close(lay.null, one.null, atol=1e-12, rtol=0)


def test_mismatched_n_raises_naming_the_layer():
    xs, ys = _planted()
    xd = {"enc.0": xs[0], "enc.short": xs[1][:50], "enc.2": xs[2]}
    with pytest.raises(ValueError, match="enc.short"):
        F.calibrated_layer_alignment(xd, ys, "linear_cka", num_permutations=5)
    yd = {"dec.0": ys[0], "dec.bad": ys[1][:60]}
    with pytest.raises(ValueError, match="dec.bad"):
        F.calibrated_layer_alignment(xs, yd, "mutual_knn", num_permutations=5)
    with pytest.raises(ValueError, match="'2'"):
        F.calibrated_layer_alignment(xs, [ys[0], ys[1], ys[2][:40]], "linear_cka", num_permutations=5)


def test_empty_or_single_tensor_layers_raise():
    xs, ys = _planted()
    with pytest.raises(ValueError):
        F.calibrated_layer_alignment([], ys, "linear_cka", num_permutations=5)
    with pytest.raises(ValueError):
        F.calibrated_layer_alignment(xs, {}, "linear_cka", num_permutations=5)
    with pytest.raises(TypeError):
        F.calibrated_layer_alignment(xs[0], ys, "linear_cka", num_permutations=5)
