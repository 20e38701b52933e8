"""Seeded permutations and permutation nulls (METHOD.md section 4).

Permutations come from a dedicated ``torch.Generator`` seeded with ``seed`` (never the global
RNG), always drawn on the CPU so the same seed gives the same permutations on every device.
They are produced in chunks, so a null never holds more than one chunk of permutations or of
per-permutation temporaries (never K×n×n).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional.registry import MetricSpec, get_measure, prepare_pair

_CHUNK_ELEMENTS = 1 << 24  # temporary elements per chunk of permutations (~64 MB in float32)
_MAX_CHUNK = 256


class GroupPermuter:
    """Block permutations: rows sharing a group label move together (METHOD.md section 4).

    Groups of equal size are shuffled among themselves; row ``o`` of a group goes to row ``o``
    of its new group (rows within a group keep index order).  Groups of a size no other group
    has stay in place.  With all groups of size 1 this is an ordinary permutation.
    """

    def __init__(self, groups: Sequence[Any] | Tensor | np.ndarray, n: int) -> None:
        labels = np.asarray(groups.cpu() if isinstance(groups, Tensor) else groups)
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(f"groups must have one label per sample: expected {n}, got shape {labels.shape}")
        _, inverse = np.unique(labels, return_inverse=True)
        members: dict[int, list[int]] = {}
        for row, g in enumerate(inverse.tolist()):
            members.setdefault(g, []).append(row)
        by_size: dict[int, list[list[int]]] = {}
        for rows in members.values():
            by_size.setdefault(len(rows), []).append(rows)
        self.blocks = [torch.tensor(v, dtype=torch.long) for _, v in sorted(by_size.items()) if len(v) > 1]
        if not self.blocks:
            raise ValueError(
                "groups allow no permutation: no two groups have the same size, so no block "
                "can be exchanged"
            )
        self.n = n

    def __call__(self, generator: torch.Generator) -> Tensor:
        perm = torch.arange(self.n)
        for block in self.blocks:  # block: (m, size) row indices of m same-size groups
            order = torch.randperm(block.shape[0], generator=generator)
            perm[block.reshape(-1)] = block[order].reshape(-1)
        return perm


def iter_permutations(
    n: int,
    num_permutations: int,
    seed: int = 0,
    chunk_size: int = _MAX_CHUNK,
    groups: Sequence[Any] | Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield the permutations of :func:`permutations` as (B, n) chunks, B <= ``chunk_size``."""
    if isinstance(num_permutations, bool) or int(num_permutations) != num_permutations or num_permutations < 1:
        raise ValueError(f"num_permutations must be a positive integer, got {num_permutations!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    draw = GroupPermuter(groups, n) if groups is not None else (lambda g: torch.randperm(n, generator=g))
    remaining = int(num_permutations)
    while remaining > 0:
        b = min(max(1, chunk_size), remaining)
        yield torch.stack([draw(gen) for _ in range(b)])
        remaining -= b


def permutations(
    n: int, num_permutations: int, seed: int = 0, groups: Sequence[Any] | Tensor | None = None
) -> Tensor:
    """The exact permutations (K, n) the nulls use for ``seed`` (and ``groups``).

    Row k is π_k; the k-th null value is ``metric(x, y[π_k])``.  Drawn with a dedicated CPU
    generator; the global RNG is untouched.
    """
    return torch.cat(list(iter_permutations(n, num_permutations, seed, groups=groups)))


def chunk_size_for(cost_per_perm: int) -> int:
    """Permutations per chunk so that temporaries stay near ``_CHUNK_ELEMENTS``."""
    return max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // max(1, cost_per_perm)))


def null_from_states(
    measure, sx: Any, sy: Any, n: int, num_permutations: int, seed: int, device: torch.device,
    groups: Sequence[Any] | Tensor | None = None,
) -> Tensor:
    """Null scores (K,) for prepared states: ``score(sx, sy, π_k)`` for every permutation."""
    chunk = chunk_size_for(measure.perm_cost(n))
    parts = [
        measure.score(sx, sy, perms.to(device))
        for perms in iter_permutations(n, num_permutations, seed, chunk, groups)
    ]
    return torch.cat(parts)


@torch.no_grad()
def permutation_null(
    x: Tensor,
    y: Tensor,
    metric: MetricSpec = "mutual_knn",
    num_permutations: int = 500,
    seed: int = 0,
    groups: Sequence[Any] | Tensor | None = None,
    **metric_kwargs: Any,
) -> Tensor:
    """Permutation null of ``metric``: a (K,) tensor whose k-th value is
    ``metric(x, y[permutations(n, K, seed)[k]])``.

    Built-in measures use the fast path (grams / neighbor lists computed once, then gathered
    or remapped per permutation); a plain callable is recomputed on every permuted Y.
    """
    measure = get_measure(metric, **metric_kwargs)
    sx, sy = prepare_pair(measure, x, y)
    return null_from_states(measure, sx, sy, x.shape[0], num_permutations, seed, x.device, groups)
