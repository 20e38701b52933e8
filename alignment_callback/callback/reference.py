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
(``<prefix>/<name>/<measure>/...``) and they share one probe pass of the model.  Their settings
(``reference_layers``, ``reference_pool``, ``reference_class``, ...) may then be given per
reference, ``{name: value}``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

from alignment_callback.callback.dispatch import check_key_part
from alignment_callback.callback.probe import load_probe, load_reference
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional.preprocessing import check_pool, pool_features
from alignment_callback.hooks.batches import compute_dtype
from alignment_callback.hooks.collect import BATCH_ROWS, is_column
from alignment_callback.hooks.extract import LAYERS_KEY, PROBE_KEY
from alignment_callback.hooks.selection import about_argument, resolve_names

DRIFT = ("initial", "previous")
FEATURE_SUFFIXES = (".pt", ".pth", ".npz", ".npy", ".safetensors")
ReferenceSpec = Union[nn.Module, str, os.PathLike, Mapping[str, Any]]


@dataclass
class Reference:
    """One reference and its engine (which caches the reference's prepared state).

    Attributes
    ----------
    name : str | None
        The key level of this reference (``None`` for a single reference).
    kind : str
        ``"model"``, ``"features"``, ``"initial"`` or ``"previous"``.
    module : nn.Module | None
        The frozen model (``kind="model"``).
    features : dict[str, Tensor] | None
        ``{layer: tensor}`` (``kind="features"``).
    path : str | None
        The feature file the features came from, if any.
    origin : str | None
        Where the reference came from, in words (its file's name, or the module's
        class and number of parameters, and the features' shapes): part of the settings
        a checkpoint records.
    layers : Any
        Which reference layers (model: names / globs; features: names, default all).
    layers_given : bool
        Whether ``reference_layers`` chose them (else they are ``layers``).
    inputs : Any
        The reference's own probe, row-aligned with the model's (``reference_inputs``),
        or None: it runs on the model's probe.
    input_key : str | None
        ``reference_input_key``: how a dict batch is fed to the reference.
    batch_transform : Any
        ``reference_batch_transform``: ``f(batch) -> inputs`` of the reference.
    pool : Any
        How a model reference's outputs, and features of more than two dimensions, are
        reduced to (n, d) (``reference_pool``).
    engine : AlignmentEngine
        Computes this reference's steps.
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
    """A per-reference setting: ``{name: value}`` when keyed by the references' names (a name
    left out: None, the setting's default)."""
    if name is not None and isinstance(value, Mapping) and value:
        keyed = {str(k): v for k, v in value.items()}  # as the references' names are
        if set(keyed) <= set(names):
            return keyed.get(name)
    return value


def _check_per_name(settings: Mapping[str, Any], names: list[str]) -> None:
    """With named references, a per-reference setting given as a mapping is keyed by their
    names: a mapping with a key that is no reference's name is an error, naming the keys and
    listing the names.  ``reference_inputs`` alone may be a mapping of other keys, one dict
    batch for every reference, unless it mixes those with reference names."""
    if not names:
        return
    for setting, value in settings.items():
        if not isinstance(value, Mapping) or not value:
            continue
        unknown = [str(k) for k in value if str(k) not in names]
        if not unknown or (setting == "reference_inputs" and len(unknown) == len(value)):
            continue
        close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
        hint = "".join(f"; {k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
        raise ValueError(f"{setting}: the keys {unknown} are not reference names {names}: "
                         "with several references a mapping gives each reference's setting "
                         f"by its name ({{name: ...}}; a name left out takes the default){hint}")


#: The last part of a parameter's or buffer's name in a ``state_dict``.
PARAMETER_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _npz_shapes(path: Path) -> dict[str, Tensor] | None:
    """``{name: meta tensor of its shape}`` of a ``.npz`` file's arrays, read from their
    headers (no array is loaded); None as soon as a name is no parameter's (features)."""
    import zipfile

    from numpy.lib import format as npy

    out = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            name = member.removesuffix(".npy")
            if name.rsplit(".", 1)[-1] not in PARAMETER_NAMES:
                return None
            with archive.open(member) as f:
                header = (npy.read_array_header_1_0 if npy.read_magic(f) == (1, 0)
                          else npy.read_array_header_2_0)
                out[name] = torch.empty(header(f)[0], device="meta")
    return out


def _peek(path: Path) -> Any:
    """The content of a ``.pt`` / ``.pth`` file (``weights_only``, memory-mapped where it can
    be), or ``{name: meta tensor of its shape}`` of a ``.safetensors`` file that
    :func:`~alignment_callback.hooks.extract.save_features` did not write or of a ``.npz``
    file whose names could all be parameters'; None for other files and for what cannot be
    read so (pickled objects)."""
    try:
        if path.suffix.lower() == ".npz":
            return _npz_shapes(path)
        if path.suffix.lower() in (".pt", ".pth"):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if {PROBE_KEY, LAYERS_KEY} & set(f.metadata() or {}):  # save_features wrote it
                    return None
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta")
                        for k in f.keys()}
    except Exception:  # noqa: BLE001 - the file's reader says what is wrong with it
        return None
    return None


def _is_checkpoint(content: Any) -> bool:
    """A Lightning checkpoint: a dict holding a ``state_dict`` dict or a
    ``pytorch-lightning_version``."""
    return isinstance(content, Mapping) and (isinstance(content.get("state_dict"), Mapping)
                                             or "pytorch-lightning_version" in content)


def _is_state_dict(content: Any) -> bool:
    """A model's ``state_dict`` rather than features: a dict of tensors without a probe
    fingerprint whose keys all name parameters or buffers (their last dotted part is one of
    :data:`PARAMETER_NAMES`) and whose shapes cannot be one probe's features (a 0-dimensional
    tensor, tensors of different numbers of dimensions, such as a weight and its bias, or of
    different first dimensions)."""
    if not isinstance(content, Mapping) or not content or PROBE_KEY in content:
        return False
    if not all(isinstance(v, Tensor) for v in content.values()):
        return False
    if not all(str(k).rsplit(".", 1)[-1] in PARAMETER_NAMES for k in content):
        return False
    shapes = [tuple(v.shape) for v in content.values()]
    return (any(not s for s in shapes) or len({len(s) for s in shapes}) > 1
            or len({s[0] for s in shapes}) > 1)


def _load_file(path: str | os.PathLike, reference_class: Any) -> tuple[str, Any]:
    """A path: a feature file (read safely) or a model checkpoint.

    A path with a feature suffix (:data:`FEATURE_SUFFIXES`) is read as features unless it holds
    a Lightning checkpoint (:func:`_is_checkpoint`) and ``reference_class`` is given, or pickled
    objects (a whole module, ``torch.save(model, path)``, or a checkpoint with pickled
    hyperparameters for ``reference_class``); any other path is a checkpoint.  A model's
    ``state_dict`` (:func:`_is_state_dict`) is refused, and a Lightning checkpoint without
    ``reference_class`` is an error that asks for it."""
    from alignment_callback.hooks.feature_files import FeatureFileError, load_features

    if reference_class is not None and not hasattr(reference_class, "load_from_checkpoint"):
        raise TypeError(f"reference_class must be a LightningModule subclass (its "
                        f"load_from_checkpoint loads {os.fspath(path)!r}), got "
                        f"{reference_class!r}")
    if Path(path).suffix.lower() not in FEATURE_SUFFIXES:  # as given: a URL stays one
        return "model", load_reference(path, reference_class)
    content = _peek(Path(path))
    if reference_class is not None and _is_checkpoint(content):
        return "model", load_reference(path, reference_class)
    if _is_state_dict(content):
        keys = list(content)
        raise FeatureFileError(
            f"{path}: looks like a model's state_dict (its keys {keys[:3]}"
            f"{' ...' if len(keys) > 3 else ''} name parameters and buffers, and their shapes "
            "are not one probe's features): pass the model itself with these weights "
            "(model.load_state_dict(<them>); reference=model), or a Lightning "
            "checkpoint with reference_class=")
    try:
        return "features", load_features(path)
    except FeatureFileError as err:
        if _is_checkpoint(content):
            raise FeatureFileError(
                f"{path}: holds a Lightning checkpoint ('state_dict', "
                "'pytorch-lightning_version'), not features: pass "
                "reference_class=<its LightningModule class> to load it as a model") from err
        if "pickled" not in str(err):
            raise
    return "model", load_reference(path, reference_class)  # torch.save(model, path)


def _name_error(error: Exception, where: str) -> None:
    """Put ``where: `` before the message of ``error`` (in place: its type and traceback stay)
    when that message is its first argument."""
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{where}: {error.args[0]}", *error.args[1:])


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
                       pairs: Mapping[str, str] | None = None, pool: Any = None
                       ) -> list[Reference]:
    """The :class:`Reference` list of a callback's ``reference=`` argument (see the module
    docstring); ``make_engine(pairs)`` builds each reference's engine.

    With several (named) references, ``reference_layers``, ``reference_inputs``,
    ``reference_input_key``, ``reference_batch_transform``, ``reference_pool`` and
    ``reference_class`` may each be ``{name: value}``; a name left out takes the default (the
    model's ``layers``, its inputs, ``pool``, no class), and a key that is no reference's name
    is an error (:func:`_check_per_name`).  ``pool``: the model's pool, what a name left out of
    a per-name ``reference_pool`` falls back to (None: such a model reference is an error)."""
    if _is_features(reference) or not isinstance(reference, Mapping):
        items: list[tuple[str | None, Any]] = [(None, reference)]
    else:
        if not reference:
            raise ValueError("reference: the mapping of references is empty")
        items = [(check_key_part(str(k), "reference name"), v)
                 for k, v in reference.items()]
    names = [n for n, _ in items if n is not None]
    _check_per_name({"reference_layers": reference_layers, "reference_inputs": reference_inputs,
                     "reference_input_key": reference_input_key,
                     "reference_batch_transform": reference_batch_transform,
                     "reference_pool": reference_pool, "reference_class": reference_class},
                    names)
    out = []
    for name, spec in items:
        where = "reference" if name is None else f"reference[{name!r}]"
        ref_layers = _per_reference(reference_layers, name, names)
        ref_pool = _per_reference(reference_pool, name, names)
        if ref_pool is None and isinstance(reference_pool, Mapping):  # a name left out
            ref_pool = pool
        inputs = _per_reference(reference_inputs, name, names)
        key = _per_reference(reference_input_key, name, names)
        transform = _per_reference(reference_batch_transform, name, names)
        options = dict(name=name, layers=ref_layers if ref_layers is not None else layers,
                       layers_given=ref_layers is not None,
                       inputs=None if inputs is None else load_probe(inputs, "reference_inputs"),
                       # the reference's own key / transform, for reference_inputs or for
                       # the probe (a reference that needs the probe's batches otherwise)
                       input_key=key if inputs is not None or key is not None else input_key,
                       batch_transform=(transform if inputs is not None or transform is not None
                                        else batch_transform),
                       pool=ref_pool)
        if isinstance(spec, str) and spec in DRIFT:
            given = [arg for arg, value in (("reference_layers", ref_layers),
                                            ("reference_inputs", inputs),
                                            ("reference_input_key", key),
                                            ("reference_batch_transform", transform))
                     if value is not None]
            if given:
                others = [n for n in names if n != name]
                hint = "" if not others else (
                    "; give them to the other references by name, e.g. "
                    f"{given[0]}={{{others[0]!r}: ...}}")
                raise ValueError(f"{where}={spec!r} compares the model with itself: it takes no "
                                 f"reference_layers, reference_inputs, reference_input_key or "
                                 f"reference_batch_transform (got {', '.join(given)}){hint}")
            diagonal = {"__diagonal__": "__diagonal__"}  # resolved to the model's own layers
            out.append(Reference(kind=spec, engine=make_engine(diagonal), **options))
            continue
        if isinstance(spec, (str, os.PathLike)):
            _check_path(spec, name)
            try:
                kind, loaded = _load_file(spec, _per_reference(reference_class, name, names))
            except Exception as err:
                if name is not None:  # one of several: say which
                    _name_error(err, where)
                raise
            path = str(spec)
        elif _is_features(spec):
            kind, loaded, path = "features", dict(spec), None
        elif isinstance(spec, nn.Module):
            # frozen at setup, once it is known to share nothing with the trained model
            kind, loaded, path = "model", load_reference(spec, frozen=False), None
        else:
            raise TypeError(f"{where} must be a model, a checkpoint or feature-file path, a "
                            "{layer: tensor} mapping, 'initial' or 'previous', got "
                            f"{type(spec).__name__}")
        if kind == "features":
            if inputs is not None:
                raise ValueError(f"{where} is features, computed already: it takes no "
                                 "reference_inputs")
            features = {str(k): v for k, v in loaded.items()}
            if ref_layers is not None:
                whose = "the reference's" if name is None else f"{where}'s"
                try:
                    chosen = resolve_names(list(features), ref_layers, f"{whose} features")
                except (TypeError, ValueError) as err:
                    raise about_argument(err, "reference_layers")
                features = {w: features[w] for w in chosen}
            options["layers"] = list(features)
            _check_feature_tensors(features, options["pool"], name)
            shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in features.items())
            options["origin"] = shapes if path is None else f"{Path(path).name}: {shapes}"
            out.append(Reference(kind="features", features=features, path=path,
                                 engine=make_engine(pairs), **options))
        else:
            place = "reference_pool" if name is None else f"reference_pool[{name!r}]"
            if options["pool"] is None:
                raise ValueError(f"{place}: no pool given for this model reference; give it "
                                 "one in reference_pool={name: pool}")
            check_pool(options["pool"], place)
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
