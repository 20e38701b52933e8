"""Smoke runs of the benchmark scripts' ``--quick`` modes: each exits 0 and prints its ratio
lines.  The numbers are not checked (timings on a shared CI machine are noise); the full runs
and their verdicts are in docs/benchmarks.md.  Also: what the scripts time leaves one-time
costs out (a stand-in whose first call is slow), the memory child reads its own peak, the
scripts' options reach what they name, and ``make clean`` / .gitignore cover the demo's files."""

import fnmatch
import functools
import importlib
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests._spawn import PORTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")

# script -> (extra arguments, lines the quick run must print)
SCRIPTS = {
    "bench_large_n.py": ((), (
        "(i) the whole calibrated_alignment call",
        "target >= 50x faster: whole call worst",
        "time n=2048 / n=1024 for 2x the samples:",
        "(n=1024 on the gram route)",  # the quick sizes run both routes of the cubic sum
        "both / (mutual alone + cknna alone) =",
        "peak RSS at n=2048:",
        "ratio 2/1",
    )),
    "bench_threads.py": ((), (
        "2-thread / 1-thread ratio: worst",
        "growth ratio",
        "ratio previous / today:",
        "target within 2x of the bound: null from prepared states",
    )),
    # 1 thread: the script's default of 2 contends on a busy 2-core machine (10x slower)
    "bench_nulls.py": (("--threads", "1"), (
        "default suite calibrated in",
        "layers 4x4 linear_cka, K=50:",
        "peak RSS (VmHWM)",
    )),
    "bench_family_nulls.py": ((), (
        "speed-up",
        "shape_metric(a=0.5)",
        "rv_coefficient",
    )),
    "bench_gram_null.py": ((), (
        "gram_dots, float32 matrices, ms per permutation",
        "gram_dots_layers, L×L float32 layers",
        "load average at end:",
    )),
    "bench_engine.py": ((), (
        "one step with all three",
        "12x12 layers:",
        "1x1  layers:",
    )),
}

SLOW_FIRST_CALL = 1.0  # seconds: a stand-in for one-time costs (kernel compilation)


def bench_module(name: str):
    """A benchmark script imported as a module (the scripts import ``_common`` from their
    folder)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module(name)


def slow_first_call(fn):
    """``fn`` whose first call (only) takes SLOW_FIRST_CALL longer, as a compiled kernel's."""
    first = [True]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if first[0]:
            first[0] = False
            time.sleep(SLOW_FIRST_CALL)
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def keep_torch_threads():
    """The scripts set torch's thread count; put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_script(script: str, *args: str):
    # OpenMP threads that wait sleep instead of spinning (unless the environment says otherwise):
    # the scripts' 2-thread calls span many short parallel regions, and on a busy 2-core machine
    # a spinning thread whose partner is off its core burns CPU that other work needs (the quick
    # bench_threads.py run beside one 2-thread torch process: 37-99 s of CPU, 6-7 s passive)
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("script", [  # bench_large_n splits a null over two local processes
    pytest.param(s, marks=PORTS) if s == "bench_large_n.py" else s for s in sorted(SCRIPTS)])
def test_quick_mode_runs(script):
    args, lines = SCRIPTS[script]
    proc = run_script(script, "--quick", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in lines:
        assert line in proc.stdout, f"{line!r} missing from:\n{proc.stdout[-3000:]}"
    assert " nan" not in proc.stdout.lower()
    if script == "bench_large_n.py":  # the nulls split over two processes equal one process's
        rows = [r for r in proc.stdout.splitlines() if r.startswith(("linear_cka ", "mutual_knn "))
                and r.rstrip().endswith(tuple("0123456789"))]
        ddp = [r for r in rows if " True " in r or " False " in r]
        assert len(ddp) == 2 and all(" True " in r for r in ddp), ddp


def check_extra_column(stdout: str, header: str, columns: int, extra: int) -> None:
    """The linear_cka rows of the table under the line holding ``header`` have its
    ``columns`` plus ``extra`` accelerator columns, the last one a positive time or ratio."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if header in line), None)
    assert start is not None, f"{header!r} missing from:\n{stdout[-3000:]}"
    table = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(("target", "[")):
            break
        table.append(line)
    rows = [r for r in table if "linear_cka" in r.split()[:3]]
    assert rows, table
    for row in rows:
        cells = row.split()
        assert len(cells) == columns + extra, row
        assert float(cells[-1].rstrip("x")) > 0, row


@pytest.mark.slow
@pytest.mark.parametrize("script,section,args,header,columns,extra", [
    ("bench_large_n.py", "moments", (True, 1, 1), "; the same on cpu beside the CPU", 4, 3),
    ("bench_threads.py", "gram", (True, 1),
     "last column(s): the whole call on cpu, beside the CPU's", 10, 1),
], ids=["bench_large_n.py-moments", "bench_threads.py-gram"])
def test_quick_mode_prints_the_accelerator_column(script, section, args, header, columns, extra,
                                                  monkeypatch, capsys, keep_torch_threads):
    """Where CUDA exists the whole call is also timed there, beside the CPU; the column's code
    path runs here with BENCH_EXTRA_DEVICE=cpu standing in for the accelerator.  The section
    runs in this process, as its script's ``--quick --only`` would run it (the script itself,
    start-up included, is test_quick_mode_runs's).  The row read is table (i)'s, the one with
    the column (bench_large_n's table (ii) has none)."""
    module = bench_module(script.removesuffix(".py"))
    monkeypatch.setenv("BENCH_EXTRA_DEVICE", "cpu")
    monkeypatch.setattr(bench_module("_common"), "QUICK", True)  # as --quick sets it
    module.SECTIONS[section](*args)  # (quick, repeats[, threads]), as main passes them
    out = capsys.readouterr().out
    assert " nan" not in out.lower()
    check_extra_column(out, header, columns, extra)


def test_extra_column_check_reads_the_table_under_its_header():
    """Without the accelerator columns in table (i) the check fails, even though table (ii)
    below it has a linear_cka row with more columns."""
    table_i = ("(i) the whole calibrated_alignment call; the same on cpu beside the CPU\n"
               "measure       permutation s  moments s   ratio\n"
               "linear_cka            0.015      0.008    1.9x\n"
               "\n")
    table_ii = ("(ii) the null alone given prepared states\n"
                "measure   state perm null s mom both s cached ref s P3 only ms ratio both\n"
                "linear_cka    FeatureState       0.008     0.0067       0.0020      2.244   4x\n")
    header = "; the same on cpu beside the CPU"
    with pytest.raises(AssertionError):
        check_extra_column(table_i + table_ii, header, 4, 3)
    with_column = table_i.replace("1.9x\n", "1.9x        0.0116       0.0064    1.8x\n")
    check_extra_column(with_column + table_ii, header, 4, 3)


# ------------------------------------------------------------------------- memory (bench_engine)
def test_engine_memory_is_the_childs_own_peak():
    """The layer null's peak above its inputs, measured in a child process, is the same
    whether the parent's own peak is small or far above the child's (a child's ru_maxrss
    starts at the parent's peak on Linux, which floored the value to 0)."""
    bench_engine = bench_module("bench_engine")
    n, d, perms = 1024, 32, 4
    code = (f"import sys; sys.path.insert(0, {BENCH!r}); import bench_engine; "
            f"print(bench_engine.peak_memory({n}, {d}, 1, 1, {perms}))")
    small_parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    fresh = float(small_parent.stdout.split()[-1])
    ballast = np.ones(2**30 // 8)  # this process's peak: far above the child's (about 370 MB)
    assert ballast.sum() > 0
    inflated = bench_engine.peak_memory(n, d, 1, 1, perms)
    del ballast
    assert fresh > 0
    assert 0.5 * fresh <= inflated <= 2 * fresh, (fresh, inflated)


# --------------------------------------------------------------------- warm-up before timing
def test_family_nulls_time_no_first_call_costs(monkeypatch, capsys, keep_torch_threads):
    family = bench_module("bench_family_nulls")
    real = family.measures

    def one_measure(n, d):
        prep, score, fn, cost = real(n, d)["rv_coefficient"]
        return {"rv_coefficient": (prep, slow_first_call(score), fn, cost)}

    monkeypatch.setattr(family, "measures", one_measure)
    monkeypatch.setattr(sys, "argv", ["bench_family_nulls.py", "--n", "64", "--d", "16",
                                      "--permutations", "20", "--naive-perms", "1"])
    family.main()
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("rv_coefficient"))
    fast_total = float(row.split()[2])
    assert fast_total < SLOW_FIRST_CALL / 2, row


def test_engine_knn_sharing_times_no_first_call_costs(monkeypatch, capsys, keep_torch_threads):
    from alignment_callback.engine import AlignmentEngine

    bench_engine = bench_module("bench_engine")
    monkeypatch.setattr(AlignmentEngine, "step", slow_first_call(AlignmentEngine.step))
    bench_engine.knn_sharing(n=64, d=8, k=3, perms=20, repeats=1)
    out = capsys.readouterr().out
    joint = float(re.search(r"one step with all three\s+([0-9.]+) s", out).group(1))
    assert joint < SLOW_FIRST_CALL / 2, out


def test_threads_knn_times_no_first_call_costs(monkeypatch, capsys, keep_torch_threads):
    bench_threads = bench_module("bench_threads")
    monkeypatch.setattr(bench_threads, "layer_nulls", slow_first_call(bench_threads.layer_nulls))
    bench_threads.section_knn(quick=True, repeats=1)
    out = capsys.readouterr().out
    first = next(r for r in out.splitlines() if r.split()[:2] == ["512", "mutual_knn"])
    ms_per_perm_1t = float(first.split()[2])
    assert ms_per_perm_1t < 1e3 * SLOW_FIRST_CALL / 50 / 2, out  # K = 50 in quick mode


def test_check_moments_bench_times_no_first_call_costs(monkeypatch, capsys, keep_torch_threads):
    check_moments = bench_module("check_moments")
    monkeypatch.setattr(check_moments.M, "cosine_moments",
                        slow_first_call(check_moments.M.cosine_moments))
    check_moments.section_bench(n=64, d=16, k_perms=50)
    out = capsys.readouterr().out
    first = re.search(r"moments\+P3\s+([0-9.]+) ms", out)
    assert first is not None and float(first.group(1)) < 1e3 * SLOW_FIRST_CALL / 2, out


# ---------------------------------------------------------------------------------- options
def test_family_nulls_only_selects_by_measure_name(monkeypatch, capsys, keep_torch_threads):
    family = bench_module("bench_family_nulls")
    monkeypatch.setattr(sys, "argv", ["bench_family_nulls.py", "--n", "48", "--d", "8",
                                      "--permutations", "10", "--rbf-permutations", "10",
                                      "--naive-perms", "1", "--only",
                                      "shape_metric,linear_predictivity"])
    family.main()
    rows = [r.split()[0] for r in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["shape_metric(a=0.5)", "linear_predictivity(cv)",
                    "linear_predictivity(r=1)"]


def test_family_nulls_only_rejects_an_unknown_name(monkeypatch, capsys):
    family = bench_module("bench_family_nulls")
    monkeypatch.setattr(sys, "argv", ["bench_family_nulls.py", "--only", "shape_metric,nope"])
    with pytest.raises(SystemExit) as err:
        family.main()
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "--only" in message and "nope" in message and "shape_metric" in message


def test_check_moments_memory_section_gets_threads(monkeypatch, capsys, keep_torch_threads):
    check_moments = bench_module("check_moments")
    codes = []

    def fake_run(cmd, **kwargs):
        codes.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, 0, stdout="ok", stderr="")

    monkeypatch.setattr(check_moments.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["check_moments.py", "--only", "memory", "--threads", "2"])
    check_moments.main()
    assert len(codes) == 1 and "torch.set_num_threads(2)" in codes[0], codes
    assert "(2 thread(s))" in capsys.readouterr().out


# ------------------------------------------------------------------------- make clean, ignores
# what `make demo` (examples/quickstart.py --out .: figures, the two callbacks' end-of-fit
# reports and their PNGs) and `make text` write into the repository root
DEMO_FILES = (
    "alignment_curves.png", "alignment_heatmap.png",
    "alignment_report.md", "alignment_report.html", "alignment_report_curves.png",
    "alignment_report_linear_cka.png", "alignment_report_mutual_knn.png",
    "alignment_report_cknna.png",
    "alignment_report_wide.md", "alignment_report_wide.html",
    "wide_report_curves.png", "wide_report_linear_cka.png",
    "text_alignment_curves.png", "text_alignment_heatmap.png",
)


def make_clean_targets() -> list[str]:
    """The arguments of the ``rm`` in the Makefile's ``clean`` recipe."""
    with open(os.path.join(REPO, "Makefile")) as fh:
        recipe = fh.read().split("\nclean:\n", 1)[1]
    lines = []
    for line in recipe.splitlines():
        if not line.startswith("\t"):
            break
        lines.append(line.strip().rstrip("\\"))
    return " ".join(lines).split()[2:]  # after "rm -rf"


def ignored_in_root(name: str) -> bool:
    """Whether .gitignore ignores the file ``name`` in the repository root (its patterns
    without a slash inside match in any folder, a leading slash anchors to the root; a later
    ``!`` pattern re-includes)."""
    ignored = False
    with open(os.path.join(REPO, ".gitignore")) as fh:
        for raw in fh:
            pattern = raw.strip()
            if not pattern or pattern.startswith("#") or pattern.endswith("/"):
                continue
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!")
            if "/" in pattern.strip("/") and not pattern.startswith("/"):
                continue  # a pattern for a subfolder
            if fnmatch.fnmatchcase(name, pattern.lstrip("/")):
                ignored = not negate
    return ignored


@pytest.mark.parametrize("name", DEMO_FILES)
def test_demo_outputs_are_ignored_and_cleaned(name):
    assert ignored_in_root(name), f"{name} is not in .gitignore"
    assert any(fnmatch.fnmatchcase(name, target) for target in make_clean_targets()), (
        f"make clean leaves {name}")
