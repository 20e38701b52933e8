"""Feedback where people look: a console line per measure after each alignment step, the
reference's probe pass as a progress bar, and the end-of-fit report next to the logs."""

from __future__ import annotations

import hashlib
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import unquote

from alignment_callback.engine import StepResult
from alignment_callback.engine.report import fmt_p, score_text


def step_lines(results: Mapping[str | None, StepResult], epoch: int, step: int,
               prefix: str = "alignment") -> list[str]:
    """One line per (reference, measure): raw → calibrated, p, τ and the best pair by name.

    >>> import torch
    >>> from alignment_callback.functional import calibrated_layer_alignment
    >>> x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    >>> r = calibrated_layer_alignment({"fc1": x}, {"r": x}, "linear_cka", num_permutations=99)
    >>> print(step_lines({None: StepResult(3, 120, {"linear_cka": r}, 40)}, 3, 120)[0])
    alignment epoch 3 (step 120) linear_cka: raw 1.000 → calibrated 1.000 (p 0.01, τ 0.171), best fc1 ~ r
    """
    lines = []
    for ref, result in results.items():
        for name, r in result.results.items():
            label = name if ref is None else f"{ref}/{name}"
            a, b = r.best_pair
            calibrated = score_text(float(r.calibrated), 3)
            lines.append(f"{prefix} epoch {epoch} (step {step}) {label}: raw {float(r.raw):.3f} → "
                         f"calibrated {calibrated} (p {fmt_p(r.p_value)}, τ "
                         f"{float(r.threshold):.3g}), best {a} ~ {b}")
    return lines


def emit(trainer: Any, lines: Sequence[str]) -> None:
    """Print on rank 0, through the progress bar when there is one (so it stays intact)."""
    if not trainer.is_global_zero:
        return
    bar = getattr(trainer, "progress_bar_callback", None)
    printer = getattr(bar, "print", None)
    for line in lines:
        if callable(printer):
            printer(line)
        else:
            print(line, flush=True)


def progress(batches: Iterable[Any], description: str, enabled: bool) -> Iterable[Any]:
    """The probe batches with a progress bar on stderr (tqdm) when enabled and sized."""
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with Lightning
        return batches
    from alignment_callback.hooks.collect import preserved_rng

    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    with preserved_rng():  # tqdm's set-up draws from torch's global RNG (seen with 4.67)
        return tqdm(batches, desc=description, total=total, leave=False, unit="batch")


def write_report(folder: str, history: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                 last: Mapping[str, Any], prefix: str, alpha: float,
                 pngs: Mapping[str, bytes] | None = None, labels: Sequence[str] | None = None,
                 skipped: Sequence[Mapping[str, Any]] = (),
                 drift: Sequence[str] = ()) -> tuple[str, str]:
    """``alignment_report.md`` and ``.html`` in ``folder`` (``alignment_report_<prefix>.*`` for
    another prefix, see :func:`report_stem`): the curves and last heatmaps as PNGs beside them,
    the final values with p and Benjamini–Hochberg p, the settings, one sentence per curve and
    the ``skipped`` steps (``epoch``, ``step``, ``reason``: steps that failed with
    ``on_error="warn"``).  ``pngs``: the last step's heatmaps already encoded, by measure label
    (those not given are drawn); ``last`` empty with a history (a fit resumed at its end) is
    said under the figures.  ``labels``: the curves' labels (``[<reference>/]<measure>``),
    else read from the keys' shapes; ``drift``: those of drift references, a BH family of
    their own.  Returns the two paths."""
    from alignment_callback.engine.report import history_series, training_report

    os.makedirs(folder, exist_ok=True)
    images = []
    series = history_series(history, prefix, labels)
    measures = [m for m in series if m and "raw" in series[m] and "calibrated" in series[m]]
    start = report_stem(prefix)
    names = safe_file_names(last, reserved=["curves"])  # the curves' file is not a label's
    if measures:
        images.append(("Raw, τ and calibrated over training",
                       _curves(folder, history, measures, f"{start}_report_curves.png", prefix)))
    for label, result in last.items():
        name = f"{start}_report_{names[label]}.png"
        images.append((f"{label}: last layer × layer matrices",
                       _heatmap(folder, name, label, result, (pngs or {}).get(label))))
    notes = []
    if history and not last:
        notes.append("The last step's layer × layer heatmaps are not available: this fit took no "
                     "successful alignment step (a fit resumed at its end takes none), so the "
                     "report shows the curves of the restored history only.")
    report = training_report(history, settings, images, prefix=prefix, alpha=alpha,
                             labels=labels, skipped=skipped, figure_notes=notes, drift=drift)
    stem = "alignment_report" if prefix == "alignment" else f"alignment_report_{start}"
    md, html = os.path.join(folder, f"{stem}.md"), os.path.join(folder, f"{stem}.html")
    report.write(md, html)
    return md, html


def report_stem(prefix: str) -> str:
    """The file-name part of a ``log_prefix``: characters other than ``A-Z a-z 0-9 . _ -``
    become ``_``, and when that changed the prefix an 8-digit hash of it is appended, so that
    two prefixes never share report files (``probe/a`` and ``probe_a``, non-ASCII ones).

    >>> report_stem("probe_a"), report_stem("probe/a")
    ('probe_a', 'probe_a-c8729893')
    """
    plain = re.sub(r"[^A-Za-z0-9._-]", "_", prefix)
    return plain if plain == prefix else f"{plain}-{_hash(prefix)}"


def _hash(text: str) -> str:
    """8 hex digits of the SHA-1 of ``text`` (UTF-8)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def safe_file_names(labels: Iterable[str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """A file-name part per label: characters other than ``A-Z a-z 0-9 . _ -`` become ``_``
    (``/`` too, as before), so that links to the files need no escaping; labels that would
    then share a name (with each other or with a ``reserved`` one) get an 8-digit hash of the
    label appended, so distinct labels keep distinct files.

    >>> safe_file_names(["clip (vit-b)/linear_cka", "linear_cka"])
    {'clip (vit-b)/linear_cka': 'clip__vit-b__linear_cka', 'linear_cka': 'linear_cka'}
    >>> len({*safe_file_names(["a b", "a_b"]).values(), "curves"})
    3
    """
    plain = {label: re.sub(r"[^A-Za-z0-9._-]", "_", label) for label in labels}
    count = dict.fromkeys(reserved, 1)
    for name in plain.values():
        count[name] = count.get(name, 0) + 1
    return {label: name if count[name] == 1 else f"{name}-{_hash(label)}"
            for label, name in plain.items()}


def report_files(md: str) -> list[str]:
    """The report's files: ``md``, its ``.html`` twin and the images the report shows (beside
    it), read from the HTML's ``<img src>`` attributes (no parsing of Markdown)."""
    folder = os.path.dirname(md)
    html = os.path.splitext(md)[0] + ".html"
    sources: list[str] = []

    class _Images(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            src = dict(attrs).get("src")
            if tag == "img" and src:
                sources.append(unquote(src))

    _Images().feed(Path(html).read_text(encoding="utf-8"))
    return [md, html, *(os.path.join(folder, s) for s in sources)]


def _curves(folder: str, history: Sequence[Mapping[str, Any]], measures: Sequence[str],
            name: str, prefix: str) -> str:
    """The measures' curves side by side, saved as ``name`` in ``folder``; returns ``name``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from alignment_callback.metrics.plotting import _RENDER_LOCK, history_axis, plot_scores

    with _RENDER_LOCK:
        fig = Figure(figsize=(4.6 * len(measures), 3.8))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(measures), squeeze=False)[0]
        # one axis for every panel, chosen on the whole history: against the epoch, unless
        # several steps share one (every_n_train_steps)
        x = (history_axis(history) or ("step",))[0]
        for ax, m in zip(axes, measures):
            rows = [h for h in history if f"{prefix}/{m}/raw" in h]  # "previous": not at step 0
            label, xs = x, [h.get(x) for h in rows]
            if any(v is None for v in xs):
                label, xs = "step", list(range(len(rows)))
            plot_scores(rows, ax=ax, measure=m, prefix=prefix, steps=xs, xlabel=label)
        width = fig.get_figwidth()  # fixed margins in inches: tight_layout drew the figure twice
        fig.subplots_adjust(left=0.62 / width, right=1 - 0.12 / width, bottom=0.14, top=0.91,
                            wspace=0.26)
        fig.savefig(os.path.join(folder, name), dpi=90)
    return name


def _heatmap(folder: str, name: str, label: str, result: Any, png: bytes | None = None) -> str:
    """The last heatmaps of ``label`` (``png``, else drawn) saved as ``name`` in ``folder``;
    returns ``name``."""
    from alignment_callback.callback.dispatch import encode_png
    from alignment_callback.metrics.plotting import heatmap_image

    with open(os.path.join(folder, name), "wb") as f:
        f.write(png if png is not None else encode_png(heatmap_image(result, label)))
    return name
