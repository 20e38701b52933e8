"""Plots for alignment results (matplotlib is optional: imported only when plotting)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


def _pyplot() -> Any:
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ModuleNotFoundError(
            "plotting needs matplotlib: pip install 'alignment-callback[plot]'"
        ) from err
    return plt


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.get_figure(), ax


def _value(v: Any) -> float:
    return float(v.item() if isinstance(v, Tensor) else v)


def plot_scores(
    val: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    ax: Any = None,
    steps: Sequence[float] | None = None,
    title: str | None = None,
    xlabel: str = "step",
) -> tuple[Any, Any]:
    """Raw and calibrated score with the null threshold τ, for one result or a history.

    The band from 0 to τ is what chance alone reaches (the null); raw scores inside it are not
    evidence of alignment. Returns ``(fig, ax)``.
    """
    history = [val] if isinstance(val, Mapping) else list(val)
    if not history:
        raise ValueError("nothing to plot: empty history")
    xs = list(steps) if steps is not None else list(range(len(history)))
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score")
    ax.set_ylim(min(0.0, min(raw + cal + tau)) - 0.02, max(1.0, max(raw + tau)) + 0.02)
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    return fig, ax


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
) -> tuple[Any, Any]:
    """Layer×layer heatmap (model layers as rows, reference layers as columns).

    The arg-max pair is outlined; values are written in the cells (up to 12×12), with a ``*``
    where ``marks`` (a boolean matrix, e.g. significant pairs) is set.  The colour range is
    ``[min(0, m), max(1, m)]`` unless ``vmin`` / ``vmax`` are given.  Returns ``(fig, ax)``.
    """
    import numpy as np

    m = np.asarray(torch.as_tensor(matrix).detach().cpu().double().numpy(), dtype=float)
    lo = min(0.0, float(m.min())) if vmin is None else vmin
    hi = max(1.0, float(m.max())) if vmax is None else vmax
    fig, ax = _axes(ax, (3.0 + 0.55 * max(4, m.shape[1]), 2.5 + 0.45 * max(4, m.shape[0])))
    im = ax.imshow(m, vmin=lo, vmax=hi, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(y_names)))
    ax.set_xticklabels(list(y_names), rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(len(x_names)))
    ax.set_yticklabels(list(x_names), fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if argmax is not None:
        a, b = (int(i) for i in argmax)
        ax.add_patch(_pyplot().Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red",
                                         linewidth=2))
    if m.size <= 144:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                star = "*" if marks is not None and bool(marks[i][j]) else ""
                light = (m[i, j] - lo) / ((hi - lo) or 1.0) > 0.6
                ax.text(j, i, f"{m[i, j]:.2f}{star}", ha="center", va="center",
                        fontsize="x-small", color="black" if light else "white")
    fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title, fontsize="small")
    fig.tight_layout()
    return fig, ax
