"""Analytic permutation nulls: exact moments of ``T(π) = Σ_ij A_ij B_π(i)π(j)``.

Every gram-family measure (linear / RBF / unbiased CKA, RSA) is a cosine
``s = ⟨A, B⟩ / (‖A‖_F ‖B‖_F)`` of two n×n matrices, and mutual kNN is ``T/(n·k)`` with the 0/1
adjacency matrices of the kNN graphs.  Shuffling Y's rows by a uniformly random permutation π
gives the quadratic-assignment statistic ``T(π) = Σ_ij A_ij B_π(i)π(j)``; this package computes
its exact mean, variance and skewness (no sampling) and turns them into p-values and
thresholds with a moment-matched Pearson type III distribution.

Modules
-------
* ``exact``: :func:`permutation_moments`, :func:`cosine_moments`,
  :func:`pair_leverage`; the math (moments as sums over set partitions of the index
  positions, Möbius inversion, Kazi-Aoual et al. 1995) and the references.
* ``invariants``: :class:`GramInvariants`, :class:`GraphInvariants`,
  :class:`PermutationMoments`; :func:`gram_invariants`, :func:`matrix_invariants` (the
  split ``A = A₀ + αI + β(J − I)`` that avoids cancellation, the 15 invariants of a symmetric
  matrix and their cost); :func:`has_tied_rows` (tied samples, outside the validated range).
* ``features``: :func:`feature_invariants` (a linear gram's invariants from
  the features, O(n·d²) + O(n·d³)), :func:`feature_linear_cka`, :func:`feature_scatter`.
* ``knn``: :func:`knn_graph_invariants` (O(n·k)), :func:`mutual_knn_moments`,
  :func:`cycle_knn_mean`, :func:`cknna_mean`.
* ``pearson3``: :func:`pearson3_sf`, :func:`pearson3_quantile`,
  :func:`pearson3_null`, :func:`pearson3_valid` and the ``PEARSON3_*`` validity limits
  (Josse et al. 2008, Winkler et al. 2016).
* ``patterns``: the private machinery (set partitions, multigraph keys and
  their contraction against dense matrices and kNN graphs).

Every public name is importable from this package.
"""

from __future__ import annotations

from alignment_callback.functional.moments.exact import (
    cosine_moments,
    pair_leverage,
    permutation_moments,
)
from alignment_callback.functional.moments.features import (
    feature_invariants,
    feature_linear_cka,
    feature_scatter,
)
from alignment_callback.functional.moments.invariants import (
    NEAR_TIE_RTOL,
    GramInvariants,
    GraphInvariants,
    PermutationMoments,
    gram_invariants,
    has_tied_rows,
    matrix_invariants,
)
from alignment_callback.functional.moments.knn import (
    cknna_mean,
    cycle_knn_mean,
    knn_graph_invariants,
    mutual_knn_moments,
)
from alignment_callback.functional.moments.pearson3 import (
    PEARSON3_MAX_ABS_SKEW,
    PEARSON3_MAX_LEVERAGE,
    PEARSON3_MIN_N,
    pearson3_null,
    pearson3_quantile,
    pearson3_sf,
    pearson3_valid,
)

__all__ = [
    "PEARSON3_MAX_ABS_SKEW",
    "PEARSON3_MAX_LEVERAGE",
    "PEARSON3_MIN_N",
    "GramInvariants",
    "GraphInvariants",
    "PermutationMoments",
    "cknna_mean",
    "cosine_moments",
    "cycle_knn_mean",
    "feature_invariants",
    "feature_linear_cka",
    "feature_scatter",
    "gram_invariants",
    "NEAR_TIE_RTOL",
    "has_tied_rows",
    "knn_graph_invariants",
    "matrix_invariants",
    "mutual_knn_moments",
    "pair_leverage",
    "pearson3_null",
    "pearson3_quantile",
    "pearson3_sf",
    "pearson3_valid",
    "permutation_moments",
]
