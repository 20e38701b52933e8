"""Shared machinery of the alignment metrics: row accumulation over named layers, a cached
frozen reference, and calibration at ``compute()`` through the library's one pipeline
(:func:`alignment_callback.functional.pipeline.calibrate_prepared`)."""

from __future__ import annotations

import functools
import itertools
import re
import warnings
import weakref
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._validation import (
    AUTO,
    all_finite,
    check_alpha,
    check_max_score,
    check_num_permutations,
    check_positive_int,
    check_seed,
    errors_named,
)
from alignment_callback.functional.aggregation import (
    Aggregate,
    LayerAlignmentResult,
    aggregate_fn,
    check_aggregate,
    named_layers,
)
from alignment_callback.functional.analytic_null import check_moments_apply, check_null
from alignment_callback.functional.calibration import warn_if_few
from alignment_callback.functional.permutation import GroupPermuter, Permutations, check_groups
from alignment_callback.functional.pipeline import (
    PreparedSide,
    calibrate_prepared,
    observed_matrices,
    prepare_side,
    room_for,
    side_features,
)
from alignment_callback.functional.registry import (
    MeasureSpec,
    check_shadowed_options,
    get_measure,
    measure_argument,
)
from alignment_callback.metrics._rows import (
    Preprocess,
    RowPreprocessor,
    check_capacity,
    order_rows,
    split_kwargs,
)

# torchmetrics' warning when compute() runs on a process that never called update()
_BEFORE_UPDATE = r"The ``compute`` method of metric .* was called before the ``update`` method"


def _layer_names(names: Any, name: str) -> list[str]:
    """``x_layers`` / ``y_layers``: an iterable of strings, such as a list or a dict's keys (a
    string would be split into its characters; an integer name never matches the string keys
    of an update's mapping)."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"{name} must be a sequence of layer names (strings), got {names!r}")
    names = [str(n) if isinstance(n, np.str_) else n for n in names]
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{name} must be a sequence of layer names (strings), got {names!r}")
    return names


_FNS = itertools.count()  # numbers the pool callables, for their metrics' pooling markers
_FN_NUMBERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pool_marker(pool: Any) -> str:
    """The name of the state that marks how a metric pools at update: ``pool_<mode>``, or
    ``pool_fn<i>`` for a callable (one number per callable object, shared by its metrics)."""
    if isinstance(pool, str):
        return f"pool_{pool}"
    try:
        number = _FN_NUMBERS.setdefault(pool, next(_FNS))
    except TypeError:  # an object that takes no weak reference: a number of its own
        number = next(_FNS)
    return f"pool_fn{number}"


_NAMES_KEY = "_layer_names"  # in a state dict: the layers whose rows it holds, and their pool


def _pool_name(pool: Any) -> str:
    """How rows were pooled, as a state dict records it: the mode, or ``"callable"`` (a
    callable cannot be named across processes)."""
    return pool if isinstance(pool, str) else "callable"


def _check_rows_shape(side: str, layers: Mapping[str, Tensor]) -> None:
    """Refuse a 0-D or 1-D layer of ``side``: rows are (n, features...), never guessed."""
    for name, t in layers.items():
        if t.dim() == 0:
            raise ValueError(f"{side} layer {name!r} is a 0-dim tensor; pass rows of shape "
                             "(n, features...)")
        if t.dim() == 1:  # one sample of d features, or d samples of one? never guessed
            raise ValueError(
                f"{side} layer {name!r} is 1-D (shape {tuple(t.shape)}); pass rows of shape "
                f"(n, features...): one sample is {side}[None], one feature per sample is "
                f"{side}[:, None]")


def _rows_held(value: Any) -> int:
    """Rows of a list state's value (a tensor or a list of tensors)."""
    return int(value.shape[0]) if isinstance(value, Tensor) else sum(int(t.shape[0]) for t in value)


def _slot_states(state: Mapping[str, Any], prefix: str, side: str) -> dict[str, Any]:
    """``{slot: value}`` of the row states of ``side`` (``x0``, ``x1``, ...) in ``state``,
    with ``prefix`` taken off their keys."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and re.fullmatch(rf"{side}\d+", k[len(prefix):])}


def _same_side(a: PreparedSide, b: PreparedSide) -> bool:
    """Whether two prepared sides hold the same layers with the same features."""
    return a.names == b.names and all(  # same names: as many features
        f.shape == g.shape and torch.equal(f, g.to(f.device))
        for f, g in zip(a.features, b.features, strict=True))


def _torch_distributed() -> bool:
    """Whether ``torch.distributed`` runs (the layout agreement's collective needs it; a custom
    ``dist_sync_fn`` without it skips that agreement)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class AlignmentMetricBase(Metric):
    """Accumulates paired rows of named layers; calibrates at ``compute()``.

    Rows of layer ``name`` are kept in the list state ``<side><slot>``, the slot being the
    name's position in the *sorted* layer names, so every process stores a layer in the same
    state whatever order its update dicts had; results are reported in the order of the first
    update (or of ``x_layers`` / ``y_layers``).  Before a distributed sync the processes agree
    on the layers, their widths and the dtype (one clear error on every rank otherwise), a
    process that never called ``update`` joins with empty rows, and every process reports in
    the layer order of the lowest rank holding rows.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    #: Attributes that ``compute()`` reads: setting one (after construction too) drops the
    #: result torchmetrics caches; those with a check are checked as the constructor does.
    _SETTINGS = {"num_permutations": check_num_permutations, "alpha": check_alpha,
                 "seed": check_seed, "null": check_null, "measure": get_measure,
                 "aggregate": check_aggregate, "groups": check_groups,
                 "max_score": check_max_score,
                 "max_samples": lambda v: (None if v is None else
                                           check_positive_int(v, "max_samples", 2))}

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._SETTINGS:
            check = self._SETTINGS[name]
            value = value if check is None else check(value)
            if name in ("null", "measure", "groups") and "_named" in self.__dict__:
                now = {"null": self.null, "measure": self.measure, "groups": self.groups}
                now[name] = value  # after construction: the three must still go together
                check_moments_apply(now["null"], [now["measure"]], now["groups"])
            self.__dict__["_computed"] = None  # a result computed with the old value is stale
        super().__setattr__(name, value)

    def __init__(
        self,
        measure: MeasureSpec,
        num_permutations: int = 500,
        alpha: float = 0.05,
        seed: int = 0,
        max_samples: int | None = None,
        preprocess: Preprocess = True,
        aggregate: Aggregate = "max",
        groups: Sequence[Any] | Tensor | None = None,
        max_score: float | None | str = AUTO,
        x_layers: Sequence[str] | None = None,
        y_layers: Sequence[str] | None = None,
        null: str = "permutation",
        **kwargs: Any,
    ) -> None:
        # the subclasses' default measures are default_value markers: measure= and metric= both
        # given is an error, as is an alpha= other than 0.05 next to "shape_metric"
        measure = measure_argument(measure, kwargs, stacklevel=4)
        check_shadowed_options(measure, type(self).__name__, alpha=alpha)
        tm_kwargs, measure_kwargs = split_kwargs(kwargs)
        if tm_kwargs.get("dist_sync_on_step"):
            raise ValueError(
                "dist_sync_on_step=True is not supported: forward() returns the uncalibrated "
                "score of this process's batch (a permutation test needs the whole probe); "
                "compute() gathers every process's rows")
        super().__init__(**tm_kwargs)
        self.measure = get_measure(measure, **measure_kwargs)
        self.num_permutations = num_permutations  # each setting checked by __setattr__
        self.alpha = alpha
        self.seed = seed
        self.max_samples = max_samples
        self.preprocessor = RowPreprocessor(preprocess)
        # a state named after the pooling done at update(): a MetricCollection groups only
        # metrics with the same states, so metrics that pool differently are never grouped
        # (their rows would be compared, and a first batch of one token per row, or of none,
        # pools to the same rows whatever the pool)
        pool = self.preprocessor.pool
        self._pool_state = _pool_marker(pool)
        self.add_state(self._pool_state, default=torch.zeros(()), dist_reduce_fx="max",
                       persistent=False)
        self.aggregate = aggregate
        self.groups = groups  # a string, scalar or matrix: refused now, not at compute()
        self.max_score = max_score
        self.null = null
        check_moments_apply(self.null, [self.measure], groups)
        if self.null == "permutation":  # a setting: warned once here, not at every compute()
            warn_if_few(self.num_permutations, self.alpha)  # ("auto": where it draws them)
        self._persist = False
        self.x_layers: list[str] = []
        self.y_layers: list[str] = []
        self._widths: dict[str, list[int]] = {"x": [], "y": []}
        self._reference: PreparedSide | None = None
        self._widened: dict[torch.dtype, PreparedSide] = {}  # the reference in wider dtypes
        self._permutations: Permutations | None = None
        self.last_result: LayerAlignmentResult | None = None
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self._named = {"x": x_layers is not None, "y": y_layers is not None}  # x_layers= given
        if x_layers is not None:
            self._register("x", _layer_names(x_layers, "x_layers"))
        if y_layers is not None:
            self._register("y", _layer_names(y_layers, "y_layers"))

    # ----------------------------------------------------------------------------- states
    def persistent(self, mode: bool = False) -> None:
        """Whether the accumulated rows go into ``state_dict`` (also for layers registered
        later, at the first update)."""
        self._persist = mode
        super().persistent(mode)
        self._persistent[self._pool_state] = False  # a marker, not rows

    @staticmethod
    def _slots(names: Sequence[str]) -> dict[str, int]:
        return {name: i for i, name in enumerate(sorted(names))}

    def _register(self, side: str, names: list[str]) -> None:
        if not names:
            raise ValueError(f"no {side} layers given")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate {side} layer names: {names}")
        setattr(self, f"{side}_layers", names)
        for i in range(len(names)):
            if not hasattr(self, f"{side}{i}"):
                self.add_state(f"{side}{i}", default=[], dist_reduce_fx="cat",
                               persistent=self._persist)

    def _state(self, side: str, name: str) -> Any:
        names = getattr(self, f"{side}_layers")
        return getattr(self, f"{side}{self._slots(names)[name]}")

    def _check_side(self, side: str, layers: Mapping[str, Tensor]) -> int:
        """Validate one side's batch against the registered layers; its number of rows."""
        names = getattr(self, f"{side}_layers")
        if not layers:
            raise ValueError(f"no {side} layers given")
        if names and set(layers) != set(names):
            source = (f"the names given in {side}_layers" if self._named[side]
                      else "the first update's")
            raise ValueError(f"{side} layers {sorted(layers)} do not match {source} "
                             f"{sorted(names)}")
        _check_rows_shape(side, layers)
        counts = {name: int(t.shape[0]) for name, t in layers.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{side} layers have different numbers of rows: {counts}")
        return next(iter(counts.values()))

    def _known_widths(self, side: str) -> list[int]:
        """Each layer's width (sorted names): from the first update, else from the stored rows
        (rows loaded with ``load_state_dict`` or merged with ``merge_state``)."""
        names = getattr(self, f"{side}_layers")
        if not self._widths[side] and names and self._stored_rows(side):
            states = [dim_zero_cat(self._state(side, name)) for name in sorted(names)]
            self._widths[side] = [int(t.shape[1]) for t in states]
        return self._widths[side]

    def _check_widths(self, side: str, rows: Mapping[str, Tensor]) -> None:
        widths = self._known_widths(side)
        if not widths:
            return
        for name, t in rows.items():
            expected = widths[self._slots(rows)[name]]
            if t.dim() != 2 or t.shape[1] != expected:
                raise ValueError(
                    f"{side} layer {name!r} has {tuple(t.shape[1:])} features in this batch but "
                    f"{expected} in earlier ones; every batch must have the same width"
                )

    def _append(self, side: str, rows: Mapping[str, Tensor]) -> None:
        if not getattr(self, f"{side}_layers"):
            self._register(side, list(rows))
        if not self._widths[side]:
            self._widths[side] = [int(rows[name].shape[1]) for name in sorted(rows)]
        for name, t in rows.items():
            self._extend(f"{side}{self._slots(getattr(self, f'{side}_layers'))[name]}", t)

    def _extend(self, attr: str, t: Tensor) -> None:
        """Add ``t`` to the list state ``attr`` as a new list: a ``MetricCollection``'s compute
        group shares one list between its metrics, and each metric's ``forward`` adds its batch
        once (an in-place append would store it once per metric)."""
        setattr(self, attr, [*getattr(self, attr), t])

    def _stored_rows(self, side: str) -> int:
        if not getattr(self, f"{side}_layers"):
            return 0
        return _rows_held(getattr(self, f"{side}0"))

    def _index_count(self) -> int:
        """Number of stored sample ids (``index=``); 0 when no update passed any."""
        if isinstance(self.index, Tensor):
            return int(self.index.numel())
        return sum(int(t.numel()) for t in self.index)

    def _check_index_use(self, given: bool) -> None:
        """Refuse an update whose use of ``index=`` differs from the earlier updates since the
        last reset: ids for only some rows would pair or drop the wrong rows at compute."""
        if not self._stored_rows("x"):
            return
        before = self._index_count() > 0
        if given != before:
            which = ("to this update() but not to the earlier ones" if given else
                     "to the earlier updates but not to this one")
            raise ValueError(
                f"{type(self).__name__}: index= was given {which} since the last reset(); "
                "pass index on every update() or on none (rows without sample ids cannot be "
                "paired with the others)"
            )

    @no_autocast()
    def _update_layers(self, xs: Any, ys: Any, index: Tensor | None) -> None:
        xs = self._as_layers(xs, "x")
        ys = None if ys is None else self._as_layers(ys, "y")
        if ys is None and self._reference is None:
            raise ValueError("update() needs the reference side unless set_reference() was called")
        if ys is not None and self._reference is not None:
            raise ValueError("the reference is cached (set_reference); call update() with the model side only")
        # validate everything before storing anything: a rejected batch leaves no partial rows
        n = self._check_side("x", xs)
        if ys is not None:
            ny = self._check_side("y", ys)
            if ny != n:
                raise ValueError(
                    f"x and y must have the same number of samples (rows) per update: got {n} and {ny}"
                )
        if index is not None:
            index = torch.as_tensor(index, device=self.device).reshape(-1)
            if index.is_floating_point() or index.dtype == torch.bool:
                raise ValueError(f"index must hold integer sample ids, got dtype {index.dtype}")
            index = index.long()
            if index.numel() != n:
                raise ValueError(f"index has {index.numel()} entries for {n} rows")
            if bool((index < 0).any()):
                raise ValueError(f"index must hold sample ids >= 0, got {int(index.min())}")
        if n:
            self._check_index_use(index is not None)
            check_capacity(self._stored_rows("x"), n, self.max_samples)
        x_rows = {name: self.preprocessor.rows(t) for name, t in xs.items()}  # pool (may raise)
        y_rows = None if ys is None else {name: self.preprocessor.rows(t) for name, t in ys.items()}
        self._check_widths("x", x_rows)
        if y_rows is not None:
            self._check_widths("y", y_rows)
        if n == 0:  # checked like any batch (and its layers named), but nothing stored
            for side, rows in (("x", x_rows), ("y", y_rows)):
                if rows is not None and not getattr(self, f"{side}_layers"):
                    self._register(side, list(rows))
            return
        self._append("x", x_rows)
        if y_rows is not None:
            self._append("y", y_rows)
        if index is not None:
            self._extend("index", index)

    def _in_order(self, layers: dict[str, Tensor], side: str) -> dict[str, Tensor]:
        """``layers`` in the order of the registered names of ``side`` (when they are those)."""
        names = getattr(self, f"{side}_layers")
        return {name: layers[name] for name in names} if set(layers) == set(names) else layers

    def _as_layers(self, layers: Any, side: str) -> dict[str, Tensor]:
        """A batch as ``{name: rows}``: a mapping as is; a tensor is the single layer named
        after the side (``"x"`` / ``"y"``) or the only registered one; a list names its tensors
        "0", "1", ..."""
        if isinstance(layers, Tensor):
            names = getattr(self, f"{side}_layers")
            return {names[0] if len(names) == 1 else side: layers}
        if isinstance(layers, (list, tuple, Mapping)):
            return named_layers(layers, side)
        raise TypeError(f"{side} must be a tensor, a list of tensors or a {{layer name: tensor}} "
                        f"mapping, got {type(layers).__name__}")

    # ---------------------------------------------------------------------- reference cache
    @torch.no_grad()
    @no_autocast()
    def _set_reference_layers(self, ys: Any) -> None:
        """Preprocess and prepare (grams / neighbor lists) a frozen reference once."""
        ys = self._as_layers(ys, "y")
        if self.y_layers and set(ys) != set(self.y_layers):
            raise ValueError(f"reference layers {list(ys)} do not match {self.y_layers}")
        if self._stored_rows("y"):
            raise ValueError("set_reference: the metric holds rows updated with their own "
                             "reference side (update(x, y)), which a cached reference would "
                             "silently replace; call reset() first")
        _check_rows_shape("y", ys)
        ys = self._in_order(ys, "y")  # the order of y_layers, which labels the columns
        rows = {name: self.preprocessor.rows(t) for name, t in ys.items()}
        label = "reference (set_reference) layer"
        if self.preprocessor.fn is None:  # a callable's output is checked by side_features
            for name, t in rows.items():
                self._check_finite(f"{label} {name!r}", t)
        matrices = {name: self._matrix(f"{label} {name!r}", t) for name, t in rows.items()}
        names, feats = side_features(matrices, "reference")
        self._reference = prepare_side(names, feats, [self.measure], "y", null=self.null)
        self._widened = {}
        self._computed = None  # a result computed against the previous reference is stale
        if not self.y_layers:
            self._register("y", list(ys))  # states too, for update(x, y) after clear_reference()

    def _matrix(self, label: str, rows: Tensor) -> Tensor:
        """The preprocessed (n, d) matrix of one layer's rows; errors name ``label``."""
        with errors_named(label):
            return self.preprocessor.matrix(rows)

    def clear_reference(self) -> None:
        """Drop the cached reference *and the accumulated rows* (as ``reset()``): rows updated
        against the reference have no reference side without it.  ``update`` then needs both
        sides again (or call ``set_reference`` anew)."""
        self._reference, self._widened = None, {}
        self.reset()

    @property
    def has_reference(self) -> bool:
        """Whether a frozen reference is cached."""
        return self._reference is not None

    def reset(self) -> None:
        """Drop the accumulated rows (the layer names and a cached reference stay); the next
        update may bring other widths."""
        super().reset()
        self._widths = {"x": [], "y": []}

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another metric's rows (torchmetrics' ``merge_state``: its rows come first).

        A metric of this class must hold the same layers with the same widths, and both or
        neither must cache a reference; a metric without rows takes the incoming layers.  A
        dict of raw states is merged slot by slot (slot i is the i-th of the sorted names).
        """
        if isinstance(incoming_state, AlignmentMetricBase):
            if not incoming_state._stored_rows("x"):
                return  # nothing to add
            other = incoming_state
            if other.preprocessor.pool != self.preprocessor.pool:
                raise ValueError(f"merge_state: the metrics pool rows differently (pool="
                                 f"{self.preprocessor.pool!r} here, "
                                 f"{other.preprocessor.pool!r} incoming)")
            if (self._reference is None) != (other._reference is None):
                raise ValueError("merge_state: one metric caches a reference (set_reference) and "
                                 "the other does not; their rows cannot be paired")
            if self._reference is not None and not _same_side(self._reference, other._reference):
                raise ValueError("merge_state: the metrics cache different references "
                                 "(set_reference): the incoming rows were paired with another")
            for side in ("x", "y") if other._reference is None else ("x",):
                theirs = dict(zip(sorted(getattr(other, f"{side}_layers")),
                                  other._known_widths(side)))
                names = getattr(self, f"{side}_layers")
                if not names:  # a metric without layers takes the incoming ones
                    self._register(side, list(getattr(other, f"{side}_layers")))
                    continue
                if not self._stored_rows("x"):  # named layers, widths not known yet
                    theirs = {name: None for name in theirs}
                ours = dict(zip(sorted(names), self._known_widths(side) or [None] * len(names)))
                if ours != theirs:
                    raise ValueError(
                        f"merge_state: the metrics hold different {side} layers: {ours} here, "
                        f"{theirs} incoming (name: width)")
            if self._stored_rows("x") and (self._index_count() > 0) != (other._index_count() > 0):
                raise ValueError("merge_state: one metric's rows have sample ids (index=) and "
                                 "the other's do not")
        elif isinstance(incoming_state, Mapping):
            other_pools = [k for k in incoming_state
                           if k.startswith("pool_") and k != self._pool_state]
            if other_pools:  # a metric_state of rows pooled another way
                raise ValueError(f"merge_state: the dict holds rows pooled another way "
                                 f"({other_pools[0]}; this metric's rows are {self._pool_state})")
            self._check_incoming_rows(incoming_state)
            # torchmetrics reduces every state: the pooling marker is this metric's own
            incoming_state = {**incoming_state, self._pool_state: getattr(self, self._pool_state)}
        super().merge_state(incoming_state)
        self._computed = None  # the merged rows make a new result
        self._count_rows_as_updated()

    def _check_incoming_rows(self, state: Mapping[str, Any]) -> None:
        """``merge_state`` with a dict of raw states: its rows must fill this metric's slots
        (slot i is the i-th of the sorted names) with the same widths, as many x rows as y."""
        own = {f"{side}{i}" for side in ("x", "y")
               for i in range(len(getattr(self, f"{side}_layers")))}
        slots = sorted(k for k in state if re.fullmatch(r"[xy]\d+", k))
        unknown = [k for k in slots if k not in own]
        if unknown:
            fix = (f"it holds the slots {sorted(own)} (sorted layer names: "
                   f"{sorted(self.x_layers)}, {sorted(self.y_layers)})" if own else
                   "pass x_layers=[...] / y_layers=[...] to its constructor, or update it once, "
                   "before merging raw states")
            raise ValueError(f"merge_state: the dict holds rows of layer slot(s) {unknown} that "
                             f"this {type(self).__name__} has not registered: {fix}")
        counts: dict[str, set[int]] = {"x": set(), "y": set()}
        for side in ("x", "y"):
            widths = self._known_widths(side)
            for i in range(len(getattr(self, f"{side}_layers"))):
                value = state.get(f"{side}{i}", [])
                tensors = [value] if isinstance(value, Tensor) else list(value)
                counts[side].add(sum(int(t.shape[0]) for t in tensors))
                for t in tensors:
                    if widths and (t.dim() != 2 or t.shape[1] != widths[i]):
                        raise ValueError(
                            f"merge_state: {side} layer slot {side}{i} has rows of shape "
                            f"{tuple(t.shape)}; this metric's rows have {widths[i]} features")
        if self._reference is not None and any(counts["y"]):
            raise ValueError("merge_state: the dict holds y rows (rows updated with their own "
                             "reference side, update(x, y)) but this metric caches a reference "
                             "(set_reference), which its rows are paired with")
        if len(counts["x"]) > 1 or (self._reference is None and counts["y"]
                                    and counts["y"] != counts["x"]):
            x, y = ("/".join(map(str, sorted(counts[side]))) for side in ("x", "y"))
            raise ValueError(f"merge_state: the dict holds {x} x rows and {y} y rows (per layer "
                             "slot); every layer needs the same number of rows")
        value = state.get("index", [])
        ids = sum(int(t.numel()) for t in ([value] if isinstance(value, Tensor) else value))
        rows = max(counts["x"], default=0)
        if rows and self._stored_rows("x") and (ids > 0) != (self._index_count() > 0):
            raise ValueError("merge_state: one metric's rows have sample ids (index=) and "
                             "the other's do not")
        if ids and ids != rows:
            raise ValueError(f"merge_state: the dict holds {ids} sample ids (index) for {rows} "
                             "rows per layer slot; every row needs its id")

    def _count_rows_as_updated(self) -> None:
        """Rows that arrived without ``update()`` (merged, loaded) count as an update, so that
        torchmetrics does not warn that ``compute()`` was called before ``update()``."""
        if self._stored_rows("x"):
            self._update_count = max(self._update_count, 1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        names = state_dict.pop(prefix + _NAMES_KEY, None)  # not a torchmetrics state
        refused = self._refused_rows(state_dict, prefix, names)
        if refused:  # nothing loaded: the metric stays as it was
            error_msgs.append(refused)
            return
        unregistered = self._unregistered_layers(state_dict, prefix)  # before torchmetrics
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # pops the states it loads
        # PyTorch passes strict=True here whatever load_state_dict was given: rows that fit no
        # registered layer are refused by a non-strict load too
        error_msgs.extend(unregistered)
        self._widths = {"x": [], "y": []}  # taken again from the loaded rows
        self._computed = None  # loaded rows make a new result
        self._count_rows_as_updated()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._persist:  # slot i holds the i-th of the sorted names: the names say whose
            destination[prefix + _NAMES_KEY] = {"x": list(self.x_layers),
                                                "y": list(self.y_layers),
                                                "pool": _pool_name(self.preprocessor.pool)}

    def _refused_rows(self, state_dict: Mapping[str, Any], prefix: str,
                      names: Mapping[str, Sequence[str]] | None) -> str:
        """Why the rows of ``state_dict`` cannot be loaded here ("" when they can): saved under
        other layer names (slots are matched by name, and a metric without names takes the
        saved ones), rows pooled another way, y rows into a metric caching a reference, or x
        rows without their y rows (saved with a cached reference) into a metric without one."""
        pool, ours = (names or {}).get("pool"), _pool_name(self.preprocessor.pool)
        if pool is not None and pool != ours:
            return (f"the state dict holds rows pooled with pool={pool!r} but this "
                    f"{type(self).__name__} pools with pool={ours!r}: its updates would pool "
                    "their rows another way")
        names = {side: list(names.get(side, [])) for side in ("x", "y")} if names else {}
        for side, saved in names.items():
            ours = getattr(self, f"{side}_layers")
            if saved and ours and sorted(saved) != sorted(ours):
                return (f"the state dict holds rows of the {side} layers {sorted(saved)} but "
                        f"this {type(self).__name__} has {sorted(ours)}: rows are loaded by "
                        "layer name")
        rows = {side: [_rows_held(v) for v in _slot_states(state_dict, prefix, side).values()]
                for side in ("x", "y")}
        if self._reference is not None and any(rows["y"]):
            return ("the state dict holds y rows (updated with their own reference side, "
                    "update(x, y)) but this metric caches a reference (set_reference): load "
                    "them into a metric without one (or call clear_reference() first)")
        if self._reference is None and any(rows["x"]) and rows["y"] and not any(rows["y"]):
            return ("the state dict holds x rows without their reference side (saved from a "
                    "metric caching a reference): call set_reference() with that reference "
                    "before loading them")
        for side, saved in names.items():
            if saved and not getattr(self, f"{side}_layers"):
                self._register(side, saved)  # a metric without layers takes the saved ones
        return ""

    def _unregistered_layers(self, state_dict: Mapping[str, Any], prefix: str) -> list[str]:
        """What to do about rows in ``state_dict`` of more layers than this metric has
        registered (a metric takes its layer names from its first update, or from
        ``x_layers`` / ``y_layers``: without them a fresh one has no state to load rows into),
        or of fewer (its other layers would have no rows)."""
        out = []
        for side in ("x", "y"):
            names = getattr(self, f"{side}_layers")
            keys = sorted(_slot_states(state_dict, prefix, side))
            if len(keys) > len(names):
                has = f"{len(names)} ({names})" if names else f"no {side} layers"
                out.append(
                    f"the state dict holds rows of {len(keys)} {side} layer(s) ({', '.join(keys)}) "
                    f"but this {type(self).__name__} has {has}: pass {side}_layers=[...] with "
                    "the layer names to its constructor to load them")
            elif 0 < len(keys) < len(names):
                out.append(
                    f"the state dict holds rows of {len(keys)} {side} layer(s) ({', '.join(keys)}) "
                    f"but this {type(self).__name__} has {len(names)} ({names}): the others "
                    f"would have no rows; pass {side}_layers=[...] with the state's layer names")
        return out

    # ------------------------------------------------------------------- distributed layout
    def _wrap_compute(self, compute: Any) -> Any:
        """torchmetrics' compute wrapper, without its "compute before update" warning: a
        process without rows either gathers the other processes' rows (uneven shards) or gets
        ``compute()``'s own clear error, which the warning would only precede."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def quiet_before_update(*args: Any, **kwargs: Any) -> Any:
            if self.update_called:
                return wrapped(*args, **kwargs)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_BEFORE_UPDATE, category=UserWarning)
                return wrapped(*args, **kwargs)

        return quiet_before_update

    def sync(self, dist_sync_fn: Any = None, process_group: Any = None, should_sync: bool = True,
             distributed_available: Any = None) -> None:
        """Agree on the layer layout across processes, then torchmetrics' sync."""
        if distributed_available is None:
            distributed_available = self.distributed_available_fn
        available = distributed_available() if callable(distributed_available) else False
        if should_sync and available and _torch_distributed():
            self._agree_on_layout(process_group or self.process_group)
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)

    def _layout(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self._index_count() > 0,
                               "reference": self._reference is not None}
        for side in ("x", "y"):
            names = getattr(self, f"{side}_layers")
            rows = self._stored_rows(side) if names else 0
            widths = self._known_widths(side) if rows else []  # also of loaded or merged rows
            out[side] = (sorted(names), list(widths), rows, list(names))
            out[f"{side}_float64"] = [self._holds_float64(f"{side}{i}") for i in range(len(names))]
        return out

    def _holds_float64(self, attr: str) -> bool:
        """Whether the list state ``attr`` holds float64 rows (concatenated, they are float64)."""
        state = getattr(self, attr)
        tensors = [state] if isinstance(state, Tensor) else state
        return any(t.dtype == torch.float64 for t in tensors)

    def _agree_on_layout(self, group: Any) -> None:
        import torch.distributed as dist

        layouts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(layouts, self._layout(), group=group)
        cached = [lay["reference"] for lay in layouts]
        if len(set(cached)) > 1:
            raise ValueError(
                f"{type(self).__name__}: rank {cached.index(True)} caches a reference "
                f"(set_reference) and rank {cached.index(False)} does not; every process must "
                "call set_reference, or every process pass y to update()")
        for side in ("x", "y"):
            filled = [(r, lay[side]) for r, lay in enumerate(layouts) if lay[side][2] > 0]
            if not filled:
                continue
            rank, (names, widths, _, order) = filled[0]
            for other, (names2, widths2, _, _) in filled[1:]:
                if names2 != names or widths2 != widths:
                    raise ValueError(
                        f"{type(self).__name__}: the processes hold different {side} layers: "
                        f"rank {rank} has {dict(zip(names, widths))} (name: width), rank {other} "
                        f"has {dict(zip(names2, widths2))}; every process must update the same "
                        "layers with the same widths"
                    )
            # each layer slot in float64 where any process holds float64 rows of it, as the
            # concatenation of one process's rows would be
            flags = [layouts[r][f"{side}_float64"] for r, _ in filled]
            wide = [any(slot) for slot in zip(*flags)]
            if not getattr(self, f"{side}_layers"):
                self._register(side, list(order))
                self._widths[side] = list(widths)
            setattr(self, f"{side}_layers", list(order))  # report in the first process's order
            for slot, width in enumerate(widths):
                attr = f"{side}{slot}"
                state = getattr(self, attr)
                if isinstance(state, list):  # a new list: compute groups may share this one
                    dtype = torch.float64 if wide[slot] else torch.float32
                    empty = [torch.empty(0, width, device=self.device)]
                    setattr(self, attr, [t.to(dtype) for t in state or empty])
        with_index = [lay["index"] for lay in layouts if lay["x"][2] > 0]
        if any(with_index) and not all(with_index):
            raise ValueError(f"{type(self).__name__}: some processes passed index= and others "
                             "did not; pass sample ids on every process or on none")
        if any(with_index) and isinstance(self.index, list) and not self.index:
            self._extend("index", torch.empty(0, dtype=torch.long, device=self.device))

    # ------------------------------------------------------------------------------ compute
    def _gather(self, side: str) -> list[Tensor]:
        names = getattr(self, f"{side}_layers")
        slots = self._slots(names)
        return [dim_zero_cat(getattr(self, f"{side}{slots[name]}")) for name in names]

    def _perms(self, n: int, groups: Any) -> Permutations:
        if groups is not None:
            return Permutations(n, self.num_permutations, self.seed, groups)
        cached = self._permutations
        if cached is None or (cached.n, cached.num_permutations, cached.seed) != (
                n, self.num_permutations, self.seed):
            self._permutations = Permutations(n, self.num_permutations, self.seed)
        return self._permutations

    @staticmethod
    def _check_finite(what: str, rows: Tensor, state: Any = None) -> None:
        """Raise naming ``what`` (side and layer) if ``rows`` hold NaN/Inf values.

        One reduction when the rows are finite.  Not used with a callable ``preprocess`` (it
        may handle NaN/Inf itself; its output is checked by ``side_features``).  ``state`` (the
        layer's list state, not yet synced) locates the first bad row's ``update()`` call.
        """
        if all_finite(rows):
            return
        bad = (~torch.isfinite(rows.reshape(rows.shape[0], -1))).any(dim=1)
        first = int(bad.nonzero()[0, 0])
        where = f"first: row {first}"
        if isinstance(state, list) and state:
            ends = torch.tensor([int(t.shape[0]) for t in state]).cumsum(0)
            call = int(torch.searchsorted(ends, first, right=True)) + 1
            where += f", from update() call {call} since the last reset()"
        raise ValueError(f"{what} contains NaN/Inf values in {int(bad.sum())} of its "
                         f"{rows.shape[0]} rows ({where})")

    @no_autocast()
    def _compute_result(self) -> LayerAlignmentResult:
        metric = type(self).__name__
        stored = self._stored_rows("x")
        # this process's rows only (after a distributed sync they are every process's)
        synced = bool(getattr(self, "_is_synced", False))
        if self.max_samples is not None and not synced and stored > self.max_samples:
            raise ValueError(
                f"{metric} holds {stored} rows, more than max_samples={self.max_samples} (rows "
                "from update(), merge_state() or load_state_dict(); in a MetricCollection, "
                "metrics that share a compute group are all updated through the first one: give "
                "a metric with its own max_samples its own collection, or pass "
                "compute_groups=False)")
        if not self.x_layers or not stored:
            raise RuntimeError(f"{metric}.compute() found no accumulated rows: call update() "
                               "with at least one row first (reset() and clear_reference() "
                               "drop the accumulated rows)")
        if self._reference is None and (not self.y_layers or not self._stored_rows("y")):
            raise RuntimeError(
                f"{metric}.compute() needs the reference side y: pass it to every update(x, y) "
                "or cache it with set_reference(y) (clear_reference() dropped the cached one)"
            )
        xs = self._gather("x")
        ys = self._gather("y") if self._reference is None else []
        sides = (("x", "model side (x)", xs), ("y", "reference side (y)", ys))
        for side, label, rows in sides if self.preprocessor.fn is None else ():
            for layer, t in zip(getattr(self, f"{side}_layers"), rows):
                self._check_finite(f"{label} layer {layer!r}", t, self._state(side, layer))
        index = dim_zero_cat(self.index) if self._index_count() else None
        if index is not None and index.numel() != xs[0].shape[0]:
            raise ValueError(
                f"{metric}.compute(): {index.numel()} sample ids (index=) for "
                f"{xs[0].shape[0]} accumulated rows; pass index on every update() or on none"
            )
        index, rows = order_rows(index, *xs, *ys)
        xs, ys = rows[: len(xs)], rows[len(xs):]
        if self._reference is not None:
            yside = self._ready(self._reference)
            wide = torch.promote_types(yside.dtype, xs[0].dtype if xs[0].is_floating_point()
                                       else yside.dtype)
            if wide != yside.dtype:  # float64 model rows: the reference in float64 too
                if wide not in self._widened:
                    self._widened[wide] = prepare_side(
                        yside.names, [f.to(wide) for f in yside.features], [self.measure], "y",
                        null=self.null, **room_for(len(xs), [self.measure]))
                yside = self._ready(self._widened[wide])
            ref_n = yside.n
            if index is None and xs[0].shape[0] != ref_n:
                raise ValueError(
                    f"the model side has {xs[0].shape[0]} rows but the cached reference has {ref_n}; "
                    "rows must be the same probe samples (pass index= to select a subset)"
                )
            if index is not None and int(index.max()) >= ref_n:
                raise ValueError(f"index holds sample id {int(index.max())} but the cached "
                                 f"reference has only {ref_n} rows")
            full = index is None or (index.numel() == ref_n and
                                     bool((index.cpu() == torch.arange(ref_n)).all()))
            if not full:
                yside = prepare_side(yside.names, [f[index.to(f.device)] for f in yside.features],
                                     [self.measure], "y", null=self.null,
                                     **room_for(len(xs), [self.measure]))
            device, dtype = yside.device, yside.dtype
        else:
            matrices = {name: self._matrix(f"reference side (y) layer {name!r}", y)
                        for name, y in zip(self.y_layers, ys)}
            y_names, y_feats = side_features(matrices, "y")
            device, dtype = y_feats[0].device, y_feats[0].dtype
        matrices = {name: self._matrix(f"model side (x) layer {name!r}", x.to(device))
                    for name, x in zip(self.x_layers, xs)}
        x_names, x_feats = side_features(matrices, "x")
        dtype = torch.promote_types(dtype, x_feats[0].dtype)
        # before the reference side is built, count the states it will keep (a cached
        # reference is held already: the memory available no longer counts it)
        room = room_for(len(y_feats), [self.measure]) if self._reference is None else {}
        xside = prepare_side(x_names, [t.to(dtype) for t in x_feats], [self.measure], "x",
                             null=self.null, **room)
        if self._reference is None:
            yside = prepare_side(y_names, [t.to(dtype) for t in y_feats], [self.measure], "y",
                                 null=self.null)
        groups = self.groups
        if groups is not None and index is not None:
            picked = index.cpu().numpy()
            if int(picked.max()) >= len(groups):
                raise ValueError(
                    f"groups has {len(groups)} labels but index= holds sample id "
                    f"{int(picked.max())}: with index=, groups[i] is the label of sample id i")
            groups = (groups.cpu()[picked] if isinstance(groups, Tensor)
                      else np.asarray(groups)[picked])
        if groups is not None:
            GroupPermuter(groups, xside.n)  # clear error for a wrong length
        perms = self._perms(xside.n, groups)
        return calibrate_prepared([self.measure], xside, yside, perms, self.alpha, self.aggregate,
                                  self.max_score, null=self.null,
                                  warn_few=self.null == "auto")[self.measure]

    def _ready(self, side: PreparedSide) -> PreparedSide:
        """A cached reference side with the state of the metric's measure (prepared now when
        ``measure`` was set after ``set_reference``)."""
        return prepare_side(side.names, side.features, [self.measure], "y", side=side,
                            null=self.null)

    @no_autocast()
    def _raw_batch(self, xs: Any, ys: Any) -> Tensor | None:
        """Uncalibrated aggregate on one paired batch (what ``forward`` returns).

        ``None`` when the reference is cached (no paired batch), the batch is too small for
        the measure (e.g. n <= k: a permutation test needs the whole probe set) or cannot be
        scored alone (e.g. an all-zero row; ``compute()`` then raises, naming it).  NaN when the
        batch holds NaN/Inf values (``compute()`` then raises, naming the side and layer).
        """
        if ys is None:
            return None
        prep = self.preprocessor
        # in the metric's layer order, as compute() reports (a position-dependent aggregate)
        xs, ys = (self._in_order(self._as_layers(layers, side), side)
                  for layers, side in ((xs, "x"), (ys, "y")))
        try:
            with torch.no_grad():
                xm = {k: prep.rows(t) for k, t in xs.items()}
                ym = {k: prep.rows(t) for k, t in ys.items()}
                if prep.fn is not None:  # a callable may handle NaN/Inf: check its output
                    xm = {k: prep.matrix(t) for k, t in xm.items()}
                    ym = {k: prep.matrix(t) for k, t in ym.items()}
                if not all(all_finite(t) for t in (*xm.values(), *ym.values())):
                    first_x, first_y = next(iter(xm.values())), next(iter(ym.values()))
                    dtype = torch.promote_types(first_x.dtype, first_y.dtype)
                    return torch.full((), float("nan"), dtype=dtype, device=first_x.device)
                if prep.fn is None:
                    xm = {k: prep.matrix(t) for k, t in xm.items()}
                    ym = {k: prep.matrix(t) for k, t in ym.items()}
                xn, xf = side_features(xm, "x")
                yn, yf = side_features(ym, "y")
                dtype = torch.promote_types(xf[0].dtype, yf[0].dtype)
                # on the reference side's device, as compute() puts them
                xside = prepare_side(xn, [t.to(yf[0].device, dtype) for t in xf],
                                     [self.measure], "x")
                yside = prepare_side(yn, [t.to(dtype) for t in yf], [self.measure], "y")
        except ValueError:
            return None
        matrix = observed_matrices([self.measure], xside, yside)[self.measure]
        return aggregate_fn(self.aggregate)[1](matrix.unsqueeze(0))[0]
