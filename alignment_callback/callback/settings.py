"""What a checkpoint of :class:`AlignmentCallback` records of its settings, and how a
resumed run compares them with its own: the curves whose settings changed start anew."""

from __future__ import annotations

import ast
import functools
import numbers
from collections.abc import Iterator
from typing import Any, Mapping

import numpy as np
from torch import Tensor

from alignment_callback.callback.reference import Reference


def as_list(layers: Any) -> Any:
    """A single layer spec as the one-element list it means ("fc1" is ["fc1"])."""
    return [layers] if isinstance(layers, str) else layers


def describe(value: Any) -> Any:
    """``value`` as primitives for a checkpoint's settings (which load with
    ``weights_only=True``): a number as a Python ``bool`` / ``int`` / ``float`` (NumPy scalars
    and 0-dim tensors too), a callable by its qualified name, an object by its ``str`` (its
    type's name when that would hold a memory address)."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, functools.partial):  # its arguments tell two partials apart
        args = [repr(describe(a)) for a in value.args]
        args += [f"{k}={describe(v)!r}" for k, v in value.keywords.items()]
        return f"{describe(value.func)}({', '.join(args)})"
    if callable(value):
        return getattr(value, "__qualname__", None) or type(value).__qualname__
    text = str(value)
    return type(value).__qualname__ if " at 0x" in text else text


def reference_settings(ref: Reference) -> dict[str, Any]:
    """A reference's part of the settings: its kind, where it came from, layers and pool."""
    if ref.drift:
        return {"kind": ref.kind}
    pooled = ref.kind == "model" or any(v.dim() > 2 for v in ref.features.values())
    # reference layers not given are the model's (layers=), which the settings compare as
    # the layers chosen
    layers = describe(as_list(ref.layers)) if ref.layers_given else "as layers="
    return {"kind": ref.kind, "origin": ref.origin, "layers": layers,
            "pool": describe(ref.pool) if pooled else None}


def probe_settings(rows: int | None, digest: str | None = None) -> dict[str, Any]:
    """The probe's part of the settings compared at a resume: its rows and a hash of its
    inputs, each where known (what is not known is not compared)."""
    known = {"probe rows": rows, "probe inputs": digest}
    return {k: v for k, v in known.items() if v is not None}


def probe_digest(batches: Any) -> str | None:
    """``"sha256:"`` and the first 16 hex digits of the probe's
    :func:`~alignment_callback.hooks.extract.probe_fingerprint` (the values, dtypes and row
    shapes of what the model is fed, however the rows are batched), or None when a batch holds
    anything but tensors, arrays, strings, numbers and None (the text another object, such as
    an image, is hashed by may hold a memory address, which differs from run to run) or the
    probe cannot be read."""
    from alignment_callback.hooks.extract import probe_fingerprint

    plain = True

    def checked() -> Iterator[Any]:
        nonlocal plain
        for batch in [batches] if isinstance(batches, (Tensor, Mapping)) else batches:
            plain = plain and _plain(batch)
            yield batch

    try:
        digest = probe_fingerprint(checked())["sha256"]
    except Exception:  # noqa: BLE001 - a probe that cannot be hashed is not compared
        return None
    return f"sha256:{digest[:16]}" if plain else None


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only tensors, arrays, strings, numbers and None."""
    if isinstance(value, Mapping):
        return all(_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (Tensor, np.ndarray, str, bytes, int, float))


def setting_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's settings and this callback's, one phrase each
    (settings the checkpoint does not record are taken as unchanged)."""
    changes = [f"{k} {saved[k]!r} → {current[k]!r}" for k in current
               if k not in ("references", "measures") and k in saved and saved[k] != current[k]]
    for field, what in (("references", "reference"), ("measures", "measure")):
        if field not in saved:
            continue
        old, new = saved[field], current[field]

        def name(key: str) -> str:  # the one reference of a callback has no name
            return f"the {what}" if key == "" else f"{what} {key!r}"

        changes += [f"{name(k)} added" for k in new if k not in old]
        changes += [f"{name(k)} removed" for k in old if k not in new]
        changes += [f"{name(k)} {old[k]!r} → {new[k]!r}" for k in new
                    if k in old and old[k] is not None and old[k] != new[k]]
    return changes


def state_key_fields(key: Any, qualname: str) -> dict[str, Any]:
    """The fields of a state key written by ``_generate_state_key`` for the class
    ``qualname`` (``{}`` for another key)."""
    if not isinstance(key, str) or not key.startswith(f"{qualname}{{"):
        return {}
    try:
        fields = ast.literal_eval(key[len(qualname):])
    except (ValueError, SyntaxError):
        return {}
    return fields if isinstance(fields, dict) else {}


def curves_kept(saved: Mapping[str, Any], current: Mapping[str, Any]
                ) -> tuple[list[str], list[str]]:
    """The labels ``[<reference>/]<measure>`` of the checkpoint's curves that ``current``
    settings continue (same global settings, same reference and measure settings) and of those
    they do not."""
    same_global = all(saved[k] == current[k] for k in current
                      if k not in ("references", "measures") and k in saved)
    old_refs = saved.get("references", current["references"])
    old_measures = saved.get("measures", current["measures"])
    kept, dropped = [], []
    for ref in old_refs:
        for m in old_measures:
            label = m if ref == "" else f"{ref}/{m}"
            same = (same_global and ref in current["references"]
                    and old_refs[ref] in (None, current["references"][ref])
                    and m in current["measures"]
                    and old_measures[m] in (None, current["measures"][m]))
            (kept if same else dropped).append(label)
    return kept, dropped


def resume_warning(log_prefix: str, changes: list[str], kept: list[str], dropped: list[str],
                   new: list[str], baseline: bool) -> str:
    """The warning of a run resumed with other settings: what changed and which curves go on."""
    if kept:
        fate = (f"the curves of {', '.join(kept)} continue"
                + (f"; the values of {', '.join(dropped)} are dropped from the history"
                   if dropped else "")
                + (f"; those of {', '.join(new)} start at this fit" if new else ""))
    else:
        fate = ("its alignment history is not continued: every curve starts anew at this "
                "fit" + (", with a baseline" if baseline else ""))
    return (f"AlignmentCallback(log_prefix={log_prefix!r}) resumes from a checkpoint written "
            f"with other settings ({'; '.join(changes)}): {fate}")
