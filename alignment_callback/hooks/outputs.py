"""Turn whatever a module returns into the one tensor to record."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

OutputKey = Union[int, str, None]


class LayerOutputError(TypeError):
    """A chosen layer returned nothing that can be recorded (no tensor where the rules of
    :func:`select_output` look): a property of the model and of the layers chosen, not of the
    data.

    Examples
    --------
    >>> from alignment_callback.hooks import LayerOutputError, select_output
    >>> try:
    ...     select_output((None, "text"), layer="head")
    ... except LayerOutputError as err:
    ...     print(isinstance(err, TypeError), "'head'" in str(err))
    True True
    """


class LayerShapeError(ValueError):
    """A chosen layer's outputs do not give one row per probe sample: a 0-dim output (a loss),
    layers with different numbers of rows, rows that are not the reference's (an output that is
    not batch-first, such as (T, n, d)), or a pool that cannot reduce the output to rows
    (``pool="none"`` on a 3-D output); a property of the model, of the layers and of the pool
    chosen, not of the data.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.hooks import LayerShapeError, collect_activations
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> handle = model[0].register_forward_hook(lambda m, i, out: out.sum())  # a scalar output
    >>> try:
    ...     collect_activations(model, torch.randn(4, 3), ["0"])
    ... except LayerShapeError as err:
    ...     print("0-dim" in str(err))
    True
    """


def _first_tensor(values: Any, depth: int = 0) -> Tensor | None:
    """The first floating-point (or complex) tensor of ``values``: integer and boolean ones
    are ids and masks passed along (a sentence-transformers module returns the features dict
    it was given, ``input_ids`` first), not activations.  None at the top level: the first
    one in its nested tuples, lists and mappings, depth first (``((hidden, attn), ids)``)."""
    values = list(values)
    found = next((v for v in values if isinstance(v, Tensor)
                  and (v.is_floating_point() or v.is_complex())), None)
    if found is not None or depth >= _NESTING:
        return found
    for v in values:  # plain containers only: a namedtuple's fields have meanings of their own
        inner = _as_mapping(v)
        inner = (inner.values() if inner is not None
                 else v if type(v) in (tuple, list) else ())
        found = _first_tensor(inner, depth + 1)
        if found is not None:
            return found
    return None


_NESTING = 4  # container levels searched below a module's output


def _as_mapping(output: Any) -> Mapping[str, Any] | None:
    """``output`` read as a mapping: a dict or HF ``ModelOutput`` as it is, a dataclass instance
    as its fields by name in declaration order; None for anything else."""
    if isinstance(output, Mapping):
        return output
    if isinstance(output, type) or not dataclasses.is_dataclass(output):
        return None
    return {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}


def _by_key(output: Any, key: int | str, layer: str) -> Any:
    try:
        if isinstance(key, int):
            mapping = _as_mapping(output)
            if mapping is not None:  # dict / ModelOutput / dataclass: index the non-None values
                return [v for v in mapping.values() if v is not None][key]
            return output[key]
        if isinstance(output, Mapping) and key in output:
            return output[key]
        return getattr(output, key)
    except (IndexError, KeyError, AttributeError, TypeError) as err:
        raise KeyError(
            f"layer {layer!r}: output_key={key!r} not found in its {type(output).__name__} output"
        ) from err


def select_output(output: Any, output_key: OutputKey = None, layer: str = "?") -> Tensor:
    """Pick the tensor to record from a module's output.

    A ``Tensor`` is returned as it is, whatever ``output_key`` is (a run-wide ``output_key``
    meant for a tuple / dict output never indexes a plain tensor, whose first axis is the
    batch).  Default rules for a container output (``output_key=None``):

    * a tuple / list (a namedtuple too) gives its *first* floating-point tensor element (HF
      layers return ``(hidden_states, attentions, ...)``; LSTMs ``(output, (h, c))``);
    * a dict, an HF ``ModelOutput`` or a dataclass (its fields, in declaration order) gives
      ``last_hidden_state``, else the last element of ``hidden_states``, else its first
      floating-point tensor value.

    Integer and boolean tensors (token ids, masks) are passed over.  Where the top level holds
    no floating-point tensor, nested tuples, lists and mappings are searched, depth first
    (``((hidden, attn), ids)`` gives ``hidden``; a nested namedtuple's fields, which have
    meanings of their own, are not); a container holding none is an error, as ``output_key``
    can pick one explicitly.

    Parameters
    ----------
    output : Any
        What the module's ``forward`` returned.
    output_key : int, str or None, default=None
        For container outputs only (a tensor output is used as it is): ``None`` for the
        default rules; an ``int`` indexes a tuple/list (or the non-``None`` values of a dict /
        ``ModelOutput``); a ``str`` is a dict key or attribute (``"pooler_output"``).  The
        selected value must be a tensor, or a container the default rules pick one from.
    layer : str, default="?"
        The layer's name, used in error messages only.

    Returns
    -------
    Tensor
        The selected tensor itself (not a copy).

    Raises
    ------
    LayerOutputError
        No floating-point tensor could be found, or ``output_key`` selects something other
        than a tensor (a ``TypeError``; the message names the layer).
    KeyError
        ``output_key`` is not in the output.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.hooks import select_output
    >>> hidden, attn = torch.zeros(2, 3, 4), torch.zeros(2, 3, 3)
    >>> select_output((hidden, attn)) is hidden
    True
    >>> select_output({"logits": attn, "last_hidden_state": hidden}) is hidden
    True
    >>> select_output((hidden, attn), output_key=1) is attn
    True
    >>> select_output(hidden, output_key=1) is hidden  # a tensor output: as it is
    True
    """
    if isinstance(output, Tensor):
        return output
    packed = [v for v in ([output] + (list(output) if isinstance(output, (tuple, list)) else []))
              if isinstance(v, PackedSequence)]
    if packed and output_key is None and (output is packed[0] or _first_tensor(
            [v for v in output if not isinstance(v, PackedSequence)], _NESTING) is None):
        raise LayerOutputError(
            f"layer {layer!r} returned a PackedSequence (an RNN fed packed sequences): its rows "
            "are the tokens of every sample, not one row per sample; hook a module after "
            "pad_packed_sequence, or one returning a tensor per sample")
    if output_key is not None:
        picked = _by_key(output, output_key, layer)
        if isinstance(picked, PackedSequence):
            return select_output(picked, None, layer)  # refused above, with the reason
        if isinstance(picked, (tuple, list)) or _as_mapping(picked) is not None:
            try:  # the default rules, one level down
                return select_output(picked, None, layer)
            except LayerOutputError as err:
                raise LayerOutputError(
                    f"layer {layer!r}: output_key={output_key!r} selects a "
                    f"{type(picked).__name__} holding no floating-point tensor") from err
        if not isinstance(picked, Tensor):
            raise LayerOutputError(
                f"layer {layer!r}: output_key={output_key!r} selects a "
                f"{type(picked).__name__}, not a tensor"
            )
        return picked
    found: Tensor | None = None
    mapping = _as_mapping(output)
    if isinstance(output, (tuple, list)):
        found = _first_tensor(output)
    elif mapping is not None or hasattr(output, "last_hidden_state"):
        found = getattr(output, "last_hidden_state", None)
        if not isinstance(found, Tensor) and mapping is not None:
            found = mapping.get("last_hidden_state")
            hidden = mapping.get("hidden_states")
            if not isinstance(found, Tensor) and isinstance(hidden, (tuple, list)) and hidden:
                found = hidden[-1] if isinstance(hidden[-1], Tensor) else None
            if not isinstance(found, Tensor):
                found = _first_tensor(mapping.values())
    if not isinstance(found, Tensor):
        values = list(mapping.values()) if mapping is not None else (
            list(output) if isinstance(output, (tuple, list)) else [])
        nested = any(isinstance(v, (tuple, list)) or _as_mapping(v) is not None for v in values)
        named = [f"{type(v).__module__}.{type(v).__qualname__}" for v in values
                 if isinstance(v, tuple) and type(v) is not tuple]  # not searched
        only_ids = any(isinstance(v, Tensor) for v in values) and not nested
        what = ("only integer or boolean tensors (token ids, masks: not activations; a "
                "sentence-transformers module returns the features dict it was given)"
                if only_ids else "no floating-point tensor, at its top level or nested"
                if nested else "no tensor to record")
        if named:
            what += (f" (the fields of a namedtuple, here {named[0]}, are not searched: they "
                     "have meanings of their own)")
        raise LayerOutputError(
            f"layer {layer!r} returned a {type(output).__name__} with {what}; hook a "
            "submodule that returns the activations instead, or pick them with "
            "output_key=<index or key> (ActivationRecorder, collect_activations and "
            "list_layers take it)"
        )
    return found


def dense_output(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """A nested tensor as its zero-padded dense tensor and the mask of its real positions.

    ``nn.TransformerEncoder`` given a ``src_key_padding_mask`` runs its layers on nested
    tensors in eval mode without gradients (PyTorch's fast path): each sample holds only its
    real tokens.  Any other tensor is returned as it is.

    Parameters
    ----------
    x : Tensor
        A layer's output (see :func:`select_output`).

    Returns
    -------
    (Tensor, Tensor or None)
        ``(padded, mask)``: ``padded`` of shape ``(n, T, ...)`` (``T`` the longest sample),
        zero past each sample's end, and ``mask`` of shape ``(n, T)``, True on real tokens;
        ``(x, None)`` for a tensor that is not nested.
    """
    if not x.is_nested:
        return x, None
    parts = x.unbind()
    padded = torch.nested.to_padded_tensor(x, 0.0)
    if padded.dim() < 2 or any(p.dim() == 0 for p in parts):
        return padded, None
    lengths = torch.tensor([p.shape[0] for p in parts], device=padded.device)
    return padded, torch.arange(padded.shape[1], device=padded.device) < lengths[:, None]
