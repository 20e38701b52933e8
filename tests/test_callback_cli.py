"""AlignmentCallback configured from a LightningCLI YAML file (class paths, a .pt probe)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import (
    LAYERS,
    MLP,
    TinyDataModule,
    alignment_rows,
    make_probe,
)

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]")


def test_lightning_cli_yaml_config(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["lightning"])  # pytest's own arguments are not the CLI's
    probe_path = tmp_path / "probe.pt"
    torch.save(make_probe(), probe_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  log_every_n_steps: 1
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {tmp_path / "logs"}
      name: cli
  callbacks:
    - class_path: alignment_callback.AlignmentCallback
      init_args:
        reference:
          class_path: tests.helpers.RefMLP
          init_args:
            seed: 1
            hidden: 12
        probe: {probe_path}
        layers: {LAYERS}
        measures: [linear_cka]
        num_permutations: 20
        log_heatmaps: false
model:
  hidden: 16
  lr: 0.05
data:
  n: 64
  batch_size: 16
""")
    cli = LightningCLI(MLP, TinyDataModule, args=["fit", "--config", str(config)], run=True,
                       save_config_kwargs={"overwrite": True})
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "AlignmentCallback"]
    assert type(cb.reference).__name__ == "RefMLP" and cb.reference.fc1.out_features == 12
    assert torch.equal(cb.probe, make_probe())
    assert cb.num_permutations == 20 and list(cb.measures) == ["linear_cka"]
    assert [h["epoch"] for h in cb.history] == [0, 1]

    rows = alignment_rows(tmp_path / "logs" / "cli" / "version_0" / "metrics.csv")
    assert [float(r["alignment/epoch"]) for r in rows] == [0.0, 1.0]
    for field in ("raw", "calibrated", "p_value", "threshold"):
        assert all(r[f"alignment/linear_cka/{field}"] != "" for r in rows)
    assert float(rows[-1]["alignment/linear_cka/calibrated"]) == pytest.approx(
        cb.history[-1]["alignment/linear_cka/calibrated"])
    assert isinstance(cli.model, MLP)
