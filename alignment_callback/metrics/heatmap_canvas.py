"""A heatmap figure built once per layout and redrawn per step (blitting).

Building the figure of :func:`~alignment_callback.metrics.plotting.heatmap_image` (subplots,
ticks, layer names, titles) and drawing its static parts takes most of the time of a render
and holds the interpreter lock throughout, which a training loop running beside the callback's
worker thread pays for.  :class:`HeatmapCanvas` draws those parts once into a saved background;
each render restores it and draws only what changes and what lies on top of it, in the order
of a full draw (images, the arg-max boxes, the tick marks and spines at the images' edges, the
cell values, the title), so the pixels are a full draw's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from alignment_callback.metrics.plotting import _heatmap_size, cell_label, heatmap_pair_axes

_CACHE: "OrderedDict[tuple, HeatmapCanvas]" = OrderedDict()
# layouts kept: the measures and references of one callback share one; each costs two RGBA
# frames of the figure (about 2 MB for 4×3 layers, 7 MB for 12×12)
_CACHE_SIZE = 4


class HeatmapCanvas:
    """The two-panel heatmap figure of one layout: ``x_names`` rows, ``y_names`` columns."""

    def __init__(self, x_names: Sequence[str], y_names: Sequence[str], dpi: int) -> None:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.style = dict.copy(matplotlib.rcParams)  # the settings the figure was built with

        shape = (len(x_names), len(y_names))
        width, height = _heatmap_size(shape)
        self.figure = Figure(figsize=(2 * width - 1.5, height), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.figure)
        zeros = np.zeros(shape)
        self.axes = heatmap_pair_axes(self.figure, zeros, zeros, x_names, y_names, (0, 0),
                                      0.0, 1.0)
        self.title = self.figure.suptitle(" ", fontsize="small")
        self.ticks = [[line for axis in (ax.xaxis, ax.yaxis) for tick in axis.get_major_ticks()
                       for line in (tick.tick1line, tick.tick2line) if line.get_visible()]
                      for ax in self.axes]
        changing = [self.title]
        for ax, ticks in zip(self.axes, self.ticks):
            changing += [*ax.images, *ax.patches, *ax.spines.values(), *ticks, *ax.texts]
        for artist in changing:
            artist.set_visible(False)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.figure.bbox)
        for artist in changing:
            artist.set_visible(True)

    def render(self, raw: np.ndarray, cal: np.ndarray, argmax: Sequence[int], lo: float,
               hi: float, title: str) -> np.ndarray:
        """The (H, W, 3) uint8 image of ``raw`` and ``cal`` with colors from ``lo`` to ``hi``."""
        a, b = (int(i) for i in argmax)
        self.canvas.restore_region(self.background)
        for ax, ticks, m in zip(self.axes, self.ticks, (raw, cal)):
            (image,) = ax.images
            image.set_data(m)
            image.set_clim(lo, hi)
            (box,) = ax.patches
            box.set_xy((b - 0.5, a - 0.5))
            # the cell values, row by row (plot_layer_heatmap writes none for large matrices)
            for text, cell in zip(ax.texts, np.ndindex(m.shape)):
                label, color = cell_label(m[cell], lo, hi)
                text.set_text(label)
                text.set_color(color)
            for artist in (image, box, *ticks, *ax.spines.values(), *ax.texts):
                ax.draw_artist(artist)
        self.title.set_text(title)
        self.figure.draw_artist(self.title)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def canvas_for(x_names: tuple[str, ...], y_names: tuple[str, ...], dpi: int) -> HeatmapCanvas:
    """The cached :class:`HeatmapCanvas` of a layout (the least recently used of more than
    four is dropped), built again when matplotlib's settings (``rcParams``) changed since.
    Callers hold the plotting module's render lock."""
    import matplotlib

    key = (x_names, y_names, dpi)
    if key in _CACHE and dict.__eq__(matplotlib.rcParams, _CACHE[key].style):
        _CACHE.move_to_end(key)
    else:
        _CACHE[key] = HeatmapCanvas(x_names, y_names, dpi)
        _CACHE.move_to_end(key)
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return _CACHE[key]
