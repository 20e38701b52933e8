"""Pearson type III tails and quantiles moment-matched to a permutation null, and the rule for
when they are trusted.

The exact mean, variance and skewness (``moments.exact``) fix a Pearson type III (a shifted,
scaled gamma) whose tail gives the p-value and whose quantile gives the threshold, as in
Josse et al. (2008) for the RV coefficient.

References
----------
* Josse, J., Pagès, J., Husson, F. (2008).  Testing the significance of the RV coefficient.
  Computational Statistics & Data Analysis 53(1), 82–91.
* Winkler, A. M., Ridgway, G. R., Douaud, G., Nichols, T. E., Smith, S. M. (2016).  Faster
  permutation inference in brain imaging.  NeuroImage 141, 502–516 (moment-matched gamma /
  Pearson III tails for permutation tests).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from alignment_callback.functional.moments.invariants import PermutationMoments
from alignment_callback.functional.moments.patterns import _F64

# below: Wilson–Hilferty form of the gamma (shape 4/γ² > 1e6; its error there is < 5e-9, while
# torch's igamma loses up to 1e-6 near z ≈ −4.5 for shapes ~1e8), smooth to the normal
_WH_SKEW = 2e-3
_NORMAL_SKEW = 1e-12  # below: the normal distribution itself

#: Validity rule for the Pearson III p-value (measured in benchmarks/check_moments.py, sections
#: ``validity`` and ``pvalues``): n >= PEARSON3_MIN_N ...
PEARSON3_MIN_N = 32
#: ... and |skewness| <= PEARSON3_MAX_ABS_SKEW ...
PEARSON3_MAX_ABS_SKEW = 1.4
#: ... and pair_leverage <= PEARSON3_MAX_LEVERAGE.
PEARSON3_MAX_LEVERAGE = 0.5
#: The smallest positive upper-tail probability (α) the quantile is computed for.
MIN_TAIL = 1e-100


def pearson3_valid(n: int, skewness: Any, leverage: Any = 0.0, tied: Any = False) -> Any:
    """Whether the moment-matched Pearson III p-value is trusted (for ``null="auto"``):
    ``n >= 32``, ``|skewness| <= 1.4``, ``leverage <= 0.5`` (:func:`pair_leverage`) and no
    tied samples (``tied``: either representation has two identical rows, :func:`has_tied_rows`).

    Measured on linear / RBF / unbiased CKA and RSA with Gaussian, Student-t₃ and
    low-rank-plus-noise data, d/n ∈ {0.1, 1, 8}, n = 8..256 (``benchmarks/check_moments.py``):
    inside the rule the P3 tail is within ~0.01 (the Monte-Carlo noise of a K = 20,000
    reference) of the permutation p-value for p ∈ [0.005, 0.5]; outside it errors reach 0.05
    (n < 32, or skew ≈ 2 with low-rank data) and 0.25 (heavy tails: an outlying sample in both
    representations makes the null a mixture, flagged by the leverage).  That validation used
    continuous data.  With tied samples (one-hot labels, integer codes) the null is lumpy, a few
    atoms: p-values were off by up to 0.08 (RSA of one-hot rows; at n = 40, 27 of 40 draws were
    0.03–0.065 below the permutation p-value), and the test's size at a level between two
    atoms can be far from it (0.26 at α = 0.15: one-hot rows of 2 classes against 16 pairs,
    n = 32), so tied data is outside the rule.  Floats or tensors.

    Parameters
    ----------
    n : int
        Number of samples.
    skewness : float or Tensor
        Skewness of the null (:class:`PermutationMoments`).
    leverage : float or Tensor, default=0.0
        :func:`pair_leverage` of the two representations (0 when unknown, which skips that
        part of the rule — pass it for gram measures).
    tied : bool or Tensor, default=False
        Whether either representation has tied (identical) samples (:func:`has_tied_rows` of
        either side's features); False when unknown, which skips that part of the rule.
    """
    if isinstance(skewness, Tensor) or isinstance(leverage, Tensor) or isinstance(tied, Tensor):
        skewness, leverage, tied = _as64(skewness, leverage, tied)  # one device, one shape
        ok = (skewness.abs() <= PEARSON3_MAX_ABS_SKEW) & (leverage <= PEARSON3_MAX_LEVERAGE) & (
            n >= PEARSON3_MIN_N)
        return ok & (tied == 0)
    return (n >= PEARSON3_MIN_N and abs(skewness) <= PEARSON3_MAX_ABS_SKEW
            and leverage <= PEARSON3_MAX_LEVERAGE and not tied)


def _as64(*xs: Any) -> list[Tensor]:
    """The arguments as float64 tensors broadcast together, on the device of the first of them
    that is not on the CPU (numbers and CPU tensors join it), else on the CPU."""
    device = next((x.device for x in xs if isinstance(x, Tensor) and x.device.type != "cpu"),
                  None)
    ts = [torch.as_tensor(x, dtype=_F64, device=device) for x in xs]
    return list(torch.broadcast_tensors(*ts))


def _wh(z: Tensor, g: Tensor) -> Tensor:
    """Wilson–Hilferty normal deviate of a standardized Pearson III (skew g ≥ 0) at z."""
    small = g < _NORMAL_SKEW
    gs = torch.where(small, torch.ones_like(g), g)
    u = (z * gs / 2).clamp_min(-1 + 1e-300)
    w = 6.0 / gs * torch.expm1(torch.log1p(u) / 3) + gs / 6
    return torch.where(small, z, w)


def _wh_inv(w: Tensor, g: Tensor) -> Tensor:
    small = g < _NORMAL_SKEW
    gs = torch.where(small, torch.ones_like(g), g)
    v = (w - gs / 6) * gs / 6
    z = 2.0 / gs * torch.expm1(3 * torch.log1p(v.clamp_min(-1.0)))
    return torch.where(small, w, z)


def _standard_tail(z: Tensor, g: Tensor, upper: bool) -> Tensor:
    """``P(Z ≥ z)`` (``upper``) or ``P(Z ≤ z)`` for the standardized Pearson III with skew
    g ≥ 0 (a shifted gamma; Wilson–Hilferty below ``_WH_SKEW``)."""
    big = g >= _WH_SKEW
    gs = torch.where(big, g, torch.ones_like(g))
    shape = 4.0 / (gs * gs)
    x = shape * (1.0 + z * gs / 2)
    incomplete = torch.special.gammaincc if upper else torch.special.gammainc
    edge = torch.ones_like(x) if upper else torch.zeros_like(x)
    exact = torch.where(x > 0, incomplete(shape, x.clamp_min(0.0)), edge)
    approx = torch.special.ndtr(-_wh(z, g) if upper else _wh(z, g))
    return torch.where(big, exact, approx)


def _standard_upper(z: Tensor, g: Tensor) -> Tensor:
    """``P(Z ≥ z)`` for the standardized Pearson III with skew g ≥ 0."""
    return _standard_tail(z, g, upper=True)


def _standard_lower(z: Tensor, g: Tensor) -> Tensor:
    """``P(Z ≤ z)`` for the standardized Pearson III with skew g ≥ 0."""
    return _standard_tail(z, g, upper=False)


def pearson3_sf(t: Any, mean: Any, std: Any, skew: Any) -> Tensor:
    """Upper tail ``P(S ≥ t)`` of the Pearson type III with the given mean, std and skewness.

    For skew γ > 0, ``S = mean + std·(G − a)/√a`` with ``G ~ Gamma(a = 4/γ², 1)``, so
    ``P(S ≥ t) = Q(a, a + z√a)`` with ``z = (t − mean)/std`` (``torch.special.gammaincc``);
    γ < 0 is the mirror image (``P(a, a − z√a)``).  For ``|γ| < 2e-3`` (a > 10⁶) the
    Wilson–Hilferty form of the gamma is used, which tends to the normal tail Φ(−z) as
    γ → 0 without dividing by γ (γ = 0 is exactly normal).  A zero std gives a point mass:
    1 for ``t <= mean`` else 0.  Broadcasts; float64.

    Parameters
    ----------
    t : float or Tensor
        Observed statistic(s).
    mean, std, skew : float or Tensor
        Moments of the null (e.g. :func:`cosine_moments`).

    Example
    -------
    >>> round(float(pearson3_sf(1.0, 0.0, 1.0, 0.0)), 6)  # normal limit
    0.158655
    >>> round(float(pearson3_sf(1.0, 0.0, 1.0, 2.0)), 6)  # exponential: exp(-2)
    0.135335
    """
    t, mean, std, skew = _as64(t, mean, std, skew)
    pos = std > 0
    z = (t - mean) / torch.where(pos, std, torch.ones_like(std))
    g = skew.abs()
    upper = torch.where(skew >= 0, _standard_upper(z, g), _standard_lower(-z, g))
    point = (t <= mean).to(_F64)
    return torch.where(pos, upper, point)


def _solve_gamma(shape: Tensor, target: Tensor, upper: bool, iters: int = 200) -> Tensor:
    """x > 0 with ``P(shape, x) = target`` (``Q`` if ``upper``): Newton on log x, safeguarded
    by a bracket (bisection whenever Newton leaves it), float64."""
    f = torch.special.gammaincc if upper else torch.special.gammainc
    sign = -1.0 if upper else 1.0  # d f / dx sign
    lo = torch.full_like(shape, -745.0)  # log x
    hi = torch.log(shape) + 1.0
    # grow hi until f(hi) is beyond the target
    for _ in range(200):
        val = f(shape, torch.exp(hi))
        beyond = (val <= target) if upper else (val >= target)
        if bool(beyond.all()):
            break
        hi = torch.where(beyond, hi, hi + 1.0 + 0.5 * hi.abs())
    # Wilson–Hilferty start
    p_lower = 1 - target if upper else target
    zn = torch.special.ndtri(p_lower.clamp(1e-300, 1 - 1e-16))
    start = shape * (1 - 1 / (9 * shape) + zn / (3 * torch.sqrt(shape))).clamp_min(1e-3) ** 3
    u = torch.log(start).clamp(lo, hi)
    frozen = torch.zeros_like(u, dtype=torch.bool)
    shape_1, log_gamma = shape - 1, torch.lgamma(shape)
    for _ in range(iters):
        x = torch.exp(u)
        resid = f(shape, x) - target
        below = (resid < 0) if not upper else (resid > 0)  # root lies above u
        lo = torch.where(below, u, lo)
        hi = torch.where(below, hi, u)
        logpdf = shape_1 * torch.log(x) - x - log_gamma
        deriv = sign * torch.exp(logpdf + u)  # d f / d log x
        step = torch.where(deriv != 0, resid / torch.where(deriv != 0, deriv, 1.0),
                           torch.full_like(u, math.inf))
        tol = 1e-15 * (1 + u.abs())
        # a Newton step below the tolerance means u is the root to working precision; it is
        # checked before the bracket, which such a step can leave by rounding (new == lo)
        converged = step.abs() <= tol
        new = u - step
        bad = ~torch.isfinite(new) | (new <= lo) | (new >= hi)
        new = torch.where(converged, u, torch.where(bad, 0.5 * (lo + hi), new))
        done = converged | ((new - u).abs() <= tol)
        u = torch.where(frozen, u, new)  # an entry stops at its own convergence, so its
        frozen = frozen | done  # value does not depend on the other entries of the batch
        if bool(frozen.all()):
            break
    return torch.exp(u)


def pearson3_quantile(prob: Any, mean: Any, std: Any, skew: Any, upper: bool = False
                      ) -> Tensor:
    """Quantile ``t`` with ``P(S ≤ t) = prob`` of the Pearson type III (see
    :func:`pearson3_sf`), or with ``upper`` ``P(S > t) = prob``: the threshold is
    ``τ = pearson3_quantile(α, …, upper=True)``, accurate down to α = 1e-100 (``1 − α``
    rounds to 1 below α ≈ 1e-16); a positive tail probability below 1e-100 is refused.

    Inverts the regularized incomplete gamma by Newton's method on log x, safeguarded by a
    bracket (bisection whenever a step leaves it), in float64; for ``|skew| < 2e-3`` the
    Wilson–Hilferty form is inverted in closed form (normal quantile at skew 0).  prob 0 / 1
    give the support's ends (±inf or the gamma's finite end).  Broadcasts.

    Parameters
    ----------
    prob : float or Tensor
        Lower-tail probability in [0, 1] (upper-tail with ``upper``).
    mean, std, skew : float or Tensor
        Moments of the distribution.
    upper : bool, default=False
        Read ``prob`` as the upper tail ``P(S > t)``.

    Example
    -------
    >>> round(float(pearson3_quantile(0.975, 0.0, 1.0, 0.0)), 6)
    1.959964
    >>> t = pearson3_quantile(0.95, 0.1, 0.02, 1.3)
    >>> round(float(pearson3_sf(t, 0.1, 0.02, 1.3)), 10)
    0.05
    """
    prob, mean, std, skew = _as64(prob, mean, std, skew)
    tail = prob if upper else 1 - prob
    if bool(((tail > 0) & (tail < MIN_TAIL)).any()):
        raise ValueError(f"the upper-tail probability must be 0 or at least {MIN_TAIL:g} (the "
                         "gamma inversion's start is not reliable below), got "
                         f"{float(tail[(tail > 0) & (tail < MIN_TAIL)].min()):g}")
    if bool(((prob < 0) | (prob > 1)).any()):
        raise ValueError("prob must lie in [0, 1]")
    g = skew.abs()
    big = g >= _WH_SKEW
    gs = torch.where(big, g, torch.ones_like(g))
    shape = 4.0 / (gs * gs)
    # positive skew: P(Z <= z) = P(a, a + z√a);  negative: P(Z <= z) = Q(a, a − z√a)
    pos = skew >= 0
    at_lo, at_hi = (prob >= 1, prob <= 0) if upper else (prob <= 0, prob >= 1)
    interior = ~at_lo & ~at_hi
    half = torch.full_like(prob, 0.5)
    # both tails, each exact where it is the smaller one: pc = P(S <= t), qc = P(S > t)
    pc = torch.where(interior, 1 - prob if upper else prob, half)
    qc = torch.where(interior, prob if upper else 1 - prob, half)
    # x with P(a, x) = pc (positive skew) or Q(a, x) = pc (negative), each solved with the
    # smaller tail for precision; only the entries that need the gamma are solved
    tails = torch.where(pos, pc > 0.5, pc < 0.5)
    target = torch.where(torch.where(pos, pc > 0.5, pc >= 0.5), qc, pc)
    x = shape.clone()
    for tail in (True, False):
        todo = big & (tails == tail)
        if bool(todo.any()):
            x[todo] = _solve_gamma(shape[todo], target[todo], tail)
    sq = torch.sqrt(shape)
    z_exact = torch.where(pos, (x - shape) / sq, (shape - x) / sq)
    w = torch.where(pc > 0.5, -torch.special.ndtri(qc), torch.special.ndtri(pc))
    z_wh = torch.where(pos, _wh_inv(w, g), -_wh_inv(-w, g))
    z = torch.where(big, z_exact, z_wh)
    # ends of the support
    end_hi = torch.where(pos | ~big, torch.full_like(z, math.inf), sq)   # neg skew: z <= √a
    end_lo = torch.where(~pos | ~big, torch.full_like(z, -math.inf), -sq)  # pos skew: z >= −√a
    z = torch.where(at_lo, end_lo, torch.where(at_hi, end_hi, z))
    return mean + std * z


def pearson3_null(score: Any, moments: PermutationMoments, alpha: float = 0.05
                  ) -> dict[str, Tensor]:
    """Analytic calibration of an observed cosine ``score`` against its permutation moments:
    ``p_value = pearson3_sf(score, …)``, ``threshold = pearson3_quantile(alpha, …,
    upper=True)``,
    plus ``null_mean``, ``null_std`` and ``skewness`` (float64 tensors).

    Parameters
    ----------
    score : float or Tensor
        The observed statistic on the same scale as ``moments`` (e.g. the CKA value with
        :func:`cosine_moments`).
    moments : PermutationMoments
    alpha : float, default=0.05
        Level of the threshold τ.

    Example
    -------
    >>> out = pearson3_null(0.5, PermutationMoments(0.3, 0.01, 0.0))
    >>> round(float(out["p_value"]), 4), round(float(out["threshold"]), 4)  # 2σ, normal
    (0.0228, 0.4645)
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    mu, sd, g = moments.mean, moments.std, moments.skewness
    return {
        "p_value": pearson3_sf(score, mu, sd, g),
        "threshold": pearson3_quantile(alpha, mu, sd, g, upper=True),
        "null_mean": torch.tensor(mu, dtype=_F64),
        "null_std": torch.tensor(sd, dtype=_F64),
        "skewness": torch.tensor(g, dtype=_F64),
    }
