"""``torchrun --nproc-per-node 2 -m alignment_callback matrix ...`` on CPU (gloo).

The sharded run writes one pairs file per process and the same ``matrix.json`` results as one
process; a rerun with another number of processes reuses every finished pair; when one process
fails, both end with the same one-line error instead of waiting for each other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._spawn import PORTS

# tests that open local ports take turns across pytest workers (tests/conftest.py)
pytestmark = [pytest.mark.slow, PORTS]

ROOT = Path(__file__).resolve().parents[1]
N = 48
ARGS = ["--measure", "linear_cka,mutual_knn", "--k", "5", "--permutations", "39"]
TIMEOUT_S = 180


def launch(*argv: str, cwd: Path, processes: int = 2, path: Path | None = None
           ) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(str(p) for p in (path, ROOT) if p))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(processes), "-m", "alignment_callback", *argv]
    else:
        cmd = [sys.executable, "-m", "alignment_callback", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 4, generator=g)
    for sub, count in (("dx", 3), ("dy", 2)):
        (root / sub).mkdir()
        for i in range(count):
            torch.save({"a": z @ torch.randn(4, 12, generator=g)
                        + 0.7 * torch.randn(N, 12, generator=g),
                        "b": torch.randn(N, 6, generator=g)}, root / sub / f"m{i}.pt")
    single = launch("matrix", "dx", "dy", *ARGS, "--out", "single", cwd=root, processes=1)
    assert single.returncode == 0, single.stderr
    return root


def results(out: Path) -> tuple[dict, list]:
    doc = json.loads((out / "matrix.json").read_text())
    return doc["results"], doc["pairs"]


def test_two_processes_equal_one(folders):
    root = folders
    start = time.perf_counter()
    proc = launch("matrix", "dx", "dy", *ARGS, "--out", "sharded", cwd=root)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 to compute, shared among 2 processes" in proc.stderr
    out = root / "sharded"
    assert not (out / "pairs.jsonl").exists()
    lines = [len((out / f"pairs.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert lines == [3, 3]
    assert results(out) == results(root / "single")
    assert (out / "report.md").exists() and (out / "report.html").exists()
    print(f"torchrun, 2 processes, 6 pairs: {seconds:.1f} s")


def test_rerun_with_another_world_size_reuses_every_pair(folders):
    root = folders
    out = root / "resume"
    shutil.copytree(root / "single", out)
    kept = (out / "pairs.jsonl").read_text().splitlines(keepends=True)
    (out / "pairs.jsonl").write_text("".join(kept[:2]))  # 2 of 6 pairs done by one process
    proc = launch("matrix", "dx", "dy", *ARGS, "--out", "resume", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 already done" in proc.stderr and "4 to compute" in proc.stderr
    assert sum(len((out / f"pairs.rank{r}.jsonl").read_text().splitlines())
               for r in (0, 1)) == 4
    assert results(out) == results(root / "single")
    # one process again: everything is found in pairs.jsonl and pairs.rank*.jsonl
    proc = launch("matrix", "dx", "dy", *ARGS, "--out", "resume", cwd=root, processes=1)
    assert proc.returncode == 0, proc.stderr
    assert "6 already done" in proc.stderr and "0 to compute" in proc.stderr
    assert results(out) == results(root / "single")


SLOW_RANK_ZERO = """
import importlib.abc, os, sys, time
if os.environ.get("RANK") == "0":  # rank 0 lists the stored pairs 3 s late (a slow node)
    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "alignment_callback.reporting.cli":
                sys.meta_path.remove(self)
                from alignment_callback.reporting import store
                listing, first = store.pair_files, [True]
                def slow(*args, **kwargs):
                    if first.pop() if first else False:
                        time.sleep(3.0)
                    return listing(*args, **kwargs)
                store.pair_files = slow
            return None
    sys.meta_path.insert(0, Hook())
"""


def test_a_slow_process_does_not_change_the_shards_of_a_resumed_run(folders, tmp_path):
    """Rank 0 reads the stored pairs of a resumed run late: no process may append a pair before
    every process has read them, or they would shard different pending lists (pairs skipped or
    computed twice, and "pairs still missing" at the end)."""
    root = folders
    out = root / "slow"
    shutil.copytree(root / "single", out)
    kept = (out / "pairs.jsonl").read_text().splitlines(keepends=True)
    (out / "pairs.jsonl").write_text("".join(kept[:2]))
    (tmp_path / "sitecustomize.py").write_text(SLOW_RANK_ZERO)
    proc = launch("matrix", "dx", "dy", *ARGS, "--out", "slow", cwd=root, path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 already done" in proc.stderr and "4 to compute" in proc.stderr
    assert sum(len((out / f"pairs.rank{r}.jsonl").read_text().splitlines())
               for r in (0, 1)) == 4
    assert results(out) == results(root / "single")


def test_one_failing_process_fails_both_with_the_same_error(folders):
    root = folders
    bad = root / "dx_bad"
    bad.mkdir()
    shutil.copy(root / "dx" / "m0.pt", bad / "m0.pt")
    data = (root / "dx" / "m1.pt").read_bytes()
    (bad / "m1.pt").write_bytes(data[: len(data) // 2])
    # 2 x 2 pairs, Y-major: process 0 computes (m0, y0) and (m0, y1), process 1 reads m1 only
    proc = launch("matrix", "dx_bad", "dy", *ARGS, "--out", "failing", cwd=root)
    assert proc.returncode != 0
    errors = re.findall(r"error: [^\n]*", proc.stderr)
    assert len(errors) == 2, proc.stderr[-3000:]  # both processes printed before exiting
    assert len(set(errors)) == 1, errors  # the same line on both processes
    message = errors[0]
    assert message.startswith("error: rank 1: ") and "m1.pt: not a readable .pt file" in message
    assert not (root / "failing" / "matrix.json").exists()
    # the pairs process 0 finished are kept for the rerun
    assert len((root / "failing" / "pairs.rank0.jsonl").read_text().splitlines()) == 2
