"""Reduce raw activations to (n, d) feature matrices (docs/measures.md, preprocessing).

Preprocessing is an explicit step, separate from the measures: the measures take the rows they are
given.  The PRH convention is ``pool -> optional outlier clamp -> L2-normalize each row``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Literal, Union

import torch
from torch import Tensor

from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._scaling import rescale_exactly
from alignment_callback.functional._validation import as_float, as_number

PoolMode = Literal["flatten", "mean", "cls", "first", "last", "none"]
Pool = Union[PoolMode, Callable[[Tensor], Tensor]]

POOL_MODES: tuple[str, ...] = ("flatten", "mean", "cls", "first", "last", "none")


def check_pool(pool: Any, name: str = "pool") -> Pool:
    """``pool`` is one of :data:`POOL_MODES` or a callable; a configuration error otherwise."""
    if not callable(pool) and pool not in POOL_MODES:
        raise ValueError(f"{name}: unknown pool {pool!r}; expected one of {POOL_MODES} or a "
                         "callable (n, ...) -> (n, d)")
    return pool


def _checked_mask(x: Tensor, mask: Tensor, pool: str) -> Tensor:
    """``mask`` as a tensor on ``x``'s device, after checking that it is (n, T) for ``x`` of
    shape (n, T, ...) and that every row has an unmasked token."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"mask must have shape (n, T) = {tuple(x.shape[:2])}, the first two dimensions of "
            f"the activations of shape {tuple(x.shape)}; got mask of shape {tuple(mask.shape)}"
        )
    mask = mask.to(x.device)
    empty = torch.nonzero(~(mask != 0).any(1)).reshape(-1)
    if empty.numel():
        rows = empty[:5].tolist()
        more = f" and {empty.numel() - 5} more" if empty.numel() > 5 else ""
        raise ValueError(
            f"mask row(s) {rows}{more} mask out every token, so pool={pool!r} has no token to "
            "use for them"
        )
    return mask


def pool_features(x: Tensor, pool: Pool = "flatten", mask: Tensor | None = None) -> Tensor:
    """Reduce an activation of shape (n, ...) to (n, d).

    Parameters
    ----------
    x : Tensor of shape (n, ...)
        Activations, first dimension = samples.
    pool : str or callable, default="flatten"
        How to reduce the non-sample dimensions:

        * ``"flatten"``: reshape to (n, prod(rest)).
        * ``"mean"``: for (n, T, d) the mean over dimension 1 (the tokens); for four or
          more dimensions (n, C, ...) the mean over dimensions 2 and up (every spatial
          position of a conv map), giving (n, C): channels-last is *not* assumed.  Summed and
          returned in float32 at least (float64 stays float64): a float16 / bfloat16 mean is
          not rounded back to its dtype.
        * ``"cls"`` / ``"first"``: element 0 along dimension 1 (the CLS token), or the first
          unmasked token if ``mask`` (the CLS token of a left-padded row).
        * ``"last"``: element -1 along dimension 1 (or the last unmasked token if ``mask``).
        * ``"none"``: no pooling; ``x`` must already be 2-D.
        * a callable ``f(x) -> (n, d)``.
    mask : Tensor of shape (n, T), default=None
        Attention mask (nonzero = a real token) for ``x`` of shape (n, T, ...): ``"mean"``
        then averages only the unmasked tokens of (n, T, d) activations, ``"cls"`` /
        ``"first"`` take the first unmasked token and ``"last"`` the last one; the masked
        positions are never read, so padding filled with ``-inf`` or NaN does not reach the
        result.  Other pools (a callable is not given the
        mask), and 1-D / 2-D activations, ignore it.

    Returns
    -------
    Tensor
        A 2-D tensor (n, d).  1-D input (n,) becomes (n, 1).

    Raises
    ------
    ValueError
        For an unknown ``pool``; a callable's output that is not (n, d); ``"none"`` with
        activations that are not 2-D; a ``mask`` with ``"mean"`` on activations that are not
        (n, T, d); and, with ``"mean"`` or ``"last"``, a ``mask`` whose shape is not the
        activations' first two dimensions (n, T) or with a row that masks out every token.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional.preprocessing import pool_features
    >>> x = torch.arange(12.0).reshape(2, 3, 2)
    >>> pool_features(x, "last", mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    tensor([[ 2.,  3.],
            [10., 11.]])
    >>> pool_features(x, "last", mask=torch.ones(2, 2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: mask must have shape (n, T) = (2, 3), the first two dimensions ...
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if callable(pool):
        out = pool(x)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the pool callable must return a (n, d) tensor with n={x.shape[0]}, got {shape}"
            )
        return out
    check_pool(pool)
    if x.dim() == 0:
        raise ValueError("activations must have a sample dimension, got a 0-dim tensor")
    if x.dim() == 1:
        return x.unsqueeze(1)
    if x.dim() == 2 or pool == "none":
        if x.dim() != 2:
            raise ValueError(f"pool='none' needs 2-D activations, got shape {tuple(x.shape)}")
        return x
    if pool == "flatten":
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # also for 0 rows
    if pool == "mean":
        # in float32 at least, and kept there: a float16 sum over many tokens cannot overflow,
        # and a float16 / bfloat16 mean is not rounded back to its 11 / 8 significant bits
        acc = torch.promote_types(x.dtype, torch.float32)
        if mask is not None:
            if x.dim() != 3:
                raise ValueError("an attention mask needs (n, T, d) activations")
            # nonzero = a real token, whatever its value (2 for a global token, -1, 0.5);
            # masked positions are selected out, not multiplied by 0: padding a layer filled
            # with -inf or NaN (before a masked max) must not reach the sum
            keep = (_checked_mask(x, mask, pool) != 0).unsqueeze(-1)
            total = torch.where(keep, x.to(acc), torch.zeros((), dtype=acc, device=x.device))
            return total.sum(1) / keep.sum(1).to(acc).clamp_min(1.0)
        if x.dim() == 3:
            return x.mean(1, dtype=acc)
        return x.reshape(*x.shape[:2], math.prod(x.shape[2:])).mean(-1, dtype=acc)  # 0 rows too
    # "cls" / "first" / "last": one token per row
    first = pool in ("cls", "first")
    if mask is None:
        return x[:, 0 if first else -1].reshape(x.shape[0], math.prod(x.shape[2:]))
    real = (_checked_mask(x, mask, pool) != 0).long()
    # the first unmasked token ([CLS] under left padding too), or the last: the first position
    # where the running count reaches its total
    idx = real.argmax(1) if first else real.cumsum(1).argmax(1)
    return x[torch.arange(x.shape[0], device=x.device), idx].reshape(x.shape[0],
                                                                      math.prod(x.shape[2:]))


def check_clamp_quantile(quantile: Any, name: str = "clamp_quantile") -> float:
    """``quantile`` as a float in (0, 1] (a 0-dim tensor or array is taken by value; a NumPy
    float32 would round the clamp position in float32)."""
    if getattr(quantile, "ndim", None) == 0 and not isinstance(quantile, numbers.Real):
        quantile = as_number(quantile, name)
    if (isinstance(quantile, bool) or not isinstance(quantile, numbers.Real)
            or not 0.0 < quantile <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {quantile!r}")
    return float(quantile)


def clamp_outliers(x: Tensor, quantile: float) -> Tensor:
    """Clamp ``|x|`` at the ``quantile`` of ``|x|`` over the whole matrix (PRH uses 0.95); a
    quantile of 0 on nonzero ``x`` (mostly zero, sparse features) is refused: it would zero
    every value."""
    quantile = check_clamp_quantile(quantile)
    flat = x.abs().flatten()
    # torch.quantile has an input-size limit; kthvalue gives the same "lower" order statistic
    # without it.  Linear interpolation as torch.quantile/numpy default:
    pos = quantile * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    s = torch.sort(flat).values
    c = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    if not bool(c > 0) and bool(s[-1] > 0):
        zeros = float((s == 0).float().mean())
        raise ValueError(
            f"clamp_quantile={quantile}: that quantile of |x| is 0 ({zeros:.0%} of the values "
            "are zero: sparse features?), so clamping would set every value to 0; use a higher "
            "clamp_quantile, or no clamping")
    return x.clamp(-c, c)


@no_autocast()
def prepare_features(
    x: Tensor,
    pool: Pool = "flatten",
    clamp_quantile: float | None = None,
    normalize: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """Preprocess activations for the measures: pool, clamp outliers, L2-normalize rows.

    ``x`` of shape (n, ...) -> pool to (n, d) -> optionally clamp to ``[−c, c]``, c the
    ``clamp_quantile`` of ``|x|`` over the whole matrix (linear interpolation; PRH: 0.95) ->
    optionally ``x_i / ‖x_i‖₂`` for each row (docs/measures.md, preprocessing).

    Parameters
    ----------
    x : Tensor of shape (n, ...)
        Activations; any float dtype (computed in float32 or float64).
    pool : str or callable, default="flatten"
        See :func:`pool_features`.
    clamp_quantile : float or None, default=None
        ``None`` for no clamping, or a quantile in (0, 1].
    normalize : bool, default=True
        L2-normalize rows (the PRH convention).  A zero row raises.
    mask : Tensor of shape (n, T), default=None
        Attention mask used by ``"mean"`` and ``"last"`` pooling (see :func:`pool_features`);
        it must match the activations' first two dimensions and leave every row at least one
        token.

    Returns
    -------
    Tensor
        A float tensor of shape (n, d) on the input's device; when no step changes the values
        (a float32 / float64 2-D ``x``, ``normalize=False``, no clamping) it may be ``x``
        itself or a view of it, detached.

    Raises
    ------
    ValueError
        For the pooling errors of :func:`pool_features` (including a ``mask`` of the wrong
        shape or with an all-masked row), NaN/Inf activations, a ``clamp_quantile`` outside
        (0, 1], or, with ``normalize``, an all-zero row.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import prepare_features
    >>> prepare_features(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))  # rows x_i / ‖x_i‖
    tensor([[0.6000, 0.8000],
            [0.0000, 1.0000]])
    >>> prepare_features(torch.ones(2, 5, 3), pool="mean", normalize=False).shape
    torch.Size([2, 3])
    """
    x = as_float(x)  # detached; a tensor (a NumPy array is refused by name)
    x = pool_features(x, pool, mask=mask)
    x = as_float(x)
    if x.numel() == 0:
        raise ValueError(f"the activations hold no values (pooled to shape {tuple(x.shape)}): "
                         "they need samples (rows) and features")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"activations contain {bad} NaN/Inf value(s)")
    if clamp_quantile is not None:
        x = clamp_outliers(x, clamp_quantile)
    if normalize:
        x = rescale_exactly(x, per_row=True)  # exact: ‖x·c‖ would overflow at c = 1e20
        norms = x.norm(dim=1, keepdim=True)
        zero = (norms[:, 0] == 0).nonzero()[:, 0].tolist()
        if zero:
            rows = ", ".join(map(str, zero[:5])) + (", ..." if len(zero) > 5 else "")
            raise ValueError(f"{len(zero)} sample(s) have an all-zero feature vector (rows "
                             f"{rows}); cannot L2-normalize")
        x = x / norms
    return x
