"""Activation capture: choose layers, hook them, pool their outputs at capture time."""

from alignment_callback.hooks.collect import collect_activations
from alignment_callback.hooks.layer_listing import list_layers
from alignment_callback.hooks.outputs import LayerOutputError, LayerShapeError, select_output
from alignment_callback.hooks.recorder import ActivationRecorder
from alignment_callback.hooks.selection import resolve_layers, resolve_names

__all__ = [
    "ActivationRecorder",
    "LayerOutputError",
    "LayerShapeError",
    "collect_activations",
    "list_layers",
    "resolve_layers",
    "resolve_names",
    "select_output",
]
