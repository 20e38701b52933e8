"""kNN measures on float32 rows that share a large component (a constant "massive activation"
feature, un-centered embeddings): the neighbor lists must be those of the numbers the input
holds, as a float64 NumPy brute force on the same numbers finds them.  A float32 inner product
rounds to eps·‖x‖², which such an offset makes coarser than the rows' differences."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_reference as R

import alignment_callback.functional as F
from alignment_callback.functional import neighbors as nb

MEASURES = ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"]


def _pair(n: int = 60, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x[:, :3] @ torch.randn(3, 5, generator=g, dtype=torch.float64)
    return x, y + 0.7 * torch.randn(n, 5, generator=g, dtype=torch.float64)


def _with_constant(x: torch.Tensor, c: float) -> torch.Tensor:
    return torch.cat([torch.full((x.shape[0], 1), c, dtype=x.dtype), x], 1).float()


@pytest.mark.parametrize("c", [300.0, 1e4])
@pytest.mark.parametrize("name", MEASURES)
def test_a_large_constant_feature_leaves_the_neighbors_of_the_others(name, c):
    """A feature equal on every row adds c² to every inner product: the exact lists are those
    of the other features, which the float32 input holds exactly."""
    x, y = _pair()
    xc = _with_constant(x, c)
    k = 4
    keys_x = nb.tie_keys(60, "x", data=xc).numpy()
    keys_y = nb.tie_keys(60, "y", data=y.float()).numpy()
    value = float(getattr(F, name)(xc, y.float(), k=k))
    exact = getattr(R, name)(xc.double().numpy(), y.float().double().numpy(), k=k,
                             keys_x=keys_x, keys_y=keys_y)
    assert value == pytest.approx(exact, abs=1e-6)
    others = getattr(R, name)(xc[:, 1:].double().numpy(), y.float().double().numpy(), k=k,
                              keys_x=keys_x, keys_y=keys_y)
    assert exact == others  # the constant changes no list


@pytest.mark.parametrize("c", [30.0, 1e3])
def test_normalized_rows_with_a_dominant_feature_rank_as_in_float64(c):
    """Under the default preprocessing (L2-normalized rows) the large feature is no longer
    constant; the lists must still be those of the float32 numbers, ranked exactly."""
    x, y = _pair(n=80, seed=3)
    xp = F.prepare_features(_with_constant(x, c))
    yp = F.prepare_features(y.float())
    keys_x = nb.tie_keys(80, "x", data=xp).numpy()
    keys_y = nb.tie_keys(80, "y", data=yp).numpy()
    for name in MEASURES:
        value = float(getattr(F, name)(xp, yp, k=5))
        exact = getattr(R, name)(xp.double().numpy(), yp.double().numpy(), k=5,
                                 keys_x=keys_x, keys_y=keys_y)
        assert value == pytest.approx(exact, abs=1e-6), name


def test_the_null_with_offsets_equals_recomputation():
    """The permutation null reuses the float64-ranked lists of both sides: each null value
    equals the measure recomputed on the permuted reference."""
    x, y = _pair(n=50, seed=5)
    xc, yc = _with_constant(x, 1e4), _with_constant(y, -3e3)
    for name in ("mutual_knn", "cycle_knn", "cknna"):
        null = F.permutation_null(xc, yc, name, 8, seed=3, k=4)
        perms = F.permutations(50, 8, seed=3)
        recomputed = torch.stack([getattr(F, name)(xc, yc[p], k=4) for p in perms])
        torch.testing.assert_close(null, recomputed, atol=1e-6, rtol=0)


def test_ordinary_rows_keep_the_float32_product():
    """Rows without a dominant common component are multiplied in their own dtype."""
    x, _ = _pair()
    assert not nb._offset_dominates(F.prepare_features(x.float()))
    assert nb._offset_dominates(F.prepare_features(_with_constant(x, 1e3)))
    idx, vals = nb.knn(_with_constant(x, 1e3), 3)
    assert vals.dtype == torch.float32 and idx.shape == (60, 3)
