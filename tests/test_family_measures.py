"""Shape (Procrustes, shape metric, Bures), CCA (CCA, PWCCA), ridge predictivity and RV.

(a) Agreement with the independent float64 NumPy/SciPy references (numpy_reference_families).
(b) Cross-checks against public implementations: netrep (values stored once in
    fixtures/netrep_family_values.json, provenance in its header), repsim (PyPI, test-only) and
    scikit-learn's Ridge.
(c) Invariances, documented non-invariances, (a)symmetry, input errors.
(d) The fast null equals recomputation: score(sx, sy, perms)[k] == measure(x, y[perms[k]]).
(e) [slow] Validity of the calibrated test at d/n in {0.25, 1, 4}, and the width confounder.
"""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_reference_families as R  # noqa: E402

import alignment_callback.functional as F  # noqa: E402
from alignment_callback.functional import cca_measures as cm  # noqa: E402
from alignment_callback.functional import predictivity as pr
from alignment_callback.functional import rv as rvm
from alignment_callback.functional import shape_measures as sm
from alignment_callback.functional.calibration import calibrate
from alignment_callback.functional.gram_measures import linear_cka
from alignment_callback.functional.permutation import permutations

F64 = torch.float64
FIXTURE = Path(__file__).with_name("fixtures") / "netrep_family_values.json"


def _pair(n, dx, dy, seed, dtype=F64, signal=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=F64) + 0.3
    y = torch.randn(n, dy, generator=g, dtype=F64) - 0.7
    if signal:
        y = y + x[:, :1] * torch.randn(1, dy, generator=g, dtype=F64)
    return x.to(dtype), y.to(dtype)


def _orthogonal(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _invertible(d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, d, generator=g, dtype=F64) + 2.0 * torch.eye(d, dtype=F64)


# name -> (prepare, score, functional, needs rank < n - 1)
MEASURES = {
    "procrustes": (sm.procrustes_state, sm.procrustes_score, sm.procrustes_similarity, False),
    "shape_alpha1": (partial(sm.shape_state, alpha=1.0), sm.shape_score,
                     partial(sm.shape_metric, alpha=1.0), False),
    "shape_alpha0.5": (partial(sm.shape_state, alpha=0.5), sm.shape_score,
                       partial(sm.shape_metric, alpha=0.5), False),
    "shape_alpha0": (partial(sm.shape_state, alpha=0.0), sm.shape_score,
                     partial(sm.shape_metric, alpha=0.0), True),
    "bures_linear": (sm.bures_state, sm.bures_score, sm.bures_similarity, False),
    "bures_rbf_median": (partial(sm.bures_state, kernel="rbf", sigma="median"), sm.bures_score,
                         partial(sm.bures_similarity, kernel="rbf", sigma="median"), False),
    "bures_rbf_sigma1": (partial(sm.bures_state, kernel="rbf", sigma=1.0), sm.bures_score,
                         partial(sm.bures_similarity, kernel="rbf", sigma=1.0), False),
    "cca": (cm.cca_state, cm.cca_score, cm.cca_similarity, True),
    "cca_dims2": (cm.cca_state, partial(cm.cca_score, dims=2), partial(cm.cca_similarity, dims=2),
                  True),
    "pwcca": (cm.pwcca_state, cm.pwcca_score, cm.pwcca, True),
    "predictivity_cv": (pr.predictivity_state, pr.predictivity_score, pr.linear_predictivity,
                        False),
    "predictivity_ridge1": (partial(pr.predictivity_state, ridge=1.0), pr.predictivity_score,
                            partial(pr.linear_predictivity, ridge=1.0), False),
    "rv": (rvm.rv_state, rvm.rv_score, rvm.rv_coefficient, False),
}


# --------------------------------------------------------------------------- (a) references


def _reference(name, x, y):
    X, Y = x.numpy(), y.numpy()
    if name in ("procrustes",):
        return R.procrustes_similarity(X, Y)
    if name.startswith("shape_alpha"):
        return R.shape_metric(X, Y, float(name[len("shape_alpha"):]))
    if name == "bures_linear":
        return R.bures_fidelity(R.center(R.linear_gram(X)), R.center(R.linear_gram(Y)))
    if name.startswith("bures_rbf"):
        sigma = "median" if name.endswith("median") else 1.0
        return R.bures_fidelity(R.center(R.rbf_gram(X, sigma)), R.center(R.rbf_gram(Y, sigma)))
    if name == "cca":
        return R.cca_similarity(X, Y)
    if name == "cca_dims2":
        return R.cca_similarity(X, Y, dims=2)
    if name == "pwcca":
        return R.pwcca(X, Y)
    if name == "predictivity_cv":
        return R.ridge_cv_r2(X, Y, None)
    if name == "predictivity_ridge1":
        return R.ridge_cv_r2(X, Y, 1.0)
    if name == "rv":
        return R.rv_coefficient(X, Y)
    raise KeyError(name)


SHAPES = [(30, 5, 7), (41, 12, 3), (20, 30, 25)]  # the last one: d > n (CCA-type excluded)


@pytest.mark.parametrize("name,shape", [
    (name, shape) for name in sorted(MEASURES) for shape in SHAPES
    if not (MEASURES[name][3] and max(shape[1:]) >= shape[0] - 1)  # rank n - 1: tested below
], ids=lambda v: v if isinstance(v, str) else "n%d_dx%d_dy%d" % v)
def test_matches_numpy_reference(name, shape):
    n, dx, dy = shape
    x, y = _pair(n, dx, dy, seed=sum(shape))
    got = float(MEASURES[name][2](x, y))
    want = _reference(name, x, y)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (got, want)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_float32_close_to_float64_and_keeps_dtype(name):
    x, y = _pair(30, 5, 7, seed=5)
    v64 = MEASURES[name][2](x, y)
    v32 = MEASURES[name][2](x.float(), y.float())
    assert v64.dtype == F64 and v32.dtype == torch.float32
    assert float(v32) == pytest.approx(float(v64), abs=2e-5)


def test_ridge_zero_is_least_squares_and_explicit_grid():
    x, y = _pair(40, 6, 4, seed=8)
    X, Y = x.numpy(), y.numpy()
    want = R.ridge_cv_r2(X, Y, 0.0)
    assert float(pr.linear_predictivity(x, y, ridge=0.0)) == pytest.approx(want, rel=1e-9)
    grid = (0.01, 3.0, 30.0)
    got = float(pr.linear_predictivity(x, y, ridge=grid, folds=4))
    assert got == pytest.approx(R.ridge_cv_r2(X, Y, None, folds=4, grid=grid), rel=1e-9)
    # the grid as a 1-D tensor or array (a tensor was refused), directly and calibrated
    for as_given in (torch.tensor(grid, dtype=F64), np.array(grid)):
        assert float(pr.linear_predictivity(x, y, ridge=as_given, folds=4)) == got
        res = F.calibrated_alignment(x, y, "linear_predictivity", ridge=as_given, folds=4,
                                     num_permutations=9)
        assert float(res.raw) == pytest.approx(got, rel=1e-12)


def test_procrustes_identities():
    """1 − d²/2 (scipy's orthogonal Procrustes), = linear Bures, = cos θ of shape α = 1, and
    the α = 0 shape angle is arccos(Σρ/√(r_x r_y))."""
    x, y = _pair(35, 6, 9, seed=2)
    p = float(sm.procrustes_similarity(x, y))
    assert p == pytest.approx(R.procrustes_similarity(x.numpy(), y.numpy()), rel=1e-12)
    assert float(sm.bures_similarity(x, y, kernel="linear")) == pytest.approx(p, rel=1e-12)
    theta = (math.pi / 2) * (1.0 - float(sm.shape_metric(x, y, alpha=1.0)))
    assert math.cos(theta) == pytest.approx(p, rel=1e-10)
    rho = R.cca_correlations(x.numpy(), y.numpy())
    theta0 = (math.pi / 2) * (1.0 - float(sm.shape_metric(x, y, alpha=0.0)))
    assert math.cos(theta0) == pytest.approx(rho.sum() / math.sqrt(6 * 9), rel=1e-10)
    assert float(cm.cca_similarity(x, y)) == pytest.approx(rho.mean(), rel=1e-10)


def test_rv_equals_linear_cka_exactly():
    for shape in [(30, 5, 7), (20, 30, 25), (64, 3, 100)]:
        x, y = _pair(*shape, seed=shape[2])
        assert float(rvm.rv_coefficient(x, y)) == pytest.approx(float(linear_cka(x, y)), rel=1e-13)
        want = R.rv_coefficient(x.numpy(), y.numpy())
        assert float(rvm.rv_coefficient(x, y)) == pytest.approx(want, rel=1e-10)


# --------------------------------------------------------------------------- (b) public code


def _fixture_cases():
    data = json.loads(FIXTURE.read_text())
    assert "netrep" in data["_provenance"] and "commit" in data["_provenance"]
    return data["cases"]


def _fixture_inputs(case):
    """The generator of tests/fixtures/make_netrep_fixture.py (family_inputs)."""
    rng = np.random.default_rng(case["seed"])
    n, dx, dy = case["n"], case["dx"], case["dy"]
    x = rng.standard_normal((n, dx)) + 0.5
    w = rng.standard_normal((dx, dy)) / np.sqrt(dx)
    y = x @ w + rng.standard_normal((n, dy)) - 1.0
    x, y = case["scale_x"] * x, case["scale_y"] * y
    assert x.sum() == pytest.approx(case["x_sum"], rel=1e-12), "numpy's generator changed"
    assert y.sum() == pytest.approx(case["y_sum"], rel=1e-12), "numpy's generator changed"
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("case", _fixture_cases(), ids=lambda c: c["name"])
def test_matches_netrep(case):
    x, y = _fixture_inputs(case)
    for alpha, dist in case["shape_metric_angular_distance"].items():
        ours = float(sm.shape_metric(x, y, alpha=float(alpha)))
        assert (math.pi / 2) * (1.0 - ours) == pytest.approx(dist, abs=1e-8), alpha
    cka_angle = math.acos(float(rvm.rv_coefficient(x, y)))
    assert cka_angle == pytest.approx(case["linear_cka_angular_distance"], abs=1e-8)
    # normalized Bures distance² = 2 − 2·fidelity
    lin = float(sm.bures_similarity(x, y))
    assert 2 - 2 * lin == pytest.approx(case["sq_bures_linear_trace_normalized"], abs=1e-8)
    rbf = float(sm.bures_similarity(x, y, kernel="rbf", sigma=1.0))
    assert 2 - 2 * rbf == pytest.approx(case["sq_bures_rbf_sigma1_trace_normalized"], abs=1e-8)


@pytest.mark.parametrize("sigma", [8.0, 16.0])
def test_rbf_bures_on_float32_input_is_float32_accurate(sigma):
    """The centered RBF gram of a wide bandwidth has hundreds of eigenvalues near zero, each
    counted by its square root: decomposed in float32 they are rounding, and the score was
    low by 1e-3 to 4e-3 relative at n = 512 (against the float64 fidelity of the same
    float32 numbers)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=g)
    y = torch.randn(512, 16, generator=g) + x[:, :16]
    got = sm.bures_similarity(x, y, kernel="rbf", sigma=sigma)
    want = R.bures_fidelity(R.center(R.rbf_gram(x.double().numpy(), sigma)),
                            R.center(R.rbf_gram(y.double().numpy(), sigma)))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_netrep_partial_whitening_is_not_scale_invariant():
    """The fixture pins netrep's convention: scaling the inputs changes 0 < α < 1 (only)."""
    cases = {c["name"]: c for c in _fixture_cases()}
    raw = cases["low_d"]["shape_metric_angular_distance"]
    scaled = cases["low_d_scaled"]["shape_metric_angular_distance"]
    for alpha in ("0.0", "1.0"):
        assert raw[alpha] == pytest.approx(scaled[alpha], abs=1e-10)
    for alpha in ("0.25", "0.5", "0.75"):
        assert abs(raw[alpha] - scaled[alpha]) > 1e-3


def test_matches_repsim():
    import repsim  # test-only dependency (requirements-dev.txt)
    for shape in [(40, 5, 8), (60, 12, 12), (33, 3, 20)]:
        x, y = _pair(*shape, seed=shape[1] + 100)
        X, Y = x.numpy(), y.numpy()
        # Pillai summary = Σρ / min(p, q) = mean canonical correlation
        pillai = repsim.cca([X, Y], "pillai")[0, 1]
        assert float(cm.cca_similarity(x, y)) == pytest.approx(pillai, rel=1e-8)
        # repsim averages the two weighting directions
        sym = (float(cm.pwcca(x, y)) + float(cm.pwcca(y, x))) / 2
        assert sym == pytest.approx(repsim.pwcca([X, Y])[0, 1], rel=1e-8)
        cka = repsim.cka([X, Y], "linear", "gretton")[0, 1]
        assert float(rvm.rv_coefficient(x, y)) == pytest.approx(cka, rel=1e-8)


def test_predictivity_matches_sklearn_ridge():
    """scikit-learn's Ridge on KFold(5, shuffle=False) with the same per-fold penalties, scored
    with r2_score(multioutput="variance_weighted") (the pooled R²)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold

    def penalty(xs, train, ridge):
        xc = xs[train] - xs[train].mean(0)
        return ridge * np.sum(xc**2) / min(len(train) - 1, xs.shape[1])

    def cv_predict(xs, ys, choose):
        pred = np.zeros_like(ys)
        for train, test in KFold(5, shuffle=False).split(xs):
            alpha = penalty(xs, train, choose(xs[train], ys[train]))
            pred[test] = Ridge(alpha=alpha).fit(xs[train], ys[train]).predict(xs[test])
        return pred

    def inner_choice(xt, yt):
        errs = [np.sum((yt - cv_predict(xt, yt, lambda a, b, g=g: g)) ** 2) for g in pr.RIDGE_GRID]
        return pr.RIDGE_GRID[int(np.argmin(errs))]

    x, y = _pair(47, 9, 5, seed=21)
    X, Y = x.numpy(), y.numpy()
    fixed = cv_predict(X, Y, lambda xt, yt: 0.7)
    want = r2_score(Y, fixed, multioutput="variance_weighted")
    assert float(pr.linear_predictivity(x, y, ridge=0.7)) == pytest.approx(want, rel=1e-9)
    want = r2_score(Y, cv_predict(X, Y, inner_choice), multioutput="variance_weighted")
    assert float(pr.linear_predictivity(x, y)) == pytest.approx(want, rel=1e-9)
    # the mean of per-output R² is the pooled R² of column-standardized y
    ys = (y - y.mean(0)) / y.std(0)
    want = r2_score(Y, fixed, multioutput="uniform_average")
    assert float(pr.linear_predictivity(x, ys, ridge=0.7)) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- (c) invariances


def _transforms(x, y):
    n, dx = x.shape
    dy = y.shape[1]
    return {
        "rotate_x": (x @ _orthogonal(dx, 1), y),
        "rotate_y": (x, y @ _orthogonal(dy, 2)),
        "scale_iso": (3.7 * x, 0.2 * y),
        "translate": (x + torch.linspace(-5, 5, dx, dtype=F64), y - 11.0),
        "linear_x": (x @ _invertible(dx, 3), y),
        "linear_y": (x, y @ _invertible(dy, 4)),
        "scale_aniso_x": (x * torch.linspace(0.2, 5.0, dx, dtype=F64), y),
        "scale_aniso_y": (x, y * torch.linspace(0.2, 5.0, dy, dtype=F64)),
        "signperm_x": (x.flip(1) * torch.tensor([(-1.0) ** j for j in range(dx)], dtype=F64), y),
    }


BASIC = {"rotate_x", "rotate_y", "scale_iso", "translate"}
INVARIANT = {
    "procrustes": BASIC,
    "shape_alpha1": BASIC,
    "bures_linear": BASIC,
    "rv": BASIC,
    "bures_rbf_median": BASIC,
    "bures_rbf_sigma1": {"rotate_x", "rotate_y", "translate"},
    "shape_alpha0.5": {"rotate_x", "rotate_y", "translate"},
    "shape_alpha0": BASIC | {"linear_x", "linear_y", "scale_aniso_x", "scale_aniso_y"},
    "cca": BASIC | {"linear_x", "linear_y", "scale_aniso_x", "scale_aniso_y"},
    "cca_dims2": BASIC | {"linear_x", "linear_y", "scale_aniso_x", "scale_aniso_y"},
    "pwcca": {"rotate_y", "scale_iso", "translate", "linear_y", "scale_aniso_y", "signperm_x"},
    "predictivity_cv": BASIC,
    "predictivity_ridge1": BASIC,
}
NOT_INVARIANT = {
    "procrustes": {"scale_aniso_x", "linear_x"},
    "shape_alpha1": {"scale_aniso_x", "linear_x"},
    "bures_linear": {"scale_aniso_x", "linear_x"},
    "rv": {"scale_aniso_x", "linear_x"},
    "bures_rbf_median": {"scale_aniso_x"},
    "bures_rbf_sigma1": {"scale_iso", "scale_aniso_x"},
    "shape_alpha0.5": {"scale_iso", "scale_aniso_x", "linear_x"},
    "pwcca": {"rotate_x", "linear_x", "scale_aniso_x"},
    "predictivity_cv": {"scale_aniso_y", "linear_y"},
    "predictivity_ridge1": {"scale_aniso_y", "scale_aniso_x", "linear_x"},
}


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_invariances(name):
    fn = MEASURES[name][2]
    x, y = _pair(40, 6, 9, seed=31)
    base = float(fn(x, y))
    for t, (xt, yt) in _transforms(x, y).items():
        v = float(fn(xt, yt))
        if t in INVARIANT[name]:
            assert v == pytest.approx(base, abs=1e-9), (t, v, base)
        if t in NOT_INVARIANT.get(name, ()):
            assert abs(v - base) > 1e-4, (t, v, base)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_symmetry(name):
    fn = MEASURES[name][2]
    x, y = _pair(40, 6, 9, seed=32)
    if name.startswith(("pwcca", "predictivity")):
        assert abs(float(fn(x, y)) - float(fn(y, x))) > 1e-3  # directional
    else:
        assert float(fn(x, y)) == pytest.approx(float(fn(y, x)), abs=1e-12)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_range_and_identity(name):
    fn = MEASURES[name][2]
    x, y = _pair(40, 6, 9, seed=33, signal=False)
    v = float(fn(x, y))
    assert v <= 1.0 + 1e-12
    scale = 2.5 if "scale_iso" in INVARIANT[name] else 1.0
    same = scale * x @ _orthogonal(6, 9) + 1.0
    if not name.startswith("predictivity"):
        assert v >= 0.0
        assert float(fn(x, same)) == pytest.approx(1.0, abs=1e-6)
    else:  # out-of-fold: the penalty shrinks even a perfect fit; least squares recovers it
        lo = 0.98 if name == "predictivity_cv" else 0.5  # the grid reaches 1e-3; ridge=1 shrinks
        assert lo < float(fn(x, same)) < 1.0
        assert float(pr.linear_predictivity(x, same, ridge=0.0)) == pytest.approx(1.0, abs=1e-9)


def test_cca_family_rank_errors():
    x, y = _pair(20, 19, 5, seed=1)  # rank 19 = n - 1
    for fn in (cm.cca_similarity, cm.pwcca, partial(sm.shape_metric, alpha=0.0)):
        with pytest.raises(ValueError, match="n - 1"):
            fn(x, y)
        with pytest.raises(ValueError, match="n - 1"):
            fn(y, x)
    x, y = _pair(20, 60, 5, seed=1)
    with pytest.raises(ValueError, match="rank 19"):
        cm.cca_similarity(x, y)
    # any alpha > 0 is fine at d > n
    assert 0.0 <= float(sm.shape_metric(x, y, alpha=1e-3)) <= 1.0
    # rank-deficient but < n - 1 is handled: duplicated columns count once
    x, y = _pair(30, 4, 6, seed=2)
    xd = torch.cat([x, x[:, :2] * 2.0], 1)
    assert float(cm.cca_similarity(xd, y)) == pytest.approx(float(cm.cca_similarity(x, y)),
                                                            abs=1e-10)
    with pytest.raises(ValueError, match="dims=5 exceeds"):
        cm.cca_similarity(x, y, dims=5)


@pytest.mark.parametrize("fail", ["batch", "always"])
def test_pwcca_svd_fallback(monkeypatch, fail):
    """A non-converging SVD (many tied correlations, float32) is redone in float64, then by
    svdvals + eigh: same values."""
    x, y = _pair(40, 6, 9, seed=5, dtype=torch.float32)
    perms = permutations(40, 4, seed=2)
    sx, sy = cm.pwcca_state(x), cm.pwcca_state(y)
    want = cm.pwcca_score(sx, sy, perms)
    real_svd = torch.linalg.svd

    def flaky(a, *args, **kwargs):
        if fail == "always" or a.dim() == 3:
            raise torch.linalg.LinAlgError("did not converge")
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    got = cm.pwcca_score(sx, sy, perms)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_bad_arguments():
    x, y = _pair(30, 4, 6, seed=3)
    for alpha in (-0.1, 1.5, "1", True):
        with pytest.raises(ValueError, match="alpha"):
            sm.shape_metric(x, y, alpha=alpha)
    with pytest.raises(ValueError, match="kernel"):
        sm.bures_similarity(x, y, kernel="poly")
    with pytest.raises(ValueError, match="sigma"):
        sm.bures_similarity(x, y, kernel="rbf", sigma=-1.0)
    for dims in (0, 1.5, True):
        with pytest.raises(ValueError, match="dims"):
            cm.cca_similarity(x, y, dims=dims)
    for ridge in (-1.0, float("nan"), float("inf"), (), (1.0, -2.0), "1"):
        with pytest.raises(ValueError, match="ridge"):
            pr.linear_predictivity(x, y, ridge=ridge)
    for folds in (1, 2.5, True):
        with pytest.raises(ValueError, match="folds"):
            pr.linear_predictivity(x, y, folds=folds)
    with pytest.raises(ValueError, match="n >= 2\\*folds = 10"):
        pr.linear_predictivity(x[:9], y[:9])
    assert math.isfinite(float(pr.linear_predictivity(x[:10], y[:10])))
    assert math.isfinite(float(pr.linear_predictivity(x[:4], y[:4], folds=2)))
    with pytest.raises(ValueError, match="same number of samples"):
        sm.procrustes_similarity(x, y[:-1])
    big = torch.ones(2000, 2, dtype=F64)  # centering round-off grows with n: still detected
    with pytest.raises(ValueError, match="zero-variance"):
        sm.bures_similarity(big, big + torch.arange(2000.0, dtype=F64)[:, None], "rbf", 1.0)
    const = torch.ones(30, 4, dtype=F64)
    for name, (_, _, fn, _) in MEASURES.items():
        with pytest.raises(ValueError, match="zero-variance"):
            fn(const, y)
        with pytest.raises(ValueError, match="zero-variance"):
            fn(x, const)


# --------------------------------------------------------------------------- (d) fast null


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,wide", [
    (name, wide) for name in sorted(MEASURES) for wide in (False, True)
    if not (wide and MEASURES[name][3])  # CCA-type measures need d < n - 1
], ids=lambda v: v if isinstance(v, str) else ("wide" if v else "narrow"))
def test_fast_null_equals_recompute(name, wide, dtype):
    prep, score, fn, rank_limited = MEASURES[name]
    n = 26
    x, y = _pair(n, 40 if wide else 5, 33 if wide else 7, seed=77, dtype=dtype)
    perms = permutations(n, 5, seed=4)
    fast = score(prep(x), prep(y), perms)
    naive = torch.stack([fn(x, y[p]) for p in perms])
    assert fast.dtype == dtype and fast.shape == (5,)
    tol = 1e-10 if dtype == F64 else 1e-6
    torch.testing.assert_close(fast, naive, atol=tol, rtol=0)
    # a prepared y is reused across chunks: the same values chunk by chunk
    sx, sy = prep(x), prep(y)
    chunked = torch.cat([score(sx, sy, perms[:2]), score(sx, sy, perms[2:])])
    torch.testing.assert_close(chunked, fast, atol=tol, rtol=0)


def test_predictivity_state_is_lazy():
    x, y = _pair(30, 4, 6, seed=3)
    sy = pr.predictivity_state(y)
    assert "forms" not in sy.__dict__  # the y side never builds x's quadratic forms
    pr.predictivity_score(pr.predictivity_state(x), sy, permutations(30, 2, seed=0))
    assert "forms" not in sy.__dict__ and "target" in sy.__dict__


def test_global_rng_untouched():
    x, y = _pair(30, 4, 6, seed=3)
    state = torch.get_rng_state()
    for _, (_, _, fn, _) in MEASURES.items():
        fn(x, y)
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------- (e) validity


ALPHA = 0.05
N_NULL = 32
VALIDITY = ["procrustes", "shape_alpha0.5", "shape_alpha0", "bures_rbf_median", "cca", "pwcca",
            "predictivity_cv", "rv"]


# One-sided binomial bands at z = 3 (the project's standard: rate <= alpha + 3 sigma).
Z = 3.0


def _band(level, reps):
    return level + Z * math.sqrt(level * (1.0 - level) / reps)


def _calibrated(name, x, y, seed, K=100):
    prep, score, _, _ = MEASURES[name]
    sx, sy = prep(x), prep(y)
    obs = score(sx, sy, torch.arange(x.shape[0])[None])[0]
    return calibrate(obs, score(sx, sy, permutations(x.shape[0], K, seed)), ALPHA, max_score=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("d", [8, 32, 128])  # d/n = 0.25, 1, 4
@pytest.mark.parametrize("name", VALIDITY)
def test_type_one_error_under_independence(name, d):
    reps = 300
    if MEASURES[name][3] and d >= N_NULL - 1:
        # degenerate at d/n >= 1: every canonical correlation is 1, so the measures refuse
        x, y = _pair(N_NULL, d, d, seed=d, signal=False)
        with pytest.raises(ValueError, match="n - 1"):
            MEASURES[name][2](x, y)
        return
    p, cal = [], []
    for r in range(reps):
        x, y = _pair(N_NULL, d, d, seed=10_000 * d + r, signal=False)
        # K = 39: p = (1 + c)/40 puts mass exactly 0.05, 0.2 and 0.5 at the levels tested
        res = _calibrated(name, x, y, seed=r, K=39)
        p.append(float(res.p_value))
        cal.append(float(res.calibrated))
    p, cal = np.array(p), np.array(cal)
    assert np.mean(p <= ALPHA) <= _band(ALPHA, reps), np.mean(p <= ALPHA)
    assert np.mean(cal > 0) <= _band(ALPHA, reps), np.mean(cal > 0)
    assert np.median(cal) == 0.0
    for level in (0.2, 0.5):  # super-uniform, and (continuous scores) not trivially conservative
        assert np.mean(p <= level) <= _band(level, reps)
        assert np.mean(p <= level) >= level - Z * math.sqrt(level * (1 - level) / reps)


@pytest.mark.slow
def test_power_on_shared_signal():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(N_NULL, 2, generator=g, dtype=F64)
    x, y = (z @ torch.randn(2, 8, generator=g, dtype=F64)
            + 0.5 * torch.randn(N_NULL, 8, generator=g, dtype=F64) for _ in range(2))
    for name in VALIDITY:
        res = _calibrated(name, x, y, seed=0)
        assert float(res.p_value) <= 1 / 101 + 1e-12 and float(res.calibrated) > 0, name


# width grids per measure: d/n spans a wide range (CCA-type: below the rank limit)
WIDTHS = {
    "procrustes": [4, 16, 64, 256],
    "shape_alpha0.5": [4, 16, 64, 256],
    "shape_alpha0": [2, 4, 8, 16],
    "bures_rbf_median": [4, 16, 64, 256],
    "cca": [2, 4, 8, 16],
    "pwcca": [2, 4, 8, 16],
    "rv": [4, 16, 64, 256],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_width_confounder(name):
    """Raw scores of independent data grow with d/n; calibrated scores stay at 0."""
    reps, raw_means, cal_all = 12, [], []
    for d in WIDTHS[name]:
        raws = []
        for r in range(reps):
            x, y = _pair(N_NULL, d, d, seed=7_000 * d + r, signal=False)
            res = _calibrated(name, x, y, seed=r)
            raws.append(float(res.raw))
            cal_all.append(float(res.calibrated))
        raw_means.append(np.mean(raws))
    assert all(b > a for a, b in zip(raw_means, raw_means[1:])), raw_means
    assert raw_means[-1] - raw_means[0] > 0.2, raw_means
    cal_all = np.array(cal_all)  # the rejection rate itself is tested with 300 draws above
    assert np.median(cal_all) == 0.0 and np.mean(cal_all) < 0.02, np.mean(cal_all)


@pytest.mark.slow
def test_predictivity_has_no_width_inflation_but_a_negative_bias():
    """Cross-validated R² is out-of-sample, so it does not grow with d/n like the in-sample
    measures; under independence it sits slightly below 0 (the training means and the shrunk
    fits are noise).  Calibration maps it to 0 all the same."""
    means, cal_all = [], []
    for d in [4, 16, 64, 256]:
        raws = []
        for r in range(12):
            x, y = _pair(N_NULL, d, d, seed=9_000 * d + r, signal=False)
            res = _calibrated("predictivity_cv", x, y, seed=r)
            raws.append(float(res.raw))
            cal_all.append(float(res.calibrated))
        means.append(np.mean(raws))
    assert all(-0.3 < m < 0.0 for m in means), means
    assert max(means) - min(means) < 0.1, means
    assert np.mean(np.array(cal_all) > 0) <= _band(ALPHA, len(cal_all))


# --------------------------------------------------------------------------- registry wiring


def _declared():
    """The registered measures, with the options the functionals below use."""
    return {
        "procrustes": F.get_measure("procrustes_similarity"),
        "shape_metric": F.get_measure("shape_metric", alpha=0.5),
        "bures": F.get_measure("bures_similarity", kernel="rbf", sigma="median"),
        "cca": F.get_measure("cca_similarity"),
        "pwcca": F.get_measure("pwcca"),
        "linear_predictivity": F.get_measure("linear_predictivity"),
        "rv_coefficient": F.get_measure("rv_coefficient"),
    }


FUNCTIONALS = {
    "procrustes": sm.procrustes_similarity,
    "shape_metric": partial(sm.shape_metric, alpha=0.5),
    "bures": partial(sm.bures_similarity, kernel="rbf", sigma="median"),
    "cca": cm.cca_similarity,
    "pwcca": cm.pwcca,
    "linear_predictivity": pr.linear_predictivity,
    "rv_coefficient": rvm.rv_coefficient,
}


@pytest.mark.parametrize("name", sorted(FUNCTIONALS))
def test_declared_measures_run_through_the_calibration(name):
    from alignment_callback.functional import (
        calibrated_alignment,
        calibrated_layer_alignment,
        permutation_null,
    )

    measure = _declared()[name]
    x, y = _pair(30, 4, 6, seed=40)
    res = calibrated_alignment(x, y, measure, num_permutations=20, seed=3)
    assert float(res.raw) == pytest.approx(float(FUNCTIONALS[name](x, y)), abs=1e-12)
    assert float(measure(x, y)) == pytest.approx(float(res.raw), abs=1e-12)
    null = permutation_null(x, y, measure, num_permutations=20, seed=3)
    want = torch.stack([FUNCTIONALS[name](x, y[p]) for p in permutations(30, 20, seed=3)])
    torch.testing.assert_close(null, want, atol=1e-10, rtol=0)
    xs = [x, x[:, :3] + 0.1 * y[:, :3]]
    ys = [y, y[:, :5]]
    layers = calibrated_layer_alignment(xs, ys, measure, num_permutations=20, seed=3)
    for a in range(2):
        for b in range(2):
            want = float(FUNCTIONALS[name](xs[a], ys[b]))
            assert float(layers.matrix[a, b]) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("case", ["rotated copy + 1e-4 noise", "one dominant column"])
def test_shape_metric_near_perfect_alignment_in_float32(alpha, case):
    """Near θ = 0, arccos turns float32's rounding of the cosine (≈1e-7) into an angle error of
    √(2·1e-7) ≈ 4e-4; the angle is taken from the aligned residual there instead, so float32
    agrees with the float64 reference to 1e-6."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, 16, generator=g, dtype=torch.float64)
    if case == "one dominant column":
        x[:, 0] *= 1e4
        y = x + torch.randn(150, 16, generator=g, dtype=torch.float64)
    else:
        q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
        y = x @ q + 1e-4 * torch.randn(150, 16, generator=g, dtype=torch.float64)
    x, y = x.float(), y.float()
    want = R.shape_metric(x.double().numpy(), y.double().numpy(), alpha)
    assert want > 0.9997  # the regime this is about
    got = float(F.get_measure("shape_metric", alpha=alpha)(x, y))
    assert got == pytest.approx(want, abs=1e-6)
    assert float(F.get_measure("shape_metric", alpha=alpha)(x.double(), y.double())) == pytest.approx(want, abs=1e-9)
