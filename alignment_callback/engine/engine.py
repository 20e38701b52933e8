"""``AlignmentEngine``: one alignment step, computed once and shared across measures."""

from __future__ import annotations

import re
import time
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor

from alignment_callback.engine.result import StepResult
from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._validation import (
    AUTO,
    check_alpha,
    check_device,
    check_max_score,
    check_num_permutations,
    check_seed,
    errors_named,
)
from alignment_callback.functional.aggregation import Aggregate, MappedAggregate, check_aggregate
from alignment_callback.functional.analytic_null import check_moments_apply, check_null
from alignment_callback.functional.calibration import warn_if_few
from alignment_callback.functional.permutation import GroupPermuter, Permutations, check_groups
from alignment_callback.functional.pipeline import (
    Gather,
    PreparedSide,
    calibrate_prepared,
    prepare_side,
    room_for,
    side_features,
)
from alignment_callback.functional.registry import Measure, MeasureSpec, get_measure, measure_list
from alignment_callback.hooks.outputs import LayerShapeError
from alignment_callback.metrics._rows import Preprocess, RowPreprocessor

MeasuresSpec = Union[str, Sequence[MeasureSpec], Mapping[str, Union[Mapping[str, Any], Measure]]]


def resolve_measures(measures: MeasuresSpec) -> dict[str, Measure]:
    """``{label: Measure}`` from names, :class:`Measure` objects or callables, or
    ``{name: {options}}`` / ``{label: Measure or callable}``.

    Labels are the names as given (an alias stays the label: it is what the user logs);
    options are checked against each measure's declaration, so a wrong name or option fails
    here, before any data is seen.
    """
    if isinstance(measures, Mapping):
        out = {}
        for label, options in measures.items():
            if str(label) in out:  # {1: ..., "1": ...}: one label, one measure lost
                raise ValueError(f"two measures are labeled {str(label)!r} (the keys "
                                 f"{[k for k in measures if str(k) == str(label)]!r}): labels "
                                 "are strings, give them distinct names")
            if isinstance(options, Measure):
                out[str(label)] = options
            elif isinstance(options, Mapping):
                out[str(label)] = get_measure(str(label), **dict(options))
            elif callable(options):  # your own measure f(x, y), labeled by the key
                out[str(label)] = get_measure(options)
            else:
                raise TypeError(f"measures[{label!r}] must be a dict of options, a Measure or a "
                                f"callable f(x, y), got {type(options).__name__}")
    else:
        out = {}
        for spec in measure_list(measures):
            m = get_measure(spec)
            label = spec if isinstance(spec, str) else m.name
            if label in out:
                same = out[label] == m if isinstance(spec, (str, Measure)) else False
                raise ValueError(
                    f"measure {label!r} is given twice" if same else
                    f"two measures are labeled {label!r} (a list labels each by its name): pass "
                    f"a dict {{label: measure}} to tell them apart")
            out[label] = m
    if not out:
        raise ValueError("no measures given")
    for label in out:  # <prefix>/<label>/pair/... and /layer/...: the keys would be misread
        if re.search(r"/(pair|layer)(/|$)", label):
            raise ValueError(f"measure label {label!r}: a '/pair' or '/layer' segment is where "
                             "the logged keys hold a measure's layer pairs and drift layers; "
                             "choose another label")
    return out


def _checked_pairs(pairs: Mapping[str, str] | None) -> dict[str, str] | None:
    """``pairs`` as a dict (a copy), or None; a clear error for anything else or an empty one."""
    if pairs is None:
        return None
    if not isinstance(pairs, Mapping):
        raise TypeError("pairs must be a {model layer: reference layer} mapping or None, got "
                        f"{type(pairs).__name__}")
    if not pairs:
        raise ValueError("pairs is empty: give at least one {model layer: reference layer} "
                         "pair, or pairs=None for every layer pair")
    return dict(pairs)


class AlignmentEngine:
    """Calibrated alignment of a model's layers with a cached reference, step after step.

    Parameters
    ----------
    measures : names, Measure objects, or ``{name: {options}}``
        E.g. ``["linear_cka", "mutual_knn"]`` or ``{"mutual_knn": {"k": 5}}``.
    num_permutations : int, default=500
    alpha : float, default=0.05
    seed : int, default=0
        The permutations are drawn once from this seed and reused at every step, so the
        curve over steps is comparable.
    aggregate : {"max", "mean", "top<m>"} or callable, default="max"
    pairs : mapping model layer -> reference layer, default=None
        Aggregate over these pairs only (the whole LA×LB matrix is still computed).
    groups : sequence of labels, default=None
        Block permutations (rows sharing a label move together).
    preprocess : bool, mapping or callable, default=True
        Applied once per layer: ``True`` L2-normalizes rows (PRH), ``False`` uses rows as
        given, a mapping passes ``pool`` / ``clamp_quantile`` / ``normalize`` to
        ``prepare_features``, a callable maps (n, d) rows to features.
    device : torch.device or str, default=None
        Where everything is computed (default: where the activations are).
    max_score : float, None or "auto", default="auto"
    null : {"permutation", "moments", "auto"}, default="permutation"
        How each null is obtained (see ``calibrated_alignment``); the reference's invariants
        for the analytic null are computed once, like its prepared state.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.engine import AlignmentEngine
    >>> g = torch.Generator().manual_seed(0)
    >>> ref = {"r": torch.randn(80, 6, generator=g)}
    >>> engine = AlignmentEngine(["linear_cka", "mutual_knn"], num_permutations=99)
    >>> _ = engine.set_reference(ref)  # prepared once, reused at every step
    >>> result = engine.step({"m": ref["r"] @ torch.randn(6, 6, generator=g)}, epoch=1)
    >>> sorted(result.results), round(float(result.results["mutual_knn"].p_value), 4)
    (['linear_cka', 'mutual_knn'], 0.01)
    """

    #: Settings checked as the constructor checks them, also when assigned later.
    _CHECKS = {"num_permutations": check_num_permutations, "alpha": check_alpha,
               "seed": check_seed, "max_score": check_max_score,
               "aggregate": check_aggregate, "groups": check_groups, "pairs": _checked_pairs,
               "device": check_device}

    def __setattr__(self, name: str, value: Any) -> None:
        built = "_null" in self.__dict__  # after construction
        if built and name in ("preprocess", "preprocessor"):
            raise AttributeError(
                "preprocess is fixed at construction (the cached reference was preprocessed "
                "with it): build a new AlignmentEngine with the new preprocess")
        check = self._CHECKS.get(name)
        if check is not None:
            value = check(value)
            if name == "groups" and built:
                check_moments_apply(self.null, self.measures.values(), value)
        super().__setattr__(name, value)
        if built and name in ("num_permutations", "alpha") and self.null == "permutation":
            warn_if_few(self.num_permutations, self.alpha)  # as the constructor warns

    def __init__(
        self,
        measures: MeasuresSpec,
        num_permutations: int = 500,
        alpha: float = 0.05,
        seed: int = 0,
        aggregate: Aggregate = "max",
        pairs: Mapping[str, str] | None = None,
        groups: Any = None,
        preprocess: Preprocess = True,
        device: torch.device | str | None = None,
        max_score: float | None | str = AUTO,
        null: str = "permutation",
    ) -> None:
        self._measures = resolve_measures(measures)
        self.num_permutations = num_permutations  # each checked by __setattr__
        self.alpha = alpha
        self.seed = seed
        self.aggregate = aggregate
        self.pairs = pairs
        self.groups = groups
        self.preprocessor = RowPreprocessor(preprocess)
        self.device = device
        self.max_score = max_score
        self._null = check_null(null)
        check_moments_apply(self.null, self.measures.values(), groups)
        if self.null == "permutation":  # a setting: warned once here, not at every step
            warn_if_few(self.num_permutations, self.alpha)  # ("auto": where it draws them)
        self.reference: PreparedSide | None = None
        self.permutations: Permutations | None = None
        self._reference_null = self.null

    # ------------------------------------------------------------------------- settings
    @property
    def measures(self) -> dict[str, Measure]:
        """``{label: Measure}``.  Assigning names, Measure objects or a mapping resolves and
        checks them like the constructor; a cached reference is prepared for new measures at
        the next step."""
        return self._measures

    @measures.setter
    def measures(self, measures: MeasuresSpec) -> None:
        resolved = resolve_measures(measures)
        check_moments_apply(self.null, resolved.values(), self.groups)
        self._measures = resolved

    @property
    def null(self) -> str:
        """How each null is obtained; assigning it is checked like the constructor's, and a
        cached reference is prepared for it again at the next step."""
        return self._null

    @null.setter
    def null(self, null: str) -> None:
        null = check_null(null)
        check_moments_apply(null, self.measures.values(), self.groups)
        self._null = null

    # ----------------------------------------------------------------------------- checks
    @property
    def min_samples(self) -> int:
        """The fewest probe samples every measure is defined for."""
        return max(m.min_samples for m in self.measures.values())

    def check_samples(self, n: int, what: str = "the probe") -> None:
        """Raise a configuration error when ``n`` samples are too few for a measure."""
        short = [f"{label} ({', '.join(f'{k}={v}' for k, v in m.params) or 'defaults'}) needs "
                 f">= {m.min_samples}" for label, m in self.measures.items() if n < m.min_samples]
        if short:
            raise ValueError(f"{what} has {n} samples, too few: " + "; ".join(short))
        if self.groups is not None:
            GroupPermuter(self.groups, n)

    # ------------------------------------------------------------------------------ sides
    def features(self, layers: Mapping[str, Tensor], label: str) -> tuple[list[str], list[Tensor]]:
        """Preprocessed (n, d) features of ``layers`` on the compute device, one dtype."""
        if not isinstance(layers, Mapping):
            raise TypeError(f"{label} layers must be a mapping {{layer name: (n, ...) tensor}}, "
                            f"got {type(layers).__name__}: name the layer, e.g. "
                            "{'features': activations}")
        prep = self.preprocessor
        mats = {}
        for name, t in layers.items():
            with errors_named(f"{label} layer {name!r}"):  # NaN, zero rows: name the layer
                mats[name] = prep.matrix(prep.rows(t if self.device is None else t.to(self.device)))
        return side_features(mats, label)

    @torch.no_grad()
    @no_autocast()
    def set_reference(self, layers: Mapping[str, Tensor]) -> PreparedSide:
        """Preprocess and prepare the frozen reference's layers once, for every measure."""
        names, feats = self.features(layers, "reference")
        self.check_samples(feats[0].shape[0], "the reference's probe activation")
        self.reference = prepare_side(names, feats, list(self.measures.values()), "y",
                                      null=self.null, label="reference")
        self._reference_null = self.null
        self._drawn(self.reference.n)
        return self.reference

    def _prepared_reference(self, measures: list[Measure]) -> PreparedSide:
        """The cached reference prepared for ``measures`` and the current ``null``: measures
        set after :meth:`set_reference` are prepared now from its kept features (all of them
        again when the null changed), and the states of measures no longer computed dropped."""
        ref = self.reference
        assert ref is not None
        stale = self._reference_null != self.null
        if stale or any(m not in ref.states and m not in ref.lazy for m in measures):
            self.check_samples(ref.n, "the reference's probe activation")
            ref = self.reference = prepare_side(ref.names, ref.features, measures, "y",
                                                side=None if stale else ref, null=self.null,
                                                label="reference")
            self._reference_null = self.null
        for m in set(ref.states) | ref.lazy:
            if m not in measures:
                ref.states.pop(m, None)
                ref.lazy.discard(m)
        for key in [key for key in ref.invariants if key[0] not in measures]:
            del ref.invariants[key]
        return ref

    def _drawn(self, n: int) -> Permutations:
        """The permutation set for ``n`` samples, drawn again only when ``n``,
        ``num_permutations``, ``seed`` or ``groups`` changed (set after construction too)."""
        p = self.permutations
        if (p is None or (p.n, p.num_permutations, p.seed) != (n, self.num_permutations, self.seed)
                or not p.same_groups(self.groups)):
            self.permutations = Permutations(n, self.num_permutations, self.seed, self.groups)
        return self.permutations

    def clear(self) -> None:
        """Drop the reference's prepared state (memory)."""
        self.reference = None

    def _aggregate(self, x_names: Sequence[str], y_names: Sequence[str]) -> Aggregate:
        if self.pairs is None:
            return self.aggregate
        return MappedAggregate(self.pairs, x_names, y_names, self.aggregate)

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    @no_autocast()
    def step(self, layers: Mapping[str, Tensor], epoch: int = 0, step: int = 0,
             share: tuple[int, int] | None = None, gather: Gather | None = None,
             seconds: float = 0.0) -> StepResult:
        """Calibrated alignment of the model's ``layers`` with the reference, every measure.

        ``share`` / ``gather``: compute only permutations ``range(*share)`` here and assemble
        the full null with ``gather`` (the null split over processes); ``seconds`` already
        spent (capturing) is added to the step's time.
        """
        if self.reference is None:
            raise RuntimeError("set_reference() must be called before step()")
        start = time.perf_counter()
        names, feats = self.features(layers, "model")
        if feats[0].device != self.reference.device:  # device=None: the reference's counts
            feats = [f.to(self.reference.device) for f in feats]
        if feats[0].shape[0] != self.reference.n:
            raise LayerShapeError(
                f"the model's probe activations have {feats[0].shape[0]} rows but the "
                f"reference's have {self.reference.n}: rows must be the same probe samples in "
                "the same order (outputs must be batch-first; a (T, n, d) output is not: hook a "
                "batch-first layer)")
        measures = list(self.measures.values())
        reference = self._prepared_reference(measures)
        dtype = torch.promote_types(feats[0].dtype, reference.dtype)
        if dtype != reference.dtype:  # a float64 model against a float32 reference: this step
            reference = prepare_side(reference.names, [f.to(dtype) for f in reference.features],
                                     measures, "y", null=self.null, label="reference",
                                     **room_for(len(feats), measures))
        # the reference's states are held already: the memory available no longer counts them
        xside = prepare_side(names, [f.to(dtype) for f in feats], measures, "x", null=self.null,
                             label="model")
        results = calibrate_prepared(measures, xside, reference, self._drawn(xside.n),
                                     self.alpha, self._aggregate(names, reference.names),
                                     self.max_score, share, gather, self.null,
                                     warn_few=self.null == "auto")
        by_label = {label: results[m] for label, m in self.measures.items()}
        return StepResult(epoch, step, by_label, xside.n,
                          seconds + time.perf_counter() - start)
