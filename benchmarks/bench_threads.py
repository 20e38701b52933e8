"""The permutation null at the hardware's limit, measured in one run (ratios, not timed tests).

Four sections (all by default, or pick with ``--only``):

* ``threads``: every built-in measure's calibration (``calibrated_alignment``, K = 200, the
  names of ``alignment_callback.functional.registry.REGISTRY`` with default parameters, rows
  L2-normalized by ``prepare_features``) at n = 1024 and n = 8192, d = 128, with
  ``torch.set_num_threads(1)`` vs 2 threads: the 2-thread / 1-thread time ratio per measure
  (target: never > 1.0).  ``linear_predictivity`` is skipped at n = 8192 (its cross-validated
  ridge null grows like n^2.8: about 110 s per call at n = 4096 on one thread, so about 12
  minutes at 8192); a quick run skips it at its larger n too.
* ``knn``: the kNN null from prepared states (mutual kNN, CKNNA; K = 200, k = 10) at
  n = 1024 .. 16384, after one untimed call of each variant: ms per permutation and its growth
  against the growth of n·k (target: no faster than n·k, i.e. growth / (n/n0) <= 1).
* ``svcca``: SVCCA's whole calibration (n = 1024, d = 768, K = 1000, one thread) today vs the
  implementation when the target was set, whose basis came from a full ``torch.linalg.svd`` of
  the standardized features and whose null gathered (B, n, c) permuted bases for batched SVDs
  (its state and score functions are copied below as the baseline): the ratio (target >= 5x).
* ``gram``: the gram path (linear, RBF, unbiased CKA, RSA) at n = 1024, 2048, 4096 against the
  bound K·n²·4 B / read bandwidth (reading one permuted float32 n×n matrix per permutation),
  the bandwidth measured in the same run (best ``torch.sum`` over 1 GiB of float32, 1 thread):
  the null from prepared states (1 and 2 threads; permutations drawn beforehand) and the whole
  ``calibrated_alignment`` call (1 thread), each divided by the bound (target: <= 2).

Every timing is the best of ``--repeats`` (default 3), the variants interleaved in the same
run; the machine may be shared with other jobs (load average printed), so read the ratios.

    python benchmarks/bench_threads.py                   # everything (about 10-15 minutes)
    python benchmarks/bench_threads.py --only svcca gram # some sections
    python benchmarks/bench_threads.py --quick           # smoke run, small sizes (< 1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
import warnings

import _common
import torch
from _common import accelerators, best_of, load, synchronized, verdict

import alignment_callback.functional as F
from alignment_callback.functional._scaling import rescale_exactly
from alignment_callback.functional.permutation import Permutations
from alignment_callback.functional.pipeline import layer_nulls, prepare_side
from alignment_callback.functional.registry import REGISTRY, get_measure
from alignment_callback.functional.svcca import svcca_state

GRAM = ("linear_cka", "rbf_cka", "unbiased_cka", "rsa")
SKIP_LARGE = {"linear_predictivity": "cross-validated ridge null ~ n^2.8: ~110 s at n=4096, "
                                     "~12 min per call at n=8192 on one thread"}


def threaded(threads: int, fn):
    def run():
        torch.set_num_threads(threads)
        return fn()
    return run


def data(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return F.prepare_features(x), F.prepare_features(x + 2.0 * torch.randn(n, d, generator=g))


# ------------------------------------------------------------------------------ a. threads
def section_threads(quick: bool, repeats: int) -> None:
    ns, d, K = ((256, 512), 32, 50) if quick else ((1024, 8192), 128, 200)
    print(f"\n== a. every built-in measure, calibrated_alignment, K={K}, d={d}: 1 vs 2 threads, "
          f"best of {repeats} interleaved, load {load()} ==")
    print(f"{'measure':22s} " + " ".join(f"{'n=' + str(n) + ' 1T s':>12s} {'2T s':>7s} "
                                          f"{'2T/1T':>6s}" for n in ns))
    ratios: dict[tuple[str, int], float] = {}
    table: dict[str, list[str]] = {name: [] for name in REGISTRY}
    for n in ns:
        x, y = data(n, d)
        for name in REGISTRY:
            # quick too (the skip's code runs): its 2-thread call took up to 19 s at n = 512
            # on a busy 2-core machine
            if n == ns[-1] and name in SKIP_LARGE:
                table[name].append(f"{'skipped':>12s} {'':>7s} {'':>6s}")
                continue

            def fn(x=x, y=y, name=name):
                return F.calibrated_alignment(x, y, name, num_permutations=K)

            fn()  # warm-up (kernels compiled, first-call allocations)
            t = best_of({1: threaded(1, fn), 2: threaded(2, fn)}, repeats)
            ratios[(name, n)] = t[2] / t[1]
            table[name].append(f"{t[1]:12.3f} {t[2]:7.3f} {t[2] / t[1]:6.2f}")
            if not quick:
                print(f"  {name} n={n}: 1T {t[1]:.3f} s, 2T {t[2]:.3f} s (load {load()})", flush=True)
    for name, cells in table.items():
        print(f"{name:22s} " + " ".join(cells))
    worst = max(ratios, key=ratios.get)
    print(f"2-thread / 1-thread ratio: worst {ratios[worst]:.2f} ({worst[0]}, n={worst[1]}), "
          f"{sum(r > 1.0 for r in ratios.values())} of {len(ratios)} above 1.0 (target: never "
          f"> 1.0: {verdict(ratios[worst] <= 1.0)})")
    print(f"skipped at n={ns[-1]}: " + "; ".join(f"{k} ({v})" for k, v in SKIP_LARGE.items()))
    torch.set_num_threads(2)


# --------------------------------------------------------------------------------- b. kNN
def section_knn(quick: bool, repeats: int) -> None:
    ns, d, K = ((512, 1024, 2048), 32, 50) if quick else ((1024, 2048, 4096, 8192, 16384), 128, 200)
    k = 10
    print(f"\n== b. kNN null from prepared states: K={K}, k={k}, d={d}, ms per permutation, "
          f"best of {repeats} interleaved, load {load()} ==")
    print("growth = (t(n) / t(n0)) / (n / n0): <= 1 means no faster than n·k")
    print(f"{'n':>6s} {'measure':>11s} {'1T ms/perm':>10s} {'2T ms/perm':>10s} {'2T/1T':>6s} "
          f"{'1T growth':>9s} {'2T growth':>9s}")
    first: dict[tuple[str, int], float] = {}
    growth = {}
    for n in ns:
        x, y = data(n, d)
        perms = Permutations(n, K, seed=0)
        perms.tensor()  # drawn once, beforehand
        fns = {}
        for name in ("mutual_knn", "cknna"):
            m = get_measure(name, k=k)
            xs, ys = prepare_side(["x"], [x], [m], "x"), prepare_side(["y"], [y], [m], "y")
            for th in (1, 2):
                fns[(name, th)] = threaded(th, lambda m=m, xs=xs, ys=ys, p=perms:
                                           layer_nulls([m], xs, ys, p))
        for fn in fns.values():
            fn()  # warm-up, untimed: kernels compiled, first-call allocations
        t = best_of(fns, repeats)
        for name in ("mutual_knn", "cknna"):
            row = []
            for th in (1, 2):
                per = t[(name, th)] / K
                first.setdefault((name, th), per)
                g = per / first[(name, th)] / (n / ns[0])
                growth[(name, th, n)] = g
                row.append((per, g))
            print(f"{n:6d} {name:>11s} {1e3 * row[0][0]:10.3f} {1e3 * row[1][0]:10.3f} "
                  f"{row[1][0] / row[0][0]:6.2f} {row[0][1]:9.2f} {row[1][1]:9.2f}", flush=True)
    top = ns[-1]
    for th in (1, 2):
        worst = max(growth[(name, th, top)] for name in ("mutual_knn", "cknna"))
        print(f"{th} thread(s): per-permutation time n={ns[0]} -> {top} grew {worst * top / ns[0]:.1f}x "
              f"for {top / ns[0]:.0f}x n·k (growth ratio {worst:.2f}; target <= 1: "
              f"{verdict(worst <= 1.0)})")
    torch.set_num_threads(2)


# -------------------------------------------------------------------------------- c. SVCCA
def previous_svcca_state(x: torch.Tensor, cca_dim: int = 10) -> torch.Tensor:
    """The state function before the eigendecomposition (git 0432289^): a full SVD of the
    standardized features."""
    n, d = x.shape
    x = rescale_exactly(x)
    xc = x - x.mean(0, keepdim=True)
    std = xc.std(0, keepdim=True)
    xs = xc / torch.where(std > 0, std, torch.ones_like(std))
    u, s, _ = torch.linalg.svd(xs, full_matrices=False)
    if not bool(s[cca_dim - 1] > s[0] * max(n, d) * torch.finfo(s.dtype).eps):
        raise ValueError("svcca: fewer than cca_dim non-degenerate directions")
    return u[:, :cca_dim]


def previous_svcca_score(ux: torch.Tensor, uy: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """The score before the blocked gather (git 0432289^): a (B, n, c) gather and batched SVDs."""
    m = ux.T.unsqueeze(0) @ uy[perms]
    return torch.linalg.svdvals(m).clamp_max(1.0).mean(-1)


def _previous_prepare(x, role, shared, *, cca_dim):
    return previous_svcca_state(x, cca_dim)


def _previous_score(sx, sy, perms, *, cca_dim):
    return previous_svcca_score(sx, sy, perms)


def section_svcca(quick: bool, repeats: int) -> None:
    n, d, K = (256, 128, 100) if quick else (1024, 768, 1000)
    torch.set_num_threads(1)
    previous = dataclasses.replace(REGISTRY["svcca"], name="svcca_previous",
                                   prepare=_previous_prepare, score=_previous_score).bind()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x + 3.0 * torch.randn(n, d, generator=g)
    print(f"\n== c. SVCCA whole calibration: n={n}, d={d}, K={K}, 1 thread, best of {repeats} "
          f"interleaved, load {load()} ==")
    calls = {"previous": lambda: F.calibrated_alignment(x, y, previous, num_permutations=K),
             "today": lambda: F.calibrated_alignment(x, y, "svcca", num_permutations=K)}
    res = {k: fn() for k, fn in calls.items()}
    t = best_of(calls, repeats)
    state = best_of({"previous": lambda: previous_svcca_state(x), "today": lambda: svcca_state(x)},
                    repeats)
    diff = float((res["previous"].null - res["today"].null).abs().max())
    print(f"{'':9s} {'whole call s':>12s} {'ms/perm':>8s} {'one state s':>11s} {'p':>7s} {'raw':>8s}")
    for k in calls:
        print(f"{k:9s} {t[k]:12.3f} {1e3 * t[k] / K:8.3f} {state[k]:11.3f} "
              f"{float(res[k].p_value):7.4f} {float(res[k].raw):8.5f}")
    ratio = t["previous"] / t["today"]
    print(f"ratio previous / today: {ratio:.1f}x (target >= 5x: {verdict(ratio >= 5)}); "
          f"max |null difference| {diff:.1e}")
    torch.set_num_threads(2)


# --------------------------------------------------------------------------------- d. gram
def read_bandwidth(gib: float, repeats: int = 7) -> float:
    """Best-of-``repeats`` bytes/s of ``torch.sum`` over ``gib`` GiB of float32, 1 thread."""
    torch.set_num_threads(1)
    x = torch.ones(int(gib * 2**30) // 4)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def section_gram(quick: bool, repeats: int) -> None:
    sizes = {256: 200, 512: 100} if quick else {1024: 1000, 2048: 500, 4096: 200}
    d = 32 if quick else 128
    gib = 1 / 16 if quick else 1.0
    bw = read_bandwidth(gib)
    print(f"\n== d. gram path vs the read bound K·n²·4 B / bandwidth: d={d}, best of {repeats} "
          f"interleaved, load {load()} ==")
    print(f"read bandwidth, 1 thread (best torch.sum over {gib} GiB float32): "
          f"{bw / 1e9:.1f} GB/s")
    print("null: layer_nulls from prepared states, permutations drawn beforehand; whole: "
          "calibrated_alignment (prepare, observed, permutations drawn, null), 1 thread")
    extra = accelerators()  # CUDA where it exists: the whole call timed there too
    if extra:
        print("last column(s): the whole call on " + ", ".join(extra) + ", beside the CPU's")
    print(f"{'n':>5s} {'K':>5s} {'measure':>13s} {'bound s':>8s} {'null 1T s':>9s} {'null 2T s':>9s} "
          f"{'whole 1T s':>10s} {'1T/bnd':>7s} {'2T/bnd':>7s} {'whole/bnd':>9s}"
          + "".join(f" {'whole ' + dev + ' s':>12s}" for dev in extra))
    worst_null, worst_whole = 0.0, 0.0
    for n, K in sizes.items():
        x, y = data(n, d)
        on = {dev: (x.to(dev), y.to(dev)) for dev in extra}
        perms = Permutations(n, K, seed=0)
        perms.tensor()
        bound = K * n * n * 4 / bw
        for name in GRAM:
            m = get_measure(name)
            xs, ys = prepare_side(["x"], [x], [m], "x"), prepare_side(["y"], [y], [m], "y")

            def null(m=m, xs=xs, ys=ys, perms=perms):
                return layer_nulls([m], xs, ys, perms)

            def whole(x=x, y=y, m=m, K=K):
                return F.calibrated_alignment(x, y, m, num_permutations=K)

            calls = {"1T": threaded(1, null), "2T": threaded(2, null), "whole": threaded(1, whole)}
            for dev, (xd, yd) in on.items():
                calls[dev] = synchronized(lambda xd=xd, yd=yd, m=m, K=K: F.calibrated_alignment(
                    xd, yd, m, num_permutations=K), dev)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for dev in on:
                    calls[dev]()  # warm-up (kernels, allocator)
                t = best_of(calls, repeats)
            worst_null = max(worst_null, t["1T"] / bound)
            worst_whole = max(worst_whole, t["whole"] / bound)
            print(f"{n:5d} {K:5d} {name:>13s} {bound:8.3f} {t['1T']:9.3f} {t['2T']:9.3f} "
                  f"{t['whole']:10.3f} {t['1T'] / bound:7.2f} {t['2T'] / bound:7.2f} "
                  f"{t['whole'] / bound:9.2f}" + "".join(f" {t[dev]:12.4f}" for dev in on),
                  flush=True)
    print(f"target within 2x of the bound: null from prepared states (1 thread) worst "
          f"{worst_null:.2f}x ({verdict(worst_null <= 2)}); whole call worst "
          f"{worst_whole:.2f}x ({verdict(worst_whole <= 2)})")
    torch.set_num_threads(2)


SECTIONS = {"threads": section_threads, "knn": section_knn, "svcca": section_svcca,
            "gram": section_gram}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (< 1 min)")
    p.add_argument("--only", nargs="*", choices=sorted(SECTIONS), default=None)
    p.add_argument("--repeats", type=int, default=None, help="best of (default 3, quick 1)")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    _common.QUICK = args.quick
    from alignment_callback.functional import gram_null

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, numba backend "
          f"{gram_null.numba_available()}, load average at start {load()}")
    print("(shared machine: other jobs may run; variants are interleaved in one run and each "
          "timing is a best of several, so read the ratios)")
    for name in args.only or list(SECTIONS):
        t0 = time.perf_counter()
        SECTIONS[name](args.quick, repeats)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
