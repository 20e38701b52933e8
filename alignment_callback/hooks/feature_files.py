"""Feature files: saved activations of a model on a probe (``{layer: (n, ...) tensor}``).

Read by the callback (a reference given as features) and the command line.  Formats:

* ``.pt`` / ``.pth``: a tensor (one layer, named ``"features"``), a ``{layer name: tensor}``
  dict (what :func:`~alignment_callback.hooks.collect_activations` returns) or a list of
  tensors (layers ``"0"``, ``"1"``, ...); read with ``torch.load(weights_only=True)``, so no
  code runs;
* ``.npy``: one array (layer ``"features"``); ``.npz``: each array is a layer;
* ``.safetensors``: each tensor is a layer (needs the ``safetensors`` package).

A file written by :func:`~alignment_callback.hooks.extract.extract_features` also holds the
fingerprint of its probe under a reserved key, which :func:`load_features` leaves out.  Every
problem is a :class:`FeatureFileError` (a ``ValueError``) naming the file (and the layer).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional._validation import as_float
from alignment_callback.hooks.extract import LAYERS_KEY, PROBE_KEY

FEATURE_EXTENSIONS: tuple[str, ...] = (".pt", ".pth", ".npy", ".npz", ".safetensors")


class FeatureFileError(ValueError):
    """A feature (or groups) file is missing, unreadable, or holds something unusable."""


def _short(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(err).__name__}: {first}"


def _check_path(path: Path, extensions: Sequence[str], what: str) -> str:
    ext = path.suffix.lower()
    if ext not in extensions:
        raise FeatureFileError(
            f"{path}: unknown {what} file extension {path.suffix!r}; expected one of "
            f"{', '.join(extensions)}"
        )
    if not path.exists():
        raise FeatureFileError(f"{path}: no such file")
    if not path.is_file():
        raise FeatureFileError(f"{path}: not a file")
    return ext


def _as_tensor(value: Any, path: Path, name: str) -> Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biuf":
            raise FeatureFileError(
                f"{path}: layer {name!r} is a numpy array of dtype {value.dtype}, not numbers"
            )
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, Tensor):
        raise FeatureFileError(
            f"{path}: layer {name!r} is not a tensor (got {type(value).__name__}); a feature file "
            "must hold a tensor or a {layer name: tensor} dict"
        )
    if value.layout != torch.strided:
        raise FeatureFileError(f"{path}: layer {name!r} is a {value.layout} tensor; save it "
                               "dense (tensor.to_dense())")
    if value.dtype == torch.bool or value.is_complex():
        raise FeatureFileError(f"{path}: layer {name!r} has dtype {value.dtype}, not real numbers")
    return as_float(value, f"layer {name!r}")  # float32; float64 for float64, integers > 2**24


def _validate(layers: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    if not layers:
        raise FeatureFileError(f"{path}: holds no tensors")
    rows: dict[str, int] = {}
    for name, t in layers.items():
        if t.dim() == 0:
            raise FeatureFileError(
                f"{path}: layer {name!r} is a scalar; need (n_samples, ...) rows"
            )
        if t.shape[0] < 2:
            raise FeatureFileError(
                f"{path}: layer {name!r} has {t.shape[0]} row(s) (shape {tuple(t.shape)}); "
                "need at least 2 samples, one row per probe input"
            )
        if t.numel() == 0:
            raise FeatureFileError(f"{path}: layer {name!r} is empty (shape {tuple(t.shape)})")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise FeatureFileError(f"{path}: layer {name!r} contains {bad} NaN/Inf value(s)")
        rows[name] = int(t.shape[0])
    if len(set(rows.values())) > 1:
        raise FeatureFileError(f"{path}: layers have different numbers of rows: {rows}")
    return layers


def _from_object(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, (Tensor, np.ndarray)):
        return {"features": _as_tensor(obj, path, "features")}
    if isinstance(obj, Mapping):
        return {str(k): _as_tensor(v, path, str(k)) for k, v in obj.items()
                if not (k == PROBE_KEY and isinstance(v, Mapping))}
    if isinstance(obj, (list, tuple)):
        return {str(i): _as_tensor(v, path, str(i)) for i, v in enumerate(obj)}
    raise FeatureFileError(
        f"{path}: holds a {type(obj).__name__}; expected a tensor, a {{layer name: tensor}} dict "
        "or a list of tensors"
    )


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # first byte of a legacy (non-zip) torch.save file: a pickle protocol mark
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_pt(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with errors that say what is wrong with the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - classified below
        raise _pt_error(path, err) from err


def _pt_error(path: Path, err: BaseException) -> FeatureFileError:
    """A pickled-object file (refused by ``weights_only``) or a truncated / corrupt one."""
    chain = f"{err} {err.__context__ or ''} {err.__cause__ or ''}"
    found = _UNSUPPORTED_GLOBAL.search(chain)
    if found and _resolves(found.group(1)):  # else a name cut short or garbled: corrupt
        return FeatureFileError(
            f"{path}: holds pickled Python objects ({found.group(1)}) that "
            "torch.load(weights_only=True) refuses to load; save tensors only, e.g. "
            "torch.save({name: torch.as_tensor(array) for name, array in layers.items()}, path)"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        reason = "the file is empty"
    elif head != _ZIP_MAGIC and head[0] != _PICKLE_PROTO:
        reason = "cannot read it as a zip archive or a legacy torch pickle"
    elif head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        reason = "its zip archive has no central directory: the file is cut short"
    else:
        inner = err.__context__ if "Weights only load failed" in str(err) and err.__context__ \
            else err
        reason = _short(inner).split(". ")[0] if str(inner).strip() else \
            f"{type(inner).__name__}: it ends before its data does"
    return FeatureFileError(f"{path}: not a readable .pt file (truncated or corrupt: {reason})")


def _resolves(name: str) -> bool:
    """Whether the dotted ``name`` of a pickled global can name an object, imported nothing: an
    attribute path of an imported module, or a name under an installed top-level module not
    imported yet (a name cut short or garbled in a corrupt file does not)."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return False
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is not None:
            obj: Any = module
            try:
                for attribute in parts[cut:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                return False
            return True
    return importlib.util.find_spec(parts[0]) is not None


_NPY_MAGIC = b"\x93NUMPY"


def read_npy(path: Path) -> np.ndarray:
    """``np.load(allow_pickle=False)`` with errors that say what is wrong with the file: not a
    ``.npy`` file at all (no ``\\x93NUMPY`` magic: numpy would read it as a pickle), cut short,
    or an array of Python objects (which would need unpickling)."""
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head != _NPY_MAGIC:
        reason = ("the file is empty" if not head else
                  f"it does not start with the .npy magic string {_NPY_MAGIC!r}")
        raise FeatureFileError(f"{path}: not a readable .npy file (truncated or corrupt: "
                               f"{reason})")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as err:
        if "allow_pickle" in str(err):  # a valid header of dtype object: pickled contents
            raise FeatureFileError(
                f"{path}: holds an array of Python objects (dtype object), not numbers; save a "
                "numeric array, e.g. np.save(path, np.asarray(features, dtype=np.float32))"
            ) from err
        raise FeatureFileError(f"{path}: not a readable .npy file (truncated or corrupt: "
                               f"{_short(err)})") from err


def _natural(name: str) -> list[Any]:
    """A sort key that orders the numbers in names by value (``h.2`` before ``h.10``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name) if part]


def _safetensors_order(path: Path, names: list[str]) -> list[str]:
    """The layer order of a ``.safetensors`` file: the one :func:`save_features` recorded in
    its metadata when it names these layers, else the names' natural order."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(LAYERS_KEY)
    try:
        recorded = json.loads(text) if text else None
    except ValueError:
        recorded = None
    if isinstance(recorded, list) and sorted(map(str, recorded)) == sorted(names):
        return [str(name) for name in recorded]
    return sorted(names, key=_natural)


def load_features(path: str | Path) -> dict[str, Tensor]:
    """Load a feature file as ``{layer name: tensor}`` (CPU, float32; float64 stays float64).

    Parameters
    ----------
    path : str or Path
        ``.pt``/``.pth`` (a tensor -> ``{"features": t}``, a dict of layer name -> tensor, or a
        list of tensors; loaded with ``torch.load(weights_only=True)``; a ``"__probe__"``
        fingerprint entry is dropped), ``.npy`` (one array -> ``{"features": a}``), ``.npz``
        (each array a layer), ``.safetensors`` (each tensor a layer; needs the
        ``safetensors`` package).  Layer order is the file's order; safetensors stores
        tensors by name, so a ``.safetensors`` file's order is the one :func:`save_features`
        recorded in its metadata, else the names' natural order (``2`` before ``10``).

    Returns
    -------
    dict of str -> Tensor

    Raises
    ------
    FeatureFileError
        The file is missing, truncated or corrupt, holds pickled objects (``.pt``; an
        object array in a ``.npy``) or something other than tensors, has an unknown
        extension, a layer has fewer than 2 rows or NaN/Inf values, or the layers disagree on
        the number of rows.  The message names the file and the layer.
    """
    path = Path(path)
    ext = _check_path(path, FEATURE_EXTENSIONS, "feature")
    try:
        if ext in (".pt", ".pth"):
            layers = _from_object(read_pt(path), path)
        elif ext == ".npy":
            layers = {"features": _as_tensor(read_npy(path), path, "features")}
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                layers = {k: _as_tensor(archive[k], path, k) for k in archive.files}
        else:  # .safetensors
            try:
                from safetensors.torch import load_file
            except ImportError as err:
                raise FeatureFileError(
                    f"{path}: reading .safetensors files needs the safetensors package "
                    "(pip install safetensors)"
                ) from err
            tensors = load_file(str(path), device="cpu")
            layers = {k: _as_tensor(tensors[k], path, k)
                      for k in _safetensors_order(path, list(tensors))}
    except FeatureFileError:
        raise
    except Exception as err:  # any reader failure: corrupt file, pickled objects, permissions
        raise FeatureFileError(
            f"{path}: cannot read as {ext} feature file ({_short(err)})"
        ) from err
    return _validate(layers, path)
