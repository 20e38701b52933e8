"""Regression tests of a newcomer audit of the functional API, the metric objects and the docs.

* docs/plain_pytorch.md "Logging with Lightning": a runnable recipe that logs ``forward()``'s
  value only when there is one and ``compute()``'s scalars only;
* the deprecated ``metric=`` next to ``measure=`` (even at its default value) is a ``TypeError``
  instead of silently winning;
* ``alpha=`` next to ``"shape_metric"`` (whose option is called ``alpha`` too) is a
  ``TypeError`` instead of silently setting the test level;
* ``calibrated_layer_alignment`` with one tensor: docstring and message agree (refused);
* ``reference="inital"``: an error naming the argument, with a suggestion;
* ``LayerAlignment``: loading rows without ``x_layers`` / ``y_layers``, and a layer-name
  mismatch against ``x_layers``, say what to do;
* README's τ is the order statistic of the combined set {s, s_1..s_K} (docs/calibration.md).
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import alignment_callback.functional as F
from alignment_callback.functional.aggregation import named_layers
from alignment_callback.metrics import CalibratedAlignment, LayerAlignment
from tests import numpy_reference_families as fam

ROOT = Path(__file__).resolve().parent.parent
K = 19
CONFLICT = "give measure= or its deprecated name metric=, not both"


def pair(n: int = 40, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = x @ torch.randn(8, 6, generator=g, dtype=torch.float64)
    return x, y + 0.5 * torch.randn(n, 6, generator=g, dtype=torch.float64)


def order_statistic_tau(raw: float, null: Tensor, alpha: float) -> float:
    """τ from the definition (docs/calibration.md): the ⌈(1 − α)(K + 1)⌉-th smallest value of
    the combined multiset {s, s_1..s_K}, in float64 NumPy."""
    combined = np.sort(np.concatenate([[raw], null.double().numpy().reshape(-1)]))
    return float(combined[math.ceil((1.0 - alpha) * combined.size) - 1])


# ------------------------------------------------------------------ 1. Lightning recipe
def lightning_recipe() -> str:
    text = (ROOT / "docs" / "plain_pytorch.md").read_text(encoding="utf-8")
    section = text[text.index("**Logging with Lightning.**"):]
    return re.search(r"^```python[ \t]*\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)


def test_lightning_recipe_is_a_runnable_snippet_that_guards_none_and_non_scalars():
    """tests/test_docs_snippets.py runs the recipe in a tiny Lightning fit (a last batch of 5
    rows, which forward() cannot score); here: it is marked runnable and the entries it leaves
    out are exactly LayerAlignment.compute()'s non-scalar ones."""
    code = lightning_recipe()
    assert code.lstrip().startswith("# runnable")
    assert "if raw is not None:" in code and "trainer.fit(" in code
    left_out = eval(re.search(r"^NOT_SCALARS = (\(.*?\))", code, re.MULTILINE).group(1))
    x, y = pair()
    metric = LayerAlignment("linear_cka", num_permutations=K)
    metric.update({"a": x, "b": x[:, :4]}, {"r": y, "s": y[:, :3]})
    out = metric.compute()
    assert set(left_out) == {key for key, value in out.items() if value.dim() > 0}


def test_forward_returns_none_where_the_recipe_says():
    x, y = pair()
    metric = CalibratedAlignment("mutual_knn", num_permutations=K)  # k = 10
    assert metric(x[:10], y[:10]) is None  # no more than k rows
    assert metric(x[:20], y[:20]) is not None
    zero = x[:20].clone()
    zero[3] = 0.0
    assert metric(zero, y[:20]) is None  # an all-zero row cannot be L2-normalized
    cached = CalibratedAlignment("mutual_knn", num_permutations=K)
    cached.set_reference(y)
    assert cached(x[:20], index=torch.arange(20)) is None


def test_lightning_recipe_runs(monkeypatch, tmp_path):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(lightning_recipe(), "plain_pytorch.md: Logging with Lightning", "exec"), namespace)
    logged = namespace["trainer"].callback_metrics
    assert "val/knn_batch_raw" in logged and "val/cka_calibrated" in logged
    assert not any(key.endswith(("matrix", "argmax", "pair_calibrated")) for key in logged)


# ------------------------------------------------------------ 3. metric= next to measure=
@pytest.mark.parametrize("measure", ["mutual_knn", "linear_cka", "rsa"])
def test_metric_next_to_measure_is_an_error_in_the_functional_api(measure):
    """Even the functions' default value, given explicitly, counts as given."""
    x, y = pair()
    with pytest.raises(TypeError, match=CONFLICT):
        F.calibrated_alignment(x, y, measure=measure, metric="cknna", num_permutations=K)
    with pytest.raises(TypeError, match=CONFLICT):
        F.calibrated_alignment(x, y, measure, metric="cknna", num_permutations=K)
    with pytest.raises(TypeError, match=CONFLICT):
        F.calibrated_layer_alignment([x], [y], measure, metric="cknna", num_permutations=K)
    with pytest.raises(TypeError, match=CONFLICT):
        F.permutation_null(x, y, measure=measure, metric="cknna", num_permutations=K)


@pytest.mark.parametrize("cls", [CalibratedAlignment, LayerAlignment])
@pytest.mark.parametrize("measure", ["mutual_knn", "linear_cka"])
def test_metric_next_to_measure_is_an_error_in_the_metric_objects(cls, measure):
    with pytest.raises(TypeError, match=CONFLICT):
        cls(measure=measure, metric="cknna")
    with pytest.raises(TypeError, match=CONFLICT):
        cls(measure, metric="cknna")


def test_metric_alone_still_works_and_defaults_still_read_as_plain_values():
    from alignment_callback.functional.registry import is_default

    x, y = pair()
    with pytest.warns(DeprecationWarning, match="metric= argument is now called measure="):
        old = F.calibrated_alignment(x, y, metric="linear_cka", num_permutations=K)
    new = F.calibrated_alignment(x, y, "linear_cka", num_permutations=K)
    assert float(old.raw) == float(new.raw) and float(old.p_value) == float(new.p_value)
    with pytest.warns(DeprecationWarning):
        assert CalibratedAlignment(metric="cknna").measure.name == "cknna"
    left_out = F.calibrated_alignment(x, y, num_permutations=K)
    assert float(left_out.raw) == float(F.calibrated_alignment(x, y, "mutual_knn",
                                                                num_permutations=K).raw)
    defaults = {fn: inspect.signature(fn).parameters["measure"].default
                for fn in (F.calibrated_alignment, F.calibrated_layer_alignment,
                           F.permutation_null, CalibratedAlignment, LayerAlignment)}
    assert defaults[F.calibrated_alignment] == "mutual_knn"
    assert repr(defaults[LayerAlignment]) == "'linear_cka'"
    assert all(is_default(value) for value in defaults.values())
    assert not is_default("mutual_knn")


def test_renamed_argument_serves_the_callbacks_measures_and_metrics():
    """The one line the callback's ``measures=`` / ``metrics=`` can use (default None)."""
    from alignment_callback.functional.registry import renamed_argument

    assert renamed_argument("measures", ["rsa"], "metrics", None) == ["rsa"]
    with pytest.warns(DeprecationWarning, match="metrics= argument is now called measures="):
        assert renamed_argument("measures", None, "metrics", ["rsa"]) == ["rsa"]
    with pytest.raises(TypeError, match="give measures= or its deprecated name metrics=, not both"):
        renamed_argument("measures", ["cknna"], "metrics", ["linear_cka"])


# ---------------------------------------------------------- 9. alpha next to shape_metric
SHADOWED = "alpha=.* is ambiguous.*measure 'shape_metric' has an option 'alpha'.*get_measure"


@pytest.mark.parametrize("alpha", [0.5, 0.01])
def test_alpha_next_to_shape_metric_is_an_error(alpha):
    """Its level or its whitening? Refused rather than guessed."""
    x, y = pair()
    with pytest.raises(TypeError, match="calibrated_alignment: " + SHADOWED):
        F.calibrated_alignment(x, y, "shape_metric", alpha=alpha, num_permutations=K)
    with pytest.raises(TypeError, match="calibrated_layer_alignment: " + SHADOWED):
        F.calibrated_layer_alignment([x], [y], "shape_metric", alpha=alpha, num_permutations=K)
    for cls in (CalibratedAlignment, LayerAlignment):
        with pytest.raises(TypeError, match=cls.__name__ + ": " + SHADOWED):
            cls("shape_metric", alpha=alpha)


def test_default_alpha_next_to_shape_metric_is_the_level():
    """0.05, given or forwarded (bootstrap_interval passes its own), is the conventional level:
    shape_metric keeps its default whitening 1.0."""
    from alignment_callback.functional.bootstrap import bootstrap_interval

    x, y = pair()
    given = F.calibrated_alignment(x, y, "shape_metric", alpha=0.05, num_permutations=K)
    assert float(given.raw) == pytest.approx(fam.shape_metric(x.numpy(), y.numpy(), 1.0), abs=1e-10)
    assert CalibratedAlignment("shape_metric", alpha=0.05).measure.params == (("alpha", 1.0),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few replicates: not the point here
        interval = bootstrap_interval(x, y, "shape_metric", num_bootstrap=2, num_permutations=K)
    assert interval.low <= interval.high


def test_shape_metric_option_and_level_through_get_measure():
    """The documented way: the measure's alpha in get_measure, the level in alpha=; values
    against float64 NumPy from the definitions."""
    x, y = pair(n=60)
    level = 0.1
    res = F.calibrated_alignment(x, y, F.get_measure("shape_metric", alpha=0.5), alpha=level,
                                 num_permutations=K)
    assert float(res.raw) == pytest.approx(fam.shape_metric(x.numpy(), y.numpy(), 0.5), abs=1e-10)
    assert float(res.threshold) == pytest.approx(order_statistic_tau(float(res.raw), res.null, level))
    metric = CalibratedAlignment(F.get_measure("shape_metric", alpha=0.5), alpha=level,
                                 num_permutations=K, preprocess=False)
    metric.update(x, y)
    out = metric.compute()
    assert float(out["raw"]) == pytest.approx(float(res.raw), abs=1e-10)
    assert float(out["threshold"]) == pytest.approx(float(res.threshold), abs=1e-10)
    default = CalibratedAlignment("shape_metric", num_permutations=K, preprocess=False)
    assert dict(default.measure.params) == {"alpha": 1.0} and default.alpha == 0.05
    default.update(x, y)
    raw = float(default.compute()["raw"])
    assert raw == pytest.approx(fam.shape_metric(x.numpy(), y.numpy(), 1.0), abs=1e-10)


# ---------------------------------------------------- 4. one tensor as a side's layers
def test_layers_refuse_one_tensor_and_say_so_consistently():
    x, y = pair()
    with pytest.raises(TypeError, match=r"not one tensor \(wrap a single layer as \[tensor\]"):
        F.calibrated_layer_alignment(x, [y], num_permutations=K)
    with pytest.raises(TypeError) as err:
        named_layers(3, "x")
    assert "must be a sequence or a mapping" in str(err.value)
    assert "a tensor, a sequence" not in str(err.value)
    doc = F.calibrated_layer_alignment.__doc__
    assert "or one tensor\n" not in doc and "One tensor is refused" in doc


# ------------------------------------------------------------- 5. reference path typos
def test_reference_typo_names_the_argument_and_suggests(tmp_path):
    from alignment_callback import AlignmentCallback

    probe = torch.randn(40, 8)
    with pytest.raises(FileNotFoundError,
                       match=r"^reference: no such file 'inital'; did you mean 'initial'\?$"):
        AlignmentCallback("inital", probe, "0")
    with pytest.raises(FileNotFoundError,
                       match=r"^reference\['b'\]: no such file 'previos'; did you mean 'previous'\?$"):
        AlignmentCallback({"a": "initial", "b": "previos"}, probe, "0")
    missing = str(tmp_path / "teacher.pt")
    with pytest.raises(FileNotFoundError, match=rf"^reference: no such file {re.escape(repr(missing))}$"):
        AlignmentCallback(missing, probe, "0")


# ------------------------------------------------------- 7. LayerAlignment layer names
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # loaded, not updated
def test_loading_rows_without_layer_names_says_to_pass_them():
    x, y = pair()
    source = LayerAlignment("linear_cka", num_permutations=K)
    source.persistent(True)
    source.update({"a": x}, {"r": y})
    state = source.state_dict()
    fresh = LayerAlignment("linear_cka", num_permutations=K)
    fresh.load_state_dict(state)  # the state names its layers: a fresh metric takes them
    assert fresh.x_layers == ["a"] and fresh.y_layers == ["r"]
    assert torch.equal(fresh.compute()["matrix"], source.compute()["matrix"])
    del state["_layer_names"]  # a state dict saved before the names were
    with pytest.raises(RuntimeError, match=r"x layer\(s\) \(x0\) but this LayerAlignment has no x "
                                           r"layers: pass x_layers=\[\.\.\.\]") as err:
        LayerAlignment("linear_cka").load_state_dict(state)
    assert "pass y_layers=[...]" in str(err.value)
    target = LayerAlignment("linear_cka", num_permutations=K, x_layers=["a"], y_layers=["r"])
    target.load_state_dict(state)  # the documented way still loads
    assert float(target.compute()["raw"]) == float(source.compute()["raw"])


def test_layer_name_mismatch_names_where_the_names_came_from():
    x, y = pair()
    named = LayerAlignment("linear_cka", x_layers=["a"], y_layers=["r"])
    with pytest.raises(ValueError, match=r"x layers \['b'\] do not match the names given in "
                                         r"x_layers \['a'\]"):
        named.update({"b": x}, {"r": y})
    learned = LayerAlignment("linear_cka")
    learned.update({"a": x}, {"r": y})
    with pytest.raises(ValueError, match=r"x layers \['b'\] do not match the first update's \['a'\]"):
        learned.update({"b": x}, {"r": y})


# ------------------------------------------------------------------- 10. README's τ
def test_readme_tau_is_the_order_statistic_of_the_combined_set():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| threshold τ |"))
    assert "⌈(1−α)(K+1)⌉" in row and "observed score" in row and "order statistic of the" not in row
    x, y = pair()
    res = F.calibrated_alignment(x, y, "linear_cka", num_permutations=K, alpha=0.2)
    assert float(res.threshold) == order_statistic_tau(float(res.raw), res.null, 0.2)


# ------------------------------------------------- the deprecated names: bootstrap and callback
def test_bootstrap_interval_refuses_measure_with_its_deprecated_name():
    from alignment_callback.functional.bootstrap import bootstrap_interval

    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="give measure= or its deprecated name metric=, not both"):
        bootstrap_interval(x, x, measure="linear_cka", metric="mutual_knn", num_bootstrap=40)
    with pytest.raises(TypeError, match="not both"):  # the default's value, given explicitly
        bootstrap_interval(x, x, measure="mutual_knn", metric="linear_cka", num_bootstrap=40)


def test_callback_refuses_measures_with_its_deprecated_name():
    from alignment_callback import AlignmentCallback
    from tests.helpers import RefMLP, make_probe

    with pytest.raises(TypeError, match="give measures= or its deprecated name metrics="):
        AlignmentCallback(RefMLP(), make_probe(), ["fc1"], measures=["cknna"],
                          metrics=["linear_cka"])
    with pytest.warns(DeprecationWarning, match="measures="):
        cb = AlignmentCallback(RefMLP(), make_probe(), ["fc1"], metrics=["linear_cka"])
    assert list(cb.measures) == ["linear_cka"]


def test_an_infinite_sigma_is_refused_when_the_measure_is_made():
    from alignment_callback.functional import get_measure

    with pytest.raises(ValueError, match="sigma must be a finite positive number"):
        get_measure("rbf_cka", sigma=float("inf"))


def test_bootstrap_interval_names_itself_for_an_ambiguous_alpha():
    from alignment_callback.functional.bootstrap import bootstrap_interval

    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"^bootstrap_interval: alpha=0\.1 is ambiguous"):
        bootstrap_interval(x, x, "shape_metric", num_bootstrap=40, alpha=0.1)
