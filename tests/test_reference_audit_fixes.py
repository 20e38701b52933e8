"""From an audit of how the callback gets its reference and probe: ``reference_class`` per
reference name, and a feature file given with it read as features; a model's ``state_dict``
file refused as features; a failed step's warning names the reference (and its measure); a
per-name setting with a key that is no reference name refused; a name left out of a per-name
``reference_pool`` falls back to ``pool``; feature layers chosen by name, glob or regex; a
Lightning checkpoint without ``reference_class`` and a ``Dataset`` probe get a hint."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from alignment_callback.callback.reference import resolve_references
from alignment_callback.engine import AlignmentEngine
from alignment_callback.hooks.extract import extract_features
from tests.helpers import FAST_TRAINER, MLP, RefMLP, make_probe, quiet_callback, train_loader

K = 19
N = 48


def _probe():
    return make_probe(N)


def _cb(reference, **kw):
    return quiet_callback(_probe(), ["linear_cka"], K, reference=reference, **kw)


def _lightning_checkpoint(path, seed=1):
    """What ``Trainer.save_checkpoint`` writes, as far as ``load_from_checkpoint`` reads it."""
    model = MLP(seed=seed)
    torch.save({"pytorch-lightning_version": lightning.__version__, "epoch": 0,
                "state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return str(path)


def _feature_file(path):
    extract_features(RefMLP(seed=2), _probe(), ["fc1"], path)
    return str(path)


# ------------------------------------------------------------------ 1. reference_class per name
@pytest.mark.parametrize("reference_class", [MLP, {"teacher": MLP}], ids=["global", "per-name"])
def test_reference_class_loads_the_checkpoint_and_leaves_a_feature_file_features(
        tmp_path, reference_class):
    references = {"teacher": _lightning_checkpoint(tmp_path / "teacher.ckpt"),
                  "dino": _feature_file(tmp_path / "dino.pt")}
    cb = _cb(references, reference_layers={"teacher": ["fc1"]}, reference_class=reference_class)
    kinds = {ref.name: ref.kind for ref in cb.references}
    assert kinds == {"teacher": "model", "dino": "features"}
    assert isinstance(cb.references[0].module, MLP)
    assert cb.references[1].layers == ["fc1"]


def test_a_pt_lightning_checkpoint_with_reference_class_is_a_model(tmp_path):
    cb = _cb(_lightning_checkpoint(tmp_path / "teacher.pt"), reference_class=MLP)
    assert cb.references[0].kind == "model" and isinstance(cb.references[0].module, MLP)


def test_a_load_error_of_one_of_several_references_names_it(tmp_path):
    references = {"teacher": _lightning_checkpoint(tmp_path / "teacher.ckpt"),
                  "dino": _feature_file(tmp_path / "dino.pt")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load(weights_only=False)
        with pytest.raises(TypeError, match=r"reference\['teacher'\]: .*pass reference_class="):
            _cb(references)


# ------------------------------------------------------------------ 2. a state_dict file
@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_a_state_dict_file_is_refused_as_features(tmp_path, suffix):
    # first dims all 24 (the old reader took it for 4 layers of 24 rows): refused by the
    # keys (parameter names) and a weight next to its bias (2-D and 1-D)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24))
    path = tmp_path / f"ref{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)
    elif suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"looks like a model's state_dict.*reference_class="):
        quiet_callback(make_probe(24), ["linear_cka"], K, reference=str(path))


def test_a_state_dict_with_buffers_is_refused_by_name_not_by_its_rows(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    torch.save(model.state_dict(), tmp_path / "ref.pt")
    with pytest.raises(ValueError, match="looks like a model's state_dict"):
        _cb(str(tmp_path / "ref.pt"))


def test_features_named_like_parameters_of_one_shape_family_are_still_features(tmp_path):
    torch.save({"enc.weight": torch.randn(N, 4), "dec.weight": torch.randn(N, 6)},
               tmp_path / "feats.pt")
    cb = _cb(str(tmp_path / "feats.pt"))
    assert cb.references[0].kind == "features"
    assert cb.references[0].layers == ["enc.weight", "dec.weight"]


# ------------------------------------------------------------------ 3. a failed step's warning
class _Failing(pl.Callback):
    """Turns on the measure's failure once training has started (after the baseline)."""

    training = False

    def on_train_batch_start(self, *args):
        _Failing.training = True


def _picky(a, b):  # fails on the 20-wide reference "a" once training has started
    from alignment_callback.functional import linear_cka

    if b.shape[1] == 20 and _Failing.training:
        raise RuntimeError("measure failed")
    return linear_cka(a, b)


def test_a_failed_step_of_one_of_several_references_names_it_and_its_measure(monkeypatch):
    _Failing.training = False
    reference_a = nn.Sequential(nn.Linear(8, 20), nn.Tanh())
    features_b = {"f": torch.randn(N, 24, generator=torch.Generator().manual_seed(5))}
    cb = _cb({"a": reference_a, "b": features_b}, reference_layers={"a": ["1"]},
             measures={"picky": _picky}, on_error="warn")
    trainer = pl.Trainer(max_epochs=1, callbacks=[_Failing(), cb], logger=False,
                         enable_checkpointing=False, **FAST_TRAINER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MLP(), train_loader(batch_size=32))
    expected = "reference 'a', measure 'picky': RuntimeError: measure failed"
    assert [s["reason"] for s in cb.skipped] == [expected]
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert skipped == [f"alignment step at epoch 1 (step 2) skipped: {expected}"]
    assert [h["epoch"] for h in cb.history] == [0]  # the step is skipped for both references

    # under a multi-process strategy the step goes through guarded_step (each process its
    # share of the null): the failure it raises (this process's, or another's sent to it) is
    # named the same way
    def failing_share(compute, num_permutations, **kwargs):
        raise RuntimeError("rank 1's share failed")

    monkeypatch.setattr("alignment_callback.callback.alignment_callback.guarded_step",
                        failing_share)
    with pytest.raises(RuntimeError, match="rank 1's share failed") as err:
        cb._compute(cb._capture(trainer.lightning_module), 2, 3, False, distributed=True)
    assert err.value._alignment_where == "reference 'a', measure 'picky'"


# ------------------------------------------------------------------ 4. per-name keys
def _features():
    g = torch.Generator().manual_seed(3)
    return {"blocks.0": torch.randn(N, 6, generator=g), "blocks.1": torch.randn(N, 6, generator=g)}


@pytest.mark.parametrize("references", [{"dino": _features(), "self": "initial"},
                                        {"dino": _features(), "clip": _features()}],
                         ids=["with-initial", "two-features"])
def test_a_misspelt_reference_name_in_reference_layers_is_refused(references):
    with pytest.raises(ValueError, match=r"reference_layers: the keys \['dinov'\] are not "
                                         r"reference names .*did you mean 'dino'"):
        _cb(references, reference_layers={"dinov": "blocks.1"})


def test_a_per_name_setting_mixing_names_and_other_keys_is_refused():
    references = {"a": RefMLP(seed=1), "b": RefMLP(seed=2)}
    with pytest.raises(ValueError, match=r"reference_layers: the keys \['c'\] are not "):
        _cb(references, reference_layers={"a": ["fc1"], "c": ["fc2"]})
    with pytest.raises(ValueError, match=r"reference_pool: the keys \['x'\] are not "):
        _cb(references, reference_pool={"a": "mean", "x": "cls"})


def test_reference_inputs_may_still_be_one_dict_batch_for_every_reference():
    references = {"a": RefMLP(seed=1), "b": RefMLP(seed=2)}
    cb = _cb(references, reference_inputs={"x": make_probe(N, seed=7)})
    assert all(ref.inputs is not None for ref in cb.references)


def test_initial_with_reference_layers_names_it_and_suggests_per_name_layers():
    with pytest.raises(ValueError, match=r"reference\['self'\]='initial' compares .*"
                                         r"reference_layers=\{'t': \.\.\.\}"):
        _cb({"t": RefMLP(), "self": "initial"}, reference_layers=["fc1"])


# ------------------------------------------------------------------ 5. per-name reference_pool
def test_a_name_left_out_of_a_per_name_reference_pool_falls_back_to_pool():
    references = resolve_references(
        {"a": RefMLP(seed=1), "b": RefMLP(seed=2)},
        lambda pairs: AlignmentEngine(pairs=pairs, measures=["linear_cka"], num_permutations=K),
        layers=["fc1"], reference_pool={"a": "cls"}, pool="flatten")
    assert [ref.pool for ref in references] == ["cls", "flatten"]
    cb = _cb({"a": RefMLP(seed=1), "b": RefMLP(seed=2)}, reference_pool={"a": "cls"},
             pool="flatten")  # the callback passes its pool on
    assert [ref.pool for ref in cb.references] == ["cls", "flatten"]


# ------------------------------------------------------------------ 6. feature layers by name
@pytest.mark.parametrize("spec", ["blocks.*", "re:blocks\\.[01]", re.compile(r"blocks\.\d"),
                                  ["blocks.1", "blocks.0"], ["blocks.?", "blocks.0"]])
def test_feature_layers_are_chosen_by_name_glob_or_regex_in_the_features_order(spec):
    """As a model reference's modules are: each spec matches the feature layer names, and the
    chosen layers keep the features' order (as modules keep the model's)."""
    features = {"head": torch.randn(N, 3), **_features()}
    (ref,) = _cb(features, reference_layers=spec).references
    assert list(ref.features) == ref.layers == ["blocks.0", "blocks.1"]
    for name in ref.features:
        assert ref.features[name] is features[name]


def test_a_feature_name_that_reads_as_a_glob_chooses_itself():
    g = torch.Generator().manual_seed(4)
    features = {name: torch.randn(N, 3, generator=g) for name in ("h[0]", "h[1]", "h0", "out?",
                                                                  "outx")}
    for spec, want in [("h[0]", ["h[0]"]), (["h[1]"], ["h[1]"]), ("out?", ["out?"]),
                       ("h[01]", ["h0"]), ("out[x]", ["outx"])]:
        (ref,) = _cb(features, reference_layers=spec).references
        assert ref.layers == want, spec


@pytest.mark.parametrize("spec, error, message", [
    ("re:(", ValueError, r"^reference_layers: 're:\(' is not a valid regular expression"),
    ([0], TypeError, r"^reference_layers: each layer must be a str"),
    (0, TypeError, r"^reference_layers must be a name, a glob"),
    ([], ValueError, r"^reference_layers: no layers given"),
])
def test_a_bad_feature_layer_spec_is_an_error_of_reference_layers(spec, error, message):
    with pytest.raises(error, match=message):
        _cb(_features(), reference_layers=spec)


def test_the_closest_feature_names_are_not_normalized_as_module_names():
    """``normalize_pattern`` strips a wrapper's ``module.``, which feature names keep."""
    features = {f"module.{name}": torch.randn(N, 2) for name in ("block0", "block1", "head")}
    with pytest.raises(ValueError, match=r"closest names: \['module\.head', "):
        _cb(features, reference_layers="module.haed")


def test_a_feature_layer_spec_that_matches_nothing_names_the_argument_and_the_closest():
    with pytest.raises(ValueError, match=r"^reference_layers: layer 'block\.\*' matched none of "
                                         r"the 2 layers of the reference's features; closest "
                                         r"names: \['blocks\.1', 'blocks\.0'\]"):
        _cb(_features(), reference_layers="block.*")
    with pytest.raises(ValueError, match=r"'re:blocks' matched none of the 2 layers of "
                                         r"reference\['dino'\]'s features \(a 're:' regex must "
                                         r"match the whole name\)"):
        _cb({"dino": _features(), "self": "initial"}, reference_layers={"dino": "re:blocks"})
    with pytest.raises(ValueError, match=r"layer 'nope' matched none"):
        _cb(_features(), reference_layers=["blocks.0", "nope"])


# ------------------------------------------------------------------ 7. hints
def test_a_pt_lightning_checkpoint_without_reference_class_asks_for_it(tmp_path):
    with pytest.raises(ValueError, match=r"holds a Lightning checkpoint .*pass reference_class="):
        _cb(_lightning_checkpoint(tmp_path / "ref.pt"))


def test_a_dataset_probe_is_told_to_be_wrapped_in_a_dataloader():
    dataset = TensorDataset(make_probe(N))
    with pytest.raises(TypeError, match=r"TensorDataset; wrap a Dataset in "
                                        r"DataLoader\(dataset, batch_size=\.\.\.\)"):
        quiet_callback(dataset, ["linear_cka"], K)


def test_references_keyed_by_integers_take_per_name_settings_by_those_integers():
    """Reference names are the mapping's keys as strings; a per-name setting keyed by the same
    integers was refused as "the keys ['0'] are not reference names ['0', '1']"."""
    features = {"f": torch.randn(N, 5), "g": torch.randn(N, 4)}
    cb = _cb({0: features, 1: dict(features)}, reference_layers={0: "f"})
    assert [(ref.name, ref.layers) for ref in cb.references] == [("0", ["f"]),
                                                                 ("1", ["f", "g"])]
    with pytest.raises(ValueError, match=r"the keys \['2'\] are not reference names"):
        _cb({0: features, 1: dict(features)}, reference_layers={2: "f"})


def test_too_few_permutations_are_said_once_by_a_callback_of_several_references():
    """The callback builds an engine to check its options and one per reference: each warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_callback(_probe(), ["linear_cka"], 10, reference={"a": RefMLP(seed=1),
                                                               "b": RefMLP(seed=2)})
    few = [w for w in caught if "is too few" in str(w.message)]
    # once, pointing at the line that made the callback (in quiet_callback)
    assert [Path(w.filename).name for w in few] == ["helpers.py"]


def test_a_reference_model_that_takes_other_inputs_points_at_reference_inputs(tmp_path):
    """A live reference fed the model's probe (latents where it takes images) failed with the
    forward's error only: the message now names reference_inputs / reference_batch_transform,
    and with reference_inputs the same reference runs."""
    probe = make_probe()
    images = torch.randn(probe.shape[0], 5, generator=torch.Generator().manual_seed(3))
    wide = RefMLP(in_dim=5)
    cb = quiet_callback(probe, ["linear_cka"], K, reference=wide)
    with pytest.raises(RuntimeError, match=r"failed on probe batch 0 .*pass them as "
                                           r"reference_inputs= .* reference_batch_transform="):
        pl.Trainer(max_epochs=1, logger=False, callbacks=[cb], enable_checkpointing=False,
                   default_root_dir=tmp_path, **FAST_TRAINER).fit(MLP(), train_loader())
    cb = quiet_callback(probe, ["linear_cka"], K, reference=wide, reference_inputs=images)
    pl.Trainer(max_epochs=1, logger=False, callbacks=[cb], enable_checkpointing=False,
               default_root_dir=tmp_path, **FAST_TRAINER).fit(MLP(), train_loader())
    assert len(cb.history) == 2
