"""What the callback compares with: a reference's features instead of the model (a mapping or
a feature file with its probe's fingerprint), drift against the model itself ("initial",
"previous"), several references in one callback, and training left bitwise unchanged in each
mode."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from alignment_callback import AlignmentCallback
from alignment_callback.hooks import collect_activations
from alignment_callback.hooks.extract import probe_fingerprint, save_features
from tests.helpers import (
    FAST_TRAINER,
    LAYERS,
    MLP,
    RefMLP,
    make_probe,
    train_loader,
)

K = 30
MEASURES = ["linear_cka", "mutual_knn"]


def _fit(tmp_path, callbacks, max_epochs=2, model=None, seed=0):
    pl.seed_everything(seed)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=CSVLogger(tmp_path, name="csv"),
                         callbacks=callbacks, enable_checkpointing=False, **FAST_TRAINER)
    model = model if model is not None else MLP()
    trainer.fit(model, train_loader())
    return trainer, model


def _cb(reference, **kw):
    kw.setdefault("num_permutations", K)
    kw.setdefault("log_heatmaps", False)
    kw.setdefault("measures", MEASURES)
    kw.setdefault("verbose", False)
    return AlignmentCallback(reference, kw.pop("probe", make_probe()), kw.pop("layers", LAYERS), **kw)


def _timeless(history):
    return [{k: v for k, v in h.items() if not k.endswith("/seconds")} for h in history]


def _reference_features():
    return collect_activations(RefMLP(seed=1), make_probe(), LAYERS, pool="mean")


def test_reference_features_give_the_reference_models_values(tmp_path):
    by_model = _cb(RefMLP(seed=1))
    _fit(tmp_path / "model", [by_model])
    by_mapping = _cb(_reference_features())
    _fit(tmp_path / "mapping", [by_mapping])
    path = tmp_path / "reference.pt"
    save_features(_reference_features(), path, fingerprint=probe_fingerprint(make_probe()))
    by_file = _cb(str(path))
    _fit(tmp_path / "file", [by_file])
    assert _timeless(by_model.history) == _timeless(by_mapping.history) == _timeless(by_file.history)
    assert by_file.references[0].kind == "features"


def test_a_feature_file_of_another_probe_is_refused_before_training(tmp_path):
    path = tmp_path / "reference.pt"
    other = make_probe(seed=99)
    save_features(collect_activations(RefMLP(seed=1), other, LAYERS), path,
                  fingerprint=probe_fingerprint(other))
    with pytest.raises(ValueError, match="made from another probe"):
        _fit(tmp_path, [_cb(str(path))])


def test_features_with_another_number_of_rows_are_refused_before_training(tmp_path):
    features = {k: v[:50] for k, v in _reference_features().items()}
    with pytest.raises(ValueError, match="have 50 rows but the probe has 64"):
        _fit(tmp_path, [_cb(features)])


def test_reference_layers_select_features_and_unknown_ones_are_an_error():
    cb = _cb(_reference_features(), reference_layers=["fc2", "head"])
    assert list(cb.reference) == ["fc2", "head"]
    with pytest.raises(ValueError, match=r"^reference_layers: layer .fc9. matched none of the "
                                         r"\d layers of the reference's features"):
        _cb(_reference_features(), reference_layers=["fc9"])


def test_initial_is_perfect_alignment_at_epoch_0_then_drifts(tmp_path):
    cb = _cb("initial", measures=["linear_cka"])
    _fit(tmp_path, [cb], max_epochs=3, model=MLP(lr=0.5))
    first, last = cb.history[0], cb.history[-1]
    for layer in LAYERS:
        assert first[f"alignment/linear_cka/layer/{layer}/raw"] == pytest.approx(1.0, abs=1e-6)
        assert first[f"alignment/linear_cka/layer/{layer}/calibrated"] == pytest.approx(1.0, abs=1e-6)
    assert first["alignment/linear_cka/raw"] == pytest.approx(1.0, abs=1e-6)
    assert last["alignment/linear_cka/layer/head/raw"] < 1.0 - 1e-4  # the model moved
    assert cb.last_results["linear_cka"].x_names == LAYERS


def test_previous_compares_each_step_with_the_one_before(tmp_path):
    cb = _cb("previous", measures=["linear_cka"])
    _fit(tmp_path, [cb], max_epochs=3, model=MLP(lr=0.5))
    assert "alignment/linear_cka/raw" not in cb.history[0]  # nothing before the baseline
    assert all("alignment/linear_cka/raw" in h for h in cb.history[1:])
    # recomputed offline: epoch e's activations against epoch e-1's, per layer
    assert [h["epoch"] for h in cb.history] == [0, 1, 2, 3]


def test_several_references_equal_separate_callbacks(tmp_path):
    together = _cb({"teacher": RefMLP(seed=1), "init": "initial"})
    _fit(tmp_path / "together", [together])
    alone = [_cb(RefMLP(seed=1), log_prefix="a"), _cb("initial", log_prefix="b")]
    _fit(tmp_path / "alone", alone)
    for entry, a, b in zip(together.history, alone[0].history, alone[1].history):
        for m in MEASURES:
            for field in ("raw", "calibrated", "p_value", "threshold"):
                assert entry[f"alignment/teacher/{m}/{field}"] == a[f"a/{m}/{field}"]
                assert entry[f"alignment/init/{m}/{field}"] == b[f"b/{m}/{field}"]
    assert set(together.last_results) == {f"{r}/{m}" for r in ("teacher", "init") for m in MEASURES}


def test_per_reference_layers_and_inputs(tmp_path):
    wide = RefMLP(in_dim=5, seed=2)
    inputs = torch.cat([make_probe()[:, :3], make_probe(seed=7)[:, :2]], 1)
    cb = _cb({"narrow": RefMLP(seed=1), "wide": wide},
             reference_layers={"narrow": ["fc1"], "wide": ["fc2", "head"]},
             reference_inputs={"wide": inputs})
    _fit(tmp_path, [cb], max_epochs=1)
    assert cb.last_results["narrow/linear_cka"].y_names == ["fc1"]
    assert cb.last_results["wide/linear_cka"].y_names == ["fc2", "head"]


def _rng():
    return torch.get_rng_state(), np.random.get_state()[1].copy()


@pytest.mark.parametrize("reference", ["features", "initial", "previous", "several"])
def test_training_is_bitwise_identical_in_every_reference_mode(tmp_path, reference):
    spec = {"features": _reference_features(), "initial": "initial", "previous": "previous",
            "several": {"a": RefMLP(seed=1), "b": "initial"}}[reference]
    with_cb, _ = _fit(tmp_path / "with", [_cb(spec, log_heatmaps=True, verbose=True)], model=MLP(dropout=0.3))
    state_with = (dict(with_cb.lightning_module.named_parameters()), _rng())
    without, _ = _fit(tmp_path / "without", [], model=MLP(dropout=0.3))
    state_without = (dict(without.lightning_module.named_parameters()), _rng())
    for name, p in state_with[0].items():
        assert torch.equal(p, state_without[0][name]), name
    assert torch.equal(state_with[1][0], state_without[1][0])
    assert np.array_equal(state_with[1][1], state_without[1][1])
