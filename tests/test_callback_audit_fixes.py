"""Regression tests for bugs an audit of the callback and the hooks found.

* background mode: model state that cannot be copied, appearing after the first step, and a
  failing first capture, never crash training (``on_error="warn"``);
* ``reference="previous"`` without a baseline next to ``AlignmentPlateau``;
* a resumed run re-anchors ``"initial"`` / ``"previous"`` at the resumed weights (with the
  documented warning for ``"initial"``);
* a callable probe that seeds or draws does not change training;
* a layer returning a dataclass is recorded; one returning no tensor is a configuration error;
* a real child called ``module`` is not mistaken for a DDP wrapper;
* step mode: a monitor finds the baseline's key at an epoch end before the first step;
* argument checks at construction.
"""

from __future__ import annotations

import copy
import threading
import types
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from alignment_callback import AlignmentCallback, AlignmentPlateau
from alignment_callback.hooks import ActivationRecorder, collect_activations, resolve_layers
from alignment_callback.hooks.outputs import LayerOutputError, select_output
from tests.helpers import FAST_TRAINER, MLP, RefMLP, make_probe, quiet_callback, train_loader

PROBE = make_probe(48)
KEY = "alignment/linear_cka/calibrated"


def callback(**kw) -> AlignmentCallback:
    return quiet_callback(PROBE, ["linear_cka"], 9, **kw)


def fit(callbacks, model=None, max_epochs=2, ckpt_path=None, **trainer_kw) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, callbacks=callbacks,
                         enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                         **FAST_TRAINER, **trainer_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model or MLP(), train_loader(), ckpt_path=ckpt_path)
    return trainer


def raws(cb: AlignmentCallback) -> list[float]:
    return [h["alignment/linear_cka/raw"] for h in cb.history]


# ------------------------------------------------------------------ background: model copy
class LateStateMLP(MLP):
    """Gets, after the first epoch, public attributes no copy can take every step: a lock and
    an object that reaches the trainer."""

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.lock = threading.Lock()
            self.loop = self.trainer.fit_loop


def test_background_survives_uncopyable_state_that_appears_after_the_first_step():
    """A public lock appears after the first step: its copy fails, the capture moves to the
    loop with a warning, and no step is lost or changed."""
    fg, bg = callback(), callback(background=True, on_error="warn")
    fit([fg], model=LateStateMLP(), max_epochs=3)
    with pytest.warns(RuntimeWarning, match="cannot be copied any more"):
        fit([bg], model=LateStateMLP(), max_epochs=3)
    assert [h["epoch"] for h in bg.history] == [0, 1, 2, 3]
    assert raws(bg) == raws(fg)


def test_the_state_copied_at_every_step():
    """Plain values (numbers, strings, enums, small tensors and containers of them), public or
    private, and every other public attribute (deep-copied; one that cannot be copied moves
    the capture to the loop, next test); not private objects."""
    import enum

    from alignment_callback.callback.background import _plain_state

    class Stage(enum.Enum):
        WARMUP, MAIN = 1, 2

    model = MLP()
    model.stage, model.name, model._gain, model._phase = 2, "warmup", 0.5, Stage.MAIN
    model.schedule = {"lr": [0.1, 0.01], "steps": (10, 20)}
    model.temperature = torch.tensor(2.0)
    model.tags, model.config = {"a", "b"}, types.SimpleNamespace(mode="fast")
    model._lock = threading.Lock()
    model._mixed = [1.0, threading.Lock()]
    state = _plain_state(model)[0]
    assert {"stage", "name", "_gain", "_phase", "schedule", "temperature", "tags",
            "config"} <= set(state)
    assert not {"_lock", "_mixed"} & set(state)


def test_an_enum_stage_flag_is_seen_by_the_background_copy():
    """A forward branching on an Enum attribute switched during training: the background copy
    follows it (values equal the foreground ones)."""
    import enum

    class Stage(enum.Enum):
        WARMUP, MAIN = 1, 2

    class Staged(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.stage = Stage.WARMUP

        def forward(self, x):
            h = self.drop(self.act1(self.fc1(x)))
            if self.stage is Stage.MAIN:
                h = -h
            return self.head(self.act2(self.fc2(h)))

        def on_train_epoch_start(self) -> None:
            if self.current_epoch >= 1:
                self.stage = Stage.MAIN

    histories = []
    for background in (False, True):
        cb = callback(background=background)
        fit([cb], model=Staged(), max_epochs=3)
        histories.append([h["alignment/linear_cka/raw"] for h in cb.history])
    assert histories[0] == histories[1]
    assert len(set(histories[0])) > 1  # the switch changes the values


def test_a_snapshot_that_fails_later_moves_the_capture_to_the_loop(monkeypatch):
    from alignment_callback.callback.background import ModelCopy

    snapshot = ModelCopy.snapshot
    calls = []

    def failing(model):
        calls.append(1)
        if len(calls) > 1:  # the first one makes the worker's copy
            raise TypeError("cannot pickle 'SummaryWriter' object")
        return snapshot(model)

    monkeypatch.setattr(ModelCopy, "snapshot", staticmethod(failing))
    fg, bg = callback(), callback(background=True)
    fit([fg], max_epochs=3)
    with pytest.warns(RuntimeWarning, match="state cannot be copied any more"):
        fit([bg], max_epochs=3)
    assert [h["epoch"] for h in bg.history] == [0, 1, 2, 3]
    assert raws(bg) == raws(fg)


class FlakyMLP(MLP):
    """Its probe pass runs out of memory in the first epoch only, at the baseline and at the
    first epoch's step (a transient failure; another failure there, after training batches and
    before any probe pass succeeded, would be a configuration mistake: ProbeInputError)."""

    def forward(self, x):
        if not self.training and self.current_epoch == 0:
            raise MemoryError("transient failure in the probe pass")
        return super().forward(x)


def test_background_first_capture_failure_warns_and_training_goes_on():
    cb = callback(background=True, on_error="warn")
    with pytest.warns(RuntimeWarning, match="epoch 0 .* skipped: MemoryError: .*transient"):
        fit([cb], model=FlakyMLP(), max_epochs=3)
    assert [h["epoch"] for h in cb.history] == [2, 3]


# ------------------------------------------------------------ "previous" and the plateau
@pytest.mark.parametrize("several", [False, True], ids=["previous", "several"])
def test_plateau_on_previous_without_baseline(several):
    if several:
        cb = callback(reference={"a": RefMLP(), "p": "previous"}, baseline=False)
        monitor = "alignment/p/linear_cka/calibrated"
    else:
        cb = callback(reference="previous", baseline=False)
        monitor = KEY
    plateau = AlignmentPlateau(monitor, patience=5, on_plateau=lambda t, m: None)
    fit([cb, plateau], max_epochs=3)
    assert plateau._seen and plateau.best is not None
    assert [h["epoch"] for h in cb.history if monitor in h] == [2, 3]
    assert cb.has_result(cb.history[-1], monitor)
    assert not cb.has_result({"epoch": 1, "step": 4, "alignment/epoch": 1.0}, monitor)


# --------------------------------------------------------------------------------- resume
def test_resume_anchors_initial_and_previous_at_the_resumed_weights(tmp_path):
    def drift():
        return callback(reference={"init": "initial", "prev": "previous"}, layers=["fc2"])

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    fit([drift(), ckpt], model=MLP(lr=0.5), max_epochs=2, enable_checkpointing=True)
    path = tmp_path / "epoch=0-step=4.ckpt"
    resumed = drift()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit([resumed], model=MLP(lr=0.5), max_epochs=3, ckpt_path=str(path))
    messages = [str(w.message) for w in seen]
    assert any("reference='initial' on a resumed run" in m for m in messages), messages
    # written at the last alignment step: "previous" continues exactly, without a warning
    assert not any("reference='previous' on a resumed run" in m for m in messages), messages
    first = next(h for h in resumed.history if h["epoch"] == 2)
    init = first["alignment/init/linear_cka/layer/fc2/raw"]
    prev = first["alignment/prev/linear_cka/layer/fc2/raw"]
    assert init == prev < 1.0 - 1e-6  # both against the checkpoint's model, not itself


# ---------------------------------------------------------------------------------- RNG
def test_a_callable_probe_that_seeds_does_not_change_training():
    def probe():
        torch.manual_seed(0)
        return [torch.randn(48, 8)]

    def run(callbacks):
        model = MLP(dropout=0.3)
        fit(callbacks, model=model)
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    plain, with_cb = run([]), run([callback(probe=probe)])
    assert all(torch.equal(a, b) for a, b in zip(plain[0], with_cb[0]))
    assert torch.equal(plain[1], with_cb[1])


# ------------------------------------------------------------------------------- outputs
@dataclass
class Out:
    logits: Tensor
    hidden: Tensor


@dataclass
class Hidden:
    aux: Tensor
    last_hidden_state: Tensor


@dataclass
class NoTensor:
    note: str


def test_select_output_reads_dataclasses_like_dicts():
    t = torch.randn(3, 4)
    assert select_output(Out(t, 2 * t)) is t  # the first tensor field
    out = Hidden(t, 2 * t)
    assert select_output(out) is out.last_hidden_state
    assert select_output(Out(t, 2 * t), output_key=1).equal(2 * t)
    assert select_output(Out(t, 2 * t), output_key="hidden").equal(2 * t)
    with pytest.raises(LayerOutputError, match="'blk'.*hook a submodule") as err:
        select_output(NoTensor("x"), layer="blk")
    assert isinstance(err.value, TypeError)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return Out(h.sum(1, keepdim=True), h)


class NothingToRecord(nn.Module):
    def forward(self, x):
        return NoTensor("no tensor")


class SideMLP(MLP):
    """The MLP plus a side module run in its forward (whose output it ignores)."""

    def forward(self, x):
        self.side(x)
        return super().forward(x)


def side_mlp(side: nn.Module) -> SideMLP:
    model = SideMLP()
    model.side = side
    return model


def test_a_layer_returning_a_dataclass_is_recorded():
    model = nn.Sequential(Encoder())
    with ActivationRecorder(model, "0", pool="none") as rec:
        model(PROBE)
    assert rec["0"].shape == (48, 1)  # the first tensor field, as for a dict
    cb = callback(layers=["side"], reference_layers=["fc2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no step skipped
        fit([cb], model=side_mlp(Encoder()), max_epochs=1)
    assert len(cb.history) == 2


def test_a_layer_with_nothing_to_record_fails_before_training():
    model = side_mlp(NothingToRecord())
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LayerOutputError, match="'side' returned a NoTensor"):
        fit([callback(layers=["side"], reference_layers=["fc2"], on_error="warn")], model=model)
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))


# --------------------------------------------------------------------------------- names
class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


class ChildCalledModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module, self.fc = Inner(), nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(self.module(x))


class Wrapper(nn.Module):
    """Looks like DDP: the real model is its only child, ``module``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, x):
        return self.module(x)


def test_a_real_child_called_module_is_not_a_wrapper():
    model = ChildCalledModule()
    assert resolve_layers(model, "fc") == ["fc"]
    assert resolve_layers(model, "module.fc") == ["module.fc"]
    x = torch.randn(10, 4)
    assert collect_activations(model, x, ["fc"])["fc"].shape == (10, 5)  # the top-level fc
    assert collect_activations(model, x, ["module.fc"])["module.fc"].shape == (10, 3)
    wrapped = Wrapper(model)  # the wrapper's prefix goes, the real child's stays
    assert resolve_layers(wrapped, ["fc", "module.module.fc"]) == ["module.fc", "fc"]
    assert collect_activations(wrapped, x, ["fc"])["fc"].shape == (10, 5)


# ---------------------------------------------------------------------------- monitoring
def test_step_mode_baseline_is_seen_by_a_monitor_before_the_first_step(tmp_path):
    cb = callback(every_n_train_steps=20)  # 4 steps per epoch: no step before epoch 5
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor=KEY, mode="max", save_top_k=1)
    trainer = fit([cb, ckpt], max_epochs=2, enable_checkpointing=True)
    assert [h["step"] for h in cb.history] == [0]
    assert float(ckpt.best_model_score) == pytest.approx(cb.history[0][KEY])
    assert float(trainer.callback_metrics[KEY]) == pytest.approx(cb.history[0][KEY])


def test_step_mode_steps_replace_the_baseline_in_callback_metrics():
    cb = callback(every_n_train_steps=3)
    trainer = fit([cb], max_epochs=2)
    assert [h["step"] for h in cb.history] == [0, 3, 6]
    assert float(trainer.callback_metrics[KEY]) == pytest.approx(cb.history[-1][KEY])


# ---------------------------------------------------------------------- argument checks
def test_compute_device_is_checked_at_construction():
    with pytest.raises(ValueError, match="compute_device='cpux'"):
        callback(compute_device="cpux")
    with pytest.raises(TypeError, match="compute_device"):
        callback(compute_device=3)
    callback(compute_device="cpu")
    callback(compute_device=torch.device("cpu"))
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last (cuda:0 on a CPU machine)
    with pytest.raises(ValueError, match=rf"compute_device='{missing}': this machine has"):
        callback(compute_device=missing)
    with pytest.raises(ValueError, match="this machine has"):
        callback(compute_device=torch.device(missing))


def test_an_mps_model_computes_on_the_cpu_by_default():
    from alignment_callback.callback.alignment_callback import _compute_device

    assert _compute_device(None, torch.device("mps")) == torch.device("cpu")  # no float64
    assert _compute_device(None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert _compute_device("cpu", torch.device("mps")) == torch.device("cpu")


def test_the_cuda_memory_check_counts_torchs_unused_cache(monkeypatch):
    """After training steps torch's caching allocator holds most of the GPU: reusable by this
    process, but not free for the driver."""
    from alignment_callback.functional._memory import available_bytes

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 70 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * gib)
    assert available_bytes(torch.device("cuda", 0)) == (10 + 70 - 6) * gib


def test_a_layer_mapping_and_reference_layers_conflict():
    with pytest.raises(ValueError, match="reference_layers=\\['fc2'\\] conflicts"):
        callback(layers={"fc1": "fc1"}, reference_layers=["fc2"])


@pytest.mark.parametrize("name,value", [("background", "yes"), ("log_heatmaps", "no"),
                                        ("baseline", 1), ("report", None)])
def test_flags_must_be_bools(name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        callback(**{name: value})


def test_a_checkpoint_without_the_callback_starts_a_new_history_with_a_baseline(tmp_path):
    """Weights trained before (a checkpoint written without the callback): the callback has
    no history to go on from, so it takes its baseline at the resumed weights."""
    fit([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)], max_epochs=1,
        enable_checkpointing=True)
    (ckpt,) = tmp_path.glob("*.ckpt")
    cb = callback()
    fit([cb], max_epochs=3, ckpt_path=str(ckpt))
    assert [(h["epoch"], h["step"]) for h in cb.history] == [(1, 4), (2, 8), (3, 12)]


def test_background_with_a_forward_set_on_the_instance_stays_in_the_loop():
    """torch.compile (Lightning's from_compiled) sets the forward on the model instance, a
    function of the original module: a deepcopy keeps calling the original, in train mode and
    from the worker thread.  Such a model is refused as a copy: the probe runs in the loop."""
    calls: list[tuple[str, bool]] = []

    def instance_forward(model: MLP) -> MLP:
        original = model.forward

        def forward(x):
            calls.append((threading.current_thread().name, model.training))
            return original(x)

        model.forward = forward
        return model

    histories = []
    for background in (False, True):
        cb = callback(background=background)
        if background:
            with pytest.warns(RuntimeWarning, match="set on the instance"):
                fit([cb], model=instance_forward(MLP()))
        else:
            fit([cb], model=instance_forward(MLP()))
        histories.append(raws(cb))
    assert histories[0] == histories[1]
    assert all(name == threading.main_thread().name for name, _ in calls)


class FailsAtStep3(MLP):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_a_callback_reused_after_a_failed_fit_starts_afresh(background):
    """Lightning calls no teardown after an exception: the failed fit's "initial" anchor (and
    its model copy) stayed, and the next run compared against the failed run's weights."""
    reused = callback(reference="initial", every_n_train_steps=2, background=background)
    with pytest.raises(RuntimeError, match="boom"):
        fit([reused], model=FailsAtStep3(), max_epochs=1)
    second = MLP(seed=7)
    fresh = callback(reference="initial", every_n_train_steps=2, background=background)
    fit([fresh], model=copy.deepcopy(second), max_epochs=1)
    fit([reused], model=second, max_epochs=1)
    assert raws(reused) == raws(fresh)
    assert raws(fresh)[0] == pytest.approx(1.0)  # the baseline: the initial weights themselves


def test_a_new_run_of_the_same_callback_logs_its_layer_names_and_only_its_own_pairs(
        tmp_path, monkeypatch):
    """A second run (new trainer, new logger) of one callback object: its logger gets the layer
    index -> name map too, and its pairs table (kept for W&B) holds its own steps only."""
    from lightning.pytorch.loggers import CSVLogger

    from alignment_callback.callback import dispatch

    monkeypatch.setattr(dispatch, "keeps_tables", lambda loggers: True)  # as with W&B

    cb = callback(log_pairs=True)
    per_step = None  # pairs per step, from the first run
    for run in ("first", "second"):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_epochs=2, logger=CSVLogger(tmp_path, name=run), callbacks=[cb],
                             enable_checkpointing=False, **FAST_TRAINER)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer.fit(MLP(), train_loader())
        hparams = (tmp_path / run / "version_0" / "hparams.yaml").read_text()
        assert "alignment/layers/model" in hparams, run
        rows = [row for rows in cb._tables.values() for row in rows]
        per_step = per_step or len(rows) // 3
        assert len(cb.history) == 3 and len(rows) == 3 * per_step > 0, run  # steps 0, 1, 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_a_reference_in_another_dtype_gets_the_probe_in_its_dtype(dtype):
    """A float64 (or bfloat16) reference fed the float32 probe crashed with a bare dtype error
    at the first step; floating-point inputs are now cast to its parameters' dtype."""
    histories = {}
    for name, ref in (("float32", RefMLP()), ("other", RefMLP().to(dtype))):
        cb = callback(reference=ref, on_error="raise")
        fit([cb], max_epochs=1)
        histories[name] = raws(cb)
    tol = 1e-5 if dtype == torch.float64 else 0.05
    assert histories["other"] == pytest.approx(histories["float32"], abs=tol)


class SkipsInEval(MLP):
    """``fc2`` only runs in training mode."""

    def forward(self, x):
        h = self.drop(self.act1(self.fc1(x)))
        if self.training:
            h = self.fc2(h)
        return self.head(self.act2(h)) if h.shape[1] == self.head.in_features else h[:, :2]


def test_a_layer_that_never_runs_in_eval_mode_is_named_with_the_reason():
    cb = callback(layers=["fc1", "fc2"], on_error="raise")
    with pytest.raises(Exception, match=r"student model: .*\['fc2'\] never ran.*eval mode"):
        fit([cb], model=SkipsInEval(), max_epochs=1)


def test_fast_dev_run_writes_no_report(tmp_path, monkeypatch):
    """Lightning's dry run replaces the loggers by a DummyLogger (no directory): the report
    went to the current directory."""
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.chdir(tmp_path)
    cb = callback(report=True)
    trainer = pl.Trainer(fast_dev_run=True, logger=CSVLogger(tmp_path / "logs"), callbacks=[cb],
                         **FAST_TRAINER)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(MLP(), train_loader())
    assert cb.history and not list(tmp_path.rglob("alignment_report*"))


# ------------------------------------------------------- from an audit of the capture (14th)
class _Odd(nn.Module):
    """A layer whose output has no row per sample: ``kind`` "broadcast" returns (1, d) (a
    position embedding), "scalar" a 0-dim loss, "seq_first" (d, n, 1): its rows are the features."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, h: Tensor) -> Tensor:
        if self.kind == "broadcast":
            return h[:1]
        if self.kind == "scalar":
            return h.pow(2).mean()
        return h.T.unsqueeze(-1)  # (16, n, 1): rows are the 16 features


class _OddMLP(MLP):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.odd = _Odd(kind)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.fc1(x))
        self.odd(h)
        return self.head(self.act2(self.fc2(h)))


@pytest.mark.parametrize("kind,message", [
    ("broadcast", "different numbers of rows"),
    ("scalar", "returned a 0-dim tensor"),
    ("seq_first", "have 16 rows but the reference's have 48"),
])
def test_a_student_layer_without_a_row_per_sample_fails_before_training(kind, message):
    """Such a layer (a broadcast position embedding, a loss, a sequence-first output) is a
    property of the model and the layers chosen, as it is on the reference side, where it
    failed at setup; on the student it was warned about and skipped at every step under
    on_error="warn", and fit ended with an empty history."""
    layers = ["odd"] if kind == "seq_first" else ["fc1", "odd"]  # alone: no other layer's rows
    cb = quiet_callback(make_probe(48), ["linear_cka"], 19, layers=layers,
                        reference_layers=["fc1", "fc2"], on_error="warn")
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[cb], enable_checkpointing=False,
                         **FAST_TRAINER)
    with pytest.raises(ValueError, match=message):
        trainer.fit(_OddMLP(kind), train_loader())
    assert trainer.global_step == 0 and not cb.history


def test_a_layers_mapping_whose_values_are_patterns_is_refused_at_setup():
    """{model layer: "*"} passed setup (the glob matches every reference layer), then every step
    warned that the pair is not among the layers; values, like keys, must be layer names."""
    for value in ("*", "re:fc.*"):
        cb = quiet_callback(make_probe(48), ["linear_cka"], 19, layers={"fc1": value})
        trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[cb],
                             enable_checkpointing=False, **FAST_TRAINER)
        with pytest.raises(ValueError, match=r"its values \[.*\] resolve to the layers"):
            trainer.fit(MLP(), train_loader())
        assert not cb.history
