"""Approximate uncertainty of a calibrated score by row subsampling ("m-out-of-n" bootstrap).

**Why not the classical bootstrap.** Resampling rows *with* replacement duplicates samples.  A
duplicated row is its own nearest neighbor at distance 0, so kNN measures (mutual kNN, CKNNA,
...) see neighbor lists made of copies, grams gain identical rows, and — worse — the
permutation null stops being valid: copies of one sample are not exchangeable with the others
(the same reason grouped samples need block permutations, docs/calibration.md).  Scores and
thresholds computed on such resamples are biased.

**What this module does instead.** Each replicate draws ``fraction · n`` rows (default 80 %)
*without* replacement ("m-out-of-n" subsampling, Politis & Romano), recomputes the whole
calibration (score, permutation null, τ, calibrated score) on that subsample, and the interval is
the percentile interval of the replicates.  No row is duplicated, so neighbor lists and the null
stay valid within a replicate.

**Caveats (why it is "approximate").** A subsample has fewer rows, and raw scores and τ depend on
n (the width confounder grows with d/n), so replicates are calibrated at ``m`` rather than n rows;
the percentile interval of a subsample statistic is not rescaled to n (no √(m/n) correction), so
it is typically *wider* than the sampling variability at n and is meant as a rough stability
check, not an exact confidence interval.  The calibrated score is clipped at 0, so intervals of
weakly aligned pairs pile up at 0.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional.pipeline import calibrated_alignment, calibrated_layer_alignment
from alignment_callback.functional.registry import MeasureSpec, measure_argument


class BootstrapInterval(NamedTuple):
    """Percentile interval of the calibrated score over subsamples.

    Attributes:
        low, high: the ``(1 − confidence)/2`` and ``(1 + confidence)/2`` percentiles of the
            replicates (``low <= high``).
        estimate: the calibrated score on all n rows.
        replicates: (num_bootstrap,) calibrated scores, one per subsample.
        raw_replicates: (num_bootstrap,) raw scores (aggregates for layer inputs).
        subsample_size: m, the rows per replicate.
    """

    low: float
    high: float
    estimate: float
    replicates: Tensor
    raw_replicates: Tensor
    subsample_size: int


def _rows(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    values = list(x.values()) if isinstance(x, Mapping) else list(x)
    if not values:
        raise ValueError("no layers given")
    return int(values[0].shape[0])


def _take(x: Any, idx: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x[idx.to(x.device)]
    if isinstance(x, Mapping):
        return {k: v[idx.to(v.device)] for k, v in x.items()}
    return [v[idx.to(v.device)] for v in x]


@torch.no_grad()
def bootstrap_interval(
    x: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    y: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    measure: MeasureSpec = "mutual_knn",
    num_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    num_permutations: int = 200,
    alpha: float = 0.05,
    fraction: float = 0.8,
    groups: Sequence[Any] | Tensor | None = None,
    **kw: Any,
) -> BootstrapInterval:
    """Approximate percentile interval of the calibrated score by m-out-of-n subsampling.

    Each of ``num_bootstrap`` replicates keeps ``m = round(fraction · n)`` rows drawn *without*
    replacement (duplicated rows would break kNN neighbor uniqueness and row exchangeability;
    see the module docstring), and recomputes the calibrated score there with
    :func:`calibrated_alignment` (tensors) or :func:`calibrated_layer_alignment` (layer
    sequences / mappings; pass ``aggregate=`` in ``kw``).  The estimate uses permutation seed
    ``seed``, replicate b (0-based) seed ``seed + 1 + b``.  The subsample indices come from a
    dedicated generator seeded with ``seed``: the result is deterministic and the global RNG is
    untouched.

    Args:
        x, y: paired features (n, d) or layer lists / mappings of them.
        measure: the measure (default mutual kNN; ``metric=`` is its deprecated old name).
        num_bootstrap: replicates B (default 200).  Cost: B full calibrations.
        confidence: interval level in (0, 1) (default 0.95).
        seed: seed of the subsample generator and base of the permutation seeds.
        num_permutations: permutations per replicate (default 200, the paper's minimum).
        alpha: calibration level (default 0.05).
        fraction: m/n in (0, 1) (default 0.8).
        groups: optional group labels; whole groups are subsampled (``fraction`` of the
            groups) and the permutations of each replicate are block permutations.
        **kw: measure keywords (``k``, ``sigma``, ...) and, for layer inputs, ``aggregate``.

    Returns:
        :class:`BootstrapInterval` ``(low, high, estimate, replicates, raw_replicates,
        subsample_size)``.  Approximate: see the module docstring.
    """
    measure = measure_argument(measure, kw)
    if isinstance(num_bootstrap, bool) or int(num_bootstrap) != num_bootstrap or num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be a positive integer, got {num_bootstrap!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = _rows(x)
    if _rows(y) != n:
        raise ValueError(
            f"x and y must have the same number of samples (rows): got {n} and {_rows(y)}"
        )
    layered = not isinstance(x, Tensor)

    def run(xs: Any, ys: Any, s: int, g: Any) -> tuple[float, float]:
        fn = calibrated_layer_alignment if layered else calibrated_alignment
        res = fn(xs, ys, measure, num_permutations=num_permutations, alpha=alpha, seed=s,
                 groups=g, **kw)
        return float(res.calibrated), float(res.raw)

    estimate, _ = run(x, y, seed, groups)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    if groups is not None:
        labels = np.asarray(groups.cpu() if isinstance(groups, Tensor) else groups)
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(
                f"groups must have one label per sample: expected {n}, got shape {labels.shape}"
            )
        _, inverse = np.unique(labels, return_inverse=True)
        inverse_t = torch.as_tensor(inverse)
        num_groups = int(inverse.max()) + 1
        keep_groups = max(2, int(round(fraction * num_groups)))
    else:
        m = max(2, int(round(fraction * n)))
    cal, raw = [], []
    size = 0
    for b in range(int(num_bootstrap)):
        if groups is not None:
            chosen = torch.randperm(num_groups, generator=gen)[:keep_groups]
            mask = torch.isin(inverse_t, chosen)
            idx = torch.nonzero(mask).reshape(-1)
            g = labels[idx.numpy()]
        else:
            idx = torch.sort(torch.randperm(n, generator=gen)[:m]).values
            g = None
        size = int(idx.numel())
        c, r = run(_take(x, idx), _take(y, idx), seed + 1 + b, g)
        cal.append(c)
        raw.append(r)
    reps = torch.tensor(cal, dtype=torch.float64)
    lo_q, hi_q = (1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0
    low = float(torch.quantile(reps, lo_q))
    high = float(torch.quantile(reps, hi_q))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("bootstrap replicates are not finite")
    return BootstrapInterval(low, max(low, high), estimate, reps,
                             torch.tensor(raw, dtype=torch.float64), size)


__all__ = ["BootstrapInterval", "bootstrap_interval"]
