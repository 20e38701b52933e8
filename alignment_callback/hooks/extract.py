"""Save a model's probe activations to a feature file, with a fingerprint of the probe.

A feature file is a ``{layer name: (n, d) tensor}`` dict saved with ``torch.save`` (what the
command line's ``compare`` / ``matrix`` read).  :func:`extract_features` adds one reserved
entry, ``"__probe__": {"rows": n, "sha256": "..."}``, the fingerprint of the probe the rows came
from (:func:`probe_fingerprint`).  The reader of the command line strips it, so files written
before it existed read as before, and it lets a consumer refuse "features made from another
probe" (:func:`check_fingerprint`).

Lightning-free: the model is any ``nn.Module``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from alignment_callback.functional._validation import check_positive_int
from alignment_callback.functional.preprocessing import Pool
from alignment_callback.hooks.batches import compute_dtype, in_dtype_of
from alignment_callback.hooks.collect import (
    collect_activations,
    is_column,
    preserved_loader_seed,
    preserved_rng,
)
from alignment_callback.hooks.selection import Layers

#: The reserved key of a feature file that holds the probe's fingerprint.
PROBE_KEY = "__probe__"
#: The metadata key of a ``.safetensors`` feature file that holds its layer order (safetensors
#: stores tensors by name).
LAYERS_KEY = "__layers__"
#: The stream of a batch that is one column of plain values (a list of texts).
_COLUMN = ("[rows]",)
#: Extensions :func:`save_features` writes.
SAVE_EXTENSIONS: tuple[str, ...] = (".pt", ".pth", ".safetensors")


# ------------------------------------------------------------------------------ fingerprint
class _Stream:
    """One leaf of the probe (a tensor at one position of every batch), hashed row-major.  A
    scalar (a number, a 0-dim tensor: one value for a batch's rows) is hashed when its value
    changes (``repeat_scalars``: in every batch, the scheme of earlier files), so a constant
    one does not make the fingerprint depend on the batching."""

    def __init__(self, repeat_scalars: bool = False) -> None:
        self.hash = hashlib.sha256()
        self.rows = 0
        self.dtypes: list[str] = []
        self.row_shapes: list[list[int]] = []
        self.repeat_scalars = repeat_scalars
        self.last_scalar: bytes | None = None

    def _scalar(self, text: str) -> None:
        encoded = text.encode()
        if self.repeat_scalars or encoded != self.last_scalar:
            self.hash.update(encoded)
        self.last_scalar = encoded

    def add(self, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            dtype, shape = str(t.dtype), list(t.shape)
            if dtype not in self.dtypes:
                self.dtypes.append(dtype)
            if t.dim() == 0:
                self._scalar(repr(t.item()))
                return
            if shape[1:] not in self.row_shapes:
                self.row_shapes.append(shape[1:])
            self.rows += shape[0]
            self.hash.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # a string, number or None inside a batch
            self._scalar(repr(value))

    def add_row(self, value: Any) -> None:
        """One row of a column of plain values (a string, bytes or a number)."""
        kind = type(value).__name__
        if kind not in self.dtypes:
            self.dtypes.append(kind)
        self.rows += 1
        self.hash.update(repr(value).encode() + b"\n")  # repr escapes newlines: one per row

    def summary(self) -> list[Any]:
        return [self.rows, self.dtypes, self.row_shapes, self.hash.hexdigest()]


class _Row:
    """One value of a column of plain values inside a dict batch (a row of texts)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _probe_batches(probe: Any) -> Iterable[Any]:
    if isinstance(probe, (Tensor, np.ndarray, Mapping)):
        return [probe]
    if callable(probe) and not isinstance(probe, nn.Module):
        return probe()
    if isinstance(probe, Iterable):
        return probe
    raise TypeError(f"probe: unsupported type {type(probe).__name__}; expected a tensor, a dict "
                    "batch, a list of batches or a DataLoader")


def _leaves(batch: Any, path: tuple[str, ...] = (), columns: bool = True
            ) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(batch, Mapping):
        for key in sorted(batch, key=str):
            yield from _leaves(batch[key], path + (str(key),), columns)
    elif columns and isinstance(batch, (list, tuple)) and path and all(
            isinstance(v, (str, bytes, int, float, bool, type(None))) for v in batch):
        # a column of plain values (a DataLoader collates a text field into a list of
        # strings): one stream of rows, whatever the batching
        for value in batch:
            yield path, _Row(value)
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from _leaves(value, path + (str(i),), columns)
    else:
        yield path, batch


def probe_fingerprint(probe: Any) -> dict[str, Any]:
    """The fingerprint of a probe: its number of rows and a sha256 of its content.

    The hash covers what the model is fed under :func:`collect_activations`' batch rules — a
    tensor batch, the *first* element of a tuple / list batch (the rest are labels), every entry
    of a dict batch — tensor by tensor (bytes, dtype and per-row shape), so it does not depend
    on how the rows are split into batches or on labels (a scalar entry of a dict batch, one
    value for the batch's rows, counts each time its value changes: one that differs between
    batches ties the fingerprint to the batching).  A tuple / list of plain values only
    (strings, bytes, numbers: a ``DataLoader`` over a list of texts, to be tokenized by a
    ``batch_transform``) is one column of rows, hashed and counted row by row.  A ``(n, ...)``
    tensor ``x``, the list of its batches and a ``DataLoader(TensorDataset(x, y))``
    (``shuffle=False``) have the same fingerprint, and any change of an input value, of the row
    order or of the dtype changes it.

    Parameters
    ----------
    probe : Tensor, ndarray, dict batch, list of batches, DataLoader or zero-argument callable
        The probe inputs as given to :func:`collect_activations` (a callable is called once).

    Returns
    -------
    dict
        ``{"rows": n, "sha256": hex digest}``; ``n`` is the number of rows: per batch, the
        largest leading size of the tensors it feeds the model (a broadcast ``(1, ...)``
        entry beside ``(b, ...)`` rows counts b), or the length of its column of plain values.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.hooks.extract import probe_fingerprint
    >>> x = torch.arange(12.0).reshape(6, 2)
    >>> fp = probe_fingerprint(x)
    >>> fp["rows"], fp == probe_fingerprint(list(x.split(4))), fp == probe_fingerprint(x.flip(0))
    (6, True, False)
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> fp == probe_fingerprint(DataLoader(TensorDataset(x, torch.zeros(6)), batch_size=4))
    True
    """
    return _fingerprint(probe)


def _fingerprint(probe: Any, columns: bool = True, repeat_scalars: bool = False
                 ) -> dict[str, Any]:
    """:func:`probe_fingerprint`; the schemes of earlier files: ``columns=False``, before lists
    of plain values were read as columns (each index its own stream, and only the first value
    of a list batch of them); ``repeat_scalars=True``, before a scalar was hashed only when it
    changes."""
    streams: dict[tuple[str, ...], _Stream] = {}
    rows = 0

    def stream_at(path: tuple[str, ...]) -> _Stream:
        return streams.setdefault(path, _Stream(repeat_scalars))

    # iterating a DataLoader draws a seed from the global stream, or from its own generator
    with preserved_rng(), preserved_loader_seed(probe):
        for batch in _probe_batches(probe):
            if isinstance(batch, (list, tuple)) and batch and not (columns and is_column(batch)):
                batch = batch[0]  # (inputs, labels, ...): the model sees the inputs
            if columns and is_column(batch):  # texts: one row per value
                stream = stream_at(_COLUMN)
                for value in batch:
                    stream.add_row(value)
                rows += len(batch)
                continue
            if columns and is_column([batch]):  # a list of texts: each text a batch of one
                stream_at(_COLUMN).add_row(batch)
                rows += 1
                continue
            before = {path: s.rows for path, s in streams.items()}
            for path, value in _leaves(batch, columns=columns):
                stream = stream_at(path)
                if isinstance(value, _Row):  # hashed as before, and counted
                    stream.add(value.value)
                    stream.rows += 1
                else:
                    stream.add(value)
            # the batch's rows: its largest leading size (a broadcast (1, ...) entry is not)
            rows += max((s.rows - before.get(path, 0) for path, s in streams.items()), default=0)
    if not streams:
        raise ValueError("probe: it holds no batch")
    summary = {"/".join(path): s.summary() for path, s in sorted(streams.items())}
    digest = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return {"rows": int(rows), "sha256": digest}


def _valid_fingerprint(value: Any) -> bool:
    return (isinstance(value, Mapping) and isinstance(value.get("rows"), int)
            and isinstance(value.get("sha256"), str))


def read_fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The probe fingerprint stored in a feature file, or ``None`` if it has none.

    Reads the ``"__probe__"`` entry of a ``.pt`` / ``.pth`` dict (loaded with
    ``weights_only=True``, memory-mapped) or the ``"__probe__"`` metadata of a ``.safetensors``
    file; other formats (and files written before fingerprints existed) give ``None``.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    dict or None
        ``{"rows": n, "sha256": hex digest}``.

    Raises
    ------
    FeatureFileError
        The file cannot be read (truncated, corrupt, holding pickled objects); a ValueError
        naming it.
    """
    from alignment_callback.hooks.feature_files import FeatureFileError, read_pt

    path = Path(path)
    ext = path.suffix.lower()
    if ext in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be memory-mapped;
            obj = read_pt(path)  # a corrupt one gets its reason here
        value = obj.get(PROBE_KEY) if isinstance(obj, Mapping) else None
    elif ext == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(PROBE_KEY)
            value = json.loads(text) if text else None
        except Exception as err:  # noqa: BLE001 - a corrupt header or fingerprint entry
            raise FeatureFileError(f"{path}: cannot read its probe fingerprint as a "
                                   f".safetensors file ({type(err).__name__}: {err})") from err
    else:
        return None
    return {"rows": int(value["rows"]), "sha256": str(value["sha256"])} \
        if _valid_fingerprint(value) else None


def check_fingerprint(path: str | os.PathLike, probe: Any) -> bool:
    """Raise if the feature file ``path`` was made from another probe than ``probe``.

    Parameters
    ----------
    path : str or path-like
        A feature file (see :func:`read_fingerprint`).
    probe : probe or dict
        The probe itself or its :func:`probe_fingerprint`.

    Returns
    -------
    bool
        ``True`` if the file's fingerprint matches, ``False`` if the file has none (nothing
        could be checked).

    Raises
    ------
    ValueError
        The fingerprints differ; the message names the file and both row counts.
    """
    stored = read_fingerprint(path)
    if stored is None:
        return False
    mine = probe if _valid_fingerprint(probe) else probe_fingerprint(probe)
    same = stored["rows"] == mine["rows"] and stored["sha256"] == mine["sha256"]
    if not same and not _valid_fingerprint(probe):  # a file of an earlier scheme
        same = any(dict(stored) == _fingerprint(probe, columns, repeat_scalars=True)
                   for columns in (True, False))
    if not same:
        raise ValueError(
            f"{path}: the features were made from another probe ({stored['rows']} rows, sha256 "
            f"{stored['sha256'][:12]}...) than this one ({mine['rows']} rows, sha256 "
            f"{mine['sha256'][:12]}...); extract them again from this probe, or, if the "
            "reference sees other inputs for the same rows (images for a model fed noised "
            "latents), stamp the file with this probe's fingerprint after checking that the "
            "rows correspond: save_features(feats, path, fingerprint=probe_fingerprint(probe))"
        )
    return True


# ------------------------------------------------------------------------------ extraction
def save_features(features: Mapping[str, Tensor], path: str | os.PathLike,
                  fingerprint: Mapping[str, Any] | None = None) -> Path:
    """Write ``{layer: tensor}`` (and a probe fingerprint) to ``path``, atomically.

    Parameters
    ----------
    features : mapping layer name -> Tensor
    path : str or path-like
        ``.pt`` / ``.pth`` (a dict, read with ``torch.load(weights_only=True)``; the fingerprint
        is the ``"__probe__"`` entry) or ``.safetensors`` (the fingerprint and the layer
        order, which safetensors does not keep, are metadata).
    fingerprint : dict, default=None
        ``{"rows": n, "sha256": ...}`` from :func:`probe_fingerprint`.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SAVE_EXTENSIONS:
        raise ValueError(f"{path}: cannot write feature files with extension {path.suffix!r}; "
                         f"use one of {', '.join(SAVE_EXTENSIONS)}")
    if PROBE_KEY in features:
        raise ValueError(f"{path}: a layer may not be named {PROBE_KEY!r} (reserved for the "
                         "probe fingerprint)")
    tensors, storages = {}, set()
    for k, v in features.items():
        t = v.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.nbytes() > t.numel() * t.element_size() or storage.data_ptr() in storages:
            t = t.clone()  # a view: .pt would write its whole storage, .safetensors refuses
        storages.add(t.untyped_storage().data_ptr())
        tensors[str(k)] = t
    tmp = path.with_name(path.name + ".tmp")
    try:
        if ext == ".safetensors":
            from safetensors.torch import save_file

            meta = {LAYERS_KEY: json.dumps(list(tensors))}
            if fingerprint:
                meta[PROBE_KEY] = json.dumps(dict(fingerprint))
            save_file(tensors, str(tmp), metadata=meta)
        else:
            obj: dict[str, Any] = dict(tensors)
            if fingerprint:
                obj[PROBE_KEY] = {"rows": int(fingerprint["rows"]),
                                  "sha256": str(fingerprint["sha256"])}
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file left beside the target
        raise
    return path


def _split_mapping(batch: Mapping[str, Any], batch_size: int) -> list[Any]:
    """A dict batch of n rows as batches of ``batch_size`` rows (when every tensor has n rows)."""
    rows = {t.shape[0] for t in batch.values() if isinstance(t, Tensor) and t.dim() > 0}
    if len(rows) != 1 or not all(isinstance(t, Tensor) and t.dim() > 0 for t in batch.values()):
        return [batch]
    n = rows.pop()
    return [{k: v[i:i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]


def _reusable(probe: Any) -> Any:
    """``probe`` as something :func:`extract_features` can read twice: a zero-argument
    callable's result (called once), and a one-shot iterator as the list of its batches (read
    once, under :func:`preserved_rng` as a fingerprint reads a probe); anything else as it
    is."""
    with preserved_rng():
        if callable(probe) and not isinstance(probe, nn.Module):
            probe = probe()
        if isinstance(probe, Iterator) and not isinstance(probe, (Tensor, Mapping)):
            probe = list(probe)
    return probe


def extract_features(
    model: nn.Module,
    probe: Any,
    layers: Layers,
    path: str | os.PathLike | None = None,
    pool: Pool = "mean",
    batch_size: int = 256,
    input_key: str | None = None,
    device: torch.device | str | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    **collect_kwargs: Any,
) -> dict[str, Tensor]:
    """Run ``model`` over ``probe``, return ``{layer: (n, d)}`` and save it with a fingerprint.

    The activations are those of :func:`collect_activations` with the same arguments (eval
    mode, no grad, the model's train flags and the global RNG restored afterward), as the
    callback records a reference model's: the probe's floating-point tensors are cast to the
    model's parameter dtype (a bfloat16 or float64 model fed a float32 probe), and the
    activations are kept in float64 for a float64 model, else float32 (``dtype=`` overrides);
    the fingerprint is the probe's as given.  A single dict batch (e.g. a tokenizer's output)
    is split into batches of ``batch_size`` rows.

    Parameters
    ----------
    model : nn.Module
    probe : Tensor, dict batch, list of batches, DataLoader, iterator or callable
        The probe inputs, the same rows in the same order for every model compared later (a
        DataLoader with ``shuffle=False``).  A zero-argument callable is called once, and a
        one-shot iterator (a generator, also one the callable returns) is read once into the
        list of its batches, held in memory: the fingerprint and the capture then see the
        same batches.
    layers : str, pattern or sequence of them
        Names, globs (``"encoder.layer.*"``) or regexes (see :func:`resolve_layers`).
    path : str or path-like, default=None
        Where to save (``.pt``, ``.pth`` or ``.safetensors``); ``None`` saves nothing.
    pool : {"mean", "cls", "first", "last", "flatten", "none"} or callable, default="mean"
        Pooling of 3-D+ outputs at capture time.
    batch_size : int, default=256
        Rows per forward pass for a tensor or dict probe.
    input_key : str, default=None
        For dict batches, call ``model(batch[input_key])`` instead of ``model(**batch)``.
    device : torch.device or str, default=None
        Where the inputs go (default: the model's device).
    batch_transform, forward : callable, default=None
        As in :func:`collect_activations`.
    **collect_kwargs
        Other :func:`collect_activations` arguments (``max_batches``, ``mask_key``, ``dtype``,
        ``output_key``, ...).

    Returns
    -------
    dict of str -> Tensor
        The activations (CPU); the file also holds ``"__probe__": probe_fingerprint(probe)``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from alignment_callback.hooks.extract import extract_features
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> feats = extract_features(model, torch.randn(10, 4), ["0", "2"])
    >>> {k: tuple(v.shape) for k, v in feats.items()}
    {'0': (10, 8), '2': (10, 2)}
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    probe = _reusable(probe)  # read twice below: for the fingerprint, then by the model
    fingerprint = probe_fingerprint(probe)  # of the probe as given, whatever the model's dtype
    data = _split_mapping(probe, batch_size) if isinstance(probe, Mapping) else probe
    as_compared = "dtype" not in collect_kwargs
    collect_kwargs.setdefault("dtype", None)  # kept as the model gives it, then as compared
    with preserved_loader_seed(data):  # (the cast below reads a DataLoader lazily)
        feats = collect_activations(model, in_dtype_of(model, data), layers, pool=pool,
                                    device=device, input_key=input_key,
                                    batch_transform=batch_transform, forward=forward,
                                    batch_size=batch_size, **collect_kwargs)
    if as_compared:
        feats = {k: v.to(compute_dtype(v)) if v.is_floating_point() else v
                 for k, v in feats.items()}
    if path is not None:
        rows = next(iter(feats.values())).shape[0] if feats else 0
        if rows != fingerprint["rows"]:  # e.g. max_batches: the file would claim the whole probe
            raise ValueError(
                f"the features hold {rows} of the probe's {fingerprint['rows']} rows "
                "(max_batches?): a feature file carries the whole probe's fingerprint; extract "
                "the whole probe, or pass a probe of just these rows")
        save_features(feats, path, fingerprint)
    return feats


__all__ = [
    "PROBE_KEY",
    "check_fingerprint",
    "extract_features",
    "probe_fingerprint",
    "read_fingerprint",
    "save_features",
]
