"""Probe inputs and the frozen reference model for :class:`AlignmentCallback`."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

Probe = Union[DataLoader, Tensor, str, os.PathLike, Callable[[], Iterable[Any]], Iterable[Any]]


def load_probe(probe: Probe) -> Any:
    """Normalize a probe into something :func:`collect_activations` iterates.

    * a ``DataLoader`` (must not shuffle: the same rows, in the same order, every time),
    * a tensor (split into batches of 256 rows),
    * a path to a ``.pt`` file holding a tensor / dict / tuple (loaded with ``weights_only``),
    * a zero-argument callable returning an iterable of batches (called at every run),
    * one dict batch (e.g. a tokenizer's output),
    * any re-iterable of batches (e.g. a list).
    """
    if isinstance(probe, (str, os.PathLike)):
        return torch.load(probe, map_location="cpu", weights_only=True)
    if isinstance(probe, DataLoader):
        if isinstance(probe.sampler, RandomSampler):
            raise ValueError(
                "the probe DataLoader shuffles (RandomSampler): rows must be the same samples in "
                "the same order at every alignment step; use shuffle=False"
            )
        return probe
    if isinstance(probe, Tensor) or callable(probe):
        return probe
    if isinstance(probe, Mapping):  # one dict batch (e.g. tokenizer output)
        return [probe]
    if isinstance(probe, Iterable):
        batches = list(probe)
        if not batches:
            raise ValueError("the probe is empty")
        return batches
    raise TypeError(f"unsupported probe type {type(probe).__name__}")


def iterate_probe(probe: Any) -> Any:
    """The batches of a normalized probe (calls a callable probe)."""
    return probe() if callable(probe) and not isinstance(probe, (Tensor, nn.Module)) else probe


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with ``requires_grad_(False)``: it is never trained."""
    module.eval()
    module.requires_grad_(False)
    return module


def load_reference(reference: Union[nn.Module, str, os.PathLike], reference_class: Any = None) -> nn.Module:
    """The frozen reference: an ``nn.Module`` (a ``LightningModule`` too), or a checkpoint path.

    A path needs ``reference_class`` (a ``LightningModule`` subclass: loaded with
    ``load_from_checkpoint``); without it the file must hold a whole pickled module saved with
    ``torch.save(model, path)``, which is loaded with ``weights_only=False`` — only do that for
    files you trust.
    """
    if isinstance(reference, nn.Module):
        return freeze(reference)
    if isinstance(reference, (str, os.PathLike)):
        if reference_class is not None:
            return freeze(reference_class.load_from_checkpoint(reference, map_location="cpu"))
        module = torch.load(reference, map_location="cpu", weights_only=False)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{reference} does not hold an nn.Module; pass reference_class= for a Lightning checkpoint"
            )
        return freeze(module)
    raise TypeError(f"reference must be an nn.Module or a checkpoint path, got {type(reference).__name__}")
