"""A failed alignment step changes no later value, and a configuration mistake the first probe
pass shows fails before training.

* ``reference="initial"`` measures drift from the activations at the start of the fit: when
  the step there fails (its own preparation, its null, or another reference's step), or
  without a baseline, later steps still compare with those activations (before, the next
  step's activations became the start, which then scored 1.0 against itself);
* ``reference="previous"`` compares with the last step in the history: a step that failed on
  another reference does not move it, whatever order the references are listed in;
* a probe the model in training cannot take, and a measure option its layer widths cannot
  take, are raised whatever ``on_error`` says (before, every step warned and the fit ended
  with an empty history).
"""

from __future__ import annotations

import pytest

from alignment_callback.callback import ProbeInputError
from alignment_callback.functional import ShapeOptionError
from tests.helpers import IN_DIM, MLP, RefMLP, make_probe
from tests.test_callback_audit_fixes import PROBE, callback, fit


def _engine(cb, name=None):
    return next(ref.engine for ref in cb.references if ref.name == name)


def _fail(engine, method: str, epochs=None) -> None:
    """``engine.<method>`` raises ``MemoryError`` on its first call (``epochs``: on the calls
    of those epochs; ``step`` only)."""
    original, calls = getattr(engine, method), []

    def failing(*args, **kwargs):
        calls.append(1)
        due = len(calls) == 1 if epochs is None else kwargs.get("epoch") in epochs
        if due:
            raise MemoryError(f"injected into {method}")
        return original(*args, **kwargs)

    setattr(engine, method, failing)


def _values(cb, key: str) -> dict[int, float]:
    return {h["epoch"]: h[key] for h in cb.history if key in h}


# ------------------------------------------------------------------------------- "initial"
@pytest.mark.parametrize("where", ["set_reference", "step"])
def test_initial_measures_from_the_start_when_its_first_step_fails(where):
    key = "alignment/linear_cka/layer/fc2/raw"
    clean = callback(reference="initial", layers=["fc2"])
    fit([clean], model=MLP(lr=0.5), max_epochs=3)
    failed = callback(reference="initial", layers=["fc2"])
    _fail(_engine(failed), where)
    with pytest.warns(RuntimeWarning, match=f"epoch 0 .* skipped: MemoryError: injected into "
                                            f"{where}"):
        fit([failed], model=MLP(lr=0.5), max_epochs=3)
    assert [s["epoch"] for s in failed.skipped] == [0]
    assert _values(failed, key) == {e: v for e, v in _values(clean, key).items() if e > 0}
    assert _values(failed, key)[1] < 0.999  # not the first step against itself


def test_initial_listed_after_a_reference_that_fails_at_the_start():
    key = "alignment/init/linear_cka/layer/fc2/raw"
    refs = lambda: {"a": RefMLP(), "init": "initial"}  # noqa: E731
    clean = callback(reference=refs(), layers=["fc2"])
    fit([clean], model=MLP(lr=0.5), max_epochs=3)
    failed = callback(reference=refs(), layers=["fc2"])
    _fail(_engine(failed, "a"), "step", epochs={0})
    with pytest.warns(RuntimeWarning, match="epoch 0 .* skipped"):
        fit([failed], model=MLP(lr=0.5), max_epochs=3)
    assert _values(failed, key) == {e: v for e, v in _values(clean, key).items() if e > 0}


def test_initial_without_a_baseline_measures_from_the_start():
    key = "alignment/linear_cka/layer/fc2/raw"
    with_baseline = callback(reference="initial", layers=["fc2"])
    fit([with_baseline], model=MLP(lr=0.5), max_epochs=3)
    without = callback(reference="initial", layers=["fc2"], baseline=False)
    fit([without], model=MLP(lr=0.5), max_epochs=3)
    expected = {e: v for e, v in _values(with_baseline, key).items() if e > 0}
    assert _values(without, key) == expected and expected[1] < 0.999


class FailsOnce(MLP):
    """Its ``fail_at``-th eval-mode forward pass (a probe pass: the probe is one batch) raises
    ``error``."""

    def __init__(self, fail_at: int, error: Exception, **kw) -> None:
        super().__init__(**kw)
        self.fail_at, self.error, self.passes = fail_at, error, 0

    def forward(self, x):
        if not self.training:
            self.passes += 1
            if self.passes == self.fail_at:
                raise self.error
        return super().forward(x)


def test_initial_whose_start_was_not_captured_reports_nothing_and_the_others_go_on():
    cb = callback(reference={"a": RefMLP(), "init": "initial"}, layers=["fc2"])
    with pytest.warns(RuntimeWarning, match=r"reference 'init' \('initial'\) has no values in "
                                            r"this fit: the step at its start failed"):
        fit([cb], model=FailsOnce(1, MemoryError("out of memory at the start"), lr=0.5),
            max_epochs=3)
    assert [s["epoch"] for s in cb.skipped] == [0]
    assert sorted(_values(cb, "alignment/a/linear_cka/calibrated")) == [1, 2, 3]
    assert not any(k.startswith("alignment/init/") for h in cb.history for k in h)


# ------------------------------------------------------------------------------ "previous"
@pytest.mark.parametrize("names", [("prev", "init", "a"), ("a", "prev", "init")])
def test_previous_after_a_failed_step_compares_with_the_last_step_in_the_history(names):
    """``"a"`` fails at epoch 1, which leaves the history: at epoch 2 the previous step is
    epoch 0, the start, so "previous" equals "initial" (same seed, same permutations)."""
    kinds = {"prev": "previous", "init": "initial", "a": RefMLP()}
    cb = callback(reference={name: kinds[name] for name in names}, layers=["fc2"])
    _fail(_engine(cb, "a"), "step", epochs={1})
    with pytest.warns(RuntimeWarning, match="epoch 1 .* skipped"):
        fit([cb], model=MLP(lr=0.5), max_epochs=3)
    for field in ("raw", "calibrated"):
        prev = _values(cb, f"alignment/prev/linear_cka/layer/fc2/{field}")
        init = _values(cb, f"alignment/init/linear_cka/layer/fc2/{field}")
        assert sorted(prev) == [2, 3] and prev[2] == init[2]
    assert _values(cb, "alignment/prev/linear_cka/layer/fc2/raw")[3] != init[3]


# ------------------------------------------------------------------ configuration mistakes
class Counting(MLP):
    batches = 0

    def training_step(self, batch, batch_idx):
        Counting.batches += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("reference", ["initial", "model"])
@pytest.mark.parametrize("baseline", [True, False])
def test_a_probe_the_model_cannot_take_fails_whatever_on_error_says(reference, baseline):
    wide = make_probe(48, in_dim=IN_DIM + 1)  # the reference model takes it, the model not
    ref = "initial" if reference == "initial" else RefMLP(in_dim=IN_DIM + 1)
    cb = callback(reference=ref, probe=wide, layers=["fc2"], baseline=baseline, on_error="warn")
    Counting.batches = 0
    with pytest.raises(ProbeInputError, match="the model in training failed on the probe at the "
                                              "first probe pass of this fit .*mat1 and mat2"):
        fit([cb], model=Counting(), max_epochs=2)
    # before training, unless the first step comes after the first epoch
    assert Counting.batches == (4 if reference == "model" and not baseline else 0)
    assert cb.skipped == []


def test_a_later_failure_of_the_probe_pass_warns():
    cb = callback(on_error="warn")
    with pytest.warns(RuntimeWarning, match="epoch 1 .* skipped: RuntimeError: .*the weights"):
        fit([cb], model=FailsOnce(2, RuntimeError("the weights went wrong")), max_epochs=2)
    assert [h["epoch"] for h in cb.history] == [0, 2]


def test_a_measure_option_the_model_layer_widths_cannot_take_fails_whatever_on_error_says():
    cb = callback(reference=RefMLP(hidden=32), measures={"svcca": {"cca_dim": 20}},
                  layers=["fc2"], on_error="warn")
    with pytest.raises(ShapeOptionError, match="svcca: cca_dim=20 is too large .* d=16"):
        fit([cb], max_epochs=2)
    assert cb.skipped == [] and PROBE.shape[0] > 21
