"""Probe forms and the reference's own inputs: a Dataset yielding samples is refused, a
callable probe is called seeded (one that draws gives the same rows at every step, as the
reference's were computed on, in the foreground and the background alike) and its result is
normalized like a probe given directly (one dict batch, NumPy batches), the reference's
``reference_batch_transform`` / ``reference_input_key`` apply to the probe too, and bad
arguments are refused before training, naming them."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from alignment_callback.callback.probe import iterate_probe, load_probe
from alignment_callback.hooks import LayerShapeError, collect_activations
from tests import numpy_reference as ref
from tests.helpers import FAST_TRAINER, MLP, RefMLP, make_probe, quiet_callback, train_loader

K = 19


def _fit(cb, max_epochs=2, model=None):
    pl.seed_everything(0, verbose=False)  # the same training in every run
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[cb], logger=False,
                         enable_checkpointing=False, **FAST_TRAINER)
    trainer.fit(model or MLP(), train_loader())
    return cb


def _raws(cb, key="alignment/linear_cka/raw"):
    return [h[key] for h in cb.history]


class _Samples(IterableDataset):
    def __iter__(self):
        return iter(make_probe(8))


def test_a_dataset_given_directly_is_refused_with_the_wrap_hint():
    """An IterableDataset is iterable, so it was taken as a list of batches: each sample a
    batch of its features (640 rows from 40 samples, a wrong value and no warning)."""
    for dataset in (_Samples(), TensorDataset(make_probe(8))):
        with pytest.raises(TypeError, match=r"wrap a Dataset in DataLoader\(dataset, "
                                            r"batch_size=\.\.\.\) \(it yields single samples"):
            load_probe(dataset)


def test_single_samples_fed_one_by_one_are_refused_and_flat_batches_still_work():
    """A list of per-sample 1-D tensors, or a DataLoader with batch_size=None over samples,
    fed each sample alone: its layer's 16 features became 16 rows (640 rows from 40 samples,
    raw 0.017 against 0.680) with no error.  A 1-D input is one value per sample, so every
    layer must give that many rows; token ids and scalars in 1-D batches still work."""
    x = make_probe(40)
    for probe in ([row for row in x], DataLoader(TensorDataset(x), batch_size=None)):
        with pytest.raises(LayerShapeError, match=r"probe batch 0: the model was fed a 1-D "
                           r"tensor of 8 values, .* rows \{'fc1': 16\}: is the probe a "
                           r"sequence of single samples"):
            collect_activations(RefMLP(), probe, ["fc1"])
        with pytest.raises(LayerShapeError, match="sequence of single samples"):
            _fit(quiet_callback(probe, ["linear_cka"], K, layers=["fc1"]), max_epochs=1)
    ids = torch.arange(12) % 5
    embed = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 2))
    acts = collect_activations(embed, ids, ["0", "1"], batch_size=5)
    assert {k: tuple(v.shape) for k, v in acts.items()} == {"0": (12, 3), "1": (12, 2)}
    scalars = torch.nn.Sequential(torch.nn.Unflatten(0, (-1, 1)), torch.nn.Linear(1, 4))
    assert tuple(collect_activations(scalars, torch.randn(7), ["1"])["1"].shape) == (7, 4)


class _Tokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.emb(input_ids)


def test_a_mask_key_the_batches_do_not_hold_is_refused():
    """``mask_key="mask"`` with a tokenizer's dict (``attention_mask``) pooled every token
    output over the padding too, with no word; the default key missing means no mask."""
    torch.manual_seed(0)
    model = _Tokens()
    ids = torch.randint(0, 10, (6, 5))
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2] * 3)
    batch = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match=r"mask_key='mask' is not a tensor entry of the probe's "
                                         r"batches \(they have \['attention_mask', 'input_ids'\]"):
        collect_activations(model, [batch], ["emb"], mask_key="mask")
    emb = model.emb.weight.detach().numpy()[ids.numpy()]  # (6, 5, 4)
    m = mask.numpy()[..., None]
    masked = collect_activations(model, [batch], ["emb"])["emb"].numpy()
    np.testing.assert_allclose(masked, (emb * m).sum(1) / m.sum(1), rtol=1e-6)
    plain = collect_activations(model, [batch], ["emb"], mask_key=None)["emb"].numpy()
    np.testing.assert_allclose(plain, emb.mean(1), rtol=1e-6)
    only_ids = collect_activations(model, [{"input_ids": ids}], ["emb"])["emb"].numpy()
    np.testing.assert_allclose(only_ids, emb.mean(1), rtol=1e-6)  # default key absent: no mask


def test_a_drawing_callable_probe_gives_the_same_rows_at_every_step_in_both_modes():
    """``lambda: [torch.randn(...)]`` drew other rows at every step from wherever training's
    random stream was, while the reference's rows were drawn once: the model's rows were
    other samples than the reference's (raw fell from 0.61 to 0.09), and the background,
    which calls the callable once, disagreed with the foreground."""
    def drawing():
        return [torch.randn(40, 8)]

    torch.manual_seed(0)
    fixed = torch.randn(40, 8)
    expected = _raws(_fit(quiet_callback(fixed, ["linear_cka"], K, layers=["fc1"])))
    for background in (False, True):
        cb = _fit(quiet_callback(drawing, ["linear_cka"], K, layers=["fc1"],
                                 background=background))
        assert _raws(cb) == expected, (background, _raws(cb), expected)
    assert len(set(expected)) == len(expected)  # training changes the model: real curves
    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert torch.equal(iterate_probe(drawing)[0], fixed)
    assert torch.equal(torch.get_rng_state(), state)  # the global state is put back


class _Noisy(torch.utils.data.Dataset):
    """A dataset that draws when read (noise augmentation)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((8,), float(i % 7)) + torch.randn(8)


@pytest.mark.parametrize("kind", ["generator", "drawing_dataset"])
def test_a_probe_that_draws_as_it_is_iterated_gives_the_same_rows_to_every_pass(kind):
    """A callable returning a generator (or a DataLoader whose dataset draws) draws as it is
    iterated, after the seeded call: the model and the reference read other rows (raw linear
    CKA of a model with its own copy 0.57, not 1) and the background, which reads the probe
    once, disagreed with the foreground.  Every probe pass now runs with the generators
    seeded."""
    import copy

    def probe():
        if kind == "generator":
            return (torch.randn(8, 8) for _ in range(5))
        return DataLoader(_Noisy(), batch_size=10)

    runs = []
    for background in (False, True):
        model = MLP()
        cb = _fit(quiet_callback(probe, ["linear_cka"], K, reference=copy.deepcopy(model),
                                 background=background), model=model)
        runs.append(_raws(cb))
    assert runs[0][0] == pytest.approx(1.0, abs=1e-6)  # the model is its reference at the start
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == len(runs[0])  # training changes the model: a real curve


def test_a_callable_probe_returning_one_dict_batch_or_numpy_batches():
    """One dict batch from a callable made the verbose (default) reference pass iterate the
    dict's keys; NumPy batches from a callable were refused ("cannot feed a ndarray batch")
    where the same list given directly works."""
    x = make_probe(40)
    expected = _raws(_fit(quiet_callback(x, ["linear_cka"], K, layers=["fc1"]), 1))
    dict_cb = quiet_callback(lambda: {"x": x}, ["linear_cka"], K, layers=["fc1"],
                             input_key="x", verbose=True)
    assert _raws(_fit(dict_cb, 1)) == expected
    numpy_cb = quiet_callback(lambda: [x[:25].numpy(), x[25:].numpy()], ["linear_cka"], K,
                              layers=["fc1"])
    assert _raws(_fit(numpy_cb, 1)) == expected


def test_the_reference_batch_transform_applies_to_the_probe_without_reference_inputs():
    """The reference's own transform of the probe's batches (its own normalization) was
    dropped unless reference_inputs was given: the model's transform ran for the reference.
    The baseline's raw score equals a float64 NumPy linear CKA of the two models' fc1 outputs
    on their own inputs."""
    x = make_probe(40)
    model, reference = MLP(), RefMLP()

    def own(batch):  # not affine: linear CKA of fc1's outputs would not tell it
        return torch.tanh(3.0 * batch)

    cb = quiet_callback(x, ["linear_cka"], K, layers=["fc1"], reference=reference,
                        reference_batch_transform=own, preprocess=False)
    with torch.no_grad():  # the baseline (step 0) sees the initial weights
        fx = model.fc1(x).double().numpy()
        fy = reference.fc1(own(x)).double().numpy()
    _fit(cb, 1, model)
    assert cb.history[0]["alignment/linear_cka/raw"] == pytest.approx(ref.linear_cka(fx, fy),
                                                                       rel=1e-5)
    with torch.no_grad():  # the model's own batches would give another value
        assert ref.linear_cka(fx, reference.fc1(x).double().numpy()) != pytest.approx(
            cb.history[0]["alignment/linear_cka/raw"], rel=1e-3)
    with pytest.raises(ValueError, match="compares the model with itself: it takes no "
                                         ".*reference_batch_transform"):
        quiet_callback(x, ["linear_cka"], K, reference="initial",
                       reference_batch_transform=own)


@pytest.mark.parametrize("kw,error,match", [
    ({"batch_transform": "abc"}, TypeError, "batch_transform must be a callable"),
    ({"reference_batch_transform": {"a": 3}}, TypeError,
     r"reference_batch_transform\['a'\] must be a callable"),
    ({"probe": lambda b: b}, TypeError, "probe: a callable probe is called with no arguments"),
    ({"probe": torch.tensor(3.0)}, ValueError, "probe: a 0-dimensional tensor has no rows"),
    ({"mask_key": 5}, TypeError, "mask_key must be a str"),
])
def test_bad_probe_arguments_are_refused_at_construction_naming_them(kw, error, match):
    with pytest.raises(error, match=match):
        quiet_callback(make_probe(8), ["linear_cka"], K, **kw)


def test_a_callable_probe_returning_no_batches_is_named():
    with pytest.raises(TypeError, match="probe: the callable probe must return batches"):
        iterate_probe(lambda: None)
    assert np.array_equal(iterate_probe(lambda: np.ones((3, 2), np.float32)).numpy(),
                          np.ones((3, 2), np.float32))


def test_settings_tell_two_partials_apart():
    """A pool or measure option given as functools.partial was recorded as 'partial', so a
    resume with other arguments of it kept the curves."""
    import functools

    from alignment_callback.callback.settings import describe

    def pool(x, q=0.5):
        return x

    a, b = functools.partial(pool, q=0.1), functools.partial(pool, q=0.9)
    assert describe(a) != describe(b)
    assert describe(a) == f"{pool.__qualname__}(q=0.1)"
    assert describe(functools.partial(pool, 3)) == f"{pool.__qualname__}(3)"
    assert describe({"pool": a}) == {"pool": describe(a)}


def test_setting_changes_name_the_unnamed_reference_once():
    """'reference the reference {...} → {...}' read twice."""
    from alignment_callback.callback.settings import setting_changes

    saved = {"references": {"": {"kind": "model"}, "b": 1}, "measures": {"m": 1}}
    current = {"references": {"": {"kind": "features"}, "c": 1}, "measures": {"m": 2}}
    assert setting_changes(saved, current) == [
        "reference 'c' added", "reference 'b' removed",
        "the reference {'kind': 'model'} → {'kind': 'features'}", "measure 'm' 1 → 2"]


class _TwoInputs(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"a": self.x[i], "b": -self.x[i] ** 3}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("case", ["batch_transform", "input_key", "reference_inputs",
                                  "reference_batch_transform", "mask_key"])
def test_a_resume_fed_otherwise_starts_new_curves(tmp_path, case):
    """What the model or the reference is fed changed between the checkpoint and the resume:
    the probe's hash is of the batches before ``batch_transform``, and none of these was
    compared, so the curves went on mixing two inputs.  They start anew, with the warning."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    x = make_probe(40)
    probe = torch.utils.data.DataLoader(_TwoInputs(x), batch_size=8) if case == "input_key" else x
    first, second = {
        "batch_transform": ({}, {"batch_transform": lambda b: b ** 3}),
        "input_key": ({"input_key": "a"}, {"input_key": "b"}),
        "reference_inputs": ({}, {"reference_inputs": -x ** 3}),
        "reference_batch_transform": ({}, {"reference_batch_transform": torch.tanh}),
        "mask_key": ({}, {"mask_key": None}),  # padded token outputs pooled otherwise
    }[case]
    cb = quiet_callback(probe, ["linear_cka"], K, layers=["fc2"], **first)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=2, callbacks=[cb, saver], logger=False, **FAST_TRAINER).fit(
        MLP(), train_loader())
    resumed = quiet_callback(probe, ["linear_cka"], K, layers=["fc2"], **second)
    with pytest.warns(UserWarning, match="resumes from a checkpoint written with other settings"):
        pl.Trainer(max_epochs=3, callbacks=[resumed], logger=False, enable_checkpointing=False,
                   **FAST_TRAINER).fit(MLP(), train_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [2, 3]  # a new curve, from a baseline
