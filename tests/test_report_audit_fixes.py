"""Audit fixes of the report, the plots and the logged pair keys: distinct pair keys for layer
names containing ``__``, UTF-8 files under any locale, significance marks on large heatmaps,
safe report image names, ``plot_scores`` on drift histories and along the steps, no backend
switch, and curve sentences that never read "fell 0.36 → 0.36"."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from alignment_callback.callback.feedback import report_files, write_report
from alignment_callback.engine import StepResult
from alignment_callback.engine.report import (
    Report,
    curve_sentence,
    history_series,
    training_report,
)
from alignment_callback.functional import calibrated_layer_alignment
from alignment_callback.metrics.plotting import plot_layer_heatmap, plot_scores
from tests.helpers import FAST_TRAINER, MLP, make_probe, quiet_callback, train_loader

ROOT = Path(__file__).resolve().parents[1]


def _layers(names: list[str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(40, 5, generator=g) for name in names}


def _result(x_names: list[str], y_names: list[str], seed: int = 0):
    """A small calibrated layer result (distinct random scores per pair)."""
    return calibrated_layer_alignment(_layers(x_names, seed), _layers(y_names, seed + 1),
                                      "linear_cka", num_permutations=9)


def _history(pairs: list[tuple[int, int]]) -> list[dict[str, float]]:
    """A callback-like history of one measure at the given (epoch, step) points."""
    return [{"epoch": e, "step": s, "alignment/m/raw": 0.3 + 0.01 * i,
             "alignment/m/calibrated": 0.1, "alignment/m/threshold": 0.2}
            for i, (e, s) in enumerate(pairs)]


def _run_python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter importing this checkout; returns its stdout."""
    environ = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    environ.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    done = subprocess.run([sys.executable, "-c", code], env=environ, check=False,
                          capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ------------------------------------------------------------------- 1. pair keys distinct
def test_pair_keys_stay_distinct_when_layer_names_contain_double_underscores() -> None:
    r = _result(["a__b", "a"], ["c", "b__c"])  # a__b ~ c and a ~ b__c read "a__b__c"
    scalars = StepResult(0, 0, {"linear_cka": r}, 40).scalars(pairs=True)
    pairs = {k: v for k, v in scalars.items() if k.startswith("alignment/linear_cka/pair/")}
    expected = sorted(float(v) for v in r.matrix.flatten())
    assert len(pairs) == r.matrix.numel()
    assert sorted(pairs.values()) == pytest.approx(expected)  # no score lost or overwritten


def test_pair_keys_keep_the_readable_names_otherwise() -> None:
    x_names, y_names = ["fc1", "fc2"], ["r.0", "r_1"]
    r = _result(x_names, y_names)
    scalars = StepResult(0, 0, {"linear_cka": r}, 40).scalars(pairs=True)
    expected = {f"alignment/linear_cka/pair/{x}__{y}": float(r.matrix[a, b])
                for a, x in enumerate(x_names) for b, y in enumerate(y_names)}
    assert {k: v for k, v in scalars.items() if "/pair/" in k} == pytest.approx(expected)


# ------------------------------------------------------------------------- 2. UTF-8 files
def test_report_csv_and_json_are_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    code = f"""
import locale
from pathlib import Path
from alignment_callback.engine.report import training_report
from alignment_callback.reporting.write import write_csv, write_json
out = Path({str(tmp_path)!r})
h = [{{"epoch": 0, "step": 0, "alignment/linear_cka/raw": 0.31,
       "alignment/linear_cka/calibrated": 0.0, "alignment/linear_cka/p_value": 0.4,
       "alignment/linear_cka/threshold": 0.55, "alignment/linear_cka/best_pair": "bloc\\u00e9|r"}}]
training_report(h).write(out / "r.md", out / "r.html")
write_csv(out / "m.csv", ["x_model"], [["mod\\u00e8le"]])
write_json(out / "m.json", {{"x": "mod\\u00e8le"}})
print(locale.getpreferredencoding(False))
"""
    encoding = _run_python(code, LC_ALL="C", LANG="C", PYTHONUTF8="0",
                           PYTHONCOERCECLOCALE="0").strip()
    if encoding.lower().replace("-", "") == "utf8":
        pytest.skip("this platform keeps UTF-8 under LC_ALL=C")
    md = (tmp_path / "r.md").read_bytes().decode("utf-8")
    assert "τ" in md and "bloc\u00e9 ~ r" in md
    assert "τ" in (tmp_path / "r.html").read_bytes().decode("utf-8")
    assert "mod\u00e8le" in (tmp_path / "m.csv").read_bytes().decode("utf-8")
    assert json.loads((tmp_path / "m.json").read_bytes().decode("utf-8")) == {"x": "mod\u00e8le"}


# ---------------------------------------------------------------- 3. marks at every size
@pytest.mark.parametrize("n", [12, 13, 20])
def test_significance_marks_are_drawn_at_every_size(n: int) -> None:
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(n)
    cal, marks = rng.random((n, n)), rng.random((n, n)) < 0.3
    fig, ax = plot_layer_heatmap(cal, [f"x{i}" for i in range(n)], [f"y{j}" for j in range(n)],
                                 marks=marks)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
             for t in ax.texts}
    plt.close(fig)
    starred = {cell for cell, text in texts.items() if text.endswith("*")}
    assert starred == {(int(i), int(j)) for i, j in np.argwhere(marks)}
    if n * n <= 144:  # values in every cell, as before
        assert texts == {(i, j): f"{cal[i, j]:.2f}" + ("*" if marks[i, j] else "")
                         for i in range(n) for j in range(n)}
    else:  # too small for values: the mark alone, unmarked cells empty
        assert set(texts.values()) == {"*"}


# ------------------------------------------------------------------ 4. report image names
def test_report_images_of_unusual_reference_names_are_linked_and_listed(tmp_path: Path
                                                                          ) -> None:
    labels = ["clip (vit-b)/linear_cka", "x[0]/linear_cka", "a b/linear_cka",
              "a_b/linear_cka", "curves"]
    r = _result(["l1"], ["r1"])
    history = [StepResult(0, 0, {label: r for label in labels}, 40).history_entry()]
    md, html = write_report(str(tmp_path), history, {}, {label: r for label in labels},
                            "alignment", 0.05)
    listed = report_files(md)
    assert listed[:2] == [md, html] and all(os.path.isfile(p) for p in listed)
    on_disk = {p.name for p in tmp_path.glob("*.png")}
    assert len(on_disk) == len(labels) + 1  # one heatmap per label and the curves
    assert {os.path.basename(p) for p in listed[2:]} == on_disk
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in on_disk)
    # the Markdown's links reach the files: the target follows the last "](" of the line
    targets = [line[line.rindex("](") + 2:-1] for line in Path(md).read_text("utf-8").splitlines()
               if line.startswith("![")]
    assert {unquote(t) for t in targets} == on_disk


def test_report_links_to_any_file_name_resolve() -> None:
    r = Report("t")
    r.image("plots/clip (vit-b) [1].png", "a ] b")
    line = next(x for x in r.to_markdown().splitlines() if x.startswith("!["))
    target = line[line.rindex("](") + 2:-1]
    assert " " not in target and ")" not in target
    assert unquote(target) == "plots/clip (vit-b) [1].png"


# ------------------------------------------------------------- 5. drift: per-layer keys
def test_plot_scores_skips_per_layer_and_pair_keys() -> None:
    import matplotlib.pyplot as plt

    history = _history([(0, 0), (1, 4), (2, 8)])
    for i, h in enumerate(history):  # what reference="initial" and log_pairs=True add
        h.update({"alignment/m/layer/d.l1/raw": 0.9, "alignment/m/layer/d.l1/calibrated": 0.8,
                  "alignment/m/pair/d.l1__raw": 0.7})
    fig, ax = plot_scores(history)
    raw = next(line for line in ax.lines if line.get_label() == "raw")
    assert ax.get_title() == "m"
    assert list(raw.get_ydata()) == pytest.approx([h["alignment/m/raw"] for h in history])
    plt.close(fig)


def test_history_series_reads_a_log_prefix_holding_a_slash() -> None:
    entry = {"epoch": 0, "step": 0, "val/alignment/ref/m/raw": 0.4,
             "val/alignment/ref/m/layer/fc1/raw": 0.9, "val/alignment/ref/m/pair/a__b": 0.7}
    series = history_series([entry], "val/alignment")
    assert set(series) == {"", "ref/m"} and series["ref/m"] == {"raw": [0.4]}


def test_plot_scores_of_a_drift_callback_history(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    cb = quiet_callback(make_probe(), ["linear_cka"], 9, reference="initial")
    trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[cb], enable_checkpointing=False,
                         default_root_dir=tmp_path, **FAST_TRAINER)
    trainer.fit(MLP(), train_loader())
    assert any("/layer/" in k for k in cb.history[-1])
    fig, ax = plot_scores(cb.history)
    raw = next(line for line in ax.lines if line.get_label() == "raw")
    assert list(raw.get_ydata()) == pytest.approx([h["alignment/linear_cka/raw"]
                                                   for h in cb.history])
    plt.close(fig)


# ------------------------------------------------------------------------ 6. the backend
def test_plots_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path: Path) -> None:
    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
from pathlib import Path
from alignment_callback.metrics.plotting import plot_layer_heatmap, plot_scores
from alignment_callback.reporting.write import heatmap
fig, _ = plot_scores([{{"raw": 0.3, "calibrated": 0.1, "threshold": 0.2}}])
fig2, _ = plot_layer_heatmap([[0.5, 0.2]], ["a"], ["b", "c"], marks=[[True, False]])
open_figures = len(plt.get_fignums())
heatmap([[0.5]], ["a"], ["b"], Path({str(tmp_path)!r}) / "h.png", "t", "x", "y")
print(matplotlib.get_backend(), open_figures, len(plt.get_fignums()))
"""
    backend, before, after = _run_python(code).split()
    assert backend == "svg"  # the user's choice, not Agg
    assert before == after == "2"  # heatmap() leaves no pyplot figure behind
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------- 7. sentences and rounding
def test_curve_sentence_never_moves_between_equal_printed_values() -> None:
    sentence = curve_sentence("m", [0.3639, 0.3565], [0.2680, 0.2640], 0.1256, 0.05)
    assert f"raw stayed at {0.3565:.2f}" in sentence
    # a change below FLAT whose printed values differ is not "stayed at" the last of them
    assert "calibrated changed little (0.27 → 0.26)" in sentence
    rng = np.random.default_rng(0)
    # changes around the 2-decimal display and FLAT
    for first, change in zip(rng.random(400), rng.uniform(-0.02, 0.02, 400)):
        text = curve_sentence("m", [first, first + change], [0.0, 0.0], 0.5)
        # two decimals, or two significant digits below 0.005
        moves = re.findall(r"(rose|fell) (-?[\d.e-]+) → (-?[\d.e-]+)", text)
        for word, a, b in moves:
            assert a != b, text
            assert (float(b) > float(a)) == (word == "rose"), text
        assert ("the rise is what chance reaches" in text) == any(w == "rose" for w, *_ in moves)


# ---------------------------------------------------------------------- 8. the step axis
def test_plot_scores_runs_along_the_steps_when_epochs_repeat() -> None:
    import matplotlib.pyplot as plt

    points = [(0, 0), (0, 2), (0, 4), (1, 6), (1, 8)]
    fig, ax = plot_scores(_history(points))
    raw = next(line for line in ax.lines if line.get_label() == "raw")
    assert ax.get_xlabel() == "step"
    assert list(raw.get_xdata()) == [s for _, s in points]
    plt.close(fig)
    points = [(0, 0), (1, 3), (2, 6)]
    fig, ax = plot_scores(_history(points))
    raw = next(line for line in ax.lines if line.get_label() == "raw")
    assert ax.get_xlabel() == "epoch"
    assert list(raw.get_xdata()) == [e for e, _ in points]
    plt.close(fig)


def test_curve_sentences_of_small_single_or_missing_values_say_what_is_there() -> None:
    """A calibrated 0.0041 read "stayed at 0.00: above chance"; -0.004 → 0.004 read "rose -0.00
    → 0.00"; a one-step curve "stayed" at its value; a continuous p_BH of 0.0500004 read
    "p_BH = 0.05 > 0.05"; BH is across every curve (references × measures), not "the
    measures"; a curve with no value at the last step (a drift reference at a redone step) was
    read "above chance at the last step" from an earlier step's value."""
    small = curve_sentence("cknna", [0.1716, 0.1716], [0.0041, 0.0041], 0.1682, 0.05)
    assert "calibrated stayed at 0.0041: above chance" in small, small
    signed = curve_sentence("unbiased_cka", [-0.004, 0.004], [0.0, 0.0], 0.02, 0.4)
    assert "raw rose -0.004 → 0.004" in signed and "-0.00 " not in signed, signed
    one = curve_sentence("prev", [1.0], [1.0], 0.1, 0.01)
    assert "raw was 1.00 and calibrated was 1.00" in one, one
    assert "calibrated was 0" in curve_sentence("prev", [0.2], [0.0], 0.3, 0.5)
    near = curve_sentence("m", [0.1, 0.3], [0.0, 0.2], 0.1, 0.05, 0.0500004, 0.05)
    assert "across the curves (p_BH = 0.0500004 > 0.05)" in near, near
    missing = curve_sentence("prev", [0.9, 1.0], [0.5, 1.0], 0.1, None, None, 0.05,
                             last_value_at="epoch 1, step 4")
    assert missing.endswith("no value at the last step (its last value is at epoch 1, step 4)."), \
        missing
    assert "above chance" not in missing
    def entry(epoch, step, **curves):
        return {"epoch": epoch, "step": step,
                **{f"alignment/{c}/m/{f}": v for c, (raw, cal) in curves.items()
                   for f, v in (("raw", raw), ("calibrated", cal), ("p_value", 0.01),
                                ("threshold", 0.1))}}

    history = [entry(0, 0, ref=(0.3, 0.2)), entry(1, 4, ref=(0.4, 0.3), prev=(1.0, 1.0)),
               entry(2, 8, ref=(0.5, 0.4))]
    md = training_report(history).to_markdown()
    assert "prev/m: raw was 1.00 and calibrated was 1.00: no value at the last step (its last " \
           "value is at epoch 1, step 4)." in md, md


def test_the_curves_panels_share_one_axis(tmp_path, monkeypatch) -> None:
    """Step mode with a "previous" reference (no value at step 0): its rows have distinct
    epochs, so its panel was drawn against the epoch while the other ran along the steps, and
    its first point (step 3) sat at x = 0."""
    import alignment_callback.metrics.plotting as plotting
    from alignment_callback.callback.feedback import _curves

    drawn = {}

    def record(rows, ax=None, measure=None, prefix="alignment", steps=None, xlabel=None):
        drawn[measure] = (xlabel, list(steps))

    monkeypatch.setattr(plotting, "plot_scores", record)

    def entry(epoch, step, *labels):
        return {"epoch": epoch, "step": step,
                **{f"alignment/{c}/linear_cka/{f}": 0.5 for c in labels
                   for f in ("raw", "calibrated", "threshold", "p_value")}}

    history = [entry(0, 0, "ref"), entry(0, 3, "ref", "prev"), entry(1, 6, "ref", "prev")]
    _curves(str(tmp_path), history, ["ref/linear_cka", "prev/linear_cka"], "c.png", "alignment")
    assert drawn == {"ref/linear_cka": ("step", [0, 3, 6]), "prev/linear_cka": ("step", [3, 6])}


# ------------------------------------------------------------- drift curves: their own BH family
def _final_p_history(p: dict[str, float]) -> list[dict]:
    entry = {"epoch": 1, "step": 8}
    for label, value in p.items():
        entry.update({f"alignment/{label}/raw": 0.5, f"alignment/{label}/calibrated": 0.1,
                      f"alignment/{label}/threshold": 0.4, f"alignment/{label}/p_value": value})
    return [entry]


def _bh(p: list[float]) -> list[float]:
    """Benjamini–Hochberg written out: q_(i) = min_{j >= i} m p_(j) / j."""
    m, order = len(p), np.argsort(p)
    q = np.minimum.accumulate((np.array(p)[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out.tolist()


def _p_bh_column(md: str) -> dict[str, str]:
    rows = [line.split("|") for line in md.splitlines() if line.startswith("| a/")
            or line.startswith("| prev/")]
    return {cells[1].strip().replace("\\", ""): cells[6].strip() for cells in rows}


def test_drift_curves_are_a_bh_family_of_their_own():
    """"previous" curves (p = 1/(K+1) by construction) joined the BH family of the reference's
    curves and loosened their threshold: a/linear_cka's p_BH was 0.048 (significant) with
    them and 0.06 without."""
    p = {"a/linear_cka": 0.04, "a/mutual_knn": 0.04, "a/cknna": 0.10,
         "prev/linear_cka": 0.02, "prev/mutual_knn": 0.02, "prev/cknna": 0.02}
    drift = ["prev/linear_cka", "prev/mutual_knn", "prev/cknna"]
    md = training_report(_final_p_history(p), labels=list(p), drift=drift).to_markdown()
    shown = _p_bh_column(md)
    own = _bh([0.04, 0.04, 0.10])
    assert [shown[k] for k in ("a/linear_cka", "a/mutual_knn", "a/cknna")] == [
        f"{q:.4g}" for q in own]  # 0.06, 0.06, 0.1: not significant at 0.05
    assert [shown[k] for k in drift] == [f"{q:.4g}" for q in _bh([0.02] * 3)]
    assert "the drift curves (the model against its own earlier activations) as a family" in md
    together = _p_bh_column(training_report(_final_p_history(p), labels=list(p)).to_markdown())
    assert together["a/linear_cka"] == f"{_bh(list(p.values()))[0]:.4g}"  # 0.048


def test_the_callback_reports_its_drift_curves_as_their_own_family(tmp_path):
    """End to end: a fit with a frozen and a "previous" reference writes a report whose p_BH
    of each curve is BH over its own family's final p-values."""
    from lightning.pytorch.loggers import CSVLogger

    from tests.helpers import RefMLP

    cb = quiet_callback(make_probe(), ["linear_cka", "mutual_knn"], 19, report=True,
                        reference={"frozen": RefMLP(seed=1), "prev": "previous"})
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=CSVLogger(tmp_path),
                         default_root_dir=tmp_path, **FAST_TRAINER)
    trainer.fit(MLP(), train_loader())
    md = Path(cb.report_paths[0]).read_text(encoding="utf-8")
    assert "the drift curves (the model against its own earlier activations) as a family" in md
    last = cb.history[-1]
    shown = {}
    for line in md.splitlines():
        cells = [c.strip().replace("\\", "") for c in line.split("|")]
        if len(cells) > 7 and cells[1].startswith(("frozen/", "prev/")):
            shown[cells[1]] = cells[6]
    for family in ("frozen", "prev"):
        labels = [f"{family}/linear_cka", f"{family}/mutual_knn"]
        q = _bh([last[f"alignment/{label}/p_value"] for label in labels])
        assert [shown[label] for label in labels] == [f"{v:.4g}" for v in q]


# ------------------------------------------------------------- Markdown escaping
@pytest.mark.parametrize("text, shown", [
    ("a&amp;b", "a&amp;b"), ("a&lt;b", "a&lt;b"), ("&#60;b&#62;", "&#60;b&#62;"),
    ("two\nlines", "two lines"), ("x|y", "x|y")])
def test_markdown_texts_render_as_written(text, shown):
    """Entities (&amp;) rendered as the character they name, and a newline split a table row."""
    import html

    import markdown_it  # a CommonMark renderer (installed with rich, Lightning's progress bars)

    from alignment_callback.engine.report import markdown_escape

    md = markdown_it.MarkdownIt("commonmark").enable("table")
    rendered = md.render(f"| a | b |\n|---|---|\n| {markdown_escape(text)} | x |\n")
    rows = re.findall(r"<tr>(.*?)</tr>", rendered, re.S)
    assert len(rows) == 2  # the header and one row
    cell = re.search(r"<td>(.*?)</td>", rows[1], re.S).group(1)
    assert html.unescape(cell) == shown
