"""Regression tests of audited bugs in the metric objects and the command line.

Metrics: ``index=`` on some updates only (or in a merged dict), ``clear_reference()`` keeping
stale rows, NaN/Inf errors that named neither side nor layer, ``forward`` on a NaN batch or in
another layer order, settings set after ``compute()`` ignored, a strict load of fewer layers,
``plot`` of a ``forward`` value.  Command line: ``--bootstrap`` ignoring ``--null``, ``--null
moments`` still warning about (and reporting) K permutations, a directory or a 1-D array given
as a feature file.
"""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor

import alignment_callback.functional as F
from alignment_callback.metrics import CalibratedAlignment, LayerAlignment
from alignment_callback.reporting import cli, compute
from alignment_callback.reporting.plan import warn_resolution

K = 19
N = 40
COMPUTE_BEFORE_UPDATE = "ignore:The ``compute`` method of metric"


def pair(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = x @ torch.randn(10, 7, generator=g) + 0.5 * torch.randn(n, 7, generator=g)
    return x, y


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metric(**kw) -> CalibratedAlignment:
    return CalibratedAlignment("linear_cka", num_permutations=K, seed=1, **kw)


def expected(x: Tensor, y: Tensor) -> F.CalibrationResult:
    return F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "linear_cka", K,
                                  seed=1)


def assert_same(out: dict[str, Tensor], ref) -> None:
    for key in ("raw", "calibrated", "p_value", "threshold"):
        torch.testing.assert_close(out[key], torch.as_tensor(getattr(ref, key)).to(out[key].dtype),
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- index= on some updates
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("index_first", [False, True])
def test_index_on_some_updates_only_raises(cached: bool, index_first: bool) -> None:
    """Ids for some batches only used to pair the wrong rows (cached reference) or drop rows."""
    x, y = pair()
    m = metric()
    if cached:
        m.set_reference(y)

    def update(sl: slice, with_index: bool) -> None:
        ids = torch.arange(N)[sl] if with_index else None
        if cached:
            m.update(x[sl], index=ids)
        else:
            m.update(x[sl], y[sl], index=ids)

    update(slice(0, 20), index_first)
    with pytest.raises(ValueError, match=r"index=.*pass index on every update\(\) or on none"):
        update(slice(20, N), not index_first)
    assert m._stored_rows("x") == 20  # the rejected batch stored nothing
    update(slice(20, N), index_first)  # consistent: accepted, and the result is all rows
    assert_same(m.compute(), expected(x, y))
    m.reset()  # a reset starts over: the other choice is fine now
    update(slice(0, N), not index_first)
    assert_same(m.compute(), expected(x, y))


def test_compute_refuses_index_count_other_than_rows() -> None:
    x, y = pair()
    m = metric()
    m.update(x[:20], y[:20], index=torch.arange(20))
    m.update(x[20:], y[20:], index=torch.arange(20, N))
    m.index.pop()  # ids of the first batch only (e.g. a hand-edited state dict)
    with pytest.raises(ValueError, match=f"20 sample ids .* {N} accumulated rows"):
        m.compute()  # used to calibrate on the first 20 rows, silently dropping the rest


# ------------------------------------------------------------------------------ clear_reference
def test_clear_reference_drops_rows_then_paired_updates_work() -> None:
    x, y = pair()
    m = metric()
    m.set_reference(y)
    m.update(x)
    m.clear_reference()
    assert not m.has_reference and m._stored_rows("x") == 0
    m.update(x, y)
    assert_same(m.compute(), expected(x, y))


def test_layer_alignment_clear_reference_then_paired_update() -> None:
    x, y = pair()
    la = LayerAlignment("linear_cka", num_permutations=K, seed=1)
    la.set_reference({"ref": y})
    la.update({"enc": x})
    la.clear_reference()
    la.update({"enc": x}, {"ref": y})
    out = la.compute()
    torch.testing.assert_close(out["raw"], expected(x, y).raw)


@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_compute_without_reference_side_is_a_clear_error() -> None:
    x, y = pair()
    m = metric()
    m.set_reference(y)
    m.update(x)
    m.clear_reference()
    with pytest.raises(RuntimeError, match=r"no accumulated rows.*clear_reference"):
        m.compute()
    # model rows without any reference side (a cached-reference state dict, no reference)
    m.set_reference(y)
    m.update(x)
    m.persistent(True)
    fresh = metric()
    fresh.persistent(True)
    with pytest.raises(RuntimeError, match=r"x rows without their reference side.*"
                                           r"call set_reference\(\) with that reference"):
        fresh.load_state_dict(m.state_dict())  # refused at the load now, not at compute()
    assert not fresh.update_called and fresh._stored_rows("x") == 0  # nothing loaded
    state = m.state_dict()
    del state["_layer_names"]  # a state dict saved before the names were: refused the same
    with pytest.raises(RuntimeError, match=r"x rows without their reference side"):
        fresh.load_state_dict(state)
    fresh.set_reference(y)  # as the message says
    fresh.load_state_dict(state)
    assert torch.equal(fresh.compute()["p_value"], m.compute()["p_value"])


# ---------------------------------------------------------------------------------- NaN / Inf
def test_nan_error_names_side_layer_and_update() -> None:
    x, y = pair()
    ys = {"ref0": y, "ref1": y.clone()}
    ys["ref1"][25, 2] = float("inf")  # in the second batch (rows 20..39)
    la = LayerAlignment("linear_cka", num_permutations=K)
    for sl in (slice(0, 20), slice(20, N)):
        la.update({"enc": x[sl]}, {k: v[sl] for k, v in ys.items()})
    with pytest.raises(ValueError, match=r"reference side \(y\) layer 'ref1' contains NaN/Inf "
                                         r"values in 1 of its 40 rows \(first: row 25, from "
                                         r"update\(\) call 2"):
        la.compute()
    xn = x.clone()
    xn[3, 0] = float("nan")
    m = metric()
    m.update(xn, y)
    with pytest.raises(ValueError, match=r"model side \(x\) layer 'x' contains NaN"):
        m.compute()
    with pytest.raises(ValueError, match=r"reference \(set_reference\) layer 'y' contains NaN"):
        metric().set_reference(xn)


def test_forward_on_nan_batch_returns_nan() -> None:
    x, y = pair()
    x[5, 1] = float("nan")
    m = metric()
    value = m(x[:20], y[:20])
    assert isinstance(value, Tensor) and value.dim() == 0 and torch.isnan(value)
    assert m(x[20:], y[20:]) is not None and not torch.isnan(m(x[20:], y[20:]))
    with pytest.raises(ValueError, match="NaN"):
        m.compute()


def test_callable_preprocess_may_handle_nan() -> None:
    """A callable ``preprocess`` sees the rows first: NaN it removes is no error."""
    x, y = pair()
    x[5, 1] = float("nan")

    def clean(t: Tensor) -> Tensor:
        return F.prepare_features(torch.nan_to_num(t))

    m = metric(preprocess=clean)
    value = m(x, y)
    assert value is not None and not torch.isnan(value)
    ref = F.calibrated_alignment(clean(x), clean(y), "linear_cka", K, seed=1)
    assert_same(m.compute(), ref)


# ------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_cli")
    x, y = pair(N, seed=5)
    torch.save({"h": x}, root / "a.pt")
    torch.save({"h": y}, root / "b.pt")
    np.save(root / "oned.npy", x[:, 0].numpy())
    for sub in ("dx", "dy"):
        (root / sub).mkdir()
        torch.save({"h": x}, root / sub / "a.pt")
        torch.save({"h": y}, root / sub / "b.pt")
    return root


def test_bootstrap_uses_the_chosen_null(files) -> None:
    from alignment_callback.functional.bootstrap import bootstrap_interval

    measures = {"linear_cka": F.get_measure("linear_cka")}
    xa = {"h": F.prepare_features(torch.load(files / "a.pt")["h"])}
    xb = {"h": F.prepare_features(torch.load(files / "b.pt")["h"])}
    cal = compute.Calibration(K, 0.05, "max", 0, bootstrap=3, null="moments")
    rec = compute.compare_pair(xa, xb, "a.pt", "b.pt", measures, cal)["linear_cka"]
    kw = {"num_bootstrap": 3, "confidence": 0.95, "seed": 0, "num_permutations": K,
          "alpha": 0.05, "fraction": 0.8, "aggregate": "max"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moments = bootstrap_interval(xa, xb, "linear_cka", null="moments", **kw)
        permuted = bootstrap_interval(xa, xb, "linear_cka", null="permutation", **kw)
    np.testing.assert_allclose(rec["bootstrap"]["replicates"], moments.replicates.numpy(),
                               rtol=1e-6)
    assert not np.allclose(moments.replicates.numpy(), permuted.replicates.numpy())


def test_warn_resolution_only_with_permutations(capsys) -> None:
    warn_resolution(K, 1, 0.01, "moments")
    assert capsys.readouterr().err == ""
    warn_resolution(K, 1, 0.01, "auto")
    assert "calibrates by permutations" in capsys.readouterr().err
    warn_resolution(K, 1, 0.01)
    assert "smallest p-value is 1/20" in capsys.readouterr().err


def test_compare_moments_no_permutation_claims(files, capsys, monkeypatch) -> None:
    monkeypatch.chdir(files)
    code = cli.main(["compare", "a.pt", "b.pt", "--measure", "linear_cka", "--null", "moments",
                     "--permutations", str(K), "--alpha", "0.01", "--out", "out_moments"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "smallest p-value" not in err
    rows = read_csv(files / "out_moments" / "alignment.csv")
    assert rows[0]["num_permutations"] == "" and rows[0]["null_method"] == "moments"
    code = cli.main(["compare", "a.pt", "b.pt", "--measure", "linear_cka", "--permutations",
                     str(K), "--out", "out_perm"])
    assert code == 0
    rows = read_csv(files / "out_perm" / "alignment.csv")
    assert rows[0]["num_permutations"] == str(K) and rows[0]["null_method"] == "permutation"


@pytest.mark.parametrize("null", ["moments", "auto"])
def test_matrix_report_names_the_null(files, capsys, monkeypatch, null: str) -> None:
    monkeypatch.chdir(files)
    out = f"out_matrix_{null}"
    code = cli.main(["matrix", "dx", "dy", "--measure", "linear_cka", "--null", null,
                     "--permutations", str(K), "--out", out])
    err = capsys.readouterr().err
    assert code == 0, err
    report = (files / out / "report.md").read_text()
    rows = read_csv(files / out / "matrix.csv")
    if null == "moments":
        assert "K (permutations)" not in report and "smallest p-value" not in err
        assert "null: moments: exact permutation moments" in report
        assert {r["null_method"] for r in rows} == {"moments"}
    else:
        assert f"K (permutations): {K}" in report
        used = sum(r["null_method"] == "moments" for r in rows)
        assert "null: auto: " in report and f"linear_cka {used} of 4" in report


def test_directory_and_1d_feature_files_are_refused(files, capsys, monkeypatch) -> None:
    monkeypatch.chdir(files)
    assert cli.main(["compare", "a.pt", "dx", "--out", "o"]) == 2
    assert "dx: is a directory, not a feature file" in capsys.readouterr().err
    assert cli.main(["compare", "oned.npy", "a.pt", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "oned.npy: layer 'features' is 1-D" in err and "2-D (n_samples, n_features)" in err


# ------------------------------------------------------------------ a later audit (8th session)
def _functional(x: Tensor, y: Tensor, measure: str, **kw):
    return F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), measure,
                                  num_permutations=K, **kw)


@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_forward_in_a_collection_with_compute_groups_stores_each_batch_once():
    """The compute group formed by update() shares one list per state between its metrics: each
    metric's forward() appended its batch to it, so every row was stored once per metric."""
    from torchmetrics import MetricCollection

    x, y = pair(60)
    c = MetricCollection({"cka": CalibratedAlignment("linear_cka", num_permutations=K),
                          "knn": CalibratedAlignment("mutual_knn", num_permutations=K, k=5)})
    c.update(x, y)
    assert c.compute_groups == {0: ["cka", "knn"]}  # the shared-state path is exercised
    c.compute()
    c.reset()
    c(x[:30], y[:30])
    c(x[30:], y[30:])
    assert c["cka"]._stored_rows("x") == c["knn"]._stored_rows("x") == 60
    out = c.compute()
    for key, measure, kw in (("cka", "linear_cka", {}), ("knn", "mutual_knn", {"k": 5})):
        expected = _functional(x, y, measure, **kw)
        assert float(out[f"{key}_raw"]) == pytest.approx(float(expected.raw), abs=1e-6)
        assert float(out[f"{key}_p_value"]) == float(expected.p_value)


def test_merge_state_checks_layers_and_fills_an_empty_metric():
    x, y = pair(60)
    a = LayerAlignment("linear_cka", num_permutations=K)
    a.update({"a": x[:30], "b": x[:30].tanh()}, {"c": y[:30]})
    other = LayerAlignment("linear_cka", num_permutations=K)
    other.update({"a": x[30:], "z": x[30:].tanh()}, {"c": y[30:]})
    with pytest.raises(ValueError, match=r"merge_state: the metrics hold different x layers"):
        a.merge_state(other)
    wide = LayerAlignment("linear_cka", num_permutations=K)
    wide.update({"a": x[30:], "b": torch.cat([x[30:], x[30:]], 1)}, {"c": y[30:]})
    with pytest.raises(ValueError, match=r"'b': 20"):
        a.merge_state(wide)
    fresh = LayerAlignment("linear_cka", num_permutations=K)
    fresh.merge_state(a)  # a metric without rows takes the incoming layers and rows
    assert fresh._stored_rows("x") == 30
    assert torch.equal(fresh.compute()["matrix"], a.compute()["matrix"])


def test_changing_seed_or_num_permutations_after_construction_takes_effect():
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=K, seed=0)
    m.update(x, y)
    m.compute()
    m.seed, m.num_permutations = 5, 3 * K
    m.reset()
    m.update(x, y)
    got = m.compute()
    expected = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "linear_cka",
                                      num_permutations=3 * K, seed=5)
    assert m.last_result.null.shape[-1] == 3 * K
    assert float(got["p_value"]) == float(expected.p_value)
    assert float(got["threshold"]) == pytest.approx(float(expected.threshold), abs=1e-7)


def test_changing_null_or_measure_after_compute_takes_effect():
    """null and measure are settings too: a result cached with the old value is not returned,
    and a cached reference gets the new measure's state."""
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=K, null="moments")
    m.set_reference(y)
    m.update(x)
    m.compute()
    m.null = "permutation"
    expected = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "linear_cka",
                                      num_permutations=K)
    assert float(m.compute()["p_value"]) == float(expected.p_value)
    m.measure = "mutual_knn"
    expected = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "mutual_knn",
                                      num_permutations=K)
    got = m.compute()
    assert float(got["raw"]) == pytest.approx(float(expected.raw), abs=1e-7)
    assert float(got["p_value"]) == float(expected.p_value)
    with pytest.raises(ValueError, match="null='moments' cannot calibrate mutual_knn"):
        m.null = "moments"  # refused as at construction, and the old value kept
    assert m.null == "permutation"
    with pytest.raises(ValueError, match="null must be one of"):
        m.null = "analytic"
    lin = CalibratedAlignment("linear_cka", num_permutations=K, null="moments")
    with pytest.raises(ValueError, match="cannot be used with groups"):
        lin.groups = [i % 4 for i in range(N)]
    assert lin.groups is None


def test_dist_sync_on_step_is_refused_with_the_reason():
    """forward() returns the local batch's uncalibrated score: torchmetrics' per-step sync was
    accepted and did nothing."""
    with pytest.raises(ValueError, match="dist_sync_on_step=True is not supported: forward"):
        CalibratedAlignment("linear_cka", dist_sync_on_step=True)
    with pytest.raises(ValueError, match="dist_sync_on_step=True is not supported"):
        LayerAlignment("linear_cka", dist_sync_on_step=True)
    CalibratedAlignment("linear_cka", num_permutations=K, dist_sync_on_step=False)


def test_string_group_labels_with_index():
    x, y = pair()
    groups = [f"g{i % 4}" for i in range(N)]
    expected = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "linear_cka",
                                      num_permutations=K, groups=groups)
    m = CalibratedAlignment("linear_cka", num_permutations=K, groups=groups)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    m.update(x[order], y[order], index=order)
    assert float(m.compute()["p_value"]) == float(expected.p_value)


def _gathered(value):
    """A state as torchmetrics hands it to dist_sync_fn: a tensor as is (the pooling marker),
    a list concatenated, an empty list as an empty tensor."""
    from torchmetrics.utilities import dim_zero_cat

    if isinstance(value, torch.Tensor):
        return value
    return dim_zero_cat(value) if len(value) else torch.tensor([])


def test_custom_dist_sync_fn_without_torch_distributed():
    """torchmetrics' hooks for another gather backend (dist_sync_fn, distributed_available_fn)
    work without torch.distributed: the rows of an emulated second process are gathered."""
    x, y = pair(60)
    a0 = CalibratedAlignment("linear_cka", num_permutations=K, distributed_available_fn=lambda: True)
    a1 = CalibratedAlignment("linear_cka", num_permutations=K)
    a0.update(x[:30], y[:30])
    a1.update(x[30:], y[30:])
    other = [_gathered(getattr(a1, s)) for s in a1._reductions]  # torchmetrics' order
    a0.dist_sync_fn = lambda t, group=None: [t, other.pop(0)]
    assert float(a0.compute()["raw"]) == pytest.approx(float(_functional(x, y, "linear_cka").raw),
                                                       abs=1e-6)


def test_width_check_after_load_state_dict_and_reset():
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=K)
    m.persistent(True)
    m.update(x, y)
    loaded = CalibratedAlignment("linear_cka", num_permutations=K)
    loaded.persistent(True)
    loaded.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match=r"x layer 'x' has \(7,\) features in this batch but 10"):
        loaded.update(x[:, :7], y)
    m.reset()  # no earlier batch since the reset: another width is fine
    m.update(x[:, :7], y)
    assert float(m.compute()["raw"]) == pytest.approx(
        float(_functional(x[:, :7], y, "linear_cka").raw), abs=1e-6)


@pytest.mark.filterwarnings(COMPUTE_BEFORE_UPDATE)
def test_empty_batches_and_0_dim_input():
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=K)
    m.update(torch.empty(0, 3), torch.empty(0, 7))  # no width learned from an empty batch
    with pytest.raises(RuntimeError, match="found no accumulated rows"):
        m.compute()
    m.update(x, y)
    assert m._stored_rows("x") == N
    with pytest.raises(ValueError, match=r"x layer 'x' is a 0-dim tensor"):
        m.update(torch.tensor(1.0), torch.tensor(2.0))


def test_matrix_bh_counts_a_p_value_equal_to_alpha(files, capsys, monkeypatch) -> None:
    """K = 19: the smallest p-value is 1/20 = alpha exactly; stored as float32 (0.0500000007)
    and read back in float64, the matrix's BH called every such pair not significant."""
    monkeypatch.chdir(files)
    code = cli.main(["matrix", "dx", "dy", "--measure", "linear_cka", "--permutations", str(K),
                     "--alpha", "0.05", "--out", "out_bh_alpha"])
    assert code == 0, capsys.readouterr().err
    rows = read_csv(files / "out_bh_alpha" / "matrix.csv")
    assert len(rows) == 4
    # every pair is aligned beyond all 19 permutations: p = 1/20 each, so BH's q = 4·p/4 = α
    assert all(float(r["p_value"]) == pytest.approx(1 / (K + 1)) for r in rows)
    assert all(r["significant_bh"] == "True" for r in rows)


def test_merge_state_with_empty_sides_and_empty_batches_keep_the_layer_checks():
    x, y = pair(60)
    full = LayerAlignment("linear_cka", num_permutations=K)
    full.update({"a": x[:30]}, {"c": y[:30]})
    full.merge_state(LayerAlignment("linear_cka", num_permutations=K))  # nothing to add
    assert full._stored_rows("x") == 30
    named = LayerAlignment("linear_cka", num_permutations=K, x_layers=["z"], y_layers=["c"])
    with pytest.raises(ValueError, match="merge_state: the metrics hold different x layers"):
        named.merge_state(full)  # no rows yet, but its layers are named
    empty_first = LayerAlignment("linear_cka", num_permutations=K)
    empty_first.update({"zz": x[:0]}, {"c": y[:0]})  # an empty batch still names the layers
    with pytest.raises(ValueError, match="do not match the first update"):
        empty_first.update({"a": x[:30]}, {"c": y[:30]})
    with pytest.raises(ValueError, match="features in this batch"):
        full.update({"a": x[:0, :3]}, {"c": y[:0]})  # an empty batch of another width


# ------------------------------------------------------- from an audit of the metrics (9th)
def test_compute_after_a_new_reference_merge_or_load_is_not_the_cached_result():
    """torchmetrics caches compute()'s result until the next update: a new set_reference, a
    merge_state or a load_state_dict returned the previous result (0.98 for a random
    reference)."""
    def metric():
        return CalibratedAlignment("linear_cka", num_permutations=19, preprocess=False)

    x, y = pair()
    other = torch.randn_like(y)
    expected = float(F.calibrated_alignment(x, other, "linear_cka", num_permutations=19).raw)
    m = metric()
    m.set_reference(y)
    m.update(x)
    aligned = float(m.compute()["raw"])
    m.set_reference(other)
    assert float(m.compute()["raw"]) == pytest.approx(expected, abs=1e-6) != aligned
    more = metric()
    more.update(x, y)
    before = float(more.compute()["raw"])
    half = metric()
    half.update(x[:20], other[:20])
    more.merge_state(half)
    assert float(more.compute()["raw"]) != before
    loaded, source = metric(), metric()
    for m in (loaded, source):
        m.persistent(True)
    loaded.update(x, y)
    loaded.compute()
    source.update(x, other)
    loaded.load_state_dict(source.state_dict())
    assert float(loaded.compute()["raw"]) == pytest.approx(expected, abs=1e-6)


def test_a_cached_reference_follows_the_order_of_y_layers():
    """The columns are labeled by y_layers; a reference given in another dict order kept its
    own, so the heatmap and best_pair named the wrong reference layer."""
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    ys = {"r1": x + 0.1 * torch.randn(50, 6), "r2": torch.randn(50, 6)}
    cached = LayerAlignment(num_permutations=19, x_layers=["a"], y_layers=["r2", "r1"])
    cached.set_reference(ys)
    cached.update({"a": x})
    paired = LayerAlignment(num_permutations=19, x_layers=["a"], y_layers=["r2", "r1"])
    paired.update({"a": x}, ys)
    assert torch.equal(cached.compute()["matrix"], paired.compute()["matrix"])
    assert cached.last_result.y_names == ["r2", "r1"]
    assert cached.last_result.best_pair == ("a", "r1")


def test_set_reference_refuses_rows_paired_with_their_own_reference():
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=19)
    m.update(x, y)
    with pytest.raises(ValueError, match=r"set_reference: .*update\(x, y\).*reset\(\)"):
        m.set_reference(torch.randn_like(y))
    m.reset()
    m.set_reference(y)  # fine after reset


@pytest.mark.parametrize("measure", ["linear_cka", "procrustes_similarity", "mutual_knn"])
def test_float64_model_rows_against_a_float32_cached_reference(measure):
    """The cached reference stayed float32: a raw dtype error for the SVD measures (also after
    set_dtype(float64)); the result now equals the paired metric's."""
    x, y = pair()
    cached = CalibratedAlignment(measure, num_permutations=19)
    cached.set_reference(y)
    cached.update(x.double())
    paired = CalibratedAlignment(measure, num_permutations=19)
    paired.update(x.double(), y.double())
    assert float(cached.compute()["raw"]) == pytest.approx(float(paired.compute()["raw"]),
                                                            abs=1e-6)
    assert cached.compute()["raw"].dtype == torch.float64


def test_max_samples_holds_inside_a_compute_group():
    """torchmetrics updates a compute group through its first metric, so the second one's
    max_samples was never checked (90 rows kept under max_samples=60)."""
    from torchmetrics import MetricCollection

    x, y = pair(90)
    coll = MetricCollection({"a": CalibratedAlignment("linear_cka", num_permutations=19),
                             "b": CalibratedAlignment("linear_cka", num_permutations=19,
                                                      max_samples=60)})
    for i in range(3):
        coll.update(x[30 * i:30 * (i + 1)], y[30 * i:30 * (i + 1)])
    with pytest.raises(ValueError, match="holds 90 rows, more than max_samples=60.*compute "
                                         "group"):
        coll.compute()


def test_an_all_zero_row_names_the_side_and_layer():
    x, y = pair()
    x[3] = 0.0
    m = LayerAlignment(num_permutations=19)
    m.update({"block2": x}, {"r": y})
    with pytest.raises(ValueError, match=r"model side \(x\) layer 'block2': 1 sample\(s\) have "
                                         "an all-zero"):
        m.compute()
    with pytest.raises(ValueError, match=r"reference \(set_reference\) layer 'block2'"):
        LayerAlignment(num_permutations=19).set_reference({"block2": x})


def test_groups_shorter_than_the_sample_ids_name_groups_and_index():
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=19, groups=[i // 2 for i in range(20)])
    m.set_reference(y)
    m.update(x[:30], index=torch.arange(30))
    with pytest.raises(ValueError, match=r"groups has 20 labels but index= holds sample id 29"):
        m.compute()


def test_max_samples_at_compute_counts_this_process_rows_only():
    """The compute-time check of max_samples (for compute groups) must not count the rows a
    distributed sync gathered from the other processes: 30 + 30 rows under max_samples=30."""
    x, y = pair(60)
    a0 = CalibratedAlignment("linear_cka", num_permutations=K, max_samples=30,
                             distributed_available_fn=lambda: True)
    a1 = CalibratedAlignment("linear_cka", num_permutations=K, max_samples=30)
    a0.update(x[:30], y[:30])
    a1.update(x[30:], y[30:])
    other = [_gathered(getattr(a1, s)) for s in a1._reductions]
    a0.dist_sync_fn = lambda t, group=None: [t, other.pop(0)]
    assert float(a0.compute()["raw"]) == pytest.approx(float(_functional(x, y, "linear_cka").raw),
                                                       abs=1e-6)


# ------------------------------------------------- rows that arrive without update()
@pytest.mark.parametrize("how", ["load_state_dict", "merge_state"])
def test_loaded_or_merged_rows_compute_without_warning_and_name_their_source(how):
    """Rows from ``load_state_dict`` / ``merge_state`` count as updated (torchmetrics' "compute
    called before update" warning was false there), and a ``max_samples`` refusal names them
    instead of blaming a MetricCollection that is not involved."""
    x, y = pair(120)
    source = CalibratedAlignment("linear_cka", num_permutations=K)
    source.persistent(True)
    source.update(x, y)
    expected = float(source.compute()["raw"])

    def receive(metric):
        if how == "load_state_dict":
            metric.load_state_dict(source.state_dict())
        else:
            metric.merge_state(source)
        return metric

    target = receive(CalibratedAlignment("linear_cka", num_permutations=K))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(target.compute()["raw"]) == expected
    small = receive(CalibratedAlignment("linear_cka", num_permutations=K, max_samples=50))
    with pytest.raises(ValueError, match=r"120 rows, more than max_samples=50 \(rows from "
                                         r"update\(\), merge_state\(\) or load_state_dict\(\)"):
        small.compute()


def test_forward_scores_the_batch_in_the_metric_s_layer_order():
    """A position-dependent aggregate ("the first pair"): forward() built the batch matrix in
    the batch dict's order, compute() in x_layers' order, so forward on all rows differed from
    compute's raw score."""
    x, y = pair()
    noise = torch.randn(N, 10, generator=torch.Generator().manual_seed(3))
    first = (lambda m: m[0, 0])  # noqa: E731
    m = LayerAlignment("linear_cka", aggregate=first, num_permutations=K,
                       x_layers=["good", "bad"], y_layers=["ref"])
    batch = m({"bad": noise, "good": x}, {"ref": y})
    assert float(batch) == pytest.approx(float(m.compute()["raw"]), abs=1e-6)
    assert float(batch) == pytest.approx(float(F.linear_cka(F.prepare_features(x),
                                                            F.prepare_features(y))), abs=1e-6)


@pytest.mark.parametrize("setting, value", [("seed", 7), ("num_permutations", 3 * K),
                                            ("alpha", 0.2)])
def test_a_setting_changed_after_compute_takes_effect_at_the_next_compute(setting, value):
    """torchmetrics caches compute()'s result until the next update: a seed (or K, or alpha)
    set after a compute() was ignored, so a loop over seeds got one p-value."""
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=K, seed=0)
    m.update(x, y)
    m.compute()
    setattr(m, setting, value)
    got = m.compute()
    expected = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y), "linear_cka",
                                      **{"num_permutations": K, "seed": 0, setting: value})
    assert m.last_result.null.shape[-1] == (value if setting == "num_permutations" else K)
    assert float(got["p_value"]) == float(expected.p_value)
    assert float(got["threshold"]) == pytest.approx(float(expected.threshold), abs=1e-7)
    with pytest.raises(ValueError, match=setting):
        setattr(m, setting, -1)


def test_merge_state_with_a_dict_checks_the_use_of_index():
    """A dict of raw states with sample ids merged into a metric whose rows have none (and a
    dict with fewer ids than rows) was accepted; compute() then blamed the updates."""
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=K)
    m.update(x[:20], y[:20])
    donor = CalibratedAlignment("linear_cka", num_permutations=K)
    donor.update(x[20:], y[20:], index=torch.arange(20, N))
    with pytest.raises(ValueError, match="sample ids"):
        m.merge_state({k: getattr(donor, k) for k in ("x0", "y0", "index")})
    with_ids = CalibratedAlignment("linear_cka", num_permutations=K)
    with_ids.update(x[:20], y[:20], index=torch.arange(20))
    with pytest.raises(ValueError, match="5 sample ids"):
        with_ids.merge_state({"x0": [x[20:]], "y0": [y[20:]], "index": [torch.arange(5)]})
    with_ids.merge_state({k: getattr(donor, k) for k in ("x0", "y0", "index")})
    expected = F.calibrated_alignment(F.prepare_features(x), F.prepare_features(y),
                                      "linear_cka", num_permutations=K)
    assert float(with_ids.compute()["p_value"]) == float(expected.p_value)


def test_a_strict_load_with_rows_of_fewer_layers_than_registered_is_refused():
    """torchmetrics takes the states it loads out of the state dict before the metric's own
    check, so rows of 2 layers loaded into a metric of 3 went through; compute() then failed
    with "No samples to concatenate"."""
    x, y = pair()
    saved = LayerAlignment("linear_cka", num_permutations=K)
    saved.persistent(True)
    saved.update({"p": x, "q": x[:, :3]}, {"r": y})
    state = saved.state_dict()
    three = LayerAlignment("linear_cka", num_permutations=K, x_layers=["p", "q", "s"],
                           y_layers=["r"])
    with pytest.raises(RuntimeError, match=r"rows of the x layers \['p', 'q'\] but this "
                                           r"LayerAlignment has \['p', 'q', 's'\]"):
        three.load_state_dict(state, strict=True)
    del state["_layer_names"]  # a state dict saved before the names were: slots counted
    with pytest.raises(RuntimeError, match=r"rows of 2 x layer\(s\) \(x0, x1\).* has 3"):
        three.load_state_dict(state, strict=True)
    state = saved.state_dict()
    two = LayerAlignment("linear_cka", num_permutations=K, x_layers=["p", "q"], y_layers=["r"])
    two.load_state_dict(state, strict=True)
    assert torch.equal(two.compute()["matrix"], saved.compute()["matrix"])


def test_plot_refuses_what_is_not_a_compute_result_clearly():
    """metric.plot(metric(x, y)), torchmetrics' idiom, failed with "iteration over a 0-d
    tensor"; a list for a heatmap with "'list' object has no attribute 'dim'"."""
    pytest.importorskip("matplotlib")
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=K)
    with pytest.raises(TypeError, match="compute\\(\\) result.*forward\\(\\) returns"):
        m.plot(m(x, y))
    with pytest.raises(TypeError, match="got list"):
        m.plot([0.5])
    layers = LayerAlignment("linear_cka", num_permutations=K)
    layers.update({"a": x}, {"r": y})
    with pytest.raises(TypeError, match="one compute\\(\\) result.*got list"):
        layers.plot([layers.compute()])


# -------------------------------------------------------------- state dicts and their pairing
def test_rows_paired_with_their_own_reference_are_refused_by_a_metric_caching_one():
    """A paired state (x and y rows) loaded or merged into a metric caching a reference went
    through, and compute() scored its x rows against the cached reference instead."""
    x, y = pair()
    paired = metric()
    paired.persistent(True)
    paired.update(x, y)
    cached = metric()
    cached.set_reference(pair(seed=1)[1])
    with pytest.raises(RuntimeError, match=r"holds y rows .* caches a reference"):
        cached.load_state_dict(paired.state_dict())
    with pytest.raises(ValueError, match=r"merge_state: the dict holds y rows .* caches a "
                                         r"reference"):
        cached.merge_state({"x0": [x], "y0": [y]})
    assert cached._stored_rows("x") == 0  # nothing loaded or merged
    cached.clear_reference()  # as the message says: then the rows load, with their own y
    cached.load_state_dict(paired.state_dict())
    assert_same(cached.compute(), expected(x, y))


def test_rows_are_loaded_by_layer_name():
    """Rows were loaded by slot (the i-th of the sorted names) whatever the names: rows of
    layers 'a', 'b' loaded into a metric of layers 'b', 'c' were labeled 'b', 'c'."""
    x, y = pair()
    saved = LayerAlignment("linear_cka", num_permutations=K)
    saved.persistent(True)
    saved.update({"a": x, "b": x[:, :3]}, {"p": y})
    other = LayerAlignment("linear_cka", num_permutations=K, x_layers=["b", "c"],
                           y_layers=["p"])
    with pytest.raises(RuntimeError, match=r"rows of the x layers \['a', 'b'\] but this "
                                           r"LayerAlignment has \['b', 'c'\]"):
        other.load_state_dict(saved.state_dict())
    same = LayerAlignment("linear_cka", num_permutations=K, x_layers=["b", "a"],
                          y_layers=["p"])  # the same names in another order: loaded by name
    same.load_state_dict(saved.state_dict())
    got, want = same.compute(), saved.compute()
    assert same.last_result.x_names == ["b", "a"]
    assert torch.equal(got["matrix"], want["matrix"].flip(0))


@pytest.mark.parametrize("bad", [torch.randn(N), torch.randn(6)])
def test_a_one_dimensional_reference_is_refused_as_update_refuses_it(bad):
    m = metric()
    with pytest.raises(ValueError, match=r"y layer 'y' is 1-D .*one sample is y\[None\]"):
        m.set_reference(bad)
    with pytest.raises(ValueError, match=r"y layer 'p' is 1-D"):
        LayerAlignment("linear_cka").set_reference({"p": bad})


@pytest.mark.parametrize("setting,value,message", [
    ("max_samples", "abc", "max_samples must be an integer >= 2"),
    ("max_samples", 1.5, "max_samples must be an integer >= 2"),
    ("groups", "abc", "groups must be a sequence of labels"),
    ("aggregate", "bogus", "aggregate must be"),
    ("max_score", "high", "max_score"),
])
def test_every_setting_assigned_after_construction_is_checked_as_the_constructor_checks_it(
        setting, value, message):
    m = metric()
    before = getattr(m, setting)
    with pytest.raises((ValueError, TypeError), match=message):
        setattr(m, setting, value)
    assert getattr(m, setting) == before  # the old value kept


@pytest.mark.parametrize("pool", ["flatten", "mean", "first", "last", "cls"])
@pytest.mark.parametrize("shape", [(7, 4), (3, 2, 2)], ids=["3d", "4d"])
def test_an_empty_batch_is_pooled_to_the_width_of_a_full_one(pool, shape):
    """A 0-row batch crashed update() for every pool but "flatten" (a reshape to -1 of 0
    elements is ambiguous); it is pooled to (0, d) and stores nothing."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, *shape, generator=g), torch.randn(N, 3, generator=g)
    full = F.pool_features(x, pool)
    assert F.pool_features(x[:0], pool).shape == (0, full.shape[1])
    m = metric(preprocess={"pool": pool})
    m.update(x[:0], y[:0])
    m.update(x, y)
    assert_same(m.compute(), expected(full, y))


def test_merging_a_metric_that_caches_another_reference_is_refused():
    """Its rows were paired with another reference: they were scored against this one."""
    x, y = pair()
    ours, theirs = metric(), metric()
    ours.set_reference(y)
    theirs.set_reference(pair(seed=1)[1])
    theirs.update(x)
    with pytest.raises(ValueError, match="merge_state: the metrics cache different references"):
        ours.merge_state(theirs)
    same = metric()
    same.set_reference(y)
    same.update(x)
    ours.merge_state(same)  # the same reference: merged
    assert_same(ours.compute(), expected(x, y))


@pytest.mark.parametrize("first", ["empty", "one token"])
def test_metrics_that_pool_differently_are_never_grouped(first):
    """torchmetrics groups metrics whose rows are equal after the first update: an empty first
    batch, or one of one token per row, pools to the same rows for "mean", "last" and "cls",
    and the later metrics then computed on the first one's rows."""
    from torchmetrics import MetricCollection

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 7, 4, generator=g), torch.randn(N, 3, generator=g)
    pools = ("mean", "last", "cls")
    collection = MetricCollection({p: metric(preprocess={"pool": p}) for p in pools})
    head = x[:0] if first == "empty" else x[:5, :1]
    collection.update(head, y[:len(head)])
    collection.update(x, y)
    assert len(collection.compute_groups) == 3
    out = collection.compute()
    for p in pools:
        rows = torch.cat([F.pool_features(head, p), F.pool_features(x, p)])
        want = expected(rows, torch.cat([y[:len(head)], y]))
        assert_same({k[len(p) + 1:]: v for k, v in out.items() if k.startswith(p + "_")}, want)
    same = MetricCollection({"a": metric(preprocess={"pool": "mean"}), "b": metric(
        preprocess={"pool": "mean"}, alpha=0.1)})
    same.update(x, y)
    assert len(same.compute_groups) == 1  # the same pooling still shares its rows


def test_merging_rows_pooled_another_way_is_refused():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 7, 4, generator=g), torch.randn(N, 3, generator=g)
    mean, last = metric(preprocess={"pool": "mean"}), metric(preprocess={"pool": "last"})
    last.update(x[:, :, :1], y)  # one feature per token: the widths agree
    mean.update(x[:, :, :1], y)
    with pytest.raises(ValueError, match=r"pool rows differently \(pool='mean' here, 'last'"):
        mean.merge_state(last)


def test_metrics_with_the_same_pool_callable_merge_and_share_a_group():
    """Each metric with a pool callable had a marker of its own: merging two with the same
    callable raised torchmetrics' 'Expected state variable pool_fn0'."""
    from torchmetrics import MetricCollection

    def first_token(t):  # the first token of x (n, 7, 4); y (n, 3) as it is
        return t.reshape(len(t), -1)[:, :4]

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 7, 4, generator=g), torch.randn(N, 3, generator=g)
    a, b = metric(preprocess={"pool": first_token}), metric(preprocess={"pool": first_token})
    a.update(x[:20], y[:20])
    b.update(x[20:], y[20:])
    b.merge_state(a)  # the incoming rows first: x[:20], then x[20:]
    assert_same(b.compute(), expected(x[:, 0], y))
    other = metric(preprocess={"pool": lambda t: t.reshape(len(t), -1)[:, -4:]})
    collection = MetricCollection({"a": metric(preprocess={"pool": first_token}),
                                   "b": metric(preprocess={"pool": first_token}, alpha=0.1),
                                   "c": other})
    collection.update(x, y)
    assert sorted(map(sorted, collection.compute_groups.values())) == [["a", "b"], ["c"]]
    mean = metric(preprocess={"pool": "mean"})
    mean.update(x, y)
    last = metric(preprocess={"pool": "last"})
    last.update(x, y)
    with pytest.raises(ValueError, match="the dict holds rows pooled another way"):
        mean.merge_state(last.metric_state)


def test_a_state_dict_of_rows_pooled_another_way_is_refused():
    """The pooling was not saved: rows pooled with "mean" loaded into a metric pooling with
    "last", whose later updates pooled their rows the other way (merge_state refused it)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 7, 4, generator=g), torch.randn(N, 3, generator=g)
    mean = metric(preprocess={"pool": "mean"})
    mean.persistent(True)
    mean.update(x, y)
    last = metric(preprocess={"pool": "last"})
    with pytest.raises(RuntimeError, match="pooled with pool='mean' but this CalibratedAlignment "
                                           "pools with pool='last'"):
        last.load_state_dict(mean.state_dict())
    assert last._stored_rows("x") == 0  # nothing loaded
    same = metric(preprocess={"pool": "mean"})
    same.load_state_dict(mean.state_dict())
    assert_same(same.compute(), expected(x.mean(1), y))
