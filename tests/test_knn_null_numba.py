"""The compiled kNN null (CPU) against the batched torch path, and its thread independence."""

import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.functional import knn_measures as KM
from alignment_callback.functional.neighbors import neighbor_lists

KS = {"mutual_knn": 5, "cycle_knn": 7, "cknna": 10, "lcs_knn": 10, "edit_distance_knn": 3}


def _requests(xs, ys, ks=KS):
    def states(x, role):
        lists = neighbor_lists(x, max(ks.values()), role)
        return {kind: KM.knn_state(x, k, kind, role, lists=lists) for kind, k in ks.items()}

    sx, sy = [states(x, "x") for x in xs], [states(y, "y") for y in ys]
    return [(kind, [s[kind] for s in sx], [s[kind] for s in sy]) for kind in ks]


def _layers(n, dtype, tied, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 8, generator=g, dtype=dtype) for _ in range(2)]
    ys = [xs[0][:, :6] + 0.5 * torch.randn(n, 6, generator=g, dtype=dtype),
          torch.randn(n, 5, generator=g, dtype=dtype)]
    if tied:  # rounded: many exactly tied similarities and duplicated rows
        xs, ys = [x.round() for x in xs], [y.round() for y in ys]
    return xs, ys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tied", [False, True])
def test_numba_equals_torch(dtype, tied):
    xs, ys = _layers(150, dtype, tied, seed=int(tied))
    requests = _requests(xs, ys)
    g = torch.Generator().manual_seed(3)
    perms = torch.stack([torch.randperm(150, generator=g) for _ in range(23)])
    fast = KM.knn_layer_scores(requests, perms, backend="numba")
    ref = KM.knn_layer_scores(requests, perms, backend="torch")
    for (kind, _, _), a, b in zip(requests, fast, ref):
        assert a.dtype == b.dtype == dtype and a.shape == (23, 2, 2)
        if kind == "cknna":  # float64 sums in another order
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=kind)
        else:  # counts: exactly equal
            assert torch.equal(a, b), kind
        assert float(a.std()) > 0, kind  # the permutations do change the scores


def test_two_cknna_requests_with_other_k():
    """Each CKNNA request brings its own lists (k = 4 and k = 10 here)."""
    xs, ys = _layers(120, torch.float64, False, seed=9)
    requests = _requests(xs, ys, {"cknna": 10, "mutual_knn": 6})
    requests += [("cknna", r[1], r[2]) for r in _requests(xs, ys, {"cknna": 4})]
    perms = torch.stack([torch.randperm(120) for _ in range(9)])
    fast = KM.knn_layer_scores(requests, perms, backend="numba")
    ref = KM.knn_layer_scores(requests, perms, backend="torch")
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert not torch.allclose(fast[0], fast[2])


def test_numba_result_does_not_depend_on_threads(monkeypatch):
    xs, ys = _layers(400, torch.float32, False, seed=5)
    requests = _requests(xs, ys)
    perms = torch.stack([torch.randperm(400) for _ in range(64)])
    monkeypatch.setattr(KM, "_MIN_PARALLEL_SLOTS", 0)
    monkeypatch.setattr(KM, "_TASK_SLOTS", 400 * 10 * 3)  # several tasks
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KM.knn_layer_scores(requests, perms, backend="numba")
        torch.set_num_threads(2)
        two = KM.knn_layer_scores(requests, perms, backend="numba")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_calibration_is_the_same_through_either_backend(monkeypatch):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(120, 10, generator=g)
    y = x[:, :7] + torch.randn(120, 7, generator=g)
    results = {}
    for backend in ("numba", "torch"):
        monkeypatch.setattr(KM, "default_backend", backend)
        results[backend] = F.calibrate_measures([x], [y], ["mutual_knn", "cycle_knn", "lcs_knn"],
                                                num_permutations=50)
    for name, r in results["numba"].items():
        assert torch.equal(r.null, results["torch"][name].null), name
        assert float(r.p_value) == float(results["torch"][name].p_value), name


def test_unknown_backend_is_refused():
    xs, ys = _layers(30, torch.float64, False, seed=1)
    requests = _requests(xs[:1], ys[:1], {"mutual_knn": 3})
    with pytest.raises(ValueError, match="backend"):
        KM.knn_layer_scores(requests, torch.arange(30)[None], backend="cuda")


@pytest.mark.parametrize("k", [127, 130])  # slots as int8 (k < 128) and as int16
def test_numba_equals_torch_with_long_lists(k):
    xs, ys = _layers(300, torch.float64, False, seed=5)
    requests = _requests(xs[:1], ys[:1], {"mutual_knn": k, "cycle_knn": k - 20, "cknna": k})
    perms = torch.stack([torch.randperm(300, generator=torch.Generator().manual_seed(i))
                         for i in range(5)])
    fast = KM.knn_layer_scores(requests, perms, backend="numba")
    ref = KM.knn_layer_scores(requests, perms, backend="torch")
    for (kind, _, _), a, b in zip(requests, fast, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=kind)


def test_cycle_knn_with_hubs_equals_torch():
    """A reference where a few rows are everyone's neighbors (in-lists of very unequal length)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y[:5] *= 0.01  # rows near the origin: neighbors of almost every row under the L2 metric
    y[5:] += 10.0 * torch.randn(195, 1, generator=g, dtype=torch.float64).sign()
    requests = _requests([x], [y], {"cycle_knn": 8, "mutual_knn": 8})
    indegree = torch.bincount(requests[0][2][0].lists.indices.reshape(-1), minlength=200)
    perms = torch.stack([torch.randperm(200, generator=g) for _ in range(17)])
    fast = KM.knn_layer_scores(requests, perms, backend="numba")
    ref = KM.knn_layer_scores(requests, perms, backend="torch")
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    assert int(indegree.max()) > 4 * 8  # the case meant: hubs


def test_in_lists_invert_the_lists():
    kernels = KM._numba_kernels()
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(40)]).int().numpy()
    ptr, src, slot = kernels.in_lists(idx, kernels.slot_dtype(6))
    got = {(int(u), int(src[e]), int(slot[e])) for u in range(40)
           for e in range(ptr[u], ptr[u + 1])}
    assert got == {(int(idx[v, t]), v, t + 1) for v in range(40) for t in range(6)}
    assert ptr[-1] == idx.size and slot.dtype == kernels.slot_dtype(6)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_no_permutations_give_empty_scores(backend):
    xs, ys = _layers(40, torch.float64, False, seed=4)
    requests = _requests(xs, ys)
    out = KM.knn_layer_scores(requests, torch.zeros(0, 40, dtype=torch.long), backend=backend)
    assert [o.shape for o in out] == [(0, 2, 2)] * len(requests)
