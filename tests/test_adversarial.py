"""Adversarial cases: every path that used to return a confident wrong number, crash on ordinary
input, or accept a configuration mistake.  One test (or a parametrized family) per case, each
asserting the right value or the exact error.  Tied / discrete data: ``tests/test_ties.py``;
callback cases: ``tests/test_adversarial_callback.py``.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.metrics import CalibratedAlignment, LayerAlignment

GRAM = ("linear_cka", "rbf_cka", "unbiased_cka", "rsa")
KNN = ("mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn")
ALL = GRAM + KNN + ("svcca",)


def kw(name: str) -> dict:
    return {"k": 5} if name in KNN else {"cca_dim": 4} if name == "svcca" else {}


def pair(n: int = 48, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=dtype)
    y = x @ torch.randn(12, 9, generator=g, dtype=dtype) + 0.7 * torch.randn(n, 9, generator=g, dtype=dtype)
    return x, y


# ------------------------------------------------------- degenerate kernels and thresholds
def test_rbf_kernel_near_identity_never_gives_calibrated_one():
    """σ far below the data scale: the kernel is (almost) the identity, the null sits at the
    maximum, and float noise used to become calibrated = 1.0 for independent data."""
    hits = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        x, y = 4 * torch.randn(64, 8, generator=g), 4 * torch.randn(64, 8, generator=g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = F.calibrated_alignment(x, y, "rbf_cka", 200, seed=seed, sigma=1.0)
        assert float(res.raw) <= 1.0 and float(res.threshold) <= 1.0
        assert float(res.calibrated) == 0.0
        if caught:
            hits += 1
            text = str(caught[0].message)
            assert "sigma=1.0" in text and "median" in text, text
    assert hits > 0  # the degenerate case really occurs and is reported


@pytest.mark.parametrize("name", GRAM + KNN + ("svcca",))
def test_bounded_measures_stay_in_range(name):
    x, _ = pair(dtype=torch.float32)
    value = float(F.calibrated_alignment(x, x.clone(), name, 20, **kw(name)).raw)
    lo, hi = F.BUILTIN_MEASURES[name].value_range
    assert lo <= value <= hi


def test_calibrate_never_divides_by_a_vanishing_margin():
    null = torch.full((199,), 1.0) - torch.rand(199, generator=torch.Generator().manual_seed(0)) * 1e-7
    with pytest.warns(RuntimeWarning, match="reaches the maximum 1 \\(to float resolution\\)"):
        res = F.calibrate(torch.tensor(1.0), null)
    assert float(res.calibrated) == 0.0


# ------------------------------------------------------------------------------ magnitudes
@pytest.mark.parametrize("scale", [1e20, 1e-20, 1e30, 1e-30])
def test_prepare_features_is_scale_free(scale):
    x, _ = pair()
    ref = F.prepare_features(x)
    scaled = F.prepare_features(x * scale)
    torch.testing.assert_close(scaled, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [1e20, 1e-20, 1e30, 1e-30])
@pytest.mark.parametrize("name", ("linear_cka", "unbiased_cka", "rsa", "svcca") + KNN)
def test_scale_invariant_measures_on_unnormalized_extremes(name, scale):
    x, y = pair()
    expected = float(getattr(F, name)(x, y, **kw(name)))
    assert float(getattr(F, name)(x * scale, y, **kw(name))) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_rbf_reports_underflow_not_zero_variance():
    """1e20-scaled rows at σ = 1: their squared distances (1e40) would overflow float32; they
    are computed rescaled, and the kernel is refused for what it is, the identity."""
    x, y = pair()
    with pytest.raises(ValueError, match=r"distance² between two rows is \d\.\d\de\+\d\d times "
                       r"2σ².*the RBF kernel is the identity"):
        F.rbf_cka(x * 1e20, y)
    with pytest.raises(ValueError, match="underflow"):
        F.rbf_cka(x * 1e-20, y)
    # the median heuristic is scale-free
    assert float(F.rbf_cka(x * 1e20, y, sigma="median")) == pytest.approx(
        float(F.rbf_cka(x, y, sigma="median")), rel=1e-5)


# ------------------------------------------------------------------- crashes on ordinary input
@pytest.mark.parametrize("name", ALL)
def test_inputs_requiring_grad(name):
    x, y = pair()
    x.requires_grad_(True)
    value = getattr(F, name)(x, y, **kw(name))
    assert not value.requires_grad
    res = F.calibrated_alignment(x, y, name, 10, **kw(name))
    assert torch.isfinite(res.raw)


@pytest.mark.parametrize("sigma", ["median", 1.5])
@pytest.mark.parametrize("minus_one", [False, True])
def test_rbf_gram_of_an_input_requiring_grad(sigma, minus_one):
    """The kernel itself (as a measure's prepare calls it) on an input that requires grad: the
    same matrix as on the detached input (its in-place steps take no ``out=``, which autograd
    refuses)."""
    from alignment_callback.functional.kernels import rbf_gram

    x, _ = pair()
    expected = rbf_gram(x, sigma, minus_one=minus_one)
    k = rbf_gram(x.clone().requires_grad_(True), sigma, minus_one=minus_one)
    assert torch.equal(k.detach(), expected)
    if sigma == "median" and minus_one:  # as the measures call it
        for name, kw_ in (("rbf_cka", {"sigma": "median"}),
                          ("bures_similarity", {"kernel": "rbf", "sigma": "median"})):
            F.get_measure(name, **kw_).prepare(x.clone().requires_grad_(True))


@pytest.mark.parametrize("name", ("linear_cka", "mutual_knn", "cknna"))
def test_mixed_float32_float64_layers(name):
    x, y = pair(dtype=torch.float64)
    xs = {"a": x.float(), "b": x}
    ys = [y, y.float()]
    res = F.calibrated_layer_alignment(xs, ys, name, num_permutations=20, **kw(name))
    assert res.matrix.dtype == torch.float64
    single = F.calibrated_layer_alignment({"a": x, "b": x}, [y, y], name, num_permutations=20, **kw(name))
    torch.testing.assert_close(res.matrix, single.matrix, rtol=1e-5, atol=1e-6)
    metric = LayerAlignment(name, num_permutations=20, **kw(name))
    metric.update({"a": x[:20].float(), "b": x[:20]}, {"c": y[:20]})
    metric.update({"a": x[20:], "b": x[20:].float()}, {"c": y[20:].float()})
    assert torch.isfinite(metric.compute()["raw"])


@pytest.mark.parametrize("cls", (CalibratedAlignment, LayerAlignment))
def test_metric_objects_pickle(cls):
    x, y = pair()
    metric = cls("mutual_knn", num_permutations=20, k=5)
    metric.update(x, y) if cls is CalibratedAlignment else metric.update({"a": x}, {"b": y})
    clone = pickle.loads(pickle.dumps(metric))
    for key, value in metric.compute().items():
        torch.testing.assert_close(clone.compute()[key], value)


def test_metric_measure_pickles_by_name():
    measure = F.get_measure("cknna", k=7)
    assert pickle.loads(pickle.dumps(measure)) == measure


def test_width_change_between_batches_is_refused_at_update():
    x, y = pair()
    metric = CalibratedAlignment("linear_cka", num_permutations=10)
    metric.update(x[:10], y[:10])
    with pytest.raises(ValueError, match=r"x layer 'x' has \(11,\) features in this batch but 12"):
        metric.update(torch.randn(10, 11), y[10:20])
    layers = LayerAlignment("linear_cka", num_permutations=10)
    layers.update({"a": x[:10]}, {"b": y[:10]})
    with pytest.raises(ValueError, match=r"y layer 'b' has \(3,\) features in this batch but 9"):
        layers.update({"a": x[10:20]}, {"b": torch.randn(10, 3)})


def test_negative_index_is_refused():
    x, y = pair()
    metric = CalibratedAlignment("linear_cka", num_permutations=10)
    with pytest.raises(ValueError, match="index must hold sample ids >= 0, got -1"):
        metric.update(x[:3], y[:3], index=torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="integer sample ids"):
        metric.update(x[:3], y[:3], index=torch.tensor([0.0, 1.0, 2.0]))


def test_layer_alignment_accepts_tensors_and_lists():
    x, y = pair()
    expected = LayerAlignment("linear_cka", num_permutations=20)
    expected.update({"x": x}, {"y": y})
    from_tensors = LayerAlignment("linear_cka", num_permutations=20)
    from_tensors.update(x, y)
    from_lists = LayerAlignment("linear_cka", num_permutations=20)
    from_lists.update([x], [y])
    for key, value in expected.compute().items():
        torch.testing.assert_close(from_tensors.compute()[key], value)
        torch.testing.assert_close(from_lists.compute()[key], value)
    with pytest.raises(TypeError, match=r"x must be a tensor, a list of tensors or a \{layer name: tensor\}"):
        LayerAlignment().update("x", y)


# ------------------------------------------------------------------ arguments, one place
BAD_ARGUMENTS = [
    ("seed", None, "seed must be an integer in"),
    ("seed", 1.5, "seed must be an integer in"),
    ("seed", 2**64, "seed must be an integer in"),
    ("num_permutations", None, "num_permutations must be an integer >= 1"),
    ("num_permutations", 2.7, "num_permutations must be an integer >= 1"),
    ("num_permutations", 0, "num_permutations must be an integer >= 1"),
    ("alpha", "0.05", "alpha must be a number in"),
    ("alpha", 1.0, "alpha must be a number in"),
    ("max_score", "autoo", "max_score must be 'auto', None or a finite number"),
]


@pytest.mark.parametrize("arg,value,message", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(arg, value, message):
    x, y = pair()
    with pytest.raises(ValueError, match=message):
        F.calibrated_alignment(x, y, "linear_cka", **{"num_permutations": 10, arg: value})
    with pytest.raises(ValueError, match=message):
        F.calibrated_layer_alignment([x], [y], "linear_cka", **{"num_permutations": 10, arg: value})
    with pytest.raises(ValueError, match=message):
        LayerAlignment("linear_cka", **{"num_permutations": 10, arg: value})


@pytest.mark.parametrize("name,options,message", [
    ("mutual_knn", {"k": 0}, "mutual_knn: k must be an integer >= 1, got 0"),
    ("cknna", {"k": 1}, "cknna: k must be an integer >= 2, got 1"),
    ("mutual_knn", {"k": 2.5}, "mutual_knn: k must be an integer >= 1, got 2.5"),
    ("rbf_cka", {"sigma": -1}, "rbf_cka: sigma must be a finite positive number or 'median'"),
    ("rbf_cka", {"sigma": "mean"}, "rbf_cka: sigma must be a finite positive number or 'median'"),
    ("rbf_cka", {"sigma": float("inf")}, "rbf_cka: sigma must be a finite positive number"),
    ("svcca", {"cca_dim": 0}, "svcca: cca_dim must be an integer >= 1"),
])
def test_bad_measure_options_fail_when_the_measure_is_built(name, options, message):
    with pytest.raises(ValueError, match=message):
        F.get_measure(name, **options)


@pytest.mark.parametrize("name,options", [("rbf_cka", {}),
                                          ("bures_similarity", {"kernel": "rbf"})])
def test_a_bound_measure_takes_the_bandwidths_its_function_takes(name, options):
    """A one-element tensor σ (as ``rbf_cka(x, y, sigma=torch.tensor(2.0))`` takes) binds as
    its number; before, ``get_measure`` refused it as not a positive number."""
    x, y = pair()
    tensor = F.get_measure(name, sigma=torch.tensor(2.0), **options)
    plain = F.get_measure(name, sigma=2.0, **options)
    assert tensor.kwargs["sigma"] == 2.0 and isinstance(tensor.kwargs["sigma"], float)
    assert tensor == plain  # one measure: they share prepared states and nulls
    assert torch.equal(tensor(x, y), plain(x, y))
    with pytest.raises(ValueError, match=f"{name}: sigma must be a finite positive number"):
        F.get_measure(name, sigma=torch.tensor(-2.0), **options)


@pytest.mark.parametrize("ridge", [np.float32(0.5), np.array(0.5), torch.tensor(0.5), [0.5],
                                   (0.5,), np.array([0.5]), torch.tensor([0.5])],
                         ids=["numpy", "0-d array", "tensor", "list", "tuple", "1-d array",
                              "1-d tensor"])
def test_a_bound_predictivity_takes_a_numpy_or_tensor_ridge(ridge):
    """``get_measure`` called ``tuple(ridge)`` on anything but a Python number (a TypeError for
    a NumPy float32, "iteration over a 0-d tensor" for a tensor, in the function too).  A grid
    of one penalty is that fixed penalty (no inner CV), and binds as it: the same measure,
    recorded with the same settings."""
    x, y = pair(n=40)
    want = F.linear_predictivity(x, y, ridge=0.5)
    bound = F.get_measure("linear_predictivity", ridge=ridge)
    assert bound.kwargs["ridge"] == 0.5 and type(bound.kwargs["ridge"]) is float
    assert bound == F.get_measure("linear_predictivity", ridge=0.5)
    assert torch.equal(bound(x, y), F.get_measure("linear_predictivity", ridge=0.5)(x, y))
    # (a bound measure scores through the null's quadratic forms: the same value to rounding)
    assert float(bound(x, y)) == pytest.approx(float(want), abs=1e-6)
    assert torch.equal(F.linear_predictivity(x, y, ridge=ridge), want)


def test_unknown_measure_suggests_close_names():
    with pytest.raises(ValueError, match="unknown measure 'mutual_kn'; did you mean 'mutual_knn'"):
        F.get_measure("mutual_kn")


def test_k_not_below_n_names_the_measure_and_n():
    x, y = pair(n=8)
    with pytest.raises(ValueError, match=r"mutual_knn, k=10 needs at least 11 samples, got n=8"):
        F.calibrated_alignment(x, y, "mutual_knn", 10)
