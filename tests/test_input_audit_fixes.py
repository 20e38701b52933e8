"""Bad input found by an audit of the public API: each gives a clear error (or warning) naming
the argument, where it gave a raw torch / Python error or a silently wrong number."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback import AlignmentCallback
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional.kernels import rbf_gram
from alignment_callback.metrics import CalibratedAlignment, LayerAlignment


def _data(n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x @ torch.randn(d, 5, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ metric rows and sample ids
def test_batch_local_sample_ids_are_refused_not_silently_dropped():
    x, y = _data(60)
    metric = CalibratedAlignment("linear_cka", num_permutations=19, preprocess=False)
    for b in range(3):  # ids restarting in every batch: all but the first batch were dropped
        metric.update(x[20 * b:20 * (b + 1)], y[20 * b:20 * (b + 1)], index=torch.arange(20))
    with pytest.raises(ValueError, match=r"index: 20 sample id\(s\) \(e.g. 0, 3 times\) were "
                                         r"given again with other features; .*not its position"):
        metric.compute()


def test_repeated_ids_of_the_same_rows_are_dropped_as_padding():
    """A DistributedSampler's padding repeats a sample, computed again (rounding may differ)."""
    x, y = _data(40)
    metric = CalibratedAlignment("linear_cka", num_permutations=19, preprocess=False)
    metric.update(x[:30], y[:30], index=torch.arange(30))
    ids = torch.tensor([30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 0, 1])
    rows = torch.cat([x[30:], x[:2] * (1 + 1e-6)])  # the padded repeats, rounded differently
    metric.update(rows, torch.cat([y[30:], y[:2]]), index=ids)
    full = CalibratedAlignment("linear_cka", num_permutations=19, preprocess=False)
    full.update(x, y)
    assert torch.equal(metric.compute()["raw"], full.compute()["raw"])


@pytest.mark.parametrize("side", ["x", "y"])
def test_a_few_repeated_ids_with_other_rows_on_either_side_warn(side):
    """Padding through a stochastic forward (dropout) repeats a sample with other features:
    a warning, the first rows kept (an error was too strict there)."""
    x, y = _data(40)
    metric = CalibratedAlignment("linear_cka", num_permutations=19, preprocess=False)
    metric.update(x[:30], y[:30], index=torch.arange(30))
    xs, ys = x[30:].clone(), y[30:].clone()
    ids = torch.arange(30, 40)
    ids[-1] = 5  # row 39's data under id 5 (on the side under test only)
    (xs if side == "x" else ys)[-1] = (x if side == "x" else y)[39]
    (ys if side == "x" else xs)[-1] = (y if side == "x" else x)[5]
    metric.update(xs, ys, index=ids)
    with pytest.warns(RuntimeWarning, match=r"1 sample id\(s\) \(e.g. 5, 2 times\) were given "
                                            r"again with other features: the first rows of "
                                            r"each are kept.*stochastic"):
        raw = metric.compute()["raw"]
    kept = CalibratedAlignment("linear_cka", num_permutations=19, preprocess=False)
    kept.update(torch.cat([x[:30], x[30:39]]), torch.cat([y[:30], y[30:39]]))
    assert torch.equal(raw, kept.compute()["raw"])


@pytest.mark.parametrize("metric", [
    CalibratedAlignment("linear_cka", num_permutations=19),
    LayerAlignment("linear_cka", num_permutations=19),
], ids=["CalibratedAlignment", "LayerAlignment"])
def test_one_dimensional_rows_are_refused(metric):
    """A (d,) tensor is one sample or d samples of one feature: never guessed."""
    x, y = _data(40)
    pair = (x[0], y[0]) if isinstance(metric, CalibratedAlignment) else ({"a": x[0]}, {"b": y[0]})
    with pytest.raises(ValueError, match=r"is 1-D \(shape \(6,\)\).*\[None\].*\[:, None\]"):
        metric.update(*pair)


# ------------------------------------------------------------------ RBF kernel as the identity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("measure", ["rbf_cka", "bures_similarity"])
def test_rbf_kernel_that_is_the_identity_is_refused(measure, dtype):
    """Raw features far apart at sigma=1: every off-diagonal kernel entry is 0, so any two
    representations scored 1.0."""
    g = torch.Generator().manual_seed(0)
    # distances² about 2·2048: exp(-2048) underflows float64 too (bures computes in float64)
    x = torch.randn(30, 2048, generator=g, dtype=dtype)
    y = torch.randn(30, 2048, generator=g, dtype=dtype)  # independent of x
    kwargs = {"sigma": 1.0} if measure == "rbf_cka" else {"kernel": "rbf", "sigma": 1.0}
    fn = getattr(F, measure)
    with pytest.raises(ValueError, match=r"underflows .* to 0, so at sigma=1.0 the RBF kernel "
                                         r"is the identity"):
        fn(x, y, **kwargs)
    # the same rows L2-normalized (distances within reach of sigma): a score, not the 1.0 that
    # any two identity kernels give (wide independent data scores high, hence calibration)
    unit = [t / t.norm(dim=1, keepdim=True) for t in (x, y)]
    assert float(fn(*unit, **kwargs)) < 1.0 - 1e-4


def test_rbf_identity_check_keeps_duplicated_rows_and_close_pairs():
    """One pair of rows within reach of sigma (or a duplicated row) keeps the kernel valid."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 64, generator=g, dtype=torch.float64)
    x[1] = x[0] + 0.01
    gram = rbf_gram(x, 1.0)
    expected = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1).numpy() / 2.0)
    np.testing.assert_allclose(gram.numpy(), expected, rtol=1e-12, atol=0)
    x[1] = x[0]
    assert float(rbf_gram(x, 1.0)[0, 1]) == 1.0


# ------------------------------------------------------------------ calibrate and max_score
@pytest.mark.parametrize("score, error, message", [
    (torch.tensor([0.5, 0.6]), ValueError, r"score must be one number, got a value of shape \(2,\)"),
    ("0.5", TypeError, "score must be one real number, got str"),
    (None, TypeError, "score must be one real number, got NoneType"),
    (torch.tensor(0.9 + 5j), TypeError, "score must be one real number, got a torch.complex64"),
    (True, TypeError, "score must be one real number, got bool"),
])
def test_calibrate_score_must_be_one_real_number(score, error, message):
    with pytest.raises(error, match=message):
        F.calibrate(score, torch.linspace(0, 0.5, 99))


@pytest.mark.parametrize("null, message", [
    (["a", "b"], "null must hold numbers"),
    (torch.tensor([0.1 + 1j, 0.2]), "null must hold real numbers"),
])
def test_calibrate_null_must_hold_real_numbers(null, message):
    with pytest.raises(TypeError, match=message):
        F.calibrate(0.5, null)


@pytest.mark.parametrize("max_score, message", [
    ("auto", "max_score='auto' needs a measure"),
    (True, "max_score must be 'auto', None or a finite number, got True"),
    (math.inf, "max_score must be 'auto', None or a finite number"),
])
def test_calibrate_max_score_is_checked(max_score, message):
    with pytest.raises(ValueError, match=message):
        F.calibrate(0.5, torch.linspace(0, 0.5, 99), max_score=max_score)


def test_score_above_a_given_max_score_warns():
    null = torch.linspace(0.0, 0.5, 99, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"score = 0.9 is above max_score=0.6.*capped at 1"):
        res = F.calibrate(0.9, null, max_score=0.6)
    assert float(res.calibrated) == 1.0
    x, y = _data(40)
    with pytest.warns(RuntimeWarning, match="linear_cka's score = .* is above max_score=0.1"):
        F.calibrated_alignment(x, y, "linear_cka", num_permutations=19, max_score=0.1)


def test_score_at_or_below_max_score_does_not_warn(recwarn):
    null = torch.linspace(0.0, 0.5, 99, dtype=torch.float64)
    F.calibrate(1.0, null)  # exactly the maximum
    x, y = _data(40)
    F.calibrated_alignment(x, y, "linear_cka", num_permutations=99, max_score=1.0)
    assert not [w for w in recwarn if "max_score" in str(w.message)]


# ------------------------------------------------------------------ other public functions
@pytest.mark.parametrize("alpha", ["0.1", None, True, 1.5])
def test_benjamini_hochberg_alpha_is_checked(alpha):
    with pytest.raises(ValueError, match="alpha must be a number in"):
        F.benjamini_hochberg(torch.tensor([0.01, 0.5]), alpha=alpha)


@pytest.mark.parametrize("p_values", ["a", None, np.array(["0.1", "x"])])
def test_benjamini_hochberg_p_values_must_be_numbers(p_values):
    with pytest.raises(TypeError, match="p_values must be numbers"):
        F.benjamini_hochberg(p_values)


@pytest.mark.parametrize("n", [-3, 0, 10.0, 10.7, "10", True])
def test_permutations_check_n(n):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        F.permutations(n, 5)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        F.Permutations(n, 5)


def test_one_measure_name_is_a_list_of_one_not_of_letters():
    x, y = _data(40)
    one = F.calibrate_measures({"a": x}, {"b": y}, "mutual_knn", num_permutations=19)
    listed = F.calibrate_measures({"a": x}, {"b": y}, ["mutual_knn"], num_permutations=19)
    assert list(one) == ["mutual_knn"]
    assert torch.equal(one["mutual_knn"].raw, listed["mutual_knn"].raw)
    assert F.measure_table("mutual_knn") == F.measure_table(["mutual_knn"])


@pytest.mark.parametrize("call", [
    lambda: F.calibrate_measures({"a": _data()[0]}, {"b": _data()[1]}, 5),
    lambda: F.measure_table(5),
    lambda: AlignmentEngine(None),
    lambda: AlignmentCallback(torch.nn.Linear(6, 4), torch.randn(40, 6), layers=["x"], measures=5),
], ids=["calibrate_measures", "measure_table", "engine", "callback"])
def test_measures_of_a_wrong_type_are_named(call):
    with pytest.raises(TypeError, match=r"(measures|names) must be a measure name.*got (int|NoneType)"):
        call()


def test_engine_pairs_must_be_a_mapping():
    with pytest.raises(TypeError, match="pairs must be a {model layer: reference layer} mapping"):
        AlignmentEngine(["linear_cka"], pairs=5)


@pytest.mark.parametrize("info", [None, "my_measure"])
def test_register_measure_takes_a_measure_info(info):
    with pytest.raises(TypeError, match="register_measure takes a MeasureInfo"):
        F.register_measure(info)


@pytest.mark.parametrize("n", [0, 1])
def test_hsic_needs_two_samples(n):
    for fn in (F.hsic_biased, F.hsic_unbiased):
        with pytest.raises(ValueError, match="needs"):
            fn(torch.ones(n, n), torch.ones(n, n))


def test_callables_returning_a_non_number_are_named():
    x, y = _data(40)
    with pytest.raises(TypeError, match="aggregate: the callable's value .* must be one real "
                                        "number, got str"):
        F.calibrated_layer_alignment([x, 2 * x], [y], "linear_cka", aggregate=lambda m: "best",
                                     num_permutations=9)
    with pytest.raises(TypeError, match="a measure callable's value must be one real number, "
                                        "got NoneType"):
        F.calibrated_alignment(x, y, lambda a, b: None, num_permutations=9)


@pytest.mark.parametrize("layers", [{"fc1": 5}, {5: "fc1"}])
def test_a_layers_mapping_of_non_names_fails_at_construction(layers):
    with pytest.raises(TypeError, match=r"layers: a mapping pairs a model layer's name with a "
                                        r"reference layer's name, both str"):
        AlignmentCallback(torch.nn.Linear(6, 4), torch.randn(40, 6), layers=layers)
