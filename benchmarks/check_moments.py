"""Heavy checks of the analytic permutation nulls (alignment_callback.functional.moments).

Sections (all by default, or pick with ``--only``):

* ``exhaustive``: exact moments vs the moments of all n! permutations (n = 4..8).
* ``mc``: exact moments vs K = 20,000 Monte-Carlo permutations at n = 256 (z-scores).
* ``features``: ``feature_invariants`` vs ``gram_invariants(X Xᵀ)`` (relative differences).
* ``pvalues``: the Pearson III tail ``P(S ≥ t)`` vs the permutation tail at thresholds whose
  permutation p-value is in [0.005, 0.5] (K = 20,000 permutations, or all n! at n = 8),
  over measures × data × d/n × n; prints the max absolute error per cell and the exact skew.
* ``validity``: the same over several draws per cell with the diagnostics of the validity
  rule (n, skew, pair leverage); rows saved as JSON.
* ``fpr``: false-positive rate of the moments p-value over independent draws.
* ``bench``: moments null vs a K = 1000 permutation null at n = 1024, d = 768 (everything timed
  runs once first on a small input, untimed).
* ``memory``: ``feature_invariants`` at n = 100,000, d = 256 in a fresh process with
  ``--threads`` torch threads (time, peak RSS).

    python benchmarks/check_moments.py [--only pvalues fpr] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import math
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from alignment_callback.functional import moments as M
from alignment_callback.functional.calibration import threshold_index
from alignment_callback.functional.gram_measures import GramState, gram_score, rsa_state
from alignment_callback.functional.kernels import center_gram, rbf_gram, u_center_gram
from alignment_callback.functional.neighbors import knn

F64 = torch.float64
PROBS = np.array([0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5])


# ------------------------------------------------------------------------------- data, matrices

def data(kind: str, n: int, d: int, rng: np.random.Generator) -> torch.Tensor:
    if kind == "gauss":
        x = rng.standard_normal((n, d))
    elif kind == "t3":
        x = rng.standard_t(3, size=(n, d))
    elif kind == "lowrank":  # rank-3 signal plus 10% noise
        signal = rng.standard_normal((n, 3)) @ rng.standard_normal((3, d))
        x = signal + 0.3 * rng.standard_normal((n, d))
    else:
        raise ValueError(kind)
    return torch.from_numpy(x).to(F64)


def matrix(measure: str, x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0)
    if measure == "linear":
        return center_gram(xc @ xc.T)
    if measure == "rbf":
        return center_gram(rbf_gram(x, "median"))
    if measure == "unbiased":
        return u_center_gram(x @ x.T)
    if measure == "rsa":
        return rsa_state(x).matrix
    raise ValueError(measure)


def perm_scores(a: torch.Tensor, b: torch.Tensor, perms: torch.Tensor, dtype=F64) -> torch.Tensor:
    """``⟨A, B[π][:, π]⟩ / (‖A‖‖B‖)`` for each row of perms, on the library's own null path
    (``gram_score``, which reads one triangle of each permuted gram: ``gram_null.gram_dots``)."""
    a_, b_ = a.to(dtype), b.to(dtype)
    return gram_score(GramState(a_, a_.norm()), GramState(b_, b_.norm()), perms).to(F64)


def random_perms(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(k, n, generator=g), dim=1)


def all_perms(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(n))))


def dist_moments(t: torch.Tensor) -> tuple[float, float, float]:
    mu = t.mean()
    c = t - mu
    var = (c * c).mean()
    return float(mu), float(var), float((c ** 3).mean() / var ** 1.5)


# ------------------------------------------------------------------------------------ sections

def section_exhaustive() -> None:
    print("\n== exhaustive: exact moments vs all n! permutations ==")
    print("worst of |Δmean|/σ, |Δvar|/var, |Δskew| over linear/RBF/unbiased/RSA/symmetric/kNN")
    rng = np.random.default_rng(0)
    for n in (4, 5, 6, 7, 8):
        perms = all_perms(n)
        worst = 0.0
        for measure in ("linear", "rbf", "unbiased", "rsa", "symmetric"):
            if measure == "symmetric":
                a = torch.from_numpy(rng.standard_normal((n, n)))
                b = torch.from_numpy(rng.standard_normal((n, n)))
                a, b = a + a.T, b + b.T
            else:
                a = matrix(measure, data("t3", n, 3, rng))
                b = matrix(measure, data("t3", n, 3, rng))
            ex = dist_moments(perm_scores(a, b, perms))
            m = M.cosine_moments(M.gram_invariants(a), M.gram_invariants(b))
            err = max(abs(m.mean - ex[0]) / math.sqrt(ex[1]), abs(m.variance - ex[1]) / ex[1],
                      abs(m.skewness - ex[2]))
            worst = max(worst, err)
        for k in (1, 2, 3):
            if k >= n:
                continue
            x, y = data("gauss", n, 3, rng), data("gauss", n, 3, rng)
            ix, iy = knn(x, k)[0], knn(y, k)[0]
            ax, ay = adjacency(ix), adjacency(iy)
            moved = ay[perms[:, :, None], perms[:, None, :]].reshape(len(perms), -1)
            t = ax.reshape(-1) @ moved.T
            ex = dist_moments(t)
            m = M.permutation_moments(M.knn_graph_invariants(ix), M.knn_graph_invariants(iy))
            err = max(abs(m.mean - ex[0]) / ex[0], abs(m.variance - ex[1]) / max(ex[1], 1e-300),
                      abs(m.skewness - ex[2]))
            worst = max(worst, err)
        print(f"n={n}: {len(perms)} permutations, worst error {worst:.2e}")


def adjacency(idx: torch.Tensor) -> torch.Tensor:
    n, k = idx.shape
    m = torch.zeros(n, n, dtype=F64)
    m[torch.arange(n).repeat_interleave(k), idx.reshape(-1)] = 1.0
    return m


def section_mc(k_perms: int = 20_000, n: int = 256) -> None:
    print(f"\n== Monte-Carlo: exact moments vs K={k_perms} permutations at n={n} ==")
    print("z = (MC estimate − exact) / MC standard error, for E[T], E[(T−μ)²], E[(T−μ)³]/σ³")
    rng = np.random.default_rng(1)
    perms = random_perms(n, k_perms, 2)
    cases = []
    for measure in ("linear", "rbf", "unbiased", "rsa"):
        for kind in ("gauss", "t3", "lowrank"):
            x, y = data(kind, n, 16, rng), data(kind, n, 16, rng)
            cases.append((f"{measure}/{kind}", matrix(measure, x), matrix(measure, y)))
    a = torch.from_numpy(rng.standard_normal((n, n)))
    b = torch.from_numpy(rng.standard_normal((n, n)))
    cases.append(("symmetric", a + a.T, b + b.T))
    for name, a, b in cases:
        m = M.cosine_moments(M.gram_invariants(a), M.gram_invariants(b))
        s = perm_scores(a, b, perms, dtype=torch.float32)
        print(f"{name:18s} {mc_z(s, m)}")
    for k in (5, 10, 30):
        x, y = data("t3", n, 8, rng), data("t3", n, 8, rng)
        ix, iy = knn(x, k)[0], knn(y, k)[0]
        m = M.mutual_knn_moments(M.knn_graph_invariants(ix), M.knn_graph_invariants(iy))
        s = mutual_knn_perm(ix, iy, perms)
        print(f"{'mutual_knn k=' + str(k):18s} {mc_z(s, m)}")


def mutual_knn_perm(ix: torch.Tensor, iy: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    n, k = ix.shape
    member = torch.zeros(n * n, dtype=torch.bool)
    member[(torch.arange(n)[:, None] * n + ix).reshape(-1)] = True
    inv = torch.argsort(perms, dim=1)
    out = []
    for s in range(0, perms.shape[0], 256):
        p, q = perms[s:s + 256], inv[s:s + 256]
        moved = torch.gather(q, 1, iy[p].reshape(len(p), -1)).view(len(p), n, k)
        keys = moved + (torch.arange(n) * n)[None, :, None]
        out.append(member[keys].sum((1, 2)).to(F64))
    return torch.cat(out) / (n * k)


def mc_z(s: torch.Tensor, m: M.PermutationMoments) -> str:
    k = s.numel()
    c = s - m.mean
    z_mean = float(c.mean() / (c.std() / math.sqrt(k)))
    c2 = c * c
    z_var = float((c2.mean() - m.variance) / (c2.std() / math.sqrt(k)))
    c3 = c ** 3 / m.std ** 3
    z_skew = float((c3.mean() - m.skewness) / (c3.std() / math.sqrt(k)))
    return (f"skew={m.skewness:+.3f}  z_mean={z_mean:+.2f}  z_var={z_var:+.2f}  "
            f"z_skew={z_skew:+.2f}  (MC skew {float(c3.mean()):+.3f})")


def section_features() -> None:
    print("\n== feature_invariants vs gram_invariants(X Xᵀ): max relative difference ==")
    rng = np.random.default_rng(3)
    for n, d in ((200, 4), (300, 30), (1000, 20), (500, 64), (64, 512)):
        for kind in ("gauss", "t3", "lowrank"):
            xc = data(kind, n, d, rng)
            xc = xc - xc.mean(0)
            a, b = M.feature_invariants(xc), M.gram_invariants(xc @ xc.T)
            rel = max(abs(getattr(a, f) - getattr(b, f)) / max(abs(getattr(b, f)), 1e-300)
                      for f in ("diag_sq", "frob_sq", "diag_cube", "cube", "diag_frob",
                                "diag_quad", "trace_cube", "norm", "diag_mean", "offdiag_mean"))
            ma, mb = M.cosine_moments(a, a), M.cosine_moments(b, b)
            mrel = max(abs(ma.mean - mb.mean) / mb.mean,
                       abs(ma.variance - mb.variance) / mb.variance,
                       abs(ma.skewness - mb.skewness) / abs(mb.skewness))
            print(f"n={n:5d} d={d:4d} {kind:8s} invariants {rel:.1e}  moments {mrel:.1e}")


def tail_error(s: torch.Tensor, m: M.PermutationMoments) -> tuple[float, float]:
    """Max |P3 tail − permutation p-value| over thresholds with permutation p in [0.005, 0.5];
    also the error at the (1 − 0.05) threshold in p units."""
    k = s.numel()
    srt = torch.sort(s, descending=True).values
    worst = 0.0
    for p in PROBS:
        t = srt[round(p * k) - 1]  # #{s >= t} ≈ p·K
        emp = float((s >= t).sum()) / k
        p3 = float(M.pearson3_sf(t, m.mean, m.std, m.skewness))
        worst = max(worst, abs(p3 - emp))
    return worst, 0.0


def section_pvalues(k_perms: int = 20_000, ns=(8, 16, 32, 64, 128, 256), seed: int = 4) -> None:
    print(f"\n== Pearson III vs permutation tail, K={k_perms} (n = 8: all 40,320) ==")
    print("max |P3 p − permutation p| over permutation p in [0.005, 0.5]; "
          "MC s.e. ≤ 0.0035; columns: n → err (skew, leverage); * = outside pearson3_valid")
    rng = np.random.default_rng(seed)
    rows = []
    for measure in ("linear", "rbf", "unbiased", "rsa"):
        for kind in ("gauss", "t3", "lowrank"):
            for ratio in (0.1, 1.0, 8.0):
                line = f"{measure:8s} {kind:7s} d/n={ratio:<4g}"
                for n in ns:
                    d = max(1, round(ratio * n))
                    x, y = data(kind, n, d, rng), data(kind, n, d, rng)
                    a, b = matrix(measure, x), matrix(measure, y)
                    m = M.cosine_moments(M.gram_invariants(a), M.gram_invariants(b))
                    perms = all_perms(n) if n <= 8 else random_perms(n, k_perms, n)
                    s = perm_scores(a, b, perms, dtype=F64 if n <= 128 else torch.float32)
                    err, _ = tail_error(s, m)
                    lev = M.pair_leverage(M.gram_invariants(a), M.gram_invariants(b))
                    ok = M.pearson3_valid(n, m.skewness, lev)
                    rows.append((measure, kind, ratio, n, m.skewness, err, lev, ok))
                    line += f" | {n:3d}: {err:.3f}{' ' if ok else '*'}({m.skewness:+.2f},{lev:.2f})"
                print(line, flush=True)
    print("\nvalidity summary: worst error among cells with n >= N and |skew| <= S")
    for n_min in (8, 16, 32, 64):
        for s_max in (0.5, 1.0, 1.5, 2.0, 3.0):
            sel = [r[5] for r in rows if r[3] >= n_min and abs(r[4]) <= s_max]
            if sel:
                print(f"  n >= {n_min:3d}, |skew| <= {s_max}: {len(sel):3d} cells, "
                      f"worst {max(sel):.4f}, mean {sum(sel) / len(sel):.4f}")
    inside = [r[5] for r in rows if r[7]] or [math.nan]
    outside = [r[5] for r in rows if not r[7]] or [math.nan]
    print(f"inside the rule (n >= {M.PEARSON3_MIN_N}, |skew| <= {M.PEARSON3_MAX_ABS_SKEW}, "
          f"leverage <= {M.PEARSON3_MAX_LEVERAGE}): {len(inside)}/{len(rows)} cells, worst "
          f"{max(inside):.4f}, mean {sum(inside) / len(inside):.4f}, > 0.01: "
          f"{sum(e > 0.01 for e in inside)}; outside: worst {max(outside):.4f}")
    bad = [r for r in rows if r[5] > 0.01]
    print("cells with error > 0.01:", ", ".join(f"{r[0]}/{r[1]}/{r[2]:g}/n={r[3]} "
                                                 f"(skew {r[4]:+.2f}, {r[5]:.3f})" for r in bad))


def section_validity(k_perms: int = 20_000, ns=(16, 32, 64, 128), seeds: int = 3,
                     out: str = "/tmp/check_moments_validity.json") -> None:
    """Many cells (seeds) with the diagnostics a validity rule can use: n, skew, leverage."""
    import json
    print(f"\n== validity rule: P3 tail error vs n, skew, pair leverage (K={k_perms}, "
          f"{seeds} draws per cell) ==")
    rng = np.random.default_rng(8)
    rows = []
    for measure in ("linear", "rbf", "unbiased", "rsa"):
        for kind in ("gauss", "t3", "lowrank"):
            for ratio in (0.1, 1.0, 8.0):
                for n in ns:
                    d = max(1, round(ratio * n))
                    for _ in range(seeds):
                        a = matrix(measure, data(kind, n, d, rng))
                        b = matrix(measure, data(kind, n, d, rng))
                        ia, ib = M.gram_invariants(a), M.gram_invariants(b)
                        m = M.cosine_moments(ia, ib)
                        perms = random_perms(n, k_perms, len(rows))
                        s = perm_scores(a, b, perms, dtype=F64 if n <= 32 else torch.float32)
                        err, _ = tail_error(s, m)
                        lev = M.pair_leverage(ia, ib)
                        lev_d = n * (ia.max_diag_sq / ia.diag_sq if ia.diag_sq > 0 else 0) * (
                            ib.max_diag_sq / ib.diag_sq if ib.diag_sq > 0 else 0)
                        rows.append({"measure": measure, "kind": kind, "ratio": ratio,
                                     "n": n, "skew": m.skewness, "lev": lev, "lev_d": lev_d,
                                     "err": err})
                print(f"{measure:8s} {kind:7s} d/n={ratio:<4g} worst err "
                      f"{max(r['err'] for r in rows[-len(ns) * seeds:]):.3f}", flush=True)
    with open(out, "w") as fh:
        json.dump(rows, fh)
    print(f"rows saved to {out}")
    summarize_validity(rows)


def summarize_validity(rows: list[dict]) -> None:
    print("rule: n >= N, |skew| <= S, leverage <= L  ->  cells, worst error, share kept")
    for n_min in (16, 32, 64):
        for s_max in (1.0, 1.5, 2.0, 3.0):
            for l_max in (0.05, 0.1, 0.2, 0.5, math.inf):
                sel = [r["err"] for r in rows
                       if r["n"] >= n_min and abs(r["skew"]) <= s_max and r["lev"] <= l_max]
                if sel:
                    print(f"  N={n_min:3d} S={s_max:3.1f} L={l_max:<5g}: {len(sel):4d} cells, "
                          f"worst {max(sel):.4f}, >0.01: {sum(e > 0.01 for e in sel):3d}, "
                          f"kept {len(sel) / len(rows):.2f}")


def section_fpr(draws: int = 400, alpha: float = 0.05) -> None:
    print(f"\n== false-positive rate of the moments p-value, {draws} draws/cell, alpha={alpha} ==")
    band = alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws)
    print(f"bound alpha + 3σ = {band:.4f}; 'valid': share of draws inside pearson3_valid, "
          "'rate|valid': the false-positive rate among them")
    rng = np.random.default_rng(5)
    for measure in ("linear", "rbf", "unbiased"):
        for n in (32, 64, 128):
            for kind in ("gauss", "t3", "lowrank"):
                line = f"{measure:8s} n={n:3d} {kind:7s}"
                for ratio in (0.1, 1.0, 8.0):
                    d = max(1, round(ratio * n))
                    hits, kept, kept_hits, skews = 0, 0, 0, []
                    for _ in range(draws):
                        a = matrix(measure, data(kind, n, d, rng))
                        b = matrix(measure, data(kind, n, d, rng))
                        ia, ib = M.gram_invariants(a), M.gram_invariants(b)
                        m = M.cosine_moments(ia, ib)
                        s = float((a * b).sum() / (a.norm() * b.norm()))
                        hit = float(M.pearson3_sf(s, m.mean, m.std, m.skewness)) <= alpha
                        ok = M.pearson3_valid(n, m.skewness, M.pair_leverage(ia, ib))
                        hits += hit
                        kept += ok
                        kept_hits += hit and ok
                        skews.append(m.skewness)
                    rate = hits / draws
                    flag = "" if rate <= band else " !"
                    cond = f"{kept_hits / kept:.3f}" if kept else "  -  "
                    line += (f" | d/n={ratio:g}: {rate:.3f}{flag} valid {kept / draws:.2f} "
                             f"rate|valid {cond}")
                print(line, flush=True)


def section_bench(n: int = 1024, d: int = 768, k_perms: int = 1000, alpha: float = 0.05,
                  warm_up: bool = True) -> None:
    """Times of the moments null and of the permutation null; with ``warm_up`` (default=True)
    everything timed runs once first on a small input, untimed (kernels compiled, first-call
    allocations), so that one-time costs stay out of the first measure's times."""
    if warm_up:
        _bench_run(32, 8, 20, alpha, seed=60, show=False)
    print(f"\n== moments null vs K={k_perms} permutation null, n={n}, d={d}, "
          f"threads={torch.get_num_threads()} ==")
    _bench_run(n, d, k_perms, alpha, seed=6, show=True)


def _bench_run(n: int, d: int, k_perms: int, alpha: float, seed: int, show: bool) -> None:
    """The timed body of ``section_bench``; prints its lines when ``show``."""
    out = print if show else (lambda *args, **kwargs: None)
    rng = np.random.default_rng(seed)
    x = data("gauss", n, d, rng)
    w = torch.from_numpy(rng.standard_normal((d, d))) / math.sqrt(d)
    y = 0.02 * (x @ w) + data("gauss", n, d, rng)  # a weak shared signal
    for measure in ("linear", "rbf", "unbiased", "rsa"):
        t0 = time.perf_counter()
        a, b = matrix(measure, x), matrix(measure, y)
        t_gram = time.perf_counter() - t0
        t0 = time.perf_counter()
        ia, ib = M.gram_invariants(a), M.gram_invariants(b)
        t_inv = time.perf_counter() - t0
        s = float((a * b).sum() / (a.norm() * b.norm()))
        t0 = time.perf_counter()
        m = M.cosine_moments(ia, ib)
        res = M.pearson3_null(s, m, alpha)
        t_mom = time.perf_counter() - t0
        perms = random_perms(n, k_perms, 7)
        t0 = time.perf_counter()
        null = perm_scores(a, b, perms, dtype=torch.float32 if measure != "rsa" else F64)
        t_perm = time.perf_counter() - t0
        p_perm = (1 + float((null >= s).sum())) / (k_perms + 1)
        comb = torch.sort(torch.cat([torch.tensor([s], dtype=F64), null])).values
        tau_perm = float(comb[threshold_index(k_perms, alpha)])
        out(f"{measure:8s} grams {t_gram:6.2f}s | invariants (both) {t_inv:6.3f}s | "
            f"moments+P3 {t_mom * 1e3:6.2f} ms | permutation null {t_perm:6.2f}s")
        out(f"         s={s:.5f}  p: moments {float(res['p_value']):.4f} vs perm {p_perm:.4f} | "
            f"tau: moments {float(res['threshold']):.5f} vs perm {tau_perm:.5f} | "
            f"null mean {m.mean:.5f} vs {float(null.mean()):.5f}, std {m.std:.2e} vs "
            f"{float(null.std()):.2e}, skew {m.skewness:+.3f}")
    t0 = time.perf_counter()
    fa, fb = M.feature_invariants(x), M.feature_invariants(y)
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_feat = float(M.feature_linear_cka(x, y))
    t_s = time.perf_counter() - t0
    p_feat = float(M.pearson3_sf(s_feat, *_msk(M.cosine_moments(fa, fb))))
    out(f"linear CKA in feature space: invariants (both) {t_feat:.3f}s, "
        f"score {t_s * 1e3:.1f} ms, s={s_feat:.5f}, p={p_feat:.4f}")


def _msk(m: M.PermutationMoments) -> tuple[float, float, float]:
    return m.mean, m.std, m.skewness


MEMORY_SCRIPT = """
import resource, sys, time, torch
torch.set_num_threads({threads})
from alignment_callback.functional.moments import feature_invariants


def hwm():  # peak RSS of this process image (VmHWM; ru_maxrss also keeps the parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


n, d = {n}, {d}
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g)  # float32 input, as a network's activations
base = hwm()
t0 = time.perf_counter()
inv = feature_invariants(x)
el = time.perf_counter() - t0
print(f"n={{n}} d={{d}}: {{el:.1f}} s, peak RSS {{hwm():.0f}} MB "
      f"(VmHWM; {{base:.0f}} MB before the call, input {{x.numel() * 4 / 2**20:.0f}} MB "
      f"float32), ru_maxrss {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}} MB")
"""


def section_memory(n: int = 100_000, d: int = 256, threads: int = 1) -> None:
    print(f"\n== feature_invariants at n={n}, d={d} in a fresh process ({threads} thread(s)) ==")
    code = MEMORY_SCRIPT.format(n=n, d=d, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    print(out.stdout.strip() or out.stderr.strip())


SECTIONS = {  # memory first: ru_maxrss is inherited from the parent
    "memory": section_memory,
    "exhaustive": section_exhaustive,
    "mc": section_mc,
    "features": section_features,
    "pvalues": section_pvalues,
    "validity": section_validity,
    "fpr": section_fpr,
    "bench": section_bench,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=sorted(SECTIONS), default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=4, help="data seed of the pvalues section")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.only or list(SECTIONS):
        t0 = time.perf_counter()
        kwargs = {"pvalues": {"seed": args.seed}, "memory": {"threads": args.threads}}
        SECTIONS[name](**kwargs.get(name, {}))
        # this process's peak so far (it only grows: a section's own is at most this; the
        # memory section measures in a child process and prints that child's peak itself)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s, this process's peak RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB]", flush=True)


if __name__ == "__main__":
    main()
