"""List every hookable layer of a model with the shape of its output on one batch."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from alignment_callback.hooks.collect import (
    evaluation_mode,
    model_device,
    probe_module,
    run_batch,
)
from alignment_callback.hooks.outputs import OutputKey, dense_output, select_output
from alignment_callback.hooks.selection import named_layers


def list_layers(
    model: nn.Module,
    example_batch: Any,
    device: torch.device | str | None = None,
    input_key: str | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    output_key: OutputKey = None,
) -> list[tuple[str, tuple[int, ...]]]:
    """Run one batch and return ``[(layer_name, output_shape), ...]`` for every hookable layer.

    Names are normalized (no ``module.`` / ``_orig_mod.``) and in model order; the root module,
    modules that did not run, and modules whose output holds no tensor are left out.  The shape
    is that of the tensor :func:`select_output` picks (before pooling), on the module's first
    call (a nested tensor, as ``nn.TransformerEncoder`` layers give with a padding mask in
    eval mode, as its zero-padded shape).  Like :func:`collect_activations` this runs in
    ``eval()`` mode without gradients (an ``nn.DataParallel`` as its ``module``, a
    ``torch.compile``-d model eagerly) and restores every train/eval flag and the RNG state
    afterward.

    Parameters
    ----------
    model : nn.Module
        The model.
    example_batch : Any
        One batch, with the batch rules of :func:`collect_activations` (a tensor is used
        whole).
    device : torch.device, str or None, default=None
        As in :func:`collect_activations`; ``None``: the model's device.
    input_key : str or None, default=None
        As in :func:`collect_activations`.
    batch_transform : callable or None, default=None
        As in :func:`collect_activations`.
    forward : callable or None, default=None
        As in :func:`collect_activations`.
    output_key : int, str or None, default=None
        As in :class:`ActivationRecorder`.

    Returns
    -------
    list of (str, tuple of int)
        ``(name, output_shape)`` for every layer that ran, in model order.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from alignment_callback.hooks import list_layers
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> list_layers(model, torch.zeros(3, 4))
    [('0', (3, 8)), ('1', (3, 8)), ('2', (3, 2))]
    """
    table = named_layers(model)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if name in shapes:
                return
            try:
                x: Tensor = select_output(output, output_key, name)
            except (TypeError, KeyError):
                return
            shapes[name] = tuple(dense_output(x)[0].shape)

        return hook

    dev = torch.device(device) if device is not None else model_device(model)
    with evaluation_mode(model):
        try:
            for name, _, module in table:
                handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
            run_batch(probe_module(model), example_batch, dev, input_key, batch_transform,
                      forward)
        finally:
            for h in handles:
                h.remove()
    return [(name, shapes[name]) for name, _, _ in table if name in shapes]
