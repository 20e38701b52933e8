"""Device handling that would fail only on a GPU, checked without one: ``meta`` tensors stand
for a CUDA device (an operation mixing them with CPU tensors of more than 0 dimensions raises,
as with CUDA tensors), and the order-statistic branch taken under the deterministic mode on
CUDA is run on the CPU.  The same paths on a real GPU are in tests/test_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment_callback.functional import kernels
from alignment_callback.functional.aggregation import aggregate_fn
from alignment_callback.functional.moments import pearson3


def test_pearson3_arguments_join_the_device_of_a_tensor_argument():
    """``pearson3_sf(t_on_gpu, 0.3, 0.1, 0.5)`` broadcast the numbers to CPU vectors, which
    then met the GPU vector."""
    t = torch.zeros(5, device="meta")
    out = pearson3._as64(t, 0.3, torch.tensor(0.1), torch.tensor([0.5] * 5))
    assert {x.device.type for x in out} == {"meta"} and {x.dtype for x in out} == {torch.float64}
    assert [tuple(x.shape) for x in out] == [(5,)] * 4
    assert {x.device.type for x in pearson3._as64(0.2, torch.tensor([0.1, 0.2]))} == {"cpu"}


def test_a_callable_aggregate_returning_a_float_stays_on_the_matrices_device():
    _, fn = aggregate_fn(lambda m: float(m.numel()))
    scores = torch.zeros(3, 2, 2, device="meta")
    out = fn(scores)
    assert out.device.type == "meta" and tuple(out.shape) == (3,)


@pytest.mark.parametrize("values", [
    [3.0, 1.0, 2.0], [4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 2.0, 2.0], [5.0, 5.0, 5.0, 1.0],
    list(np.random.default_rng(0).integers(0, 4, 30).astype(float)),
    list(np.random.default_rng(1).standard_normal(41)),
])
def test_the_median_read_off_a_sort_equals_numpy_s(monkeypatch, values):
    """Where ``kthvalue`` may refuse (CUDA under the deterministic mode, torch < 2.10) the
    lower middle value comes from a sort: the median is NumPy's either way."""
    x = torch.tensor(values, dtype=torch.float64)
    expected = float(np.median(np.array(values)))
    assert float(kernels.median(x)) == expected
    monkeypatch.setattr(kernels, "_kthvalue_may_refuse", lambda t: True)
    assert float(kernels.median(x)) == expected


def test_kthvalue_is_avoided_only_off_the_cpu_under_the_deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert kernels._kthvalue_may_refuse(torch.zeros(3, device="meta"))
        assert not kernels._kthvalue_may_refuse(torch.zeros(3))
        torch.use_deterministic_algorithms(False)
        assert not kernels._kthvalue_may_refuse(torch.zeros(3, device="meta"))
    finally:
        torch.use_deterministic_algorithms(before)


def test_the_validity_rule_takes_tied_flags_from_the_cpu_with_device_moments():
    skew = torch.tensor([0.1, 0.1, 3.0], device="meta")
    ok = pearson3.pearson3_valid(40, skew, 0.0, tied=torch.tensor([False, True, False]))
    assert ok.device.type == "meta" and ok.dtype == torch.bool
    cpu = pearson3.pearson3_valid(40, torch.tensor([0.1, 0.1, 3.0]), 0.0,
                                  tied=torch.tensor([False, True, False]))
    assert cpu.tolist() == [True, False, False]
