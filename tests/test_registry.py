"""One harness over the measure registry: every registered measure, whatever its family, is
declared completely, equals its float64 NumPy reference, has a fast null equal to
recomputation, gives the same numbers through every entry point (functional, layers, metric
objects, the engine), pickles, and refuses too few samples.  A new measure is one registration
plus a NumPy reference in ``REFERENCES`` below, and this file checks it."""

from __future__ import annotations

import pickle
from functools import partial

import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional.registry import REGISTRY, canonical_name
from alignment_callback.metrics import CalibratedAlignment
from tests import numpy_reference as ref
from tests import numpy_reference_families as fam

#: float64 NumPy references, written from each measure's definition, at default parameters.
REFERENCES = {
    "linear_cka": ref.linear_cka,
    "rbf_cka": ref.rbf_cka,
    "unbiased_cka": ref.unbiased_cka,
    "rsa": ref.rsa,
    "mutual_knn": ref.mutual_knn,
    "cycle_knn": ref.cycle_knn,
    "cknna": ref.cknna,
    "lcs_knn": ref.lcs_knn,
    "edit_distance_knn": ref.edit_distance_knn,
    "svcca": partial(ref.svcca, cca_dim=10),
    "procrustes_similarity": fam.procrustes_similarity,
    "shape_metric": partial(fam.shape_metric, alpha=1.0),
    "bures_similarity": lambda x, y: fam.bures_fidelity(fam.center(fam.linear_gram(x)),
                                                        fam.center(fam.linear_gram(y))),
    "cca_similarity": fam.cca_similarity,
    "pwcca": fam.pwcca,
    "linear_predictivity": fam.ridge_cv_r2,
    "rv_coefficient": fam.rv_coefficient,
}
NAMES = sorted(REGISTRY)
N, DX, DY = 40, 12, 11


def data(n: int = N, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DX, generator=g, dtype=dtype)
    y = x[:, :DY] @ torch.randn(DY, DY, generator=g, dtype=dtype) + torch.randn(n, DY, generator=g, dtype=dtype)
    return x, y


def test_every_registered_measure_has_a_reference():
    assert sorted(REFERENCES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_declaration_is_complete(name):
    info = REGISTRY[name]
    assert info.family in ("gram", "knn", "other")
    assert info.summary and info.null_method and info.invariances
    assert info.value_range[1] is not None  # every built-in has an s_max
    measure = F.get_measure(name)
    assert measure.min_samples >= 2 and measure.perm_cost(100) >= 100
    assert hasattr(F, name), f"functional {name} is not exported"
    for alias in info.aliases:
        assert canonical_name(alias) == name


@pytest.mark.parametrize("name", NAMES)
def test_equals_numpy_reference(name):
    x, y = data()
    expected = REFERENCES[name](x.numpy(), y.numpy())
    assert float(getattr(F, name)(x, y)) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert float(F.get_measure(name)(x, y)) == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_fast_null_equals_recomputation(name):
    x, y = data(seed=1)
    measure = F.get_measure(name)
    null = F.permutation_null(x, y, name, 8, seed=2)
    expected = torch.stack([measure(x, y[p]) for p in F.permutations(N, 8, seed=2)])
    torch.testing.assert_close(null, expected.to(null.dtype), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_point_gives_the_same_numbers(name):
    x, y = data(seed=3)
    x2 = torch.tanh(x)
    functional = F.calibrated_alignment(x, y, name, 20, seed=4)
    metric = CalibratedAlignment(name, num_permutations=20, seed=4, preprocess=False)
    metric.update(x[:25], y[:25])
    metric.update(x[25:], y[25:])
    out = metric.compute()
    layers = F.calibrated_layer_alignment({"a": x, "b": x2}, {"c": y}, name, num_permutations=20, seed=4)
    engine = AlignmentEngine([name], num_permutations=20, seed=4, preprocess=False)
    engine.set_reference({"c": y})
    step = engine.step({"a": x, "b": x2}).results[name]
    for key in ("raw", "calibrated", "p_value", "threshold"):
        assert float(out[key]) == pytest.approx(float(getattr(functional, key)), abs=1e-12), key
        assert float(getattr(step, key)) == pytest.approx(float(getattr(layers, key)), abs=1e-12), key
    assert float(layers.matrix[0, 0]) == pytest.approx(float(functional.raw), abs=1e-12)
    assert float(layers.matrix[1, 0]) == pytest.approx(float(F.get_measure(name)(x2, y)), abs=1e-12)
    torch.testing.assert_close(step.matrix, layers.matrix)


@pytest.mark.parametrize("name", NAMES)
def test_measure_pickles_and_too_few_samples_are_refused(name):
    measure = F.get_measure(name)
    assert pickle.loads(pickle.dumps(measure)) == measure
    x, y = data(n=measure.min_samples - 1)
    with pytest.raises(ValueError, match=f"needs at least {measure.min_samples} samples"):
        F.calibrated_alignment(x, y, name, 5)


def test_unknown_option_is_refused_with_the_accepted_ones():
    with pytest.raises(TypeError, match=r"linear_cka got unexpected keyword argument\(s\) \['k'\]"):
        F.get_measure("linear_cka", k=3)
    with pytest.raises(TypeError, match=r"it accepts \['k'\]"):
        F.get_measure("mutual_knn", sigma=1.0)


def test_numpy_references_do_not_use_the_library():
    for module in (ref, fam):
        source = open(module.__file__).read()
        assert "import alignment_callback" not in source and "from alignment_callback" not in source


def test_metric_keyword_is_a_deprecated_name_of_measure():
    """``metric=`` (a measure is the math, a metric the torchmetrics object) still works
    everywhere it used to, warns, and gives the same result as ``measure=``."""
    from alignment_callback import AlignmentCallback
    from alignment_callback.functional.bootstrap import bootstrap_interval
    from alignment_callback.metrics import CalibratedAlignment, LayerAlignment

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = x + torch.randn(40, 5, generator=g, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="metric= argument is now called measure="):
        old = F.calibrated_alignment(x, y, metric="linear_cka", num_permutations=20)
    new = F.calibrated_alignment(x, y, measure="linear_cka", num_permutations=20)
    assert float(old.p_value) == float(new.p_value) and float(old.raw) == float(new.raw)
    with pytest.warns(DeprecationWarning):
        layers = F.calibrated_layer_alignment([x], [y], metric="cknna", k=5, num_permutations=20)
    assert layers.measure == "cknna"
    with pytest.warns(DeprecationWarning):
        assert F.permutation_null(x, y, metric="rsa", num_permutations=3).shape == (3,)
    with pytest.warns(DeprecationWarning):
        boot = bootstrap_interval(x, y, metric="linear_cka", num_bootstrap=2, num_permutations=9)
    assert boot.low <= boot.high
    for cls in (CalibratedAlignment, LayerAlignment):
        with pytest.warns(DeprecationWarning):
            assert cls(metric="mutual_knn", k=3).measure.name == "mutual_knn"
    with pytest.warns(DeprecationWarning, match="measures="):
        cb = AlignmentCallback(torch.nn.Linear(5, 5), probe=x.float(), layers="", metrics=["rsa"])
    assert list(cb.measures) == ["rsa"]


def _hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """An unnormalized statistic (values far above 1)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return ((xc.T @ yc) ** 2).sum() / len(x)


def test_a_callable_measure_is_not_clamped_and_has_no_assumed_maximum():
    """A plain callable's range is unknown: its scores are used as they are (they were clamped
    to 1), s_max is None (calibrated = [s − τ]₊) unless max_score is given."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    perms = F.permutations(40, 99, seed=0)
    direct = torch.stack([_hsic(x, y[p]) for p in perms])
    null = F.permutation_null(x, y, _hsic, 99, seed=0)
    torch.testing.assert_close(null, direct, rtol=1e-12, atol=0)
    assert float(null.max()) > 1
    r = F.calibrated_alignment(x, y, _hsic, 99, seed=0)
    raw = float(_hsic(x, y))
    assert float(r.raw) == pytest.approx(raw, rel=1e-12) and raw > 1
    tau = float(torch.sort(torch.cat([r.raw[None], null]))[0][94])  # the ⌈0.95·100⌉-th smallest
    assert float(r.threshold) == pytest.approx(tau, rel=1e-12)
    assert float(r.calibrated) == pytest.approx(raw - tau, rel=1e-12)
    scaled = F.calibrated_alignment(x, y, _hsic, 99, seed=0, max_score=1000.0)
    assert float(scaled.calibrated) == pytest.approx((raw - tau) / (1000.0 - tau), rel=1e-12)


def test_callables_with_one_name_are_different_measures():
    """Two lambdas, or a function named like a built-in, are not merged with each other or
    with the built-in (one result was given to both labels)."""
    def linear_cka(x, y):  # noqa: ARG001 - a user's function named like the built-in
        return torch.tensor(0.123, dtype=x.dtype)

    f1 = lambda x, y: torch.tensor(0.25, dtype=x.dtype)  # noqa: E731, ARG005
    f2 = lambda x, y: torch.tensor(0.75, dtype=x.dtype)  # noqa: E731, ARG005
    assert F.get_measure(f1) != F.get_measure(f2)
    assert F.get_measure(linear_cka) != F.get_measure("linear_cka")
    assert F.get_measure(f1) == F.get_measure(f1)  # the same function shares its states
    x, y = data(n=20)
    res = F.calibrate_measures({"a": x}, {"b": y}, {"f1": f1, "f2": f2, "mine": linear_cka,
                                                    "builtin": "linear_cka"}, num_permutations=9)
    assert [float(res[k].raw) for k in ("f1", "f2", "mine")] == pytest.approx([0.25, 0.75, 0.123])
    assert float(res["builtin"].raw) == pytest.approx(float(F.linear_cka(x, y)), rel=1e-6)
    engine = AlignmentEngine({"f1": f1, "f2": f2}, num_permutations=9)  # the documented form
    engine.set_reference({"a": y})
    step = engine.step({"a": x})
    assert float(step.results["f1"].raw) == 0.25 and float(step.results["f2"].raw) == 0.75


def test_a_callable_returning_a_vector_is_a_clear_error():
    x, y = data(n=20)
    with pytest.raises(ValueError, match="a measure callable's value must be one number"):
        F.calibrated_alignment(x, y, lambda a, b: a.sum(0), 9)


def test_a_registered_measure_calibrates_like_its_definition(monkeypatch):
    """register_measure: a declared fast null (prepare once, score a batch of permutations)
    equals the definition recomputed in NumPy; names and aliases may not clash or repeat."""
    import numpy as np

    from alignment_callback.functional import registry

    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # undone after the test
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))

    def prepare(x, role, shared, col=0):  # noqa: ARG001
        c = x[:, col].double() - x[:, col].double().mean()
        return c / c.norm()

    def score(sx, sy, perms, col=0):  # noqa: ARG001
        return (sx[None, :] * sy[perms]).sum(1).abs()

    def check_col(v, name):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        return v

    info = registry.MeasureInfo("colcorr", "other", "|corr| of one column", prepare, score,
                                params=(registry.Param("col", 0, check_col, "column"),),
                                aliases=("cc",))
    registry.register_measure(info)
    x, y = data(n=50)
    K = 99
    r = F.calibrated_alignment(x, y, "cc", K, seed=1, col=1)

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return abs(float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b)))

    xs, ys = x.numpy()[:, 1], y.numpy()[:, 1]
    s = corr(xs, ys)
    null = np.array([corr(xs, ys[p]) for p in F.permutations(50, K, 1).numpy()])
    tau = np.sort(np.r_[s, null])[94]
    assert float(r.raw) == pytest.approx(s, rel=1e-12)
    assert float(r.threshold) == pytest.approx(tau, rel=1e-12)
    assert float(r.p_value) == pytest.approx((1 + (null >= s).sum()) / (K + 1))
    assert float(r.calibrated) == pytest.approx(max((s - tau) / (1 - tau), 0.0), rel=1e-12)
    with pytest.raises(ValueError, match="col must be a non-negative int"):
        F.calibrated_alignment(x, y, "colcorr", K, col=-1)
    for clash in (registry.MeasureInfo("colcorr", "other", "", prepare, score),
                  registry.MeasureInfo("zz", "other", "", prepare, score, aliases=("linear_cka",))):
        with pytest.raises(ValueError, match="already registered"):
            registry.register_measure(clash)
    with pytest.raises(ValueError, match="repeat a name"):
        registry.register_measure(registry.MeasureInfo("yy", "other", "", prepare, score,
                                                       aliases=("yy",)))
    assert "yy" not in registry.REGISTRY and "zz" not in registry.REGISTRY
