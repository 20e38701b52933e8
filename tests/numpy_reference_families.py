"""Independent float64 NumPy/SciPy references for the shape, CCA, predictivity and RV measures.

Written from each measure's textbook definition (not from the library's code: no factor states,
no quadratic forms), so the tests compare two independent implementations.  Clarity over
speed.  All functions take arrays x (n, p), y (n, q) and return Python floats.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cholesky, orthogonal_procrustes, solve_triangular

__all__ = [
    "procrustes_similarity",
    "shape_metric",
    "bures_fidelity",
    "linear_gram",
    "rbf_gram",
    "center",
    "cca_correlations",
    "cca_similarity",
    "pwcca",
    "kfold",
    "ridge_cv_r2",
    "rv_coefficient",
]


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _center_cols(x) -> np.ndarray:
    x = _f64(x)
    return x - x.mean(0, keepdims=True)


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1])))


def _aligned_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """``max_Q ⟨a, b Q⟩ / (‖a‖‖b‖)`` over orthogonal Q, Q from scipy's orthogonal Procrustes."""
    w = max(a.shape[1], b.shape[1])
    a, b = _pad(a, w), _pad(b, w)
    q, _ = orthogonal_procrustes(b, a)  # argmin_Q ‖b Q − a‖_F
    return float(np.sum(a * (b @ q)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def procrustes_similarity(x, y) -> float:
    """``1 − d²/2``, d the orthogonal Procrustes distance of the centered, normalized features."""
    xh = _center_cols(x)
    yh = _center_cols(y)
    xh /= np.linalg.norm(xh)
    yh /= np.linalg.norm(yh)
    w = max(xh.shape[1], yh.shape[1])
    xp, yp = _pad(xh, w), _pad(yh, w)
    q, _ = orthogonal_procrustes(yp, xp)
    d2 = np.sum((xp - yp @ q) ** 2)
    return float(1.0 - d2 / 2.0)


def _partial_whiten(xc: np.ndarray, alpha: float) -> np.ndarray:
    """``X (α I + (1 − α)(XᵀX)^{−1/2})`` (Williams et al. 2021), the inverse square root taken
    on the support of XᵀX (directions with no variance carry nothing)."""
    lam, v = np.linalg.eigh(xc.T @ xc)
    tol = lam.max() * max(xc.shape) * np.finfo(float).eps
    inv_sqrt = np.where(lam > tol, 1.0 / np.sqrt(np.maximum(lam, tol)), 0.0)
    z = alpha * np.eye(xc.shape[1]) + (1.0 - alpha) * (v * inv_sqrt) @ v.T
    return xc @ z


def shape_metric(x, y, alpha: float) -> float:
    """``1 − θ/(π/2)``, θ the angular shape distance of the partially whitened centered data."""
    xw = _partial_whiten(_center_cols(x), alpha)
    yw = _partial_whiten(_center_cols(y), alpha)
    cos = _aligned_cosine(xw, yw)
    return float(1.0 - np.arccos(np.clip(cos, -1.0, 1.0)) / (np.pi / 2))


def linear_gram(x) -> np.ndarray:
    x = _f64(x)
    return x @ x.T


def rbf_gram(x, sigma) -> np.ndarray:
    x = _f64(x)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if sigma == "median":
        s2 = np.median(d2)
    else:
        s2 = float(sigma) ** 2
    return np.exp(-d2 / (2.0 * s2))


def center(k) -> np.ndarray:
    k = _f64(k)
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ k @ h


def _psd_sqrt(a: np.ndarray, tol: float) -> np.ndarray:
    lam, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.where(lam > tol, lam, 0.0))) @ v.T


def bures_fidelity(k, m) -> float:
    """``tr((K^½ L K^½)^½) / √(tr K tr L)`` for PSD K, L (eigenvalues below n·eps·max are 0)."""
    k, lg = _f64(k), _f64(m)
    n = k.shape[0]
    eps = n * np.finfo(float).eps
    ks = _psd_sqrt(k, eps * np.abs(k).max())
    prod = ks @ lg @ ks
    lam = np.linalg.eigvalsh((prod + prod.T) / 2)
    lam = np.where(lam > eps * lam.max(), lam, 0.0)
    return float(np.sum(np.sqrt(lam)) / np.sqrt(np.trace(k) * np.trace(lg)))


def cca_correlations(x, y) -> np.ndarray:
    """Canonical correlations: singular values of ``Σxx^{-½} Σxy Σyy^{-½}`` (Cholesky whitening;
    needs full column rank)."""
    xc, yc = _center_cols(x), _center_cols(y)
    lx = cholesky(xc.T @ xc, lower=True)
    ly = cholesky(yc.T @ yc, lower=True)
    m = solve_triangular(lx, xc.T @ yc, lower=True)
    m = solve_triangular(ly, m.T, lower=True).T
    return np.linalg.svd(m, compute_uv=False)


def cca_similarity(x, y, dims=None) -> float:
    rho = np.clip(cca_correlations(x, y), 0.0, 1.0)
    return float(rho[: dims or len(rho)].mean())


def pwcca(x, y) -> float:
    """Morcos et al. 2018: ``Σ α_i ρ_i``, ``α_i ∝ Σ_j |⟨h_i, x_j⟩|`` with h_i x's unit-norm
    canonical variates and x_j x's centered neurons."""
    xc, yc = _center_cols(x), _center_cols(y)
    lx = cholesky(xc.T @ xc, lower=True)
    ly = cholesky(yc.T @ yc, lower=True)
    xw = solve_triangular(lx, xc.T, lower=True).T  # orthonormal columns, span(X)
    yw = solve_triangular(ly, yc.T, lower=True).T
    u, rho, _ = np.linalg.svd(xw.T @ yw, full_matrices=False)
    h = xw @ u  # (n, k) canonical variates of x
    h /= np.linalg.norm(h, axis=0, keepdims=True)
    alpha = np.abs(h.T @ xc).sum(1)
    alpha /= alpha.sum()
    return float(np.sum(alpha * np.clip(rho, 0.0, 1.0)))


def kfold(n: int, folds: int) -> list[np.ndarray]:
    """Test index blocks of ``KFold(folds, shuffle=False)``."""
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    bounds = np.cumsum([0] + sizes)
    return [np.arange(bounds[f], bounds[f + 1]) for f in range(folds)]


def _ridge_predict(xt, yt, xe, ridge: float) -> np.ndarray:
    """Ridge with intercept, penalty ``ridge · ‖X_tᶜ‖²_F / min(m − 1, p)`` (normal equations)."""
    m, p = xt.shape
    mx, my = xt.mean(0), yt.mean(0)
    xc, yc = xt - mx, yt - my
    lam = ridge * np.sum(xc**2) / min(m - 1, p) if m > 1 else 0.0
    if lam > 0:
        beta = np.linalg.solve(xc.T @ xc + lam * np.eye(p), xc.T @ yc)
    else:
        beta = np.linalg.lstsq(xc, yc, rcond=None)[0]  # minimum-norm least squares
    return my + (xe - mx) @ beta


def _cv_sse(x, y, ridge: float, folds: int) -> float:
    sse = 0.0
    for test in kfold(x.shape[0], folds):
        train = np.setdiff1d(np.arange(x.shape[0]), test)
        sse += np.sum((y[test] - _ridge_predict(x[train], y[train], x[test], ridge)) ** 2)
    return sse


def ridge_cv_r2(x, y, ridge=None, folds: int = 5,
                grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)) -> float:
    """Pooled out-of-fold R² (``1 − ΣSSE / ‖Y − ȳ‖²``); ``ridge=None``: per outer fold, the grid
    value with the smallest pooled inner-CV error on the training rows."""
    x, y = _f64(x), _f64(y)
    sse = 0.0
    for test in kfold(x.shape[0], folds):
        train = np.setdiff1d(np.arange(x.shape[0]), test)
        if ridge is None:
            inner = [_cv_sse(x[train], y[train], g, folds) for g in grid]
            lam = grid[int(np.argmin(inner))]
        else:
            lam = ridge
        sse += np.sum((y[test] - _ridge_predict(x[train], y[train], x[test], lam)) ** 2)
    return float(1.0 - sse / np.sum((y - y.mean(0)) ** 2))


def rv_coefficient(x, y) -> float:
    """Escoufier: ``tr(S_xy S_yx) / √(tr(S_xx²) tr(S_yy²))`` with ``S_xy = X_cᵀ Y_c``."""
    xc, yc = _center_cols(x), _center_cols(y)
    sxy = xc.T @ yc
    sxx = xc.T @ xc
    syy = yc.T @ yc
    return float(np.trace(sxy @ sxy.T) / np.sqrt(np.trace(sxx @ sxx) * np.trace(syy @ syy)))
