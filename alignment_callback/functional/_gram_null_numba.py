"""Numba kernels of :mod:`alignment_callback.functional.gram_null` (CPU only).

Imported lazily by ``gram_null`` and only when numba is installed; nothing else imports it.
The kernels release the GIL (``nogil=True``) so that ``gram_null`` can run disjoint tasks on a
few Python threads, and they are compiled once per dtype and cached on disk (``cache=True``):
next to this file when its ``__pycache__`` is writable, otherwise in numba's per-user cache
directory (``NUMBA_CACHE_DIR`` overrides both).  Where no cache location is writable at all,
they are compiled in memory on the first call of each process (about 1-2 s per dtype).

``fastmath`` is limited to ``reassoc`` and ``contract``: it lets LLVM vectorize the float64
reductions (several partial sums, fused multiply-adds); NaN/Inf semantics are kept.
"""

from __future__ import annotations

import numba
import numpy as np

_FASTMATH = {"reassoc", "contract"}


def _jit(fastmath: bool):
    flags = _FASTMATH if fastmath else False

    def deco(fn):
        try:
            return numba.njit(nogil=True, fastmath=flags, cache=True)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, fastmath=flags)(fn)

    return deco


@_jit(fastmath=False)
def inverse_permutations(perms, inv):  # pragma: no cover - compiled
    """``inv[p, perms[p, i]] = i``; returns the number of rows of ``perms`` (int64, (P, n))
    that are not permutations of 0..n-1 (``inv`` uint32, (P, n), is then partly undefined)."""
    n = perms.shape[1]
    bad = 0
    for p in range(perms.shape[0]):
        row = inv[p]
        for k in range(n):
            row[k] = n  # "unset" (n < 2**32 is checked by the caller)
        for i in range(n):
            v = perms[p, i]
            if v < 0 or v >= n or row[v] != n:
                bad += 1
                break
            row[v] = i
    return bad


@_jit(fastmath=True)
def dots_task(fixed, moved, perms, inv, r0, r1, rb, p0, p1, sym, out):  # pragma: no cover
    """Add to ``out[p, b, a]`` (float64 (P, Lb, La)) the rows ``r0 <= i < r1`` of

        T_p[b, a] = Σ_i Σ_k fixed[a][i, σ_p(k)] · moved[b][π_p(i), k],    σ_p = π_p⁻¹,

    for ``p0 <= p < p1`` (``perms`` = π, ``inv`` = σ as uint32).  This is Σ_ij A_ij B_π(i)π(j)
    with the gathered matrix ``fixed`` read from a row block of ``rb`` rows that stays in cache
    while the permutations stream over ``moved`` row by row (contiguous reads).

    With ``sym`` (both matrices symmetric) only the part of row π(i) of ``moved`` right of its
    diagonal is read: each unordered pair {i, j} is counted once, from the row i or j whose
    image comes first, ``T = Σ_i A_ii B_π(i)π(i) + 2 Σ_i Σ_{k > π(i)} A_iσ(k) B_π(i)k``.

    One moved matrix: the gather is fused with the dot.  Several: the gathered rows of the
    fixed matrices are copied to a scratch buffer once per (p, i) and each moved row segment is
    read once from memory and dotted with all of them.
    """
    la = fixed.shape[0]
    lb = moved.shape[0]
    n = fixed.shape[1]
    buf = np.empty((la, n), dtype=fixed.dtype)
    for b0 in range(r0, r1, rb):
        b1 = min(r1, b0 + rb)
        for p in range(p0, p1):
            ip = inv[p]
            for i in range(b0, b1):
                row = perms[p, i]
                start = row + 1 if sym else 0
                iseg = ip[start:]  # uint32: no negative-index wraparound, so LLVM emits gathers
                m = iseg.shape[0]
                if lb == 1:
                    bseg = moved[0, row, start:]
                    bdiag = np.float64(moved[0, row, row])
                    for a in range(la):
                        arow = fixed[a, i]
                        acc = 0.0
                        for j in range(m):
                            acc += np.float64(arow[iseg[j]]) * np.float64(bseg[j])
                        if sym:
                            acc = 2.0 * acc + np.float64(arow[i]) * bdiag
                        out[p, 0, a] += acc
                else:
                    for a in range(la):
                        arow = fixed[a, i]
                        bufa = buf[a]
                        for j in range(m):
                            bufa[j] = arow[iseg[j]]
                    for b in range(lb):
                        bseg = moved[b, row, start:]
                        bdiag = np.float64(moved[b, row, row])
                        for a in range(la):
                            bufa = buf[a]
                            acc = 0.0
                            for j in range(m):
                                acc += np.float64(bufa[j]) * np.float64(bseg[j])
                            if sym:
                                acc = 2.0 * acc + np.float64(fixed[a, i, i]) * bdiag
                            out[p, b, a] += acc
