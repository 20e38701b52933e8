"""``alignment-callback extract``: a model's probe activations to a feature file.

The model comes from an importable factory (``pkg.module:make_model``, called with no
arguments or with ``--model-kwargs``; ``--checkpoint`` then loads a state dict into it) or from
a LightningModule class and a checkpoint (``load_from_checkpoint``).  The library function is
:func:`alignment_callback.hooks.extract.extract_features` (re-exported here with the
fingerprint helpers).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignment_callback.hooks import resolve_layers
from alignment_callback.hooks.collect import split_rows
from alignment_callback.hooks.extract import (
    PROBE_KEY,
    check_fingerprint,
    extract_features,
    probe_fingerprint,
    read_fingerprint,
    save_features,
)
from alignment_callback.reporting.io import FeatureFileError, read_pt
from alignment_callback.reporting.plan import CLIError, os_reason


def import_object(spec: str, option: str) -> Any:
    """``pkg.module:name`` (``name`` may be dotted) imported; the current folder is importable.

    >>> import_object("collections:OrderedDict", "--model").__name__
    'OrderedDict'
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{option} {spec}: expected MODULE:NAME (e.g. my_models:make_model)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's module
        raise CLIError(f"{option} {spec}: cannot import module {module_name!r} "
                       f"({type(err).__name__}: {err})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{option} {spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _state_dict(path: str) -> dict[str, Any]:
    obj = read_pt(Path(path))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError(f"--checkpoint {path}: holds no state dict (a {{name: tensor}} dict or a "
                       "Lightning checkpoint with 'state_dict')")
    return obj


def build_model(args: Any) -> nn.Module:
    """The model of ``--model`` / ``--lightning-class`` (with ``--checkpoint``), on the CPU."""
    kwargs: dict[str, Any] = {}
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError as err:
            raise CLIError(f"--model-kwargs: not valid JSON ({err})") from err
        if not isinstance(kwargs, dict):
            raise CLIError(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CLIError(f"--checkpoint {args.checkpoint}: no such file")
    if args.model:
        factory = import_object(args.model, "--model")
        if not callable(factory):
            raise CLIError(f"--model {args.model}: {type(factory).__name__} is not callable")
        try:
            model = factory(**kwargs)
        except Exception as err:  # noqa: BLE001 - the user's factory
            raise CLIError(f"--model {args.model}: calling it failed "
                           f"({type(err).__name__}: {err})") from err
        if not isinstance(model, nn.Module):
            raise CLIError(f"--model {args.model}: returned a {type(model).__name__}, not an "
                           "nn.Module")
        if args.checkpoint:
            try:
                model.load_state_dict(_state_dict(args.checkpoint))
            except RuntimeError as err:
                detail = " ".join(str(err).split())[:300]
                raise CLIError(f"--checkpoint {args.checkpoint}: does not fit the model of "
                               f"--model {args.model} ({detail})") from err
        return model
    cls = import_object(args.lightning_class, "--lightning-class")
    if not hasattr(cls, "load_from_checkpoint"):
        raise CLIError(f"--lightning-class {args.lightning_class}: not a LightningModule class "
                       "(no load_from_checkpoint)")
    if not args.checkpoint:
        raise CLIError("--lightning-class needs --checkpoint CKPT")
    try:
        return cls.load_from_checkpoint(args.checkpoint, map_location="cpu", **kwargs)
    except Exception as err:  # noqa: BLE001 - a checkpoint that does not fit the class
        raise CLIError(f"--checkpoint {args.checkpoint}: cannot load it with "
                       f"{args.lightning_class}.load_from_checkpoint "
                       f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from err


def _holds_texts(loaded: Any, depth: int = 0) -> bool:
    """Whether a probe file holds strings (its first batch's first entries)."""
    if isinstance(loaded, (str, bytes)):
        return True
    if isinstance(loaded, (list, tuple)) and loaded and depth < 3:
        return _holds_texts(loaded[0], depth + 1)
    if isinstance(loaded, dict) and depth < 3:
        return any(_holds_texts(v, depth + 1) for v in loaded.values())
    return False


def load_probe(path: str, batch_size: int = 256) -> Any:
    """The probe of ``--probe``: a tensor, a dict batch, a tuple batch ``(inputs, labels,
    ...)`` or a list of batches (``.pt``), read as the callback reads a probe file."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--probe {path}: no such file")
    try:
        loaded = read_pt(p)
    except FeatureFileError as err:
        if p.suffix.lower() in (".npy", ".npz", ".safetensors"):  # a readable file, another format
            raise CLIError(f"--probe {path}: a probe is a .pt file (torch.save), not "
                           f"{p.suffix}: save it with torch.save(tensor, 'probe.pt')") from err
        raise CLIError(f"--probe {err}") from err
    if _holds_texts(loaded):
        raise CLIError(f"--probe {path}: holds texts, and the command line has no tokenizer: "
                       "save the tokenizer's output as the probe (a dict of tensors with "
                       "input_ids and attention_mask, e.g. tokenizer(texts, padding=True, "
                       "return_tensors='pt')), or call extract_features(model, texts, layers, "
                       "path, batch_transform=tokenizer) in Python")
    if isinstance(loaded, tuple):  # one (inputs, labels) batch, in --batch-size rows
        return split_rows(loaded, batch_size)
    return loaded


def run_extract(args: Any) -> int:
    """``extract``: write ``--out`` and print what it holds."""
    out = Path(args.out)
    if out.suffix.lower() not in (".pt", ".pth", ".safetensors"):
        raise CLIError(f"--out {args.out}: the feature file must end in .pt, .pth or "
                       ".safetensors")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if out.is_dir():
        raise CLIError(f"--out {args.out}: is a directory; give the feature file's path")
    for option in ("probe", "checkpoint"):
        given = getattr(args, option, None)
        if given and Path(given).resolve() == out.resolve():
            raise CLIError(f"--out {args.out}: is the --{option} file, which it would overwrite")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was requested but CUDA is not available")
    probe = load_probe(args.probe, args.batch_size)
    model = build_model(args).to(args.device)
    layers = [p for group in args.layers for p in group]
    try:
        resolve_layers(model, layers, "model")
    except ValueError as err:  # the Python advice of the message does not apply here
        raise CLIError(f"--layers: {str(err).split(' Use list_layers')[0]}") from err
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {args.out}: cannot write the feature file ({os_reason(err)})"
                       ) from err
    try:
        feats = extract_features(model, probe, layers, None, pool=args.pool,
                                 batch_size=args.batch_size, input_key=args.input_key,
                                 device=args.device)
    except (FeatureFileError, CLIError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - the model's own error on this probe (bad ids,
        # wrong keys): a problem of the input, told with the option that gave it
        raise CLIError(f"--probe {args.probe}: running the model on it failed "
                       f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from err
    fingerprint = probe_fingerprint(probe)
    try:
        save_features(feats, out, fingerprint)
    except OSError as err:
        raise CLIError(f"--out {args.out}: cannot write the feature file ({os_reason(err)})"
                       ) from err
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feats.items())
    print(f"wrote {out}: {len(feats)} layer(s): {shapes}; probe {args.probe}: "
          f"{fingerprint['rows']} rows, sha256 {fingerprint['sha256'][:16]}...")
    return 0


__all__ = [
    "PROBE_KEY",
    "build_model",
    "check_fingerprint",
    "extract_features",
    "import_object",
    "load_probe",
    "probe_fingerprint",
    "read_fingerprint",
    "run_extract",
    "save_features",
]
