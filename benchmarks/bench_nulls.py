"""Fast permutation nulls vs naive recomputation, measured in one run.

For each measure: the calibrated call on the fast path (observed + K permutations), and the
naive baseline, which recomputes the measure from the features on each permuted Y (timed on
``--naive-perms`` permutations and reported per permutation).  The ratio is per-permutation
naive cost over per-permutation fast cost.  Also the aggregation-aware layer calibration
(LA×LB linear CKA) and the peak resident memory (VmHWM), which must stay far below K·n·n
floats.  Every measure is run once on a small input first (kernels compiled, first-call
allocations), then fast and naive are timed interleaved, best of ``--repeats``; the machine may
be shared with other jobs (the load average is printed), so read the ratios.

    python benchmarks/bench_nulls.py            # the paper's timing setting: n=1024, d=768, K=1000
    python benchmarks/bench_nulls.py --quick    # small smoke run (n=256, d=128, K=100, best of 1)
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from _common import best_of, peak_rss_mb

import alignment_callback.functional as F

DEFAULT_SUITE = ("linear_cka", "rbf_cka", "unbiased_cka", "mutual_knn", "cycle_knn", "cknna")
OTHERS = ("svcca", "lcs_knn", "edit_distance_knn", "rsa")
KNN = {"mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--naive-perms", type=int, default=10)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--layer-permutations", type=int, default=500)
    p.add_argument("--layer-naive-perms", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None,
                   help="best of, fast and naive interleaved (default 3, quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="n=256, d=128, K=100 (naive: 3 permutations), 4x4 layers, best of 1")
    args = p.parse_args()
    if args.quick:
        args.n, args.d, args.permutations, args.layers, args.layer_permutations = 256, 128, 100, 4, 50
        args.naive_perms = 3
    args.repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    n, d, K = args.n, args.d, args.permutations
    g = torch.Generator().manual_seed(0)
    x = F.prepare_features(torch.randn(n, d, generator=g))
    y = F.prepare_features(torch.randn(n, d, generator=g))
    print(f"n={n} d={d} K={K} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"best of {args.repeats}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
          "(shared machine: read the ratios)")
    with warnings.catch_warnings():  # K = 2 is too few for a threshold: only a warm-up
        warnings.simplefilter("ignore", UserWarning)
        for name in DEFAULT_SUITE + OTHERS:  # warm-up: kernels compiled, first-call allocations
            F.calibrated_alignment(x[:64], y[:64], name, num_permutations=2)
    spec = (n, d, K) == (1024, 768, 1000)
    if not spec:
        print("(targets are defined at n=1024, d=768, K=1000; verdicts shown only there)")
    print(f"{'measure':18s} {'fast total s':>12s} {'fast ms/perm':>12s} {'naive ms/perm':>13s} "
          f"{'speedup':>8s} {'target':>7s}")
    suite_total = 0.0
    perms = F.permutations(n, args.naive_perms, seed=123)
    rows = []
    for name in DEFAULT_SUITE + OTHERS:
        fn = getattr(F, name)
        t = best_of({"fast": lambda name=name: F.calibrated_alignment(x, y, name, num_permutations=K),
                     "naive": lambda fn=fn: [fn(x, y[pi]) for pi in perms]}, args.repeats)
        fast, naive = t["fast"], t["naive"] / len(perms)
        speed = naive * K / fast
        target = 100.0 if name in KNN else 3.0
        if name in DEFAULT_SUITE:
            suite_total += fast
        rows.append((name, fast, speed, target))
        print(f"{name:18s} {fast:12.2f} {1e3 * fast / K:12.3f} {1e3 * naive:13.2f} {speed:7.1f}x "
              f"{target:6.0f}x {('ok' if speed >= target else 'BELOW') if spec else '-'}")
    print(f"default suite calibrated in {suite_total:.2f} s (target <= 10 s at n=1024, d=768, K=1000)")

    la = lb = args.layers
    xs = [F.prepare_features(torch.randn(n, d // 2, generator=g)) for _ in range(la)]
    ys = [F.prepare_features(torch.randn(n, d // 2, generator=g)) for _ in range(lb)]
    res = F.calibrated_layer_alignment(xs, ys, "linear_cka", num_permutations=args.layer_permutations)
    layer_perms = F.permutations(n, args.layer_naive_perms, seed=7)
    t = best_of({
        "fast": lambda: F.calibrated_layer_alignment(xs, ys, "linear_cka",
                                                     num_permutations=args.layer_permutations),
        "naive": lambda: [torch.stack([torch.stack([F.linear_cka(a, b[pi]) for b in ys])
                                       for a in xs]).max() for pi in layer_perms]},
        args.repeats)
    fast, naive = t["fast"], t["naive"] / args.layer_naive_perms
    print(f"layers {la}x{lb} linear_cka, K={args.layer_permutations}: {fast:.2f} s "
          f"(target <= 30 s); naive {naive * args.layer_permutations:.1f} s estimated "
          f"({naive * 1e3:.0f} ms/perm) -> {naive * args.layer_permutations / fast:.1f}x; "
          f"calibrated max={float(res.calibrated):.3f}")
    full = K * n * n * 4 / 2**20
    print(f"peak RSS (VmHWM) {peak_rss_mb():.0f} MB (holding K x n x n float32 would need {full:.0f} MB)")


if __name__ == "__main__":
    main()
