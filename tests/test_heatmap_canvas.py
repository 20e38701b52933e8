"""The cached heatmap figure (static parts drawn once, values redrawn per call) gives exactly
the pixels of a figure built and drawn from scratch, for every call on the same layout."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from alignment_callback.metrics import heatmap_canvas  # noqa: E402
from alignment_callback.metrics.plotting import heatmap_image, plot_layer_heatmap  # noqa: E402


def _full_draw(result, title, dpi=80):
    """A fresh figure drawn completely (the rendering before the cache)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    raw, cal = (torch.as_tensor(m).double() for m in (result.matrix, result.pair_calibrated))
    lo = min(0.0, float(torch.stack([raw, cal]).min()))
    hi = max(1.0, float(torch.stack([raw, cal]).max()))
    rows, cols = raw.shape
    width, height = 3.0 + 0.55 * max(4, cols), 2.5 + 0.45 * max(4, rows)
    fig = Figure(figsize=(2 * width - 1.5, height), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharey=True)
    for ax, m, name in ((left, raw, "raw"), (right, cal, "calibrated per pair")):
        plot_layer_heatmap(m, result.x_names, result.y_names, ax=ax, argmax=result.argmax,
                           title=name, colorbar=False, vmin=lo, vmax=hi)
    right.set_ylabel("")
    right.tick_params(labelleft=False)
    fig.suptitle(f"{title} (colors {lo:g} to {hi:g}; red box: best raw pair)", fontsize="small")
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.28, top=0.82, wspace=0.08)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _result(rows, cols, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(rows, cols, generator=g, dtype=torch.float64) * spread
    cal = raw - 0.3 * torch.rand(rows, cols, generator=g, dtype=torch.float64)  # some < 0
    flat = int(raw.argmax())
    return SimpleNamespace(matrix=raw, pair_calibrated=cal, argmax=(flat // cols, flat % cols),
                           x_names=[f"model.block{i}" for i in range(rows)],
                           y_names=[f"ref.layer{j}" for j in range(cols)])


@pytest.mark.parametrize("rows, cols", [(4, 3), (1, 1), (2, 6), (13, 12)])  # 13×12: no labels
def test_cached_canvas_draws_the_pixels_of_a_full_draw(rows, cols):
    heatmap_canvas._CACHE.clear()
    for seed, spread in ((0, 1.0), (1, 1.4), (2, 0.2)):  # the color range changes too
        result = _result(rows, cols, seed, spread)
        title = f"alignment/linear_cka after epoch {seed} (step {10 * seed})"
        image = heatmap_image(result, title)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        np.testing.assert_array_equal(image, _full_draw(result, title))
    assert len(heatmap_canvas._CACHE) == 1  # one layout, built once


def test_the_cache_keeps_a_few_layouts():
    heatmap_canvas._CACHE.clear()
    for k in range(heatmap_canvas._CACHE_SIZE + 3):
        heatmap_image(_result(2, 1 + k % 11, k), "t", dpi=40 + k)
    assert len(heatmap_canvas._CACHE) == heatmap_canvas._CACHE_SIZE


def test_changed_matplotlib_settings_rebuild_the_figure():
    import matplotlib

    heatmap_canvas._CACHE.clear()
    result = _result(4, 3, 5)
    heatmap_image(result, "before")
    with matplotlib.rc_context({"font.size": 14, "axes.edgecolor": "tab:blue"}):
        styled = heatmap_image(result, "styled")
        np.testing.assert_array_equal(styled, _full_draw(result, "styled"))
    np.testing.assert_array_equal(heatmap_image(result, "after"), _full_draw(result, "after"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cells_do_not_set_the_color_range(bad):
    """As in ``plot_layer_heatmap``: a NaN cell made ``min(0, nan)`` 0 (a raw -0.4 was
    clipped), an infinite one made the range infinite (one color for every cell)."""
    result = _result(3, 4, seed=5)
    result.matrix[0, 0] = -0.4
    result.pair_calibrated[2, 3] = bad
    finite = torch.stack([result.matrix, result.pair_calibrated])
    finite = finite[torch.isfinite(finite)]
    lo, hi = min(0.0, float(finite.min())), max(1.0, float(finite.max()))
    heatmap_image(result, "t")
    canvas = heatmap_canvas.canvas_for(tuple(result.x_names), tuple(result.y_names), 80)
    for image in (ax.images[0] for ax in canvas.axes):
        assert image.get_clim() == (pytest.approx(lo), pytest.approx(hi))
    assert f"colors {lo:g} to {hi:g}" in canvas.title.get_text()
