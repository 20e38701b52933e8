"""The plain gram-family measure functions at large n: refused before allocating n×n matrices
that would not fit, and linear CKA from the features (no n×n matrix) when d < n."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.functional import gram_measures


def _cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA from the n×n grams, float64: ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) with K = XXᵀ,
    L = YYᵀ, H = I − 11ᵀ/n (HXXᵀH = X_c X_cᵀ for column-centered X_c)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l = xc @ xc.T, yc @ yc.T
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def _pair(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, x @ torch.randn(d, d + 3, generator=g) + 0.5 * torch.randn(n, d + 3, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cka_from_the_features_at_large_n_equals_the_definition(dtype):
    n = gram_measures.FEATURE_ROUTE_MIN_SAMPLES
    x, y = _pair(n, 12)
    x, y = x.to(dtype), y.to(dtype)
    value = F.linear_cka(x, y)
    assert value.dtype == dtype and value.shape == ()
    expected = _cka_numpy(x.double().numpy(), y.double().numpy())
    assert float(value) == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-12)
    # one sample fewer takes the gram route: the same value
    below = F.linear_cka(x[:-1], y[:-1])
    assert float(below) == pytest.approx(_cka_numpy(x[:-1].double().numpy(), y[:-1].double().numpy()),
                                         rel=1e-5 if dtype == torch.float32 else 1e-12)


def test_linear_cka_from_the_features_refuses_zero_variance():
    n = gram_measures.FEATURE_ROUTE_MIN_SAMPLES
    x, _ = _pair(n, 4)
    with pytest.raises(ValueError, match="zero-variance"):
        F.linear_cka(x, torch.ones(n, 3))


@pytest.mark.parametrize("name", ["linear_cka", "rbf_cka", "unbiased_cka", "rsa"])
def test_n_by_n_measures_too_large_for_memory_are_refused(monkeypatch, name):
    monkeypatch.setattr(gram_measures, "available_bytes", lambda device: 1 << 20)  # 1 MiB free
    x, y = _pair(512, 8)
    # RSA's radix sort of the float64 distances: 5.5 n×n at its peak; unbiased CKA: 5
    count = {"rsa": 6, "unbiased_cka": 5}.get(name, 4)
    expected = (rf"{name} at n=512 needs about {count}\.0 MiB .*\({count} of 1\.0 MiB\), but "
                r"only 1\.0 MiB is available on cpu")
    with pytest.raises(MemoryError, match=expected):
        getattr(F, name)(x, y)


def test_linear_cka_at_large_n_needs_no_n_by_n_memory(monkeypatch):
    monkeypatch.setattr(gram_measures, "available_bytes", lambda device: 1 << 20)
    n = gram_measures.FEATURE_ROUTE_MIN_SAMPLES
    x, y = _pair(n, 8)
    assert 0.0 < float(F.linear_cka(x, y)) < 1.0  # the grams would need 4 × 64 MiB


def test_linear_cka_from_the_features_refuses_constant_data_up_to_rounding():
    """Constant columns that float32 cannot hold exactly (0.1, 0.3) center to rounding noise,
    not to zero: refused like the gram route refuses them, not a NaN."""
    n = gram_measures.FEATURE_ROUTE_MIN_SAMPLES
    x, _ = _pair(n, 4)
    constant = torch.tensor([0.1, 0.3]).repeat(n, 1)
    for m in (n, n - 1):  # the features route, and the gram route below it
        with pytest.raises(ValueError, match="zero-variance"):
            F.linear_cka(x[:m], constant[:m])


def _spy_prepare_side(monkeypatch, module) -> list[str]:
    """Record the role of every side ``module.prepare_side`` prepares (still preparing it)."""
    prepared: list[str] = []
    real = module.prepare_side

    def spy(names, features, measures, role, *args, **kwargs):
        prepared.append(role)
        return real(names, features, measures, role, *args, **kwargs)

    monkeypatch.setattr(module, "prepare_side", spy)
    return prepared


@pytest.mark.parametrize("name,peak", [("rsa", 6), ("unbiased_cka", 5), ("rbf_cka", 3)])
def test_calibration_refuses_before_preparing_either_side(monkeypatch, name, peak):
    """The calibration's check counts the measure's peak while preparing a state and the states
    the other side will keep: too little memory is refused before any n×n matrix is built
    (before, x was prepared, at up to twice the estimate, and then y refused)."""
    from alignment_callback.functional import pipeline

    n = 400
    unit = n * n * 4  # one float32 n×n matrix
    need = peak + 1  # x's state at its peak, and y's state
    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: int((need - 0.5) * unit))
    prepared = _spy_prepare_side(monkeypatch, pipeline)
    x, y = _pair(n, 8)
    with pytest.raises(MemoryError, match=rf"{name} at n={n} .*\({need} of "):
        F.calibrated_alignment(x, y, name, 9)
    assert prepared == ["x"]  # refused in x's check, nothing of y prepared
    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: int((need + 0.5) * unit))
    F.calibrated_alignment(x, y, name, 9)


@pytest.mark.parametrize("name,peak", [("rsa", 6), ("rbf_cka", 3)])
def test_a_metric_refuses_before_preparing_either_side(monkeypatch, name, peak):
    """A metric without a cached reference counts the states its reference side will keep
    when it prepares the model side, as ``calibrated_alignment`` does (before: each side was
    checked alone, so a probe too large for both passed every check)."""
    from alignment_callback.functional import pipeline
    from alignment_callback.metrics import CalibratedAlignment, base

    n = 400
    unit = n * n * 4
    need = peak + 1
    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: int((need - 0.5) * unit))
    prepared = _spy_prepare_side(monkeypatch, base)
    x, y = _pair(n, 8)
    metric = CalibratedAlignment(name, num_permutations=9)
    metric.update(x, y)
    with pytest.raises(MemoryError, match=rf"{name} at n={n} .*\({need} of "):
        metric.compute()
    assert prepared == ["x"]
    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: int((need + 0.5) * unit))
    metric.compute()


def test_the_refusal_for_a_layer_list_suggests_what_a_layer_list_can_use(monkeypatch):
    """The moments null calibrates one layer pair only: a layer list is not told to use it."""
    from alignment_callback.functional import pipeline

    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: 1 << 10)
    x, y = _pair(400, 8)
    with pytest.raises(MemoryError) as err:
        F.calibrated_layer_alignment([x, x + 1], [y, y + 1], "rbf_cka", 9, null="auto")
    assert "one layer pair with linear_cka" in str(err.value)
    with pytest.raises(MemoryError, match="linear_cka or rv_coefficient with null='moments'"):
        F.calibrated_alignment(x, y, "rbf_cka", 9)


# ------------------------------------------------- the null buffers: K that cannot fit
def test_permutations_whose_nulls_cannot_fit_are_refused_naming_num_permutations(monkeypatch):
    """The (K, LA, LB) null of each measure is allocated whole: K = 2**45 raised the
    allocator's raw "can't allocate memory" error (of 128 TiB); it is now a MemoryError that
    names num_permutations and the size, raised before any null is allocated."""
    import alignment_callback.functional.pipeline as pipeline

    x, y = torch.randn(20, 4), torch.randn(20, 4)
    with pytest.raises(MemoryError, match=r"num_permutations=35184372088832: .* 131072\.0 GiB"):
        F.calibrated_alignment(x, y, "linear_cka", num_permutations=2**45)
    # the count: 6 layer pairs × K float32 values against the memory available (K large
    # enough for the nulls to be above the small requests that are never refused)
    K = 50_000
    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: 6 * K * 4 - 1)
    with pytest.raises(MemoryError, match=r"\(1 measure\(s\) × 6 layer pair\(s\) × K\)"):
        F.calibrated_layer_alignment([x, x], [y, y, y], "mutual_knn", num_permutations=K)
    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: 6 * K * 4)
    F.calibrated_layer_alignment([x, x], [y, y, y], "mutual_knn", num_permutations=K)
