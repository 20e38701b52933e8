"""Feedback where people look: a console line per measure after each step, calibrated values on
the progress bar, the end-of-fit report (its numbers equal the history), best layers by name,
and the W&B run's summary, curves chart and pairs table."""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from alignment_callback import AlignmentCallback
from alignment_callback.engine.report import fmt, fmt_p
from tests.helpers import (
    FAST_TRAINER,
    LAYERS,
    MLP,
    RefMLP,
    make_probe,
    train_loader,
)

K = 30
MEASURES = ["linear_cka", "mutual_knn"]


def _cb(**kw):
    kw.setdefault("num_permutations", K)
    kw.setdefault("measures", MEASURES)
    return AlignmentCallback(RefMLP(seed=1), make_probe(), LAYERS, **kw)


def _fit(logger, callbacks, max_epochs=2, **kw):
    trainer = pl.Trainer(max_epochs=max_epochs, logger=logger, callbacks=callbacks,
                         enable_checkpointing=False, **{**FAST_TRAINER, **kw})
    trainer.fit(MLP(), train_loader())
    return trainer


def test_console_line_per_measure_after_each_step(tmp_path, capsys):
    cb = _cb(log_heatmaps=False)
    _fit(CSVLogger(tmp_path, name="csv"), [cb])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("alignment epoch")]
    assert len(lines) == len(MEASURES) * len(cb.history)
    for h in cb.history:
        for m in MEASURES:
            a, b = h[f"alignment/{m}/best_pair"].split("|")
            expected = (f"alignment epoch {h['epoch']} (step {h['step']}) {m}: raw "
                        f"{h[f'alignment/{m}/raw']:.3f} → calibrated "
                        f"{h[f'alignment/{m}/calibrated']:.3f}")
            line = next(x for x in lines if x.startswith(expected))
            assert line.endswith(f"best {a} ~ {b}")
    assert "alignment report:" in out


def test_verbose_false_prints_nothing(tmp_path, capsys):
    _fit(CSVLogger(tmp_path, name="csv"), [_cb(log_heatmaps=False, verbose=False)])
    assert "alignment epoch" not in capsys.readouterr().out


@pytest.mark.parametrize("progress_bar", [True, False])
def test_calibrated_values_on_the_progress_bar(tmp_path, progress_bar):
    cb = _cb(log_heatmaps=False, verbose=False, progress_bar=progress_bar)
    trainer = _fit(CSVLogger(tmp_path, name="csv"), [cb], enable_progress_bar=True)
    keys = {f"alignment/{m}/calibrated" for m in MEASURES}
    assert keys <= set(trainer.callback_metrics)
    assert (keys <= set(trainer.progress_bar_metrics)) is progress_bar
    for key in keys:
        if progress_bar:
            assert trainer.progress_bar_metrics[key] == pytest.approx(cb.history[-1][key])


def test_report_numbers_equal_the_history(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = _cb(verbose=False)
    _fit(logger, [cb])
    md, html = cb.report_paths
    assert os.path.dirname(md) == logger.log_dir and os.path.exists(html)
    text = Path(md).read_text()
    last = cb.history[-1]
    for m in MEASURES:
        row = next(line for line in text.splitlines() if line.startswith(f"| {m} |"))
        for field in ("raw", "threshold", "calibrated"):
            assert fmt(last[f"alignment/{m}/{field}"]) in row, (m, field, row)
        assert fmt_p(last[f"alignment/{m}/p_value"]) in row
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (Path(md).parent / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report's heatmaps are the last step's, as logged (not drawn again)
    epoch, step = cb.history[-1]["epoch"], cb.history[-1]["step"]
    for m in MEASURES:
        logged = Path(logger.log_dir, "alignment_heatmaps",
                      f"alignment_{m}_heatmap_epoch{epoch:04d}_step{step:06d}.png")
        assert Path(md).parent.joinpath(f"alignment_report_{m}.png").read_bytes() == logged.read_bytes()
    assert f"K (permutations): {K}" in text
    assert f"model layers: {', '.join(LAYERS)}" in text  # lists were dropped from the settings
    assert "references: " in text


def test_layer_names_map_goes_to_the_hyperparameters(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    _fit(logger, [_cb(log_heatmaps=False, verbose=False)], max_epochs=1)
    hparams = Path(logger.log_dir, "hparams.yaml").read_text()
    assert "alignment/layers/model" in hparams
    for layer in LAYERS:
        assert layer in hparams


def test_wandb_run_holds_summary_curves_and_one_pairs_table(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="feedback")
    cb = _cb(verbose=False)
    _fit(logger, [cb])
    summary = logger.experiment.summary
    run_dir = Path(logger.experiment.dir).parent
    for m in MEASURES:
        best = max(h[f"alignment/{m}/calibrated"] for h in cb.history)
        assert summary[f"alignment/{m}/calibrated"]["max"] == pytest.approx(best)
        assert summary[f"alignment/{m}/best_pair"] == cb.history[-1][f"alignment/{m}/best_pair"]
    wandb.finish()
    for m in MEASURES:
        (curves,) = glob.glob(str(run_dir / "files" / "media" / "table" / "alignment" / m
                                  / "curves_table_*.table.json"))
        data = json.loads(Path(curves).read_text())
        raws = [row for row in data["data"] if row[1] == "raw"]
        assert [r[2] for r in raws] == pytest.approx([h[f"alignment/{m}/raw"] for h in cb.history])
        assert len(glob.glob(str(run_dir / "files" / "media" / "table" / "alignment" / m
                                 / "pairs_*.table.json"))) == 1
    saved = {p.name for p in (run_dir / "files").iterdir()}
    assert {"alignment_report.md", "alignment_report.html", "alignment_report_curves.png"} | {
        f"alignment_report_{m}.png" for m in MEASURES} <= saved  # the report with its images


def test_each_wandb_run_keeps_its_own_report_as_files(tmp_path, monkeypatch):
    """W&B's save_dir is shared by its runs: with W&B the first logger every run wrote the
    report to ``<save_dir>/alignment_report.md`` (the second overwrote the first), and each run
    held symbolic links to it, so the first run would have synced the second's report; behind a
    CSV logger, its run files were links into the CSV logger's folder."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folders = []
    for epochs, csv_first in ((1, False), (2, False), (1, True)):
        logger = WandbLogger(save_dir=str(tmp_path / "wb"), offline=True, project="feedback")
        loggers = [CSVLogger(tmp_path, name="csv"), logger] if csv_first else [logger]
        cb = _cb(verbose=False, measures=["linear_cka"], log_heatmaps=False)
        _fit(loggers, [cb], max_epochs=epochs)
        files = logger.experiment.dir
        wandb.finish()
        assert (os.path.dirname(cb.report_paths[0]) == files) != csv_first
        report = Path(files) / "alignment_report.md"
        assert not report.is_symlink() and report.is_file()
        assert f"(epoch {epochs}, step {4 * epochs})" in report.read_text()
        folders.append(files)
    assert len(set(folders)) == 3


@pytest.mark.parametrize("steps", [None, 3])
def test_report_curves_against_epochs_or_steps(tmp_path, monkeypatch, steps):
    """The report's curves run along the epochs, or along the steps when several alignment
    steps fall in one epoch (``every_n_train_steps``), never with points stacked at one x."""
    from alignment_callback.metrics import plotting

    drawn = []
    real = plotting.plot_scores

    def spy(*args, **kwargs):
        drawn.append((kwargs["xlabel"], list(kwargs["steps"])))
        return real(*args, **kwargs)

    monkeypatch.setattr(plotting, "plot_scores", spy)
    cb = _cb(verbose=False, measures=["linear_cka"],
             **({} if steps is None else {"every_n_train_steps": steps}))
    _fit(CSVLogger(tmp_path, name="csv"), [cb])
    (xlabel, xs), = drawn
    field = "epoch" if steps is None else "step"
    assert xlabel == field and xs == [h[field] for h in cb.history]
    assert len(set(xs)) == len(xs)


def test_a_reference_without_result_at_the_first_step_gets_its_layer_map(tmp_path):
    """reference="previous" has no result at the first step: its index -> name map was never
    logged, since the map went out once, at the first step with any result."""
    logger = CSVLogger(tmp_path, name="csv")
    cb = AlignmentCallback({"frozen": RefMLP(seed=1), "prev": "previous"}, make_probe(), LAYERS,
                           measures=["linear_cka"], num_permutations=K, log_heatmaps=False,
                           verbose=False, report=False)
    _fit(logger, [cb], max_epochs=2)
    hparams = Path(logger.log_dir, "hparams.yaml").read_text()
    assert set(cb.last_results) == {"frozen/linear_cka", "prev/linear_cka"}
    for label in cb.last_results:
        assert f"alignment/layers/reference/{label}" in hparams, label
