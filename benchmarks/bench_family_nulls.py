"""Fast permutation nulls of the shape / CCA / predictivity / RV measures vs recomputation.

For each measure: the fast path (prepare both sides once, the observed score, then K null
scores in chunks of :func:`permutations`) timed end to end, after every prepare / score pair
has run once on a small input (kernels compiled, first-call allocations, untimed), and the
naive baseline, which calls
the public functional measure on ``(x, y[π])`` for ``--naive-perms`` permutations (it
recomputes both sides' SVDs / eigendecompositions / ridge fits each time).  Reported per
permutation; the speed-up is naive ms/perm over fast ms/perm (prepare cost included in fast).

    python benchmarks/bench_family_nulls.py                 # n=1024, d=768, K=1000, 1 thread
    python benchmarks/bench_family_nulls.py --quick         # n=128, d=64, K=50
    python benchmarks/bench_family_nulls.py --only cca_similarity,pwcca

``--only`` takes measure names (``shape_metric`` selects the row ``shape_metric(a=0.5)``,
``linear_predictivity`` both of its rows) or whole row labels; an unknown name is an error.

The RBF Bures null is O(n³) per permutation whatever d is (an (n−1)-rank factor and an
(n−1)×(n−1) SVD): it runs with ``--rbf-permutations`` (default 200) permutations.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from alignment_callback.functional import cca_measures as cm
from alignment_callback.functional import predictivity as pr
from alignment_callback.functional import rv as rvm
from alignment_callback.functional import shape_measures as sm
from alignment_callback.functional.permutation import (
    chunk_size_for,
    iter_permutations,
    permutations,
)
from alignment_callback.functional.preprocessing import prepare_features


def measures(n: int, d: int):
    """name -> (prepare, score, functional, per-permutation temporaries)."""
    r = min(n, d)
    return {
        "procrustes_similarity": (sm.procrustes_state, sm.procrustes_score,
                                  sm.procrustes_similarity, n * r),
        "shape_metric(a=0.5)": (partial(sm.shape_state, alpha=0.5), sm.shape_score,
                                partial(sm.shape_metric, alpha=0.5), n * r),
        "bures_similarity(lin)": (sm.bures_state, sm.bures_score, sm.bures_similarity, n * r),
        "bures_similarity(rbf)": (partial(sm.bures_state, kernel="rbf", sigma="median"),
                                  sm.bures_score,
                                  partial(sm.bures_similarity, kernel="rbf", sigma="median"),
                                  n * n),
        "cca_similarity": (cm.cca_state, cm.cca_score, cm.cca_similarity, n * r),
        "pwcca": (cm.pwcca_state, cm.pwcca_score, cm.pwcca, n * r),
        "linear_predictivity(cv)": (pr.predictivity_state, pr.predictivity_score,
                                    pr.linear_predictivity, n * n),
        "linear_predictivity(r=1)": (partial(pr.predictivity_state, ridge=1.0),
                                     pr.predictivity_score,
                                     partial(pr.linear_predictivity, ridge=1.0), n * n),
        "rv_coefficient": (rvm.rv_state, rvm.rv_score, rvm.rv_coefficient, n),
    }


def measure_name(label: str) -> str:
    """The measure's name in a row label: ``"shape_metric(a=0.5)"`` -> ``"shape_metric"``."""
    return label.split("(")[0]


def warm_up(table: dict, n: int = 64, d: int = 16) -> None:
    """Run every prepare / score pair and the naive baseline once on a small input, untimed, so
    that one-time costs (kernels compiled, first-call allocations) stay out of the first
    measure's times."""
    g = torch.Generator().manual_seed(1)
    x = prepare_features(torch.randn(n, d, generator=g))
    y = prepare_features(torch.randn(n, d, generator=g))
    for prep, score, fn, _ in table.values():
        score(prep(x), prep(y), permutations(n, 2, seed=0))
        fn(x, y)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--rbf-permutations", type=int, default=200)
    p.add_argument("--naive-perms", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", type=str, default="", help="comma-separated measure names")
    p.add_argument("--quick", action="store_true", help="n=128, d=64, K=50")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.permutations, args.rbf_permutations = 128, 64, 50, 50
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    table = measures(args.n, args.d)
    unknown = sorted(only - {measure_name(label) for label in table} - set(table))
    if unknown:
        p.error(f"--only: unknown measure name(s) {', '.join(unknown)}; choose from "
                f"{', '.join(dict.fromkeys(measure_name(label) for label in table))}")
    table = {k: v for k, v in table.items() if not only or {k, measure_name(k)} & only}
    torch.set_num_threads(args.threads)
    n, d = args.n, args.d
    g = torch.Generator().manual_seed(0)
    x = prepare_features(torch.randn(n, d, generator=g))
    y = prepare_features(torch.randn(n, d, generator=g))
    print(f"n={n} d={d} K={args.permutations} (RBF Bures: K={args.rbf_permutations}) float32 "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'measure':25s} {'K':>5s} {'fast total s':>12s} {'fast ms/perm':>12s} "
          f"{'naive ms/perm':>13s} {'speed-up':>9s}")
    naive_perms = permutations(n, args.naive_perms, seed=123)
    warm_up(table)
    for name, (prep, score, fn, cost) in table.items():
        k = args.rbf_permutations if "rbf" in name else args.permutations
        t0 = time.perf_counter()
        sx, sy = prep(x), prep(y)
        score(sx, sy, torch.arange(n)[None])
        for perms in iter_permutations(n, k, seed=0, chunk_size=chunk_size_for(cost)):
            score(sx, sy, perms)
        fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        for pi in naive_perms:
            fn(x, y[pi])
        naive = (time.perf_counter() - t0) / len(naive_perms)
        print(f"{name:25s} {k:5d} {fast:12.2f} {1e3 * fast / k:12.2f} {1e3 * naive:13.1f} "
              f"{naive * k / fast:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
