"""The Markdown / HTML report builders (``alignment_callback.engine.report``) on small synthetic
inputs: the numbers in the report are the inputs, the sentences count what they say."""

from __future__ import annotations

import html
import re

import pytest
import torch

from alignment_callback.engine.report import (
    Report,
    bh_adjust,
    curve_sentence,
    history_series,
    matrix_report,
    matrix_sentence,
    training_report,
)
from alignment_callback.functional import benjamini_hochberg

ROWS = [
    {"x": "a", "y": "b", "measure": "mutual_knn", "raw": 0.4213, "threshold": 0.1875,
     "calibrated": 0.2881, "p_value": 0.001996},
    {"x": "a", "y": "c", "measure": "mutual_knn", "raw": 0.1533, "threshold": 0.1912,
     "calibrated": 0.0, "p_value": 0.4311},
    {"x": "d", "y": "b", "measure": "mutual_knn", "raw": 0.3301, "threshold": 0.1799,
     "calibrated": 0.1832, "p_value": 0.003992},
    {"x": "a", "y": "b", "measure": "linear_cka", "raw": 0.7236, "threshold": 0.1342,
     "calibrated": 0.6808, "p_value": 0.001996},
]
SETTINGS = {"n": 300, "permutations": 500, "alpha": 0.05, "aggregate": "max", "seed": 0,
            "measures": {"mutual_knn": {"k": 10}, "linear_cka": {}},
            "x_files": ["a.pt", "d.pt"], "y_files": ["b.pt", "c.pt"]}


def table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]


def test_matrix_report_numbers_equal_inputs_and_bh():
    report = matrix_report(SETTINGS, ROWS, images=[("heat", "matrix_mutual_knn.png")])
    md = report.to_markdown()
    rows = table_rows(md)
    assert rows[0][:6] == ["x", "y", "measure", "raw", "τ", "calibrated"]
    body = {(r[0], r[1], r[2]): r for r in rows[1:]}
    assert len(body) == len(ROWS)
    knn = [r for r in ROWS if r["measure"] == "mutual_knn"]
    _, adjusted = benjamini_hochberg(torch.tensor([r["p_value"] for r in knn],
                                                  dtype=torch.float64))
    for r in ROWS:
        cells = body[(r["x"], r["y"], r["measure"])]
        for k, name in enumerate(("raw", "threshold", "calibrated"), start=3):
            assert float(cells[k]) == pytest.approx(r[name], abs=5e-5)
        assert float(cells[6]) == pytest.approx(r["p_value"], rel=1e-3)
    for r, q in zip(knn, adjusted.tolist()):
        cells = body[(r["x"], r["y"], "mutual_knn")]
        assert float(cells[7]) == pytest.approx(q, rel=1e-3)
        assert cells[8] == ("yes" if q <= 0.05 else "no")
    # one sentence per measure, counting the BH decisions and quoting the largest raw / tau
    assert ("mutual_knn: 2 of 3 pairs are aligned above chance after BH at q ≤ 0.05; raw "
            "scores reach 0.42 but chance alone reaches 0.19 at this width and depth.") in md
    assert "linear_cka: the pair is aligned above chance after BH at q ≤ 0.05" in md
    for text in ("n (probe samples): 300", "K (permutations): 500", "mutual_knn (k=10)",
                 "files (rows, X): a.pt, d.pt", "aggregate over layer pairs: max",
                 "![heat](matrix_mutual_knn.png)"):
        assert text in md, text
    page = report.to_html()
    assert '<img src="matrix_mutual_knn.png" alt="heat">' in page
    assert page.count("<tr>") == len(ROWS) + 1 and "0.4213" in page and "q ≤ 0.05" in page


def test_matrix_report_uses_given_bh_and_counts_extremes():
    rows = [dict(r, p_bh=0.5, significant=False) for r in ROWS if r["measure"] == "mutual_knn"]
    md = matrix_report(SETTINGS, rows).to_markdown()
    assert "none of the 3 pairs is aligned above chance" in md
    assert all(r[7] == "0.5" and r[8] == "no" for r in table_rows(md)[1:])
    both = [{"raw": 0.9, "threshold": 0.1, "significant": True}] * 2
    assert matrix_sentence("m", both, 0.1).startswith(
        "m: all 2 pairs are aligned above chance after BH at q ≤ 0.1")


def history(raw, cal, p, tau, measure="linear_cka"):
    return [{"epoch": e, "step": 10 * e, f"alignment/{measure}/raw": r,
             f"alignment/{measure}/calibrated": c, f"alignment/{measure}/p_value": q,
             f"alignment/{measure}/threshold": t, f"alignment/{measure}/best_pair": "fc2|fc2"}
            for e, (r, c, q, t) in enumerate(zip(raw, cal, p, tau))]


def test_training_report_curves_final_values_and_sentences():
    h = history([0.31, 0.42, 0.52], [0.0, 0.0, 0.0], [0.6, 0.3, 0.2], [0.55, 0.56, 0.57])
    knn = history([0.10, 0.20, 0.30], [0.0, 0.05, 0.21], [0.5, 0.04, 0.002],
                  [0.11, 0.12, 0.12], "mutual_knn")
    for entry, other in zip(h, knn):
        entry.update(other)
    report = training_report(h, {"n": 64, "alpha": 0.05, "permutations": 200},
                             images=[("curves", "alignment_curves.png")])
    md = report.to_markdown()
    assert ("linear_cka: raw rose 0.31 → 0.52 while calibrated stayed 0: the rise is what "
            "chance reaches at this width (τ = 0.57 at the last step).") in md
    assert ("mutual_knn: raw rose 0.10 → 0.30 and calibrated rose 0.00 → 0.21: above chance "
            "at the last step (τ = 0.12, p = 0.002).") in md
    rows = table_rows(md)
    final = {r[0]: r for r in rows if r[0] in ("linear_cka", "mutual_knn")}
    adjusted = bh_adjust([0.2, 0.002])
    assert final["linear_cka"][1:5] == ["0.5200", "0.5700", "0.0000", "0.2"]
    assert float(final["linear_cka"][5]) == pytest.approx(adjusted[0])
    assert float(final["mutual_knn"][5]) == pytest.approx(adjusted[1], rel=1e-3)
    assert final["mutual_knn"][6] == "yes" and final["linear_cka"][6] == "no"
    assert final["linear_cka"][7] == "fc2 ~ fc2"
    curve = [r for r in rows if r[0] in ("0", "1", "2")]
    assert [r[:4] for r in curve] == [["0", "0", "0.3100", "0.0000"],
                                      ["1", "10", "0.4200", "0.0000"],
                                      ["2", "20", "0.5200", "0.0000"]]
    assert "![curves](alignment_curves.png)" in md and "K (permutations): 200" in md
    assert "<h2>Final values</h2>" in report.to_html()


@pytest.mark.parametrize("pair,cell", [("fc2|teacher", "fc2 ~ teacher"),
                                       ("a|b|r", "a\\|b\\|r")])
def test_the_best_pair_cell_splits_only_an_unambiguous_pair(pair, cell):
    """A pair whose layer names hold a "|" themselves cannot be split where the history joined
    it ("a|b" against "r", or "a" against "b|r"): it is shown as logged, not as three layers."""
    h = history([0.3], [0.0], [0.5], [0.5])
    h[0]["alignment/linear_cka/best_pair"] = pair
    row = [line for line in training_report(h).to_markdown().splitlines()
           if line.startswith("| linear_cka |")]
    assert len(row) == 1 and row[0].endswith(f"| {cell} |")


def test_history_helpers_and_edge_cases():
    h = [{"epoch": 0, "step": 0, "alignment/cka/raw": 0.2},
         {"epoch": 1, "step": 5, "alignment/cka/raw": 0.2, "alignment/cka/calibrated": 0.0}]
    series = history_series(h)
    assert series["cka"]["raw"] == [0.2, 0.2] and series["cka"]["calibrated"] == [None, 0.0]
    assert curve_sentence("cka", [0.2, 0.2], [0.0, 0.0]) == (
        "cka: raw stayed at 0.20 while calibrated stayed 0: no step is above what chance "
        "reaches at this width.")
    assert curve_sentence("cka", [0.5, 0.3], [0.4, 0.0], 0.3, 0.4).endswith(
        "calibrated fell 0.40 → 0.00: at chance level at the last step (τ = 0.30, p = 0.4).")
    assert "No alignment step" in training_report([]).to_markdown()
    r = Report("t")
    r.table(["a"], [["<b>|"]])
    assert "<b>\\|" in r.to_markdown() and "&lt;b&gt;|" in r.to_html()
    assert re.search(r"<title>t</title>", r.to_html())


def test_a_p_value_on_the_boundary_is_significant_in_the_reports():
    """BH's boundary p_(i) = i·α/m, also as a float32 p-value (float32(0.05) > 0.05): the
    report agrees with benjamini_hochberg."""
    import numpy as np

    from alignment_callback.engine.report import matrix_report

    ps = [0.001, 0.01, float(np.float32(0.05))] + [0.9] * 9
    rows = [{"x": f"a{i}", "y": "b", "measure": "linear_cka", "raw": 0.5, "threshold": 0.2,
             "calibrated": 0.3, "p_value": p} for i, p in enumerate(ps)]
    md = matrix_report({"n": 100, "alpha": 0.2}, rows).to_markdown()
    assert "3 of 12 pairs are aligned above chance" in md
    line = next(t for t in md.splitlines() if t.startswith("| a2 |"))
    assert line.rstrip(" |").endswith("yes")
    rejected, _ = benjamini_hochberg(torch.tensor(ps, dtype=torch.float32), alpha=0.2)
    assert rejected.tolist() == [True] * 3 + [False] * 9


# ------------------------------------------------------------------ Markdown shows the text
TRICKY = ["**.fc and blocks.*.attn", "__main__.fc ~ *ref*", "C:\\dir\\|x", "linear_cka, p <= 0.05",
          "- 0.3 is not a list", "1. not a list either", "# not a heading", "<b>not bold</b>",
          "`code` [link](x) ~~struck~~ a_b_c _x_ fc1 ~ fc2", "> not a quote"]
MARKUP = ("<strong>", "<em>", "<code>", "<a ", "<b>", "<s>", "<del>", "<ol", "<ul", "<h2",
          "<blockquote>")


def _render(markdown: str) -> tuple[str, list[str]]:
    """HTML of CommonMark with GFM tables and strikethrough (markdown-it-py), and its text
    lines (tags dropped, entities decoded)."""
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)
    return rendered, html.unescape(re.sub(r"<[^>]+>", "", rendered)).split("\n")


@pytest.mark.parametrize("text", TRICKY)
def test_markdown_shows_every_text_as_given(text):
    """Globs (``**.fc`` rendered bold), dunder names, pipes and backslashes in table cells,
    leading list, heading or quote markers, HTML: a rendered paragraph, bullet, heading, table
    cell and image caption show the text as written, and no other markup appears."""
    cases = {"paragraph": (lambda r: r.paragraph(text), ()),
             "bullet": (lambda r: r.bullets([text]), ("<ul",)),
             "heading": (lambda r: r.heading(text), ("<h2",)),
             "cell": (lambda r: r.table(["h"], [[text]]), ())}
    for kind, (add, expected_tags) in cases.items():
        report = Report("T")
        add(report)
        rendered, lines = _render(report.to_markdown())
        assert text in lines, (kind, lines)
        for tag in MARKUP:
            assert (tag in rendered) == (tag in expected_tags), (kind, tag, rendered)
        if kind == "cell":
            assert rendered.count("<td>") == 1, rendered
    report = Report("T")
    report.image("a.png", text)
    rendered, _ = _render(report.to_markdown())
    assert f'alt="{html.escape(text)}"' in rendered, rendered


def test_the_sentence_prints_a_small_tau_with_its_digits():
    """τ was printed with 2 decimals: a τ of 0.0009 read "τ = 0.00" next to "above chance"."""
    text = curve_sentence("linear_cka", [0.001, 0.0087], [0.0, 0.0078], 0.000916, 0.01)
    assert "τ = 0.00092" in text and "above chance" in text


def test_a_change_below_flat_that_shows_in_the_printed_values_is_not_called_stayed():
    text = curve_sentence("m", [0.312, 0.316], [0.0, 0.004], 0.3, 0.04)
    assert "raw changed little (0.31 → 0.32)" in text  # was "stayed at 0.32"
    assert "calibrated changed little (0.00 → 0.004)" in text
    assert "raw stayed at 0.31" in curve_sentence("m", [0.3121, 0.3124], [0.0, 0.0], 0.4)


def test_a_nan_p_value_at_the_last_step_is_not_applicable_not_a_crash():
    h = history([0.3, 0.4], [0.0, 0.1], [0.2, float("nan")], [0.3, 0.3])
    md = training_report(h).to_markdown()  # raised: p-values must lie in [0, 1]
    row = [line for line in md.splitlines() if line.startswith("| linear_cka |")][0]
    assert row.split(" | ")[4:6] == ["n/a", "n/a"]  # p, p_BH


def test_the_console_line_prints_p_with_the_digits_that_tell_it_from_alpha():
    from dataclasses import replace

    from alignment_callback.callback.feedback import step_lines
    from alignment_callback.engine import AlignmentEngine

    g = torch.Generator().manual_seed(0)
    engine = AlignmentEngine(["linear_cka"], num_permutations=99)
    engine.set_reference({"r": torch.randn(40, 5, generator=g)})
    step = engine.step({"m": torch.randn(40, 5, generator=g)}, epoch=1, step=1)
    r = step.results["linear_cka"]
    step.results["linear_cka"] = replace(r, p_value=torch.tensor(252 / 5000))
    line = step_lines({None: step}, 1, 1)[0]
    assert "(p 0.0504," in line  # was "p 0.05": a p above alpha read as alpha
    step.results["linear_cka"] = replace(r, calibrated=torch.tensor(0.0004))
    assert "calibrated 0.0004 (" in step_lines({None: step}, 1, 1)[0]  # was "0.000"


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_matrix_report_gives_a_pair_without_a_p_value_n_a(bad):
    """A NaN or missing p raised (in Benjamini–Hochberg, or float(None)); the pair is left out
    of the family, shown as n/a, and the others are adjusted among themselves."""
    rows = [{"x": "a", "y": "b", "measure": "m", "raw": 0.8, "threshold": 0.2,
             "calibrated": 0.75, "p_value": 0.002},
            {"x": "a", "y": "c", "measure": "m", "raw": 0.1, "threshold": 0.2,
             "calibrated": 0.0, "p_value": 0.04},
            {"x": "b", "y": "c", "measure": "m", "raw": 0.3, "threshold": 0.2,
             "calibrated": 0.1, "p_value": bad}]
    md = matrix_report({"alpha": 0.05}, rows).to_markdown()
    q = [min(2 * 0.002 / 1, 2 * 0.04 / 2), 2 * 0.04 / 2]  # BH over the two tested pairs
    assert f"| a | b | m | 0.8000 | 0.2000 | 0.7500 | 0.002 | {q[0]:.4g} | yes |" in md
    assert f"| a | c | m | 0.1000 | 0.2000 | 0.0000 | 0.04 | {q[1]:.4g} | yes |" in md
    assert "| b | c | m | 0.3000 | 0.2000 | 0.1000 | n/a | n/a | n/a |" in md
    assert ("m: all 2 pairs are aligned above chance after BH at q ≤ 0.05 (1 more without a "
            "p-value)") in md  # the pair without a p is not counted as tested


def test_a_nan_in_the_history_reads_as_no_value_in_the_sentences():
    h = history([float("nan"), 0.3], [0.1, float("nan")], [0.04, 0.2], [0.1, float("nan")])
    md = training_report(h).to_markdown()
    assert "nan" not in md
    assert "no value at the last step (its last value is at epoch 0, step 0)" in md


def test_one_aligned_pair_is_one_pair_in_the_sentence():
    rows = [{"raw": 0.42, "threshold": 0.19, "significant": True},
            {"raw": 0.10, "threshold": 0.12, "significant": False},
            {"raw": 0.11, "threshold": 0.12, "significant": False}]
    assert "m: 1 of 3 pairs is aligned above chance" in matrix_sentence("m", rows, 0.05)


def test_a_tau_that_prints_as_the_raw_score_is_printed_with_the_digits_between_them():
    """"raw was 0.18 ... above τ (τ = 0.18)" read as a score above itself."""
    text = curve_sentence("mutual_knn", [0.1844], [0.0019], 0.1828, 0.04)
    assert "(τ = 0.1828 against raw 0.1844, p = 0.04)" in text
    assert "(τ = 0.12, p = 0.04)" in curve_sentence("m", [0.30], [0.2], 0.12, 0.04)


def test_a_matrix_report_without_pairs_says_so():
    md = matrix_report({"n": 10, "alpha": 0.05}, []).to_markdown()
    assert "No pair was computed." in md and "## Settings" not in md and "|---|" not in md


def test_pairs_without_a_p_value_are_not_counted_as_tested():
    rows = [{"raw": 0.5, "threshold": 0.2, "significant": True},
            {"raw": 0.5, "threshold": 0.2, "significant": None},
            {"raw": 0.1, "threshold": 0.2, "significant": False}]
    assert "m: 1 of 2 pairs is aligned above chance after BH at q ≤ 0.05 (1 more without a " \
           "p-value)" in matrix_sentence("m", rows, 0.05)
    none = [dict(r, significant=None) for r in rows]
    assert matrix_sentence("m", none, 0.05) == "m: no pair could be tested (3 without a p-value)."


def test_a_tau_within_four_digits_of_raw_gets_the_digits_that_separate_them():
    text = curve_sentence("m", [0.18], [0.0], 0.18000001, 0.2)
    assert "τ = 0.18000001 against raw 0.18" in text
