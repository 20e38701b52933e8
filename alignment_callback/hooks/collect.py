"""Run a model over probe batches and return the pooled activations of chosen layers."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from alignment_callback.functional._validation import check_positive_int
from alignment_callback.functional.preprocessing import Pool
from alignment_callback.hooks.outputs import LayerShapeError
from alignment_callback.hooks.recorder import ActivationRecorder
from alignment_callback.hooks.selection import Layers


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Put the global random states back on exit: torch's (CPU, and CUDA when initialized),
    NumPy's legacy ``np.random`` and Python's ``random`` (a probe dataset or a forward may
    draw from any of them)."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a pass over the DataLoader ``data`` draws from, each
    once: the loader's own ``generator`` (its base seed), and the ``generator`` attribute of
    its ``sampler`` and of its ``batch_sampler``'s ``sampler`` (a ``RandomSampler(ds,
    generator=g)`` draws its permutation from ``g``; ``shuffle=True, generator=g`` makes the
    sampler share the loader's).  The global generators are left to :func:`preserved_rng`."""
    if not isinstance(data, DataLoader):
        return []
    owners = (data, getattr(data, "sampler", None),
              getattr(getattr(data, "batch_sampler", None), "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        gen = getattr(owner, "generator", None)
        if (isinstance(gen, torch.Generator) and not is_default_generator(gen)
                and not any(gen is g for g in found)):
            found.append(gen)
    return found


@contextmanager
def preserved_loader_seed(data: Any) -> Iterator[None]:
    """Put back, on exit, the generators of a DataLoader ``data`` that has its own (see
    :func:`_loader_generators`: the loader's ``generator``, its sampler's, its batch
    sampler's sampler's): each iteration of a DataLoader draws its base seed from the first
    (from the global RNG without one, which :func:`preserved_rng` restores) and a random
    sampler its order from its own, so a generator the training loader shares would otherwise
    move at every pass over the probe, and two passes would see the rows in other orders.
    Anything else passes through."""
    saved = [(gen, gen.get_state()) for gen in _loader_generators(data)]
    try:
        yield
    finally:
        for gen, state in saved:
            gen.set_state(state)


class LayerCountError(RuntimeError):
    """A chosen layer did not run exactly once per forward pass (a module reused inside the
    model, or a container without a forward): a property of the model and of the layers
    chosen, not of the data."""


def random_states() -> tuple[Any, ...]:
    """The global random states a forward may draw from (torch CPU, NumPy's legacy
    ``np.random``, Python's ``random``), for :func:`same_random_states`."""
    np_state = np.random.get_state()
    return torch.get_rng_state(), np_state[1].copy(), tuple(np_state[2:]), random.getstate()


def same_random_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two :func:`random_states` are equal: nothing was drawn between them."""
    return (torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
            and a[3] == b[3])


def is_default_generator(gen: torch.Generator) -> bool:
    """A global generator (torch's CPU one, a CUDA device's): restored by
    :func:`preserved_rng` only, which the loop's thread alone may do."""
    if gen is torch.default_generator:
        return True
    return torch.cuda.is_initialized() and any(gen is g for g in torch.cuda.default_generators)


def _put_back(tensor: Tensor, saved: Tensor) -> None:
    """Give ``tensor`` (a buffer) the values of ``saved`` again, in place where it can be (so
    a view of it sees them too): resized back when a forward resized it (an observer's
    per-channel statistics), re-pointed when its dtype or device changed; untouched when
    already equal, so an unchanged buffer keeps its version counter."""
    if tensor.dtype != saved.dtype or tensor.device != saved.device:
        tensor.data = saved
        return
    if tensor.shape != saved.shape:
        tensor.resize_(saved.shape)
    elif torch.equal(tensor, saved):
        return
    tensor.copy_(saved)


def _restorable(tensor: Tensor | None) -> bool:
    """A plain, materialized, strided tensor with data (not a lazy module's uninitialized
    buffer, a meta tensor or a tensor subclass, whose values are only re-bound)."""
    return (type(tensor) is Tensor and tensor.layout == torch.strided
            and tensor.device.type != "meta")


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Put every submodule's buffers back on exit: the same tensor objects under the same
    names (a forward that re-binds or registers one: a cache rebuilt for a longer input), and
    their values (a forward that updates one in eval mode: a quantization observer's
    min / max, scale and zero point; a resized one gets its shape back).

    Cost: one clone of every buffer per block (a probe pass), on the buffer's device, and one
    comparison per buffer on exit; buffers (running statistics, observers, masks) are small
    next to the activations of a forward pass.
    """
    clones: dict[int, Tensor] = {}
    saved = []
    for module in model.modules():
        entries = list(module._buffers.items())
        for _, buf in entries:
            if _restorable(buf) and id(buf) not in clones:
                clones[id(buf)] = buf.detach().clone()
        saved.append((module, entries, set(module._non_persistent_buffers_set)))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, entries, non_persistent in saved:
                buffers = module._buffers
                if (list(buffers) != [name for name, _ in entries]
                        or any(buffers[name] is not buf for name, buf in entries)):
                    buffers.clear()  # in place: the module's dict, in its order
                    buffers.update(entries)
                if module._non_persistent_buffers_set != non_persistent:
                    module._non_persistent_buffers_set.clear()
                    module._non_persistent_buffers_set.update(non_persistent)
            for module, entries, _ in saved:
                for _, buf in entries:
                    if buf is not None and id(buf) in clones:
                        _put_back(buf, clones[id(buf)])


@contextmanager
def preserved_generators(model: nn.Module) -> Iterator[None]:
    """Put back the state of the ``torch.Generator`` objects the model's submodules hold as
    attributes (a model drawing its noise from its own generator), and the attributes
    themselves.  The global generators are left to :func:`preserved_rng`: restoring one from
    a thread other than the training loop's would rewind the loop's stream."""
    saved = [(module, key, gen, gen.get_state())
             for module in model.modules() for key, gen in vars(module).items()
             if isinstance(gen, torch.Generator) and not is_default_generator(gen)]
    try:
        yield
    finally:
        for module, key, gen, state in saved:
            vars(module)[key] = gen
            gen.set_state(state)


def _uncompiled(fn: Any) -> Any:
    """The function ``torch.compile`` (or ``torch._dynamo.optimize``) wrapped to make ``fn``,
    else ``fn``.  From torch 2.11 a wrapper records its own id (``_torchdynamo_wrapper_id``),
    so a ``functools.wraps`` copy of it, which copies its attributes, is the user's own
    function; before, torch followed ``_torchdynamo_orig_callable`` wherever it was, as here."""
    while hasattr(fn, "_torchdynamo_orig_callable"):
        wrapper_id = getattr(fn, "_torchdynamo_wrapper_id", None)
        if wrapper_id is not None and wrapper_id != id(fn):
            break
        fn = fn._torchdynamo_orig_callable
    return fn


@contextmanager
def running_eagerly(model: nn.Module) -> Iterator[None]:
    """Run the model's modules without their compiled graphs inside the block: a module
    compiled in place (``nn.Module.compile()``: its ``_compiled_call_impl``) is called
    eagerly, and a ``forward`` set on the instance by ``torch.compile`` (Lightning's
    ``trainer.fit(torch.compile(model))``, a ``torch.compile``-d submodule) is replaced by the
    function it compiles.  So a probe pass (other shapes, hooks, eval mode) adds no graph to
    the compiler's cache and never makes training recompile.  Local to the model's modules:
    the compiler's global state (``torch.compiler.set_stance``) is untouched, as a worker
    thread running concurrently with training needs.  Functions compiled on their own and
    called inside a forward still run compiled."""
    compiled = [(m, vars(m)["_compiled_call_impl"]) for m in model.modules()
                if vars(m).get("_compiled_call_impl") is not None]
    forwards = [(m, vars(m)["forward"]) for m in model.modules()
                if _uncompiled(vars(m).get("forward")) is not vars(m).get("forward")]
    try:
        for module, _ in compiled:
            vars(module)["_compiled_call_impl"] = None
        for module, forward in forwards:
            vars(module)["forward"] = _uncompiled(forward)
        yield
    finally:
        for module, call in compiled:
            vars(module)["_compiled_call_impl"] = call
        for module, forward in forwards:
            vars(module)["forward"] = forward


@contextmanager
def evaluation_mode(model: nn.Module, restore_rng: bool = True) -> Iterator[None]:
    """Run a block in ``eval()`` mode under ``torch.no_grad()``, eagerly, leaving no trace.

    On exit (also on exceptions) the ``training`` flag of *every* submodule is restored exactly
    (mixed train/eval models included), so are the buffers of every submodule (a forward may
    update some in eval mode, see :func:`preserved_buffers`; that costs one clone of the
    buffers per block) and the ``torch.Generator`` objects the submodules hold
    (:func:`preserved_generators`) and, with ``restore_rng`` (default), the global torch RNG
    state (CPU, and CUDA when it is initialized), so probing never shifts the training run's
    random stream (a ``DataLoader`` draws a seed from it even with ``shuffle=False``).  A
    thread other than the training loop's must pass ``restore_rng=False``: restoring a state
    saved earlier would rewind the loop's stream.  Compiled modules run eagerly inside the
    block (:func:`running_eagerly`).
    """
    flags = [(m, m.training) for m in model.modules()]
    with (preserved_rng() if restore_rng else nullcontext(), preserved_generators(model),
          preserved_buffers(model), running_eagerly(model)):
        try:
            model.eval()
            with torch.no_grad():
                yield
        finally:
            model.train(flags[0][1])  # lets overridden train() methods see the root's mode
            for module, flag in flags:
                module.training = flag


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _rebuild_mapping(obj: Mapping[Any, Any], moved: dict[Any, Any]) -> Mapping[Any, Any]:
    """``moved`` as an object of ``obj``'s type (a ``BatchEncoding``, ``UserDict``,
    ``OrderedDict``, ``defaultdict``...): a shallow copy of ``obj`` with the moved values, else
    ``type(obj)(moved)``, else a plain dict."""
    if type(obj) is dict:
        return moved
    if isinstance(obj, MutableMapping):
        try:
            new = copy.copy(obj)  # keeps attributes (a BatchEncoding's encodings)
            for key, value in moved.items():
                new[key] = value
        except Exception:  # noqa: BLE001 - a mapping that cannot be copied: try its constructor
            new = None
        if new is not None:
            return new
    try:
        return type(obj)(moved)
    except Exception:  # noqa: BLE001 - a constructor of another signature: a plain dict
        return moved


def to_device(obj: Any, device: torch.device, fresh: bool = False) -> Any:
    """Move every tensor inside nested tuples / lists / mappings / dataclasses to ``device``.

    Containers keep their type: a namedtuple stays that namedtuple, a mapping subclass (a
    Hugging Face ``BatchEncoding``, a ``UserDict``) is shallow-copied with the moved values, a
    dataclass is rebuilt field by field (``dataclasses.replace``); any other object with a
    ``to`` method (e.g. a graph batch) is shallow-copied and moved by ``copy.to(device)``.
    Tensors, lists, tuples, dicts and dataclasses given are never modified; a shallow copy
    shares what it holds, so an object whose ``to`` moves its contents in place, or a mapping
    whose copy shares its storage, can be.  ``fresh``: a tensor already on ``device`` is
    cloned too (in the containers above), so the result shares no tensor with ``obj``.
    """
    if isinstance(obj, Tensor):
        moved = obj.to(device)
        return moved.clone() if fresh and moved is obj else moved
    if isinstance(obj, Mapping):
        return _rebuild_mapping(obj, {k: to_device(v, device, fresh) for k, v in obj.items()})
    if isinstance(obj, tuple) and callable(getattr(obj, "to", None)):
        return obj.to(device)  # a namedtuple that moves itself (PackedSequence: batch_sizes
        # must stay on the CPU)
    if isinstance(obj, (tuple, list)):
        moved = [to_device(v, device, fresh) for v in obj]
        if isinstance(obj, list):
            return moved
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, (str, bytes, int, float, complex, type(None), type)):
        return obj
    if callable(getattr(obj, "to", None)):
        try:  # a ``to`` that moves in place must not move the caller's object
            new = copy.copy(obj)
        except Exception:  # noqa: BLE001 - an object that cannot be copied: moved as it is
            new = obj
        out = new.to(device)
        return new if out is None else out
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device, fresh)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def is_column(batch: Any) -> bool:
    """A non-empty list / tuple of plain values only (strings, bytes, numbers, None): one column
    of rows (a ``DataLoader`` over a list of texts), not ``(inputs, labels, ...)``."""
    return isinstance(batch, (list, tuple)) and len(batch) > 0 and all(
        isinstance(v, (str, bytes, int, float, bool, type(None))) for v in batch)


def probe_module(model: nn.Module) -> nn.Module:
    """The module a probe pass calls: ``model`` without the wrappers whose forward must not run
    with hooks inside.

    * ``nn.DataParallel``: its ``module`` (``replicate`` copies the forward hooks, so a hooked
      layer would fire once per GPU, in no fixed order).
    * a ``torch.compile``-d module (``OptimizedModule``, also under a
      ``DistributedDataParallel``): its ``_orig_mod``, run eagerly (a compiled graph cached
      without the recorder's hooks never calls them).  Modules compiled inside the model
      (``nn.Module.compile()``, a ``torch.compile``-d submodule, Lightning's compiled
      ``forward``) run eagerly too, by :func:`evaluation_mode` (see :func:`running_eagerly`).

    The hooks sit on the same submodules either way, and the names do not change (see
    :func:`~alignment_callback.hooks.selection.named_layers`).
    """
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, nn.DataParallel):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel) and _is_compiled(model.module):
            model = model.module._orig_mod
        else:
            return model


def _is_compiled(module: nn.Module) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo
        return False
    return isinstance(module, OptimizedModule)


def prepare_batch(batch: Any, device: torch.device,
                  batch_transform: Callable[[Any], Any] | None = None) -> Any:
    """``batch`` as the model is fed it: after ``batch_transform`` (if given), on ``device``,
    in tensors of its own (a tensor already on ``device`` is cloned: a forward that changes
    its input in place must not change the probe, nor data the probe's rows are a view of)."""
    if batch_transform is not None:
        batch = batch_transform(batch)
    return to_device(batch, device, fresh=True)


def _model_inputs(batch: Any, input_key: str | None, transformed: bool) -> tuple[Any, bool]:
    """What :func:`feed_batch` calls the model with, and whether a mapping or tuple of it is
    spread (``model(**inputs)`` / ``model(*inputs)``) rather than passed as one argument."""
    if transformed:
        return batch, True
    if isinstance(batch, Tensor) or is_column(batch):  # a column of texts: the rows themselves
        return batch, False
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("dataloader_or_batches: an empty tuple / list batch has no inputs "
                             "(a tuple / list batch is (inputs, labels, ...))")
        return batch[0], False
    if isinstance(batch, Mapping):
        if input_key is not None and input_key not in batch:
            raise ValueError(f"input_key={input_key!r} is not a key of the probe's batches "
                             f"(they have {sorted(map(str, batch))})")
        return (batch if input_key is None else batch[input_key]), True
    raise TypeError(
        f"cannot feed a {type(batch).__name__} batch to the model; "
        "pass batch_transform=... (a function making it the model's input; "
        "collect_activations also takes forward=...)"
    )


@contextmanager
def default_dtype_of_forward(dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside, the previous default put back after (None:
    nothing changes)."""
    if dtype is None:
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def feed_batch(
    model: nn.Module,
    batch: Any,
    input_key: str | None = None,
    transformed: bool = False,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Any:
    """Call ``model`` on a batch from :func:`prepare_batch` with the batch rules of
    :func:`collect_activations` (``transformed``: it is a ``batch_transform``'s result)."""
    if forward is not None:
        return forward(model, batch)
    inputs, spread = _model_inputs(batch, input_key, transformed)
    if spread and isinstance(inputs, Mapping):
        return model(**inputs)
    if spread and isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def run_batch(
    model: nn.Module,
    batch: Any,
    device: torch.device,
    input_key: str | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Any:
    """One forward pass on one batch with the batch rules of :func:`collect_activations`."""
    batch = prepare_batch(batch, device, batch_transform)
    return feed_batch(model, batch, input_key, batch_transform is not None, forward)


#: The mask key of a tokenizer's output, the default: a batch without it has no mask
DEFAULT_MASK_KEY = "attention_mask"


def _mappings(fed: Any, batch: Any, input_key: str | None, transformed: bool,
              forward: bool = False) -> list[Mapping]:
    """Where a batch's attention mask can be, in order: what the model is fed (a tokenizing
    ``batch_transform``'s result, a dict batch, or the dict of an ``(inputs, labels)``
    batch), then the batch as it came.  With ``forward`` (a function feeding the model) what
    the model is fed is not known: ``fed`` and the batch only."""
    candidates: tuple[Any, ...] = (fed, batch)
    if not forward:
        try:
            inputs = _model_inputs(fed, input_key, transformed)[0]
        except (TypeError, ValueError):  # raised again, with its message, when the model is fed
            inputs = None
        first = batch[0] if isinstance(batch, (tuple, list)) and batch else None
        candidates = (fed, inputs, batch, first)
    found: list[Mapping] = []
    for candidate in candidates:
        if isinstance(candidate, Mapping) and not any(candidate is m for m in found):
            found.append(candidate)
    return found


def _check_mask_key(mask_key: str, mappings: list[Mapping]) -> None:
    """A ``mask_key`` chosen (not the default) that a mapping batch does not hold as a tensor
    is a mistake: token outputs would be pooled over the padding too, silently."""
    if mappings:
        raise ValueError(
            f"mask_key={mask_key!r} is not a tensor entry of the probe's batches (they have "
            f"{sorted(map(str, mappings[0]))}): the mean / last pools of token outputs would "
            "read the padding too; pass the key of the attention mask, or mask_key=None")


def _mask_of(mappings: list[Mapping], mask_key: str | None) -> Tensor | None:
    """The first tensor under ``mask_key`` of the batch's mappings, else None."""
    if not mask_key:
        return None
    masks = [m.get(mask_key) for m in mappings]
    return next((mask for mask in masks if isinstance(mask, Tensor)), None)


def _layer_count_error(bad: dict[str, int]) -> LayerCountError:
    never = sorted(n for n, c in bad.items() if c == 0)
    why = (f" {never} never ran: the probe's forward runs in eval mode under no_grad, so a "
           "branch taken only in training (or only with gradients) is skipped, a container "
           "without forward (nn.ModuleList) is never called, and a function compiled on "
           "its own and called in the forward may run a cached graph that calls no hooks "
           "(compiled modules run eagerly: torch.compile(model), nn.Module.compile, a "
           "torch.compile-d submodule); hook the modules that run."
           if never else "")
    return LayerCountError(
        f"these layers did not run exactly once in a forward pass: {bad} (calls per pass); "
        "rows would not line up with samples." + why + (
            " A module called several times in one forward (shared weights, a recurrent "
            "cell) gives several rows per sample: hook a module that is called once per "
            "forward (such as the one that makes the repeated calls), or record every call "
            "with ActivationRecorder directly." if len(never) < len(bad) else "")
    )


#: Rows per batch of a probe given whole (a tensor, a tuple file) and of reference features
#: pooled on the compute device.
BATCH_ROWS = 256


def _leading(value: Any) -> int | None:
    """Rows of a tensor (its leading size), of a column of plain values (texts), or of a
    mapping of tensors (the largest)."""
    if is_column(value):
        return len(value)
    if isinstance(value, Tensor):
        return int(value.shape[0]) if value.dim() else None
    if isinstance(value, Mapping):
        sizes = [int(v.shape[0]) for v in value.values() if isinstance(v, Tensor) and v.dim()]
        return max(sizes) if sizes else None
    return None


def _rows_of(value: Any, rows: int, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of what has ``rows`` rows (a tensor, a mapping's such tensors, a list or
    tuple of that length); anything else whole (a scalar, a broadcast entry)."""
    if isinstance(value, Tensor):
        return value[lo:hi] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, Mapping):
        return {k: _rows_of(v, rows, lo, hi) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return value[lo:hi]
    return value


def split_rows(batch: tuple[Any, ...], batch_size: int) -> list[tuple[Any, ...]]:
    """A tuple batch ``(inputs, labels, ...)`` whose inputs are a tensor (a mapping of
    tensors, a column of texts), as batches of ``batch_size`` of their rows (a tuple saved
    whole, e.g. ``torch.save((images, labels), path)``, would otherwise be fed in one pass).
    The other entries are cut alike where they have as many rows (tensors, label lists) and
    repeated whole otherwise; a tuple without row inputs is the one batch it is."""
    rows = _leading(batch[0]) if batch else None
    if not rows:
        return [batch]
    return [tuple(_rows_of(v, rows, lo, min(lo + batch_size, rows)) for v in batch)
            for lo in range(0, rows, batch_size)]


#: Errors of the model call re-raised with what it was fed (exactly these types: a subclass
#: may have another constructor).
_EXPLAINED = (TypeError, AttributeError, ValueError, RuntimeError, IndexError)


def _fed_summary(fed: Any) -> str:
    """What a batch fed to the model is, in a few words: its type, and a mapping's entries."""
    def kind(v: Any) -> str:
        if isinstance(v, Tensor):
            return f"tensor {tuple(v.shape)}"
        if isinstance(v, (list, tuple)):
            inner = type(v[0]).__name__ if v else "nothing"
            return f"a {type(v).__name__} of {len(v)} {inner}"
        return type(v).__name__

    if isinstance(fed, Mapping):
        return f"a {type(fed).__name__} of " + ", ".join(f"{k}: {kind(v)}"
                                                          for k, v in fed.items())
    return kind(fed)


def _text_hint(fed: Any) -> str:
    """The fix when texts or Python lists reached the model instead of tensors."""
    values = list(fed.values()) if isinstance(fed, Mapping) else [fed]
    if any(isinstance(v, str) or (isinstance(v, (list, tuple)) and v
                                  and isinstance(v[0], (str, list, int)))
           for v in values):
        return (". Texts or Python lists reached the model: pass batch_transform=... that "
                "makes tensors, e.g. lambda texts: tokenizer(texts, padding=True, "
                "return_tensors='pt')")
    return ""


def _single_input(fed: Any, input_key: str | None, transformed: bool) -> Tensor | None:
    """The one tensor :func:`feed_batch` called the model with (without ``forward``), else
    None."""
    inputs, _ = _model_inputs(fed, input_key, transformed)
    return inputs if isinstance(inputs, Tensor) else None


def _check_flat_input(fed: Tensor | None, added: dict[str, int], batch: int) -> None:
    """A 1-D input holds one value per sample (token ids, scalars): every layer must give that
    many rows.  Other rows mean one sample was fed alone (a list of per-sample tensors, a
    ``DataLoader`` with ``batch_size=None`` over samples), whose layers would give a row per
    feature."""
    if fed is None or fed.dim() != 1:
        return
    bad = {name: rows for name, rows in added.items() if rows != fed.shape[0]}
    if bad:
        raise LayerShapeError(
            f"probe batch {batch}: the model was fed a 1-D tensor of {fed.shape[0]} values, "
            f"read as {fed.shape[0]} samples, but layers gave other numbers of rows {bad}: "
            "is the probe a sequence of single samples (a list of per-sample tensors, a "
            "DataLoader with batch_size=None over a Dataset)? Batch them: "
            "DataLoader(dataset, batch_size=...) or torch.stack(samples)")


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, Tensor):
        return data.split(batch_size)
    if isinstance(data, Mapping):
        return [data]
    return data


def collect_activations(
    model: nn.Module,
    dataloader_or_batches: Any,
    layers: Layers,
    pool: Pool = "mean",
    device: torch.device | str | None = None,
    input_key: str | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
    batch_size: int = BATCH_ROWS,
    mask_key: str | None = DEFAULT_MASK_KEY,
    restore_rng: bool = True,
    default_dtype: torch.dtype | None = None,
    **recorder_kwargs: Any,
) -> dict[str, Tensor]:
    """Run ``model`` over probe batches and return ``{layer: (n, d)}`` pooled activations.

    The model runs in ``eval()`` mode under ``torch.no_grad()``; afterward (also on errors)
    every submodule's train/eval flag, buffers and generators and the global RNG state are
    restored exactly (see :func:`evaluation_mode`).

    Batch rules: a tensor -> ``model(batch)``; a tuple / list of plain values only (strings,
    numbers: a ``DataLoader`` over a list of texts) -> ``model(batch)``, one row per value; any
    other tuple / list -> ``model(batch[0])`` (the rest are labels); a dict ->
    ``model(**batch)`` or ``model(batch[input_key])``.

    Parameters
    ----------
    model : nn.Module
        The model (wrappers fine; names are normalized, see :func:`resolve_layers`).  An
        ``nn.DataParallel`` runs as its ``module`` (one device), a ``torch.compile``-d
        model as its eager ``_orig_mod`` (see :func:`probe_module`) and modules compiled
        inside it eagerly too (see :func:`running_eagerly`).
    dataloader_or_batches : DataLoader, iterable of batches, Tensor or dict
        A DataLoader or any iterable of batches; a single tensor is split into batches of
        ``batch_size`` rows; a single dict is one batch.
    layers : str, re.Pattern or sequence of them
        Names, globs or regexes (see :func:`resolve_layers`).
    pool : str or callable, default="mean"
        Pooling at capture time (see :func:`pool_features`).
    device : torch.device, str or None, default=None
        Where inputs go; ``None``: the device of the model's first parameter, or CPU.
    input_key : str or None, default=None
        For dict batches, call ``model(batch[input_key])`` instead of ``model(**batch)``.
    batch_transform : callable or None, default=None
        ``f(batch) -> inputs`` replacing the batch rules above; a mapping result is passed as
        keywords, a tuple as positional arguments, anything else as the single argument.
    forward : callable or None, default=None
        ``f(model, batch)`` called instead of ``model(...)`` with the device-moved batch
        (after ``batch_transform`` if given; containers keep their type, see
        :func:`to_device`) and the module of :func:`probe_module`.
    max_batches : int or None, default=None
        Stop after this many batches; ``None``: all.
    batch_size : int, default=256
        Rows per batch when a tensor is given, a positive integer.
    mask_key : str or None, default="attention_mask"
        The key of an ``(n, T)`` attention mask used to pool ``(n, T, d)`` outputs over real
        tokens only: taken from the mapping ``batch_transform`` returns (a tokenizer's
        output), else from a dict batch; ``None`` disables it.  A key other than the default
        that a dict batch does not hold is refused (a ``ValueError`` naming the batch's keys);
        without the default key a batch has no mask.
    restore_rng : bool, default=True
        Put the global RNG state back afterward (see :func:`evaluation_mode`; pass False
        from a thread other than the training loop's).
    default_dtype : torch.dtype or None, default=None
        ``torch.set_default_dtype`` while the model runs, put back after each forward (the
        batches are fetched and transformed under the caller's): what a trainer's precision
        sets for its forwards (float64 with ``"64-true"``), so that tensors a forward creates
        get it.  None: unchanged.  The default dtype is the process's: set it from the thread
        that trains only.
    **recorder_kwargs
        ``detach``, ``to_cpu``, ``dtype``, ``output_key`` for :class:`ActivationRecorder`.

    Returns
    -------
    dict of str to Tensor
        ``{layer: (n, d)}`` for every resolved layer, in model order: the pooled activations
        of all n probe rows (float32 on the CPU with the recorder's defaults).

    Raises
    ------
    ValueError
        No batch was given, the batches hold no rows, ``batch_size`` or ``max_batches`` is
        not a positive integer, or a layer matches nothing.
    LayerCountError
        A layer did not run exactly once per forward pass.
    LayerShapeError
        A layer returned a 0-dim tensor, layers produced different numbers of rows (a
        layer whose output is not batch-first), or a layer's rows from a 1-D input (one value
        per sample) are not one per value (a single sample fed alone), or ``pool`` cannot
        reduce a layer's output to one row per sample; a ``ValueError``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from alignment_callback.hooks import collect_activations
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> acts = collect_activations(model, torch.randn(10, 4), ["0", "2"], batch_size=4)
    >>> {name: tuple(a.shape) for name, a in acts.items()}
    {'0': (10, 8), '2': (10, 2)}
    """
    if max_batches is not None:
        max_batches = check_positive_int(max_batches, "max_batches")
    batch_size = check_positive_int(batch_size, "batch_size")
    dev = torch.device(device) if device is not None else model_device(model)
    rec = ActivationRecorder(model, layers, pool=pool, **recorder_kwargs)
    runner = probe_module(model)
    n_batches = 0
    with evaluation_mode(model, restore_rng), preserved_loader_seed(dataloader_or_batches), rec:
        for batch in _batches(dataloader_or_batches, batch_size):
            if max_batches is not None and n_batches >= max_batches:
                break
            fed = prepare_batch(batch, dev, batch_transform)
            # the mask of what the model is fed (a tokenizing batch_transform's, the dict of an
            # (inputs, labels) batch), else the batch's
            mappings = _mappings(fed, batch, input_key, batch_transform is not None,
                                 forward is not None)
            rec.mask = _mask_of(mappings, mask_key)
            if rec.mask is None and mask_key not in (None, DEFAULT_MASK_KEY):
                _check_mask_key(mask_key, mappings)
            before, rows_before = dict(rec.calls), dict(rec.rows)
            try:
                with default_dtype_of_forward(default_dtype):
                    feed_batch(runner, fed, input_key, batch_transform is not None, forward)
            except _EXPLAINED as err:  # what was fed, and the usual cause for texts
                if type(err) not in _EXPLAINED:
                    raise
                raise type(err)(f"the model failed on probe batch {n_batches} "
                                f"({_fed_summary(fed)}): {err}{_text_hint(fed)}") from err
            bad = {n: rec.calls[n] - before[n] for n in rec.layers if rec.calls[n] - before[n] != 1}
            if bad:
                raise _layer_count_error(bad)
            if forward is None:
                _check_flat_input(_single_input(fed, input_key, batch_transform is not None),
                                  {n: rec.rows[n] - rows_before[n] for n in rec.layers},
                                  n_batches)
            n_batches += 1
        rec.mask = None
    if n_batches == 0:
        raise ValueError("dataloader_or_batches yielded no batch")
    acts = rec.activations
    rows = {name: a.shape[0] for name, a in acts.items()}
    if len(set(rows.values())) > 1:
        raise LayerShapeError(
            f"layers produced different numbers of rows {rows}: outputs must be batch-first, "
            "with one row per sample (a (T, n, d) output is not: hook a batch-first layer; "
            "output_key picks the part of a tuple or dict output to record; a probe of single "
            "samples fed one at a time gives rows per feature or channel: batch them)"
        )
    if not any(rows.values()):
        raise ValueError(f"dataloader_or_batches holds no rows ({n_batches} batch(es) of 0 "
                         "rows): the probe needs at least one sample")
    return acts
