"""Gram-family permutation null: the previous gather + float32 dot vs ``gram_null``, in one run.

For each n: milliseconds per permutation of

* ``old``: the previous loop of ``gram_measures.gram_score`` (two ``index_select`` into n×n
  buffers and a float32 ``torch.dot`` per permutation; ``gram_score`` now calls
  ``gram_dots``), copied here as the baseline;
* ``new``: :func:`alignment_callback.functional.gram_null.gram_dots` (exact float64), with 1 and
  with 2 threads (``torch.set_num_threads``; the library follows it as an upper bound);

next to the memory-read bound ``n²·4 B / bandwidth`` (reading the permuted float32 matrix once)
and the ratio to it.  The bandwidth is measured first: best of several ``torch.sum`` over a
1 GiB float32 tensor on one thread (1/16 GiB in a quick run).  Then the same for
``gram_dots_layers`` with 4×4 and 12×12 layers (bound: the L moved matrices read once per
permutation) against the previous layer loop (L gathers + one float32 matrix product per
permutation).

Every timing is the best of 3 repetitions; the load average is printed because the machine may
be shared.  ``old err`` is the previous float32 result minus the exact one, divided by ‖A‖·‖B‖ (in
CKA units).

    python benchmarks/bench_gram_null.py            # n = 1024, 2048, 4096 (about 2 minutes)
    python benchmarks/bench_gram_null.py --quick    # smoke run, n = 256 and 512
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from alignment_callback.functional import gram_null
from alignment_callback.functional.gram_null import gram_dots, gram_dots_layers

CHUNK = 256  # permutations per call, as permutation.null_from_states passes them


def old_gram_dots(a: torch.Tensor, b: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """The previous ``gram_score`` loop without the final division by the norms."""
    a = a.reshape(-1)
    out = torch.empty(perms.shape[0], dtype=a.dtype, device=a.device)
    rows, gathered = torch.empty_like(b), torch.empty_like(b)
    for i, p in enumerate(perms):
        torch.index_select(b, 0, p, out=rows)
        torch.index_select(rows, 1, p, out=gathered)
        out[i] = torch.dot(a, gathered.reshape(-1))
    return out


def old_layer_dots(fixed: list[torch.Tensor], moved: list[torch.Tensor], perms: torch.Tensor) -> torch.Tensor:
    """The previous ``gram_layer_scores`` loop (moved side gathered) without the norms: (P, LB, LA)."""
    fixed_flat = torch.stack([m.reshape(-1) for m in fixed])
    n = moved[0].shape[0]
    rows = moved[0].new_empty(n, n)
    gathered = moved[0].new_empty(len(moved), n, n)
    out = []
    for p in perms:
        for i, m in enumerate(moved):
            torch.index_select(m, 0, p, out=rows)
            torch.index_select(rows, 1, p, out=gathered[i])
        out.append(gathered.view(len(moved), -1) @ fixed_flat.T)
    return torch.stack(out)


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Best-of-``repeats`` bytes/s of ``torch.sum`` over a ``gib`` GiB float32 tensor, 1 thread."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def chunked(fn, *args, perms: torch.Tensor):
    return lambda: [fn(*args, chunk) for chunk in perms.split(CHUNK)]


def symmetric(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen)
    return m + m.T


def with_threads(threads: int, fn):
    def run():
        torch.set_num_threads(threads)
        return fn()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 256, 512 with few permutations")
    args = p.parse_args()
    sizes = {256: (16, 128), 512: (8, 64)} if args.quick else {1024: (32, 256), 2048: (16, 128), 4096: (8, 64)}
    # (layers per side, n): (permutations old, new)
    layer_sizes = {(4, 256): (4, 32)} if args.quick else {
        (4, 1024): (8, 64), (4, 2048): (4, 32), (12, 1024): (4, 32)}
    threads_before = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, numba backend: "
          f"{gram_null.numba_available()}, load average at start: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("(the machine is shared with other jobs: every timing is the best of 3 repetitions)")
    torch.set_num_threads(1)
    gib = 1 / 16 if args.quick else 1.0
    bw = read_bandwidth(gib)
    print(f"read bandwidth, 1 thread (best torch.sum over {gib:g} GiB float32): "
          f"{bw / 1e9:.1f} GB/s")

    gen = torch.Generator().manual_seed(0)
    print("\ngram_dots, float32 matrices, ms per permutation (chunks of 256 permutations)")
    print(f"{'n':>5s} {'K old/new':>9s} {'old 1T':>8s} {'old 2T':>8s} {'new 1T':>8s} {'new 2T':>8s} "
          f"{'bound':>7s} {'old/bnd':>7s} {'1T/bnd':>7s} {'2T/bnd':>7s} {'speedup':>7s} {'old err':>8s}")
    for n, (k_old, k_new) in sizes.items():
        a, b = symmetric(n, gen), symmetric(n, gen)
        perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(k_new)])
        gram_dots(a, b, perms[:2])  # compile / load the kernel
        exact = gram_dots(a, b, perms[:k_old])
        old_vals = old_gram_dots(a, b, perms[:k_old]).double()
        err = ((old_vals - exact).abs().max() / (a.double().norm() * b.double().norm())).item()
        old1 = best_of(with_threads(1, chunked(old_gram_dots, a, b, perms=perms[:k_old]))) / k_old
        old2 = best_of(with_threads(2, chunked(old_gram_dots, a, b, perms=perms[:k_old]))) / k_old
        new1 = best_of(with_threads(1, chunked(gram_dots, a, b, perms=perms))) / k_new
        new2 = best_of(with_threads(2, chunked(gram_dots, a, b, perms=perms))) / k_new
        bound = n * n * 4 / bw
        print(f"{n:5d} {k_old:4d}/{k_new:<4d} {1e3 * old1:8.3f} {1e3 * old2:8.3f} {1e3 * new1:8.3f} "
              f"{1e3 * new2:8.3f} {1e3 * bound:7.3f} {old1 / bound:7.2f} {new1 / bound:7.2f} "
              f"{new2 / bound:7.2f} {old1 / new1:6.1f}x {err:8.1e}")

    print("\ngram_dots_layers, L×L float32 layers, ms per permutation (bound: L moved matrices read once)")
    print(f"{'L':>3s} {'n':>5s} {'K old/new':>9s} {'old 1T':>8s} {'new 1T':>8s} {'new 2T':>8s} {'bound':>7s} "
          f"{'old/bnd':>7s} {'1T/bnd':>7s} {'2T/bnd':>7s} {'speedup':>7s}")
    for (layers, n), (k_old, k_new) in layer_sizes.items():
        fixed = [symmetric(n, gen) for _ in range(layers)]
        moved = [symmetric(n, gen) for _ in range(layers)]
        perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(k_new)])
        gram_dots_layers(fixed, moved, perms[:2])
        old1 = best_of(with_threads(1, chunked(old_layer_dots, fixed, moved, perms=perms[:k_old]))) / k_old
        new1 = best_of(with_threads(1, chunked(gram_dots_layers, fixed, moved, perms=perms))) / k_new
        new2 = best_of(with_threads(2, chunked(gram_dots_layers, fixed, moved, perms=perms))) / k_new
        bound = layers * n * n * 4 / bw
        print(f"{layers:3d} {n:5d} {k_old:4d}/{k_new:<4d} {1e3 * old1:8.3f} {1e3 * new1:8.3f} {1e3 * new2:8.3f} "
              f"{1e3 * bound:7.3f} {old1 / bound:7.2f} {new1 / bound:7.2f} {new2 / bound:7.2f} "
              f"{old1 / new1:6.1f}x")
    torch.set_num_threads(threads_before)
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
