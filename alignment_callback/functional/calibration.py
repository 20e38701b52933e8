"""Permutation calibration: a score against its null gives τ, a calibrated score and a p-value
(the calibration paper's Algorithm 1; see ``docs/calibration.md``)."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from alignment_callback.functional._validation import (
    AUTO,
    as_scalar,
    check_alpha,
    check_max_score,
    user_stacklevel,
)


@dataclass(frozen=True)
class CalibrationResult:
    """A calibrated score. Every field is a 0-dim tensor except ``null`` (K,).

    Attributes
    ----------
    raw : Tensor
        The observed score s.
    calibrated : Tensor
        ``max((s − τ)/(s_max − τ), 0)`` clamped to ≤ 1 (``[s − τ]₊`` if unbounded).
    p_value : Tensor
        ``(1 + #{k: s_k ≥ s}) / (K + 1)``; smallest attainable ``1/(K + 1)``; float64
        whatever the data's dtype (a ratio of counts: ``float(p) <= alpha`` holds exactly).
    threshold : Tensor
        The threshold τ, the ⌈(1 − α)(K + 1)⌉-th smallest of ``{s, s_1, …, s_K}``.
    null_mean, null_std : Tensor
        Mean and (unbiased, K − 1) standard deviation of the null.
    effect_size : Tensor
        ``(s − null_mean) / null_std`` (0 if both differences are 0, ±inf if only
        the std is 0).
    percentile : Tensor
        Percent of null values below s, ties counted half (mid-rank).
    null : Tensor
        The K null scores (empty when the null is analytic).
    null_method : str
        ``"permutation"``, ``"moments"`` or ``"permutation (exact mean)"`` (how
        the null was obtained; the last: permutations, with the exact permutation
        mean as ``null_mean``, and for mutual kNN the exact standard deviation as ``null_std``).
    """

    raw: Tensor
    calibrated: Tensor
    p_value: Tensor
    threshold: Tensor
    null_mean: Tensor
    null_std: Tensor
    effect_size: Tensor
    percentile: Tensor
    null: Tensor
    null_method: str = "permutation"

    SCALARS = ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std",
               "effect_size", "percentile")

    def as_dict(self) -> dict[str, float]:
        """The scalar fields as Python floats."""
        return {name: float(getattr(self, name)) for name in self.SCALARS}


def threshold_index(num_permutations: int, alpha: float) -> int:
    """0-based index of τ in the sorted ``{s, s_1..s_K}``: ⌈(1 − α)(K + 1)⌉ − 1, clamped.

    The product is taken as the exact decimal one where float rounding lands it just above an
    integer ((1 − 0.18)·1000 is 820.0000000000001 in floats, whose ceiling would put τ one
    place too high).
    """
    product = (1.0 - alpha) * (num_permutations + 1)
    idx = int(math.ceil(product - 1e-9 * max(1.0, product))) - 1
    return max(0, min(idx, num_permutations))


def warn_if_few(num_permutations: int, alpha: float) -> None:
    """Warn (pointing at the caller's code: it is a setting) when ``num_permutations`` is too
    few for ``alpha`` (see :func:`few_permutations`)."""
    if threshold_index(num_permutations, alpha) == num_permutations:
        warnings.warn(few_permutations(num_permutations, alpha), UserWarning,
                      stacklevel=user_stacklevel())


@contextmanager
def few_permutations_unsaid() -> Iterator[None]:
    """Within it, :func:`warn_if_few` says nothing: for a caller that says it once itself (a
    callback building several engines, the command line in its own words)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "num_permutations=.* is too few", UserWarning)
        yield


def few_permutations(num_permutations: int, alpha: float) -> str:
    """The warning for a K so small that τ is the largest of {s, s_1..s_K} whatever the data
    (the smallest p-value 1/(K + 1) is above α): nothing can be called aligned."""
    # the smallest K' with τ below the top, by bisection (τ leaves the top once α(K' + 1) >= 1,
    # so K' <= ⌈1/α⌉; counting up from K + 1 took time 1/α: a hang at α = 1e-300)
    low, need = num_permutations, max(num_permutations + 1, math.ceil(1.0 / alpha))
    while need - low > 1:
        mid = (low + need) // 2
        low, need = (mid, need) if threshold_index(mid, alpha) == mid else (low, mid)
    return (f"num_permutations={num_permutations} is too few for alpha={alpha:g}: the smallest "
            f"p-value, 1/{num_permutations + 1}, is above alpha, so the threshold τ is the "
            "largest of the score and its null and every calibrated score is 0; use "
            f"num_permutations >= {need}")


def resolution(dtype: torch.dtype) -> float:
    """The smallest ``s_max − τ`` that float error cannot fake: 1e-5 for scores computed from
    float32 (or lower precision) data, 1e-11 for float64."""
    return 1e-11 if dtype == torch.float64 else 1e-5


#: Null values within this many machine epsilons (of the scores' dtype, relative to
#: ``max(1, |s|)``) of the observed score s are ties of it (:func:`tie_tolerance`).
TIE_ULPS = 32


def tie_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance within which a null value ties the observed score: ``TIE_ULPS``
    machine epsilons of ``dtype`` (3.8e-6 in float32, 7.1e-15 in float64).

    A null value that equals the score in exact arithmetic (discrete data makes many) is
    computed along another route (another summation order, another SVD) and lands a few ulps
    from it, below as often as above; p = (1 + #{s_k ≥ s})/(K + 1) must count it.  Measured on
    one-hot data, such ties are at most 1.6 ulps apart for every built-in measure.  A null value
    that differs from s in exact arithmetic by less than the tolerance counts as a tie too: p
    can only grow, and a score can only be calibrated to 0, so the rule is conservative.
    """
    return TIE_ULPS * torch.finfo(dtype).eps


def calibrate_tensor(
    score: Tensor, null: Tensor, alpha: float = 0.05, max_score: float | None = 1.0,
    data_dtype: torch.dtype | None = None, warn_few: bool = True, ties: bool = False,
) -> dict[str, Tensor]:
    """Vectorized calibration: ``score`` of shape S, ``null`` of shape (K, *S).

    Returns the scalar fields of :class:`CalibrationResult`, each of shape S, plus
    ``"unresolved"``: where ``s_max − τ`` is below :func:`resolution` of ``data_dtype``
    (default: the scores' dtype) the calibrated score is 0, never a ratio of rounding errors;
    callers warn with :func:`warn_unresolved`.  Integer scores and nulls (counts) are
    calibrated in float64.  ``warn_few``: warn when K is too small for ``alpha``.  ``ties``:
    null values within :func:`tie_tolerance` of the score (times ``max(1, |s|)``) are ties of
    it (they reach it, count half in the percentile, and a score above τ by no more than that
    is not calibrated above 0); False (default) compares the values as given, for exact
    scores (counts) and for nulls the caller computed.
    """
    alpha = check_alpha(alpha)
    if max_score is not None and not math.isfinite(max_score):
        raise ValueError(f"max_score must be finite or None, got {max_score}")
    k = null.shape[0]
    if k < 1:
        raise ValueError("the null needs at least one permutation")
    if null.shape[1:] != score.shape:
        raise ValueError(f"null shape {tuple(null.shape)} does not match score shape {tuple(score.shape)}")
    if not bool(torch.isfinite(null).all() & torch.isfinite(score).all()):
        raise ValueError("score or null contains NaN/Inf values; cannot calibrate")
    if warn_few:
        warn_if_few(k, alpha)
    dtype = torch.promote_types(score.dtype, null.dtype)
    ties = ties and dtype.is_floating_point  # integer scores (counts) are exact
    if not dtype.is_floating_point:
        dtype = torch.float64
    score, null = score.to(dtype), null.to(dtype)
    # null values in [low, high] tie the score (without ``ties``: only values equal to it)
    if ties:
        tol = tie_tolerance(dtype) * score.abs().clamp_min(1.0)
        low, high = score - tol, score + tol
    else:
        tol, low, high = 0.0, score, score
    combined = torch.cat([score.unsqueeze(0), null], 0)
    tau = torch.sort(combined, dim=0).values[threshold_index(k, alpha)]
    # a ratio of counts, in float64 whatever the scores' dtype: (1 + c)/(K + 1) is then the
    # double nearest the exact ratio, as Python's, so ``float(p) <= 0.05`` holds at p = 5/100
    # (in float32 it reads 0.0500000007) and logged p-values print as the ratios they are
    reach = null >= low
    reached = reach.sum(0)
    p_value = (1.0 + reached.to(torch.float64)) / (k + 1)
    excess = score - tau
    zero = torch.zeros_like(excess)
    if max_score is None:
        calibrated = torch.where(excess > tol, excess, zero)
        unresolved = torch.zeros_like(score, dtype=torch.bool)
    else:
        denom = max_score - tau
        unresolved = denom <= resolution(data_dtype or dtype)
        safe = torch.where(unresolved, 1.0, denom)
        calibrated = torch.where((excess > tol) & ~unresolved, (excess / safe).clamp(0.0, 1.0),
                                 zero)
    mean = null.mean(0)
    std = null.std(0) if k > 1 else torch.zeros_like(mean)
    diff = score - mean
    spread = std > 0
    effect = torch.where(spread, diff / torch.where(spread, std, 1.0),
                         torch.where(diff == 0, zero, torch.sign(diff) * torch.inf))
    below = (k - reached).to(dtype) + 0.5 * (reach & (null <= high)).sum(0).to(dtype)
    return {
        "raw": score, "calibrated": calibrated, "p_value": p_value, "threshold": tau,
        "null_mean": mean, "null_std": std, "effect_size": effect, "percentile": 100.0 * below / k,
        "unresolved": unresolved,
    }


def warn_unresolved(fields: dict[str, Tensor], max_score: float | None, what: str = "the score",
                    hint: str | None = None) -> None:
    """Warn (``RuntimeWarning``) when :func:`calibrate_tensor` found s_max − τ unresolvable."""
    if max_score is None or not bool(fields["unresolved"].any()):
        return
    tau = float(fields["threshold"].max())
    warnings.warn(
        f"{what}: the null threshold τ = {tau:.9g} reaches the maximum "
        f"{max_score:g} (to float resolution), so the measure cannot tell aligned from independent "
        "data here; the "
        "calibrated score is reported as 0" + (f". Hint: {hint}" if hint else ""),
        RuntimeWarning, stacklevel=3)


def warn_above_max(score: float, max_score: float | None, dtype: torch.dtype,
                   what: str = "the score") -> None:
    """Warn (``RuntimeWarning``) when a score given ``max_score`` exceeds it by more than the
    float resolution: the calibrated score is capped at 1 there, so ``max_score`` is not the
    measure's largest value."""
    if max_score is not None and score > max_score + resolution(dtype):
        warnings.warn(
            f"{what} = {score:.6g} is above max_score={max_score:g}, so its calibrated score is "
            "capped at 1: max_score must be the measure's largest possible value (or None for "
            "an unbounded measure)", RuntimeWarning, stacklevel=user_stacklevel())


def calibrate(
    score: Tensor | float, null: Tensor, alpha: float = 0.05, max_score: float | None = 1.0
) -> CalibrationResult:
    """Calibrate an observed ``score`` against its permutation ``null`` (K,).

    Parameters
    ----------
    score : Tensor or float
        The observed similarity s.
    null : Tensor of shape (K,)
        Null scores ``s_k = s(X, Y[π_k])``.
    alpha : float, default=0.05
        Level of the threshold: τ is the ⌈(1 − α)(K + 1)⌉-th smallest of the combined
        ``{s, s_1..s_K}`` (an order statistic, no interpolation).
    max_score : float or None, default=1.0
        s_max, the measure's largest possible value (a score above it warns); ``None`` for
        unbounded measures (calibrated = [s − τ]₊).

    Returns
    -------
    CalibrationResult
        Under the null, ``P(p_value ≤ α) ≤ α`` and ``P(calibrated > 0) ≤ α``.

    References
    ----------
    Permutation calibration of representational similarity (Algorithm 1), arXiv 2602.14486.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import calibrate
    >>> res = calibrate(0.9, torch.linspace(0.0, 0.5, 199))
    >>> round(float(res.p_value), 3), round(float(res.calibrated), 3)
    (0.005, 0.809)
    """
    try:
        null = torch.as_tensor(null)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError("null must hold numbers (a tensor, an array or a list), got "
                        f"{type(null).__name__}") from error
    if null.is_complex() or null.dtype == torch.bool:
        raise TypeError(f"null must hold real numbers, got dtype {null.dtype}")
    max_score = check_max_score(max_score)
    if max_score == AUTO:
        raise ValueError("max_score='auto' needs a measure to take the maximum from; calibrate "
                         "takes the measure's largest possible value as a number, or None")
    for name, value in (("score", score), ("null", null)):
        if isinstance(value, Tensor) and value.is_meta:
            raise ValueError(f"{name} is a meta tensor (device='meta'): meta tensors hold no "
                             "data to calibrate")
    if null.dim() > 1:
        raise ValueError(f"null must hold one value per permutation, shape (K,), got shape "
                         f"{tuple(null.shape)}")
    null = null.reshape(-1)
    score_t = as_scalar(score, "score", null if null.is_floating_point() else None).to(null.device)
    fields_ = calibrate_tensor(score_t, null, alpha, max_score)
    warn_above_max(float(score_t), max_score, torch.promote_types(score_t.dtype, null.dtype))
    warn_unresolved(fields_, max_score)
    fields_.pop("unresolved")
    return CalibrationResult(null=null, **fields_)


__all__ = ["CalibrationResult", "calibrate", "calibrate_tensor", "resolution", "threshold_index",
           "warn_above_max", "warn_unresolved"]
