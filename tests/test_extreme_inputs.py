"""Extreme but valid inputs: subnormal magnitudes, huge RBF bandwidths, scaled inputs to linear
predictivity, meta tensors and large integers.

* ``rescale_exactly`` multiplied by ``2**-e`` in one ``torch.ldexp``, whose factor is inf for a
  subnormal maximum (float32 ``|x| < 2**-127``): kNN measures were wrong, CKA-type measures
  refused, ``prepare_features`` returned NaN for one tiny row, ``sigma="median"`` raised a raw
  torch error, SVCCA failed on a tiny column;
* ``sigma >= 1.3e154`` raised a raw ``OverflowError`` (``sigma ** 2`` in Python floats);
* ``linear_predictivity`` (both paths) called ``x·1e19`` (float32) or ``x·1e200`` (float64)
  constant: its variance check squared the unscaled values;
* meta tensors raised a raw ``Tensor.item()`` error from the NaN check;
* int64 / int32 input was cast to float32, which rounds 1e8 + i to multiples of 8.

Every expectation is the independent float64 NumPy reference (``numpy_reference*.py``) on the
very numbers passed (multiplied by an exact power of two where NumPy would underflow), or the
measure's own value on the unscaled data where the scaling is exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_reference as R
import numpy_reference_families as RF

import alignment_callback.functional as F
from alignment_callback.functional._scaling import rescale_exactly
from alignment_callback.functional._validation import as_float

KNN = ("mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn")


def _bures(x, y, kernel="linear", sigma=1.0):
    gram = R.linear_gram if kernel == "linear" else (lambda a: R.rbf_gram(a, sigma))
    return RF.bures_fidelity(RF.center(gram(x)), RF.center(gram(y)))


# name: (library call, NumPy reference), both on (x, y)
MEASURES = {
    "linear_cka": (F.linear_cka, R.linear_cka),
    "unbiased_cka": (F.unbiased_cka, R.unbiased_cka),
    "rbf_cka_median": (lambda x, y: F.rbf_cka(x, y, sigma="median"),
                       lambda x, y: R.rbf_cka(x, y, sigma="median")),
    "rsa": (F.rsa, R.rsa),
    **{name: (lambda x, y, name=name: getattr(F, name)(x, y, k=3),
              lambda x, y, name=name: getattr(R, name)(x, y, k=3)) for name in KNN},
    "svcca": (lambda x, y: F.svcca(x, y, cca_dim=3), lambda x, y: R.svcca(x, y, cca_dim=3)),
    "procrustes_similarity": (F.procrustes_similarity, RF.procrustes_similarity),
    "shape_metric": (F.shape_metric, lambda x, y: RF.shape_metric(x, y, 1.0)),
    "bures_similarity": (F.bures_similarity, _bures),
    "bures_rbf_median": (lambda x, y: F.bures_similarity(x, y, kernel="rbf", sigma="median"),
                         lambda x, y: _bures(x, y, "rbf", "median")),
    "cca_similarity": (F.cca_similarity, RF.cca_similarity),
    "pwcca": (F.pwcca, RF.pwcca),
    "linear_predictivity": (lambda x, y: F.linear_predictivity(x, y, ridge=1.0, folds=3),
                            lambda x, y: RF.ridge_cv_r2(x, y, 1.0, folds=3)),
    "rv_coefficient": (F.rv_coefficient, RF.rv_coefficient),
}


def _pair(n: int = 24, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, 5, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, 5, generator=g, dtype=torch.float64)
    return x, y


def _unit(t: torch.Tensor) -> np.ndarray:
    """``t`` in float64 times the exact power of two that brings its largest |value| to
    [0.5, 1): NumPy's own products of float64 subnormals (or of 1e200) would underflow
    (overflow).  Every measure here is scale-invariant."""
    a = t.double().numpy()
    return np.ldexp(a, -int(np.frexp(np.abs(a).max())[1]))


# ------------------------------------------------------------------------- subnormal inputs
def test_rescale_exactly_brings_subnormals_to_unit_scale():
    """The factor 2**133 (float32) or 2**1074 (float64) is not a finite number of the dtype."""
    for dtype, values in [(torch.float32, [1e-40, -3e-41, 0.0]),
                          (torch.float64, [5e-324, -1e-310, 0.0])]:
        x = torch.tensor([values], dtype=dtype)
        got = rescale_exactly(x)
        assert torch.isfinite(got).all()
        np.testing.assert_array_equal(got.double().numpy(), _unit(x))
        assert 0.5 <= float(got.abs().max()) < 1.0
        np.testing.assert_array_equal(rescale_exactly(x, per_row=True).double().numpy(),
                                      _unit(x))


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-40), (torch.float64, 1e-310)],
                         ids=["f32-1e-40", "f64-1e-310"])
@pytest.mark.parametrize("name", sorted(MEASURES))
def test_subnormal_inputs_match_the_reference(name, dtype, scale):
    """x·1e-40 in float32 holds about 17 significant bits (all entries subnormal): the
    measure of those numbers is well defined, and is the reference's on the same numbers."""
    x, y = _pair()
    xs, ys = (x * scale).to(dtype), (y * scale).to(dtype)
    fn, ref = MEASURES[name]
    want = ref(_unit(xs), _unit(ys))
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    assert float(fn(xs, ys)) == pytest.approx(want, abs=tol)


@pytest.mark.parametrize("dtype,power", [(torch.float32, -140), (torch.float64, -1040)],
                         ids=["f32-2**-140", "f64-2**-1040"])
@pytest.mark.parametrize("name", sorted(MEASURES))
def test_exactly_scaled_subnormal_inputs_equal_the_unscaled_measure(name, dtype, power):
    """x with 9 significant bits times 2**-140 (float32) is exact in the subnormal range, so
    every scale-invariant measure must give x's own value (as at x·1e20)."""
    x, y = _pair()
    x, y = (torch.round(x * 32) / 32).to(dtype), (torch.round(y * 32) / 32).to(dtype)
    xs, ys = x * 2.0 ** power, y * 2.0 ** power  # the factor is a subnormal itself
    assert bool((xs.abs() < torch.finfo(dtype).tiny).all())  # all subnormal (or zero)
    assert np.array_equal(np.ldexp(xs.double().numpy(), -power), x.double().numpy())  # exact
    fn, _ = MEASURES[name]
    assert float(fn(xs, ys)) == pytest.approx(float(fn(x, y)), abs=1e-6)


def test_one_subnormal_row_or_column_among_normal_data():
    """One row (column) times 1e-39 in float32: ordinary finite numbers.  prepare_features
    returned NaN for the row, rsa refused, svcca failed in eigh."""
    x, y = _pair()
    x, y = x.float(), y.float()
    row, col = x.clone(), x.clone()
    row[5] *= 1e-39
    col[:, 2] *= 1e-39
    got = F.prepare_features(row)
    want = row.double().numpy()
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-7)
    assert float(F.rsa(row, y)) == pytest.approx(
        R.rsa(row.double().numpy(), y.double().numpy()), abs=1e-6)
    assert float(F.svcca(col, y, cca_dim=3)) == pytest.approx(
        R.svcca(col.double().numpy(), y.double().numpy(), cca_dim=3), abs=1e-5)


def test_calibrated_knn_on_subnormal_inputs_observes_the_true_value():
    x, y = _pair()
    xs, ys = (x * 1e-40).float(), (y * 1e-40).float()
    res = F.calibrated_alignment(xs, ys, "mutual_knn", k=3, num_permutations=19, seed=0)
    assert float(res.raw) == pytest.approx(R.mutual_knn(_unit(xs), _unit(ys), k=3), abs=1e-6)


# ------------------------------------------------------------------------ huge RBF bandwidth
@pytest.mark.parametrize("dtype,power", [(torch.float64, 507), (torch.float32, 60)],
                         ids=["f64", "f32"])
def test_rbf_with_sigma_beyond_the_float_range_of_its_square(dtype, power):
    """x·2**507 with σ = 32·2**507 = 2**512 (float64): the distances are finite (< 2**1023) and
    σ² overflows a Python float (an OverflowError); x·2**60 with σ = 2**64 (float32): 2σ² is
    finite in Python but not in float32 (the kernel was taken as constant and refused).
    Either way the kernel is that of x at σ = 32 (resp. 16)."""
    x, y = _pair()
    sigma = 2.0 ** (512 if dtype == torch.float64 else 64)
    unscaled = sigma / 2.0 ** power
    xs, ys = (x * 2.0 ** power).to(dtype), (y * 2.0 ** power).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    want = R.rbf_cka(x.numpy(), y.numpy(), sigma=unscaled)
    assert float(F.rbf_cka(xs, ys, sigma=sigma)) == pytest.approx(want, abs=tol)
    want = _bures(x.numpy(), y.numpy(), "rbf", unscaled)
    got = F.bures_similarity(xs, ys, kernel="rbf", sigma=sigma)
    assert float(got) == pytest.approx(want, abs=tol)


@pytest.mark.parametrize("dtype,power", [(torch.float64, 520), (torch.float32, 70)],
                         ids=["f64", "f32"])
def test_rbf_of_features_whose_squared_distances_overflow_at_a_sigma_of_their_scale(dtype, power):
    """x·2**520 (float64) or x·2**70 (float32) at σ = 1.5·2**power: the squared distances
    (~2**1040, 2**140) overflow the dtype, but the kernel depends on x/σ only, so it is that of
    x at σ = 1.5 (the rows and σ are rescaled together, exactly; this was refused as an
    overflow)."""
    x, y = _pair()
    xs, ys = (x * 2.0 ** power).to(dtype), (y * 2.0 ** power).to(dtype)
    sigma = 1.5 * 2.0 ** power
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert float(F.rbf_cka(xs, ys, sigma=sigma)) == pytest.approx(
        R.rbf_cka(x.numpy(), y.numpy(), sigma=1.5), abs=tol)
    got = F.bures_similarity(xs, ys, kernel="rbf", sigma=sigma)
    assert float(got) == pytest.approx(_bures(x.numpy(), y.numpy(), "rbf", 1.5), abs=tol)


def _exact_centered_rbf(x: np.ndarray, sigma: float):
    """H K H in 50-digit arithmetic (mpmath), rounded to float64 at the end."""
    import mpmath

    mpmath.mp.dps = 50
    n = x.shape[0]
    d2 = [[sum((mpmath.mpf(float(a)) - mpmath.mpf(float(b))) ** 2 for a, b in zip(x[i], x[j]))
           for j in range(n)] for i in range(n)]
    k = mpmath.matrix([[mpmath.exp(-v / (2 * mpmath.mpf(sigma) ** 2)) for v in row]
                       for row in d2])
    h = mpmath.eye(n) - mpmath.ones(n, n) / n
    return np.array((h * k * h).tolist(), dtype=np.float64)


@pytest.mark.parametrize("scale", [1e-5, 1e-6])
def test_rbf_with_a_sigma_far_above_the_distances_keeps_its_digits(scale):
    """σ = 1 on features of scale 1e-5: every kernel entry is 1 − O(1e-10), which ``exp``
    rounded before centering removed the 1 (rbf_cka off by 1e-9 to 2e-6, RBF Bures by 7e-6 to
    8e-5); ``K − 1 = expm1(…)`` keeps them."""
    x, y = (t[:16, :3] * scale for t in _pair())
    k, m = _exact_centered_rbf(x.numpy(), 1.0), _exact_centered_rbf(y.numpy(), 1.0)
    cka = float((k * m).sum() / np.sqrt((k * k).sum() * (m * m).sum()))
    assert float(F.rbf_cka(x, y, sigma=1.0)) == pytest.approx(cka, abs=1e-12)
    got = float(F.bures_similarity(x, y, kernel="rbf", sigma=1.0))
    assert got == pytest.approx(RF.bures_fidelity(k, m), abs=1e-7)


def test_a_zero_median_bandwidth_says_so_and_names_the_measure():
    """Most rows identical (not all): the median squared distance is 0, which was reported as
    a zero-variance representation (the data has variance, and linear CKA works on it)."""
    x, y = _pair()
    x = x.clone()
    x[2:] = x[1]  # 22 of 24 rows identical
    assert float(F.linear_cka(x, y)) > 0
    for call, name in ((lambda: F.rbf_cka(x, y, sigma="median"), "rbf_cka"),
                       (lambda: F.bures_similarity(x, y, kernel="rbf", sigma="median"),
                        "bures_similarity")):
        with pytest.raises(ValueError, match=rf"{name}: sigma='median' is 0: at least half of "
                                             r"the squared distances .* give sigma a number"):
            call()
    with pytest.raises(ValueError, match=r"^x: bures_similarity: squared distances underflow"):
        F.bures_similarity(x + 1.0, y, kernel="rbf", sigma=1e200)


@pytest.mark.parametrize("quantile", ["0.9", True, 0.0, 1.5, torch.tensor(1.5)])
def test_a_clamp_quantile_that_is_not_a_number_in_range_is_refused(quantile):
    x, _ = _pair()
    with pytest.raises(ValueError, match=r"clamp_quantile must be a number in \(0, 1\], got"):
        F.prepare_features(x, clamp_quantile=quantile)


@pytest.mark.parametrize("quantile", [torch.tensor(0.9), np.array(0.9), np.float32(0.9)])
def test_a_clamp_quantile_given_as_a_0_dim_tensor_or_array_is_its_number(quantile):
    x, _ = _pair()
    want = F.prepare_features(x, clamp_quantile=float(quantile))
    assert torch.equal(F.prepare_features(x, clamp_quantile=quantile), want)


def test_the_constant_kernel_refusal_gives_the_largest_distance():
    """The largest squared distance was read after the ratio underflowed: "= 0" at σ = 1e200."""
    x, y = _pair()
    largest = float(torch.cdist(x, x).square().max())
    with pytest.raises(ValueError, match=rf"largest distance² = {largest:.3g}\)"):
        F.rbf_cka(x, y, sigma=1e200)


@pytest.mark.parametrize("sigma", [1e155, 1e200, 1e308])
def test_rbf_with_a_sigma_so_large_the_kernel_is_constant_is_refused_clearly(sigma):
    x, y = _pair()
    for call in (lambda: F.rbf_cka(x, y, sigma=sigma),
                 lambda: F.bures_similarity(x, y, kernel="rbf", sigma=sigma),
                 lambda: F.calibrated_alignment(x, y, "rbf_cka", sigma=sigma,
                                                num_permutations=9)):
        with pytest.raises(ValueError, match=r"underflow against 2\*sigma\^2 > 1.8e\+308.*"
                                             r"kernel is constant at sigma="):
            call()


# ---------------------------------------------------------------- scaled linear predictivity
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e19), (torch.float32, 1e-30),
                                         (torch.float64, 1e200), (torch.float64, 1e-200)],
                         ids=["f32-1e19", "f32-1e-30", "f64-1e200", "f64-1e-200"])
@pytest.mark.parametrize("side", ["x", "y"])
def test_linear_predictivity_is_scale_free_at_extreme_magnitudes(side, dtype, scale):
    """It was refused as "constant over samples": the variance check squared the unscaled
    values (1e19² overflows float32, (1e-30)² underflows).  Both the direct function and the
    calibrated path (quadratic forms) give the reference's value."""
    x, y = _pair(n=30)
    a, b = (x * scale if side == "x" else x).to(dtype), (y * scale if side == "y" else y).to(dtype)
    want = RF.ridge_cv_r2(_unit(a), _unit(b), 1.0, folds=3)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert float(F.linear_predictivity(a, b, ridge=1.0, folds=3)) == pytest.approx(want, abs=tol)
    res = F.calibrated_alignment(a, b, "linear_predictivity", ridge=1.0, folds=3,
                                 num_permutations=19, seed=0)
    assert float(res.raw) == pytest.approx(want, abs=tol)
    unscaled = float(F.linear_predictivity(x.to(dtype), y.to(dtype), ridge=1.0, folds=3))
    assert float(F.linear_predictivity(a, b, ridge=1.0, folds=3)) == pytest.approx(unscaled,
                                                                                   abs=tol)


# ----------------------------------------------------------------------------- meta tensors
@pytest.mark.parametrize("which", ["x", "y", "both"])
def test_meta_tensors_are_refused_by_name(which):
    x, y = _pair()
    a = x.to("meta") if which in ("x", "both") else x
    b = y.to("meta") if which in ("y", "both") else y
    named = "y" if which == "y" else "x"
    match = rf"^{named} is a meta tensor \(device='meta'\): meta tensors hold no data"
    for call in (lambda: F.linear_cka(a, b), lambda: F.mutual_knn(a, b, k=3),
                 lambda: F.calibrated_alignment(a, b, "linear_cka", num_permutations=9)):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="x is a meta tensor"):
        F.prepare_features(x.to("meta"))


# --------------------------------------------------------------------------- integer inputs
@pytest.mark.parametrize("dtype,wide", [
    (torch.bool, False), (torch.int8, False), (torch.uint8, False), (torch.int16, False),
    (torch.uint16, False), (torch.int32, True), (torch.int64, True), (torch.uint32, True),
    (torch.uint64, True), (torch.float16, False), (torch.float32, False),
    (torch.float64, True)], ids=str)
def test_as_float_keeps_every_integer_exact(dtype, wide):
    """float32 for values float32 holds (every integer up to 2**24, whatever its type, so the
    results do not depend on the integer type); float64 for larger integers and float64."""
    small = as_float(torch.zeros(2, 3, dtype=dtype))
    assert small.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if wide and not dtype.is_floating_point:
        big = torch.tensor([2**24 + 1, 2**31 - 1], dtype=dtype)  # not float32 numbers
        assert as_float(big).dtype == torch.float64
        assert as_float(big).tolist() == [2**24 + 1, 2**31 - 1]
        edge = torch.tensor([2**24, -(2**24) if dtype.is_signed else 0], dtype=dtype)
        assert as_float(edge).dtype == torch.float32


def test_small_integers_give_the_same_knn_scores_whatever_their_type():
    """Tied integer data (one-hot, counts): the kNN tie-breaking keys hash the data and its
    dtype, so a float64 cast of int64 but not int16 changed mutual kNN (0.050 vs 0.057)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (60, 4), generator=g)
    y = torch.randint(0, 3, (60, 3), generator=g)
    scores = {dtype: float(F.mutual_knn(x.to(dtype), y.to(dtype), k=5))
              for dtype in (torch.int16, torch.int32, torch.int64, torch.float32)}
    assert len(set(scores.values())) == 1, scores


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("name", ["linear_cka", "procrustes_similarity", "cca_similarity",
                                  "rsa", "mutual_knn"])
def test_large_integer_inputs_are_measured_exactly(name, dtype):
    """Counts or ids around 1e8: float32 spacing is 8 there, so linear_cka refused "all
    samples are identical" and rsa gave a wrong value without an error."""
    g = torch.Generator().manual_seed(1)
    xi = 100_000_000 + torch.randint(0, 1000, (24, 6), generator=g)
    yi = xi[:, :5] + torch.randint(0, 300, (24, 5), generator=g)
    xi, yi = xi.to(dtype), yi.to(dtype)
    kw = {"k": 3} if name == "mutual_knn" else {}
    got = getattr(F, name)(xi, yi, **kw)
    assert got.dtype == torch.float64
    a, b = xi.double().numpy(), yi.double().numpy()
    if name in ("rsa", "mutual_knn"):  # cosines: the ints as they are
        want = {"rsa": R.rsa, "mutual_knn": lambda a, b: R.mutual_knn(a, b, k=3)}[name](a, b)
    else:  # translation-invariant: less the (exact) offset, so NumPy's grams do not cancel
        ref = {"linear_cka": R.linear_cka, "procrustes_similarity": RF.procrustes_similarity,
               "cca_similarity": RF.cca_similarity}[name]
        want = ref(a - 100_000_000, b - 100_000_000)
    assert float(got) == pytest.approx(want, abs=1e-9)


def test_large_integer_rows_reach_the_metric_objects_exactly():
    """The metric objects' rows (and the CLI's feature files) take integers as the functions
    do: int64 around 1e8 in float64 (before: float32, spacing 8, refused as "identical")."""
    from alignment_callback.metrics import CalibratedAlignment

    g = torch.Generator().manual_seed(2)
    xi = 100_000_000 + torch.randint(0, 1000, (40, 6), generator=g)
    yi = xi[:, :5] + torch.randint(0, 300, (40, 5), generator=g)
    metric = CalibratedAlignment("linear_cka", num_permutations=19, preprocess=False)
    metric.update(xi[:25], yi[:25])
    metric.update(xi[25:], yi[25:])
    raw = metric.compute()["raw"]
    assert raw.dtype == torch.float64
    want = R.linear_cka(xi.double().numpy() - 1e8, yi.double().numpy() - 1e8)
    assert float(raw) == pytest.approx(want, abs=1e-9)


def test_rbf_gram_of_float16_features_whose_distances_overflow_says_so():
    """float16 rows beyond ~180 (kept as given: only magnitudes beyond 2**16 are rescaled)
    gave NaN kernel entries (inf − inf) after the rescaling removed the overflow check."""
    from alignment_callback.functional.kernels import rbf_gram

    x, _ = _pair()
    with pytest.raises(ValueError, match=r"squared distances overflow torch.float16 .*pass "
                                         r"float32 or float64"):
        rbf_gram((x * 1e4).half(), sigma=1e4)
    assert torch.isfinite(rbf_gram((x * 20).half(), sigma=20.0)).all()
