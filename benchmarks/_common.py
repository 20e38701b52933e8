"""What the benchmark scripts share: interleaved best-of timing, the load average, peak RSS (of
this process, or of a fresh child process), the verdict line.  Imported by the scripts as
``_common`` (they run as ``python benchmarks/<script>.py``, which puts this folder on
``sys.path``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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


# The start of the code a fresh child process runs (``run_child``): its arguments (a JSON
# object, with "threads"), the library imported, and its own peak RSS.  A child's ru_maxrss
# starts at its parent's peak on Linux (it survives the exec), so the child reads VmHWM.
CHILD_PRELUDE = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import alignment_callback.functional as F


def hwm_mb():  # peak RSS of this process (VmHWM); ru_maxrss would include the parent's
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")
"""


# The end of a child that got there: its output flushed, it leaves without the interpreter's
# teardown, which took about 1.3 s of CPU with torch and the compiled kernels loaded (after
# its last line, so nothing measured changes).  A child that raised exits as usual.
CHILD_EXIT = r"""
import os
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def run_child(code: str, timeout: float, **args) -> dict:
    """Run ``code`` (``CHILD_PRELUDE`` + a body that prints one JSON line last, then
    ``CHILD_EXIT``) in a fresh Python process with ``args`` (which must hold ``threads``, also
    its ``OMP_NUM_THREADS``); returns that JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"])}
    out = subprocess.run([sys.executable, "-c", code + CHILD_EXIT, json.dumps(args)],
                         capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
