"""``null=`` of ``AlignmentCallback`` and ``LayerAlignment``: the method each result records
(``null_method``) and values equal to ``functional.calibrated_alignment`` /
``calibrated_layer_alignment`` with the same ``null`` on the same features: those the callback
captured at each step (recorded at the engine's door), or the rows given to the metric."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import alignment_callback.functional as F
from alignment_callback import AlignmentCallback
from alignment_callback.functional import moments as mo
from alignment_callback.functional.neighbors import neighbor_lists
from alignment_callback.hooks import collect_activations
from alignment_callback.metrics import LayerAlignment
from tests.helpers import (
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
LOGGED = ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std", "effect_size")
SCALARS = ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std", "effect_size",
           "percentile")


def _callback(**kw):
    kw.setdefault("num_permutations", K)
    kw.setdefault("log_heatmaps", False)
    kw.setdefault("verbose", False)
    kw.setdefault("report", False)
    reference = kw.pop("reference", None) or RefMLP(seed=1)
    return AlignmentCallback(reference, make_probe(), kw.pop("layers", LAYERS), **kw)


def _fit(tmp_path, callbacks, max_epochs=1, model=None):
    model = model if model is not None else MLP()
    trainer = pl.Trainer(max_epochs=max_epochs, logger=CSVLogger(tmp_path, name="csv"),
                         callbacks=callbacks, enable_checkpointing=False, **FAST_TRAINER)
    trainer.fit(model, train_loader())
    return trainer, model


class Recorder:
    """Keeps (copies of) the raw activations the callback hands its engine: the reference's
    once, the model's at every step."""

    def __init__(self, cb: AlignmentCallback, monkeypatch) -> None:
        self.reference: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []
        engine = cb.engine
        set_reference, step = engine.set_reference, engine.step

        def record_reference(layers):
            self.reference = {k: v.detach().clone() for k, v in layers.items()}
            return set_reference(layers)

        def record_step(layers, *args, **kwargs):
            self.steps.append({k: v.detach().clone() for k, v in layers.items()})
            return step(layers, *args, **kwargs)

        monkeypatch.setattr(engine, "set_reference", record_reference)
        monkeypatch.setattr(engine, "step", record_step)

    def features(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Step i's model features and the reference's, preprocessed as the callback's default
        (L2-normalized rows) by the public function."""
        def prep(layers):
            return {k: F.prepare_features(v) for k, v in layers.items()}

        return prep(self.steps[i]), prep(self.reference)


def _check_step(entry: dict, expected: dict, prefix: str = "alignment") -> None:
    for name, res in expected.items():
        for field in LOGGED:
            assert entry[f"{prefix}/{name}/{field}"] == float(getattr(res, field)), (name, field)
        assert entry[f"{prefix}/{name}/null_method"] == res.null_method, name


# ------------------------------------------------------------------------------- callback
def test_callback_moments_null_on_one_layer_pair(tmp_path, monkeypatch):
    cb = _callback(layers=["fc2"], measures=["linear_cka"], null="moments")
    rec = Recorder(cb, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # n = 64, validated range: no warning
        trainer, model = _fit(tmp_path, [cb])
    assert [h["epoch"] for h in cb.history] == [0, 1] and len(rec.steps) == 2
    assert cb.engine.null == "moments"
    # the recorder saw the model's activations: the final ones equal an offline probe pass
    offline = collect_activations(model, make_probe(), ["fc2"], pool="mean")
    torch.testing.assert_close(rec.steps[-1]["fc2"], offline["fc2"])
    for i, entry in enumerate(cb.history):
        xs, ys = rec.features(i)
        expected = F.calibrated_alignment(xs["fc2"], ys["fc2"], "linear_cka", K, null="moments")
        assert expected.null_method == "moments"
        _check_step(entry, {"linear_cka": expected})
        # a p-value no K = 30 permutations could give: the analytic null was used
        assert entry["alignment/linear_cka/p_value"] < 1.0 / (K + 1)
    last = cb.last_results["linear_cka"]
    assert last.null_method == "moments" and last.null.numel() == 0
    for field in SCALARS:
        assert float(getattr(last, field)) == float(getattr(expected, field)), field
    rows = alignment_rows(csv_metrics_file(trainer.logger))
    assert len(rows) == 2
    for row, entry in zip(rows, cb.history):
        for field in LOGGED:
            key = f"alignment/linear_cka/{field}"
            assert float(row[key]) == pytest.approx(entry[key], rel=1e-6, abs=1e-30), key


def test_callback_auto_null_on_one_layer_pair_gram_and_knn(tmp_path, monkeypatch):
    """``"auto"``: linear CKA on one pair in the validated range uses the moments; mutual kNN
    keeps its permutation test and reports the exact mean and std."""
    cb = _callback(layers=["fc2"], measures={"linear_cka": {}, "mutual_knn": {"k": 5}},
                   null="auto")
    rec = Recorder(cb, monkeypatch)
    _fit(tmp_path, [cb])
    assert [h["epoch"] for h in cb.history] == [0, 1]
    for i, entry in enumerate(cb.history):
        xs, ys = rec.features(i)
        expected = {name: F.calibrated_alignment(xs["fc2"], ys["fc2"], name, K, null="auto", **kw)
                    for name, kw in (("linear_cka", {}), ("mutual_knn", {"k": 5}))}
        assert expected["linear_cka"].null_method == "moments"
        assert expected["mutual_knn"].null_method == "permutation (exact mean)"
        _check_step(entry, expected)
        assert entry["alignment/mutual_knn/null_mean"] == pytest.approx(5 / 63, rel=1e-6)
    for name, res in expected.items():
        last = cb.last_results[name]
        assert last.null_method == res.null_method
        assert last.null.numel() == (0 if name == "linear_cka" else K)
        for field in SCALARS:
            assert float(getattr(last, field)) == float(getattr(res, field)), (name, field)
    # mutual kNN's std: the exact permutation std of the last step's neighbor graphs
    xs, ys = rec.features(len(cb.history) - 1)
    m = mo.mutual_knn_moments(mo.knn_graph_invariants(neighbor_lists(xs["fc2"], 5, "x").indices),
                              mo.knn_graph_invariants(neighbor_lists(ys["fc2"], 5, "y").indices))
    assert float(cb.last_results["mutual_knn"].null_std) == pytest.approx(m.std, rel=1e-6)


def test_callback_auto_null_over_several_layer_pairs_uses_permutations(tmp_path, monkeypatch):
    cb = _callback(measures=["linear_cka"], null="auto")
    rec = Recorder(cb, monkeypatch)
    _fit(tmp_path, [cb])
    assert [h["epoch"] for h in cb.history] == [0, 1]
    for i, entry in enumerate(cb.history):
        xs, ys = rec.features(i)
        expected = F.calibrated_layer_alignment(xs, ys, "linear_cka", num_permutations=K,
                                                null="auto")
        plain = F.calibrated_layer_alignment(xs, ys, "linear_cka", num_permutations=K)
        assert expected.null_method == "permutation" and torch.equal(expected.null, plain.null)
        _check_step(entry, {"linear_cka": expected})
        assert entry["alignment/linear_cka/p_value"] >= 1.0 / (K + 1) - 1e-7  # float32
    last = cb.last_results["linear_cka"]
    assert last.null_method == "permutation" and last.null.shape == (K,)
    torch.testing.assert_close(last.null, expected.null, rtol=0, atol=0)
    torch.testing.assert_close(last.matrix, expected.matrix, rtol=0, atol=0)


@pytest.mark.parametrize("kw,match", [
    ({"layers": ["fc2"], "measures": ["mutual_knn"]}, "null='moments' cannot calibrate mutual_knn"),
    ({"layers": LAYERS, "measures": ["linear_cka"]},
     r"null='moments' calibrates one layer pair, but 9 pairs were chosen \(3 model layer\(s\) "
     r"× 3 reference layer\(s\)\)"),
    ({"layers": LAYERS, "measures": ["linear_cka"], "reference": "initial"},
     r"null='moments' calibrates one layer pair, but 3 pairs were chosen \(3 layers, each "
     r"against its own earlier activations\)"),
], ids=["knn-measure", "several-pairs", "several-layers-drift"])
def test_callback_moments_where_they_cannot_apply_fails_before_training(tmp_path, kw, match):
    """A configuration mistake: refused when the callback is made (the measure) or at setup
    (the layers), before any training step."""
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, [_callback(null="moments", **kw)], model=model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no step ran


# ------------------------------------------------------------------------- LayerAlignment
def _pair(n=96, d=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) + 0.5  # not normalized: preprocess does it
    y = 0.3 * x[:, :d] @ torch.randn(d, d, generator=g, dtype=dtype) + torch.randn(
        n, d, generator=g, dtype=dtype)
    return x, y


def _update_in_batches(metric, xs, ys=None, size=40):
    n = next(iter(xs.values())).shape[0]
    for s in range(0, n, size):
        metric.update({k: v[s:s + size] for k, v in xs.items()},
                      None if ys is None else {k: v[s:s + size] for k, v in ys.items()})


def _assert_result_equals(out: dict, expected, exact: bool = True) -> None:
    for field in SCALARS:
        got, want = float(out[field]), float(getattr(expected, field))
        if exact:
            assert got == want, field
        else:
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), field


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_alignment_moments_null(dtype):
    x, y = _pair(dtype=dtype)
    metric = LayerAlignment("linear_cka", null="moments", num_permutations=K)
    _update_in_batches(metric, {"a": x}, {"b": y})
    out = metric.compute()
    expected = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "linear_cka",
                                      K, null="moments")
    assert metric.last_result.null_method == expected.null_method == "moments"
    assert metric.last_result.null.numel() == 0
    _assert_result_equals(out, expected)
    assert metric.last_result.matrix.shape == (1, 1)
    assert float(metric.last_result.matrix[0, 0]) == float(out["matrix"]) == float(expected.raw)
    assert float(out["p_value"]) < 1.0 / (K + 1)  # not a permutation p-value
    # the same with a cached reference, and again after reset() with other model rows
    cached = LayerAlignment("linear_cka", null="moments", num_permutations=K)
    cached.set_reference({"b": y})
    _update_in_batches(cached, {"a": x})
    _assert_result_equals(cached.compute(), expected)
    cached.reset()
    x2 = x.flip(0)
    _update_in_batches(cached, {"a": x2})
    expected2 = F.calibrated_alignment(F.prepare_features(x2), F.prepare_features(y),
                                       "linear_cka", K, null="moments")
    _assert_result_equals(cached.compute(), expected2)
    assert cached.last_result.null_method == "moments"


def test_layer_alignment_auto_null():
    x, y = _pair(seed=1)
    px, py = F.prepare_features(x), F.prepare_features(y)
    # one pair in the validated range: the moments
    one = LayerAlignment("linear_cka", null="auto", num_permutations=K)
    _update_in_batches(one, {"a": x}, {"b": y})
    expected = F.calibrated_alignment(px, py, "linear_cka", K, null="auto")
    assert expected.null_method == "moments"
    _assert_result_equals(one.compute(), expected)
    assert one.last_result.null_method == "moments"
    # two model layers: the aggregate's joint permutation null
    xs = {"a": x, "c": torch.tanh(x[:, :6])}
    many = LayerAlignment("linear_cka", null="auto", num_permutations=K)
    _update_in_batches(many, xs, {"b": y})
    out = many.compute()
    pxs = {k: F.prepare_features(v) for k, v in xs.items()}
    expected = F.calibrated_layer_alignment(pxs, {"b": py}, "linear_cka", num_permutations=K,
                                            null="auto")
    plain = F.calibrated_layer_alignment(pxs, {"b": py}, "linear_cka", num_permutations=K)
    assert many.last_result.null_method == expected.null_method == "permutation"
    assert torch.equal(many.last_result.null, expected.null)
    assert torch.equal(expected.null, plain.null)
    _assert_result_equals(out, expected)
    torch.testing.assert_close(out["matrix"], expected.matrix, rtol=0, atol=0)
    assert float(out["p_value"]) >= 1.0 / (K + 1)


def test_layer_alignment_knn_null():
    x, y = _pair(seed=2)
    px, py = F.prepare_features(x), F.prepare_features(y)
    auto = LayerAlignment("mutual_knn", k=5, null="auto", num_permutations=K)
    _update_in_batches(auto, {"a": x}, {"b": y})
    out = auto.compute()
    expected = F.calibrated_alignment(px, py, "mutual_knn", K, null="auto", k=5)
    assert auto.last_result.null_method == expected.null_method == "permutation (exact mean)"
    _assert_result_equals(out, expected)
    m = mo.mutual_knn_moments(mo.knn_graph_invariants(neighbor_lists(px, 5, "x").indices),
                              mo.knn_graph_invariants(neighbor_lists(py, 5, "y").indices))
    assert float(out["null_mean"]) == pytest.approx(5 / 95, rel=1e-12)
    assert float(out["null_std"]) == pytest.approx(m.std, rel=1e-12)
    with pytest.raises(ValueError, match="null='moments' cannot calibrate mutual_knn"):
        LayerAlignment("mutual_knn", k=5, null="moments", num_permutations=K)  # when made
    with pytest.raises(ValueError, match="null must be one of"):
        LayerAlignment("linear_cka", null="analytic")
