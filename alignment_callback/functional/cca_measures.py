"""CCA family: mean canonical correlation and projection-weighted CCA (PWCCA).

The canonical correlations of column-centered X (n × p) and Y (n × q) are the singular values
of ``U_xᵀ U_y``, with ``U`` an orthonormal basis of each side's centered column space (thin
SVD ``X − x̄ = U S Vᵀ`` truncated to the numerical rank r).  A row permutation π of Y permutes
the rows of ``U_y``, so the null costs one batched ``(r_x × n)(n × r_y)`` product and one small
SVD per permutation instead of two thin SVDs of the features.

Rank: if a side's centered column space is all n − 1 centered directions (rank n − 1, e.g.
d >= n − 1), every canonical correlation is 1 whatever the other side is.  Both measures then
raise ``ValueError``; they need rank < n − 1 on both sides (n >= d + 2 for full-rank features).
With ``r_x + r_y > n − 1`` at least ``r_x + r_y − (n − 1)`` correlations are forced to 1: the
raw score is inflated (the width confounder), which the permutation calibration removes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._validation import check_pair, is_integer, per_side
from alignment_callback.functional.shape_measures import centered_svd


@dataclass(frozen=True)
class CCAState:
    """``u`` (n, r) orthonormal basis of the centered column space; ``coords`` (r, p) the
    centered features in that basis (``X − x̄ = u @ coords``, used by PWCCA's weights)."""

    u: Tensor
    coords: Tensor


def cca_state(x: Tensor, measure: str = "cca_similarity") -> CCAState:
    """Orthonormal basis of the column-centered ``x``'s column space (and its coordinates)."""
    n, d = x.shape
    u, s, vh = centered_svd(x, measure, per_column=True)  # the column space only
    if u.shape[1] >= n - 1:
        raise ValueError(
            f"{measure}: the centered representation has rank {u.shape[1]} = n - 1 (n={n} "
            f"samples, d={d} features): it spans every centered direction, so all canonical "
            f"correlations are 1 whatever the other representation is. CCA needs rank < n - 1 "
            f"(n >= d + 2 for full-rank features): use more samples or reduce the features "
            f"first (e.g. PCA, as svcca does)"
        )
    return CCAState(u, s[:, None] * vh)


def _check_dims(dims: int | None) -> int | None:
    if dims is None:
        return None
    if not is_integer(dims) or dims < 1:
        raise ValueError(f"cca_similarity: dims must be a positive integer or None, got {dims!r}")
    return int(dims)


def cca_score(sx: CCAState, sy: CCAState, perms: Tensor, dims: int | None = None) -> Tensor:
    """Mean of the top ``dims`` (default all ``min(r_x, r_y)``) canonical correlations of
    ``(x, y[π])`` for each π (B, n) → (B,)."""
    dims = _check_dims(dims)
    k = min(sx.u.shape[1], sy.u.shape[1])
    if dims is not None and dims > k:
        raise ValueError(
            f"cca_similarity: dims={dims} exceeds the number of canonical correlations "
            f"min(rank x, rank y) = {k}"
        )
    rho = torch.linalg.svdvals(sx.u.T.unsqueeze(0) @ sy.u[perms]).clamp(0.0, 1.0)  # (B, k) desc
    return rho[:, : dims or k].mean(-1)


def _identity(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)[None]


@no_autocast()
def cca_similarity(x: Tensor, y: Tensor, dims: int | None = None) -> Tensor:
    """Mean canonical correlation of the column-centered features (Hotelling 1936).

    ``(1/k) Σ_{i<=k} ρ_i`` over the top ``k = dims`` canonical correlations ρ_i, the singular
    values of ``U_xᵀ U_y`` with U an orthonormal basis of each side's centered column space.
    Range [0, 1], 1 iff one column space contains the other (for ``dims=None``).  Symmetric.
    Invariant to invertible linear maps of either side's features (so to rotation, any
    scaling) and translation.  Needs rank < n − 1 on both sides — n >= d + 2 for full-rank
    features — else ``ValueError`` (see the module docstring); n >= 3.  Fast null: one
    batched r_x×r_y product and SVD per permutation.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    dims : int or None, default=None
        How many of the largest correlations to average; ``None`` for all
        ``min(rank x, rank y)``.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Hotelling. Relations between two sets of variates. Biometrika 28, 1936.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import cca_similarity
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(50, 4)
    >>> a = torch.randn(4, 4)  # invertible (almost surely)
    >>> round(float(cca_similarity(x, x @ a + 1.0)), 4)
    1.0
    >>> 0.0 <= float(cca_similarity(x, torch.randn(50, 3), dims=1)) <= 1.0
    True
    """
    x, y = check_pair(x, y)
    return cca_score(*per_side(cca_state, x, y), _identity(x.shape[0], x.device), dims)[0]


def pwcca_state(x: Tensor) -> CCAState:
    """As :func:`cca_state` (the coordinates are used when this side is X)."""
    return cca_state(x, "pwcca")


def _left_svd(m: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors (B, r_x, k) and singular values (B, k) of ``m`` (B, r_x, r_y).

    LAPACK's divide-and-conquer SVD can fail to converge on matrices with many repeated
    singular values, which CCA produces when ``r_x + r_y > n − 1`` (at least
    ``r_x + r_y − (n − 1)`` correlations equal 1), mostly in float32.  A failed batch is redone
    matrix by matrix in float64, and a matrix that still fails takes its singular values from
    ``svdvals`` and its left vectors from ``eigh(m mᵀ)``.
    """
    try:
        lmat, rho, _ = torch.linalg.svd(m, full_matrices=False)
        return lmat, rho
    except torch.linalg.LinAlgError:
        pass
    k = min(m.shape[-2:])
    lmats, rhos = [], []
    for mi in m.double():
        try:
            lmat, rho, _ = torch.linalg.svd(mi, full_matrices=False)
        except torch.linalg.LinAlgError:
            rho = torch.linalg.svdvals(mi)
            lmat = torch.linalg.eigh(mi @ mi.T).eigenvectors.flip(-1)[:, :k]
        lmats.append(lmat)
        rhos.append(rho)
    return torch.stack(lmats).to(m.dtype), torch.stack(rhos).to(m.dtype)


def pwcca_score(sx: CCAState, sy: CCAState, perms: Tensor) -> Tensor:
    """PWCCA of ``(x, y[π])`` for each π → (B,), weights from x's side.

    With ``U_xᵀ U_y[π] = L diag(ρ) Rᵀ``, x's unit-norm canonical variates are ``h_i = U_x L_i``
    and ``⟨h_i, x_j⟩ = (Lᵀ coords)_ij``.  Within a group of tied correlations the canonical
    directions are not unique and neither are the L1 weights; the group's total weight then
    depends on the SVD's choice of basis (exact ties occur only for forced unit correlations).
    """
    lmat, rho = _left_svd(sx.u.T.unsqueeze(0) @ sy.u[perms])
    # (B, k): Σ_j |⟨h_i, x_j⟩|, one k×k by k×d product per permutation (a single product of
    # B·k rows would round a permutation's value differently in batches of different size)
    w = torch.bmm(lmat.mT, sx.coords.expand(len(lmat), *sx.coords.shape)).abs().sum(-1)
    return (w * rho.clamp(0.0, 1.0)).sum(-1) / w.sum(-1)


@no_autocast()
def pwcca(x: Tensor, y: Tensor) -> Tensor:
    """Projection-weighted CCA (Morcos, Raghu & Bengio 2018), weights from x's side.

    ``Σ_i α_i ρ_i`` with the canonical correlations ρ_i (i <= min(rank x, rank y)) of the
    column-centered features and weights from **x's side** as in the paper:
    ``α_i ∝ Σ_j |⟨h_i, x_j⟩|``, ``Σ α_i = 1``, h_i the i-th unit-norm canonical variate of x
    and x_j the j-th centered feature (neuron) of x.

    (Google's ``pwcca.py`` weights from whichever side has fewer neurons and adds the mean back
    to the variates; repsim averages both directions.  Here the direction is explicit:
    ``(pwcca(x, y) + pwcca(y, x))/2`` is repsim's symmetrized value.)

    Range [0, 1].  Not symmetric.  Invariant to translation, isotropic scaling of x, invertible
    linear maps of y, permutations and sign flips of x's features; not to rotations or
    anisotropic scaling of x (the weights use x's neuron basis).  Rank requirement and n as
    :func:`cca_similarity`.  With ``r_x + r_y > n − 1`` the correlations forced to 1 form a
    tied group whose canonical directions, and so whose L1 weights, depend on the SVD's
    choice of basis: the value is then defined to about 1e-2 (0.849–0.857 over bases of one
    such group at n = 40, r_x = 20, r_y = 30), and the invariances hold to that precision
    only; keep ``r_x + r_y <= n − 1`` (or reduce the features first) for an exact value.
    Fast null: one batched product, an r_x×r_y SVD with left vectors
    and a (k × r_x)(r_x × p) weight product per permutation.

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
    Morcos, Raghu, Bengio. Insights on representational similarity in neural networks with
    canonical correlation. NeurIPS 2018.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import pwcca
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(50, 4)
    >>> round(float(pwcca(x, x @ torch.randn(4, 4) + 1.0)), 4)  # y: an invertible map of x
    1.0
    >>> 0.0 <= float(pwcca(x, torch.randn(50, 3))) <= 1.0
    True
    """
    x, y = check_pair(x, y)
    return pwcca_score(*per_side(pwcca_state, x, y), _identity(x.shape[0], x.device))[0]
