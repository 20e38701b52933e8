"""Two CPU processes (gloo): the metrics' cat-gathered states give every rank the same result as
one process that saw all rows.

torchmetrics gathers list states rank-major (rank 0's rows, then rank 1's), padding and trimming
uneven per-rank counts, so the single-process reference is fed rank 0's rows then rank 1's.  With
``index=`` the order (and DistributedSampler-style duplicates) no longer matters.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from alignment_callback.metrics import CalibratedAlignment, LayerAlignment
from alignment_callback.metrics.calibrated_alignment import RESULT_KEYS
from tests._spawn import PORTS, free_port, spawn_and_wait

# tests that open local ports take turns across pytest workers (tests/conftest.py)
pytestmark = [pytest.mark.slow, PORTS]

K = 40
N = 80
SPLIT = 37  # rank 0: 37 rows, rank 1: 43 rows (uneven: exercises padding + trimming)
TIMEOUT_S = 90.0
# (no ``tests.helpers`` import, only ``tests._spawn``: the spawned workers re-import this
# module, and Lightning would add seconds to each worker's start on a busy 2-core machine)


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 10, generator=g)
    y = x @ torch.randn(10, 6, generator=g) + 0.8 * torch.randn(N, 6, generator=g)
    x2 = torch.tanh(x @ torch.randn(10, 8, generator=g))
    y2 = torch.randn(N, 5, generator=g)
    order = torch.randperm(N, generator=g)  # the "rank-major" row order of the plain split
    # DistributedSampler-like shards with sample ids: shuffled, padded with repeated ids, uneven
    ids = torch.randperm(N, generator=g)
    shard0 = torch.cat([ids[:SPLIT], ids[:2]])  # 39 rows (2 duplicates)
    shard1 = torch.cat([ids[SPLIT:], ids[SPLIT:SPLIT + 1]])  # 44 rows (1 duplicate)
    return dict(x=x, y=y, x2=x2, y2=y2, order=order, shard0=shard0, shard1=shard1)


def _metrics() -> dict[str, object]:
    return {
        "order": LayerAlignment("linear_cka", num_permutations=K, seed=4),
        "idle": LayerAlignment("mutual_knn", num_permutations=K, seed=4, k=5),
        "idle0": LayerAlignment("linear_cka", num_permutations=K, seed=4),
        "ca": CalibratedAlignment("mutual_knn", num_permutations=K, seed=4, k=5),
        "la": LayerAlignment("linear_cka", num_permutations=K, seed=4),
        "ca_index": CalibratedAlignment("linear_cka", num_permutations=K, seed=4),
        "la_index": LayerAlignment("mutual_knn", aggregate="mean", num_permutations=K, seed=4, k=5),
        "cached_index": CalibratedAlignment("mutual_knn", num_permutations=K, seed=4, k=5),
        # float32 model rows against float64 reference rows: each side keeps its own dtype
        "mixed": CalibratedAlignment("linear_cka", num_permutations=K, seed=4),
        # rank 0's rows arrive with load_state_dict, rank 1's with update
        "loaded": CalibratedAlignment("linear_cka", num_permutations=K, seed=4),
    }


def _feed(metrics: dict, d: dict, rows: torch.Tensor, ids: torch.Tensor) -> None:
    """``rows``: rows in rank-major order (no ids); ``ids``: sample ids for the index= metrics."""
    x, y, x2, y2 = d["x"], d["y"], d["x2"], d["y2"]
    metrics["ca"].update(x[rows], y[rows])
    metrics["la"].update({"a": x[rows], "b": x2[rows]}, {"c": y[rows], "d": y2[rows]})
    metrics["ca_index"].update(x[ids], y[ids], index=ids)
    metrics["la_index"].update({"a": x[ids], "b": x2[ids]}, {"c": y[ids], "d": y2[ids]}, index=ids)
    metrics["cached_index"].update(x[ids], index=ids)
    metrics["mixed"].update(x[rows], y[rows].double())


def _feed_rank(metrics: dict, d: dict, rows: torch.Tensor, rank: int) -> None:
    """Rank-specific feeding: rank 1 lists the layers in another order, and never updates
    the "idle" metric; rank 0 never updates "idle0"."""
    x, y, x2, y2 = d["x"], d["y"], d["x2"], d["y2"]
    if rank == 1:
        metrics["idle0"].update({"a": x[rows]}, {"c": y[rows]})
    xs = {"a": x[rows], "b": x2[rows]}
    ys = {"c": y[rows], "d": y2[rows]}
    if rank == 1:
        xs, ys = dict(reversed(xs.items())), dict(reversed(ys.items()))
    metrics["order"].update(xs, ys)
    if rank == 0:
        metrics["idle"].update(xs, ys)


def _results(metrics: dict) -> dict[str, dict[str, torch.Tensor]]:
    out, caught = {}, {}
    for name, m in metrics.items():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out[name] = {k: v.clone() for k, v in m.compute().items()}
        caught[name] = [str(w.message) for w in seen]
    out["_warnings"] = caught
    return out


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        d = _data()
        metrics = _metrics()
        metrics["cached_index"].set_reference(d["y"])  # every rank holds the whole frozen reference
        rows = d["order"][:SPLIT] if rank == 0 else d["order"][SPLIT:]
        ids = d[f"shard{rank}"]
        # two updates per rank (uneven batches inside the shard too)
        for part in (slice(0, 11), slice(11, None)):
            _feed(metrics, d, rows[part], ids[part])
            _feed_rank(metrics, d, rows[part], rank)
        if rank == 0:
            source = CalibratedAlignment("linear_cka", num_permutations=K, seed=4)
            source.persistent(True)
            source.update(d["x"][rows], d["y"][rows])
            metrics["loaded"].persistent(True)
            metrics["loaded"].load_state_dict(source.state_dict())
        else:
            metrics["loaded"].update(d["x"][rows], d["y"][rows])
        local_rows = metrics["ca"]._stored_rows("x")
        results = _results(metrics)
        conflict = LayerAlignment("linear_cka", num_permutations=K)
        conflict.update({"a" if rank == 0 else "z": d["x"][rows]}, {"c": d["y"][rows]})
        try:
            conflict.compute()
            results["_conflict"] = "no error"
        except ValueError as err:
            results["_conflict"] = str(err)
        mixed = CalibratedAlignment("linear_cka", num_permutations=K)
        if rank == 0:
            mixed.set_reference(d["y"])
            mixed.update(d["x"])
        else:
            mixed.update(d["x"][rows], d["y"][rows])
        try:
            mixed.compute()
            results["_mixed_reference"] = "no error"
        except ValueError as err:
            results["_mixed_reference"] = str(err)
        # after compute the local (unsynced) states are restored
        results["_local"] = {"rows": torch.tensor(local_rows),
                             "after": torch.tensor(metrics["ca"]._stored_rows("x"))}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(out_dir: Path) -> None:
    spawn_and_wait(_worker, (2, free_port(), str(out_dir)), TIMEOUT_S)


def _single_process() -> dict[str, dict[str, torch.Tensor]]:
    d = _data()
    metrics = _metrics()
    metrics["cached_index"].set_reference(d["y"])
    # rank-major order for the plain metrics; in-order, deduplicated rows for the index= ones
    _feed(metrics, d, d["order"], torch.arange(N))
    _feed_rank(metrics, d, d["order"], 0)
    metrics["loaded"].update(d["x"][d["order"]], d["y"][d["order"]])
    del metrics["idle0"]  # rank 0 never updates it: computed below on rank 1's rows
    out = _results(metrics)
    idle = LayerAlignment("mutual_knn", num_permutations=K, seed=4, k=5)  # rank 0's rows only
    _feed_rank({"order": LayerAlignment(), "idle": idle}, d, d["order"][:SPLIT], 0)
    out["idle"] = _results({"idle": idle})["idle"]
    idle0 = LayerAlignment("linear_cka", num_permutations=K, seed=4)  # rank 1's rows only
    _feed_rank({"order": LayerAlignment(), "idle": LayerAlignment(), "idle0": idle0}, d,
               d["order"][SPLIT:], 1)
    out["idle0"] = _results({"idle0": idle0})["idle0"]
    return out


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    _spawn(out)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single_results() -> dict[str, dict[str, torch.Tensor]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _single_process()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["ca", "la", "ca_index", "la_index", "cached_index", "order", "idle",
                                  "idle0", "mixed", "loaded"])
def test_ddp_matches_single_process(ddp_results, single_results, name: str) -> None:
    expected = single_results[name]
    layered = name.startswith("la") or name in ("order", "idle", "idle0")
    keys = RESULT_KEYS + (("matrix", "pair_calibrated", "argmax") if layered else ())
    for rank, results in enumerate(ddp_results):
        for key in keys:
            torch.testing.assert_close(results[name][key], expected[key],
                                       msg=lambda m, k=key, r=rank: f"rank {r}, {name}.{k}: {m}")


@pytest.mark.parametrize("name", ["mixed", "loaded"])
def test_ddp_mixed_dtypes_and_loaded_rows_equal_one_process_exactly(ddp_results, single_results,
                                                                    name: str) -> None:
    """The same rows in the same order: the same numbers to the last bit (float32 model rows
    are not widened, nor float64 reference rows narrowed, by the processes' agreement)."""
    for rank, results in enumerate(ddp_results):
        for key in RESULT_KEYS:
            torch.testing.assert_close(results[name][key], single_results[name][key], rtol=0,
                                       atol=0, msg=lambda m, k=key, r=rank: f"rank {r}, {k}: {m}")


def test_ddp_process_without_rows_does_not_warn_compute_before_update(ddp_results) -> None:
    """A process that never updated gathers the others' rows: torchmetrics' "compute was
    called before update" warning would be false there (rank 0 for "idle0", rank 1 for "idle")."""
    for rank, results in enumerate(ddp_results):
        for name in ("idle", "idle0"):
            before = [m for m in results["_warnings"][name] if "before the ``update``" in m]
            assert not before, f"rank {rank}, {name}: {before}"


def test_ddp_local_states_restored(ddp_results) -> None:
    for rank, results in enumerate(ddp_results):
        local = SPLIT if rank == 0 else N - SPLIT
        assert int(results["_local"]["rows"]) == local
        assert int(results["_local"]["after"]) == local


def test_ddp_different_layers_on_two_ranks_is_one_clear_error_on_both(ddp_results) -> None:
    for results in ddp_results:
        message = results["_conflict"]
        assert "the processes hold different x layers" in message, message
        assert "rank 0 has {'a': 10}" in message and "rank 1 has {'z': 10}" in message


def test_ddp_a_reference_cached_on_one_rank_only_is_one_clear_error_on_both(ddp_results) -> None:
    """Rank 0 caches the reference (set_reference), rank 1 passes y to update(): rank 0 got a
    result and rank 1 an unrelated row-count error (and, in a loop, the next collective waits)."""
    for results in ddp_results:
        message = results["_mixed_reference"]
        assert "rank 0 caches a reference (set_reference) and rank 1 does not" in message, message
