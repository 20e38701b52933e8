"""Training time with vs without AlignmentCallback, measured in one run.

Uses the quickstart exactly as it runs by default (examples/quickstart.py: digits; a CNN
student aligned with a frozen 2×128 MLP reference on 500 probe digits; linear CKA + mutual kNN
+ CKNNA over 4×3 layer pairs; K=500; every epoch plus the baseline; heatmaps on; W&B offline +
CSV loggers; ``background=True``) and fits the same student three times from the same seed:
without the callback, with it (background, the quickstart's setting) and with it in the
foreground (``background=False``).  Prints the wall-clock fit times, the overheads and the CPU
time each fit used.

    python benchmarks/bench_callback_overhead.py [--epochs 15] [--permutations 500] [--logger wandb]
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


def fit(epochs: int, callback: AlignmentCallback | None, out: str, logger: str, seed: int = 0
        ) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one student fit."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    x_train, y_train, _, _ = qs.digits(seed=seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    student = qs.DigitsCNN(seed=seed + 1)
    loggers = qs.make_loggers(logger, out)
    for lg in loggers:  # start the tracker (e.g. the W&B service) before timing
        lg.log_hyperparams({"bench": True})
    wall, cpu = time.perf_counter(), time.process_time()
    qs.trainer(epochs, loggers, [callback] if callback else []).fit(student, train)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--permutations", type=int, default=500)
    p.add_argument("--logger", default="wandb", choices=sorted(qs.LOGGER_PACKAGES))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    qs.quiet_lightning()
    torch.set_num_threads(args.threads)
    x_train, y_train, x_probe, _ = qs.digits(seed=0)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    reference = qs.DigitsMLP(hidden=128, depth=2, seed=1000)
    qs.trainer(15).fit(reference, train)

    def callback(background: bool) -> AlignmentCallback:
        return AlignmentCallback(reference=reference, probe=x_probe, layers=["blocks.*", "head"],
                                 reference_layers=["blocks.*", "head"],
                                 num_permutations=args.permutations, background=background)

    with tempfile.TemporaryDirectory() as out:
        fit(1, None, os.path.join(out, "warm-up"), "csv")  # first-call costs out of the way
        base = fit(args.epochs, None, os.path.join(out, "none"), args.logger)
        bg_cb = callback(background=True)
        bg = fit(args.epochs, bg_cb, os.path.join(out, "background"), args.logger)
        fg_cb = callback(background=False)
        fg = fit(args.epochs, fg_cb, os.path.join(out, "foreground"), args.logger)
    if args.logger == "wandb":
        import wandb

        wandb.teardown()
    steps = len(fg_cb.history)
    computing = sum(h["alignment/seconds"] for h in bg_cb.history)
    print(f"threads={torch.get_num_threads()} of {os.cpu_count()} cores, epochs={args.epochs}, "
          f"K={args.permutations}, probe n={len(x_probe)}, 4×3 layer pairs, metrics "
          f"{list(fg_cb.measures)}, {steps} alignment steps, loggers: {args.logger} + csv")
    print(f"{'fit':<34}{'wall s':>8}{'CPU s':>8}{'overhead':>10}")
    for name, (wall, cpu) in (("without the callback", base),
                              ("with it, background=True (default)", bg),
                              ("with it, background=False", fg)):
        overhead = "" if wall is base[0] else f"{100 * (wall - base[0]) / base[0]:>9.1f}%"
        print(f"{name:<34}{wall:>8.1f}{cpu:>8.1f}{overhead:>10}")
    print("target: <= 10% wall-clock overhead for the quickstart's default (background) setting")
    print(f"background: {computing / steps:.2f} s of computing per step in the worker thread "
          f"(probe pass, {len(bg_cb.measures)} nulls, heatmaps excluded)")
    print(f"foreground: {(fg[0] - base[0]) / steps:.2f} s per step inside the loop, so "
          f"background=False costs about {100 * (fg[0] - base[0]) / steps / 60:.1f}% with 1-minute "
          "epochs")


if __name__ == "__main__":
    main()
