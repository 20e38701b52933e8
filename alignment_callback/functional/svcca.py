"""SVCCA (Raghu et al. 2017), deterministic (docs/measures.md).

Columns are centered and scaled to unit variance, the top ``cca_dim`` left singular vectors U of
each side span the kept subspaces, and the canonical correlations between two subspaces with
orthonormal bases are the singular values of ``U_xᵀ U_y``.  U comes from the symmetric
eigendecomposition of the smaller of the covariance XᵀX (d×d) and the gram XXᵀ (n×n), not from
an SVD of X.  A row permutation of Y permutes the rows of U_y, so the null costs an
(n×c)ᵀ(n×c) product and the singular values of a c×c matrix per permutation.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from alignment_callback.functional._scaling import rescale_exactly
from alignment_callback.functional._validation import check_pair


def svcca_state(x: Tensor, cca_dim: int = 10) -> Tensor:
    """Orthonormal (n, cca_dim) basis of the top singular directions of standardized ``x``."""
    n, d = x.shape
    if int(cca_dim) != cca_dim or cca_dim < 1:
        raise ValueError(f"cca_dim must be a positive integer, got {cca_dim!r}")
    if cca_dim > min(n - 1, d):
        raise ValueError(
            f"svcca: cca_dim={cca_dim} is too large for data with n={n} samples and d={d} "
            f"features (need cca_dim <= min(n - 1, d))"
        )
    x = rescale_exactly(x)
    xc = x - x.mean(0, keepdim=True)
    std = xc.std(0, keepdim=True)
    xs = xc / torch.where(std > 0, std, torch.ones_like(std))
    if d <= n:  # X = U S Vᵀ: XᵀX = V S² Vᵀ, U = X V / S
        evals, vecs = torch.linalg.eigh(xs.T @ xs)
    else:  # XXᵀ = U S² Uᵀ
        evals, vecs = torch.linalg.eigh(xs @ xs.T)
    evals, vecs = evals.flip(0)[:cca_dim], vecs.flip(1)[:, :cca_dim]
    if not bool(evals[-1] > evals[0] * max(n, d) * torch.finfo(evals.dtype).eps):
        raise ValueError(
            f"svcca: the representation has fewer than cca_dim={cca_dim} non-degenerate "
            "directions (zero-variance or rank-deficient features)"
        )
    if d > n:
        return vecs
    u = (xs @ vecs) / evals.sqrt()
    q, _ = torch.linalg.qr(u)  # re-orthonormalize: U = XV/S loses orthogonality at small S
    return q


def svcca_min_samples(params: Mapping[str, Any]) -> int:
    """Fewest samples for ``cca_dim`` directions: ``cca_dim + 1``."""
    return params["cca_dim"] + 1


def svcca_cost(n: int, params: Mapping[str, Any]) -> int:
    """Temporary elements per permutation: the permuted (n, cca_dim) basis."""
    return n * params["cca_dim"]


def svcca_score(ux: Tensor, uy: Tensor, perms: Tensor) -> Tensor:
    """Mean canonical correlation of ``span(U_x)`` and ``span(U_y[π])`` for each π → (B,)."""
    m = ux.T.unsqueeze(0) @ uy[perms]  # (B, c, c)
    return torch.linalg.svdvals(m).clamp_max(1.0).mean(-1)


def svcca(x: Tensor, y: Tensor, cca_dim: int = 10) -> Tensor:
    """SVCCA: mean canonical correlation between the top-``cca_dim`` (default 10) singular
    subspaces of the column-standardized representations. In [0, 1]."""
    x, y = check_pair(x, y)
    ident = torch.arange(x.shape[0], device=x.device)[None]
    return svcca_score(svcca_state(x, cca_dim), svcca_state(y, cca_dim), ident)[0]
