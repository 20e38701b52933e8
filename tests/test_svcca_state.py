"""SVCCA: the blocked null equals the per-permutation definition, and the basis (covariance with
the column scales from its diagonal) gives the float64 NumPy reference's value."""

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


@pytest.mark.parametrize("factor", [1e-23, 1e-30, 1e20])
def test_per_feature_scaling_invariance_in_float32(factor):
    """Columns scaled far apart: the covariance is formed after an exact power-of-two rescaling
    of each column, so no column's squared sum underflows or overflows in float32."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 20, generator=g)
    y = x @ torch.randn(20, 20, generator=g) + torch.randn(200, 20, generator=g)
    scaled = x.clone()
    scaled[:, :3] *= factor
    assert float(F.svcca(scaled, y, cca_dim=10)) == pytest.approx(float(F.svcca(x, y, cca_dim=10)),
                                                                 abs=1e-5)


@pytest.mark.parametrize("n,d", [(2048, 64), (300, 2000)])  # both routes: d <= n and d > n
def test_float32_data_with_small_top_directions_is_not_called_rank_deficient(n, d):
    """A full-rank power-law spectrum whose 10th standardized singular value is 0.3-0.4 % of
    the first: the float32 products round the eigenvalues by about eps·λ₁, and the rank test
    refused the data as rank-deficient (below ~n·eps·λ₁); the basis now comes from float64
    products there and the value is the float64 reference's.  Data that is rank-deficient
    (9 directions for cca_dim = 10) is still refused, also with noise at float32's resolution
    (1e-7 of its largest value) added: float64 products see that noise as a 10th direction,
    and the float32 data's own resolution (s/s₁ > max(n, d)·eps) refuses it."""
    g = torch.Generator().manual_seed(0)
    r = min(n - 1, d)
    u, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -3.0
    x = ((u * s) @ v.T).float()
    y = (x.double() + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    expected = R.svcca(x.double().numpy(), y.double().numpy(), 10)
    assert float(F.svcca(x, y)) == pytest.approx(expected, abs=1e-5)
    low = (u[:, :9] * s[:9]) @ v[:, :9].T  # rank 9
    noise = 1e-7 * low.abs().max() * torch.randn(n, d, generator=g, dtype=torch.float64)
    for z in (low, low + noise):
        with pytest.raises(ValueError, match="fewer than cca_dim=10 non-degenerate directions"):
            F.svcca(z.float(), y)


def test_cca_dim_of_n_minus_one_is_refused_not_a_constant_one():
    """With cca_dim = n − 1 both kept subspaces are every centered direction: the score was 1
    for independent data, and its calibration vacuous (p = 1).  It needs n >= cca_dim + 2."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 32, generator=g), torch.randn(11, 32, generator=g)
    with pytest.raises(ValueError, match=r"cca_dim=10 is too large .*min\(n - 2, d\).* all "
                                         r"canonical correlations are 1"):
        F.svcca(x, y, cca_dim=10)
    with pytest.raises(ValueError, match="cca_dim=10 needs at least 12 samples"):
        F.calibrated_alignment(x, y, "svcca", num_permutations=19)
    assert F.get_measure("svcca", cca_dim=10).min_samples == 12
    x, y = torch.randn(12, 32, generator=g), torch.randn(12, 32, generator=g)
    assert float(F.svcca(x, y, cca_dim=10)) < 1.0
