"""Refusing n×n matrices that would not fit, before allocating them."""

from __future__ import annotations

import torch

MEMINFO = "/proc/meminfo"

#: (limit, usage, statistics, the statistic of reclaimable page cache) of a cgroup v2, then v1
CGROUP_FILES: tuple[tuple[str, str, str, str], ...] = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
     "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)

#: A cgroup v1 limit at or above this is "no limit" (the kernel writes 2**63 rounded to a page)
_NO_LIMIT = 1 << 62


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (None when it cannot be read).

    On a CUDA device: its free memory plus what torch's cache holds unused.  On the CPU: the
    smaller of the system's ``MemAvailable`` and, inside a cgroup with a finite memory limit
    (a container), that limit less the cgroup's usage (its inactive page cache, which the
    kernel reclaims before the limit is hit, counted as free).
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


def _cgroup_available() -> int | None:
    """The cgroup's limit less its usage, for the first cgroup version with a finite limit
    (None: no cgroup memory files, or no limit)."""
    for limit_path, usage_path, stat_path, key in CGROUP_FILES:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        in_use = max(0, usage - _reclaimable(stat_path, key))
        return max(0, limit - in_use)
    return None


def square_matrix_error(what: str, n: int, count: int, dtype: torch.dtype, device: torch.device,
                        free: int | None, alternatives: str) -> MemoryError | None:
    """The error to raise when ``count`` n×n ``dtype`` matrices need more than ``free`` bytes
    (None: they fit, or the free memory is unknown); it gives the estimate and
    ``alternatives``."""
    size = n * n * torch.tensor([], dtype=dtype).element_size()
    if free is None or count * size <= free:
        return None
    return MemoryError(
        f"{what} at n={n} needs about {count * size / 2**30:.1f} GiB for its n×n matrices "
        f"({count} of {size / 2**30:.2f} GiB), but only {free / 2**30:.1f} GiB is available on "
        f"{device}. Use {alternatives}, a kNN measure (O(n·k) memory), or fewer samples"
    )
