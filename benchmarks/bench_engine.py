"""What the engine shares, measured in one run (ratios, not timed unit tests).

1. One alignment step with the three kNN measures (mutual kNN, CKNNA, cycle kNN, same k)
   against the sum of three single-measure steps: they share the neighbor lists and the
   per-permutation remap and match work (target: ratio <= 0.8).
2. Peak resident memory of a layer null above its inputs (the features), each measured in a
   fresh process: 12×12 linear-CKA layers at n = 4096 (target: <= 8 × n²·4 bytes, whatever the
   number of layer pairs) and a single linear-CKA pair (target: <= 3 × n²·4 bytes).

    python benchmarks/bench_engine.py            # n = 1024 steps, n = 4096 memory
    python benchmarks/bench_engine.py --quick    # a smoke run (small n)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def _layers(prefix: str, count: int, n: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    return {f"{prefix}{i}": base + (i + 1) * torch.randn(n, d, generator=g) for i in range(count)}


def knn_sharing(n: int, d: int, k: int, perms: int, repeats: int) -> None:
    from alignment_callback.engine import AlignmentEngine

    ref, model = _layers("r", 3, n, d, 0), _layers("m", 4, n, d, 1)
    names = ("mutual_knn", "cknna", "cycle_knn")

    def step_seconds(measures) -> float:
        engine = AlignmentEngine({m: {"k": k} for m in measures}, num_permutations=perms)
        engine.set_reference(ref)  # once per fit: not part of a step
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            engine.step(model)
            best = min(best, time.perf_counter() - start)
        return best

    joint = step_seconds(names)
    singles = {m: step_seconds([m]) for m in names}
    total = sum(singles.values())
    print(f"kNN sharing: n={n}, d={d}, k={k}, 4x3 layers, K={perms}, best of {repeats}, "
          f"{torch.get_num_threads()} thread(s)")
    for m, s in singles.items():
        print(f"  {m:<12} alone {s:7.3f} s")
    print(f"  sum of the three single-measure steps {total:7.3f} s")
    print(f"  one step with all three               {joint:7.3f} s")
    print(f"  ratio {joint / total:.2f}  (target <= 0.80)")


_MEMORY_CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
n, d, la, lb, perms = (int(v) for v in sys.argv[1:6])
import alignment_callback.functional as F
g = torch.Generator().manual_seed(0)
xs = {f"x{i}": torch.randn(n, d, generator=g) for i in range(la)}
ys = {f"y{i}": torch.randn(n, d, generator=g) for i in range(lb)}
F.calibrated_layer_alignment({"w": torch.randn(64, 8)}, {"w": torch.randn(64, 8)}, "linear_cka",
                             num_permutations=2)  # imports and first-call allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
res = F.calibrated_layer_alignment(xs, ys, "linear_cka", num_permutations=perms, seed=0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"above_inputs": after - before, "raw": float(res.raw)}))
"""


def peak_memory(n: int, d: int, la: int, lb: int, perms: int) -> int:
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(n), str(d), str(la), str(lb),
                          str(perms)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["above_inputs"]


def memory(n: int, d: int, perms: int) -> None:
    unit = n * n * 4
    print(f"layer-null peak memory above the inputs: linear CKA, n={n}, d={d}, K={perms} "
          f"(n²·4 B = {unit / 2**20:.0f} MiB)")
    for la, lb, target in ((12, 12, 8), (1, 1, 3)):
        peak = peak_memory(n, d, la, lb, perms)
        print(f"  {la:>2}x{lb:<2} layers: {peak / 2**20:7.0f} MiB = {peak / unit:5.1f} x n²·4 B "
              f"(target <= {target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        knn_sharing(n=256, d=64, k=10, perms=50, repeats=1)
        memory(n=512, d=64, perms=4)
    else:
        knn_sharing(n=1024, d=256, k=10, perms=500, repeats=3)
        memory(n=4096, d=256, perms=10)
    print("(the machine may be shared with other work: ratios are what the script checks)")


if __name__ == "__main__":
    main()
