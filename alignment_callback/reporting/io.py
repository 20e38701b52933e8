"""Files of the offline command-line tool (``alignment-callback compare/matrix``): feature
files (read by :mod:`alignment_callback.hooks.feature_files`, re-exported here), their
preprocessing and listing, group labels, and small helpers for resumable runs.

Every problem is reported as a :class:`FeatureFileError` (a ``ValueError``) with a one-line
message naming the file (and the layer).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional.permutation import GroupPermuter
from alignment_callback.functional.preprocessing import Pool, prepare_features
from alignment_callback.hooks.feature_files import (  # noqa: F401  (re-exported)
    FEATURE_EXTENSIONS,
    FeatureFileError,
    _check_path,
    _short,
    load_features,
    read_pt,
)

GROUP_EXTENSIONS: tuple[str, ...] = (".npy", ".txt", ".csv")


def preprocess_layers(
    layers: Mapping[str, Tensor],
    pool: Pool = "mean",
    clamp_quantile: float | None = None,
    normalize: bool = True,
    source: str | Path = "features",
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Apply :func:`prepare_features` to every layer (pool 3-D+ inputs -> optional clamp ->
    optional row L2-normalization), on ``device`` if given.

    2-D layers are not pooled (every pool mode leaves them as they are); a 1-D layer is
    refused (it would be one feature per sample, ±1 after normalization: save it as (n, 1) if
    that is meant).  Errors are raised as :class:`FeatureFileError` naming ``source`` and the
    layer.
    """
    out: dict[str, Tensor] = {}
    for name, t in layers.items():
        if t.dim() == 1:
            raise FeatureFileError(
                f"{source}: layer {name!r} is 1-D (shape {tuple(t.shape)}); features must be a "
                "2-D (n_samples, n_features) array, one row per probe input (or 3-D+, pooled); "
                "save a single feature per sample as shape (n, 1)"
            )
        if device is not None:
            t = t.to(device)
        try:
            out[name] = prepare_features(t, pool=pool, clamp_quantile=clamp_quantile,
                                         normalize=normalize)
        except ValueError as err:
            raise FeatureFileError(f"{source}: layer {name!r}: {err}") from err
    return out


def list_feature_files(directory: str | Path) -> list[Path]:
    """Feature files (known extensions) directly inside ``directory``, sorted by name."""
    d = Path(directory)
    if not d.exists():
        raise FeatureFileError(f"{d}: no such directory")
    if not d.is_dir():
        raise FeatureFileError(f"{d}: not a directory")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in FEATURE_EXTENSIONS)
    if not files:
        raise FeatureFileError(
            f"{d}: contains no feature files ({', '.join(FEATURE_EXTENSIONS)})"
        )
    return files


def model_names(files: Sequence[Path]) -> list[str]:
    """Display names of feature files: the stem, or the full file name where stems collide."""
    stems = [f.stem for f in files]
    return [f.stem if stems.count(f.stem) == 1 else f.name for f in files]


#: Separators of columns: a ``.txt``/``.csv`` line holding one is not a single label
_COLUMN_SEPARATORS: tuple[str, ...] = (",", ";", "\t")


def _label_lines(path: Path) -> list[str]:
    """The labels of a ``.txt``/``.csv`` groups file, one per line (blank lines ignored); a
    line of several columns (``row,label``) is refused, naming its line number."""
    labels = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        label = line.strip()
        sep = next((s for s in _COLUMN_SEPARATORS if s in label), None)
        if sep is not None:
            raise FeatureFileError(
                f"{path}: line {number} ({label[:40]!r}) has several columns ({sep!r}): "
                "--groups takes one label per line (row i's label on the i-th line), not a "
                "table such as 'row,label'; e.g. np.savetxt('groups.txt', labels, fmt='%s')"
            )
        if label:
            labels.append(label)
    return labels


def load_groups(path: str | Path, n: int | None = None) -> np.ndarray:
    """Group labels, one per row: ``.npy`` (a 1-D array) or ``.txt``/``.csv`` (one label per
    line; blank lines ignored; labels kept as strings).  Checks the count against ``n``.

    Refused (:class:`FeatureFileError`, naming the file): a line with a comma, semicolon or
    tab (a table such as ``row,label`` is not a label per line), labels that allow no
    permutation (one group, no two groups of one size), and labels that are all distinct:
    every row its own group is the ungrouped test, so ``--groups`` would have no effect (the
    library's ``groups=`` accepts that as ordinary permutations; on the command line it is a
    file that is not what was meant).
    """
    path = Path(path)
    ext = _check_path(path, GROUP_EXTENSIONS, "groups")
    try:
        if ext == ".npy":
            labels = np.load(path, allow_pickle=False)
        else:
            labels = np.asarray(_label_lines(path))
    except FeatureFileError:
        raise
    except Exception as err:
        raise FeatureFileError(f"{path}: cannot read groups ({_short(err)})") from err
    if labels.ndim != 1:
        raise FeatureFileError(
            f"{path}: groups must be one label per row, got shape {labels.shape}"
        )
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise FeatureFileError(f"{path}: groups contain NaN/Inf labels")
    try:  # one group, or no two of equal size: refused before any feature file is read
        GroupPermuter(labels, labels.shape[0])
    except ValueError as err:
        raise FeatureFileError(f"{path}: {err}") from err
    if len(np.unique(labels)) == labels.shape[0]:
        raise FeatureFileError(
            f"{path}: all {labels.shape[0]} labels are distinct, so every row would be its "
            "own group: --groups would have no effect; give one label per row with rows of a "
            "group sharing it"
        )
    if n is not None and labels.shape[0] != n:
        raise FeatureFileError(
            f"{path}: has {labels.shape[0]} group labels but the features have {n} rows"
        )
    return labels


def file_fingerprint(path: str | Path) -> list[int]:
    """``[size, mtime_ns]`` of a file: a cheap change detector for resumable runs."""
    st = Path(path).stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def labels_digest(labels: np.ndarray | None) -> str | None:
    """A short stable hash of group labels (for run settings)."""
    if labels is None:
        return None
    text = "\n".join(map(str, labels.tolist()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finite_or_none(value: float) -> float | None:
    """``value`` if finite, else ``None`` (JSON has no inf/NaN)."""
    return value if math.isfinite(value) else None


__all__ = [
    "FEATURE_EXTENSIONS",
    "FeatureFileError",
    "file_fingerprint",
    "labels_digest",
    "list_feature_files",
    "load_features",
    "load_groups",
    "model_names",
    "preprocess_layers",
]
