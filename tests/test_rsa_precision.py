"""RSA against an exact reference: the cosine distances of each pair are ordered in exact
rational arithmetic on the inputs as given, so the reference has no rounding at all, neither in
the distances (a large feature offset leaves nothing of ``1 − x̂_iᵀx̂_j`` in float32) nor in its
ties (discrete features give many distances that are equal in exact arithmetic and that
rounding would split apart)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.functional import _compiled
from alignment_callback.functional.kernels import average_ranks
from tests import numpy_reference as ref


def exact_distance_ranks(x: torch.Tensor) -> np.ndarray:
    """Average ranks of the i < j cosine distances, from exact rational arithmetic on ``x``.

    ``1 − cos`` increases as ``−sign(⟨x_i, x_j⟩)·⟨x_i, x_j⟩² / (‖x_i‖²‖x_j‖²)`` does, which is
    rational in the entries: every float is an integer times a power of two, so the keys are
    exact fractions and equal keys are exact ties."""
    a = x.double().numpy()
    _, exponent = np.frexp(np.abs(a[a != 0]).min())
    scale = 2 ** (60 - int(exponent))  # every entry becomes an integer (53-bit mantissas)
    rows = [[int(v * scale) for v in row] for row in a]
    assert all(v == r / scale for row, orig in zip(rows, a) for r, v in zip(row, orig))
    norms = [sum(v * v for v in row) for row in rows]
    keys = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            dot = sum(p * q for p, q in zip(rows[i], rows[j]))
            keys.append(-(1 if dot > 0 else -1) * Fraction(dot * dot, norms[i] * norms[j]))
    code = {key: i for i, key in enumerate(sorted(set(keys)))}  # equal fractions: one code
    return ref.average_ranks(np.array([code[key] for key in keys], dtype=np.float64))


def exact_rsa(x: torch.Tensor, y: torch.Tensor) -> float:
    a, b = exact_distance_ranks(x), exact_distance_ranks(y)
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def pair(n: int = 60, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("where", ["every feature", "one feature"])
def test_float32_with_a_large_offset_matches_exact_arithmetic(offset, where):
    x, y = pair()
    if where == "every feature":
        x, y = x + offset, y + offset
    else:  # massive activations: one large feature per side
        x[:, 0] += offset
        y[:, 3] -= offset
    x, y = x.float(), y.float()
    expected = exact_rsa(x, y)
    assert float(F.rsa(x, y)) == pytest.approx(expected, abs=1e-6)
    assert float(F.rsa(x.double(), y.double())) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("levels", [2, 3])
def test_discrete_features_keep_their_exact_ties(levels):
    g = torch.Generator().manual_seed(levels)
    x = torch.randint(0, levels, (50, 6), generator=g).double()
    y = torch.where(torch.rand(50, 6, generator=g) < 0.3, torch.randint(0, levels, (50, 6), generator=g), x)
    x[x.sum(1) == 0, 0] = 1.0  # no all-zero row (cosine undefined)
    y[y.sum(1) == 0, 0] = 1.0
    ranks = exact_distance_ranks(x)
    assert len(np.unique(ranks)) < len(ranks) / 4  # the data is heavily tied
    assert float(F.rsa(x, y)) == pytest.approx(exact_rsa(x, y), abs=1e-12)
    assert float(F.rsa(x.float(), y.float())) == pytest.approx(exact_rsa(x, y), abs=1e-6)


def test_average_ranks_tolerance_joins_values_within_it():
    values = torch.tensor([3.0, 1.0, 1.0 + 1e-14, 2.0, 1.0 - 1e-14, 5.0], dtype=torch.float64)
    torch.testing.assert_close(average_ranks(values),
                               torch.tensor([5.0, 2.0, 3.0, 4.0, 1.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(average_ranks(values, tol=1e-13),
                               torch.tensor([5.0, 2.0, 2.0, 4.0, 2.0, 6.0], dtype=torch.float64))


def test_compiled_ranks_equal_the_sorting_ones():
    """From 65,536 values the CPU ranks come from a radix sort (numba): the same ranks as the
    ``torch.sort`` path and as scipy's, with ties, a tolerance, signed zeros and infinities."""
    from scipy.stats import rankdata

    from alignment_callback.functional import kernels

    assert _compiled.available("_ranks_numba"), "numba is a dependency: the compiled path must be there"
    g = torch.Generator().manual_seed(0)
    m = kernels._NUMBA_RANKS_MIN + 1001
    continuous = torch.randn(m, generator=g, dtype=torch.float64)
    tied = torch.randint(0, 300, (m,), generator=g).double() / 7
    tied[:4] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf")], dtype=torch.float64)
    near = tied + torch.randn(m, generator=g, dtype=torch.float64) * 1e-15
    small = torch.randint(0, 50, (m,), generator=g).double()  # most radix digits constant
    cases = ((continuous, 0.0), (tied, 0.0), (near, 1e-13), (near.float(), 0.0), (small, 0.0))
    for values, tol in cases:
        got = kernels.average_ranks(values, tol)
        torch.testing.assert_close(got, kernels._sorted_average_ranks(values, tol), rtol=0, atol=0)
        if tol == 0.0:
            want = torch.from_numpy(rankdata(values.numpy())).to(values.dtype)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(kernels.average_ranks(near, 1e-13), kernels.average_ranks(tied))


def test_rsa_without_the_compiled_ranks(monkeypatch):
    x, y = pair(n=400, d=8)  # 79,800 distances: the compiled path when numba is there
    with_numba = float(F.rsa(x, y))
    monkeypatch.setitem(_compiled._loaded, "_ranks_numba", ImportError("numba is broken"))
    assert float(F.rsa(x, y)) == with_numba


def test_a_kernel_failing_at_run_time_falls_back_to_torch(monkeypatch):
    """A kernel that fails when first called (a compile error) is disabled, and the torch path
    gives the ranks, this time and from then on."""
    import types

    calls = []

    def broken(values, tol, out):
        calls.append(1)
        raise RuntimeError("numba: failed to compile")

    monkeypatch.setitem(_compiled._loaded, "_ranks_numba",
                        types.SimpleNamespace(average_ranks=broken))
    values = torch.randint(0, 99, (70_000,), generator=torch.Generator().manual_seed(1)).double()
    want = torch.from_numpy(ref.average_ranks(values.numpy()))
    for _ in range(2):
        torch.testing.assert_close(average_ranks(values), want, rtol=0, atol=0)
    assert calls == [1] and not _compiled.available("_ranks_numba")


@pytest.mark.parametrize("m", [10, 70_000])
def test_average_ranks_of_integers_and_nan(m):
    from alignment_callback.functional import kernels

    values = torch.arange(m) // 2  # pairs of equal integers: ranks 1.5, 1.5, 3.5, 3.5, ...
    ranks = kernels.average_ranks(values)
    assert ranks.dtype == torch.float64
    torch.testing.assert_close(ranks, (values * 2 + 1.5).double())
    with pytest.raises(ValueError, match="NaN"):
        kernels.average_ranks(torch.tensor([1.0, float("nan")] * (m // 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_one_data_has_two_tied_distances(dtype):
    """Rows c_i·v are parallel up to the rounding of each product: their cosine distances are 0
    (same sign) or 2 (opposite signs) to rounding, and rank as those two ties."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(16, generator=g, dtype=torch.float64)
    c = torch.randn(40, generator=g, dtype=torch.float64)
    x = (c[:, None] * v[None, :]).to(dtype)
    y = torch.randn(40, 16, generator=g, dtype=torch.float64).to(dtype)
    i, j = np.triu_indices(40, k=1)
    tied = np.where(np.sign(c.numpy()[i]) == np.sign(c.numpy()[j]), 0.0, 2.0)
    from scipy.stats import rankdata

    a, b = rankdata(tied), exact_distance_ranks(y)
    a, b = a - a.mean(), b - b.mean()
    assert float(F.rsa(x, y)) == pytest.approx(float(a @ b / np.sqrt((a @ a) * (b @ b))), abs=1e-6)


def test_equidistant_samples_are_refused_by_name():
    """One-hot rows of distinct classes: every cosine distance is 1, so every rank is tied and
    Spearman's correlation is undefined; the error says why."""
    with pytest.raises(ValueError, match="same cosine distance"):
        F.rsa(torch.eye(6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="same cosine distance"):
        F.rsa(torch.eye(6) * 3.7, torch.randn(6, 3))
