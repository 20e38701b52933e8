"""Every measure outside the kNN family on tied and discrete data (binary, ternary, one-hot,
half-zero rows, duplicated rows): a valid test under independence, false-positive rate
≤ α + 3σ, per pair and for the max over a 3×3 grid of layers.  (The kNN family, whose tie
breaking is its own design, is tested in ``test_ties.py``.)

Discrete data gives the statistics fewer distinct values (and RSA ranks full of ties); the
p-value counts null values equal to the observed one as at least as large
(``p = (1 + #{null ≥ observed}) / (K + 1)``), which keeps the test valid."""

from __future__ import annotations

import pytest
import torch

import alignment_callback.functional as F
from tests.test_ties import ALPHA, KINDS, band, tied

MEASURES = {
    "linear_cka": {}, "rbf_cka": {"sigma": "median"}, "unbiased_cka": {}, "rsa": {},
    "rv_coefficient": {}, "svcca": {"cca_dim": 2}, "procrustes_similarity": {},
    "shape_metric": {}, "bures_similarity": {}, "cca_similarity": {}, "pwcca": {},
    "linear_predictivity": {"ridge": 1.0},
}


def no_zero_rows(x: torch.Tensor) -> torch.Tensor:
    """RSA's cosine distance is undefined for an all-zero row: such rows get a 1 in column 0
    (still discrete, still tied)."""
    x = x.clone()
    x[(x == 0).all(1), 0] = 1.0
    return x


def _rejection_rates(kind: str, reps: int, first_seed: int, layers: int) -> dict[str, float]:
    measures = {name: F.get_measure(name, **kw) for name, kw in MEASURES.items()}
    rejected = dict.fromkeys(measures, 0)
    for r in range(reps):
        g = torch.Generator().manual_seed(first_seed + r)
        xs = {f"x{i}": no_zero_rows(tied(kind, 48, g)) for i in range(layers)}
        ys = {f"y{i}": no_zero_rows(tied(kind, 48, g)) for i in range(layers)}
        res = F.calibrate_measures(xs, ys, measures, aggregate="max", num_permutations=99, seed=r)
        for name in measures:
            rejected[name] += float(res[name].p_value) <= ALPHA
    return {name: c / reps for name, c in rejected.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_type_one_error_on_tied_data_per_pair(kind):
    rates = _rejection_rates(kind, reps=200, first_seed=30_000, layers=1)
    assert max(rates.values()) <= band(200), rates


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_type_one_error_on_tied_data_layer_max(kind):
    rates = _rejection_rates(kind, reps=150, first_seed=40_000, layers=3)
    assert max(rates.values()) <= band(150), rates
