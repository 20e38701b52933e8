"""What the model is compared with: the references of :class:`AlignmentCallback`.

A reference is one of

* a frozen model (an ``nn.Module``, or a checkpoint path with ``reference_class``), run over the
  probe (or its own ``reference_inputs``) once per fit;
* its features, precomputed: a ``{layer: (n, ...) tensor}`` mapping or a feature file (``.pt``,
  ``.pth``, ``.npz``, ``.npy``, ``.safetensors``; ``alignment-callback extract`` writes one with
  a fingerprint of its probe, checked against this probe), so a large reference never sits in
  accelerator memory during training; features of more than two dimensions (``(n, T, d)``)
  are pooled with ``reference_pool``, as a model reference's outputs would be;
* ``"initial"``: the model's own activations at the start of fit (drift from initialization);
* ``"previous"``: the model's own activations at the previous alignment step.

Several references go in one mapping ``{name: reference}``; their keys gain a level
(``<prefix>/<name>/<measure>/...``) and they share one probe pass of the model.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

from alignment_callback.callback.probe import load_probe, load_reference
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional.preprocessing import check_pool, pool_features
from alignment_callback.hooks.collect import BATCH_ROWS, is_column

DRIFT = ("initial", "previous")
FEATURE_SUFFIXES = (".pt", ".pth", ".npz", ".npy", ".safetensors")
ReferenceSpec = Union[nn.Module, str, os.PathLike, Mapping[str, Any]]


@dataclass
class Reference:
    """One reference and its engine (which caches the reference's prepared state).

    Attributes:
        name: the key level of this reference (``None`` for a single reference).
        kind: ``"model"``, ``"features"``, ``"initial"`` or ``"previous"``.
        module: the frozen model (``kind="model"``).
        features: ``{layer: tensor}`` (``kind="features"``).
        path: the feature file the features came from, if any.
        origin: where the reference came from, in words (its file's name, or the module's
            class and number of parameters, and the features' shapes): part of the settings
            a checkpoint records.
        layers: which reference layers (model: names / globs; features: names, default all).
        layers_given: whether ``reference_layers`` chose them (else they are ``layers``).
        inputs, input_key, batch_transform: how the model reference is run.
        pool: how a model reference's outputs, and features of more than two dimensions, are
            reduced to (n, d) (``reference_pool``).
        engine: computes this reference's steps.
    """

    name: str | None
    kind: str
    engine: AlignmentEngine
    module: nn.Module | None = None
    features: dict[str, Tensor] | None = None
    path: str | None = None
    origin: str | None = None
    layers: Any = None
    layers_given: bool = True  # False: reference_layers was not given, layers is used
    inputs: Any = None
    input_key: str | None = None
    batch_transform: Any = None
    pool: Any = "mean"
    pending: dict[str, Tensor] | None = None  # activations / features until the engine prepares them

    @property
    def label(self) -> str:
        return self.name or "reference"

    @property
    def drift(self) -> bool:
        return self.kind in DRIFT


def _is_features(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def _per_reference(value: Any, name: str | None, names: list[str]) -> Any:
    """A per-reference setting: ``{name: value}`` when keyed by the references' names."""
    if name is not None and isinstance(value, Mapping) and set(value) <= set(names) and value:
        return value.get(name)
    return value


def _load_file(path: str | os.PathLike, reference_class: Any) -> tuple[str, Any]:
    """A path: a feature file (read safely) or a model checkpoint."""
    if reference_class is not None or Path(path).suffix.lower() not in FEATURE_SUFFIXES:
        return "model", load_reference(path, reference_class)
    from alignment_callback.hooks.feature_files import FeatureFileError, load_features

    try:
        return "features", load_features(path)
    except FeatureFileError as err:
        if "pickled" not in str(err):
            raise
    return "model", load_reference(path, reference_class)  # torch.save(model, path)


def _check_path(spec: str | os.PathLike, name: str | None) -> None:
    """A reference path that does not exist: an error naming the argument, with ``'initial'`` /
    ``'previous'`` suggested for a near miss (``"inital"``).  A URL (``s3://...``, loaded by
    ``reference_class.load_from_checkpoint``) is left to the loader."""
    path = os.fspath(spec)
    if os.path.exists(path) or "://" in path:
        return
    where = "reference" if name is None else f"reference[{name!r}]"
    close = difflib.get_close_matches(path, DRIFT, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(f"{where}: no such file {path!r}{hint}")


def resolve_references(reference: ReferenceSpec, make_engine: Any, *, layers: Any,
                       reference_layers: Any = None, reference_inputs: Any = None,
                       reference_input_key: Any = None, reference_batch_transform: Any = None,
                       reference_pool: Any = "mean", reference_class: Any = None,
                       input_key: Any = None, batch_transform: Any = None,
                       pairs: Mapping[str, str] | None = None) -> list[Reference]:
    """The :class:`Reference` list of a callback's ``reference=`` argument (see the module
    docstring); ``make_engine(pairs)`` builds each reference's engine."""
    if _is_features(reference) or not isinstance(reference, Mapping):
        items: list[tuple[str | None, Any]] = [(None, reference)]
    else:
        if not reference:
            raise ValueError("reference: the mapping of references is empty")
        items = [(str(k), v) for k, v in reference.items()]
    names = [n for n, _ in items if n is not None]
    out = []
    for name, spec in items:
        ref_layers = _per_reference(reference_layers, name, names)
        inputs = _per_reference(reference_inputs, name, names)
        key = _per_reference(reference_input_key, name, names)
        transform = _per_reference(reference_batch_transform, name, names)
        options = dict(name=name, layers=ref_layers if ref_layers is not None else layers,
                       layers_given=ref_layers is not None,
                       inputs=None if inputs is None else load_probe(inputs, "reference_inputs"),
                       input_key=key if inputs is not None else input_key,
                       batch_transform=transform if inputs is not None else batch_transform,
                       pool=_per_reference(reference_pool, name, names))
        if isinstance(spec, str) and spec in DRIFT:
            if ref_layers is not None or inputs is not None:
                raise ValueError(f"reference={spec!r} compares the model with itself: it takes no "
                                 "reference_layers or reference_inputs")
            diagonal = {"__diagonal__": "__diagonal__"}  # resolved to the model's own layers
            out.append(Reference(kind=spec, engine=make_engine(diagonal), **options))
            continue
        if isinstance(spec, (str, os.PathLike)):
            _check_path(spec, name)
            kind, loaded = _load_file(spec, reference_class)
            path = str(spec)
        elif _is_features(spec):
            kind, loaded, path = "features", dict(spec), None
        elif isinstance(spec, nn.Module):
            # frozen at setup, once it is known to share nothing with the trained model
            kind, loaded, path = "model", load_reference(spec, frozen=False), None
        else:
            raise TypeError(f"reference{'' if name is None else f'[{name!r}]'} must be a model, a "
                            "checkpoint or feature-file path, a {layer: tensor} mapping, "
                            f"'initial' or 'previous', got {type(spec).__name__}")
        if kind == "features":
            if inputs is not None:
                raise ValueError(f"reference{'' if name is None else f'[{name!r}]'} is features, "
                                 "computed already: it takes no reference_inputs")
            features = {str(k): v for k, v in loaded.items()}
            if ref_layers is not None:
                wanted = [ref_layers] if isinstance(ref_layers, str) else list(ref_layers)
                missing = [w for w in wanted if w not in features]
                if missing:
                    raise ValueError(f"reference layers {missing} are not in the reference's "
                                     f"features {sorted(features)}")
                features = {w: features[w] for w in wanted}
            options["layers"] = list(features)
            _check_feature_tensors(features, options["pool"], name)
            shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in features.items())
            options["origin"] = shapes if path is None else f"{Path(path).name}: {shapes}"
            out.append(Reference(kind="features", features=features, path=path,
                                 engine=make_engine(pairs), **options))
        else:
            where = "reference_pool" if name is None else f"reference_pool[{name!r}]"
            if options["pool"] is None:
                raise ValueError(f"{where}: no pool given for this model reference")
            check_pool(options["pool"], where)
            options["origin"] = Path(path).name if path else _module_origin(loaded)
            out.append(Reference(kind="model", module=loaded, engine=make_engine(pairs), **options))
    return out


def _module_origin(module: nn.Module) -> str:
    """A reference module in words: its class and number of parameters."""
    try:
        size = f"{sum(p.numel() for p in module.parameters())} parameters"
    except (RuntimeError, ValueError):  # lazy modules: not initialized yet
        size = "uninitialized parameters"
    return f"{type(module).__qualname__} of {size}"


def _check_feature_tensors(features: Mapping[str, Tensor], pool: Any, name: str | None) -> None:
    """Every layer of a features reference has the same rows (one per probe sample), and
    features with more than two dimensions have a pool (``reference_pool``) to reduce them."""
    where = "reference" if name is None else f"reference[{name!r}]"
    flat = [k for k, v in features.items() if v.dim() == 0]
    if flat:
        raise ValueError(f"{where}: features {flat} are 0-dimensional; each layer needs one row "
                         "per probe sample, (n, ...)")
    rows = {k: int(v.shape[0]) for k, v in features.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{where}: the feature layers have different numbers of rows {rows}; "
                         "each layer needs one row per probe sample, in the probe's order")
    if any(v.dim() > 2 for v in features.values()):
        place = "reference_pool" if name is None else f"reference_pool[{name!r}]"
        if pool is None:
            raise ValueError(f"{place}: no pool given for {where}'s features of more than two "
                             "dimensions (e.g. (n, tokens, d))")
        check_pool(pool, place)


def probe_rows(probe: Any) -> int | None:
    """Rows of a probe when they can be known without running it (tensor, list of batches,
    DataLoader over a sized dataset), else None."""
    from torch.utils.data import DataLoader

    if isinstance(probe, Tensor):
        return int(probe.shape[0])
    if isinstance(probe, DataLoader):
        if probe.batch_size is None:  # items are batches themselves (or a custom batch_sampler)
            return None
        try:
            n = len(probe.dataset)
        except TypeError:
            return None
        if not probe.drop_last:
            return n
        size = probe.batch_size  # a plain BatchSampler (check_sequential) drops the remainder
        return None if size is None else n // size * size
    if isinstance(probe, list):
        counts = [batch_rows(b) for b in probe]
        return None if any(c is None for c in counts) else sum(counts)
    return None


def batch_rows(batch: Any, inner: bool = False) -> int | None:
    """Rows of one probe batch: a tensor's; a column of plain values' (texts); the largest
    leading size of a dict's tensors (or its columns' lengths); a tuple's / list's first
    element's (``(inputs, labels, ...)``); None when they cannot be read."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if is_column(batch):
        return len(batch)
    if isinstance(batch, Mapping):  # the rows: the largest leading size (some entries,
        # e.g. position ids of shape (1, T), broadcast over the samples)
        sizes = [n for n in (batch_rows(v, True) for v in batch.values()) if n is not None]
        return max(sizes) if sizes else None
    if isinstance(batch, (tuple, list)) and batch and not inner:
        return batch_rows(batch[0], True)
    return None


def count_rows(batches: Any) -> int | None:
    """Rows of a probe's batches (iterated when they cannot be counted otherwise; call it
    under :func:`~alignment_callback.hooks.collect.preserved_rng`: a DataLoader draws); None
    when a batch's rows cannot be read."""
    known = probe_rows(batches)
    if known is not None or isinstance(batches, (Tensor, list)):
        return known
    if isinstance(batches, Mapping):
        return batch_rows(batches)
    total = 0
    for batch in batches:
        n = batch_rows(batch)
        if n is None:
            return None
        total += n
    return total


def check_features(ref: Reference, probe: Any, n_probe: int | None) -> None:
    """A configuration check before training: the features' rows against the probe's
    ``n_probe`` (None: unknown), and the feature file's probe fingerprint against ``probe``."""
    n_ref = next(iter(ref.features.values())).shape[0]
    where = f"reference {ref.path or ref.label!r}" if ref.path else f"{ref.label}'s features"
    if n_probe is not None and n_probe != n_ref:
        raise ValueError(f"{where} have {n_ref} rows but the probe has {n_probe}: the features "
                         "must be of the same probe samples, in the same order")
    if ref.path is not None:
        from alignment_callback.hooks.extract import check_fingerprint

        check_fingerprint(ref.path, probe)


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype activations and features are compared in: float64 stays float64 (a float64
    model, float64 features), everything else is float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def feature_dtype(features: Mapping[str, Tensor], device: torch.device, pool: Any = None,
                  where: str = "reference_pool") -> dict[str, Tensor]:
    """Features on the compute device (float64 stays float64, the rest float32), those of more
    than two dimensions reduced to (n, d) by ``pool`` (the reference's ``reference_pool``, as
    a model reference's outputs are; ``where`` names it in errors)."""
    out = {}
    for k, v in features.items():
        dtype = compute_dtype(v)
        if v.dim() <= 2:
            out[k] = v.to(device=device, dtype=dtype)
            continue
        try:  # pooled in row blocks, as a model reference's batches are: only (n, d) is kept
            out[k] = torch.cat([pool_features(part.to(device=device, dtype=dtype), pool)
                                for part in v.split(BATCH_ROWS)])
        except ValueError as err:
            raise ValueError(f"{where}: the features of layer {k!r}, of shape "
                             f"{tuple(v.shape)}: {err}") from err
    return out
