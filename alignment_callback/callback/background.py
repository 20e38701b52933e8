"""Alignment steps computed off the training thread, published in order on the main thread,
and the private model copy that lets the probe pass run there too."""

from __future__ import annotations

import copy
import enum
import functools
import os
import sysconfig
import types
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from alignment_callback.hooks.collect import is_default_generator


@dataclass
class Job:
    """One alignment step: where it was taken and its (future) outcome."""

    epoch: int
    step: int
    future: Future


class BackgroundQueue:
    """A single worker thread and the FIFO of its jobs.

    At most ``max_pending`` jobs are outstanding (one running, the rest waiting); ``submit``
    blocks on the oldest one beyond that, so memory stays bounded when alignment is slower
    than training.  Jobs are handed back strictly in submission order, so the history and the
    logged steps keep their order.
    """

    def __init__(self, max_pending: int = 2) -> None:
        self.max_pending = max(1, int(max_pending))
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def has(self, epoch: int, step: int) -> bool:
        return any(j.epoch == epoch and j.step == step for j in self._jobs)

    def submit(self, fn: Callable[..., Any], *args: Any, epoch: int, step: int) -> list[Job]:
        """Queue ``fn(*args)``; returns the jobs that had to be finished first (in order)."""
        finished = []
        while len(self._jobs) >= self.max_pending:
            job = self._jobs.popleft()
            job.future.exception()  # wait; the outcome is read by the caller
            finished.append(job)
        self._jobs.append(Job(epoch, step, self.call(fn, *args)))
        return finished

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the worker after the jobs queued so far, outside the queue
        (no step, nothing to publish, not counted in ``max_pending``)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignment")
        return self._executor.submit(fn, *args)

    def ready(self, wait: bool = False) -> list[Job]:
        """Pop the finished jobs at the head of the queue (all of them when ``wait``)."""
        out = []
        while self._jobs and (wait or self._jobs[0].future.done()):
            job = self._jobs.popleft()
            job.future.exception()  # waits when needed; never raises the job's error here
            out.append(job)
        return out

    def snapshot(self, current_step: int | None = None
                 ) -> tuple[list[Any], list[tuple[int, int]]]:
        """The results of the finished, successful jobs and the ``(epoch, step)`` of the others.

        Waits for every job but the newest, and for the newest too unless it was taken at
        ``current_step`` (only such a step can be recomputed from a checkpoint written now:
        its weights are the checkpoint's), so at most that one is reported unfinished.  All
        jobs stay queued.
        """
        jobs = list(self._jobs)
        for job in jobs if jobs and jobs[-1].step != current_step else jobs[:-1]:
            job.future.exception()
        # each job's state read once: one that finishes between two reads would be in neither
        # list, and a checkpoint written now would lose its step
        finished = [(j, j.future.done()) for j in self._jobs]
        done = [j.future.result() for j, over in finished
                if over and j.future.exception() is None]
        running = [(j.epoch, j.step) for j, over in finished if not over]
        return done, running

    def drain(self, wait: bool = True) -> list[Job]:
        """Stop the worker and pop every job: all of them run to their end (``wait``), else
        the jobs not started are dropped and the running one finishes.  Returns the jobs that
        ran, in order."""
        jobs = list(self._jobs)
        self.shutdown(cancel=not wait)  # a cancel leaves the running one to finish
        self._jobs.clear()
        return [job for job in jobs if not job.future.cancelled()]

    def shutdown(self, cancel: bool = False) -> None:
        """Stop the worker (after the running job); ``cancel`` drops the queued ones."""
        if cancel:
            for job in self._jobs:
                job.future.cancel()
            self._jobs.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None


PLAIN_TENSOR_ELEMENTS = 1 << 16  # larger private unregistered tensors (cached data) are not copied
_SIMPLE = (bool, int, float, complex, str, bytes, type(None), np.generic, enum.Enum)
_MAX_DEPTH = 4  # containers nested deeper are not plain state


@functools.cache
def _module_internals() -> frozenset[str]:
    """The attributes nn.Module and LightningModule keep for themselves (hooks, the trainer)."""
    from lightning.pytorch import LightningModule

    return frozenset(vars(nn.Module())) | frozenset(vars(LightningModule()))


def _is_plain_value(value: Any, depth: int = 0) -> bool:
    """A value the model copy can take at every step: a number, string, bool or None, a tensor
    (or NumPy array) of up to ``PLAIN_TENSOR_ELEMENTS`` elements, or a list / tuple / dict of
    such values.  Anything else (a lock, a writer, a queue, an object reaching the trainer) is
    never copied per step."""
    if isinstance(value, _SIMPLE):
        return True
    if isinstance(value, Tensor):
        return value.numel() <= PLAIN_TENSOR_ELEMENTS
    if isinstance(value, np.ndarray):
        return value.dtype != object and value.size <= PLAIN_TENSOR_ELEMENTS
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_plain_value(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, _SIMPLE) and _is_plain_value(v, depth + 1)
                   for k, v in value.items())
    return False


def _own_generator(value: Any) -> bool:
    """A ``torch.Generator`` of the model's own (not a global one, which the copy shares)."""
    return isinstance(value, torch.Generator) and not is_default_generator(value)


def _is_plain(key: str, value: Any) -> bool:
    """Copied at every step: plain values (:func:`_is_plain_value`), a generator of the
    model's own whatever its name (the probe pass draws from its state at the step), and any
    other public attribute, deep-copied (a config object, a schedule, a large tensor such as a
    memory bank; a copy that fails moves the capture to the loop, see
    ``AlignmentCallback._snapshot``)."""
    if isinstance(value, nn.Module) or key in _module_internals():
        return False
    return _is_plain_value(value) or _own_generator(value) or not key.startswith("_")


def _plain_state(model: nn.Module) -> list[dict[str, Any]]:
    """Per submodule, the state a forward may read besides its parameters and buffers (a stage
    flag, a schedule, a temperature, a step counter): its attributes that are not modules and
    hold plain values (see :func:`_is_plain_value`), and its other public attributes."""
    return [{key: value for key, value in vars(module).items() if _is_plain(key, value)}
            for module in model.modules()]


def _copied(value: Any) -> Any:
    """A copy of a plain value; tensors are detached first (a cached output of the forward has
    a graph, which ``deepcopy`` refuses)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if _own_generator(value):  # its state now (deepcopy of a generator needs a recent torch)
        generator = torch.Generator(device=value.device)
        generator.set_state(value.get_state())
        return generator
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_copied(v) for v in value)
    if type(value) is dict:
        return {k: _copied(v) for k, v in value.items()}
    return copy.deepcopy(value)


@dataclass(frozen=True)
class LoopPosition:
    """What a LightningModule copy's ``current_epoch`` and ``global_step`` read: the training
    loop's position at the step (the copy has no trainer)."""

    current_epoch: int
    global_step: int


@functools.cache
def _positioned(cls: type) -> type:
    """``cls`` whose ``current_epoch`` and ``global_step`` read ``self._loop_position``."""
    return type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "current_epoch": property(lambda self: self._loop_position.current_epoch),
        "global_step": property(lambda self: self._loop_position.global_step),
    })


@dataclass
class Snapshot:
    """What a step's model copy needs from the training model: tensors, plain state and the
    loop's position."""

    tensors: list[Tensor]
    plain: list[dict[str, Any]]
    position: LoopPosition | None = None
    names: list[str] = field(default_factory=list)  # of ``tensors``: parameters, then buffers


def _function_hooks(model: nn.Module) -> list[str]:
    """The forward (pre-)hooks of ``model``, and the global ones, that are Python functions
    (lambdas, closures, module-level functions, or partials of them) defined outside the
    installed packages: user code, which may write what the hook sees into the model or a
    dict of its own.  Bound methods and callable objects are copied with the model (their
    state is the copy's); functions of installed packages (quantization observers, a
    library's ``output.requires_grad_()``) are taken to write only to their arguments."""
    found = []
    hooks = [(repr(name or type(model).__name__), hook) for name, module in model.named_modules()
             for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values())]
    hooks += [("every module (a global hook)", hook)
              for hook in (*nn.modules.module._global_forward_pre_hooks.values(),
                           *nn.modules.module._global_forward_hooks.values())]
    for where, hook in hooks:
        fn = hook
        while isinstance(fn, functools.partial):
            fn = fn.func
        if isinstance(fn, types.FunctionType) and not _installed(fn):
            found.append(f"the forward hook {fn.__qualname__!r} of {where}")
    return found


@functools.lru_cache(maxsize=1)
def _library_folders() -> tuple[str, ...]:
    """The folders of the installed packages and of the standard library."""
    paths = sysconfig.get_paths()
    return tuple(os.path.join(os.path.realpath(paths[key]), "")
                 for key in ("purelib", "platlib", "stdlib") if key in paths)


def _installed(fn: types.FunctionType) -> bool:
    """Whether ``fn`` is defined in an installed package (or the standard library)."""
    return os.path.realpath(fn.__code__.co_filename).startswith(_library_folders())


def _tensor_names(model: nn.Module) -> list[str]:
    """The names of ``[*model.parameters(), *model.buffers()]``, in that order."""
    return [*(name for name, _ in model.named_parameters()),
            *(name for name, _ in model.named_buffers())]


class ModelCopy:
    """A private copy of a CPU model for the worker thread.

    Made once with ``deepcopy`` (without the trainer it is attached to); at every step it is
    refreshed from a :class:`Snapshot` of the training model taken in the loop: parameters,
    buffers, plain attributes (see :func:`_plain_state`) and, for a LightningModule, the
    loop's ``current_epoch`` and ``global_step`` (:class:`LoopPosition`, read through
    properties of a subclass made for the copy; it stays without a trainer otherwise, so
    ``self.log`` does nothing there and ``global_rank`` is 0, as on any detached module), so a
    forward that reads a schedule, a stage flag or the epoch sees this step's value.  Raises
    ``TypeError`` / ``RuntimeError`` when the model cannot be copied (the caller falls back to
    the loop).  A module compiled in place (``nn.Module.compile()``) runs eagerly on the copy:
    its compiled call is bound to the original module; a model with a forward hook that is a
    Python function raises (:func:`_function_hooks`).  A parameter or buffer whose shape or
    dtype changes in training (a growing history, a lazily sized buffer) is refreshed on the
    copy; one added, removed or moved to another device makes :meth:`check` refuse the
    snapshot.
    """

    def __init__(self, model: nn.Module) -> None:
        try:
            trainer = model.trainer  # LightningModule: a property; the copy gets no trainer
        except (AttributeError, RuntimeError):
            trainer = None
        bound = [name or type(model).__name__ for name, m in model.named_modules()
                 if "forward" in vars(m)]
        if bound:  # torch.compile (Lightning's from_compiled) sets the forward on the instance:
            # a function of the original module, which the copy would call (in train mode,
            # from the worker thread, while the loop trains it)
            raise TypeError(f"the forward of {bound[0]!r} is set on the instance (a compiled "
                            "model?): a copy would still run the original module")
        shared = _function_hooks(model)
        if shared:  # deepcopy keeps functions: what a hook's closure or globals hold (the
            # model itself, a dict of features for an auxiliary loss) would be written from
            # the worker thread while the loop trains
            raise TypeError(f"{shared[0]} is a function, which the copy would share with the "
                            "model: run from another thread it would write what it writes "
                            "for the model in training")
        memo = {id(trainer): None} if trainer is not None else {}
        self.model = copy.deepcopy(model, memo)
        for module in self.model.modules():
            # nn.Module.compile() stores torch.compile(self._call_impl): bound to the ORIGINAL
            # module, which calling the copy would run (in train mode, from the worker thread)
            vars(module).pop("_compiled_call_impl", None)
        if trainer is not None:
            self.model.__class__ = _positioned(type(model))
            self.model._loop_position = LoopPosition(0, 0)
        self.model.requires_grad_(False)
        for p in self.model.parameters():
            p.grad = None
        self.tensors = [*self.model.parameters(), *self.model.buffers()]
        source = [*model.parameters(), *model.buffers()]
        if [t.shape for t in self.tensors] != [t.shape for t in source]:
            raise RuntimeError("the model's copy has other parameters or buffers than the model")
        self.names = _tensor_names(self.model)
        self.devices = [t.device for t in self.tensors]

    @staticmethod
    @torch.no_grad()
    def snapshot(model: nn.Module) -> Snapshot:
        """This step's weights and plain state (taken in the training loop; deep copies)."""
        tensors = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
        position = None
        if getattr(model, "_trainer", None) is not None:  # an attached LightningModule
            position = LoopPosition(int(model.current_epoch), int(model.global_step))
        return Snapshot(tensors, [{key: _copied(value) for key, value in state.items()}
                                  for state in _plain_state(model)], position,
                        _tensor_names(model))

    def check(self, snapshot: Snapshot) -> None:
        """Raise ``RuntimeError`` when the snapshot's parameters and buffers are not the copy's
        (one added, removed or renamed in training, or moved to another device): the copy
        cannot take it (called in the loop, which then gives the copy up)."""
        if snapshot.names != self.names:
            added = sorted(set(snapshot.names) - set(self.names))
            removed = sorted(set(self.names) - set(snapshot.names))
            raise RuntimeError(f"its parameters or buffers changed since the copy was made "
                               f"(added: {added or 'none'}, removed: {removed or 'none'})")
        for name, device, src in zip(self.names, self.devices, snapshot.tensors):
            if src.device != device:
                raise RuntimeError(f"{name!r} moved from {device} to {src.device}")

    @torch.no_grad()
    def load(self, snapshot: Snapshot) -> nn.Module:
        """Make the copy equal to the model at the snapshot; returns the copy."""
        self.check(snapshot)
        for dst, src in zip(self.tensors, snapshot.tensors):
            if dst.shape != src.shape or dst.dtype != src.dtype:
                dst.data = src  # re-sized or re-typed in training; the snapshot's own clone
            else:
                dst.copy_(src)
        for module, state in zip(self.model.modules(), snapshot.plain):
            for key, value in state.items():
                setattr(module, key, value)
        if snapshot.position is not None:
            self.model._loop_position = snapshot.position
        return self.model
