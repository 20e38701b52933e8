"""When the alignment steps run and how they are labeled, against Lightning's loop: a step's
``epoch`` counts finished epochs in both modes, an epoch cut short is not a finished epoch, a
resume from a checkpoint written at an epoch's last batch runs that epoch's step, the
baseline reaches a monitor that checks mid-epoch, and monitors that would read a value
measured on earlier weights are warned about at setup, naming the setting that fixes them."""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from alignment_callback import AlignmentPlateau
from tests.helpers import FAST_TRAINER, MLP, make_data, make_probe, quiet_callback, train_loader

KEY = "alignment/linear_cka/calibrated"
# 64 training rows in batches of 16: 4 optimizer steps per epoch


class ValMLP(MLP):
    """The MLP with a validation loop."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))


def callback(**kw):
    kw.setdefault("layers", ["fc1"])
    return quiet_callback(make_probe(48), ["linear_cka"], 19, **kw)


def fit(callbacks, module=None, ckpt_path=None, val=False, loader=None, **trainer_kw):
    pl.seed_everything(0, verbose=False)
    trainer_kw.setdefault("max_epochs", 3)
    trainer = pl.Trainer(callbacks=callbacks, logger=False,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                  for c in callbacks),
                         **{**FAST_TRAINER, **trainer_kw})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module or (ValMLP() if val else MLP()),
                    train_loader() if loader is None else loader,
                    train_loader(shuffle=False) if val else None, ckpt_path=ckpt_path)
    return trainer, [str(w.message) for w in caught]


def labels(cb):
    return [(int(h["epoch"]), int(h["step"])) for h in cb.history]


def test_the_epoch_label_counts_finished_epochs_in_both_modes():
    """Epoch mode logged the number of finished epochs, step mode the 0-based epoch in progress:
    the same state, at the last batch of the second epoch, was epoch 2 in one mode and 1 in the
    other."""
    by_epoch, by_step, every_two = callback(), callback(every_n_train_steps=4), \
        callback(every_n_train_steps=2)
    fit([by_epoch])
    fit([by_step])
    fit([every_two])
    assert labels(by_epoch) == [(0, 0), (1, 4), (2, 8), (3, 12)]
    assert labels(by_step) == labels(by_epoch)
    assert labels(every_two) == [(0, 0), (0, 2), (1, 4), (1, 6), (2, 8), (2, 10), (3, 12)]


def test_an_epoch_cut_short_has_no_epoch_step_and_a_resume_finishes_it(tmp_path):
    """max_steps = 6 stops in the middle of the second epoch: that was logged as epoch 2 (as if
    finished), and a run resumed from there logged epoch 2 twice (steps 6 and 8)."""
    whole = callback()
    fit([whole], max_epochs=3)
    cut = callback()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                            filename="{step}")
    fit([cut, saver], max_steps=6)
    assert labels(cut) == [(0, 0), (1, 4)]
    resumed = callback()
    fit([resumed], max_epochs=3, ckpt_path=str(tmp_path / "step=6.ckpt"))
    assert labels(resumed) == labels(whole)


def test_without_a_baseline_the_first_epochs_step_is_run_at_a_resume_too(tmp_path):
    """baseline=False: the checkpoint at the first epoch's last batch holds this callback's
    state with an empty history (no step yet), which was taken for "not resumed", so the first
    epoch's step was never computed."""
    whole = callback(baseline=False)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1,
                            filename="{step}")
    fit([whole, saver], max_epochs=3)
    resumed = callback(baseline=False)
    fit([resumed], max_epochs=3, ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert labels(resumed) == labels(whole) == [(1, 4), (2, 8), (3, 12)]
    assert resumed.history[0][KEY] == whole.history[0][KEY]


class _FirstBatch(pl.Callback):
    """The monitored key in ``trainer.callback_metrics`` when the first batch starts."""

    value = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.value is None:
            self.value = float(trainer.callback_metrics[KEY])


def test_a_checkpoint_at_an_epochs_last_batch_resumes_with_that_epochs_step(tmp_path):
    """A checkpoint every 4 training steps is written at the last batch of each epoch, before
    the epoch end where the epoch's step runs; Lightning resumes with the next epoch, so the
    step was lost for good (a gap in the curve).  It is run at the resume, on the same weights,
    and equals the uninterrupted run's."""
    whole = callback()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1,
                            filename="{step}")
    fit([whole, saver], max_epochs=4)
    resumed, seen = callback(), _FirstBatch()
    fit([resumed, seen], max_epochs=4, ckpt_path=str(tmp_path / "step=8.ckpt"))
    assert labels(resumed) == labels(whole) == [(0, 0), (1, 4), (2, 8), (3, 12), (4, 16)]
    assert resumed.history[2][KEY] == whole.history[2][KEY]
    # the monitors start from that step's value, the latest, not from the one before it
    assert seen.value == pytest.approx(whole.history[2][KEY], abs=1e-6)
    assert resumed.history[2]["alignment/linear_cka/raw"] == whole.history[2][
        "alignment/linear_cka/raw"]


@pytest.mark.parametrize("monitor", ["checkpoint", "early_stopping"])
def test_the_baseline_reaches_a_monitor_that_checks_mid_epoch(tmp_path, monitor):
    """Epoch mode, validation twice per epoch: the baseline's value was logged as an epoch-level
    value, which reaches ``callback_metrics`` only at the first epoch end, so the first
    mid-epoch validation failed ("could not find the monitored key")."""
    cb = callback()
    watcher = (ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", save_top_k=-1,
                               filename="{step}")
               if monitor == "checkpoint" else EarlyStopping(KEY, mode="max", patience=10))
    trainer, _ = fit([cb, watcher], val=True, max_epochs=2, val_check_interval=0.5)
    assert trainer.global_step == 8 and labels(cb) == [(0, 0), (1, 4), (2, 8)]
    if monitor == "checkpoint":  # the mid-epoch checkpoint of the first epoch: the baseline's
        first = torch.load(tmp_path / "step=2.ckpt", weights_only=False)
        state = next(v for k, v in first["callbacks"].items() if k.startswith("ModelCheckpoint"))
        assert float(state["current_score"]) == cb.history[0][KEY]


def _stale(messages):
    return [m for m in messages if "measured on earlier weights" in m or "AlignmentPlateau" in m]


@pytest.mark.parametrize("case,fix", [
    ("checkpoint_at_validation_end", "ModelCheckpoint(save_on_train_epoch_end=True)"),
    ("early_stopping_at_validation_end", "EarlyStopping(check_on_train_epoch_end=True)"),
    ("early_stopping_listed_first_at_validation_end",
     "EarlyStopping(check_on_train_epoch_end=True)"),
    ("checkpoint_every_epoch", "ModelCheckpoint(every_n_epochs=2)"),
    ("checkpoint_by_steps", "ModelCheckpoint(every_n_epochs=1)"),
    ("early_stopping_every_epoch", "Use AlignmentPlateau"),
])
def test_monitors_that_would_read_an_earlier_steps_value_are_warned_at_setup(tmp_path, case, fix):
    """With validation every second epoch, ModelCheckpoint and EarlyStopping check at the
    validation end, before the epoch end where the step runs: each checkpoint carried the
    previous step's score.  With every_n_epochs=2, a checkpoint every epoch (or every n training
    steps) is scored on the epochs between with the last step's value, and EarlyStopping counts
    the repeated value as no improvement."""
    kw, every = {}, {}
    if case == "checkpoint_at_validation_end":
        watcher, kw = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max"), \
            {"check_val_every_n_epoch": 2}
    elif case.startswith("early_stopping") and case.endswith("at_validation_end"):
        watcher, kw = EarlyStopping(KEY, mode="max", patience=5), {"check_val_every_n_epoch": 2}
    elif case == "checkpoint_every_epoch":
        watcher, every = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max"), \
            {"every_n_epochs": 2}
    elif case == "checkpoint_by_steps":
        watcher = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max",
                                  every_n_train_steps=3)
    else:
        watcher, every = EarlyStopping(KEY, mode="max", patience=5), {"every_n_epochs": 2}
    callbacks = [callback(**every), watcher]
    _, messages = fit(callbacks[::-1] if "listed_first" in case else callbacks,
                      val="validation" in case, max_epochs=2, **kw)
    stale = _stale(messages)
    assert len(stale) == 1 and fix in stale[0], messages
    assert re.search(rf"{type(watcher).__name__}\(monitor='{KEY}'\)", stale[0])
    if kw:  # the reason is the Trainer's setting, whichever callback sets up first (the
        # EarlyStopping's own setup turns its check_on_train_epoch_end=None into False)
        assert "(Trainer(check_val_every_n_epoch=2))" in stale[0], stale[0]


def test_monitors_that_check_where_the_steps_are_get_no_warning_and_fresh_scores(tmp_path):
    """The fixes the warnings name: every checkpoint then carries the score of its own weights
    (the history's value at its step); step mode and AlignmentPlateau get no warning."""
    cb = callback(every_n_epochs=2)
    saver = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", save_top_k=-1,
                            filename="{step}", every_n_epochs=2, save_on_train_epoch_end=True)
    _, messages = fit([cb, saver], val=True, max_epochs=4, check_val_every_n_epoch=2)
    assert not _stale(messages), messages
    scores = {int(re.search(r"step=(\d+)", path).group(1)): float(score)
              for path, score in saver.best_k_models.items()}
    assert scores == {int(h["step"]): h[KEY] for h in cb.history if h["step"] > 0}
    # step mode whose steps fall where the monitors check (validation every 2 epochs of 4
    # optimizer steps: at step 8, a multiple of 4); with every_n_train_steps=3 both would
    # read step 6's value at step 8, and are warned about
    for every, warned in ((4, False), (3, True)):
        _, messages = fit([callback(every_n_train_steps=every),
                           ModelCheckpoint(dirpath=tmp_path / f"steps{every}", monitor=KEY,
                                           mode="max"),
                           EarlyStopping(KEY, mode="max", patience=5)],
                          val=True, max_epochs=2, check_val_every_n_epoch=2)
        stale = _stale(messages)
        assert len(stale) == (2 if warned else 0), messages
        assert all("checks at the validation end, at optimizer step 8," in m
                   for m in stale), stale


def test_a_step_mode_checkpoint_saving_every_few_epochs_at_validations_is_judged_by_both(
        tmp_path):
    """``ModelCheckpoint(every_n_epochs=2)`` checking at validations every 2 epochs saves every
    2 epochs (8 optimizer steps), not every 4: with a step every 16 it scores step 8's
    checkpoint with the baseline's value, and is warned about like every_n_epochs=1."""
    for epochs in (1, 2):
        _, messages = fit([callback(every_n_train_steps=16),
                           ModelCheckpoint(dirpath=tmp_path / f"e{epochs}", monitor=KEY,
                                           mode="max", every_n_epochs=epochs)],
                          val=True, max_epochs=2, check_val_every_n_epoch=2)
        stale = _stale(messages)
        assert len(stale) == 1 and "at optimizer step 8," in stale[0], (epochs, messages)
    # one epoch of training: no validation comes, nothing is read, nothing to warn about
    _, messages = fit([callback(every_n_train_steps=16),
                       ModelCheckpoint(dirpath=tmp_path / "one", monitor=KEY, mode="max")],
                      val=True, max_epochs=1, check_val_every_n_epoch=2)
    assert not _stale(messages), messages


class _Freshness(pl.Callback):
    """At each validation end a monitor on every ``every``-th epoch sees: whether the latest
    alignment step ran at the current optimizer step (its value is the checked weights')."""

    def __init__(self, aligner, every=1):
        self.aligner, self.every, self.fresh = aligner, every, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every == 0:
            self.fresh.append(self.aligner.history[-1]["step"] == trainer.global_step)


@pytest.mark.parametrize("every_n,trainer_kw,ckpt_epochs", [
    (2, {"val_check_interval": 2}, None),  # validations at steps 2, 4 of each epoch
    (4, {"val_check_interval": 2}, None),  # step 2: step 0's value
    (2, {"val_check_interval": 0.5}, None),
    (4, {"val_check_interval": 0.5}, None),
    (3, {"val_check_interval": 3, "check_val_every_n_epoch": None}, None),  # 3, 6, 9, ...
    (2, {"val_check_interval": 3, "check_val_every_n_epoch": None}, None),
    (1, {"val_check_interval": 2, "accumulate_grad_batches": 2}, None),  # steps 1, 2
    (2, {"val_check_interval": 2, "accumulate_grad_batches": 2}, None),  # step 1: step 0's
    (2, {"val_check_interval": 2}, 2),  # a checkpoint on epochs 2 and 4: steps 6, 8, 14, 16
    (4, {"val_check_interval": 2}, 2),
    (4, {"val_check_interval": 3, "check_val_every_n_epoch": None}, 2),
])
def test_step_mode_monitors_at_validations_inside_epochs_are_judged_by_what_they_read(
        tmp_path, every_n, trainer_kw, ckpt_epochs):
    """Validation inside epochs (``val_check_interval``): the warning at the start of training
    says whether some validation end the monitor sees falls between two alignment steps, as
    the values it reads there show."""
    cb = callback(every_n_train_steps=every_n)
    monitor = (EarlyStopping(KEY, mode="max", patience=100) if ckpt_epochs is None else
               ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max",
                               every_n_epochs=ckpt_epochs))
    oracle = _Freshness(cb, ckpt_epochs or 1)
    _, messages = fit([cb, monitor, oracle], val=True, max_epochs=4, **trainer_kw)
    assert len(oracle.fresh) >= 2  # validations the monitor saw
    stale = _stale(messages)
    assert bool(stale) == (not all(oracle.fresh)), (oracle.fresh, messages)
    assert len(stale) <= 1 and all("at the validation end" in m for m in stale), stale


def test_step_mode_validations_after_max_steps_are_not_judged(tmp_path):
    """``max_steps`` ends training before later validations: only those that come count (a
    validation at step 12 that never comes was warned about)."""
    cb = callback(every_n_train_steps=4)
    oracle = _Freshness(cb)
    _, messages = fit([cb, EarlyStopping(KEY, mode="max", patience=100), oracle], val=True,
                      max_epochs=None, max_steps=5, val_check_interval=4,
                      loader=train_loader(n=112))  # 7 batches per epoch: validations at 4, 11
    assert oracle.fresh == [True] and not _stale(messages), (oracle.fresh, messages)


def test_a_long_schedule_is_judged_by_the_validations_listed(tmp_path, monkeypatch):
    """Past ``MAX_LISTED_CHECKS`` validations a schedule whose listed ones are all fresh is not
    judged, but one with a stale one among them is warned about (it was dropped too)."""
    from alignment_callback.callback import monitors

    monkeypatch.setattr(monitors, "MAX_LISTED_CHECKS", 3)
    for every_n, warned in ((4, True), (1, False)):
        cb = callback(every_n_train_steps=every_n)
        oracle = _Freshness(cb)
        _, messages = fit([cb, EarlyStopping(KEY, mode="max", patience=100), oracle], val=True,
                          max_epochs=2, val_check_interval=1, check_val_every_n_epoch=None)
        stale = _stale(messages)
        assert bool(stale) == warned == (not all(oracle.fresh)), (oracle.fresh, messages)
        if warned:
            assert "at optimizer steps 1, 2, 3, …" in stale[0], stale


def test_the_warning_lists_the_steps_of_an_uneven_schedule(tmp_path):
    """5 batches an epoch, 2 accumulated per optimizer step (3 steps an epoch), a validation
    every 3 batches: at steps 1, 4, 7, … (one validation per period was read as "every 1";
    two periods are listed)."""
    _, messages = fit([callback(every_n_train_steps=3), EarlyStopping(KEY, mode="max",
                                                                      patience=100)],
                      val=True, max_epochs=4, val_check_interval=3, accumulate_grad_batches=2,
                      loader=train_loader(n=80))
    stale = _stale(messages)
    assert len(stale) == 1 and "at optimizer steps 1, 4, …, while" in stale[0], messages


class _Stream(IterableDataset):
    """64 rows in 4 batches of 16, with no length."""

    def __iter__(self):
        x, y = make_data(64)
        for i in range(0, 64, 16):
            yield x[i:i + 16], y[i:i + 16]


class _IterMLP(MLP):
    """A training_step that reads the dataloader_iter: Lightning cannot tell the last batch."""

    def training_step(self, dataloader_iter):
        (x, y), _, _ = next(dataloader_iter)
        return nn.functional.mse_loss(self(x), y)


def test_epochs_whose_last_batch_lightning_cannot_tell_still_get_their_steps():
    """With a dataloader_iter over an IterableDataset, the epoch ends when the iterator does, and
    Lightning's is_last_batch stays False: the epoch-mode steps were all skipped as if the epochs
    were cut short."""
    cb = callback(log_to_module=False)
    trainer, _ = fit([cb], module=_IterMLP(), loader=DataLoader(_Stream(), batch_size=None),
                     max_epochs=2)
    assert trainer.global_step == 8 and labels(cb) == [(0, 0), (1, 4), (2, 8)]


def test_a_warm_start_from_a_mid_epoch_checkpoint_runs_no_extra_step(tmp_path):
    """A run without the callback checkpointed in the middle of its second epoch, continued with
    AlignmentCallback(baseline=False): a step labeled as finished epoch 1 ran at once on the
    mid-epoch weights."""
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                            filename="{step}")
    fit([saver], max_epochs=2)
    warm = callback(baseline=False)
    fit([warm], max_epochs=3, ckpt_path=str(tmp_path / "step=6.ckpt"))
    assert labels(warm) == [(2, 8), (3, 12)]


def test_the_plateau_numbers_its_step_checks_like_the_history():
    """AlignmentPlateau(check_on="step") gave the epoch in progress, the history the finished
    epochs: its fired_at of the step at the end of the first epoch said epoch 0, the history 1."""
    cb = callback(every_n_train_steps=4)
    calls = []  # checks at every optimizer step: 1 (the first value), 2, 3, 4 (fires)
    plateau = AlignmentPlateau(KEY, mode="max", patience=3, min_delta=10.0, check_on="step",
                               source="metrics", on_plateau=lambda t, m: calls.append(1))
    fit([cb, plateau], max_epochs=2)
    assert calls == [1]
    at = (plateau.fired_at["epoch"], plateau.fired_at["step"])
    assert at == (1, 4) and at in labels(cb)  # the last batch of the first epoch


def test_no_stale_monitor_warning_without_a_validation_loop(tmp_path):
    """limit_val_batches=0 turns validation off, so ModelCheckpoint checks at the training epoch
    end; it was warned about as checking at the validation end."""
    cb = callback()
    saver = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", save_top_k=-1,
                            filename="{step}")
    _, messages = fit([cb, saver], val=True, max_epochs=2, val_check_interval=0.5,
                      limit_val_batches=0)
    assert not _stale(messages), messages
    scores = {int(re.search(r"step=(\d+)", path).group(1)): float(score)
              for path, score in saver.best_k_models.items()}
    assert scores == {int(h["step"]): h[KEY] for h in cb.history if h["step"] > 0}


class _LogsUnderThePrefix(MLP):
    """Logs its own loss under the callback's prefix (a REPA loss as "alignment/repa_loss")."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("alignment/repa_loss", loss, on_step=False, on_epoch=True)
        return loss


def test_only_monitors_of_the_callbacks_own_keys_are_checked(tmp_path):
    """The callback checked every monitor whose key began with its log_prefix: an EarlyStopping
    on a loss the user logs as "alignment/repa_loss", or on a second callback's key
    ("alignment/wide/..."), was refused beside a background callback and warned about with
    the first callback's schedule.  Now the monitor is checked only by the callback that logs
    its key."""
    user_key = EarlyStopping("alignment/repa_loss", mode="min", patience=5)
    trainer, messages = fit([callback(background=True), user_key], module=_LogsUnderThePrefix(),
                            max_epochs=2)
    assert trainer.current_epoch == 2 and "alignment/repa_loss" in trainer.callback_metrics
    wide = "alignment/wide/linear_cka/calibrated"
    first, second = callback(every_n_epochs=2), callback(log_prefix="alignment/wide")
    _, messages = fit([first, second, EarlyStopping(wide, mode="max", patience=5)],
                      max_epochs=2)
    assert not _stale(messages), messages
    with pytest.raises(ValueError, match="cannot watch an alignment key computed with"):
        fit([callback(), callback(log_prefix="alignment/wide", background=True),
             EarlyStopping(wide, mode="max", patience=5)], max_epochs=1)


@pytest.mark.parametrize("field,log_to_module", [("p_value", True), ("raw", True),
                                                  ("calibrated", False)])
def test_a_monitor_on_a_key_monitors_never_see_fails_at_setup(tmp_path, field, log_to_module):
    """Only the calibrated scores are logged to the module, where monitors read them (the other
    fields go to the loggers): EarlyStopping on ".../p_value" failed after the first epoch, a
    ModelCheckpoint on ".../raw" never saved (Lightning only warns), and a monitor with
    log_to_module=False did the same.  Each is now an error at setup, before any training step,
    naming the monitor."""
    key = f"alignment/linear_cka/{field}"
    for watcher in (EarlyStopping(key, mode="max", patience=5),
                    ModelCheckpoint(dirpath=tmp_path, monitor=key, mode="max")):
        module = MLP()
        with pytest.raises(ValueError, match=rf"{type(watcher).__name__}\(monitor='{key}'\) "
                                             "watches an alignment key that monitors never see"):
            fit([callback(log_to_module=log_to_module), watcher], module=module)
        assert module.trainer.global_step == 0


def test_step_mode_epoch_end_checks_that_never_come_are_not_judged(tmp_path):
    """A checkpoint every 2 epochs in a 1-epoch run, or at an epoch end after ``max_steps``,
    never checks: nothing is read, nothing to warn about (a step every 3, 4 steps an epoch)."""
    for saver, kw in ((ModelCheckpoint(dirpath=tmp_path / "a", monitor=KEY, mode="max",
                                       every_n_epochs=2), {"max_epochs": 1}),
                      (ModelCheckpoint(dirpath=tmp_path / "b", monitor=KEY, mode="max"),
                       {"max_epochs": None, "max_steps": 3})):
        _, messages = fit([callback(every_n_train_steps=3), saver], **kw)
        assert not _stale(messages), messages
    _, messages = fit([callback(every_n_train_steps=3),
                       ModelCheckpoint(dirpath=tmp_path / "c", monitor=KEY, mode="max")],
                      max_epochs=1)
    assert len(_stale(messages)) == 1, messages  # the epoch end at step 4 reads step 3's value


@pytest.mark.parametrize("every", [None, 4, 3])
def test_a_monitor_at_the_end_of_an_epoch_cut_by_max_steps_is_warned_about(tmp_path, every):
    """max_steps = 6 ends training two steps into the second epoch (4 steps each), whose end
    the checkpoint and early stopping still check: in epoch mode the cut epoch has no step, in
    step mode every 4 the value is step 4's; every 3 is fresh at step 6."""
    watchers = [ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", save_top_k=-1),
                EarlyStopping(KEY, mode="max", patience=5)]
    kw = {} if every is None else {"every_n_train_steps": every}
    _, messages = fit([callback(**kw), *watchers], max_steps=6, max_epochs=3)
    cut = [m for m in messages if "max_steps=6" in m]
    if every == 3:
        assert cut == [], messages
        return
    assert len(cut) == 2, messages
    for watcher, message in zip(("EarlyStopping", "ModelCheckpoint"), sorted(cut)):
        assert message.startswith(f"{watcher}(monitor='{KEY}') checks at the training epoch "
                                  "end, and Trainer(max_steps=6) ends training 2 optimizer "
                                  "step(s) into epoch 1 (of 4)"), message
        assert ("step 4's value" if every else "an earlier epoch's alignment step") in message
        assert message.endswith(f"Choose max_steps a multiple of {every or 4}")


def test_a_validation_step_without_validation_data_checks_at_the_training_epoch_end(tmp_path):
    """No val dataloader: Lightning runs no validation, and the monitors check at the training
    epoch end, fresh; they were warned about as checking at a validation end."""
    saver = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", save_top_k=-1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[callback(), saver], logger=False, max_epochs=2,
                         val_check_interval=0.5, **FAST_TRAINER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ValMLP(), train_loader())
    assert not [str(w.message) for w in caught if "validation end" in str(w.message)]


def test_monitors_that_never_check_without_validation_data_are_not_warned_about(tmp_path):
    """No validation data and check_val_every_n_epoch=2: Lightning has EarlyStopping check at
    validation ends only (its own setup's rule) and ModelCheckpoint save at none, so neither
    reads a value anywhere; they were warned about as checking at the epoch end, or a validation
    end, on a stale value."""
    saver = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", save_top_k=-1)
    stopper = EarlyStopping(KEY, mode="max", patience=5)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[callback(every_n_epochs=2), saver, stopper], logger=False,
                         max_epochs=3, max_steps=6, check_val_every_n_epoch=2, **FAST_TRAINER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ValMLP(), train_loader())
    assert not [str(w.message) for w in caught if f"(monitor='{KEY}')" in str(w.message)]
    assert not list(tmp_path.glob("*.ckpt"))  # it never saved


def test_two_monitors_of_one_kind_on_one_key_are_each_warned_about(tmp_path):
    """Step mode every 4, max_steps = 6: the epoch-end checkpoint reads step 4's value at the
    cut epoch's end, and the one every 2 steps at steps 2 and 6; the first one's warning was
    dropped as already said (the messages were matched by their text)."""
    at_end = ModelCheckpoint(dirpath=tmp_path / "end", monitor=KEY, mode="max", save_top_k=-1)
    by_steps = ModelCheckpoint(dirpath=tmp_path / "steps", monitor=KEY, mode="max",
                               save_top_k=-1, every_n_train_steps=2)
    _, messages = fit([callback(every_n_train_steps=4), at_end, by_steps], max_steps=6)
    mine = [m for m in messages if m.startswith(f"ModelCheckpoint(monitor='{KEY}')")]
    assert len(mine) == 2, messages
    assert any("saves every 2 training steps" in m for m in mine), mine
    assert any("Trainer(max_steps=6) ends training 2 optimizer step(s) into epoch 1" in m
               for m in mine), mine


@pytest.mark.parametrize("every, max_steps", [(5, -1), (None, 2), (3, 2)])
def test_with_baseline_false_a_check_before_the_first_step_finds_no_value(tmp_path, every,
                                                                           max_steps):
    """baseline=False: a monitor that checks before the first alignment step (the epoch end at
    step 4, steps every 5; an epoch that max_steps=2 cuts) reads no value at all, and Lightning
    stops training there (EarlyStopping(strict=True)) or skips the check; the warnings said it
    would read step 0's value, which does not exist."""
    kw = {} if every is None else {"every_n_train_steps": every}
    stopper = EarlyStopping(KEY, mode="max", patience=5, strict=False)
    saver = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", save_top_k=-1)
    _, messages = fit([callback(baseline=False, **kw), stopper, saver], max_epochs=2,
                      max_steps=max_steps)
    warned = sorted(m for m in messages if m.startswith(("EarlyStopping(", "ModelCheckpoint(")))
    assert len(warned) == 2, messages
    for message, what in zip(warned, ("EarlyStopping(strict=False) skips that check",
                                      "ModelCheckpoint skips that save"), strict=True):
        assert "step 0's" not in message and "an earlier epoch's" not in message, message
        assert "(baseline=False)" in message and f"no value at all: {what}" in message \
            or f"no value, as no alignment step has run before it (baseline=False): {what}" \
            in message, message
    _, messages = fit([callback(**kw), EarlyStopping(KEY, mode="max", patience=5),
                       ModelCheckpoint(dirpath=tmp_path / "b", monitor=KEY, mode="max")],
                      max_epochs=2, max_steps=max_steps)
    warned = [m for m in messages if m.startswith(("EarlyStopping(", "ModelCheckpoint("))]
    assert len(warned) == 2 and all("no value" not in m for m in warned), messages
    assert all(("step 0's" if every else "an earlier epoch's") in m for m in warned), messages


def test_with_baseline_false_checks_only_before_the_first_step_are_not_called_stale(tmp_path):
    """One epoch of 4 steps, steps every 5, baseline=False: the epoch end (step 4) comes before
    any alignment step, and no later check exists; the warning also said it would read "the
    last step's value, up to 4 step(s) old".  A checkpoint every 3 steps was only said to be
    scored with an earlier value, though its saves before step 5 find none."""
    stopper = EarlyStopping(KEY, mode="max", patience=5, strict=False)
    _, messages = fit([callback(baseline=False, every_n_train_steps=5), stopper], max_epochs=1)
    (warned,) = [m for m in messages if m.startswith("EarlyStopping(")]
    assert "up to 4 step(s) old" not in warned, warned
    assert ("at step 4, before the first alignment step (baseline=False), it would find no "
            "value at all: EarlyStopping(strict=False) skips that check") in warned, warned
    saver = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", every_n_train_steps=3,
                            save_top_k=-1)
    _, messages = fit([callback(baseline=False, every_n_train_steps=5), saver], max_epochs=2)
    (warned,) = [m for m in messages if m.startswith("ModelCheckpoint(")]
    assert ("A save before step 5, the first alignment step (baseline=False), would find no "
            "value at all: ModelCheckpoint skips that save") in warned, warned
    _, messages = fit([callback(every_n_train_steps=5),
                       ModelCheckpoint(dirpath=tmp_path / "b", monitor=KEY, mode="max",
                                       every_n_train_steps=3)], max_epochs=2)
    (warned,) = [m for m in messages if m.startswith("ModelCheckpoint(")]
    assert "no value" not in warned, warned  # the baseline's value is there
