"""The typed result of one alignment step and its flat, loggable form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from alignment_callback.functional.aggregation import LayerAlignmentResult

#: The per-measure fields logged as scalars (``<prefix>/<measure>/<field>``).
LOGGED_FIELDS = ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std",
                 "effect_size")


def pair_keys(x_names: Sequence[str], y_names: Sequence[str]) -> dict[tuple[int, int], str]:
    """The key of every layer pair ``(model index, reference index)`` under ``pair/``.

    ``<model layer>__<reference layer>`` when these are all distinct; when two pairs would
    share one (names containing ``__``, e.g. ``a__b`` ~ ``c`` and ``a`` ~ ``b__c``), every
    pair is keyed by its indices, ``<model index>__<reference index>`` (as
    ``best_model_layer`` / ``best_reference_layer``), so that no score overwrites another.

    >>> pair_keys(["fc1", "fc2"], ["r"])
    {(0, 0): 'fc1__r', (1, 0): 'fc2__r'}
    >>> pair_keys(["a__b", "a"], ["c", "b__c"])[(0, 0)]
    '0__0'
    """
    named = {(a, b): f"{xa}__{yb}" for a, xa in enumerate(x_names)
             for b, yb in enumerate(y_names)}
    if len(set(named.values())) == len(named):
        return named
    return {(a, b): f"{a}__{b}" for a, b in named}


@dataclass(frozen=True)
class StepResult:
    """One alignment step: where it was taken and every measure's calibrated layer result.

    Attributes
    ----------
    epoch : int
        Training epoch of the step (0: before training).
    step : int
        Global optimizer step.
    results : dict[str, LayerAlignmentResult]
        ``{measure label: LayerAlignmentResult}``.
    n : int
        Number of probe samples.
    seconds : float
        Wall time of the step (capture and compute).
    """

    epoch: int
    step: int
    results: dict[str, LayerAlignmentResult]
    n: int
    seconds: float = 0.0

    def scalars(self, prefix: str = "alignment", pairs: bool = False) -> dict[str, float]:
        """Flat ``{key: float}`` for loggers: ``<prefix>/epoch``, ``<prefix>/step``, per measure
        :data:`LOGGED_FIELDS`, ``best_model_layer`` / ``best_reference_layer`` (indices),
        with ``pairs`` every pair's raw score ``pair/<model layer>__<reference layer>`` (see
        :func:`pair_keys`), and ``<prefix>/seconds``."""
        values: dict[str, float] = {f"{prefix}/epoch": float(self.epoch),
                                    f"{prefix}/step": float(self.step)}
        for name, r in self.results.items():
            for key in LOGGED_FIELDS:
                values[f"{prefix}/{name}/{key}"] = float(getattr(r, key))
            values[f"{prefix}/{name}/best_model_layer"] = float(r.argmax[0])
            values[f"{prefix}/{name}/best_reference_layer"] = float(r.argmax[1])
            if pairs:
                for (a, b), key in pair_keys(r.x_names, r.y_names).items():
                    values[f"{prefix}/{name}/pair/{key}"] = float(r.matrix[a, b])
        values[f"{prefix}/seconds"] = float(self.seconds)
        return values

    def history_entry(self, prefix: str = "alignment", pairs: bool = False) -> dict[str, Any]:
        """What the callback keeps per step: the scalars, ``epoch``, ``step``, each measure's
        best pair as ``"<model layer>|<reference layer>"`` and how its null was obtained
        (``null_method``: ``"permutation"``, ``"moments"``, ... — with ``null="auto"`` it may
        change from step to step)."""
        entry: dict[str, Any] = self.scalars(prefix, pairs)
        entry.update(epoch=self.epoch, step=self.step)
        for name, r in self.results.items():
            entry[f"{prefix}/{name}/best_pair"] = "|".join(r.best_pair)
            entry[f"{prefix}/{name}/null_method"] = r.null_method
        return entry
