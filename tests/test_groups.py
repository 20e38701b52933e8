"""Block permutations (``groups=``): labels of one kind, labels copied when drawn, and the
warning when too few block permutations exist for ``alpha``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import alignment_callback.functional as F
from alignment_callback.engine import AlignmentEngine
from alignment_callback.metrics import CalibratedAlignment

N = 24


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 5, generator=g)
    return x, x + 0.05 * torch.randn(N, 5, generator=g)


def test_labels_mixing_numbers_and_strings_are_refused():
    """NumPy made ``[1, "1", 2, "2", ...]`` strings: 1 and "1" became one group, silently."""
    x, y = _pair()
    with pytest.raises(ValueError, match="all numbers or all strings.*a mix of int, str"):
        F.calibrated_alignment(x, y, "linear_cka", num_permutations=19,
                               groups=[1, "1", 2, "2"] * (N // 4))
    with pytest.raises(ValueError, match="a mix of int, str"):
        CalibratedAlignment("linear_cka", groups=np.array([1, "a"] * (N // 2), dtype=object))


def test_labels_changed_in_place_are_drawn_again_by_the_engine():
    """The engine compared the labels by identity and the permutation set held the caller's
    array: after an in-place change the old permutations were used with the new labels."""
    x, y = _pair()
    labels = np.arange(N) % 12  # 12 pairs: 12! block permutations
    engine = AlignmentEngine(["linear_cka"], num_permutations=99, groups=labels)
    engine.set_reference({"r": y})
    engine.step({"m": x})
    labels[:] = np.arange(N) % 6  # 6 groups of four
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = engine.step({"m": x}).results["linear_cka"]
    new = AlignmentEngine(["linear_cka"], num_permutations=99, groups=np.arange(N) % 6)
    new.set_reference({"r": y})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fresh = new.step({"m": x}).results["linear_cka"]
    assert float(got.p_value) == float(fresh.p_value)
    assert torch.equal(got.null, fresh.null)


@pytest.mark.parametrize("sizes,count", [([8, 8, 8], 6), ([6, 6, 6, 3, 3], 12)])
def test_too_few_block_permutations_for_alpha_are_warned(sizes, count):
    """Three groups of eight: 6 block permutations, the identity a sixth of the draws, so p
    is about 1/6 and every calibrated score 0 for strongly aligned data, without a word."""
    x, y = _pair()
    groups = np.repeat(np.arange(len(sizes)), sizes)  # M = Π_s (groups of size s)!
    with pytest.warns(UserWarning, match=rf"groups allow only {count} distinct block "
                                         rf"permutations.*every calibrated score is 0"):
        r = F.calibrated_alignment(x, y, "linear_cka", num_permutations=500, groups=groups)
    assert float(r.p_value) > 0.05 and float(r.calibrated) == 0.0
    assert float(r.p_value) >= 1 / count - 0.05  # the identity draws: about 1/count
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 12 pairs: 12! block permutations
        F.calibrated_alignment(x, y, "linear_cka", num_permutations=99,
                               groups=np.arange(N) // 2)
