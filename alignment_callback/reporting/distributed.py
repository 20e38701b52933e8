"""``matrix`` over several processes (``torchrun``): the process group and its two collectives.

When ``torchrun`` (or any launcher setting ``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) starts the command, each process computes every ``world_size``-th pending pair.
The only collectives are three ``all_gather_object`` calls of small Python objects, which every
process reaches whatever happened before (errors are caught and gathered, not raised), so no
process can wait forever for one that failed: after each, every process knows every process's
outcome and ends with the same error.  The first, after planning, gives every process rank 0's
list of pending pairs (before any process appends a pair, so that a resumed run is sharded the
same everywhere); the second gives rank 0 every finished pair; the third, the outcome of
writing the summary.

The group is a gloo group also when the pairs are computed on CUDA: only these objects travel
through it (the features never do), and gloo needs no device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

#: Default collective timeout: processes wait for the slowest one at the end of their shard.
DEFAULT_TIMEOUT_S = 7 * 24 * 3600
#: The longest collective timeout (about 31 years): torch.distributed's clocks count
#: nanoseconds in 64 bits, and a timeout past ~292 years overflows them.
MAX_TIMEOUT_S = 10**9


@dataclass
class ProcessGroup:
    """This process's place in the group (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> "ProcessGroup":
        """Join the group described by the environment (``WORLD_SIZE`` > 1), else a single
        process; a group already initialized by the caller is used as it is."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} is set but this PyTorch build has no "
                               "torch.distributed")
        created = False
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
            created = True
        return cls(dist.get_rank(), dist.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", "0") or 0), created)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (``[obj]`` for a single process)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every process (no-op for a single process)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the group if this object created it."""
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.created = False


@dataclass
class Outcome:
    """How one process's part ended: ``code`` 0 ok, 2 bad input, 130 interrupted, 1 bug."""

    rank: int
    code: int = 0
    message: str = ""
    finished: int = 0
    lines: list[dict] | None = None
    tasks: list[Any] | None = None  # the planned pending pairs (rank 0's are everyone's)


class GroupFailure(Exception):
    """Raised on every process when any process failed: the first failure (by rank)."""

    def __init__(self, code: int, message: str, printed: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.printed = printed

    @property
    def line(self) -> str:
        """The stderr line: ``error: ...`` (an interruption is not an error)."""
        return self.message if self.code == 130 else f"error: {self.message}"


def first_failure(outcomes: list[Outcome]) -> Outcome | None:
    """The failure to report everywhere: a bad input or bug before an interruption."""
    failed = [o for o in outcomes if o.code]
    if not failed:
        return None
    return min(failed, key=lambda o: (o.code == 130, o.rank))


__all__ = ["DEFAULT_TIMEOUT_S", "MAX_TIMEOUT_S", "GroupFailure", "Outcome", "ProcessGroup",
           "first_failure"]
