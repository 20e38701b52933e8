"""The end-of-fit report as the callback writes it: steps skipped under ``on_error="warn"``
are recorded (and checkpointed) and listed, a failed copy of the report to a logger never
fails the finished fit, and the settings name what was compared (the layers a pattern chose,
a callable aggregate by its name)."""

from __future__ import annotations

import importlib.util
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from alignment_callback import AlignmentCallback
from alignment_callback.callback import dispatch
from tests.helpers import FAST_TRAINER, MLP, RefMLP, make_probe, train_loader

FAILING = {"epochs": set()}  # alignment steps whose model activations are NaN, by epoch label


class _Toggle(pl.Callback):
    """Makes the alignment step labelled ``epoch + 1`` see NaN activations."""

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module._nan = trainer.current_epoch + 1 in FAILING["epochs"]

    def on_train_epoch_start(self, trainer, pl_module):
        pl_module._nan = False


def _nan_model() -> MLP:
    model = MLP()
    model._nan = False
    model.fc2.register_forward_hook(
        lambda mod, inp, out: out * float("nan") if getattr(model, "_nan", False) else out)
    return model


def _cb(**kw) -> AlignmentCallback:
    kw.setdefault("measures", ["linear_cka"])
    return AlignmentCallback(RefMLP(seed=1), make_probe(), ["fc1", "fc2"], num_permutations=19,
                             verbose=False, on_error="warn", log_heatmaps=False, **kw)


def _fit(tmp_path, cb, max_epochs=3, model=None):
    trainer = pl.Trainer(max_epochs=max_epochs, logger=CSVLogger(tmp_path, name="csv"),
                         callbacks=[_Toggle(), cb], enable_checkpointing=False, **FAST_TRAINER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model if model is not None else _nan_model(), train_loader())
    return trainer


def test_skipped_steps_are_recorded_checkpointed_and_reported(tmp_path):
    FAILING["epochs"] = {2}
    cb = _cb()
    _fit(tmp_path, cb)
    assert [h["epoch"] for h in cb.history] == [0, 1, 3]
    assert [(s["epoch"], s["step"]) for s in cb.skipped] == [(2, 8)]
    reason = cb.skipped[0]["reason"]
    assert reason.startswith(("ValueError", "RuntimeError")) and reason.split(": ", 1)[1]
    state = cb.state_dict()
    assert state["skipped"] == cb.skipped
    again = _cb()
    again.load_state_dict(state)
    assert again.skipped == cb.skipped
    report = open(cb.report_paths[0], encoding="utf-8").read()
    assert "Skipped" in report and reason.split(": ", 1)[1][:40] in report


def test_a_fit_whose_every_step_failed_still_gets_a_report(tmp_path):
    FAILING["epochs"] = {0, 1, 2}
    cb = _cb(baseline=False)
    model = _nan_model()
    model._nan = True  # also the first step
    _fit(tmp_path, cb, max_epochs=2, model=model)
    assert cb.history == [] and [s["epoch"] for s in cb.skipped] == [1, 2]
    assert cb.report_paths is not None
    report = open(cb.report_paths[0], encoding="utf-8").read()
    assert "Skipped" in report


def test_a_new_fit_forgets_the_skipped_steps_of_the_last(tmp_path):
    FAILING["epochs"] = {1}
    cb = _cb()
    _fit(tmp_path / "a", cb, max_epochs=1)
    assert len(cb.skipped) == 1
    FAILING["epochs"] = set()
    _fit(tmp_path / "b", cb, max_epochs=1)
    assert cb.skipped == []


def test_a_failed_copy_of_the_report_to_a_logger_does_not_fail_the_fit(tmp_path, monkeypatch):
    FAILING["epochs"] = set()

    def broken(loggers, paths):
        raise NotADirectoryError("artifacts: not a directory")

    monkeypatch.setattr(dispatch, "save_files", broken)
    cb = _cb()
    trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="csv"), callbacks=[cb],
                         enable_checkpointing=False, **FAST_TRAINER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MLP(), train_loader())  # raised NotADirectoryError before
    assert cb.report_paths is not None and len(cb.history) == 2
    messages = [str(w.message) for w in caught]
    assert any("could not be saved to the loggers" in m and "not a directory" in m
               for m in messages)


def test_report_settings_name_the_chosen_layers_and_the_aggregate(tmp_path):
    FAILING["epochs"] = set()

    def top_two(m: torch.Tensor) -> torch.Tensor:
        return m.flatten(-2).topk(2, dim=-1).values.mean(-1)

    cb = AlignmentCallback(RefMLP(seed=1), make_probe(), "fc*", measures=["linear_cka"],
                           num_permutations=19, verbose=False, log_heatmaps=False,
                           aggregate=top_two)
    trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="csv"), callbacks=[cb],
                         enable_checkpointing=False, **FAST_TRAINER)
    trainer.fit(MLP(), train_loader())
    report = open(cb.report_paths[0], encoding="utf-8").read()
    chosen = [name for name, _ in MLP().named_modules() if name.startswith("fc")]
    assert ", ".join(chosen) in report
    assert "top_two" in report and " at 0x" not in report


def test_a_failed_step_is_not_retried_at_each_micro_batch(tmp_path):
    """Gradient accumulation calls the batch hook once per micro-batch of a global step: a
    step that failed is done (skipped), not retried and counted again at the next one."""
    FAILING["epochs"] = set()
    calls = []
    cb = _cb(every_n_train_steps=1, baseline=False)

    def boom(*args, **kwargs):
        calls.append(args[1:3])
        raise RuntimeError("the step broke")

    cb._capture_and_compute = boom
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=4, logger=False, callbacks=[cb],
                         enable_checkpointing=False, **FAST_TRAINER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MLP(), train_loader(n=128))
    assert [s["step"] for s in cb.skipped] == [1, 2] and len(calls) == 2


def test_a_missing_matplotlib_is_said_for_the_report_too(tmp_path, monkeypatch):
    """Without matplotlib the heatmaps were said to be skipped, the report (default on) was
    not written without a word."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None
                        if name.split(".")[0] == "matplotlib" else real(name, *a, **k))
    cb = AlignmentCallback(RefMLP(seed=1), make_probe(), ["fc1", "fc2"], measures=["linear_cka"],
                           num_permutations=19, verbose=False)
    trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="csv"), callbacks=[cb],
                         enable_checkpointing=False, **FAST_TRAINER)
    with pytest.warns(RuntimeWarning, match="report needs matplotlib .* no end-of-fit report"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer.fit(MLP(), train_loader())
    assert cb.report_paths is None


class _Boom(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("boom")


def test_the_heatmap_folder_is_removed_when_the_fit_fails(tmp_path, monkeypatch):
    """Lightning calls no teardown after an exception: the temporary folder of the heatmap
    PNGs was left behind."""
    import alignment_callback.callback.alignment_callback as module

    made, mkdtemp = [], module.tempfile.mkdtemp
    monkeypatch.setattr(module.tempfile, "mkdtemp",
                        lambda *a, **k: made.append(mkdtemp(*a, dir=tmp_path, **k)) or made[-1])
    cb = AlignmentCallback(RefMLP(seed=1), make_probe(), ["fc1", "fc2"], measures=["linear_cka"],
                           num_permutations=19, verbose=False, report=False)
    trainer = pl.Trainer(max_epochs=3, logger=CSVLogger(tmp_path, name="csv"),
                         callbacks=[cb, _Boom()], enable_checkpointing=False, **FAST_TRAINER)
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MLP(), train_loader())
    assert len(made) == 1 and not os.path.exists(made[0]) and cb._scratch is None


def test_a_disabled_wandb_run_does_not_hold_the_report(tmp_path, monkeypatch):
    """A disabled W&B run's folder is a temporary one outside save_dir: the report goes to the
    next logger's folder."""
    from lightning.pytorch.loggers import WandbLogger

    for var, value in {"WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(var, value)
    cb = _cb()
    csv = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(max_epochs=1, logger=[WandbLogger(mode="disabled", save_dir=tmp_path),
                                               csv],
                         callbacks=[cb], enable_checkpointing=False, **FAST_TRAINER)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(MLP(), train_loader())
    finally:  # a run left open is taken up by the next WandbLogger of this process
        import wandb

        wandb.finish()
    assert cb.report_paths is not None
    for path in cb.report_paths:
        assert os.path.dirname(os.path.abspath(path)) == os.path.abspath(csv.log_dir), path


def test_the_report_settings_name_the_preset_preprocessing_and_pools(tmp_path):
    """Two runs whose values differ by their preprocessing (a preset's clamp) had the same
    Settings section."""
    FAILING["epochs"] = set()
    cb = _cb(preset="prh", reference_pool="flatten")
    _fit(tmp_path, cb, max_epochs=1)
    report = open(cb.report_paths[0], encoding="utf-8").read()
    settings = report[report.index("Settings"):]
    for line in ("preset: prh", "preprocess: clamp_quantile: 0.95; normalize: yes",
                 "pool: mean", "reference pool: reference: flatten"):
        assert f"- {line}\n" in settings, (line, settings[:800])


def test_monitors_are_told_when_a_failed_step_leaves_them_an_earlier_value(tmp_path):
    """A failed step logs nothing: a checkpoint at its epoch end was scored, silently, with the
    alignment of the last step that succeeded (other weights)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    FAILING["epochs"] = {2}
    cb = _cb()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="alignment/linear_cka/calibrated",
                                 mode="max", save_top_k=-1)
    trainer = pl.Trainer(max_epochs=3, logger=False, callbacks=[_Toggle(), cb, checkpoint],
                         default_root_dir=tmp_path, **FAST_TRAINER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_nan_model(), train_loader())
    said = [str(w.message) for w in caught if "failed, so until" in str(w.message)]
    assert said == ["ModelCheckpoint(monitor='alignment/linear_cka/calibrated'): the alignment "
                    "step at epoch 2 (step 8) failed, so until the next alignment step it reads "
                    "the value of the last step that succeeded (epoch 1, step 4), measured on "
                    "earlier weights"]
    assert [(s["epoch"], s["step"]) for s in cb.skipped] == [(2, 8)]
