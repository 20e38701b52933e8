"""Analytic nulls: calibration from the exact permutation moments, no permutation drawn.

For the gram family (linear / RBF / unbiased CKA, RSA, RV) the statistic is a cosine
``s(π) = Σ_ij A_ij B_π(i)π(j) / (‖A‖‖B‖)``, whose exact mean, variance and skewness under a
uniformly random permutation follow from a few invariants of each matrix
(:mod:`~alignment_callback.functional.moments`: Kazi-Aoual et al. 1995).  The p-value and the
threshold τ (the 1 − α quantile) come from the moment-matched Pearson type III distribution
(Josse, Pagès & Husson 2008); the calibrated score from τ as for a permutation null.

``null="moments"`` uses it for every gram-family pair; ``null="auto"`` only where it has been
validated (n ≥ 32, |skew| ≤ 1.4, a pair leverage ≤ 0.5: heavy-tailed data with an outlying
sample on both sides makes the null a mixture three moments cannot describe; and no tied
samples: the validation used continuous data, and two identical (or nearly identical) rows on
either side, as in one-hot or integer-coded data, make the null lumpy, its p-values off by up
to 0.08) and the
permutation null elsewhere.  An aggregate over several layer pairs needs their joint null, so
it always uses permutations.  kNN measures keep the permutation null; with ``"auto"`` their
``null_mean`` (and for mutual kNN ``null_std``) are the exact permutation values.

References
----------
Kazi-Aoual, Hitier, Sabatier & Lebreton (1995), "Refined approximations to permutation tests
for multivariate inference", Computational Statistics & Data Analysis 20.
Josse, Pagès & Husson (2008), "Testing the significance of the RV coefficient",
Computational Statistics & Data Analysis 53.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from alignment_callback.functional import moments as mo
from alignment_callback.functional.calibration import resolution

NULLS = ("permutation", "moments", "auto")


def check_null(null: Any, name: str = "null") -> str:
    """``null`` is one of ``"permutation"``, ``"moments"``, ``"auto"``."""
    if null not in NULLS:
        raise ValueError(f"{name} must be one of {NULLS}, got {null!r}")
    return null


def check_moments_apply(null: str, measures: Iterable[Any], groups: Any = None) -> None:
    """``null="moments"`` needs an analytic null for every measure (the gram family's) and
    single-row permutations (no ``groups``): a configuration error otherwise, raised before
    anything is computed."""
    if null != "moments":
        return
    if groups is not None:
        raise ValueError(
            "null='moments' cannot be used with groups: the moments are those of a uniform "
            "permutation of single rows, not of the block permutations that groups ask for; "
            "use null='permutation', or null='auto' (which uses permutations with groups)")
    for m in measures:
        if not m.info.analytic:
            raise ValueError(
                f"null='moments' cannot calibrate {m.name}: it has no analytic null (the gram "
                "family has); use null='permutation', or null='auto' to use moments where they "
                "apply")


def invariants(state: Any) -> mo.GramInvariants:
    """The permutation invariants of a gram-family state (an n×n matrix, or the features of
    a linear kernel at large n)."""
    features = getattr(state, "features", None)
    if features is not None:
        return mo.feature_invariants(features, scatter=state.scatter)
    return mo.gram_invariants(state.matrix)


def analytic_fields(score: float, inv_x: mo.GramInvariants, inv_y: mo.GramInvariants,
                    alpha: float, max_score: float | None, dtype: torch.dtype,
                    device: torch.device | str = "cpu", data_dtype: torch.dtype | None = None,
                    tied: bool = False) -> tuple[dict[str, Tensor], bool]:
    """The scalar fields of a calibration from the moments (0-dim ``dtype`` tensors on
    ``device``), and whether the Pearson III approximation is within its validated range
    (:func:`~alignment_callback.functional.moments.pearson3_valid`; ``tied``: either side has
    tied samples, :func:`~alignment_callback.functional.moments.has_tied_rows`).

    ``data_dtype`` (default ``dtype``) is the features' dtype, whose
    :func:`~alignment_callback.functional.calibration.resolution` decides, as for a
    permutation null, whether ``s_max − τ`` is resolved (else the calibrated score is 0) and
    whether the null is a point mass."""
    data_dtype = dtype if data_dtype is None else data_dtype
    m = mo.cosine_moments(inv_x, inv_y)
    degenerate = point_mass(m, score, data_dtype)
    if degenerate:
        # the statistic does not change under permutation: the observed score is the null's
        # only value (any difference is rounding), so P(s(π) >= s) = 1, τ = the mean, and the
        # calibrated score and the effect size are 0; ``raw`` stays the observed score
        p3 = {"p_value": 1.0, "threshold": m.mean}
        std = 0.0
    else:
        p3 = mo.pearson3_null(score, m, alpha)
        std = m.std
    tau = float(p3["threshold"])
    if max_score is not None:
        tau = min(tau, max_score)
    excess = 0.0 if degenerate else score - tau
    if max_score is None:
        calibrated = max(excess, 0.0)
    else:
        margin = max_score - tau
        resolved = margin > resolution(data_dtype)
        calibrated = min(max(excess / margin, 0.0), 1.0) if resolved and excess > 0 else 0.0
    effect = (0.0 if degenerate else (score - m.mean) / std if std > 0 else
              0.0 if score == m.mean else math.copysign(math.inf, score - m.mean))
    valid = (std > 0.0  # not a point mass
             and bool(mo.pearson3_valid(inv_x.n, m.skewness, mo.pair_leverage(inv_x, inv_y),
                                        tied)))
    as_t = lambda v: torch.tensor(float(v), dtype=dtype, device=device)  # noqa: E731
    fields = {
        "raw": as_t(score), "calibrated": as_t(calibrated),
        "p_value": torch.tensor(float(p3["p_value"]), dtype=torch.float64, device=device),
        "threshold": as_t(tau), "null_mean": as_t(m.mean), "null_std": as_t(std),
        "effect_size": as_t(effect),
        # a point mass at the score: every null value ties it, and ties count half (50);
        # else 100 · P(S < score), from the p-value P(S ≥ score) (continuous: no atom at it)
        "percentile": as_t(50.0 if degenerate else (100.0 if score > m.mean else 0.0)
                           if std == 0.0 else 100.0 * (1.0 - float(p3["p_value"]))),
    }
    return fields, valid


def point_mass(m: mo.PermutationMoments, score: float, dtype: torch.dtype) -> bool:
    """Whether the permutation null is a point mass at the observed ``score`` to the precision
    of the scores: its standard deviation and the score's distance from its mean are both
    below a tenth of :func:`~alignment_callback.functional.calibration.resolution` (1e-12 for
    float64 data, 1e-6 for float32).  The observed score and the null mean are computed along
    different routes, and such a std would turn their rounding into any p-value.  (A small
    std with the score far from the mean, e.g. linear CKA of float32 data at n = 10⁶, whose
    null std is about 1.4/n, is a real null, not a point mass.)"""
    tol = 0.1 * resolution(dtype) * max(1.0, abs(m.mean))
    return m.std <= tol and abs(score - m.mean) <= tol


def exact_knn_moments(kind: str, sx: Any, sy: Any) -> tuple[float, float | None] | None:
    """Exact permutation mean (and, for mutual kNN, standard deviation) of a kNN measure on
    prepared states, or None when not derived for it."""
    if kind == "mutual_knn":
        if sx.own.k != sy.own.k:
            return None
        m = mo.mutual_knn_moments(mo.knn_graph_invariants(sx.own.indices),
                                  mo.knn_graph_invariants(sy.own.indices))
        return m.mean, m.std
    if kind == "cycle_knn":
        return mo.cycle_knn_mean(sx.own.indices, sy.own.k), None
    if kind == "cknna":
        return mo.cknna_mean(sx.own.indices, sx.own.values, sy.own.indices, sy.own.values), None
    return None
