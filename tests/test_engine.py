"""The engine shares work: each layer is prepared once per step for every measure, kNN measures
share one neighbor search per layer (built for the largest k), the reference is prepared once
per fit, and the permutations are drawn once."""

from __future__ import annotations

import warnings

import pytest
import torch

from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional import neighbors, permutation, preprocessing

KNN = {"mutual_knn": {"k": 5}, "cknna": {"k": 10}, "cycle_knn": {"k": 5}}


def _layers(prefix: str, count: int, n: int = 60, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}{i}": torch.randn(n, 6 + i, generator=g) for i in range(count)}


def test_neighbor_search_runs_once_per_layer_whatever_the_number_of_knn_measures(monkeypatch):
    calls = []
    real = neighbors.knn
    monkeypatch.setattr(neighbors, "knn", lambda x, k, keys=None: (calls.append(k), real(x, k, keys))[1])
    engine = AlignmentEngine({**KNN, "linear_cka": {}}, num_permutations=20)
    engine.set_reference(_layers("r", 3))
    assert calls == [10, 10, 10]  # once per reference layer, for the largest k
    for step in range(2):
        engine.step(_layers("m", 4, seed=step + 1), step=step)
    assert calls == [10] * (3 + 2 * 4)  # once per model layer per step


def test_permutations_are_drawn_once_per_fit(monkeypatch):
    draws = []
    real = permutation.iter_permutations
    monkeypatch.setattr(permutation, "iter_permutations",
                        lambda *a, **k: (draws.append(a[:3]), real(*a, **k))[1])
    engine = AlignmentEngine(["linear_cka", "mutual_knn", "cknna"], num_permutations=20)
    engine.set_reference(_layers("r", 2))
    for step in range(3):
        engine.step(_layers("m", 2, seed=step + 1))
    assert draws == [(60, 20, 0)]


def test_permutation_settings_changed_after_construction_are_used():
    """seed / num_permutations set on the engine between steps draw the set again: the null
    then equals a fresh engine's, not the one drawn at set_reference."""
    ref, model = _layers("r", 1), _layers("m", 1, seed=3)
    engine = AlignmentEngine(["linear_cka"], num_permutations=20)
    engine.set_reference(ref)
    engine.step(model)
    engine.seed, engine.num_permutations = 7, 30
    got = engine.step(model).results["linear_cka"]
    fresh = AlignmentEngine(["linear_cka"], num_permutations=30, seed=7)
    fresh.set_reference(ref)
    expected = fresh.step(model).results["linear_cka"]
    assert got.null.shape == (30,)
    assert torch.equal(got.null, expected.null)


@pytest.mark.parametrize("change", ["measures", "null"])
def test_measures_or_null_set_after_set_reference_are_used_at_the_next_step(change):
    """Measures (given as a list, resolved like the constructor's) or the null set on the
    engine after set_reference() prepare the cached reference for them at the next step: the
    results equal a fresh engine's, and measures no longer computed drop their states."""
    layers = 2 if change == "measures" else 1  # one pair: the moments null's feature route
    ref, model = _layers("r", layers), _layers("m", layers, seed=3)
    engine = AlignmentEngine(["linear_cka"], num_permutations=20)
    engine.set_reference(ref)
    engine.step(model)
    settings = {"measures": ["mutual_knn", "unbiased_cka"], "null": "moments"}
    if change == "measures":
        engine.measures = settings["measures"]
        fresh = AlignmentEngine(settings["measures"], num_permutations=20)
    else:
        engine.null = settings["null"]
        fresh = AlignmentEngine(["linear_cka"], num_permutations=20, null="moments")
    got = engine.step(model).results
    fresh.set_reference(ref)
    expected = fresh.step(model).results
    assert sorted(got) == sorted(expected) == sorted(engine.measures)
    for label in got:
        for field in ("matrix", "raw", "calibrated", "p_value", "threshold"):
            assert torch.equal(getattr(got[label], field), getattr(expected[label], field))
        assert got[label].null_method == expected[label].null_method
    held = set(engine.reference.states) | engine.reference.lazy
    assert held == set(engine.measures.values())


def test_measures_and_null_set_after_construction_are_checked():
    engine = AlignmentEngine(["linear_cka"], num_permutations=20)
    with pytest.raises(ValueError, match="unknown measure"):
        engine.measures = ["linear_ckaa"]
    with pytest.raises(ValueError, match="null"):
        engine.null = "analytic"
    engine.measures = ["mutual_knn"]
    with pytest.raises(ValueError, match="mutual_knn"):  # no analytic null for kNN measures
        engine.null = "moments"
    assert engine.null == "permutation" and list(engine.measures) == ["mutual_knn"]


def test_features_are_prepared_once_per_layer_per_step(monkeypatch):
    from alignment_callback.metrics import _rows

    calls = []
    real = preprocessing.prepare_features
    monkeypatch.setattr(_rows, "prepare_features",
                        lambda x, **kw: (calls.append(x.shape), real(x, **kw))[1])
    engine = AlignmentEngine(["linear_cka", "mutual_knn", "cknna"], num_permutations=10)
    engine.set_reference(_layers("r", 3))
    engine.step(_layers("m", 3, seed=1))
    assert len(calls) == 3 + 3


def test_shared_neighbor_lists_give_the_single_measure_values():
    ref, model = _layers("r", 2), _layers("m", 3, seed=5)
    joint = AlignmentEngine(KNN, num_permutations=30)
    joint.set_reference(ref)
    together = joint.step(model).results
    for name, options in KNN.items():
        alone = AlignmentEngine({name: options}, num_permutations=30)
        alone.set_reference(ref)
        single = alone.step(model).results[name]
        torch.testing.assert_close(together[name].matrix, single.matrix, rtol=0, atol=1e-12)
        torch.testing.assert_close(together[name].null, single.null, rtol=0, atol=1e-12)
        assert float(together[name].calibrated) == pytest.approx(float(single.calibrated), abs=1e-12)


def test_step_needs_the_reference_and_the_same_rows():
    engine = AlignmentEngine(["linear_cka"], num_permutations=10)
    with pytest.raises(RuntimeError, match="set_reference"):
        engine.step(_layers("m", 1))
    engine.set_reference(_layers("r", 1))
    with pytest.raises(ValueError, match="have 30 rows but the reference's have 60"):
        engine.step(_layers("m", 1, n=30))


def test_best_pair_of_a_layer_mapping_is_a_mapped_pair():
    """With pairs={model: reference}, the best pair is the best of the mapped pairs, not of the
    whole matrix (here the unmapped m1 ~ r1 is far higher than every mapped pair)."""
    g = torch.Generator().manual_seed(0)
    n = 120
    ref = {"r1": torch.randn(n, 10, generator=g), "r2": torch.randn(n, 7, generator=g)}
    model = {"m1": ref["r1"] @ torch.randn(10, 6, generator=g) + torch.randn(n, 6, generator=g),
             "m2": torch.randn(n, 5, generator=g)}
    engine = AlignmentEngine(["linear_cka"], num_permutations=99, pairs={"m1": "r2", "m2": "r1"})
    engine.set_reference(ref)
    res = engine.step(model).results["linear_cka"]
    mapped = {(0, 1): float(res.matrix[0, 1]), (1, 0): float(res.matrix[1, 0])}
    assert float(res.matrix[0, 0]) > max(mapped.values())  # the unmapped pair is the highest
    assert res.argmax == max(mapped, key=mapped.get)
    assert res.best_pair in (("m1", "r2"), ("m2", "r1"))
    assert float(res.raw) == max(mapped.values())


@pytest.mark.parametrize("bad_row", ["nan", "zero"])
def test_preprocessing_errors_name_the_side_and_the_layer(bad_row):
    """NaN/Inf and all-zero rows found while preprocessing name the side and layer, in a step
    and in ``set_reference`` (they named neither)."""
    g = torch.Generator().manual_seed(0)
    good = torch.randn(50, 4, generator=g)
    bad = good.clone()
    bad[3] = float("nan") if bad_row == "nan" else 0.0
    engine = AlignmentEngine(["linear_cka"], num_permutations=19)
    with pytest.raises(ValueError, match=r"^reference layer 'r1': "):
        engine.set_reference({"r0": good, "r1": bad})
    engine.set_reference({"r0": good})
    with pytest.raises(ValueError, match=r"^model layer 'l3': "):
        engine.step({"l1": good, "l3": bad})


@pytest.mark.parametrize("measure", ["linear_cka", "mutual_knn"])
def test_preparation_errors_name_the_model_and_the_reference(measure):
    """A layer a measure cannot prepare was named "x layer" / "y layer" (the functions' words)
    where every other engine error says "model layer" / "reference layer"."""
    g = torch.Generator().manual_seed(0)
    good, constant = torch.randn(50, 4, generator=g), torch.ones(50, 4)
    engine = AlignmentEngine([measure], num_permutations=19, preprocess=False)
    with pytest.raises(ValueError, match=rf"^reference layer 'r1': {measure}: |"
                                         r"^reference layer 'r1': zero-variance"):
        engine.set_reference({"r0": good, "r1": constant})
    engine.set_reference({"r0": good})
    with pytest.raises(ValueError, match=rf"^model layer 'l3': {measure}: |"
                                         r"^model layer 'l3': zero-variance"):
        engine.step({"l1": good, "l3": constant})


def test_layers_that_are_not_a_mapping_are_named_as_such():
    """A bare tensor (which the metric objects take) raised AttributeError: 'Tensor' object
    has no attribute 'items'."""
    engine = AlignmentEngine(["linear_cka"], num_permutations=19)
    layers = _layers("r", 1)
    for bad in (layers["r0"], [layers["r0"]]):
        with pytest.raises(TypeError, match=r"reference layers must be a mapping \{layer name"):
            engine.set_reference(bad)
    engine.set_reference(layers)
    with pytest.raises(TypeError, match=r"model layers must be a mapping .* got Tensor"):
        engine.step(layers["r0"])


def test_too_few_permutations_warn_once_at_construction_pointing_at_the_callers_line():
    """K below (1 - α)/α is a setting, known before any data: the engine warned at every step
    and measure instead (after the callback's baseline probe pass), and not at construction."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = AlignmentEngine(["linear_cka", "rsa"], num_permutations=10)
        assert [(w.filename, str(w.message)[:34]) for w in caught] == [
            (__file__, "num_permutations=10 is too few for")]
        engine.set_reference(_layers("r", 2))
        for _ in range(2):
            engine.step(_layers("m", 2))
        AlignmentEngine(["linear_cka"], num_permutations=10, null="moments")
        AlignmentEngine(["linear_cka"], num_permutations=19)
    assert len([w for w in caught if "is too few" in str(w.message)]) == 1


def test_too_few_permutations_with_null_auto_warn_only_where_permutations_are_drawn():
    """null="auto" on one gram-family pair uses the moments and draws no permutation: no
    warning (a construction-time warning said K was too few for a K never used); on several
    layer pairs it draws them, and the step warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = AlignmentEngine(["linear_cka"], num_permutations=10, null="auto")
        engine.set_reference(_layers("r", 1))
        assert engine.step(_layers("m", 1)).results["linear_cka"].null_method == "moments"
        assert not [w for w in caught if "is too few" in str(w.message)]
        engine = AlignmentEngine(["linear_cka"], num_permutations=10, null="auto")
        engine.set_reference(_layers("r", 2))
        assert engine.step(_layers("m", 2)).results["linear_cka"].null_method == "permutation"
    assert len([w for w in caught if "is too few" in str(w.message)]) == 1


def test_mapping_keys_that_are_the_same_label_are_refused():
    """{1: f, "1": g} labeled both measures "1": one was lost without a word."""
    with pytest.raises(ValueError, match=r"two measures are labeled '1' \(the keys \[1, '1'\]\)"):
        AlignmentEngine({1: lambda x, y: (x * y).sum(), "1": lambda x, y: (x - y).sum()})


@pytest.mark.parametrize("setting,value,message", [
    ("alpha", 1.5, "alpha"), ("num_permutations", 0, "num_permutations"),
    ("seed", -1, "seed"), ("max_score", "high", "max_score"),
    ("aggregate", "bogus", "aggregate must be"), ("groups", "abc", "groups must be"),
])
def test_settings_assigned_after_construction_are_checked(setting, value, message):
    """They were taken as given and failed (or not) at a later step."""
    engine = AlignmentEngine(["linear_cka"], num_permutations=20)
    before = getattr(engine, setting)
    with pytest.raises((ValueError, TypeError), match=message):
        setattr(engine, setting, value)
    assert getattr(engine, setting) == before


def test_groups_assigned_to_an_engine_with_the_moments_null_are_refused():
    engine = AlignmentEngine(["linear_cka"], num_permutations=20, null="moments")
    with pytest.raises(ValueError, match="groups"):
        engine.groups = [0, 1] * 30
    assert engine.groups is None


def test_preprocess_cannot_be_changed_under_a_cached_reference():
    """engine.preprocess = False created an attribute nothing read; assigning preprocessor
    processed the model side anew against a reference processed the old way."""
    engine = AlignmentEngine(["linear_cka"], num_permutations=20)
    for name in ("preprocess", "preprocessor"):
        with pytest.raises(AttributeError, match="preprocess is fixed at construction"):
            setattr(engine, name, False)


def test_pairs_and_device_assigned_later_are_checked_and_too_few_permutations_warn():
    engine = AlignmentEngine(["linear_cka"], num_permutations=20)
    with pytest.raises(TypeError, match="pairs must be a {model layer: reference layer} mapping"):
        engine.pairs = [("m", "r")]
    with pytest.raises(ValueError, match="pairs is empty"):
        engine.pairs = {}
    with pytest.raises(ValueError, match="device='nonsense' is not a device"):
        engine.device = "nonsense"
    with pytest.raises(TypeError, match="device must be None"):
        engine.device = 3.5
    assert engine.pairs is None and engine.device is None
    with pytest.warns(UserWarning, match="num_permutations=9 is too few for alpha=0.05"):
        engine.num_permutations = 9
    with pytest.warns(UserWarning, match="num_permutations=49 is too few for alpha=0.01"):
        engine.num_permutations, engine.alpha = 49, 0.01


@pytest.mark.parametrize("label", ["cka/pair", "knn/layer/x", "a/pair/m__r"])
def test_labels_that_logged_keys_would_misread_are_refused(label):
    """The report read <label>/pair/... as the pair scores of another measure: it was dropped."""
    with pytest.raises(ValueError, match=r"a '/pair' or '/layer' segment"):
        AlignmentEngine({"linear_cka": {}, label: lambda x, y: (x * y).sum()})
    AlignmentEngine({"knn/k5": lambda x, y: (x * y).sum(), "pairs": lambda x, y: x.sum()})
