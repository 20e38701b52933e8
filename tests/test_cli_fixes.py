"""Fixes of the command line's checks and messages (audit 10): ``--dist-timeout`` out of range,
``--null moments`` where it cannot apply, ``--seed`` with ``--bootstrap``, a layer named once in
layer errors, ``--sigma inf``, ``--bootstrap 1`` (and ``num_bootstrap`` < 2 in the library, a
warning below 40) and ``--aggregate top<m>`` with m above the number of layer pairs.

The command line runs in process (``cli.main``); numbers are checked against float64 NumPy.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment_callback.functional.bootstrap import bootstrap_interval
from alignment_callback.functional.kernels import rbf_gram
from alignment_callback.reporting import cli

N = 40
FAST = ["--permutations", "19"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """two.pt / other.pt: two layers each; one.pt / one_b.pt: one layer; wide.pt: a layer of
    rank n - 1 (CCA refuses it); listed.pt: layers '0' (fine) and '1' (rank n - 1)."""
    root = tmp_path_factory.mktemp("cli_fixes")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 4, generator=g)

    def noisy(d: int) -> torch.Tensor:
        return z @ torch.randn(4, d, generator=g) + 0.5 * torch.randn(N, d, generator=g)

    torch.save({"h1": noisy(8), "h2": noisy(6)}, root / "two.pt")
    torch.save({"g1": noisy(7), "g2": noisy(5)}, root / "other.pt")
    torch.save({"only": noisy(6)}, root / "one.pt")
    torch.save({"only": noisy(5)}, root / "one_b.pt")
    torch.save({"wide": torch.randn(N, 3 * N, generator=g)}, root / "wide.pt")
    torch.save([noisy(6), torch.randn(N, 3 * N, generator=g)], root / "listed.pt")
    (root / "groups.txt").write_text("\n".join(str(i // 2) for i in range(N)) + "\n")
    for sub, names in (("dx", ("two.pt", "one.pt")), ("dy", ("other.pt",)),
                       ("sx", ("one.pt",)), ("sy", ("one_b.pt",)),
                       ("mixed", ("one_b.pt", "two.pt"))):
        (root / sub).mkdir()
        for name in names:
            shutil.copy(root / name, root / sub / name)
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------- 1. --dist-timeout
@pytest.mark.parametrize("value, text", [
    ("-5", "error: --dist-timeout must be > 0, got -5.0"),
    ("0", "error: --dist-timeout must be > 0, got 0.0"),
    ("nan", "error: --dist-timeout must be > 0, got nan"),
    ("inf", "error: --dist-timeout must be at most 1000000000 seconds"),
    ("1e300", "error: --dist-timeout must be at most 1000000000 seconds"),
])
def test_dist_timeout_out_of_range_is_refused(files, capsys, value, text) -> None:
    code, _, err = run(capsys, "matrix", files / "sx", files / "sy", "--measure", "linear_cka",
                       *FAST, "--dist-timeout", value, "--out", files / "o_timeout")
    assert code == 2
    assert error_line(err).startswith(text)
    assert not (files / "o_timeout").exists()  # refused before anything is planned


# --------------------------------------------------------------------------- 2. --null moments
def test_moments_without_analytic_null_fails_before_reading_files(files, capsys) -> None:
    code, _, err = run(capsys, "compare", files / "missing_a.pt", files / "missing_b.pt",
                       "--null", "moments", "--measure", "linear_cka,mutual_knn")
    line = error_line(err)
    assert code == 2
    assert line.startswith("error: --null moments cannot calibrate --measure mutual_knn: ")
    assert "--null permutation" in line and "--null auto" in line
    assert "null='" not in line and "missing_a.pt" not in line


def test_moments_with_groups_fails_before_reading_files(files, capsys) -> None:
    code, _, err = run(capsys, "compare", files / "missing_a.pt", files / "missing_b.pt",
                       "--null", "moments", "--measure", "linear_cka", "--groups",
                       files / "groups.txt")
    assert code == 2
    assert error_line(err).startswith("error: --null moments cannot be used with --groups")


def test_moments_over_several_layer_pairs_names_cli_options(files, capsys) -> None:
    code, _, err = run(capsys, "compare", files / "two.pt", files / "one.pt", "--null", "moments",
                       "--measure", "linear_cka", "--out", files / "o_mom")
    line = error_line(err)
    assert code == 2
    assert line.startswith(f"error: --null moments calibrates one layer pair, but "
                           f"{files / 'two.pt'} has 2 layers")
    assert "--null permutation" in line and "null='" not in line


def test_matrix_moments_fails_before_the_progress_bar(files, capsys) -> None:
    out = files / "o_mom_matrix"
    code, _, err = run(capsys, "matrix", files / "dx", files / "dy", "--null", "moments",
                       "--measure", "linear_cka", "--out", out)
    line = error_line(err)
    assert code == 2
    assert "--null moments calibrates one layer pair" in line and "null='" not in line
    assert "pairs:" not in err and "[0/" not in err  # no progress bar was started
    assert not (out / "pairs.jsonl").exists() or (out / "pairs.jsonl").read_text() == ""


def test_matrix_moments_on_a_later_file_of_several_layers(files, capsys) -> None:
    # first pair one.pt ~ one_b.pt is fine; two.pt comes later (only in the loop)
    code, _, err = run(capsys, "matrix", files / "mixed", files / "sy", "--null", "moments",
                       "--measure", "linear_cka", "--out", files / "o_mom_later")
    assert code == 2
    line = error_line(err)
    assert "--null moments calibrates one layer pair" in line and "two.pt has 2 layers" in line


def test_matrix_moments_on_single_layer_files_runs(files, capsys) -> None:
    out = files / "o_mom_ok"
    code, _, err = run(capsys, "matrix", files / "sx", files / "sy", "--null", "moments",
                       "--measure", "linear_cka", "--out", out)
    assert code == 0, err
    doc = json.loads((out / "matrix.json").read_text())
    assert "moments" in json.dumps(doc)


def test_seed_near_the_maximum_with_bootstrap_fails_up_front(files, capsys) -> None:
    code, _, err = run(capsys, "compare", files / "missing_a.pt", files / "missing_b.pt",
                       "--seed", str(2**63 - 1), "--bootstrap", "2")
    line = error_line(err)
    assert code == 2
    assert line.startswith("error: --seed must be at most 2**63 - 1 - 2 = 9223372036854775805 "
                           "with --bootstrap 2")
    assert "num_bootstrap" not in line
    code, _, err = run(capsys, "compare", files / "missing_a.pt", files / "missing_b.pt",
                       "--seed", str(2**63 - 3), "--bootstrap", "2")
    assert "missing_a.pt" in error_line(err)  # the largest seed allowed passes the check


# ------------------------------------------------------------------- 3. a layer named once
RANK = "cca_similarity: the centered representation has rank 39 = n - 1"


@pytest.mark.parametrize("argv, start", [
    (["one.pt", "wide.pt"], "error: {root}/wide.pt: layer 'wide': " + RANK),
    (["wide.pt", "one.pt"], "error: {root}/wide.pt: layer 'wide': " + RANK),
    (["one.pt", "listed.pt"], "error: {root}/listed.pt: layer '1': " + RANK),
])
def test_layer_errors_name_the_layer_once(files, capsys, argv, start) -> None:
    code, _, err = run(capsys, "compare", *[files / a for a in argv], "--measure",
                       "cca_similarity", *FAST, "--out", files / "o_layer")
    line = error_line(err)
    assert code == 2
    assert line.startswith(start.format(root=files)), line
    assert "x layer" not in line and "y layer" not in line


def test_layer_named_zero_is_named_once(files, capsys) -> None:
    torch.save([torch.randn(N, 3 * N, generator=torch.Generator().manual_seed(1))],
               files / "zero.pt")
    code, _, err = run(capsys, "compare", files / "one.pt", files / "zero.pt", "--measure",
                       "cca_similarity", *FAST, "--out", files / "o_zero")
    line = error_line(err)
    assert code == 2
    assert line.startswith(f"error: {files / 'zero.pt'}: layer '0': cca_similarity: "), line


# ------------------------------------------------------------------------------ 4. --sigma inf
@pytest.mark.parametrize("sigma", [math.inf, -math.inf, math.nan, 0.0, -1.0])
def test_rbf_gram_refuses_a_sigma_that_is_not_finite_and_positive(sigma) -> None:
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sigma must be a finite positive number or 'median'"):
        rbf_gram(x, sigma)
    with pytest.raises(ValueError, match="sigma must be a finite positive number"):
        rbf_gram(x, torch.tensor(sigma))


def test_rbf_gram_large_finite_sigma_equals_numpy() -> None:
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xn = x.numpy()
    d2 = ((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(rbf_gram(x, 5.0).numpy(), np.exp(-d2 / (2 * 25.0)), rtol=1e-12)


@pytest.mark.parametrize("option", [["--sigma", "inf"], ["--option", "sigma=1e999"]])
def test_cli_sigma_inf_names_the_option_not_the_data(files, capsys, option) -> None:
    code, _, err = run(capsys, "compare", files / "missing_a.pt", files / "missing_b.pt",
                       "--measure", "rbf_cka", *option)
    line = error_line(err)
    assert code == 2
    source = "--sigma inf" if option[0] == "--sigma" else "--option sigma=1e999"
    assert line.startswith(f"error: {source}: rbf_cka: sigma must be "), line
    assert "missing_a.pt" not in line


# --------------------------------------------------------------------- 5. bootstrap and top<m>
def _xy(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return x, x + torch.randn(n, 5, generator=g)


@pytest.mark.parametrize("b", [0, 1, -3, 2.5, True])
def test_bootstrap_interval_refuses_fewer_than_two_replicates(b) -> None:
    x, y = _xy()
    with pytest.raises(ValueError, match="num_bootstrap must be an integer >= 2"):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=b, num_permutations=19)


def test_bootstrap_interval_warns_below_the_minimum_at_the_caller() -> None:
    x, y = _xy()
    with pytest.warns(UserWarning, match=r"num_bootstrap=5 is too few for confidence=0.95: .*"
                                         r"use num_bootstrap >= 40") as caught:
        bi = bootstrap_interval(x, y, "linear_cka", num_bootstrap=5, num_permutations=19)
    assert bi.low < bi.high
    few = [w for w in caught if "too few for confidence" in str(w.message)]
    assert len(few) == 1 and few[0].filename == __file__  # points at this call
    with pytest.warns(UserWarning, match="num_bootstrap=9 is too few for confidence=0.8: .* >= 10"):
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=9, confidence=0.8,
                           num_permutations=19)


def test_bootstrap_interval_does_not_warn_with_enough_replicates() -> None:
    x, y = _xy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bootstrap_interval(x, y, "linear_cka", num_bootstrap=10, confidence=0.8,
                           num_permutations=19)
    assert not [w for w in caught if "too few for confidence" in str(w.message)]


def test_cli_bootstrap_one_is_refused(files, capsys) -> None:
    code, _, err = run(capsys, "compare", files / "missing_a.pt", files / "missing_b.pt",
                       "--bootstrap", "1")
    assert code == 2
    assert error_line(err).startswith("error: --bootstrap must be 0 (off) or >= 2")


def test_cli_few_bootstrap_replicates_warn_once_in_cli_words(files, capsys) -> None:
    code, _, err = run(capsys, "compare", files / "one.pt", files / "one_b.pt", "--measure",
                         "linear_cka,rsa", *FAST, "--bootstrap", "3", "--out", files / "o_boot")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "--bootstrap 3" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: with --bootstrap 3 the 95% "
                                                     "interval's ends")
    assert "--bootstrap >= 40 avoids this" in warned[0]
    assert "num_bootstrap" not in err and "UserWarning" not in err
    doc = json.loads((files / "o_boot" / "alignment.json").read_text())
    for rec in doc["results"].values():
        assert rec["bootstrap"]["low"] < rec["bootstrap"]["high"]


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from its definition, in float64."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2
                 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_topk_above_the_number_of_layer_pairs_is_their_mean_with_a_note(files, capsys) -> None:
    out = files / "o_top"
    code, _, err = run(capsys, "compare", files / "two.pt", files / "other.pt", "--measure",
                       "linear_cka", "--no-normalize", *FAST, "--aggregate", "top7",
                       "--out", out)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [("note: --aggregate top7 over 4 layer pair(s): m is clamped to the number of "
                      "pairs, so the aggregate is their mean (the same as --aggregate mean)")]
    a, b = torch.load(files / "two.pt"), torch.load(files / "other.pt")
    expected = np.mean([_linear_cka(u.double().numpy(), v.double().numpy())
                        for u in a.values() for v in b.values()])
    raw = json.loads((out / "alignment.json").read_text())["results"]["linear_cka"]["raw"]
    assert raw == pytest.approx(expected, rel=1e-5)
    code, _, err = run(capsys, "compare", files / "two.pt", files / "other.pt", "--measure",
                       "linear_cka", *FAST, "--aggregate", "top4", "--out", files / "o_top4")
    assert code == 0 and "note:" not in err


def test_matrix_topk_note_is_printed_once(files, capsys) -> None:
    code, _, err = run(capsys, "matrix", files / "dx", files / "dy", "--measure", "linear_cka",
                       *FAST, "--aggregate", "top9", "--out", files / "o_top_matrix")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1, err
    # the first pair (Y-major, files in name order): one.pt (1 layer) vs other.pt (2 layers)
    assert notes[0].startswith(f"note: {files / 'dx' / 'one.pt'} vs {files / 'dy' / 'other.pt'}: "
                               "--aggregate top9 over 2 layer pair(s): m is clamped")
