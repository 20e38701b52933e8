"""Refusing n×n matrices that would not fit, before allocating them."""

from __future__ import annotations

import torch


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (None when it cannot be read)."""
    if device.type == "cuda":  # free on the device, plus what torch's cache holds unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
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
