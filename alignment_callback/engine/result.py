"""The typed result of one alignment step and its flat, loggable form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignment_callback.functional.aggregation import LayerAlignmentResult

#: The per-measure fields logged as scalars (``<prefix>/<measure>/<field>``).
LOGGED_FIELDS = ("raw", "calibrated", "p_value", "threshold", "null_mean", "null_std",
                 "effect_size")


@dataclass(frozen=True)
class StepResult:
    """One alignment step: where it was taken and every measure's calibrated layer result.

    Attributes:
        epoch: training epoch of the step (0: before training).
        step: global optimizer step.
        results: ``{measure label: LayerAlignmentResult}``.
        n: number of probe samples.
        seconds: wall time of the step (capture and compute).
    """

    epoch: int
    step: int
    results: dict[str, LayerAlignmentResult]
    n: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def scalars(self, prefix: str = "alignment", pairs: bool = False) -> dict[str, float]:
        """Flat ``{key: float}`` for loggers: ``<prefix>/epoch``, ``<prefix>/step``, per measure
        :data:`LOGGED_FIELDS`, ``best_model_layer`` / ``best_reference_layer`` (indices),
        with ``pairs`` every pair's raw score ``pair/<model layer>__<reference layer>``, and
        ``<prefix>/seconds``."""
        values: dict[str, float] = {f"{prefix}/epoch": float(self.epoch),
                                    f"{prefix}/step": float(self.step)}
        for name, r in self.results.items():
            for key in LOGGED_FIELDS:
                values[f"{prefix}/{name}/{key}"] = float(getattr(r, key))
            values[f"{prefix}/{name}/best_model_layer"] = float(r.argmax[0])
            values[f"{prefix}/{name}/best_reference_layer"] = float(r.argmax[1])
            if pairs:
                for a, xa in enumerate(r.x_names):
                    for b, yb in enumerate(r.y_names):
                        values[f"{prefix}/{name}/pair/{xa}__{yb}"] = float(r.matrix[a, b])
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
