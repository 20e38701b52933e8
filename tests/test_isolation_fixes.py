"""The callback must not change training: state a probe pass's forward changes, and compiled
models (an audit of the isolation promise).

* background mode with a model compiled in place (``model.compile()``): the worker's copy must
  never run the original module (its compiled call is bound to it);
* buffers a forward updates in eval mode (quantization-aware training's observers) and a
  model's own ``torch.Generator`` are put back after the probe pass;
* a compiled model runs eagerly in the probe pass: no graph is added, training is bitwise the
  same (``backend="eager"``: no C++ toolchain needed);
* background mode: a buffer whose shape changes in training is refreshed on the copy, and one
  added in training gives the copy up with the usual warning (the zip of the copy's tensors
  with the model's would pair the wrong ones).
"""

from __future__ import annotations

import random
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch._dynamo
import torch.ao.quantization as tq
from torch import nn
from torch._dynamo.utils import counters

from alignment_callback.callback.background import ModelCopy
from alignment_callback.hooks.collect import (
    collect_activations,
    evaluation_mode,
    preserved_rng,
    random_states,
    same_random_states,
)
from tests.helpers import FAST_TRAINER, MLP, train_loader
from tests.test_callback_isolation import PROBE, assert_same_training, callback, fit, raws


class BatchNormMLP(MLP):
    """``fc1 -> tanh -> BatchNorm -> dropout -> fc2 -> tanh -> head``: running statistics and
    random draws in training, which a forward run from elsewhere would change."""

    def __init__(self) -> None:
        super().__init__(dropout=0.3)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        h = self.drop(self.bn(self.act1(self.fc1(x))))
        return self.head(self.act2(self.fc2(h)))

    def training_step(self, batch, batch_idx):
        # no self.log: Lightning's compiled training_step (torch.compile(model)) cannot trace it
        return nn.functional.mse_loss(self(batch[0]), batch[1])


def no_runtime_warning_fit(cb, model):
    """A fit whose callback must use the model copy: a fallback warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return fit([cb], model=model)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compiled(model: nn.Module) -> nn.Module:
    model.compile(backend="eager")
    return model


def compiled_fit(cbs, how):
    """A seeded fit of a compiled BatchNormMLP (in place, or Lightning's torch.compile(model))
    from a fresh compiler cache; returns (trainer, model, random states) as ``fit`` does, and
    the number of graphs compiled."""
    torch._dynamo.reset()
    counters.clear()
    model = BatchNormMLP()
    if how == "in place":
        return fit(cbs, model=compiled(model)), graphs()
    # fit's `model or MLP()` would take the truth value of an OptimizedModule (its len())
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=cbs, enable_checkpointing=False,
                         **FAST_TRAINER)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(torch.compile(model, backend="eager"), train_loader())
    np_state = np.random.get_state()
    return (trainer, model, (torch.get_rng_state(), np_state[1].copy(), np_state[2],
                             random.getstate())), graphs()


# ------------------------------------------------------------ 1. background copy, compiled
def test_copy_of_a_model_compiled_in_place_never_runs_the_original():
    model = BatchNormMLP()
    model.compile(backend="eager")
    copy = ModelCopy(model)
    ran = []
    handle = model.bn.register_forward_hook(lambda *_: ran.append("original"))
    copy.model.eval()
    with torch.no_grad():
        copy.model(PROBE)
    handle.remove()
    assert ran == []
    assert model._compiled_call_impl is not None  # the model keeps its compiled call


def test_background_with_a_model_compiled_in_place_keeps_training_unchanged():
    torch._dynamo.reset()
    plain = fit([], model=compiled(BatchNormMLP()))
    fg, bg = callback(), callback(background=True)
    fit([fg], model=compiled(BatchNormMLP()))
    background = no_runtime_warning_fit(bg, compiled(BatchNormMLP()))
    assert_same_training(plain, background)
    assert raws(bg) == raws(fg) and len(raws(bg)) == 3


# ------------------------------------------------------ 2. state a forward changes in eval
class QATMLP(MLP):
    """Quantization-aware training: every forward (eval mode too) updates the FakeQuantize
    observers' min / max, scale and zero point (buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.qconfig = tq.get_default_qat_qconfig("fbgemm")
        tq.prepare_qat(self, inplace=True)

    def forward(self, x):
        return self.dequant(super().forward(self.quant(x)))


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_quantization_observers_are_unchanged_by_the_probe(background):
    wide = 3 * PROBE  # a wider range than the training data: the observers would widen
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plain = fit([], model=QATMLP())
        cb = callback(probe=wide, background=background)
        assert_same_training(plain, fit([cb], model=QATMLP()))
    assert len(raws(cb)) == 3
    # the observers' hooks are torch's functions: the worker's copy runs the probe
    assert not [w for w in seen if "runs in the training loop" in str(w.message)]


class OwnNoiseMLP(MLP):
    """Draws input noise from its own generator, in eval mode too, held under ``name``."""

    def __init__(self, name: str = "noise") -> None:
        super().__init__(dropout=0.3)
        self.name = name
        setattr(self, name, torch.Generator().manual_seed(7))

    def forward(self, x):
        noise = getattr(self, self.name)
        return super().forward(x + 0.1 * torch.randn(x.shape, generator=noise))


@pytest.mark.parametrize("name", ["noise", "_noise"])
def test_a_models_own_generator_is_unchanged_by_the_probe(name):
    """Background results equal foreground ones: a generator under a private name was not
    copied to the worker's model copy, whose probe pass drew from the state it had when the
    copy was made (the foreground one from its state at the step)."""
    plain = fit([], model=OwnNoiseMLP(name))
    fg, bg = callback(), callback(background=True)
    foreground = fit([fg], model=OwnNoiseMLP(name))
    background = no_runtime_warning_fit(bg, OwnNoiseMLP(name))  # the copy is used
    for run in (foreground, background):
        assert_same_training(plain, run)
        assert torch.equal(getattr(run[1], name).get_state(), getattr(plain[1], name).get_state())
    assert raws(bg) == raws(fg) and len(raws(bg)) == 3


class Stateful(nn.Module):
    """A forward that changes its buffers every way it can, and draws from its generator."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("stat", torch.arange(2.0))
        self.register_buffer("cache", torch.zeros(3), persistent=False)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        self.count += 1  # in place
        self.stat.resize_(5).fill_(7.0)  # resized in place (a per-channel observer)
        self.cache = torch.ones(len(x))  # re-bound (a cache rebuilt for another input)
        if not hasattr(self, "extra"):
            self.register_buffer("extra", torch.ones(1), persistent=False)
        return self.fc(x + torch.randn(x.shape, generator=self.gen))


def test_evaluation_mode_puts_back_buffers_and_generators():
    model = Stateful()
    buffers = list(model._buffers.items())
    values = {name: buf.clone() for name, buf in buffers}
    state = model.gen.get_state()
    acts = collect_activations(model, PROBE, ["fc"], batch_size=16)
    assert acts["fc"].shape == (48, 4)
    # the same tensor objects under the same names, in the same order
    assert [(n, id(b)) for n, b in model._buffers.items()] == [(n, id(b)) for n, b in buffers]
    for name, buf in model._buffers.items():
        assert buf.shape == values[name].shape and torch.equal(buf, values[name]), name
    assert model._non_persistent_buffers_set == {"cache"}
    assert torch.equal(model.gen.get_state(), state)


class DrawsFromTheGlobalGenerator(nn.Module):
    """Holds torch's global generator as an attribute and draws from it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.gen = torch.default_generator

    def forward(self, x):
        return self.fc(x + torch.randn(x.shape, generator=self.gen))


def test_a_global_generator_attribute_is_left_to_restore_rng():
    """Background mode's draw detection runs the loop's capture with restore_rng=False: a
    draw from the global stream must stay visible (and a worker must never rewind it)."""
    model = DrawsFromTheGlobalGenerator()
    with preserved_rng():
        before = random_states()
        with evaluation_mode(model, restore_rng=False):
            model(PROBE)
        assert not same_random_states(before, random_states())


# ---------------------------------------------------------------- 3. compiled, eagerly
@pytest.mark.parametrize("how", ["in place", "torch.compile(model)"])
def test_a_compiled_model_runs_eagerly_in_the_probe_pass(how):
    (plain, plain_graphs) = compiled_fit([], how)
    cb = callback(every_n_train_steps=2)
    (with_cb, cb_graphs) = compiled_fit([cb], how)
    assert_same_training(plain, with_cb)
    assert cb_graphs == plain_graphs == 1  # the probe pass compiled nothing
    assert len(raws(cb)) == 5


class Small(nn.Module):
    """A module of this file (dynamo does not trace torch.nn's own forwards, nn.Sequential's)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def eager_linear(x, layer: nn.Linear) -> np.ndarray:
    """``x W^T + b`` in float64 NumPy."""
    w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    return x.double().numpy() @ w.T + b


@pytest.mark.parametrize("how", ["in place", "instance forward"])
def test_collect_activations_adds_no_graph_and_restores_the_compiled_call(how):
    torch._dynamo.reset()
    counters.clear()
    model = Small()
    key = "_compiled_call_impl" if how == "in place" else "forward"
    if how == "in place":
        model.compile(backend="eager")
    else:
        model.forward = torch.compile(model.forward, backend="eager")
    compiled_call = vars(model)[key]
    model(PROBE[:16])  # a training step's compilation
    assert graphs() == 1
    acts = collect_activations(model, PROBE, ["fc1", "fc2"], batch_size=16)
    assert graphs() == 1
    assert vars(model)[key] is compiled_call and model.training
    np.testing.assert_allclose(acts["fc1"].double().numpy(), eager_linear(PROBE, model.fc1),
                               rtol=1e-5, atol=1e-6)


# -------------------------------------------------------- 4. background, buffers reshaped
class GrowingHistoryMLP(MLP):
    """Appends every step's loss to a registered buffer (saved with the checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("loss_history", torch.zeros(0))

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.loss_history = torch.cat([self.loss_history, loss.detach()[None]])
        return loss


def test_background_copy_takes_a_buffer_whose_shape_changes():
    fg, bg = callback(), callback(background=True)
    fit([fg], model=GrowingHistoryMLP())
    no_runtime_warning_fit(bg, GrowingHistoryMLP())
    assert bg.skipped == [] and raws(bg) == raws(fg) and len(raws(bg)) == 3


class LateBufferMLP(BatchNormMLP):
    """Registers a buffer on the root in training: the model's buffers shift against the
    copy's (the root's come before the BatchNorm's)."""

    def training_step(self, batch, batch_idx):
        if self.global_step >= 2 and not hasattr(self, "late"):
            self.register_buffer("late", torch.ones(16))
        return super().training_step(batch, batch_idx)


def test_background_copy_is_given_up_when_a_buffer_is_added():
    fg, bg = callback(), callback(background=True)
    plain = fit([], model=LateBufferMLP())
    fit([fg], model=LateBufferMLP())
    with pytest.warns(RuntimeWarning, match="cannot be copied any more .*'late'"):
        background = fit([bg], model=LateBufferMLP())
    assert_same_training(plain, background)
    assert bg.skipped == [] and raws(bg) == raws(fg) and len(raws(bg)) == 3


def test_a_compiled_forward_is_unwrapped_by_torch_s_rule_of_each_version():
    """torch ≤ 2.10 marks its wrapper with ``_torchdynamo_orig_callable`` only (no
    ``_torchdynamo_wrapper_id``): followed, as torch itself did; from 2.11 a wrapper records
    its own id, and a ``functools.wraps`` copy of it (other id) is the user's function."""
    import functools

    from alignment_callback.hooks.collect import _uncompiled

    def original(x):
        return x

    def old_style(x):  # what torch <= 2.10's compile left
        return original(x)

    old_style._torchdynamo_orig_callable = original
    assert _uncompiled(old_style) is original

    def new_style(x):
        return original(x)

    new_style._torchdynamo_orig_callable = original
    new_style._torchdynamo_wrapper_id = id(new_style)
    assert _uncompiled(new_style) is original

    @functools.wraps(new_style)
    def users_wrapper(x):
        return new_style(x)

    assert users_wrapper._torchdynamo_wrapper_id == id(new_style)  # copied by wraps
    assert _uncompiled(users_wrapper) is users_wrapper
