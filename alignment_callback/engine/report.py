"""Plain-language reports of calibrated results, as Markdown and plain HTML.

Lightning-free and computation-free: the builders take plain data (lists of dicts, as written to
``matrix.json`` or kept in a training history) and return a :class:`Report` that renders the
same content as Markdown (:meth:`Report.to_markdown`) or HTML (:meth:`Report.to_html`, images
referenced by relative path).

* :func:`matrix_report`: a model-pair matrix (``alignment-callback matrix``): settings, a table
  of calibrated values with p and Benjamini–Hochberg-adjusted p per pair and measure, heatmaps,
  and one sentence per measure.
* :func:`training_report`: a training history (the callback's end-of-fit report): settings,
  final values with p and BH across measures, a table of the curves, images, and one sentence
  per curve.
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from alignment_callback.metrics.plotting import history_series

#: Below this absolute change a curve is said to stay where it was.
FLAT = 0.005


# ------------------------------------------------------------------------------ formatting
def fmt(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals; ``None``/NaN as ``n/a``; other values as text.

    >>> fmt(0.123456), fmt(None), fmt(3), fmt("max")
    ('0.1235', 'n/a', '3', 'max')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_p(value: Any) -> str:
    """A p-value with 4 significant digits (``0.001996``).

    >>> fmt_p(1 / 501), fmt_p(0.5), fmt_p(None)
    ('0.001996', '0.5', 'n/a')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.4g}"


def link_target(path: str) -> str:
    """A relative file path as a link target: percent-encoded (spaces, parentheses, ...), so
    that Markdown and HTML links reach the file whatever its name.

    >>> link_target("plots/clip (vit-b).png"), link_target("matrix_linear_cka.png")
    ('plots/clip%20%28vit-b%29.png', 'matrix_linear_cka.png')
    """
    from urllib.parse import quote

    return quote(path, safe="/")


_ALWAYS = frozenset("\\`*[]|&")  # markup wherever they stand (& begins an entity)
_LEADING = re.compile(r"^(?:[#>+=-]|\d+[.)](?=\s|$))")  # a heading, quote or list at the start


def markdown_escape(text: str) -> str:
    r"""``text`` with a backslash before each character Markdown would read as markup, so that
    it renders as written: a glob ``**.fc`` is not bold, ``__main__`` not emphasized, a ``|``
    does not end a table cell, ``&lt;`` is not an entity.  Escaped: ``\ ` * [ ] | &``
    everywhere; ``_`` and ``~`` unless they stand inside a word (``linear_cka``) or between
    spaces (``fc1 ~ fc2``); ``<`` before a tag or link (a letter, ``/``, ``!`` or ``?``); a
    heading, quote or list marker at the start.  Line breaks become spaces (a table row, a
    list item, is one line).

    >>> print(markdown_escape("**.fc | __main__.fc ~ linear_cka, p <= 0.05"))
    \*\*.fc \| \_\_main\_\_.fc ~ linear_cka, p <= 0.05
    >>> print(markdown_escape("- 0.3 <b>"))
    \- 0.3 \<b>
    """
    text = " ".join(text.splitlines()) if "\n" in text or "\r" in text else text
    out = []
    for i, c in enumerate(text):
        before = text[i - 1] if i else " "
        after = text[i + 1] if i + 1 < len(text) else " "
        if (c in _ALWAYS
                or (c == "_" and not (before.isalnum() and after.isalnum()))
                or (c == "~" and not (before.isspace() and after.isspace()))
                or (c == "<" and (after.isalpha() or after in "/!?"))):
            out.append("\\")
        out.append(c)
    escaped = "".join(out)
    leading = _LEADING.match(escaped)
    if leading:  # the marker's last character: "-" or the "." of "1."
        cut = leading.end() - 1
        escaped = escaped[:cut] + "\\" + escaped[cut:]
    return escaped


def options_text(kwargs: Mapping[str, Any] | None) -> str:
    """A measure's options as the reports and CSV files write them (empty: none).

    >>> options_text({"k": 3, "sigma": "median"})
    'k=3, sigma=median'
    """
    return ", ".join(f"{k}={v}" for k, v in (kwargs or {}).items())


# ---------------------------------------------------------------------------------- report
@dataclass
class Report:
    """A document of headings, paragraphs, bullet lists, tables and images.

    Examples
    --------
    >>> r = Report("Demo")
    >>> r.paragraph("one | two")
    >>> r.table(["a", "b"], [["1", "x|y"]])
    >>> print(r.to_markdown())
    # Demo
    <BLANKLINE>
    one \\| two
    <BLANKLINE>
    | a | b |
    |---|---|
    | 1 | x\\|y |
    <BLANKLINE>
    """

    title: str
    blocks: list[tuple[Any, ...]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: Iterable[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
        self.blocks.append(("table", list(headers), [list(map(str, r)) for r in rows]))

    def image(self, src: str, alt: str) -> None:
        self.blocks.append(("image", src, alt))

    # --------------------------------------------------------------------------- rendering
    def to_markdown(self) -> str:
        """The report as GitHub-flavored Markdown.  Every text is shown as given: the
        characters Markdown would read as markup (``*`` and ``_`` of globs and layer names,
        ``|`` in a table cell, ...) are escaped."""
        e = markdown_escape
        out = [f"# {e(self.title)}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += ["#" * block[1] + " " + e(block[2]), ""]
            elif kind == "paragraph":
                out += [e(block[1]), ""]
            elif kind == "bullets":
                out += [f"- {e(item)}" for item in block[1]] + [""]
            elif kind == "table":
                cells = [[e(c) for c in row] for row in [block[1], *block[2]]]
                out.append("| " + " | ".join(cells[0]) + " |")
                out.append("|" + "|".join("---" for _ in cells[0]) + "|")
                out += ["| " + " | ".join(row) + " |" for row in cells[1:]]
                out.append("")
            elif kind == "image":
                out += [f"![{e(block[2])}]({link_target(block[1])})", ""]
        return "\n".join(out)

    def to_html(self) -> str:
        """The same content as a self-contained HTML page (images by relative path)."""
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                body.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                body.append(f"<p>{e(block[1])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                               for r in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "image":
                src = e(link_target(block[1]))
                body.append(f'<p><img src="{src}" alt="{e(block[2])}"></p>')
        style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 8px;"
                 "text-align:left}img{max-width:100%}")
        return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{e(self.title)}</title><style>{style}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")

    def write(self, markdown_path: str | os.PathLike,
              html_path: str | os.PathLike | None = None) -> list[Path]:
        """Write the Markdown (and, if given, the HTML) file as UTF-8, whatever the locale;
        returns the paths written."""
        paths = [Path(markdown_path)]
        paths[0].write_text(self.to_markdown(), encoding="utf-8")
        if html_path is not None:
            paths.append(Path(html_path))
            paths[1].write_text(self.to_html(), encoding="utf-8")
        return paths


# --------------------------------------------------------------------------------- helpers
def significant(q: float, alpha: float) -> bool:
    """``q ≤ α`` as :func:`~alignment_callback.functional.fdr.benjamini_hochberg` decides it
    for float32 p-values (the history's may be float32 results: float32(0.05) = 0.0500000007
    > 0.05, and one on the boundary is significant).

    >>> significant(float(__import__("numpy").float32(0.05)), 0.05)
    True
    """
    import torch

    from alignment_callback.functional.fdr import at_most_alpha

    return bool(at_most_alpha(q, alpha, torch.float32))


def bh_adjust(p_values: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values of a flat list (the library's
    :func:`~alignment_callback.functional.fdr.benjamini_hochberg`).

    >>> [round(q, 6) for q in bh_adjust([0.01, 0.04, 0.03])]
    [0.03, 0.04, 0.04]
    """
    if not p_values:
        return []
    import torch

    from alignment_callback.functional.fdr import benjamini_hochberg

    _, adjusted = benjamini_hochberg(torch.tensor([float(p) for p in p_values],
                                                  dtype=torch.float64))
    return [float(q) for q in adjusted]


def _settings_bullets(settings: Mapping[str, Any]) -> list[str]:
    s = dict(settings)
    items = []
    labels = [("n", "n (probe samples)"), ("permutations", "K (permutations)"),
              ("alpha", "α (level of the threshold τ and of the BH false discovery rate)"),
              ("aggregate", "aggregate over layer pairs"), ("seed", "permutation seed")]
    for key, label in labels:
        if key in s:
            value = s.pop(key)
            items.append(f"{label}: {value:g}" if key == "alpha" and isinstance(value, float)
                         else f"{label}: {fmt(value)}")
    if "measures" in s:
        measures = s.pop("measures")
        if isinstance(measures, Mapping):
            text = "; ".join(f"{m} ({options_text(o)})" if o else m for m, o in measures.items())
        else:
            text = ", ".join(map(str, measures))
        items.append(f"measures: {text}")
    for key in ("x_files", "y_files", "files"):
        if key in s:
            value = s.pop(key)
            names = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            label = {"x_files": "files (rows, X)", "y_files": "files (columns, Y)"}.get(key, key)
            items.append(f"{label}: {names}")
    items += [f"{k}: {_setting(v)}" for k, v in s.items()]
    return items


def _setting(value: Any) -> str:
    """A setting of no known key as text: a mapping as ``key: value; ...``, a list, tuple or
    set as ``a, b``, a float with up to 6 significant digits, anything else as :func:`fmt`.

    >>> _setting({"linear_cka": "moments"}), _setting(("fc1", "fc2")), _setting(1e-06)
    ('linear_cka: moments', 'fc1, fc2', '1e-06')
    """
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_setting(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_setting(v) for v in value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return fmt(value)


def matrix_sentence(measure: str, rows: Sequence[Mapping[str, Any]], alpha: float) -> str:
    """One plain sentence reading a measure's pairs.

    ``rows`` hold ``raw``, ``threshold`` and ``significant`` (BH decision) per pair; a row
    with ``self`` true (a model against itself) is not counted.

    >>> rows = [{"raw": 0.42, "threshold": 0.19, "significant": True},
    ...         {"raw": 0.10, "threshold": 0.12, "significant": False}]
    >>> print(matrix_sentence("mutual_knn", rows, 0.05))  # doctest: +NORMALIZE_WHITESPACE
    mutual_knn: 1 of 2 pairs is aligned above chance after BH at q ≤ 0.05; raw scores
    reach 0.42 but chance alone reaches 0.19 at this width and depth.
    """
    rows = [r for r in rows if not r.get("self")]
    untested = sum("significant" in r and r["significant"] is None for r in rows)
    rows = [r for r in rows if not ("significant" in r and r["significant"] is None)]
    m = len(rows)
    k = sum(bool(r.get("significant")) for r in rows)
    if m == 0:
        return (f"{measure}: no pair could be tested ({untested} without a p-value)." if untested
                else f"{measure}: no pair of two different models to test.")
    if k == 0:
        head = f"none of the {m} pairs is aligned above chance" if m > 1 else \
            "the pair is not aligned above chance"
    elif k == m:
        head = f"all {m} pairs are aligned above chance" if m > 1 else \
            "the pair is aligned above chance"
    else:
        head = f"{k} of {m} pairs {'is' if k == 1 else 'are'} aligned above chance"
    raws = [r["raw"] for r in rows if r.get("raw") is not None]
    taus = [r["threshold"] for r in rows if r.get("threshold") is not None]
    tail = ""
    if raws and taus:
        tail = (f"; raw scores reach {max(raws):.2f} but chance alone reaches {max(taus):.2f} at "
                "this width and depth")
    without = f" ({untested} more without a p-value)" if untested else ""
    return f"{measure}: {head} after BH at q ≤ {alpha:g}{without}{tail}."


# ---------------------------------------------------------------------------------- matrix
def matrix_report(
    settings: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    images: Sequence[tuple[str, str]] = (),
    alpha: float | None = None,
    title: str = "Calibrated alignment matrix",
    notes: Sequence[str] = (),
) -> Report:
    """The report of a model-pair matrix.

    Parameters
    ----------
    settings : mapping
        Shown as a list; known keys first: ``n``, ``permutations``, ``alpha``, ``aggregate``,
        ``seed``, ``measures`` (``{name: options}``), ``x_files``, ``y_files``.
    rows : sequence of mappings
        One per pair and measure: ``x``, ``y``, ``measure``, ``raw``, ``threshold``,
        ``calibrated``, ``p_value`` and optionally ``p_bh`` and ``significant`` (computed here
        per measure across its pairs when absent) and ``self`` (true for a model against
        itself, aligned by construction: shown, but left out of Benjamini–Hochberg and of the
        sentences).
    images : sequence of (caption, relative path), default=()
    alpha : float, default=None
        The BH level (default ``settings["alpha"]``, else 0.05).
    title : str, default="Calibrated alignment matrix"
    notes : sequence of str, default=()
        Paragraphs after the reading (e.g. that K permutations are too few for the p-values
        to reach alpha after Benjamini–Hochberg).

    Returns
    -------
    Report

    Examples
    --------
    >>> rows = [{"x": "a", "y": "b", "measure": "linear_cka", "raw": 0.8, "threshold": 0.2,
    ...          "calibrated": 0.75, "p_value": 0.002}]
    >>> md = matrix_report({"n": 100, "alpha": 0.05}, rows).to_markdown()
    >>> "| a | b | linear_cka | 0.8000 | 0.2000 | 0.7500 | 0.002 | 0.002 | yes |" in md
    True
    """
    alpha = float(alpha if alpha is not None else settings.get("alpha", 0.05))
    by_measure: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_measure.setdefault(str(row["measure"]), []).append(dict(row))
    for measure_rows in by_measure.values():
        tested = [r for r in measure_rows if not r.get("self") and _finite(r.get("p_value"))]
        if any("p_bh" not in r for r in tested):
            adjusted = bh_adjust([float(r["p_value"]) for r in tested])
            for r, q in zip(tested, adjusted, strict=True):
                r["p_bh"] = q
        for r in measure_rows:
            if r.get("self") or not _finite(r.get("p_value")):  # no test: n/a
                r["p_bh"] = r["significant"] = None
            elif "significant" not in r:
                r["significant"] = significant(r["p_bh"], alpha)
    report = Report(title)
    if not rows:
        report.paragraph("No pair was computed.")
        return report
    report.heading("Reading")
    for measure, measure_rows in by_measure.items():
        report.paragraph(matrix_sentence(measure, measure_rows, alpha))
    for note in notes:
        report.paragraph(note)
    report.paragraph(
        f"Calibrated = max((raw − τ)/(s_max − τ), 0), where τ is what the measure reaches on "
        f"unrelated rows (the 1 − α quantile of its permutation null, drawn or, with the "
        f"exact moments, approximated by a Pearson type III fit); p_BH is the "
        f"Benjamini–Hochberg adjusted p-value across the pairs of each measure, and a pair is "
        f"significant when p_BH ≤ {alpha:g}"
        + ("; a model against itself (\"self\") is aligned by construction and not tested."
           if any(r.get("self") for r in rows) else ".")
    )
    report.heading("Settings")
    report.bullets(_settings_bullets(settings))
    report.heading("Calibrated values")
    table = []
    for measure, measure_rows in by_measure.items():
        for r in measure_rows:
            table.append([str(r["x"]), str(r["y"]), measure, fmt(r["raw"]), fmt(r["threshold"]),
                          fmt(r["calibrated"]), fmt_p(r["p_value"]), fmt_p(r["p_bh"]),
                          "self" if r.get("self") else
                          fmt(None if r["significant"] is None else bool(r["significant"]))])
    report.table(["x", "y", "measure", "raw", "τ", "calibrated", "p", "p_BH",
                  f"significant (q ≤ {alpha:g})"], table)
    if images:
        report.heading("Heatmaps")
        for caption, src in images:
            report.image(src, caption)
    return report


# -------------------------------------------------------------------------------- training
def score_text(value: float, digits: int = 2) -> str:
    """A score as the sentences print it: ``digits`` decimals, or as many significant digits
    where that would round a nonzero value to zero (a calibrated 0.004 is not "0.00", a value
    just below 0 not "-0.00").

    >>> score_text(0.3565), score_text(0.0041), score_text(-0.0004), score_text(0.0)
    ('0.36', '0.0041', '-0.0004', '0.00')
    >>> score_text(0.000167, 3), score_text(0.81234, 3)
    ('0.000167', '0.812')
    """
    if value == 0:
        return f"{0:.{digits}f}"
    small = abs(value) < 0.5 * 10.0 ** -digits
    return f"{value:.{digits}g}" if small else f"{value:.{digits}f}"


def _finite(value: Any) -> bool:
    """Whether ``value`` is a number other than NaN/Inf (None is not)."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _direction(first: float, last: float) -> int:
    """+1 (rose), -1 (fell) or 0 (flat): a change counts when it exceeds :data:`FLAT` and
    shows in the printed values (never "fell 0.36 → 0.36")."""
    if score_text(first) == score_text(last) or abs(last - first) <= FLAT:
        return 0
    return 1 if last > first else -1


def _move(values: Sequence[float]) -> str:
    """How a curve went: "rose a → b", "fell a → b", "stayed at b", "changed little (a → b)"
    (a change below :data:`FLAT` that shows in the printed values) or "was a" (one value)."""
    first, last = values[0], values[-1]
    if len(values) == 1:
        return f"was {score_text(last)}"
    direction = _direction(first, last)
    if direction > 0:
        return f"rose {score_text(first)} → {score_text(last)}"
    if direction < 0:
        return f"fell {score_text(first)} → {score_text(last)}"
    if score_text(first) != score_text(last):
        return f"changed little ({score_text(first)} → {score_text(last)})"
    return f"stayed at {score_text(last)}"


def _p_against(p: float, alpha: float) -> str:
    """``p`` printed so that its side of ``alpha`` shows: more digits where the usual four
    would read as ``alpha`` itself (a continuous p of 0.0500004 is not "0.05")."""
    text = fmt_p(p)
    return f"{float(p):.8g}" if float(text) == alpha and float(p) != alpha else text


def curve_sentence(measure: str, raw: Sequence[float], calibrated: Sequence[float],
                   threshold: float | None = None, p_value: float | None = None,
                   p_bh: float | None = None, alpha: float = 0.05,
                   last_value_at: str | None = None) -> str:
    """A plain reading of a measure's curve over training (one sentence, two with BH).

    With ``p_bh`` (the last step's Benjamini–Hochberg adjusted p-value across the curves, as
    in the report's Final values) the sentence says "above chance" only when ``p_bh ≤
    alpha``, as the table's significance column does: a last step above τ that BH does not
    keep reads "above τ ... but not above chance after Benjamini–Hochberg".  A curve with no
    value at the history's last step (a drift reference at a step it has none) gets no verdict:
    ``last_value_at`` names where its last value is.

    >>> print(curve_sentence("linear_cka", [0.31, 0.40, 0.52], [0.0, 0.0, 0.0], 0.55))
    ... # doctest: +NORMALIZE_WHITESPACE
    linear_cka: raw rose 0.31 → 0.52 while calibrated stayed 0: the rise is what chance
    reaches at this width (τ = 0.55 at the last step).
    >>> print(curve_sentence("mutual_knn", [0.10, 0.30], [0.0, 0.21], 0.12, 0.002))
    ... # doctest: +NORMALIZE_WHITESPACE
    mutual_knn: raw rose 0.10 → 0.30 and calibrated rose 0.00 → 0.21: above chance at the
    last step (τ = 0.12, p = 0.002).
    >>> print(curve_sentence("mutual_knn", [0.10, 0.30], [0.0, 0.21], 0.12, 0.03, 0.06))
    ... # doctest: +NORMALIZE_WHITESPACE
    mutual_knn: raw rose 0.10 → 0.30 and calibrated rose 0.00 → 0.21: above τ at the last step
    (τ = 0.12, p = 0.03) but not above chance after Benjamini–Hochberg across the curves
    (p_BH = 0.06 > 0.05).
    >>> print(curve_sentence("mutual_knn", [0.10, 0.30], [0.0, 0.21], 0.12, 0.002, 0.004))
    ... # doctest: +NORMALIZE_WHITESPACE
    mutual_knn: raw rose 0.10 → 0.30 and calibrated rose 0.00 → 0.21: above chance at the
    last step (τ = 0.12, p = 0.002). It stays so after Benjamini–Hochberg across the curves
    (p_BH = 0.004 ≤ 0.05).
    """
    raw = [float(v) for v in raw if v is not None]
    cal = [float(v) for v in calibrated if v is not None]
    if not raw or not cal:
        return f"{measure}: no values."
    tau = f"τ = {score_text(threshold)}" if threshold is not None else ""  # 0.0009 not "0.00"
    if tau and score_text(threshold) == score_text(raw[-1]) and float(threshold) != raw[-1]:
        digits = next(d for d in range(4, 18) if f"{float(threshold):.{d}g}" != f"{raw[-1]:.{d}g}")
        tau = f"τ = {float(threshold):.{digits}g} against raw {raw[-1]:.{digits}g}"  # not τ = raw
    raw_move = _move(raw)
    if last_value_at is not None:
        return (f"{measure}: raw {raw_move} and calibrated {_move(cal)}: no value at the last "
                f"step (its last value is at {last_value_at}).")
    kept = None if p_bh is None else significant(p_bh, alpha)  # the BH decision
    if all(v == 0 for v in cal) and not kept:
        if len(raw) > 1 and _direction(raw[0], raw[-1]) > 0:
            why = "the rise is what chance reaches at this width"
        else:
            why = "no step is above what chance reaches at this width"
        zero = "stayed 0" if len(cal) > 1 else "was 0"
        return (f"{measure}: raw {raw_move} while calibrated {zero}: {why}"
                + (f" ({tau} at the last step)." if tau else "."))
    p_text = f"p = {fmt_p(p_value)}" if p_value is not None else ""
    detail = ", ".join(x for x in (tau, p_text) if x)
    detail = f" ({detail})" if detail else ""
    head = f"{measure}: raw {raw_move} and calibrated {_move(cal)}: "
    if kept is None:  # no BH decision: the per-measure reading
        end = "above chance" if cal[-1] > 0 else "at chance level"
        return f"{head}{end} at the last step{detail}."
    bh = f"after Benjamini–Hochberg across the curves (p_BH = {_p_against(p_bh, alpha)}"
    if kept and cal[-1] > 0:
        return (f"{head}above chance at the last step{detail}. It stays so {bh} ≤ "
                f"{alpha:g}).")
    if kept:  # on τ (ties): not above it, yet the test keeps it
        return f"{head}not above τ at the last step{detail}, yet significant {bh} ≤ {alpha:g})."
    if cal[-1] > 0:
        return (f"{head}above τ at the last step{detail} but not above chance {bh} > "
                f"{alpha:g}).")
    return f"{head}at chance level at the last step{detail}."


def training_report(
    history: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any] | None = None,
    images: Sequence[tuple[str, str]] = (),
    prefix: str = "alignment",
    alpha: float | None = None,
    title: str = "Calibrated alignment during training",
    max_rows: int = 50,
    labels: Sequence[str] | None = None,
    skipped: Sequence[Mapping[str, Any]] = (),
    figure_notes: Sequence[str] = (),
    drift: Sequence[str] = (),
) -> Report:
    """The end-of-fit report of a training history.

    Parameters
    ----------
    history : sequence of mappings
        One flat entry per alignment step with ``epoch``, ``step`` and
        ``<prefix>/<label>/<field>`` keys (``raw``, ``calibrated``, ``p_value``,
        ``threshold``, ``best_pair``, ...), as :meth:`StepResult.history_entry` returns.
    settings : mapping, default=None
        Shown as a list (as in :func:`matrix_report`; keys it does not know as ``key: value``).
    images : sequence of (caption, relative path), default=()
        Curves and last heatmaps, drawn by the caller.
    prefix : str, default="alignment"
    alpha : float, default=None
        BH level across the curves' final p-values (default ``settings["alpha"]``, else
        0.05).
    title : str, default="Calibrated alignment during training"
    max_rows : int, default=50
        Steps shown in the curve table (evenly spaced, first and last always included; the
        table says how many of how many it shows).
    labels : sequence of str, default=None
        The curves' labels (``[<reference>/]<measure>``); default: read from the keys'
        shapes (:func:`history_series`).
    skipped : sequence of mappings, default=()
        Alignment steps that failed and were skipped (``on_error="warn"``), each with
        ``epoch``, ``step`` and ``reason``: listed in a section of their own.  With an empty
        history they make the report say that no step succeeded.
    figure_notes : sequence of str, default=()
        Paragraphs under the figures (e.g. why the last heatmaps are missing).
    drift : sequence of str, default=()
        Labels of drift curves (the model against its own earlier activations, the
        ``"initial"`` / ``"previous"`` references), whose p-values are small by construction:
        they are adjusted as a family of their own, so that they do not loosen the other
        curves' Benjamini–Hochberg threshold.

    Returns
    -------
    Report

    Examples
    --------
    >>> h = [{"epoch": 0, "step": 0, "alignment/linear_cka/raw": 0.31,
    ...       "alignment/linear_cka/calibrated": 0.0, "alignment/linear_cka/p_value": 0.4,
    ...       "alignment/linear_cka/threshold": 0.55},
    ...      {"epoch": 1, "step": 8, "alignment/linear_cka/raw": 0.52,
    ...       "alignment/linear_cka/calibrated": 0.0, "alignment/linear_cka/p_value": 0.2,
    ...       "alignment/linear_cka/threshold": 0.56}]
    >>> md = training_report(h).to_markdown()
    >>> "linear_cka: raw rose 0.31 → 0.52 while calibrated stayed 0" in md
    True
    """
    settings = dict(settings or {})
    alpha = float(alpha if alpha is not None else settings.get("alpha", 0.05))
    series = history_series(history, prefix, labels)
    steps = series.pop("")
    report = Report(title)
    if not history:
        if not skipped:
            report.paragraph("No alignment step was recorded.")
            return report
        report.paragraph(f"No alignment step succeeded: {count_text(len(skipped), 'step')} failed "
                         "and were skipped (listed below).")
        if settings:
            report.heading("Settings")
            report.bullets(_settings_bullets(settings))
        _skipped_section(report, skipped)
        return report
    names = list(series)
    for values in series.values():  # a NaN (a restored or hand-made history) reads as n/a
        for field_name, vals in values.items():
            values[field_name] = [v if v is None or isinstance(v, str) or _finite(v) else None
                                  for v in vals]
    final_p = [(series[n].get("p_value") or [None])[-1] for n in names]
    last_at = {}  # curves with no value at the last step: where their last value is
    for n in names:
        cal = series[n].get("calibrated") or []
        if cal and cal[-1] is None:
            j = max((i for i, v in enumerate(cal) if v is not None), default=None)
            if j is not None:
                last_at[n] = f"epoch {steps['epoch'][j]}, step {steps['step'][j]}"
    q_of = {}
    for family in (False, True):  # the drift curves apart (see ``drift``)
        tested = [i for i, p in enumerate(final_p) if p is not None
                  and (names[i] in drift) == family]
        q_of.update(zip(tested, bh_adjust([float(final_p[i]) for i in tested]), strict=True))
    report.heading("Reading")
    for i, (name, values) in enumerate(series.items()):
        report.paragraph(curve_sentence(name, values.get("raw", []),
                                        values.get("calibrated", []),
                                        (values.get("threshold") or [None])[-1],
                                        final_p[i], q_of.get(i), alpha, last_at.get(name)))
    if skipped:
        report.paragraph(f"{count_text(len(skipped), 'alignment step')} failed and "
                         f"{'was' if len(skipped) == 1 else 'were'} skipped (see Skipped steps).")
    report.heading("Final values")
    rows = []
    for i, name in enumerate(names):
        v = {fld: vals[-1] for fld, vals in series[name].items()}
        q = q_of.get(i)
        rows.append([name, fmt(v.get("raw")), fmt(v.get("threshold")), fmt(v.get("calibrated")),
                     fmt_p(v.get("p_value")), fmt_p(q),
                     fmt(None if q is None else significant(q, alpha)),
                     _pair_text(str(v.get("best_pair") or ""))])
    apart = ("; the drift curves (the model against its own earlier activations) as a family "
             "of their own" if any(n in drift for n in names) else "")
    report.paragraph(f"At the last step (epoch {steps['epoch'][-1]}, step {steps['step'][-1]}); "
                     f"p_BH adjusts the curves' p-values together (Benjamini–Hochberg, "
                     f"q ≤ {alpha:g}){apart}.")
    report.table(["measure", "raw", "τ", "calibrated", "p", "p_BH",
                  f"significant (q ≤ {alpha:g})", "best layer pair"], rows)
    if settings:
        report.heading("Settings")
        report.bullets(_settings_bullets(settings))
    _curves_section(report, series, steps, max_rows)
    if skipped:
        _skipped_section(report, skipped)
    if images or figure_notes:
        report.heading("Figures")
        for caption, src in images:
            report.image(src, caption)
        for note in figure_notes:
            report.paragraph(note)
    return report


def _pair_text(pair: str) -> str:
    """A logged ``"<model layer>|<reference layer>"`` as ``"<model layer> ~ <reference
    layer>"``; as logged when a name holds a ``|`` itself (where to split is unknown)."""
    return pair.replace("|", " ~ ") if pair.count("|") == 1 else pair


def count_text(n: int, noun: str) -> str:
    """``"1 step"``, ``"3 steps"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def shown_rows(count: int, max_rows: int) -> list[int]:
    """The indices of the curve table's rows: every one of ``count`` steps, or ``max_rows``
    (at least 2) evenly spaced ones with the first and the last.

    >>> shown_rows(3, 50), shown_rows(9, 3)
    ([0, 1, 2], [0, 4, 8])
    """
    if count == 0:
        return []
    kept = max(min(count, max_rows), 2)
    return sorted({round(i * (count - 1) / (kept - 1)) for i in range(kept)})


def _curves_section(report: Report, series: Mapping[str, Mapping[str, list[Any]]],
                    steps: Mapping[str, list[Any]], max_rows: int) -> None:
    """The table of raw and calibrated values per step (evenly spaced rows when there are more
    than ``max_rows`` steps, said in a line above it)."""
    report.heading("Curves")
    count = len(steps["step"])
    shown = shown_rows(count, max_rows)
    if len(shown) < count:
        report.paragraph(f"{len(shown)} of {count} steps shown, evenly spaced; every step is "
                         "in the logs.")
    headers = ["epoch", "step"]
    for name in series:
        headers += [f"{name} raw", f"{name} calibrated"]
    table = []
    for i in shown:
        row = [fmt(steps["epoch"][i]), fmt(steps["step"][i])]
        for values in series.values():
            row += [fmt((values.get("raw") or [None] * count)[i]),
                    fmt((values.get("calibrated") or [None] * count)[i])]
        table.append(row)
    report.table(headers, table)


def _skipped_section(report: Report, skipped: Sequence[Mapping[str, Any]]) -> None:
    """The alignment steps that failed (``on_error="warn"``): epoch, step and reason."""
    report.heading("Skipped steps")
    report.paragraph("These alignment steps failed and were skipped (on_error=\"warn\"): they "
                     "have no values in the curves.")
    report.table(["epoch", "step", "reason"],
                 [[fmt(s.get("epoch")), fmt(s.get("step")),
                   " ".join(str(s.get("reason", "")).split())]  # one line in a table cell
                  for s in skipped])


__all__ = [
    "Report",
    "bh_adjust",
    "curve_sentence",
    "fmt",
    "fmt_p",
    "history_series",
    "link_target",
    "matrix_report",
    "matrix_sentence",
    "score_text",
    "shown_rows",
    "training_report",
]
