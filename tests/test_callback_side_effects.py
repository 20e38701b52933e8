"""What a probe pass must not change in training, beyond the model's own state (an audit of
the isolation promise under common training code):

* a probe DataLoader whose ``generator`` the training loader shares (each iteration of a
  DataLoader draws its base seed from its generator);
* a forward that calls ``self.log`` (the probe's eval-mode values in the epoch's metrics);
* a forward hook function that stores features for an auxiliary loss, in background mode
  (the worker's copy would share the function, and write into the model in training);
* lazy modules, which a probe pass before the first batch would initialize;
* a forward that changes its input in place (the probe, or the data it is a view of).
"""

from __future__ import annotations

import time
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alignment_callback.hooks import collect_activations
from tests.helpers import FAST_TRAINER, MLP, make_data, make_probe, quiet_callback

PROBE = make_probe(48)


def run(model: pl.LightningModule, callbacks: list, loader: DataLoader | None = None,
        max_epochs: int = 2) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, **FAST_TRAINER)
    if loader is None:
        loader = DataLoader(TensorDataset(*make_data(64)), batch_size=16, shuffle=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, loader)
    return trainer, model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                b.state_dict().values()))


@pytest.mark.parametrize("background", [False, True])
def test_a_probe_loader_sharing_the_training_loaders_generator(background):
    def loaders() -> tuple[DataLoader, DataLoader, torch.Generator]:
        g = torch.Generator().manual_seed(42)
        train = DataLoader(TensorDataset(*make_data(64)), batch_size=16, shuffle=True,
                           generator=g)
        return train, DataLoader(TensorDataset(PROBE), batch_size=16, generator=g), g

    train, _, g_plain = loaders()
    _, plain = run(MLP(dropout=0.3), [], train)
    train, probe, g = loaders()
    cb = quiet_callback(probe, ["linear_cka"], 19, background=background)
    _, model = run(MLP(dropout=0.3), [cb], train)
    assert len(cb.history) == 3
    assert same_weights(model, plain)
    assert torch.equal(g.get_state(), g_plain.get_state())


def test_collect_activations_puts_a_loaders_own_generator_back():
    g = torch.Generator().manual_seed(7)
    loader = DataLoader(TensorDataset(PROBE), batch_size=16, generator=g)
    before = g.get_state()
    collect_activations(MLP(), loader, ["fc1"])
    assert torch.equal(g.get_state(), before)


class LoggingForward(MLP):
    """A forward that logs an activation statistic (read by monitors at the epoch's end)."""

    def forward(self, x):
        h = self.act1(self.fc1(x))
        self.log("act_mean", h.abs().mean(), on_step=False, on_epoch=True)
        return self.head(self.act2(self.fc2(self.drop(h))))


@pytest.mark.parametrize("background", [False, True])
def test_a_forward_that_logs_gives_the_monitors_training_values(background):
    trainer, _ = run(LoggingForward(), [], max_epochs=2)
    plain = float(trainer.callback_metrics["act_mean"])
    cb = quiet_callback(PROBE, ["linear_cka"], 19, background=background)
    trainer, model = run(LoggingForward(), [cb], max_epochs=2)
    assert len(cb.history) == 3
    assert float(trainer.callback_metrics["act_mean"]) == plain
    assert "log" not in vars(model) and "log_dict" not in vars(model)


class AuxiliaryFeatures(MLP):
    """A forward hook function stores fc2's output for an auxiliary loss (a REPA or
    distillation pattern); the step counts batches that read other rows than their own."""

    def __init__(self) -> None:
        super().__init__(dropout=0.3)
        self.fc2.register_forward_hook(lambda m, i, out: setattr(self, "feat", out))
        self.foreign = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        time.sleep(0.002)  # work between the forward and the loss, while a worker could run
        feat = self.feat
        self.foreign += int(feat.shape[0] != x.shape[0] or not feat.requires_grad)
        return nn.functional.mse_loss(out, y) + 0.01 * feat.pow(2).mean()


def test_background_with_a_global_hook_function_captures_in_the_loop():
    seen: dict[str, torch.Tensor] = {}
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.__setitem__(type(module).__name__, out))
    try:
        cb = quiet_callback(PROBE, ["linear_cka"], 19, background=True)
        with pytest.warns(RuntimeWarning, match=r"of every module \(a global hook\) is a "
                                                r"function"):
            run(MLP(), [cb])
    finally:
        handle.remove()
    assert len(cb.history) == 3


def test_background_with_a_hook_function_captures_in_the_loop():
    _, plain = run(AuxiliaryFeatures(), [], max_epochs=3)
    cb = quiet_callback(PROBE, ["linear_cka"], 19, background=True, every_n_train_steps=1)
    with pytest.warns(RuntimeWarning, match=r"the forward hook .*<lambda>.* of 'fc2' is a "
                                            r"function.*the probe runs in the training loop"):
        _, model = run(AuxiliaryFeatures(), [cb], max_epochs=3)
    assert model.foreign == 0 and len(cb.history) == 13
    assert same_weights(model, plain)


class LazyMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.LazyLinear(16)


@pytest.mark.parametrize("kw", [{}, {"reference": "initial", "baseline": False}])
def test_lazy_modules_are_refused_before_the_probe_pass_at_the_start(kw):
    cb = quiet_callback(PROBE, ["linear_cka"], 19, **kw)
    with pytest.raises(ValueError, match=r"lazy modules \['fc2'\] were not initialized when "
                                         r"training started, and the probe pass"):
        run(LazyMLP(), [cb])


class LazyAuxiliary(MLP):
    """A lazy auxiliary head used by the training step only: the probe pass never runs it."""

    def __init__(self) -> None:
        super().__init__(dropout=0.3)
        self.aux = nn.LazyLinear(2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.act1(self.fc1(x))
        return nn.functional.mse_loss(self(x), y) + 0.1 * self.aux(h).pow(2).mean()


def test_lazy_modules_the_probe_pass_does_not_run_are_fine():
    _, plain = run(LazyAuxiliary(), [])
    cb = quiet_callback(PROBE, ["linear_cka"], 19)
    _, model = run(LazyAuxiliary(), [cb])
    assert len(cb.history) == 3 and same_weights(model, plain)


def test_lazy_modules_without_a_pass_at_the_start_train_as_without_the_callback():
    _, plain = run(LazyMLP(), [])
    cb = quiet_callback(PROBE, ["linear_cka"], 19, baseline=False)
    _, model = run(LazyMLP(), [cb])
    assert len(cb.history) == 2 and same_weights(model, plain)


class InPlaceInput(MLP):
    def forward(self, x):
        x = x.float().mul_(0.5)  # .float() of a float32 tensor is the tensor itself
        return super().forward(x)


@pytest.mark.parametrize("background", [False, True])
def test_a_forward_changing_its_input_in_place_leaves_the_probe_and_data_alone(background):
    data = make_data(64)
    loader = DataLoader(TensorDataset(data[0].clone(), data[1]), batch_size=16, shuffle=True)
    _, plain = run(InPlaceInput(), [], loader)
    x, y = data[0].clone(), data[1]
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    probe = x[:48]  # a view of the training rows
    cb = quiet_callback(probe, ["linear_cka"], 19, background=background)
    _, model = run(InPlaceInput(), [cb], loader)
    assert torch.equal(x, data[0])
    assert same_weights(model, plain)
    raws = [h["alignment/linear_cka/raw"] for h in cb.history]
    assert len(raws) == 3
