"""Forward-hook recorder: pooled, detached, CPU copies of chosen layers' outputs."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from alignment_callback.functional._validation import resource_error, user_stacklevel
from alignment_callback.functional.preprocessing import Pool, check_pool, pool_features
from alignment_callback.hooks.outputs import (
    LayerShapeError,
    OutputKey,
    dense_output,
    select_output,
)
from alignment_callback.hooks.selection import Layers, resolve_modules

#: Errors of pooling re-raised naming the layer (exactly these types: a subclass may be the
#: pool's own signal, and passes through unchanged).  All become :class:`LayerShapeError`,
#: naming the pool too, except a ``RuntimeError`` for which ``resource_error`` holds (out of
#: memory, a CUDA error), which stays a ``RuntimeError``: a pool that
#: cannot reduce a layer's outputs to one row per sample (``"none"`` on 3-D outputs,
#: ``patch_mean`` on 2-D ones, a callable that indexes a missing axis) is a choice of layer and
#: pool, not something the data can change, so the callback raises it before training.
_NAMED_ERRORS = (ValueError, TypeError, RuntimeError, IndexError)


def _real_tokens(module: nn.Module, args: Any, kwargs: Any) -> Tensor | None:
    """The real-token mask of the ``src_key_padding_mask`` a transformer encoder (or encoder
    layer) was called with (True or 0 = a real token), else None: the encoder's own output
    is dense, zero at the padding, which a mean must not count."""
    padding = kwargs.get("src_key_padding_mask")
    encoders = (nn.TransformerEncoder, nn.TransformerEncoderLayer)
    if padding is None and isinstance(module, encoders) and len(args) > 2:
        padding = args[2]  # forward(src, mask, src_key_padding_mask, ...)
    if not isinstance(padding, Tensor) or padding.dim() != 2:
        return None
    return ~padding if padding.dtype == torch.bool else padding == 0  # float: -inf at padding


def _shares_memory(x: Tensor, y: Tensor) -> bool:
    try:
        return y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return True


class ActivationRecorder:
    """Context manager that records the outputs of chosen layers during forward passes.

    Each time a hooked layer runs, its output is reduced at once (so memory stays ``n x d`` per
    layer): :func:`select_output` -> ``detach()`` -> :func:`pool_features` -> cast to ``dtype``
    -> move to CPU -> appended.  A nested tensor (``nn.TransformerEncoder`` with a padding mask
    in eval mode) is zero-padded and pooled over each sample's real tokens
    (:func:`dense_output`).  The stored tensor never shares memory with the model's output
    (an in-place op later in the model cannot change it, and a pooled view cannot keep the full
    activation alive).

    Parameters
    ----------
    model : nn.Module
        The model (DDP / DataParallel / ``torch.compile`` wrappers are fine for the names;
        call an ``nn.DataParallel``'s ``module`` and a compiled model's ``_orig_mod``
        yourself, as :func:`collect_activations` does: DataParallel copies the hooks to every
        GPU's replica, and a graph compiled without the hooks never calls them).
    layers : str, re.Pattern or sequence of them
        Names, globs or regexes; see :func:`resolve_layers`.
    pool : str or callable, default="mean"
        ``"mean"``, ``"cls"``, ``"first"``, ``"last"``, ``"flatten"``, ``"none"`` or a
        callable ``(n, ...) -> (n, d)``; see :func:`pool_features`.
    detach : bool, default=True
        Detach outputs from the autograd graph.
    to_cpu : bool, default=True
        Move recorded tensors to the CPU.
    dtype : torch.dtype or None, default=torch.float32
        Dtype of the recorded tensors; ``None`` keeps the output's, except that a float16 /
        bfloat16 output pooled with ``"mean"`` or a pool callable is pooled and recorded in
        float32.  With ``"mean"`` or a pool callable, an output of a narrower float dtype (a
        float16 / bfloat16 model) is cast before it is pooled, so the average is formed at the
        precision recorded.
    output_key : int, str or None, default=None
        Which part of a tuple / dict output to record; ``None``: the rules of
        :func:`select_output`.  Container outputs only: a layer whose output is a tensor is
        recorded as it is.

    Attributes
    ----------
    mask : Tensor of shape (n, T) or None
        Attention mask for the forward passes that follow, until it is set again (in your own
        loop, set it before each batch's forward: ``rec.mask = batch["attention_mask"]``);
        when set, 3-D outputs of shape
        ``(n, T, d)`` are pooled over unmasked tokens only (``"mean"``, ``"last"``, and
        ``"cls"`` / ``"first"``: the first unmasked token).  A 3-D output with the mask's ``n``
        rows but not its ``T`` positions (a CLS token prepended inside the model:
        ``(n, T + 1, d)``) is pooled without it (for ``"mean"`` / ``"last"`` with a
        ``UserWarning`` naming the layer and both shapes, once per layer).
        :func:`collect_activations` sets it from ``attention_mask`` (of what the model is
        fed: a ``batch_transform``'s result, a dict batch, the dict of an ``(inputs, labels)``
        batch; else of the batch).
    activations : dict of str to Tensor
        ``{layer: (n_total, d)}``: every recorded batch, concatenated.
    layers : list of str
        The resolved (normalized) layer names, in model order.
    calls, rows : dict of str to int
        Per layer, the forward calls and the rows recorded since the recorder was made or
        last cleared.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from alignment_callback.hooks import ActivationRecorder
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with ActivationRecorder(model, ["0", "2"]) as rec:
    ...     _ = model(torch.randn(3, 4))
    ...     _ = model(torch.randn(2, 4))
    >>> {name: tuple(a.shape) for name, a in rec.activations.items()}
    {'0': (5, 8), '2': (5, 2)}
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Layers,
        pool: Pool = "mean",
        detach: bool = True,
        to_cpu: bool = True,
        dtype: torch.dtype | None = torch.float32,
        output_key: OutputKey = None,
    ) -> None:
        self.model = model
        self.pool = check_pool(pool)  # a mistyped mode fails here, not in the first forward
        self.detach = detach
        self.to_cpu = to_cpu
        self.dtype = dtype
        self.output_key = output_key
        self.mask: Tensor | None = None
        self._modules = resolve_modules(model, layers)
        _warn_sequence_first(self._modules)
        self._handles: list[RemovableHandle] = []
        self._store: dict[str, list[Tensor]] = {name: [] for name, _ in self._modules}
        self.calls: dict[str, int] = {name: 0 for name, _ in self._modules}
        self.rows: dict[str, int] = {name: 0 for name, _ in self._modules}
        self._cache: dict[str, Tensor] | None = None
        self._mask_warned: set[str] = set()  # layers warned about a mask that does not fit

    @property
    def layers(self) -> list[str]:
        """The resolved (normalized) layer names, in model order."""
        return [name for name, _ in self._modules]

    def __enter__(self) -> "ActivationRecorder":
        if self._handles:
            raise RuntimeError("this ActivationRecorder is already active (entered twice)")
        try:
            for name, module in self._modules:
                self._handles.append(
                    module.register_forward_hook(self._make_hook(name), with_kwargs=True)
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent); recorded activations are kept."""
        while self._handles:
            self._handles.pop().remove()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            self._record(name, output, _real_tokens(module, args, kwargs))

        return hook

    def _pool(self, x: Tensor, name: str, real: Tensor | None = None) -> Tensor:
        """``x`` pooled with the mask that fits it (a nested tensor's own, the padding mask
        the module was given, else :attr:`mask`); errors name the layer."""
        x, mask = dense_output(x)  # a nested tensor: the mask of its real tokens
        target = torch.float32 if self.dtype is None else self.dtype  # None: float32 at least
        if ((self.pool == "mean" or callable(self.pool)) and target.is_floating_point
                and x.is_floating_point() and torch.finfo(target).bits > torch.finfo(x.dtype).bits):
            # averaged at the precision recorded (a float16 / bfloat16 model's mean or pooling
            # callable then works on the values the reference features of the same tensor do);
            # the other pools select values, which the cast after pooling keeps exactly
            x = x.to(target)
        for candidate in (real, self.mask) if mask is None else ():
            fits = (candidate is not None and x.dim() == 3
                    and tuple(candidate.shape) == tuple(x.shape[:2]))
            if fits:
                mask = candidate.to(x.device)
                break
        if mask is None:
            self._warn_unmasked(x, name)
        try:
            return pool_features(x, self.pool, mask=mask)
        except _NAMED_ERRORS as err:
            if type(err) not in _NAMED_ERRORS:
                raise
            where = f"layer {name!r} (output of shape {tuple(x.shape)})"
            if type(err) is RuntimeError and resource_error(err):  # not the pool's fault
                raise RuntimeError(f"{where}: {err}") from err
            what = "" if type(err) is ValueError else f"{type(err).__name__}: "
            pool = (repr(self.pool) if isinstance(self.pool, str)
                    else getattr(self.pool, "__qualname__", type(self.pool).__name__))
            text = str(err)
            if text.startswith(f"pool={pool} "):  # the pool named once
                text = "it" + text[len(f"pool={pool}"):]
            raise LayerShapeError(f"{where}: pool={pool} cannot reduce it to one row per "
                                  f"sample: {what}{text}") from err

    def _warn_unmasked(self, x: Tensor, name: str) -> None:
        """Warn, once per layer, when :attr:`mask` is set, ``"mean"`` / ``"last"`` would use
        it, and the layer's 3-D output has the mask's rows but another number of positions
        (a model that prepends a CLS token: (n, T + 1, d) for an (n, T) mask): the mask is
        not applied to that layer, whose padding positions then count."""
        mask = self.mask
        if (mask is None or self.pool not in ("mean", "last") or x.dim() != 3
                or mask.dim() != 2 or x.shape[0] != mask.shape[0]
                or x.shape[1] == mask.shape[1] or name in self._mask_warned):
            return
        self._mask_warned.add(name)
        warnings.warn(
            f"layer {name!r}: its output of shape {tuple(x.shape)} has {x.shape[1]} positions "
            f"but the attention mask has shape {tuple(mask.shape)}, so the mask was not "
            f"applied: pool={self.pool!r} reads this layer's padding positions too (a token "
            "added or removed inside the model?); hook a layer whose outputs have the mask's "
            "positions, or pool the layer yourself",
            UserWarning, stacklevel=user_stacklevel())

    def _record(self, name: str, output: Any, real: Tensor | None = None) -> None:
        x = select_output(output, self.output_key, name)
        if x.dim() == 0:
            raise LayerShapeError(
                f"layer {name!r} returned a 0-dim tensor (a loss or another scalar), which has "
                "no row per sample: choose a layer whose output is (batch, ...), or pass "
                "output_key (a ModelOutput's first value is its loss when the batch holds labels)")
        if self.detach:
            x = x.detach()
        y = self._pool(x, name, real)
        if self.dtype is not None:
            y = y.to(self.dtype)
        if self.to_cpu:
            y = y.cpu()
        if _shares_memory(x, y):
            y = y.clone()  # never alias the model's buffer (in-place ops, memory of views)
        self._store[name].append(y)
        self.calls[name] += 1
        self.rows[name] += y.shape[0]
        self._cache = None

    @property
    def activations(self) -> dict[str, Tensor]:
        """``{layer: (n_total, d)}``: the batches of every layer that ran, concatenated (cached)."""
        if self._cache is None:
            for name, parts in self._store.items():
                widths = sorted({tuple(p.shape[1:]) for p in parts})
                if len(widths) > 1:
                    raise ValueError(
                        f"layer {name!r}: its batches were pooled to rows of different shapes "
                        f"{widths} (pool={self.pool!r} on batches of different lengths?); use "
                        "a pool that removes the token axis (\"mean\", \"cls\", \"last\") or "
                        "pad every batch to one length")
            self._cache = {n: torch.cat(v, 0) for n, v in self._store.items() if v}
        return self._cache

    def __getitem__(self, name: str) -> Tensor:
        acts = self.activations
        if name not in acts:
            if name in self._store:
                raise KeyError(
                    f"layer {name!r} has recorded nothing: it did not run (containers such as "
                    "nn.ModuleList have no forward of their own)"
                )
            raise KeyError(f"{name!r} is not one of the recorded layers {self.layers}")
        return acts[name]

    def clear(self) -> None:
        """Drop every recorded activation (hooks stay in place)."""
        for v in self._store.values():
            v.clear()
        self.calls = {name: 0 for name in self.calls}
        self.rows = {name: 0 for name in self.rows}
        self._cache = None

    def __repr__(self) -> str:
        state = "active" if self._handles else "inactive"
        return f"ActivationRecorder({state}, layers={self.layers}, pool={self.pool!r})"


def _warn_sequence_first(modules: list[tuple[str, nn.Module]]) -> None:
    """Warn about chosen modules built sequence-first (``batch_first=False``: PyTorch's
    ``nn.MultiheadAttention``, ``nn.Transformer*`` layers and RNNs by default): their outputs
    are (T, n, ...), whose first axis is not the samples, so rows would be positions (or,
    with T = n, silently the wrong rows)."""
    seq_first = [name for name, module in modules if getattr(module, "batch_first", None) is False]
    if seq_first:
        warnings.warn(
            f"layers {seq_first} are sequence-first modules (batch_first=False): their outputs "
            "are (T, n, ...), read here as rows of samples along the first axis, which they are "
            "not; hook a batch-first module (one built with batch_first=True, or the block "
            "around it), or pool with a callable that moves the batch axis first",
            UserWarning, stacklevel=user_stacklevel())
