"""Plots for alignment results (matplotlib is optional: imported only when plotting).

``plot_scores`` and ``plot_layer_heatmap`` follow the torchmetrics convention (``ax=None``
makes a pyplot figure; returns ``(fig, ax)``).  ``heatmap_image`` renders a result to an RGB
array with matplotlib's object-oriented API and no pyplot, under a lock, so the callback can
draw in its background thread.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


def _pyplot() -> Any:
    """``matplotlib.pyplot``, with the user's backend as it is (never switched here)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ModuleNotFoundError(
            "plotting needs matplotlib: pip install 'alignment-callback[plot]'"
        ) from err
    return plt


_RENDER_LOCK = threading.Lock()  # matplotlib's font caches are shared: one render at a time


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is None:
        fig, ax = _pyplot().subplots(figsize=figsize)
        return fig, ax
    return ax.get_figure(), ax


def _value(v: Any) -> float:
    return float(v.item() if isinstance(v, Tensor) else v)


def history_series(history: Sequence[Mapping[str, Any]], prefix: str = "alignment",
                   labels: Sequence[str] | None = None) -> dict[str, dict[str, list[Any]]]:
    """``{label: {field: [value per step]}}`` from flat history entries
    (``<prefix>/<label>/<field>`` keys, as :meth:`StepResult.history_entry` writes them, with
    ``<label>`` = ``[<reference>/]<measure>``), plus ``{"epoch": [...], "step": [...]}`` under
    the key ``""``.  A field missing from an entry is ``None`` there.

    With ``labels`` (the callback's curve labels) the curves are exactly these, in this order,
    each with its one-segment fields.  Without, they are read from the keys' shapes: every
    ``<label>/<field>`` key is a candidate, and a candidate is left out when it is another
    label's per-layer (``<label>/layer/<name>/<field>``) or per-pair (``<label>/pair/<key>``)
    key, i.e. when ``layer`` or ``pair`` follows a label that has a ``raw`` field; a reference
    named ``dino/layer/8`` stays (ambiguous only when a reference is named like another
    label followed by ``/layer/``: pass ``labels`` then).

    >>> h = [{"epoch": 0, "step": 0, "alignment/cka/raw": 0.3},
    ...      {"epoch": 1, "step": 10, "alignment/cka/raw": 0.5}]
    >>> history_series(h)["cka"]["raw"], history_series(h)[""]["step"]
    ([0.3, 0.5], [0, 10])
    >>> h = [{"alignment/dino/layer/8/cka/raw": 0.4, "alignment/dino/layer/8/cka/pair/a__b": 0.7}]
    >>> [k for k in history_series(h) if k]
    ['dino/layer/8/cka']
    """
    start = f"{prefix}/"
    fields = (_label_fields(history, start, labels) if labels is not None
              else _guessed_fields(history, start))
    out: dict[str, dict[str, list[Any]]] = {"": {
        "epoch": [e.get("epoch", e.get(f"{start}epoch")) for e in history],
        "step": [e.get("step", e.get(f"{start}step")) for e in history],
    }}
    for name, names in fields.items():
        out[name] = {fld: [e.get(f"{start}{name}/{fld}") for e in history] for fld in names}
    return out


def _label_fields(history: Sequence[Mapping[str, Any]], start: str, labels: Sequence[str]
                  ) -> dict[str, list[str]]:
    """The one-segment fields (``<start><label>/<field>``) of each given label."""
    fields: dict[str, list[str]] = {str(label): [] for label in labels}
    for entry in history:
        for key in entry:
            if not key.startswith(start):
                continue
            label, _, field = key[len(start):].rpartition("/")
            if label in fields and field not in fields[label]:
                fields[label].append(field)
    return fields


def _guessed_fields(history: Sequence[Mapping[str, Any]], start: str) -> dict[str, list[str]]:
    """The fields of every ``<label>/<field>`` key, less other labels' per-layer and per-pair
    keys (``layer`` or ``pair`` right after a label with a ``raw`` field)."""
    fields: dict[str, list[str]] = {}
    for entry in history:
        for key in entry:
            if not key.startswith(start):
                continue
            label, _, field = key[len(start):].rpartition("/")  # the prefix may hold "/" itself
            if label:
                names = fields.setdefault(label, [])
                if field not in names:
                    names.append(field)
    curves = [label for label, names in fields.items() if "raw" in names]

    def nested(label: str) -> bool:
        return any(label == f"{c}/pair" or label.startswith((f"{c}/pair/", f"{c}/layer/"))
                   for c in curves if c != label)

    return {label: names for label, names in fields.items() if not nested(label)}


def _history_series(history: list[Mapping[str, Any]], measure: str | None, prefix: str
                    ) -> tuple[list[Mapping[str, Any]], str]:
    """A callback history (flat ``<prefix>/<measure>/<field>`` keys) as per-step
    ``{"raw", "calibrated", "threshold"}`` dicts of one measure.  The measures are
    :func:`history_series`'s: per-layer (``.../layer/<name>/raw``) and per-pair keys are
    not measures; a ``measure`` named by the caller is taken as it is when it has ``raw``
    values (a reference named ``dino/layer/8`` needs no guessing)."""
    if measure is not None and any(f"{prefix}/{measure}/raw" in h for h in history):
        found = [measure]
    else:
        series = history_series(history, prefix)
        found = sorted(name for name, fields in series.items() if name and "raw" in fields)
    if not found:
        raise ValueError(f"nothing to plot: the entries have neither 'raw' nor "
                         f"'{prefix}/<measure>/raw' keys (pass prefix= if the callback used "
                         "another log_prefix)")
    if measure is None:
        if len(found) > 1:
            raise ValueError(f"the history holds several measures {found}; "
                             "pass measure=one of them")
        measure = found[0]
    if measure not in found:
        raise ValueError(f"measure {measure!r} is not in the history; it holds {found}")
    fields = ("raw", "calibrated", "threshold", "p_value")
    return [{f: h[f"{prefix}/{measure}/{f}"] for f in fields if f"{prefix}/{measure}/{f}" in h}
            for h in history], measure


def history_axis(entries: Sequence[Mapping[str, Any]]) -> tuple[str, list[Any]] | None:
    """The x axis of history entries: ``("epoch", epochs)``, or ``("step", global steps)``
    when several entries share an epoch (``every_n_train_steps``), so that no two points stack
    at one x; ``None`` when the entries have neither.

    >>> history_axis([{"epoch": 0, "step": 0}, {"epoch": 1, "step": 8}])
    ('epoch', [0, 1])
    >>> history_axis([{"epoch": 0, "step": 0}, {"epoch": 0, "step": 3}])
    ('step', [0, 3])
    """
    epochs = [h.get("epoch") for h in entries]
    steps = [h.get("step") for h in entries]
    known_epochs = all(e is not None for e in epochs)
    if known_epochs and len(set(epochs)) == len(epochs):
        return "epoch", epochs
    if all(s is not None for s in steps):
        return "step", steps
    return ("epoch", epochs) if known_epochs else None


def plot_scores(
    val: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    ax: Any = None,
    steps: Sequence[float] | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    measure: str | None = None,
    prefix: str = "alignment",
) -> tuple[Any, Any]:
    """Raw and calibrated score with the null threshold τ, for one result or a history.

    The band from 0 to τ is what chance alone reaches (the null); raw scores inside it are not
    evidence of alignment.

    Parameters
    ----------
    val : a result dict, a list of them, or ``AlignmentCallback.history``
        Result dicts have ``raw``, ``calibrated`` and ``threshold`` entries (what the metric
        objects' ``compute()`` returns).  A callback history has flat
        ``<prefix>/<measure>/<field>`` keys: pick the measure with ``measure``.
    ax : matplotlib Axes, default=None
        Axes to draw on (default: a new pyplot figure).
    steps : sequence of float, default=None
        x values (default: the history's epochs, or its global steps when several entries
        share an epoch (``every_n_train_steps``); else 0, 1, 2, ...).
    title, xlabel : str, default=None
        Default title: the measure's name for a history; default x label: ``"epoch"`` or
        ``"step"`` for a history (its x axis), else ``"step"``.
    measure : str, default=None
        For a callback history: which measure (optional when it holds one).
    prefix : str, default="alignment"
        The callback's ``log_prefix``.

    Returns
    -------
    (fig, ax)

    Raises
    ------
    ValueError
        When a point lacks ``raw``, ``calibrated`` or ``threshold`` (naming it) or ``steps``
        does not have one value per point.  Non-finite values (τ = inf) are drawn where
        matplotlib can and do not set the y limits.
    """
    history = [val] if isinstance(val, Mapping) else list(val)
    if not history:
        raise ValueError("nothing to plot: empty history")
    if "raw" not in history[0]:
        entries = history
        history, measure = _history_series(entries, measure, prefix)
        # a step without this measure's result (reference="previous" at its first step) has no
        # point; given steps are the history's, one per entry
        kept = [i for i, h in enumerate(history) if "raw" in h]
        if steps is not None and len(steps) == len(history):
            steps = [list(steps)[i] for i in kept]
        history = [history[i] for i in kept]
        axis = history_axis([entries[i] for i in kept])
        if steps is None and axis is not None:
            xlabel, steps = xlabel or axis[0], axis[1]
        title = title or measure
    _check_points(history, measure, prefix)
    xs = list(steps) if steps is not None else list(range(len(history)))
    if len(xs) != len(history):
        raise ValueError(f"steps has {len(xs)} values for {len(history)} points to plot")
    raw = [_value(h["raw"]) for h in history]
    cal = [_value(h["calibrated"]) for h in history]
    tau = [_value(h["threshold"]) for h in history]
    fig, ax = _axes(ax, (6.0, 4.0))
    marker = "o" if len(history) < 30 else None
    ax.fill_between(xs, 0.0, tau, color="0.85", step="mid" if len(xs) == 1 else None,
                    label="chance (≤ τ)")
    ax.plot(xs, tau, color="0.4", linestyle="--", marker=marker, label="threshold τ")
    ax.plot(xs, raw, color="tab:blue", marker=marker, label="raw")
    ax.plot(xs, cal, color="tab:red", marker=marker, label="calibrated")
    ax.set_xlabel(xlabel or "step")
    ax.set_ylabel("score")
    low = [v for v in raw + cal + tau if math.isfinite(v)]  # τ = inf: no finite null quantile
    high = [v for v in raw + tau if math.isfinite(v)]
    ax.set_ylim(min([0.0, *low]) - 0.02, max([1.0, *high]) + 0.02)
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    return fig, ax


def _check_points(points: Sequence[Mapping[str, Any]], measure: str | None, prefix: str) -> None:
    """Every point has ``raw``, ``calibrated`` and ``threshold`` (a ``ValueError`` naming the
    missing field, and for a callback history its key, otherwise)."""
    if not points:
        raise ValueError("nothing to plot: no step has a raw value")
    for i, point in enumerate(points):
        for name in ("raw", "calibrated", "threshold"):
            if name not in point:
                where = (f"the history has no '{prefix}/{measure}/{name}' at plotted point {i}"
                         if measure is not None else f"val[{i}] has no '{name}' entry")
                raise ValueError(f"plot_scores needs raw, calibrated and threshold: {where}")


def plot_layer_heatmap(
    matrix: Any,
    x_names: Sequence[str],
    y_names: Sequence[str],
    ax: Any = None,
    argmax: Sequence[int] | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    xlabel: str = "reference layer",
    ylabel: str = "model layer",
    marks: Any = None,
    colorbar: bool = True,
) -> tuple[Any, Any]:
    """Layer×layer heatmap (model layers as rows, reference layers as columns).

    The arg-max pair is outlined; values are written in the cells (up to 12×12), with a ``*``
    where ``marks`` (a boolean matrix, e.g. significant pairs) is set; larger matrices get the
    ``*`` alone in their marked cells.  The color range is ``[min(0, m), max(1, m)]`` unless
    ``vmin`` / ``vmax`` are given (NaN and infinite cells do not set it).  Returns
    ``(fig, ax)``; a ``ValueError`` names the argument when ``matrix`` is not a non-empty
    2-D one or ``x_names`` (rows), ``y_names`` (columns), ``argmax`` or ``marks`` do not fit
    its shape.
    """
    import numpy as np

    m = np.asarray(torch.as_tensor(matrix).detach().cpu().double().numpy(), dtype=float)
    _check_heatmap(m, x_names, y_names, argmax, marks)
    finite = m[np.isfinite(m)]  # NaN / inf cells do not set the color range
    lo = min(0.0, float(finite.min(initial=0.0))) if vmin is None else vmin
    hi = max(1.0, float(finite.max(initial=1.0))) if vmax is None else vmax
    own_figure = ax is None
    fig, ax = _axes(ax, _heatmap_size(m.shape))
    im = ax.imshow(m, vmin=lo, vmax=hi, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(y_names)))
    ax.set_xticklabels(list(y_names), rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(len(x_names)))
    ax.set_yticklabels(list(x_names), fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if argmax is not None:
        a, b = (int(i) for i in argmax)
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            star = marks is not None and bool(marks[i][j])
            text, color = cell_label(m[i, j], lo, hi, star)
            if m.size > MAX_LABELED_CELLS:  # too small for the value: the mark alone
                if not star:
                    continue
                text = "*"
            ax.text(j, i, text, ha="center", va="center", fontsize="x-small", color=color)
    if colorbar:
        fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title, fontsize="small")
    if own_figure:
        fig.tight_layout()
    return fig, ax


def _check_heatmap(m: Any, x_names: Sequence[str], y_names: Sequence[str],
                   argmax: Sequence[int] | None, marks: Any) -> None:
    """``ValueError`` naming the argument when the matrix is not a non-empty 2-D one or the
    names, ``argmax`` or ``marks`` do not fit its shape."""
    import numpy as np

    if m.ndim != 2:
        raise ValueError(f"matrix must be 2-D (model layers × reference layers), got shape "
                         f"{tuple(m.shape)}")
    if m.size == 0:
        raise ValueError(f"matrix is empty (shape {tuple(m.shape)}): nothing to plot")
    rows, cols = m.shape
    if len(x_names) != rows:
        raise ValueError(f"x_names has {len(x_names)} names for the matrix's {rows} rows "
                         "(model layers)")
    if len(y_names) != cols:
        raise ValueError(f"y_names has {len(y_names)} names for the matrix's {cols} columns "
                         "(reference layers)")
    if argmax is not None:
        try:
            a = [int(i) for i in argmax]
        except (TypeError, ValueError) as err:
            raise ValueError(f"argmax must be (row, column) inside the {rows}×{cols} matrix, "
                             f"got {argmax!r}") from err
        if len(a) != 2 or not (0 <= a[0] < rows and 0 <= a[1] < cols):
            raise ValueError(f"argmax must be (row, column) inside the {rows}×{cols} matrix, "
                             f"got {tuple(a)}")
    if marks is not None:
        try:
            shape = np.shape(marks.detach().cpu().numpy() if isinstance(marks, Tensor)
                             else np.asarray(marks, dtype=bool))
        except (TypeError, ValueError) as err:  # ragged nested lists
            raise ValueError(f"marks must be a {rows}×{cols} boolean matrix, got {marks!r}"
                             ) from err
        if tuple(shape) != (rows, cols):
            raise ValueError(f"marks must have the matrix's shape {(rows, cols)}, got "
                             f"{tuple(shape)}")


MAX_LABELED_CELLS = 144  # values are written in the cells of matrices up to 12×12


def cell_label(value: float, lo: float, hi: float, star: bool = False) -> tuple[str, str]:
    """The text of a heatmap cell (two decimals, ``*`` when marked) and its color (black on
    the light upper 40 % of the color range, white below)."""
    light = (value - lo) / ((hi - lo) or 1.0) > 0.6
    return f"{value:.2f}{'*' if star else ''}", "black" if light else "white"


def _heatmap_size(shape: Sequence[int]) -> tuple[float, float]:
    return 3.0 + 0.55 * max(4, shape[1]), 2.5 + 0.45 * max(4, shape[0])


def heatmap_image(result: Any, title: str, dpi: int = 80) -> Any:
    """Raw matrix and per-pair calibrated matrix of a ``LayerAlignmentResult`` side by side,
    the arg-max pair outlined, as an (H, W, 3) uint8 array.

    Uses bare ``matplotlib.figure.Figure`` objects with the Agg canvas (no pyplot, no global
    figure registry) and a lock around drawing, so it is safe to call from a worker thread while
    the main thread does not use pyplot concurrently.  The figure of each layout (layer names,
    dpi) is built and its static parts drawn once; later calls redraw only the values
    (:class:`~alignment_callback.metrics.heatmap_canvas.HeatmapCanvas`), with the same pixels.
    """
    from alignment_callback.metrics.heatmap_canvas import canvas_for

    raw = torch.as_tensor(result.matrix).detach().cpu().double()
    cal = torch.as_tensor(result.pair_calibrated).detach().cpu().double()
    both = torch.stack([raw, cal])
    finite = both[torch.isfinite(both)]  # NaN / inf cells do not set the range (as in
    lo = min(0.0, float(finite.min())) if finite.numel() else 0.0  # plot_layer_heatmap)
    hi = max(1.0, float(finite.max())) if finite.numel() else 1.0
    suptitle = f"{title} (colors {lo:g} to {hi:g}; red box: best raw pair)"
    with _RENDER_LOCK:
        canvas = canvas_for(tuple(result.x_names), tuple(result.y_names), dpi)
        return canvas.render(raw.numpy(), cal.numpy(), tuple(result.argmax), lo, hi, suptitle)


def heatmap_pair_axes(fig: Any, raw: Any, cal: Any, x_names: Sequence[str],
                      y_names: Sequence[str], argmax: Sequence[int], lo: float, hi: float
                      ) -> tuple[Any, Any]:
    """The two heatmaps of :func:`heatmap_image` on ``fig`` (raw left, calibrated right, one
    color range, shared rows); returns the two axes."""
    left, right = fig.subplots(1, 2, sharey=True)
    for ax, matrix, name in ((left, raw, "raw"), (right, cal, "calibrated per pair")):
        plot_layer_heatmap(matrix, x_names, y_names, ax=ax, argmax=argmax, title=name,
                           colorbar=False, vmin=lo, vmax=hi)
    right.set_ylabel("")
    right.tick_params(labelleft=False)
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.28, top=0.82, wspace=0.08)
    return left, right
