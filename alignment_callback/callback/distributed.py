"""The permutation null spread over the processes of a multi-process strategy.

Every process holds the same model replica and the same cached reference, runs the probe, and
computes the permutations ``range(start, stop)`` of its share; one all-gather (of Python
objects: the partial nulls, or an error) assembles the full null in permutation order on every
process, so the values equal a single process's.  Every process reaches that collective even
when its own computation failed, carrying the error instead, and each step ends with one more
collective, which a process that failed after the gather, or that had nothing to gather (every
measure on the analytic null), meets with its error: then all processes raise the same error
and none waits forever.  The probe pass before it is settled the same way
(:func:`first_error`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from alignment_callback.functional.registry import Measure


def share_of(num_permutations: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous range of permutations process ``rank`` computes."""
    return (num_permutations * rank // world_size, num_permutations * (rank + 1) // world_size)


def _all_gather(payload: Any, group: Any) -> list[Any]:
    """Every process's ``payload`` (Python objects), in rank order."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, payload, group=group)
    return out


class NullGather:
    """The ``gather`` of :func:`~alignment_callback.functional.pipeline.calibrate_prepared`
    over ``torch.distributed``, plus :meth:`fail` for a process whose computation raised and
    :meth:`meet` for the step's last collective."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.settled = False  # every process has seen a failure (and raises it)

    def _exchange(self, payload: Any) -> list[Any]:
        """Every process's ``payload``; the first failure's error when a process failed, the
        same on every process, with ``origin``: that process's rank and ``"<Type>: <message>"``
        (from which a caller can raise the error's own type)."""
        out = _all_gather(payload, self.group)
        for rank, item in enumerate(out):
            if isinstance(item, str):
                self.settled = True
                error = RuntimeError(f"the alignment step failed on rank {rank}: {item}")
                error.origin = (rank, item)  # type: ignore[attr-defined]
                raise error
        return out

    def __call__(self, nulls: dict[Measure, Tensor]) -> dict[Measure, Tensor]:
        order = list(nulls)
        parts = self._exchange([nulls[m].cpu() for m in order])
        device = next(iter(nulls.values())).device if nulls else torch.device("cpu")
        return {m: torch.cat([p[i] for p in parts]).to(device) for i, m in enumerate(order)}

    def fail(self, error: BaseException) -> None:
        """Reach the collective with ``error`` so the other processes do not wait; raises."""
        self._exchange(f"{type(error).__name__}: {error}")

    def meet(self) -> None:
        """Reach the collective with nothing to gather (no permutation null in this step);
        raises when another process failed."""
        self._exchange(None)


def first_error(error: str | None, group: Any = None) -> tuple[int, str] | None:
    """Every process's ``error`` (None: it succeeded) in one all-gather: the first failed
    process's rank and error, the same on every process, or None when none failed."""
    out = _all_gather(error, group)
    return next(((rank, item) for rank, item in enumerate(out) if item is not None), None)


def _transport_device(device: torch.device, group: Any) -> torch.device:
    """Where the backend of ``group`` moves tensors: NCCL only CUDA ones, the others the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def from_rank_zero(tensors: dict[str, Tensor], group: Any = None) -> dict[str, Tensor]:
    """Process 0's ``tensors`` on every process, bitwise, on this process's device.

    One small object broadcast carries process 0's layout (names, shapes, dtypes), so the other
    processes need not agree with it; each tensor then moves as its bytes in one tensor
    broadcast (no pickling), on the device where the backend serves it (NCCL: CUDA), else
    through the CPU.
    """
    import torch.distributed as dist

    device = next(iter(tensors.values())).device
    source = dist.get_global_rank(group, 0) if group is not None else 0
    mine = dist.get_rank(group) == 0
    layout = [[(k, tuple(v.shape), v.dtype) for k, v in tensors.items()] if mine else None]
    dist.broadcast_object_list(layout, src=source, group=group)
    transport = _transport_device(device, group)
    out = {}
    for name, shape, dtype in layout[0]:
        if mine:
            value = tensors[name].detach().to(transport).contiguous()
        else:
            value = torch.empty(shape, dtype=dtype, device=transport)
        if value.numel():
            dist.broadcast(value.reshape(-1).view(torch.uint8), src=source, group=group)
        out[name] = value.to(device)
    return out


def guarded_step(compute: Callable[..., Any], num_permutations: int, group: Any = None,
                 **kwargs: Any) -> Any:
    """``compute(share=..., gather=NullGather, **kwargs)`` on every process, with the failure
    protocol above (``share`` is this process's range of the ``num_permutations``): a
    successful process makes the gather's collective (if its computation has a permutation
    null) and then one more; a failing process makes one collective carrying its error, which
    is the one the others are in, and every process raises it."""
    import torch.distributed as dist

    gather = NullGather(group)
    share = share_of(num_permutations, dist.get_rank(group), dist.get_world_size(group))
    try:
        result = compute(share=share, gather=gather, **kwargs)
    except BaseException as err:
        # before the gather: the others are in the gather, or (no null to gather) in the last
        # collective below; after it: in the last collective below
        if not gather.settled:  # else the error came from a collective every process saw
            gather.fail(err)
        raise
    gather.meet()  # every process ends the step in this collective: a late failure meets it
    return result
