"""Bad input gives a clear ValueError naming the problem, never a silent NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignment_callback.functional as F

ALL_MEASURES = [
    ("linear_cka", {}),
    ("rbf_cka", {"sigma": 1.0}),
    ("rbf_cka", {"sigma": "median"}),
    ("unbiased_cka", {}),
    ("mutual_knn", {"k": 5}),
    ("cycle_knn", {"k": 5}),
    ("cknna", {"k": 5}),
    ("svcca", {"cca_dim": 5}),
    ("lcs_knn", {"k": 5}),
    ("edit_distance_knn", {"k": 5}),
    ("rsa", {}),
]
KNN_MEASURES = ["mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn"]


def _mid(m) -> str:
    name, kw = m
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


def _data(n=30, d=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("measure", ALL_MEASURES, ids=_mid)
def test_different_number_of_samples(measure):
    name, kw = measure
    with pytest.raises(ValueError, match="same number of samples"):
        getattr(F, name)(_data(30), _data(31, seed=1), **kw)


@pytest.mark.parametrize("name", KNN_MEASURES)
@pytest.mark.parametrize("n, k", [(10, 10), (10, 15), (5, 7)])
def test_n_not_larger_than_k(name, n, k):
    with pytest.raises(ValueError, match=r"too small for k|n > k"):
        getattr(F, name)(_data(n), _data(n, seed=1), k=k)


@pytest.mark.parametrize("name", KNN_MEASURES)
def test_n_just_larger_than_k_is_fine(name):
    out = getattr(F, name)(_data(11), _data(11, seed=1), k=10)
    assert torch.isfinite(out)


@pytest.mark.parametrize("name", KNN_MEASURES)
@pytest.mark.parametrize("k", [0, -1])
def test_k_not_positive(name, k):
    with pytest.raises(ValueError, match=r"k >= \d"):
        getattr(F, name)(_data(), _data(seed=1), k=k)


@pytest.mark.parametrize("k", [0, 1])
def test_cknna_needs_k_at_least_2(k):
    with pytest.raises(ValueError, match=r"k >= 2"):
        F.cknna(_data(), _data(seed=1), k=k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("measure", ALL_MEASURES, ids=_mid)
def test_nan_inf(measure, side, bad):
    name, kw = measure
    x, y = _data(), _data(seed=1)
    (x if side == "x" else y)[3, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        getattr(F, name)(x, y, **kw)


@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("measure", ALL_MEASURES, ids=_mid)
def test_not_2d(measure, side):
    name, kw = measure
    x, y = _data(), _data(seed=1)
    if side == "x":
        x = x.reshape(30, 3, 4)
    else:
        y = y.reshape(30, 3, 4)
    with pytest.raises(ValueError, match="2-D"):
        getattr(F, name)(x, y, **kw)


@pytest.mark.parametrize("measure", ALL_MEASURES, ids=_mid)
def test_1d_input(measure):
    name, kw = measure
    with pytest.raises(ValueError, match="2-D"):
        getattr(F, name)(_data()[:, 0], _data(seed=1)[:, 0], **kw)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: F.unbiased_cka(x, y),
        lambda x, y: F.cknna(x, y, k=2),
        lambda x, y: F.hsic_unbiased(x @ x.T, y @ y.T),
    ],
    ids=["unbiased_cka", "cknna", "hsic_unbiased"],
)
def test_unbiased_hsic_needs_4_samples(call):
    with pytest.raises(ValueError, match=r"4 samples"):
        call(_data(3), _data(3, seed=1))


@pytest.mark.parametrize("name", ["hsic_biased", "hsic_unbiased"])
@pytest.mark.parametrize(
    "shapes", [((5, 4), (5, 4)), ((5, 5), (6, 6)), ((5, 5, 2), (5, 5, 2))], ids=str
)
def test_hsic_grams_must_be_square_and_equal(name, shapes):
    (a, b) = shapes
    with pytest.raises(ValueError, match=r"square"):
        getattr(F, name)(torch.ones(a, dtype=torch.float64), torch.ones(b, dtype=torch.float64))


def _constant_rows(n=30, d=12):
    row = _data(1, d, seed=5)
    return row.repeat(n, 1)


@pytest.mark.parametrize(
    "measure",
    [("linear_cka", {}), ("rbf_cka", {"sigma": 1.0}), ("unbiased_cka", {})],
    ids=_mid,
)
@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("kind", ["constant_rows", "all_zero"])
def test_zero_variance_cka(measure, side, kind):
    name, kw = measure
    z = _constant_rows() if kind == "constant_rows" else torch.zeros(30, 12, dtype=torch.float64)
    x, y = (z, _data(seed=1)) if side == "x" else (_data(), z)
    with pytest.raises(ValueError, match="zero-variance"):
        getattr(F, name)(x, y, **kw)


def test_unbiased_cka_of_rows_all_equal_but_one_names_that_cause():
    """All rows but one equal: the centered gram's off-diagonal is a_i + a_j + c, which
    U-centering removes, so HSIC_u(L, L) = 0 (unbiased CKA undefined, linear CKA defined); the
    message blamed identical samples or constant features, neither of which holds."""
    y = torch.zeros(12, 3, dtype=torch.float64)
    y[:, 0] = 1.0
    y[7] = torch.tensor([0.3, 2.0, -1.0], dtype=torch.float64)
    c = y.numpy() - y.numpy().mean(0)
    k = c @ c.T
    np.fill_diagonal(k, 0.0)  # U-centering (n = 12): zero diagonal, then (n − 2), (n−1)(n−2)
    u = k - k.sum(0) / 10 - k.sum(1)[:, None] / 10 + k.sum() / 110
    np.fill_diagonal(u, 0.0)
    assert np.abs(u).max() < 1e-12  # independent: the U-centered gram is zero
    assert float(F.linear_cka(_data(12, 5), y)) > 0.0
    with pytest.raises(ValueError, match=r"^y: zero-variance .*all samples are identical, or "
                                         r"all but one are, or every feature constant"):
        F.unbiased_cka(_data(12, 5), y)


@pytest.mark.parametrize("side", ["x", "y"])
def test_zero_variance_rbf_median(side):
    """Constant rows: every distance is 0, so the median bandwidth is 0 as well."""
    z = _constant_rows()
    x, y = (z, _data(seed=1)) if side == "x" else (_data(), z)
    with pytest.raises(ValueError, match=r"zero-variance|sigma|median"):
        F.rbf_cka(x, y, sigma="median")


@pytest.mark.parametrize(
    "n, d, cca_dim",
    [(30, 8, 10), (8, 30, 10), (30, 12, 13), (30, 12, 0)],
)
def test_svcca_cca_dim_too_large(n, d, cca_dim):
    with pytest.raises(ValueError, match="cca_dim"):
        F.svcca(_data(n, d), _data(n, d, seed=1), cca_dim=cca_dim)


def test_svcca_cca_dim_too_large_on_one_side_only():
    with pytest.raises(ValueError, match="cca_dim"):
        F.svcca(_data(30, 20), _data(30, 6, seed=1), cca_dim=10)


@pytest.mark.parametrize("measure", ALL_MEASURES, ids=_mid)
def test_valid_input_gives_finite_value(measure):
    """Sanity: the inputs used above are otherwise valid."""
    name, kw = measure
    out = getattr(F, name)(_data(), _data(seed=1), **kw)
    assert out.dim() == 0 and bool(torch.isfinite(out))


def test_numpy_arrays_rejected_or_accepted_cleanly():
    """A numpy array is not a tensor: either a TypeError/ValueError, or the same value."""
    x, y = np.random.default_rng(0).standard_normal((2, 30, 12))
    try:
        out = F.linear_cka(x, y)
    except (TypeError, ValueError):
        return
    ref = F.linear_cka(torch.from_numpy(x), torch.from_numpy(y))
    assert float(out) == pytest.approx(ref.item(), rel=1e-12)


def test_finite_values_whose_sum_overflows_are_accepted():
    """The finiteness check sums first; a sum that overflows falls back to the element check."""
    x = torch.full((30, 12), 3e38)
    x[:, 1::2] = -1e38
    assert not torch.isfinite(x.sum())
    from alignment_callback.functional._validation import check_matrix

    assert torch.equal(check_matrix(x), x)
    x[4, 5] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        check_matrix(x)


def test_complex_features_are_refused():
    """Casting would drop the imaginary part with a one-time warning only."""
    from alignment_callback.metrics import CalibratedAlignment

    x = torch.randn(20, 4, dtype=torch.complex64)
    y = torch.randn(20, 4)
    with pytest.raises(TypeError, match="x must hold real numbers"):
        F.linear_cka(x, y)
    with pytest.raises(TypeError, match="real numbers"):
        F.calibrated_alignment(y, x, "mutual_knn", 10)
    with pytest.raises(TypeError, match="real numbers"):
        CalibratedAlignment("linear_cka").update(x, y)


@pytest.mark.parametrize("groups", ["x", 3, [[0, 1], [1, 0]]])
def test_groups_that_are_not_a_label_sequence_are_refused_when_the_metric_is_made(groups):
    """Before: accepted by the constructor, refused only at compute() after every update."""
    from alignment_callback.metrics import CalibratedAlignment, LayerAlignment

    for cls in (CalibratedAlignment, LayerAlignment):
        with pytest.raises(ValueError, match=r"groups must be a sequence of labels, one per "
                                             r"sample; got (str|int|list) of shape"):
            cls("linear_cka", groups=groups)


def test_a_custom_aggregate_must_return_one_number():
    """A callable returning the whole matrix got torch's "shape '[]' is invalid" error."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g)
    with pytest.raises(ValueError, match=r"aggregate: the callable's value for the \(2, 1\) "
                                         r"matrix .* must be one number, got a value of shape "
                                         r"\(2, 1\)"):
        F.calibrated_layer_alignment({"a": x, "b": 2 * x}, {"r": y}, "linear_cka",
                                     aggregate=lambda m: m, num_permutations=19)
    value = F.calibrated_layer_alignment({"a": x, "b": 2 * x}, {"r": y}, "linear_cka",
                                         aggregate=lambda m: m.max(), num_permutations=19)
    assert float(value.raw) == pytest.approx(float(F.linear_cka(x, y)), abs=1e-6)


@pytest.mark.parametrize("k", [None, "3", float("nan"), float("inf"), 2.5, True])
def test_a_k_that_is_not_an_integer_is_named_by_the_plain_functions(k):
    """``mutual_knn(x, y, k=None)`` raised int()'s raw TypeError (NaN: a raw ValueError); the
    error is get_measure's, naming the measure."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g)
    for fn in (F.mutual_knn, F.cycle_knn, F.cknna, F.lcs_knn, F.edit_distance_knn):
        low = 2 if fn is F.cknna else 1
        with pytest.raises(ValueError, match=rf"^{fn.__name__}: k must be an integer >= "
                                             rf"{low}, got "):
            fn(x, y, k=k)


def test_prepare_features_names_what_is_wrong_with_its_input():
    """NumPy input raised AttributeError ('no attribute detach'), an empty input IndexError
    (with clamping) or a reshape RuntimeError, no features 'all-zero feature vector', and NaN
    and zero rows were not counted or located."""
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        F.prepare_features(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        F.pool_features(np.zeros((4, 3, 2)), "mean")
    for shape, kw in (((24, 0), {}), ((0, 3), {"clamp_quantile": 0.9}), ((0, 4, 3), {})):
        with pytest.raises(ValueError, match=r"the activations hold no values \(pooled to shape"):
            F.prepare_features(torch.zeros(shape), **kw)
    x = _data(30, 4)
    x[5, 2] = float("nan")
    x[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"activations contain 2 NaN/Inf value\(s\)"):
        F.prepare_features(x)
    x = _data(30, 4)
    x[[3, 17]] = 0.0
    with pytest.raises(ValueError, match=r"2 sample\(s\) have an all-zero feature vector "
                                         r"\(rows 3, 17\)"):
        F.prepare_features(x)
    assert F.pool_features(torch.zeros(0, 4, 3), "flatten").shape == (0, 12)


def test_a_misspelled_calibration_argument_is_named_as_such():
    """``num_permutation=9`` reached the measure, which said it accepts ['k'] only."""
    x, y = _data(), _data(seed=1)
    with pytest.raises(TypeError, match=r"\['num_permutation'\]; it accepts \['k'\] \(did "
                                        r"you mean num_permutations, an argument of the "
                                        r"calibration itself\?\)"):
        F.calibrated_alignment(x, y, "mutual_knn", num_permutation=9)
    with pytest.raises(TypeError, match="did you mean aggregate"):
        F.calibrated_layer_alignment({"a": x}, {"b": y}, "linear_cka", agregate="mean")
    with pytest.raises(TypeError, match=r"it accepts none$"):  # nothing close: no guess
        F.get_measure("linear_cka", bandwidth=2)


def test_a_clamp_that_would_zero_sparse_features_is_refused():
    """2.5 % nonzeros, every row nonzero: the 0.95 quantile of |x| is 0, the clamp zeroed every
    value, and the error blamed the data ('128 sample(s) have an all-zero feature vector')."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(128, 40)
    cols = torch.randint(0, 40, (128,), generator=g)
    x[torch.arange(128), cols] = torch.rand(128, generator=g) + 0.5
    assert bool((x.abs().sum(1) > 0).all()) and float(np.quantile(x.abs().numpy(), 0.95)) == 0.0
    with pytest.raises(ValueError, match=r"clamp_quantile=0.95: that quantile of \|x\| is 0 "
                                         r"\(98% of the values are zero"):
        F.prepare_features(x, clamp_quantile=0.95)
    assert bool((F.prepare_features(x, clamp_quantile=0.99).abs().sum(1) > 0).all())
    from alignment_callback.functional.preprocessing import clamp_outliers

    assert clamp_outliers(torch.zeros(4, 3), 0.5).abs().sum() == 0  # all zero: nothing to lose
