"""Regression tests for the callback's state and configuration checks an audit found wrong.

* features of more than two dimensions are pooled with ``reference_pool`` (they were flattened);
* a reference that shares modules or parameters with the trained model is refused at setup
  (it was frozen, and the student stopped training);
* a probe whose size is known only by running it (``drop_last``, an ``IterableDataset``, a
  callable, a dict in a ``.pt`` file) and the drift references get the row checks before
  training; feature layers of different row counts are refused;
* a run resumed with other settings does not continue curves those settings change, and one
  that adds a measure keeps the others' history;
* the W&B pair tables and the probe size survive a resume;
* a ``.pt`` file holding a tuple is one ``(inputs, labels)`` batch, and a NumPy probe is a
  tensor.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from alignment_callback import AlignmentCallback
from alignment_callback.callback import dispatch
from tests.helpers import FAST_TRAINER, MLP, RefMLP, make_probe, quiet_callback, train_loader
from tests.numpy_reference import linear_cka

N = 48
PROBE = make_probe(N)
RAW = "alignment/linear_cka/raw"


def callback(**kw) -> AlignmentCallback:
    kw.setdefault("layers", ["fc1"])
    return quiet_callback(PROBE, ["linear_cka"], 19, **kw)


def fit(callbacks, model=None, max_epochs=2, ckpt_path=None, **trainer_kw) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer_kw.setdefault("logger", False)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks,
                         enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                         **FAST_TRAINER, **trainer_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
        trainer.fit(model or MLP(), train_loader(), ckpt_path=ckpt_path)
    return trainer


def unit_rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def student_fc1(probe=PROBE) -> np.ndarray:
    """The untrained MLP's ``fc1`` activations (the baseline's)."""
    with torch.no_grad():
        return MLP().fc1(probe).numpy()


class TrainSteps(MLP):
    """Counts its training steps: a configuration error must come before the first."""

    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def fails_before_training(cb: AlignmentCallback, match: str) -> None:
    TrainSteps.steps = 0
    with pytest.raises(ValueError, match=match):
        fit([cb], model=TrainSteps())
    assert TrainSteps.steps == 0


# ------------------------------------------------------------------------- 3-D features
class Tokens(nn.Module):
    """(n, 8) -> (n, 6 tokens, 5)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            self.proj = nn.Linear(8, 30)

    def forward(self, x):
        return self.proj(x).reshape(len(x), 6, 5)


class TokenReference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = Tokens()

    def forward(self, x):
        return self.tokens(x)


@pytest.mark.parametrize("pool", [None, "mean", "cls"])
def test_3d_features_are_pooled_like_a_model_reference(pool):
    """The same (n, T, d) tensor scores the same as features as from a model reference, and
    as linear CKA of the pooled tensor computed from its definition."""
    reference = TokenReference()
    with torch.no_grad():
        features = reference.tokens(PROBE)
    as_model = callback(reference=reference, reference_layers="tokens", reference_pool=pool)
    as_features = callback(reference={"tokens": features}, reference_pool=pool)
    fit([as_model], max_epochs=1)
    fit([as_features], max_epochs=1)
    pooled = features[:, 0] if pool == "cls" else features.mean(1)
    expected = linear_cka(unit_rows(student_fc1()), unit_rows(pooled))
    assert as_features.history[0][RAW] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert as_features.history[0][RAW] == pytest.approx(as_model.history[0][RAW], rel=1e-6)


def test_3d_features_left_out_of_a_per_name_reference_pool_take_pool():
    """A name left out of a per-name reference_pool takes the callback's pool (it was an
    error, while a name left out of reference_layers took layers); without any pool to fall
    back to, 3-D features still need one."""
    from alignment_callback.callback.reference import resolve_references

    features = {"t": torch.randn(N, 3, 4)}
    cb = callback(reference={"a": features, "b": RefMLP()}, reference_layers={"b": "fc1"},
                  reference_pool={"b": "mean"}, pool="cls")
    assert [ref.pool for ref in cb.references] == ["cls", "mean"]
    with pytest.raises(ValueError, match=r"reference_pool\['a'\]: no pool given"):
        resolve_references({"a": features, "b": RefMLP()}, lambda pairs: None,
                           layers=["fc1"], reference_pool={"b": "mean"})


def test_feature_layers_with_different_rows_are_refused():
    with pytest.raises(ValueError, match=r"different numbers of rows \{'a': 48, 'b': 47\}"):
        callback(reference={"a": torch.randn(N, 5), "b": torch.randn(N - 1, 5)})


# ------------------------------------------------------------------ shared reference
@pytest.mark.parametrize("shared", ["whole", "part"])
def test_a_reference_sharing_the_models_modules_is_refused(shared):
    model = MLP()
    reference = model if shared == "whole" else nn.Sequential(model.fc1, nn.Tanh())
    layer = "fc1" if shared == "whole" else "0"
    cb = callback(reference=reference, reference_layers=layer)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen when built
    with pytest.raises(ValueError, match="shares parameters the model in training trains.*"
                                         "reference='initial'.*deepcopy"):
        fit([cb], model=model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_a_frozen_teacher_kept_on_the_model_is_a_reference_used_as_it_is():
    """The REPA layout: the target encoder lives on the module (for the loss), frozen.  Sharing
    only frozen parameters is fine (this was refused); the teacher is not put in eval mode or
    otherwise changed, and the student trains."""

    class WithTeacher(MLP):
        def __init__(self):
            super().__init__()
            self.teacher = RefMLP(seed=1).requires_grad_(False)

    import copy

    model = WithTeacher()
    before = model.fc1.weight.detach().clone()
    copied = callback(reference=copy.deepcopy(model.teacher), reference_layers="fc1")
    fit([copied], model=copy.deepcopy(model))
    cb = callback(reference=model.teacher, reference_layers="fc1")
    fit([cb], model=model)
    assert not torch.equal(before, model.fc1.weight) and len(cb.history) >= 2
    assert model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert [h[RAW] for h in cb.history] == [h[RAW] for h in copied.history]  # as a copy


def test_a_copied_reference_is_frozen_and_the_student_trains():
    import copy

    model = MLP()
    before = model.fc1.weight.detach().clone()
    cb = callback(reference=copy.deepcopy(model), reference_layers="fc1")
    fit([cb], model=model)
    assert not torch.equal(before, model.fc1.weight)
    assert not any(p.requires_grad for p in cb.reference.parameters())


# ------------------------------------------------------------- row checks before training
class Stream(IterableDataset):
    def __init__(self, x) -> None:
        self.x = x

    def __iter__(self):
        return iter(self.x)


def test_drop_last_probe_against_features_of_every_row():
    probe = DataLoader(TensorDataset(PROBE), batch_size=20, drop_last=True)  # 40 of 48 rows
    fails_before_training(callback(probe=probe, reference={"r": torch.randn(N, 5)}),
                          "have 48 rows but the probe has 40")


def test_drop_last_probe_against_reference_inputs():
    probe = DataLoader(TensorDataset(PROBE), batch_size=20, drop_last=True)
    fails_before_training(callback(probe=probe, reference_layers="fc1", reference_inputs=PROBE),
                          "reference_inputs give 48 rows but the probe has 40")


def test_streamed_probe_too_small_for_k_with_a_drift_reference():
    probe = DataLoader(Stream(PROBE[:8]), batch_size=4)
    fails_before_training(callback(probe=probe, reference="initial",
                                   measures={"mutual_knn": {"k": 10}}),
                          r"the probe has 8 samples, too few: mutual_knn \(k=10\)")


def test_probe_file_with_a_dict_batch_is_counted(tmp_path):
    path = tmp_path / "probe.pt"
    torch.save({"x": PROBE}, path)
    fails_before_training(callback(probe=str(path), input_key="x",
                                   reference={"r": torch.randn(N + 1, 5)}),
                          "have 49 rows but the probe has 48")


@pytest.mark.parametrize("reference", ["initial", "previous", "features"])
def test_shuffling_loader_from_a_callable_is_refused_for_every_reference(reference):
    def shuffled():
        return DataLoader(TensorDataset(PROBE), batch_size=16, shuffle=True)

    ref = {"r": torch.randn(N, 5)} if reference == "features" else reference
    fails_before_training(callback(probe=shuffled, reference=ref), "shuffles")


def test_counting_a_streamed_probe_does_not_change_training():
    probe = DataLoader(Stream(PROBE), batch_size=16)
    with_cb, without = MLP(), MLP()
    fit([callback(probe=probe, reference="initial")], model=with_cb)
    state_with = torch.get_rng_state()
    fit([], model=without)
    assert torch.equal(state_with, torch.get_rng_state())
    for (name, a), b in zip(with_cb.named_parameters(), without.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------- resume: settings
def first_run(tmp_path, **kw) -> tuple[AlignmentCallback, str]:
    """Two epochs (steps 0, 4, 8) with a checkpoint at the end; returns the callback and it."""
    cb = callback(**kw)
    fit([cb, ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)],
        enable_checkpointing=True)
    return cb, str(tmp_path / "epoch=1-step=8.ckpt")


def resume(ckpt: str, max_epochs: int = 3, **kw) -> tuple[AlignmentCallback, list[str]]:
    cb = callback(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([cb], max_epochs=max_epochs, ckpt_path=ckpt)
    return cb, [str(w.message) for w in caught if "other settings" in str(w.message)]


def test_resume_with_another_seed_and_k_starts_new_curves(tmp_path):
    _, ckpt = first_run(tmp_path)
    cb, said = resume(ckpt, seed=5, num_permutations=29)
    assert len(said) == 1 and "num_permutations 19 → 29" in said[0] and "seed 0 → 5" in said[0]
    assert [h["step"] for h in cb.history] == [8, 12]  # a baseline at the resume, then on
    fresh, said = resume(ckpt)  # the same settings: the history goes on
    assert not said and [h["step"] for h in fresh.history] == [0, 4, 8, 12]


def test_resume_with_other_layers_starts_new_curves(tmp_path):
    _, ckpt = first_run(tmp_path)
    cb, said = resume(ckpt, layers=["fc2"])
    assert len(said) == 1 and "layers ['fc1'] → ['fc2']" in said[0]
    assert [h["step"] for h in cb.history] == [8, 12]


def test_resume_adding_a_measure_keeps_the_others_history(tmp_path):
    old, ckpt = first_run(tmp_path)
    cb, said = resume(ckpt, measures=["linear_cka", "mutual_knn"])
    assert len(said) == 1 and "measure 'mutual_knn' added" in said[0]
    assert [h["step"] for h in cb.history] == [0, 4, 8, 12]
    assert [h[RAW] for h in cb.history[:3]] == [h[RAW] for h in old.history]
    assert [h["step"] for h in cb.history if "alignment/mutual_knn/raw" in h] == [12]


def test_resume_with_a_changed_measure_option_drops_only_that_curve(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "keeps_tables", lambda loggers: True)  # as with W&B
    measures = {"linear_cka": {}, "mutual_knn": {"k": 5}}
    old, ckpt = first_run(tmp_path, measures=measures)
    cb, said = resume(ckpt, measures={"linear_cka": {}, "mutual_knn": {"k": 7}})
    assert len(said) == 1 and "measure 'mutual_knn'" in said[0]
    assert [h[RAW] for h in cb.history[:3]] == [h[RAW] for h in old.history]
    assert [h["step"] for h in cb.history if "alignment/mutual_knn/raw" in h] == [12]
    assert "mutual_knn" in cb._tables and {r[1] for r in cb._tables["mutual_knn"]} == {12}


def _strip_to_old_format(ckpt: str) -> None:
    """The checkpoint as a version that saved no settings, tables or probe size wrote it."""
    state = torch.load(ckpt, weights_only=True)
    for value in state["callbacks"].values():
        for field in ("settings", "tables", "samples"):
            value.pop(field, None)
    torch.save(state, ckpt)


def test_an_old_checkpoint_without_settings_still_loads(tmp_path):
    old, ckpt = first_run(tmp_path)
    _strip_to_old_format(ckpt)
    cb, said = resume(ckpt)
    assert not said and [h["step"] for h in cb.history] == [0, 4, 8, 12]
    assert [h[RAW] for h in cb.history[:3]] == [h[RAW] for h in old.history]


def test_an_old_checkpoint_of_fewer_measures_is_found(tmp_path):
    """Its state is under a key that names its measures; adding one keeps the history."""
    old, ckpt = first_run(tmp_path)
    _strip_to_old_format(ckpt)
    cb, said = resume(ckpt, measures=["linear_cka", "mutual_knn"])
    assert len(said) == 1 and "measure 'mutual_knn' added" in said[0]
    assert [h[RAW] for h in cb.history[:3]] == [h[RAW] for h in old.history]


# --------------------------------------------------------------- resume: tables, probe size
def test_pair_tables_and_probe_size_survive_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "keeps_tables", lambda loggers: True)  # as with W&B
    tables = {}
    monkeypatch.setattr(dispatch, "log_table",
                        lambda loggers, key, columns, rows, step=None: tables.update({key: rows}))
    first = callback(every_n_epochs=2)
    fit([first, ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)],
        max_epochs=4, enable_checkpointing=True)
    assert sorted({row[0] for row in first._tables["linear_cka"]}) == [0, 2, 4]
    ckpt = str(tmp_path / "ck" / "epoch=3-step=16.ckpt")

    tables.clear()
    later = callback(every_n_epochs=2)
    fit([later], max_epochs=6, ckpt_path=ckpt)
    rows = tables["alignment/linear_cka/pairs"]
    assert sorted({row[0] for row in rows}) == [0, 2, 4, 6]
    assert [r for r in rows if r[0] < 6] == first._tables["linear_cka"]

    tables.clear()  # resumed at the end: no step in this fit, the table and report still come
    last = callback(every_n_epochs=2, report=True)
    fit([last], max_epochs=5, ckpt_path=ckpt, logger=CSVLogger(tmp_path, name="logs"))
    assert [h["epoch"] for h in last.history] == [0, 2, 4] and not last.last_results
    assert tables["alignment/linear_cka/pairs"] == first._tables["linear_cka"]
    assert last.report_paths is not None  # matplotlib is a test dependency
    with open(last.report_paths[0], encoding="utf-8") as f:
        assert f"n (probe samples): {N}" in f.read()


# --------------------------------------------------------------------------- probe forms
def test_a_probe_file_holding_a_tuple_is_one_batch(tmp_path):
    path = tmp_path / "probe.pt"
    torch.save((PROBE, torch.zeros(N, 2)), path)
    from_file, from_tensor = callback(probe=str(path)), callback()
    fit([from_file], max_epochs=1)
    fit([from_tensor], max_epochs=1)
    assert [h[RAW] for h in from_file.history] == [h[RAW] for h in from_tensor.history]
    assert from_file._samples == N


def test_a_numpy_probe_is_a_tensor():
    from_numpy, from_tensor = callback(probe=PROBE.numpy()), callback()
    fit([from_numpy], max_epochs=1)
    fit([from_tensor], max_epochs=1)
    assert [h[RAW] for h in from_numpy.history] == [h[RAW] for h in from_tensor.history]
    expected = linear_cka(unit_rows(student_fc1()), unit_rows(
        RefMLP().fc1(PROBE).detach().numpy()))
    assert from_numpy.history[0][RAW] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_probes_that_are_not_inputs_are_refused(tmp_path):
    with pytest.raises(TypeError, match="probe: a NumPy array of dtype <U1"):
        callback(probe=np.array(["a", "b"]))
    path = tmp_path / "probe.pt"
    torch.save(3, path)
    with pytest.raises(TypeError, match="probe: .*probe.pt' holds a int"):
        callback(probe=str(path))


def test_a_loader_of_whole_batches_is_counted_by_its_rows():
    """DataLoader(batch_size=None) over a dataset of batches: len(dataset) is the number of
    batches, not of rows (4 batches of 12 rows were "4 samples, too few" for mutual kNN)."""
    from alignment_callback.callback.reference import count_rows, probe_rows

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return PROBE[12 * i:12 * (i + 1)]

    loader = DataLoader(Batches(), batch_size=None)
    assert probe_rows(loader) is None and count_rows(loader) == N == 48
    cb = quiet_callback(loader, ["mutual_knn"], 19, layers=["fc1"], reference="initial")
    fit([cb], max_epochs=1)
    assert len(cb.history) == 2 and cb._samples == N


def test_a_tuple_probe_file_runs_in_batches_of_256_rows(tmp_path):
    """A (inputs, labels) file ran as one forward pass over every row (a GPU memory spike
    where the tensor file runs in batches)."""
    from alignment_callback.callback.probe import load_probe

    x = torch.randn(600, 4)
    torch.save((x, torch.arange(600)), tmp_path / "pair.pt")
    batches = load_probe(str(tmp_path / "pair.pt"))
    assert [tuple(b[0].shape) for b in batches] == [(256, 4), (256, 4), (88, 4)]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(600))
    torch.save((x, torch.arange(5)), tmp_path / "odd.pt")  # an entry of other length: whole
    odd = load_probe(str(tmp_path / "odd.pt"))
    assert len(odd) == 3 and all(torch.equal(b[1], torch.arange(5)) for b in odd)


def test_without_a_wandb_logger_no_pair_table_is_kept_or_checkpointed(tmp_path):
    """Every pair at every step was kept and written into every checkpoint for a table only
    W&B shows (about 76 MB for 24×24 layers, 3 measures and 1000 steps)."""
    cb = callback(every_n_epochs=1)
    fit([cb, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)], max_epochs=2,
        enable_checkpointing=True, logger=CSVLogger(tmp_path, name="logs"))
    assert cb._tables == {} and len(cb.history) == 3
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("AlignmentCallback")]
    assert saved["tables"] == {} and len(saved["history"]) == 3


def test_an_empty_layer_mapping_names_layers():
    """It said "pairs is empty ... or pairs=None", an argument the callback does not have."""
    with pytest.raises(ValueError, match="layers is an empty mapping"):
        callback(layers={})


def test_tuple_probe_files_of_common_layouts_run_in_row_batches(tmp_path):
    """(images, label strings), a scalar next to the inputs and (dict, labels) ran as one pass
    over every row: only tuples of tensors of one length were split."""
    from alignment_callback.callback.probe import load_probe

    x = torch.randn(600, 4)
    names = [f"class{i % 7}" for i in range(600)]
    for saved, inputs in (((x, names), lambda b: b[0]),
                          ((names, torch.arange(600)), lambda b: b[0]),  # (texts, labels)
                          ((x, torch.arange(600), torch.tensor(3.0)), lambda b: b[0]),
                          (({"pixels": x, "pos": torch.arange(4)[None]}, names),
                           lambda b: b[0]["pixels"])):
        torch.save(saved, tmp_path / "probe.pt")
        batches = load_probe(str(tmp_path / "probe.pt"))
        assert [len(inputs(b)) for b in batches] == [256, 256, 88]
        if isinstance(saved[0], list):
            assert sum((list(b[0]) for b in batches), []) == names
            continue
        assert torch.equal(torch.cat([inputs(b) for b in batches]), x)
        if isinstance(saved[1], list):
            assert sum((list(b[1]) for b in batches), []) == names
        if isinstance(saved[0], dict):  # a broadcast entry is repeated whole
            assert all(torch.equal(b[0]["pos"], saved[0]["pos"]) for b in batches)


def test_a_shared_frozen_reference_unfrozen_later_is_warned_about():
    """BackboneFinetuning freezes the backbone at setup and unfreezes it later: a reference
    taken from it passed the setup check and was then trained without a word."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(MLP().fc1, nn.Tanh())
            self.head = nn.Linear(self.backbone[0].out_features, 2)

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, _):
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    model = Net()
    cb = callback(reference=model.backbone, layers=["backbone.0"], reference_layers="0")
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    with pytest.warns(UserWarning, match="the model now trains parameters of this reference"):
        fit([finetuning, cb], model=model, max_epochs=3)
    assert len(cb.history) == 4


def test_a_layer_spelled_as_a_string_or_a_list_is_one_setting(tmp_path):
    """layers="fc1" and layers=["fc1"] mean the same layers: no "other settings" warning and
    the curves continue (they were restarted)."""
    old, ckpt = first_run(tmp_path, layers="fc1")
    cb, said = resume(ckpt, layers=["fc1"])
    assert not said and [h["step"] for h in cb.history] == [0, 4, 8, 12]


def test_token_features_are_moved_and_pooled_in_row_blocks(monkeypatch):
    """(n, T, d) features went whole to the compute device in float32 before pooling (a
    float16 file of 20 GB needed 40 GB on the GPU to keep 0.15 GB); now 256 rows at a time,
    with the same result."""
    from alignment_callback.callback import reference as reference_module

    feats = torch.randn(600, 5, 3, dtype=torch.float16)
    seen = []
    real = reference_module.pool_features

    def spy(x, pool, **kw):
        seen.append(x.shape[0])
        return real(x, pool, **kw)

    monkeypatch.setattr(reference_module, "pool_features", spy)
    out = reference_module.feature_dtype({"f": feats}, torch.device("cpu"), "mean")
    assert seen == [256, 256, 88]
    np.testing.assert_allclose(out["f"].numpy(), feats.double().mean(1).numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", ["texts", "dict_tuple"])
def test_rows_of_text_and_dict_batches_are_counted_before_training(kind, tmp_path):
    """A probe of text lists, or a (dict, labels) file, could not be counted: with a drift
    reference n <= k was only a warning at every step while training ran on."""
    if kind == "texts":
        probe = [[f"text {i}" for i in range(6)]]

        def transform(batch):  # a stand-in tokenizer: one feature row per text
            return torch.stack([PROBE[i] for i in range(len(batch))])
    else:
        torch.save(({"x": PROBE[:6]}, torch.arange(6)), tmp_path / "probe.pt")
        probe = str(tmp_path / "probe.pt")

        def transform(batch):
            return batch[0]["x"]
    cb = quiet_callback(probe, ["mutual_knn"], 19, layers=["fc1"], reference="initial",
                        batch_transform=transform)
    fails_before_training(cb, "the probe has 6 samples, too few: mutual_knn")


def test_a_run_resumed_at_its_end_still_writes_its_report(tmp_path, monkeypatch):
    """Lightning skips the training loop of a run resumed at its max_epochs, so on_train_end
    (and with it the charts, the pairs table and the report) never came."""
    monkeypatch.setattr(dispatch, "keeps_tables", lambda loggers: True)  # as with W&B
    tables = {}
    monkeypatch.setattr(dispatch, "log_table",
                        lambda loggers, key, columns, rows, step=None: tables.update({key: rows}))
    first = callback(every_n_epochs=2)
    fit([first, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)], max_epochs=2,
        enable_checkpointing=True)
    tables.clear()
    again = callback(every_n_epochs=2, report=True)
    fit([again], max_epochs=2, ckpt_path=str(tmp_path / "ck" / "last.ckpt"),
        logger=CSVLogger(tmp_path, name="logs"))
    assert [h["epoch"] for h in again.history] == [0, 2] and again.report_paths is not None
    assert tables["alignment/linear_cka/pairs"] == first._tables["linear_cka"]


def test_a_pattern_and_the_names_it_matches_are_one_setting(tmp_path):
    """layers="fc[1]" and layers=["fc1"] choose the same layer: the settings compare the
    layers chosen, not their spelling (a resume restarted every curve)."""
    old, ckpt = first_run(tmp_path, layers="fc[1]")
    cb, said = resume(ckpt, layers=["fc1"])
    assert not said and [h["step"] for h in cb.history] == [0, 4, 8, 12]
    assert [h[RAW] for h in cb.history[:3]] == [h[RAW] for h in old.history]


def test_settings_given_as_numpy_scalars_are_saved_as_python_numbers(tmp_path):
    """A NumPy float in ``preprocess`` was saved as it is: the checkpoint no longer loaded with
    ``weights_only=True`` (so a resume failed), and a NumPy integer was saved as its ``str``,
    another setting than the same Python number."""
    numpy = quiet_callback(make_probe(16), ["linear_cka"], 9, preprocess={
        "clamp_quantile": np.float64(0.95), "normalize": np.bool_(True)},
        measures={"mutual_knn": {"k": np.int64(5)}})
    plain = quiet_callback(make_probe(16), ["linear_cka"], 9, preprocess={
        "clamp_quantile": 0.95, "normalize": True}, measures={"mutual_knn": {"k": 5}})
    torch.save({"settings": numpy._settings()}, tmp_path / "settings.pt")
    loaded = torch.load(tmp_path / "settings.pt", weights_only=True)["settings"]
    assert loaded == plain._settings()

    def leaves(value):
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        if isinstance(value, list):
            return [leaf for v in value for leaf in leaves(v)]
        return [value]

    assert {type(v) for v in leaves(loaded)} <= {bool, int, float, str, type(None)}
