"""Adversarial cases of the callback: probe order, background results that must equal the
foreground ones, monitors under background, steps computed twice or dropped, configuration
mistakes that must fail before training, and the documented ``plot_scores(callback.history)``.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import (  # noqa: E402
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
    TensorDataset,
)

from alignment_callback import AlignmentCallback  # noqa: E402
from tests.helpers import (  # noqa: E402
    FAST_TRAINER,
    LAYERS,
    MLP,
    RefMLP,
    alignment_rows,
    csv_metrics_file,
    make_probe,
    train_loader,
)

K = 30


def _callback(**kw):
    kw.setdefault("num_permutations", K)
    kw.setdefault("log_heatmaps", False)
    kw.setdefault("measures", ["linear_cka", "mutual_knn"])
    probe = kw.pop("probe", None)
    return AlignmentCallback(kw.pop("reference", None) or RefMLP(seed=1),
                             make_probe() if probe is None else probe, kw.pop("layers", LAYERS), **kw)


def _fit(tmp_path, callbacks, model=None, max_epochs=2, **trainer_kw):
    trainer = pl.Trainer(max_epochs=max_epochs, logger=CSVLogger(tmp_path, name="csv"),
                         callbacks=callbacks, enable_checkpointing=trainer_kw.pop("enable_checkpointing", False),
                         **FAST_TRAINER, **trainer_kw)
    model = model if model is not None else MLP()
    trainer.fit(model, train_loader())
    return trainer, model


def _timeless(history):
    return [{k: v for k, v in h.items() if not k.endswith("/seconds")} for h in history]


# ------------------------------------------------------------------------------ probe order
class _Reversed(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(range(len(ds)))),
    lambda ds: DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 16, False)),
    lambda ds: DataLoader(ds, batch_size=16, sampler=_Reversed(len(ds))),
], ids=["subset_random", "shuffling_batch_sampler", "custom_sampler"])
def test_non_sequential_probe_loaders_are_refused(make):
    loader = make(TensorDataset(make_probe()))
    with pytest.raises(ValueError, match="same samples in the same order at every alignment step"):
        _callback(probe=loader)


def test_sequential_loader_is_accepted():
    _callback(probe=DataLoader(TensorDataset(make_probe()), batch_size=16, shuffle=False))


# ------------------------------------------------------- background equals foreground
class _StagedMLP(MLP):
    """A forward that reads a plain attribute changed during training (a stage flag)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.stage = 0

    def forward(self, x):
        h = self.drop(self.act1(self.fc1(x)))
        if self.stage >= 1:
            h = h * 0.5 + 0.25 * torch.sin(3 * h)
        return self.head(self.act2(self.fc2(h)))

    def on_train_epoch_end(self):
        self.stage += 1


class _TrainerReadingMLP(MLP):
    """A forward that reads the trainer beyond the loop's position (the worker's copy has only
    ``current_epoch`` and ``global_step``)."""

    def forward(self, x):
        scale = 1.0 + 0.5 * self.trainer.current_epoch / self.trainer.max_epochs
        return super().forward(x * scale)


@pytest.mark.parametrize("model_cls,warns", [(_StagedMLP, False), (_TrainerReadingMLP, True)],
                         ids=["plain_attribute", "reads_trainer"])
def test_background_equals_foreground(tmp_path, model_cls, warns):
    histories = []
    for background in (False, True):
        pl.seed_everything(0)
        cb = _callback(background=background, every_n_train_steps=2)
        if background and warns:
            with pytest.warns(RuntimeWarning, match="the probe runs in the training loop"):
                _fit(tmp_path / "bg", [cb], model=model_cls(seed=0), max_epochs=3)
        else:
            _fit(tmp_path / str(background), [cb], model=model_cls(seed=0), max_epochs=3)
        histories.append(_timeless(cb.history))
    assert [h["step"] for h in histories[0]] == [0, 2, 4, 6, 8, 10, 12]
    assert histories[0] == histories[1]
    # the stage switches really change the values (the test would not see a stale copy otherwise)
    raws = [h["alignment/linear_cka/raw"] for h in histories[0]]
    assert len(set(raws)) > 2


@pytest.mark.parametrize("monitor_cb", [
    lambda: EarlyStopping(monitor="alignment/linear_cka/calibrated", mode="max"),
    lambda: ModelCheckpoint(monitor="alignment/mutual_knn/calibrated", mode="max"),
], ids=["early_stopping", "model_checkpoint"])
def test_background_with_a_monitor_on_an_alignment_key_fails_at_setup(tmp_path, monitor_cb):
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="cannot watch an alignment key computed with "
                                         r"AlignmentCallback\(background=True\)"):
        _fit(tmp_path, [_callback(background=True), monitor_cb()], model=model,
             enable_checkpointing=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no step ran


# ------------------------------------------------------------------------------------ steps
@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_gradient_accumulation_computes_each_step_once(tmp_path, background):
    cb = _callback(every_n_train_steps=1, background=background)
    trainer, _ = _fit(tmp_path, [cb], accumulate_grad_batches=3, max_epochs=3)
    steps = [h["step"] for h in cb.history]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    assert steps == list(range(trainer.global_step + 1))
    logged = [int(float(r["alignment/step"])) for r in alignment_rows(csv_metrics_file(trainer.logger))]
    assert logged == steps


class _Crash(pl.Callback):
    def __init__(self, at_epoch, error):
        self.at_epoch, self.error = at_epoch, error

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            raise self.error


def test_finished_background_steps_are_published_when_training_fails(tmp_path, monkeypatch):
    import time

    compute = AlignmentCallback._compute
    monkeypatch.setattr(AlignmentCallback, "_compute",
                        lambda self, *a: (time.sleep(0.2), compute(self, *a))[1])
    cb = _callback(background=True)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, [cb, _Crash(2, RuntimeError("boom"))], max_epochs=5)
    epochs = [h["epoch"] for h in cb.history]
    assert epochs[:2] == [0, 1] and epochs == sorted(set(epochs))  # nothing lost, no duplicate
    rows = alignment_rows(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert [int(float(r["alignment/epoch"])) for r in rows] == epochs


def test_keyboard_interrupt_publishes_finished_background_steps(tmp_path):
    import signal

    handler = signal.getsignal(signal.SIGINT)
    cb = _callback(background=True)
    try:
        with pytest.raises(SystemExit):
            _fit(tmp_path, [cb, _Crash(1, KeyboardInterrupt())], max_epochs=4)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT while shutting down
    assert [h["epoch"] for h in cb.history][:1] == [0]


# -------------------------------------------------------------- configuration fails fast
class _CountingMLP(MLP):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def _fails_before_training(tmp_path, cb, match, model=None):
    _CountingMLP.steps = 0
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, [cb], model=model or _CountingMLP())
    assert _CountingMLP.steps == 0


def test_k_not_below_the_probe_size_fails_before_training(tmp_path):
    cb = _callback(probe=make_probe(n=8), measures={"mutual_knn": {"k": 10}})
    _fails_before_training(tmp_path, cb, r"the probe has 8 samples, too few: mutual_knn \(k=10\) needs >= 11")


def test_layers_matching_nothing_name_the_model(tmp_path):
    _fails_before_training(tmp_path, _callback(layers=["fc9"]),
                           "layer 'fc9' matched none of the student model's")
    _fails_before_training(tmp_path, _callback(layers=["fc1"], reference_layers=["nope"]),
                           "layer 'nope' matched none of the reference model's")


@pytest.mark.parametrize("kw,match", [
    ({"measures": ["mutual_kn"]}, "unknown measure 'mutual_kn'; did you mean 'mutual_knn'"),
    ({"measures": {"mutual_knn": {"k": 0}}}, "mutual_knn: k must be an integer >= 1, got 0"),
    ({"measures": {"linear_cka": {"k": 3}}}, "unexpected keyword argument"),
    ({"num_permutations": 0}, "num_permutations must be an integer >= 1, got 0"),
    ({"num_permutations": None}, "num_permutations must be an integer >= 1, got None"),
    ({"num_permutations": 2.7}, "num_permutations must be an integer >= 1, got 2.7"),
    ({"seed": None}, "seed must be an integer in"),
    ({"seed": 1.5}, "seed must be an integer in"),
    ({"seed": 2**64}, "seed must be an integer in"),
    ({"alpha": "0.05"}, "alpha must be a number in"),
    ({"every_n_epochs": 0}, "every_n_epochs must be an integer >= 1"),
    ({"on_error": "ignore"}, "on_error must be 'warn' or 'raise'"),
    ({"aggregate": "median"}, "aggregate must be 'max', 'mean', 'top<m>'"),
])
def test_bad_configuration_fails_at_construction(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _callback(**kw)


def test_data_dependent_failures_still_warn_and_continue(tmp_path):
    """NaN activations of the model in training warn and training goes on; NaN in the probe
    row that the frozen reference also sees fails before training (no step could succeed)."""
    from alignment_callback.callback.alignment_callback import FrozenReferenceError

    model = MLP()
    with torch.no_grad():
        model.fc2.bias[0] = float("nan")
    cb = _callback()
    with pytest.warns(RuntimeWarning, match="NaN"):
        trainer, _ = _fit(tmp_path, [cb], model=model)
    assert trainer.state.finished and cb.history == [] and len(cb.skipped) > 0
    probe = make_probe()
    probe[3, 1] = float("nan")
    with pytest.raises(FrozenReferenceError, match="NaN"):
        _fit(tmp_path, [_callback(probe=probe)])


# ------------------------------------------------------------------ documented plot call
def test_plot_scores_takes_the_callback_history(tmp_path):
    from alignment_callback.metrics import plot_scores

    cb = _callback()
    _fit(tmp_path, [cb])
    fig, ax = plot_scores(cb.history, measure="mutual_knn")
    raw_line = [line for line in ax.get_lines() if line.get_label() == "raw"][0]
    assert list(raw_line.get_xdata()) == [0, 1, 2]
    assert list(raw_line.get_ydata()) == [h["alignment/mutual_knn/raw"] for h in cb.history]
    with pytest.raises(ValueError, match=r"several measures \['linear_cka', 'mutual_knn'\]"):
        plot_scores(cb.history)
