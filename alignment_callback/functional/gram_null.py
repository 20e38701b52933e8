"""Permutation nulls of the gram-family measures: exact float64 ``⟨A, B[π][:, π]⟩``.

Linear / RBF / unbiased CKA and RSA reduce each representation to a symmetric n×n matrix, and
a permutation π of Y's rows moves B to ``B[π][:, π]``.  The null needs, for every row π of a
chunk of permutations,

    T(π) = Σ_ij A[i, j] · B[π(i), π(j)].

Two backends give the same numbers (to float64 rounding):

``"numba"`` (CPU, used by ``"auto"`` when numba is installed)
    With σ = π⁻¹ the sum is ``Σ_i Σ_k A[i, σ(k)] · B[π(i), k]``: row π(i) of B is read
    contiguously (it streams from memory once per permutation), and row i of A is gathered at
    σ(k) from a block of A's rows that stays in cache while all the permutations of a task go
    over B.  For symmetric inputs only the part of row π(i) right of the diagonal is read
    (``T = Σ_i A_ii B_π(i)π(i) + 2 Σ_i Σ_{k>π(i)} A_iσ(k) B_π(i)k``), so B costs n²/2 reads.
    Products and sums are float64; no n×n temporary.  Tasks (row panel × group of 32
    permutations) run on up to ``torch.get_num_threads()`` Python threads (the kernels release
    the GIL) that take tasks from a shared counter, so a thread on a busy core simply does
    fewer of them; the split does not depend on the number of threads, so neither do the
    results (bit for bit).
``"torch"`` (any device; used by ``"auto"`` on CUDA or without numba)
    Batched flat gathers ``B.view(-1)[π(i)·n + π(j)]`` of (permutations × row block × n)
    elements, converted to float64 and contracted with the float64 row block of A in one
    matrix product.  A batch holds at most :data:`TORCH_BATCH_BYTES` of temporaries
    (:data:`TORCH_BATCH_BYTES_CPU` on the CPU), so a chunk of permutations costs a few kernel
    launches per batch and no host synchronization.  It uses the full definition (both
    triangles).

The backend is chosen per call (``backend=``), or for a whole block of code with
:func:`use_backend` (tests), or by setting :data:`default_backend`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from alignment_callback.functional import _compiled
from alignment_callback.functional._tasks import run_tasks

__all__ = [
    "TORCH_BATCH_BYTES",
    "TORCH_BATCH_BYTES_CPU",
    "default_backend",
    "gram_dots",
    "gram_dots_layers",
    "numba_available",
    "use_backend",
]

BACKENDS = ("auto", "numba", "torch")

default_backend: str = "auto"
"""Backend used when a call passes ``backend=None`` (the default): ``"auto"``, ``"numba"`` or
``"torch"``.  Prefer :func:`use_backend` to change it temporarily."""

TORCH_BATCH_BYTES: int = 256 * 2**20
"""Upper bound on the temporaries (indices, gathered values, their float64 copy) of one batch of
the ``"torch"`` backend on an accelerator (CUDA, ...).  Larger batches mean fewer kernel launches
per chunk: at n = 1024 a chunk of 256 permutations takes 16 batches (about 0.6 torch calls per
permutation)."""

TORCH_BATCH_BYTES_CPU: int = 4 * 2**20
"""The same bound for the ``"torch"`` backend on the CPU, where batches that stay in cache are
several times faster than large ones (whose pages are also freshly mapped on each allocation);
they cost more torch calls per permutation (about 30 at n = 1024), which is cheap on the CPU."""

_A_BLOCK_BYTES = 256 * 1024  # rows of the fixed matrices kept in L2 while permutations stream
_PERM_GROUP = 32  # permutations per task: a block of A is reused across them
_MAX_PANELS = 4  # row panels per call (tasks = panels × permutation groups)
_MIN_PARALLEL_WORK = 1 << 21  # multiply-adds below which one thread does everything

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- backends


_KERNELS = "_gram_null_numba"


def _numba_kernels():
    """The numba kernel module, imported on first use; raises ImportError without numba."""
    try:
        return _compiled.load(_KERNELS)
    except ImportError as err:
        raise ImportError(
            f"the numba backend of gram_null needs numba (pip install numba): {err.__cause__}"
        ) from err


def numba_available() -> bool:
    """Whether the numba backend can be used (numba importable); imports it on first call."""
    return _compiled.available(_KERNELS)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: calls with ``backend=None`` use ``name`` inside the block.

    Examples
    --------
    >>> import torch
    >>> a = b = torch.eye(3)
    >>> perms = torch.tensor([[0, 1, 2], [2, 0, 1]])
    >>> with use_backend("torch"):
    ...     dots = gram_dots(a, b, perms)
    >>> dots.tolist()
    [3.0, 3.0]
    """
    global default_backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    old, default_backend = default_backend, name
    try:
        yield
    finally:
        default_backend = old


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    name = default_backend if backend is None else backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return "torch"
    if device.type != "cpu":
        if name == "numba":
            raise ValueError(f"the numba backend runs on the CPU only; tensors are on {device}")
        return "torch"
    if name == "numba":
        _numba_kernels()  # raises ImportError with a clear message
        return "numba"
    return "numba" if numba_available() else "torch"


# ----------------------------------------------------------------------------- public API


def gram_dots(
    a: Tensor,
    b: Tensor,
    perms: Tensor,
    *,
    symmetric: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Frobenius products of ``a`` with the permuted ``b`` for each permutation, in float64.

    For each row π of ``perms``::

        T(π) = Σ_ij a[i, j] · b[π(i), π(j)] = ⟨a, b[π][:, π]⟩_F.

    Products and sums are float64 whatever the input dtype (float32 values are converted before
    multiplying, so their products are exact), and no n×n temporary is made per permutation.

    Parameters
    ----------
    a, b : Tensor
        Symmetric (n, n) matrices (e.g. centered or U-centered grams, centered rank matrices),
        float32 or float64 (float16/bfloat16 are widened to float32), on the same device.
        ``a`` stays fixed, ``b`` is permuted.
    perms : Tensor
        (P, n) integer tensor (int64 or int32) whose rows are permutations of ``0..n-1``, on
        the same device.  P may be 0.
    symmetric : bool, default=True
        Whether ``a`` and ``b`` are symmetric (they must be, for the gram measures).  The numba
        backend then reads only the upper triangle of the moved matrix (half the memory
        traffic): each pair {i, j} is counted twice as ``a[i, j] · b[π(i), π(j)]`` with
        π(i) < π(j).  For inputs that are not exactly symmetric this differs from the
        definition by at most ``½ Σ_ij (|a_ij|·|b − bᵀ|_π(i)π(j) + |a − aᵀ|_ij·|b_π(i)π(j)|)``
        (and from the ``"torch"`` backend, which always uses the definition).  Centered grams
        computed in float32 can be asymmetric by a rounding error (measured on CKA values: up
        to 2e-9 for RBF, 3e-11 for unbiased CKA; linear grams and RSA matrices were exactly
        symmetric); ``(m + m.T) / 2`` makes a matrix exactly symmetric.  ``False`` makes numba
        use the full definition as well (exact for any matrices, 1.7-1.9× slower).
    backend : {"auto", "numba", "torch"} or None, default=None
        None uses :data:`default_backend` (``"auto"`` unless changed, e.g. by
        :func:`use_backend`).  ``"auto"``: numba on CPU when it is installed, otherwise torch.
        ``"numba"`` raises ImportError without numba and ValueError for non-CPU tensors.

    Returns
    -------
    Tensor
        (P,) float64 on the device of the inputs.  Not differentiable.

    Raises
    ------
    ValueError
        Bad shapes, mixed devices, or (numba backend) a row of ``perms`` that is not a
        permutation.  The torch backend does not check that rows are permutations (that would
        need a host synchronization); out-of-range indices raise an indexing error there.

    Notes
    -----
    Cost (numba, float32, one thread, a 2-core Xeon whose single-core read bandwidth measured
    12 GB/s in the same run; ``benchmarks/bench_gram_null.py``): 0.57-0.65 × n²·4 B /
    bandwidth per permutation for n = 1024, 2048, 4096, i.e. less than reading B once (only
    its upper triangle is read); two threads halve it when both cores are free.  The first call in a process compiles the kernel (2-3 s for the first
    dtype, 1-2 s for the other) unless numba's on-disk cache holds it (then about 0.5 s).
    """
    _check_square(a, "a")
    _check_square(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return _dots([a], [b], perms, symmetric, backend)[:, 0, 0]


def gram_dots_layers(
    fixed: Sequence[Tensor] | Tensor,
    moved: Sequence[Tensor] | Tensor,
    perms: Tensor,
    *,
    symmetric: bool = True,
    backend: str | None = None,
) -> Tensor:
    """All products of fixed matrices with permuted moved matrices, in float64.

    For each row π_p of ``perms``::

        out[p, b, a] = Σ_ij fixed[a][i, j] · moved[b][π_p(i), π_p(j)].

    One permutation is shared by all LA×LB pairs (the layer null).  On the numba backend each
    row of each moved matrix is read from memory once per permutation and dotted with the
    gathered rows of every fixed matrix.

    Parameters
    ----------
    fixed, moved : sequence of Tensor, or Tensor
        LA (resp. LB) symmetric (n, n) matrices with the same n, float32 or float64, on one
        device.  A (L, n, n) tensor is used as is; a list is stacked (a copy), so passing a
        stacked tensor saves memory when the layers are many or large.  On the numba backend
        the rows of the fixed matrices are gathered (LA gathers per row and permutation) and
        the moved ones are streamed (LB reads), and gathers cost more: fixing the side with
        fewer layers is the faster orientation (n = 1024, one thread: 2 fixed × 12 moved
        about 2 ms, 12 × 2 about 3 ms per permutation).
    perms : Tensor
        (P, n) integer tensor of permutations, as in :func:`gram_dots`.
    symmetric, backend
        As in :func:`gram_dots`.

    Returns
    -------
    Tensor
        (P, LB, LA) float64 on the device of the inputs.
    """
    return _dots(_layers(fixed, "fixed"), _layers(moved, "moved"), perms, symmetric, backend)


# ----------------------------------------------------------------------------- checks


def _check_square(m: Tensor, what: str) -> None:
    if not isinstance(m, Tensor) or m.dim() != 2 or m.shape[0] != m.shape[1]:
        got = getattr(m, "shape", type(m))
        raise ValueError(f"{what} must be a square (n, n) tensor, got {got}")


def _layers(mats: Sequence[Tensor] | Tensor, what: str) -> list[Tensor] | Tensor:
    """Validated matrices: a (L, n, n) tensor as is, or a non-empty list of equal (n, n)."""
    if isinstance(mats, Tensor):
        if mats.dim() != 3 or mats.shape[1] != mats.shape[2] or mats.shape[0] == 0:
            raise ValueError(
                f"{what} must be (L, n, n) with L >= 1 or a list of (n, n), got {tuple(mats.shape)}"
            )
        return mats
    mats = list(mats)
    if not mats:
        raise ValueError(f"{what} must hold at least one matrix")
    for i, m in enumerate(mats):
        _check_square(m, f"{what}[{i}]")
        if m.shape != mats[0].shape:
            raise ValueError(
                f"{what} matrices differ in shape: {tuple(mats[0].shape)} and {tuple(m.shape)}"
            )
    return mats


def _parts(mats: list[Tensor] | Tensor) -> list[Tensor]:
    return [mats] if isinstance(mats, Tensor) else mats


def _dots(fixed: list[Tensor] | Tensor, moved: list[Tensor] | Tensor, perms: Tensor,
          symmetric: bool, backend: str | None) -> Tensor:
    """(P, LB, LA) float64 for LA fixed and LB moved matrices (lists or stacked tensors)."""
    tensors = _parts(fixed) + _parts(moved)
    n = tensors[0].shape[-1]
    if any(t.shape[-1] != n for t in tensors):
        sizes = sorted({t.shape[-1] for t in tensors})
        raise ValueError(f"fixed and moved matrices differ in size: {sizes}")
    if not isinstance(perms, Tensor) or perms.dim() != 2 or perms.shape[1] != n:
        raise ValueError(f"perms must be (P, {n}), got {getattr(perms, 'shape', type(perms))}")
    if perms.dtype.is_floating_point or perms.dtype.is_complex or perms.dtype == torch.bool:
        raise TypeError(f"perms must be an integer tensor, got {perms.dtype}")
    device = tensors[0].device
    if any(t.device != device for t in tensors) or perms.device != device:
        raise ValueError(f"matrices and perms must be on one device, got "
                         f"{sorted({str(t.device) for t in tensors} | {str(perms.device)})}")
    for t in tensors:
        if t.dtype not in _FLOATS:
            raise TypeError(f"gram matrices must be floating point, got {t.dtype}")
    wide = any(t.dtype == torch.float64 for t in tensors)  # else float32 (exact for halves)
    if _resolve_backend(backend, device) == "numba":
        return _numba_dots(_numpy_stack(fixed, wide), _numpy_stack(moved, wide),
                           _numpy_perms(perms), bool(symmetric))
    dtype = torch.float64 if wide else torch.float32
    return _torch_dots(_torch_stack(fixed, dtype), _torch_stack(moved, dtype), perms.detach())


def _torch_stack(mats: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(mats, Tensor):
        return mats.detach().to(dtype)
    if len(mats) == 1:
        return mats[0].detach().to(dtype)[None]
    return torch.stack([m.detach().to(dtype) for m in mats])


# ----------------------------------------------------------------------------- numba backend
# Everything here is NumPy: a parallel torch op (a large copy or cast) would wake torch's OpenMP
# threads, which keep spinning after it and compete with the kernel's threads.


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # NumPy has no bfloat16
    return t.numpy()


def _numpy_stack(mats: list[Tensor] | Tensor, wide: bool) -> np.ndarray:
    dtype = np.float64 if wide else np.float32
    if isinstance(mats, Tensor) or len(mats) == 1:
        one = _numpy(mats) if isinstance(mats, Tensor) else _numpy(mats[0])[None]
        return np.ascontiguousarray(one, dtype=dtype)
    return np.stack([_numpy(m) for m in mats], dtype=dtype)


def _numpy_perms(perms: Tensor) -> np.ndarray:
    return np.ascontiguousarray(perms.detach().numpy(), dtype=np.int64)


def _numba_dots(fa: np.ndarray, mb: np.ndarray, pm: np.ndarray, symmetric: bool) -> Tensor:
    k = _numba_kernels()
    la, n = fa.shape[0], fa.shape[1]
    lb, num = mb.shape[0], pm.shape[0]
    if num == 0 or n == 0:
        return torch.from_numpy(np.zeros((num, lb, la)))
    inv = np.empty((num, n), dtype=np.uint32)  # σ = π⁻¹: uint32 indices vectorize to gathers
    bad = k.inverse_permutations(pm, inv)
    if bad:
        raise ValueError(f"perms: {bad} of {num} rows are not permutations of 0..{n - 1}")

    rb = max(1, min(n, _A_BLOCK_BYTES // (la * n * fa.itemsize)))  # rows of A per cache block
    nblocks = -(-n // rb)
    panels = min(_MAX_PANELS, nblocks)
    panel_rows = -(-nblocks // panels) * rb
    panels = -(-n // panel_rows)
    groups = -(-num // _PERM_GROUP)

    def task(t: int) -> np.ndarray:  # (permutations of the group, LB, LA), row panel's share
        panel, group = divmod(t, groups)
        r0, p0 = panel * panel_rows, group * _PERM_GROUP
        p1 = min(num, p0 + _PERM_GROUP)
        out = np.zeros((p1 - p0, lb, la))
        k.dots_task(fa, mb, pm, inv, r0, min(n, r0 + panel_rows), rb, p0, p1, symmetric, out)
        return out

    work = num * la * lb * n * n // (2 if symmetric else 1)
    threads = 1 if work < _MIN_PARALLEL_WORK else torch.get_num_threads()
    results = run_tasks(task, panels * groups, threads)
    total = np.concatenate(results[:groups])  # panel 0; then the other panels, in order
    for panel in range(1, panels):
        total += np.concatenate(results[panel * groups:(panel + 1) * groups])
    return torch.from_numpy(total)


# ----------------------------------------------------------------------------- torch backend


def _torch_dots(fixed: Tensor, moved: Tensor, perms: Tensor) -> Tensor:
    la, n = fixed.shape[0], fixed.shape[1]
    lb, num = moved.shape[0], perms.shape[0]
    if num == 0 or n == 0:
        return torch.zeros(num, lb, la, dtype=torch.float64, device=fixed.device)
    index_dtype = torch.int32 if n * n < 2**31 else torch.int64
    # bytes per gathered element: the value, its float64 copy and a share of the flat index
    per_element = (moved.element_size() + (8 if moved.dtype != torch.float64 else 0)
                   + (4 if index_dtype == torch.int32 else 8) / lb)
    budget = TORCH_BATCH_BYTES_CPU if fixed.device.type == "cpu" else TORCH_BATCH_BYTES
    cap = max(n, int(budget / per_element / lb))  # (perms × rows × n) per batch
    if cap >= n * n:
        rows, group = n, min(num, cap // (n * n))
    else:
        rows, group = min(n, cap // n), 1
    flat = moved.reshape(lb, n * n)
    perms = perms.to(index_dtype)
    scaled = perms * n
    total = None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        a_block = fixed[:, r0:r1].reshape(la, (r1 - r0) * n).to(torch.float64).T  # (r·n, LA)
        parts = []
        for p0 in range(0, num, group):
            p1 = min(num, p0 + group)
            # (q, r, n) flat indices π(i)·n + π(j)
            index = scaled[p0:p1, r0:r1, None] + perms[p0:p1, None, :]
            gathered = flat[:, index].to(torch.float64).reshape(lb, p1 - p0, (r1 - r0) * n)
            parts.append(gathered @ a_block)  # (LB, q, LA), one matrix product
        block = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        total = block if total is None else total + block
    return total.permute(1, 0, 2)
