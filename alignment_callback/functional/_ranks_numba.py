"""Numba kernel of :func:`alignment_callback.functional.kernels.average_ranks` (CPU only).

Imported lazily by ``kernels`` and only when numba is installed; nothing else imports it.  A
least-significant-digit radix sort of the float64 values' bits (8-bit digits, passes whose
digit is the same for every value skipped) replaces a comparison sort: RSA ranks n(n − 1)/2
distances, 8.4 million at n = 4096, which ``torch.sort`` takes about a second for on one core.
"""

from __future__ import annotations

import numba
import numpy as np

_BITS = 8
_BUCKETS = 1 << _BITS
_PASSES = 8  # 8 × 8 bits: 256 buckets, whose write streams stay in cache


def _jit(fn):
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


@_jit
def average_ranks(values, tol, out):  # pragma: no cover - compiled
    """``out[i]`` = the average rank (1-based) of ``values[i]`` (float64, no NaN, fewer than
    2**32 of them), values that differ from their neighbor in sorted order by at most ``tol``
    forming one tie."""
    m = values.shape[0]
    sign = np.uint64(1) << np.uint64(63)
    keys = np.empty(m, np.uint64)
    bits = values.view(np.uint64)
    for i in range(m):  # the order of the floats as unsigned integers
        b = bits[i]
        keys[i] = ~b if b & sign else b | sign
    counts = np.zeros((_PASSES, _BUCKETS), np.int64)
    mask = np.uint64(_BUCKETS - 1)
    for i in range(m):
        k = keys[i]
        for p in range(_PASSES):
            counts[p, (k >> np.uint64(p * _BITS)) & mask] += 1
    idx = np.arange(m).astype(np.uint32)  # the caller keeps m below 2**32
    keys2 = np.empty_like(keys)
    idx2 = np.empty_like(idx)
    for p in range(_PASSES):
        c = counts[p]
        if c.max() == m:  # every value has the same digit: nothing moves
            continue
        start = np.empty(_BUCKETS, np.int64)
        total = 0
        for b in range(_BUCKETS):
            start[b] = total
            total += c[b]
        shift = np.uint64(p * _BITS)
        for i in range(m):
            k = keys[i]
            d = (k >> shift) & mask
            j = start[d]
            start[d] = j + 1
            keys2[j] = k
            idx2[j] = idx[i]
        keys, keys2 = keys2, keys
        idx, idx2 = idx2, idx
    ordered = keys2.view(np.float64)  # the sorted values, decoded into the spare buffer
    bits = keys2
    for i in range(m):
        k = keys[i]
        bits[i] = k & ~sign if k & sign else ~k
    first = 0
    for q in range(1, m + 1):
        if q == m or ordered[q] - ordered[q - 1] > tol:
            avg = (first + q + 1) / 2.0  # mean of the ranks first + 1 .. q
            for r in range(first, q):
                out[idx[r]] = avg
            first = q
    return out
