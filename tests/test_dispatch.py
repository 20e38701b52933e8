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
