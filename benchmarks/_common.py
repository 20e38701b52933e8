"""What the benchmark scripts share: interleaved best-of timing, the load average, peak RSS and
the verdict line.  Imported by the scripts as ``_common`` (they run as ``python
benchmarks/<script>.py``, which puts this folder on ``sys.path``)."""

from __future__ import annotations

import math
import os
import time

QUICK = False  # set by a script's --quick: the sizes are below the targets', so no verdicts


def verdict(ok: bool) -> str:
    """``"met"`` / ``"missed"``, or ``"not judged (quick)"`` in a smoke run."""
    return "not judged (quick)" if QUICK else ("met" if ok else "missed")


def load() -> str:
    """The 1-, 5- and 15-minute load averages (the machine may be shared)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def best_of(fns: dict, repeats: int) -> dict:
    """Best wall time of each callable, the callables interleaved ``repeats`` times."""
    best = {k: math.inf for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def peak_rss_mb() -> float:
    """VmHWM of this process in MB (ru_maxrss can include the peak of a parent before exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return math.nan


def accelerators() -> list[str]:
    """The devices timed beside the CPU: ``["cuda"]`` where CUDA exists, else none.  The
    environment variable ``BENCH_EXTRA_DEVICE`` (e.g. ``cpu``) forces one, so the code path of
    the extra column can be exercised on a machine without a GPU."""
    import torch

    forced = os.environ.get("BENCH_EXTRA_DEVICE")
    if forced:
        return [forced]
    return ["cuda"] if torch.cuda.is_available() else []


def synchronized(fn, device: str):
    """``fn`` followed by a device synchronization (CUDA runs asynchronously), for timing."""
    import torch

    def run():
        out = fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run
