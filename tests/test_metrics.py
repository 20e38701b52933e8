"""The torchmetrics objects (``CalibratedAlignment``, ``LayerAlignment``) against the functional API.

Every accumulated result must equal the functional call on the concatenated rows with the same
preprocessing and seed; the object-only features (cached reference, ``index=``, compute groups,
state_dict, ``compute_on_cpu``, ``max_samples``, ``forward``, plots) are checked on small data.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchmetrics import MetricCollection  # noqa: E402

import alignment_callback.functional as F  # noqa: E402
from tests import numpy_reference  # noqa: E402
from alignment_callback.metrics import CalibratedAlignment, LayerAlignment  # noqa: E402
from alignment_callback.metrics.calibrated_alignment import RESULT_KEYS  # noqa: E402

K = 30  # permutations: enough to exercise the null, cheap on 2 cores
N = 48
SIZES = (7, 13, 1, 19, 8)  # uneven batches, one of a single row; sums to N
KNN = ("mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn")
COMPUTE_BEFORE_UPDATE = "ignore:The ``compute`` method of metric"


def measure_kwargs(name: str) -> dict:
    if name in KNN:
        return {"k": 5}
    if name == "svcca":
        return {"cca_dim": 5}
    return {}


def pair(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Related (not identical) representations of different widths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = x @ torch.randn(12, 9, generator=g) + 0.7 * torch.randn(n, 9, generator=g)
    return x, y


def layers(n: int = N, seed: int = 1) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """2 model layers x 3 reference layers."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 10, generator=g)
    xs = {"enc": base @ torch.randn(10, 8, generator=g), "head": torch.randn(n, 6, generator=g)}
    ys = {
        f"ref{i}": base @ torch.randn(10, 7, generator=g) + s * torch.randn(n, 7, generator=g)
        for i, s in enumerate((0.3, 1.0, 3.0))
    }
    return xs, ys


def batches(n: int = N, sizes=SIZES):
    start = 0
    for s in sizes:
        yield slice(start, start + s)
        start += s
    assert start == n


def assert_result(out: dict[str, Tensor], ref, keys=RESULT_KEYS) -> None:
    for key in keys:
        expected = getattr(ref, key)
        torch.testing.assert_close(out[key], torch.as_tensor(expected, dtype=out[key].dtype),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def scalar_metric(name: str, **kw) -> CalibratedAlignment:
    return CalibratedAlignment(name, num_permutations=K, seed=kw.pop("seed", 3), **measure_kwargs(name), **kw)


# ------------------------------------------------------------------- equality with functional API
@pytest.mark.parametrize("name", sorted(numpy_reference.MEASURES))
def test_calibrated_alignment_matches_functional(name: str) -> None:
    x, y = pair()
    metric = scalar_metric(name, seed=3)
    for sl in batches():
        metric.update(x[sl], y[sl])
    out = metric.compute()
    assert set(out) == set(RESULT_KEYS)
    ref = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), name, K, seed=3,
                                 **measure_kwargs(name))
    assert_result(out, ref)
    torch.testing.assert_close(metric.last_result.null, ref.null)


@pytest.mark.parametrize("name", ["linear_cka", "mutual_knn", "rsa"])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_layer_alignment_matches_functional(name: str, aggregate: str) -> None:
    xs, ys = layers()
    metric = LayerAlignment(name, aggregate=aggregate, num_permutations=K, seed=5, **measure_kwargs(name))
    for sl in batches():
        metric.update({k: v[sl] for k, v in xs.items()}, {k: v[sl] for k, v in ys.items()})
    out = metric.compute()
    ref = F.calibrated_layer_alignment(
        {k: F.prepare_features(v) for k, v in xs.items()}, {k: F.prepare_features(v) for k, v in ys.items()},
        name, aggregate, K, seed=5, **measure_kwargs(name),
    )
    assert_result(out, ref, RESULT_KEYS + ("matrix", "pair_calibrated"))
    assert tuple(out["argmax"].tolist()) == ref.argmax
    assert out["matrix"].shape == (2, 3)
    assert metric.last_result.best_pair == ref.best_pair
    assert metric.x_layers == ["enc", "head"] and metric.y_layers == ["ref0", "ref1", "ref2"]


def test_single_layer_pair_matches_calibrated_alignment() -> None:
    """LayerAlignment with 1x1 layers takes the scalar path: same as CalibratedAlignment."""
    x, y = pair()
    la = LayerAlignment("linear_cka", num_permutations=K, seed=2)
    ca = CalibratedAlignment("linear_cka", num_permutations=K, seed=2)
    la.update({"a": x}, {"b": y})
    ca.update(x, y)
    a, c = la.compute(), ca.compute()
    for key in RESULT_KEYS:
        torch.testing.assert_close(a[key], c[key])


@pytest.mark.parametrize("name", ["linear_cka", "mutual_knn"])
def test_preprocess_false_matches_unnormalized(name: str) -> None:
    x, y = pair()
    x = 5.0 * x  # make the missing normalization visible
    metric = scalar_metric(name, preprocess=False)
    for sl in batches():
        metric.update(x[sl], y[sl])
    out = metric.compute()
    ref = F.calibrated_alignment(x, y, name, K, seed=3, **measure_kwargs(name))
    assert_result(out, ref)
    normalized = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), name, K, seed=3,
                                        **measure_kwargs(name))
    if name == "linear_cka":  # row norms change linear CKA, so the two must differ
        assert not torch.isclose(out["raw"], normalized.raw)


@pytest.mark.parametrize("name", ["linear_cka", "mutual_knn"])
def test_preprocess_clamp_quantile_matches_functional(name: str) -> None:
    x, y = pair()
    x[0, 0] = 40.0  # an outlier for the clamp to act on
    metric = scalar_metric(name, preprocess={"clamp_quantile": 0.95})
    for sl in batches():
        metric.update(x[sl], y[sl])
    out = metric.compute()
    ref = F.calibrated_alignment(F.prepare_features(x, clamp_quantile=0.95),
                                 F.prepare_features(y, clamp_quantile=0.95), name, K, seed=3,
                                 **measure_kwargs(name))
    assert_result(out, ref)


def test_layer_alignment_preprocess_false() -> None:
    xs, ys = layers()
    metric = LayerAlignment("linear_cka", num_permutations=K, seed=1, preprocess=False)
    metric.update(xs, ys)
    ref = F.calibrated_layer_alignment(xs, ys, "linear_cka", "max", K, seed=1)
    assert_result(metric.compute(), ref, RESULT_KEYS + ("matrix",))


# ------------------------------------------------------------------------------ cached reference
@pytest.mark.parametrize("name", ["linear_cka", "mutual_knn", "svcca"])
def test_cached_reference_equals_paired(name: str) -> None:
    x, y = pair()
    paired = scalar_metric(name)
    cached = scalar_metric(name)
    cached.set_reference(y)
    assert cached.has_reference
    for sl in batches():
        paired.update(x[sl], y[sl])
        cached.update(x[sl])
    expected = paired.compute()
    out = cached.compute()
    for key in RESULT_KEYS:
        torch.testing.assert_close(out[key], expected[key])


def test_cached_reference_index_shuffled_and_duplicated() -> None:
    """Rows in shuffled order with repeated ids (DistributedSampler padding) equal in-order rows."""
    x, y = pair()
    in_order = scalar_metric("mutual_knn")
    in_order.set_reference(y)
    in_order.update(x)
    expected = in_order.compute()

    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(N, generator=g)
    ids = torch.cat([perm, perm[:3]])  # 3 padded duplicates at the end
    shuffled = scalar_metric("mutual_knn")
    shuffled.set_reference(y)
    for sl in batches(N + 3, (10, 21, 17, 3)):
        shuffled.update(x[ids[sl]], index=ids[sl])
    out = shuffled.compute()
    for key in RESULT_KEYS:
        torch.testing.assert_close(out[key], expected[key])


def test_paired_index_shuffled_and_duplicated() -> None:
    """``index=`` works the same without a cached reference (both sides reordered together)."""
    x, y = pair()
    expected = scalar_metric("linear_cka")
    expected.update(x, y)
    g = torch.Generator().manual_seed(8)
    ids = torch.cat([torch.randperm(N, generator=g), torch.tensor([5, 6])])
    metric = scalar_metric("linear_cka")
    for sl in batches(N + 2, (25, 25)):
        metric.update(x[ids[sl]], y[ids[sl]], index=ids[sl])
    out, exp = metric.compute(), expected.compute()
    for key in RESULT_KEYS:
        torch.testing.assert_close(out[key], exp[key])


def test_cached_reference_index_subset() -> None:
    """A subset of ids selects the matching reference rows (prepared on the fly)."""
    x, y = pair()
    sub = torch.tensor([3, 1, 4, 15, 9, 26, 35, 8, 27, 46, 22, 41, 30, 2, 17, 11])
    metric = scalar_metric("linear_cka")
    metric.set_reference(y)
    metric.update(x[sub], index=sub)
    out = metric.compute()
    order = torch.sort(sub).values
    ref = F.calibrated_alignment(F.prepare_features(x[order]), F.prepare_features(y)[order],
                                 "linear_cka", K, seed=3)
    assert_result(out, ref)


def test_cached_reference_errors_and_reuse() -> None:
    x, y = pair()
    metric = scalar_metric("mutual_knn")
    with pytest.raises(ValueError, match="reference side"):
        metric.update(x)  # no reference cached: y is needed
    metric.set_reference(y)
    with pytest.raises(ValueError, match="cached"):
        metric.update(x, y)
    metric.update(x)
    first = metric.compute()
    state = metric._reference.states[metric.measure][0]
    feats = metric._reference.features[0]

    metric.reset()  # clears model rows, keeps the reference
    assert metric.has_reference
    x2 = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    metric.update(x2)
    second = metric.compute()
    assert metric._reference.states[metric.measure][0] is state
    assert metric._reference.features[0] is feats
    ref2 = F.calibrated_alignment(F.prepare_features(x2), F.prepare_features(y), "mutual_knn", K,
                                  seed=3, k=5)
    assert_result(second, ref2)
    assert not torch.equal(first["raw"], second["raw"])

    metric.reset()
    metric.update(x[:10])  # wrong number of rows without index=
    with pytest.raises(ValueError, match="cached reference has"):
        metric.compute()

    metric.clear_reference()
    assert not metric.has_reference


def test_layer_alignment_cached_reference() -> None:
    xs, ys = layers()
    paired = LayerAlignment("linear_cka", num_permutations=K, seed=1)
    paired.update(xs, ys)
    cached = LayerAlignment("linear_cka", num_permutations=K, seed=1)
    cached.set_reference(ys)
    for sl in batches():
        cached.update({k: v[sl] for k, v in xs.items()})
    out, exp = cached.compute(), paired.compute()
    for key in RESULT_KEYS + ("matrix", "pair_calibrated", "argmax"):
        torch.testing.assert_close(out[key], exp[key])


# ----------------------------------------------------------------------------- MetricCollection
def _three() -> dict[str, CalibratedAlignment]:
    return {
        "cka": CalibratedAlignment("linear_cka", num_permutations=K, seed=1),
        "knn": CalibratedAlignment("mutual_knn", num_permutations=K, seed=1, k=5),
        "rsa": CalibratedAlignment("rsa", num_permutations=K, seed=1),
    }


@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_metric_collection_compute_groups_and_reset() -> None:
    x, y = pair()
    collection = MetricCollection(_three())
    separate = _three()
    for sl in batches():
        collection.update(x[sl], y[sl])
        for m in separate.values():
            m.update(x[sl], y[sl])
    assert collection.compute_groups == {0: ["cka", "knn", "rsa"]}
    out = collection.compute()
    assert len(out) == 3 * len(RESULT_KEYS)
    for prefix, metric in separate.items():
        expected = metric.compute()
        for key in RESULT_KEYS:
            torch.testing.assert_close(out[f"{prefix}_{key}"], expected[key])

    collection.reset()
    for metric in collection.values():
        assert metric._stored_rows("x") == 0
    with pytest.raises(RuntimeError, match="no accumulated rows"):
        collection.compute()
    # usable again after reset
    collection.update(x, y)
    again = collection.compute()
    torch.testing.assert_close(again["cka_raw"], out["cka_raw"])


@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_compute_before_update_is_a_clear_error() -> None:
    for metric in (CalibratedAlignment("linear_cka", num_permutations=K), LayerAlignment(num_permutations=K)):
        with pytest.raises(RuntimeError, match="no accumulated rows"):
            metric.compute()


# ---------------------------------------------------------------------------------- state_dict
@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_state_dict_round_trip_calibrated() -> None:
    x, y = pair()
    metric = scalar_metric("mutual_knn")
    metric.persistent(True)
    for sl in batches():
        metric.update(x[sl], y[sl], index=torch.arange(N)[sl])
    state = metric.state_dict()
    assert {"x0", "y0", "index"} <= set(state)
    fresh = scalar_metric("mutual_knn")
    fresh.load_state_dict(state)
    out, exp = fresh.compute(), metric.compute()
    for key in RESULT_KEYS:
        torch.testing.assert_close(out[key], exp[key])


@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_state_dict_round_trip_layers_registered_lazily() -> None:
    """persistent(True) before the first update also covers the layer states it creates."""
    xs, ys = layers()
    metric = LayerAlignment("linear_cka", num_permutations=K, seed=1)
    metric.persistent(True)
    for sl in batches():
        metric.update({k: v[sl] for k, v in xs.items()}, {k: v[sl] for k, v in ys.items()})
    state = metric.state_dict()
    assert {"x0", "x1", "y0", "y1", "y2"} <= set(state)
    fresh = LayerAlignment("linear_cka", num_permutations=K, seed=1, x_layers=list(xs), y_layers=list(ys))
    fresh.load_state_dict(state)
    out, exp = fresh.compute(), metric.compute()
    for key in RESULT_KEYS + ("matrix", "argmax"):
        torch.testing.assert_close(out[key], exp[key])


def test_state_dict_not_persistent_by_default() -> None:
    x, y = pair()
    metric = scalar_metric("linear_cka")
    metric.update(x, y)
    assert not {"x0", "y0"} & set(metric.state_dict())


# ------------------------------------------------ compute_on_cpu, max_samples, forward, validation
def test_compute_on_cpu_keeps_states_on_cpu() -> None:
    x, y = pair()
    metric = scalar_metric("linear_cka", compute_on_cpu=True)
    for sl in batches():
        metric.update(x[sl], y[sl])
    for state in (metric.x0, metric.y0):
        items = state if isinstance(state, list) else [state]
        assert items and all(t.device.type == "cpu" for t in items)
    ref = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "linear_cka", K, seed=3)
    assert_result(metric.compute(), ref)


def test_max_samples_exceeded_raises() -> None:
    x, y = pair()
    metric = scalar_metric("linear_cka", max_samples=30)
    metric.update(x[:20], y[:20])
    metric.update(x[20:30], y[20:30])  # exactly at the bound is fine
    with pytest.raises(ValueError, match="max_samples"):
        metric.update(x[30:31], y[30:31])
    assert metric._stored_rows("x") == 30  # the rejected batch was not stored
    with pytest.raises(ValueError, match="max_samples"):
        scalar_metric("linear_cka", max_samples=1)

    la = LayerAlignment("linear_cka", num_permutations=K, max_samples=10)
    xs, ys = layers()
    with pytest.raises(ValueError, match="max_samples"):
        la.update({k: v[:11] for k, v in xs.items()}, {k: v[:11] for k, v in ys.items()})


@pytest.mark.parametrize("name", ["linear_cka", "mutual_knn"])
def test_forward_returns_batch_score_and_accumulates(name: str) -> None:
    x, y = pair()
    metric = scalar_metric(name)
    measure = F.get_measure(name, **measure_kwargs(name))
    for sl in batches(N, (16, 20, 12)):
        value = metric(x[sl], y[sl])
        expected = measure(F.prepare_features(x[sl]), F.prepare_features(y[sl]))
        torch.testing.assert_close(value, expected)
    ref = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), name, K, seed=3,
                                 **measure_kwargs(name))
    assert_result(metric.compute(), ref)


def test_forward_small_batch_returns_none_but_accumulates() -> None:
    x, y = pair()
    metric = scalar_metric("mutual_knn")  # k = 5 needs more than 5 rows
    assert metric(x[:4], y[:4]) is None
    assert metric(x[4:5], y[4:5]) is None
    assert metric(x[5:], y[5:]) is not None
    ref = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "mutual_knn", K, seed=3, k=5)
    assert_result(metric.compute(), ref)


def test_forward_cached_reference_returns_none() -> None:
    x, y = pair()
    metric = scalar_metric("linear_cka")
    metric.set_reference(y)
    assert metric(x) is None
    assert metric._stored_rows("x") == N


def test_layer_forward_returns_batch_aggregate() -> None:
    xs, ys = layers()
    metric = LayerAlignment("linear_cka", aggregate="mean", num_permutations=K)
    sl = slice(0, 24)
    value = metric({k: v[sl] for k, v in xs.items()}, {k: v[sl] for k, v in ys.items()})
    expected = torch.stack([
        F.linear_cka(F.prepare_features(a[sl]), F.prepare_features(b[sl]))
        for a in xs.values() for b in ys.values()
    ]).mean()
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("preprocess", [True, False])
def test_nan_rows_raise_at_compute(preprocess: bool) -> None:
    x, y = pair()
    x[5, 3] = float("nan")
    metric = scalar_metric("linear_cka", preprocess=preprocess)
    metric.update(x, y)
    with pytest.raises(ValueError, match="NaN"):
        metric.compute()


def test_row_mismatch_raises() -> None:
    x, y = pair()
    metric = scalar_metric("linear_cka")
    with pytest.raises(ValueError, match="same number of samples"):
        metric.update(x[:5], y[:6])
    la = LayerAlignment(num_permutations=K)
    xs, ys = layers()
    with pytest.raises(ValueError, match="same number of samples"):
        la.update({k: v[:5] for k, v in xs.items()}, {k: v[:6] for k, v in ys.items()})
    with pytest.raises(ValueError, match="different numbers of rows"):
        la.update({"enc": xs["enc"][:5], "head": xs["head"][:6]}, ys)
    with pytest.raises(ValueError, match="index has"):
        metric.update(x[:5], y[:5], index=torch.arange(4))
    # a rejected batch stores nothing: no partial rows on either side
    assert metric._stored_rows("x") == metric._stored_rows("y") == 0 and not metric.index
    assert not la.x_layers or la._stored_rows("x") == 0
    metric.update(x, y)
    ref = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "linear_cka", K, seed=3)
    assert_result(metric.compute(), ref)


def test_unpoolable_batch_stores_nothing() -> None:
    x, y = pair()
    metric = scalar_metric("linear_cka", preprocess=False)  # rows must already be 2-D
    metric.update(x[:10], y[:10])
    with pytest.raises(ValueError, match="2-D"):
        metric.update(x[10:20], y[10:20].reshape(10, 3, 3))
    assert metric._stored_rows("x") == metric._stored_rows("y") == 10


def test_layer_names_must_match_first_update() -> None:
    xs, ys = layers()
    la = LayerAlignment(num_permutations=K)
    la.update(xs, ys)
    with pytest.raises(ValueError, match="do not match"):
        la.update({"enc": xs["enc"]}, ys)


# ----------------------------------------------------------------------------------------- plots
def test_plot_calibrated_single_and_history() -> None:
    x, y = pair()
    metric = scalar_metric("linear_cka")
    metric.update(x, y)
    fig, ax = metric.plot()
    assert fig is ax.get_figure() and ax.get_lines()
    plt.close(fig)
    history = [metric.compute(), metric.compute()]
    fig, ax = metric.plot(history)
    assert len(ax.get_lines()[-1].get_xdata()) == 2
    plt.close(fig)
    fig0, ax0 = plt.subplots()
    fig, ax = metric.plot(history[0], ax=ax0)
    assert ax is ax0 and fig is fig0
    plt.close(fig0)


def test_plot_layer_heatmap() -> None:
    xs, ys = layers()
    metric = LayerAlignment("linear_cka", num_permutations=K)
    metric.update(xs, ys)
    fig, ax = metric.plot()
    assert ax.images and ax.images[0].get_array().shape == (2, 3)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["enc", "head"]
    plt.close(fig)
    fig, ax = metric.plot(metric.compute()["matrix"])
    plt.close(fig)
    # the box is the best pair whatever the aggregate (the title said "mean outlined")
    metric = LayerAlignment("linear_cka", num_permutations=K, aggregate="mean")
    metric.update(xs, ys)
    out = metric.compute()
    fig, ax = metric.plot(out)
    assert ax.get_title() == "linear_cka: raw, best pair outlined"
    (box,) = [p for p in ax.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    flat = int(out["matrix"].argmax())
    assert box.get_xy() == (flat % 3 - 0.5, flat // 3 - 0.5)
    plt.close(fig)


def test_plot_layer_heatmap_of_a_single_pair() -> None:
    xs, ys = layers()
    metric = LayerAlignment("linear_cka", num_permutations=K)
    metric.update({"head": xs["head"]}, {"out": next(iter(ys.values()))})
    out = metric.compute()
    assert out["matrix"].dim() == 0 and metric.last_result.matrix.shape == (1, 1)
    for val in (None, out, out["matrix"]):
        fig, ax = metric.plot(val)
        assert ax.images[0].get_array().shape == (1, 1)
        assert float(ax.images[0].get_array()[0, 0]) == pytest.approx(float(out["matrix"]))
        plt.close(fig)
