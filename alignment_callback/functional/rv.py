"""Escoufier's RV coefficient (Robert & Escoufier 1976).

For column-centered X (n × p), Y (n × q) with cross-products ``S_xy = XᵀY``:

    RV = tr(S_xy S_yx) / √(tr(S_xx²) · tr(S_yy²)) = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F).

Since ``tr(XᵀY YᵀX) = ⟨XXᵀ, YYᵀ⟩`` and ``tr((XᵀX)²) = ‖XXᵀ‖²_F``, RV is the cosine of the centered
linear grams, i.e. **exactly linear CKA** with the biased HSIC (Kornblith et al. 2019 note the
identity).  It is therefore computed on the gram path: the state is the centered linear gram and
a permutation is one O(n²) gather + dot (``gram_measures.gram_score``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._validation import check_pair, per_side
from alignment_callback.functional.gram_measures import (
    _NO_GRAM,
    GramState,
    _check_memory,
    gram_score,
    linear_state,
)


def rv_state(x: Tensor) -> GramState:
    """The centered linear gram ``(X − x̄)(X − x̄)ᵀ`` and its Frobenius norm."""
    return linear_state(x)


def rv_score(sx: GramState, sy: GramState, perms: Tensor) -> Tensor:
    """``⟨K, L[π][:, π]⟩ / (‖K‖‖L‖)`` for each π (B, n) → (B,)."""
    return gram_score(sx, sy, perms)


@no_autocast()
def rv_coefficient(x: Tensor, y: Tensor) -> Tensor:
    """Escoufier's RV coefficient of the column-centered features (Robert & Escoufier 1976).

    ``RV = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` for column-centered X, Y; identical to
    :func:`~alignment_callback.functional.linear_cka`.  Range [0, 1], 1 iff ``Y = c X Q``
    (Q orthogonal).  Symmetric.  Invariant to orthogonal maps, isotropic scaling and
    translation.  Needs n >= 2 and non-constant representations.  Fast null: one n×n gather +
    dot per permutation.

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
    Robert, Escoufier. A unifying tool for linear multivariate statistical methods: the
    RV-coefficient. J. R. Stat. Soc. C (Applied Statistics) 25(3), 1976.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import linear_cka, rv_coefficient
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(30, 5), torch.randn(30, 3)
    >>> bool(torch.isclose(rv_coefficient(x, y), linear_cka(x, y)))
    True
    >>> q, _ = torch.linalg.qr(torch.randn(5, 5))
    >>> round(float(rv_coefficient(x, 2.0 * x @ q)), 4)
    1.0
    """
    x, y = check_pair(x, y)
    _check_memory("rv_coefficient", x, _NO_GRAM)  # before the two n×n grams are built
    return rv_score(*per_side(rv_state, x, y), torch.arange(x.shape[0], device=x.device)[None])[0]
