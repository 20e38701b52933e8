"""Switch off a REPA-style alignment loss once the alignment it buys has plateaued.

REPA (Yu et al., 2024) adds to a model's loss a term that pulls a hidden state, through a small
projection head, toward a frozen encoder's features (negative cosine similarity, weight λ).
HASTE ("REPA Works Until It Doesn't") reports that this helps early and hurts later.  Here:

1. a frozen "encoder" (a random MLP standing in for DINOv2) and a regression task whose target
   depends on the encoder's features;
2. a student MLP trained on the task plus λ · (1 − cos(proj(h), encoder(x))), λ a registered
   buffer (so it is saved in checkpoints);
3. ``AlignmentCallback`` with the ``"repa"`` preset (CKNNA, k = 10) tracking the student's
   hidden state against the encoder's features on a held-out probe, permutation-calibrated;
4. ``AlignmentPlateau`` setting λ to 0 when calibrated CKNNA has not improved by more than
   ``--min-delta`` for ``--patience`` epochs.

CPU, offline, a few seconds::

    python examples/plateau.py
    python examples/plateau.py --epochs 20 --patience 3 --min-delta 0.005
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from alignment_callback import AlignmentCallback
from alignment_callback.callback.plateau import AlignmentPlateau
from alignment_callback.callback.presets import resolve_preset

KEY = "alignment/cknna/calibrated"
IN_DIM, FEAT_DIM = 16, 32


class Encoder(nn.Module):
    """The frozen reference: ``features`` is what the student is aligned to."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(IN_DIM, 64), nn.GELU(), nn.Linear(64, FEAT_DIM))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class Student(pl.LightningModule):
    """``encoder`` -> ``head`` regression, plus a projection head for the alignment loss."""

    def __init__(self, reference: Encoder, repa_weight: float, lr: float = 3e-3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 1)
        self.proj = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, FEAT_DIM))
        self.reference = [reference]  # a list: not a submodule, not trained, not checkpointed
        self.register_buffer("repa_weight", torch.tensor(float(repa_weight)))
        self.lr = lr
        self.epoch_stats: dict[str, float] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x)).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h = self.encoder(x)
        task = nn.functional.mse_loss(self.head(h).squeeze(-1), y)
        with torch.no_grad():
            target = self.reference[0](x)
        repa = 1 - nn.functional.cosine_similarity(self.proj(h), target, dim=-1).mean()
        self.log("task_loss", task, on_step=False, on_epoch=True)
        self.log("repa_loss", repa, on_step=False, on_epoch=True)
        return task + self.repa_weight * repa

    def on_train_epoch_start(self) -> None:
        self.epoch_stats = {"lambda": float(self.repa_weight)}  # the weight used this epoch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class PrintEpochs(pl.Callback):
    """One line per epoch: losses, CKNNA raw / τ / calibrated, and the λ that epoch used."""

    def __init__(self, aligner: AlignmentCallback) -> None:
        self.aligner = aligner

    def on_train_start(self, trainer: pl.Trainer, pl_module: Student) -> None:
        print(f"{'epoch':>5}  {'task':>7}  {'repa':>6}  {'raw':>6}  {'τ':>6}  {'calib.':>6}  λ")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Student) -> None:
        m, h = trainer.callback_metrics, self.aligner.history[-1]
        print(f"{trainer.current_epoch + 1:>5}  {float(m['task_loss']):7.4f}  "
              f"{float(m['repa_loss']):6.3f}  {h['alignment/cknna/raw']:6.3f}  "
              f"{h['alignment/cknna/threshold']:6.3f}  {h[KEY]:6.3f}  "
              f"{pl_module.epoch_stats['lambda']:g}")


def switch_off(trainer: pl.Trainer, pl_module: Student) -> None:
    """on_plateau: λ -> 0 from the next step on."""
    before = float(pl_module.repa_weight)
    pl_module.repa_weight.zero_()
    print(f"AlignmentPlateau fired after epoch {trainer.current_epoch + 1} (step "
          f"{trainer.global_step}): calibrated CKNNA stopped improving; λ {before:g} -> 0")


def make_data(n: int, encoder: Encoder, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=g)
    w = torch.randn(FEAT_DIM, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        y = torch.tanh(encoder(x)) @ w / FEAT_DIM ** 0.5
    return x, y + 0.05 * torch.randn(n, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15, help="training epochs at most")
    parser.add_argument("--n", type=int, default=1024, help="training samples")
    parser.add_argument("--probe", type=int, default=256, help="probe samples")
    parser.add_argument("--permutations", type=int, default=200, help="K of the null")
    parser.add_argument("--lam", type=float, default=0.5, help="initial alignment loss weight")
    parser.add_argument("--patience", type=int, default=2,
                        help="checks (alignment steps) in a row without a gain before the loss is "
                             "switched off")
    parser.add_argument("--min-delta", type=float, default=0.01,
                        help="the smallest rise of calibrated CKNNA that counts as a gain")
    parser.add_argument("--out", default=".",
                        help="Lightning's default_root_dir (this run writes no files there: no "
                             "logger, no checkpoints)")
    args = parser.parse_args()
    for flag in ("epochs", "n", "probe", "permutations", "patience"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    start = time.perf_counter()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        encoder = Encoder().eval().requires_grad_(False)
    x, y = make_data(args.n, encoder, seed=0)
    probe, _ = make_data(args.probe, encoder, seed=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    aligner = AlignmentCallback(
        encoder, probe, {"encoder": "features"},  # the student's hidden state ~ the encoder's
        num_permutations=args.permutations, log_heatmaps=False,
        **resolve_preset("repa", {}),  # CKNNA k = 10 on (patch-)mean-pooled, L2-normalized rows
    )
    plateau = AlignmentPlateau(KEY, mode="max", patience=args.patience, min_delta=args.min_delta,
                               on_plateau=switch_off)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.out,
                         callbacks=[aligner, PrintEpochs(aligner), plateau])
    model = Student(encoder, args.lam)
    trainer.fit(model, loader)

    if plateau.fired:
        at = plateau.fired_at
        print(f"λ was switched off after epoch {at['epoch']} of {args.epochs} (calibrated "
              f"CKNNA reached {at['best']:.3f}, then gained no more than {args.min_delta:g} "
              f"over it in {args.patience} epoch(s))")
    else:
        print(f"calibrated CKNNA kept improving: λ stayed {args.lam:g} for all {args.epochs} "
              "epochs")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
