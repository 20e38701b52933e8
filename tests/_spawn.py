"""Two-process gloo runs for tests: a free port and ``mp.spawn`` with a deadline.  Imports no
Lightning (each spawned worker re-imports its test module)."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp

#: Marks tests that start processes talking over a local port (``free_port``, torchrun,
#: Lightning's DDP): they run one at a time across pytest workers (tests/conftest.py), since a
#: port found free by one worker could be taken by another's run before it is bound.
PORTS = pytest.mark.ports


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(worker: Callable[..., Any], args: tuple, timeout_s: float,
                   nprocs: int = 2) -> None:
    """``worker(rank, *args)`` on ``nprocs`` processes; fails the test past ``timeout_s``
    (a hang) and kills what is left."""
    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not finish within {timeout_s:.0f} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
