"""Fast permutation nulls equal brute-force recomputation (docs/calibration.md).

For every built-in measure the null that ``permutation_null`` computes on the fast path (grams
gathered, neighbor lists remapped, ...) must equal, value for value, the public measure
function recomputed on ``y[π_k]`` for the permutations ``permutations(n, K, seed)`` returns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from tests import numpy_reference  # noqa: E402



KNN = {"mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn"}
MEASURES = sorted(numpy_reference.MEASURES)
FUNCS = {name: getattr(F, name) for name in MEASURES}


def _kwargs(name: str) -> dict:
    if name in KNN:
        return {"k": 5}
    if name == "svcca":
        return {"cca_dim": 5}
    return {}


def _related(n: int = 48, dx: int = 12, dy: int = 10, seed: int = 0, dtype=torch.float64):
    """x and y = x W + noise (a real shared signal), rows L2-normalized."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    w = torch.randn(dx, dy, generator=g, dtype=torch.float64) / dx**0.5
    y = x @ w + 0.5 * torch.randn(n, dy, generator=g, dtype=torch.float64)
    x = torch.nn.functional.normalize(x, dim=1)
    y = torch.nn.functional.normalize(y, dim=1)
    return x.to(dtype), y.to(dtype)


def _recompute(fn, x, y, perms, **kw) -> torch.Tensor:
    return torch.stack([torch.as_tensor(fn(x, y[p], **kw)).reshape(()) for p in perms])


# --------------------------------------------------------------------------- permutations


def test_permutations_are_valid_permutations():
    perms = F.permutations(37, 50, seed=3)
    assert perms.shape == (50, 37)
    assert perms.dtype == torch.long
    ref = torch.arange(37)
    for p in perms:
        assert torch.equal(torch.sort(p).values, ref)
    # not all identical and not the identity
    assert len({tuple(p.tolist()) for p in perms}) == 50
    assert not any(torch.equal(p, ref) for p in perms)


def test_permutations_seeded_and_reproducible():
    a = F.permutations(40, 30, seed=7)
    b = F.permutations(40, 30, seed=7)
    c = F.permutations(40, 30, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != c).any(1).all()  # every single permutation differs
    # a longer request starts with the same permutations (prefix-stable across chunks)
    long = F.permutations(40, 600, seed=7)
    assert torch.equal(long[:30], a)
    assert len({tuple(p.tolist()) for p in long}) == 600


def test_global_rng_untouched():
    torch.manual_seed(1234)
    np.random.seed(99)
    state = torch.get_rng_state()
    np_state = np.random.get_state()
    x, y = _related()
    F.permutations(48, 20, seed=1)
    F.permutations(48, 20, seed=1, groups=np.repeat(np.arange(12), 4))
    F.permutation_null(x, y, "mutual_knn", 20, seed=2, k=5)
    F.permutation_null(x, y, "linear_cka", 20, seed=2)
    F.calibrated_alignment(x, y, "cknna", num_permutations=20, seed=3, k=5)
    F.calibrated_layer_alignment([x, x], [y], "linear_cka", num_permutations=20, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def _check_group_perms(perms: torch.Tensor, labels: np.ndarray) -> None:
    groups = {}
    for row, g in enumerate(labels.tolist()):
        groups.setdefault(g, []).append(row)
    rows_of = {tuple(r): g for g, r in groups.items()}
    for p in perms:
        assert torch.equal(torch.sort(p).values, torch.arange(len(labels)))
        for g, rows in groups.items():
            moved = tuple(p[rows].tolist())
            # the rows of a group are mapped onto the rows of one group, in order
            assert moved in rows_of, (g, rows, moved)
            assert len(groups[rows_of[moved]]) == len(rows)


def test_group_permutations_move_whole_groups_in_order():
    # interleaved labels, groups of size 3 (8 groups) and of size 2 (5 groups)
    rng = np.random.default_rng(0)
    labels = np.array([f"g{i}" for i in range(8) for _ in range(3)] + [f"h{i}" for i in range(5) for _ in range(2)])
    labels = labels[rng.permutation(len(labels))]
    perms = F.permutations(len(labels), 100, seed=5, groups=labels)
    assert perms.shape == (100, len(labels))
    _check_group_perms(perms, labels)
    # the groups really move (not the identity), and both size classes get shuffled
    ident = torch.arange(len(labels))
    assert (perms != ident).any(1).float().mean() > 0.9
    size3 = np.flatnonzero(np.char.startswith(labels.astype(str), "g"))
    size2 = np.flatnonzero(np.char.startswith(labels.astype(str), "h"))
    assert (perms[:, size3] != ident[size3]).any()
    assert (perms[:, size2] != ident[size2]).any()
    # reproducible, seed-dependent
    assert torch.equal(perms, F.permutations(len(labels), 100, seed=5, groups=labels))
    assert not torch.equal(perms, F.permutations(len(labels), 100, seed=6, groups=labels))


def test_group_permutations_with_tensor_labels():
    labels = torch.arange(12).repeat_interleave(4)
    perms = F.permutations(48, 40, seed=0, groups=labels)
    _check_group_perms(perms, labels.numpy())
    # equals the same labels given as a list
    assert torch.equal(perms, F.permutations(48, 40, seed=0, groups=labels.tolist()))


# --------------------------------------------------------------------------- nulls


@pytest.mark.parametrize("name", MEASURES)
def test_fast_null_equals_recompute_float64(name):
    x, y = _related()
    kw = _kwargs(name)
    K = 40
    null = F.permutation_null(x, y, name, K, seed=11, **kw)
    perms = F.permutations(x.shape[0], K, seed=11)
    ref = _recompute(FUNCS[name], x, y, perms, **kw)
    assert null.shape == (K,)
    assert null.dtype == torch.float64
    torch.testing.assert_close(null, ref.to(torch.float64), atol=1e-10, rtol=0)
    # the null is not degenerate and differs from the observed (related) score
    obs = FUNCS[name](x, y, **kw)
    assert float(null.max()) < float(obs)
    if name not in KNN:
        assert float(null.std()) > 0


@pytest.mark.parametrize("name", MEASURES)
def test_fast_null_equals_recompute_float32(name):
    x, y = _related(seed=1, dtype=torch.float32)
    kw = _kwargs(name)
    K = 40
    null = F.permutation_null(x, y, name, K, seed=12, **kw)
    perms = F.permutations(x.shape[0], K, seed=12)
    ref = _recompute(FUNCS[name], x, y, perms, **kw)
    assert null.dtype == torch.float32
    torch.testing.assert_close(null, ref.to(torch.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MEASURES)
def test_fast_null_with_groups_equals_recompute(name):
    x, y = _related(seed=2)
    labels = np.repeat(np.arange(12), 4)
    kw = _kwargs(name)
    K = 30
    null = F.permutation_null(x, y, name, K, seed=13, groups=labels, **kw)
    perms = F.permutations(x.shape[0], K, seed=13, groups=labels)
    ref = _recompute(FUNCS[name], x, y, perms, **kw)
    torch.testing.assert_close(null, ref.to(torch.float64), atol=1e-10, rtol=0)
    # block permutations differ from ordinary ones: the null is a different one
    plain = F.permutation_null(x, y, name, K, seed=13, **kw)
    assert not torch.equal(null, plain)


def test_rbf_median_sigma_fast_null():
    x, y = _related(seed=3)
    null = F.permutation_null(x, y, "rbf_cka", 30, seed=1, sigma="median")
    ref = _recompute(F.rbf_cka, x, y, F.permutations(48, 30, seed=1), sigma="median")
    torch.testing.assert_close(null, ref, atol=1e-10, rtol=0)


def test_knn_fast_null_default_k_and_large_k():
    x, y = _related(seed=4)
    for k in (10, 20):
        for name in sorted(KNN):
            null = F.permutation_null(x, y, name, 15, seed=2, k=k)
            ref = _recompute(FUNCS[name], x, y, F.permutations(48, 15, seed=2), k=k)
            torch.testing.assert_close(null, ref, atol=1e-10, rtol=0, msg=f"{name} k={k}")


@pytest.mark.parametrize("k", [32, 64, 150])
def test_knn_fast_null_k_from_32_up(k):
    """k >= 32 (the per-row perfect hash once failed to build there): nulls equal recompute."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(600, 12, generator=g, dtype=torch.float64)
    y = x @ torch.randn(12, 9, generator=g, dtype=torch.float64) + torch.randn(
        600, 9, generator=g, dtype=torch.float64)
    for name in sorted(KNN):
        null = F.permutation_null(x, y, name, 6, seed=2, k=k)
        ref = _recompute(FUNCS[name], x, y, F.permutations(600, 6, seed=2), k=k)
        torch.testing.assert_close(null, ref, atol=1e-10, rtol=0, msg=f"{name} k={k}")


@pytest.mark.parametrize("name", sorted(KNN))
def test_knn_null_in_small_chunks_equals_recompute(name, monkeypatch):
    """Chunks of one or two permutations (as at large n) give the same null."""
    from alignment_callback.functional import permutation

    x, y = _related(seed=6)
    whole = F.permutation_null(x, y, name, 20, seed=3, k=5)
    monkeypatch.setattr(permutation, "_CHUNK_ELEMENTS", 48 * 5 * 5 * 2 * 2)  # 2 permutations
    null = F.permutation_null(x, y, name, 20, seed=3, k=5)
    ref = _recompute(FUNCS[name], x, y, F.permutations(48, 20, seed=3), k=5)
    torch.testing.assert_close(null, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(null, whole, atol=1e-12, rtol=0)


def test_callable_metric_is_recomputed():
    x, y = _related(seed=5)
    calls = []

    def cosine_diag(a, b):  # needs the row pairing; no fast path
        calls.append(1)
        return (a[:, :5] * b[:, :5]).sum(1).mean()

    K = 25
    null = F.permutation_null(x, y, cosine_diag, K, seed=21)
    perms = F.permutations(48, K, seed=21)
    ref = _recompute(cosine_diag, x, y, perms)
    torch.testing.assert_close(null, ref, atol=1e-12, rtol=0)
    assert len(calls) == 2 * K  # K in the null, K in the reference

    # keyword arguments are bound to the callable
    def scaled(a, b, scale=1.0):
        return scale * F.linear_cka(a, b)

    null2 = F.permutation_null(x, y, scaled, K, seed=21, scale=0.5)
    ref2 = 0.5 * _recompute(F.linear_cka, x, y, perms)
    torch.testing.assert_close(null2, ref2, atol=1e-12, rtol=0)
    # a callable returning a python float keeps float64 precision
    null3 = F.permutation_null(x, y, lambda a, b: float(F.linear_cka(a, b)), K, seed=21)
    assert null3.dtype == torch.float64
    torch.testing.assert_close(null3, ref2 * 2, atol=1e-12, rtol=0)


def test_null_chunking_does_not_change_values():
    # K larger than one chunk (256): the stitched null still matches the recompute
    x, y = _related(n=24, seed=6)
    K = 300
    null = F.permutation_null(x, y, "mutual_knn", K, seed=3, k=5)
    ref = _recompute(F.mutual_knn, x, y, F.permutations(24, K, seed=3), k=5)
    torch.testing.assert_close(null, ref, atol=1e-12, rtol=0)
    null = F.permutation_null(x, y, "linear_cka", K, seed=3)
    ref = _recompute(F.linear_cka, x, y, F.permutations(24, K, seed=3))
    torch.testing.assert_close(null, ref, atol=1e-10, rtol=0)


def test_calibrated_alignment_uses_the_same_null():
    x, y = _related(seed=7)
    for name in ("linear_cka", "mutual_knn"):
        kw = _kwargs(name)
        res = F.calibrated_alignment(x, y, name, num_permutations=40, seed=9, **kw)
        null = F.permutation_null(x, y, name, 40, seed=9, **kw)
        torch.testing.assert_close(res.null, null, atol=0, rtol=0)
        torch.testing.assert_close(res.raw, FUNCS[name](x, y, **kw), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- layer nulls


def _layers(la: int, lb: int, seed: int, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g, dtype=torch.float64)
    xs = [torch.nn.functional.normalize(base @ torch.randn(8, 6 + a, generator=g, dtype=torch.float64)
                                        + 0.7 * torch.randn(n, 6 + a, generator=g, dtype=torch.float64), dim=1)
          for a in range(la)]
    ys = [torch.nn.functional.normalize(base @ torch.randn(8, 9 - b, generator=g, dtype=torch.float64)
                                        + 0.7 * torch.randn(n, 9 - b, generator=g, dtype=torch.float64), dim=1)
          for b in range(lb)]
    return xs, ys


def _layer_matrices(fn, xs, ys, perms, **kw) -> torch.Tensor:
    return torch.stack([
        torch.stack([torch.stack([torch.as_tensor(fn(xa, yb[p], **kw)) for yb in ys]) for xa in xs])
        for p in perms
    ])


@pytest.mark.parametrize("name,la,lb", [
    ("linear_cka", 2, 3), ("linear_cka", 3, 2), ("linear_cka", 2, 2),
    ("rsa", 3, 2), ("unbiased_cka", 2, 3), ("mutual_knn", 2, 3), ("mutual_knn", 3, 2),
    ("cycle_knn", 2, 3), ("cknna", 3, 2), ("lcs_knn", 2, 2), ("edit_distance_knn", 2, 3),
])
def test_layer_null_equals_recomputed_matrices(name, la, lb):
    xs, ys = _layers(la, lb, seed=la * 10 + lb)
    kw = _kwargs(name)
    K = 30
    perms = F.permutations(40, K, seed=17)
    mats = _layer_matrices(FUNCS[name], xs, ys, perms, **kw)  # (K, LA, LB)
    for agg, ref in (("max", mats.flatten(1).amax(1)), ("mean", mats.flatten(1).mean(1)),
                     ("top3", mats.flatten(1).topk(3, dim=1).values.mean(1))):
        res = F.calibrated_layer_alignment(xs, ys, name, aggregate=agg, num_permutations=K,
                                           seed=17, **kw)
        assert res.null.shape == (K,)
        torch.testing.assert_close(res.null, ref, atol=1e-10, rtol=0, msg=f"{name} {agg}")
        observed = _layer_matrices(FUNCS[name], xs, ys, torch.arange(40)[None], **kw)[0]
        torch.testing.assert_close(res.matrix, observed, atol=1e-10, rtol=0)
    # per-pair nulls are each pair's own permutation null with the same permutations
    res = F.calibrated_layer_alignment(xs, ys, name, num_permutations=K, seed=17, **kw)
    for a in range(la):
        for b in range(lb):
            pair = F.calibrate(observed[a, b], mats[:, a, b])
            torch.testing.assert_close(res.pair_threshold[a, b], pair.threshold, atol=1e-10, rtol=0)
            torch.testing.assert_close(res.pair_p_value[a, b], pair.p_value, atol=0, rtol=0)
            torch.testing.assert_close(res.pair_calibrated[a, b], pair.calibrated, atol=1e-10, rtol=0)


def test_layer_null_with_groups_and_callable_aggregate():
    xs, ys = _layers(2, 3, seed=5)
    labels = np.repeat(np.arange(10), 4)
    K = 20
    perms = F.permutations(40, K, seed=4, groups=labels)
    mats = _layer_matrices(F.linear_cka, xs, ys, perms)

    def second_largest(m):
        return m.flatten().sort().values[-2]

    res = F.calibrated_layer_alignment(xs, ys, "linear_cka", aggregate=second_largest,
                                       num_permutations=K, seed=4, groups=labels)
    ref = mats.flatten(1).sort(1).values[:, -2]
    torch.testing.assert_close(res.null, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(F.BUILTIN_MEASURES))
def test_identity_permutations_reach_the_observed_score(name, dtype):
    """p = (1 + #{s_k ≥ s})/(K + 1) counts every permutation that leaves the data as it is:
    its null value must equal the observed score bitwise, wherever it falls in the batches of
    the null (n = 6: K = 3000 draws hold about 4 identities)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=dtype)
    y = x[:, :2] @ torch.randn(2, 4, generator=g, dtype=dtype) + 0.3 * torch.randn(
        6, 4, generator=g, dtype=dtype)
    kw = {"k": 2} if name in KNN else {"cca_dim": 2} if name == "svcca" else {}
    if name == "linear_predictivity":
        kw = {"folds": 2}
    K = 3000
    res = F.calibrated_alignment(x, y, name, K, seed=0, **kw)
    ident = (F.permutations(6, K, 0) == torch.arange(6)).all(1)
    assert int(ident.sum()) > 0
    assert torch.equal(res.null[ident], res.raw.expand(int(ident.sum())))
    # the nulls themselves do not depend on the batch a permutation is scored in (one
    # product per permutation), except linear predictivity's (one product over the batch)
    if name != "linear_predictivity":
        alone = F.permutation_null(x, y, name, K, seed=0, **kw)[ident]
        assert torch.equal(alone, res.raw.to(alone).expand(len(alone)))


def test_identity_block_permutations_count_as_reaching_the_score_at_any_n():
    """Three groups of eight: one block permutation in six is the identity, at n = 24.  Only
    n <= 12 was checked, so linear predictivity's batched null, rounding the identity's value
    2e-7 below the score, gave p = 0.01 where the six arrangements allow no p below 1/6."""
    n, groups = 24, [i // 8 for i in range(24)]
    perms = F.Permutations(n, 99, 0, groups)
    assert perms.identity_probability() == pytest.approx(1 / 6)
    identity = (F.permutations(n, 99, seed=0, groups=groups) == torch.arange(n)).all(1)
    assert int(identity.sum()) > 5
    for r in range(30):
        g = torch.Generator().manual_seed(r)
        x, y = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
        res = F.calibrated_alignment(x, y, "linear_predictivity", num_permutations=99, seed=0,
                                     groups=groups)
        assert torch.equal(res.null[identity], res.raw.expand(int(identity.sum()))), r
        assert float(res.p_value) >= (1 + int(identity.sum())) / 100 - 1e-7, r


def test_one_group_is_refused_for_what_it_is():
    with pytest.raises(ValueError, match="every sample is in one group"):
        F.Permutations(6, 9, 0, [0] * 6).tensor()
    with pytest.raises(ValueError, match="no two groups have the same size"):
        F.Permutations(6, 9, 0, [0, 0, 0, 1, 1, 2]).tensor()


@pytest.mark.parametrize("spellings", [("cpu", "cpu:0", torch.device("cpu"), None),
                                       pytest.param(("cuda", "cuda:0"), marks=pytest.mark.cuda)])
def test_one_device_spelled_two_ways_is_cached_once(spellings):
    """"cuda" and "cuda:0" (or "cpu" and "cpu:0") are one device: the drawn set is copied to it
    once, not once per spelling."""
    perms = F.Permutations(50, 40, seed=3)
    first = [c.data_ptr() for c in perms.chunks(7, spellings[0])]
    for device in spellings[1:]:
        assert [c.data_ptr() for c in perms.chunks(7, device)] == first, device


def test_group_labels_of_mixed_kinds_are_a_clear_error():
    """None among strings gave numpy's "'<' not supported between 'str' and 'NoneType'"."""
    with pytest.raises(ValueError, match="groups labels must be of one comparable kind.*"
                                         "NoneType, str"):
        F.Permutations(6, 9, 0, [None, "a", "a", "b", "b", None])
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="groups labels"):
        F.calibrated_alignment(x, x, "linear_cka", groups=[None, "a", "a", "b", "b", None])
