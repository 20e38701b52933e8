"""Gram-family measures: linear / RBF / unbiased CKA and RSA (docs/measures.md).

All four are a cosine between two n×n "centered" matrices A, B:

* linear CKA: A = H K H, K = X Xᵀ (biased HSIC, ``tr(KHLH) = ⟨HKH, HLH⟩``);
* RBF CKA: the same with an RBF kernel;
* unbiased CKA: A = U(K), the U-centered linear gram (``⟨U(K), U(L)⟩ = n(n−3)·HSIC_u``);
* RSA: A = centered average ranks of the upper-triangle cosine distances (zero diagonal), so the
  cosine is Spearman's correlation.

A permutation π of Y's rows maps B to B[π][:, π]; the norms are invariant.  The null therefore
costs one pass over the n×n matrices per permutation (a fused, float64-accumulating kernel,
``gram_null``) instead of a new O(n²d) gram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._memory import available_bytes, square_matrix_error
from alignment_callback.functional._scaling import center_columns, has_variance, rescale_exactly
from alignment_callback.functional._validation import check_bandwidth, check_pair, per_side
from alignment_callback.functional.gram_null import gram_dots, gram_dots_layers
from alignment_callback.functional.kernels import (
    average_ranks,
    center_gram,
    check_sigma_fits,
    linear_gram,
    rbf_gram,
    symmetrize_,
    u_center_gram,
)
from alignment_callback.functional.permutation import inverse_permutations


@dataclass(frozen=True)
class GramState:
    """A centered, exactly symmetric n×n matrix and its Frobenius norm (float64, > 0).

    ``stack`` / ``index``: when the matrix is a view of one (L, n, n) tensor holding every
    layer of a side (see :func:`stack_states`), the layer path reads that tensor as it is.
    """

    matrix: Tensor
    norm: Tensor
    stack: Tensor | None = None
    index: int = 0


@dataclass(frozen=True)
class FeatureState:
    """A linear-kernel representation kept as column-centered features (n, d) instead of its
    n×n gram: what a large probe with d < n needs for the observed score and the analytic
    null (no permutation null can be drawn from it).  ``scatter``: the float64 d×d ``XᵀX``
    (:func:`~alignment_callback.functional.moments.feature_scatter`), computed once for the
    score's denominator and the invariants."""

    features: Tensor
    scatter: Tensor


def linear_feature_state(x: Tensor) -> FeatureState:
    """Column-centered features for linear CKA / RV in feature space (O(n·d) memory).  Zero
    variance is refused with the gram route's rule (:func:`has_variance`)."""
    xc, varying = center_columns(rescale_exactly(x))
    if not bool((xc != 0).any()):
        raise ValueError("zero-variance representation: every sample is identical; CKA is "
                         "undefined for it")
    from alignment_callback.functional.moments import feature_scatter

    scatter = feature_scatter(xc)
    if not (float(scatter.norm()) > 0 and has_variance(xc, varying)):
        raise ValueError("zero-variance representation: the centered features are zero up to "
                         f"rounding (all samples identical, or every feature constant to {x.dtype} "
                         "precision); CKA is undefined for it")
    return FeatureState(xc, scatter)


def centering_floor(xc: Tensor, varying: Tensor) -> float:
    """The norm a centered gram must exceed: 0 when some feature varies by more than
    centering's rounding of its own values (:func:`has_variance`), else infinite (every
    feature constant to the dtype's precision: zero variance)."""
    return 0.0 if has_variance(xc, varying) else math.inf


def _state(matrix: Tensor, tol: float, what: str, cause: str | None = None) -> GramState:
    """``matrix`` symmetrized, with its norm; zero variance (norm <= ``tol``) refused."""
    symmetrize_(matrix)  # the null reads one triangle of each permuted matrix
    ident = torch.arange(matrix.shape[0], device=matrix.device)[None]
    norm = gram_dots(matrix, matrix, ident)[0].sqrt()  # float64, no n×n temporary
    if not bool(norm > tol):
        cause = cause or f"every feature constant to {matrix.dtype} precision"
        raise ValueError(
            f"zero-variance representation: the {what} is zero after centering (all samples "
            f"are identical, or {cause}); CKA/RSA are undefined for it"
        )
    return GramState(matrix, norm)


def _eps(t: Tensor) -> float:
    return torch.finfo(t.dtype).eps


def stack_states(states: Iterable[GramState], count: int) -> list[GramState]:
    """Gather ``count`` states into one (count, n, n) tensor, one at a time (so memory never
    holds more than the stack and one state), and return views of it."""
    stack: Tensor | None = None
    out = []
    for i, st in enumerate(states):
        if count == 1:  # the matrix itself is the stack: no copy
            return [GramState(st.matrix, st.norm, st.matrix.unsqueeze(0), 0)]
        if stack is None:
            stack = st.matrix.new_empty(count, *st.matrix.shape)
        stack[i].copy_(st.matrix)
        out.append(GramState(stack[i], st.norm, stack, i))
        del st
    return out


def _stacked(states: Sequence[GramState]) -> Tensor:
    """The (L, n, n) tensor of ``states``: a view when they are consecutive layers of one
    stack (or a single state), else a copy."""
    first = states[0]
    if len(states) == 1:
        return first.matrix.unsqueeze(0)
    if first.stack is not None and all(
            s.stack is first.stack and s.index == first.index + i for i, s in enumerate(states)):
        return first.stack[first.index:first.index + len(states)]
    return torch.stack([s.matrix for s in states])


def linear_state(x: Tensor) -> GramState:
    """``H X Xᵀ H`` (computed from column-centered features)."""
    xc, varying = center_columns(rescale_exactly(x))
    return _state(linear_gram(xc), centering_floor(xc, varying), "linear gram")


def rbf_state(x: Tensor, sigma: float | str = 1.0) -> GramState:
    """``H K H`` with the RBF gram of ``x`` (absolute σ, or ``"median"``), centered from
    ``K − 1`` (the same matrix, without the rounding of ``exp`` near 1)."""
    k = rbf_gram(x, sigma, minus_one=True)
    cause = (None if sigma == "median" else f"sigma={sigma} is so large against the "
             "distances that the kernel is constant to rounding: try sigma='median'")
    return _state(center_gram(k), 1e3 * _eps(k) * float(k.norm()), "RBF gram", cause)


def unbiased_state(x: Tensor) -> GramState:
    """U-centered linear gram (zero diagonal), from column-centered features: U-centering
    removes the terms ``a1ᵀ + 1aᵀ + c11ᵀ`` by which the gram of ``x`` and of the centered ``x``
    differ, so the matrix is the same, without the rounding of a large feature offset."""
    xc, varying = center_columns(rescale_exactly(x))
    k = linear_gram(xc)
    tol = max(1e3 * _eps(k) * float(k.norm()), centering_floor(xc, varying))
    # a gram whose off-diagonal is a_i + a_j + c is U-centered to 0: all samples but one
    # identical (their unbiased HSIC is 0, though linear CKA is defined)
    return _state(u_center_gram(k), tol, "U-centered linear gram",
                  f"all but one are, or every feature constant to {k.dtype} precision")


_DISTANCE_BLOCK = 1 << 22  # float64 distances computed at a time (32 MiB)


def cosine_distances(x: Tensor) -> tuple[Tensor, float]:
    """The cosine distances ``1 − cos(x_i, x_j)`` over i < j (row by row) in float64, and the
    rounding error below which two of them are not told apart.

    Computed as ``½‖r_i − r_j‖²``, with r the column-centered unit rows ``x_i / ‖x_i‖`` in
    float64: equal to ``1 − x̂_iᵀx̂_j`` in exact arithmetic but free of its cancellation, which a
    feature offset large against the spread of the rows (a transformer's massive activations)
    makes total in float32 (the distances then fall below float32's resolution at 1).  The rows
    are computed in blocks (no n×n float64 matrix).
    """
    n, d = x.shape
    r = rescale_exactly(x, per_row=True).to(torch.float64)
    norms = torch.linalg.vector_norm(r, dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("rsa: a sample has an all-zero feature vector; cosine distance undefined")
    r = r / norms  # a new float64 (n, d) unless x was float64: the one copy kept
    r -= r.mean(0, keepdim=True)
    sq = torch.linalg.vector_norm(r, dim=1) ** 2
    out = torch.empty(n * (n - 1) // 2, dtype=torch.float64, device=x.device)
    rows, pos = max(1, _DISTANCE_BLOCK // n), 0
    for s in range(0, n - 1, rows):
        e = min(n - 1, s + rows)
        block = (r[s:e] @ r[s:].T).mul_(-2.0).add_(sq[s:e, None]).add_(sq[None, s:]).mul_(0.5)
        upper = block[torch.ones_like(block, dtype=torch.bool).triu_(1)]  # columns j > i
        out[pos:pos + upper.numel()] = upper
        pos += upper.numel()
    # rounding: the product's (about √d·eps·max‖r‖²) and the unit rows' (a few eps each, so
    # ‖r_i − r_j‖·eps); at least 10 times the largest gap measured between distances
    # that are equal in exact arithmetic (discrete features, d from 6 to 768, with and
    # without an offset), and far below the smallest gap between distinct ones
    big = float(sq.max())
    tol = 8 * torch.finfo(torch.float64).eps * (2 * math.sqrt(d) * big + math.sqrt(big))
    return out.clamp_(min=0.0), tol


#: Entries of the boolean mask of one block of rows when the rank matrix is filled.
_TRIANGLE_BLOCK = 1 << 22


def rsa_state(x: Tensor) -> GramState:
    """Centered average ranks of the cosine distances ``1 − cos(x_i, x_j)`` over i < j.

    Distances within their rounding error of each other (:func:`cosine_distances`) are one tie,
    so the ties of discrete data (equal in exact arithmetic) keep their average rank.
    """
    n = x.shape[0]
    dist, tol = cosine_distances(x)
    ranks = average_ranks(dist, tol)
    del dist
    ranks = (ranks - ranks.mean()).to(x.dtype)
    m = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    # the upper triangle, row by row as ``ranks`` lists it, a block of rows at a time (a few
    # kernel launches, not one per row, on a GPU); then (m + mᵀ)/2 · 2, exact, mirrors it
    cols = torch.arange(n, device=x.device)
    rows_per_block = max(1, _TRIANGLE_BLOCK // max(n, 1))
    pos = 0
    for i0 in range(0, n - 1, rows_per_block):
        i1 = min(i0 + rows_per_block, n - 1)
        upper = cols[None, :] > cols[i0:i1, None]
        count = (i1 - i0) * (n - 1) - (i0 + i1 - 1) * (i1 - i0) // 2  # Σ (n − 1 − i)
        m[i0:i1].masked_scatter_(upper, ranks[pos:pos + count])
        pos += count
    del ranks
    symmetrize_(m).mul_(2.0)
    return _state(m, 1e3 * _eps(m), "cosine-distance rank matrix",
                  "every pair of samples is at the same cosine distance, to rounding (e.g. "
                  "one-hot rows of distinct classes)")


def gram_score(sx: GramState, sy: GramState, perms: Tensor) -> Tensor:
    """``⟨A, B[π][:, π]⟩ / (‖A‖‖B‖)`` for each row π of ``perms`` (B, n) → (B,).

    Accumulated in float64 by a fused kernel (see ``gram_null``): no n×n temporary; returned in
    the matrices' dtype.
    """
    dots = gram_dots(sx.matrix, sy.matrix, perms)
    return (dots / (sx.norm * sy.norm)).to(sx.matrix.dtype)


def gram_layer_scores(sxs: list[GramState], sys: list[GramState], perms: Tensor) -> Tensor:
    """Layer matrices under each permutation: (B, LA, LB), Y layers permuted by π.

    The side with fewer layers is the fixed side of the kernel (its rows are gathered; the other
    side's rows stream), using ``Σ A_ij B_π(i)π(j) = Σ A_π⁻¹(k)π⁻¹(l) B_kl`` when that is X:
    every measure is invariant to relabeling rows jointly.
    """
    if isinstance(sxs[0], FeatureState) or isinstance(sys[0], FeatureState):
        return _feature_scores(sxs, sys, perms)
    xs, ys = _stacked(sxs), _stacked(sys)
    if len(sxs) <= len(sys):
        dots = gram_dots_layers(xs, ys, perms).transpose(1, 2)  # [p, b, a] -> [p, a, b]
    else:
        dots = gram_dots_layers(ys, xs, inverse_permutations(perms))  # [p, a, b]
    nx = torch.stack([s.norm for s in sxs])
    ny = torch.stack([s.norm for s in sys])
    return (dots / (nx[:, None] * ny[None, :])).to(sxs[0].matrix.dtype)


def _feature_scores(sxs: list[FeatureState], sys: list[FeatureState], perms: Tensor) -> Tensor:
    """Linear CKA ``‖XᵀY‖²/(‖XᵀX‖‖YᵀY‖)`` in feature space, for the identity only."""
    n = perms.shape[1]
    if perms.shape[0] != 1 or not bool((perms[0] == torch.arange(n, device=perms.device)).all()):
        raise RuntimeError("a permutation null needs the n×n grams; this representation was "
                           "prepared in feature space for the analytic null")
    from alignment_callback.functional.moments import feature_linear_cka

    out = torch.stack([torch.stack([feature_linear_cka(a.features, b.features, a.scatter, b.scatter)
                                    for b in sys]) for a in sxs])
    return out[None].to(sxs[0].features.dtype)


#: From this many samples, linear CKA of features narrower than n is computed from the
#: features (``XᵀY``, ``XᵀX``, ``YᵀY``: O(n·d²) time, O(d²) memory) instead of the grams.
FEATURE_ROUTE_MIN_SAMPLES = 4096


def _identity(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)[None]


def _check_memory(name: str, x: Tensor, alternatives: str, count: int = 4) -> None:
    """Refuse before allocating when ``count`` n×n matrices of ``x``'s dtype (default 4: the
    two sides' and two being built) would not fit in the memory available."""
    error = square_matrix_error(name, x.shape[0], count, x.dtype, x.device,
                                available_bytes, alternatives)
    if error is not None:
        raise error


_NO_GRAM = "linear_cka (computed from the features when d < n, no n×n matrix)"


@no_autocast()
def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA: the cosine of the centered linear grams (Kornblith et al. 2019).

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))`` with the biased ``HSIC(K, L) =
    tr(KHLH)``, ``K = XXᵀ``, ``L = YYᵀ``, ``H = I − 11ᵀ/n``.  In [0, 1]; 1 for x = y up to
    rotation, isotropic scaling and translation.  No epsilon: a zero-variance representation
    raises ``ValueError``.  From n = ``FEATURE_ROUTE_MIN_SAMPLES`` (4096) with both feature
    dimensions below n it is ``‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` on the centered features in
    float64 (no n×n matrix); otherwise from the grams, which are refused before they are
    allocated when they would not fit in memory.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Kornblith, Norouzi, Lee, Hinton. Similarity of neural network representations revisited.
    ICML 2019.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import linear_cka
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(50, 8)
    >>> q, _ = torch.linalg.qr(torch.randn(8, 8))  # an orthogonal matrix
    >>> round(float(linear_cka(x, 3.0 * x @ q + 1.0)), 4)  # rotated, scaled, shifted
    1.0
    >>> 0.0 < float(linear_cka(x, torch.randn(50, 4))) < 1.0
    True
    """
    x, y = check_pair(x, y)
    n = x.shape[0]
    if n >= FEATURE_ROUTE_MIN_SAMPLES and max(x.shape[1], y.shape[1]) < n:
        from alignment_callback.functional.moments import feature_linear_cka

        sx, sy = per_side(linear_feature_state, x, y)  # zero variance: ValueError
        value = feature_linear_cka(sx.features, sy.features, sx.scatter, sy.scatter)
        return value.to(torch.promote_types(x.dtype, y.dtype))
    _check_memory("linear_cka", x, "features narrower than n (linear_cka then needs no n×n "
                  "matrix)")
    return gram_score(*per_side(linear_state, x, y), _identity(n, x.device))[0]


@no_autocast()
def rbf_cka(x: Tensor, y: Tensor, sigma: float | str = 1.0) -> Tensor:
    """RBF CKA: linear CKA's formula on RBF grams (Kornblith et al. 2019).

    ``HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))`` (biased HSIC) with
    ``K_ij = exp(−‖x_i − x_j‖²/(2σ²))`` and ``L`` alike from y.  σ is absolute (PRH's
    convention) or ``"median"``: σ² = the median of all n² squared distances, per
    representation (then also invariant to isotropic scaling).  In [0, 1].

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    sigma : float or "median", default=1.0
        The kernel bandwidth σ, shared by both sides.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Kornblith, Norouzi, Lee, Hinton. Similarity of neural network representations revisited.
    ICML 2019.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import rbf_cka
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(40, 6)
    >>> round(float(rbf_cka(x, 10.0 * x + 1.0, sigma="median")), 4)
    1.0
    >>> 0.0 < float(rbf_cka(x, torch.randn(40, 3), sigma=2.0)) < 1.0
    True
    """
    x, y = check_pair(x, y)
    check_bandwidth(sigma, "rbf_cka: sigma")  # named as get_measure names it
    check_sigma_fits(sigma, x.dtype)  # a parameter error: not named after a side
    _check_memory("rbf_cka", x, _NO_GRAM)
    return gram_score(*per_side(rbf_state, x, y, sigma), _identity(x.shape[0], x.device))[0]


@no_autocast()
def unbiased_cka(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased linear CKA: linear CKA with the unbiased HSIC estimator (Song et al. 2012).

    ``HSIC_u(K, L) / sqrt(HSIC_u(K, K)·HSIC_u(L, L))`` with ``K = XXᵀ``, ``L = YYᵀ`` and
    ``HSIC_u`` as :func:`~alignment_callback.functional.hsic_unbiased` (computed as the cosine
    of the U-centered grams).  Not clamped: about 0 (and possibly negative) for independent
    representations, so the range is [−1, 1].  Needs n >= 4.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Song, Smola, Gretton, Bedo, Borgwardt. Feature selection via dependence maximization.
    JMLR 13, 2012 (eq. 5).  Kornblith, Norouzi, Lee, Hinton. Similarity of neural network
    representations revisited. ICML 2019.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import unbiased_cka
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(50, 8)
    >>> q, _ = torch.linalg.qr(torch.randn(8, 8))
    >>> round(float(unbiased_cka(x, 2.0 * x @ q)), 4)
    1.0
    >>> abs(float(unbiased_cka(x, torch.randn(50, 8)))) < 0.2
    True
    """
    x, y = check_pair(x, y)
    if x.shape[0] < 4:  # the pair's n, not a side's data
        raise ValueError(f"unbiased HSIC needs n >= 4 samples, got {x.shape[0]}")
    _check_memory("unbiased_cka", x, _NO_GRAM, count=5)  # measured peak: 5 n×n
    return gram_score(*per_side(unbiased_state, x, y), _identity(x.shape[0], x.device))[0]


@no_autocast()
def rsa(x: Tensor, y: Tensor) -> Tensor:
    """RSA: Spearman correlation of the two cosine-distance matrices (Kriegeskorte et al. 2008).

    Spearman's ρ (average ranks for ties) between the upper triangles (i < j) of
    ``D_ij = 1 − cos(x_i, x_j)`` and the same for y.  In [−1, 1]; s_max = 1.  Invariant to
    rotations and to any scaling of the rows.  Needs n >= 3.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Kriegeskorte, Mur, Bandettini. Representational similarity analysis – connecting the
    branches of systems neuroscience. Front. Syst. Neurosci. 2, 2008.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import rsa
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(30, 5)
    >>> q, _ = torch.linalg.qr(torch.randn(5, 5))
    >>> round(float(rsa(x, 2.0 * x @ q)), 4)
    1.0
    >>> -1.0 <= float(rsa(x, torch.randn(30, 5))) <= 1.0
    True
    """
    x, y = check_pair(x, y)
    if x.shape[0] < 3:
        raise ValueError(f"rsa needs at least 3 samples, got {x.shape[0]}")
    # ranking n(n − 1)/2 float64 distances takes 40 bytes each at its peak (the distances,
    # keys, indices and ranks of the radix sort): five float32 n×n matrices, plus the other side
    _check_memory("rsa", x, _NO_GRAM, count=4 if x.dtype == torch.float64 else 6)
    return gram_score(*per_side(rsa_state, x, y), _identity(x.shape[0], x.device))[0]
