"""Shape family: orthogonal Procrustes, generalized shape metrics and Bures similarity.

All three are one computation on a per-representation *factor* ``Z`` (n × r, ‖Z‖_F = 1) with
``Z Zᵀ`` the side's normalized centered (transformed) gram:

* Procrustes / linear Bures: ``Z = U S / ‖S‖`` from the thin SVD ``X − x̄ = U S Vᵀ``, so
  ``Z Zᵀ = X̂ X̂ᵀ`` with ``X̂`` the column-centered, Frobenius-normalized features;
* shape metric (Williams et al. 2021) with partial whitening α: ``Z ∝ U g(S)``,
  ``g(s) = α s + (1 − α)`` (netrep's ``whiten`` convention, see :func:`shape_state`);
* RBF Bures: ``Z = V Λ^½ / ‖Λ^½‖`` from the eigendecomposition ``H K H = V Λ Vᵀ``.

The similarity is the nuclear norm ``‖Z_xᵀ Z_y‖_*``: for Procrustes this is
``max_Q tr(X̂ᵀ Ŷ Q)`` over orthogonal Q (zero-padding the narrower side), i.e. ``1 − d²/2`` with
``d = min_Q ‖X̂ − Ŷ Q‖_F`` the orthogonal Procrustes distance, and it is the fidelity
``tr((K^½ L K^½)^½)`` of the normalized grams ``K = Z_x Z_xᵀ``, ``L = Z_y Z_yᵀ``, i.e. the
normalized Bures similarity (Harvey et al. 2023).

Fast null: a row permutation π of Y permutes the rows of ``Z_y``, so a chunk of permutations is
one batched ``(r_x × n)(n × r_y)`` product and one ``svdvals`` per permutation, whatever the
feature width d is (``r ≤ min(n − 1, d)``).  The naive path recomputes a thin SVD
(O(n d min(n, d))) or an n × n eigendecomposition (RBF) per permutation.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from alignment_callback.functional._memory import available_bytes, square_matrix_error
from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._scaling import (
    center_columns,
    equilibrate_columns,
    has_variance,
    rescale_exactly,
    times_power_of_two,
)
from alignment_callback.functional._validation import check_bandwidth, check_pair, per_side
from alignment_callback.functional.kernels import center_gram, rbf_gram


@dataclass(frozen=True)
class FactorState:
    """``z`` (n, r), unit Frobenius norm: ``z zᵀ`` is the normalized centered gram."""

    z: Tensor


def centered_svd(x: Tensor, measure: str, per_column: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the column-centered ``x`` truncated to its numerical rank.

    Returns ``(u (n, r), s (r,), vh (r, d))`` of ``x · 2**-e``, rescaled exactly so that its
    largest ``|value|`` is moderate (see ``_scaling``; ``s · 2**e`` are ``x``'s singular
    values, which :func:`centered_scale` gives).  With ``per_column`` the SVD is that of each
    centered column times its own power of two (:func:`equilibrate_columns`), for measures of
    the column space only: ``u`` spans the same space, ``s`` are not ``x``'s, and ``vh`` is
    scaled back so that ``u·diag(s)·vh`` still gives the centered ``x · 2**-e`` (its rows are
    then not orthonormal).  Directions with ``s <= s_max·max(n, d)·eps`` are numerical noise
    and dropped.  Raises ``ValueError`` for a zero-variance representation.
    """
    n, d = x.shape
    xc, varying = center_columns(rescale_exactly(x))
    # centering leaves a column constant up to rounding a few units of eps·|x_j| per entry:
    # zero variance when every column is so (has_variance), which keeps a large offset on
    # every feature (10⁴ standard deviations in float32) or one feature's much larger one
    if not has_variance(xc, varying):
        raise ValueError(
            f"zero-variance representation: all samples are identical after centering; "
            f"{measure} is undefined for it"
        )
    exponent = None
    if per_column:
        xc, exponent = equilibrate_columns(xc)
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    eps = torch.finfo(x.dtype).eps
    r = int((s > s[0] * max(n, d) * eps).sum())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    return u, s, (vh if exponent is None else times_power_of_two(vh, exponent))


def centered_scale(x: Tensor) -> float:
    """``2**e``, the factor :func:`centered_svd`'s singular values are to be multiplied by."""
    top = x.abs().amax()
    return float(top.double() / rescale_exactly(x).abs().amax().double()) if top > 0 else 1.0


def _factor(u: Tensor, g: Tensor) -> FactorState:
    return FactorState(u * (g / g.norm()))


def procrustes_state(x: Tensor, measure: str = "procrustes_similarity") -> FactorState:
    """``Z = U S / ‖S‖`` from the thin SVD of the column-centered ``x`` (``measure`` names the
    measure in errors)."""
    u, s, _ = centered_svd(x, measure)
    return _factor(u, s)


def procrustes_score(sx: FactorState, sy: FactorState, perms: Tensor) -> Tensor:
    """``‖Z_xᵀ Z_y[π]‖_*`` for each row π of ``perms`` (B, n) → (B,), clamped to [0, 1]."""
    m = sx.z.T.unsqueeze(0) @ sy.z[perms]  # (B, r_x, r_y)
    return torch.linalg.svdvals(m).sum(-1).clamp(0.0, 1.0)


def _identity(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)[None]


@no_autocast()
def procrustes_similarity(x: Tensor, y: Tensor) -> Tensor:
    """Orthogonal Procrustes similarity: the nuclear norm ``‖X̂ᵀ Ŷ‖_*`` of the normalized
    features.

    ``X̂ = (X − x̄)/‖X − x̄‖_F`` (and Ŷ alike) are the column-centered, Frobenius-normalized
    features.  Equals ``1 − d²/2`` with ``d = min_Q ‖X̂ − Ŷ Q‖_F`` the orthogonal Procrustes
    distance (Q orthogonal, the narrower side zero-padded), ``cos`` of the Procrustes angular
    distance (Williams et al. 2021, α = 1), and the normalized Bures similarity of the linear
    grams (:func:`bures_similarity`).

    Range [0, 1], 1 iff Ŷ = X̂ Q.  Symmetric.  Invariant to orthogonal maps of either side's
    features, isotropic scaling and translation; not to anisotropic scaling or general linear
    maps.  Needs n >= 2 and a non-constant representation.  Fast null: one batched r×r product
    and an r×r ``svdvals`` per permutation (r <= min(n − 1, d)).

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
    Williams, Kunz, Kornblith, Linderman. Generalized shape metrics on neural
    representations. NeurIPS 2021.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import procrustes_similarity
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(30, 5)
    >>> q, _ = torch.linalg.qr(torch.randn(5, 5))
    >>> round(float(procrustes_similarity(x, 2.0 * x @ q + 1.0)), 4)
    1.0
    >>> 0.0 <= float(procrustes_similarity(x, torch.randn(30, 3))) <= 1.0
    True
    """
    x, y = check_pair(x, y)
    ident = _identity(x.shape[0], x.device)
    return procrustes_score(*per_side(procrustes_state, x, y), ident)[0]


# --------------------------------------------------------------------------- shape metric


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"shape_metric: alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def shape_state(x: Tensor, alpha: float = 1.0) -> FactorState:
    """Partially whitened, normalized factor ``Z ∝ U g(S)``, ``g(s) = α s + (1 − α)``.

    This is netrep's ``LinearMetric`` whitening (``netrep.utils.whiten``): with
    ``X − x̄ = U S Vᵀ`` and ``XᵀX = V S² Vᵀ`` *unnormalized* (no 1/n), the whitening matrix
    ``V diag(α + (1 − α) s⁻¹) Vᵀ`` maps X to ``U diag(α s + (1 − α)) Vᵀ``; netrep's variance
    rescaling is a global factor that cancels in the angle.  netrep clips the eigenvalues of
    XᵀX at an absolute 1e-7; here directions below the relative rank tolerance of
    :func:`centered_svd` are dropped instead (identical whenever every non-zero singular value
    of the centered data exceeds √1e-7 ≈ 3.2e-4).

    ``alpha = 0`` (CCA-like) depends on the column space only: if it is all n − 1 centered
    directions (rank n − 1, e.g. d >= n − 1) the angle is a constant, so this raises.
    """
    alpha = _check_alpha(alpha)
    u, s, _ = centered_svd(x, "shape_metric", per_column=alpha == 0.0)  # the column space only
    n = x.shape[0]
    if alpha == 0.0 and u.shape[1] >= n - 1:
        raise ValueError(
            f"shape_metric with alpha=0 (CCA-like) is degenerate here: the centered "
            f"representation has rank {u.shape[1]} = n - 1 (n={n} samples, d={x.shape[1]} "
            f"features), so it spans every centered direction and the distance is a constant "
            f"whatever the other representation is; use alpha > 0, fewer features (n >= d + 2) "
            f"or more samples"
        )
    scale = centered_scale(x) if 0.0 < alpha < 1.0 else 1.0  # g(s) is not scale-free there
    if scale != 1.0:  # x's own singular values, in float64 (they may not fit x's dtype)
        g = alpha * s.double() * scale + (1.0 - alpha)
        return _factor(u, (g / g.norm()).to(s.dtype))
    return _factor(u, alpha * s + (1.0 - alpha))


_SMALL_ANGLE_COS = 0.999  # above: θ from the aligned residual instead of arccos


def _small_angle(zx: Tensor, zy: Tensor) -> Tensor:
    """``θ = 2·asin(‖Z_x − Z_y Q‖_F / 2)`` with Q the optimal orthogonal map (both sides
    zero-padded to the same width): the chord between the aligned unit-norm shapes.  Equal to
    ``arccos ‖Z_xᵀZ_y‖_*`` but without its loss near θ = 0, where arccos turns a rounding of
    ε in the cosine into an angle error of √(2ε) (4e-4 in float32)."""
    r = max(zx.shape[1], zy.shape[1])
    zx = torch.nn.functional.pad(zx, (0, r - zx.shape[1]))
    zy = torch.nn.functional.pad(zy, (0, r - zy.shape[1]))
    u, _, vh = torch.linalg.svd(zx.T @ zy)  # Q = V Uᵀ maximizes tr(Z_xᵀ Z_y Q) = Σσ
    chord = torch.linalg.vector_norm(zx - zy @ (vh.mT @ u.mT))
    return 2.0 * torch.asin((chord / 2).clamp(max=1.0))


def shape_score(sx: FactorState, sy: FactorState, perms: Tensor) -> Tensor:
    """``1 − θ/(π/2)`` with ``θ = arccos ‖Z_xᵀ Z_y[π]‖_*`` for each π → (B,); where the cosine
    exceeds 0.999, θ comes from the aligned residual (:func:`_small_angle`)."""
    cos = procrustes_score(sx, sy, perms)
    theta = torch.arccos(cos)
    for b in (cos > _SMALL_ANGLE_COS).nonzero().flatten().tolist():
        theta[b] = _small_angle(sx.z, sy.z[perms[b]])
    return 1.0 - theta / (math.pi / 2)


@no_autocast()
def shape_metric(x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
    """Generalized shape metric (Williams et al. 2021) as a similarity: ``1 − θ/(π/2)``.

    ``θ = arccos(max_Q ⟨φ_α(X), φ_α(Y) Q⟩ / (‖φ_α(X)‖‖φ_α(Y)‖))`` is the angular shape distance
    (netrep's ``LinearMetric(alpha, score_method="angular")``, ``center_columns=True``,
    zero-padding), φ_α the partial whitening of the column-centered data (see
    :func:`shape_state`), Q orthogonal.  θ is in [0, π/2] (the optimal alignment makes the
    inner product >= 0), so the similarity is in [0, 1], 1 iff the whitened shapes coincide;
    ``θ = (π/2)(1 − value)`` recovers the distance.

    * ``alpha = 1``: Procrustes (``cos θ = procrustes_similarity``).  Invariant to orthogonal
      maps, isotropic scaling and translation.
    * ``alpha = 0``: CCA-like, ``cos θ = Σρ_i / √(r_x r_y)`` (ρ the canonical correlations, r
      the ranks).  Invariant to invertible linear maps and translation.  Needs rank < n − 1 on
      both sides (n >= d + 2 for full-rank data), else ``ValueError``.
    * ``0 < alpha < 1``: invariant to orthogonal maps and translation, **not** to isotropic
      scaling: as in netrep the whitening interpolates between the raw singular values and 1,
      so the input's overall scale sets how much it is whitened.

    Symmetric.  Needs n >= 2.  Fast null: as :func:`procrustes_similarity`.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    alpha : float, default=1.0
        Partial whitening α in [0, 1]: 1 is Procrustes, 0 CCA-like.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Williams, Kunz, Kornblith, Linderman. Generalized shape metrics on neural
    representations. NeurIPS 2021.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import shape_metric
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(30, 5)
    >>> q, _ = torch.linalg.qr(torch.randn(5, 5))
    >>> round(float(shape_metric(x, 2.0 * x @ q)), 4)  # alpha=1: rotation and scale
    1.0
    >>> round(float(shape_metric(x, x @ torch.randn(5, 5), alpha=0.0)), 4)  # any linear map
    1.0
    """
    x, y = check_pair(x, y)
    alpha = _check_alpha(alpha)
    ident = _identity(x.shape[0], x.device)
    return shape_score(*per_side(shape_state, x, y, alpha), ident)[0]


# --------------------------------------------------------------------------- Bures


def _check_kernel(kernel: str) -> str:
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"bures_similarity: kernel must be 'linear' or 'rbf', got {kernel!r}")
    return kernel


#: float64 n×n matrices alive at the peak of preparing an RBF Bures state (the gram, its
#: centered and symmetrized copies, the eigendecomposition's; measured 5.1–5.3)
RBF_STATE_PEAK = 6


def _check_rbf_memory(x: Tensor, count: int) -> None:
    """Refuse before allocating when ``count`` float64 n×n matrices would not fit in the memory
    available (the RBF Bures state's gram and eigendecomposition, which are float64 for any
    input; the states kept are counted alike, an upper bound for float32 ones)."""
    error = square_matrix_error("bures_similarity (kernel='rbf')", x.shape[0], count,
                                torch.float64, x.device, available_bytes,
                                "kernel='linear' (= procrustes_similarity, from the features: "
                                "no n×n matrix)")
    if error is not None:
        raise error


def check_bures_memory(x: Tensor, kept: int, params: Mapping[str, Any]) -> None:
    """Refuse RBF Bures before any side is prepared when a state's preparation peak with
    ``kept`` other states held (each up to n×n: the RBF factor has r ≈ n columns) would not
    fit; the linear kernel works on the features and is never refused."""
    if params["kernel"] == "rbf":
        _check_rbf_memory(x, RBF_STATE_PEAK + kept)


def bures_state(x: Tensor, kernel: str = "linear", sigma: float | str = 1.0) -> FactorState:
    """Normalized factor of the centered gram: ``Z Zᵀ = HKH / tr(HKH)``.

    Linear: the Procrustes factor (thin SVD of the centered features).  RBF: ``V Λ^½`` from
    the eigendecomposition of the centered RBF gram, eigenvalues ``<= λ_max·n·eps`` (numerical
    noise and the negative round-off ones) dropped; refused with ``MemoryError`` before the
    gram is allocated when its ``RBF_STATE_PEAK`` float64 n×n matrices would not fit in memory.
    The gram and its eigendecomposition are float64 for any input and the factor has ``x``'s
    dtype: the square roots of a float32 gram's round-off eigenvalues moved the score by up
    to 3e-3 relative at n = 512.
    """
    if _check_kernel(kernel) == "linear":
        return procrustes_state(x, "bures_similarity")
    _check_rbf_memory(x, RBF_STATE_PEAK)
    k = rbf_gram(x.to(torch.float64), sigma, minus_one=True, measure="bures_similarity")
    eps = torch.finfo(k.dtype).eps
    floor = 1e3 * eps * float(k.abs().max())  # centering leaves ~eps of K − 1's entries
    k = center_gram(k)
    if not bool(k.abs().max() > floor):
        raise ValueError(
            "zero-variance representation: the centered RBF gram is zero (all samples are "
            "identical, or sigma is so large that they look so); bures_similarity is undefined "
            "for it"
        )
    evals, evecs = torch.linalg.eigh((k + k.T) / 2)
    top = evals[-1]
    keep = evals > top * x.shape[0] * eps
    return FactorState(_factor(evecs[:, keep], evals[keep].sqrt()).z.to(x.dtype))


def bures_score(sx: FactorState, sy: FactorState, perms: Tensor) -> Tensor:
    """Fidelity of the normalized centered grams ``‖Z_xᵀ Z_y[π]‖_*`` for each π → (B,)."""
    return procrustes_score(sx, sy, perms)


@no_autocast()
def bures_similarity(x: Tensor, y: Tensor, kernel: str = "linear", sigma: float | str = 1.0
                     ) -> Tensor:
    """Normalized Bures similarity (fidelity) of the centered grams (Harvey et al. 2023).

    ``tr((K^½ L K^½)^½) / √(tr K · tr L)`` with ``K = H Kₓ H``, ``L = H K_y H`` the centered
    grams, ``H = I − 11ᵀ/n``.  ``kernel="linear"`` (``Kₓ = XXᵀ``) equals
    :func:`procrustes_similarity`.  ``kernel="rbf"`` uses ``exp(−‖x_i − x_j‖²/(2σ²))`` with
    absolute ``sigma`` or ``sigma="median"`` (as
    :func:`~alignment_callback.functional.kernels.rbf_gram`).

    Range [0, 1], 1 iff the normalized centered grams are equal.  Symmetric.  Linear: invariant
    to orthogonal maps, isotropic scaling, translation.  RBF: invariant to orthogonal maps and
    translation; to isotropic scaling only with ``sigma="median"``.  Needs n >= 2.

    Cost: ``tr((K^½LK^½)^½) = ‖Z_xᵀ Z_y‖_*`` with ``K = Z_x Z_xᵀ``.  Linear: Z from a thin SVD,
    r <= min(n − 1, d).  RBF: Z from an n × n eigendecomposition (O(n³), once per side), and
    the centered RBF gram usually has numerical rank close to n − 1, so each permutation costs
    an O(n r_x r_y) product plus an r × r SVD — about O(n³) — against two O(n³)
    eigendecompositions plus that SVD when recomputing.  The RBF gram and its
    eigendecomposition are float64 for any input (the square roots of a float32 gram's
    round-off eigenvalues moved the score by up to 3e-3 relative at n = 512); the factors, and
    so the products per permutation, have the input's dtype.  RBF memory: about 7 float64 n×n
    matrices at the peak (one side's state while the other's gram is decomposed), refused with
    ``MemoryError`` before any is allocated when they would not fit in the memory available.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    kernel : {"linear", "rbf"}, default="linear"
        The gram of each side.
    sigma : float or "median", default=1.0
        The RBF bandwidth σ: a finite positive number or ``"median"`` (checked for both
        kernels; ``kernel="linear"`` does not use it).

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Harvey, Lipshutz, Williams. Duality of Bures and shape distances with implications for
    comparing neural representations. UniReps workshop, NeurIPS 2023.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import bures_similarity, procrustes_similarity
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(30, 5), torch.randn(30, 3)
    >>> bool(torch.isclose(bures_similarity(x, y), procrustes_similarity(x, y)))
    True
    >>> round(float(bures_similarity(x, 2.0 * x, kernel="rbf", sigma="median")), 4)
    1.0
    """
    x, y = check_pair(x, y)
    _check_kernel(kernel)
    check_bandwidth(sigma, "bures_similarity: sigma")  # both kernels, as get_measure does
    check_bures_memory(x, 1, {"kernel": kernel})  # x's kept while y's is built
    ident = _identity(x.shape[0], x.device)
    return bures_score(*per_side(bures_state, x, y, kernel, sigma), ident)[0]
