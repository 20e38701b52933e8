"""The measure registry: every measure as ``prepare`` (once per representation) + ``score``
(for a batch of permutations of Y's rows).

``prepare`` is what the fast nulls and the cached-reference mode reuse: a frozen reference's
prepared state is computed once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor

from alignment_callback.functional import gram_measures as gm
from alignment_callback.functional import knn_measures as km
from alignment_callback.functional import svcca as sv
from alignment_callback.functional._validation import check_matrix, check_pair

MetricFn = Callable[[Tensor, Tensor], Any]


@dataclass(frozen=True)
class Measure:
    """A similarity measure with a fast permutation path.

    Attributes:
        name: display name.
        prepare: ``x (n, d) -> state``; computed once per representation.
        score: ``(state_x, state_y, perms (B, n)) -> (B,)`` scores of ``(x, y[π])``.
        max_score: the measure's maximum (s_max), ``None`` if unbounded.
        perm_cost: ``n -> elements`` of temporary memory per permutation (sets chunk sizes).
        score_layers: optional ``(states_x, states_y, perms) -> (B, LA, LB)`` fast layer path.
        kwargs: the keyword arguments the measure was built with.
    """

    name: str
    prepare: Callable[[Tensor], Any]
    score: Callable[[Any, Any, Tensor], Tensor]
    max_score: float | None = 1.0
    perm_cost: Callable[[int], int] = lambda n: n * n
    score_layers: Callable[[list, list, Tensor], Tensor] | None = None
    kwargs: dict = field(default_factory=dict)
    min_samples: int = 2

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """The measure's value on ``(x, y)`` (no permutation)."""
        sx, sy = self.prepare(x), self.prepare(y)
        return self.score(sx, sy, torch.arange(x.shape[0], device=x.device)[None])[0]


def _gram(name: str, prep: Callable[[Tensor], Any], min_samples: int = 2, **kw):
    # gram scores loop over the permutations of a chunk, one n×n gather alive at a time, so a
    # chunk's temporaries are only its permutations (n each): large chunks, and the layer path
    # stacks the fixed side's matrices once per chunk
    return Measure(
        name, prep, gm.gram_score, perm_cost=lambda n: n, score_layers=gm.gram_layer_scores,
        kwargs=kw, min_samples=min_samples,
    )


def _knn(name: str, score, k: int, cost: int = 1, prep: Callable[[Tensor], Any] | None = None
         ) -> Measure:
    prep = prep or (lambda x: km.knn_state(x, k, name))
    return Measure(name, prep, score, perm_cost=lambda n: n * k * cost,
                   score_layers=km.knn_layer_scores(score), kwargs={"k": k})


def _linear_cka() -> Measure:
    return _gram("linear_cka", gm.linear_state)


def _rbf_cka(sigma: float | str = 1.0) -> Measure:
    return _gram("rbf_cka", lambda x: gm.rbf_state(x, sigma), sigma=sigma)


def _unbiased_cka() -> Measure:
    return _gram("unbiased_cka", gm.unbiased_state, min_samples=4)


def _rsa() -> Measure:
    return _gram("rsa", gm.rsa_state, min_samples=3)


def _mutual_knn(k: int = 10) -> Measure:
    return _knn("mutual_knn", km.mutual_knn_score, k)


def _cycle_knn(k: int = 10) -> Measure:
    return _knn("cycle_knn", km.cycle_knn_score, k)


def _cknna(k: int = 10) -> Measure:
    return _knn("cknna", km.cknna_score, k, cost=4, prep=lambda x: km.cknna_state(x, k))


def _lcs_knn(k: int = 10) -> Measure:
    return _knn("lcs_knn", km.lcs_knn_score, k, cost=2 * k)


def _edit_distance_knn(k: int = 10) -> Measure:
    return _knn("edit_distance_knn", km.edit_distance_knn_score, k, cost=2 * k)


def _svcca(cca_dim: int = 10) -> Measure:
    return Measure("svcca", lambda x: sv.svcca_state(x, cca_dim), sv.svcca_score,
                   perm_cost=lambda n: n * cca_dim, kwargs={"cca_dim": cca_dim})


BUILTIN_MEASURES: dict[str, Callable[..., Measure]] = {
    "linear_cka": _linear_cka,
    "rbf_cka": _rbf_cka,
    "unbiased_cka": _unbiased_cka,
    "mutual_knn": _mutual_knn,
    "cycle_knn": _cycle_knn,
    "cknna": _cknna,
    "svcca": _svcca,
    "lcs_knn": _lcs_knn,
    "edit_distance_knn": _edit_distance_knn,
    "rsa": _rsa,
}


def _recompute(fn: MetricFn) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def score(x: Tensor, y: Tensor, perms: Tensor) -> Tensor:
        vals = [torch.as_tensor(fn(x, y[p]), dtype=x.dtype, device=x.device).reshape(()) for p in perms]
        return torch.stack(vals)

    return score


MetricSpec = Union[str, Measure, MetricFn]


def get_measure(metric: MetricSpec, **kwargs: Any) -> Measure:
    """Resolve ``metric`` (a built-in name, a :class:`Measure`, or a callable ``f(x, y)``).

    Keyword arguments go to the built-in (``k``, ``sigma``, ``cca_dim``) or are bound to the
    callable.  A callable without a fast path is recomputed on every permuted Y (exact, slow).
    """
    if isinstance(metric, Measure):
        if kwargs:
            raise TypeError(f"a Measure object takes no extra keyword arguments, got {sorted(kwargs)}")
        return metric
    if isinstance(metric, str):
        if metric not in BUILTIN_MEASURES:
            raise ValueError(f"unknown metric {metric!r}; built-ins: {sorted(BUILTIN_MEASURES)}")
        factory = BUILTIN_MEASURES[metric]
        allowed = set(inspect.signature(factory).parameters)
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(
                f"{metric} got unexpected keyword argument(s) {sorted(unknown)}; it accepts "
                f"{sorted(allowed) or 'none'}"
            )
        return factory(**kwargs)
    if callable(metric):
        fn = (lambda x, y: metric(x, y, **kwargs)) if kwargs else metric
        name = getattr(metric, "__name__", type(metric).__name__)
        return Measure(name, lambda x: x, _recompute(fn), perm_cost=lambda n: n, kwargs=dict(kwargs))
    raise TypeError(f"metric must be a name, a Measure or a callable, got {type(metric).__name__}")


def _check_samples(measure: Measure, n: int) -> None:
    if n < measure.min_samples:
        raise ValueError(f"{measure.name} needs at least {measure.min_samples} samples, got {n}")


def prepare_pair(measure: Measure, x: Tensor, y: Tensor) -> tuple[Any, Any]:
    """Validate a paired input and prepare both sides."""
    x, y = check_pair(x, y)
    _check_samples(measure, x.shape[0])
    return measure.prepare(x), measure.prepare(y)


def prepare_one(measure: Measure, x: Tensor, name: str = "x") -> Any:
    """Validate one representation and prepare it (used to cache a frozen reference)."""
    x = check_matrix(x, name)
    _check_samples(measure, x.shape[0])
    return measure.prepare(x)
