"""Probe inputs and the frozen reference model for :class:`AlignmentCallback`."""

from __future__ import annotations

import inspect
import os
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
)

from alignment_callback.hooks.collect import BATCH_ROWS, preserved_rng, split_rows

Probe = Union[DataLoader, Tensor, str, os.PathLike, Callable[[], Iterable[Any]], Iterable[Any]]


def load_probe(probe: Probe, argument: str = "probe") -> Any:
    """Normalize a probe into something :func:`collect_activations` iterates.

    * a ``DataLoader`` with a sequential sampler (the same rows, in the same order, every
      time; see :func:`check_sequential`),
    * a tensor, or a numeric NumPy array (made a tensor; split into batches of 256 rows),
    * a path to a ``.pt`` file (loaded with ``weights_only``) holding a tensor, one dict batch,
      one tuple batch ``(inputs, labels, ...)`` (the model gets ``inputs``; split into batches
      of 256 rows like a tensor) or a list of batches,
    * a zero-argument callable returning an iterable of batches (called at every run),
    * one dict batch (e.g. a tokenizer's output),
    * any re-iterable of batches (e.g. a list; a tuple of tensors is several batches).

    Numeric NumPy arrays inside the batches of a list become tensors too.

    Parameters
    ----------
    probe : DataLoader, Tensor, ndarray, str, os.PathLike, callable or iterable
        The probe inputs.
    argument : str, default="probe"
        Names the setting in error messages.

    Raises
    ------
    FileNotFoundError
        A path that is not a file.
    TypeError
        A NumPy array that is not numeric, or a type that is no probe (a ``Dataset``: the
        message says to wrap it in a ``DataLoader``).
    ValueError
        An empty probe, or a DataLoader that is not sequential.
    """
    if isinstance(probe, (str, os.PathLike)):
        if not os.path.isfile(probe):
            raise FileNotFoundError(f"{argument}: no such file {os.fspath(probe)!r}")
        loaded = torch.load(probe, map_location="cpu", weights_only=True)
        if isinstance(loaded, tuple):  # torch.save((inputs, labels), path): one batch
            if not loaded:
                raise ValueError(f"{argument}: {os.fspath(probe)!r} holds an empty tuple")
            return split_rows(loaded, BATCH_ROWS)
        if not isinstance(loaded, (Tensor, Mapping, list)):
            raise TypeError(f"{argument}: {os.fspath(probe)!r} holds a "
                            f"{type(loaded).__name__}; a probe file holds a tensor, a dict "
                            "batch, a tuple batch or a list of batches")
        return load_probe(loaded, argument)
    if isinstance(probe, np.ndarray):
        return _as_tensor(probe, argument)
    if isinstance(probe, DataLoader):
        check_sequential(probe, argument)
        return probe
    if isinstance(probe, Tensor):
        if probe.dim() == 0:
            raise ValueError(f"{argument}: a 0-dimensional tensor has no rows")
        return probe
    if callable(probe):
        _check_no_arguments(probe, argument)
        return probe
    if isinstance(probe, Mapping):  # one dict batch (e.g. tokenizer output)
        return [_numpy_to_tensors(probe, argument)]
    if isinstance(probe, Dataset):  # an IterableDataset too: it yields samples, not batches
        raise TypeError(f"{argument}: unsupported probe type {type(probe).__name__}; wrap a "
                        "Dataset in DataLoader(dataset, batch_size=...) (it yields single "
                        "samples, not batches)")
    if isinstance(probe, Iterable):
        batches = [_numpy_to_tensors(b, argument) for b in probe]
        if not batches:
            raise ValueError(f"{argument}: the probe is empty")
        return batches
    raise TypeError(f"{argument}: unsupported probe type {type(probe).__name__}")


def _check_no_arguments(fn: Callable[..., Any], argument: str) -> None:
    """A callable probe is called with no arguments: refuse one that needs some."""
    try:
        inspect.signature(fn).bind()
    except TypeError as err:
        raise TypeError(f"{argument}: a callable probe is called with no arguments and returns "
                        f"the batches; {fn!r} needs some ({err})") from None
    except ValueError:  # no signature to read (a builtin): it is called as it is
        pass


def _as_tensor(array: np.ndarray, argument: str) -> Tensor:
    """A numeric (or boolean) NumPy array as a tensor; anything else is refused."""
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{argument}: a NumPy array of dtype {array.dtype} cannot be fed to a "
                        "model; pass a numeric array or tensor, or a list of batches with "
                        "batch_transform=...")
    if array.ndim == 0:
        raise ValueError(f"{argument}: a 0-dimensional array has no rows")
    return torch.as_tensor(array)


def _numpy_to_tensors(batch: Any, argument: str) -> Any:
    """``batch`` with its numeric NumPy arrays (itself, or entries of a tuple, list or dict)
    made tensors; other values are left as they are (strings for a ``batch_transform``)."""
    if isinstance(batch, np.ndarray):
        return _as_tensor(batch, argument) if batch.dtype.kind in "biuf" else batch
    if isinstance(batch, Mapping) and any(isinstance(v, np.ndarray) for v in batch.values()):
        return {k: _numpy_to_tensors(v, argument) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and any(isinstance(v, np.ndarray) for v in batch):
        converted = [_numpy_to_tensors(v, argument) for v in batch]
        return converted if isinstance(batch, list) else tuple(converted)
    return batch


def check_sequential(loader: DataLoader, argument: str = "probe") -> None:
    """Refuse a DataLoader whose rows could come in another order at another alignment step.

    Rows of the model and of the cached reference are compared position by position, so the
    probe must yield the same samples in the same order every time: a ``SequentialSampler``
    (``shuffle=False``), batched by a plain ``BatchSampler``.  Anything else (a
    ``RandomSampler``, ``SubsetRandomSampler``, a shuffling or custom ``batch_sampler``) is an
    error; pass the rows as a tensor or a list of batches to use another fixed order.  So is
    ``persistent_workers=True``: a pass restarts the loader's one iterator (a loader shared with
    training would lose the rest of its epoch), and its workers' random state goes on from the
    last pass (a dataset that draws noise would give other rows at every step).
    """
    if getattr(loader, "persistent_workers", False):
        raise ValueError(
            f"{argument}: the DataLoader keeps its workers between passes "
            "(persistent_workers=True): each probe pass would restart its one iterator (a "
            "loader shared with training loses the rest of its epoch) and continue its "
            "workers' random streams (a dataset that draws noise gives other rows at every "
            "step); pass a DataLoader with persistent_workers=False")
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
    if batch_sampler is None:  # batch_size=None: the dataset's items are the batches
        sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        raise ValueError(
            f"{argument}: the DataLoader samples with DistributedSampler, which gives each "
            "process its own (padded) shard; every process runs the whole probe (under DDP "
            "the callback splits the permutations, not the rows): pass a DataLoader with "
            "shuffle=False and no sampler, a tensor or a list of batches")
    if not isinstance(sampler, SequentialSampler):
        what = "shuffles (RandomSampler)" if type(sampler).__name__ == "RandomSampler" else \
            f"samples with {type(sampler).__name__}"
        raise ValueError(
            f"{argument}: the DataLoader {what}; rows must be the same samples in the same order "
            "at every alignment step: use shuffle=False (a SequentialSampler), or pass a tensor "
            "or a list of batches"
        )


#: the global random generators are seeded with this before a callable probe is called
PROBE_SEED = 0


@contextmanager
def seeded_rng() -> Iterator[None]:
    """The global random generators seeded with :data:`PROBE_SEED` inside (torch's on every
    device, NumPy's ``np.random``, Python's ``random``), their states put back on exit (see
    :func:`~alignment_callback.hooks.collect.preserved_rng`): a probe that draws gives the same
    rows at every pass, and training's random streams do not change.  The training loop's
    thread only."""
    with preserved_rng():
        torch.default_generator.manual_seed(PROBE_SEED)
        if torch.cuda.is_initialized():  # (torch.manual_seed would queue a seed for a later
            torch.cuda.manual_seed_all(PROBE_SEED)  # CUDA start, which training would see)
        np.random.seed(PROBE_SEED)
        random.seed(PROBE_SEED)
        yield


def iterate_probe(probe: Any) -> Any:
    """The batches of a normalized probe (calls a callable probe; what it returns is
    normalized as by :func:`load_probe`: a DataLoader must be sequential, NumPy arrays become
    tensors).

    A callable probe is called under :func:`seeded_rng`: one that draws
    (``return [torch.randn(...)]``) returns the same rows at every step, as the reference's
    were computed on, and does not change training.  What it returns is iterated later: the
    probe passes run under :func:`seeded_rng` too, so a generator or a DataLoader whose
    dataset draws gives the same rows at every pass as well."""
    if not callable(probe) or isinstance(probe, (Tensor, nn.Module)):
        return probe
    with seeded_rng():
        batches = probe()
    if not isinstance(batches, Iterable):  # None, a number (tensors, arrays, dicts iterate)
        raise TypeError(f"probe: the callable probe must return batches (a DataLoader, a "
                        f"tensor, a list of batches, ...), it returned {batches!r}")
    if isinstance(batches, DataLoader):
        check_sequential(batches, "probe (the DataLoader its callable returned)")
    elif isinstance(batches, (np.ndarray, Mapping, list, tuple)):  # a generator stays lazy
        return load_probe(batches, "probe (what its callable returned)")
    return batches


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with ``requires_grad_(False)``: it is never trained."""
    module.eval()
    module.requires_grad_(False)
    return module


def load_reference(reference: Union[nn.Module, str, os.PathLike], reference_class: Any = None,
                   frozen: bool = True) -> nn.Module:
    """The reference: an ``nn.Module`` (a ``LightningModule`` too), or a checkpoint path.

    A path needs ``reference_class`` (a ``LightningModule`` subclass: loaded with
    ``load_from_checkpoint``); without it the file must hold a whole pickled module saved with
    ``torch.save(model, path)``, which is loaded with ``weights_only=False`` — only do that for
    files you trust.

    Parameters
    ----------
    reference : nn.Module, str or os.PathLike
        The module, or the checkpoint path.
    reference_class : LightningModule subclass, default=None
        Loads a Lightning checkpoint path.
    frozen : bool, default=True
        Put a given ``nn.Module`` in eval mode with ``requires_grad_(False)`` (see
        :func:`freeze`); ``False`` leaves it as it is, for a caller that first checks that it
        shares nothing with the model in training (:func:`shared_with`).  A module loaded from
        a path is always frozen (it can share nothing).
    """
    if isinstance(reference, nn.Module):
        return freeze(reference) if frozen else reference
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


def shared_with(reference: nn.Module, model: nn.Module) -> list[str]:
    """The names, in ``reference``, of the outermost modules and of the parameters that are
    also ``model``'s (the same objects): freezing them would stop their training."""
    modules = {id(m) for m in model.modules()}
    params = {id(p) for p in model.parameters()}
    shared: list[str] = []
    for name, module in reference.named_modules():
        if id(module) in modules and not any(name.startswith(f"{s}.") or s == ""
                                             for s in shared):
            shared.append(name)
    for name, param in reference.named_parameters():
        if id(param) in params and not any(name.startswith(f"{s}.") or s == "" for s in shared):
            shared.append(name)
    return shared


