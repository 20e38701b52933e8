"""Measures outside the gram family that need n×n matrices (linear predictivity's permutation
null, RBF Bures) are refused before allocating them when they would not fit, naming the
measure, the estimate and an alternative; the feature-space and kNN measures are not refused
for a large n; and the memory available respects a container's cgroup limit."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_reference_families as R

import alignment_callback.functional as F
from alignment_callback.functional import _memory
from alignment_callback.functional import predictivity as pr
from alignment_callback.functional import shape_measures as shm
from alignment_callback.functional.registry import get_measure

GiB = 2**30


def _pair(n: int, dx: int = 6, dy: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = x[:, :2] @ torch.randn(2, dy, generator=g, dtype=torch.float64)
    y = y + torch.randn(n, dy, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _free(monkeypatch, n_by_n: float, n: int, dtype=torch.float32) -> None:
    """Make every module that checks memory see ``n_by_n`` n×n matrices of ``dtype`` free."""
    free = int(n_by_n * n * n * torch.tensor([], dtype=dtype).element_size())
    for module in (pr, shm):
        monkeypatch.setattr(module, "available_bytes", lambda device: free, raising=False)
    from alignment_callback.functional import gram_measures, pipeline

    monkeypatch.setattr(gram_measures, "available_bytes", lambda device: free)
    monkeypatch.setattr(pipeline, "_available_bytes", lambda device: free)


def _count(message: str) -> int:
    """The n×n matrices a refusal counted: "(40 of 1.0 MiB)"."""
    return int(re.search(r"\((\d+) of \d+\.\d+ [KMG]iB\)", message).group(1))


class _Spy:
    """Records calls of a function, and fails the test if an n×n allocation was reached."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, what: str):
        def record(*args, **kwargs):
            self.calls.append(what)
            raise AssertionError(f"{what} was called: an n×n matrix would be allocated")
        return record


# ------------------------------------------------------------------------ linear predictivity
def _spy_predictivity(monkeypatch) -> _Spy:
    spy = _Spy()
    monkeypatch.setattr(pr, "PredictivityForms", spy("PredictivityForms"))
    monkeypatch.setattr(pr.PredictivityState, "target", property(spy("target")))
    return spy


@pytest.mark.parametrize("ridge,low,high", [(None, 36, 42), (1.0, 3, 5)])
def test_calibrated_predictivity_is_refused_before_any_n_by_n_matrix(monkeypatch, ridge, low,
                                                                      high):
    """Before: the forms went straight to the allocator (a RuntimeError from it at n = 300,000,
    and between the extremes the OS killed the process)."""
    n = 300
    _free(monkeypatch, 2.0, n)
    spy = _spy_predictivity(monkeypatch)
    x, y = _pair(n)
    with pytest.raises(MemoryError) as err:
        F.calibrated_alignment(x, y, "linear_predictivity", 19, ridge=ridge)
    text = str(err.value)
    assert spy.calls == []
    assert text.startswith(f"linear_predictivity at n={n} needs about ")
    assert f"but only {_memory.format_bytes(2.0 * n * n * 4)} is available on cpu" in text
    # the default keeps 2·folds·|grid| = 70 packed triangles (35 n×n) plus the gathers of L[π]
    assert low <= _count(text) <= high
    assert "linear_predictivity(x, y) for the value alone" in text
    assert "linear_cka with null='moments'" in text
    assert ("a fixed ridge=<number>" in text) == (ridge is None)


def test_predictivity_measure_call_is_refused_too(monkeypatch):
    n = 300  # its four n×n matrices above _memory.SMALL_REQUEST, which is never refused
    _free(monkeypatch, 1.0, n)
    spy = _spy_predictivity(monkeypatch)
    x, y = _pair(n)
    with pytest.raises(MemoryError, match=rf"^linear_predictivity at n={n} needs about"):
        get_measure("linear_predictivity", ridge=0.5)(x, y)
    assert spy.calls == []


def test_predictivity_refusal_names_an_alternative_that_fits(monkeypatch):
    """With room for ~10 n×n matrices the default (inner CV, ~40) is refused; the fixed ridge
    it suggests (~4) runs, and gives the independent float64 reference's value."""
    n = 300  # the fixed ridge's ~4 n×n above _memory.SMALL_REQUEST, so its room is checked
    _free(monkeypatch, 10.0, n)
    x, y = _pair(n, seed=3)
    with pytest.raises(MemoryError, match="a fixed ridge=<number>"):
        F.calibrated_alignment(x, y, "linear_predictivity", 19)
    result = F.calibrated_alignment(x, y, "linear_predictivity", 19, ridge=1.0)
    expected = R.ridge_cv_r2(x.numpy(), y.numpy(), ridge=1.0)
    assert float(result.raw) == pytest.approx(expected, abs=2e-5)


def test_plain_linear_predictivity_is_never_refused(monkeypatch):
    """The direct regression needs O(n·d) memory: no refusal even with 1 KiB free."""
    n = 500
    monkeypatch.setattr(pr, "available_bytes", lambda device: 1024, raising=False)
    x, y = _pair(n, seed=5, dtype=torch.float64)
    value = F.linear_predictivity(x, y)
    assert float(value) == pytest.approx(R.ridge_cv_r2(x.numpy(), y.numpy()), rel=1e-10)


@pytest.mark.parametrize("ridge", [None, 1.0, (0.1, 10.0)])
def test_predictivity_with_ample_memory_equals_the_reference(monkeypatch, ridge):
    """The forms are built with one n×n form alive at a time now (peak about half of before):
    the observed score and a permuted one still equal the float64 reference."""
    n = 60
    _free(monkeypatch, 1e6, n)
    x, y = _pair(n, seed=7, dtype=torch.float64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    perms = torch.stack([torch.arange(n), perm])
    sx, sy = pr.predictivity_state(x, ridge, 4), pr.predictivity_state(y, ridge, 4)
    scores = pr.predictivity_score(sx, sy, perms)
    kwargs = {"ridge": ridge} if isinstance(ridge, float) else {"grid": ridge} if ridge else {}
    for score, p in zip(scores, perms):
        expected = R.ridge_cv_r2(x.numpy(), y.numpy()[p.numpy()], folds=4, **kwargs)
        assert float(score) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_predictivity_forms_estimate_counts_what_is_kept():
    """The kept bytes of the estimate are those of the built forms' tensors."""
    n, folds, grid = 50, 5, pr.RIDGE_GRID
    x, _ = _pair(n, dtype=torch.float64)
    forms = pr.PredictivityForms(pr._check_variance(x, "x"), grid, False, folds)
    kept = sum(t.numel() * t.element_size() for t in (forms.outer, forms.inner, forms.flat))
    assert pr.forms_bytes(n, torch.float64, False, folds, len(grid))[1] == kept
    fixed = pr.PredictivityForms(pr._check_variance(x, "x"), (1.0,), True, folds)
    assert pr.forms_bytes(n, torch.float64, True, folds, 1)[1] == fixed.total.numel() * 8


# ------------------------------------------------------------------------------ RBF Bures
def _spy_rbf(monkeypatch) -> _Spy:
    spy = _Spy()
    monkeypatch.setattr(shm, "rbf_gram", spy("rbf_gram"))
    return spy


def test_rbf_bures_function_is_refused_before_any_n_by_n_matrix(monkeypatch):
    n = 256
    _free(monkeypatch, 6.5, n, torch.float64)  # one side's peak fits, both sides do not
    # (float64: the gram is decomposed in float64 for float32 input too)
    spy = _spy_rbf(monkeypatch)
    x, y = _pair(n)
    with pytest.raises(MemoryError) as err:
        F.bures_similarity(x, y, kernel="rbf", sigma="median")
    text = str(err.value)
    assert spy.calls == []
    assert text.startswith(f"bures_similarity (kernel='rbf') at n={n} needs about ")
    assert _count(text) == shm.RBF_STATE_PEAK + 1
    assert "kernel='linear' (= procrustes_similarity" in text


@pytest.mark.parametrize("how", ["calibrated", "measure"])
def test_rbf_bures_state_is_refused_in_the_pipeline(monkeypatch, how):
    n = 256
    _free(monkeypatch, 3.0, n, torch.float64)
    spy = _spy_rbf(monkeypatch)
    x, y = _pair(n)
    with pytest.raises(MemoryError, match=r"^bures_similarity \(kernel='rbf'\) at n=256 .*"
                                          r"available on cpu\. Use kernel='linear'"):
        if how == "calibrated":
            F.calibrated_alignment(x, y, "bures_similarity", 19, kernel="rbf")
        else:
            get_measure("bures_similarity", kernel="rbf")(x, y)
    assert spy.calls == []


@pytest.mark.parametrize("how", ["calibrated", "measure", "layers", "engine", "metric"])
def test_rbf_bures_counts_the_states_kept_before_any_side_is_prepared(monkeypatch, how):
    """One side's state at its peak fits, but not with the other states kept (y's, prepared
    after x's; every layer's in a layer list or an engine step): refused before the first RBF
    gram, with the count of n×n matrices (before: x's eigendecomposition ran first, and a
    layer list, a step or a metric counted one state at a time)."""
    from alignment_callback.engine import AlignmentEngine
    from alignment_callback.metrics import CalibratedAlignment

    n = 256
    _free(monkeypatch, shm.RBF_STATE_PEAK + 0.5, n, torch.float64)
    x, y = _pair(n)
    measure = get_measure("bures_similarity", kernel="rbf", sigma="median")
    engine = AlignmentEngine({"bures": measure}, num_permutations=19, preprocess=False)
    if how == "engine":
        engine.set_reference({"r": y})  # one state at its peak: fits
    spy = _spy_rbf(monkeypatch)
    kept = 2 if how == "layers" else 1  # an engine step: x's other layer (y's is held already)
    with pytest.raises(MemoryError, match=rf"^bures_similarity \(kernel='rbf'\) at n={n} needs"
                                          rf" about .*\({shm.RBF_STATE_PEAK + kept} of"):
        if how == "calibrated":
            F.calibrated_alignment(x, y, measure, 19)
        elif how == "measure":
            measure(x, y)
        elif how == "layers":
            F.calibrated_layer_alignment({"a": x, "b": 2.0 * x}, {"r": y}, measure, 19)
        elif how == "engine":
            engine.step({"a": x, "b": 2.0 * x})
        else:
            metric = CalibratedAlignment(measure, num_permutations=19, preprocess=False)
            metric.update(x, y)
            metric.compute()
    assert spy.calls == []


def _shrinking_free(monkeypatch, n_by_n: float, n: int, size: int = 4) -> list[int]:
    """Free memory that drops by one n×n matrix (``size`` bytes an element) per RBF gram built
    (the state each leaves held), as the memory available does; returns the list of grams'
    sizes built."""
    built: list[int] = []
    rbf_gram = shm.rbf_gram

    def counting(x, sigma, **kw):
        built.append(x.shape[0])
        return rbf_gram(x, sigma, **kw)

    monkeypatch.setattr(shm, "rbf_gram", counting)
    free = lambda device: int((n_by_n - len(built)) * n * n * size)  # noqa: E731
    monkeypatch.setattr(shm, "available_bytes", free)
    return built


@pytest.mark.parametrize("how", ["calibrated", "engine", "metric"])
def test_rbf_bures_does_not_count_a_side_prepared_already(monkeypatch, how):
    """A side whose states are built holds memory the system no longer reports available:
    counting them again refused probes that fit (y after x in calibrated_alignment, an engine
    step after set_reference, a metric against its cached reference)."""
    from alignment_callback.engine import AlignmentEngine
    from alignment_callback.metrics import CalibratedAlignment

    n = 160  # float64: its counts above _memory.SMALL_REQUEST, which reads no free memory
    x, y = _pair(n, dtype=torch.float64)
    measure = get_measure("bures_similarity", kernel="rbf", sigma=2.0)
    if how == "calibrated":
        built = _shrinking_free(monkeypatch, shm.RBF_STATE_PEAK + 1.5, n, 8)
        result = F.calibrated_alignment(x, y, measure, 19)
    elif how == "engine":
        engine = AlignmentEngine({"bures": measure}, num_permutations=19, preprocess=False)
        engine.set_reference({"r": y, "s": 2.0 * y, "t": y + 1.0})  # three states held
        built = _shrinking_free(monkeypatch, shm.RBF_STATE_PEAK + 0.5, n, 8)
        result = engine.step({"a": x}).results["bures"]
    else:
        metric = CalibratedAlignment(measure, num_permutations=19, preprocess=False)
        metric.set_reference(y)
        built = _shrinking_free(monkeypatch, shm.RBF_STATE_PEAK + 0.5, n, 8)
        metric.update(x)
        metric.compute()
        result = metric.last_result
    refs = [y, 2.0 * y, y + 1.0] if how == "engine" else [y]  # the engine reports the max
    expected = max(R.bures_fidelity(R.center(R.rbf_gram(x.double().numpy(), 2.0)),
                                    R.center(R.rbf_gram(r.double().numpy(), 2.0))) for r in refs)
    assert float(result.raw) == pytest.approx(expected, rel=1e-4)
    assert built == ([n, n] if how == "calibrated" else [n])


def test_rbf_bures_with_ample_memory_equals_the_reference(monkeypatch):
    n = 160  # 7 float64 n×n above _memory.SMALL_REQUEST: the room is checked
    _free(monkeypatch, 8.0, n, torch.float64)  # just above the 7 the function counts
    x, y = _pair(n, seed=2, dtype=torch.float64)
    value = F.bures_similarity(x, y, kernel="rbf", sigma=2.0)
    expected = R.bures_fidelity(R.center(R.rbf_gram(x.numpy(), 2.0)),
                                R.center(R.rbf_gram(y.numpy(), 2.0)))
    assert float(value) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------ measures that are never refused
@pytest.mark.parametrize("name,kwargs", [
    ("procrustes_similarity", {}), ("shape_metric", {}), ("shape_metric", {"alpha": 0.5}),
    ("bures_similarity", {}), ("cca_similarity", {}), ("pwcca", {}), ("svcca", {"cca_dim": 3}),
    ("mutual_knn", {"k": 5}), ("cknna", {"k": 5}), ("cycle_knn", {"k": 5}),
    ("lcs_knn", {"k": 5}), ("edit_distance_knn", {"k": 5}),
])
def test_feature_space_and_knn_measures_are_not_refused(monkeypatch, name, kwargs):
    """They need the (n, d) features, d×d covariances or O(n·k) neighbor lists: with 1 KiB
    reported free they still calibrate."""
    n = 300
    _free(monkeypatch, 1024 / (n * n * 4), n)
    x, y = _pair(n)
    result = F.calibrated_alignment(x, y, get_measure(name, **kwargs), 19)
    assert math.isfinite(float(result.raw))


def test_linear_cka_with_the_moments_null_is_not_refused(monkeypatch):
    n = 300
    _free(monkeypatch, 1024 / (n * n * 4), n)
    x, y = _pair(n)
    for name in ("linear_cka", "rv_coefficient"):
        result = F.calibrated_alignment(x, y, name, null="moments")
        assert 0.0 <= float(result.raw) <= 1.0


# ------------------------------------------------------------------------- cgroup memory
def _files(tmp_path: Path, monkeypatch, meminfo_kib: int | None,
           v2: tuple[str, str, str] | None = None, v1: tuple[str, str, str] | None = None,
           own: str = "/") -> None:
    """Point ``_memory`` at tmp files: /proc/meminfo, /proc/self/cgroup (the process in cgroup
    ``own`` of both versions) and the (limit, usage, stat) files of each version's mount point
    (None: the files do not exist)."""
    meminfo = tmp_path / "meminfo"
    if meminfo_kib is not None:
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemFree:  1 kB\n"
                           f"MemAvailable:   {meminfo_kib} kB\nBuffers: 5 kB\n")
    monkeypatch.setattr(_memory, "MEMINFO", str(meminfo))
    (tmp_path / "proc_cgroup").write_text(f"9:name=systemd:/\n4:memory:{own}\n1:cpu:/\n0::{own}\n")
    monkeypatch.setattr(_memory, "PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    versions = []
    for (_, controller, *names, key), contents in zip(_memory.CGROUP_VERSIONS, (v2, v1)):
        folder = tmp_path / (controller or "unified")
        folder.mkdir()
        _cgroup_files(folder, names, contents)
        versions.append((str(folder), controller, *names, key))
    monkeypatch.setattr(_memory, "CGROUP_VERSIONS", tuple(versions))


def _cgroup_files(folder: Path, names: list[str], contents: tuple[str, ...] | None) -> None:
    for name, text in zip(names, contents or ()):
        if text is not None:
            (folder / name).write_text(text)


CPU = torch.device("cpu")


def test_cgroup_v2_limit_below_meminfo_is_used(tmp_path, monkeypatch):
    """A container limited to 2 GiB on a host with 20 GiB available: the container's room."""
    stat = "anon 1000\nfile 900\nactive_file 100\ninactive_file 268435456\nshmem 0\n"
    _files(tmp_path, monkeypatch, 20 * 2**20, v2=(f"{2 * GiB}\n", f"{GiB + GiB // 2}\n", stat))
    # usage 1.5 GiB of which 0.25 GiB inactive page cache (reclaimable): 0.75 GiB free
    assert _memory.available_bytes(CPU) == 2 * GiB - (GiB + GiB // 2 - GiB // 4)


def test_meminfo_below_the_cgroup_room_is_used(tmp_path, monkeypatch):
    _files(tmp_path, monkeypatch, 512 * 1024, v2=(f"{8 * GiB}\n", "1000\n", None))
    assert _memory.available_bytes(CPU) == 512 * 2**20


def test_cgroup_v2_without_limit_falls_back_to_meminfo(tmp_path, monkeypatch):
    _files(tmp_path, monkeypatch, 3 * 2**20, v2=("max\n", f"{GiB}\n", "inactive_file 0\n"))
    assert _memory.available_bytes(CPU) == 3 * GiB


def test_cgroup_v1_limit_is_used_and_its_no_limit_value_ignored(tmp_path, monkeypatch):
    stat = "cache 5\ninactive_file 7\ntotal_inactive_file 1048576\n"
    _files(tmp_path, monkeypatch, 20 * 2**20, v1=(f"{4 * GiB}\n", f"{3 * GiB}\n", stat))
    assert _memory.available_bytes(CPU) == GiB + 2**20
    tmp = tmp_path / "unlimited"
    tmp.mkdir()
    _files(tmp, monkeypatch, 20 * 2**20, v1=("9223372036854771712\n", f"{3 * GiB}\n", stat))
    assert _memory.available_bytes(CPU) == 20 * GiB


def test_cgroup_usage_above_the_limit_and_missing_files(tmp_path, monkeypatch):
    _files(tmp_path, monkeypatch, 20 * 2**20, v2=(f"{GiB}\n", f"{2 * GiB}\n", None))
    assert _memory.available_bytes(CPU) == 0
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    _files(nothing, monkeypatch, None)  # no meminfo, no cgroup files: unknown
    assert _memory.available_bytes(CPU) is None
    only = tmp_path / "only"
    only.mkdir()
    _files(only, monkeypatch, None, v2=(f"{GiB}\n", f"{GiB // 4}\n", None))
    assert _memory.available_bytes(CPU) == GiB - GiB // 4


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_limit_of_a_cgroup_above_the_process_is_used(tmp_path, monkeypatch, version):
    """A batch scheduler's job (SLURM: /job_7/step_0/task_0) limits memory at the job's cgroup,
    and the mount point itself has no limit: only the mount point was read, so a 2 GiB job on
    a 20 GiB host was given 20 GiB.  Every cgroup from the process's own up is read, and the
    smallest room counts; a path that does not exist under the mount (a container without a
    cgroup namespace) is skipped."""
    no_limit = ("max\n" if version == "v2" else "9223372036854771712\n", f"{5 * GiB}\n", None)
    own = "/job_7/step_0/task_0"
    _files(tmp_path, monkeypatch, 20 * 2**20, **{version: no_limit}, own=own)
    index = 0 if version == "v2" else 1
    mount, _, *names, _ = _memory.CGROUP_VERSIONS[index]
    task = Path(mount) / own[1:]
    step, job = task.parent, task.parent.parent
    for folder in (job, step, task):
        folder.mkdir(parents=True, exist_ok=True)
    _cgroup_files(job, names, (f"{2 * GiB}\n", f"{GiB}\n", None))
    _cgroup_files(step, names, (no_limit[0], f"{GiB}\n", None))
    _cgroup_files(task, names, (f"{4 * GiB}\n", f"{GiB}\n", None))
    assert _memory.available_bytes(CPU) == GiB  # the job's 2 GiB less its 1 GiB in use
    _cgroup_files(task, names, (f"{GiB + GiB // 2}\n", f"{GiB}\n", None))
    assert _memory.available_bytes(CPU) == GiB // 2  # the task's own limit is smaller
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _files(elsewhere, monkeypatch, 20 * 2**20, **{version: (f"{3 * GiB}\n", f"{GiB}\n", None)},
           own="/docker/0123abcd")  # not under the mount: the mount's own limit
    assert _memory.available_bytes(CPU) == 2 * GiB


def test_a_cgroup_limit_refuses_what_meminfo_would_allow(tmp_path, monkeypatch):
    """The refusal reads the cgroup: 20 GiB MemAvailable, but a 48 MiB container."""
    _files(tmp_path, monkeypatch, 20 * 2**20, v2=(f"{48 * 2**20}\n", "0\n", None))
    from alignment_callback.functional import gram_measures

    monkeypatch.setattr(gram_measures, "available_bytes", _memory.available_bytes)
    x, y = _pair(2048)  # 4 n×n float32 matrices: 64 MiB
    with pytest.raises(MemoryError, match=r"rbf_cka at n=2048 .* only 48\.0 MiB is available"):
        F.rbf_cka(x, y)
    monkeypatch.setattr(pr, "available_bytes", _memory.available_bytes)
    with pytest.raises(MemoryError, match="linear_predictivity at n=2048"):
        get_measure("linear_predictivity", ridge=1.0)(x, y)
    assert np.isfinite(float(F.linear_predictivity(x[:200], y[:200])))


def test_rv_coefficient_is_refused_before_its_grams(monkeypatch):
    from alignment_callback.functional import gram_measures
    from alignment_callback.functional import rv as rv_module

    def spy(*args, **kwargs):
        raise AssertionError("rv_state was called: an n×n gram was built")

    monkeypatch.setattr(gram_measures, "available_bytes", lambda device: 1024)
    monkeypatch.setattr(rv_module, "rv_state", spy)
    x = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(MemoryError, match=r"rv_coefficient at n=400 needs about"):
        rv_module.rv_coefficient(x, x)


# --------------------------------------------------------- a bound measure called directly
@pytest.mark.parametrize("name", ["linear_cka", "rbf_cka", "unbiased_cka", "rsa",
                                  "rv_coefficient"])
def test_bound_gram_measure_call_is_refused_before_its_grams(monkeypatch, name):
    """``get_measure(name)(x, y)`` (documented in docs/measures.md) builds each side's n×n
    state: with too little memory it refuses first, naming the measure and the estimate."""
    from alignment_callback.functional import gram_measures

    n = 300
    monkeypatch.setattr(gram_measures, "available_bytes", lambda device: 1024)
    measure = get_measure(name)

    def spy(*args, **kwargs):
        raise AssertionError("prepare was called: an n×n matrix was built")

    monkeypatch.setattr(type(measure), "prepare", spy)
    x, y = _pair(n)
    with pytest.raises(MemoryError, match=rf"{name} at n={n} needs about .*null='moments'"):
        measure(x, y)


@pytest.mark.parametrize("name", ["linear_cka", "rv_coefficient"])
def test_bound_linear_cka_call_takes_the_feature_route_at_large_n(monkeypatch, name):
    """From 4096 samples with features narrower than n, the bound measure computes like the
    function: from the features (no n×n matrix, nothing refused), the same value."""
    from alignment_callback.functional import gram_measures

    n = 4096
    x, y = _pair(n, dx=12, dy=5, seed=3)
    function_value = float(getattr(F, name)(x, y))  # rv_coefficient's function uses the grams
    monkeypatch.setattr(gram_measures, "available_bytes", lambda device: 1024)
    measure = get_measure(name)

    def spy(*args, **kwargs):
        raise AssertionError("prepare was called: an n×n gram was built")

    monkeypatch.setattr(type(measure), "prepare", spy)
    got = measure(x, y)
    assert got.dtype == torch.float32
    assert float(got) == function_value
    xd, yd = x.double().numpy(), y.double().numpy()
    xd, yd = xd - xd.mean(0), yd - yd.mean(0)
    expected = (np.linalg.norm(xd.T @ yd) ** 2
                / (np.linalg.norm(xd.T @ xd) * np.linalg.norm(yd.T @ yd)))
    assert float(got) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------ small requests read no memory
def test_small_requests_do_not_read_the_free_memory(monkeypatch):
    """Reading the free memory (``/proc``, cgroup files: about half a millisecond) cost more
    than the work at small n, where it ran several times per calibration; requests of at most
    ``_memory.SMALL_REQUEST`` bytes are never refused and do not read it.  Above it, every
    check reads it and refuses as before."""
    from alignment_callback.functional import gram_measures, pipeline

    reads: list[str] = []

    def counting(where: str):
        def read(device: torch.device) -> int:
            reads.append(where)
            return 0  # nothing free: every check that reads refuses
        return read

    for module, name in ((gram_measures, "available_bytes"), (pipeline, "_available_bytes"),
                         (pr, "available_bytes"), (shm, "available_bytes")):
        monkeypatch.setattr(module, name, counting(module.__name__.rsplit(".", 1)[1]))
    small = int(math.sqrt(_memory.SMALL_REQUEST / (8 * 8)))  # 8 float64 n×n fit in it
    x, y = _pair(small, dtype=torch.float64)
    for name in ("linear_cka", "rbf_cka", "unbiased_cka", "rsa", "rv_coefficient",
                 "bures_similarity", "linear_predictivity"):
        kw = {"bures_similarity": {"kernel": "rbf"},
              "linear_predictivity": {"ridge": 1.0}}.get(name, {})  # the CV grid: 40 n×n
        F.calibrated_alignment(x, y, get_measure(name, **kw), 19, seed=0)
        getattr(F, name)(x, y, **kw)
    F.calibrated_layer_alignment([x, x], [y, y], "rbf_cka", num_permutations=19, seed=0)
    assert reads == []
    big = 2 * int(math.sqrt(_memory.SMALL_REQUEST / 4))  # one float32 n×n is above it
    xb, yb = _pair(big)
    for name in ("linear_cka", "rbf_cka", "unbiased_cka", "rsa", "rv_coefficient"):
        with pytest.raises(MemoryError, match=rf"{name} at n={big}"):
            F.calibrated_alignment(xb, yb, name, 19, null="permutation")
    assert reads and set(reads) <= {"gram_measures", "pipeline"}, reads
