"""Probe batches as a model takes them: cast to its parameters' dtype, mapped lazily; and the
dtype activations are kept in."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn


def each_batch(fn: Callable[[Any], Any], batches: Any) -> Any:
    """``fn`` applied to a probe's batches: to a tensor of rows or one dict batch directly,
    else lazily (iterating a DataLoader draws from the RNG, which only the capture's guard
    may see; a generator expression would call ``iter`` right away)."""
    if isinstance(batches, (Tensor, Mapping)):
        return fn(batches)

    def mapped() -> Iterator[Any]:
        for batch in batches:
            yield fn(batch)

    return mapped()


def in_dtype_of(module: nn.Module, batches: Any) -> Any:
    """``batches`` with floating-point tensors cast to the floating dtype of ``module``'s
    parameters, when they share one (a float64 or bfloat16 reference fed a float32 probe)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return batches
    dtype = dtypes.pop()

    def cast(batch: Any) -> Any:
        return apply_to_collection(batch, Tensor, lambda t: t.to(dtype)
                                   if t.is_floating_point() and t.dtype != dtype else t)

    return each_batch(cast, batches)


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype activations and features are compared in: float64 stays float64 (a float64
    model, float64 features), everything else is float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
