"""Sending results to the loggers (``callback/dispatch.py``) with stand-in loggers: a logger's
kind is read from the class names of its bases, so ``MLFlowLoggerStandIn`` is served as
Lightning's ``MLFlowLogger`` without MLflow installed or a run started."""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import pytest

from alignment_callback.callback import dispatch


class _Experiment:
    def __init__(self) -> None:
        self.images: list[str] = []

    def log_image(self, run_id, image, name) -> None:  # MLflow's client call
        self.images.append(name)

    def define_metric(self, *args, **kwargs) -> None:  # W&B's run call
        pass


class MLFlowLoggerStandIn:
    run_id = "run"

    def __init__(self) -> None:
        self.experiment = _Experiment()


class WandbLoggerStandIn:
    def __init__(self) -> None:
        self.experiment = _Experiment()
        self.images: list[tuple[str, list[str], int]] = []

    def log_image(self, key, images, step) -> None:
        self.images.append((key, images, step))


@pytest.mark.parametrize("mlflow_first", [False, True])
def test_a_heatmap_reaches_wandb_and_mlflow_in_either_order(tmp_path, mlflow_first):
    """Without a CSV logger W&B gets the image from a file written to the scratch folder; an
    MLflow logger listed first renamed that file to its own artifact name, a path with missing
    folders (the fit raised FileNotFoundError at its first step)."""
    wandb, mlflow = WandbLoggerStandIn(), MLFlowLoggerStandIn()
    image = np.zeros((4, 4, 3), np.uint8)
    written = dispatch.log_image([mlflow, wandb] if mlflow_first else [wandb, mlflow],
                                 "alignment/linear_cka/heatmap", image,
                                 dispatch.encode_png(image), 0, "epoch0000_step000000",
                                 str(tmp_path), "alignment_linear_cka_heatmap")
    assert written == []  # no CSV logger
    ((key, (path,), step),) = wandb.images
    assert (key, step) == ("alignment/linear_cka/heatmap", 0)
    assert path == os.path.join(tmp_path, "alignment_linear_cka_heatmap_epoch0000_step000000.png")
    assert os.path.getsize(path) > 0
    assert mlflow.experiment.images == ["alignment/linear_cka/heatmap/epoch0000_step000000.png"]


def test_mlflow_names_stay_distinct_whatever_the_keys_and_their_order():
    """A dropped character and the ``_2`` suffix that tells keys apart must not land on a name
    another key has as it is (reference layers ``out``, ``out@``, ``out_2``: ``out@`` and
    ``out_2`` shared ``.../fc__out_2``); every order of the keys, given at once or one by one."""
    keys = [f"alignment/linear_cka/pair/fc__{name}" for name in ("out", "out@", "out_2", "out(2)")]
    for order in itertools.permutations(keys):
        for one_by_one in (False, True):
            logger = MLFlowLoggerStandIn()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if one_by_one:
                    names = {k: dispatch.mlflow_keys(logger, [k])[k] for k in order}
                else:
                    names = dispatch.mlflow_keys(logger, list(order))
            assert len(set(names.values())) == len(keys), (order, names)
            assert all(dispatch.mlflow_keys(logger, [k])[k] == v for k, v in names.items())
            for key, name in names.items():  # the cleaned key, or it with a suffix _2, _3, ...
                clean = key.replace("@", "").replace("(", "").replace(")", "")
                assert name == clean or (name.startswith(clean + "_")
                                         and name[len(clean) + 1:].isdigit()), (key, name)


class _Recorder:
    """A logger's experiment that records every call: ``(method, args, kwargs)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.summary: dict = {}

    def __getattr__(self, method):
        return lambda *args, **kwargs: self.calls.append((method, args, kwargs))


class _PrefixedStandIn:
    LOGGER_JOIN_CHAR = "-"
    run_id = "run"

    def __init__(self) -> None:
        self._prefix = "exp"
        self.experiment = _Recorder()
        self.metrics: list[dict] = []

    def log_metrics(self, metrics, step=None) -> None:  # Lightning prefixes these itself
        self.metrics.append({f"exp-{k}": v for k, v in metrics.items()})


class WandbLoggerPrefixed(_PrefixedStandIn):
    pass


class TensorBoardLoggerPrefixed(_PrefixedStandIn):
    pass


class MLFlowLoggerPrefixed(_PrefixedStandIn):
    pass


def test_a_loggers_own_prefix_names_what_goes_to_its_experiment_too(tmp_path):
    """Lightning's ``prefix=`` is added by ``log_metrics`` only: axes, summaries, texts and
    images sent to the experiment directly went out unprefixed, so W&B plotted the series
    against no axis and kept a summary of no series, and TensorBoard / MLflow kept the images
    and texts apart from the scalars (two fits sharing a run overwrote each other's)."""
    wandb, tb, mlflow = WandbLoggerPrefixed(), TensorBoardLoggerPrefixed(), MLFlowLoggerPrefixed()
    loggers = [wandb, tb, mlflow]
    dispatch.define_axes(loggers, "alignment", "alignment/epoch")
    dispatch.define_summaries(loggers, ["alignment/linear_cka/calibrated"])
    dispatch.log_scalars(loggers, {"alignment/linear_cka/raw": 0.5}, 4)
    dispatch.log_text(loggers, {"alignment/linear_cka/best_pair": "fc1|fc2"}, 4)
    image = np.zeros((4, 4, 3), np.uint8)
    wandb.log_image = lambda **kw: None
    dispatch.log_image(loggers, "alignment/linear_cka/heatmap", image,
                       dispatch.encode_png(image), 4, "epoch0001", str(tmp_path))
    dispatch.write_summaries(loggers, {"alignment/linear_cka/calibrated": 0.7})
    for logger in loggers:
        where = {"define_metric": 0, "add_image": 0, "add_text": 0, "set_tag": 1, "log_image": 2}
        names = [args[where[method]] for method, args, _ in logger.experiment.calls
                 if method in where]
        names += [k for method, args, _ in logger.experiment.calls if method == "log"
                  for k in args[0]]
        assert names and all(n.startswith("exp-alignment/") for n in names), (logger, names)
    axes = {args[0]: kwargs.get("step_metric") for method, args, kwargs
            in wandb.experiment.calls if method == "define_metric"}
    assert axes["exp-alignment/*"] == axes["exp-alignment/linear_cka/raw"] == \
        axes["exp-alignment/linear_cka/calibrated"] == "exp-alignment/epoch"
    assert wandb.experiment.summary == {"exp-alignment/linear_cka/calibrated": {"max": 0.7}}
    assert {k for m in wandb.metrics for k in m} == {"exp-alignment/linear_cka/raw"}


class TensorBoardLoggerStandIn:
    def __init__(self) -> None:
        self.experiment = _Recorder()
        self.hyperparams: list[tuple[dict, dict | None]] = []

    def log_hyperparams(self, params, metrics=None) -> None:
        self.hyperparams.append((params, metrics))


def test_tensorboard_gets_the_layer_map_as_text_and_no_hp_metric_point():
    """TensorBoard's HParams view keeps its first session (the model's hyperparameters) and
    ``hparams.yaml`` is written before the first step: the map was in neither, and each call
    added an ``hp_metric`` point of -1 (``metrics=None`` means Lightning's default metric)."""
    tb = TensorBoardLoggerStandIn()
    dispatch.log_layer_names([tb], "alignment", {"model": ["fc1", "fc2"], "reference": ["0"]})
    assert tb.hyperparams == [({"alignment/layers/model": ["fc1", "fc2"],
                                "alignment/layers/reference": ["0"]}, {})]
    texts = {args[0]: (args[1], kwargs) for method, args, kwargs in tb.experiment.calls
             if method == "add_text"}
    assert texts == {"alignment/layers/model": ("0: fc1, 1: fc2", {"global_step": 0}),
                     "alignment/layers/reference": ("0: 0", {"global_step": 0})}


def test_mlflow_names_are_cleaned_after_the_prefix_is_added():
    """As Lightning's ``log_metrics`` does: the prefix first, then the characters MLflow refuses
    dropped; a tag named with the raw prefix ``exp#1`` made MLflow raise in the middle of a fit."""
    mlflow = MLFlowLoggerPrefixed()
    mlflow._prefix = "exp#1"
    dispatch.log_text([mlflow], {"alignment/m/best_pair": "fc1|fc2"}, 0)
    image = np.zeros((4, 4, 3), np.uint8)
    dispatch.log_image([mlflow], "alignment/m/heatmap", image, dispatch.encode_png(image), 0,
                       "epoch0000", "unused")
    (tag,) = [args[1] for method, args, _ in mlflow.experiment.calls if method == "set_tag"]
    (artifact,) = [args[2] for method, args, _ in mlflow.experiment.calls if method == "log_image"]
    assert tag == "exp1-alignment/m/best_pair"
    assert artifact == "exp1-alignment/m/heatmap/epoch0000.png"
