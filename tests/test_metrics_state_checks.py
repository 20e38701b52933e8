"""The metric objects check what they are given when it is given: constructor options, rows
loaded with ``load_state_dict`` and raw states merged with ``merge_state``, so that a mistake is
one clear error naming the argument, not a torch size error at ``compute()``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import Tensor

from alignment_callback.metrics import CalibratedAlignment, LayerAlignment

K = 19
N = 40


def pair(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 6, generator=g) + 0.5 * torch.randn(n, 6, generator=g)
    return x, y


def test_load_state_dict_takes_the_width_of_the_loaded_rows() -> None:
    x, y = pair()
    src = CalibratedAlignment("linear_cka", num_permutations=K)
    src.persistent(True)
    src.update(x[:20, :5], y[:20])
    dst = CalibratedAlignment("linear_cka", num_permutations=K)
    dst.persistent(True)
    dst.update(x[:20], y[:20])  # width 8, replaced by the loaded width-5 rows
    dst.load_state_dict(src.state_dict())
    dst.update(x[20:, :5], y[20:])  # the width of the rows it holds now
    with pytest.raises(ValueError, match=r"has \(8,\) features in this batch but 5"):
        dst.update(x[20:], y[20:])
    whole = CalibratedAlignment("linear_cka", num_permutations=K)
    whole.update(x[:, :5], y)
    for key, value in whole.compute().items():
        torch.testing.assert_close(dst.compute()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("layers", ["enc", ["enc", 3], [1, 2]])
def test_layer_names_must_be_a_sequence_of_strings(layers) -> None:
    with pytest.raises(TypeError, match="x_layers must be a sequence of layer names"):
        LayerAlignment(x_layers=layers)
    with pytest.raises(TypeError, match="y_layers must be a sequence of layer names"):
        LayerAlignment(y_layers=layers)


def test_layer_names_from_any_iterable_of_strings() -> None:
    x, y = pair()
    layers = {"enc": x, "dec": x[:, :4]}
    for names in (layers.keys(), np.array(["enc", "dec"]), ("enc", "dec")):
        m = LayerAlignment("linear_cka", num_permutations=K, x_layers=names, y_layers=["r"])
        assert m.x_layers == ["enc", "dec"] and all(type(n) is str for n in m.x_layers)
        m.update(layers, {"r": y})
        assert torch.isfinite(m.compute()["raw"])


def test_merge_state_names_the_slots_of_a_calibrated_alignment() -> None:
    m = CalibratedAlignment("linear_cka", num_permutations=K)
    with pytest.raises(ValueError, match=r"slot\(s\) \['x1'\].*it holds the slots \['x0', 'y0'\]"):
        m.merge_state({"x0": [torch.randn(4, 3)], "x1": [torch.randn(4, 3)],
                       "y0": [torch.randn(4, 3)], "index": []})


def test_max_samples_takes_numpy_integers_and_names_itself() -> None:
    x, y = pair()
    m = CalibratedAlignment("linear_cka", num_permutations=K, max_samples=np.int64(30))
    assert m.max_samples == 30 and type(m.max_samples) is int
    with pytest.raises(ValueError, match="max_samples=30"):
        m.update(x, y)
    for bad in (1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="max_samples must be an integer >= 2"):
            CalibratedAlignment(max_samples=bad)


@pytest.mark.parametrize("option, message", [
    ({"clamp_quantile": 2.0}, r"clamp_quantile must be a number in \(0, 1\], got 2.0"),
    ({"clamp_quantile": "0.9"}, r"clamp_quantile must be a number in \(0, 1\]"),
    ({"pool": "bogus"}, "preprocess: unknown pool 'bogus'"),
    ({"normalize": "yes"}, "preprocess: normalize must be True or False, got 'yes'"),
])
def test_preprocess_options_are_checked_by_the_constructor(option, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        CalibratedAlignment("linear_cka", preprocess=option)


def test_preprocess_options_that_are_valid_still_apply() -> None:
    x, y = pair()
    options = {"clamp_quantile": np.float64(0.9), "normalize": torch.tensor(False)}
    m = CalibratedAlignment("linear_cka", num_permutations=K, preprocess=options)
    m.update(x, y)
    assert torch.isfinite(m.compute()["raw"])


@pytest.mark.parametrize("option", [{"aggregate": "mean"}, {"x_layers": ["a"]},
                                    {"y_layers": ["b"]}])
def test_calibrated_alignment_refuses_layer_options(option) -> None:
    (name,) = option
    with pytest.raises(TypeError, match=f"scores one pair.*takes no {name}.*LayerAlignment"):
        CalibratedAlignment("linear_cka", **option)


def test_merge_state_with_a_dict_checks_widths_and_rows() -> None:
    x, y = pair()
    a = CalibratedAlignment("linear_cka", num_permutations=K)
    a.update(x[20:], y[20:])
    with pytest.raises(ValueError, match=r"merge_state: x layer slot x0 has rows of shape "
                                         r"\(20, 5\); this metric's rows have 8 features"):
        a.merge_state({"x0": [torch.randn(20, 5)], "y0": [torch.randn(20, 6)], "index": []})
    with pytest.raises(ValueError, match=r"merge_state: the dict holds 20 x rows and 15 y rows"):
        a.merge_state({"x0": [torch.randn(20, 8)], "y0": [torch.randn(15, 6)], "index": []})
    fresh = LayerAlignment("linear_cka", num_permutations=K)  # no layers known yet
    with pytest.raises(ValueError, match=r"merge_state: the dict holds rows of layer slot\(s\) "
                                         r"\['x0', 'y0'\] that this LayerAlignment has not"):
        fresh.merge_state({"x0": [x[:20]], "y0": [y[:20]], "index": []})
    assert a._stored_rows("x") == 20 and a._stored_rows("y") == 20  # nothing merged
    b = CalibratedAlignment("linear_cka", num_permutations=K)
    b.update(x[:20], y[:20])
    a.merge_state({"x0": b.x0, "y0": b.y0, "index": b.index})  # a valid dict merges as before
    whole = CalibratedAlignment("linear_cka", num_permutations=K)
    whole.update(x, y)
    for key, value in whole.compute().items():
        torch.testing.assert_close(a.compute()[key], value, rtol=0, atol=0)


def test_compute_before_update_is_one_clear_error_without_a_warning() -> None:
    m = CalibratedAlignment("linear_cka", num_permutations=K)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=r"compute\(\) found no accumulated rows"):
            m.compute()


def test_too_few_permutations_warn_once_at_construction() -> None:
    """K below (1 - α)/α is a setting: the metric warned at every ``compute()``, and not when
    it was made.  Now once, at construction, pointing at the line that made it."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metric = CalibratedAlignment("linear_cka", num_permutations=9)
        assert [w.filename for w in caught if "is too few" in str(w.message)] == [__file__]
        for _ in range(2):
            metric.update(x, y)
            metric.compute()
        CalibratedAlignment("linear_cka", num_permutations=9, null="moments")
    assert len([w for w in caught if "is too few" in str(w.message)]) == 1
