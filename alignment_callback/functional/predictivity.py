"""Linear predictivity: cross-validated R² of a ridge regression from x to y (Brain-Score /
neural-predictivity style), with an exact fast permutation null.

Definition (all choices fixed and deterministic):

* **Folds** by row position, as scikit-learn's ``KFold(folds, shuffle=False)``: contiguous
  blocks, the first ``n % folds`` of size ``n // folds + 1``.  A permutation null shuffles y's
  rows and never the folds, so it stays exact.
* **Fit** on a training set T (m rows): intercept by centering, ``β = (X_Tᶜᵀ X_Tᶜ + λ I)⁻¹
  X_Tᶜᵀ (Y_T − ȳ_T)`` with ``X_Tᶜ = X_T − x̄_T``; prediction ``ŷ = ȳ_T + (x − x̄_T) β``.  Computed
  from the thin SVD ``X_Tᶜ = U S Vᵀ`` (rank-truncated; ``λ = 0`` is minimum-norm least squares).
* **Penalty** relative to the training data's scale, so the measure is scale-free:
  ``λ = ridge · ‖X_Tᶜ‖²_F / min(m − 1, p)`` (``ridge = 1`` is the mean eigenvalue of the
  centered training cross-product).  ``ridge=None`` chooses, separately in every outer fold,
  the grid value in :data:`RIDGE_GRID` with the smallest pooled inner-CV squared error
  (``folds`` inner folds by position within the training rows, first minimum on ties); a
  sequence is used as the grid instead.
* **Score** pooled over all outputs and test folds (scikit-learn's
  ``r2_score(..., multioutput="variance_weighted")`` of the out-of-fold predictions):
  ``R² = 1 − Σ_f ‖Y_f − Ŷ_f‖²_F / ‖Y − ȳ‖²_F`` with ȳ the mean over all n rows.  The
  mean of per-output R² (sklearn's ``"uniform_average"``) is this R² on column-standardized y.

Fast null.  Out-of-fold predictions are a linear operator of y fixed by x:
``Y_E − Ŷ_E = M Y`` with ``M = [I_E, −(11ᵀ/m + P diag(s/(s² + λ)) Uᵀ)]`` (P the test rows in
the training basis), and ``M 1 = 0``.  So every squared error is a quadratic form
``‖M Y‖² = ⟨MᵀM, L⟩`` of y's centered gram ``L = (Y − ȳ)(Y − ȳ)ᵀ``, and under a permutation
``L`` becomes ``L[π][:, π]``.  ``prepare`` builds the forms once from x — one n × n matrix
(summed over folds) for a fixed penalty; ``folds × |grid|`` outer-fold forms and as many
inner-CV forms when the penalty is chosen by inner CV, each stored as its upper triangle
(``n(n + 1)/2`` numbers: 70 such at the defaults, 147 MB in float32 at n = 1024) — and a
permutation is one n × n gather of L plus one dot product (fixed penalty, as cheap as linear
CKA), or plus one row of a chunk-wide matrix product with the packed forms.  The choice of
penalty is redone for every permutation (the inner errors are forms too), so the null is exact.

Memory: the forms, y's gram and two n × n gathers (about 4 n × n matrices of the data's dtype
for a fixed penalty, 40 with the inner CV; :func:`forms_bytes`).  :func:`predictivity_score`
refuses with ``MemoryError`` before allocating any of them when they would not fit in the
memory available; :func:`linear_predictivity` itself needs O(n·d) and is never refused.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property

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
from alignment_callback.functional._validation import (
    as_number,
    check_matrix,
    check_pair,
    is_integer,
    per_side,
)

RIDGE_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
"""Relative penalties searched by inner CV when ``ridge=None``."""


def fold_slices(n: int, folds: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` test blocks of ``KFold(folds, shuffle=False)`` on n rows."""
    base, extra = divmod(n, folds)
    out, start = [], 0
    for f in range(folds):
        stop = start + base + (1 if f < extra else 0)
        out.append((start, stop))
        start = stop
    return out


Ridge = float | Sequence[float] | None


def _check_params(ridge: Ridge, folds: int) -> tuple[tuple[float, ...], bool]:
    """Return (penalty grid, fixed?); a 0-dim tensor or array ridge counts as its number, a
    1-D one as the list of its numbers."""
    if not is_integer(folds) or folds < 2:
        raise ValueError(f"linear_predictivity: folds must be an integer >= 2, got {folds!r}")
    if ridge is None:
        return RIDGE_GRID, False
    if getattr(ridge, "ndim", None) == 0 and not isinstance(ridge, numbers.Real):
        ridge = as_number(ridge, "linear_predictivity: ridge")
    elif getattr(ridge, "ndim", 0) >= 1 and hasattr(ridge, "tolist"):  # a tensor or array grid
        ridge = ridge.tolist()
    values = (ridge,) if isinstance(ridge, numbers.Real) else tuple(ridge)
    if not values:
        raise ValueError("linear_predictivity: the ridge grid is empty")
    for v in values:
        bad = isinstance(v, bool) or not isinstance(v, numbers.Real)
        if bad or not 0 <= v < float("inf"):
            raise ValueError(
                f"linear_predictivity: ridge must be None, a finite number >= 0 or a sequence of "
                f"them, got {ridge!r}"
            )
    return tuple(float(v) for v in values), len(values) == 1


def min_samples(folds: int = 5) -> int:
    """Smallest n accepted: ``2·folds`` (each outer training set can hold ``folds`` inner folds)."""
    return 2 * int(folds)


class _Fit:
    """Ridge regression fitted on rows ``x_train`` and evaluated at rows ``x_test``."""

    def __init__(self, x_train: Tensor, x_test: Tensor, least_squares: bool = False) -> None:
        m, p = x_train.shape
        mean = x_train.mean(0, keepdim=True)
        xc, xt = x_train - mean, x_test - mean
        self.scale = float((xc * xc).sum()) / min(m - 1, p) if m > 1 else 0.0
        if least_squares:  # ridge 0 depends on x's column space only: a float32 SVD keeps the
            xc, e = equilibrate_columns(xc)  # directions of small columns next to a large one
            xt = times_power_of_two(xt, -e)
        u, s, vh = torch.linalg.svd(xc, full_matrices=False)
        eps = torch.finfo(x_train.dtype).eps
        r = int((s > s[0] * max(m, p) * eps).sum()) if bool(s[0] > 0) else 0
        self.m = m
        self.u, self.s = u[:, :r], s[:r]
        self.p = xt @ vh[:r].T  # (n_test, r)

    def coef(self, ridge: float) -> Tensor:
        """``s / (s² + λ)`` with ``λ = ridge · scale``."""
        return self.s / (self.s * self.s + ridge * self.scale)

    def predict(self, y_train: Tensor, ridge: float) -> Tensor:
        coef = self.coef(ridge)[:, None] * (self.u.T @ y_train)
        return y_train.mean(0, keepdim=True) + self.p @ coef

    def operator(self, ridge: float) -> Tensor:
        """(n_test, m) matrix A with ``predict(y_train) = A @ y_train``."""
        return 1.0 / self.m + (self.p * self.coef(ridge)) @ self.u.T


def _split(n: int, start: int, stop: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows = torch.arange(n, device=device)
    return rows[start:stop], torch.cat([rows[:start], rows[stop:]])


def _check_variance(t: Tensor, what: str) -> Tensor:
    """Column-centered ``t``, rescaled exactly by a power of two (the measure is invariant to
    isotropic scaling of either side; squared norms of huge or tiny magnitudes would overflow
    or underflow); raises for zero variance."""
    tc, varying = center_columns(rescale_exactly(t))
    if not has_variance(tc, varying):  # every column constant to its own rounding
        raise ValueError(
            f"zero-variance representation: {what} is constant over samples; "
            f"linear_predictivity is undefined for it"
        )
    return tc


def _check_n(n: int, folds: int) -> None:
    if n < min_samples(folds):
        raise ValueError(
            f"linear_predictivity needs n >= 2*folds = {min_samples(folds)} samples for "
            f"folds={folds}, got n={n}"
        )


# --------------------------------------------------------------------------- direct path


def _inner_choice(x: Tensor, y: Tensor, grid: tuple[float, ...], folds: int) -> int:
    """Index of the grid penalty with the smallest pooled inner-CV squared error."""
    sse = torch.zeros(len(grid), dtype=x.dtype, device=x.device)
    for start, stop in fold_slices(x.shape[0], folds):
        test, train = _split(x.shape[0], start, stop, x.device)
        fit = _Fit(x[train], x[test], not any(grid))
        for k, ridge in enumerate(grid):
            sse[k] += ((y[test] - fit.predict(y[train], ridge)) ** 2).sum()
    return int(torch.argmin(sse))


@no_autocast()
def linear_predictivity(x: Tensor, y: Tensor, ridge: Ridge = None, folds: int = 5) -> Tensor:
    """Cross-validated R² of a ridge regression predicting y from x (Brain-Score style).

    ``R² = 1 − Σ_f ‖Y_f − Ŷ_f‖²_F / ‖Y − ȳ‖²_F``, pooled over all outputs and the ``folds``
    contiguous test folds, ``Ŷ_f`` the predictions of a ridge regression with intercept fitted
    on the other folds (see the module docstring for the exact folds, penalty and R²).

    Range (−∞, 1]: 1 for perfect out-of-fold predictions, about 0 (often slightly below) when
    x carries no information about y.  **Directional**: ``linear_predictivity(x, y)`` predicts y
    from x and differs from ``linear_predictivity(y, x)``.  Invariant to orthogonal maps,
    isotropic scaling and translation of either side (of x: because the penalty is relative
    and the fit has an intercept; of y: the pooled R²).  Not invariant to anisotropic scaling
    of y (outputs are weighted by their variance) nor, with a penalty > 0, to general linear
    maps of x.  Needs n >= 2·folds and non-constant x and y.

    This computes the regression directly (one thin SVD per fit: ``folds`` outer fits plus
    ``folds²`` inner ones); the permutation null uses the quadratic-form path of
    :func:`predictivity_state` / :func:`predictivity_score`, which gives the same values to
    rounding (an ulp or two).

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        The predictors, one row per sample.
    y : Tensor of shape (n, d_y)
        The targets: the same samples, in the same order.
    ridge : float, sequence of float or None, default=None
        Relative penalty ``λ / (‖X_Tᶜ‖²_F / min(m − 1, p))`` (0 = least squares) for a
        training set of m rows and p features; ``None`` chooses it per outer fold by inner
        CV over :data:`RIDGE_GRID` ``(1e-3, …, 1e3)``; a sequence is used as the grid (one
        of a single penalty is that fixed penalty).
    folds : int, default=5
        Outer (and inner) folds, contiguous by row position, as
        ``KFold(folds, shuffle=False)``; an integer >= 2.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Schrimpf et al. Brain-Score: Which artificial neural network for object recognition is
    most brain-like? bioRxiv 407007, 2018.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import linear_predictivity
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(50, 4)
    >>> round(float(linear_predictivity(x, x @ torch.randn(4, 3) + 1.0, ridge=0.0)), 4)
    1.0
    >>> float(linear_predictivity(x, torch.randn(50, 3))) < 0.2  # no information
    True
    """
    x, y = check_pair(x, y)
    grid, fixed = _check_params(ridge, folds)
    folds = int(folds)  # 3.0 -> 3
    n = x.shape[0]
    _check_n(n, folds)
    # translation-invariant; centered first, the fold means of a large offset round far less
    x, yc = per_side(_check_variance, x, y, "the representation")
    sse = torch.zeros((), dtype=x.dtype, device=x.device)
    for start, stop in fold_slices(n, folds):
        test, train = _split(n, start, stop, x.device)
        lam = grid[0] if fixed else grid[_inner_choice(x[train], yc[train], grid, folds)]
        fit = _Fit(x[train], x[test], lam == 0)
        sse = sse + ((yc[test] - fit.predict(yc[train], lam)) ** 2).sum()
    return 1.0 - sse / (yc * yc).sum()


# --------------------------------------------------------------------------- fast null path


class PredictivityForms:
    """x's quadratic forms: one full n × n matrix for a fixed penalty; otherwise the outer and
    inner forms packed as upper triangles (weights 2 off the diagonal) at flat indices
    ``flat`` of an n × n matrix.  One n × n form is alive at a time while they are built (see
    :func:`forms_bytes`)."""

    def __init__(self, x: Tensor, grid: tuple[float, ...], fixed: bool, folds: int) -> None:
        n = x.shape[0]
        self.fixed = fixed

        def residual_forms(fit: _Fit, test: Tensor, train: Tensor, lams: Sequence[float],
                           pack: Callable[[Tensor], Tensor] | None = None) -> Iterator[Tensor]:
            """MᵀM (n × n, or ``pack``ed) for each penalty, M = [I_test, −A_train], one at a
            time."""
            mmat = x.new_zeros(test.shape[0], n)
            mmat[:, test] = torch.eye(test.shape[0], dtype=x.dtype, device=x.device)
            for lam in lams:
                mmat[:, train] = -fit.operator(lam)
                yield mmat.T @ mmat if pack is None else pack(mmat.T @ mmat)

        slices = fold_slices(n, folds)
        if fixed:
            total = x.new_zeros(n, n)
            for start, stop in slices:
                test, train = _split(n, start, stop, x.device)
                total += next(residual_forms(_Fit(x[train], x[test], not any(grid)), test,
                                             train, grid))
            self.total = total
            return
        iu = torch.triu_indices(n, n, device=x.device)
        self.flat = iu[0] * n + iu[1]
        weight = torch.where(iu[0] == iu[1], 1.0, 2.0).to(x.dtype)
        del iu

        def pack(g: Tensor) -> Tensor:
            return torch.take(g, self.flat) * weight

        size = len(grid)
        # (folds·|grid|, P), fold-major; the inner forms summed over inner folds as packed
        self.outer = x.new_empty(folds * size, self.flat.shape[0])
        self.inner = x.new_zeros(folds * size, self.flat.shape[0])
        for f, (start, stop) in enumerate(slices):
            test, train = _split(n, start, stop, x.device)
            fit = _Fit(x[train], x[test], not any(grid))
            for k, form in enumerate(residual_forms(fit, test, train, grid, pack)):
                self.outer[f * size + k] = form
            for a, b in fold_slices(train.shape[0], folds):
                itest, itrain = train[a:b], torch.cat([train[:a], train[b:]])
                fit = _Fit(x[itrain], x[itest], not any(grid))
                for k, form in enumerate(residual_forms(fit, itest, itrain, grid, pack)):
                    self.inner[f * size + k] += form
        self.shape = (folds, size)


class PredictivityState:
    """One representation, usable as either side.

    As y: :attr:`target` (its centered gram and total sum of squares).  As x: :attr:`forms`.
    Both are computed on first use (so preparing a side only builds what its role needs).
    """

    def __init__(self, x: Tensor, ridge: Ridge = None, folds: int = 5) -> None:
        x = check_matrix(x)
        self.grid, self.fixed = _check_params(ridge, folds)
        self.folds = int(folds)
        _check_n(x.shape[0], self.folds)
        self._xc = _check_variance(x, "the representation")
        self.x = self._xc  # as in linear_predictivity: centered before the folds

    @cached_property
    def target(self) -> tuple[Tensor, Tensor]:
        """``(L = Y_c Y_cᵀ, tr L)``."""
        gram = self._xc @ self._xc.T
        return gram, (self._xc * self._xc).sum()

    @cached_property
    def forms(self) -> PredictivityForms:
        return PredictivityForms(self.x, self.grid, self.fixed, self.folds)


def predictivity_state(x: Tensor, ridge: Ridge = None, folds: int = 5) -> PredictivityState:
    """Prepare a representation for :func:`predictivity_score` (either side; lazy)."""
    return PredictivityState(x, ridge, folds)


def forms_bytes(n: int, dtype: torch.dtype, fixed: bool, folds: int, grid_size: int
                ) -> tuple[int, int]:
    """``(peak while building, kept)`` bytes of :class:`PredictivityForms` on n samples.

    Kept: one n × n form for a fixed penalty; otherwise ``2·folds·grid_size`` packed upper
    triangles (n(n + 1)/2 numbers each: about 35 n × n matrices at the defaults) and their
    int64 flat indices.  While building, also one n × n form, its packed copies, the packing
    weights and the (n/folds) × n residual operator with its temporaries.
    """
    size = torch.tensor([], dtype=dtype).element_size()
    square, triangle, rows = n * n * size, n * (n + 1) // 2, -(-n // folds) * n * size
    if fixed:
        return 2 * square + 4 * rows, square
    kept = 2 * folds * grid_size * triangle * size + 8 * triangle
    return kept + triangle * size + 2 * square + 4 * rows, kept


def _check_memory(sx: PredictivityState, sy: PredictivityState, batch: int) -> None:
    """Refuse, before any n × n matrix is allocated, a score whose matrices would not fit:
    x's forms unless built (their peak, then kept), y's centered gram unless built, and the
    scoring's two n × n gathers and ``batch`` packed triangles.  Built states are in use
    already, so the memory available does not count them."""
    n, dtype, device = sx.x.shape[0], sx.x.dtype, sx.x.device
    size = torch.tensor([], dtype=dtype).element_size()
    square = n * n * size
    build = kept = 0
    if "forms" not in vars(sx):  # cached properties: in the instance's dict once built
        build, kept = forms_bytes(n, dtype, sx.fixed, sx.folds, len(sx.grid))
    scoring = 2 * square + (0 if "target" in vars(sy) else square)
    if not sx.fixed:
        scoring += batch * (n * (n + 1) // 2) * size
    need = max(build, kept + scoring)
    if sx.fixed:
        cheaper = ""
    else:
        cheaper = (f"a fixed ridge=<number> (one n×n form instead of "
                   f"{2 * sx.folds * len(sx.grid)} packed triangles), ")
    alternatives = (f"{cheaper}linear_predictivity(x, y) for the value alone (a direct "
                    "regression, O(n·d) memory), linear_cka with null='moments' (no n×n matrix)")
    error = square_matrix_error("linear_predictivity", n, -(-need // square), dtype, device,
                                available_bytes, alternatives)
    if error is not None:
        raise error


def predictivity_score(sx: PredictivityState, sy: PredictivityState, perms: Tensor) -> Tensor:
    """Cross-validated R² of predicting ``y[π]`` from x for each π (B, n) → (B,).

    Builds x's forms and y's gram on first use, after refusing with ``MemoryError`` (the
    estimate and what to use instead) matrices that would not fit in the memory available.
    """
    n = sy.x.shape[0]
    if sx.x.shape[0] != n:
        raise ValueError(
            f"x and y must have the same number of samples, got {sx.x.shape[0]} and {n}"
        )
    b = perms.shape[0]
    _check_memory(sx, sy, b)
    forms = sx.forms
    gram, sst = sy.target
    rows, gathered = torch.empty_like(gram), torch.empty_like(gram)
    if forms.fixed:
        total = forms.total.reshape(-1)
        sse = gram.new_empty(b)
    else:
        packed = gram.new_empty(b, forms.flat.shape[0])
    for i, p in enumerate(perms):  # L[π][:, π], one n × n gather alive at a time
        torch.index_select(gram, 0, p, out=rows)
        torch.index_select(rows, 1, p, out=gathered)
        if forms.fixed:
            sse[i] = torch.dot(gathered.reshape(-1), total)
        else:
            torch.take(gathered, forms.flat, out=packed[i])
    if not forms.fixed:
        inner = (packed @ forms.inner.T).view(b, *forms.shape)
        outer = (packed @ forms.outer.T).view(b, *forms.shape)
        sse = outer.gather(2, inner.argmin(2, keepdim=True)).sum((1, 2))
    return 1.0 - sse / sst
