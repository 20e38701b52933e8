"""Every measure outside the kNN family on tied and discrete data (binary, ternary, one-hot,
half-zero rows, duplicated rows): a valid test under independence, false-positive rate
≤ α + 3σ, per pair and for the max over a 2×2 grid of layers.  (The kNN family, whose tie
breaking is its own design, is tested in ``test_ties.py``, over 3×3 layers; the max and the
mean over 3×3 layers of gram, rank and kNN measures with grouped permutations in
``test_aggregate_validity.py``.)

Discrete data gives the statistics fewer distinct values (and RSA ranks full of ties); the
p-value counts null values equal to the observed one as at least as large
(``p = (1 + #{null ≥ observed}) / (K + 1)``), which keeps the test valid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from tests.test_ties import ALPHA, KINDS, K, band, rejection_rates, tied

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
    return rejection_rates(kind, reps, first_seed, layers, measures,
                           rows=lambda kind, n, g: no_zero_rows(tied(kind, n, g)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_type_one_error_on_tied_data_per_pair(kind):
    rates = _rejection_rates(kind, reps=200, first_seed=30_000, layers=1)
    assert max(rates.values()) <= band(200), rates


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_type_one_error_on_tied_data_layer_max(kind):
    rates = _rejection_rates(kind, reps=150, first_seed=40_000, layers=2)
    assert max(rates.values()) <= band(150), rates


GRAM = {"linear_cka": {}, "rbf_cka": {"sigma": "median"}, "unbiased_cka": {}, "rsa": {},
        "rv_coefficient": {}}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_type_one_error_of_the_analytic_null_on_tied_data(kind):
    """``null="auto"`` on tied data: with two identical rows on a side it takes the permutation
    null (the Pearson III shape was validated on continuous data; a lumpy discrete null made it
    anti-conservative), else the moments; either way the false-positive rate stays ≤ α + 3σ."""
    reps, rejected, wrong = 200, dict.fromkeys(GRAM, 0), []
    for r in range(reps):
        g = torch.Generator().manual_seed(50_000 + r)
        x, y = no_zero_rows(tied(kind, 48, g)), no_zero_rows(tied(kind, 48, g))
        copies = any(np.unique(v.numpy(), axis=0).shape[0] < v.shape[0] for v in (x, y))
        for name, kw in GRAM.items():
            res = F.calibrated_alignment(x, y, name, num_permutations=K, null="auto", seed=r, **kw)
            rejected[name] += float(res.p_value) <= ALPHA
            if copies and res.null_method != "permutation":
                wrong.append((r, name, res.null_method))
    assert max(rejected.values()) / reps <= band(reps), rejected
    assert not wrong, wrong[:5]


# ------------------------------------------- null values tied with the score by rounding
def _two_class(n: int, m: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot labels, m of n rows in class 1 (shuffled): the label vector and its one-hot rows."""
    z = torch.zeros(n, dtype=torch.long)
    z[:m] = 1
    labels = z[torch.randperm(n, generator=g)]
    return labels, torch.nn.functional.one_hot(labels, 2).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["linear_cka", "rbf_cka", "unbiased_cka", "svcca",
                                  "procrustes_similarity", "cca_similarity", "pwcca"])
def test_null_values_tied_in_exact_arithmetic_reach_the_score(name, dtype):
    """Two binary labels: every score of the pair is a function of the overlap
    a = #{i: x_i = y_i = 1} alone, so a permutation with the observed overlap gives a null value
    equal to the score in exact arithmetic, which p = (1 + #{s_k ≥ s})/(K + 1) counts.  Computed
    along another route, such values land an ulp or two below the score about half the time;
    the p-value, τ, the calibrated score and the aggregate over layers still count them (before:
    p as low as 0.04 where the exact p was 0.09, and rejection rates of 0.035–0.04 at α = 0.05
    where the exact test rejects 0.0025)."""
    n, m, K = 20, 5, 199
    measure = F.get_measure(name, **({"cca_dim": 1} if name == "svcca" else {}))
    for rep in range(12):
        g = torch.Generator().manual_seed(9000 + rep)
        lx, x = _two_class(n, m, g)
        ly, y = _two_class(n, m, g)
        x, y = x.to(dtype), y.to(dtype)
        perms = F.permutations(n, K, seed=rep)
        overlap = (lx[None, :] * ly[perms]).sum(1).tolist()
        res = F.calibrated_alignment(x, y, measure, num_permutations=K, seed=rep)
        # the score as a function of the overlap, one value per overlap (distinct overlaps give
        # scores at least 1e-2 apart here, equal overlaps scores equal in exact arithmetic)
        null = res.null.double().tolist()
        value = {a: float(np.median([v for v, b in zip(null, overlap) if b == a]))
                 for a in set(overlap)}
        observed = value.get(int((lx * ly).sum()), float(res.raw))
        p_exact = (1 + sum(value[a] >= observed - 1e-9 for a in overlap)) / (K + 1)
        assert float(res.p_value) == p_exact, rep
        assert (float(res.calibrated) > 0) == (p_exact <= 0.05), rep
        # the maximum over layers that are all the same representation up to scale and shift
        layers = F.calibrated_layer_alignment({"a": x, "b": 3.0 * x + 1.0}, {"r": y}, measure,
                                              num_permutations=K, seed=rep)
        assert float(layers.p_value) == p_exact, rep
        assert torch.equal(layers.pair_p_value, torch.full((2, 1), p_exact, dtype=torch.float64))
