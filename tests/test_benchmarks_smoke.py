"""Smoke runs of the benchmark scripts' ``--quick`` modes: each exits 0 and prints its ratio
lines.  The numbers are not checked (timings on a shared CI machine are noise); the full runs
and their verdicts are in docs/benchmarks.md."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {
    "bench_large_n.py": (
        "(i) the whole calibrated_alignment call",
        "target >= 50x faster: whole call worst",
        "time n=8000 / n=4000 for 2x the samples:",
        "both / (mutual alone + cknna alone) =",
        "peak RSS at n=2048:",
        "ratio 2/1",
    ),
    "bench_threads.py": (
        "2-thread / 1-thread ratio: worst",
        "growth ratio",
        "ratio previous / today:",
        "target within 2x of the bound: null from prepared states",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_mode_runs(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in SCRIPTS[script]:
        assert line in proc.stdout, f"{line!r} missing from:\n{proc.stdout[-3000:]}"
    assert " nan" not in proc.stdout.lower()
    if script == "bench_large_n.py":  # the nulls split over two processes equal one process's
        rows = [r for r in proc.stdout.splitlines() if r.startswith(("linear_cka ", "mutual_knn "))
                and r.rstrip().endswith(tuple("0123456789"))]
        ddp = [r for r in rows if " True " in r or " False " in r]
        assert len(ddp) == 2 and all(" True " in r for r in ddp), ddp


@pytest.mark.slow
@pytest.mark.parametrize("script,section,header", [
    ("bench_large_n.py", "moments", "; the same on cpu beside the CPU"),
    ("bench_threads.py", "gram", "last column(s): the whole call on cpu, beside the CPU's"),
])
def test_quick_mode_prints_the_accelerator_column(script, section, header):
    """Where CUDA exists the whole call is also timed there, beside the CPU; the column's code
    path runs here with BENCH_EXTRA_DEVICE=cpu standing in for the accelerator."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_EXTRA_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--quick",
                           "--only", section], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert header in proc.stdout, proc.stdout[-3000:]
    rows = [r for r in proc.stdout.splitlines() if r.split()[:1] == ["linear_cka"]
            or r.split()[2:3] == ["linear_cka"]]
    assert rows and " nan" not in proc.stdout.lower()
    extra = rows[-1].split()[-1].rstrip("x")
    assert float(extra) > 0, rows[-1]
