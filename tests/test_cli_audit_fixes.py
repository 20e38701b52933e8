"""Fixes of the command line (audit 11): a ``--groups`` table (``row,label``) or labels that
are all distinct (every row its own group: the ungrouped test) are refused; an ``--out`` folder
that cannot be created is an error naming ``--out``; a ``.npy`` that is not one (or holds
Python objects) says so; ``--debug`` keeps the exit code; with ``--null moments`` a rerun with
another ``--permutations`` / ``--seed`` reuses the stored pairs.

The command line runs in process (``cli.main``).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from alignment_callback.reporting import cli
from alignment_callback.reporting.io import FeatureFileError, load_groups

N = 40
FAST = ["--permutations", "19"]


def make_model() -> nn.Module:
    """The factory ``extract`` imports as ``tests.test_cli_audit_fixes:make_model``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """a.pt / b.pt: one layer each (sx / sy: folders of one of them); probe.pt: an extract
    probe; groups.txt: pairs of rows (valid)."""
    root = tmp_path_factory.mktemp("cli_audit")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 4, generator=g)
    torch.save({"h": z @ torch.randn(4, 8, generator=g) + 0.5 * torch.randn(N, 8, generator=g)},
               root / "a.pt")
    torch.save({"h": z @ torch.randn(4, 6, generator=g) + 0.5 * torch.randn(N, 6, generator=g)},
               root / "b.pt")
    torch.save(torch.randn(N, 4, generator=g), root / "probe.pt")
    (root / "groups.txt").write_text("\n".join(str(i // 2) for i in range(N)) + "\n")
    for sub, name in (("sx", "a.pt"), ("sy", "b.pt")):
        (root / sub).mkdir()
        shutil.copy(root / name, root / sub / name)
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------- groups
@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_groups_table_is_refused_naming_the_line(files, capsys, sep) -> None:
    """A two-column file (row, label) was read as one label per line, 'i,g': every row its own
    group, silently the ungrouped run."""
    path = files / ("two_cols.csv" if sep == "," else f"two_cols_{ord(sep)}.txt")
    lines = ["0", "0"] + [f"{i}{sep}{i // 2}" for i in range(2, N)]  # the table starts on line 3
    path.write_text("\n".join(lines) + "\n")
    out = files / "out_table"
    code, _, err = run(capsys, "compare", files / "a.pt", files / "b.pt", "--groups", path,
                       *FAST, "--out", out)
    line = one_error(err)
    assert code == 2
    assert line.startswith(f"error: {path}: line 3 ") and "several columns" in line, line
    assert "--groups takes one label per line" in line and repr(sep) in line, line
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".txt", ".npy"])
def test_all_distinct_groups_are_refused(files, capsys, suffix) -> None:
    """Every row its own group is the ordinary permutation test: --groups would change
    nothing, so the file is not what was meant (e.g. a row index)."""
    path = files / f"distinct{suffix}"
    if suffix == ".npy":
        np.save(path, np.arange(N))
    else:
        path.write_text("\n".join(f"item{i}" for i in range(N)) + "\n")
    for command, inputs in (("compare", ["a.pt", "b.pt"]), ("matrix", ["sx", "sy"])):
        out = files / f"out_distinct_{command}"
        code, _, err = run(capsys, command, *[files / a for a in inputs], "--groups", path,
                           *FAST, "--out", out)
        line = one_error(err)
        assert code == 2 and line.startswith(f"error: {path}: all {N} labels are distinct"), line
        assert "--groups would have no effect" in line and "sharing it" in line, line
        assert not out.exists()
    with pytest.raises(FeatureFileError, match="distinct, so every row would be its own group"):
        load_groups(path)
    assert load_groups(files / "groups.txt").tolist() == [str(i // 2) for i in range(N)]


# -------------------------------------------------------------------------------------- --out
def test_out_folder_that_cannot_be_created_names_out(files, capsys, monkeypatch) -> None:
    """It was the raw OS error ('[Errno 20] Not a directory: ...'), not naming --out."""
    under_file = files / "a.pt" / "sub"
    for command, inputs in (("compare", ["a.pt", "b.pt"]), ("matrix", ["sx", "sy"])):
        code, _, err = run(capsys, command, *[files / a for a in inputs], *FAST, "--measure",
                           "linear_cka", "--out", under_file)
        assert code == 2
        assert one_error(err) == (f"error: --out {under_file}: cannot create the output folder "
                                  "(Not a directory)"), err
    denied = files / "denied"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    code, _, err = run(capsys, "compare", files / "a.pt", files / "b.pt", *FAST, "--measure",
                       "linear_cka", "--out", denied)
    assert code == 2
    assert one_error(err) == (f"error: --out {denied}: cannot create the output folder "
                              "(Permission denied)"), err


def test_extract_out_under_a_file_names_out(files, capsys) -> None:
    out = files / "probe.pt" / "feats.pt"
    code, _, err = run(capsys, "extract", "--model", "tests.test_cli_audit_fixes:make_model",
                       "--probe", files / "probe.pt", "--layers", "0", "--out", out)
    assert code == 2
    line = one_error(err)
    assert line.startswith(f"error: --out {out}: cannot write the feature file ("), line
    assert f"{files / 'probe.pt'} exists and is not a folder" in line, line


# ------------------------------------------------------------------------------------- .npy
def test_corrupt_and_object_npy_are_told_apart(files, capsys) -> None:
    """A text file named .npy was reported as 'pickled (object) data ... allow_pickle'."""
    (files / "garbage.npy").write_text("not numpy")
    (files / "empty.npy").write_bytes(b"")
    np.save(files / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(files / "whole.npy", np.random.default_rng(0).normal(size=(N, 30)))
    data = (files / "whole.npy").read_bytes()
    (files / "cut.npy").write_bytes(data[: len(data) // 2])
    for name, texts in (
        ("garbage.npy", ["not a readable .npy file (truncated or corrupt: it does not start "
                         "with the .npy magic string"]),
        ("empty.npy", ["not a readable .npy file (truncated or corrupt: the file is empty)"]),
        ("cut.npy", ["not a readable .npy file (truncated or corrupt: "]),
        ("objects.npy", ["holds an array of Python objects (dtype object)",
                         "save a numeric array"]),
    ):
        code, _, err = run(capsys, "compare", files / "a.pt", files / name, *FAST,
                           "--out", files / "out_npy")
        line = one_error(err)
        assert code == 2 and line.startswith(f"error: {files / name}: "), line
        assert all(t in line for t in texts), line
        assert "allow_pickle" not in line and "pickled" not in line, line


# ------------------------------------------------------------------------------------ --debug
def test_debug_prints_the_traceback_and_keeps_the_exit_code(files, capsys, monkeypatch) -> None:
    """--debug re-raised, so a user error exited with 1 (kept for internal errors)."""
    code, _, err = run(capsys, "compare", files / "a.pt", files / "missing.pt", "--debug",
                       "--out", files / "out_debug")
    assert code == 2
    assert "Traceback (most recent call last)" in err and "FeatureFileError" in err
    assert err.strip().splitlines()[-1] == f"error: {files / 'missing.pt'}: no such file"

    def interrupted(args):
        raise KeyboardInterrupt

    def bug(args):
        raise RuntimeError("boom")

    for fake, expected, last in ((interrupted, 130, "interrupted"),
                                 (bug, 1, "error: internal error (RuntimeError: boom)")):
        monkeypatch.setattr(cli, "run_compare", fake)
        for debug in ([], ["--debug"]):
            try:
                code, _, err = run(capsys, "compare", files / "a.pt", files / "b.pt", *debug)
            except (KeyboardInterrupt, RuntimeError) as exc:  # the old --debug re-raised
                pytest.fail(f"--debug re-raised {type(exc).__name__} instead of returning "
                            f"{expected}")
            assert code == expected
            assert err.strip().splitlines()[-1].startswith(last), err
            assert ("Traceback" in err) == bool(debug), err
            if expected == 1:
                assert ("rerun with --debug" in err) != bool(debug), err


# ------------------------------------------------------------------------ moments and resume
def intro(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("matrix:"))


def test_moments_rerun_with_other_permutations_or_seed_reuses_pairs(files, capsys) -> None:
    """--null moments draws no permutation: K and the seed (without --bootstrap) no longer
    decide what is reused; everything else still does, and the outputs record the run's
    values."""
    out = files / "out_moments"
    base = ["matrix", files / "sx", files / "sy", "--measure", "linear_cka", "--out", out]

    def matrix(*extra) -> str:
        code, _, err = run(capsys, *base, *extra)
        assert code == 0, err
        return intro(err)

    assert "0 already done" in matrix("--null", "moments")
    first = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    assert "1 already done" in matrix("--null", "moments", "--permutations", "7", "--seed", "5")
    settings = json.loads((out / "matrix.json").read_text())["settings"]
    assert (settings["permutations"], settings["seed"], settings["null"]) == (7, 5, "moments")
    lines = (out / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["settings"] == first["settings"]
    assert first["settings"]["permutations"] == 500  # what the pair was computed with
    # what matters still counts
    assert "0 already done" in matrix("--null", "moments", "--alpha", "0.1")
    assert "0 already done" in matrix("--null", "moments", "--no-normalize")
    # --null auto may fall back to permutations: K and the seed count
    assert "0 already done" in matrix("--null", "auto", *FAST)
    assert "0 already done" in matrix("--null", "auto", "--permutations", "29")
    assert "0 already done" in matrix("--null", "auto", "--permutations", "29", "--seed", "1")
    assert "1 already done" in matrix("--null", "auto", "--permutations", "29", "--seed", "1")
    # with --bootstrap the seed draws the subsamples: it counts, K does not
    boot = ["--null", "moments", "--bootstrap", "2"]
    assert "0 already done" in matrix(*boot)
    assert "1 already done" in matrix(*boot, "--permutations", "7")
    assert "0 already done" in matrix(*boot, "--seed", "3")
    capsys.readouterr()


def test_too_few_permutations_are_said_once_in_the_command_lines_words(files, capsys) -> None:
    """The engine warns about too few permutations once, when it is made (it warned at every
    pair and measure before): the command line, which says it in its own words first, must
    not add Python's raw warning line ("<frozen runpy>:88: UserWarning: ...")."""
    for command, inputs in (("compare", ["a.pt", "b.pt"]), ("matrix", ["sx", "sy"])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = run(capsys, command, *[files / a for a in inputs], "--permutations",
                               "10", "--out", files / f"out_few_{command}")
        assert code == 0, err
        assert not [str(w.message) for w in caught if "1/11" in str(w.message)]
        lines = [ln for ln in err.splitlines() if "1/11" in ln]
        assert len(lines) == 1 and lines[0].startswith("warning: with K=10"), err
        assert "UserWarning" not in err, err


# ------------------------------------------------------------------------------ wording
def test_moments_without_bootstrap_report_no_seed(files, capsys) -> None:
    """--null moments draws nothing: "seed=0" next to its results suggested one did."""
    out = files / "out_moments_nos"
    code, stdout, err = run(capsys, "compare", files / "a.pt", files / "b.pt", "--measure",
                            "linear_cka", "--null", "moments", "--seed", "7", "--out", out)
    assert code == 0, err
    assert "null: exact permutation moments + Pearson III, alpha=0.05, aggregate=max" in stdout
    assert "seed=" not in stdout
    code, stdout, err = run(capsys, "matrix", files / "sx", files / "sy", "--measure",
                            "linear_cka", "--null", "moments", "--out", out)
    assert code == 0, err
    assert "seed=" not in stdout and "permutation seed" not in (out / "report.md").read_text()
    code, stdout, err = run(capsys, "compare", files / "a.pt", files / "b.pt", "--measure",
                            "linear_cka", "--null", "moments", "--bootstrap", "40", "--seed", "7",
                            "--out", out)
    assert code == 0, err
    assert "seed=7" in stdout  # the bootstrap resamples are drawn from it


def test_one_pair_matrix_counts_in_the_singular(files, capsys) -> None:
    code, stdout, err = run(capsys, "matrix", files / "sx", files / "sy", "--measure",
                            "linear_cka", "--permutations", "99", "--out", files / "out_one")
    assert code == 0, err
    assert "matrix: 1 x 1 = 1 pair, 1 measure(s)" in err
    assert "across 1 pair (q <= 0.05)" in stdout and "of 1 pair significant after BH" in stdout


def test_an_unknown_measure_hint_ends_once(files, capsys) -> None:
    code, _, err = run(capsys, "compare", files / "a.pt", files / "b.pt", "--measure", "foo_cka",
                       "--out", files / "out_foo")
    assert code == 2
    line = one_error(err)
    assert "did you mean 'rbf_cka'? Measures: " in line and "?." not in line


def test_a_numpy_probe_is_named_as_another_format_not_a_corrupt_file(files, capsys) -> None:
    np.save(files / "probe.npy", np.zeros((N, 4), dtype=np.float32))
    code, _, err = run(capsys, "extract", "--model", "tests.test_cli_audit_fixes:make_model",
                       "--probe", files / "probe.npy", "--layers", "0", "--out", files / "e.pt")
    assert code == 2
    assert "a probe is a .pt file (torch.save), not .npy" in one_error(err)


def test_the_matrix_report_says_when_k_is_too_coarse_for_bh(files, capsys, tmp_path) -> None:
    """The resolution warning went to stderr only: report.md read "none aligned" next to large
    calibrated scores without saying that no p-value could pass BH."""
    for sub in ("mx", "my"):
        (tmp_path / sub).mkdir()
    for i, name in enumerate(("a.pt", "b.pt")):
        shutil.copy(files / name, tmp_path / "mx" / f"m{i}.pt")
        shutil.copy(files / name, tmp_path / "my" / f"r{i}.pt")
    out = tmp_path / "out"
    code, _, err = run(capsys, "matrix", tmp_path / "mx", tmp_path / "my", "--measure",
                       "linear_cka", "--permutations", "19", "--out", out)
    assert code == 0, err
    m, k = 4, 19  # 2 x 2 files, all tested
    r = int(np.ceil(m / (0.05 * (k + 1)) - 1e-9))  # pairs needed at the smallest p for BH
    text = (f"Note: with K=19 permutations the smallest p-value is 1/20, so after "
            f"Benjamini-Hochberg over {m} pairs a pair is only significant if at least {r} pairs "
            "reach that smallest p")
    assert text in err.replace("warning: ", "Note: ")
    assert text in (out / "report.md").read_text()
    code, _, err = run(capsys, "matrix", tmp_path / "mx", tmp_path / "my", "--measure",
                       "linear_cka", "--permutations", "199", "--out", tmp_path / "out199")
    assert "Note: with K" not in (tmp_path / "out199" / "report.md").read_text()
