"""Gram-family layer nulls are streamed when a side has many layers: at most a block of
reference states and one model state are alive at a time, so memory does not grow with the
number of layer pairs.  Streaming must not change the numbers."""

from __future__ import annotations

import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.functional import pipeline

GRAM = ("linear_cka", "rbf_cka", "unbiased_cka", "rsa", "rv_coefficient")


def _layers(count: int, n: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    return {f"l{i}": base + (i + 1) * 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
            for i in range(count)}


@pytest.mark.parametrize("name", GRAM)
def test_streamed_layer_null_equals_kept(name, monkeypatch):
    xs, ys = _layers(6, 40, 7, seed=0), _layers(9, 40, 5, seed=1)
    streamed = F.calibrated_layer_alignment(xs, ys, name, num_permutations=30, seed=2)
    monkeypatch.setattr(pipeline, "GRAM_KEPT", 100)
    kept = F.calibrated_layer_alignment(xs, ys, name, num_permutations=30, seed=2)
    torch.testing.assert_close(streamed.matrix, kept.matrix, rtol=0, atol=1e-12)
    torch.testing.assert_close(streamed.null, kept.null, rtol=0, atol=1e-12)
    for key in ("raw", "calibrated", "p_value", "threshold"):
        assert float(getattr(streamed, key)) == pytest.approx(float(getattr(kept, key)), abs=1e-12)


def test_many_layers_keep_no_gram_states():
    measure = F.get_measure("linear_cka")
    names, feats = pipeline.side_features(_layers(12, 30, 4, seed=3), "x")
    side = pipeline.prepare_side(names, feats, [measure], "x")
    assert measure in side.lazy and measure not in side.states
    few = pipeline.prepare_side(names[:3], feats[:3], [measure], "x")
    assert len(few.states[measure]) == 3 and not few.lazy


@pytest.mark.parametrize("bad", ["l0", "l7"])
def test_streamed_side_reports_a_constant_layer(bad):
    layers = _layers(12, 30, 4, seed=4)
    layers[bad] = torch.ones(30, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="zero-variance"):
        F.calibrated_layer_alignment(layers, _layers(2, 30, 4, seed=5), "linear_cka",
                                     num_permutations=10)


@pytest.mark.parametrize("streamed", [False, True], ids=["kept", "streamed"])
def test_layer_null_shares_concatenate_to_the_whole(streamed, monkeypatch):
    """Each process of a distributed null computes permutations [start, stop); the shares,
    concatenated, are the whole null, and an empty share is a (0, LA, LB) tensor."""
    if not streamed:
        monkeypatch.setattr(pipeline, "GRAM_KEPT", 100)
    measures = [F.get_measure(name) for name in ("linear_cka", "mutual_knn", "cknna")]
    xnames, xfeats = pipeline.side_features(_layers(9, 40, 6, seed=4), "x")
    ynames, yfeats = pipeline.side_features(_layers(3, 40, 5, seed=5), "y")
    xs = pipeline.prepare_side(xnames, xfeats, measures, "x")
    ys = pipeline.prepare_side(ynames, yfeats, measures, "y")
    perms = F.Permutations(40, 25, seed=6)
    whole = pipeline.layer_nulls(measures, xs, ys, perms)
    shares = [pipeline.layer_nulls(measures, xs, ys, perms, a, b)
              for a, b in ((0, 7), (7, 7), (7, 25))]
    for m in measures:
        assert whole[m].shape == (25, 9, 3)
        assert shares[1][m].shape == (0, 9, 3)
        torch.testing.assert_close(torch.cat([s[m] for s in shares]), whole[m], rtol=0, atol=0)
