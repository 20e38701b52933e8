"""A failed alignment step changes no later value, and a configuration mistake the first probe
pass shows fails before training.

* ``reference="initial"`` measures drift from the activations at the start of the fit: when
  the step there fails (its own preparation, its null, or another reference's step), or
  without a baseline, later steps still compare with those activations (before, the next
  step's activations became the start, which then scored 1.0 against itself);
* ``reference="previous"`` compares with the last step in the history: a step that failed on
  another reference does not move it, whatever order the references are listed in;
* a probe the model in training cannot take (it fails on the probe after running training
  batches, never having run on it), and a measure option its layer widths cannot take, are
  raised whatever ``on_error`` says (before, every step warned and the fit ended with an empty
  history); a failure before the first training batch (statistics initialized from the first
  batch) and one out of memory still follow ``on_error``.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from alignment_callback.callback import ProbeInputError
from alignment_callback.functional import MeasureOutputError, ShapeOptionError, get_measure
from tests.helpers import FAST_TRAINER, IN_DIM, MLP, RefMLP, make_probe, train_loader
from tests.test_callback_audit_fixes import PROBE, callback, fit


def _engine(cb, name=None):
    return next(ref.engine for ref in cb.references if ref.name == name)


def _fail(engine, method: str, epochs=None) -> None:
    """``engine.<method>`` raises ``MemoryError`` on its first call (``epochs``: on the calls
    of those epochs; ``step`` only)."""
    original, calls = getattr(engine, method), []

    def failing(*args, **kwargs):
        calls.append(1)
        due = len(calls) == 1 if epochs is None else kwargs.get("epoch") in epochs
        if due:
            raise MemoryError(f"injected into {method}")
        return original(*args, **kwargs)

    setattr(engine, method, failing)


def _values(cb, key: str) -> dict[int, float]:
    return {h["epoch"]: h[key] for h in cb.history if key in h}


# ------------------------------------------------------------------------------- "initial"
@pytest.mark.parametrize("where", ["set_reference", "step"])
def test_initial_measures_from_the_start_when_its_first_step_fails(where):
    key = "alignment/linear_cka/layer/fc2/raw"
    clean = callback(reference="initial", layers=["fc2"])
    fit([clean], model=MLP(lr=0.5), max_epochs=3)
    failed = callback(reference="initial", layers=["fc2"])
    _fail(_engine(failed), where)
    with pytest.warns(RuntimeWarning, match=f"epoch 0 .* skipped: MemoryError: injected into "
                                            f"{where}"):
        fit([failed], model=MLP(lr=0.5), max_epochs=3)
    assert [s["epoch"] for s in failed.skipped] == [0]
    assert _values(failed, key) == {e: v for e, v in _values(clean, key).items() if e > 0}
    assert _values(failed, key)[1] < 0.999  # not the first step against itself


def test_initial_listed_after_a_reference_that_fails_at_the_start():
    key = "alignment/init/linear_cka/layer/fc2/raw"
    refs = lambda: {"a": RefMLP(), "init": "initial"}  # noqa: E731
    clean = callback(reference=refs(), layers=["fc2"])
    fit([clean], model=MLP(lr=0.5), max_epochs=3)
    failed = callback(reference=refs(), layers=["fc2"])
    _fail(_engine(failed, "a"), "step", epochs={0})
    with pytest.warns(RuntimeWarning, match="epoch 0 .* skipped"):
        fit([failed], model=MLP(lr=0.5), max_epochs=3)
    assert _values(failed, key) == {e: v for e, v in _values(clean, key).items() if e > 0}


def test_initial_without_a_baseline_measures_from_the_start():
    key = "alignment/linear_cka/layer/fc2/raw"
    with_baseline = callback(reference="initial", layers=["fc2"])
    fit([with_baseline], model=MLP(lr=0.5), max_epochs=3)
    without = callback(reference="initial", layers=["fc2"], baseline=False)
    fit([without], model=MLP(lr=0.5), max_epochs=3)
    expected = {e: v for e, v in _values(with_baseline, key).items() if e > 0}
    assert _values(without, key) == expected and expected[1] < 0.999


class FailsOnce(MLP):
    """Its ``fail_at``-th eval-mode forward pass (a probe pass: the probe is one batch) raises
    ``error``."""

    def __init__(self, fail_at: int, error: Exception, **kw) -> None:
        super().__init__(**kw)
        self.fail_at, self.error, self.passes = fail_at, error, 0

    def forward(self, x):
        if not self.training:
            self.passes += 1
            if self.passes == self.fail_at:
                raise self.error
        return super().forward(x)


def test_initial_whose_start_was_not_captured_reports_nothing_and_the_others_go_on():
    cb = callback(reference={"a": RefMLP(), "init": "initial"}, layers=["fc2"])
    with pytest.warns(RuntimeWarning, match=r"reference 'init' \('initial'\) has no values: the "
                                            r"activations at the start of the fit.* not taken"):
        fit([cb], model=FailsOnce(1, MemoryError("out of memory at the start"), lr=0.5),
            max_epochs=3)
    assert [s["epoch"] for s in cb.skipped] == [0]
    assert sorted(_values(cb, "alignment/a/linear_cka/calibrated")) == [1, 2, 3]
    assert not any(k.startswith("alignment/init/") for h in cb.history for k in h)


# ------------------------------------------------------------------------------ "previous"
@pytest.mark.parametrize("names", [("prev", "init", "a"), ("a", "prev", "init")])
def test_previous_after_a_failed_step_compares_with_the_last_step_in_the_history(names):
    """``"a"`` fails at epoch 1, which leaves the history: at epoch 2 the previous step is
    epoch 0, the start, so "previous" equals "initial" (same seed, same permutations)."""
    kinds = {"prev": "previous", "init": "initial", "a": RefMLP()}
    cb = callback(reference={name: kinds[name] for name in names}, layers=["fc2"])
    _fail(_engine(cb, "a"), "step", epochs={1})
    with pytest.warns(RuntimeWarning, match="epoch 1 .* skipped"):
        fit([cb], model=MLP(lr=0.5), max_epochs=3)
    for field in ("raw", "calibrated"):
        prev = _values(cb, f"alignment/prev/linear_cka/layer/fc2/{field}")
        init = _values(cb, f"alignment/init/linear_cka/layer/fc2/{field}")
        assert sorted(prev) == [2, 3] and prev[2] == init[2]
    assert _values(cb, "alignment/prev/linear_cka/layer/fc2/raw")[3] != init[3]


def test_previous_does_not_move_to_a_step_whose_heatmaps_failed(tmp_path, monkeypatch):
    """The heatmaps are drawn after the measures: a failure there skips the step, so
    "previous" must not have moved to it (it compared epoch 2 with the skipped epoch 1)."""
    from alignment_callback.metrics import plotting

    draw, calls = plotting.heatmap_image, []

    def failing(result, title):
        calls.append(title)
        if "after epoch 1 " in title:
            raise RuntimeError("cannot draw")
        return draw(result, title)

    monkeypatch.setattr(plotting, "heatmap_image", failing)
    cb = callback(reference={"prev": "previous", "init": "initial"}, layers=["fc2"],
                  log_heatmaps=True)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=3, logger=CSVLogger(tmp_path), callbacks=[cb],
                         enable_checkpointing=False, **FAST_TRAINER)
    with pytest.warns(RuntimeWarning, match="epoch 1 .* skipped: RuntimeError: cannot draw"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer.fit(MLP(lr=0.5), train_loader())
    prev = _values(cb, "alignment/prev/linear_cka/layer/fc2/raw")
    init = _values(cb, "alignment/init/linear_cka/layer/fc2/raw")
    assert sorted(prev) == [2, 3] and prev[2] == init[2]


def test_a_resume_that_redoes_the_first_step_gives_previous_no_value_there(tmp_path):
    """Background, step mode, no baseline: a checkpoint written while the first step was in
    flight holds no history and that step as pending; the resumed run anchored "initial" and
    "previous" at the resumed weights and then redid the step on them (1.0 against itself)."""

    def aligner(slow: bool = False):
        cb = callback(reference={"init": "initial", "prev": "previous"}, layers=["fc2"],
                      baseline=False, background=True, every_n_train_steps=2)
        compute = cb._compute

        def slowly(*args, **kwargs):  # keeps the job in flight when the checkpoint is written
            if threading.current_thread() is not threading.main_thread():
                time.sleep(3.0)
            return compute(*args, **kwargs)

        if slow:
            cb._compute = slowly
        return cb

    def run(callbacks, max_steps, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_steps=max_steps, logger=False, callbacks=callbacks,
                             default_root_dir=tmp_path, **FAST_TRAINER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(MLP(lr=0.5), train_loader(), ckpt_path=ckpt_path)

    first = aligner(slow=True)
    run([first, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                                filename="{step}")], 2)
    path = os.path.join(tmp_path, "step=2.ckpt")
    state = next(v for k, v in torch.load(path, weights_only=False)["callbacks"].items()
                 if "Alignment" in k)
    assert state["history"] == [] and state["pending"] == [[0, 2]]
    resumed = aligner()
    run([resumed], 6, path)
    prev = {h["step"]: h.get("alignment/prev/linear_cka/layer/fc2/raw") for h in resumed.history}
    init = {h["step"]: h.get("alignment/init/linear_cka/layer/fc2/raw") for h in resumed.history}
    assert sorted(prev) == [2, 4, 6] and prev[2] is None  # as in an uninterrupted run
    # the redone step anchors "initial" (the start of this fit, documented) with no value of
    # its own (it was 1.0, the weights against themselves, where the first run had a drift),
    # and is the previous step of step 4
    assert init[2] is None and prev[4] == init[4] < 1.0


class _Validated(MLP):
    def validation_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))


@pytest.mark.parametrize("background", [False, True])
def test_a_resume_from_a_validation_checkpoint_gives_drift_no_self_comparison(tmp_path,
                                                                             background):
    """A checkpoint written at an epoch's validation (before that epoch's end, where its step
    runs): Lightning resumes at that epoch end, whose step ran on the weights "initial" and
    "previous" had just been anchored at, and logged 1.0, the weights against themselves.
    The step now anchors them itself, with no value of them, as a redone step does."""

    def run(name, ckpt_path=None):
        cb = callback(reference={"init": "initial", "prev": "previous"}, layers=["fc2"],
                      background=background)
        extra = [] if ckpt_path else [ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)]
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(max_epochs=4, logger=False, callbacks=[cb, *extra],
                             check_val_every_n_epoch=2, enable_checkpointing=not ckpt_path,
                             default_root_dir=tmp_path / name, **FAST_TRAINER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(_Validated(lr=0.5), train_loader(shuffle=False),
                        train_loader(shuffle=False), ckpt_path=ckpt_path)
        return {h["epoch"]: (h.get("alignment/init/linear_cka/layer/fc2/raw"),
                             h.get("alignment/prev/linear_cka/layer/fc2/raw"))
                for h in cb.history}

    straight = run("straight")
    resumed = run("resumed", tmp_path / "ck" / "epoch=1-step=8.ckpt")
    assert sorted(resumed) == sorted(straight) == [0, 1, 2, 3, 4]
    assert resumed[2] == (None, None)  # was (1.0, 1.0)
    # "previous" goes on exactly: epoch 3 compares with epoch 2, computed again on its weights
    assert resumed[3][1] == straight[3][1] < 1.0 and resumed[4][1] == straight[4][1]
    # "initial" measures the drift from the resumed weights (documented), not from themselves
    assert resumed[3][0] == resumed[3][1] < 1.0


# ------------------------------------------------------------------ configuration mistakes
class Counting(MLP):
    batches = 0

    def training_step(self, batch, batch_idx):
        Counting.batches += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("reference", ["initial", "model"])
@pytest.mark.parametrize("baseline", [True, False])
def test_a_probe_the_model_cannot_take_fails_whatever_on_error_says(reference, baseline):
    """Raised at the first step after a training batch (the start's failure warns: a model
    may not run before its first batch), not after the whole fit."""
    wide = make_probe(48, in_dim=IN_DIM + 1)  # the reference model takes it, the model not
    ref = "initial" if reference == "initial" else RefMLP(in_dim=IN_DIM + 1)
    cb = callback(reference=ref, probe=wide, layers=["fc2"], baseline=baseline, on_error="warn")
    Counting.batches = 0
    with pytest.raises(ProbeInputError, match="the model in training runs its training batches "
                                              "but failed on the probe.*mat1 and mat2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the start's failure
            fit([cb], model=Counting(), max_epochs=3)
    assert Counting.batches == 4  # one epoch, not three
    started = baseline or reference == "initial"  # a probe pass at the start, which warned
    assert [s["step"] for s in cb.skipped] == ([0] if started else [])


class InitializedByTheFirstBatch(MLP):
    """Its forward cannot run before the first training batch (as ActNorm's statistics)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.ready = False

    def training_step(self, batch, batch_idx):
        self.ready = True
        return super().training_step(batch, batch_idx)

    def forward(self, x):
        if not self.ready:
            raise RuntimeError("not initialized: run a training batch first")
        return super().forward(x)


def test_a_model_that_runs_only_after_its_first_batch_warns_at_the_start_and_goes_on():
    cb = callback(on_error="warn")
    with pytest.warns(RuntimeWarning, match="epoch 0 .* skipped: RuntimeError: .*not initialized"):
        fit([cb], model=InitializedByTheFirstBatch(), max_epochs=2)
    assert [h["epoch"] for h in cb.history] == [1, 2]


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB",
                                     "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                     "`cublasCreate(handle)`"])
def test_a_first_probe_pass_out_of_device_memory_warns(message):
    cb = callback(baseline=False, on_error="warn")
    with pytest.warns(RuntimeWarning, match="epoch 1 .* skipped: RuntimeError: .*CU"):
        fit([cb], model=FailsOnce(1, RuntimeError(message)), max_epochs=3)
    assert [h["epoch"] for h in cb.history] == [2, 3]


def test_a_later_failure_of_the_probe_pass_warns():
    cb = callback(on_error="warn")
    with pytest.warns(RuntimeWarning, match="epoch 1 .* skipped: RuntimeError: .*the weights"):
        fit([cb], model=FailsOnce(2, RuntimeError("the weights went wrong")), max_epochs=2)
    assert [h["epoch"] for h in cb.history] == [0, 2]


def test_a_measure_option_the_model_layer_widths_cannot_take_fails_whatever_on_error_says():
    cb = callback(reference=RefMLP(hidden=32), measures={"svcca": {"cca_dim": 20}},
                  layers=["fc2"], on_error="warn")
    with pytest.raises(ShapeOptionError, match="svcca: cca_dim=20 is too large .* d=16"):
        fit([cb], max_epochs=2)
    assert cb.skipped == [] and PROBE.shape[0] > 21


def test_a_measure_callable_that_cannot_be_called_as_f_x_y_is_refused_when_built():
    """A callable of the wrong arity only warned at every step under on_error="warn": training
    ran to its end with an empty history."""
    with pytest.raises(TypeError, match=r"measure callable '<lambda>' cannot be called as "
                                        r"f\(x, y\): too many positional arguments"):
        callback(measures={"mine": lambda x: 0.0})
    with pytest.raises(TypeError, match=r"cannot be called as f\(x, y\) with its options \['k'\]"):
        get_measure(lambda x, y: 0.0, k=3)
    get_measure(lambda x, y, k=1: 0.0, k=3)  # takes its option


def test_a_measure_callable_whose_value_is_not_a_number_fails_whatever_on_error_says():
    """Its value is the callable's mistake, not the data's: it warned at every step."""
    model = MLP()
    cb = callback(measures={"mine": lambda x, y: torch.ones(3)}, on_error="warn")
    with pytest.raises(MeasureOutputError, match=r"must be one number, got a value of shape "
                                                 r"\(3,\) \(measure callable '<lambda>'\)"):
        fit([cb], model=model, max_epochs=2)
    assert cb.skipped == [] and model.global_step == 0  # at the baseline, before training


def test_a_logger_failure_is_raised_whatever_on_error_says(tmp_path):
    """Writing the values failing (a full disk) is not the data's failure: on_error="warn"
    does not turn it into a skipped step (under DDP every rank raises it too:
    test_callback_ddp.py)."""

    class FullDisk(CSVLogger):
        def log_metrics(self, metrics, step=None):
            if any(k.startswith("alignment/") for k in metrics):
                raise OSError("disk full (simulated)")
            super().log_metrics(metrics, step)

    cb = callback(on_error="warn")
    trainer = pl.Trainer(max_epochs=2, logger=FullDisk(tmp_path), callbacks=[cb],
                         enable_checkpointing=False, default_root_dir=tmp_path, **FAST_TRAINER)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(MLP(), train_loader())
    assert cb.skipped == []
