"""What training must not notice, in the cases a first review missed, and configuration
mistakes that must stop a fit before its first step.

* NumPy's and Python's global random streams are protected like torch's (a probe dataset may
  draw from them), and so is torch's when a feature-file reference checks the probe's
  fingerprint by iterating a DataLoader;
* background mode: a forward that draws random numbers in eval mode is detected at the first
  step and keeps the probe pass in the loop (its copy would draw from the loop's streams); a
  forward that reads the epoch or an unregistered tensor gets this step's values on the copy;
* a checkpoint written while an earlier background step runs waits for it (a resumed run
  cannot recompute it from the checkpoint's weights); the same callback object in a second,
  new fit starts a new history;
* configuration mistakes raise before training.
"""

from __future__ import annotations

import random
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset

from alignment_callback import AlignmentCallback
from alignment_callback.hooks.extract import extract_features
from alignment_callback.hooks import collect_activations
from tests.helpers import (
    FAST_TRAINER,
    MLP,
    RefMLP,
    make_probe,
    offline_alignment,
    quiet_callback,
    train_loader,
)

PROBE = make_probe(48)


def callback(**kw) -> AlignmentCallback:
    return quiet_callback(PROBE, ["linear_cka", "mutual_knn"], 19, **kw)


def fit(callbacks, model=None, max_epochs=2, ckpt_path=None, **trainer_kw):
    """A seeded fit; returns (trainer, model, the global random states after it)."""
    pl.seed_everything(0, verbose=False)
    model = model or MLP(dropout=0.3)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, callbacks=callbacks,
                         enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                         **FAST_TRAINER, **trainer_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, train_loader(), ckpt_path=ckpt_path)
    np_state = np.random.get_state()
    return trainer, model, (torch.get_rng_state(), np_state[1].copy(), np_state[2],
                            random.getstate())


def assert_same_training(a, b) -> None:
    (_, model_a, rng_a), (_, model_b, rng_b) = a, b
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.equal(rng_a[0], rng_b[0])
    assert np.array_equal(rng_a[1], rng_b[1]) and rng_a[2] == rng_b[2]
    assert rng_a[3] == rng_b[3]


def raws(cb: AlignmentCallback, key: str = "alignment/linear_cka/raw") -> list[float]:
    return [h[key] for h in cb.history]


# ------------------------------------------------------------------------- random streams
class DrawingDataset(Dataset):
    """Fixed rows, but every item draws from NumPy's and Python's global streams (an
    augmentation that happens to be off)."""

    def __len__(self) -> int:
        return len(PROBE)

    def __getitem__(self, i: int):
        np.random.rand()
        random.random()
        return (PROBE[i],)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_numpy_and_python_random_streams_are_unchanged(background):
    plain = fit([])
    probe = DataLoader(DrawingDataset(), batch_size=16)
    assert_same_training(plain, fit([callback(probe=probe, background=background)]))


def test_feature_file_reference_checks_the_fingerprint_without_drawing(tmp_path):
    probe = DataLoader(TensorDataset(PROBE), batch_size=16)
    path = tmp_path / "reference.pt"
    extract_features(RefMLP(), probe, ["fc1", "fc2"], path)
    plain = fit([])
    assert_same_training(plain, fit([callback(reference=str(path), probe=probe)]))


# -------------------------------------------------------------------------- background copy
class NoisyMLP(MLP):
    """Draws noise in eval mode too (sampling, noise injection)."""

    def forward(self, x):
        return super().forward(x + 0.01 * torch.randn_like(x))


def test_background_random_forward_stays_in_the_loop():
    plain = fit([], model=NoisyMLP(dropout=0.3))
    fg = callback()
    foreground = fit([fg], model=NoisyMLP(dropout=0.3))
    bg = callback(background=True)
    with pytest.warns(RuntimeWarning, match="draws random numbers in eval mode"):
        background = fit([bg], model=NoisyMLP(dropout=0.3))
    assert_same_training(plain, foreground)
    assert_same_training(plain, background)
    assert raws(bg) == raws(fg) and len(raws(bg)) == 3


class Curriculum(MLP):
    """Reads the epoch (through the trainer), an annealed unregistered tensor and a private
    float in its forward."""

    def __init__(self):
        super().__init__()
        self.temperature = torch.tensor(1.0)
        self._gain = 1.0

    def on_train_epoch_end(self):
        self.temperature = self.temperature * 0.5
        self._gain += 0.25

    def forward(self, x):
        warmup = min(1.0, 0.25 * (1 + self.current_epoch))
        return super().forward(x * warmup * self._gain / self.temperature)


def test_background_copy_sees_the_epoch_and_plain_state():
    fg, bg = callback(layers=["fc1"]), callback(layers=["fc1"], background=True)
    fit([fg], model=Curriculum(), max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the copy is used
        fit([bg], model=Curriculum(), max_epochs=3)
    assert len(set(raws(fg))) == 4  # the state changes what the probe sees
    assert raws(bg) == raws(fg)


class Bank(MLP):
    """Reads a public (unregistered) tensor of 72,000 elements that training changes."""

    def __init__(self):
        super().__init__()
        self.bank = torch.zeros(9000, 8)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.bank = self.bank + 0.2 * batch[0].mean(0)

    def forward(self, x):
        return super().forward(x + self.bank[:1])


def test_background_copy_refreshes_a_large_public_tensor():
    """Public attributes are copied at every step, but a tensor over 65,536 elements was
    skipped: the copy kept the first step's bank and the values drifted from the foreground's
    without a warning."""
    fg, bg = callback(layers=["fc1"]), callback(layers=["fc1"], background=True)
    fit([fg], model=Bank())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the copy is used
        fit([bg], model=Bank())
    assert len(set(raws(fg))) == 3
    assert raws(bg) == raws(fg)


# ---------------------------------------------------------------------------------- resume
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_checkpoint_waits_for_an_earlier_background_step(tmp_path, monkeypatch):
    """Step mode, K every 3 steps, a checkpoint at step 4 while step 3 still runs: the
    checkpoint holds step 3, and the resumed run has every step once."""
    compute = AlignmentCallback._compute
    monkeypatch.setattr(AlignmentCallback, "_compute",
                        lambda self, *a, **k: (time.sleep(0.5), compute(self, *a, **k))[1])
    options = dict(measures=["linear_cka"], every_n_train_steps=3)
    first = callback(background=True, **options)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    fit([first, ckpt], max_epochs=1, enable_checkpointing=True)  # 4 steps: one checkpoint
    (path,) = tmp_path.glob("*.ckpt")
    state = [v for k, v in torch.load(path, weights_only=True)["callbacks"].items()
             if "AlignmentCallback" in k][0]
    assert [h["step"] for h in state["history"]] == [0, 3] and state["pending"] == []
    resumed = callback(background=True, **options)
    fit([resumed], max_epochs=3, ckpt_path=str(path))
    foreground = callback(**options)
    fit([foreground], max_epochs=3)
    assert [h["step"] for h in resumed.history] == [0, 3, 6, 9, 12]
    # the steps before the checkpoint are the uninterrupted run's (a resumed run's later
    # batches differ: its data order and dropout streams restart)
    assert raws(resumed)[:2] == raws(foreground)[:2]


class _Preempted(MLP):
    def training_step(self, batch, index):
        if self.global_step == 5:
            raise RuntimeError("preempted")
        return super().training_step(batch, index)


def test_a_checkpoint_on_an_exception_holds_the_background_steps_in_flight(tmp_path,
                                                                           monkeypatch):
    """Every 2 steps, training fails at step 5 while step 2 runs and step 4 waits: the
    exception dropped both, and OnExceptionCheckpoint (which runs after the callback) saved a
    history of [0] with nothing pending, so the resumed run never had steps 2 and 4."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    compute = AlignmentCallback._compute
    monkeypatch.setattr(AlignmentCallback, "_compute",
                        lambda self, *a, **k: (time.sleep(0.5), compute(self, *a, **k))[1])
    options = dict(measures=["linear_cka"], every_n_train_steps=2)
    first = callback(background=True, **options)
    with pytest.raises(RuntimeError, match="preempted"):
        fit([first, OnExceptionCheckpoint(dirpath=tmp_path, filename="failed")],
            model=_Preempted(dropout=0.3), enable_checkpointing=True)
    state = [v for k, v in torch.load(tmp_path / "failed.ckpt", weights_only=True)
             ["callbacks"].items() if "AlignmentCallback" in k][0]
    assert [h["step"] for h in state["history"]] == [0, 2, 4] and state["pending"] == []
    whole = callback(**options)
    fit([whole], model=MLP(dropout=0.3))
    assert raws(first) == raws(whole)[:3]


def test_a_second_fit_starts_a_new_history():
    cb = callback(measures=["linear_cka"])
    fit([cb], max_epochs=2)
    first = raws(cb)
    fit([cb], model=MLP(seed=5), max_epochs=3)
    fresh = callback(measures=["linear_cka"])
    fit([fresh], model=MLP(seed=5), max_epochs=3)
    assert [(h["epoch"], h["step"]) for h in cb.history] == [(0, 0), (1, 4), (2, 8), (3, 12)]
    assert raws(cb) == raws(fresh) and raws(cb)[1:3] != first[1:3]  # not the first fit's


# ---------------------------------------------------------------- configuration mistakes
def no_step_taken(make, match, exc=ValueError, model=None):
    """``make()`` builds the callback: fitting with it must raise before any training step."""
    model = model or MLP()
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(exc, match=match):
        fit([make()], model=model)
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))


def test_two_callbacks_with_one_log_prefix_are_refused_before_training():
    """Other measures give other checkpoint keys, so Lightning took them: both wrote one
    report file (the second overwrote the first) and logged ``alignment/seconds`` twice per
    step with different values."""
    model = MLP()
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"log_prefix='alignment': another AlignmentCallback "
                                         r"of this Trainer has it too"):
        fit([quiet_callback(PROBE, ["linear_cka"], 19),
             quiet_callback(PROBE, ["mutual_knn"], 19)], model=model)
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
    fit([quiet_callback(PROBE, ["linear_cka"], 19),
         quiet_callback(PROBE, ["mutual_knn"], 19, log_prefix="other")])


def test_drift_reference_with_too_few_probe_samples():
    no_step_taken(lambda: callback(reference="initial", probe=PROBE[:8], layers=["fc1"],
                                   measures={"mutual_knn": {"k": 10}}), "8 samples, too few")


def test_reference_inputs_with_other_rows_than_the_probe():
    no_step_taken(lambda: callback(reference_inputs=PROBE[:40]),
                  "reference_inputs give 40 rows but the probe has 48")


def test_a_layer_mapping_with_patterns():
    no_step_taken(lambda: callback(layers={"fc*": "fc1"}), "mapping pairs model layers")


def test_a_callable_probe_returning_a_shuffling_loader():
    no_step_taken(lambda: callback(probe=lambda: DataLoader(TensorDataset(PROBE), batch_size=16,
                                                            shuffle=True)),
                  "the DataLoader its callable returned.*shuffles")


def test_reference_layers_defaulting_to_layers_says_so():
    class Other(RefMLP):
        pass

    ref = Other()
    ref.fc2 = ref.fc1
    del ref.fc1
    no_step_taken(lambda: callback(reference=ref, layers=["fc1"]),
                  r"reference_layers \(not given, so it is layers\): layer 'fc1' matched none")


def test_a_mapping_value_that_matches_no_reference_layer_names_layers():
    """The reference layers of a ``layers`` mapping were reported as ``reference_layers``, an
    argument not given."""
    no_step_taken(lambda: callback(layers={"fc1": "nope"}),
                  r"^layers \(the mapping's values, the reference layers\): layer 'nope' "
                  r"matched none")


def test_constructor_checks_pool_and_probe_file(tmp_path):
    with pytest.raises(ValueError, match="pool: unknown pool 'avg'"):
        callback(pool="avg")
    with pytest.raises(ValueError, match="reference_pool: unknown pool 'avg'"):
        callback(reference_pool="avg")
    with pytest.raises(FileNotFoundError, match="probe: no such file"):
        callback(probe=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="reference_inputs: no such file"):
        callback(reference_inputs=str(tmp_path / "nope.pt"))


def test_feature_reference_refuses_reference_inputs():
    feats = {"r": torch.randn(len(PROBE), 4)}
    with pytest.raises(ValueError, match="is features, computed already: it takes no "
                                         "reference_inputs"):
        callback(reference=feats, reference_inputs=PROBE)


class CachingMLP(MLP):
    """Keeps its last output (with its graph while training) as a plain attribute."""

    def forward(self, x):
        out = super().forward(x)
        self.last_output = out
        return out


def test_background_copy_of_a_model_caching_its_output():
    fg, bg = callback(), callback(background=True)
    fit([fg], model=CachingMLP())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit([bg], model=CachingMLP())
    assert raws(bg) == raws(fg) and len(raws(bg)) == 3


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_true_precision_trainers_get_converted_probes(precision, background):
    """The probe is fed to the student as the trainer feeds its batches (here float64 or
    bfloat16 weights); the reference keeps its own dtype."""
    cb = callback(measures=["linear_cka"], background=background)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no step may be skipped
        fit([cb], precision=precision)
    assert len(cb.history) == 3 and all(np.isfinite(raws(cb)))


class CreatingMLP(MLP):
    """A forward that creates tensors (a scale, positions): in training they get the default
    dtype the precision plugin sets (float64 with "64-true", bfloat16 with "bf16-true")."""

    def forward(self, x):
        h = self.drop(self.act1(self.fc1(x))) * torch.tensor(0.1)
        h = h + torch.linspace(0, 1, h.shape[-1])
        return self.head(self.act2(self.fc2(h)))


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_the_probe_forward_creates_tensors_in_the_precision_s_dtype(precision):
    """The probe pass ran outside the plugin's forward context, so the tensors a forward
    creates were float32: under "bf16-true" the fit failed at its first step (blaming the
    probe), under "64-true" the activations were not training's; in background mode the
    worker's forward took whatever default dtype the training loop had set at that moment
    (background results differed from the foreground's, or the copy was given up with a
    wrong reason).  Now both equal the activations of a forward under the precision's
    default dtype, and each other."""
    dtype = torch.float64 if precision == "64-true" else torch.bfloat16
    probe = PROBE.to(dtype)
    fg, bg = (callback(probe=probe, measures=["linear_cka"], background=b)
              for b in (False, True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no step skipped, no copy given up
        _, model, _ = fit([fg], model=CreatingMLP(), precision=precision)
        fit([bg], model=CreatingMLP(), precision=precision)
    assert len(fg.history) == 3 and raws(bg) == raws(fg)
    reference, before = RefMLP(), torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        expected = offline_alignment(model, reference, probe, ["fc1", "fc2"], "linear_cka", 19,
                                     reference_probe=probe.float(), dtype=None)
    finally:
        torch.set_default_dtype(before)
    assert raws(fg)[-1] == pytest.approx(float(expected.raw), abs=1e-6)


class DtypeRecordingRows(Dataset):
    """The probe's rows, noting the default dtype each is built under (a transform such as
    ToTensor + Normalize builds rows in it)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.seen = rows, set()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.seen.add(torch.get_default_dtype())
        return self.rows[i] * torch.tensor(1.0)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_the_probe_s_rows_are_built_as_training_s_under_a_true_precision(precision):
    """Only the forward runs under the precision's default dtype: the probe DataLoader's rows
    were built under it too (bfloat16 rows from a float32 pipeline: 167 of 256 values
    differ), unlike training's, and unlike the reference's rows."""
    rows = DtypeRecordingRows(PROBE)
    cb = callback(probe=DataLoader(rows, batch_size=16), measures=["linear_cka"],
                  every_n_train_steps=2)
    fit([cb], model=CreatingMLP(), precision=precision, max_epochs=1)
    assert len(cb.history) >= 2 and rows.seen == {torch.float32}


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_a_float64_model_and_reference_are_compared_in_float64(background):
    """``precision="64-true"`` and a float64 reference: the activations were recorded in
    float32, so the logged values were float32 ones (on these discrete probe rows mutual kNN
    0.5683333278 for 0.5683333333, and the reference given as its own float64 features scored
    otherwise than the module).  They now equal the float64 calibration of the float64
    activations, and the features score as the module does."""
    probe = torch.randint(-2, 3, (48, PROBE.shape[1]),
                          generator=torch.Generator().manual_seed(5)).double()
    measures = ["linear_cka", "mutual_knn", "rsa"]
    ref = RefMLP().double()
    by_module = callback(probe=probe, measures=measures, reference=ref, background=background)
    _, model, _ = fit([by_module], precision="64-true", max_epochs=1)
    features = collect_activations(ref, probe, ["fc1", "fc2"], dtype=None)
    assert {v.dtype for v in features.values()} == {torch.float64}
    by_features = callback(probe=probe, measures=measures, reference=features)
    fit([by_features], precision="64-true", max_epochs=1)
    def timeless(history):
        return [{k: v for k, v in h.items() if not k.endswith("/seconds")} for h in history]

    assert timeless(by_features.history) == timeless(by_module.history)
    for name in measures:
        expected = offline_alignment(model, ref, probe, ["fc1", "fc2"], name, 19, dtype=None)
        for field in ("raw", "calibrated", "p_value", "threshold"):
            assert by_module.history[-1][f"alignment/{name}/{field}"] == float(
                getattr(expected, field)), (name, field)


class ReusedActivation(MLP):
    """One activation module applied twice per forward."""

    def forward(self, x):
        h = self.act1(self.fc1(x))
        return self.head(self.act1(self.fc2(h)))


def test_a_layer_that_runs_twice_fails_at_the_baseline():
    no_step_taken(lambda: callback(layers=["act1"], reference_layers=["act1"]),
                  "did not run exactly once", exc=RuntimeError, model=ReusedActivation())


# ------------------------------------------------------------------ found by a later review
def test_true_precision_with_a_dataloader_probe_keeps_training_unchanged():
    probe = DataLoader(TensorDataset(PROBE), batch_size=16)
    plain = fit([], precision="bf16-true")
    assert_same_training(plain, fit([callback(probe=probe)], precision="bf16-true"))


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_a_dict_batch_probe_file(tmp_path, background):
    """A ``.pt`` file holding one dict batch (a tokenizer's output, say)."""
    torch.save({"x": PROBE}, tmp_path / "probe.pt")
    cb = callback(probe=str(tmp_path / "probe.pt"), input_key="x", background=background,
                  measures=["linear_cka"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit([cb])
    reference = callback(measures=["linear_cka"])
    fit([reference])
    assert raws(cb) == raws(reference)


def test_dict_batch_rows_are_the_largest_leading_size():
    from alignment_callback.callback.reference import probe_rows

    batch = {"pos": torch.arange(5)[None], "x": torch.randn(48, 5)}
    assert probe_rows([batch, batch]) == 96


def test_reference_pool_mapping_that_leaves_out_a_drift_reference():
    cb = callback(reference={"teacher": RefMLP(), "start": "initial"},
                  reference_pool={"teacher": "mean"}, measures=["linear_cka"])
    fit([cb])
    assert len(cb.history) == 3
    # a name left out of the mapping takes pool, as a name left out of reference_layers takes
    # layers (it was an error: "reference_pool['teacher']: no pool given")
    cb = callback(reference={"teacher": RefMLP(), "start": "initial"},
                  reference_pool={"start": "mean"}, pool="flatten")
    assert {ref.name: ref.pool for ref in cb.references} == {"teacher": "flatten",
                                                             "start": "mean"}


class LoggingMLP(MLP):
    """A forward that logs and reads the rank and the epoch (all fine on a detached copy)."""

    def forward(self, x):
        self.log("forward_calls", 1.0)
        return super().forward(x * (1.0 + self.global_rank + 0.25 * self.current_epoch))


def test_background_copy_of_a_forward_that_logs():
    fg, bg = callback(), callback(background=True)
    fit([fg], model=LoggingMLP(), max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the copy is used, no fallback
        warnings.filterwarnings("ignore", ".*self.log.*", UserWarning)
        fit([bg], model=LoggingMLP(), max_epochs=3)
    assert raws(bg) == raws(fg) and len(set(raws(fg))) == 4


class Boom(MLP):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("boom")


def test_callback_pickles_after_a_failed_fit():
    """No reference to the trainer is left (teardown does not run after an exception)."""
    import pickle

    cb = callback(measures=["linear_cka"])
    with pytest.raises(RuntimeError, match="boom"):
        fit([cb], model=Boom())
    pickle.loads(pickle.dumps(cb))
