"""``callback.distributed.from_rank_zero`` on two CPU processes (gloo): every process receives
process 0's tensors bitwise (as bytes: bfloat16, float64, non-contiguous views, empty tensors),
with process 0's names, shapes and dtypes even where its own differ."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from alignment_callback.callback.distributed import from_rank_zero
from tests._spawn import PORTS, free_port, spawn_and_wait

# tests that open local ports take turns across pytest workers (tests/conftest.py)
pytestmark = [pytest.mark.slow, PORTS]
TIMEOUT_S = 90.0


def _tensors(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    out = {"float32": torch.randn(5, 3, generator=g),
           "bfloat16": torch.randn(4, 2, 3, generator=g).to(torch.bfloat16),
           "float64_transposed": torch.randn(3, 7, generator=g, dtype=torch.float64).T,
           "empty": torch.empty(0, 4)}
    if rank == 1:  # a layout of its own: process 0's is the one that counts
        out["float32"] = torch.zeros(2, 2, dtype=torch.float16)
        out["only_rank1"] = torch.ones(3)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.save(from_rank_zero(_tensors(rank)), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_process_receives_process_zeros_tensors_bitwise(tmp_path):
    spawn_and_wait(_worker, (free_port(), str(tmp_path)), TIMEOUT_S)
    sent = _tensors(0)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got) == list(sent), rank
        for name, value in sent.items():
            assert got[name].dtype == value.dtype, (rank, name)
            assert got[name].shape == value.shape, (rank, name)
            assert torch.equal(got[name], value), (rank, name)
