"""What the engine shares, measured in one run (ratios, not timed unit tests).

1. One alignment step with the three kNN measures (mutual kNN, CKNNA, cycle kNN, same k)
   against the sum of three single-measure steps: they share the neighbor lists and the
   per-permutation remap and match work (target: ratio <= 0.8).
2. Peak resident memory of a layer null above its inputs (the features), each measured in a
   fresh process by its own peak RSS (VmHWM after the call minus VmHWM before it): 12×12
   linear-CKA layers at n = 4096 (target: <= 8 × n²·4 bytes, whatever the number of layer
   pairs) and a single linear-CKA pair (target: <= 3 × n²·4 bytes).

    python benchmarks/bench_engine.py            # n = 1024 steps, n = 4096 memory
    python benchmarks/bench_engine.py --quick    # a smoke run (small n)
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import CHILD_PRELUDE, run_child


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
        engine.step(model)  # warm-up, untimed: kernels compiled, first-call allocations
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


_MEMORY_CHILD = CHILD_PRELUDE + r"""
n, d, la, lb, perms = args["n"], args["d"], args["la"], args["lb"], args["perms"]
g = torch.Generator().manual_seed(0)
xs = {f"x{i}": torch.randn(n, d, generator=g) for i in range(la)}
ys = {f"y{i}": torch.randn(n, d, generator=g) for i in range(lb)}
F.calibrated_layer_alignment({"w": torch.randn(64, 8)}, {"w": torch.randn(64, 8)}, "linear_cka",
                             num_permutations=2)  # imports and first-call allocations
before = hwm_mb()
res = F.calibrated_layer_alignment(xs, ys, "linear_cka", num_permutations=perms, seed=0)
print(json.dumps({"above_inputs": (hwm_mb() - before) * 2**20, "raw": float(res.raw)}))
"""


def peak_memory(n: int, d: int, la: int, lb: int, perms: int) -> float:
    """Peak RSS (bytes) of an la×lb linear-CKA layer null above its inputs, in a fresh process
    (its own VmHWM: a child's ru_maxrss would start at this process's peak)."""
    return run_child(_MEMORY_CHILD, 3600, n=n, d=d, la=la, lb=lb, perms=perms,
                     threads=1)["above_inputs"]


def memory(n: int, d: int, perms: int) -> None:
    unit = n * n * 4
    print(f"layer-null peak memory above the inputs: linear CKA, n={n}, d={d}, K={perms} "
          f"(n²·4 B = {unit / 2**20:.0f} MiB)")
    for la, lb, target in ((12, 12, 8), (1, 1, 3)):
        peak = peak_memory(n, d, la, lb, perms)
        print(f"  {la:>2}x{lb:<2} layers: {peak / 2**20:7.1f} MiB = {peak / unit:5.1f} x n²·4 B "
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
