"""Where the time of a calibration goes on a GPU: wall time, GPU busy time and kernel count.

For linear CKA (n = 1024, K = 1000; n = 4096, K = 200), mutual kNN and CKNNA (n = 4096,
K = 1000), d = 128: the whole ``calibrated_alignment`` call after a warm-up (best of 3 wall
times), then one call under ``torch.profiler``: the GPU's busy time (the kernels' own time),
the number of kernels launched and the top kernels.  A call whose wall time is far above its
GPU busy time is bound by launches and host work, not by the GPU.  Prints a message and exits
where there is no CUDA device (``--device cpu`` profiles the same calls on the CPU).

    python benchmarks/profile_cuda.py [--device cuda] [--top 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import alignment_callback.functional as F

CASES = [(1024, 1000, "linear_cka"), (4096, 200, "linear_cka"), (4096, 1000, "mutual_knn"),
         (4096, 1000, "cknna")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--top", type=int, default=8, help="kernels listed per call")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to profile (use --device cpu for the CPU)")
        return
    torch.set_num_threads(1)
    gpu = args.device == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    print(f"torch {torch.__version__}, device {args.device}, d=128, 1 CPU thread")
    for n, k, name in CASES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 128, generator=g)
        y = (x + 2 * torch.randn(n, 128, generator=g)).to(args.device)
        x = x.to(args.device)

        def call() -> None:
            F.calibrated_alignment(x, y, name, num_permutations=k)
            sync()

        call()
        wall = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            wall.append(time.perf_counter() - start)
        with profile(activities=activities) as prof:
            call()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3
        print(f"\n== {name} n={n} K={k}: best {1e3 * min(wall):.1f} ms wall, GPU busy {busy:.1f} ms, "
              f"kernels {sum(e.count for e in kernels)}")
        print(events.table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                           row_limit=args.top, max_name_column_width=50))


if __name__ == "__main__":
    main()
