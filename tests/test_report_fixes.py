"""Fixes of the end-of-fit report: curve labels given or read without dropping references named
``.../layer/...``, distinct report files per ``log_prefix``, sentences that agree with the
Benjamini–Hochberg column, the curve table saying how many steps it shows, skipped steps, the
note on missing last heatmaps, validation in the plots, and unknown settings.

Report numbers are compared with values computed here from the history (float64 NumPy)."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from alignment_callback.callback.feedback import report_files, write_report
from alignment_callback.engine import StepResult
from alignment_callback.engine.report import curve_sentence, training_report
from alignment_callback.functional import calibrated_layer_alignment
from alignment_callback.metrics.plotting import (
    history_series,
    plot_layer_heatmap,
    plot_scores,
)

ALPHA = 0.05


# ------------------------------------------------------------------------------- helpers
def numpy_bh(p: list[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values from the definition (float64):
    q_(i) = min_{j ≥ i} m p_(j) / j, capped at 1."""
    p_arr = np.asarray(p, dtype=np.float64)
    m = p_arr.size
    order = np.argsort(p_arr)
    scaled = p_arr[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


def entry(epoch: int, step: int, values: dict[str, tuple[float, float, float, float]],
          prefix: str = "alignment") -> dict[str, Any]:
    """A history entry: ``{label: (raw, threshold, p_value, ...)}``; calibrated from the
    definition max((raw − τ)/(1 − τ), 0)."""
    out: dict[str, Any] = {"epoch": epoch, "step": step}
    for label, (raw, tau, p, _) in values.items():
        out.update({f"{prefix}/{label}/raw": raw, f"{prefix}/{label}/threshold": tau,
                    f"{prefix}/{label}/p_value": p,
                    f"{prefix}/{label}/calibrated": max((raw - tau) / (1 - tau), 0.0)})
    return out


def md_tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (header first)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in md.splitlines() + [""]:
        if line.startswith("| "):
            current.append([c.strip() for c in line.strip("|").split(" | ")])
        elif line.startswith("|---"):
            continue
        elif current:
            tables.append(current)
            current = []
    return tables


def section(md: str, heading: str) -> str:
    """The text of a ``## heading`` section."""
    start = md.index(f"## {heading}\n")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def final_rows(md: str) -> dict[str, list[str]]:
    table = md_tables(section(md, "Final values"))[0]
    return {row[0]: row for row in table[1:]}


def small_result(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = {"l1": torch.randn(40, 5, generator=g)}
    y = {"r1": torch.randn(40, 5, generator=g)}
    return calibrated_layer_alignment(x, y, "linear_cka", num_permutations=19)


# ---------------------------------------------- 2. a reference named ".../layer/..." stays
LAYER_REF = "dino/layer/8/linear_cka"


def layer_ref_history() -> list[dict[str, Any]]:
    h = []
    for e, (p1, p2) in enumerate([(0.4, 0.3), (0.01, 0.04)]):
        d = entry(e, 4 * e, {LAYER_REF: (0.3 + 0.2 * e, 0.2, p1, 0),
                             "clip/linear_cka": (0.25 + 0.1 * e, 0.21, p2, 0)})
        # drift-like per-layer keys and per-pair keys of both labels: not curves
        for label in (LAYER_REF, "clip/linear_cka"):
            d[f"alignment/{label}/layer/fc1/raw"] = 0.9
            d[f"alignment/{label}/layer/fc1/calibrated"] = 0.8
            d[f"alignment/{label}/pair/fc1__r"] = 0.7
        h.append(d)
    return h


def test_history_series_keeps_a_reference_named_with_a_layer_segment() -> None:
    h = layer_ref_history()
    series = history_series(h)
    assert set(series) == {"", LAYER_REF, "clip/linear_cka"}
    assert series[LAYER_REF]["raw"] == [d[f"alignment/{LAYER_REF}/raw"] for d in h]
    assert set(series[LAYER_REF]) == {"raw", "threshold", "p_value", "calibrated"}


def test_history_series_takes_the_given_labels_exactly() -> None:
    h = layer_ref_history()
    series = history_series(h, labels=["clip/linear_cka", LAYER_REF])
    assert list(series) == ["", "clip/linear_cka", LAYER_REF]  # in the given order
    assert series["clip/linear_cka"]["p_value"] == [d["alignment/clip/linear_cka/p_value"]
                                                    for d in h]
    # a label only: another label's per-layer curve is not one unless named
    only = history_series(h, labels=[f"{LAYER_REF}/layer/fc1"])
    assert list(only) == ["", f"{LAYER_REF}/layer/fc1"]
    assert only[f"{LAYER_REF}/layer/fc1"]["raw"] == [0.9, 0.9]


@pytest.mark.parametrize("labels", [None, [LAYER_REF, "clip/linear_cka"]])
def test_the_bh_family_holds_a_reference_named_with_a_layer_segment(labels) -> None:
    h = layer_ref_history()
    md = training_report(h, {"alpha": ALPHA}, labels=labels).to_markdown()
    rows = final_rows(md)
    assert set(rows) == {LAYER_REF, "clip/linear_cka"}
    last = h[-1]
    labels_ = [LAYER_REF, "clip/linear_cka"]
    q = numpy_bh([last[f"alignment/{k}/p_value"] for k in labels_])
    for label, q_i in zip(labels_, q):
        assert float(rows[label][5]) == pytest.approx(q_i, rel=1e-3)
        assert rows[label][6] == ("yes" if q_i <= ALPHA else "no")
        assert float(rows[label][1]) == pytest.approx(last[f"alignment/{label}/raw"], abs=5e-5)
    assert f"{LAYER_REF} raw" in md_tables(section(md, "Curves"))[0][0]


def test_plot_scores_plots_a_named_measure_of_a_layer_named_reference() -> None:
    import matplotlib.pyplot as plt

    h = layer_ref_history()
    fig, ax = plot_scores(h, measure=LAYER_REF)
    raw = next(line for line in ax.lines if line.get_label() == "raw")
    assert list(raw.get_ydata()) == pytest.approx([d[f"alignment/{LAYER_REF}/raw"] for d in h])
    plt.close(fig)


def test_write_report_passes_the_labels_through(tmp_path: Path) -> None:
    h = layer_ref_history()
    md, _ = write_report(str(tmp_path), h, {}, {}, "alignment", ALPHA,
                         labels=["clip/linear_cka"])
    assert set(final_rows(Path(md).read_text("utf-8"))) == {"clip/linear_cka"}


# ---------------------------------------------------------- 3. one report file per prefix
def test_prefixes_that_sanitize_alike_write_distinct_reports(tmp_path: Path) -> None:
    r = small_result()
    written = {}
    for prefix, label in (("probe/a", "linear_cka"), ("probe_a", "mutual_knn"),
                          ("probé", "cknna")):
        history = [StepResult(0, 0, {label: r}, 40).history_entry(prefix)]
        written[prefix] = write_report(str(tmp_path), history, {}, {label: r}, prefix, ALPHA)
    md_a, md_b, md_c = (written[p][0] for p in ("probe/a", "probe_a", "probé"))
    sha = {p: hashlib.sha1(p.encode("utf-8")).hexdigest()[:8] for p in ("probe/a", "probé")}
    assert Path(md_a).name == f"alignment_report_probe_a-{sha['probe/a']}.md"
    assert Path(md_b).name == "alignment_report_probe_a.md"  # unchanged: nothing replaced
    assert Path(md_c).name == f"alignment_report_prob_-{sha['probé']}.md"
    texts = {p: Path(written[p][0]).read_text("utf-8") for p in written}
    assert "linear_cka" in texts["probe/a"] and "mutual_knn" not in texts["probe/a"]
    assert "mutual_knn" in texts["probe_a"] and "linear_cka" not in texts["probe_a"]
    assert "cknna" in texts["probé"]
    files = [set(report_files(written[p][0])) for p in written]
    assert all(not (a & b) for i, a in enumerate(files) for b in files[i + 1:])  # no file shared
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", Path(f).name) for f in set().union(*files))


# ------------------------------------------- 4. the sentence agrees with the BH decision
def bh_history(p_last: list[float]) -> tuple[list[dict[str, Any]], list[str]]:
    names = [f"m{i}" for i in range(len(p_last))]
    h = [entry(0, 0, {n: (0.1, 0.2, 0.5, 0) for n in names}),
         entry(1, 8, {n: (0.5 if p <= ALPHA else 0.15, 0.2, p, 0)
                      for n, p in zip(names, p_last)})]
    return h, names


@pytest.mark.parametrize("seed", range(6))
def test_reading_says_above_chance_only_when_bh_keeps_the_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p_last = [float(v) for v in rng.choice([0.002, 0.01, 0.03, 0.04, 0.045, 0.3], size=4)]
    h, names = bh_history(p_last)
    md = training_report(h, {"alpha": ALPHA}).to_markdown()
    q = numpy_bh(p_last)
    reading = section(md, "Reading")
    rows = final_rows(md)
    for name, p, q_i in zip(names, p_last, q):
        sentence = next(line for line in reading.splitlines() if line.startswith(f"{name}:"))
        kept = q_i <= ALPHA
        assert rows[name][6] == ("yes" if kept else "no")
        assert float(rows[name][5]) == pytest.approx(q_i, rel=1e-3)
        assert ("above chance at the last step" in sentence) == kept, (sentence, q_i)
        if p <= ALPHA and not kept:  # above τ, calibrated > 0, but not kept by BH
            assert "not above chance after Benjamini–Hochberg" in sentence
        if p <= ALPHA:
            assert f"p_BH = {q_i:.4g}" in sentence


def test_the_audit_case_no_longer_says_above_chance() -> None:
    h, _ = bh_history([0.03, 0.04, 0.6])
    md = training_report(h, {"alpha": ALPHA}).to_markdown()
    q = numpy_bh([0.03, 0.04, 0.6])
    assert q[0] > ALPHA and q[1] > ALPHA
    assert "above chance at the last step" not in section(md, "Reading")
    assert f"(p_BH = {q[0]:.4g} > 0.05)" in md


def test_curve_sentence_without_bh_reads_as_before() -> None:
    assert curve_sentence("m", [0.1, 0.3], [0.0, 0.2], 0.12, 0.03).endswith(
        "above chance at the last step (τ = 0.12, p = 0.03).")


# ---------------------------------------------------- 7. the curve table says what it shows
@pytest.mark.parametrize("count, max_rows", [(61, 50), (7, 3), (5, 50)])
def test_the_curve_table_says_how_many_steps_it_shows(count: int, max_rows: int) -> None:
    h = [entry(e // 4, e, {"linear_cka": (0.3 + 0.001 * e, 0.2, 0.01, 0)}) for e in range(count)]
    md = training_report(h, max_rows=max_rows).to_markdown()
    curves = section(md, "Curves")
    rows = md_tables(curves)[0][1:]
    expected = sorted({round(i * (count - 1) / (min(count, max_rows) - 1))
                       for i in range(min(count, max_rows))})
    assert [int(r[1]) for r in rows] == [h[i]["step"] for i in expected]
    for r in rows:
        d = h[int(r[1])]
        assert int(r[0]) == d["epoch"]
        assert float(r[2]) == pytest.approx(d["alignment/linear_cka/raw"], abs=5e-5)
        assert float(r[3]) == pytest.approx(d["alignment/linear_cka/calibrated"], abs=5e-5)
    note = f"{len(rows)} of {count} steps shown, evenly spaced; every step is in the logs."
    assert (note in curves) == (len(rows) < count)


# ------------------------------------------------------------------- 8. skipped steps
SKIPPED = [{"epoch": 1, "step": 8, "reason": "ValueError: NaN in the activations of fc1"},
           {"epoch": 2, "step": 16, "reason": "RuntimeError: out of\nmemory | retry"}]


def test_skipped_steps_are_listed() -> None:
    h = [entry(e, 8 * e, {"linear_cka": (0.4, 0.2, 0.01, 0)}) for e in (0, 3)]
    md = training_report(h, {"alpha": ALPHA}, skipped=SKIPPED).to_markdown()
    table = md_tables(section(md, "Skipped steps"))[0]
    assert table[0] == ["epoch", "step", "reason"]
    assert [r[:2] for r in table[1:]] == [[str(s["epoch"]), str(s["step"])] for s in SKIPPED]
    assert table[1][2] == SKIPPED[0]["reason"]
    assert table[2][2] == "RuntimeError: out of memory \\| retry"  # one line, | escaped
    assert "2 alignment steps failed and were skipped" in section(md, "Reading")
    assert "Skipped steps" not in training_report(h).to_markdown()


def test_a_report_is_written_when_no_step_succeeded(tmp_path: Path) -> None:
    md, html = write_report(str(tmp_path), [], {"alpha": ALPHA, "null methods": "x"}, {},
                            "alignment", ALPHA, skipped=SKIPPED)
    text = Path(md).read_text("utf-8")
    assert "No alignment step succeeded: 2 steps failed" in text
    table = md_tables(section(text, "Skipped steps"))[0]
    assert [r[:2] for r in table[1:]] == [["1", "8"], ["2", "16"]]
    assert "null methods: x" in text and Path(html).is_file()
    assert "No alignment step was recorded." in training_report([]).to_markdown()


# ------------------------------------------------------- 6. no last heatmaps after a resume
def test_a_report_without_last_heatmaps_says_why(tmp_path: Path) -> None:
    r = small_result()
    h = [StepResult(e, 4 * e, {"linear_cka": r}, 40).history_entry() for e in range(2)]
    md, _ = write_report(str(tmp_path / "resumed"), h, {}, {}, "alignment", ALPHA)
    figures = section(Path(md).read_text("utf-8"), "Figures")
    assert "heatmaps are not available" in figures and "resumed at its end" in figures
    assert figures.count("![") == 1  # the curves only
    md2, _ = write_report(str(tmp_path / "fresh"), h, {}, {"linear_cka": r}, "alignment", ALPHA)
    figures = section(Path(md2).read_text("utf-8"), "Figures")
    assert "not available" not in figures and figures.count("![") == 2


# ---------------------------------------------------------------------- 10. plot validation
def test_plot_scores_names_a_missing_threshold() -> None:
    h = [{"epoch": 0, "step": 0, "alignment/cka/raw": 0.3, "alignment/cka/calibrated": 0.1}]
    with pytest.raises(ValueError, match="alignment/cka/threshold"):
        plot_scores(h)
    with pytest.raises(ValueError, match=r"val\[0\] has no 'threshold'"):
        plot_scores({"raw": 0.3, "calibrated": 0.1})
    with pytest.raises(ValueError, match="steps has 3 values for 1 points"):
        plot_scores({"raw": 0.3, "calibrated": 0.1, "threshold": 0.2}, steps=[0, 1, 2])


def test_plot_scores_with_an_infinite_threshold_sets_finite_limits() -> None:
    import matplotlib.pyplot as plt

    points = [{"raw": 0.3, "calibrated": 0.0, "threshold": math.inf},
              {"raw": 1.4, "calibrated": -0.1, "threshold": 0.2}]
    fig, ax = plot_scores(points)
    finite = [0.3, 0.0, 1.4, -0.1, 0.2]
    low, high = ax.get_ylim()
    assert low == pytest.approx(min(0.0, *finite) - 0.02)
    assert high == pytest.approx(max(1.0, 0.3, 1.4, 0.2) + 0.02)
    plt.close(fig)


@pytest.mark.parametrize("args, match", [
    (([[0.1, 0.2]], ["a"], ["b"]), "y_names has 1 names for the matrix's 2 columns"),
    (([[0.1, 0.2]], ["a", "z"], ["b", "c"]), "x_names has 2 names for the matrix's 1 rows"),
    ((torch.zeros(0, 0), [], []), "matrix is empty"),
    (([0.1, 0.2], ["a"], ["b"]), "matrix must be 2-D"),
])
def test_plot_layer_heatmap_names_a_bad_argument(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        plot_layer_heatmap(*args)


def test_plot_layer_heatmap_checks_argmax_and_marks_and_skips_nan_in_the_colors() -> None:
    import matplotlib.pyplot as plt

    with pytest.raises(ValueError, match="argmax"):
        plot_layer_heatmap([[0.1, 0.2]], ["a"], ["b", "c"], argmax=(1, 0))
    with pytest.raises(ValueError, match="marks"):
        plot_layer_heatmap([[0.1, 0.2]], ["a"], ["b", "c"], marks=[[True]])
    # not a pair, and ragged marks: the argument is named (were TypeError / NumPy's message)
    with pytest.raises(ValueError, match=r"argmax must be \(row, column\) .* got 7"):
        plot_layer_heatmap([[0.1, 0.2]], ["a"], ["b", "c"], argmax=7)
    with pytest.raises(ValueError, match="marks must be a 2×2 boolean matrix"):
        plot_layer_heatmap([[0.1, 0.2], [0.3, 0.4]], ["a", "b"], ["c", "d"],
                           marks=[[True, False], [True]])
    fig, ax = plot_layer_heatmap([[math.nan, 1.5], [-0.3, 0.2]], ["a", "b"], ["c", "d"])
    lo, hi = ax.images[0].get_clim()
    assert (lo, hi) == (pytest.approx(-0.3), pytest.approx(1.5))
    plt.close(fig)


# ------------------------------------------------------------------------ settings shown
def test_unknown_settings_are_shown_readably() -> None:
    h = [entry(0, 0, {"linear_cka": (0.4, 0.2, 0.01, 0)})]
    settings = {"null methods": "linear_cka: moments; mutual_knn: permutation",
                "layers": ["fc1", "fc2"], "options": {"k": 10}, "tolerance": 1e-6}
    md = section(training_report(h, settings).to_markdown(), "Settings")
    for line in ("- null methods: linear_cka: moments; mutual_knn: permutation",
                 "- layers: fc1, fc2", "- options: k: 10", "- tolerance: 1e-06"):
        assert line in md, md
