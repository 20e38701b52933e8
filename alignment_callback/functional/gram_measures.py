"""Gram-family measures: linear / RBF / unbiased CKA and RSA (docs/measures.md).

All four are a cosine between two n×n "centered" matrices A, B:

* linear CKA: A = H K H, K = X Xᵀ (biased HSIC, ``tr(KHLH) = ⟨HKH, HLH⟩``);
* RBF CKA: the same with an RBF kernel;
* unbiased CKA: A = U(K), the U-centered linear gram (``⟨U(K), U(L)⟩ = n(n−3)·HSIC_u``);
* RSA: A = centered average ranks of the upper-triangle cosine distances (zero diagonal), so the
  cosine is Spearman's correlation.

A permutation π of Y's rows maps B to B[π][:, π]; the norms are invariant.  The null therefore
costs one O(n²) gather + dot per permutation instead of a new O(n²d) gram.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignment_callback.functional._scaling import rescale_exactly
from alignment_callback.functional._validation import check_pair
from alignment_callback.functional.kernels import (
    average_ranks,
    center_gram,
    linear_gram,
    rbf_gram,
    u_center_gram,
)


@dataclass(frozen=True)
class GramState:
    """A centered n×n matrix and its Frobenius norm (> 0)."""

    matrix: Tensor
    norm: Tensor


def _state(matrix: Tensor, scale: Tensor, what: str) -> GramState:
    norm = matrix.norm()
    tol = 1e3 * torch.finfo(matrix.dtype).eps * scale
    if not bool(norm > tol):
        raise ValueError(
            f"zero-variance representation: the {what} is zero after centering "
            f"(all samples are identical or constant); CKA/RSA are undefined for it"
        )
    return GramState(matrix, norm)


def linear_state(x: Tensor) -> GramState:
    """``H X Xᵀ H`` (computed from column-centered features)."""
    x = rescale_exactly(x)
    xc = x - x.mean(0, keepdim=True)
    return _state(linear_gram(xc), (x * x).sum(), "linear gram")


def rbf_state(x: Tensor, sigma: float | str = 1.0) -> GramState:
    """``H K H`` with the RBF gram of ``x`` (absolute σ, or ``"median"``)."""
    k = rbf_gram(x, sigma)
    return _state(center_gram(k), k.norm(), "RBF gram")


def unbiased_state(x: Tensor) -> GramState:
    """U-centered linear gram (zero diagonal)."""
    k = linear_gram(rescale_exactly(x))
    return _state(u_center_gram(k), k.norm(), "U-centered linear gram")


def rsa_state(x: Tensor) -> GramState:
    """Centered average ranks of the cosine distances ``1 − cos(x_i, x_j)`` over i < j."""
    x = rescale_exactly(x, per_row=True)
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("rsa: a sample has an all-zero feature vector; cosine distance undefined")
    xn = x / norms
    n = x.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    dist = 1.0 - (xn @ xn.T)[iu[0], iu[1]]
    ranks = average_ranks(dist)
    ranks = ranks - ranks.mean()
    m = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    m[iu[0], iu[1]] = ranks
    m = m + m.T
    return _state(m, torch.ones((), dtype=x.dtype, device=x.device), "cosine-distance rank matrix")


def gram_score(sx: GramState, sy: GramState, perms: Tensor) -> Tensor:
    """``⟨A, B[π][:, π]⟩ / (‖A‖‖B‖)`` for each row π of ``perms`` (B, n) → (B,)."""
    a = sx.matrix.reshape(-1)
    out = torch.empty(perms.shape[0], dtype=a.dtype, device=a.device)
    rows, gathered = torch.empty_like(sy.matrix), torch.empty_like(sy.matrix)
    for i, p in enumerate(perms):
        torch.index_select(sy.matrix, 0, p, out=rows)
        torch.index_select(rows, 1, p, out=gathered)
        out[i] = torch.dot(a, gathered.reshape(-1))
    return out / (sx.norm * sy.norm)


def gram_layer_scores(sxs: list[GramState], sys: list[GramState], perms: Tensor) -> Tensor:
    """Layer matrices under each permutation: (B, LA, LB), Y layers permuted by π.

    The side with fewer layers is gathered (X with π⁻¹, which gives the same scores because
    every measure is invariant to relabeling rows jointly), and the LA×LB inner products are
    one matrix product of flattened matrices.
    """
    permute_x = len(sxs) < len(sys)
    moved, fixed = (sxs, sys) if permute_x else (sys, sxs)
    if permute_x:
        perms = torch.argsort(perms, dim=1)
    fixed_flat = torch.stack([s.matrix.reshape(-1) for s in fixed])  # (L_fixed, n²)
    n = moved[0].matrix.shape[0]
    rows = moved[0].matrix.new_empty(n, n)
    gathered = moved[0].matrix.new_empty(len(moved), n, n)  # reused: no per-permutation allocs
    out = []
    for p in perms:
        for i, s in enumerate(moved):
            torch.index_select(s.matrix, 0, p, out=rows)
            torch.index_select(rows, 1, p, out=gathered[i])
        out.append(gathered.view(len(moved), -1) @ fixed_flat.T)  # (L_moved, L_fixed)
    dots = torch.stack(out)
    if not permute_x:  # dots[b, c, a] = <Y_c[π], X_a>  ->  [b, a, c]
        dots = dots.transpose(1, 2)
    nx = torch.stack([s.norm for s in sxs])
    ny = torch.stack([s.norm for s in sys])
    return dots / (nx[:, None] * ny[None, :])


def _identity(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)[None]


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA ``HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))`` with biased HSIC, K = XXᵀ.

    In [0, 1]; 1 for x = y (up to rotation and isotropic scale). No epsilon: a zero-variance
    representation raises ``ValueError``.
    """
    x, y = check_pair(x, y)
    return gram_score(linear_state(x), linear_state(y), _identity(x.shape[0], x.device))[0]


def rbf_cka(x: Tensor, y: Tensor, sigma: float | str = 1.0) -> Tensor:
    """RBF CKA with ``K_ij = exp(−‖x_i − x_j‖²/(2σ²))``, absolute σ (default 1.0) or
    ``sigma="median"`` (σ² = median of all n² squared distances, per representation)."""
    x, y = check_pair(x, y)
    return gram_score(rbf_state(x, sigma), rbf_state(y, sigma), _identity(x.shape[0], x.device))[0]


def unbiased_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012). Needs n >= 4.

    Not clamped: it is about 0 (and may be negative) for independent representations.
    """
    x, y = check_pair(x, y)
    return gram_score(unbiased_state(x), unbiased_state(y), _identity(x.shape[0], x.device))[0]


def rsa(x: Tensor, y: Tensor) -> Tensor:
    """RSA: Spearman correlation (average ranks for ties) of the upper triangles (i < j) of the
    two cosine-distance matrices ``1 − cos(x_i, x_j)``. In [−1, 1]; s_max = 1."""
    x, y = check_pair(x, y)
    if x.shape[0] < 3:
        raise ValueError(f"rsa needs at least 3 samples, got {x.shape[0]}")
    return gram_score(rsa_state(x), rsa_state(y), _identity(x.shape[0], x.device))[0]
