"""A degenerate representation is named by its side, whichever way the measure is called.

``calibrated_alignment`` prefixed a data error with the side ("y: zero-variance
representation: ..."), but the plain functions (``F.linear_cka(x, y)``) and the bound measures
(``get_measure(name)(x, y)``) raised the bare message, so a caller could not tell whether x or
y was degenerate.  Every registered measure is checked (new ones included), with its default
parameters; errors about the pair or the parameters stay unprefixed.
"""

from __future__ import annotations

import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.functional.gram_measures import FEATURE_ROUTE_MIN_SAMPLES
from alignment_callback.functional.registry import REGISTRY

N, D = 48, 12  # enough for every default (k=10, cca_dim=10, folds=5, CCA's n >= d + 2)
SIDES = ("x", "y")


def _good(seed: int, n: int = N, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _constant(n: int = N, d: int = D) -> torch.Tensor:
    """Every row identical (and non-zero): degenerate for every measure."""
    return torch.linspace(1.0, 2.0, d, dtype=torch.float64).expand(n, d).clone()


def _inputs(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (_constant(), _good(1)) if side == "x" else (_good(0), _constant())


def _message(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[2, 0] = float("nan")
    return t


def _plain(name: str):
    fn = getattr(F, name, None)
    if not callable(fn):
        pytest.skip(f"{name} has no plain function")
    return fn


def _assert_named(text: str, side: str) -> None:
    other = "y" if side == "x" else "x"
    assert text.startswith(f"{side}: "), text
    assert not text.startswith((f"{side}: {side}", f"{side}: {other}: ")), text
    assert f" {side} is " not in text, text  # no "y: ... y is constant" (twice named)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", list(REGISTRY))
def test_plain_function_names_the_degenerate_side(name, side):
    assert REGISTRY[name].min_samples({p.name: p.default for p in REGISTRY[name].params}) <= N
    x, y = _inputs(side)
    _assert_named(_message(lambda: _plain(name)(x, y)), side)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", list(REGISTRY))
def test_bound_measure_names_the_degenerate_side(name, side):
    x, y = _inputs(side)
    _assert_named(_message(lambda: F.get_measure(name)(x, y)), side)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_entry_point_says_the_same(name, side):
    """calibrated_alignment's message is unchanged, and the others now read exactly like it."""
    x, y = _inputs(side)
    calibrated = _message(lambda: F.calibrated_alignment(x, y, name, num_permutations=9))
    _assert_named(calibrated, side)
    assert _message(lambda: F.get_measure(name)(x, y)) == calibrated
    if callable(getattr(F, name, None)):
        assert _message(lambda: getattr(F, name)(x, y)) == calibrated


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", ["linear_cka", "rv_coefficient"])
def test_feature_route_names_the_degenerate_side(name, side):
    """From n = 4096 with d < n the linear kernel works on the features: named there too."""
    n = FEATURE_ROUTE_MIN_SAMPLES
    x, y = (_constant(n, 3), _good(1, n, 3)) if side == "x" else (_good(0, n, 3), _constant(n, 3))
    bound = _message(lambda: F.get_measure(name)(x, y))
    _assert_named(bound, side)
    if name == "linear_cka":
        assert _message(lambda: F.linear_cka(x, y)) == bound
        assert _message(lambda: F.calibrated_alignment(x, y, name, num_permutations=9,
                                                       null="moments")) == bound


@pytest.mark.parametrize("side", SIDES)
def test_side_specific_shapes_are_named(side):
    """svcca's cca_dim above one side's features is that side's problem."""
    x, y = (_good(0, N, 3), _good(1)) if side == "x" else (_good(0), _good(1, N, 3))
    text = _message(lambda: F.svcca(x, y, cca_dim=5))
    _assert_named(text, side)
    assert "cca_dim=5 is too large" in text and "d=3" in text
    assert _message(lambda: F.get_measure("svcca", cca_dim=5)(x, y)) == text


def test_linear_predictivity_names_y_once():
    text = _message(lambda: F.linear_predictivity(_good(0), _constant()))
    assert text.startswith("y: zero-variance representation: the representation is constant"), text


@pytest.mark.parametrize("call, start", [
    (lambda x, y: F.linear_cka(x, y[:-1]), "x and y must have the same number of samples"),
    (lambda x, y: F.linear_cka(x, _with_nan(y)), "y contains 1 NaN/Inf value(s)"),
    (lambda x, y: F.mutual_knn(x[:8], y[:8], k=10), "mutual_knn needs more samples"),
    (lambda x, y: F.mutual_knn(x, y, k=0), "mutual_knn needs k >= 1"),
    (lambda x, y: F.cknna(x[:3], y[:3], k=2), "cknna needs at least 4 samples"),
    (lambda x, y: F.unbiased_cka(x[:3], y[:3]), "unbiased HSIC needs n >= 4"),
    (lambda x, y: F.rsa(x[:2], y[:2]), "rsa needs at least 3 samples"),
    (lambda x, y: F.rbf_cka(x, y, sigma=-1.0), "rbf_cka: sigma must be a finite positive number"),
    (lambda x, y: F.rbf_cka(x, y, sigma="mean"), "rbf_cka: sigma must be a finite positive"),
    (lambda x, y: F.rbf_cka(x, y, sigma=torch.tensor(0.0)), "rbf_cka: sigma must be a finite"),
    (lambda x, y: F.rbf_cka(x, y, sigma=1e-160), "rbf_cka: sigma=1e-160 is too small for "
                                                 "torch.float64"),
    (lambda x, y: F.bures_similarity(x, y, kernel="rbf", sigma=0.0),
     "bures_similarity: sigma must be a finite"),
    (lambda x, y: F.bures_similarity(x, y, kernel="cosine"), "bures_similarity: kernel must be"),
    (lambda x, y: F.shape_metric(x, y, alpha=2.0), "shape_metric: alpha must be"),
    (lambda x, y: F.svcca(x, y, cca_dim=True), "cca_dim must be a positive integer"),
    (lambda x, y: F.svcca(x[:5], y[:5], cca_dim=8), "svcca: cca_dim=8 is too large"),
    (lambda x, y: F.linear_predictivity(x, y, folds=1), "linear_predictivity: folds must be"),
    (lambda x, y: F.linear_predictivity(x[:6], y[:6]), "linear_predictivity needs n >="),
])
def test_pair_and_parameter_errors_are_not_given_a_side(call, start):
    text = _message(lambda: call(_constant(), _good(1)))
    assert text.startswith(start), text


def test_a_good_pair_gives_the_same_value_everywhere():
    """The naming wraps the preparation only: values are those of the bound measure."""
    x, y = _good(0), _good(0) @ _good(2, D, D) + 0.5 * _good(3)
    for name in REGISTRY:
        fn = getattr(F, name, None)
        if callable(fn):
            assert float(fn(x, y)) == pytest.approx(float(F.get_measure(name)(x, y)),
                                                    rel=1e-9, abs=1e-12), name
    # a bad sigma is refused for the linear kernel too (it does not use it), as by get_measure
    for call in (lambda: F.bures_similarity(x, y, sigma=-1.0),
                 lambda: F.get_measure("bures_similarity", sigma=-1.0)):
        with pytest.raises(ValueError, match="bures_similarity: sigma must be a finite positive"):
            call()
