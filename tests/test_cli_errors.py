"""Every data error of the command line is one ``error: ...`` line (exit code 2) naming the file
and the layer: NaN/Inf, too few rows, constant layers, rank problems of the CCA family,
``k >= n``, truncated / corrupt ``.pt`` files and ``.pt`` files of pickled objects."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from alignment_callback.reporting import cli

N = 40
FAST = ["--permutations", "19"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    torch.save({"h1": rand(N, 8), "h2": rand(N, 6)}, root / "good.pt")
    inf = rand(N, 5)
    inf[2, 1] = float("inf")
    torch.save({"ok": rand(N, 5), "blown": inf}, root / "inf.pt")
    torch.save({"ok": rand(N, 5), "flat": torch.full((N, 5), 0.3)}, root / "constant.pt")
    scale = torch.rand(N, 1, generator=g) + 0.5
    torch.save({"ok": rand(N, 5), "scaled": scale * torch.ones(N, 5)}, root / "scaled.pt")
    zero = rand(N, 5)
    zero[7] = 0.0
    torch.save({"ok": rand(N, 5), "dead": zero}, root / "zero_row.pt")
    torch.save({"ok": rand(N, 5), "wide": rand(N, 3 * N)}, root / "wide.pt")
    torch.save({"tiny": rand(1, 5)}, root / "one_row.pt")
    torch.save({"ok": rand(N, 5), "arr": np.zeros((N, 3))}, root / "pickled.pt")
    torch.save(torch.nn.Linear(3, 3), root / "module.pt")
    data = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "garbage.pt").write_bytes(b"\x00\x01 not a torch file")
    (root / "dx").mkdir()
    (root / "dy").mkdir()
    shutil.copy(root / "good.pt", root / "dx" / "good.pt")
    shutil.copy(root / "good.pt", root / "dy" / "good.pt")
    shutil.copy(root / "constant.pt", root / "dy" / "constant.pt")
    return root


CASES = [
    # (arguments, texts the one error line must contain)
    (["inf.pt", "good.pt"], ["inf.pt", "layer 'blown'", "NaN/Inf"]),
    (["good.pt", "one_row.pt"], ["one_row.pt", "layer 'tiny'", "1 row(s)"]),
    (["good.pt", "constant.pt"], ["constant.pt", "layer 'flat'", "constant", "identical"]),
    (["scaled.pt", "good.pt"], ["scaled.pt", "layer 'scaled'", "after L2 row normalization",
                                "--no-normalize"]),
    (["good.pt", "zero_row.pt"], ["zero_row.pt", "layer 'dead'", "all-zero"]),
    (["good.pt", "wide.pt", "--measure", "cca_similarity"],
     ["wide.pt", "layer 'wide'", "rank 39 = n - 1"]),
    (["wide.pt", "good.pt", "--measure", "pwcca"], ["wide.pt", "layer 'wide'", "rank"]),
    (["good.pt", "good.pt", "--measure", "cca_similarity", "--option", "dims=7"],
     ["good.pt layer 'h2' vs good.pt layer 'h1'", "dims=7"]),
    (["good.pt", "good.pt", "--measure", "svcca", "--option", "cca_dim=7"],
     ["good.pt", "layer 'h2'", "cca_dim=7"]),
    (["good.pt", "good.pt", "--measure", "mutual_knn", "--k", str(N)],
     ["good.pt", "layers 'h1', 'h2'", f"{N} rows", f"k={N}", f"at least {N + 1}", "--k"]),
    (["truncated.pt", "good.pt"], ["truncated.pt: not a readable .pt file (truncated or corrupt",
                                   "cut short"]),
    (["good.pt", "empty.pt"], ["empty.pt: not a readable .pt file (truncated or corrupt",
                               "empty"]),
    (["garbage.pt", "good.pt"], ["garbage.pt: not a readable .pt file (truncated or corrupt"]),
    (["good.pt", "pickled.pt"], ["pickled.pt: holds pickled Python objects", "numpy",
                                 "save tensors only"]),
    (["module.pt", "good.pt"], ["module.pt: holds pickled Python objects",
                                "torch.nn.modules.linear.Linear"]),
]


@pytest.mark.parametrize("argv, texts", CASES, ids=[c[0][0] + "-" + c[0][1] + (
    "-" + c[0][3] if len(c[0]) > 3 else "") for c in CASES])
def test_compare_data_errors_name_file_and_layer(files, capsys, monkeypatch, argv, texts):
    monkeypatch.chdir(files)
    code = cli.main(["compare", *argv, *FAST, "--out", "out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for text in texts:
        assert text in err[0], (text, err[0])
    assert "weights_only" not in err[0] or "pickled" in err[0]


def test_matrix_data_error_names_file_and_layer(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    code = cli.main(["matrix", "dx", "dy", *FAST, "--out", "out_matrix"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ")
    assert "dy/constant.pt: layer 'flat' is constant" in err[-1]


@pytest.mark.parametrize("bad", ["inf.pt", "one_row.pt"])
def test_matrix_checks_every_file_before_the_first_pair(files, capsys, monkeypatch, bad):
    """A bad file in the last column of DIR_Y (NaN/Inf, another row count) was found when its
    column came, after every pair before it was computed (hours at real sizes)."""
    monkeypatch.chdir(files)
    folder = files / f"late_{bad[:-3]}"
    folder.mkdir()
    shutil.copy(files / "good.pt", folder / "a_good.pt")
    shutil.copy(files / "good.pt", folder / "b_good.pt")
    shutil.copy(files / bad, folder / f"z_{bad}")
    out = files / f"out_late_{bad[:-3]}"
    code = cli.main(["matrix", "dx", str(folder), *FAST, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and f"z_{bad}" in err[-1], err
    assert not (out / "pairs.jsonl").exists() or (out / "pairs.jsonl").read_text() == ""


def test_bad_options_name_the_option(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    for argv, text in (
        (["--option", "alpha=0.5"], "--option alpha=0.5: none of the chosen measures"),
        (["--measure", "shape_metric", "--option", "alpha=2"], "--option alpha=2: shape_metric"),
        (["--option", "folds"], "--option folds: expected NAME=VALUE"),
        (["--measure", "cknna", "--k", "1"], "--k 1: cknna: k must be an integer >= 2"),
        (["--measure", "rbf_cka", "--sigma", "-1"], "--sigma -1.0: rbf_cka: sigma must be"),
        (["--k", "3", "--option", "k=4"], "--option k=4: k is also given by --k 3"),
        (["--measure", "no_such"], "--measure: unknown measure 'no_such'"),
    ):
        code = cli.main(["compare", "good.pt", "good.pt", *argv, *FAST, "--out", "out"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and text in err[0], (argv, err)
        assert "linear_cka" in err[0] or "measures" not in argv  # registry lists in errors


def test_sparse_feature_file_seed_and_out_file_errors(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    dense = torch.load(files / "good.pt")["h1"]
    torch.save({"h": dense.to_sparse()}, files / "sparse.pt")
    (files / "afile").write_text("")
    for argv, text in ((["sparse.pt", "good.pt"], "sparse.pt: layer 'h' is a torch.sparse_coo"),
                       (["good.pt", "good.pt", "--seed", "-1"], "--seed must be an integer"),
                       (["good.pt", "good.pt", "--out", "afile"],
                        "--out afile: exists and is not a directory")):
        code = cli.main(["compare", *argv, *FAST] + ([] if "--out" in argv else ["--out", "o"]))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and len(err[0]) < 400, err
        assert text in err[0], (text, err[0])


def test_bootstrap_refusal_gives_advice_the_command_line_can_follow(files, capsys, monkeypatch):
    """The library's refusal ends "use a larger/smaller fraction"; the command line has no
    fraction to change (it subsamples 0.8), so it names --bootstrap and what can be changed."""
    monkeypatch.chdir(files)
    g = torch.Generator().manual_seed(1)
    torch.save({"h": torch.randn(13, 4, generator=g)}, files / "rows13.pt")
    torch.save({"h": torch.randn(16, 4, generator=g)}, files / "rows16.pt")
    x14 = torch.randn(14, 8, generator=g)  # 11 rows per replicate: every mutual kNN null is 1
    torch.save({"h": x14}, files / "x14.pt")
    torch.save({"h": x14 + 0.3 * torch.randn(14, 8, generator=g)}, files / "y14.pt")
    (files / "groups2.txt").write_text("\n".join(str(i % 2) for i in range(N)) + "\n")
    unequal = [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4]  # no two groups of one size
    (files / "unequal.txt").write_text("\n".join(map(str, unequal)) + "\n")
    for argv, texts in (
        (["rows13.pt", "rows13.pt", "--measure", "mutual_knn"],
         ["mutual_knn, k=10 needs at least 11 samples",
          "use more rows, options that need fewer samples (such as a smaller --k)"]),
        (["good.pt", "good.pt", "--groups", "groups2.txt"],
         ["every replicate would be the whole", "use more rows or groups, or no --bootstrap"]),
        (["rows16.pt", "rows16.pt", "--groups", "unequal.txt"],
         ["allow no block permutation", "use groups with more groups of each size, or no "
          "--bootstrap"]),
        (["x14.pt", "y14.pt", "--measure", "mutual_knn"],
         ["cannot be calibrated on its 11 rows", "use more rows, a smaller --k, or no "
          "--bootstrap"]),
    ):
        code = cli.main(["compare", *argv, "--bootstrap", "40", *FAST, "--out", "out_boot"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: --bootstrap 40: fraction=0.8"), err
        assert "the command line's fraction is fixed at 0.8: " in err[-1], err
        assert all(text in err[-1] for text in texts), (texts, err[-1])
        assert "larger fraction" not in err[-1] and "smaller fraction" not in err[-1], err


def test_permutations_whose_nulls_cannot_fit_are_bad_input(files, capsys, monkeypatch):
    """A MemoryError of the library (a refusal before allocating) was reported as an internal
    error with exit code 1 ("rerun with --debug"); it is bad input: one line naming
    --permutations, exit code 2."""
    monkeypatch.chdir(files)
    code = cli.main(["compare", "good.pt", "good.pt", "--permutations", str(2**45), "--out", "o"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --permutations 35184372088832: the permutation nulls"), err
    assert "use fewer permutations" in err[0] and "internal error" not in err[0], err
    # the same under torchrun: each process's outcome (gathered, then printed by every one)
    from types import SimpleNamespace

    outcome = cli._outcome(SimpleNamespace(rank=1), MemoryError("num_permutations=7: too big"),
                           debug=False)
    assert (outcome.code, outcome.message) == (2, "--permutations 7: too big")


class _ClosedPipe:
    """A stdout whose reader has gone (``... | head -1``)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass


def test_an_output_pipe_closed_by_its_reader_ends_quietly(files, capsys, monkeypatch):
    """A closed pipe was an OSError, so bad input: 'error: [Errno 32] Broken pipe', exit 2."""
    monkeypatch.chdir(files)
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    code = cli.main(["compare", "good.pt", "good.pt", *FAST, "--out", "out_pipe"])
    assert code == 141
    assert capsys.readouterr().err == ""


def test_a_feature_far_larger_than_the_others_is_not_a_constant_layer(files, capsys):
    """One feature at 10⁶ beside unit-variance ones (float32): the command line judged the
    layer constant over all features at once ("all 40 rows are identical"), as the library
    did before it held each feature to its own rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 8, generator=g)
    x[:, 0] += 1e6
    torch.save({"h": x}, files / "offset.pt")
    for extra in ([], ["--no-normalize"]):
        code = cli.main(["compare", str(files / "offset.pt"), str(files / "good.pt"), *FAST,
                         "--measure", "linear_cka", "--out", str(files / "out_offset"), *extra])
        assert code == 0, capsys.readouterr().err


def test_moments_refuses_a_file_of_several_layers_in_the_last_column_first(files, capsys):
    """--null moments takes one layer pair: only the first pair's files were checked before
    computing, so a two-layer file in DIR_Y's last column failed after the pairs before it."""
    folder = files / "moments_y"
    folder.mkdir()
    g = torch.Generator().manual_seed(2)
    torch.save({"h": torch.randn(N, 5, generator=g)}, folder / "a_one.pt")
    torch.save({"h": torch.randn(N, 5, generator=g), "k": torch.randn(N, 4, generator=g)},
               folder / "z_two.pt")
    single = files / "moments_x"
    single.mkdir()
    torch.save({"h": torch.randn(N, 6, generator=g)}, single / "m.pt")
    out = files / "out_moments_late"
    code = cli.main(["matrix", str(single), str(folder), "--measure", "linear_cka", "--null",
                     "moments", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "z_two.pt has 2 layers" in err[-1], err
    assert not (out / "pairs.jsonl").exists() or (out / "pairs.jsonl").read_text() == ""
