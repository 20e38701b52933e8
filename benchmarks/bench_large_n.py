"""Instant calibration and probes of any size, measured in one run (ratios, not timed tests).

Five sections (all by default, or pick with ``--only``):

* ``moments``: the analytic null (exact permutation moments + Pearson III, ``null="moments"``)
  vs K = 1000 permutations at n = 1024, d = 768 for linear / RBF (sigma="median") / unbiased
  CKA and RSA: p and τ side by side; the time of (i) the whole ``calibrated_alignment`` call
  and (ii) the null alone given prepared states (the permutation null, permutations drawn
  included, vs invariants of both sides + moments + Pearson III; vs the model side's
  invariants only, the per-step cost when the reference's are cached; vs moments + Pearson III
  given both invariants), with ratios (target stated by the issue: >= 50x faster).
* ``features``: linear CKA with ``null="moments"`` on the features path (d < n: no n×n
  matrix), n = 10,000 .. 100,000 at d = 256, each in a fresh process: time and peak RSS
  (VmHWM); targets: time(n = 100k) / time(n = 10k) <= 15 (linear in n) and peak RSS < 1.5 GB.
  Below n = d²/3 the cubic sum of the invariants takes a cheaper O(n²·d) route, so n = 10k is
  also run with the O(n·d³) route forced, and the growth is given both ways.
* ``knn``: mutual kNN and CKNNA (k = 10, K = 200, d = 256), together (``calibrate_measures``
  with both: one neighbor search and one pass over the permutations) and each alone, at
  n = 8,192 .. 65,536, each in a fresh process: time and peak RSS (target: < 2 GB at
  n = 65,536, where a dense float32 n×n matrix alone would need 17 GB).
* ``ddp``: the permutation null of linear CKA and of mutual kNN at n = 2048, K = 1000 split
  over 2 CPU processes (gloo, ``torch.multiprocessing`` spawn, 1 thread each, ``share_of`` +
  ``NullGather``) vs one process (1 thread): time ratio, and whether the nulls are identical.
* ``prep``: preparing a side: the exact-tie check (``has_tied_rows``, behind ``null="auto"``
  and every kNN search) of 2·10⁶ distinct rows vs sorting them (``torch.unique(dim=0)``), and
  the kNN neighbor lists at n = 64 .. 65,536 (k = 10) vs the same with the slot look-up table
  built too (no targets: what each preparation costs against what it replaces).

Every timing is the best of ``--repeats`` (default 3) runs, baseline and candidate interleaved
in the same run; the machine may be shared with other jobs (the load average is printed), so
the ratios are what to read.  Peak RSS is ``VmHWM`` of a fresh process started with
``subprocess.run([sys.executable, "-c", ...])`` (``ru_maxrss`` would include a large parent).
``--quick`` (a smoke run: small sizes, no verdicts) saves process start-ups: the runs of
``features`` share one fresh process, those of ``knn`` another (so a run's peak RSS there
includes the earlier runs'), and the single-process baseline of ``ddp`` runs in the script's
own process; every run's code still runs.

    python benchmarks/bench_large_n.py                     # everything (about 15-25 minutes)
    python benchmarks/bench_large_n.py --only moments ddp  # some sections
    python benchmarks/bench_large_n.py --quick             # smoke run, small sizes (< 1 min)
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time

import _common
import torch
from _common import (
    CHILD_PRELUDE,
    accelerators,
    best_of,
    load,
    run_child,
    synchronized,
    verdict,
)

P3_CALLS = 20  # moments + Pearson III take milliseconds: timed over this many calls
GRAM_MEASURES = (("linear_cka", {}), ("rbf_cka", {"sigma": "median"}), ("unbiased_cka", {}),
                 ("rsa", {}))


# ----------------------------------------------------------------------------- a. moments
def section_moments(quick: bool, repeats: int, threads: int) -> None:
    import alignment_callback.functional as F
    from alignment_callback.functional.analytic_null import analytic_fields, invariants
    from alignment_callback.functional.permutation import Permutations
    from alignment_callback.functional.pipeline import layer_nulls, prepare_side
    from alignment_callback.functional.registry import get_measure

    n, d, K = (256, 64, 200) if quick else (1024, 768, 1000)
    alpha = 0.05
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, d, generator=g) / math.sqrt(d)
    y = 0.05 * (x @ w) + torch.randn(n, d, generator=g)  # a weak shared signal: p ~ 0.05-0.1
    print(f"\n== a. moments null vs K={K} permutations: n={n}, d={d}, {threads} thread(s), "
          f"best of {repeats} interleaved, load {load()} ==")
    print("p and tau: permutation null (K draws) vs moments + Pearson III")
    print(f"{'measure':13s} {'p perm':>7s} {'p mom':>7s} {'tau perm':>9s} {'tau mom':>9s} "
          f"{'|dtau|':>8s}")
    whole, alone = {}, {}
    extra = accelerators()  # CUDA where it exists: the whole call timed there too
    on = {dev: (x.to(dev), y.to(dev)) for dev in extra}
    for name, kw in GRAM_MEASURES:
        calls = {null: (lambda null=null, name=name, kw=kw: F.calibrated_alignment(
            x, y, name, num_permutations=K, null=null, **kw))
            for null in ("permutation", "moments")}
        for dev, (xd, yd) in on.items():
            for null in ("permutation", "moments"):
                calls[f"{null} {dev}"] = synchronized(
                    lambda null=null, name=name, kw=kw, xd=xd, yd=yd: F.calibrated_alignment(
                        xd, yd, name, num_permutations=K, null=null, **kw), dev)
                calls[f"{null} {dev}"]()  # warm-up (kernels, allocator)
        rp, rm = calls["permutation"](), calls["moments"]()  # also warms up both paths
        print(f"{name:13s} {float(rp.p_value):7.4f} {float(rm.p_value):7.4f} "
              f"{float(rp.threshold):9.5f} {float(rm.threshold):9.5f} "
              f"{abs(float(rp.threshold) - float(rm.threshold)):8.1e}  "
              f"({rm.null_method}, raw {float(rp.raw):.5f})")
        whole[name] = best_of(calls, repeats)

        m = get_measure(name, **kw)
        xs_p, ys_p = (prepare_side([s], [t], [m], s, null="permutation") for s, t in (("x", x), ("y", y)))
        xs_m, ys_m = (prepare_side([s], [t], [m], s, null="moments") for s, t in (("x", x), ("y", y)))
        sx, sy = xs_m.states[m][0], ys_m.states[m][0]
        score = float(rm.raw)
        inv_y = invariants(sy)  # the cached reference's
        inv_x_cached = invariants(sx)

        def perm_null(m=m, xs=xs_p, ys=ys_p):
            return layer_nulls([m], xs, ys, Permutations(n, K, seed=0))

        def moments_both(s=score, sx=sx, sy=sy):
            return analytic_fields(s, invariants(sx), invariants(sy), alpha, 1.0, x.dtype)

        def moments_cached(s=score, sx=sx, inv_y=inv_y):
            return analytic_fields(s, invariants(sx), inv_y, alpha, 1.0, x.dtype)

        def moments_only(s=score, inv_x=inv_x_cached, inv_y=inv_y):  # timed over P3_CALLS calls
            for _ in range(P3_CALLS):
                analytic_fields(s, inv_x, inv_y, alpha, 1.0, x.dtype)

        alone[name] = best_of({"perm": perm_null, "both": moments_both, "cached": moments_cached,
                               "p3": moments_only}, repeats)
        alone[name]["p3"] /= P3_CALLS
        alone[name]["state"] = type(sx).__name__

    print("\n(i) the whole calibrated_alignment call (prepare both sides, observed score, null)"
          + "".join(f"; the same on {dev} beside the CPU" for dev in extra))
    print(f"{'measure':13s} {'permutation s':>13s} {'moments s':>10s} {'ratio':>7s}"
          + "".join(f" {'perm ' + dev + ' s':>13s} {'mom ' + dev + ' s':>12s} {'ratio':>7s}"
                    for dev in extra))
    for name, t in whole.items():
        print(f"{name:13s} {t['permutation']:13.3f} {t['moments']:10.3f} "
              f"{t['permutation'] / t['moments']:6.1f}x"
              + "".join(f" {t['permutation ' + dev]:13.4f} {t['moments ' + dev]:12.4f} "
                        f"{t['permutation ' + dev] / t['moments ' + dev]:6.1f}x" for dev in extra))
    print("\n(ii) the null alone given prepared states (permutation null: K permutations drawn and "
          "scored;\n     moments: invariants + moments + Pearson III; 'cached ref': the model "
          "side's invariants only;\n     'P3 only': moments + Pearson III given both invariants, "
          f"mean of {P3_CALLS} calls)")
    print(f"{'measure':13s} {'state':>12s} {'perm null s':>11s} {'mom both s':>10s} "
          f"{'cached ref s':>12s} {'P3 only ms':>10s} {'ratio both':>10s} {'ratio cached':>12s} "
          f"{'ratio P3':>9s}")
    for name, t in alone.items():
        print(f"{name:13s} {t['state']:>12s} {t['perm']:11.3f} {t['both']:10.4f} "
              f"{t['cached']:12.4f} {1e3 * t['p3']:10.3f} {t['perm'] / t['both']:9.1f}x "
              f"{t['perm'] / t['cached']:11.1f}x {t['perm'] / t['p3']:8.0f}x")
    worst = {k: min(t["perm"] / t[k] for t in alone.values()) for k in ("both", "cached", "p3")}
    worst_whole = min(t["permutation"] / t["moments"] for t in whole.values())
    print(f"target >= 50x faster: whole call worst {worst_whole:.1f}x "
          f"({verdict(worst_whole >= 50)}); null alone, both sides' invariants "
          f"worst {worst['both']:.1f}x ({verdict(worst['both'] >= 50)}); "
          f"cached reference worst {worst['cached']:.1f}x "
          f"({verdict(worst['cached'] >= 50)}); moments + P3 only worst "
          f"{worst['p3']:.0f}x ({verdict(worst['p3'] >= 50)})")


# -------------------------------------------------------------------- fresh-process children
# The children run the list args["runs"] (one run per process, except in a quick run: see
# run_children) and print {"runs": [one result per run]} last.
_FEATURES_CHILD = CHILD_PRELUDE + r"""
import alignment_callback.functional.moments.features as MF
gram_route_fraction = MF._GRAM_ROUTE_FRACTION
results = []
for run in args["runs"]:
    n, d = run["n"], run["d"]
    # "tensor": force the O(n·d³) route of the cubic sum at every n
    MF._GRAM_ROUTE_FRACTION = 0.0 if run["route"] == "tensor" else gram_route_fraction
    F.calibrated_alignment(torch.randn(600, 8), torch.randn(600, 8), "linear_cka", null="moments")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)  # float32, as a network's activations
    y = 0.05 * x + torch.randn(n, d, generator=g)
    before = rss_mb()
    t0 = time.perf_counter()
    res = F.calibrated_alignment(x, y, "linear_cka", null="moments")
    seconds = time.perf_counter() - t0
    results.append({"seconds": seconds, "peak_mb": hwm_mb(), "before_mb": before,
                    "p": float(res.p_value), "raw": float(res.raw), "method": res.null_method})
    del x, y, res
print(json.dumps({"runs": results}))
"""

_KNN_CHILD = CHILD_PRELUDE + r"""
results = []
for run in args["runs"]:
    n, d, K, measures = run["n"], run["d"], run["K"], run["measures"]
    F.calibrate_measures([torch.randn(64, 8)], [torch.randn(64, 8)], measures, num_permutations=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = x + 2.0 * torch.randn(n, d, generator=g)
    before = rss_mb()
    t0 = time.perf_counter()
    res = F.calibrate_measures({"x": x}, {"y": y}, measures, num_permutations=K, seed=0)
    seconds = time.perf_counter() - t0
    results.append({"seconds": seconds, "peak_mb": hwm_mb(), "before_mb": before,
                    "p": {m: float(r.p_value) for m, r in res.items()}})
    del x, y, res
print(json.dumps({"runs": results}))
"""


def run_children(code: str, timeout: float, runs: list[dict], quick: bool,
                 threads: int) -> list[dict]:
    """Each of ``runs`` (the child's arguments) by ``code``, each in a fresh process of its own,
    or, in a quick run, all in one fresh process (start-ups of a few seconds each saved; every
    run's code still runs, but a run's peak RSS then includes the earlier runs'): their
    results, in order."""
    batches = [runs] if quick else [[run] for run in runs]
    return [r for batch in batches
            for r in run_child(code, timeout * len(batch), runs=batch, threads=threads)["runs"]]


def fresh_process_note(quick: bool) -> str:
    return "one fresh process for all runs (quick)" if quick else "fresh process per run"


# ---------------------------------------------------------------------------- b. features
def section_features(quick: bool, repeats: int, threads: int) -> None:
    from alignment_callback.functional.moments import features as MF

    d = 64 if quick else 256
    # quick: n0 below d²/3 = 1365 (the gram route as called), the top above it
    ns = (1_024, 2_048) if quick else (10_000, 20_000, 50_000, 100_000)
    print(f"\n== b. linear CKA, null='moments', features path: d={d}, {fresh_process_note(quick)}, "
          f"{threads} thread(s), best of {repeats} (sizes interleaved), load {load()} ==")
    # the default chooses the cheaper route of the cubic sum Σ(x_iᵀx_j)³ (blocks of the gram,
    # O(n²·d), below n = d²/3); "linear route" forces the O(n·d³) one at the smallest n too
    runs = [(n, "default") for n in ns] + [(ns[0], "tensor")]
    best: dict[tuple, dict] = {}
    for _ in range(repeats):
        results = run_children(_FEATURES_CHILD, 1800, [{"n": n, "d": d, "route": route}
                                                       for n, route in runs], quick, threads)
        for (n, route), r in zip(runs, results):
            b = best.setdefault((n, route), {**r, "peak_max": r["peak_mb"]})
            b["peak_max"] = max(b["peak_max"], r["peak_mb"])
            if r["seconds"] < b["seconds"]:
                b.update(seconds=r["seconds"])
    print(f"{'n':>7s} {'route':>15s} {'time s':>8s} {'vs n0':>7s} {'n/n0':>6s} "
          f"{'peak RSS MB':>11s} "
          f"{'RSS before MB':>13s} {'inputs MB':>9s} {'n×n f32 MB':>10s} {'p':>7s} method")
    n0, top = ns[0], ns[-1]
    for n, route in runs:
        b = best[(n, route)]
        gram = n < MF._GRAM_ROUTE_FRACTION * d * d
        shown = "3-tensor (forced)" if route == "tensor" else ("gram" if gram else "3-tensor")
        print(f"{n:7d} {shown:>15s} {b['seconds']:8.2f} "
              f"{b['seconds'] / best[(n0, 'default')]['seconds']:6.1f}x "
              f"{n / n0:6.1f} {b['peak_max']:11.0f} {b['before_mb']:13.0f} "
              f"{2 * n * d * 4 / 2**20:9.0f} {n * n * 4 / 2**20:10.0f} {b['p']:7.4f} {b['method']}")
    ratio = best[(top, "default")]["seconds"] / best[(n0, "default")]["seconds"]
    linear = best[(top, "default")]["seconds"] / best[(n0, "tensor")]["seconds"]
    peak = best[(top, "default")]["peak_max"]
    first = "gram" if n0 < MF._GRAM_ROUTE_FRACTION * d * d else "3-tensor"
    print(f"time n={top} / n={n0} for {top / n0:.0f}x the samples: {ratio:.1f}x as called "
          f"(n={n0} on the {first} route), {linear:.1f}x on the O(n·d³) route at both "
          f"sizes (target <= 15x, linear not quadratic: {verdict(linear <= 15)}); "
          f"peak RSS at n={top}: {peak:.0f} MB (target < 1536 MB: {verdict(peak < 1536)})")


# --------------------------------------------------------------------------------- c. kNN
def section_knn(quick: bool, repeats: int, threads: int) -> None:
    d, K = (64, 50) if quick else (256, 200)
    ns = (2048,) if quick else (8192, 16384, 32768, 65536)
    big = 0 if quick else 65536
    configs = {"both": ["mutual_knn", "cknna"], "mutual_knn": ["mutual_knn"], "cknna": ["cknna"]}
    print(f"\n== c. mutual kNN and CKNNA, k=10, K={K}, d={d}: {fresh_process_note(quick)}, "
          f"{threads} thread(s), best of {repeats} (configurations interleaved; 1 run at "
          f"n={big or '-'}), load {load()} ==")
    print("'both': calibrate_measures with both measures (one neighbor search per side, one pass "
          "over the permutations)")
    print(f"{'n':>6s} {'config':>11s} {'time s':>8s} {'vs n0':>7s} {'n/n0':>5s} {'peak RSS MB':>11s} "
          f"{'RSS before MB':>13s} {'n×n f32 MB':>10s}")
    first: dict[str, float] = {}
    rows = {}
    for n in ns:
        best: dict[str, dict] = {}
        for _ in range(1 if n == big else repeats):
            results = run_children(_KNN_CHILD, 3600, [{"n": n, "d": d, "K": K, "measures": ms}
                                                      for ms in configs.values()], quick, threads)
            for label, r in zip(configs, results):
                b = best.setdefault(label, {**r, "peak_max": r["peak_mb"]})
                b["peak_max"] = max(b["peak_max"], r["peak_mb"])
                b["seconds"] = min(b["seconds"], r["seconds"])
        for label, b in best.items():
            first.setdefault(label, b["seconds"])
            rows[(n, label)] = b
            print(f"{n:6d} {label:>11s} {b['seconds']:8.2f} {b['seconds'] / first[label]:6.1f}x "
                  f"{n / ns[0]:5.0f} {b['peak_max']:11.0f} {b['before_mb']:13.0f} "
                  f"{n * n * 4 / 2**20:10.0f}", flush=True)
        sum_alone = best["mutual_knn"]["seconds"] + best["cknna"]["seconds"]
        print(f"{'':6s} {'':>11s} both / (mutual alone + cknna alone) = "
              f"{best['both']['seconds'] / sum_alone:.2f}")
    top = ns[-1]
    peak = max(rows[(top, label)]["peak_max"] for label in configs)
    print(f"peak RSS at n={top}: {peak:.0f} MB (target < 2048 MB at n=65536: "
          f"{verdict(peak < 2048)}{'' if top == 65536 else ', n=65536 not run'}); "
          f"a dense float32 n×n would need {top * top * 4 / 2**20:.0f} MB")


# --------------------------------------------------------------------------------- d. DDP
def _ddp_data(n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    return x, x + 2.0 * torch.randn(n, 64, generator=g)


def _ddp_worker(rank: int, world: int, port: int, n: int, K: int, repeats: int, out: str) -> None:
    """One process of the DDP run (world = 1: the single-process baseline, no collective)."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from alignment_callback.callback.distributed import NullGather, share_of
    from alignment_callback.functional.permutation import Permutations
    from alignment_callback.functional.pipeline import calibrate_prepared, prepare_side
    from alignment_callback.functional.registry import get_measure

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    x, y = _ddp_data(n)
    result = {}
    for name in ("linear_cka", "mutual_knn"):
        m = get_measure(name)
        xside, yside = prepare_side(["x"], [x], [m], "x"), prepare_side(["y"], [y], [m], "y")
        perms = Permutations(n, K, seed=0)
        best = math.inf
        for _ in range(repeats):
            if world > 1:
                dist.barrier()
                kw = {"share": share_of(K, rank, world), "gather": NullGather()}
            else:
                kw = {}
            t0 = time.perf_counter()
            res = calibrate_prepared([m], xside, yside, perms, **kw)[m]
            best = min(best, time.perf_counter() - t0)
        result[name] = {"seconds": best, "null": res.null.clone(), "p": float(res.p_value)}
    if rank == 0:
        torch.save(result, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_run(world: int, n: int, K: int, repeats: int, quick: bool) -> dict:
    """The null over ``world`` spawned processes; in a quick run, the single-process baseline
    (world = 1) runs in this process instead (one start-up saved; the same code)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        if quick and world == 1:
            threads = torch.get_num_threads()
            _ddp_worker(0, 1, 0, n, K, repeats, out)
            torch.set_num_threads(threads)
        else:
            mp.spawn(_ddp_worker, args=(world, _free_port(), n, K, repeats, out), nprocs=world,
                     join=True)
        return torch.load(out)


def section_ddp(quick: bool, repeats: int, threads: int) -> None:
    n, K = (512, 200) if quick else (2048, 1000)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned processes
    print(f"\n== d. the permutation null over 2 CPU processes (gloo, spawn, 1 thread each) vs one "
          f"process (1 thread): n={n}, K={K}, best of {repeats} calls per process, runs "
          f"interleaved, load {load()} ==")
    print("timed: calibrate_prepared on prepared sides (observed score, this rank's share of "
          "the null, all_gather_object of the partial nulls, calibration)")
    best: dict[int, dict] = {}
    for _ in range(1 if quick else 2):
        for world in (1, 2):
            r = _ddp_run(world, n, K, repeats, quick)
            if world not in best:
                best[world] = r
            else:
                for name in r:
                    best[world][name]["seconds"] = min(best[world][name]["seconds"],
                                                       r[name]["seconds"])
    print(f"{'measure':11s} {'1 process s':>11s} {'2 ranks s':>9s} {'ratio 2/1':>9s} "
          f"{'identical nulls':>15s} {'p':>7s}")
    for name in best[1]:
        one, two = best[1][name], best[2][name]
        same = torch.equal(one["null"], two["null"])
        print(f"{name:11s} {one['seconds']:11.3f} {two['seconds']:9.3f} "
              f"{two['seconds'] / one['seconds']:9.2f} {same!s:>15s} {two['p']:7.4f}")
    print("(2 ranks on the 2 cores of a shared machine: the ideal ratio is 0.5)")


# ------------------------------------------------------------------------ e. preparation
def section_prep(quick: bool, repeats: int, threads: int) -> None:
    from alignment_callback.functional import neighbors as nb
    from alignment_callback.functional.moments.invariants import has_tied_rows

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    n = 200_000 if quick else 2_000_000
    x = torch.randn(n, 2, generator=gen)  # distinct rows: the common case, nothing to merge
    print(f"\n== e. preparing a side: the exact-tie check and kNN neighbor lists, "
          f"{threads} thread(s)")
    t = best_of({"ours": lambda: has_tied_rows(x), "sort": lambda: torch.unique(x, dim=0)},
                repeats)
    print(f"exact-tie check of n={n:,} distinct float32 rows of width 2: has_tied_rows "
          f"{t['ours']:.3f} s vs torch.unique(dim=0) {t['sort']:.3f} s (sorting every row): "
          f"{t['sort'] / t['ours']:.1f}x faster")
    print("neighbor lists from a k=10 search (reciprocity flags): as prepared now vs with the "
          "slot look-up table built too (as before; only the batched torch null reads it)")
    print(f"{'n':>7s} {'calls':>5s} {'lists s':>9s} {'+ table s':>9s} {'ratio':>6s}")
    for rows in (64, 4096) if quick else (64, 4096, 65_536):
        idx, vals = nb.knn(torch.randn(rows, 32, generator=gen), 10)
        calls = max(1, 8192 // rows)  # a sub-millisecond preparation is timed over many calls

        def lists(table: bool) -> None:
            for _ in range(calls):
                prepared = nb.neighbor_lists_from(idx, vals)
                if table:
                    prepared.table  # noqa: B018 - builds the cached table
        t = best_of({"lists": lambda: lists(False), "table": lambda: lists(True)}, repeats)
        print(f"{rows:7d} {calls:5d} {t['lists']:9.4f} {t['table']:9.4f} "
              f"{t['table'] / t['lists']:5.1f}x")


SECTIONS = {"moments": section_moments, "features": section_features, "knn": section_knn,
            "ddp": section_ddp, "prep": section_prep}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (< 1 min)")
    p.add_argument("--only", nargs="*", choices=sorted(SECTIONS), default=None)
    p.add_argument("--repeats", type=int, default=None, help="best of (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (sections a-c)")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    _common.QUICK = args.quick
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average at start {load()}")
    print("(shared machine: other jobs may run; baseline and candidate are interleaved in one run "
          "and each timing is a best of several, so read the ratios)")
    for name in args.only or list(SECTIONS):
        t0 = time.perf_counter()
        SECTIONS[name](args.quick, repeats, args.threads)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
