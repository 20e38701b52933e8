"""Tiny models, data and offline recomputation shared by the callback tests.

Everything here is small on purpose (a 2-core CPU runs the whole callback suite in well under
3 minutes): MLPs of width 16, 64-128 samples, a few permutations.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from alignment_callback.functional import calibrated_layer_alignment, prepare_features
from alignment_callback.hooks import collect_activations

IN_DIM = 8
LAYERS = ["fc1", "fc2", "head"]
FAST_TRAINER = dict(
    accelerator="cpu",
    devices=1,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    log_every_n_steps=1,
)


def _build(in_dim: int, hidden: int, out_dim: int, dropout: float, seed: int
           ) -> dict[str, nn.Module]:
    """Layers built from their own seed, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dict(
            fc1=nn.Linear(in_dim, hidden),
            act1=nn.Tanh(),
            drop=nn.Dropout(dropout),
            fc2=nn.Linear(hidden, hidden),
            act2=nn.Tanh(),
            head=nn.Linear(hidden, out_dim),
        )


class MLP(pl.LightningModule):
    """``fc1 -> tanh -> dropout -> fc2 -> tanh -> head`` regression MLP with named layers."""

    def __init__(self, in_dim: int = IN_DIM, hidden: int = 16, out_dim: int = 2, seed: int = 0,
                 dropout: float = 0.0, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, module in _build(in_dim, hidden, out_dim, dropout, seed).items():
            setattr(self, name, module)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.act1(self.fc1(x)))
        return self.head(self.act2(self.fc2(h)))

    def _xy(self, batch: Any) -> tuple[Tensor, Tensor]:
        return batch[0], batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._xy(batch)
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DictMLP(MLP):
    """The same MLP trained on ``{"x": ..., "y": ...}`` batches."""

    def _xy(self, batch: Any) -> tuple[Tensor, Tensor]:
        return batch["x"], batch["y"]


class RefMLP(nn.Module):
    """A plain (non-Lightning) frozen reference with the same layer names."""

    def __init__(self, in_dim: int = IN_DIM, hidden: int = 16, out_dim: int = 2,
                 seed: int = 1) -> None:
        super().__init__()
        for name, module in _build(in_dim, hidden, out_dim, 0.0, seed).items():
            setattr(self, name, module)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


def make_data(n: int = 64, in_dim: int = IN_DIM, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    y = torch.stack([torch.sin(x[:, 0]) + x[:, 1], x[:, 2] * x[:, 3]], 1)
    return x, y


def make_probe(n: int = 64, in_dim: int = IN_DIM, seed: int = 123) -> Tensor:
    return torch.randn(n, in_dim, generator=torch.Generator().manual_seed(seed))


def train_loader(n: int = 64, batch_size: int = 16, shuffle: bool = True, seed: int = 0
                 ) -> DataLoader:
    data = TensorDataset(*make_data(n, seed=seed))
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


class DictDataset(Dataset):
    def __init__(self, x: Tensor, y: Tensor | None = None) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"x": self.x[i]}
        if self.y is not None:
            item["y"] = self.y[i]
        return item


class TinyDataModule(pl.LightningDataModule):
    """Synthetic regression data for ``MLP`` (used by the LightningCLI test)."""

    def __init__(self, n: int = 64, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.n, self.batch_size, shuffle=True, seed=self.seed)


# ------------------------------------------------------------------------------ reading logs
def quiet_callback(probe: Any, measures: Sequence[str], num_permutations: int, /,
                   **kw: Any) -> Any:
    """An ``AlignmentCallback`` (default: reference ``RefMLP()``, layers fc1 and fc2) that
    draws no heatmaps, writes no report and prints nothing, unless ``kw`` says otherwise; the
    positional arguments are defaults that ``kw`` may replace."""
    from alignment_callback import AlignmentCallback

    kw.setdefault("log_heatmaps", False)
    kw.setdefault("report", False)
    kw.setdefault("verbose", False)
    reference = kw.pop("reference", None) or RefMLP()
    return AlignmentCallback(reference, kw.pop("probe", probe), kw.pop("layers", ["fc1", "fc2"]),
                             measures=kw.pop("measures", measures),
                             num_permutations=kw.pop("num_permutations", num_permutations), **kw)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def alignment_rows(metrics_csv: str | os.PathLike, prefix: str = "alignment"
                   ) -> list[dict[str, str]]:
    """Rows of a CSVLogger ``metrics.csv`` that carry alignment scalars."""
    return [r for r in read_csv(metrics_csv) if r.get(f"{prefix}/epoch", "") != ""]


def csv_metrics_file(logger: Any) -> Path:
    return Path(logger.log_dir) / "metrics.csv"


# ------------------------------------------------------------------------ offline recompute
def offline_alignment(model: nn.Module, reference: nn.Module, probe: Any, layers: Sequence[str],
                      metric: str, num_permutations: int, seed: int = 0, alpha: float = 0.05,
                      reference_layers: Sequence[str] | None = None, reference_probe: Any = None,
                      pool: Any = "mean", **collect_kwargs: Any):
    """What the callback should log, recomputed with the pure functions."""
    xs = collect_activations(model, probe, list(layers), pool=pool, **collect_kwargs)
    ys = collect_activations(reference, probe if reference_probe is None else reference_probe,
                             list(reference_layers or layers), pool=pool, **collect_kwargs)
    xs = {k: prepare_features(v) for k, v in xs.items()}
    ys = {k: prepare_features(v) for k, v in ys.items()}
    return calibrated_layer_alignment(xs, ys, metric, num_permutations=num_permutations,
                                      alpha=alpha, seed=seed)
