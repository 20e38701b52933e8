"""SVCCA (Raghu et al. 2017), deterministic (docs/measures.md).

Columns are centered and scaled to unit variance, the top ``cca_dim`` left singular vectors U of
each side span the kept subspaces, and the canonical correlations between two subspaces with
orthonormal bases are the singular values of ``U_xᵀ U_y``.  U comes from the top ``cca_dim``
eigenvectors of the smaller of the covariance XᵀX (d×d, one product whose diagonal also gives
the column scales) and the gram XXᵀ (n×n), not from an SVD of X.  A row permutation of Y
permutes the rows of U_y, so the null costs a gather of c×n numbers, a (c×n)(n×c) product and
the eigenvalues of a c×c matrix per permutation.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._scaling import (
    center_columns,
    equilibrate_columns,
    rescale_exactly,
)
from alignment_callback.functional._validation import (
    ShapeOptionError,
    check_pair,
    is_integer,
    per_side,
)

_GATHER_ELEMENTS = 1 << 20  # permuted numbers gathered at once (4 MiB of float32)


def _top_eigh(g: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """The ``c`` largest eigenvalues (descending) and eigenvectors of the symmetric ``g``.

    A full ``torch.linalg.eigh``: torch has no partial symmetric eigensolver, and LAPACK's
    (``syevr`` through SciPy, 2–3× faster for c ≪ d) runs on SciPy's own BLAS threads, which
    contend with torch's: with two threads of each on two cores the calibration got slower than
    with one.
    """
    evals, vecs = torch.linalg.eigh(g)
    return evals.flip(0)[:c], vecs.flip(1)[:, :c]


def _check_cca_dim(cca_dim: int) -> int:
    if not is_integer(cca_dim) or cca_dim < 1:
        raise ValueError(f"cca_dim must be a positive integer, got {cca_dim!r}")
    return int(cca_dim)


def _too_large(cca_dim: int, n: int, d: int) -> ShapeOptionError:
    spans = ("; with cca_dim = n - 1 both subspaces are every centered direction, so all "
             "canonical correlations are 1 whatever the data" if cca_dim == n - 1 else "")
    return ShapeOptionError(f"svcca: cca_dim={cca_dim} is too large for data with n={n} "
                            f"samples and d={d} features (need cca_dim <= min(n - 2, d)"
                            f"{spans})")


def svcca_state(x: Tensor, cca_dim: int = 10) -> Tensor:
    """Orthonormal (n, cca_dim) basis of the top singular directions of standardized ``x``."""
    n, d = x.shape
    cca_dim = _check_cca_dim(cca_dim)
    if cca_dim > min(n - 2, d):
        raise _too_large(cca_dim, n, d)
    xc, _ = center_columns(rescale_exactly(x))  # a constant column stays exactly zero
    # the standardized columns do not change, and no column's squared sum underflows in the
    # product
    xc, _ = equilibrate_columns(xc)
    size_eps = max(n, d) * torch.finfo(xc.dtype).eps
    basis = _top_directions(xc, cca_dim, size_eps)
    if basis is None and xc.dtype != torch.float64:
        # a float32 product rounds the eigenvalues λ = s² by about eps·λ₁, so the test refuses
        # a direction with λ under ~n·eps·λ₁ (s/s₁ under 1.6e-2 at n = 2048) that the data
        # holds: with float64 products, the data's own resolution decides (s/s₁ above
        # max(n, d)·eps of its dtype, as in a rank test of singular values)
        basis = _top_directions(xc.double(), cca_dim, size_eps ** 2)
        basis = None if basis is None else basis.to(xc.dtype)
    if basis is None:
        raise ValueError(
            f"svcca: the representation has fewer than cca_dim={cca_dim} non-degenerate "
            "directions (zero-variance or rank-deficient features)"
        )
    return basis


def _top_directions(xc: Tensor, cca_dim: int, min_ratio: float) -> Tensor | None:
    """Orthonormal (n, cca_dim) basis of the top singular directions of the standardized
    columns of the centered ``xc``; None when its ``cca_dim``-th eigenvalue is not above
    ``λ₁·min_ratio`` (rank-deficient, to float resolution)."""
    n, d = xc.shape
    if d <= n:  # X_s = X_c D with D = diag(1/std): X_sᵀX_s = D X_cᵀX_c D = V S² Vᵀ, U = X_s V / S
        cov = xc.T @ xc
        std = (cov.diagonal() / (n - 1)).sqrt()
        scale = torch.where(std > 0, 1.0 / std, torch.ones_like(std))
        evals, vecs = _top_eigh(cov * scale[:, None] * scale[None, :], cca_dim)
    else:  # X_s X_sᵀ = U S² Uᵀ
        std = xc.std(0, keepdim=True)
        xs = xc / torch.where(std > 0, std, torch.ones_like(std))
        evals, vecs = _top_eigh(xs @ xs.T, cca_dim)
    if not bool(evals[-1] > evals[0] * min_ratio):
        return None
    if d > n:
        return vecs
    u = (xc @ (vecs * scale[:, None])) / evals.sqrt()
    q, _ = torch.linalg.qr(u)  # re-orthonormalize: U = XV/S loses orthogonality at small S
    return q


def svcca_min_samples(params: Mapping[str, Any]) -> int:
    """Fewest samples for ``cca_dim`` directions: ``cca_dim + 2`` (with ``cca_dim + 1`` the
    subspaces are every centered direction: the score is 1 whatever the data)."""
    return params["cca_dim"] + 2


def svcca_cost(n: int, params: Mapping[str, Any]) -> int:
    """Temporary elements per permutation: the permuted (n, cca_dim) basis."""
    return n * params["cca_dim"]


def svcca_score(ux: Tensor, uy: Tensor, perms: Tensor) -> Tensor:
    """Mean canonical correlation of ``span(U_x)`` and ``span(U_y[π])`` for each π → (B,).

    ``U_xᵀ U_y[π]`` is computed as ``(U_yᵀ[:, π] U_x)ᵀ``: the permuted columns of the transposed
    basis are gathered in cache-sized blocks of permutations and multiplied in one batched
    product each, the same c×n by n×c product for every permutation, so that a permutation's
    value does not depend on the block it is in and the identity gives the observed score
    bitwise (a single product of c·B rows rounded a row differently for different B).
    """
    n, c = uy.shape
    uy_t = uy.T.contiguous()
    step = max(1, _GATHER_ELEMENTS // max(1, n * c))
    m = torch.empty(len(perms), c, c, dtype=torch.float64, device=ux.device)
    for start in range(0, len(perms), step):
        block = perms[start:start + step]
        gathered = uy_t.index_select(1, block.reshape(-1)).view(c, len(block), n).transpose(0, 1)
        m[start:start + len(block)] = torch.bmm(gathered, ux.expand(len(block), n, c)).mT
    # singular values of M = U_xᵀU_y[π] (c_x × c_y) as the square roots of the eigenvalues of
    # MᵀM, formed in float64 so that small ones keep ~1e-8 absolute accuracy
    sv = torch.linalg.eigvalsh(m.mT @ m).clamp(0.0, 1.0).sqrt()
    return sv.mean(-1).to(ux.dtype)


@no_autocast()
def svcca(x: Tensor, y: Tensor, cca_dim: int = 10) -> Tensor:
    """SVCCA: the mean canonical correlation of the top singular subspaces (Raghu et al. 2017).

    Each side's columns are centered and scaled to unit variance, its top ``cca_dim`` left
    singular vectors U span the kept subspace, and the score is ``(1/c) Σ_i σ_i(U_xᵀ U_y)``,
    the mean of the c = ``cca_dim`` canonical correlations between the two subspaces.  In
    [0, 1]; symmetric; deterministic (no random projection).  Needs
    ``cca_dim <= min(n − 2, d)`` on both sides (at ``cca_dim = n − 1`` each subspace is
    every centered direction and the score is 1 whatever the data).

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    cca_dim : int, default=10
        Singular directions kept per side.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Raghu, Gilmer, Yosinski, Sohl-Dickstein. SVCCA: Singular vector canonical correlation
    analysis for deep learning dynamics and interpretability. NeurIPS 2017.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import svcca
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(50, 8)
    >>> round(float(svcca(x, 3.0 * x[:, [2, 0, 1, 3, 4, 5, 6, 7]] + 1.0, cca_dim=4)), 4)
    1.0
    >>> 0.0 <= float(svcca(x, torch.randn(50, 8), cca_dim=4)) <= 1.0
    True
    """
    x, y = check_pair(x, y)
    cca_dim = _check_cca_dim(cca_dim)
    if cca_dim > x.shape[0] - 2:  # too few samples: the pair's n (a side's d: its own error)
        raise _too_large(cca_dim, x.shape[0], x.shape[1])
    ident = torch.arange(x.shape[0], device=x.device)[None]
    return svcca_score(*per_side(svcca_state, x, y, cca_dim), ident)[0]
