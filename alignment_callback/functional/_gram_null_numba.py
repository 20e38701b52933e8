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


def _jit(fastmath: bool, inline: bool = False):
    options = dict(nogil=True, fastmath=_FASTMATH if fastmath else False)
    if inline:
        options["inline"] = "always"

    def deco(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(**options)(fn)

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


_F64 = np.float64


# Register-blocked dot products of gathered fixed rows x (float64 buffers) with moved row
# segments y (input dtype), m terms each: 4×4, 1×4, 4×1 and 1×1 blocks.  The many independent
# accumulators keep both FMA ports busy instead of waiting on one dependency chain.
@_jit(fastmath=True, inline=True)
def _dot44(x0, x1, x2, x3, y0, y1, y2, y3, m, o, f):  # pragma: no cover - compiled
    c00 = 0.0; c01 = 0.0; c02 = 0.0; c03 = 0.0  # noqa: E702
    c10 = 0.0; c11 = 0.0; c12 = 0.0; c13 = 0.0  # noqa: E702
    c20 = 0.0; c21 = 0.0; c22 = 0.0; c23 = 0.0  # noqa: E702
    c30 = 0.0; c31 = 0.0; c32 = 0.0; c33 = 0.0  # noqa: E702
    for j in range(m):
        u0 = x0[j]; u1 = x1[j]; u2 = x2[j]; u3 = x3[j]  # noqa: E702
        v = _F64(y0[j]); c00 += v * u0; c01 += v * u1; c02 += v * u2; c03 += v * u3  # noqa: E702
        v = _F64(y1[j]); c10 += v * u0; c11 += v * u1; c12 += v * u2; c13 += v * u3  # noqa: E702
        v = _F64(y2[j]); c20 += v * u0; c21 += v * u1; c22 += v * u2; c23 += v * u3  # noqa: E702
        v = _F64(y3[j]); c30 += v * u0; c31 += v * u1; c32 += v * u2; c33 += v * u3  # noqa: E702
    o[0, 0] += f * c00; o[0, 1] += f * c01; o[0, 2] += f * c02; o[0, 3] += f * c03  # noqa: E702
    o[1, 0] += f * c10; o[1, 1] += f * c11; o[1, 2] += f * c12; o[1, 3] += f * c13  # noqa: E702
    o[2, 0] += f * c20; o[2, 1] += f * c21; o[2, 2] += f * c22; o[2, 3] += f * c23  # noqa: E702
    o[3, 0] += f * c30; o[3, 1] += f * c31; o[3, 2] += f * c32; o[3, 3] += f * c33  # noqa: E702


@_jit(fastmath=True, inline=True)
def _dot14(x, y0, y1, y2, y3, m, o, f):  # pragma: no cover - compiled
    c0 = 0.0; c1 = 0.0; c2 = 0.0; c3 = 0.0  # noqa: E702
    for j in range(m):
        u = x[j]
        c0 += _F64(y0[j]) * u; c1 += _F64(y1[j]) * u  # noqa: E702
        c2 += _F64(y2[j]) * u; c3 += _F64(y3[j]) * u  # noqa: E702
    o[0] += f * c0; o[1] += f * c1; o[2] += f * c2; o[3] += f * c3  # noqa: E702


@_jit(fastmath=True, inline=True)
def _dot41(x0, x1, x2, x3, y, m, o, f):  # pragma: no cover - compiled
    c0 = 0.0; c1 = 0.0; c2 = 0.0; c3 = 0.0  # noqa: E702
    for j in range(m):
        v = _F64(y[j])
        c0 += x0[j] * v; c1 += x1[j] * v; c2 += x2[j] * v; c3 += x3[j] * v  # noqa: E702
    o[0] += f * c0; o[1] += f * c1; o[2] += f * c2; o[3] += f * c3  # noqa: E702


@_jit(fastmath=True, inline=True)
def _dot11(x, y, m):  # pragma: no cover - compiled
    c = 0.0
    for j in range(m):
        c += x[j] * _F64(y[j])
    return c


@_jit(fastmath=True)
def dots_task(fixed, moved, perms, inv, r0, r1, rb, p0, p1, sym, out):  # pragma: no cover
    """Add to ``out[p - p0, b, a]`` (float64 (p1 - p0, Lb, La)) the rows ``r0 <= i < r1`` of

        T_p[b, a] = Σ_i Σ_k fixed[a][i, σ_p(k)] · moved[b][π_p(i), k],    σ_p = π_p⁻¹,

    for ``p0 <= p < p1`` (``perms`` = π, ``inv`` = σ as uint32).  This is Σ_ij A_ij B_π(i)π(j)
    with the gathered matrix ``fixed`` read from a row block of ``rb`` rows that stays in cache
    while the permutations stream over ``moved`` row by row (contiguous reads).

    With ``sym`` (both matrices symmetric) only the part of row π(i) of ``moved`` right of its
    diagonal is read: each unordered pair {i, j} is counted once, from the row i or j whose
    image comes first, ``T = Σ_i A_ii B_π(i)π(i) + 2 Σ_i Σ_{k > π(i)} A_iσ(k) B_π(i)k``.

    One moved matrix: the gather is fused with the dot.  Several: the gathered rows of the
    fixed matrices are copied (as float64) to a scratch buffer once per (p, i), and each moved
    row segment is read once from memory and dotted with all of them in 4×4 register blocks.
    """
    la = fixed.shape[0]
    lb = moved.shape[0]
    n = fixed.shape[1]
    f = 2.0 if sym else 1.0
    la4 = la - la % 4
    lb4 = lb - lb % 4
    buf = np.empty((la, n))
    for b0 in range(r0, r1, rb):
        b1 = min(r1, b0 + rb)
        for p in range(p0, p1):
            ip = inv[p]
            op = out[p - p0]
            for i in range(b0, b1):
                row = perms[p, i]
                start = row + 1 if sym else 0
                iseg = ip[start:]  # uint32: no negative-index wraparound, so LLVM emits gathers
                m = iseg.shape[0]
                if lb == 1:
                    bseg = moved[0, row, start:]
                    bdiag = _F64(moved[0, row, row])
                    for a in range(la):
                        arow = fixed[a, i]
                        acc = 0.0
                        for j in range(m):
                            acc += _F64(arow[iseg[j]]) * _F64(bseg[j])
                        if sym:
                            acc = 2.0 * acc + _F64(arow[i]) * bdiag
                        op[0, a] += acc
                    continue
                for a in range(la):
                    arow = fixed[a, i]
                    x = buf[a]
                    for j in range(m):
                        x[j] = arow[iseg[j]]
                if sym:
                    for b in range(lb):
                        bdiag = _F64(moved[b, row, row])
                        for a in range(la):
                            op[b, a] += _F64(fixed[a, i, i]) * bdiag
                for bq in range(0, lb4, 4):
                    y0 = moved[bq, row, start:]
                    y1 = moved[bq + 1, row, start:]
                    y2 = moved[bq + 2, row, start:]
                    y3 = moved[bq + 3, row, start:]
                    for aq in range(0, la4, 4):
                        _dot44(buf[aq], buf[aq + 1], buf[aq + 2], buf[aq + 3], y0, y1, y2, y3, m,
                               op[bq:bq + 4, aq:aq + 4], f)
                    for a in range(la4, la):
                        _dot14(buf[a], y0, y1, y2, y3, m, op[bq:bq + 4, a], f)
                for b in range(lb4, lb):
                    y = moved[b, row, start:]
                    for aq in range(0, la4, 4):
                        _dot41(buf[aq], buf[aq + 1], buf[aq + 2], buf[aq + 3], y, m,
                               op[b, aq:aq + 4], f)
                    for a in range(la4, la):
                        op[b, a] += f * _dot11(buf[a], y, m)
