"""Resuming AlignmentCallback: the monitors see the history's last values as an uninterrupted
run's do, and a checkpoint of another probe (other rows, or the same number of other rows)
starts new curves instead of continuing the old ones."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from alignment_callback import AlignmentCallback, AlignmentPlateau
from alignment_callback.callback import settings
from tests.helpers import (
    FAST_TRAINER,
    MLP,
    alignment_rows,
    make_probe,
    quiet_callback,
    train_loader,
)

N = 48
PROBE = make_probe(N)
KEY = "alignment/linear_cka/calibrated"
# 64 training rows in batches of 16: 4 optimizer steps per epoch


def callback(**kw) -> AlignmentCallback:
    kw.setdefault("layers", ["fc1"])
    return quiet_callback(PROBE, ["linear_cka"], 19, **kw)


def fit(callbacks, max_epochs, ckpt_path=None, **trainer_kw) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer_kw.setdefault("logger", False)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks,
                         enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                         **FAST_TRAINER, **trainer_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
        trainer.fit(MLP(), train_loader(), ckpt_path=ckpt_path)
    return trainer


class Seen(pl.Callback):
    """The monitored key in ``trainer.callback_metrics`` at every epoch end (None: absent)."""

    def __init__(self) -> None:
        self.values: list[float | None] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(KEY)
        self.values.append(None if value is None else float(value))


# ------------------------------------------------------------- monitors after a resume
SCHEDULES = [{"every_n_train_steps": 20}, {"every_n_epochs": 4}]  # no step in 3 epochs


def monitored(schedule: dict) -> tuple[AlignmentCallback, AlignmentPlateau, Seen, list]:
    cb = callback(**schedule)
    plateau = AlignmentPlateau(KEY, patience=2, source="metrics",
                               on_plateau=lambda trainer, module: None)
    seen = Seen()
    # strict monitors: a key missing at an epoch end is an error
    return cb, plateau, seen, [cb, plateau, seen, EarlyStopping(KEY, mode="max", patience=100)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_monitors_see_the_last_value_after_a_resume_before_the_next_step(tmp_path, schedule):
    """Resumed from a checkpoint written before the next alignment step, the monitors find the
    key (before: EarlyStopping and AlignmentPlateau(source="metrics") raised), see what an
    uninterrupted run's see, and the loggers get no second point of it."""
    whole, whole_plateau, whole_seen, callbacks = monitored(schedule)
    fit(callbacks, max_epochs=3, logger=CSVLogger(tmp_path, name="whole"))
    baseline = whole.history[0][KEY]
    assert [h["step"] for h in whole.history] == [0]
    assert whole_seen.values == [pytest.approx(baseline)] * 3
    assert whole_plateau.fired_at is not None and whole_plateau.fired_at["epoch"] == 3

    _, _, _, callbacks = monitored(schedule)
    fit(callbacks + [ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1)],
        max_epochs=1, enable_checkpointing=True)
    resumed, plateau, seen, callbacks = monitored(schedule)
    fit(callbacks, max_epochs=3, ckpt_path=str(tmp_path / "ck" / "epoch=0-step=4.ckpt"),
        logger=CSVLogger(tmp_path, name="resumed"))
    assert [h["step"] for h in resumed.history] == [0]
    assert seen.values == whole_seen.values[1:]
    assert plateau.fired_at == whole_plateau.fired_at  # the count went on as uninterrupted
    (csv_file,) = (tmp_path / "resumed").glob("version_*/metrics.csv")
    assert alignment_rows(csv_file) == []  # the baseline was logged by the first run only


def test_a_step_at_the_first_epoch_end_after_a_resume_replaces_the_last_value(tmp_path):
    """Epoch mode: the history's last value, put back at the resume, gives way to the next
    step's value at the epoch end where that step runs (not mixed with it)."""
    first = callback(every_n_epochs=2)
    fit([first, ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)],
        max_epochs=2, enable_checkpointing=True)
    resumed, seen = callback(every_n_epochs=2), Seen()
    trainer = fit([resumed, seen], max_epochs=4, ckpt_path=str(tmp_path / "epoch=1-step=8.ckpt"))
    assert [h["step"] for h in resumed.history] == [0, 8, 16]
    assert seen.values == [pytest.approx(resumed.history[1][KEY]),
                           pytest.approx(resumed.history[2][KEY])]
    assert float(trainer.callback_metrics[KEY]) == pytest.approx(resumed.history[2][KEY])


# ----------------------------------------------------------------- another probe at a resume
def first_run(tmp_path) -> str:
    """Two epochs (steps 0, 4, 8) on ``PROBE`` with a checkpoint at the end; returns it."""
    fit([callback(), ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)],
        max_epochs=2, enable_checkpointing=True)
    return str(tmp_path / "epoch=1-step=8.ckpt")


def resume(ckpt: str, probe) -> tuple[AlignmentCallback, list[str]]:
    cb = callback(probe=probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([cb], max_epochs=3, ckpt_path=ckpt)
    return cb, [str(w.message) for w in caught if "other settings" in str(w.message)]


def test_a_probe_of_other_rows_starts_new_curves(tmp_path):
    ckpt = first_run(tmp_path)
    cb, said = resume(ckpt, make_probe(N + 8))
    assert len(said) == 1 and f"probe rows {N} → {N + 8}" in said[0]
    assert "every curve starts anew" in said[0]
    assert [h["step"] for h in cb.history] == [8, 12]  # a baseline at the resume, then on
    assert cb._samples == N + 8


def test_a_probe_of_the_same_size_with_other_values_starts_new_curves(tmp_path):
    ckpt = first_run(tmp_path)
    cb, said = resume(ckpt, make_probe(N, seed=7))
    assert len(said) == 1 and "probe inputs 'sha256:" in said[0]
    assert "probe rows" not in said[0]
    assert [h["step"] for h in cb.history] == [8, 12]


def test_the_same_probe_otherwise_batched_continues_the_curves(tmp_path):
    ckpt = first_run(tmp_path)
    loader = DataLoader(TensorDataset(PROBE.clone(), torch.zeros(N)), batch_size=20)
    cb, said = resume(ckpt, loader)
    assert not said and [h["step"] for h in cb.history] == [0, 4, 8, 12]


def test_a_checkpoint_without_the_probes_settings_compares_its_samples(tmp_path):
    """A checkpoint written before its settings recorded the probe: its row count ("samples")
    is compared; its inputs cannot be."""
    ckpt = first_run(tmp_path)
    state = torch.load(ckpt, weights_only=True)
    (saved,) = [v for k, v in state["callbacks"].items() if k.startswith("AlignmentCallback")]
    assert saved["samples"] == N
    for field in ("probe rows", "probe inputs"):
        saved["settings"].pop(field, None)
    torch.save(state, ckpt)
    cb, said = resume(ckpt, make_probe(N, seed=7))  # other values: not known to differ
    assert not said and [h["step"] for h in cb.history] == [0, 4, 8, 12]
    cb, said = resume(ckpt, make_probe(N + 8))
    assert len(said) == 1 and f"probe rows {N} → {N + 8}" in said[0]
    assert [h["step"] for h in cb.history] == [8, 12]


# --------------------------------------------------------------------------- probe digest
def test_the_probe_digest_is_of_the_input_values_only():
    x = torch.arange(12.0).reshape(6, 2)
    digest = settings.probe_digest(x)
    # fixed across machines and runs: a sha256 of the bytes, dtypes and row shapes
    assert digest == "sha256:7d6170022b3ef343"
    assert settings.probe_digest(list(x.split(4))) == digest
    assert settings.probe_digest([(x, torch.ones(6))]) == digest  # labels are not inputs
    assert settings.probe_digest(x.flip(0)) != digest
    assert settings.probe_digest(x.double()) != digest
    assert settings.probe_digest({"ids": x}) == settings.probe_digest([{"ids": x}])


class Box:
    """A batch only a ``batch_transform`` understands; its text holds its address."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


def test_a_probe_of_other_objects_has_no_digest():
    """The text of an object may hold its memory address, which differs from run to run: such
    a probe is compared by its rows only."""
    assert settings.probe_digest([Box(PROBE)]) is None
    assert settings.probe_digest([{"x": PROBE, "meta": Box(PROBE)}]) is None
    assert settings.probe_digest([{"x": PROBE, "text": ["a"] * N}]) is not None


class _Validated(MLP):
    def validation_step(self, batch, index):
        self.log("val", self(batch[0]).square().mean())


def test_validate_or_test_from_a_checkpoint_leaves_the_fits_state(tmp_path):
    """Lightning loads callback states for ``validate`` / ``test`` given a ``ckpt_path`` too:
    the common "fit, then test the best checkpoint" replaced the fit's history with the
    checkpoint's (steps [0, 4, 8] of [0, 4, 8, 12, 16]) and the plateau's count, and a new
    callback of other settings warned that its curves restart although no fit ran."""
    cb = callback()
    plateau = AlignmentPlateau(KEY, patience=50, source=cb, on_plateau=lambda t, m: None)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer = fit([cb, plateau, ckpt], 4, enable_checkpointing=True)
    history = [dict(h) for h in cb.history]
    counts = plateau.state_dict()
    assert [h["step"] for h in history] == [0, 4, 8, 12, 16]
    fresh = callback(seed=9)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("error", ".*resumes from a checkpoint.*")
        data = train_loader(shuffle=False)
        trainer.validate(_Validated(), data, ckpt_path=str(tmp_path / "epoch=0.ckpt"),
                         verbose=False)
        pl.Trainer(callbacks=[fresh], logger=False, **FAST_TRAINER).validate(
            _Validated(), data, ckpt_path=str(tmp_path / "epoch=1.ckpt"), verbose=False)
    assert cb.history == history and plateau.state_dict() == counts
    assert fresh.history == []
    cb.load_state_dict(torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
                       ["callbacks"][cb.state_key])  # called directly: loaded
    assert [h["step"] for h in cb.history] == [0, 4]


@pytest.mark.parametrize("spelled, kept", [(["fc1", "fc2"], True), ("fc*", True),
                                           ("re:fc[12]", True), (["fc1"], False)])
def test_reference_layers_are_compared_as_the_layers_they_choose(tmp_path, spelled, kept):
    """The student's layers are compared at a resume as the layers chosen, however spelled;
    a reference model's were compared as written, so giving the default reference layers by
    name, or as a pattern, dropped every curve (with a warning that the reference changed)."""
    first = callback(layers=["fc1", "fc2"])
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit([first, saver], max_epochs=2, enable_checkpointing=True)
    resumed = callback(layers=["fc1", "fc2"], reference_layers=spelled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([resumed], max_epochs=3, ckpt_path=str(tmp_path / "last.ckpt"))
    warned = [str(w.message) for w in caught if "resumes from a checkpoint" in str(w.message)]
    steps = [h["step"] for h in resumed.history]
    if kept:
        assert not warned and steps[:len(first.history)] == [h["step"] for h in first.history]
        assert resumed.history[:len(first.history)] == first.history
    else:
        assert len(warned) == 1 and "reference" in warned[0], warned
        assert steps[0] == first.history[-1]["step"]  # a new history, with a baseline
