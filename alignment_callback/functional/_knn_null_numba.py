"""Numba kernels of the kNN-family permutation nulls (CPU only).

Imported lazily by :mod:`alignment_callback.functional.knn_measures` and only when numba is
installed; nothing else imports it.  One call handles one (model layer, reference layer) pair
and a range of permutations, one permutation at a time, so that everything a permutation
touches (its n·k slots, a few length-n accumulators) stays in cache:

* ``slots``: for every model edge ``(i, s)``, ``j = N_X(i)[s]``, the slot + 1 of ``π(j)`` in
  the reference's list ``N_Y(π(i))`` (0: absent), looked up in the reference's
  :class:`~alignment_callback.functional.neighbors.SlotTable`; with ``reverse`` the slot + 1
  of ``π(i)`` in ``N_Y(π(j))`` (cycle kNN);
* the score of each requested measure from those slots.

Counts (mutual, cycle, LCS and edit-distance kNN) are integers, so they equal the torch path
exactly; CKNNA's float64 sums differ from it only by rounding.  The kernels release the GIL
(``nogil=True``) so that tasks run on a few Python threads, and are cached on disk like those
of ``_gram_null_numba``.
"""

from __future__ import annotations

import numba
import numpy as np

from alignment_callback.functional.neighbors import _GROUP_MULTIPLIER, _HASH_MASK as _MASK

MUTUAL, CYCLE, CKNNA, LCS, EDIT = range(5)


def _jit(fn):
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


@_jit
def _lookup(params, offsets, entries, group_bits, slot_bits, a, b):  # pragma: no cover
    """``slot + 1`` of b in N(a), 0 when absent (see ``SlotTable.lookup``)."""
    v = a
    if group_bits > 0:
        v = (a << group_bits) + (((b * _GROUP_MULTIPLIER) & _MASK) >> (32 - group_bits))
    p = params[v]
    bucket = ((b * (p & _MASK)) & _MASK) >> (p >> 32)
    e = np.int64(entries[offsets[v] + bucket])
    if (e >> slot_bits) == b:
        return (e & ((1 << slot_bits) - 1)) + 1
    return 0


@_jit
def _slots(perm, idx, kmax, params, offsets, entries, group_bits, slot_bits, reverse,
           out):  # pragma: no cover
    """``out[i, s]``: slot + 1 of π(N_X(i)[s]) in N_Y(π(i)) (or, with ``reverse``, of π(i) in
    N_Y(π(N_X(i)[s])))."""
    n = idx.shape[0]
    for i in range(n):
        pi = perm[i]
        for s in range(kmax):
            pj = perm[idx[i, s]]
            if reverse:
                out[i, s] = _lookup(params, offsets, entries, group_bits, slot_bits, pj, pi)
            else:
                out[i, s] = _lookup(params, offsets, entries, group_bits, slot_bits, pi, pj)


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
def scores_task(perms, p0, p1, idx, kmax, params, offsets, entries, group_bits, slot_bits,
                kinds, ks, kys, x_vals, x_recip, y_vals, y_recip, out):  # pragma: no cover
    """Raw totals of requests ``r`` (``kinds[r]``, own k ``ks[r]`` on X and ``kys[r]`` on Y)
    for permutations ``p0 .. p1-1`` into ``out[p - p0, r]`` (float64): the number of found
    edges (mutual), of rows reached back (cycle), the summed LCS lengths or edit distances, or
    the unbiased HSIC of the kNN-masked grams (CKNNA); the caller normalizes them exactly as
    the torch path does.

    ``x_vals``/``x_recip`` (n, ≥ k) and ``y_vals``/``y_recip`` (n, ky) are the float64 inner
    products and the reciprocity of the CKNNA request's own lists (at most one CKNNA request
    per call; dummies otherwise).
    """
    n = idx.shape[0]
    nreq = kinds.shape[0]
    need_rev = False
    for r in range(nreq):
        if kinds[r] == CYCLE:
            need_rev = True
    fwd = np.empty((n, kmax), dtype=np.int32)
    rev = np.empty((n, kmax), dtype=np.int32)
    hit = np.empty(n, dtype=np.uint8)
    colsum = np.empty(n)
    rowb = np.empty(n)
    row = np.empty(kys.max() + 1, dtype=np.int64)
    for p in range(p0, p1):
        perm = perms[p]
        _slots(perm, idx, kmax, params, offsets, entries, group_bits, slot_bits, False, fwd)
        if need_rev:
            _slots(perm, idx, kmax, params, offsets, entries, group_bits, slot_bits, True, rev)
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
                            a = x_vals[i, s]
                            b = y_vals[pi, f - 1]
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
