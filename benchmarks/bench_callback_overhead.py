"""Training time with vs without the quickstart's AlignmentCallbacks, measured in one run.

Uses the quickstart exactly as it runs by default (examples/quickstart.py: digits; a CNN
student whose output layer is a 2048-wide random-Fourier-feature layer, aligned with a frozen
2×128 MLP reference by two callbacks: ``alignment/``, linear CKA + mutual kNN + CKNNA over 4×3
layer pairs on 500 probe digits, heatmaps on; ``wide/``, linear CKA of the wide layer against
the reference's 3 layers on the first 64 probe digits, no heatmaps; K=500; every epoch plus the
baseline; W&B offline + CSV loggers; ``background=True``) and fits the same student three
times from the same seed: without the callbacks, with them (background, the quickstart's
setting) and with them in the foreground (``background=False``).  Prints the wall-clock fit
times, the overheads and the CPU time each fit used.  The machine may be shared with other
jobs: the load average is printed before and after.

    python benchmarks/bench_callback_overhead.py [--epochs 15] [--permutations 500] [--logger wandb]
                                                 [--no-heatmaps] [--reference-epochs 15]
    python benchmarks/bench_callback_overhead.py --quick   # smoke run: 1 epoch, K=20, CSV only

``--quick`` sets 1 student epoch, 1 reference epoch, K = 20, 1 round and the CSV logger alone:
a smoke run of the code path (its overhead is no measurement: the fixed costs of a fit dominate
one epoch).
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
import quickstart as qs

from alignment_callback import AlignmentCallback


def fit(epochs: int, callbacks: list[AlignmentCallback], out: str, logger: str, seed: int = 0
        ) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one student fit."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    x_train, y_train, _, _ = qs.digits(seed=seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    student = qs.DigitsCNN(seed=seed + 1, random_features=qs.WIDE_FEATURES)
    loggers = qs.make_loggers(logger, out)
    for lg in loggers:  # start the tracker (e.g. the W&B service) before timing
        lg.log_hyperparams({"bench": True})
    wall, cpu = time.perf_counter(), time.process_time()
    qs.trainer(epochs, loggers, callbacks).fit(student, train)
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
    p.add_argument("--heatmaps", action=argparse.BooleanOptionalAction, default=True,
                   help="the alignment/ callback's heatmaps (on in the quickstart)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of the three fits, interleaved; the best wall time of each is kept")
    p.add_argument("--reference-epochs", type=int, default=15,
                   help="epochs of the reference's training (not timed)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 epoch, 1 reference epoch, K=20, 1 round, CSV logger")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.reference_epochs, args.permutations = 1, 1, 20
        args.repeats, args.logger = 1, "csv"
    qs.quiet_lightning()
    torch.set_num_threads(args.threads)
    x_train, y_train, x_probe, _ = qs.digits(seed=0)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    reference = qs.DigitsMLP(hidden=128, depth=2, seed=1000)
    qs.trainer(args.reference_epochs).fit(reference, train)

    def callbacks(background: bool) -> list[AlignmentCallback]:
        """The quickstart's two callbacks (examples/quickstart.py, main)."""
        return [
            AlignmentCallback(reference=reference, probe=x_probe, layers=["blocks.*", "head"],
                              reference_layers=["blocks.*", "head"],
                              num_permutations=args.permutations, every_n_epochs=1, seed=0,
                              background=background, log_heatmaps=args.heatmaps),
            AlignmentCallback(reference=reference, probe=x_probe[:qs.WIDE_PROBE], layers=["wide"],
                              reference_layers=["blocks.*", "head"], measures=["linear_cka"],
                              num_permutations=args.permutations, every_n_epochs=1, seed=0,
                              background=background, log_prefix="wide", log_heatmaps=False),
        ]

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        fit(1, [], os.path.join(out, "warm-up"), "csv")  # first-call costs out of the way
        base = bg = fg = (float("inf"), float("nan"))
        for r in range(args.repeats):  # (wall, CPU) of the fastest fit of each kind
            base = min(base, fit(args.epochs, [], os.path.join(out, f"none{r}"), args.logger))
            cbs = callbacks(background=True)
            result = fit(args.epochs, cbs, os.path.join(out, f"background{r}"), args.logger)
            if result < bg:
                bg, bg_cbs = result, cbs
            cbs = callbacks(background=False)
            result = fit(args.epochs, cbs, os.path.join(out, f"foreground{r}"), args.logger)
            if result < fg:
                fg, fg_cbs = result, cbs
    if args.logger == "wandb":
        import wandb

        wandb.teardown()
    steps = len(fg_cbs[0].history)
    computing = {cb.log_prefix: sum(h[f"{cb.log_prefix}/seconds"] for h in cb.history) / steps
                 for cb in bg_cbs}
    print(f"threads={torch.get_num_threads()} of {os.cpu_count()} cores, epochs={args.epochs}, "
          f"K={args.permutations}, {steps} alignment steps, best of {args.repeats} interleaved "
          f"rounds, loggers: {args.logger if args.logger == 'csv' else args.logger + ' + csv'}; "
          f"load average {' '.join(f'{v:.2f}' for v in load_start)} at start, "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at end (shared machine)")
    print(f"callbacks: alignment/ (probe n={len(x_probe)}, 4×3 layer pairs, metrics "
          f"{list(fg_cbs[0].measures)}, heatmaps {'on' if args.heatmaps else 'off'}) and wide/ (probe n={qs.WIDE_PROBE}, the "
          f"{qs.WIDE_FEATURES}-wide layer × 3 reference layers, linear_cka)")
    print(f"{'fit':<34}{'wall s':>8}{'CPU s':>8}{'overhead':>10}")
    for name, (wall, cpu) in (("without the callbacks", base),
                              ("with them, background=True", bg),
                              ("with them, background=False", fg)):
        overhead = "" if wall is base[0] else f"{100 * (wall - base[0]) / base[0]:>9.1f}%"
        print(f"{name:<34}{wall:>8.1f}{cpu:>8.1f}{overhead:>10}")
    print("target: <= 10% wall-clock overhead for the quickstart's default (background) setting"
          + (" (not judged (quick): one epoch is mostly a fit's fixed costs)" if args.quick
             else ""))
    print("background: computing per step in the worker threads (probe pass and nulls, heatmaps "
          "excluded): " + ", ".join(f"{k}/ {v:.2f} s" for k, v in computing.items()))
    print(f"foreground: {(fg[0] - base[0]) / steps:.2f} s per step inside the loop, so "
          f"background=False costs about {100 * (fg[0] - base[0]) / steps / 60:.1f}% with 1-minute "
          "epochs")

if __name__ == "__main__":
    main()
