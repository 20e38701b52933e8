"""Training time with vs without AlignmentCallback, measured in one run.

Uses the quickstart's data, models and callback settings (examples/quickstart.py: digits, a
3×64 student aligned to a frozen 2×128 reference on 500 probe digits, linear CKA + mutual kNN
+ CKNNA, K=500, every epoch, heatmaps on, CSV logger).  Prints both fit times, the overhead
ratio and the cost of one alignment step, from which the overhead for longer epochs follows.

    python benchmarks/bench_callback_overhead.py [--epochs 15] [--permutations 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import quickstart as qs  # noqa: E402

from alignment_callback import AlignmentCallback  # noqa: E402


def fit_seconds(epochs: int, callback: AlignmentCallback | None, out: str, seed: int = 0) -> float:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(seed, verbose=False)
    x_train, y_train, _, _ = qs.digits(seed=seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    student = qs.DigitsMLP(hidden=64, depth=3, seed=seed + 1)
    t0 = time.perf_counter()
    qs.trainer(epochs, [CSVLogger(out)], [callback] if callback else []).fit(student, train)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--permutations", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    qs.quiet_lightning()
    torch.set_num_threads(args.threads)
    x_train, y_train, x_probe, _ = qs.digits(seed=0)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    reference = qs.DigitsMLP(hidden=128, depth=2, seed=1000)
    qs.trainer(15).fit(reference, train)
    with tempfile.TemporaryDirectory() as out:
        base = fit_seconds(args.epochs, None, out)
        cb = AlignmentCallback(reference=reference, probe=x_probe, layers=["blocks.*", "head"],
                               reference_layers=["blocks.*", "head"],
                               num_permutations=args.permutations)
        with_cb = fit_seconds(args.epochs, cb, out)
    steps = len(cb.history)
    in_step = sum(h["alignment/seconds"] for h in cb.history)
    per_step = (with_cb - base) / steps
    epoch = base / args.epochs
    print(f"threads={torch.get_num_threads()} epochs={args.epochs} K={args.permutations} "
          f"probe n={len(x_probe)} layers 4x3 metrics={list(cb.metric_specs)}")
    print(f"fit without callback: {base:.2f} s ({epoch * 1e3:.0f} ms/epoch)")
    print(f"fit with callback:    {with_cb:.2f} s  -> overhead {100 * (with_cb - base) / base:.0f}% "
          f"(target <= 10%)")
    print(f"per alignment step:   {per_step:.2f} s ({in_step / steps:.2f} s computing, the rest "
          f"heatmaps and logging); {steps} steps incl. the baseline")
    for sec in (10, 60, 300):
        print(f"  projected overhead with {sec:>3d}-s epochs: {100 * per_step / sec:.1f}%")


if __name__ == "__main__":
    main()
