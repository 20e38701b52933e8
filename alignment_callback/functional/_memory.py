"""Refusing n×n matrices that would not fit, before allocating them."""

from __future__ import annotations

import os
from typing import Callable

import torch

MEMINFO = "/proc/meminfo"

#: The process's cgroups: lines ``hierarchy:controllers:path``
PROC_CGROUP = "/proc/self/cgroup"

#: Per cgroup version, v2 then v1: (mount point, the controller named in ``PROC_CGROUP`` ("" for
#: v2's single hierarchy), limit, usage and statistics files, the statistic of reclaimable page
#: cache)
CGROUP_VERSIONS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("/sys/fs/cgroup", "", "memory.max", "memory.current", "memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
     "memory.stat", "total_inactive_file"),
)

#: A cgroup v1 limit at or above this is "no limit" (the kernel writes 2**63 rounded to a page)
_NO_LIMIT = 1 << 62


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (None when it cannot be read).

    On a CUDA device: its free memory plus what torch's cache holds unused.  On the CPU: the
    smallest of the system's ``MemAvailable`` and, for the process's cgroup and each cgroup
    above it with a finite memory limit (a container, a batch scheduler's job), that limit
    less the cgroup's usage (its inactive page cache, which the kernel reclaims before the
    limit is hit, counted as free).
    """
    if device.type == "cuda":  # free on the device, plus what torch's cache holds unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    free = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(free) if free else None


def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: str) -> int | None:
    """The integer a cgroup file holds (None: no file, not a number, or v2's ``max``)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _reclaimable(path: str, key: str) -> int:
    """The value of ``key`` in a cgroup's ``memory.stat`` (0 when it cannot be read)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return 0
    return 0


def _own_cgroup(controller: str) -> str | None:
    """The process's cgroup path (``/a/b``) in the hierarchy of ``controller`` ("": v2's), from
    ``PROC_CGROUP`` (None when it cannot be read)."""
    try:
        with open(PROC_CGROUP) as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) != 3:
                    continue
                hierarchy, controllers, path = parts
                names = controllers.split(",")
                if controller in names if controller else (hierarchy == "0" and names == [""]):
                    return path
    except OSError:
        return None
    return None


def _cgroup_folders(mount: str, controller: str) -> list[str]:
    """The folders of the process's cgroup and of every cgroup above it, up to the mount point
    (which is always included: inside a container's cgroup namespace the process's path is
    ``/``; without one it may not exist under the container's mount, and is skipped)."""
    folders = [mount]
    path = _own_cgroup(controller)
    parts = [p for p in (path or "").split("/") if p not in ("", ".", "..")]
    for depth in range(1, len(parts) + 1):
        folder = os.path.join(mount, *parts[:depth])
        if os.path.isdir(folder):
            folders.append(folder)
    return folders


def _cgroup_available() -> int | None:
    """The smallest limit less usage over the process's cgroup and those above it that have a
    finite limit, in either cgroup version (None: no cgroup memory files, or no limit)."""
    rooms = []
    for mount, controller, limit_file, usage_file, stat_file, key in CGROUP_VERSIONS:
        for folder in _cgroup_folders(mount, controller):
            limit = _read_int(os.path.join(folder, limit_file))
            usage = _read_int(os.path.join(folder, usage_file))
            if limit is None or usage is None or limit >= _NO_LIMIT:
                continue
            in_use = max(0, usage - _reclaimable(os.path.join(folder, stat_file), key))
            rooms.append(max(0, limit - in_use))
    return min(rooms) if rooms else None


def format_bytes(num: float) -> str:
    """``num`` bytes in the largest binary unit it reaches, to one decimal: "1.5 GiB",
    "48.0 MiB" (a small amount does not print as "0.0 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num >= scale:
            return f"{num / scale:.1f} {unit}"
    return f"{int(num)} bytes"


#: Requests up to this many bytes are never refused and do not read the free memory: the read
#: (``/proc`` and cgroup files, about half a millisecond) costs more than the allocation, and a
#: machine without a MiB to spare fails anyway
SMALL_REQUEST = 1 << 20


def free_to_check(need: int, device: torch.device,
                  read_free: Callable[[torch.device], int | None]) -> int | None:
    """The bytes ``read_free(device)`` reports for a request of ``need`` bytes, or None when
    it is at most ``SMALL_REQUEST`` (never refused, nothing read) or the memory is unknown."""
    return None if need <= SMALL_REQUEST else read_free(device)


def square_matrix_error(what: str, n: int, count: int, dtype: torch.dtype, device: torch.device,
                        read_free: Callable[[torch.device], int | None],
                        alternatives: str) -> MemoryError | None:
    """The error to raise when ``count`` n×n ``dtype`` matrices need more than the bytes
    ``read_free(device)`` returns (None: they fit, they are at most ``SMALL_REQUEST`` bytes, or
    the free memory is unknown); it gives the estimate and ``alternatives``."""
    size = n * n * torch.tensor([], dtype=dtype).element_size()
    free = free_to_check(count * size, device, read_free)
    if free is None or count * size <= free:
        return None
    return MemoryError(
        f"{what} at n={n} needs about {format_bytes(count * size)} for its n×n matrices "
        f"({count} of {format_bytes(size)}), but only {format_bytes(free)} is available on "
        f"{device}. Use {alternatives}, a kNN measure (O(n·k) memory), or fewer samples"
    )
