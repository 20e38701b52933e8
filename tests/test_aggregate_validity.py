"""Every layer aggregate is calibrated as itself: under independence the false-positive rate of
the aggregate's p-value is at most α + 3σ, on continuous and on tied data, for the top-k mean,
a callable and a mapping of chosen layer pairs (``max`` and ``mean``: ``test_layers.py``,
``test_ties.py``, ``test_ties_global.py``), and with grouped (block) permutations, whose rows
are correlated within a group, for the max and the mean over a 3 x 3 grid of layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.functional.aggregation import MappedAggregate
from tests.test_ties import ALPHA, K, band, tied
from tests.test_ties_global import no_zero_rows

pytestmark = pytest.mark.slow

N, DRAWS = 48, 150
# a gram measure, a rank measure and two neighbor measures (each family's null code path)
MEASURES = {"linear_cka": {}, "rsa": {}, "mutual_knn": {"k": 5}, "cknna": {"k": 5}}
X, Y = [f"x{i}" for i in range(3)], [f"y{i}" for i in range(3)]
AGGREGATES = {
    "top2": "top2",
    "callable": lambda matrix: matrix.flatten().median(),
    "mapped": MappedAggregate({"x0": "y1", "x2": "y2"}, X, Y, "max"),
}


def measures() -> dict[str, F.Measure]:
    return {name: F.get_measure(name, **kw) for name, kw in MEASURES.items()}


def rows(kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "continuous":
        return torch.randn(N, 8, generator=g, dtype=torch.float64)
    return no_zero_rows(tied(kind, N, g))


@pytest.mark.parametrize("aggregate", list(AGGREGATES))
@pytest.mark.parametrize("kind", ["continuous", "binary", "onehot"])
def test_type_one_error_of_every_aggregate(kind, aggregate):
    chosen = measures()
    rejected = dict.fromkeys(chosen, 0)
    for r in range(DRAWS):
        g = torch.Generator().manual_seed(60_000 + r)
        xs = {name: rows(kind, g) for name in X}
        ys = {name: rows(kind, g) for name in Y}
        res = F.calibrate_measures(xs, ys, chosen, aggregate=AGGREGATES[aggregate],
                                   num_permutations=K, seed=r)
        for name in chosen:
            rejected[name] += float(res[name].p_value) <= ALPHA
    rates = {name: count / DRAWS for name, count in rejected.items()}
    assert max(rates.values()) <= band(DRAWS), rates


# 16 groups of unequal sizes, interleaved: a size no other group has (5, 7) keeps its group
# in place under block permutations
SIZES = [3] * 8 + [2] * 6 + [5, 7]
GROUPS = np.repeat(np.arange(len(SIZES)), SIZES)[np.random.default_rng(0).permutation(N)]


def grouped(kind: str, g: torch.Generator) -> torch.Tensor:
    """Rows of one group alike: a group's value plus noise, or exact copies of binary rows."""
    if kind == "correlated":
        base = torch.randn(len(SIZES), 6, generator=g, dtype=torch.float64)
        return base[GROUPS] + 0.5 * torch.randn(N, 6, generator=g, dtype=torch.float64)
    base = torch.randint(0, 2, (len(SIZES), 6), generator=g).double()
    return no_zero_rows(base[GROUPS])


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("kind", ["correlated", "binary"])
def test_type_one_error_of_grouped_permutations_with_aggregates(kind, aggregate):
    chosen = measures()
    rejected = dict.fromkeys(chosen, 0)
    plain = 0  # the same data without groups=: why groups exist
    for r in range(DRAWS):
        g = torch.Generator().manual_seed(70_000 + r)
        xs = {name: grouped(kind, g) for name in X}
        ys = {name: grouped(kind, g) for name in Y}
        res = F.calibrate_measures(xs, ys, chosen, aggregate=aggregate, num_permutations=K,
                                   seed=r, groups=GROUPS)
        for name in chosen:
            rejected[name] += float(res[name].p_value) <= ALPHA
        ungrouped = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate=aggregate,
                                                 num_permutations=K, seed=r)
        plain += float(ungrouped.p_value) <= ALPHA
    rates = {name: count / DRAWS for name, count in rejected.items()}
    assert max(rates.values()) <= band(DRAWS), rates
    assert plain / DRAWS > 0.5, plain / DRAWS
