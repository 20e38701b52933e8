"""The gram-family null at the hardware's limit, checked for what a test can check: float32
inputs give linear / RBF / unbiased CKA within 1e-6 of the same computation in float64, in the
measure and in every null value (n = 1024 and 4096; strongly aligned and independent pairs),
and a K = 1000 null of linear CKA costs at most one torch call per permutation on average.
Speed against the memory bound is measured by benchmarks/bench_threads.py."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import alignment_callback.functional as F
from alignment_callback.functional.permutation import Permutations
from alignment_callback.functional.pipeline import layer_nulls, prepare_side, side_features


def pair(n: int, d: int, aligned: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] + (
        0.05 if aligned else 10.0) * noise
    return F.prepare_features(x), F.prepare_features(y)


@pytest.mark.parametrize("n,perms", [(1024, 64), (4096, 8)])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "independent"])
@pytest.mark.parametrize("name,kw", [("linear_cka", {}), ("rbf_cka", {"sigma": "median"}),
                                     ("unbiased_cka", {})], ids=["linear", "rbf", "unbiased"])
@pytest.mark.filterwarnings("ignore:num_permutations=8 is too few")  # τ is not checked here
def test_float32_equals_float64_within_1e6(name, kw, n, perms, aligned):
    """The score and its permutation null, from one ``calibrated_alignment`` call per dtype;
    at n = 1024 also the functional measure, which returns that score bit for bit."""
    x64, y64 = pair(n, 64, aligned)
    res64 = F.calibrated_alignment(x64, y64, name, num_permutations=perms, seed=1, **kw)
    res32 = F.calibrated_alignment(x64.float(), y64.float(), name, num_permutations=perms,
                                   seed=1, **kw)
    value64, value32 = float(res64.raw), float(res32.raw)
    if n == 1024:
        assert float(getattr(F, name)(x64.float(), y64.float(), **kw)) == value32
        assert float(getattr(F, name)(x64, y64, **kw)) == value64
    assert abs(value32 - value64) <= 1e-6, (value32, value64)
    if aligned and name == "linear_cka":
        assert value64 > 0.95  # strongly aligned indeed
    assert res32.null.dtype == torch.float32 and res64.null.dtype == torch.float64
    assert float((res32.null.double() - res64.null).abs().max()) <= 1e-6


class _Count(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_at_most_one_torch_call_per_permutation_for_linear_cka():
    x, y = pair(512, 32, aligned=False)
    m = F.get_measure("linear_cka")
    xs = prepare_side(*side_features([x], "x"), [m], "x")
    ys = prepare_side(*side_features([y], "y"), [m], "y")
    perms = Permutations(512, 1000, seed=0)
    perms.tensor()  # drawing the permutations is not part of the null's per-permutation cost
    with _Count() as count:
        null = layer_nulls([m], xs, ys, perms)[m]
    assert null.shape == (1000, 1, 1)
    assert count.calls / 1000 <= 1.0, count.calls
