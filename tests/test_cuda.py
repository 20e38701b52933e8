"""The CUDA path end to end: the same numbers as on the CPU.  These tests need a GPU: they are
marked ``cuda``, run by the usual test command where a GPU is present and deselected elsewhere
(``tests/conftest.py``); ``python -m pytest -m cuda`` runs only them."""

from __future__ import annotations

import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional.gram_null import gram_dots

pytestmark = pytest.mark.cuda
MEASURES = [("linear_cka", {}), ("rbf_cka", {"sigma": "median"}), ("unbiased_cka", {}),
            ("rsa", {}), ("mutual_knn", {"k": 10}), ("cycle_knn", {"k": 10}),
            ("cknna", {"k": 10}), ("svcca", {"cca_dim": 8}), ("procrustes_similarity", {})]


def pair(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return F.prepare_features(x), F.prepare_features(x + 2 * torch.randn(n, d, generator=g))


@pytest.mark.parametrize("name,kw", MEASURES, ids=[m for m, _ in MEASURES])
def test_calibration_on_cuda_equals_cpu(name, kw):
    x, y = pair()
    cpu = F.calibrated_alignment(x, y, name, 200, seed=3, **kw)
    gpu = F.calibrated_alignment(x.cuda(), y.cuda(), name, 200, seed=3, **kw)
    assert gpu.raw.device.type == "cuda"
    torch.testing.assert_close(gpu.null.cpu(), cpu.null, rtol=1e-5, atol=1e-6)
    for key in ("raw", "calibrated", "p_value", "threshold"):
        assert float(getattr(gpu, key)) == pytest.approx(float(getattr(cpu, key)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name,null,kw", [
    ("linear_cka", "moments", {}), ("rbf_cka", "moments", {"sigma": "median"}),
    ("unbiased_cka", "auto", {}), ("mutual_knn", "auto", {"k": 10})])
def test_analytic_null_on_cuda_equals_cpu(name, null, kw):
    x, y = pair()
    cpu = F.calibrated_alignment(x, y, name, 200, seed=3, null=null, **kw)
    gpu = F.calibrated_alignment(x.cuda(), y.cuda(), name, 200, seed=3, null=null, **kw)
    assert gpu.null_method == cpu.null_method
    for key in ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std"):
        value = getattr(gpu, key)
        assert value.device.type == "cuda", key
        assert float(value) == pytest.approx(float(getattr(cpu, key)), rel=1e-5, abs=1e-6), key


def test_gram_kernel_torch_backend_on_cuda_equals_numba_on_cpu():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 300, generator=g)
    a = a + a.T
    b = torch.randn(300, 300, generator=g)
    b = b + b.T
    perms = F.permutations(300, 64, seed=1)
    cpu = gram_dots(a, b, perms, backend="numba")
    gpu = gram_dots(a.cuda(), b.cuda(), perms.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-9)


def test_engine_keeps_everything_on_cuda():
    x, y = pair()
    engine = AlignmentEngine(["linear_cka", "mutual_knn"], num_permutations=100, device="cuda")
    engine.set_reference({"r": y})
    result = engine.step({"m": x}).results
    assert all(r.matrix.device.type == "cuda" for r in result.values())
    cpu = AlignmentEngine(["linear_cka", "mutual_knn"], num_permutations=100)
    cpu.set_reference({"r": y})
    expected = cpu.step({"m": x}).results
    for name in result:
        assert float(result[name].p_value) == pytest.approx(float(expected[name].p_value))


def test_callback_on_a_gpu_trainer(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from alignment_callback import AlignmentCallback
    from tests.helpers import LAYERS, MLP, RefMLP, make_probe, train_loader

    cb = AlignmentCallback(RefMLP(seed=1), make_probe(), LAYERS, measures=["linear_cka", "cknna"],
                           num_permutations=50, verbose=False)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=CSVLogger(tmp_path),
                         callbacks=[cb], enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(MLP(), train_loader())
    assert [h["epoch"] for h in cb.history] == [0, 1, 2]
    assert cb.last_results["linear_cka"].matrix.device.type == "cuda"


def test_rbf_median_under_the_deterministic_mode_equals_cpu():
    """``Trainer(deterministic=True)`` turns the deterministic mode on; torch before 2.10 has
    no deterministic CUDA ``kthvalue``, which the median bandwidth used."""
    x, y = pair(n=256)
    cpu = F.calibrated_alignment(x, y, "rbf_cka", 100, seed=3, sigma="median")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        gpu = F.calibrated_alignment(x.cuda(), y.cuda(), "rbf_cka", 100, seed=3, sigma="median")
    finally:
        torch.use_deterministic_algorithms(before)
    assert float(gpu.raw) == pytest.approx(float(cpu.raw), rel=1e-5)


def test_pearson3_with_cuda_tensors_and_numbers():
    from alignment_callback.functional.moments import pearson3_sf

    t = torch.linspace(0.1, 0.6, 5, device="cuda")
    gpu = pearson3_sf(t, 0.3, 0.1, 0.5)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), pearson3_sf(t.cpu(), 0.3, 0.1, 0.5))


def test_metric_forward_on_a_cuda_model_side_and_a_cpu_reference_side():
    """``update`` and ``compute`` take x on the GPU and y on the CPU (x joins y's device);
    ``forward`` scored the batch without moving it."""
    from alignment_callback.metrics import CalibratedAlignment

    x, y = pair(n=128)
    metric = CalibratedAlignment("linear_cka", num_permutations=50, seed=1)
    batch = metric(x.cuda(), y)
    assert batch is not None and float(batch) == pytest.approx(
        float(F.linear_cka(x, y)), rel=1e-5)
    assert float(metric.compute()["raw"]) == pytest.approx(float(F.linear_cka(x, y)), rel=1e-5)
