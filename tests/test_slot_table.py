"""The neighbor look-up table and the reciprocity flags against a dense membership matrix, for
every k."""

import pytest
import torch

from alignment_callback.functional.neighbors import reciprocal_flags, slot_table


@pytest.mark.parametrize("n,k", [(50, 1), (300, 10), (300, 15), (300, 16), (400, 33),
                                 (500, 100), (300, 299)])
def test_lookup_equals_dense_membership(n, k):
    g = torch.Generator().manual_seed(n + k)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n)])
    table = slot_table(idx)
    dense = torch.zeros(n, n, dtype=torch.long)  # slot + 1 of b in N(a), 0 if absent
    rows = torch.arange(n)[:, None]
    dense[rows.expand(n, k), idx] = torch.arange(1, k + 1).expand(n, k)
    queries = torch.randint(0, n, (n, 64), generator=g)
    torch.testing.assert_close(table.lookup(rows, queries), dense.gather(1, queries))
    torch.testing.assert_close(table.lookup(rows, idx), torch.arange(1, k + 1).expand(n, k))
    # a broadcast the other way: a (n, k), b (n, 1)
    torch.testing.assert_close(table.lookup(idx, rows), dense[idx, rows])


@pytest.mark.parametrize("n,k", [(1, 0), (2, 1), (50, 1), (300, 10), (300, 299)])
def test_reciprocal_flags_equal_dense_membership(n, k):
    """``reciprocal[i, t]``: i is a neighbor of ``j = idx[i, t]``; graphs with many reciprocal
    pairs (neighbors within a short cyclic distance) and few (neighbors drawn from all rows)."""
    g = torch.Generator().manual_seed(n + k)
    rows = torch.arange(n)[:, None].expand(n, k)
    w = k // 2 + 1
    near = torch.cat([torch.arange(1, w + 1), -torch.arange(1, w + 1)])
    for offsets in ([near] if 2 * w < n else []) + [torch.arange(1, n)]:
        idx = torch.stack([(i + offsets[torch.randperm(len(offsets), generator=g)[:k]]) % n
                           for i in range(n)])
        dense = torch.zeros(n, n, dtype=torch.bool)
        dense[rows, idx] = True
        expected = dense[idx, rows]
        assert torch.equal(reciprocal_flags(idx), expected)
        assert 0 < int(expected.sum()) < n * k or len(offsets) >= n - 1


def test_table_memory_is_linear_in_k():
    """A few buckets per neighbor whatever k (not k² per row)."""
    n = 400
    for k in (10, 40, 160):
        idx = torch.stack([torch.randperm(n)[:k] for _ in range(n)])
        table = slot_table(idx)
        assert table.entries.numel() <= 6 * n * k, (k, table.entries.numel())
        assert table.entries.dtype == torch.int32


def test_repeated_neighbor_is_refused():
    idx = torch.tensor([[1, 2, 1], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    with pytest.raises(ValueError, match="repeat a neighbor"):
        slot_table(idx)
