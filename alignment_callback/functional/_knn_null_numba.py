"""Numba kernels of the kNN-family permutation nulls (CPU only).

Imported lazily by :mod:`alignment_callback.functional.knn_measures` and only when numba is
installed; nothing else imports it.  One call handles one (model layer, reference layer) pair
and a range of permutations, one permutation at a time, so that everything a permutation
touches stays in cache:

* ``slots``: for every model edge ``(i, s)``, ``j = N_X(i)[s]``, the slot + 1 of ``π(j)`` in
  the reference's list ``N_Y(π(i))`` (0: absent); with ``reverse`` the slot + 1 of ``π(i)`` in
  ``N_Y(π(j))`` (cycle kNN).  Membership comes from the neighbor lists themselves: row i
  writes the slots of its reference list (or, with ``reverse``, of the reference's in-lists,
  :func:`in_lists`) into a length-n ``mark`` array, reads its k edges' slots from it and clears
  it again: 2·(list width) + k accesses (2·(in-degree) + k for ``reverse``) to a length-n array
  of bytes (while k < 128) instead of k look-ups in an n·k-sized table;
* the score of each requested measure from those slots.

Counts (mutual, cycle, LCS and edit-distance kNN) are integers, so they equal the torch path
exactly; CKNNA's float64 sums differ from it only by rounding.  The kernels release the GIL
(``nogil=True``) so that tasks run on a few Python threads, and are cached on disk like those
of ``_gram_null_numba``.
"""

from __future__ import annotations

import numba
import numpy as np

MUTUAL, CYCLE, CKNNA, LCS, EDIT = range(5)


def _jit(fn):
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


def slot_dtype(k: int) -> type:
    """The smallest signed integer type that holds slot + 1 for lists of k neighbors."""
    return np.int8 if k < 1 << 7 else np.int16 if k < 1 << 15 else np.int32


@_jit
def in_lists(y_idx, slot_type):  # pragma: no cover
    """The reference's in-lists, CSR: for every u, the rows v with u ∈ N_Y(v) (``src``) and
    u's slot in N_Y(v) (``slot``), in ``ptr[u] .. ptr[u+1]`` (a counting sort, O(n·k))."""
    n, k = y_idx.shape
    ptr = np.zeros(n + 1, dtype=np.int64)
    for v in range(n):
        for t in range(k):
            ptr[y_idx[v, t] + 1] += 1
    for u in range(n):
        ptr[u + 1] += ptr[u]
    fill = ptr[:-1].copy()
    src = np.empty(n * k, dtype=np.int32)
    slot = np.empty(n * k, dtype=slot_type)
    for v in range(n):
        for t in range(k):
            u = y_idx[v, t]
            src[fill[u]] = v
            slot[fill[u]] = t + 1
            fill[u] += 1
    return ptr, src, slot


@_jit
def _slots(perm, idx, kmax, y_idx, ptr, src, slot, reverse, mark, out):  # pragma: no cover
    """``out[i, s]``: slot + 1 of π(N_X(i)[s]) in N_Y(π(i)) (or, with ``reverse``, of π(i) in
    N_Y(π(N_X(i)[s]))); ``mark`` (length n) is zero on entry and on return."""
    n = idx.shape[0]
    ky = y_idx.shape[1]
    for i in range(n):
        pi = perm[i]
        if reverse:  # the rows whose reference lists hold π(i), each with π(i)'s slot there
            for e in range(ptr[pi], ptr[pi + 1]):
                mark[src[e]] = slot[e]
        else:
            for t in range(ky):
                mark[y_idx[pi, t]] = t + 1
        for s in range(kmax):
            out[i, s] = mark[perm[idx[i, s]]]
        if reverse:
            for e in range(ptr[pi], ptr[pi + 1]):
                mark[src[e]] = 0
        else:
            for t in range(ky):
                mark[y_idx[pi, t]] = 0


@_jit
def _lcs_row(f, k, ky, row):  # pragma: no cover
    """LCS length of model list (k entries) and reference list (ky), f = slots + 1."""
    for t in range(ky + 1):
        row[t] = 0
    for s in range(k):
        diag = 0  # row[t] of the previous s
        for t in range(ky):
            up = row[t + 1]
            if f[s] == t + 1:
                best = diag + 1
            else:
                best = up if up > row[t] else row[t]
            diag = up
            row[t + 1] = best
    return row[ky]


@_jit
def _edit_row(f, k, ky, row):  # pragma: no cover
    """Levenshtein distance of model list (k entries) and reference list (ky)."""
    for t in range(ky + 1):
        row[t] = t
    for s in range(k):
        diag = row[0]
        row[0] = s + 1
        for t in range(ky):
            up = row[t + 1]
            best = (up if up < row[t] else row[t]) + 1
            sub = diag + (0 if f[s] == t + 1 else 1)
            diag = up
            row[t + 1] = sub if sub < best else best
    return row[ky]


@_jit
def scores_task(perms, p0, p1, idx, kmax, y_idx, ptr, src, slot, kinds, ks, kys, x_vals,
                x_recip, y_vals, y_recip, out):  # pragma: no cover
    """Raw totals of requests ``r`` (``kinds[r]``, own k ``ks[r]`` on X and ``kys[r]`` on Y)
    for permutations ``p0 .. p1-1`` into ``out[p - p0, r]`` (float64): the number of found
    edges (mutual), of rows reached back (cycle), the summed LCS lengths or edit distances, or
    the unbiased HSIC of the kNN-masked grams (CKNNA); the caller normalizes them exactly as
    the torch path does.

    ``idx`` (n, ≥ kmax) are the model's lists and ``y_idx`` (n, ≥ every ky) the reference's,
    ``ptr``/``src``/``slot`` its :func:`in_lists` (only read with a cycle request; ``slot``'s
    dtype, :func:`slot_dtype` of ``y_idx``'s width, is the slots' dtype).
    ``x_vals``/``x_recip`` (n, ≥ k) and ``y_vals``/``y_recip`` (n, ky) are the inner products
    (float32 or float64, summed in float64) and the reciprocity of the CKNNA request's own
    lists (at most one CKNNA request per call; dummies otherwise).
    """
    n = idx.shape[0]
    nreq = kinds.shape[0]
    need_rev = False
    for r in range(nreq):
        if kinds[r] == CYCLE:
            need_rev = True
    fwd = np.empty((n, kmax), dtype=slot.dtype)
    rev = np.empty((n, kmax), dtype=slot.dtype)
    mark = np.zeros(n, dtype=slot.dtype)
    hit = np.empty(n, dtype=np.uint8)
    colsum = np.empty(n)
    rowb = np.empty(n)
    row = np.empty(kys.max() + 1, dtype=np.int64)
    for p in range(p0, p1):
        perm = perms[p]
        _slots(perm, idx, kmax, y_idx, ptr, src, slot, False, mark, fwd)
        if need_rev:
            _slots(perm, idx, kmax, y_idx, ptr, src, slot, True, mark, rev)
        for r in range(nreq):
            kind, k, ky = kinds[r], ks[r], kys[r]
            if kind == MUTUAL:
                count = 0
                for i in range(n):
                    for s in range(k):
                        f = fwd[i, s]
                        if f > 0 and f <= ky:
                            count += 1
                out[p - p0, r] = count
            elif kind == CYCLE:
                hit[:] = 0
                for j in range(n):
                    for s in range(k):
                        f = rev[j, s]
                        if f > 0 and f <= ky:
                            hit[idx[j, s]] = 1
                count = 0
                for i in range(n):
                    count += hit[i]
                out[p - p0, r] = count
            elif kind == CKNNA:
                colsum[:] = 0.0
                trace = 0.0
                sa = 0.0
                sb = 0.0
                for i in range(n):
                    pi = perm[i]
                    rb = 0.0
                    for s in range(k):
                        f = fwd[i, s]
                        if f > 0 and f <= ky:
                            a = np.float64(x_vals[i, s])  # exact: float32 values
                            b = np.float64(y_vals[pi, f - 1])  # widen without rounding
                            if x_recip[i, s] and y_recip[pi, f - 1]:
                                trace += a * b
                            sa += a
                            sb += b
                            rb += b
                            colsum[idx[i, s]] += a
                    rowb[i] = rb
                cross = 0.0
                for i in range(n):
                    cross += colsum[i] * rowb[i]
                value = trace + sa * sb / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)
                out[p - p0, r] = value / (n * (n - 3))
            else:  # LCS or EDIT
                total = 0
                for i in range(n):
                    if kind == LCS:
                        total += _lcs_row(fwd[i], k, ky, row)
                    else:
                        total += _edit_row(fwd[i], k, ky, row)
                out[p - p0, r] = total
