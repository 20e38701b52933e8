"""Probe inputs and the frozen reference model for :class:`AlignmentCallback`."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from alignment_callback.hooks.collect import preserved_rng

Probe = Union[DataLoader, Tensor, str, os.PathLike, Callable[[], Iterable[Any]], Iterable[Any]]


def load_probe(probe: Probe, argument: str = "probe") -> Any:
    """Normalize a probe into something :func:`collect_activations` iterates.

    * a ``DataLoader`` with a sequential sampler (the same rows, in the same order, every
      time; see :func:`check_sequential`),
    * a tensor (split into batches of 256 rows),
    * a path to a ``.pt`` file holding a tensor / dict / tuple (loaded with ``weights_only``),
    * a zero-argument callable returning an iterable of batches (called at every run),
    * one dict batch (e.g. a tokenizer's output),
    * any re-iterable of batches (e.g. a list).

    ``argument`` names the setting in error messages (default ``"probe"``).
    """
    if isinstance(probe, (str, os.PathLike)):
        if not os.path.isfile(probe):
            raise FileNotFoundError(f"{argument}: no such file {os.fspath(probe)!r}")
        return torch.load(probe, map_location="cpu", weights_only=True)
    if isinstance(probe, DataLoader):
        check_sequential(probe, argument)
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


def check_sequential(loader: DataLoader, argument: str = "probe") -> None:
    """Refuse a DataLoader whose rows could come in another order at another alignment step.

    Rows of the model and of the cached reference are compared position by position, so the
    probe must yield the same samples in the same order every time: a ``SequentialSampler``
    (``shuffle=False``), batched by a plain ``BatchSampler``.  Anything else (a
    ``RandomSampler``, ``SubsetRandomSampler``, a shuffling or custom ``batch_sampler``) is an
    error; pass the rows as a tensor or a list of batches to use another fixed order.
    """
    if isinstance(loader.dataset, IterableDataset):
        return  # its order is the dataset's own
    batch_sampler = loader.batch_sampler
    sampler = batch_sampler.sampler if isinstance(batch_sampler, BatchSampler) else None
    if type(batch_sampler) is not BatchSampler and batch_sampler is not None:
        raise ValueError(
            f"{argument}: the DataLoader uses a custom batch_sampler "
            f"({type(batch_sampler).__name__}); rows must be the same samples in the same order "
            "at every alignment step: use shuffle=False and batch_size=..., or pass a tensor or "
            "a list of batches"
        )
    if batch_sampler is None:
        sampler = loader.sampler
    if not isinstance(sampler, SequentialSampler):
        what = "shuffles (RandomSampler)" if type(sampler).__name__ == "RandomSampler" else \
            f"samples with {type(sampler).__name__}"
        raise ValueError(
            f"{argument}: the DataLoader {what}; rows must be the same samples in the same order "
            "at every alignment step: use shuffle=False (a SequentialSampler), or pass a tensor "
            "or a list of batches"
        )


def iterate_probe(probe: Any) -> Any:
    """The batches of a normalized probe (calls a callable probe; a DataLoader it returns must
    be sequential, as in :func:`check_sequential`).

    A callable probe is called with the global random states saved and put back afterwards
    (see :func:`~alignment_callback.hooks.collect.preserved_rng`): one that seeds or draws
    (``torch.manual_seed(0); return [torch.randn(...)]``) must not change training.  Iterating
    what it returns draws under the capture's own guard."""
    if not callable(probe) or isinstance(probe, (Tensor, nn.Module)):
        return probe
    with preserved_rng():
        batches = probe()
    if isinstance(batches, DataLoader):
        check_sequential(batches, "probe (the DataLoader its callable returned)")
    return batches


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
