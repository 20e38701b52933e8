"""SVCCA's basis: the CPU path (BLAS syrk + LAPACK syevr for the top cca_dim eigenvectors only)
and the torch path (full ``torch.linalg.eigh``, used off CPU) span the same subspace, and the
blocked null equals the per-permutation definition."""

import importlib

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from tests import numpy_reference as R

S = importlib.import_module("alignment_callback.functional.svcca")  # the module, not F.svcca


def _data(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)).to(dtype)


def _projector(u: torch.Tensor) -> np.ndarray:
    u = u.double().numpy()
    return u @ u.T


@pytest.mark.parametrize("n, d", [(60, 20), (20, 60), (40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lapack_and_torch_paths_span_the_same_subspace(monkeypatch, n, d, dtype):
    x = _data(n, d, dtype=dtype)
    lapack = S.svcca_state(x, 5)
    monkeypatch.setattr(S, "_scipy_eigh", None)
    plain = S.svcca_state(x, 5)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(_projector(lapack), _projector(plain), atol=tol)
    np.testing.assert_allclose(lapack.T.double() @ lapack.double(), np.eye(5), atol=tol)


@pytest.mark.parametrize("order", ["C", "F"])
def test_upper_gram_matches_the_product(order):
    a = _data(50, 7)
    a = a if order == "C" else a.T.contiguous().T
    upper = S._upper_gram(a)
    full = (a.T @ a).numpy()
    np.testing.assert_allclose(np.triu(upper.numpy()), np.triu(full), rtol=1e-12)


def test_blocked_null_equals_the_definition(monkeypatch):
    n, c = 300, 6
    ux, _ = torch.linalg.qr(_data(n, c, seed=1))
    uy, _ = torch.linalg.qr(_data(n, c, seed=2))
    perms = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))
                         for i in range(37)])
    monkeypatch.setattr(S, "_GATHER_ELEMENTS", 5 * n * c)  # several blocks, one partial
    got = S.svcca_score(ux, uy, perms)
    expected = [np.linalg.svd(ux.numpy().T @ uy.numpy()[p.numpy()], compute_uv=False).mean()
                for p in perms]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, d", [(80, 30), (30, 80)])
def test_svcca_equals_the_numpy_reference(n, d):
    x, y = _data(n, d, seed=3), _data(n, d, seed=4) + _data(n, d, seed=3)
    assert float(F.svcca(x, y, cca_dim=8)) == pytest.approx(R.svcca(x.numpy(), y.numpy(), 8),
                                                            abs=1e-10)
