"""The command line's Benjamini–Hochberg family and its self-describing outputs: ``matrix
DIR DIR`` leaves a file against itself (p = 1/(K + 1) by construction, a sure discovery that
loosened the threshold of the other pairs) out of BH, and under independence the matrix's BH
decisions make a false discovery in at most α + 3σ of the runs, on continuous and tied data;
too few permutations for a single test
are said in those words (they asked for more significant pairs than the matrix has); the CSV
files record the seed, the measure's options, n, K and α.

The command line runs in process (``cli.main``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine.report import matrix_report
from alignment_callback.functional import benjamini_hochberg
from alignment_callback.reporting import cli
from alignment_callback.reporting.compute import matrix_summary
from alignment_callback.reporting.plan import MatrixPlan
from tests.test_ties import band, tied
from tests.test_ties_global import no_zero_rows

N, K = 60, 99


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """models/: a and b share a signal, u is independent noise."""
    root = tmp_path_factory.mktemp("bh_family")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 4, generator=g)
    (root / "models").mkdir()
    torch.save({"h": z @ torch.randn(4, 8, generator=g) + 0.3 * torch.randn(N, 8, generator=g)},
               root / "models" / "a.pt")
    torch.save({"h": z @ torch.randn(4, 6, generator=g) + 0.3 * torch.randn(N, 6, generator=g)},
               root / "models" / "b.pt")
    torch.save({"h": torch.randn(N, 5, generator=g)}, root / "models" / "u.pt")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_folder_against_itself_leaves_the_diagonal_out_of_bh(models, capsys) -> None:
    out = models / "out_self"
    code, stdout, err = run(capsys, "matrix", models / "models", models / "models", "--measure",
                            "linear_cka", "--permutations", K, "--out", out)
    assert code == 0, err
    doc = json.loads((out / "matrix.json").read_text())
    res = doc["results"]["linear_cka"]
    p = np.array(res["p_value"])
    off = ~np.eye(3, dtype=bool)
    assert np.allclose(np.diag(p), 1 / (K + 1))  # a model against itself
    _, expected = benjamini_hochberg(torch.tensor(p[off], dtype=torch.float64), alpha=0.05)
    q = np.array([[np.nan if v is None else v for v in row] for row in res["p_bh"]])
    np.testing.assert_allclose(q[off], expected.numpy(), rtol=1e-12)
    assert all(res["p_bh"][i][i] is None and res["significant_bh"][i][i] is None
               for i in range(3))
    assert doc["fdr"]["pairs"] == 6
    found = sum(bool(res["significant_bh"][i][j]) for i in range(3) for j in range(3))
    assert f"{found} of 6 pairs significant after BH" in stdout
    assert "across 6 pairs" in stdout and "itself (3 pair(s))" in stdout
    rows = read_csv(out / "matrix.csv")
    diagonal = [r for r in rows if r["x_model"] == r["y_model"]]
    assert len(diagonal) == 3 and all(r["p_bh"] == r["significant_bh"] == "" for r in diagonal)
    report = (out / "report.md").read_text()
    assert "| a | a | linear_cka |" in report and report.count("| self |") == 3
    assert "not tested" in report and f"{found} of 6 pairs" in report.replace(
        "all 6 pairs", "6 of 6 pairs").replace("none of the 6 pairs", "0 of 6 pairs")


def test_two_folders_with_the_same_names_are_different_files(models, capsys) -> None:
    """Files of the same stem in two folders are two models (two checkpoints): tested."""
    other = models / "copy"
    other.mkdir()
    for name in ("a.pt", "b.pt"):
        (other / name).write_bytes((models / "models" / name).read_bytes())
    code, stdout, err = run(capsys, "matrix", models / "models", other, "--measure",
                            "linear_cka", "--permutations", K, "--out", models / "out_two")
    assert code == 0, err
    doc = json.loads((models / "out_two" / "matrix.json").read_text())
    assert doc["fdr"]["pairs"] == 6 and "across 6 pairs" in stdout and "itself" not in stdout
    assert all(v is not None for row in doc["results"]["linear_cka"]["p_bh"] for v in row)


def test_too_few_permutations_for_one_test_are_said_so(models, capsys) -> None:
    """K = 9 over 6 pairs: the warning asked for "at least 12 pairs" of 6 to reach the
    smallest p; the trouble is that no p-value reaches alpha at all."""
    code, _, err = run(capsys, "matrix", models / "models", models / "models", "--measure",
                       "linear_cka", "--permutations", 9, "--out", models / "out_k9")
    assert code == 0, err
    line = next(ln for ln in err.splitlines() if ln.startswith("warning: with K=9"))
    assert "no p-value can reach alpha=0.05" in line and "every calibrated score is 0" in line
    assert "pairs reach" not in line and ">= 119" in line


def test_the_csv_files_record_the_settings_that_change_the_numbers(models, capsys) -> None:
    a, b = models / "models" / "a.pt", models / "models" / "b.pt"
    code, _, err = run(capsys, "compare", a, b, "--measure", "mutual_knn", "--k", 3, "--seed",
                       5, "--permutations", K, "--out", models / "out_csv")
    assert code == 0, err
    (row,) = read_csv(models / "out_csv" / "alignment.csv")
    assert (row["seed"], row["options"], row["num_permutations"]) == ("5", "k=3", str(K))
    code, _, err = run(capsys, "matrix", models / "models", models / "models", "--measure",
                       "mutual_knn", "--k", 3, "--seed", 5, "--permutations", K, "--alpha",
                       0.1, "--out", models / "out_csv_matrix")
    assert code == 0, err
    rows = read_csv(models / "out_csv_matrix" / "matrix.csv")
    assert len(rows) == 9
    assert {(r["seed"], r["options"], r["n_samples"], r["num_permutations"], r["alpha"])
            for r in rows} == {("5", "k=3", str(N), str(K), "0.1")}


def test_matrix_report_leaves_self_rows_out_of_bh_and_of_the_sentence() -> None:
    rows = [{"x": "a", "y": "a", "measure": "m", "raw": 1.0, "threshold": 0.3,
             "calibrated": 1.0, "p_value": 0.01, "self": True},
            {"x": "a", "y": "b", "measure": "m", "raw": 0.5, "threshold": 0.3,
             "calibrated": 0.29, "p_value": 0.04},
            {"x": "b", "y": "a", "measure": "m", "raw": 0.2, "threshold": 0.3,
             "calibrated": 0.0, "p_value": 0.5}]
    md = matrix_report({"n": 100, "alpha": 0.05}, rows).to_markdown()
    # BH over the two tested pairs: q = (0.08, 0.5); with the self row, 0.04 · 3/2 = 0.06
    assert "| a | b | m | 0.5000 | 0.3000 | 0.2900 | 0.04 | 0.08 | no |" in md
    assert "| a | a | m | 1.0000 | 0.3000 | 1.0000 | 0.01 | n/a | self |" in md
    assert "none of the 2 pairs is aligned above chance" in md
    assert "raw scores reach 0.50" in md  # not the self row's 1.00


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["continuous", "binary"])
def test_a_folder_against_itself_makes_a_false_discovery_in_at_most_alpha_of_runs(kind):
    """Three independent models against themselves, K = 119 (over the 6 tested pairs a lone
    pair at p = 1/120 is significant): the chance of any significant pair of two different
    models is at most α + 3σ (with the diagonal in the BH family it was above α)."""
    draws, models, n, k = 300, 3, 30, 119
    keys = [f"/models/m{i}.pt" for i in range(models)]
    measures = {"linear_cka": F.get_measure("linear_cka")}
    runs_with_a_discovery = 0
    for r in range(draws):
        g = torch.Generator().manual_seed(70_000 + r)
        feats = [F.prepare_features(torch.randn(n, 4, generator=g, dtype=torch.float64)
                                    if kind == "continuous" else no_zero_rows(tied(kind, n, g)))
                 for _ in keys]
        done = {}
        for i, x in enumerate(feats):
            for j, y in enumerate(feats):
                res = F.calibrated_alignment(x, y, "linear_cka", num_permutations=k, seed=r)
                done[(keys[i], keys[j])] = {"linear_cka": {
                    "raw": float(res.raw), "threshold": float(res.threshold),
                    "calibrated": float(res.calibrated), "p_value": float(res.p_value),
                    "effect_size": 0.0, "best_pair": ["h", "h"], "bootstrap": None}}
        plan = MatrixPlan(files_x=[Path(key) for key in keys], files_y=[Path(key) for key in keys],
                          names_x=keys, names_y=keys, key_x=keys, key_y=keys, fingerprints={},
                          measures=measures, settings={}, done=done)
        decided = matrix_summary(plan, 0.05)["linear_cka"]["significant_bh"]
        runs_with_a_discovery += any(decided[i][j] for i in range(models)
                                     for j in range(models) if i != j)
    assert runs_with_a_discovery / draws <= band(draws), runs_with_a_discovery / draws
