"""AlignmentCallback under DDP on 2 CPU processes (gloo): no hang, rank 0 computes what one
process computes for the same weights, every rank gets the same history and monitor values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import _ddp_callback_worker as W
from tests._spawn import PORTS
from tests.helpers import (
    LAYERS,
    MLP,
    RefMLP,
    alignment_rows,
    make_probe,
    offline_alignment,
)

# tests that open local ports take turns across pytest workers (tests/conftest.py)
pytestmark = [pytest.mark.slow, PORTS]
REPO = Path(__file__).resolve().parents[1]

# Every scenario of a strategy runs in one launch of the worker (an interpreter start-up and a
# Lightning import per process, once): the tests below read their scenario's files.
SCENARIOS = {
    "ddp": ["ok", "batchnorm", "rank_reference", "resume_probe", "fail_rank1",
            "fail_moments_rank1", "fail_probe_rank1", "fail_reference_rank1",
            "fail_layer_count_rank1", "fail_reference_pass_rank1", "config_error",
            "fail_named_rank1", "fail_logger_rank0", "previous_heatmap_rank0"],
    "ddp_spawn": ["ok"],  # every fit spawns two fresh interpreters: one fit only
}
TIMEOUT_S = 60 + 40 * max(map(len, SCENARIOS.values()))


def _launch(out: Path, strategy: str) -> None:
    """Runs the worker on every scenario of ``strategy``; a hang, a crash or a scenario left
    without its files fails with the log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    modes = SCENARIOS[strategy]
    cmd = [sys.executable, "-m", "tests._ddp_callback_worker", str(out), strategy, ",".join(modes)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and the ranks it started
        log, _ = proc.communicate()
        started = [m for m in modes if (out / m / "started").exists()]
        pytest.fail(f"the {strategy} scenarios did not finish within {TIMEOUT_S} s (hang? the "
                    f"last one started: {started[-1:]})\n{log[-3000:]}")
    assert proc.returncode == 0, log[-5000:]
    missing = [(m, r) for m in modes for r in range(2) if not (out / m / f"rank{r}.json").exists()]
    assert not missing, f"scenarios without a rank's file: {missing}\n{log[-5000:]}"


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Callable[[str, str], Path]:
    """``launched(strategy, mode)``: the folder of that scenario's files, from one launch per
    strategy in this pytest run, shared by every pytest worker (run under the port lock this
    module holds; a failed launch is reported again to every test that needs it)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "callback_ddp"

    def get(strategy: str, mode: str) -> Path:
        out = root / strategy
        failure = out / "launch_failed.txt"
        if not (out / "done").exists() and not failure.exists():
            out.mkdir(parents=True, exist_ok=True)
            try:
                _launch(out, strategy)
            except BaseException as e:  # pytest.fail's Failed, an AssertionError
                failure.write_text(str(e))
                raise
            (out / "done").touch()
        if failure.exists():
            pytest.fail(failure.read_text(), pytrace=False)
        return out / mode

    return get


def _ranks(out: Path) -> list[dict]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert "error" not in r, f"{out.name}: rank {r['rank']} failed: {r['error']}"
    return ranks


def _errors(out: Path) -> list[str]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all("error" in r for r in ranks), f"{out.name}: a rank did not fail"
    return [r["error"] for r in ranks]


@pytest.mark.parametrize("strategy", [
    "ddp",  # the worker script is re-launched for rank 1 (2 interpreters in all)
    "ddp_spawn",  # the ranks are spawned from the worker (3 interpreters)
])
def test_ddp_two_cpu_processes(launched, strategy):
    out = launched(strategy, "ok")
    ranks = _ranks(out)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)

    # lr=0: the weights are the initial ones on both ranks, so every alignment step equals the
    # single-process computation on a fresh model
    model, reference = MLP(lr=0.0), RefMLP(seed=1)
    init = {k: v.tolist() for k, v in model.state_dict().items()}
    assert ranks[0]["params"] == init
    expected = {name: offline_alignment(model, reference, make_probe(), LAYERS, name, W.K)
                for name in W.METRICS}

    hist0, hist1 = ranks[0]["history"], ranks[1]["history"]
    assert [h["epoch"] for h in hist0] == list(range(W.MAX_EPOCHS + 1))
    assert hist1 == hist0  # broadcast from rank 0
    for h in hist0:
        for name, res in expected.items():
            for field in ("raw", "calibrated", "p_value", "threshold"):
                assert h[f"alignment/{name}/{field}"] == pytest.approx(
                    float(getattr(res, field)), rel=1e-5, abs=1e-6), (h["epoch"], name, field)
    for r in ranks:  # ModelCheckpoint / EarlyStopping see the same value on every rank
        for name, res in expected.items():
            key = f"alignment/{name}/calibrated"
            assert r["callback_metrics"][key] == pytest.approx(float(res.calibrated),
                                                               rel=1e-5, abs=1e-6)

    (csv_file,) = list(out.glob("csv/version_*/metrics.csv"))  # rank 0 only
    rows = alignment_rows(csv_file)
    assert [float(r["alignment/epoch"]) for r in rows] == [0.0, 1.0, 2.0]
    steps = [int(r["step"]) for r in rows]
    assert len(set(steps)) == len(steps)
    pngs = list(out.glob("csv/version_*/alignment_heatmaps/*.png"))
    assert len(pngs) == len(W.METRICS) * (W.MAX_EPOCHS + 1)  # one raw|calibrated image each


def test_ddp_replicas_with_different_batchnorm_statistics_score_rank_zeros_model(launched):
    """BatchNorm running statistics differ between the replicas after an epoch (each rank's own
    batches): every share of the null must still score rank 0's model, the one it logs, so the
    logged step equals rank 0's single-process step on the same permutations."""
    out = launched("ddp", "batchnorm")
    ranks = _ranks(out)
    local = [json.loads((out / f"local{r}.json").read_text()) for r in range(2)]
    assert local[0]["running_mean"] != local[1]["running_mean"]  # the replicas differ
    assert local[0]["local"]["raw"] != local[1]["local"]["raw"]
    logged = ranks[0]["history"][-1]
    assert ranks[1]["history"][-1] == logged
    for field, value in local[0]["local"].items():
        assert logged[f"alignment/linear_cka/{field}"] == pytest.approx(value, rel=1e-6), field


@pytest.mark.parametrize("mode,expected", [
    ("fail_rank1", ("ValueError: on rank 1: model layer", "NaN")),
    ("fail_moments_rank1", ("ValueError: on rank 1: model layer", "NaN")),
    ("fail_probe_rank1", ("RuntimeError: on rank 1: the model failed on probe batch 0",
                          "rank 1's probe pass broke")),
    ("fail_reference_rank1", ("RuntimeError: on rank 1: rank 1's reference broke",)),
    ("fail_layer_count_rank1", ("LayerCountError: on rank 1", "did not run exactly once")),
], ids=["permutation_null", "analytic_null", "probe_pass", "setting_the_reference",
        "layer_count_under_on_error_warn"])
def test_ddp_failure_on_one_rank_is_the_same_error_on_every_rank(launched, mode, expected):
    """Rank 1 fails, in its share of the permutation null (NaN activations), in the analytic
    null (no null to gather: the healthy rank must still meet it), in its probe pass (before
    any null), or while setting its reference (before its step): both ranks end with the same
    error, none waits for the other in a collective.  With ``on_error="raise"`` it is the
    failed process's error, of its type, as one process raises it (it was a RuntimeError
    "alignment step ... failed: RuntimeError: the alignment step failed on rank 1: ValueError:
    ...")."""
    errors = _errors(launched("ddp", mode))
    assert errors[0] == errors[1], errors
    assert errors[0].startswith(expected[0]) and all(part in errors[0] for part in expected), \
        errors[0]


def test_ddp_every_rank_uses_rank_zeros_reference_and_probe(launched):
    """Rank 1 holds another reference model and another probe (an unseeded random reference or
    probe under ``strategy="ddp"``, which launches the script again per process): the model's
    activations come from rank 0 at every step, and so must the reference's, or the shares of
    the null mix two references; the logged values equal one process's with rank 0's."""
    ranks = _ranks(launched("ddp", "rank_reference"))
    model, reference = MLP(lr=0.0), RefMLP(seed=1)
    expected = {name: offline_alignment(model, reference, make_probe(), LAYERS, name, W.K)
                for name in W.METRICS}
    hist0 = ranks[0]["history"]
    assert ranks[1]["history"] == hist0 and len(hist0) == W.MAX_EPOCHS + 1
    for h in hist0:
        for name, res in expected.items():
            for field in ("raw", "calibrated", "p_value", "threshold", "null_std"):
                assert h[f"alignment/{name}/{field}"] == pytest.approx(
                    float(getattr(res, field)), rel=1e-5, abs=1e-6), (h["epoch"], name, field)


def test_ddp_resume_with_other_probe_inputs_starts_new_curves_on_every_rank(launched):
    """A resumed DDP run whose probe has the same rows and other values: the probe's hash was
    compared in single-process runs only, so the curves went on, mixing two probes.  Every
    process now compares rank 0's probe (sent from rank 0 at setup) and starts new curves
    alike: after the resume the history holds the new probe's values only."""
    ranks = _ranks(launched("ddp", "resume_probe"))
    model, reference = MLP(lr=0.0), RefMLP(seed=1)
    expected = {name: offline_alignment(model, reference, make_probe(seed=999), LAYERS, name,
                                        W.K) for name in W.METRICS}
    hist = ranks[0]["history"]
    assert ranks[1]["history"] == hist and ranks[0]["restarted"] == ranks[1]["restarted"]
    assert ranks[0]["restarted"] == [f"alignment/{name}/" for name in sorted(W.METRICS)]
    assert hist and all(h["epoch"] >= 1 for h in hist), [h["epoch"] for h in hist]
    for h in hist:
        for name, res in expected.items():
            assert h[f"alignment/{name}/raw"] == pytest.approx(float(res.raw), rel=1e-5), h


def test_ddp_a_reference_pass_failing_on_one_rank_fails_every_rank(launched):
    """The reference model's probe pass at the start of fit raises on rank 1 only: every rank
    raises the same error, naming the rank, instead of rank 0 waiting in the first step's
    collective for a process that is gone."""
    errors = _errors(launched("ddp", "fail_reference_pass_rank1"))
    assert errors[0] == errors[1], errors
    assert "on rank 1" in errors[0] and "rank 1's reference pass broke" in errors[0], errors[0]


def test_ddp_a_configuration_error_in_a_step_is_raised_on_every_rank(launched):
    """svcca's cca_dim above the frozen reference's widths, on_error="warn": one process raises
    FrozenReferenceError at the baseline, before training; under DDP the gathered failure was a
    RuntimeError, so every step was skipped with a warning and training went on."""
    errors = _errors(launched("ddp", "config_error"))
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("FrozenReferenceError: on rank 0: "), errors
    assert errors[0].count("FrozenReferenceError") == 1, errors  # its type named once
    assert "cca_dim=20 is too large" in errors[0], errors[0]


def test_ddp_a_skipped_steps_reason_names_the_reference_that_failed(launched):
    """One of several references fails on rank 1 (NaN activations), on_error="warn": the
    reason (warned, kept in ``skipped`` and the report) named the rank and the error but not
    the reference, as one process's does."""
    ranks = _ranks(launched("ddp", "fail_named_rank1"))
    assert ranks[0]["skipped"] == ranks[1]["skipped"] and ranks[0]["skipped"], ranks
    for skipped in ranks[0]["skipped"]:
        assert skipped["reason"].startswith("reference 'm': RuntimeError: the alignment step "
                                            "failed on rank 1: "), skipped


def test_ddp_a_logger_failing_on_rank_zero_is_raised_on_every_rank(launched):
    """Rank 0's logger raises (a full disk) with on_error="warn": a single process raises it
    (on_error covers the data's failures only), but under DDP the step was skipped with a
    warning and training went on.  Every rank now raises it, of its type."""
    errors = _errors(launched("ddp", "fail_logger_rank0"))
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("OSError: on rank 0: disk full (simulated)"), errors


def test_ddp_a_step_whose_heatmap_fails_is_no_ones_previous_step(launched, tmp_path):
    """Rank 0's heatmap of a step fails (the step is skipped): under DDP "previous" had taken
    that step's activations already, so the next step compared with it, where one process
    compares with the step before.  The values now equal one process's."""
    ranks = _ranks(launched("ddp", "previous_heatmap_rank0"))
    single = W.previous_callback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W.fit_previous(single, 1, None, str(tmp_path))
    assert [s["epoch"] for s in single.skipped] == [2]
    for rank in ranks:
        assert [s["epoch"] for s in rank["skipped"]] == [2], rank["skipped"]
        assert [h["epoch"] for h in rank["history"]] == [h["epoch"] for h in single.history]
        for got, want in zip(rank["history"], single.history, strict=True):
            for key, value in want.items():
                if key.endswith(("/raw", "/calibrated", "/p_value", "/threshold")):
                    assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert any("/raw" in key for key in single.history[-1])  # the last step has values
