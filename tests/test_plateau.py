"""AlignmentPlateau: EarlyStopping's improvement rule, one call of on_plateau at the right check,
both sources (an AlignmentCallback's history, trainer.callback_metrics), checkpoint resume without
a second call, configuration errors, and the REPA-style example."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from alignment_callback import AlignmentCallback
from alignment_callback.callback.plateau import AlignmentPlateau
from tests.helpers import (
    FAST_TRAINER,
    LAYERS,
    MLP,
    RefMLP,
    make_probe,
    train_loader,
)

KEY = "alignment/cknna/calibrated"
STEPS_PER_EPOCH = 4  # train_loader(): 64 rows in batches of 16
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plateau.py"


def _f64(value):
    """Logged as float64: the values the plateau reads are exactly the script's."""
    return torch.tensor(value, dtype=torch.float64)


class Scripted(pl.Callback):
    """Logs ``values[i]`` under ``key`` at the end of training epoch i (0-based), or, with
    ``per_step``, ``values[global_step - 1]`` after every optimizer step."""

    def __init__(self, values, key=KEY, per_step=False):
        self.values, self.key, self.per_step = list(values), key, per_step

    def on_train_epoch_end(self, trainer, pl_module):
        i = trainer.current_epoch
        if not self.per_step and i < len(self.values):
            pl_module.log(self.key, _f64(self.values[i]), logger=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        i = trainer.global_step - 1
        if self.per_step and 0 <= i < len(self.values):
            pl_module.log(self.key, _f64(self.values[i]), logger=False, on_step=True,
                          on_epoch=False)


class Calls:
    """An on_plateau that records (epoch, global step) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, trainer, pl_module):
        self.calls.append((trainer.current_epoch, trainer.global_step))


def _fit(tmp_path, callbacks, max_epochs, ckpt_path=None, **trainer_kw):
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, callbacks=callbacks,
                         default_root_dir=tmp_path,
                         enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                         **FAST_TRAINER, **trainer_kw)
    trainer.fit(MLP(), train_loader(), ckpt_path=ckpt_path)
    return trainer


def _aligner(**kw):
    kw.setdefault("measures", ["cknna"])
    kw.setdefault("num_permutations", 20)
    kw.setdefault("log_heatmaps", False)
    return AlignmentCallback(kw.pop("reference", RefMLP(seed=1)), make_probe(), LAYERS, **kw)


def _plateau(**kw):
    kw.setdefault("on_plateau", Calls())
    return AlignmentPlateau(**kw)


def expected_check(values, mode="max", patience=3, min_delta=0.0):
    """Index of the check at which the rule fires (None: never), written out independently."""
    best, wait = None, 0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        if best is None or (v - min_delta > best if mode == "max" else v + min_delta < best):
            best, wait = v, 0
            continue
        wait += 1
        if wait >= patience:
            return i
    return None


# ---------------------------------------------------------------- the rule, metrics source
def test_fires_once_after_epoch_4(tmp_path):
    """0.1, 0.3, 0.31, 0.305, 0.30 with patience 2 and min_delta 0.02: 0.31 is not an
    improvement over 0.3 by more than 0.02 (wait 1), nor is 0.305 (wait 2): fires after epoch 4;
    later values (even a large rise) call nothing again."""
    calls = Calls()
    plateau = AlignmentPlateau(KEY, mode="max", patience=2, min_delta=0.02, on_plateau=calls)
    _fit(tmp_path, [Scripted([0.1, 0.3, 0.31, 0.305, 0.30, 0.9, 0.2]), plateau], max_epochs=7)
    assert calls.calls == [(3, 4 * STEPS_PER_EPOCH)]  # current_epoch 3 = the 4th epoch's end
    assert plateau.fired and plateau.fired_at == {"epoch": 4, "step": 16, "value": 0.305,
                                                  "best": 0.3, "called_at_step": 16}
    assert plateau.source is None and plateau._history is None  # no AlignmentCallback: metrics


def test_verbose_logs_each_check_and_the_call(tmp_path, caplog):
    plateau = _plateau(monitor=KEY, patience=2, min_delta=0.02, verbose=True)
    with caplog.at_level("INFO"):
        _fit(tmp_path, [Scripted([0.1, 0.3, 0.31, 0.305]), plateau], max_epochs=4)
    text = caplog.text
    assert "= 0.3000 at epoch 2 (step 8): new best" in text
    assert "no improvement over 0.3000 by more than 0.02 for 2 of 2 check(s)" in text
    assert "calling on_plateau at epoch 4 (step 16)" in text


def test_never_fires_while_improving(tmp_path):
    calls = Calls()
    plateau = AlignmentPlateau(KEY, patience=1, min_delta=0.01, on_plateau=calls)
    _fit(tmp_path, [Scripted([0.1, 0.2, 0.3, 0.4, 0.5]), plateau], max_epochs=5)
    assert calls.calls == [] and not plateau.fired and plateau.fired_at is None
    assert plateau.best == 0.5 and plateau.wait == 0


def test_mode_min(tmp_path):
    """A falling value improves; min_delta counts downwards."""
    calls = Calls()
    plateau = AlignmentPlateau("dist", mode="min", patience=2, min_delta=0.05, on_plateau=calls)
    _fit(tmp_path, [Scripted([1.0, 0.8, 0.77, 0.6, 0.58, 0.57, 0.1], key="dist"), plateau],
         max_epochs=7)
    # 0.77 > 0.8 - 0.05 (wait 1); 0.6 improves; 0.58 (wait 1), 0.57 (wait 2): fires at epoch 6
    assert [c[0] for c in calls.calls] == [5]
    assert plateau.fired_at["epoch"] == 6 and plateau.fired_at["best"] == 0.6


@pytest.mark.parametrize("values,mode,patience,min_delta", [
    ([0.5, 0.5, 0.5], "max", 2, 0.0),               # equal is not an improvement
    ([0.1, 0.2, 0.3, 0.4, 0.45], "max", 1, 0.05),   # 0.45 - 0.05 = 0.4: not strictly better
    ([0.3, 0.1, 0.2, 0.25, 0.28], "max", 4, 0.0),   # no recovery above the first value
    ([0.2, float("nan"), 0.2, 0.19], "max", 2, 0.0),  # NaN skipped, not counted
    ([0.9, 0.5, 0.4, 0.45, 0.41, 0.42], "min", 2, 0.02),
])
def test_rule_matches_reference(tmp_path, values, mode, patience, min_delta):
    calls = Calls()
    plateau = AlignmentPlateau(KEY, mode=mode, patience=patience, min_delta=min_delta,
                               on_plateau=calls)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not finite.*", category=RuntimeWarning)
        _fit(tmp_path, [Scripted(values), plateau], max_epochs=len(values))
    check = expected_check(values, mode, patience, min_delta)
    assert check is not None  # each case is meant to fire
    assert calls.calls == [(check, (check + 1) * STEPS_PER_EPOCH)]
    assert plateau.fired_at["epoch"] == check + 1


def test_check_on_step_reads_once_per_optimizer_step(tmp_path):
    """check_on="step": a check after every optimizer step, also with gradient accumulation
    (the batch hook then runs twice per step)."""
    values = [0.1, 0.2, 0.25, 0.22, 0.24, 0.23, 0.21, 0.2]
    calls = Calls()
    plateau = AlignmentPlateau(KEY, patience=3, check_on="step", on_plateau=calls)
    _fit(tmp_path, [Scripted(values, per_step=True), plateau], max_epochs=4,
         accumulate_grad_batches=2)  # 2 optimizer steps per epoch
    check = expected_check(values, patience=3)  # 0.25 best, then 0.22, 0.24, 0.23: index 5
    assert plateau.fired_at["step"] == check + 1 == 6
    assert [c[1] for c in calls.calls] == [6]


# ---------------------------------------------------------------- history source
def test_history_source_found_automatically_and_baseline_not_a_check(tmp_path):
    """With patience 1 and a min_delta no change can exceed, the first check sets the best and
    the second fires: at epoch 2.  Counting the baseline (epoch 0) would fire at epoch 1."""
    aligner = _aligner()
    calls = Calls()
    plateau = AlignmentPlateau(KEY, patience=1, min_delta=10.0, on_plateau=calls)
    _fit(tmp_path, [aligner, plateau], max_epochs=4)
    assert plateau._history is aligner and plateau.reads_history_of(aligner)
    assert [h["epoch"] for h in aligner.history] == [0, 1, 2, 3, 4]
    assert plateau.fired_at == {"epoch": 2, "step": 8, "value": aligner.history[2][KEY],
                                "best": aligner.history[1][KEY], "called_at_step": 8}
    assert calls.calls == [(1, 8)]


@pytest.mark.parametrize("order", ["after", "before"])
def test_history_source_replays_the_real_values(tmp_path, order):
    """The call happens at the check the rule picks from the logged values, whichever the order
    of the two callbacks (listed first, the plateau reads the entry when the aligner's hook
    that added it ends)."""
    aligner = _aligner(every_n_epochs=1)
    calls = Calls()
    plateau = AlignmentPlateau(KEY, patience=2, min_delta=0.0, on_plateau=calls)
    cbs = [aligner, plateau] if order == "after" else [plateau, aligner]
    _fit(tmp_path, cbs, max_epochs=8)
    values = [h[KEY] for h in aligner.history[1:]]  # the baseline is not a check
    check = expected_check(values, patience=2)
    if check is None:
        assert calls.calls == [] and not plateau.fired
    else:
        assert plateau.fired_at["epoch"] == check + 1 and plateau.fired_at["value"] == values[check]
        assert len(calls.calls) == 1 and calls.calls[0][1] == (check + 1) * STEPS_PER_EPOCH


@pytest.mark.parametrize("every", [{"every_n_epochs": 1}, {"every_n_train_steps": 2}],
                         ids=["epochs", "steps"])
def test_a_plateau_listed_first_stops_training_where_one_listed_second_does(tmp_path, every):
    """Listed before the AlignmentCallback in epoch mode, the plateau read the epoch's entry
    only at the next epoch's first batch: an on_plateau that stops training let one more
    optimizer step run, in another epoch, after the epoch's checkpoint was written."""

    def stop(trainer, pl_module):
        trainer.should_stop = True

    ends = {}
    for order in ("after", "before"):
        aligner = _aligner(**every)
        plateau = AlignmentPlateau(KEY, patience=1, min_delta=10.0, on_plateau=stop)
        cbs = [aligner, plateau] if order == "after" else [plateau, aligner]
        pl.seed_everything(0, verbose=False)
        trainer = _fit(tmp_path, cbs, max_epochs=6)
        ends[order] = (trainer.global_step, trainer.current_epoch, plateau.fired_at)
    assert ends["before"] == ends["after"]
    step = ends["after"][2]["step"]  # min_delta=10: the second check fires
    assert step == (2 * STEPS_PER_EPOCH if "every_n_epochs" in every else 4)
    assert ends["after"][0] == step and ends["after"][2]["called_at_step"] == step


def test_history_source_every_n_train_steps(tmp_path):
    """An AlignmentCallback in step mode: every entry (every 2 steps) is one check."""
    aligner = _aligner(every_n_train_steps=2)
    plateau = _plateau(monitor=KEY, patience=1, min_delta=10.0)
    _fit(tmp_path, [aligner, plateau], max_epochs=2)
    assert [h["step"] for h in aligner.history] == [0, 2, 4, 6, 8]
    assert plateau.fired_at["step"] == 4
    assert plateau.on_plateau.calls == [(0, 4)]  # the last batch of the first epoch


def test_history_source_with_background_alignment(tmp_path):
    """background=True results never reach callback_metrics, but they reach the history: the
    plateau reads them there (the AlignmentCallback's monitor check lets it, as it reads the
    history)."""
    aligner = _aligner(background=True)
    plateau = _plateau(monitor=KEY, patience=1, min_delta=10.0)
    _fit(tmp_path, [aligner, plateau], max_epochs=3)
    assert aligner._threaded
    assert plateau.fired_at["epoch"] == 2 and len(plateau.on_plateau.calls) == 1
    # the call comes when the result is published, not later than the end of training, and
    # fired_at says where it came (the deciding alignment step is "step")
    assert plateau.on_plateau.calls[0][1] == plateau.fired_at["called_at_step"] >= 8
    assert plateau.fired_at["step"] == 8


def test_verbose_names_where_a_background_decision_is_called(tmp_path, caplog):
    """In background mode on_plateau runs when the result is published, after the deciding
    step: the message said "calling on_plateau at epoch E (step S)" with the deciding step's
    labels (and printed the best value unrounded)."""
    aligner = _aligner(background=True, every_n_train_steps=1)
    plateau = _plateau(monitor=KEY, patience=1, min_delta=10.0, verbose=True)
    with caplog.at_level("INFO"):
        _fit(tmp_path, [aligner, plateau], max_epochs=1)
    fired = plateau.fired_at
    (line,) = [r.getMessage() for r in caplog.records if "calling on_plateau" in r.getMessage()]
    assert f"(best {fired['best']:.4f})" in line
    if fired["called_at_step"] == fired["step"]:
        assert line.endswith(f"at epoch {fired['epoch']} (step {fired['step']})"), line
    else:
        assert line.endswith(f"at training step {fired['called_at_step']} (the alignment step "
                             f"of epoch {fired['epoch']}, step {fired['step']}, decided)"), line


def test_explicit_source_and_prefix(tmp_path):
    aligner = _aligner(log_prefix="align")
    plateau = _plateau(monitor="align/cknna/p_value", mode="min", patience=1, min_delta=10.0,
                       source=aligner)
    _fit(tmp_path, [plateau, aligner], max_epochs=2)
    assert plateau.fired_at["epoch"] == 2
    assert plateau.fired_at["value"] == aligner.history[2]["align/cknna/p_value"]


# ---------------------------------------------------------------- resume
def _states(path):
    loaded = torch.load(path, weights_only=True)  # primitives only
    return [v for k, v in loaded["callbacks"].items() if k.startswith("AlignmentPlateau")]


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_continues_the_count_metrics_source(tmp_path):
    values = [0.1, 0.3, 0.31, 0.305, 0.30, 0.29]
    ckpt_dir = tmp_path / "ckpt"
    first = _plateau(monitor=KEY, patience=2, min_delta=0.02)
    _fit(tmp_path / "a", [Scripted(values), first, ModelCheckpoint(ckpt_dir, save_last=True)],
         max_epochs=3, enable_checkpointing=True)
    (state,) = _states(ckpt_dir / "last.ckpt")
    assert state["wait"] == 1 and state["best"] == 0.3 and not state["fired"]
    # resumed: the 4th epoch is the 2nd check without improvement (a fresh count would need 2 more)
    second = _plateau(monitor=KEY, patience=2, min_delta=0.02)
    _fit(tmp_path / "b", [Scripted(values), second], max_epochs=6,
         ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert second.on_plateau.calls == [(3, 16)] and second.fired_at["epoch"] == 4


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("source", ["history", "metrics"])
def test_resume_after_firing_does_not_fire_again(tmp_path, source):
    ckpt_dir = tmp_path / "ckpt"

    def run(where, max_epochs, ckpt_path=None):
        plateau = _plateau(monitor=KEY, patience=1, min_delta=10.0)
        feed = _aligner() if source == "history" else Scripted([0.5] * 10)
        _fit(tmp_path / where, [feed, plateau, ModelCheckpoint(ckpt_dir, save_last=True)],
             max_epochs=max_epochs, ckpt_path=ckpt_path, enable_checkpointing=True)
        return plateau

    first = run("a", 3)
    assert first.on_plateau.calls == [(1, 8)]
    (state,) = _states(ckpt_dir / "last.ckpt")
    assert state["fired"] and state["fired_at"]["epoch"] == 2
    second = run("b", 5, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert second.on_plateau.calls == [] and second.fired
    assert second.fired_at == first.fired_at


@pytest.mark.parametrize("source", ["history", "metrics"])
def test_a_second_fit_with_the_same_objects_is_a_new_run(tmp_path, source):
    """The aligner starts a new history in a new fit; the plateau kept fired, best and its
    cursor, so it never called on_plateau in the second run (a REPA loss never switched off)."""
    calls = Calls()
    plateau = _plateau(monitor=KEY, patience=1, min_delta=10.0, on_plateau=calls)
    feed = _aligner() if source == "history" else Scripted([0.5] * 10)
    _fit(tmp_path / "a", [feed, plateau], max_epochs=3)
    assert calls.calls == [(1, 8)]
    _fit(tmp_path / "b", [feed, plateau], max_epochs=3)
    assert calls.calls == [(1, 8), (1, 8)] and plateau.fired_at["epoch"] == 2


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("source", [None, "metrics"])
@pytest.mark.parametrize("patience", [1, 5])
def test_a_resume_that_restarts_the_curve_restarts_the_count(tmp_path, source, patience):
    """Resumed with another k, the AlignmentCallback starts the mutual kNN curve anew.  The
    plateau kept the old curve's best (k = 30's, higher than k = 3's) and count, comparing
    across settings; now the count restarts.  A plateau that fired stays fired: its
    on_plateau (a REPA loss switched off, kept in the checkpoint) is not called again, nor
    when the same run is continued."""
    key = "alignment/mutual_knn/calibrated"
    ckpt_dir = tmp_path / "ckpt"

    def run(where, k, max_epochs, ckpt_path=None):
        aligner = _aligner(measures={"mutual_knn": {"k": k}})
        plateau = _plateau(monitor=key, patience=patience, min_delta=10.0, source=source)
        callbacks = [aligner, plateau, ModelCheckpoint(ckpt_dir, save_last=True)]
        trainer = pl.Trainer(max_epochs=max_epochs, logger=False, callbacks=callbacks,
                             default_root_dir=tmp_path / where, **FAST_TRAINER)
        model = MLP()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, train_loader(), ckpt_path=ckpt_path)
        return aligner, plateau, [str(w.message) for w in caught], trainer, model

    _, before, _, _, _ = run("a", 30, 2)
    fired = patience == 1
    assert len(before.on_plateau.calls) == int(fired) and before.fired == fired
    aligner, plateau, said, trainer, model = run("b", 3, 4, str(ckpt_dir / "last.ckpt"))
    assert any("the curve starts anew" in s for s in said)
    new = [h[key] for h in aligner.history]
    assert len(new) == 3 and max(new) < before.best  # a baseline at the resume, 2 checks
    assert plateau.on_plateau.calls == [] and plateau.fired == fired
    if not fired:  # counting the new curve's values only (the old count reached 5 here)
        assert plateau.best in new and plateau.wait < patience
    trainer.fit_loop.max_epochs = 6  # the same run continued: no restart, no call
    trainer.fit(model, train_loader())
    assert plateau.on_plateau.calls == [] and not aligner.restarted


def test_state_key_is_unique():
    a = _plateau(monitor=KEY)
    assert a.state_key != EarlyStopping(KEY, mode="max").state_key
    assert a.state_key == _plateau(monitor=KEY, patience=9).state_key  # a resume may change it
    assert a.state_key != _plateau(monitor=KEY, mode="min").state_key
    assert a.state_key != _plateau(monitor=KEY, name="lr").state_key
    b = _plateau(monitor=KEY)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


# ---------------------------------------------------------------- missing keys, sources
def test_missing_key_strict_names_the_available_keys(tmp_path):
    plateau = _plateau(monitor="nope")
    with pytest.raises(RuntimeError, match=r"monitor='nope'.*available keys: .*alignment/cknna"):
        _fit(tmp_path, [Scripted([0.1, 0.2]), plateau], max_epochs=2)


def test_missing_key_not_strict_warns_once_at_the_end(tmp_path):
    plateau = _plateau(monitor="nope", strict=False)
    with pytest.warns(RuntimeWarning, match=r"never appeared.*2 check\(s\)"):
        _fit(tmp_path, [Scripted([0.1, 0.2]), plateau], max_epochs=2)
    assert not plateau.fired


def test_measure_not_logged_by_the_alignment_callback(tmp_path):
    """A prefix that matches an AlignmentCallback but a measure it does not compute: an error
    at setup naming the keys it logs (strict; it said "reading trainer.callback_metrics
    instead", which only strict=False does), a warning otherwise."""
    with pytest.raises(ValueError, match=r"no AlignmentCallback logs this key.*alignment/cknna"
                       r".*; with strict=False it is read from trainer.callback_metrics$"):
        _fit(tmp_path, [_aligner(), _plateau(monitor="alignment/mutual_knn/calibrated")], 1)
    with pytest.warns(RuntimeWarning, match="; reading trainer.callback_metrics instead"):
        _fit(tmp_path, [_aligner(), _plateau(monitor="alignment/mutual_knn/calibrated",
                                             strict=False)], 1)
    source = _aligner()
    with pytest.raises(ValueError, match="source AlignmentCallback does not log this key"):
        _fit(tmp_path, [source, _plateau(monitor="alignment/mknn/raw", source=source)], 1)


@pytest.mark.parametrize("monitor", ["alignment/cknna/layer/fc1/calibrated",
                                     "alignment/cknna/pair/fc1__0", "alignment/cknna/calibrated/"])
def test_a_key_the_baseline_lacks_fails_before_the_first_training_step(tmp_path, monitor):
    """A layer's key of a frozen reference (only drift references log them), a pair's key
    without log_pairs, a trailing slash: strict failed at the first step after training, an
    every_n_epochs period in; the baseline holds every key a step logs, so it fails there."""
    aligner = _aligner()
    with pytest.raises(RuntimeError, match=r"the key is not in the baseline's history entry"):
        _fit(tmp_path, [_plateau(monitor=monitor), aligner], 3)
    assert [h["step"] for h in aligner.history] == [0]


def test_a_key_of_a_reference_without_a_baseline_result_waits_for_its_steps(tmp_path):
    """reference="previous" has no result at the baseline: its keys are checked at its steps."""
    aligner = _aligner(reference={"frozen": RefMLP(seed=1), "prev": "previous"})
    plateau = _plateau(monitor="alignment/prev/cknna/layer/fc1/calibrated", patience=1,
                       min_delta=10.0)
    _fit(tmp_path, [aligner, plateau], 3)
    # the baseline (no result of "prev") is skipped; checks at epochs 1 and 2
    assert plateau.fired_at["step"] == 2 * STEPS_PER_EPOCH


def test_a_field_the_alignment_callback_does_not_log_is_refused_at_setup(tmp_path):
    """A typo in the field (``calibrate``) was found only at the first check, after the
    baseline step; it is refused at setup, naming the fields logged per measure (a warning
    without strict).  Longer keys (a layer's, a pair's) are not checked at setup."""
    source = _aligner()
    for plateau in (_plateau(monitor="alignment/cknna/calibrate"),
                    _plateau(monitor="alignment/cknna/calibrate", source=source)):
        aligner = source if plateau.source is source else _aligner()
        with pytest.raises(ValueError, match=r"'calibrate' is not a number the AlignmentCallback "
                                             r"logs per measure; those are raw, calibrated, "):
            _fit(tmp_path, [aligner, plateau], 1)
        assert aligner.history == []  # before any step
    with pytest.warns(RuntimeWarning, match="'p' is not a number"):
        _fit(tmp_path, [_aligner(), _plateau(monitor="alignment/cknna/p", strict=False)], 1)
    for good in ("alignment/cknna/p_value", "alignment/cknna/best_model_layer"):
        plateau = _plateau(monitor=good)
        _fit(tmp_path, [_aligner(), plateau], 1)


@pytest.mark.parametrize("field", ["best_pair", "null_method"])
def test_a_text_field_is_refused_at_setup_even_without_strict(tmp_path, field):
    """With strict=False an unknown field only warns; a text field then crashed the fit at
    its first check (float('fc1|fc1')).  A text can never be a number: refused at setup."""
    plateau = _plateau(monitor=f"alignment/cknna/{field}", strict=False)
    with pytest.raises(ValueError, match=f"'{field}' is a text"):
        _fit(tmp_path, [_aligner(), plateau], 1)


def test_a_plateau_with_a_source_is_no_monitor_of_another_alignment_callback(tmp_path):
    """Two AlignmentCallbacks log the key and the plateau names its source, as the error of
    the next test asks: the other callback took the plateau for a reader of the logged
    metrics and refused it (a raw field is not logged to the module; background=True)."""
    # two log_prefixes that give one key (one log_prefix for two callbacks is refused)
    watched = _aligner(log_prefix="a", reference={"b": RefMLP(seed=1)})
    other = _aligner(log_prefix="a/b", background=True)
    plateau = _plateau(monitor="a/b/cknna/raw", source=watched, patience=1,
                       min_delta=10.0)  # no improvement: it fires at its second check
    _fit(tmp_path, [watched, other, plateau], 2)
    assert plateau.fired_at is not None  # it read the watched callback's history
    assert plateau.fired_at["value"] == watched.history[-1]["a/b/cknna/raw"]


def test_a_plateau_on_the_logged_metrics_is_told_to_drop_source_metrics(tmp_path):
    """``source="metrics"`` is the one reason a plateau reads the logged metrics: the fix is
    to drop it, not 'use AlignmentPlateau' or 'use background=False'."""
    for aligner_kw, monitor in (({}, "alignment/cknna/raw"), ({"background": True}, KEY)):
        plateau = _plateau(monitor=monitor, source="metrics")
        with pytest.raises(ValueError, match='Drop source="metrics"') as err:
            _fit(tmp_path, [_aligner(**aligner_kw), plateau], 1)
        assert "use AlignmentPlateau" not in str(err.value)
        assert "Use background=False" not in str(err.value)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_an_epoch_cut_short_is_checked_once_across_a_resume(tmp_path):
    """check_on="epoch", a flat value, patience 2: 8 steps in one run make 2 checks (epochs 1
    and 2); cut at step 6 (max_steps, in epoch 2) and resumed to step 8, epoch 2 was checked at
    the cut and again at its end, and the plateau fired where the same run did not."""
    flat = [0.5] * 4
    whole = _plateau(monitor=KEY, patience=2)
    _fit(tmp_path / "whole", [Scripted(flat), whole], 10, max_steps=8)
    assert (whole.wait, whole.fired) == (1, False)
    ckpt_dir = tmp_path / "ckpt"
    cut = _plateau(monitor=KEY, patience=2)
    _fit(tmp_path / "cut", [Scripted(flat), cut, ModelCheckpoint(ckpt_dir, save_last=True)], 10,
         max_steps=6, enable_checkpointing=True)
    assert cut.wait == 0  # the cut epoch is not a check
    resumed = _plateau(monitor=KEY, patience=2)
    _fit(tmp_path / "resumed", [Scripted(flat), resumed], 10, max_steps=8,
         ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert (resumed.wait, resumed.fired) == (whole.wait, whole.fired)


def test_two_alignment_callbacks_logging_the_key_need_source(tmp_path):
    with pytest.raises(ValueError, match="2 AlignmentCallbacks log this key; pass .* source="):
        _fit(tmp_path, [_aligner(log_prefix="a", reference={"b": RefMLP(seed=1)}),
                        _aligner(log_prefix="a/b"), _plateau(monitor="a/b/cknna/calibrated")], 1)


def test_source_must_be_a_trainer_callback(tmp_path):
    with pytest.raises(ValueError, match="must be one of the trainer's callbacks"):
        _fit(tmp_path, [_aligner(), _plateau(source=_aligner())], 1)


def test_source_metrics_ignores_the_history():
    aligner = _aligner()
    plateau = _plateau(source="metrics")
    assert not plateau.reads_history_of(aligner)
    assert _plateau().reads_history_of(aligner)
    assert not _plateau(monitor="alignment/linear_cka/raw").reads_history_of(aligner)
    assert not _plateau(monitor="alignment/cknna").reads_history_of(aligner)  # no field
    # a reference's name where the one reference has none: not a key it logs (15th session)
    assert not _plateau(monitor="alignment/dinov2/cknna/calibrated").reads_history_of(aligner)
    assert not _plateau(monitor="other/cknna/calibrated").reads_history_of(aligner)


@pytest.mark.parametrize("kw,arg", [
    ({"monitor": ""}, "monitor"), ({"monitor": 3}, "monitor"),
    ({"mode": "maximum"}, "mode"),
    ({"patience": 0}, "patience"), ({"patience": 1.5}, "patience"),
    ({"patience": True}, "patience"),
    ({"min_delta": -0.1}, "min_delta"), ({"min_delta": float("inf")}, "min_delta"),
    ({"on_plateau": None}, "on_plateau"), ({"on_plateau": "stop"}, "on_plateau"),
    ({"source": "history"}, "source"),
    ({"check_on": "batch"}, "check_on"),
    ({"strict": "yes"}, "strict"), ({"verbose": 1}, "verbose"),
    ({"name": ""}, "name"),
])
def test_bad_arguments_name_the_argument(kw, arg):
    kw.setdefault("on_plateau", Calls())
    with pytest.raises((ValueError, TypeError), match=rf"AlignmentPlateau: {arg} must"):
        AlignmentPlateau(**kw)


def test_on_plateau_is_required():
    with pytest.raises(TypeError, match="on_plateau"):
        AlignmentPlateau(KEY)  # type: ignore[call-arg]


# ---------------------------------------------------------------- the example
@pytest.mark.slow
def test_example_runs_and_switches_the_loss_off(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "12", "--permutations", "50",
                           "--out", str(tmp_path)],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("AlignmentPlateau fired") == 1, out
    fired_epoch = int(out.split("AlignmentPlateau fired after epoch ", 1)[1].split()[0])
    rows = [cells for cells in map(str.split, out.splitlines()) if cells and cells[0].isdigit()]
    weights = {int(r[0]): float(r[-1]) for r in rows}  # epoch -> lambda used in that epoch
    assert all(weights[e] > 0 for e in weights if e <= fired_epoch)
    assert sorted(weights) == list(range(1, 13))
    assert all(weights[e] == 0 for e in weights if e > fired_epoch) and fired_epoch < 12
    assert time.perf_counter() - start < 120


# ---------------------------------------------------------- from an audit of the plateau (15th)
def test_a_key_no_reference_logs_is_refused_at_setup(tmp_path):
    """Keys that name a measure but none of the callback's references (the key without the
    reference's name when there are several, a misspelt name, a name when the one reference
    has none) passed setup: ``strict`` failed at the first alignment step, after training
    had started, and ``strict=False`` never fired.  They are refused before any step."""
    two = {"a": RefMLP(seed=1), "b": RefMLP(seed=2)}
    for refs, monitor in ((two, "alignment/cknna/calibrated"),
                          (two, "alignment/c/cknna/calibrated"),
                          (None, "alignment/dino/cknna/calibrated")):
        aligner = (_aligner() if refs is None else
                   AlignmentCallback(refs, make_probe(), LAYERS, measures=["cknna"],
                                     num_permutations=20, log_heatmaps=False))
        with pytest.raises(ValueError, match=r"no AlignmentCallback logs this key \(they log "
                                             r"e\.g\. alignment/(a/)?cknna/calibrated"):
            _fit(tmp_path, [aligner, _plateau(monitor=monitor)], 1)
        assert aligner.history == []
    aligner = AlignmentCallback(two, make_probe(), LAYERS, measures=["cknna"],
                                num_permutations=20, log_heatmaps=False)
    plateau = _plateau(monitor="alignment/b/cknna/calibrated", patience=1, min_delta=10.0)
    _fit(tmp_path, [aligner, plateau], 2)
    assert plateau.fired_at["epoch"] == 2


class SlowProbeMLP(MLP):
    """Its probe passes (eval mode, in the background worker) take 0.3 s each."""

    def forward(self, x):
        if not self.training:
            time.sleep(0.3)
        return super().forward(x)


@pytest.mark.parametrize("order", ["aligner_first", "plateau_first"])
def test_background_results_published_at_the_end_are_checked_in_either_order(tmp_path, order):
    """The last background steps are published in the AlignmentCallback's ``on_train_end``;
    a plateau listed before it read the history first and never saw them: here the deciding
    check (epoch 3 of a flat curve, patience 2) was lost, ``fired`` stayed False.  The plateau
    now has them published before its last read."""
    aligner = _aligner(background=True)
    plateau = _plateau(monitor=KEY, patience=2, min_delta=10.0)
    callbacks = [aligner, plateau] if order == "aligner_first" else [plateau, aligner]
    trainer = pl.Trainer(max_epochs=3, logger=False, callbacks=callbacks,
                         default_root_dir=tmp_path, enable_checkpointing=False, **FAST_TRAINER)
    trainer.fit(SlowProbeMLP(lr=0.0), train_loader())
    assert aligner._threaded and [h["epoch"] for h in aligner.history] == [0, 1, 2, 3]
    assert plateau.fired and plateau.fired_at["epoch"] == 3
    assert len(plateau.on_plateau.calls) == 1


def test_patience_and_min_delta_take_numpy_numbers_and_refuse_others():
    """``patience=np.int64(3)`` (from a config array, a sweep) was refused as "not an integer";
    ``min_delta=np.float32(0.01)`` as "not a number".  They are taken (as Python numbers);
    bools, fractions of a check, negative and non-finite values are still refused."""
    import numpy as np

    plateau = AlignmentPlateau(KEY, patience=np.int64(3), min_delta=np.float32(0.01),
                               on_plateau=print)
    assert plateau.patience == 3 and type(plateau.patience) is int
    assert plateau.min_delta == pytest.approx(0.01) and type(plateau.min_delta) is float
    for patience in (True, 2.5, 0, np.int64(0)):
        with pytest.raises(ValueError, match="patience must be an integer >= 1"):
            AlignmentPlateau(KEY, patience=patience, on_plateau=print)
    for min_delta in (True, -0.1, math.inf, np.float64("nan"), "0.1"):
        with pytest.raises(ValueError, match="min_delta must be a finite number >= 0"):
            AlignmentPlateau(KEY, min_delta=min_delta, on_plateau=print)
