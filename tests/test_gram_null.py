"""Exact float64 permutation nulls of the gram measures (``functional/gram_null.py``).

Every value is checked against an independent float64 NumPy computation written from the
definition ``T(π) = Σ_ij A_ij B_π(i)π(j) = (A * B[np.ix_(π, π)]).sum()``.  The error is measured
against ``Σ_ij |A_ij B_π(i)π(j)|`` (the condition of the sum: exact float64 accumulation of n²
terms is good to about n·1e-16 of it), which is never larger than ``‖A‖‖B‖``, so it also bounds
the error on a CKA value.

numba is required here on purpose (no skip): CI installs it, and a missing numba must fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from alignment_callback.functional import _compiled, gram_null
from alignment_callback.functional.gram_measures import linear_state, unbiased_state
from alignment_callback.functional.gram_null import gram_dots, gram_dots_layers, use_backend

BACKENDS = ("numba", "torch")
RTOL = 1e-12


def _sym(n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=torch.float64).to(dtype)
    return m + m.T  # exactly symmetric in any dtype


def _perms(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(count)])


def _reference(a: torch.Tensor, b: torch.Tensor, perms: torch.Tensor):
    """(values, scales): float64 NumPy ``(A * B[ix_(π, π)]).sum()`` and ``Σ|A * B[ix_(π, π)]|``."""
    A, B = a.double().numpy(), b.double().numpy()
    terms = [A * B[np.ix_(p, p)] for p in perms.numpy()]
    return np.array([t.sum() for t in terms]), np.array([np.abs(t).sum() for t in terms])


def _assert_close(got: torch.Tensor, ref: np.ndarray, scale: np.ndarray, rtol: float = RTOL) -> None:
    assert got.dtype == torch.float64
    err = np.abs(got.numpy() - ref)
    assert np.all(err <= rtol * scale + 1e-300), f"max relative error {np.max(err / scale):.2e}"


def test_numba_is_installed():
    assert gram_null.numba_available(), (
        "numba is a dependency of the fast gram null (CI installs it): pip install numba"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 3, 17, 64, 257])
def test_values_match_the_definition(n, dtype, backend):
    gen = torch.Generator().manual_seed(n)
    a, b = _sym(n, gen, dtype), _sym(n, gen, dtype)
    for count in (1, 5, 300):
        perms = _perms(n, count, gen)
        ref, scale = _reference(a, b, perms)
        got = gram_dots(a, b, perms, backend=backend)
        assert got.shape == (count,)
        _assert_close(got, ref, scale)
        if backend == "numba" and count == 5:  # the full-definition kernel as well
            _assert_close(gram_dots(a, b, perms, backend=backend, symmetric=False), ref, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_gives_the_frobenius_product(dtype, backend):
    gen = torch.Generator().manual_seed(1)
    a, b = _sym(100, gen, dtype), _sym(100, gen, dtype)
    got = gram_dots(a, b, torch.arange(100)[None], backend=backend)
    A, B = a.double().numpy(), b.double().numpy()
    _assert_close(got, np.array([(A * B).sum()]), np.array([np.abs(A * B).sum()]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_match_the_definition(backend):
    gen = torch.Generator().manual_seed(2)
    n = 65
    fixed = [_sym(n, gen, torch.float32), _sym(n, gen, torch.float32)]
    moved = [_sym(n, gen, torch.float32) for _ in range(3)]
    perms = _perms(n, 7, gen)
    got = gram_dots_layers(fixed, moved, perms, backend=backend)
    assert got.shape == (7, 3, 2) and got.dtype == torch.float64
    for b_, mb in enumerate(moved):
        for a_, fa in enumerate(fixed):
            ref, scale = _reference(fa, mb, perms)
            _assert_close(got[:, b_, a_], ref, scale)
    # a stacked (L, n, n) tensor is used as is and gives the same numbers
    stacked = gram_dots_layers(torch.stack(fixed), torch.stack(moved), perms, backend=backend)
    assert torch.equal(stacked, got)
    # mixed float32 / float64 layers: float32 values are widened exactly
    mixed = gram_dots_layers([fixed[0], fixed[1].double()], moved, perms, backend=backend)
    _assert_close(mixed[:, 2, 1], *_reference(fixed[1], moved[2], perms))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("la,lb", [(4, 1), (1, 4), (4, 4), (5, 6), (6, 5), (9, 8)])
def test_layer_shapes_of_the_register_blocks(la, lb, symmetric):
    """The numba kernel dots in 4×4 / 1×4 / 4×1 / 1×1 blocks: every remainder is covered."""
    gen = torch.Generator().manual_seed(la * 10 + lb)
    n = 33
    fixed = torch.stack([_sym(n, gen, torch.float32) for _ in range(la)])
    moved = torch.stack([_sym(n, gen, torch.float32) for _ in range(lb)])
    perms = _perms(n, 3, gen)
    got = gram_dots_layers(fixed, moved, perms, symmetric=symmetric, backend="numba")
    for b_ in range(lb):
        for a_ in range(la):
            _assert_close(got[:, b_, a_], *_reference(fixed[a_], moved[b_], perms))


def test_layers_equal_single_products():
    gen = torch.Generator().manual_seed(3)
    fixed = [_sym(40, gen) for _ in range(3)]
    moved = [_sym(40, gen) for _ in range(2)]
    perms = _perms(40, 20, gen)
    got = gram_dots_layers(fixed, moved, perms)
    for b_, mb in enumerate(moved):
        for a_, fa in enumerate(fixed):
            scale = torch.as_tensor(_reference(fa, mb, perms)[1])
            assert torch.all((got[:, b_, a_] - gram_dots(fa, mb, perms)).abs() <= RTOL * scale)


@pytest.mark.parametrize("layers", [False, True])
def test_numba_and_torch_agree(layers):
    gen = torch.Generator().manual_seed(4)
    n = 300
    perms = _perms(n, 64, gen)
    if layers:
        fixed = [_sym(n, gen, torch.float32) for _ in range(2)]
        moved = [_sym(n, gen, torch.float32) for _ in range(3)]
        nb = gram_dots_layers(fixed, moved, perms, backend="numba")
        tc = gram_dots_layers(fixed, moved, perms, backend="torch")
        scale = np.array([[_reference(f, m, perms)[1] for f in fixed] for m in moved])  # (LB, LA, P)
        scale = torch.as_tensor(scale).permute(2, 0, 1)
    else:
        a, b = _sym(n, gen, torch.float32), _sym(n, gen, torch.float32)
        nb = gram_dots(a, b, perms, backend="numba")
        tc = gram_dots(a, b, perms, backend="torch")
        scale = torch.as_tensor(_reference(a, b, perms)[1])
    assert torch.all((nb - tc).abs() <= RTOL * scale)


def _centered(x: torch.Tensor, state) -> torch.Tensor:
    m = state(x).matrix
    return (m + m.T) / 2  # exactly symmetric (the floating-point H K H is not, by an ulp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", [linear_state, unbiased_state])
def test_aligned_and_independent_grams(state, backend):
    """Real centered grams: y = x + small noise (CKA near 1) and an independent y (near 0)."""
    gen = torch.Generator().manual_seed(5)
    n, d = 200, 32
    x = torch.randn(n, d, generator=gen)
    a = _centered(x, state)
    aligned = _centered(x + 1e-3 * torch.randn(n, d, generator=gen), state)
    independent = _centered(torch.randn(n, d, generator=gen), state)
    perms = torch.cat([torch.arange(n)[None], _perms(n, 30, gen)])
    for b in (aligned, independent):
        ref, scale = _reference(a, b, perms)
        got = gram_dots(a, b, perms, backend=backend)
        _assert_close(got, ref, scale)
    # B ≈ A: at the identity the product is ≈ ‖A‖² and has no cancellation: relative to itself
    got = gram_dots(a, aligned, perms[:1], backend=backend)
    ref = _reference(a, aligned, perms[:1])[0]
    assert abs(got.item() - ref[0]) <= RTOL * abs(ref[0])
    cka = got.item() / (a.double().norm() * aligned.double().norm()).item()
    assert 0.999 < cka <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonsymmetric_inputs_with_symmetric_false_follow_the_definition(backend):
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(50, 50, generator=gen)
    b = torch.randn(50, 50, generator=gen)
    perms = _perms(50, 9, gen)
    _assert_close(gram_dots(a, b, perms, symmetric=False, backend=backend), *_reference(a, b, perms))


class _CountCalls(TorchFunctionMode):
    """Counts every torch function / Tensor method call (and notes host synchronizations)."""

    SYNCS = {"item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu"}

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if getattr(func, "__name__", "") in self.SYNCS:
            self.syncs.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,n", [("auto", 1024), ("torch", 256)])
def test_at_most_one_torch_call_per_permutation(backend, n, monkeypatch):
    """A null of K = 1000 permutations in chunks of 256, as the caller passes them."""
    gen = torch.Generator().manual_seed(7)
    a, b = _sym(n, gen, torch.float32), _sym(n, gen, torch.float32)
    perms = _perms(n, 1000, gen)
    chunks = perms.split(256)
    if backend == "torch":  # the batch size of an accelerator (on the CPU batches stay small)
        monkeypatch.setattr(gram_null, "TORCH_BATCH_BYTES_CPU", gram_null.TORCH_BATCH_BYTES)
    gram_dots(a, b, chunks[0][:1], backend=backend)  # compile outside the count
    with _CountCalls() as counter:
        parts = [gram_dots(a, b, chunk, backend=backend) for chunk in chunks]
    assert counter.calls <= 1000, f"{counter.calls} torch calls for 1000 permutations"
    if backend == "torch":
        assert not counter.syncs, f"host synchronizations in the torch backend: {counter.syncs}"
    null = torch.cat(parts)
    ref, scale = _reference(a, b, perms[::97])
    _assert_close(null[::97], ref, scale)


def test_torch_backend_batches_give_the_same_numbers(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    n = 70
    fixed = [_sym(n, gen, torch.float32) for _ in range(2)]
    moved = [_sym(n, gen, torch.float32) for _ in range(2)]
    perms = _perms(n, 11, gen)
    ref, scale = _reference(fixed[1], moved[0], perms)
    for budget in (30 * n * n * 20, 3 * n * 20, 1):  # several perms / row blocks / one row
        monkeypatch.setattr(gram_null, "TORCH_BATCH_BYTES_CPU", budget)
        got = gram_dots_layers(fixed, moved, perms, backend="torch")
        _assert_close(got[:, 0, 1], ref, scale)


def test_results_do_not_depend_on_threads():
    gen = torch.Generator().manual_seed(9)
    a, b = _sym(400, gen, torch.float32), _sym(400, gen, torch.float32)
    perms = _perms(400, 100, gen)
    one = gram_dots(a, b, perms, backend="numba")
    torch.set_num_threads(2)  # the autouse fixture restores the thread count
    two = gram_dots(a, b, perms, backend="numba")
    assert torch.get_num_threads() == 2  # the library never changes it
    assert torch.equal(one, two)


def test_edge_cases_and_bad_input():
    gen = torch.Generator().manual_seed(10)
    a = _sym(6, gen)
    for backend in BACKENDS:
        assert gram_dots(a, a, torch.empty(0, 6, dtype=torch.long), backend=backend).shape == (0,)
        one = torch.tensor([[2.0]])
        assert gram_dots(one, 3 * one, torch.zeros(1, 1, dtype=torch.long), backend=backend).item() == 12.0
        int32 = gram_dots(a, a, torch.arange(6, dtype=torch.int32)[None], backend=backend)
        assert torch.allclose(int32, (a * a).sum()[None].double(), rtol=1e-15)
        half = gram_dots(a.bfloat16(), a.bfloat16(), torch.arange(6)[None], backend=backend)
        assert torch.allclose(half, (a.bfloat16().double() ** 2).sum()[None], rtol=1e-15)
    with pytest.raises(ValueError, match="not permutations"):
        gram_dots(a, a, torch.tensor([[0, 1, 2, 3, 4, 4]]), backend="numba")
    with pytest.raises(ValueError, match="not permutations"):
        gram_dots(a, a, torch.tensor([[0, 1, 2, 3, 4, 6]]), backend="numba")
    with pytest.raises(ValueError, match="perms must be"):
        gram_dots(a, a, torch.arange(5)[None])
    with pytest.raises(TypeError, match="integer"):
        gram_dots(a, a, torch.zeros(1, 6))
    with pytest.raises(ValueError, match="same shape"):
        gram_dots(a, _sym(5, gen), torch.arange(6)[None])
    with pytest.raises(ValueError, match="square"):
        gram_dots(a[:3], a, torch.arange(6)[None])
    with pytest.raises(ValueError, match="backend"):
        gram_dots(a, a, torch.arange(6)[None], backend="cuda")
    with pytest.raises(ValueError, match="at least one"):
        gram_dots_layers([], [a], torch.arange(6)[None])


def test_use_backend_switches_the_default(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    a, b = _sym(30, gen, torch.float32), _sym(30, gen, torch.float32)
    perms = _perms(30, 4, gen)
    used = []
    real = gram_null._torch_dots
    monkeypatch.setattr(gram_null, "_torch_dots", lambda *args: used.append(1) or real(*args))
    gram_dots(a, b, perms)
    assert not used  # auto on CPU with numba installed
    with use_backend("torch"):
        gram_dots(a, b, perms)
    assert used == [1] and gram_null.default_backend == "auto"


def test_auto_falls_back_to_torch_without_numba(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    a, b = _sym(30, gen, torch.float32), _sym(30, gen, torch.float32)
    perms = _perms(30, 4, gen)
    expected = gram_dots(a, b, perms, backend="torch")
    monkeypatch.setitem(_compiled._loaded, "_gram_null_numba",
                        ModuleNotFoundError("No module named 'numba'"))
    assert not gram_null.numba_available()
    assert torch.equal(gram_dots(a, b, perms), expected)
    with pytest.raises(ImportError, match="needs numba"):
        gram_dots(a, b, perms, backend="numba")


def test_a_stalled_helper_thread_does_not_stall_the_call():
    """A helper descheduled mid-task (here: sleeping) is covered by the calling thread."""
    import threading
    import time

    from alignment_callback.functional._tasks import run_tasks

    main = threading.get_ident()
    stalled = []

    def task(t):
        if threading.get_ident() != main and not stalled:
            stalled.append(t)
            time.sleep(2.0)
        else:
            time.sleep(0.02)
        return np.full(3, float(t))

    start = time.perf_counter()
    results = run_tasks(task, 6, threads=2)
    elapsed = time.perf_counter() - start
    assert [r[0] for r in results] == list(range(6))
    assert stalled, "the helper thread took no task"
    assert elapsed < 1.0, f"the call waited {elapsed:.2f} s for the stalled helper"
