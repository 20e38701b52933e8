"""The offline command line (``python -m alignment_callback compare|matrix``) and feature I/O.

The CLI runs in subprocesses on files written here; its numbers are checked against the library
called directly with the same preprocessing (done here with ``prepare_features``, independently
of the CLI's reader).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment_callback.functional import (
    benjamini_hochberg,
    calibrated_alignment,
    calibrated_layer_alignment,
    prepare_features,
)
from alignment_callback.functional.registry import get_measure
from alignment_callback.reporting import cli, compute
from alignment_callback.reporting.io import FeatureFileError, load_features, load_groups

ROOT = Path(__file__).resolve().parents[1]
N = 60
K = 50
FAST = ["--permutations", str(K), "--k", "5"]


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny inputs; avoids oversubscribing shared CPUs
    return subprocess.run(
        [sys.executable, "-m", "alignment_callback", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )


def close(a, b) -> bool:
    return a == pytest.approx(b, rel=1e-6, abs=1e-7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """a.pt (dict of layers, one 3-D), b.npz (two arrays), c.pt (a tensor), d.npy (an array);
    a and b share a latent signal, c and d are noise."""
    root = tmp_path_factory.mktemp("features")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 6, generator=g)
    raw = {
        "a": {"block1": z @ torch.randn(6, 24, generator=g) + 0.5 * torch.randn(N, 24, generator=g),
              "block2": torch.randn(N, 4, 12, generator=g)},
        "b": {"h1": z @ torch.randn(6, 16, generator=g) + 0.5 * torch.randn(N, 16, generator=g),
              "h2": torch.randn(N, 10, generator=g)},
        "c": {"features": torch.randn(N, 12, generator=g)},
        "d": {"features": torch.randn(N, 8, generator=g)},
    }
    torch.save(raw["a"], root / "a.pt")
    np.savez(root / "b.npz", **{k: v.numpy() for k, v in raw["b"].items()})
    torch.save(raw["c"]["features"], root / "c.pt")
    np.save(root / "d.npy", raw["d"]["features"].numpy())
    (root / "dx").mkdir()
    (root / "dy").mkdir()
    for name, sub in (("a.pt", "dx"), ("c.pt", "dx"), ("b.npz", "dy"), ("d.npy", "dy")):
        shutil.copy(root / name, root / sub / name)
    return root, raw


def prepared(layers: dict, **opts) -> dict:
    return {k: prepare_features(v, pool=opts.get("pool", "mean"),
                                clamp_quantile=opts.get("clamp_quantile"),
                                normalize=opts.get("normalize", True)) for k, v in layers.items()}


def check_record(rec: dict, res) -> None:
    for name in ("raw", "threshold", "calibrated", "p_value", "null_mean", "null_std"):
        assert close(rec[name], float(getattr(res, name))), name
    assert rec["best_pair"] == list(res.best_pair)
    np.testing.assert_allclose(np.array(rec["matrix"]), res.matrix.double().numpy(),
                               rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------- compare
def test_compare_writes_table_json_csv_png_equal_to_library(data):
    root, raw = data
    out = root / "out_compare"
    proc = run_cli("compare", "a.pt", "b.npz", *FAST, "--out", out, cwd=root)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("measure"))
    assert header.split()[:5] == ["measure", "raw", "tau", "calibrated", "p"]
    for measure in cli.DEFAULT_MEASURES:
        assert any(line.startswith(measure) for line in proc.stdout.splitlines())
        assert (out / f"heatmap_{measure}.png").stat().st_size > 1000
    doc = json.loads((out / "alignment.json").read_text())
    assert doc["n_samples"] == N and set(doc["versions"]) >= {"torch", "alignment_callback"}
    assert doc["settings"]["permutations"] == K
    assert doc["inputs"]["a"]["layers"]["block2"] == [N, 12]  # (N, 4, 12) mean-pooled
    xa, xb = prepared(raw["a"]), prepared(raw["b"])
    for measure in cli.DEFAULT_MEASURES:
        kw = {} if measure == "linear_cka" else {"k": 5}
        res = calibrated_layer_alignment(xa, xb, measure, num_permutations=K, **kw)
        rec = doc["results"][measure]
        check_record(rec, res)
        assert len(rec["null"]) == K
    assert doc["results"]["linear_cka"]["best_pair"] == ["block1", "h1"]
    assert doc["results"]["linear_cka"]["p_value"] < 0.05
    rows = list(csv.DictReader(open(out / "alignment.csv")))
    assert [r["measure"] for r in rows] == list(cli.DEFAULT_MEASURES)
    assert close(float(rows[0]["calibrated"]), doc["results"]["linear_cka"]["calibrated"])


def test_compare_single_tensors_options_and_groups(data):
    """A tensor file against a .npy file is a 1x1 matrix; --no-normalize, --clamp-quantile and
    --groups reach the library."""
    root, raw = data
    out = root / "out_single"
    groups = np.repeat(np.arange(N // 3), 3)
    (root / "groups.txt").write_text("\n".join(f"g{v}" for v in groups) + "\n")
    proc = run_cli("compare", "c.pt", "d.npy", "--metric", "linear_cka,mutual_knn", *FAST,
                   "--no-normalize", "--clamp-quantile", "0.9", "--groups", "groups.txt",
                   "--out", out, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "features ~ features" in proc.stdout
    doc = json.loads((out / "alignment.json").read_text())
    opts = {"normalize": False, "clamp_quantile": 0.9}
    xc = prepared(raw["c"], **opts)["features"]
    xd = prepared(raw["d"], **opts)["features"]
    labels = [f"g{v}" for v in groups]
    for metric, kw in (("linear_cka", {}), ("mutual_knn", {"k": 5})):
        rec = doc["results"][metric]
        assert np.array(rec["matrix"]).shape == (1, 1)
        res = calibrated_alignment(xc, xd, metric, num_permutations=K, groups=labels, **kw)
        for name in ("raw", "threshold", "calibrated", "p_value"):
            assert close(rec[name], float(getattr(res, name))), (metric, name)


# --------------------------------------------------------------------------------- matrix
@pytest.fixture(scope="module")
def matrix_run(data):
    root, _ = data
    out = root / "out_matrix"
    proc = run_cli("matrix", "dx", "dy", "--metric", "linear_cka", "--metric", "mutual_knn",
                   *FAST, "--out", out, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_matrix_equals_library_pair_by_pair_with_bh(data, matrix_run):
    root, raw = data
    out, proc = matrix_run
    assert "4 to compute" in proc.stderr
    assert "warning: with K=50 permutations" in proc.stderr and "at least 2 pairs" in proc.stderr
    assert ">= 79" in proc.stderr
    doc = json.loads((out / "matrix.json").read_text())
    assert doc["x_models"] == ["a", "c"] and doc["y_models"] == ["b", "d"]
    for metric, kw in (("linear_cka", {}), ("mutual_knn", {"k": 5})):
        res = doc["results"][metric]
        p = torch.tensor(res["p_value"], dtype=torch.float64)
        for i, x in enumerate("ac"):
            for j, y in enumerate("bd"):
                lib = calibrated_layer_alignment(prepared(raw[x]), prepared(raw[y]), metric,
                                                 num_permutations=K, **kw)
                pair = next(q for q in doc["pairs"] if (q["x_model"], q["y_model"]) == (x, y))
                check_record(pair["results"][metric], lib)
                assert close(res["calibrated"][i][j], float(lib.calibrated))
                assert close(res["p_value"][i][j], float(lib.p_value))
        rejected, adjusted = benjamini_hochberg(p, alpha=0.05)
        np.testing.assert_allclose(np.array(res["p_bh"]), adjusted.numpy(), rtol=1e-12)
        assert res["significant_bh"] == (adjusted <= 0.05 * (1 + 16 * 2.0**-23)).tolist()
        assert res["significant_bh"] == rejected.tolist()  # no p_BH within float32's slack
        assert res["p_value"][0][0] == pytest.approx(1 / (K + 1))  # a ~ b share a signal
        # ... but it is the only small p, and over 4 pairs BH gives it q = 4 / 51 > 0.05
        assert res["p_bh"][0][0] == pytest.approx(4 / (K + 1))
        assert not any(map(any, res["significant_bh"]))
        assert (out / f"matrix_{metric}.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "matrix.csv")))
    assert len(rows) == 8
    assert {(r["x_model"], r["y_model"], r["measure"]) for r in rows} == {
        (x, y, m) for x in "ac" for y in "bd" for m in ("linear_cka", "mutual_knn")}
    assert "linear_cka (calibrated)" in proc.stdout and "significant after BH" in proc.stdout


def test_matrix_resume_recomputes_only_missing_pair(data, matrix_run):
    root, _ = data
    src, _ = matrix_run
    out = root / "out_resume"
    shutil.copytree(src, out)
    lines = (out / "pairs.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 4
    dropped = json.loads(lines[1])
    (out / "pairs.jsonl").write_text("".join(lines[:1] + lines[2:]))
    before = json.loads((src / "matrix.json").read_text())["results"]
    proc = run_cli("matrix", "dx", "dy", "--metric", "linear_cka", "--metric", "mutual_knn",
                   *FAST, "--out", out, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "3 already done" in proc.stderr and "1 to compute" in proc.stderr
    after_lines = (out / "pairs.jsonl").read_text().splitlines(keepends=True)
    assert after_lines[:3] == lines[:1] + lines[2:]  # untouched
    assert len(after_lines) == 4
    new = json.loads(after_lines[3])
    assert (new["x_model"], new["y_model"]) == (dropped["x_model"], dropped["y_model"])
    after = json.loads((out / "matrix.json").read_text())["results"]
    for metric in before:
        for key in ("raw", "calibrated", "p_value", "p_bh"):
            np.testing.assert_allclose(np.array(after[metric][key]), np.array(before[metric][key]),
                                       rtol=1e-6, atol=1e-7)
    # a different setting invalidates nothing on disk but recomputes (checked without running)
    args = cli.build_parser().parse_args(["matrix", "dx", "dy", *FAST, "--seed", "1"])
    settings = cli.run_settings(args, None)
    assert settings != json.loads(after_lines[0])["settings"]


def test_matrix_interrupt_keeps_finished_pairs(data, monkeypatch, capsys):
    root, _ = data
    out = root / "out_interrupt"
    calls = {"n": 0}
    real = compute.step_pair

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(compute, "step_pair", flaky)
    code = cli.main(["matrix", str(root / "dx"), str(root / "dy"), "--metric", "linear_cka",
                     *FAST, "--out", str(out)])
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 4 pairs done" in err and "Traceback" not in err
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 1
    # a line cut short by a crash is skipped and the next line starts fresh
    with open(out / "pairs.jsonl", "a") as f:
        f.write('{"x_model": "c", "y_mod')
    monkeypatch.setattr(compute, "step_pair", real)
    assert cli.main(["matrix", str(root / "dx"), str(root / "dy"), "--metric", "linear_cka",
                     *FAST, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 already done" in err and "3 to compute" in err
    assert len((out / "matrix.csv").read_text().splitlines()) == 5


# --------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def bad_files(data):
    root, _ = data
    x = torch.randn(N, 4)
    x[3, 1] = float("nan")
    torch.save({"good": torch.randn(N, 4), "broken": x}, root / "nan.pt")
    torch.save(torch.randn(1, 4), root / "one.pt")
    torch.save(torch.randn(N + 5, 4), root / "more.pt")
    (root / "dmix").mkdir()
    shutil.copy(root / "more.pt", root / "dmix" / "more.pt")
    (root / "feats.txt").write_text("1 2 3\n4 5 6\n")
    (root / "short_groups.txt").write_text("0\n0\n1\n1\n")
    return root


def test_bad_input_exit_2_one_line(bad_files):
    """End to end in a subprocess (the other cases in-process below, same code path)."""
    proc = run_cli("compare", "missing.pt", "a.pt", *FAST, "--out", bad_files / "out_err",
                   cwd=bad_files)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "missing.pt" in lines[0] and "no such file" in lines[0], lines


def test_in_process_errors_and_debug(bad_files, capsys):
    root = bad_files
    for argv, text in (
        (["compare", "feats.txt", "a.pt"], "unknown feature file extension '.txt'"),
        (["compare", "one.pt", "a.pt"], "layer 'features' has 1 row(s)"),
        (["compare", "a.pt", "more.pt"], f"has {N} rows but"),
        (["compare", "a.pt", "more.pt"], "row mismatch"),
        (["compare", "more.pt", "a.pt"], f"has {N + 5} rows but"),
        (["compare", "nan.pt", "a.pt"], "nan.pt: layer 'broken'"),
        (["compare", "nan.pt", "a.pt"], "NaN"),
        (["compare", "a.pt", "b.npz", "--metric", "nope"], "unknown metric"),
        (["compare", "a.pt", "b.npz", "--permutations", "0"], "--permutations"),
        (["matrix", "dx", "nowhere"], "no such directory"),
        (["matrix", "dx", "dmix"], f"has {N + 5} rows but"),
        (["compare", "a.pt", "b.npz", "--groups", "feats.txt"], "labels are distinct"),
        (["compare", "a.pt", "b.npz", "--groups", "short_groups.txt"], "group labels"),
    ):
        paths = [str(root / a) if a.endswith((".pt", ".npz", ".txt")) or
                 a in ("dx", "nowhere", "dmix") else a for a in argv[1:]]
        code = cli.main([argv[0], *paths, "--out", str(root / "out_inproc")])
        err = capsys.readouterr().err
        last = err.replace("\r", "\n").strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and text in last, (argv, err)
        assert "Traceback" not in err
        if argv[0] == "compare":
            assert len(err.strip().splitlines()) == 1
    # --debug prints the traceback and keeps the exit code of bad input
    assert cli.main(["compare", str(root / "nan.pt"), str(root / "a.pt"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "FeatureFileError" in err
    assert cli.main(["compare"]) == 2  # argparse usage error
    capsys.readouterr()


@pytest.mark.parametrize("command", ["compare", "matrix"])
def test_groups_that_allow_no_permutation_are_refused_naming_the_groups_file(data, command,
                                                                             capsys):
    """One group (or no two groups of one size) is an error in the --groups file, given before
    any feature file is read or --out created; it named a feature file and came mid-run."""
    root, _ = data
    for labels, why in (([0] * N, "every sample is in one group"),
                        ([0] * (N - 1) + [1], "no two groups have the same size")):
        np.save(root / "bad_groups.npy", np.asarray(labels))
        inputs = ["a.pt", "b.npz"] if command == "compare" else ["dx", "dx"]
        out = root / f"out_groups_{command}"
        code = cli.main([command, *[str(root / a) for a in inputs], "--groups",
                         str(root / "bad_groups.npy"), *FAST, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {root / 'bad_groups.npy'}: ") and why in err[0], err
        assert not out.exists()


def test_help_documents_saving_features(capsys):
    assert cli.main(["compare", "--help"]) == 0
    text = capsys.readouterr().out
    assert "collect_activations" in text and "torch.save" in text
    for option in ("--metric", "--groups", "--bootstrap", "--clamp-quantile", "--no-normalize"):
        assert option in text


# --------------------------------------------------------------------------------- io
def test_load_features_formats(tmp_path):
    t = torch.randn(5, 3)
    torch.save([t, 2 * t], tmp_path / "list.pth")
    assert list(load_features(tmp_path / "list.pth")) == ["0", "1"]
    np.save(tmp_path / "ints.npy", np.arange(10).reshape(5, 2))
    assert load_features(tmp_path / "ints.npy")["features"].dtype == torch.float32  # exact
    np.save(tmp_path / "big.npy", 10**8 + np.arange(10).reshape(5, 2))  # float32 rounds these
    big = load_features(tmp_path / "big.npy")["features"]
    assert big.dtype == torch.float64 and big[:, 0].tolist() == [10**8 + 2 * i for i in range(5)]
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    save_file({"x": t, "y": t[:, :2].contiguous()}, str(tmp_path / "f.safetensors"))
    loaded = load_features(tmp_path / "f.safetensors")
    assert set(loaded) == {"x", "y"} and torch.equal(loaded["x"], t)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(FeatureFileError, match="cannot read"):
        load_features(tmp_path / "junk.pt")
    torch.save({"a": torch.randn(5, 2), "b": torch.randn(4, 2)}, tmp_path / "rows.pt")
    with pytest.raises(FeatureFileError, match="different numbers of rows"):
        load_features(tmp_path / "rows.pt")
    np.save(tmp_path / "g.npy", np.array([0, 0, 1, 1]))
    assert load_groups(tmp_path / "g.npy", 4).tolist() == [0, 0, 1, 1]
    with pytest.raises(FeatureFileError, match="4 group labels"):
        load_groups(tmp_path / "g.npy", 5)


# --------------------------------------------------------------------------------- engine path
def test_matrix_mixed_dtypes_and_options_equal_library(tmp_path, capsys):
    """Each DIR_Y file is prepared once and every DIR_X file stepped against it: float64 and
    float32 files in any order, and options from --option, give the library's numbers."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(N, 5, generator=g)
    raw = {
        "a64": {"l": (z @ torch.randn(5, 9, generator=g)).double()},
        "b32": {"l": z @ torch.randn(5, 7, generator=g) + torch.randn(N, 7, generator=g)},
        "y32": {"m": z @ torch.randn(5, 6, generator=g), "n": torch.randn(N, 4, generator=g)},
        "y64": {"m": torch.randn(N, 8, generator=g, dtype=torch.float64)},
    }
    for sub, names in (("dx", ("a64", "b32")), ("dy", ("y32", "y64"))):
        (tmp_path / sub).mkdir()
        for name in names:
            torch.save(raw[name], tmp_path / sub / f"{name}.pt")
    measures = {"linear_cka": {}, "mutual_knn": {"k": 4}, "shape_metric": {"alpha": 0.5}}
    assert cli.main(["matrix", str(tmp_path / "dx"), str(tmp_path / "dy"), "--measure",
                     ",".join(measures), "--k", "4", "--option", "alpha=0.5",
                     "--permutations", str(K), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "out" / "matrix.json").read_text())
    assert doc["settings"]["measures"] == {"linear_cka": {}, "mutual_knn": {"k": 4},
                                           "shape_metric": {"alpha": 0.5}}
    for pair in doc["pairs"]:
        xs, ys = prepared(raw[pair["x_model"]]), prepared(raw[pair["y_model"]])
        for metric, kw in measures.items():
            # a Measure object: shape_metric's alpha would be taken as the calibration level
            lib = calibrated_layer_alignment(xs, ys, get_measure(metric, **kw),
                                             num_permutations=K)
            check_record(pair["results"][metric], lib)
            assert pair["results"][metric]["kwargs"] == kw
    report = (tmp_path / "out" / "report.md").read_text()
    assert "shape_metric (alpha=0.5)" in report and "| a64 | y32 | linear_cka |" in report
    # the report's table holds the numbers of matrix.json
    table = {tuple(c.strip() for c in line.strip("|").split("|")[:3]):
             [c.strip() for c in line.strip("|").split("|")[3:]]
             for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    for i, x in enumerate(doc["x_models"]):
        for j, y in enumerate(doc["y_models"]):
            for metric, res in doc["results"].items():
                raw, tau, cal, p, q = table[(x, y, metric)][:5]
                assert raw == f"{res['raw'][i][j]:.4f}" and tau == f"{res['threshold'][i][j]:.4f}"
                assert cal == f"{res['calibrated'][i][j]:.4f}"
                assert p == f"{res['p_value'][i][j]:.4g}" and q == f"{res['p_bh'][i][j]:.4g}"
    assert (tmp_path / "out" / "report.html").read_text().count("<img ") == len(measures)


def test_compare_measure_aliases_and_deprecated_metric(data, capsys):
    root, raw = data
    code = cli.main(["compare", str(root / "a.pt"), str(root / "b.npz"), "--metric", "nbs",
                     "--measure", "bures_similarity", "--permutations", str(K),
                     "--out", str(root / "out_alias")])
    err = capsys.readouterr().err
    assert code == 0 and "--metric is deprecated; use --measure" in err
    doc = json.loads((root / "out_alias" / "alignment.json").read_text())
    assert list(doc["results"]) == ["bures_similarity"]  # the alias and the name: one measure
    lib = calibrated_layer_alignment(prepared(raw["a"]), prepared(raw["b"]), "bures_similarity",
                                     num_permutations=K)
    check_record(doc["results"]["bures_similarity"], lib)


def test_k_or_sigma_no_chosen_measure_takes_is_noted(data, capsys):
    """--k and --sigma apply to the measures that declare them and are ignored by the others;
    ignored by every chosen measure, they were ignored silently (--option k=5 is an error)."""
    root, _ = data
    args = ["compare", str(root / "c.pt"), str(root / "d.npy"), "--permutations", "19"]
    assert cli.main([*args, "--measure", "linear_cka", "--k", "5", "--sigma", "2",
                     "--out", str(root / "out_note")]) == 0
    err = capsys.readouterr().err
    assert ("note: --k 5 and --sigma 2.0 ignored: none of the chosen measures (linear_cka) has "
            "that parameter") in err
    assert cli.main([*args, "--measure", "linear_cka,mutual_knn", "--k", "5",
                     "--out", str(root / "out_note2")]) == 0
    assert "ignored" not in capsys.readouterr().err  # mutual_knn takes k


def test_compare_with_the_analytic_null(data):
    """--null moments: the exact permutation moments of a single pair, recorded as such."""
    root, raw = data
    out = root / "out_moments"
    proc = run_cli("compare", "c.pt", "d.npy", "--measure", "linear_cka,unbiased_cka",
                   "--null", "moments", "--out", out, cwd=root)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "alignment.json").read_text())
    assert doc["settings"]["null"] == "moments"
    for metric in ("linear_cka", "unbiased_cka"):
        rec = doc["results"][metric]
        res = calibrated_layer_alignment(prepared(raw["c"]), prepared(raw["d"]), metric,
                                         null="moments")
        assert rec["null_method"] == "moments" and res.null_method == "moments"
        check_record(rec, res)
    # the printed settings name the null (no "K=500 permutations"), the table each measure's
    assert "null: exact permutation moments + Pearson III, alpha=0.05" in proc.stdout
    assert "permutations" not in proc.stdout.splitlines()[1]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("measure"))
    assert header.split()[-1] == "null"
    assert all(line.split()[-1] == "moments" for line in proc.stdout.splitlines()
               if line.startswith(("linear_cka", "unbiased_cka")))
    proc = run_cli("compare", "a.pt", "b.npz", "--measure", "linear_cka", "--null", "moments",
                   "--out", out, cwd=root)
    assert proc.returncode == 2 and "joint permutation null" in proc.stderr
