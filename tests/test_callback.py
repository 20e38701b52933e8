"""AlignmentCallback under a single-process CPU Trainer: logged keys and values (CSVLogger),
training left bitwise unchanged, checkpoint resume, schedules, batch formats, pair mappings,
error handling and monitoring."""

from __future__ import annotations

import math
import operator
import os
import random
import threading
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from alignment_callback import AlignmentCallback
from tests.helpers import (
    FAST_TRAINER,
    LAYERS,
    MLP,
    DictDataset,
    DictMLP,
    RefMLP,
    alignment_rows,
    csv_metrics_file,
    make_data,
    make_probe,
    offline_alignment,
    train_loader,
)

DEFAULT_MEASURES = ("linear_cka", "mutual_knn", "cknna")
K = 30
FIELDS = ("raw", "calibrated", "p_value", "threshold")



def _callback_threads() -> list:
    """The callback's worker threads still alive ("alignment_<i>"; the calibration's shared
    pool of helper threads, "alignment_null_<i>", lives for the process by design)."""
    return [t for t in threading.enumerate()
            if t.name.startswith("alignment") and not t.name.startswith("alignment_null")]

def _callback(**kw):
    kw.setdefault("num_permutations", K)
    kw.setdefault("log_heatmaps", False)
    reference = kw.pop("reference", None) or RefMLP(seed=1)
    probe = kw.pop("probe", None)
    return AlignmentCallback(reference, make_probe() if probe is None else probe,
                             kw.pop("layers", LAYERS), **kw)


def _fit(tmp_path, callbacks, max_epochs=1, model=None, loader=None, logger=True, **trainer_kw):
    model = model if model is not None else MLP()
    log = CSVLogger(tmp_path, name="csv") if logger is True else logger
    trainer = pl.Trainer(max_epochs=max_epochs, logger=log, callbacks=callbacks,
                         enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                         **FAST_TRAINER, **trainer_kw)
    trainer.fit(model, loader if loader is not None else train_loader())
    return trainer, model


# ----------------------------------------------------------------------- logged keys and values
@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_csv_keys_rows_and_values_match_offline_recomputation(tmp_path, background):
    reference = RefMLP(seed=1)
    cb = _callback(reference=reference, log_heatmaps=True, background=background)
    trainer, model = _fit(tmp_path, [cb], max_epochs=2)

    assert cb._threaded is background
    rows = alignment_rows(csv_metrics_file(trainer.logger))
    assert [float(r["alignment/epoch"]) for r in rows] == [0.0, 1.0, 2.0]  # baseline + 2 epochs
    steps = [int(r["step"]) for r in rows]
    assert steps == [0, 4, 8] and len(set(steps)) == len(steps)
    assert [h["epoch"] for h in cb.history] == [0, 1, 2]
    for name in DEFAULT_MEASURES:
        for field in FIELDS:
            assert f"alignment/{name}/{field}" in rows[0], f"missing alignment/{name}/{field}"
        for r in rows:
            p = float(r[f"alignment/{name}/p_value"])
            assert 1.0 / (K + 1) - 1e-7 <= p <= 1.0 + 1e-7
            for field in FIELDS:
                assert math.isfinite(float(r[f"alignment/{name}/{field}"]))
    for r in rows:
        assert 0.0 <= float(r["alignment/linear_cka/raw"]) <= 1.0 + 1e-6

    # the last logged row is what the pure functions give on the final weights
    last = rows[-1]
    for name in DEFAULT_MEASURES:
        res = offline_alignment(model, reference, make_probe(), LAYERS, name, K)
        for field in FIELDS:
            assert float(last[f"alignment/{name}/{field}"]) == pytest.approx(
                float(getattr(res, field)), rel=1e-5, abs=1e-6), (name, field)
        assert cb.history[-1][f"alignment/{name}/best_pair"] == "|".join(res.best_pair)
        torch.testing.assert_close(cb.last_results[name].matrix, res.matrix, rtol=1e-5, atol=1e-6)

    # heatmaps: one image (raw | calibrated per pair) per metric per alignment step, as PNGs
    folder = os.path.join(trainer.logger.log_dir, "alignment_heatmaps")
    pngs = sorted(os.listdir(folder))
    assert len(pngs) == len(DEFAULT_MEASURES) * 3
    for name in DEFAULT_MEASURES:
        for h in cb.history:
            fname = f"alignment_{name}_heatmap_epoch{h['epoch']:04d}_step{h['step']:06d}.png"
            assert fname in pngs
            with open(os.path.join(folder, fname), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- training unchanged
def _global_rng():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _train_once(tmp_path, with_callback, background=False):
    pl.seed_everything(0)
    model = MLP(dropout=0.3)
    # a DataLoader probe: creating its iterator draws a seed from the global torch RNG
    probe = DataLoader(TensorDataset(make_probe()), batch_size=32, shuffle=False)
    cbs = [_callback(reference=RefMLP(seed=1), probe=probe, log_heatmaps=True,
                     measures=["linear_cka", "mutual_knn"], background=background)
           ] if with_callback else []
    trainer = pl.Trainer(max_epochs=2, logger=CSVLogger(tmp_path, name="csv"), callbacks=cbs,
                         deterministic=True, enable_checkpointing=False, **FAST_TRAINER)
    trainer.fit(model, train_loader(shuffle=True))
    return model, _global_rng(), cbs


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_training_is_bitwise_identical_with_and_without_callback(tmp_path, restore_determinism,
                                                                 background):
    model_a, rng_a, cbs = _train_once(tmp_path / "a", with_callback=True, background=background)
    model_b, rng_b, _ = _train_once(tmp_path / "b", with_callback=False)
    assert [h["epoch"] for h in cbs[0].history] == [0, 1, 2]  # the callback did run

    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    assert torch.equal(rng_a[0], rng_b[0])  # torch global RNG
    assert rng_a[1][0] == rng_b[1][0] and np.array_equal(rng_a[1][1], rng_b[1][1])
    assert rng_a[2] == rng_b[2]
    assert [m.training for m in model_a.modules()] == [m.training for m in model_b.modules()]
    for tree in (model_a, cbs[0].reference):
        for name, module in tree.named_modules():
            assert not module._forward_hooks, f"forward hook left on {name!r}"
            assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"
    assert all(not p.requires_grad for p in cbs[0].reference.parameters())


# ------------------------------------------------------------------------------------- resume
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_resume_from_checkpoint_continues_history(tmp_path, background, monkeypatch):
    if background:  # slow steps: the epoch-2 step is still running when the checkpoint is written
        import time

        compute = AlignmentCallback._compute
        monkeypatch.setattr(AlignmentCallback, "_compute",
                            lambda self, *a: (time.sleep(0.5), compute(self, *a))[1])
    ckpt_dir = tmp_path / "ckpt"
    cb1 = _callback(measures=["linear_cka"], background=background)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True)
    _fit(tmp_path / "run1", [cb1, ckpt], max_epochs=2, enable_checkpointing=True)
    assert [h["epoch"] for h in cb1.history] == [0, 1, 2]
    last = ckpt_dir / "last.ckpt"
    assert last.exists()

    loaded = torch.load(last, weights_only=True)  # primitives only in the callback state
    (state,) = [v for k, v in loaded["callbacks"].items() if "AlignmentCallback" in k]
    # a checkpoint never waits: a step in flight is recorded as pending and redone on resume
    pending = [[2, cb1.history[-1]["step"]]] if background else []
    assert state["pending"] == pending
    assert [h["epoch"] for h in state["history"]] == ([0, 1] if background else [0, 1, 2])

    cb2 = _callback(measures=["linear_cka"], background=background)
    log2 = CSVLogger(tmp_path / "run2", name="csv")
    trainer = pl.Trainer(max_epochs=4, logger=log2,
                         callbacks=[cb2, ModelCheckpoint(dirpath=ckpt_dir)],
                         **FAST_TRAINER)
    trainer.fit(MLP(), train_loader(), ckpt_path=str(last))
    epochs = [h["epoch"] for h in cb2.history]
    assert epochs == [0, 1, 2, 3, 4]
    steps = [h["step"] for h in cb2.history]
    assert len(set(steps)) == len(steps)
    # the redone step saw the checkpoint's weights: the same values as the first run's
    timeless = [{k: v for k, v in h.items() if not k.endswith("/seconds")} for h in cb2.history]
    assert timeless[:3] == [{k: v for k, v in h.items() if not k.endswith("/seconds")}
                            for h in cb1.history]

    rows = alignment_rows(csv_metrics_file(log2))
    expected = ([2.0] if background else []) + [3.0, 4.0]  # no second baseline
    assert [float(r["alignment/epoch"]) for r in rows] == expected
    logged_steps = [int(r["step"]) for r in rows]
    assert len(set(logged_steps)) == len(logged_steps) and 0 not in logged_steps


# ------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_every_n_train_steps(tmp_path, background):
    cb = _callback(measures=["linear_cka"], every_n_train_steps=3, background=background)
    _fit(tmp_path, [cb], max_epochs=2)  # 4 steps per epoch, 8 in all
    steps = [h["step"] for h in cb.history]
    assert steps == [0, 3, 6]
    assert all(s % 3 == 0 for s in steps)


def test_background_history_equals_synchronous(tmp_path):
    histories = []
    for background in (False, True):
        pl.seed_everything(0)
        cb = _callback(every_n_train_steps=2, background=background)
        _fit(tmp_path / str(background), [cb], max_epochs=2)
        histories.append([{k: v for k, v in h.items() if not k.endswith("/seconds")}
                          for h in cb.history])
    assert [h["step"] for h in histories[0]] == [0, 2, 4, 6, 8]
    assert histories[0] == histories[1]


class _ThreadRecordingMLP(MLP):
    """Records the thread of every eval-mode forward pass (the probe's)."""

    probe_threads: list = []

    def forward(self, x):
        if not self.training:
            type(self).probe_threads.append(threading.current_thread().name)
        return super().forward(x)


class _Uncopyable(MLP):
    def __deepcopy__(self, memo):
        raise TypeError("this model holds an uncopyable resource")


def test_background_runs_the_probe_on_a_copy_in_the_worker(tmp_path):
    _ThreadRecordingMLP.probe_threads = []
    cb = _callback(measures=["linear_cka"], background=True)
    _, model = _fit(tmp_path, [cb], max_epochs=2, model=_ThreadRecordingMLP())
    threads = _ThreadRecordingMLP.probe_threads
    # the first step captures in the loop and the worker checks the copy against it (two
    # passes), the other steps run the probe on the copy in the worker (one probe batch of 64
    # rows each)
    assert threads[0] == "MainThread"
    assert len(threads) == 4 and all(t.startswith("alignment") for t in threads[1:]), threads
    assert [h["epoch"] for h in cb.history] == [0, 1, 2]
    # the last step saw the final weights: same values as the pure functions on them
    res = offline_alignment(model, RefMLP(seed=1), make_probe(), LAYERS, "linear_cka", K)
    assert cb.history[-1]["alignment/linear_cka/raw"] == pytest.approx(float(res.raw), rel=1e-5)
    assert cb.history[-1]["alignment/linear_cka/calibrated"] == pytest.approx(
        float(res.calibrated), rel=1e-5, abs=1e-6)


def test_background_falls_back_to_the_loop_for_an_uncopyable_model(tmp_path):
    cb = _callback(measures=["linear_cka"], background=True)
    with pytest.warns(RuntimeWarning, match="cannot be copied"):
        _fit(tmp_path, [cb], max_epochs=1, model=_Uncopyable())
    assert [h["epoch"] for h in cb.history] == [0, 1]


_SCALES: dict[int, float] = {}


class _ExternalStateMLP(MLP):
    """A forward that reads state kept outside the module (keyed by the module's identity, so
    the worker's copy does not see it)."""

    def forward(self, x):
        return super().forward(x * _SCALES.get(id(self), 1.0))


def test_background_falls_back_to_the_loop_when_the_copy_gives_other_activations(tmp_path):
    histories = []
    for background in (False, True):
        pl.seed_everything(0)
        model = _ExternalStateMLP()
        _SCALES[id(model)] = 3.0
        cb = _callback(measures=["linear_cka"], background=background)
        if background:
            with pytest.warns(RuntimeWarning, match="copy gives other activations"):
                _fit(tmp_path / "bg", [cb], max_epochs=2, model=model)
        else:
            _fit(tmp_path / "fg", [cb], max_epochs=2, model=model)
        histories.append([{k: v for k, v in h.items() if not k.endswith("/seconds")}
                          for h in cb.history])
        del _SCALES[id(model)]
    assert [h["epoch"] for h in histories[1]] == [0, 1, 2]
    assert histories[0] == histories[1]  # the loop's activations, not the unscaled copy's


def test_background_queue_keeps_order_and_bounds_pending_jobs():
    import time

    from alignment_callback.callback.background import BackgroundQueue

    queue = BackgroundQueue(max_pending=2)
    finished = []
    for i in range(5):
        done = queue.submit(lambda i=i: (time.sleep(0.02), i)[1], epoch=i, step=i)
        assert len(queue) <= 2
        finished += [job.future.result() for job in done]
    assert queue.has(4, 4) and not queue.has(0, 0)
    done, running = queue.snapshot()  # waits for all but the newest, keeps them queued
    assert done in ([3], [3, 4]) and running in ([(4, 4)], []) and len(done) + len(running) == 2
    finished += [job.future.result() for job in queue.ready(wait=True)]
    assert finished == [0, 1, 2, 3, 4] and len(queue) == 0
    queue.shutdown()
    assert not _callback_threads()


def test_a_job_that_finishes_while_a_checkpoint_is_taken_is_saved_once():
    """snapshot() read each job's state twice (finished? then running?): a job finishing
    between the two reads was in neither list, so a checkpoint written then lost its step."""
    from concurrent.futures import Future

    from alignment_callback.callback.background import BackgroundQueue, Job

    class FinishesWhenAsked(Future):
        """Running at the first ``done()``, finished (with result 7) from the second on."""

        def __init__(self) -> None:
            super().__init__()
            self.asked = 0

        def done(self) -> bool:
            self.asked += 1
            if self.asked == 2:
                self.set_result(7)
            return super().done()

    queue = BackgroundQueue()
    queue._jobs.append(Job(3, 12, FinishesWhenAsked()))
    done, running = queue.snapshot(current_step=12)
    assert (done, running) in (([7], []), ([], [(3, 12)]))
    queue.shutdown()


def test_every_n_epochs(tmp_path):
    cb = _callback(measures=["linear_cka"], every_n_epochs=2)
    trainer, _ = _fit(tmp_path, [cb], max_epochs=4, loader=train_loader(n=32))
    assert [h["epoch"] for h in cb.history] == [0, 2, 4]
    rows = alignment_rows(csv_metrics_file(trainer.logger))
    assert [float(r["alignment/epoch"]) for r in rows] == [0.0, 2.0, 4.0]


# -------------------------------------------------------------------------------- batch formats
def _dict_probe_loader():
    return DataLoader(DictDataset(make_probe()), batch_size=24, shuffle=False)


def _dict_train_loader():
    return DataLoader(DictDataset(*make_data()), batch_size=16, shuffle=True)


@pytest.mark.parametrize("how", ["input_key", "batch_transform"])
def test_dict_batches(tmp_path, how):
    reference = RefMLP(seed=1)
    kw = {"input_key": "x"} if how == "input_key" else {"batch_transform": operator.itemgetter("x")}
    cb = _callback(reference=reference, probe=_dict_probe_loader(), measures=["linear_cka"], **kw)
    _, model = _fit(tmp_path, [cb], model=DictMLP(), loader=_dict_train_loader())
    assert [h["epoch"] for h in cb.history] == [0, 1]
    res = offline_alignment(model, reference, make_probe(), LAYERS, "linear_cka", K)
    assert cb.history[-1]["alignment/linear_cka/raw"] == pytest.approx(float(res.raw), rel=1e-5)
    assert cb.history[-1]["alignment/linear_cka/calibrated"] == pytest.approx(float(res.calibrated),
                                                                              rel=1e-5, abs=1e-6)


def test_reference_inputs_with_another_feature_dimension(tmp_path):
    reference = RefMLP(in_dim=5, seed=1)
    ref_probe = torch.cat([make_probe()[:, :3], make_probe(seed=7)[:, :2]], 1)  # row-aligned, d=5
    cb = _callback(reference=reference, reference_inputs=ref_probe, measures=["linear_cka"])
    _, model = _fit(tmp_path, [cb])
    assert [h["epoch"] for h in cb.history] == [0, 1]
    res = offline_alignment(model, reference, make_probe(), LAYERS, "linear_cka", K,
                            reference_probe=ref_probe)
    for field in FIELDS:
        assert cb.history[-1][f"alignment/linear_cka/{field}"] == pytest.approx(
            float(getattr(res, field)), rel=1e-5, abs=1e-6)


def test_reference_inputs_with_dict_batches_and_own_key(tmp_path):
    reference = RefMLP(in_dim=5, seed=1)
    ref_probe = [{"features": t} for t in make_probe(in_dim=5, seed=9).split(32)]
    cb = _callback(reference=reference, probe=_dict_probe_loader(), input_key="x",
                   reference_inputs=ref_probe, reference_input_key="features",
                   measures=["linear_cka"])
    _fit(tmp_path, [cb], model=DictMLP(), loader=_dict_train_loader())
    assert [h["epoch"] for h in cb.history] == [0, 1]


# ------------------------------------------------------------------------------- pair mappings
def test_layer_mapping_aggregates_over_mapped_pairs_only(tmp_path):
    # the reference is the model's own initialization: the unmapped fc1-fc1 pair is ~1, the
    # mapped cross pairs are lower, so a max over the whole matrix would differ
    mapping = {"fc1": "head", "head": "fc1"}
    cb = _callback(reference=MLP(seed=0), layers=mapping, measures=["linear_cka", "mutual_knn"])
    _fit(tmp_path, [cb], model=MLP(seed=0, lr=0.01))
    for name in ("linear_cka", "mutual_knn"):
        r = cb.last_results[name]
        mapped = torch.stack([r.matrix[r.x_names.index(a), r.y_names.index(b)]
                              for a, b in mapping.items()])
        assert float(r.raw) == pytest.approx(float(mapped.max()), abs=1e-7)
        logged = cb.history[-1][f"alignment/{name}/raw"]
        assert logged == pytest.approx(float(mapped.max()), abs=1e-7)
        # the full max is an unmapped pair
        assert float(r.matrix.max()) > float(mapped.max()) + 1e-3
    # the null is aggregated over the same pairs: calibrated aggregate <= best mapped pair
    assert 0.0 <= cb.history[-1]["alignment/linear_cka/p_value"] <= 1.0


# ------------------------------------------------------------------------------------- errors
def _nan_probe():
    probe = make_probe()
    probe[5, 2] = float("nan")
    return probe


def test_nan_probe_is_raised_before_training_whatever_on_error(tmp_path):
    """NaN in the probe makes the frozen reference's activations NaN, which no step changes:
    raised at the baseline (before: with on_error="warn" every step warned, nothing logged)."""
    from alignment_callback.callback.alignment_callback import FrozenReferenceError

    cb = _callback(probe=_nan_probe(), measures=["linear_cka"], on_error="warn")
    with pytest.raises(FrozenReferenceError, match="NaN"):
        _fit(tmp_path, [cb], max_epochs=2)
    assert cb.history == [] and cb.skipped == []


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_nan_layer_of_the_model_warns(tmp_path, background):
    model = MLP()
    with torch.no_grad():
        model.fc2.bias[0] = float("nan")  # fc2 and later layers become NaN, fc1 stays fine
    cb = _callback(measures=["linear_cka"], on_error="warn", background=background)
    with pytest.warns(RuntimeWarning, match="NaN"):
        trainer, _ = _fit(tmp_path, [cb], model=model)
    assert trainer.state.finished and cb.history == []


def test_on_error_raise(tmp_path):
    cb = _callback(probe=_nan_probe(), measures=["linear_cka"], on_error="raise")
    with pytest.raises(ValueError, match="NaN"):
        _fit(tmp_path, [cb])


def test_on_error_raise_from_the_background_thread(tmp_path):
    model = MLP()
    with torch.no_grad():
        model.fc2.bias[0] = float("nan")  # fails in the worker, not in the capture
    cb = _callback(measures=["linear_cka"], on_error="raise", background=True)
    with pytest.raises(ValueError, match="NaN"):
        _fit(tmp_path, [cb], model=model, max_epochs=3)
    assert cb.history == [] and len(cb._queue) == 0
    assert not _callback_threads()


def test_shuffling_probe_loader_rejected():
    loader = DataLoader(TensorDataset(make_probe()), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match="shuffle"):
        AlignmentCallback(RefMLP(), loader, LAYERS)


@pytest.mark.parametrize("kw", [{"on_error": "ignore"}, {"every_n_train_steps": 0},
                                {"every_n_epochs": 0}, {"metrics": []}])
def test_bad_arguments_rejected(kw):
    with pytest.raises(ValueError):
        AlignmentCallback(RefMLP(), make_probe(), LAYERS, **kw)


# ---------------------------------------------------------------------------------- monitoring
def test_model_checkpoint_can_monitor_calibrated_value(tmp_path):
    cb = _callback(measures=["mutual_knn"])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="alignment/mutual_knn/calibrated",
                           mode="max", save_top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "monitor not found" would surface
        trainer, _ = _fit(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True)
    key = "alignment/mutual_knn/calibrated"
    assert key in trainer.callback_metrics
    assert float(trainer.callback_metrics[key]) == pytest.approx(cb.history[-1][key])
    assert ckpt.best_model_score is not None
    best = max(h[key] for h in cb.history if h["epoch"] >= 1)
    assert float(ckpt.best_model_score) == pytest.approx(best)
    assert os.path.exists(ckpt.best_model_path)


class _PeekMonitor(pl.Callback):
    """Records what a monitor would read right after each alignment step."""

    def __init__(self, watched, key):
        self.watched, self.key, self.seen = watched, key, []

    def _peek(self, trainer, where):
        if self.watched.history and self.watched.history[-1]["step"] == trainer.global_step:
            value = trainer.callback_metrics.get(self.key)
            self.seen.append((where, trainer.global_step, None if value is None else float(value),
                              self.watched.history[-1][self.key]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._peek(trainer, "batch")

    def on_train_epoch_end(self, trainer, pl_module):
        self._peek(trainer, "epoch")


def test_every_n_train_steps_monitor_sees_the_latest_value(tmp_path):
    key = "alignment/linear_cka/calibrated"
    cb = _callback(measures=["linear_cka"], every_n_train_steps=1)
    peek = _PeekMonitor(cb, key)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="max", save_top_k=1,
                           every_n_train_steps=2)
    _fit(tmp_path, [cb, peek, ckpt], max_epochs=2, model=MLP(lr=0.5), enable_checkpointing=True)
    assert [h["step"] for h in cb.history] == list(range(9))
    batch_seen = [s for s in peek.seen if s[0] == "batch"]
    assert [s[1] for s in batch_seen] == list(range(1, 9))
    for where, step, seen, latest in peek.seen:  # not an epoch mean of the steps' values
        assert seen == pytest.approx(latest), (where, step)
    best = max(h[key] for h in cb.history if h["step"] in (2, 4, 6, 8))
    assert float(ckpt.best_model_score) == pytest.approx(best)


def test_load_probe_keeps_a_single_dict_batch_whole():
    from alignment_callback.callback.probe import load_probe

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3)}
    assert load_probe(batch) == [batch]
