"""Seeded permutations and permutation nulls (docs/calibration.md).

Permutations come from a dedicated ``torch.Generator`` seeded with ``seed`` (never the global
RNG), always drawn on the CPU so the same seed gives the same permutations on every device.
They are produced in chunks, so a null never holds more than one chunk of permutations or of
per-permutation temporaries (never K×n×n).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional._validation import (
    check_num_permutations,
    check_positive_int,
    check_seed,
    user_stacklevel,
)

_CHUNK_ELEMENTS = 1 << 24  # temporary elements per chunk of permutations (~64 MB in float32)
_CUDA_CHUNK_ELEMENTS = 1 << 26  # the same on a CUDA device (256 MB in float32)
_MAX_CHUNK = 256
_CACHE_ELEMENTS = 1 << 24  # permutation sets up to this many entries stay in memory (128 MB)


def check_groups(groups: Any) -> Any:
    """``groups`` itself (None, or labels :func:`group_labels` accepts: a setting's check)."""
    if groups is not None:
        group_labels(groups)
    return groups


def group_labels(groups: Sequence[Any] | Tensor | np.ndarray) -> np.ndarray:
    """``groups`` as a 1-D array of labels; anything else (a string, a scalar, a matrix) is
    refused, naming ``groups``."""
    labels = np.asarray(groups.cpu() if isinstance(groups, Tensor) else groups)
    if labels.ndim != 1:
        raise ValueError(f"groups must be a sequence of labels, one per sample; got "
                         f"{type(groups).__name__} of shape {labels.shape}")
    if labels.dtype.kind in "USO":  # NumPy would make 1 and "1" one string label
        text = {isinstance(v, (str, bytes, np.str_, np.bytes_)) for v in
                (groups.tolist() if isinstance(groups, np.ndarray) else groups)}
        if len(text) > 1:
            kinds = sorted({type(v).__name__ for v in groups})
            raise ValueError(f"groups labels must be of one comparable kind (all numbers or "
                             f"all strings), got a mix of {', '.join(kinds)}")
    return labels


class GroupPermuter:
    """Block permutations: rows sharing a group label move together (docs/calibration.md).

    Groups of equal size are shuffled among themselves; row ``o`` of a group goes to row ``o``
    of its new group (rows within a group keep index order).  Groups of a size no other group
    has stay in place.  With all groups of size 1 this is an ordinary permutation.
    """

    def __init__(self, groups: Sequence[Any] | Tensor | np.ndarray, n: int) -> None:
        labels = group_labels(groups)
        if labels.shape[0] != n:
            raise ValueError(f"groups must have one label per sample: expected {n}, got shape {labels.shape}")
        try:
            _, inverse = np.unique(labels, return_inverse=True)
        except TypeError as err:  # labels that cannot be ordered: None among strings, ...
            kinds = sorted({type(v).__name__ for v in labels.tolist()})
            raise ValueError(f"groups labels must be of one comparable kind (all numbers or all "
                             f"strings), got a mix of {', '.join(kinds)}") from err
        members: dict[int, list[int]] = {}
        for row, g in enumerate(inverse.tolist()):
            members.setdefault(g, []).append(row)
        by_size: dict[int, list[list[int]]] = {}
        for rows in members.values():
            by_size.setdefault(len(rows), []).append(rows)
        self.blocks = [torch.tensor(v, dtype=torch.long) for _, v in sorted(by_size.items()) if len(v) > 1]
        if not self.blocks:
            why = ("every sample is in one group" if len(members) == 1 else
                   "no two groups have the same size, so no block can be exchanged")
            raise ValueError(f"groups allow no permutation: {why}")
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
    n = check_positive_int(n, "n")
    num_permutations = check_num_permutations(num_permutations)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(check_seed(seed))
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

    Row k is π_k; the k-th null value is ``measure(x, y[π_k])``.  Drawn with a dedicated CPU
    generator (``torch.Generator().manual_seed(seed)``, then ``torch.randperm`` per row); the
    global RNG is untouched.

    Parameters
    ----------
    n : int
        Number of samples (the length of each permutation).
    num_permutations : int
        K, a positive integer.
    seed : int, default=0
        Seed of the dedicated generator, in ``[0, 2**63 - 1]``.
    groups : sequence of labels, Tensor or None, default=None
        One label per sample: rows sharing a label move together, as whole groups exchanged
        with groups of the same size (see :class:`GroupPermuter`); ``None`` for ordinary
        permutations.

    Returns
    -------
    Tensor of shape (K, n)
        int64 row indices, on the CPU.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import permutations
    >>> p = permutations(5, 3, seed=0)
    >>> p.shape, bool((p.sort(1).values == torch.arange(5)).all())
    (torch.Size([3, 5]), True)
    >>> torch.equal(p, permutations(5, 3, seed=0))  # the same seed, the same permutations
    True
    >>> g = permutations(4, 2, seed=1, groups=["a", "a", "b", "b"])  # blocks of two move together
    >>> all(row.tolist() in ([0, 1, 2, 3], [2, 3, 0, 1]) for row in g)
    True
    """
    return torch.cat(list(iter_permutations(n, num_permutations, seed, groups=groups)))


def inverse_permutations(perms: Tensor) -> Tensor:
    """Inverse permutations of the rows of ``perms`` (B, n)."""
    inv = torch.empty_like(perms)
    ar = torch.arange(perms.shape[1], device=perms.device).expand_as(perms)
    return inv.scatter_(1, perms, ar)


def chunk_size_for(cost_per_perm: int, device: torch.device | str | None = None) -> int:
    """Permutations per chunk so that temporaries stay near ``_CHUNK_ELEMENTS`` (on the CPU a
    chunk's temporaries should stay in cache), or on a CUDA device near ``_CUDA_CHUNK_ELEMENTS``
    but at most a 64th of its free memory in elements (there a chunk's cost is mostly its
    kernel launches, so fewer, larger chunks are faster)."""
    budget = _CHUNK_ELEMENTS
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = max(_CHUNK_ELEMENTS, min(_CUDA_CHUNK_ELEMENTS, free // 64))
    return max(1, min(_MAX_CHUNK, budget // max(1, cost_per_perm)))


def _cache_key(device: torch.device | str | None) -> torch.device:
    """``device`` with its index made explicit ("cuda" → "cuda:0" where 0 is current, "cpu:0"
    → "cpu"), so that one device is cached once whichever way it is spelled."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":
        return torch.device("cpu")
    return device if device.index is not None else torch.empty(0, device=device).device


class Permutations:
    """One permutation set ``(n, K, seed, groups)``, drawn once and reused by every measure
    (and, in the engine, every step).

    ``chunks`` yields the same permutations whatever the chunk size, in order, optionally only
    those with index in ``[start, stop)`` (a share of the null for one process).  Sets of up to
    ``cache_elements`` entries are kept in memory per device; larger ones are drawn again.

    Parameters
    ----------
    n : int
        Number of samples.
    num_permutations : int
        K, checked to be a positive integer.
    seed : int, default=0
        Seed of the dedicated generator (the global RNG is never used).
    groups : sequence of labels, Tensor or None, default=None
        Block permutations of groups (see :class:`GroupPermuter`); ``None`` for ordinary
        permutations.
    cache_elements : int, default=16777216
        Sets of at most this many entries (``n·K``; 2**24 by default) are kept in memory per
        device; larger ones are drawn again for each pass.

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import Permutations, permutations
    >>> perms = Permutations(6, 5, seed=0)
    >>> len(perms), perms.count(start=1, stop=3)
    (5, 2)
    >>> [tuple(c.shape) for c in perms.chunks(2)]
    [(2, 6), (2, 6), (1, 6)]
    >>> torch.equal(perms.tensor(), permutations(6, 5, seed=0))
    True
    """

    def __init__(self, n: int, num_permutations: int, seed: int = 0,
                 groups: Sequence[Any] | Tensor | None = None,
                 cache_elements: int = _CACHE_ELEMENTS) -> None:
        self.n = check_positive_int(n, "n")
        self.num_permutations = check_num_permutations(num_permutations)
        self.seed = check_seed(seed)
        # a copy: labels changed in place later would no longer be the ones drawn with
        self.groups = None if groups is None else group_labels(groups).copy()
        if self.groups is not None:
            GroupPermuter(self.groups, self.n)  # validate now
        self.cache_elements = cache_elements
        self._cache: dict[torch.device, Tensor] = {}

    def __len__(self) -> int:
        return self.num_permutations

    def _all(self, device: torch.device) -> Tensor | None:
        if self.n * self.num_permutations > self.cache_elements:
            return None
        if device not in self._cache:
            cpu = self._cache.get(torch.device("cpu"))
            if cpu is None:
                cpu = torch.cat(list(iter_permutations(self.n, self.num_permutations, self.seed,
                                                       groups=self.groups)))
                self._cache[torch.device("cpu")] = cpu
            self._cache[device] = cpu.to(device)
        return self._cache[device]

    def count(self, start: int = 0, stop: int | None = None) -> int:
        """Number of permutations with index in ``[start, stop)``."""
        stop = self.num_permutations if stop is None else min(stop, self.num_permutations)
        return max(0, stop - start)

    def chunks(self, chunk_size: int, device: torch.device | str | None = None, start: int = 0,
               stop: int | None = None) -> Iterator[Tensor]:
        """(B, n) chunks of permutations ``start .. stop - 1`` on ``device``."""
        device = _cache_key(device)
        stop = self.num_permutations if stop is None else min(stop, self.num_permutations)
        size = max(1, int(chunk_size))
        full = self._all(device)
        if full is not None:
            for a in range(start, stop, size):
                yield full[a:min(stop, a + size)]
            return
        done = 0
        for part in iter_permutations(self.n, self.num_permutations, self.seed, size, self.groups):
            lo, hi = max(start - done, 0), min(stop - done, part.shape[0])
            if lo < hi:
                yield part[lo:hi].to(device)
            done += part.shape[0]
            if done >= stop:
                return

    def identity_probability(self) -> float:
        """The chance that one draw is the identity: 1/n!, or with ``groups`` 1/Π m_s! (m_s
        groups of size s are exchanged among themselves; 1/6 for three groups of eight)."""
        if self.groups is None:
            return math.exp(-math.lgamma(self.n + 1))
        _, sizes = np.unique(self.groups, return_counts=True)
        _, groups_per_size = np.unique(sizes, return_counts=True)
        return math.exp(-sum(math.lgamma(int(m) + 1) for m in groups_per_size))

    def same_groups(self, groups: Sequence[Any] | Tensor | None) -> bool:
        """Whether ``groups`` holds the labels this set was drawn with (values, not identity)."""
        if groups is None or self.groups is None:
            return groups is None and self.groups is None
        labels = group_labels(groups)
        return labels.shape == self.groups.shape and bool((labels == self.groups).all())

    def warn_if_few_blocks(self, alpha: float) -> None:
        """Warn when ``groups`` allow fewer than 1/``alpha`` distinct block permutations: the
        identity, which scores the observed value, is then more than ``alpha`` of the draws, so
        p stays above ``alpha`` and every calibrated score is 0 whatever the data."""
        if self.groups is None:
            return
        chance = self.identity_probability()
        if chance > alpha:
            count = round(1.0 / chance)
            warnings.warn(
                f"groups allow only {count} distinct block permutations (groups of equal size "
                f"exchanged): one draw in {count} is the identity, which scores the observed "
                f"value, so p is at least about 1/{count} = {chance:.3g} > alpha={alpha:g} and "
                "every calibrated score is 0 whatever the data; use more groups of equal size",
                UserWarning, stacklevel=user_stacklevel())

    def tensor(self, device: torch.device | str | None = None) -> Tensor:
        """All permutations as one (K, n) tensor."""
        return torch.cat(list(self.chunks(_MAX_CHUNK, device)))
