"""Permutation calibration (the calibration paper's Algorithm 1, METHOD.md section 4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from alignment_callback.functional.permutation import null_from_states
from alignment_callback.functional.registry import MetricSpec, get_measure, prepare_pair

AUTO = "auto"


@dataclass(frozen=True)
class CalibrationResult:
    """A calibrated score. Every field is a 0-dim tensor except ``null`` (K,).

    Attributes:
        raw: the observed score s.
        calibrated: ``max((s − τ)/(s_max − τ), 0)`` clamped to ≤ 1 (``[s − τ]₊`` if unbounded).
        p_value: ``(1 + #{k: s_k ≥ s}) / (K + 1)``; smallest attainable ``1/(K + 1)``.
        threshold: τ, the ⌈(1 − α)(K + 1)⌉-th smallest of ``{s, s_1, …, s_K}``.
        null_mean, null_std: mean and (unbiased, K − 1) standard deviation of the null.
        effect_size: ``(s − null_mean) / null_std`` (0 if both differences are 0, ±inf if only
            the std is 0).
        percentile: percent of null values below s, ties counted half (mid-rank).
        null: the K null scores.
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

    SCALARS = ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std",
               "effect_size", "percentile")

    def as_dict(self) -> dict[str, float]:
        """The scalar fields as Python floats."""
        return {name: float(getattr(self, name)) for name in self.SCALARS}


def threshold_index(num_permutations: int, alpha: float) -> int:
    """0-based index of τ in the sorted ``{s, s_1..s_K}``: ⌈(1 − α)(K + 1)⌉ − 1, clamped."""
    idx = int(math.ceil((1.0 - alpha) * (num_permutations + 1))) - 1
    return max(0, min(idx, num_permutations))


def calibrate_tensor(
    score: Tensor, null: Tensor, alpha: float = 0.05, max_score: float | None = 1.0
) -> dict[str, Tensor]:
    """Vectorized calibration: ``score`` of shape S, ``null`` of shape (K, *S).

    Returns the scalar fields of :class:`CalibrationResult`, each of shape S.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if max_score is not None and not math.isfinite(max_score):
        raise ValueError(f"max_score must be finite or None, got {max_score}")
    k = null.shape[0]
    if k < 1:
        raise ValueError("the null needs at least one permutation")
    if null.shape[1:] != score.shape:
        raise ValueError(f"null shape {tuple(null.shape)} does not match score shape {tuple(score.shape)}")
    if not bool(torch.isfinite(null).all()) or not bool(torch.isfinite(score).all()):
        raise ValueError("score or null contains NaN/Inf values; cannot calibrate")
    dtype = torch.promote_types(score.dtype, null.dtype)
    score, null = score.to(dtype), null.to(dtype)
    combined = torch.cat([score.unsqueeze(0), null], 0)
    tau = torch.sort(combined, dim=0).values[threshold_index(k, alpha)]
    p_value = (1.0 + (null >= score).sum(0).to(dtype)) / (k + 1)
    excess = score - tau
    if max_score is None:
        calibrated = excess.clamp_min(0.0)
    else:
        denom = max_score - tau
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        calibrated = torch.where(excess > 0, (excess / safe).clamp(0.0, 1.0), torch.zeros_like(excess))
        calibrated = torch.where((excess > 0) & (denom <= 0), torch.ones_like(excess), calibrated)
    mean = null.mean(0)
    std = null.std(0) if k > 1 else torch.zeros_like(mean)
    diff = score - mean
    effect = torch.where(
        std > 0, diff / torch.where(std > 0, std, torch.ones_like(std)),
        torch.where(diff == 0, torch.zeros_like(diff), torch.sign(diff) * torch.inf),
    )
    below = (null < score).sum(0).to(dtype) + 0.5 * (null == score).sum(0).to(dtype)
    return {
        "raw": score, "calibrated": calibrated, "p_value": p_value, "threshold": tau,
        "null_mean": mean, "null_std": std, "effect_size": effect, "percentile": 100.0 * below / k,
    }


def calibrate(
    score: Tensor | float, null: Tensor, alpha: float = 0.05, max_score: float | None = 1.0
) -> CalibrationResult:
    """Calibrate an observed ``score`` against its permutation ``null`` (K,).

    Args:
        score: the observed similarity s.
        null: null scores ``s_k = s(X, Y[π_k])``.
        alpha: level of the threshold (default 0.05): τ is the ⌈(1 − α)(K + 1)⌉-th smallest
            of the combined ``{s, s_1..s_K}`` (an order statistic, no interpolation).
        max_score: s_max (default 1.0); ``None`` for unbounded measures (calibrated = [s − τ]₊).

    Under the null, ``P(p_value ≤ α) ≤ α`` and ``P(calibrated > 0) ≤ α``.
    """
    null = torch.as_tensor(null).reshape(-1)
    score_t = torch.as_tensor(score, dtype=null.dtype if null.is_floating_point() else None,
                              device=null.device).reshape(())
    fields_ = calibrate_tensor(score_t, null, alpha, max_score)
    return CalibrationResult(null=null, **fields_)


@torch.no_grad()
def calibrated_alignment(
    x: Tensor,
    y: Tensor,
    metric: MetricSpec = "mutual_knn",
    num_permutations: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence[Any] | Tensor | None = None,
    max_score: float | None | str = AUTO,
    **metric_kwargs: Any,
) -> CalibrationResult:
    """Permutation-calibrated alignment of ``x`` (n, p) and ``y`` (n, q), rows paired.

    The observed score and K null scores ``metric(x, y[π_k])`` (permutations from
    :func:`permutations` with ``seed``, or block permutations with ``groups``) are computed on
    the fast path, then calibrated with :func:`calibrate`. ``max_score="auto"`` uses the measure's s_max
    (1.0 for every built-in).  Default metric mutual kNN (k = 10), K = 500, α = 0.05.
    """
    measure = get_measure(metric, **metric_kwargs)
    sx, sy = prepare_pair(measure, x, y)
    n = x.shape[0]
    observed = measure.score(sx, sy, torch.arange(n, device=x.device)[None])[0]
    null = null_from_states(measure, sx, sy, n, num_permutations, seed, x.device, groups)
    smax = measure.max_score if max_score == AUTO else max_score
    return calibrate(observed, null, alpha, smax)


__all__ = ["CalibrationResult", "calibrate", "calibrate_tensor", "calibrated_alignment", "threshold_index"]
