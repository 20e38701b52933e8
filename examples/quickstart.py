"""Quickstart: watch a network's representations align with a frozen reference, calibrated.

1. Train a reference MLP on scikit-learn's handwritten digits (8×8 images, 10 classes), freeze it.
2. Train a student of another architecture, a small CNN (random affine augmentation), with
   ``AlignmentCallback``: before training (epoch 0) and after every epoch, the 500 held-out
   probe digits go through both networks and linear CKA, mutual kNN and CKNNA between every
   layer pair are computed, together with their permutation null: raw score, threshold τ (what
   chance alone reaches), calibrated score, p-value.  The callback works in the background
   (``background=True``): the student's probe pass, the nulls and the heatmaps run in a worker
   thread on a copy of the model while training goes on.
3. Write ``alignment_curves.png`` and ``alignment_heatmap.png`` and print a summary.

Runs in under a minute on 2 CPU cores, offline, no account needed::

    python examples/quickstart.py                      # W&B offline (+ CSV), upload later with `wandb sync`
    python examples/quickstart.py --logger tensorboard # or csv, mlflow
    python examples/quickstart.py --epochs 5 --permutations 200 --out runs/

Reading the numbers (docs/calibration.md): *raw* is what papers report; *τ* is what chance alone
reaches at this probe size, width and number of layer pairs; *calibrated* = (raw − τ)/(1 − τ) when
raw > τ, else 0, is alignment above chance; *p* says whether there is any alignment at all.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

LOGGER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "csv": None}
PROJECT = "alignment-callback-quickstart"
LEGEND = ("raw: what papers report · τ: what chance alone reaches here (permutation null) · "
          "calibrated: (raw − τ)/(1 − τ) if raw > τ, else 0\np: permutation p-value "
          "(smallest possible 1/(K+1)) · best pair: the layer pair with the highest raw score")


# ------------------------------------------------------------------------------------ set-up
def quiet_lightning() -> None:
    """Keep the console readable: Lightning's info lines and warnings we know are harmless."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no database set-up chatter
    # tiny in-memory data sets need no DataLoader workers
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # one optimizer step per batch: fewer steps than log_every_n_steps is fine
    warnings.filterwarnings("ignore", message=r".*log_every_n_steps.*")
    # torch 2.13 deprecates a pytree class Lightning 2.6 still uses internally
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)


def check_logger_package(kind: str) -> None:
    """Exit with a clear message if the chosen logger's package is not installed."""
    package = LOGGER_PACKAGES[kind]
    if package is not None and importlib.util.find_spec(package) is None:
        sys.exit(f"--logger {kind} needs the '{package}' package, which is not installed: "
                 f"pip install {package}   (or pick another: --logger csv)")


def check_example_packages(packages: Sequence[str] = ("sklearn", "matplotlib")) -> None:
    """Exit with a clear message if the examples' extra packages are not installed."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        sys.exit(f"this example needs {', '.join(missing)}: pip install 'alignment-callback[examples]'")


def make_loggers(kind: str, out: str, project: str = PROJECT) -> list[Any]:
    """The chosen tracker plus, always, a CSVLogger in ``out`` (easy to read back)."""
    from lightning.pytorch.loggers import CSVLogger

    check_logger_package(kind)
    loggers: list[Any] = []
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=project, save_dir=out, offline=True)
        # Lightning 2.6 always passes anonymous=None, which wandb >= 0.19 warns is a no-op
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(logger)
    elif kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=os.path.join(out, "lightning_logs"),
                                         name="tensorboard"))
    elif kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name=project, tracking_uri=mlflow_uri(out),
                                    artifact_location=os.path.join(os.path.abspath(out), "mlruns")))
    loggers.append(CSVLogger(save_dir=out, name="lightning_logs"))
    return loggers


def mlflow_uri(out: str) -> str:
    return f"sqlite:///{os.path.abspath(out)}/mlflow.db"


def finish_loggers(loggers: Sequence[Any], images: Sequence[str], out: str) -> list[str]:
    """Attach the final figures to the tracker, close it; returns lines telling where things are."""
    lines = []
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            run = logger.experiment
            for path in images:
                logger.log_image(key=f"summary/{os.path.splitext(os.path.basename(path))[0]}",
                                 images=[path])
            run_dir = os.path.dirname(run.dir)  # .../wandb/offline-run-<time>-<id>
            run.finish()
            import wandb

            wandb.teardown()  # wait for the W&B service to flush the offline run file
            lines.append(f"W&B (offline) run: {run_dir}\n  upload it with:  wandb sync {run_dir}")
        elif kind == "TensorBoardLogger":
            lines.append(f"TensorBoard logs: {logger.log_dir}\n"
                         f"  view them with:  tensorboard --logdir {os.path.dirname(logger.log_dir)}")
        elif kind == "MLFlowLogger":
            for path in images:
                logger.experiment.log_artifact(logger.run_id, path)
            logger.finalize("success")
            lines.append(f"MLflow run {logger.run_id} in {mlflow_uri(out)}\n"
                         f"  view it with:  mlflow ui --backend-store-uri {mlflow_uri(out)}")
        elif kind == "CSVLogger":
            logger.save()
            lines.append(f"CSV metrics: {os.path.join(logger.log_dir, 'metrics.csv')}")
    return lines


# -------------------------------------------------------------------------------------- data
def digits(probe_size: int = 500, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's 1797 digits, standardized with training statistics; a fixed held-out probe."""
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    probe_idx, train_idx = order[:probe_size], order[probe_size:]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6  # border pixels are constant
    x = (x - mean) / std
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return (as_t(x[train_idx], torch.float32), as_t(y[train_idx], torch.long),
            as_t(x[probe_idx], torch.float32), as_t(y[probe_idx], torch.long))


# ------------------------------------------------------------------------------------- model
class DigitsMLP(pl.LightningModule):
    """``blocks.0 … blocks.{depth-1}`` (Linear + ReLU) then ``head`` (logits)."""

    def __init__(self, hidden: int = 128, depth: int = 2, seed: int = 0, lr: float = 1e-3,
                 in_dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):  # initialize from our own seed
            torch.manual_seed(seed)
            dims = [in_dim] + [hidden] * depth
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.ReLU())
                                          for a, b in zip(dims[:-1], dims[1:])])
            self.head = nn.Linear(hidden, classes)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))

    def train_inputs(self, x: Tensor) -> Tensor:
        return x

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(self.train_inputs(x))
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsCNN(DigitsMLP):
    """A small VGG-style CNN on the digit upsampled to 16×16: ``blocks.0`` and ``blocks.1``
    (two 3×3 convolutions + max-pool each; mean-pooled over space when recorded), ``blocks.2``
    (hidden layer of 128), ``head`` (logits).  Trained on random affine augmentations (rotation
    ±10°, scale ±10 %, shift ±1 pixel) drawn from the global RNG."""

    def __init__(self, width: int = 64, seed: int = 0, lr: float = 1e-3, classes: int = 10) -> None:
        pl.LightningModule.__init__(self)
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)

            def conv_block(a: int, b: int) -> nn.Sequential:
                return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(b, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

            self.blocks = nn.Sequential(
                conv_block(1, width), conv_block(width, 2 * width),
                nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU()),
            )
            self.head = nn.Linear(128, classes)
        self.lr = lr

    @staticmethod
    def image(x: Tensor) -> Tensor:
        """(n, 64) standardized pixels -> (n, 1, 16, 16)."""
        return nn.functional.interpolate(x.view(-1, 1, 8, 8), size=16, mode="bilinear",
                                         align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.image(x) if x.dim() == 2 else x))

    def train_inputs(self, x: Tensor) -> Tensor:
        img = self.image(x)
        n = img.shape[0]
        angle = (torch.rand(n) - 0.5) * (torch.pi / 9)
        scale = 1.0 + (torch.rand(n) - 0.5) * 0.2
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = scale * torch.cos(angle)
        theta[:, 0, 1], theta[:, 1, 0] = -scale * torch.sin(angle), scale * torch.sin(angle)
        theta[:, :, 2] = (torch.rand(n, 2) - 0.5) * 0.5  # ±1 pixel of the 8×8 digit
        grid = nn.functional.affine_grid(theta.to(img), list(img.shape), align_corners=False)
        return nn.functional.grid_sample(img, grid, align_corners=False)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def trainer(epochs: int, loggers: Any = False, callbacks: Sequence[Any] = ()) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=loggers,
                      callbacks=list(callbacks), enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, log_every_n_steps=10, deterministic=True)


# ----------------------------------------------------------------------------------- figures
def metric_history(history: Sequence[dict[str, Any]], metric: str, prefix: str = "alignment"):
    """The callback's history as the ``{"raw", "calibrated", "threshold"}`` dicts plot_scores takes."""
    return [{f: h[f"{prefix}/{metric}/{f}"] for f in ("raw", "calibrated", "threshold", "p_value")}
            for h in history]


def plot_curves(history: Sequence[dict[str, Any]], metrics: Sequence[str], path: str,
                title: str = "Student vs frozen reference on 500 probe digits "
                             "(epoch 0 = before training; max over layer pairs)") -> None:
    import matplotlib.pyplot as plt

    from alignment_callback.metrics.plotting import plot_scores

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.9), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, name in zip(axes[0], metrics):
        plot_scores(metric_history(history, name), ax=ax, steps=epochs, xlabel="epoch",
                    title=name)
        ax.legend(loc="upper left", fontsize="small", framealpha=0.9)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmaps(results: dict[str, Any], path: str, epoch: int, ylabel: str = "student layer",
                  xlabel: str = "reference layer") -> None:
    import matplotlib.pyplot as plt

    from alignment_callback.metrics.plotting import plot_layer_heatmap

    names = list(results)
    fig, axes = plt.subplots(len(names), 2, figsize=(10.0, 3.3 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        r = results[name]
        plot_layer_heatmap(r.matrix, r.x_names, r.y_names, ax=row[0], argmax=r.argmax,
                           title=f"{name}: raw")
        plot_layer_heatmap(r.pair_calibrated, r.x_names, r.y_names, ax=row[1], argmax=r.argmax,
                           title=f"{name}: calibrated per pair")
        for ax in row:
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            long = max(len(y) for y in r.y_names) > 8
            for label in ax.get_xticklabels():
                label.set_rotation(30 if long else 0)
                label.set_horizontalalignment("right" if long else "center")
    fig.suptitle(f"Layer × layer alignment after epoch {epoch} (red box: best raw pair)",
                 fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(history: Sequence[dict[str, Any]], metrics: Sequence[str],
                  prefix: str = "alignment") -> str:
    first, last = history[0], history[-1]
    head = (f"{'metric':<12} {'raw ep' + str(first['epoch']) + ' → ' + str(last['epoch']):>16} "
            f"{'calibrated':>16} {'τ':>6} {'p':>7}  best pair (student|reference)")
    lines = [head, "-" * len(head)]
    for m in metrics:
        g = lambda h, f: float(h[f"{prefix}/{m}/{f}"])  # noqa: E731
        lines.append(
            f"{m:<12} {g(first, 'raw'):>7.3f} → {g(last, 'raw'):<6.3f} "
            f"{g(first, 'calibrated'):>7.3f} → {g(last, 'calibrated'):<6.3f} "
            f"{g(last, 'threshold'):>6.3f} {g(last, 'p_value'):>7.4f}  {last[f'{prefix}/{m}/best_pair']}"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logger", choices=sorted(LOGGER_PACKAGES), default="wandb",
                   help="tracker (a CSVLogger is always added); wandb runs offline")
    p.add_argument("--epochs", type=int, default=15, help="student training epochs")
    p.add_argument("--reference-epochs", type=int, default=15, help="reference training epochs")
    p.add_argument("--permutations", type=int, default=500, help="K, permutations per null")
    p.add_argument("--out", default=".", help="output folder (logs and PNGs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--foreground", action="store_true",
                   help="compute alignment inside the training loop (background=False)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the probe matrices are small, and on a busy machine "
                        "extra threads mostly wait for each other")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_lightning()
    check_example_packages()
    check_logger_package(args.logger)
    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.out, exist_ok=True)
    from alignment_callback import AlignmentCallback

    t_start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    x_train, y_train, x_probe, y_probe = digits(seed=args.seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(args.seed))

    # 1. the reference: 2 hidden layers of 128, trained, then frozen (the callback freezes it)
    reference = DigitsMLP(hidden=128, depth=2, seed=args.seed + 1000)
    trainer(args.reference_epochs).fit(reference, train)
    print(f"reference trained ({args.reference_epochs} epochs): train acc "
          f"{accuracy(reference, x_train, y_train):.3f}, probe acc "
          f"{accuracy(reference, x_probe, y_probe):.3f}")

    # 2. the student: another architecture (a CNN) and seed, tracked by the callback
    student = DigitsCNN(seed=args.seed + 1)
    callback = AlignmentCallback(
        reference=reference,
        probe=x_probe,                    # a fixed tensor of 500 held-out digits
        layers=["blocks.*", "head"],      # student: 2 conv blocks, the hidden layer, the logits
        reference_layers=["blocks.*", "head"],  # reference: blocks.0-1 and the logits
        num_permutations=args.permutations,
        every_n_epochs=1,
        seed=args.seed,
        background=not args.foreground,   # compute while training goes on
    )
    loggers = make_loggers(args.logger, args.out)
    for logger in loggers:
        logger.log_hyperparams({f"cli/{k}": v for k, v in vars(args).items()})
    t_fit = time.perf_counter()
    trainer(args.epochs, loggers, [callback]).fit(student, train)
    fit_seconds = time.perf_counter() - t_fit

    # 3. figures and summary
    metrics = list(callback.measures)
    history = callback.history
    curves = os.path.join(args.out, "alignment_curves.png")
    heatmap = os.path.join(args.out, "alignment_heatmap.png")
    plot_curves(history, metrics, curves)
    plot_heatmaps(callback.last_results, heatmap, history[-1]["epoch"])
    where = finish_loggers(loggers, [curves, heatmap], args.out)

    align_seconds = sum(float(h["alignment/seconds"]) for h in history)
    print()
    print(f"Alignment of the student (CNN) with the frozen reference (MLP 2×128), "
          f"n={len(x_probe)} probe digits, K={args.permutations}, α=0.05, max over layer pairs:")
    print(summary_table(history, metrics))
    print(LEGEND)
    print()
    print(f"train accuracy: reference {accuracy(reference, x_train, y_train):.3f}, "
          f"student {accuracy(student, x_train, y_train):.3f}   "
          f"(probe: {accuracy(reference, x_probe, y_probe):.3f} / "
          f"{accuracy(student, x_probe, y_probe):.3f})")
    where_run = "in the foreground" if args.foreground else "in the background"
    print(f"alignment: {len(history)} steps × {len(metrics)} metrics × K={args.permutations}, "
          f"{align_seconds:.1f} s of computing {where_run}; student fit {fit_seconds:.1f} s; "
          f"total run {time.perf_counter() - t_start:.1f} s (benchmarks/bench_callback_overhead.py "
          "measures the overhead)")
    print(f"figures: {curves}, {heatmap}")
    for line in where:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
