"""Statistical claims of the docs that no other test measured, tested statistically under
independence: the rate of p <= α stays within α + 3σ (and, where the p-values are close to
continuous, above α − 3σ, so that a test stuck at p = 1 cannot pass).

- The analytic null at the smallest validated size (n = 32), at α = 0.01, 0.05 and 0.10.
- ``null="moments"`` forced on discrete data: off on a given data set, valid on average.
- Every measure on float32 tied rows after the L2 normalization the callback, the metric
  objects and the CLI apply (equal similarities then differ by rounding).
- Benjamini–Hochberg over a matrix of model pairs calibrated with one seed, as the ``matrix``
  command does (the p-values share their permutations and their models): the false-discovery
  rate stays ≤ q."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from tests.test_ties import KNN, band, rejection_rates, tied
from tests.test_ties_global import MEASURES, no_zero_rows

#: the gram family with an analytic null (rv_coefficient is linear CKA: the same p-values)
GRAM = {"linear_cka": {}, "rbf_cka": {"sigma": "median"}, "unbiased_cka": {}, "rsa": {}}


def three_sigma(alpha: float, draws: int) -> float:
    return 3.0 * math.sqrt(alpha * (1 - alpha) / draws)


def rates(p_values: dict, levels: tuple[float, ...]) -> dict:
    """{(key, α): rate of p <= α} for lists of p-values."""
    return {(key, a): float(np.mean(np.array(p) <= a)) for key, p in p_values.items()
            for a in levels}


@pytest.mark.slow
@pytest.mark.parametrize("d", [4, 128])
def test_the_analytic_null_at_n_32_keeps_every_level(d):
    """n = 32 Gaussian rows, d = 4 (d/n = 1/8) and 128 (d/n = 4): the rate of p <= α of
    ``null="moments"`` and of ``null="auto"`` is within α ± 3σ at α = 0.01, 0.05 and 0.10."""
    draws, rng = 300, np.random.default_rng([32, d])
    p = {(null, m): [] for null in ("moments", "auto") for m in GRAM}
    for r in range(draws):
        x, y = (torch.from_numpy(rng.standard_normal((32, d))) for _ in range(2))
        for m, kw in GRAM.items():
            auto = F.calibrated_alignment(x, y, m, num_permutations=199, seed=r, null="auto",
                                          **kw)
            if auto.null_method == "moments":  # the same numbers as null="moments"
                moments = auto
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # outside the validated range: it warns
                    moments = F.calibrated_alignment(x, y, m, null="moments", **kw)
            p[("auto", m)].append(float(auto.p_value))
            p[("moments", m)].append(float(moments.p_value))
    for (key, a), rate in rates(p, (0.01, 0.05, 0.10)).items():
        assert abs(rate - a) <= three_sigma(a, draws), (key, a, rate)


@pytest.mark.slow
def test_forced_moments_on_discrete_data_keep_the_level_on_average():
    """``null="moments"`` on data with tied rows (it warns; ``"auto"`` would draw
    permutations): one-hot labels of 4–8 classes and two binary features, n = 40, linear CKA
    and RSA.  On a given data set a level between two of the discrete null's values can be far
    off; over data sets the rate of p <= α stays ≤ α + 3σ at α = 0.01, 0.05, 0.10 and 0.15."""
    draws, rng = 300, np.random.default_rng(31415)

    def onehot() -> torch.Tensor:
        labels = rng.integers(0, int(rng.integers(4, 9)), 40)
        return torch.nn.functional.one_hot(torch.from_numpy(labels)).double()

    def binary() -> torch.Tensor:
        return no_zero_rows(torch.from_numpy(rng.integers(0, 2, (40, 2)).astype(float)))

    p = {(rows.__name__, m): [] for rows in (onehot, binary) for m in ("linear_cka", "rsa")}
    for _ in range(draws):
        for (kind, m), ps in p.items():
            x, y = (onehot(), onehot()) if kind == "onehot" else (binary(), binary())
            with pytest.warns(RuntimeWarning, match="tied \\(identical\\) rows"):
                res = F.calibrated_alignment(x, y, m, null="moments")
            ps.append(float(res.p_value))
    for (key, a), rate in rates(p, (0.01, 0.05, 0.10, 0.15)).items():
        assert rate <= a + three_sigma(a, draws), (key, a, rate)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["binary", "onehot", "duplicated"])
def test_every_measure_on_float32_normalized_tied_rows(kind):
    """Tied rows as the callback feeds them: float32, L2-normalized by ``prepare_features``
    (similarities equal in exact arithmetic then differ by rounding, and the fast nulls'
    products and tie tolerance decide).  Every measure, per pair, n = 48, K = 39: the rate of
    p <= 0.05 is ≤ α + 3σ."""
    measures = {name: F.get_measure(name, **kw) for name, kw in MEASURES.items()}
    measures.update({name: F.get_measure(name, k=5) for name in KNN})

    def rows(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
        return F.prepare_features(no_zero_rows(tied(kind, n, g)).float())

    reps = 150
    found = rejection_rates(kind, reps, 61_000, 1, measures, rows=rows)
    assert max(found.values()) <= band(reps), found


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["none aligned", "two aligned"])
def test_benjamini_hochberg_over_a_matrix_of_pairs_keeps_the_false_discovery_rate(scenario):
    """3 × 3 models of 2 layers each (binary features, n = 40), every pair calibrated as the
    ``matrix`` command does (the max over its 2 × 2 layer pairs, one seed for every pair, so
    all p-values share their permutations, and each model appears in three pairs), then
    Benjamini–Hochberg at q = 0.05 over the 9 pairs.  With no pair aligned the false-discovery
    rate is the chance of any rejection; with x_i and y_i aligned for i < 2 it is the mean of
    false rejections / rejections.  Both stay ≤ q + 3σ, and the aligned pairs are found."""
    models, n, q, draws = 3, 40, 0.05, 120
    measures = {"linear_cka": F.get_measure("linear_cka"),
                "mutual_knn": F.get_measure("mutual_knn", k=5)}
    aligned = np.zeros((models, models), bool)
    if scenario == "two aligned":
        aligned[0, 0] = aligned[1, 1] = True
    fdp = {m: [] for m in measures}
    found = dict.fromkeys(measures, 0)
    for r in range(draws):
        g = torch.Generator().manual_seed(70_000 + r)
        xs = [[no_zero_rows(tied("binary", n, g)) for _ in range(2)] for _ in range(models)]
        ys = [[no_zero_rows(tied("binary", n, g)) for _ in range(2)] for _ in range(models)]
        for i, j in zip(*np.nonzero(aligned)):
            ys[j][0] = xs[i][0] + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
        p = {m: np.zeros((models, models)) for m in measures}
        for i in range(models):
            for j in range(models):
                res = F.calibrate_measures(xs[i], ys[j], measures, aggregate="max",
                                           num_permutations=199, seed=0)
                for m in measures:
                    p[m][i, j] = float(res[m].p_value)
        for m in measures:
            rejected = F.benjamini_hochberg(torch.from_numpy(p[m]), alpha=q)[0].numpy()
            false = int((rejected & ~aligned).sum())
            fdp[m].append(false / max(int(rejected.sum()), 1))
            found[m] += int((rejected & aligned).sum())
    for m in measures:
        assert np.mean(fdp[m]) <= q + three_sigma(q, draws), (m, np.mean(fdp[m]))
        assert found[m] >= 0.5 * aligned.sum() * draws, (m, found[m])  # the test has power
