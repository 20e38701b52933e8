"""The exact kNN search in row blocks (``neighbors.knn``): with ``_BLOCK_ELEMENTS`` made small,
n ≈ 150-220 is searched in several row blocks (a partial one last), and the neighbor lists,
their similarities and the reciprocity flags must equal the single-block search and a float64
NumPy brute force written from the definition: the k rows j ≠ i of largest ⟨x_i, x_j⟩, most
similar first, exact ties to the lowest priority key (``tie_keys`` of the side's role and data).  Tied
data is integer-valued (every similarity exact whatever the summation order) or duplicated
rows (the reference's similarities are tied by construction).  Calibrated kNN results through
the pipeline must not depend on the block size either.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.functional import neighbors as nb

# --------------------------------------------------------------------------- reference


def np_knn(sim: np.ndarray, k: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities) of the k rows j != i with the largest sim[i, j], most similar
    first, exact ties to the lower key: a full lexicographic sort per row."""
    n = sim.shape[0]
    idx = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        order = np.lexsort((keys, -sim[i]))  # primary: -similarity, then the key
        idx[i] = order[order != i][:k]
    return idx, np.take_along_axis(sim, idx, 1)


def np_reciprocal(idx: np.ndarray) -> np.ndarray:
    """reciprocal[i, t] = i is one of the neighbors of j = idx[i, t]."""
    members = [set(row.tolist()) for row in idx]
    return np.array([[i in members[j] for j in row] for i, row in enumerate(idx)])


def data(kind: str, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Features and their exact float64 similarity matrix (tied entries bitwise equal)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss64":
        x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    elif kind == "gauss32":
        x = torch.randn(n, 12, generator=g)
    elif kind == "ternary":  # integer entries: every product and sum exact, many ties
        x = torch.randint(-1, 2, (n, 4), generator=g).float()
    elif kind == "onehot":  # similarity 0 or 1 only
        x = torch.nn.functional.one_hot(torch.randint(0, 5, (n,), generator=g), 5).double()
    elif kind == "dup_int":  # duplicated integer rows
        base = torch.randint(-3, 4, (n // 3, 6), generator=g).float()
        x = base[torch.randint(0, n // 3, (n,), generator=g)]
    elif kind == "dup_gauss":  # duplicated continuous rows: ties only through duplication
        base = torch.randn(n // 2, 9, generator=g, dtype=torch.float64)
        src = torch.randint(0, n // 2, (n,), generator=g)
        b = base.numpy()
        return base[src], (b @ b.T)[src.numpy()][:, src.numpy()]
    else:
        raise KeyError(kind)
    a = x.double().numpy()
    return x, a @ a.T


class BlockSpy:
    """Records the row count of every similarity block ``knn`` ranks (the first argument of
    its ``topk`` calls; other callers of ``torch.topk`` are not recorded)."""

    def __init__(self, monkeypatch) -> None:
        self.rows: list[int] = []
        topk = torch.topk

        def spy(g, *args, **kwargs):
            if sys._getframe(1).f_code is nb.knn.__code__:
                self.rows.append(int(g.shape[0]))
            return topk(g, *args, **kwargs)

        monkeypatch.setattr(nb.torch, "topk", spy)


def knn_in_blocks(monkeypatch, x: torch.Tensor, k: int, rows: int,
                  keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``knn`` with ``rows`` rows per block; also the block sizes it actually used."""
    n = x.shape[0]
    with monkeypatch.context() as m:
        m.setattr(nb, "_BLOCK_ELEMENTS", rows * n)
        spy = BlockSpy(m)
        idx, vals = nb.knn(x, k, keys)
    return idx, vals, spy.rows


def expected_blocks(n: int, rows: int) -> list[int]:
    """Blocks of ``rows`` rows, at least 2 (a one-row product is a matrix-vector product), and
    a last single row joins the block before it."""
    rows = max(2, min(n, rows))
    starts = list(range(0, n, rows))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [b - a for a, b in zip(starts, starts[1:] + [n])]


# ------------------------------------------------------------------------- block search

N = 158  # 158 = 52·3 + 2 = 22·7 + 4 = 3·50 + 8: every block size below leaves a partial block
EXACT = ("ternary", "onehot", "dup_int")  # similarities exact in any summation order


@pytest.mark.parametrize("rows", [3, 7, 50])
@pytest.mark.parametrize("k", [1, 6, N - 1])
@pytest.mark.parametrize("kind", ["gauss64", "gauss32", "ternary", "onehot", "dup_int",
                                  "dup_gauss"])
def test_blocked_search_equals_single_block_and_numpy(monkeypatch, kind, k, rows):
    x, sim = data(kind, N, seed=k + rows)
    keys = nb.tie_keys(N, "x", data=x)
    idx, vals, used = knn_in_blocks(monkeypatch, x, k, rows)
    assert used == expected_blocks(N, rows) and len(used) >= 4 and used[-1] < rows
    whole, whole_vals, one = knn_in_blocks(monkeypatch, x, k, N)
    assert one == [N]
    exp_idx, exp_vals = np_knn(sim, k, keys.numpy())
    assert idx.dtype == torch.int64 and vals.dtype == x.dtype and idx.shape == (N, k)
    np.testing.assert_array_equal(idx.numpy(), exp_idx)
    np.testing.assert_array_equal(whole.numpy(), exp_idx)
    if kind in EXACT:
        np.testing.assert_array_equal(vals.double().numpy(), exp_vals)
        np.testing.assert_array_equal(whole_vals.double().numpy(), exp_vals)
    else:  # one similarity, summed in another order by another BLAS path: a few ulps
        rtol = 1e-13 if x.dtype == torch.float64 else 3e-6
        np.testing.assert_allclose(vals.double().numpy(), exp_vals, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(vals.double().numpy(), whole_vals.double().numpy(),
                                   rtol=rtol, atol=rtol)


@pytest.mark.parametrize("kind", EXACT)
def test_single_and_two_row_blocks_on_exact_ties(monkeypatch, kind):
    """Blocks asked of one, two or five rows with n = 151 (odd, and 30·5 + 1): no block has one
    row (a last single row joins the block before it), and exact data ties exactly."""
    n, k = 151, 9
    x, sim = data(kind, n, seed=11)
    for rows in (1, 2, 5):
        idx, vals, used = knn_in_blocks(monkeypatch, x, k, rows)
        assert used == expected_blocks(n, rows) and min(used) >= 2 and sum(used) == n
        assert used[-1] == (3 if rows < 5 else 6)
        exp_idx, exp_vals = np_knn(sim, k, nb.tie_keys(n, "x", data=x).numpy())
        np.testing.assert_array_equal(idx.numpy(), exp_idx)
        np.testing.assert_array_equal(vals.double().numpy(), exp_vals)


@pytest.mark.parametrize("role", ["x", "y"])
@pytest.mark.parametrize("kind", ["ternary", "dup_gauss"])
def test_neighbor_lists_in_blocks_use_the_roles_keys(monkeypatch, kind, role):
    """``neighbor_lists``: the role's keys break ties in every block; ``reciprocal`` and the
    slot table agree with the lists; the two roles break ties differently."""
    n, k = 203, 8  # 203 = 29·7
    x, sim = data(kind, n, seed=4)
    keys = nb.tie_keys(n, role, data=x).numpy()
    exp_idx, exp_vals = np_knn(sim, k, keys)
    with monkeypatch.context() as m:
        m.setattr(nb, "_BLOCK_ELEMENTS", 6 * n)  # blocks of 6 rows, the last of 5
        lists = nb.neighbor_lists(x, k, role)
    np.testing.assert_array_equal(lists.indices.numpy(), exp_idx)
    np.testing.assert_allclose(lists.values.double().numpy(), exp_vals, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(lists.reciprocal.numpy(), np_reciprocal(exp_idx))
    rows = torch.arange(n).view(n, 1)
    slots = lists.table.lookup(rows, lists.indices)
    assert torch.equal(slots, torch.arange(1, k + 1).expand(n, k))
    other = np_knn(sim, k, nb.tie_keys(n, "y" if role == "x" else "x", data=x).numpy())[0]
    assert not np.array_equal(other, exp_idx)  # the data does tie, and keys decide


def test_explicit_keys_and_exact_power_of_two_rescaling_in_blocks(monkeypatch):
    n, k = 131, 5
    x, sim = data("dup_int", n, seed=8)
    keys = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    exp_idx, exp_vals = np_knn(sim, k, keys.numpy())
    idx, vals, used = knn_in_blocks(monkeypatch, x, k, 4, keys)
    assert len(used) == 33 and used[-1] == 3
    np.testing.assert_array_equal(idx.numpy(), exp_idx)
    np.testing.assert_array_equal(vals.double().numpy(), exp_vals)
    # 2**70 overflows float32 similarities (~2**143) without the exact rescaling
    big, big_vals, _ = knn_in_blocks(monkeypatch, x * 2.0**70, k, 4, keys)
    np.testing.assert_array_equal(big.numpy(), exp_idx)
    assert bool(torch.isfinite(big_vals).all())
    # rescaled by 2**-e (max |x| in [0.5, 1)): similarities are exp_vals times one power of two
    ratio = big_vals.double().numpy()[exp_vals != 0] / exp_vals[exp_vals != 0]
    assert np.all(ratio == ratio.flat[0]) and np.log2(ratio.flat[0]).is_integer()


def test_one_row_blocks_on_duplicated_float32_rows(monkeypatch):
    n, k = 203, 10
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n // 2, 37, generator=g, dtype=torch.float64)
    src = torch.randint(0, n // 2, (n,), generator=g)
    b = base.numpy()
    sim = (b @ b.T)[src.numpy()][:, src.numpy()]
    # asked for one-row blocks (a matrix-vector product rounds <x_i, x_j> by the memory
    # alignment of row j, so identical float32 rows could get similarities an ulp apart and
    # rounding, not the priority key, would order them): blocks of two rows instead
    x = base.float()[src]
    idx, _, used = knn_in_blocks(monkeypatch, x, k, 1)
    assert used == expected_blocks(n, 1) and min(used) == 2 and used[-1] == 3
    np.testing.assert_array_equal(idx.numpy(),
                                  np_knn(sim, k, nb.tie_keys(n, "x", data=x).numpy())[0])


# ------------------------------------------------------------------- through the pipeline


def _fields(res) -> dict[str, float]:
    return {**res.as_dict(), "null_method": res.null_method}


@pytest.mark.parametrize("null", ["permutation", "auto"])
@pytest.mark.parametrize("measure", ["mutual_knn", "cknna", "cycle_knn"])
@pytest.mark.parametrize("kind", ["gauss32", "ternary", "dup_gauss"])
def test_calibrated_result_does_not_depend_on_the_block_size(monkeypatch, kind, measure, null):
    n = 187  # 187 = 18·10 + 7
    x, _ = data(kind, n, seed=21)
    g = torch.Generator().manual_seed(22)
    y = (x + 0.7 * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
         if kind != "ternary" else x.flip(1) + torch.randint(-1, 2, x.shape, generator=g).float())
    kw = {"num_permutations": 199, "seed": 3, "null": null, "k": 6}
    default = F.calibrated_alignment(x, y, measure, **kw)
    with monkeypatch.context() as m:
        m.setattr(nb, "_BLOCK_ELEMENTS", 10 * n)
        spy = BlockSpy(m)
        blocked = F.calibrated_alignment(x, y, measure, **kw)
    assert spy.rows == expected_blocks(n, 10) * 2  # x's lists, then y's
    assert default.null.shape == (199,) and default.null_method == blocked.null_method
    if measure != "cknna" or kind == "ternary":  # integer-valued: cknna's similarities exact
        assert torch.equal(blocked.null, default.null)
        assert _fields(blocked) == _fields(default)
    else:  # cknna reads the similarities, summed in other BLAS blocks: ulps apart
        tol = 1e-12 if x.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(blocked.null, default.null, rtol=tol, atol=tol)
        for key in ("raw", "calibrated", "threshold", "null_mean", "null_std"):
            assert float(getattr(blocked, key)) == pytest.approx(float(getattr(default, key)),
                                                                 rel=tol, abs=tol), key
        assert float(blocked.p_value) == float(default.p_value)


def test_default_keys_are_seeded_by_the_data_as_given():
    """``knn(x, k)`` without keys uses ``tie_keys(n, "x", data=x)`` of x as passed, also when x
    is rescaled internally (magnitudes beyond 2**16)."""
    x = torch.randint(0, 3, (40, 4)).double() * 2.0**40  # exact ties, rescaled inside knn
    idx, _ = nb.knn(x, 5)
    expected, _ = nb.knn(x, 5, nb.tie_keys(40, "x", data=x))
    assert torch.equal(idx, expected)
