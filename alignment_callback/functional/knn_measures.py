"""Neighborhood measures: mutual kNN, cycle kNN, CKNNA, LCS kNN, edit-distance kNN.

Every measure works on neighbor lists prepared once per representation
(:class:`~alignment_callback.functional.neighbors.NeighborLists`).  Under a permutation π of
Y's rows the neighbors of i in Y[π] are π⁻¹(N_Y(π(i))), so j is one of them exactly when π(j)
is a neighbor of π(i) in Y: each model edge (i, j) is mapped through π and found in the
reference's lists, O(n·k) per permutation instead of a new O(n²·d) similarity matrix.  All kNN
measures of one step share one list per layer, built for the largest k (a smaller k reads a
prefix), and :func:`knn_layer_scores` computes several measures in one pass: each model layer's
edges are mapped through π once per chunk of permutations, and each (model, reference) layer
pair is matched once.

Two backends give the same numbers: on the CPU (with numba) compiled kernels take each layer
pair one permutation at a time and split the permutations over a few Python threads (a thread
on a busy core just takes fewer of them); they need no table: each row marks the slots of its
reference list in a length-n array (of bytes while k < 128) and reads its k edges from it, so a
permutation touches the lists, the permutation (as 16-bit indices up to n = 65,536) and that
array.  Elsewhere batched tensor operations look the edges up in the reference's hash table,
the whole chunk at once with no host synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional import _compiled
from alignment_callback.functional._precision import no_autocast
from alignment_callback.functional._validation import check_k, check_pair, errors_named
from alignment_callback.functional.neighbors import (
    NeighborLists,
    lcs_from_matches,
    levenshtein_from_matches,
    neighbor_lists,
)

KNN_KINDS = ("mutual_knn", "cycle_knn", "cknna", "lcs_knn", "edit_distance_knn")


@dataclass(frozen=True)
class KnnState:
    """One representation prepared for a kNN measure with ``k`` neighbors.

    Attributes
    ----------
    lists : NeighborLists
        The neighbor lists shared by every kNN measure of the representation (their
        ``k`` is the largest any of them asked for).
    own : NeighborLists
        ``lists.prefix(k)``.
    self_hsic : Tensor | None
        CKNNA's permutation-invariant self term ``HSIC_u(M⊙K, M⊙K)`` (float64), or
        ``None`` for the other measures.
    """

    lists: NeighborLists
    own: NeighborLists
    self_hsic: Tensor | None = None

    @property
    def k(self) -> int:
        return self.own.k


def check_distinct_rows(x: Tensor, measure: str) -> None:
    """A representation whose rows are all identical has no neighborhood structure."""
    if x.shape[0] > 1 and bool((x == x[:1]).all()):
        raise ValueError(
            f"{measure}: every row of the representation is identical (a constant "
            "representation), so its neighborhoods carry no information"
        )


def _checked_k(n: int, k: int, measure: str) -> int:
    """``k`` checked against n samples (and cknna's n >= 4): the pair's, not a side's."""
    k = check_k(n, k, minimum=2 if measure == "cknna" else 1, measure=measure)
    if measure == "cknna" and n < 4:
        raise ValueError(f"cknna needs at least 4 samples (unbiased HSIC), got {n}")
    return k


def knn_state(x: Tensor, k: int, measure: str = "kNN measure", role: str = "x",
              lists: NeighborLists | None = None) -> KnnState:
    """Check ``k`` against n and prepare (or reuse the shared ``lists`` of) ``x``."""
    k = _checked_k(x.shape[0], k, measure)
    if lists is None:
        check_distinct_rows(x, measure)
        lists = neighbor_lists(x, k, role)
    own = lists.prefix(k)
    if measure != "cknna":
        return KnnState(lists, own)
    return KnnState(lists, own, _checked_self_hsic(own))


# ------------------------------------------------------------------------------- CKNNA math
def _masked_hsic(cols: Tensor, a: Tensor, b: Tensor, both: Tensor, n: int) -> Tensor:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of B pairs of sparse symmetric-pattern n×n
    matrices, in float64.

    Entry ``[p, i, t]`` sits at (i, ``cols[p, i, t]``) with value ``a`` in Ã and ``b`` in B̃
    (zero where absent); ``both``: the transposed entry is present too, so
    ``tr(ÃB̃) = Σ a·b·both`` for symmetric grams; ``1ᵀÃB̃1 = Σ_j colsum(Ã)_j rowsum(B̃)_j``.
    """
    batch = a.shape[0]
    trace = (a * b * both).sum((1, 2))
    colsum = torch.zeros(batch, n, dtype=a.dtype, device=a.device)
    colsum.scatter_add_(1, cols.reshape(batch, -1), a.reshape(batch, -1))
    cross = (colsum * b.sum(2)).sum(1)
    value = trace + a.sum((1, 2)) * b.sum((1, 2)) / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)
    return value / (n * (n - 3))


def _checked_self_hsic(own: NeighborLists) -> Tensor:
    v = own.values.double()[None]
    value = _masked_hsic(own.indices[None], v, v, own.reciprocal[None], own.n)[0]
    if not bool(value > 0):
        raise ValueError(
            "cknna is undefined: the unbiased HSIC of a representation's kNN-masked gram with "
            f"itself is {float(value):.3g} <= 0 (degenerate neighborhoods, e.g. constant data)"
        )
    return value


# ------------------------------------------------------------------- scores from one match
@dataclass
class _Match:
    """What one (model layer, reference layer) pair shares across measures in a chunk.

    Model edges ``(i, s)``: ``j = N_X(i)[s]``.  Under π the reference lists of ``y[π]`` are
    ``π⁻¹(N_Y(π(i)))``, so ``j ∈ N_{Y[π]}(i)`` at slot t exactly when ``π(j)`` sits at slot t of
    ``N_Y(π(i))``: ``forward[b, i, s] = t + 1`` (0: not a neighbor).  ``reverse[b, j, s]`` is
    the slot + 1 of ``π(j)`` in ``N_Y(π(i))`` for the model edge ``j → i = N_X(j)[s]`` (cycle kNN).
    """

    perms: Tensor  # (B, n)
    moved: Tensor  # (B, n, kmax): π(N_X(i)[s])
    x_lists: NeighborLists
    y_lists: NeighborLists
    _forward: Tensor | None = None
    _reverse: Tensor | None = None

    @property
    def forward(self) -> Tensor:
        if self._forward is None:
            self._forward = self.y_lists.table.lookup(self.perms.unsqueeze(-1), self.moved)
        return self._forward

    @property
    def reverse(self) -> Tensor:
        if self._reverse is None:
            self._reverse = self.y_lists.table.lookup(self.moved, self.perms.unsqueeze(-1))
        return self._reverse


def _found(slots: Tensor, kx: int, ky: int) -> Tensor:
    """(B, n, kx) bool: model edge s < kx is among the first ky reference neighbors."""
    head = slots[..., :kx]
    return (head > 0) & (head <= ky)


def _mutual(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    return _found(m.forward, k, sy.k).sum((1, 2)).to(sx.own.values.dtype) / (sx.own.n * k)


def _cycle_score(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    batch, n = m.perms.shape
    back = _found(m.reverse, k, sy.k).to(torch.uint8).reshape(batch, -1)
    target = sx.own.indices.reshape(1, -1).expand(batch, -1)
    hit = torch.zeros(batch, n, dtype=torch.uint8, device=back.device)
    hit.scatter_reduce_(1, target, back, reduce="amax")
    return hit.sum(1).to(sx.own.values.dtype) / n


def _cknna(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    xo, yo = sx.own, sy.own
    batch, n = m.perms.shape
    found = _found(m.forward, k, sy.k)
    slot = (m.forward[..., :k] - 1).clamp(0, sy.k - 1)  # Y's slot of each found entry
    flat = m.perms.unsqueeze(-1) * sy.k + slot  # row π(i), position t of Y's own lists
    lval = torch.take(yo.values.double(), flat)
    both = found & xo.reciprocal & torch.take(yo.reciprocal, flat)
    zero = torch.zeros((), dtype=torch.float64, device=found.device)
    a = torch.where(found, xo.values.double(), zero)
    b = torch.where(found, lval, zero)
    cross = _masked_hsic(xo.indices.expand(batch, n, k), a, b, both, n)
    return (cross / torch.sqrt(sx.self_hsic * sy.self_hsic)).to(xo.values.dtype)


def _matches(m: _Match, kx: int, ky: int) -> Tensor:
    """(B, n, kx, ky) bool: model list entry s equals reference list entry t (of ``y[π]``)."""
    slots = m.forward[..., :kx]
    return slots.unsqueeze(-1) == torch.arange(1, ky + 1, device=slots.device)


def _lcs(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    total = lcs_from_matches(_matches(m, k, sy.k)).sum(1)
    return total.to(sx.own.values.dtype) / (sx.own.n * k)


def _edit(m: _Match, sx: KnnState, sy: KnnState, k: int) -> Tensor:
    total = levenshtein_from_matches(_matches(m, k, sy.k)).sum(1)
    return 1.0 - total.to(sx.own.values.dtype) / (sx.own.n * k)


_SCORES = {"mutual_knn": _mutual, "cycle_knn": _cycle_score, "cknna": _cknna,
           "lcs_knn": _lcs, "edit_distance_knn": _edit}


def knn_layer_scores(requests: Sequence[tuple[str, Sequence[KnnState], Sequence[KnnState]]],
                     perms: Tensor, backend: str | None = None) -> list[Tensor]:
    """Several kNN measures over layer pairs in one pass: a (B, LA, LB) tensor per request.

    Each request is ``(kind, x_states, y_states)`` (``kind`` in :data:`KNN_KINDS`); all
    requests must share the same per-layer ``lists``.  Y layers are permuted by each row of
    ``perms``.  Per chunk, each model layer's edges are mapped through π once, and each layer
    pair is looked up once (twice with cycle kNN) for all measures.

    ``backend`` (default ``None``: :data:`default_backend`): ``"numba"`` runs each layer pair
    one permutation at a time in compiled kernels, on up to ``torch.get_num_threads()`` Python
    threads that split the permutations (CPU; counts equal the torch path exactly, CKNNA to
    float64 rounding); ``"torch"`` runs batched tensor operations (any device); ``"auto"``
    picks numba for CPU tensors when it is installed.
    """
    if _pick_backend(backend, perms.device) == "numba":
        return _numba_layer_scores(requests, perms)
    _, xs0, ys0 = requests[0]
    kmax = max(s.k for _, xs, _ in requests for s in xs)  # model edges used by any request
    batch, out = perms.shape[0], []
    for kind, xs, ys in requests:
        dtype = xs[0].own.values.dtype
        out.append(torch.empty(batch, len(xs), len(ys), dtype=dtype, device=perms.device))
    if batch == 0:  # no permutations (an empty share of a distributed null)
        return out
    for a, sx in enumerate(xs0):
        moved = perms[:, sx.lists.indices[:, :kmax]]  # π(N_X(i)[s]): (B, n, kmax)
        for b, sy in enumerate(ys0):
            m = _Match(perms, moved, sx.lists, sy.lists)
            for (kind, xs, ys), o in zip(requests, out):
                o[:, a, b] = _SCORES[kind](m, xs[a], ys[b], xs[a].k)
    return out


# ------------------------------------------------------------------ compiled CPU backend
default_backend: str = "auto"
"""Backend of :func:`knn_layer_scores` calls with ``backend=None``: ``"auto"``, ``"numba"`` or
``"torch"``."""

_TASK_SLOTS = 1 << 19  # model edges (n·k) per task, times its permutations: ~1-3 ms of work
_MIN_PARALLEL_SLOTS = 1 << 18  # below: one thread does everything


def _numba_kernels():
    """The kernel module, imported on first use; ``None`` without a working numba."""
    return _compiled.load(_KERNELS) if _compiled.available(_KERNELS) else None


_KERNELS = "_knn_null_numba"


def _pick_backend(backend: str | None, device: torch.device) -> str:
    backend = default_backend if backend is None else backend
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    usable = device.type == "cpu" and _numba_kernels() is not None
    if backend == "numba" and not usable:
        raise ValueError("the numba backend of the kNN null needs numba and CPU tensors")
    return "numba" if usable else "torch"


def knn_chunk_cost(n: int, batched_cost: int, device: torch.device) -> int:
    """Temporary elements per permutation of a chunk on ``device``: ``batched_cost`` (the
    measures' declared cost, for the batched torch path) unless the compiled kernels will run,
    which keep no per-permutation temporaries beyond the permutation itself."""
    return 2 * n if _pick_backend(None, torch.device(device)) == "numba" else batched_cost


def _numba_layer_scores(requests: Sequence[tuple[str, Sequence[KnnState], Sequence[KnnState]]],
                        perms: Tensor) -> list[Tensor]:
    """:func:`knn_layer_scores` on the CPU through ``_knn_null_numba``."""
    from alignment_callback.functional._tasks import run_tasks

    kernels = _numba_kernels()
    codes = {"mutual_knn": kernels.MUTUAL, "cycle_knn": kernels.CYCLE, "cknna": kernels.CKNNA,
             "lcs_knn": kernels.LCS, "edit_distance_knn": kernels.EDIT}
    _, xs0, ys0 = requests[0]
    kmax = max(s.k for _, xs, _ in requests for s in xs)
    # row indices in the narrowest type (uint16 up to n = 65,536): the permutation's random reads
    # stay in the L1 cache longer
    index_type = np.uint16 if perms.shape[1] <= 1 << 16 else np.int32
    pm = np.ascontiguousarray(perms.numpy(), dtype=index_type)
    batch, n = pm.shape
    # one kernel call for every request but the second and later CKNNA ones (a call takes the
    # own lists of one CKNNA request), one call for each of those
    cknnas = [r for r, (kind, _, _) in enumerate(requests) if kind == "cknna"]
    calls = [[r for r in range(len(requests)) if r not in cknnas[1:]]] + [[r] for r in cknnas[1:]]
    no_f, no_b = np.zeros((0, 0)), np.zeros((0, 0), dtype=np.bool_)
    group = max(1, min(_TASK_SLOTS // max(1, n * kmax), -(-batch // 4)))  # >= 4 tasks a pair
    spans = [(p0, min(batch, p0 + group)) for p0 in range(0, batch, group)]
    pairs = [(a, b) for a in range(len(xs0)) for b in range(len(ys0))]
    x_idx = [np.ascontiguousarray(s.lists.indices[:, :kmax].numpy(), dtype=index_type)
             for s in xs0]
    y_idx = [np.ascontiguousarray(s.lists.indices.numpy(), dtype=index_type) for s in ys0]
    cycle = any(kind == "cycle_knn" for kind, _, _ in requests)

    def reference(b: int) -> tuple:
        """The reference layer's lists and, for cycle kNN, its in-lists (see ``in_lists``)."""
        slot_type = kernels.slot_dtype(y_idx[b].shape[1])
        if cycle:
            return (y_idx[b], *kernels.in_lists(y_idx[b], slot_type))
        return y_idx[b], np.zeros(1, dtype=np.int64), np.empty(0, dtype=np.int32), np.empty(
            0, dtype=slot_type)

    references = [reference(b) for b in range(len(ys0))]

    def arguments(a: int, b: int, call: list[int]) -> tuple:
        """The kernel's arguments after the permutation range, for one pair and one call."""
        kinds = np.array([codes[requests[r][0]] for r in call], dtype=np.int64)
        ks = np.array([requests[r][1][a].k for r in call], dtype=np.int64)
        kys = np.array([requests[r][2][b].k for r in call], dtype=np.int64)
        r = next((r for r in call if requests[r][0] == "cknna"), None)
        own = (no_f, no_b, no_f, no_b) if r is None else (*own_lists(r, 1, a), *own_lists(r, 2, b))
        return (x_idx[a], kmax, *references[b], kinds, ks, kys, *own)

    converted: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def own_lists(r: int, side: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """CKNNA's values (as they are: the kernel widens them to float64 exactly) and the
        reciprocity of one layer's own lists."""
        if (r, side, layer) not in converted:
            own = requests[r][side][layer].own
            converted[(r, side, layer)] = (own.values.numpy(), own.reciprocal.numpy())
        return converted[(r, side, layer)]

    jobs = [(arguments(a, b, call), call, (a, b)) for a, b in pairs for call in calls]

    def task(t: int) -> np.ndarray:
        (args, call, _), (p0, p1) = jobs[t // len(spans)], spans[t % len(spans)]
        out = np.empty((p1 - p0, len(call)))
        kernels.scores_task(pm, p0, p1, *args, out)
        return out

    count = len(jobs) * len(spans)
    threads = 1 if batch * n * kmax * len(pairs) < _MIN_PARALLEL_SLOTS else torch.get_num_threads()
    results = run_tasks(task, count, threads)
    totals = [torch.empty(batch, len(xs0), len(ys0), dtype=torch.float64) for _ in requests]
    for t, res in enumerate(results):
        (_, call, (a, b)), (p0, p1) = jobs[t // len(spans)], spans[t % len(spans)]
        for j, r in enumerate(call):
            totals[r][p0:p1, a, b] = torch.from_numpy(res[:, j])
    return [_normalize(kind, tot, xs, ys) for (kind, xs, ys), tot in zip(requests, totals)]


def _normalize(kind: str, total: Tensor, xs: Sequence[KnnState], ys: Sequence[KnnState]
               ) -> Tensor:
    """The kernels' raw totals → scores, by the same expressions as the torch path."""
    out = torch.empty(total.shape, dtype=xs[0].own.values.dtype)
    for a, sx in enumerate(xs):
        for b, sy in enumerate(ys):
            t, n, k = total[:, a, b], sx.own.n, sx.k
            if kind == "cknna":
                out[:, a, b] = (t / torch.sqrt(sx.self_hsic * sy.self_hsic)).to(out.dtype)
            elif kind == "cycle_knn":
                out[:, a, b] = t.to(out.dtype) / n
            elif kind == "edit_distance_knn":
                out[:, a, b] = 1.0 - t.to(out.dtype) / (n * k)
            else:  # mutual_knn, lcs_knn
                out[:, a, b] = t.to(out.dtype) / (n * k)
    return out


def knn_score(kind: str, sx: KnnState, sy: KnnState, perms: Tensor) -> Tensor:
    """One measure on one pair for each permutation: (B,)."""
    return knn_layer_scores([(kind, [sx], [sy])], perms)[0][:, 0, 0]


# ------------------------------------------------------------------------- public measures
def _pair(kind: str, x: Tensor, y: Tensor, k: int) -> Tensor:
    x, y = check_pair(x, y)
    k = _checked_k(x.shape[0], k, kind)
    with errors_named("x"):  # the role (tie-breaking) differs, so not per_side
        sx = knn_state(x, k, kind, "x")
    with errors_named("y"):
        sy = knn_state(y, k, kind, "y")
    return knn_score(kind, sx, sy, torch.arange(x.shape[0], device=x.device)[None])[0]


@no_autocast()
def mutual_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Mutual kNN: the mean fraction of shared nearest neighbors (PRH).

    ``mean_i |N_X(i) ∩ N_Y(i)| / k`` with ``N_X(i)`` the k rows with the largest inner
    product ``⟨x_i, x_j⟩``, j ≠ i.  In [0, 1]; symmetric; about ``k/(n − 1)`` for independent
    data.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    k : int, default=10
        Neighbors per sample (self excluded), by inner product: cosine on L2-normalized
        rows.  Needs n > k.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Huh, Cheung, Wang, Isola. The Platonic Representation Hypothesis. ICML 2024
    (code: github.com/minyoungg/platonic-rep, ``metrics.py``).

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import mutual_knn
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(40, 6)
    >>> round(float(mutual_knn(x, 2.0 * x, k=5)), 4)
    1.0
    >>> float(mutual_knn(x, torch.randn(40, 6), k=5)) < 0.5
    True
    """
    return _pair("mutual_knn", x, y, k)


@no_autocast()
def cycle_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Cycle kNN: the fraction of samples i that are an X-neighbor of one of their Y-neighbors
    (PRH).

    ``mean_i 1[∃ j ∈ N_Y(i): i ∈ N_X(j)]`` (neighbors as in :func:`mutual_knn`).  In [0, 1];
    not symmetric; below 1 even for y = x, since kNN graphs are not symmetric.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    k : int, default=10
        Neighbors per sample (self excluded), by inner product: cosine on L2-normalized
        rows.  Needs n > k.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Huh, Cheung, Wang, Isola. The Platonic Representation Hypothesis. ICML 2024
    (code: github.com/minyoungg/platonic-rep, ``metrics.py``).

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import cycle_knn
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(40, 6)
    >>> round(float(cycle_knn(x, 2.0 * x, k=5)), 4)  # j ∈ N(i) does not imply i ∈ N(j)
    0.775
    >>> 0.0 <= float(cycle_knn(x, torch.randn(40, 6), k=5)) <= 1.0
    True
    """
    return _pair("cycle_knn", x, y, k)


@no_autocast()
def cknna(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """CKNNA (PRH): unbiased CKA restricted to mutual k-nearest-neighbor pairs.

    ``HSIC_u(M⊙K, M⊙L) / sqrt(HSIC_u(M_K⊙K, M_K⊙K)·HSIC_u(M_L⊙L, M_L⊙L))`` with the linear
    grams ``K = XXᵀ``, ``L = YYᵀ``, ``M_K`` the kNN mask of K (``(M_K)_ij = 1`` when j is
    one of i's k neighbors), ``M = M_K⊙M_L`` and ``HSIC_u`` the unbiased estimator
    (:func:`~alignment_callback.functional.hsic_unbiased`).  1 for ``y = x`` without exact
    ties (tied rows are broken by keys drawn per side, so a tied ``x`` scores below 1 against
    itself).  No epsilon in the denominator: degenerate neighborhoods raise ``ValueError``.

    Not bounded by ±1 in general (the numerator's mask ``M`` is not the denominators'
    ``M_K``, ``M_L``): values above 1 occur on raw features far from the origin (a shared
    offset), and at very small n on any rows (2.26 at n = 5, k = 3).  Calibration clamps the
    score and every null value to [−1, 1], a monotone map of both (the p-value stays valid,
    conservative at the clamp), and calibrates against ``s_max = 1``, the score of ``y = x``;
    this function returns the value unclamped.  Not symmetric: ``HSIC_u``'s cross term
    ``1ᵀ(M⊙K)(M⊙L)1`` changes when x and y swap, as the masked grams are not symmetric.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    k : int, default=10
        Neighbors per sample (self excluded), by inner product: cosine on L2-normalized
        rows.  Needs k >= 2, n >= 4 and n > k.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Huh, Cheung, Wang, Isola. The Platonic Representation Hypothesis. ICML 2024
    (code: github.com/minyoungg/platonic-rep, ``metrics.py``).

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import cknna
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(40, 6)
    >>> round(float(cknna(x, 2.0 * x, k=5)), 4)
    1.0
    >>> -1.0 <= float(cknna(x, torch.randn(40, 6), k=5)) <= 1.0
    True
    """
    return _pair("cknna", x, y, k)


@no_autocast()
def lcs_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """LCS kNN: the mean longest common subsequence of the ordered neighbor lists, over k.

    ``mean_i LCS(N_X(i), N_Y(i)) / k`` with the lists ordered most similar first (neighbors
    as in :func:`mutual_knn`; PRH returns the unnormalized length).  In [0, 1]; symmetric.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    k : int, default=10
        Neighbors per sample (self excluded), by inner product: cosine on L2-normalized
        rows.  Needs n > k.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Huh, Cheung, Wang, Isola. The Platonic Representation Hypothesis. ICML 2024
    (code: github.com/minyoungg/platonic-rep, ``metrics.py``).

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import lcs_knn
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(40, 6)
    >>> round(float(lcs_knn(x, 2.0 * x, k=5)), 4)
    1.0
    >>> 0.0 <= float(lcs_knn(x, torch.randn(40, 6), k=5)) <= 1.0
    True
    """
    return _pair("lcs_knn", x, y, k)


@no_autocast()
def edit_distance_knn(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Edit-distance kNN: one minus the mean Levenshtein distance of the ordered neighbor
    lists, over k.

    ``1 − mean_i Levenshtein(N_X(i), N_Y(i)) / k`` with the lists ordered most similar first
    (neighbors as in :func:`mutual_knn`).  In [0, 1]; symmetric.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
        First representation, one row per sample.
    y : Tensor of shape (n, d_y)
        Second representation: the same samples, in the same order.
    k : int, default=10
        Neighbors per sample (self excluded), by inner product: cosine on L2-normalized
        rows.  Needs n > k.

    Returns
    -------
    Tensor
        0-dim; float32, or float64 when an input is float64 (or holds integers above 2**24).

    References
    ----------
    Huh, Cheung, Wang, Isola. The Platonic Representation Hypothesis. ICML 2024
    (code: github.com/minyoungg/platonic-rep, ``metrics.py``).

    Examples
    --------
    >>> import torch
    >>> from alignment_callback.functional import edit_distance_knn
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(40, 6)
    >>> round(float(edit_distance_knn(x, 2.0 * x, k=5)), 4)
    1.0
    >>> 0.0 <= float(edit_distance_knn(x, torch.randn(40, 6), k=5)) <= 1.0
    True
    """
    return _pair("edit_distance_knn", x, y, k)
