"""Shared machinery of the alignment metrics: row accumulation over named layers, a cached
frozen reference, and calibration at ``compute()``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from alignment_callback.functional.calibration import AUTO
from alignment_callback.functional.layers import (
    Aggregate,
    LayerAlignmentResult,
    aggregate_fn,
    calibrate_layers_from_matrices,
    layer_null_from_states,
    layer_scores,
)
from alignment_callback.functional.permutation import null_from_states
from alignment_callback.functional.registry import MetricSpec, get_measure, prepare_one
from alignment_callback.metrics._rows import Preprocess, RowPreprocessor, check_capacity, order_rows, split_kwargs


class AlignmentMetricBase(Metric):
    """Accumulates paired rows of named layers; calibrates at ``compute()``.

    Subclasses fix how ``update`` maps its arguments to ``{layer: rows}``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        metric: MetricSpec,
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
        **kwargs: Any,
    ) -> None:
        tm_kwargs, measure_kwargs = split_kwargs(kwargs)
        super().__init__(**tm_kwargs)
        self.measure = get_measure(metric, **measure_kwargs)
        if int(num_permutations) < 1:
            raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if max_samples is not None and max_samples < 2:
            raise ValueError(f"max_samples must be >= 2 or None, got {max_samples}")
        self.num_permutations = int(num_permutations)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.max_samples = max_samples
        self.preprocessor = RowPreprocessor(preprocess)
        self.aggregate = aggregate
        aggregate_fn(aggregate)  # validate early
        self.groups = groups
        self.max_score = self.measure.max_score if max_score == AUTO else max_score
        self.x_layers: list[str] = []
        self.y_layers: list[str] = []
        self._reference: dict[str, tuple[Tensor, Any]] | None = None
        self.last_result: LayerAlignmentResult | None = None
        self.add_state("index", default=[], dist_reduce_fx="cat")
        if x_layers is not None:
            self._register("x", list(x_layers))
        if y_layers is not None:
            self._register("y", list(y_layers))

    # ----------------------------------------------------------------------------- states
    def _register(self, side: str, names: list[str]) -> None:
        if not names:
            raise ValueError(f"no {side} layers given")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate {side} layer names: {names}")
        setattr(self, f"{side}_layers", names)
        # layer states may be registered lazily (first update): inherit the persistence set by
        # ``persistent()`` so far, which the always-present ``index`` state records
        persistent = self._persistent.get("index", False)
        for i in range(len(names)):
            self.add_state(f"{side}{i}", default=[], dist_reduce_fx="cat", persistent=persistent)

    def _check_side(self, side: str, layers: Mapping[str, Tensor]) -> int:
        """Validate one side's batch against the registered layer names; its number of rows."""
        names = getattr(self, f"{side}_layers")
        if names and set(layers) != set(names):
            raise ValueError(f"{side} layers {sorted(layers)} do not match the first update's {sorted(names)}")
        if not layers:
            raise ValueError(f"no {side} layers given")
        counts = {name: int(t.shape[0]) for name, t in layers.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{side} layers have different numbers of rows: {counts}")
        return next(iter(counts.values()))

    def _append(self, side: str, layers: Mapping[str, Tensor]) -> None:
        names = getattr(self, f"{side}_layers")
        if not names:
            self._register(side, list(layers))
            names = getattr(self, f"{side}_layers")
        for i, name in enumerate(names):
            getattr(self, f"{side}{i}").append(layers[name])

    def _stored_rows(self, side: str) -> int:
        state = getattr(self, f"{side}0")
        return int(state.shape[0]) if isinstance(state, Tensor) else sum(int(t.shape[0]) for t in state)

    def _update_layers(
        self, xs: Mapping[str, Tensor], ys: Mapping[str, Tensor] | None, index: Tensor | None
    ) -> None:
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
            index = torch.as_tensor(index, device=self.device).reshape(-1).long()
            if index.numel() != n:
                raise ValueError(f"index has {index.numel()} entries for {n} rows")
        check_capacity(self._stored_rows("x") if self.x_layers else 0, n, self.max_samples)
        xs = {name: self.preprocessor.rows(t) for name, t in xs.items()}  # pool (may raise)
        ys = None if ys is None else {name: self.preprocessor.rows(t) for name, t in ys.items()}
        self._append("x", xs)
        if ys is not None:
            self._append("y", ys)
        if index is not None:
            self.index.append(index)

    # ---------------------------------------------------------------------- reference cache
    @torch.no_grad()
    def _set_reference_layers(self, ys: Mapping[str, Tensor]) -> None:
        """Preprocess and prepare (grams / neighbor lists) a frozen reference once."""
        if self.y_layers and list(ys) != self.y_layers:
            raise ValueError(f"reference layers {list(ys)} do not match {self.y_layers}")
        cache = {}
        for name, t in ys.items():
            feats = self.preprocessor.matrix(self.preprocessor.rows(t))
            cache[name] = (feats, prepare_one(self.measure, feats, f"reference layer {name!r}"))
        self.y_layers = list(ys)
        self._reference = cache

    def clear_reference(self) -> None:
        """Drop the cached reference; ``update`` then needs both sides again."""
        self._reference = None

    @property
    def has_reference(self) -> bool:
        """Whether a frozen reference is cached."""
        return self._reference is not None

    # ------------------------------------------------------------------------------ compute
    def _gather(self, side: str) -> list[Tensor]:
        names = getattr(self, f"{side}_layers")
        return [dim_zero_cat(getattr(self, f"{side}{i}")) for i in range(len(names))]

    def _compute_result(self) -> LayerAlignmentResult:
        if not self.x_layers or (self._reference is None and not self.y_layers) or not self._stored_rows("x"):
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update()")
        xs = self._gather("x")
        if not xs[0].numel():
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update()")
        ys = self._gather("y") if self._reference is None else []
        index = dim_zero_cat(self.index) if (isinstance(self.index, Tensor) or self.index) else None
        index, rows = order_rows(index, *xs, *ys)
        xs, ys = rows[: len(xs)], rows[len(xs):]
        device = xs[0].device
        if self._reference is not None:
            ref_n = next(iter(self._reference.values()))[0].shape[0]
            full = index is None or (index.numel() == ref_n and bool((index.cpu() == torch.arange(ref_n)).all()))
            if index is None and xs[0].shape[0] != ref_n:
                raise ValueError(
                    f"the model side has {xs[0].shape[0]} rows but the cached reference has {ref_n}; "
                    "rows must be the same probe samples (pass index= to select a subset)"
                )
            device = next(iter(self._reference.values()))[0].device
            if full:
                sys = [state for _, state in self._reference.values()]
            else:
                sel = index.to(device)
                sys = [prepare_one(self.measure, feats[sel]) for feats, _ in self._reference.values()]
        else:
            sys = [prepare_one(self.measure, self.preprocessor.matrix(y), f"y layer {nm!r}")
                   for nm, y in zip(self.y_layers, ys)]
        sxs = [prepare_one(self.measure, self.preprocessor.matrix(x.to(device)), f"x layer {nm!r}")
               for nm, x in zip(self.x_layers, xs)]
        n = xs[0].shape[0]
        groups = self.groups
        if groups is not None and index is not None:
            groups = torch.as_tensor(groups)[index.cpu()]
        ident = torch.arange(n, device=device)[None]
        if len(sxs) == 1 and len(sys) == 1:  # scalar path (exactly calibrated_alignment)
            observed = self.measure.score(sxs[0], sys[0], ident)[0]
            null = null_from_states(self.measure, sxs[0], sys[0], n, self.num_permutations,
                                    self.seed, device, groups)
            matrix, null_m = observed.reshape(1, 1), null.reshape(-1, 1, 1)
        else:
            matrix = layer_scores(self.measure, sxs, sys, ident)[0]
            null_m = layer_null_from_states(self.measure, sxs, sys, n, self.num_permutations,
                                            self.seed, device, groups)
        return calibrate_layers_from_matrices(
            matrix, null_m, self.aggregate, self.alpha, self.max_score, self.x_layers, self.y_layers
        )

    def _raw_batch(self, xs: Mapping[str, Tensor], ys: Mapping[str, Tensor] | None) -> Tensor | None:
        """Uncalibrated aggregate on one paired batch (what ``forward`` returns).

        ``None`` when the reference is cached (no paired batch) or the batch is too small for
        the measure (e.g. n <= k): a permutation test needs the whole probe set.
        """
        if ys is None:
            return None
        prep = self.preprocessor
        try:
            with torch.no_grad():
                sxs = [prepare_one(self.measure, prep.matrix(prep.rows(t))) for t in xs.values()]
                sys = [prepare_one(self.measure, prep.matrix(prep.rows(t))) for t in ys.values()]
        except ValueError:
            return None
        x0 = next(iter(xs.values()))
        matrix = layer_scores(self.measure, sxs, sys, torch.arange(x0.shape[0], device=x0.device)[None])
        return aggregate_fn(self.aggregate)[1](matrix)[0]
