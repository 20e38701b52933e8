"""Configuration the callback must not misread: a failing reference model is named as such
(not "the model", which is the model in training), and ``every_n_epochs`` with
``every_n_train_steps`` is refused rather than ignored (as Lightning's ``ModelCheckpoint``)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from alignment_callback import AlignmentCallback
from tests.helpers import FAST_TRAINER, MLP, RefMLP, make_probe, train_loader


def _wrong_width_reference() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 4))  # the probe has 8


@pytest.mark.parametrize("name", [None, "dino"])
def test_a_failing_reference_model_is_named(name):
    ref = _wrong_width_reference()
    probe = make_probe()
    assert probe.shape[1] != 5
    cb = AlignmentCallback(ref if name is None else {name: ref}, probe, ["fc1"],
                           reference_layers=["0"], measures=["linear_cka"], num_permutations=19,
                           verbose=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[cb],
                         enable_checkpointing=False, **FAST_TRAINER)
    with pytest.raises(RuntimeError) as info:
        trainer.fit(MLP(), train_loader())
    label = "the reference" if name is None else "reference 'dino'"  # not "reference reference"
    message = str(info.value)
    assert message.startswith(f"{label} model: the model failed on probe batch 0")
    assert "mat1 and mat2" in message


def test_every_n_epochs_with_every_n_train_steps_is_refused():
    with pytest.raises(ValueError, match=r"every_n_epochs \(5\) or every_n_train_steps \(100\)"):
        AlignmentCallback(RefMLP(), make_probe(), ["fc1"], every_n_epochs=5,
                          every_n_train_steps=100)


@pytest.mark.parametrize("kw, epochs, steps", [({}, 1, None), ({"every_n_epochs": 3}, 3, None),
                                              ({"every_n_train_steps": 7}, None, 7)])
def test_schedule_defaults(kw, epochs, steps):
    cb = AlignmentCallback(RefMLP(), make_probe(), ["fc1"], **kw)
    assert (cb.every_n_epochs, cb.every_n_train_steps) == (epochs, steps)


def test_named_error_keeps_its_type_where_it_can():
    from alignment_callback.callback.alignment_callback import _named
    from alignment_callback.hooks.collect import LayerCountError

    assert type(_named(LayerCountError("x"), "r")) is LayerCountError
    assert str(_named(ValueError("bad"), "r")) == "r: bad"
    assert type(_named(KeyError("k"), "r")) is RuntimeError  # str(KeyError) quotes its text
    assert type(_named(torch.cuda.OutOfMemoryError("oom"), "r")) is torch.cuda.OutOfMemoryError


class _Counting(MLP):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
@pytest.mark.parametrize("case", ["cca_dim", "nan_reference"])
def test_a_frozen_reference_that_cannot_be_measured_fails_before_training(case, background):
    """The frozen reference's activations never change: a measure option its widths cannot
    take, or NaN in them, would fail every step.  Before, ``on_error="warn"`` trained the whole
    run with a warning per step and nothing logged; now it is raised at the baseline."""
    from alignment_callback.callback.alignment_callback import FrozenReferenceError
    from alignment_callback.functional import get_measure

    ref = RefMLP(seed=1)
    if case == "nan_reference":
        with torch.no_grad():
            ref.fc1.weight[0, 0] = float("nan")
        measures, match = ["linear_cka"], "NaN"
    else:  # the reference's fc1 is 16 wide
        measures, match = [get_measure("svcca", cca_dim=50)], "cca_dim=50 is too large"
    cb = AlignmentCallback(ref, make_probe(), ["fc1"], measures=measures, num_permutations=19,
                           verbose=False, report=False, background=background, on_error="warn")
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[cb],
                         enable_checkpointing=False, **FAST_TRAINER)
    _Counting.steps = 0
    expected = rf"frozen reference's probe activations .*{match}"
    with pytest.raises(FrozenReferenceError, match=expected):
        trainer.fit(_Counting(), train_loader())
    assert cb.skipped == [] and cb.history == []
    if not background:
        assert _Counting.steps == 0  # before the first training step


def test_a_meta_compute_device_is_refused_when_built():
    with pytest.raises(ValueError, match="compute_device='meta' holds no data"):
        AlignmentCallback(RefMLP(seed=1), make_probe(), ["fc1"], compute_device="meta")


def test_a_transient_failure_of_the_reference_still_follows_on_error(monkeypatch):
    """Out of memory while the reference is prepared may pass: it warns (on_error="warn") and
    the next step retries, keeping its type; only ValueErrors (NaN, an option the widths cannot
    take) are taken as permanent."""
    from alignment_callback.engine import AlignmentEngine

    real, calls = AlignmentEngine.set_reference, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AlignmentEngine, "set_reference", flaky)
    cb = AlignmentCallback(RefMLP(seed=1), make_probe(), ["fc1"], measures=["linear_cka"],
                           num_permutations=19, verbose=False, report=False, on_error="warn")
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[cb],
                         enable_checkpointing=False, **FAST_TRAINER)
    with pytest.warns(RuntimeWarning, match="skipped: OutOfMemoryError: CUDA out of memory"):
        trainer.fit(MLP(), train_loader())
    assert [s["step"] for s in cb.skipped] == [0] and len(cb.history) == 2
