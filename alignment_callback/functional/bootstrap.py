"""Approximate uncertainty of a calibrated score by row subsampling ("m-out-of-n" bootstrap).

**Why not the classical bootstrap.** Resampling rows *with* replacement duplicates samples.  A
duplicated row is its own nearest neighbor at distance 0, so kNN measures (mutual kNN, CKNNA,
...) see neighbor lists made of copies, grams gain identical rows, and — worse — the
permutation null stops being valid: copies of one sample are not exchangeable with the others
(the same reason grouped samples need block permutations, docs/calibration.md).  Scores and
thresholds computed on such resamples are biased.

**What this module does instead.** Each replicate draws ``fraction · n`` rows (default 80 %)
*without* replacement ("m-out-of-n" subsampling, Politis & Romano), and recomputes the whole
calibration (score, permutation null, τ, calibrated score) on that subsample.  No row is
duplicated, so neighbor lists and the null stay valid within a replicate.

**Rescaled to n.** Given the data, m rows drawn without replacement vary less than n fresh
samples would: a smooth statistic's subsample variance is about σ²(1/m − 1/n), which is
(n − m)/m times its sampling variance σ²/n (a quarter at m = 0.8 n, so raw replicate quantiles
give half the width). The interval therefore scales the replicates' deviations from their own
mean by c = √(m/(n − m)) (the delete-d jackknife's factor; Shao & Wu 1989) and centers them on
the full-data estimate:

    low, high = u + c · (q_lo − mean),  u + c · (q_hi − mean)

with u the estimate and q_lo, q_hi the replicates' (1 ∓ confidence)/2 quantiles, all taken
*before* the calibrated score's clipping at 0 (u = (s − τ)/(s_max − τ), negative when the raw
score s is below τ, at least −1, and 0 where s_max − τ is within float error of 0, as the
calibration reports it; s − τ for unbounded scores), and the ends then clipped to the calibrated
score's range [0, 1] (``max_score=None``: [0, ∞)). Centering on the replicates' own mean removes
the shift of measures whose value depends on n itself (mutual kNN at a fixed k). With
``groups``, m and n count groups. In simulations (n = 200, 80 % subsamples, a clear signal) the
95 % interval of linear CKA had the width of the true 95 % sampling range (1.01–1.09×) and
covered the mean estimate 91–95 % of the time (with ``groups``: 98 %, 0.95×); that of mutual
kNN, a count that is not smooth in the rows, was 1.15–1.20× as wide and covered 96–100 %. The
unscaled percentile interval had half the width and covered 60–66 %.

**Weak alignment.**  Forming the interval before the clipping matters where the calibrated
score is often 0.  Clipped replicates pile up at 0, and an interval formed from them was
exactly [0, 0] in 26–39 % of the data sets of a weakly aligned pair (two thirds of linear
CKA's estimates at 0), covering the mean estimate in 57–70 %.  Formed from the unclipped
values, 2 % of the intervals were [0, 0] and 97 % covered the mean estimate (mutual kNN, more
than half the estimates at 0: 0 % and 99 %; linear CKA's max over 2×2 layer pairs, half at
0: 1 % and 97 %; with 50 groups of 4 rows: 0 % and 95 %; all at n = 200, d = 10, K = 200,
B = 40).  For independent data every interval started at 0, and many were exactly [0, 0]
(12–20 % at n = 200, d = 10; a quarter to a third at n = 100–200 with d = 4–8).  An interval
[0, h] says that the data do not tell the alignment apart from none, and that it is at most h.

**Caveats (why it is "approximate").** Replicates are calibrated at m rather than n rows (τ
depends on n through the width confounder), and the scaling assumes a statistic that is smooth
in the rows.  A stability check, not an exact confidence interval.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._validation import (
    AUTO,
    MAX_SEED,
    check_alpha,
    check_seed,
    is_integer,
    user_stacklevel,
)
from alignment_callback.functional.calibration import resolution
from alignment_callback.functional.permutation import GroupPermuter
from alignment_callback.functional.pipeline import (
    calibrated_alignment,
    calibrated_layer_alignment,
    side_features,
)
from alignment_callback.functional.registry import (
    MeasureSpec,
    check_samples,
    check_shadowed_options,
    default_value,
    get_measure,
    measure_argument,
)


class BootstrapInterval(NamedTuple):
    """Interval of the calibrated score from subsamples, rescaled to n (module docstring).

    Attributes
    ----------
    low, high : float
        ``estimate + c · (q − mean(replicates))`` for the ``(1 − confidence)/2``
        and ``(1 + confidence)/2`` quantiles q of the replicates, c = √(m/(n − m)) with m
        of the n rows kept (with ``groups``: c = √(g/(G − g)), g of the G groups kept,
        not ``subsample_size``), with the estimate and the replicates taken before their
        clipping at 0 (``unclipped_*``), and the ends clipped to the calibrated score's
        range (``low <= high``).
    estimate : float
        The calibrated score on all n rows.
    replicates : Tensor
        (num_bootstrap,) calibrated scores, one per subsample.
    raw_replicates : Tensor
        (num_bootstrap,) raw scores (aggregates for layer inputs).
    subsample_size : int
        The rows per replicate m (with ``groups`` of unequal sizes, which
        make it vary, the smallest over the replicates).
    unclipped_estimate : float
        The estimate before clipping at 0: ``(s − τ)/(s_max − τ)``,
        negative when the raw score s is below τ, bounded below by −1, and 0 where
        s_max − τ is within float error of 0 (unbounded scores: ``s − τ``, not bounded
        below); equal to ``estimate`` when that is above 0.
    unclipped_replicates : Tensor
        (num_bootstrap,) the replicates before clipping at 0; the
        interval is formed from these and ``unclipped_estimate``.
    """

    low: float
    high: float
    estimate: float
    replicates: Tensor
    raw_replicates: Tensor
    subsample_size: int
    unclipped_estimate: float
    unclipped_replicates: Tensor


def _unresolvable(tau: float, top: float | None, dtype: torch.dtype) -> bool:
    """s_max − τ within float error of 0 (the calibration's rule, :func:`resolution`): the
    measure cannot tell aligned from independent data there, and the calibrated score is 0."""
    return top is not None and top - tau <= resolution(dtype)


def _unclipped(calibrated: float, raw: float, tau: float, top: float | None,
               dtype: torch.dtype) -> float:
    """The calibrated score before its clipping at 0: the calibrated score where it is above 0,
    else ``(s − τ)/(s_max − τ)`` in [−1, 0] (``min(s − τ, 0)`` unbounded), and 0 where
    s_max − τ is within float error of 0 (there the calibration reports 0: the measure cannot
    tell aligned from independent data).  The bound −1 keeps a τ just below s_max from making one
    replicate's value, and so the replicates' mean, arbitrarily large."""
    if calibrated > 0.0:
        return calibrated
    if top is None:
        return min(raw - tau, 0.0)
    if _unresolvable(tau, top, dtype):
        return 0.0
    return min(max((raw - tau) / (top - tau), -1.0), 0.0)


def _more_rows_advice(measure: Any) -> str:
    """What lets a replicate's null stay below s_max: more rows per replicate, or a smaller k
    for the kNN measures."""
    if any(name == "k" for name, _ in measure.params):
        return "use more rows, a smaller k or a larger fraction"
    return "use a larger fraction"


def _rows(x: Any, label: str) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    values = list(x.values()) if isinstance(x, Mapping) else list(x)
    if not values:
        raise ValueError(f"{label} layers are empty")
    return int(values[0].shape[0])


def _take(x: Any, idx: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x[idx.to(x.device)]
    if isinstance(x, Mapping):
        return {k: v[idx.to(v.device)] for k, v in x.items()}
    return [v[idx.to(v.device)] for v in x]


def enough_replicates(confidence: float) -> int:
    """The fewest replicates whose ``(1 ∓ confidence)/2`` quantiles are not read off the most
    extreme replicate alone: B with ``B · (1 − confidence)/2 >= 1`` (40 at 95 %)."""
    return max(2, math.ceil(2.0 / (1.0 - confidence) - 1e-9))


def few_replicates(num_bootstrap: int, confidence: float) -> str:
    """The warning for a B below :func:`enough_replicates` (the interval's ends are the
    interpolated extremes of a handful of replicates)."""
    need = enough_replicates(confidence)
    tail = 100.0 * (1.0 - confidence) / 2.0
    return (f"num_bootstrap={num_bootstrap} is too few for confidence={confidence:g}: the "
            f"interval's ends, the {tail:g}% and {100.0 - tail:g}% quantiles of the replicates, "
            "are interpolated between the most extreme replicates, so the interval is too "
            f"narrow and changes with the seed; use num_bootstrap >= {need}")


def _pipeline_names(layered: bool) -> set[str]:
    """Keyword names the calibration function takes itself (the rest of ``kw`` is the
    measure's parameters)."""
    fn = calibrated_layer_alignment if layered else calibrated_alignment
    return {name for name, p in inspect.signature(fn).parameters.items()
            if p.kind is not inspect.Parameter.VAR_KEYWORD}


@torch.no_grad()
@no_autocast()
def bootstrap_interval(
    x: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    y: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    measure: MeasureSpec = default_value("mutual_knn"),
    num_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    num_permutations: int = 200,
    alpha: float = 0.05,
    fraction: float = 0.8,
    groups: Sequence[Any] | Tensor | None = None,
    **kw: Any,
) -> BootstrapInterval:
    """Approximate interval of the calibrated score by m-out-of-n subsampling, rescaled to n.

    Each of ``num_bootstrap`` replicates keeps ``m = round(fraction · n)`` rows drawn *without*
    replacement (duplicated rows would break kNN neighbor uniqueness and row exchangeability;
    see the module docstring), and recomputes the calibrated score there with
    :func:`calibrated_alignment` (tensors) or :func:`calibrated_layer_alignment` (layer
    sequences / mappings; pass ``aggregate=`` in ``kw``).  The estimate uses permutation seed
    ``seed``, replicate b (0-based) seed ``seed + 1 + b``.  The subsample indices come from a
    dedicated generator seeded with ``seed``: the result is deterministic and the global RNG is
    untouched.

    Parameters
    ----------
    x, y : Tensor (n, d), or layer lists / mappings of them
        Paired features, rows paired across ``x`` and ``y``.
    measure : str, Measure or callable, default="mutual_knn"
        The measure (``metric=`` is its deprecated old name).
    num_bootstrap : int, default=200
        Replicates B, at least 2 (one replicate has no spread).  Cost: B full calibrations.
        Fewer than ``2 / (1 − confidence)`` (40 at 95 %) warn: the interval's ends are then
        interpolated between the most extreme replicates.
    confidence : float, default=0.95
        Interval level in (0, 1).
    seed : int, default=0
        Seed of the subsample generator and base of the permutation seeds.
    num_permutations : int, default=200
        Permutations per replicate (the paper's minimum).
    alpha : float, default=0.05
        Calibration level.
    fraction : float, default=0.8
        m/n in (0, 1).  ``m = round(fraction · n)`` must be below n (otherwise every replicate
        would be the whole data) and at least the measure's minimum number of samples (2, or
        more: ``k + 1`` for the kNN measures, 4 for ``unbiased_cka``, ...).
    groups : sequence of labels or Tensor, default=None
        Group labels, one per row.  Whole groups are subsampled: each replicate keeps
        ``round(fraction · G)`` of the G groups (fewer than G), and its permutations are block
        permutations, which exchange groups of equal size only.  Every replicate's groups are
        drawn before anything is computed, and an error is raised when one of them keeps no two
        groups of the same size (its groups would allow no block permutation) or fewer rows
        than the measure's minimum.  With groups of unequal sizes the number of rows varies
        between replicates.
    **kw
        Measure keywords (``k``, ``sigma``, ...), the calibration's ``null`` / ``max_score``
        and, for layer inputs, ``aggregate``.

    Returns
    -------
    BootstrapInterval
        ``(low, high, estimate, replicates, raw_replicates, subsample_size,
        unclipped_estimate, unclipped_replicates)``.  Approximate: see the module docstring.

    Raises
    ------
    ValueError
        If ``num_bootstrap``, ``confidence`` or ``fraction`` is out of range; if x and y have
        different numbers of rows; if ``groups`` is not one label per row or allows no block
        permutation; if n is below the measure's minimum; if ``fraction`` makes the subsample
        the whole data (``m >= n``, or with ``groups`` every group kept) or smaller than the
        measure's minimum (``fraction`` is never silently raised to reach it); or if, with
        ``groups``, a replicate keeps no two groups of the same size.  All of these are
        raised before anything is computed.  Also raised, when it is computed, for a
        replicate that cannot be calibrated although the full data can: its null threshold τ
        reaches s_max within float error (kNN measures whose k is a large part of the m rows:
        mutual and cycle kNN at m = k + 1, where every row's neighbors are all the others,
        cycle kNN also well above), so its calibrated score would be 0 whatever the data, and
        counting it as 0 would bias the interval.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional.bootstrap import bootstrap_interval
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 6, generator=g)
    >>> bi = bootstrap_interval(x, x + torch.randn(40, 6, generator=g), "linear_cka",
    ...                         num_bootstrap=40, num_permutations=19)
    >>> bi.subsample_size, bi.low <= bi.high
    (32, True)
    >>> bootstrap_interval(x[:10], x[:10], "linear_cka", fraction=0.96)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fraction=0.96 keeps round(0.96 · 10) = 10 of the n=10 rows: every replicate ...
    """
    measure = measure_argument(measure, kw)
    check_shadowed_options(measure, "bootstrap_interval", alpha=alpha)
    if not is_integer(num_bootstrap) or num_bootstrap < 2:
        raise ValueError(f"num_bootstrap must be an integer >= 2 (one replicate gives an interval "
                         f"of width 0), got {num_bootstrap!r}")
    confidence = check_alpha(confidence, "confidence")
    fraction = check_alpha(fraction, "fraction")
    n = _rows(x, "x")
    if _rows(y, "y") != n:
        raise ValueError(
            f"x and y must have the same number of samples (rows): got {n} and {_rows(y, 'y')}"
        )
    layered = not isinstance(x, Tensor)
    # Resolve the measure now (its keywords are checked) to know its minimum sample count.
    names = _pipeline_names(layered)
    resolved = get_measure(measure, **{k: v for k, v in kw.items() if k not in names})
    check_samples(resolved, n)
    need = max(2, resolved.min_samples)
    label = resolved.name + "".join(f", {k}={v}" for k, v in resolved.params)
    minimum = f"{label} needs at least {need} samples"

    smax = kw.get("max_score", AUTO)
    top = resolved.max_score if smax == AUTO else smax  # s_max, None when unbounded

    def run(xs: Any, ys: Any, s: int, g: Any) -> tuple[float, float, float, float]:
        """calibrated, raw and unclipped score, and τ."""
        fn = calibrated_layer_alignment if layered else calibrated_alignment
        res = fn(xs, ys, measure, num_permutations=num_permutations, alpha=alpha, seed=s,
                 groups=g, **kw)
        cal, raw, tau = float(res.calibrated), float(res.raw), float(res.threshold)
        return cal, raw, _unclipped(cal, raw, tau, top, dtype), tau

    seed = check_seed(seed)
    if seed + int(num_bootstrap) > MAX_SEED:
        raise ValueError(f"seed must be at most 2**63 - 1 - num_bootstrap = "
                         f"{MAX_SEED - int(num_bootstrap)}: replicate b uses seed + 1 + b, "
                         f"got seed={seed}")
    upper = math.inf if top is None else 1.0  # the calibrated score's top
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    if groups is not None:
        labels = np.asarray(groups.cpu() if isinstance(groups, Tensor) else groups)
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(
                f"groups must have one label per sample: expected {n}, got shape {labels.shape}"
            )
        GroupPermuter(labels, n)  # the full data's groups must allow a block permutation
        _, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(-1)
        inverse_t = torch.as_tensor(inverse)
        sizes = np.bincount(inverse)
        num_groups = int(sizes.size)
        keep = round(float(fraction) * num_groups)
        how = (f"fraction={fraction} with groups keeps round({fraction} · {num_groups}) = {keep} "
               f"of the {num_groups} groups")
        if keep >= num_groups:
            raise ValueError(f"{how}: every replicate would be the whole data; use a smaller "
                             "fraction")
        # Draw every replicate's groups now, so that a subsample which cannot be calibrated is
        # reported before anything is computed.
        chosen = [torch.randperm(num_groups, generator=gen)[:keep]
                  for _ in range(int(num_bootstrap))]
        kept_sizes = [sizes[c.numpy()] for c in chosen]
        frozen = [b for b, ks in enumerate(kept_sizes) if np.unique(ks).size == ks.size]
        if frozen:
            raise ValueError(
                f"{how}, and {len(frozen)} of the {int(num_bootstrap)} replicates (the first: "
                f"replicate {frozen[0]}, group sizes {sorted(kept_sizes[frozen[0]].tolist())}) "
                "keep no two groups of the same size, so their groups allow no block "
                "permutation; use a larger fraction, or groups with more groups of each size"
            )
        rows = [int(ks.sum()) for ks in kept_sizes]
        m = min(rows)
        scale = math.sqrt(keep / (num_groups - keep))
        if m < need:
            raise ValueError(f"{how}, and a replicate keeps only {m} rows, but {minimum}; use a "
                             "larger fraction")
    else:
        m = round(float(fraction) * n)
        how = f"fraction={fraction} keeps round({fraction} · {n}) = {m} of the n={n} rows"
        if m >= n:
            raise ValueError(f"{how}: every replicate would be the whole data; use a smaller "
                             "fraction")
        if m < need:
            raise ValueError(f"{how}, but {minimum}; use a larger fraction")
        scale = math.sqrt(m / (n - m))

    if int(num_bootstrap) < enough_replicates(confidence):  # a setting: point at the caller
        warnings.warn(few_replicates(int(num_bootstrap), confidence), UserWarning,
                      stacklevel=user_stacklevel())
    # the float error of s_max − τ (calibration.resolution) is judged at the dtype the
    # calibration computes in: both sides' features as ``side_features`` converts them
    dtype = torch.promote_types(side_features(x, "x")[1][0].dtype,
                                side_features(y, "y")[1][0].dtype)
    estimate, _, unclipped, tau = run(x, y, seed, groups)
    estimate_resolved = not _unresolvable(tau, top, dtype)

    cal, raw, below = [], [], []
    for b in range(int(num_bootstrap)):
        if groups is not None:
            mask = torch.isin(inverse_t, chosen[b])
            idx = torch.nonzero(mask).reshape(-1)
            g = labels[idx.numpy()]
        else:
            idx = torch.sort(torch.randperm(n, generator=gen)[:m]).values
            g = None
        c, r, u, tau_b = run(_take(x, idx), _take(y, idx), seed + 1 + b, g)
        if estimate_resolved and _unresolvable(tau_b, top, dtype):
            # a replicate the calibration cannot tell from independent data would enter the
            # interval as 0 next to resolved values: refused rather than a biased interval
            raise ValueError(
                f"{how}, but replicate {b} of {int(num_bootstrap)} cannot be calibrated on its "
                f"{idx.numel()} rows: its null threshold τ = {tau_b:.9g} reaches the maximum "
                f"{top:g} of {label} (on all {n} rows τ = {tau:.9g}), so the measure cannot tell "
                "aligned from independent data on so few rows (kNN measures where k is a large "
                "part of them: mutual and cycle kNN at k + 1 rows, where every row's neighbors "
                "are all the others, cycle kNN also well above) and the interval would count "
                f"it as 0; {_more_rows_advice(resolved)}")
        cal.append(c)
        raw.append(r)
        below.append(u)
    reps = torch.tensor(below, dtype=torch.float64)
    if not bool(torch.isfinite(reps).all()):
        raise ValueError("bootstrap replicates are not finite")
    lo_q, hi_q = (1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0
    center = float(reps.mean())
    low = unclipped + scale * (float(torch.quantile(reps, lo_q)) - center)
    high = unclipped + scale * (float(torch.quantile(reps, hi_q)) - center)
    low, high = min(max(low, 0.0), upper), min(max(high, 0.0), upper)
    return BootstrapInterval(low, max(low, high), estimate, torch.tensor(cal, dtype=torch.float64),
                             torch.tensor(raw, dtype=torch.float64), m, unclipped, reps)


__all__ = ["BootstrapInterval", "bootstrap_interval", "enough_replicates", "few_replicates"]
