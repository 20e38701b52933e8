"""Probe DataLoaders refused at construction because a pass over them would change training
or give other rows at another step: ``persistent_workers=True`` (a pass restarted the loader's
one iterator, so a loader shared with training lost the rest of its epoch, and the workers'
random streams went on, so a dataset drawing noise gave other rows at every step), and a
``DistributedSampler`` (refused before with a hint to use ``shuffle=False``, which it had)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from alignment_callback import AlignmentCallback

DATA = TensorDataset(torch.randn(24, 4))


def reference() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3))


def test_a_probe_loader_with_persistent_workers_is_refused():
    loader = DataLoader(DATA, batch_size=8, num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match=r"probe: the DataLoader keeps its workers between "
                                         r"passes \(persistent_workers=True\).*a loader shared "
                                         r"with training loses the rest of its epoch"):
        AlignmentCallback(reference(), loader, layers="0", reference_layers="0")
    plain = DataLoader(DATA, batch_size=8, num_workers=1)  # the same without persistent workers
    AlignmentCallback(reference(), plain, layers="0", reference_layers="0")


def test_a_distributed_sampler_probe_is_refused_for_what_it_does():
    sampler = DistributedSampler(DATA, num_replicas=2, rank=0, shuffle=False)
    loader = DataLoader(DATA, batch_size=8, sampler=sampler)
    with pytest.raises(ValueError, match=r"DistributedSampler, which gives each process its own "
                                         r"\(padded\) shard; every process runs the whole probe"):
        AlignmentCallback(reference(), loader, layers="0", reference_layers="0")
