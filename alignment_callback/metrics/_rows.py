"""Shared row handling for the metric objects: option splitting, pooling at update time,
preprocessing at compute time, sample-index ordering and the ``max_samples`` bound."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

from alignment_callback.functional._validation import as_float, user_stacklevel
from alignment_callback.functional.preprocessing import (
    check_clamp_quantile,
    check_pool,
    pool_features,
    prepare_features,
)

TORCHMETRICS_KWARGS = frozenset({
    "compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn",
    "distributed_available_fn", "sync_on_compute", "compute_with_cache",
})

Preprocess = Union[bool, Mapping[str, Any], Callable[[Tensor], Tensor]]


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``**kwargs`` into (torchmetrics options, measure keyword arguments)."""
    tm = {k: v for k, v in kwargs.items() if k in TORCHMETRICS_KWARGS}
    return tm, {k: v for k, v in kwargs.items() if k not in TORCHMETRICS_KWARGS}


class RowPreprocessor:
    """``preprocess`` option of the metrics, split into a per-row part (pooling, at ``update``)
    and a whole-matrix part (outlier clamp + L2 normalization, at ``compute``).

    ``True`` (default): PRH convention, flatten + L2-normalize rows. ``False``: rows are used as
    given (must be 2-D). A mapping: keyword arguments of
    :func:`~alignment_callback.functional.prepare_features` (``pool``, ``clamp_quantile``,
    ``normalize``). A callable: applied to the concatenated (flattened) rows at compute time.
    """

    def __init__(self, preprocess: Preprocess = True) -> None:
        self.fn: Callable[[Tensor], Tensor] | None = None
        self.pool: Any = "flatten"
        self.options: dict[str, Any] | None = {"clamp_quantile": None, "normalize": True}
        if preprocess is False:
            self.options, self.pool = None, "none"
        elif callable(preprocess):
            self.fn = preprocess
        elif isinstance(preprocess, Mapping):
            opts = dict(preprocess)
            self.pool = opts.pop("pool", "flatten")
            unknown = set(opts) - {"clamp_quantile", "normalize"}
            if unknown:
                raise ValueError(f"unknown preprocess option(s) {sorted(unknown)}; expected pool, "
                                 "clamp_quantile, normalize")
            check_pool(self.pool, "preprocess")
            if opts.get("clamp_quantile") is not None:
                opts["clamp_quantile"] = check_clamp_quantile(opts["clamp_quantile"],
                                                              "preprocess: clamp_quantile")
            normalize = opts.get("normalize", True)
            if isinstance(normalize, (str, bytes)):  # "false" would be true
                raise TypeError(f"preprocess: normalize must be True or False, got {normalize!r}")
            opts["normalize"] = bool(normalize)
            self.options.update(opts)
        elif preprocess is not True:
            raise TypeError("preprocess must be True, False, a mapping of prepare_features options or a callable")

    def rows(self, x: Tensor) -> Tensor:
        """Per-batch part: detach, pool to (n, d), float: float32, or float64 for float64
        features and for integers above 2**24, which float32 cannot hold exactly (complex
        input is refused)."""
        if x.is_complex():  # .float() would drop the imaginary part with a warning only
            raise TypeError(f"features must hold real numbers, got dtype {x.dtype}")
        x = x.detach()
        x = pool_features(x, self.pool)
        return as_float(x, "features")

    def matrix(self, x: Tensor) -> Tensor:
        """Whole-matrix part, applied to all accumulated rows."""
        if self.fn is not None:
            return self.fn(x)
        if self.options is None:
            return x
        return prepare_features(x, pool="none", **self.options)


#: A repeated sample id's rows may differ by this much (relative to the row's norm): the same
#: input run in another batch (a DistributedSampler's padding on another process) can round
#: differently, in bfloat16 too, while rows of two different samples differ wholly.
REPEAT_RTOL = 1e-2


def order_rows(index: Tensor | None, *sides: Tensor) -> tuple[Tensor | None, list[Tensor]]:
    """Sort rows by sample index and drop repeated indices (DistributedSampler padding).

    A repeated id should repeat its rows (to ``REPEAT_RTOL``).  Ids that restart in every
    batch (``index=torch.arange(len(batch))``) would keep the first batch only: many
    repeats with other rows (a quarter of the ids or more, at least 2) are an error; a few
    (a DistributedSampler's padding, fewer than the processes, through a stochastic forward:
    dropout, augmentation) a warning, the first rows of each id kept."""
    if index is None or index.numel() == 0:
        return None, list(sides)
    idx, order = torch.sort(index.long(), stable=True)
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[1:] = idx[1:] != idx[:-1]
    sel = order[keep]
    if not bool(keep.all()):
        # each dropped row against the kept row of its id (the first of its run in sorted order)
        first = torch.cummax(torch.where(keep, torch.arange(len(idx), device=idx.device), 0),
                             0).values
        dropped, kept = order[~keep], order[first[~keep]]
        differ = torch.zeros(len(dropped), dtype=torch.bool)
        for s in sides:
            a, b = (s[r.to(s.device)].flatten(1).double() for r in (dropped, kept))
            off = (a - b).norm(dim=1) > REPEAT_RTOL * torch.maximum(a.norm(dim=1), b.norm(dim=1))
            differ |= off.cpu()
        if bool(differ.any()):
            ids = idx[~keep].cpu()[differ]
            sample, count = int(ids[0]), int(ids.unique().numel())
            what = (f"index: {count} sample id(s) (e.g. {sample}, {int((idx == sample).sum())} "
                    "times) were given again with other features")
            if count >= max(2, int(keep.sum()) // 4):
                raise ValueError(
                    f"{what}; index must hold each row's sample id in the whole probe set (e.g. "
                    "the batch's offset + torch.arange(len(batch))), not its position in the "
                    "batch. Repeated ids are dropped as repeats of the same sample (a "
                    "DistributedSampler's padding)")
            warnings.warn(
                f"{what}: the first rows of each are kept. Expected from a DistributedSampler's "
                "padding when the forward is stochastic (dropout, augmentation); otherwise index "
                "should hold sample ids in the whole probe set, not positions in a batch",
                RuntimeWarning, stacklevel=user_stacklevel())
    return idx[keep], [s[sel.to(s.device)] for s in sides]


def check_capacity(current: int, incoming: int, max_samples: int | None) -> None:
    """Raise if accumulating ``incoming`` more rows would exceed ``max_samples``."""
    if max_samples is not None and current + incoming > max_samples:
        raise ValueError(
            f"accumulated samples would exceed max_samples={max_samples} ({current} stored + "
            f"{incoming} new); call reset() between probe passes or raise max_samples"
        )
