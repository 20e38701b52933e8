"""Under ``torch.autocast`` (Lightning's ``"16-mixed"`` / ``"bf16-mixed"`` steps run their body in
it; CPU autocast goes through the same dispatch as CUDA's) every public entry point computes as
without it: same dtype, same values, bitwise.  TF32 (a global setting training shares) is
noted, not changed."""

from __future__ import annotations

import warnings

import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional.bootstrap import bootstrap_interval
from alignment_callback.metrics import CalibratedAlignment, LayerAlignment

LOW = [torch.bfloat16, torch.float16]
# sigma on the scale of _pair's y (at sigma=1 its RBF kernel underflows to the identity)
PARAMS = {"svcca": {"cca_dim": 4}, "cca_similarity": {"dims": 4}, "rbf_cka": {"sigma": 50.0}}


def _pair(n: int = 48, d: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = 40 * (x @ torch.randn(d, d, generator=g) + torch.randn(n, d, generator=g))  # fp16 range
    return x, y


def _same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)
    else:
        for field in ("raw", "threshold", "p_value", "calibrated", "null"):
            if hasattr(a, field):
                _same(getattr(a, field), getattr(b, field))


def _under(dtype: torch.dtype, fn):
    with torch.autocast("cpu", dtype=dtype):
        return fn()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", sorted(F.BUILTIN_MEASURES))
def test_measures_and_their_calibration_ignore_autocast(name, dtype):
    x, y = _pair()
    kw = PARAMS.get(name, {})
    measure = F.get_measure(name, **kw)  # a bound measure, called and used directly too
    sx, sy = measure.prepare(x, "x"), measure.prepare(y, "y")
    ident = torch.arange(x.shape[0])[None]
    for fn in (lambda: getattr(F, name)(x, y, **kw),
               lambda: F.calibrated_alignment(x, y, name, num_permutations=20, **kw),
               lambda: measure(x, y), lambda: measure.score(sx, sy, ident),
               lambda: measure.score(measure.prepare(x, "x"), measure.prepare(y, "y"), ident)):
        _same(fn(), _under(dtype, fn))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_layers_engine_metrics_and_bootstrap_ignore_autocast(dtype):
    x, y = _pair()
    xs, ys = {"a": x, "b": x.tanh()}, {"c": y}

    def engine():
        eng = AlignmentEngine(["linear_cka", "mutual_knn"], num_permutations=20)
        eng.set_reference(ys)
        return {m: r.matrix for m, r in eng.step(xs).results.items()}

    def metric():
        m = CalibratedAlignment("unbiased_cka", num_permutations=20, preprocess=False)
        return {"batch": m(x, y), **m.compute()}

    def layer_metric():
        m = LayerAlignment("rbf_cka", num_permutations=20)
        m.set_reference(ys)
        m.update(xs)
        return m.compute()

    for fn in (engine, metric, layer_metric,
               lambda: F.calibrated_layer_alignment(xs, ys, "linear_cka", num_permutations=20),
               lambda: F.calibrate_measures(xs, ys, ["rsa", "cknna"], num_permutations=20),
               lambda: F.permutation_null(x, y, "linear_cka", num_permutations=20),
               lambda: F.calibrated_alignment(x, y, "linear_cka", null="moments"),
               lambda: F.prepare_features(y),
               lambda: bootstrap_interval(x, y, "linear_cka", num_bootstrap=5,
                                          num_permutations=10)):
        _same(fn(), _under(dtype, fn))


def test_tf32_on_cuda_is_noted_once_and_float64_or_the_cpu_are_not(monkeypatch):
    from alignment_callback.functional._precision import warn_if_tf32

    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_tf32(cuda, torch.float32)  # the default: TF32 off
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
        warn_if_tf32(cuda, torch.float64)
        warn_if_tf32(torch.device("cpu"), torch.float32)
    with pytest.warns(RuntimeWarning, match="TF32 matrix products are enabled"):
        warn_if_tf32(cuda, torch.float32)


def test_no_autocast_asks_no_driver(monkeypatch):
    """It reads the thread's autocast state: torch.cuda.is_available() would initialize the
    driver (and poison a later fork) on every measure call."""
    def refuse() -> bool:
        raise AssertionError("torch.cuda.is_available() was called")

    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    x, y = _pair()
    F.linear_cka(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear_cka(x, y).dtype == torch.float32


def test_a_tensor_sigma_is_a_number():
    x, y = _pair()
    assert torch.equal(F.rbf_cka(x, y, sigma=torch.tensor(50.0)), F.rbf_cka(x, y, sigma=50.0))
