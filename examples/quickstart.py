"""Quickstart: watch a network's representations align with a frozen reference, calibrated.

1. Train a reference MLP on scikit-learn's handwritten digits (8×8 images, 10 classes), freeze it.
2. Train a student of another architecture, a small CNN (random affine augmentation) whose output
   layer is a wide random-feature layer, with two ``AlignmentCallback``s.  Before training
   (epoch 0) and after every epoch, probe digits go through both networks and the callbacks
   compute alignment with its permutation null: raw score, threshold τ (what chance alone
   reaches), calibrated score, p-value.

   * ``alignment/``: the CNN's layers (conv blocks, hidden layer, logits) against the
     reference's, on the 500 held-out probe digits, with linear CKA, mutual kNN and CKNNA.
     This is real alignment: calibrated rises far above τ.
   * ``wide/``: the student's 2048-wide random-feature layer against the reference's layers on
     the first 64 probe digits (a batch), linear CKA.  With d/n = 32, chance alone gives a high
     raw score: before training raw CKA is ≈ 0.4 while calibrated is ≈ 0 (the width
     confounder, here inside a real run).

   The callbacks work in the background (``background=True``): the student's probe pass, the
   nulls and the heatmaps run in worker threads on copies of the model while training goes on.
3. Write ``alignment_curves.png`` and ``alignment_heatmap.png`` and print a summary.

Runs in about a minute on 2 CPU cores, offline, no account needed::

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
import math
import os
import sys
import textwrap
import time
import warnings
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

LOGGER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "csv": None}
PROJECT = "alignment-callback-quickstart"
WIDE_FEATURES = 2048  # width of the student's random-feature layer
WIDE_PROBE = 64       # probe digits for the wide layer: d/n = 32
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


class RandomFourierFeatures(nn.Module):
    """``cos(W · LayerNorm(h) + b)``: W ~ N(0, 1/ℓ²) and b ~ U[0, 2π) drawn once from ``seed``
    and never trained (buffers).  An explicit ``out_dim``-wide feature map of the RBF kernel
    exp(−‖h − h′‖²/(2ℓ²)), like the random-feature output layer of SNGP (Liu et al. 2020).

    Layer-normalized inputs lie on a sphere of radius √in_dim, so with ℓ = 1 the kernel of two
    inputs of correlation ρ is exp(−in_dim·(1 − ρ)): their features are nearly orthogonal unless
    the inputs are almost identical (ρ > 0.98 for in_dim = 128).  In an untrained network every
    digit then gets its own direction and the layer is wide in the sense that matters for CKA
    (effective rank ≈ n); training pulls the digits of a class together and structure appears."""

    def __init__(self, in_dim: int, out_dim: int, lengthscale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.register_buffer("weight", torch.randn(out_dim, in_dim, generator=g) / lengthscale)
        self.register_buffer("bias", torch.rand(out_dim, generator=g) * (2 * math.pi))

    def forward(self, h: Tensor) -> Tensor:
        return torch.cos(nn.functional.linear(self.norm(h), self.weight, self.bias))


class DigitsCNN(DigitsMLP):
    """A small VGG-style CNN on the digit upsampled to 16×16: ``blocks.0`` and ``blocks.1``
    (two 3×3 convolutions + max-pool each; mean-pooled over space when recorded), ``blocks.2``
    (hidden layer of 128), ``wide`` (with ``random_features`` > 0 that many fixed random Fourier
    features of the hidden layer, :class:`RandomFourierFeatures`; else the identity), ``head``
    (logits).  Trained on random affine augmentations (rotation ±10°, scale ±10 %, shift ±1
    pixel) drawn from the global RNG.  The convolutions and the hidden layer do not depend on
    ``random_features``."""

    def __init__(self, width: int = 64, seed: int = 0, lr: float = 1e-3, classes: int = 10,
                 random_features: int = 0) -> None:
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
            self.wide = (RandomFourierFeatures(128, random_features, seed=seed + 500)
                         if random_features else nn.Identity())
            self.head = nn.Linear(random_features or 128, classes)
        self.lr = lr

    @staticmethod
    def image(x: Tensor) -> Tensor:
        """(n, 64) standardized pixels -> (n, 1, 16, 16)."""
        return nn.functional.interpolate(x.view(-1, 1, 8, 8), size=16, mode="bilinear",
                                         align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.wide(self.blocks(self.image(x) if x.dim() == 2 else x)))

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
def measure_history(history: Sequence[dict[str, Any]], measure: str, prefix: str = "alignment"):
    """The callback's history as the ``{"raw", "calibrated", "threshold"}`` dicts plot_scores takes."""
    return [{f: h[f"{prefix}/{measure}/{f}"] for f in ("raw", "calibrated", "threshold", "p_value")}
            for h in history]


def plot_curves(history: Sequence[dict[str, Any]], measures: Sequence[str], path: str,
                title: str = "Student vs frozen reference on 500 probe digits "
                             "(epoch 0 = before training; max over layer pairs)") -> None:
    """One panel per measure of one callback's history: raw, τ band, calibrated."""
    plot_panels([(history, m, "alignment", m) for m in measures], path, title, legend="upper left")


Panel = tuple[Sequence[dict[str, Any]], str, str, str]  # history, measure, log prefix, title


def plot_panels(panels: Sequence[Panel], path: str, title: str, ncols: int | None = None,
                annotate_gap: Sequence[int] = (), legend: str = "best") -> None:
    """Panels of raw, τ band and calibrated curves (``ncols`` per row, default all in one row);
    for the panels listed in ``annotate_gap``, the epoch where raw − calibrated is largest is
    marked with its numbers."""
    import matplotlib.pyplot as plt

    from alignment_callback.metrics.plotting import plot_scores

    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    for i, (ax, (hist, measure, prefix, panel_title)) in enumerate(zip(axes.flat, panels)):
        series = measure_history(hist, measure, prefix)
        epochs = [h["epoch"] for h in hist]
        plot_scores(series, ax=ax, steps=epochs, xlabel="epoch", title=panel_title)
        ax.legend(loc=legend, fontsize="small", framealpha=0.9)
        if i in annotate_gap:
            j = max(range(len(series)), key=lambda t: series[t]["raw"] - series[t]["calibrated"])
            raw, cal, tau = (float(series[j][f]) for f in ("raw", "calibrated", "threshold"))
            ax.annotate("", xy=(epochs[j], cal), xytext=(epochs[j], raw),
                        arrowprops={"arrowstyle": "<->", "color": "0.2", "lw": 1.2})
            ax.annotate(f"epoch {epochs[j]}: raw {raw:.2f}, chance τ {tau:.2f}\n"
                        f"→ calibrated {cal:.2f}",
                        xy=(epochs[j] + 0.1, (raw + cal) / 2), fontsize="small", va="center",
                        xytext=(epochs[j] + 0.05 * (epochs[-1] - epochs[0]) + 0.5,
                                min((raw + cal) / 2 + 0.3, 0.9)),
                        arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.8},
                        bbox={"boxstyle": "round", "fc": "white", "ec": "0.6", "alpha": 0.9})
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
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


def summary_table(history: Sequence[dict[str, Any]], measures: Sequence[str],
                  prefix: str = "alignment") -> str:
    from alignment_callback.engine.report import score_text

    first, last = history[0], history[-1]
    # raw, calibrated and τ at the first and the last step (τ changes with the weights: a
    # calibrated score is read against its own step's τ); p and the best pair at the last
    head = (f"{'measure':<12} {'raw ep' + str(first['epoch']) + ' → ' + str(last['epoch']):>16} "
            f"{'calibrated':>16} {'τ':>15} {'p ep' + str(last['epoch']):>8}  "
            "best pair (student|reference)")
    lines = [head, "-" * len(head)]
    for m in measures:
        # three decimals, or significant digits: a tiny calibrated score is not "0.000"
        t = {f: [score_text(float(h[f"{prefix}/{m}/{f}"]), 3) for h in (first, last)]
             for f in ("raw", "calibrated", "threshold")}
        lines.append(
            f"{m:<12} {t['raw'][0]:>7} → {t['raw'][1]:<6} "
            f"{t['calibrated'][0]:>7} → {t['calibrated'][1]:<6} "
            f"{t['threshold'][0]:>6} → {t['threshold'][1]:<6} "
            f"{float(last[f'{prefix}/{m}/p_value']):>8.4f}  {last[f'{prefix}/{m}/best_pair']}"
        )
    return "\n".join(lines)


def in_plain_words(history: Sequence[dict[str, Any]], wide: Sequence[dict[str, Any]],
                   measure: str = "linear_cka") -> list[str]:
    """One sentence for the real alignment (``alignment/``), one for the wide layer (``wide/``)."""
    from alignment_callback.engine.report import score_text

    g = lambda h, p, f: float(h[f"{p}/{measure}/{f}"])  # noqa: E731
    first, last = history[0], history[-1]
    pair = str(last[f"alignment/{measure}/best_pair"]).replace("|", " | ")
    above = g(last, "alignment", "calibrated") > 0
    real = (f"Real alignment: {measure} of the student's layers with the reference's goes from raw "
            f"{g(first, 'alignment', 'raw'):.2f} at epoch {first['epoch']} to "
            f"{g(last, 'alignment', 'raw'):.2f} at epoch {last['epoch']} (best pair {pair}), "
            f"{'far above' if above else 'no more than'} what chance alone reaches "
            f"(τ = {g(last, 'alignment', 'threshold'):.2f}): calibrated "
            f"{score_text(g(first, 'alignment', 'calibrated'))} → "
            f"{score_text(g(last, 'alignment', 'calibrated'))}, "
            f"p = {g(last, 'alignment', 'p_value'):.4f}.")
    h = max(wide, key=lambda h: g(h, "wide", "raw") - g(h, "wide", "calibrated"))
    when = " (before any training)" if h["epoch"] == 0 else ""
    end = wide[-1]
    aligned = g(end, "wide", "calibrated") > 0 and g(end, "wide", "p_value") <= 0.05
    cal, p = g(h, "wide", "calibrated"), g(h, "wide", "p_value")
    verdict = ("width, not alignment" if p > 0.05 else
               f"almost all width (what is above chance is significant, p = {p:.3f}, but small)")
    chance = (f"Chance posing as alignment: at epoch {h['epoch']}{when}, raw {measure} of the "
              f"{WIDE_FEATURES}-wide random-feature layer on {WIDE_PROBE} probe digits is "
              f"{g(h, 'wide', 'raw'):.2f}, but chance alone reaches "
              f"{g(h, 'wide', 'threshold'):.2f} at this width (τ, d/n = "
              f"{WIDE_FEATURES // WIDE_PROBE}): calibrated {score_text(cal, 3)}, so that raw "
              f"{g(h, 'wide', 'raw'):.2f} is {verdict}. At epoch {end['epoch']} the layer "
              f"{'has really aligned' if aligned else 'is still at chance'}: raw "
              f"{g(end, 'wide', 'raw'):.2f}, calibrated {score_text(g(end, 'wide', 'calibrated'))}.")
    return [real, chance]


# -------------------------------------------------------------------------------------- main
def count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``; a clear error before
    any work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    parse.__name__ = (f"integer >= {minimum}" if maximum is None  # argparse names it
                      else f"integer in [{minimum}, {maximum}]")
    return parse


#: The largest seed ``lightning.seed_everything`` takes (NumPy's seeds are 32-bit).
MAX_SEED = 2**32 - 1


def output_folder(parser: argparse.ArgumentParser, folder: str) -> None:
    """Create ``--out`` (an argparse error naming it when that fails)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {folder}: cannot create the output folder: {err.strerror or err}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logger", choices=sorted(LOGGER_PACKAGES), default="wandb",
                   help="tracker (a CSVLogger is always added); wandb runs offline")
    p.add_argument("--epochs", type=count(1), default=15, help="student training epochs")
    p.add_argument("--reference-epochs", type=count(1), default=15,
                   help="reference training epochs")
    p.add_argument("--permutations", type=count(1), default=500, help="K, permutations per null")
    p.add_argument("--out", default=".", help="output folder (logs and PNGs)")
    p.add_argument("--seed", type=count(0, MAX_SEED), default=0,
                   help="seeds the data split, the models, the batches and the permutations")
    p.add_argument("--foreground", action="store_true",
                   help="compute alignment inside the training loop (background=False)")
    p.add_argument("--threads", type=count(1), default=1,
                   help="torch CPU threads; the probe matrices are small, and on a busy machine "
                        "extra threads mostly wait for each other")
    args = p.parse_args(argv)
    output_folder(p, args.out)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_lightning()
    check_example_packages()
    check_logger_package(args.logger)
    torch.set_num_threads(args.threads)
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

    # 2. the student: another architecture (a CNN, with a wide random-feature output layer) and
    #    seed, tracked by two callbacks
    student = DigitsCNN(seed=args.seed + 1, random_features=WIDE_FEATURES)
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
    # the width confounder inside the run: the 2048-wide layer on a batch of 64 probe digits
    wide_callback = AlignmentCallback(
        reference=reference,
        probe=x_probe[:WIDE_PROBE],
        layers=["wide"],                  # student: the random Fourier features (d = 2048)
        reference_layers=["blocks.*", "head"],
        measures=["linear_cka"],
        num_permutations=args.permutations,
        every_n_epochs=1,
        seed=args.seed,
        background=not args.foreground,
        log_prefix="wide",                # logged as wide/linear_cka/{raw, calibrated, ...}
        log_heatmaps=False,               # one student layer: the curves say it all
    )
    loggers = make_loggers(args.logger, args.out)
    for logger in loggers:
        logger.log_hyperparams({f"cli/{k}": v for k, v in vars(args).items()})
    t_fit = time.perf_counter()
    trainer(args.epochs, loggers, [callback, wide_callback]).fit(student, train)
    fit_seconds = time.perf_counter() - t_fit

    # 3. figures and summary
    measures = list(callback.measures)
    history, wide = callback.history, wide_callback.history
    curves = os.path.join(args.out, "alignment_curves.png")
    heatmap = os.path.join(args.out, "alignment_heatmap.png")
    n = len(x_probe)
    panels: list[Panel] = [(history, m, "alignment", f"{m}: student layers, n = {n}")
                           for m in measures]
    panels.insert(1, (wide, "linear_cka", "wide",
                      f"linear_cka: {WIDE_FEATURES}-wide layer, n = {WIDE_PROBE}"))
    plot_panels(panels, curves, ncols=2, annotate_gap=[1],
                title="Student (CNN) vs frozen reference (MLP); epoch 0 = before training; max "
                      "over layer pairs.\nTop left and bottom: real alignment, far above chance. "
                      f"Top right: a wide layer (d/n = {WIDE_FEATURES // WIDE_PROBE}), where "
                      "chance alone gives a high raw score.")
    plot_heatmaps(callback.last_results, heatmap, history[-1]["epoch"])
    where = finish_loggers(loggers, [curves, heatmap], args.out)

    align_seconds = sum(float(h[f"{c.log_prefix}/seconds"]) for c in (callback, wide_callback)
                        for h in c.history)
    print()
    print(f"Alignment of the student (CNN) with the frozen reference (MLP 2×128), "
          f"n={n} probe digits, K={args.permutations}, α=0.05, max over layer pairs:")
    print(summary_table(history, measures))
    print()
    print(f"The student's wide layer ({WIDE_FEATURES} random Fourier features of its hidden layer, "
          f"see RandomFourierFeatures) on the first n={WIDE_PROBE} probe digits:")
    print(summary_table(wide, ["linear_cka"], prefix="wide"))
    print(LEGEND)
    print()
    print("In plain words:")
    for sentence in in_plain_words(history, wide):
        print(textwrap.fill(sentence, width=100, initial_indent="- ", subsequent_indent="  "))
    print()
    print(f"train accuracy: reference {accuracy(reference, x_train, y_train):.3f}, "
          f"student {accuracy(student, x_train, y_train):.3f}   "
          f"(probe: {accuracy(reference, x_probe, y_probe):.3f} / "
          f"{accuracy(student, x_probe, y_probe):.3f})")
    where_run = "in the foreground" if args.foreground else "in the background"
    print(f"alignment: {len(history)} steps × ({len(measures)} measures + wide layer) × "
          f"K={args.permutations}, "
          f"{align_seconds:.1f} s of computing {where_run}; student fit {fit_seconds:.1f} s; "
          f"total run {time.perf_counter() - t_start:.1f} s (benchmarks/bench_callback_overhead.py "
          "measures the overhead)")
    print(f"figures: {curves}, {heatmap}")
    reports = [cb.report_paths[1] for cb in (callback, wide_callback) if cb.report_paths]
    if reports:  # next to the first logger's files (W&B: in its run's folder)
        print(f"end-of-fit reports: {', '.join(reports)}")
    for line in where:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
