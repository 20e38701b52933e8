"""Configuration mistakes of the callback's user-facing settings, refused or warned before
training: names that would make logged keys MLflow refuses, a pool that cannot reduce a chosen
layer's outputs, a step-mode checkpoint that saves between alignment steps; NumPy integers as
schedules."""

from __future__ import annotations

import posixpath
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from alignment_callback import AlignmentCallback
from alignment_callback.callback import dispatch
from alignment_callback.callback.presets import patch_mean
from alignment_callback.hooks import LayerShapeError
from tests.helpers import FAST_TRAINER, MLP, RefMLP, make_probe, quiet_callback, train_loader
from tests.test_dispatch import MLFlowLoggerStandIn

BAD_NAMES = ["alignment/", "/alignment", "a//b", "a/./b", "a/../b", ".", "..", "", "..v2", "..."]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_log_prefix_that_makes_paths_mlflow_refuses_is_refused_at_construction(name):
    with pytest.raises(ValueError, match="log_prefix"):
        AlignmentCallback(RefMLP(), make_probe(), ["fc1"], log_prefix=name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_reference_name_that_makes_paths_mlflow_refuses_is_refused_at_construction(name):
    with pytest.raises(ValueError, match="reference name"):
        AlignmentCallback({name: RefMLP(), "dino": RefMLP(seed=2)}, make_probe(), ["fc1"])


def test_names_with_inner_slashes_are_accepted():
    cb = AlignmentCallback({"dino/v2": RefMLP()}, make_probe(), ["fc1"], log_prefix="probe/a")
    assert cb.log_prefix == "probe/a" and cb.references[0].name == "dino/v2"


def test_mlflow_names_never_resolve_to_other_paths():
    """Dropped characters can leave an empty part (a layer or reference named ``ü``): such
    parts, and ``.`` / ``..``, are written ``_``; the names stay distinct."""
    keys = ["alignment/ü/linear_cka/calibrated", "alignment/./x", "alignment/../x",
            "alignment/_/x", "..v2/x", "../x"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the keys that coincide are warned
        names = dispatch.mlflow_keys(MLFlowLoggerStandIn(), keys)
    assert names["alignment/ü/linear_cka/calibrated"] == "alignment/_/linear_cka/calibrated"
    assert len(set(names.values())) == len(keys), names
    for name in names.values():  # MLflow's rule (mlflow.utils.validation.path_not_unique)
        assert posixpath.normpath(name) == name and not name.startswith(("/", "..")), name


def test_names_mlflow_accepts_are_kept():
    for name in ("v1.5", "dino/v2", "clip/vit-b.16", ".hidden", "a/..b"):
        AlignmentCallback({name: RefMLP(), "other": RefMLP(seed=2)}, make_probe(), ["fc1"],
                          log_prefix=name)


@pytest.mark.parametrize("pool, error", [
    (lambda x: x.reshape(x.shape[0], 7), LayerShapeError),  # torch's shape RuntimeError
    (lambda x: (_ for _ in ()).throw(RuntimeError("CUDA out of memory. Tried to allocate")),
     RuntimeError),
])
def test_a_pool_s_torch_shape_error_is_a_layer_shape_error_but_out_of_memory_is_not(pool, error):
    """torch's shape errors are plain ``RuntimeError`` s: the pool cannot reduce the layer, as
    for the other error types; running out of memory is not the pool's fault."""
    from alignment_callback.hooks import collect_activations
    from tests.helpers import MLP as Model

    with pytest.raises((RuntimeError, ValueError)) as info:
        collect_activations(Model(), make_probe(), ["fc1"], pool=pool)
    assert type(info.value) is error and "layer 'fc1'" in str(info.value)


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_pool_that_cannot_reduce_a_layer_is_raised_before_training(on_error):
    """``patch_mean`` on 2-D outputs: the baseline skipped it with a warning under
    ``on_error="warn"``, and the first epoch's step raised a ``ProbeInputError`` that blamed the
    model; no data can fix it, so it is raised at the baseline, naming the layer and the pool."""
    cb = quiet_callback(make_probe(), ["linear_cka"], 19, pool=patch_mean(1),
                        reference_pool="mean", on_error=on_error)
    trainer = pl.Trainer(**FAST_TRAINER, max_epochs=2, logger=False, enable_checkpointing=False,
                         callbacks=[cb])
    with pytest.raises(LayerShapeError, match=r"layer 'fc1' .*pool=patch_mean\(1\)"):
        trainer.fit(MLP(), train_loader())
    assert trainer.global_step == 0


def test_numpy_integers_are_schedules():
    cb = quiet_callback(make_probe(), ["linear_cka"], 19, every_n_epochs=np.int64(2))
    assert cb.every_n_epochs == 2 and type(cb.every_n_epochs) is int
    cb = quiet_callback(make_probe(), ["linear_cka"], 19, every_n_train_steps=np.int32(3))
    assert cb.every_n_train_steps == 3 and type(cb.every_n_train_steps) is int


@pytest.mark.parametrize("save_every,warned", [(2, True), (6, False), (3, False)])
def test_step_mode_checkpoints_between_alignment_steps_are_warned(tmp_path, save_every, warned):
    """``every_n_train_steps=3`` and a checkpoint every 2 steps: the checkpoint at step 2 was
    scored with the baseline's value, at step 8 with step 6's (measured on other weights), with
    no warning; epoch mode warned of the same mistake."""
    cb = quiet_callback(make_probe(), ["linear_cka"], 19, every_n_train_steps=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="alignment/linear_cka/calibrated",
                           mode="max", every_n_train_steps=save_every)
    trainer = pl.Trainer(**FAST_TRAINER, max_epochs=1, logger=False, callbacks=[cb, ckpt])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MLP(), train_loader())
    messages = [str(w.message) for w in caught if "saves every" in str(w.message)]
    assert bool(messages) == warned, messages
    if warned:
        assert "every_n_train_steps=3" in messages[0] and "every 2 training steps" in messages[0]


@pytest.mark.parametrize("monitor_cls,every,accumulate,warned", [
    (ModelCheckpoint, 3, 1, True),  # 4 optimizer steps per epoch, a step every 3
    (ModelCheckpoint, 2, 1, False),
    (EarlyStopping, 3, 1, True),
    (EarlyStopping, 4, 1, False),
    (ModelCheckpoint, 4, 2, True),  # 2 optimizer steps per epoch
    (ModelCheckpoint, 2, 2, False),
])
def test_step_mode_monitors_at_epoch_ends_between_alignment_steps_are_warned(
        tmp_path, monitor_cls, every, accumulate, warned):
    """A monitor at the training epoch end reads the last alignment step's value: measured on
    the weights it checks only when the epoch's optimizer steps are a multiple of n."""
    cb = quiet_callback(make_probe(), ["linear_cka"], 19, every_n_train_steps=every)
    key = "alignment/linear_cka/calibrated"
    monitor = (ModelCheckpoint(dirpath=tmp_path, monitor=key, mode="max")
               if monitor_cls is ModelCheckpoint else
               EarlyStopping(monitor=key, mode="max", patience=100))
    trainer = pl.Trainer(**FAST_TRAINER, max_epochs=2, logger=False, callbacks=[cb, monitor],
                         accumulate_grad_batches=accumulate, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MLP(), train_loader())  # 4 batches per epoch
    messages = [str(w.message) for w in caught if "up to" in str(w.message)]
    assert bool(messages) == warned, messages
    # warned exactly when an epoch end (global steps 4 // accumulate, 8 // accumulate) falls
    # between two alignment steps
    per_epoch = 4 // accumulate
    steps = {h["step"] for h in cb.history}
    assert warned == any(e * per_epoch not in steps for e in (1, 2)), (steps, per_epoch)
    if warned:
        assert f"every {per_epoch} optimizer step(s)" in messages[0], messages[0]


def test_a_cuda_compute_device_without_an_index_is_resolved_in_the_training_thread(monkeypatch):
    """``"cuda"`` is each thread's current device: a background worker thread would compute on
    cuda:0 while the Trainer trains on cuda:1; it is resolved where the callback is set up."""
    import torch

    from alignment_callback.callback.alignment_callback import _compute_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _compute_device("cuda", torch.device("cpu")) == torch.device("cuda", 1)
    assert _compute_device(torch.device("cuda"), torch.device("cpu")) == torch.device("cuda", 1)
    assert _compute_device("cuda:0", torch.device("cpu")) == torch.device("cuda", 0)
    assert _compute_device(None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert _compute_device("cpu", torch.device("cuda", 1)) == torch.device("cpu")


def test_numpy_integers_are_batch_sizes_and_batch_counts():
    from alignment_callback.hooks import collect_activations
    from alignment_callback.hooks.extract import extract_features
    from tests.helpers import MLP as Model

    x = make_probe(12)
    acts = collect_activations(Model(), x, ["fc1"], batch_size=np.int64(4), max_batches=np.int32(2))
    assert acts["fc1"].shape[0] == 8
    assert extract_features(Model(), x, ["fc1"], batch_size=np.int64(5))["fc1"].shape[0] == 12
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            collect_activations(Model(), x, ["fc1"], batch_size=bad)
    with pytest.raises(ValueError, match="max_batches must be an integer >= 1"):
        collect_activations(Model(), x, ["fc1"], max_batches=0)


def test_a_pool_s_own_message_does_not_name_the_pool_twice():
    import torch
    from torch import nn

    from alignment_callback.hooks import collect_activations

    with pytest.raises(LayerShapeError) as info:
        collect_activations(nn.Sequential(nn.Conv1d(3, 4, 1)), torch.randn(6, 3, 5), ["0"],
                            pool="none")
    text = str(info.value)
    assert text.count("pool='none'") == 1, text
    assert "cannot reduce it to one row per sample: it needs 2-D activations" in text, text
