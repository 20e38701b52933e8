"""AlignmentCallback through TensorBoard, W&B (offline, read back from the run file) and MLflow."""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from pathlib import Path

import lightning.pytorch as pl
import pytest

from alignment_callback import AlignmentCallback
from tests.helpers import (
    FAST_TRAINER,
    LAYERS,
    MLP,
    RefMLP,
    make_probe,
    train_loader,
)

K = 20
MEASURES = ["linear_cka", "mutual_knn"]


def _callback(**kw):
    return AlignmentCallback(RefMLP(seed=1), make_probe(), LAYERS,
                             measures=kw.pop("measures", MEASURES), num_permutations=K, **kw)


def _fit(logger, callbacks, max_epochs=1):
    trainer = pl.Trainer(max_epochs=max_epochs, logger=logger, callbacks=callbacks,
                         enable_checkpointing=False, **FAST_TRAINER)
    trainer.fit(MLP(), train_loader())
    return trainer


# --------------------------------------------------------------------------------- TensorBoard
@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_tensorboard_scalars_and_heatmap_images(tmp_path, background):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = _callback(background=background)
    _fit(logger, [cb], max_epochs=2)
    logger.experiment.flush()

    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in MEASURES:
        for field in ("raw", "calibrated", "p_value", "threshold"):
            assert f"alignment/{name}/{field}" in tags["scalars"]
    events = acc.Scalars("alignment/linear_cka/calibrated")
    assert [e.step for e in events] == [h["step"] for h in cb.history] == [0, 4, 8]
    for e, h in zip(events, cb.history):
        assert e.value == pytest.approx(h["alignment/linear_cka/calibrated"], rel=1e-6)
    assert [e.value for e in acc.Scalars("alignment/epoch")] == [0.0, 1.0, 2.0]
    for name in MEASURES:
        images = acc.Images(f"alignment/{name}/heatmap")
        assert [im.step for im in images] == [0, 4, 8]
        assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
        assert images[0].width > 2 * images[0].height > 100  # raw | calibrated side by side


# ----------------------------------------------------------------------------------------- W&B
_BLOCK, _HEADER = 32768, 7


def _wandb_records(path: str):
    """Records of a ``run-*.wandb`` file (W&B's LevelDB-log framing of protobuf ``Record``s).

    wandb 0.31 no longer ships its Python ``DataStore`` reader (the Go core writes the file), so
    this is the same framing read back: a 7-byte file header ``:W&B`` + magic 0xBEE1 + version,
    then 32 KiB blocks of chunks ``crc32 (4, LE) | length (2, LE) | type (1) | data`` with types
    FULL=1, FIRST=2, MIDDLE=3, LAST=4; the CRC (zlib.crc32 seeded with the type byte) is checked.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if crc == 0 and length == 0 and kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad CRC at {pos}"
        pos += _HEADER + length
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        elif kind == 4:
            payload, pending = pending + chunk, b""
        else:
            raise AssertionError(f"unknown chunk type {kind}")
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _wait_for_complete_run_file(path: str, timeout: float = 60.0) -> list:
    """All records once the file ends with the run's ``exit`` record.

    ``wandb.finish()`` can return while wandb-core is still writing the offline file (we saw
    truncated blocks and half-written chunks right after it), so poll until it is complete.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(_wandb_records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.2)


def _history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                         for i in r.history.item})
    return rows


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off"}.items():
        # restored afterwards (WandbLogger(offline=True) sets WANDB_MODE process-wide)
        monkeypatch.setenv(var, value)
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_wandb_offline_history_media_and_axes(tmp_path, wandb_env, background):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="alignment-tests")
    cb = _callback(background=background)
    cb2 = _callback(measures=["linear_cka"], log_prefix="second", log_heatmaps=False)
    _fit(logger, [cb, cb2], max_epochs=2)
    summary_keys = set(logger.experiment.summary.keys())
    wandb.finish()

    expected_keys = {"alignment/linear_cka/calibrated", "alignment/epoch", "second/linear_cka/raw"}
    assert expected_keys <= summary_keys
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = _wait_for_complete_run_file(run_file)
    history = _history(records)
    scalar_rows = [h for h in history if "alignment/linear_cka/calibrated" in h]
    assert [h["alignment/epoch"] for h in scalar_rows] == [0, 1, 2]
    assert [h["trainer/global_step"] for h in scalar_rows] == [h["step"] for h in cb.history]
    for row, entry in zip(scalar_rows, cb.history):
        for name in MEASURES:
            for field in ("raw", "calibrated", "p_value", "threshold"):
                key = f"alignment/{name}/{field}"
                assert row[key] == pytest.approx(entry[key], rel=1e-6)
    assert [h["second/epoch"] for h in history if "second/linear_cka/raw" in h] == [0, 1, 2]

    # series plotted against the epoch: define_metric for each callback's prefix
    metric_defs = {(m.metric.glob_name or m.metric.name): m.metric.step_metric
                   for m in records if m.WhichOneof("record_type") == "metric"}
    assert metric_defs.get("alignment/*") == "alignment/epoch"
    assert metric_defs.get("second/*") == "second/epoch"
    # every logged key has its own definition on its axis: W&B applies a key's own definition
    # before any glob (the summary's would leave it without one) and picks among overlapping
    # globs (Lightning's "*" on trainer/global_step) in no fixed order
    own = [(m.metric.name, m.metric.step_metric) for m in records
           if m.WhichOneof("record_type") == "metric" and m.metric.name]
    logged = {k for h in history for k in h if k.startswith(("alignment/", "second/"))}
    logged = {k.split("/_type")[0].split("/filenames")[0] for k in logged} - {
        "alignment/epoch", "second/epoch"}
    defined = {name: axis for name, axis in own if name in logged}
    assert {"alignment/linear_cka/calibrated", "alignment/linear_cka/p_value",
            "alignment/mutual_knn/heatmap", "second/linear_cka/raw"} <= set(defined)
    for name, axis in own:
        if name in logged:
            assert axis == name.split("/")[0] + "/epoch", (name, axis)

    # heatmaps: image history entries whose files exist under files/media
    run_dir = Path(run_file).parent
    image_files = []
    for name in MEASURES:
        key = f"alignment/{name}/heatmap"
        rows = [h for h in history if f"{key}/filenames" in h]
        assert len(rows) == 3, key
        for h in rows:
            assert h[f"{key}/_type"] == "images/separated"
            image_files += h[f"{key}/filenames"]
    assert image_files and all(f.startswith("media/images/alignment/") for f in image_files)
    for f in image_files:
        assert (run_dir / "files" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one table of every pair at every step per measure, logged once at the end of fit
    tables = glob.glob(str(run_dir / "files" / "media" / "table" / "alignment" / "*"
                           / "pairs_*.table.json"))
    assert len(tables) == len(MEASURES)
    table = json.loads(Path(tables[0]).read_text())
    assert table["columns"] == ["epoch", "step", "model_layer", "reference_layer", "raw",
                                "calibrated", "p_value"]
    assert len(table["data"]) == 3 * len(LAYERS) ** 2
    assert sorted({row[0] for row in table["data"]}) == [0, 1, 2]


# -------------------------------------------------------------------------------------- MLflow
def test_mlflow_metrics_and_heatmap_artifacts(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="alignment", tracking_uri=uri,
                          artifact_location=(tmp_path / "artifacts").as_uri())
    cb = _callback(measures=["linear_cka"])
    trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[cb], enable_checkpointing=False,
                         default_root_dir=str(tmp_path), **FAST_TRAINER)
    trainer.fit(MLP(), train_loader())

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    # no directory of its own (a database store): the report goes to the trainer's root
    # directory and, with its images, to the run's artifacts
    assert cb.report_paths[0] == os.path.join(str(tmp_path), "alignment_report.md")
    reported = {os.path.basename(a.path) for a in client.list_artifacts(logger.run_id,
                                                                       "alignment_report")}
    assert reported == {"alignment_report.md", "alignment_report.html",
                        "alignment_report_curves.png", "alignment_report_linear_cka.png"}
    history = client.get_metric_history(logger.run_id, "alignment/linear_cka/calibrated")
    assert sorted(m.step for m in history) == [h["step"] for h in cb.history] == [0, 4]
    by_step = {m.step: m.value for m in history}
    for h in cb.history:
        assert by_step[h["step"]] == pytest.approx(h["alignment/linear_cka/calibrated"], rel=1e-6)
    epochs = client.get_metric_history(logger.run_id, "alignment/epoch")
    assert sorted(m.value for m in epochs) == [0.0, 1.0]
    artifacts = client.list_artifacts(logger.run_id, "alignment/linear_cka/heatmap")
    files = sorted(os.path.basename(a.path) for a in artifacts)
    assert files == ["epoch0000_step000000.png", "epoch0001_step000004.png"]


def test_mlflow_names_it_would_refuse_or_merge(tmp_path):
    """MLflow refuses tag and parameter names with characters outside [A-Za-z0-9_/. -] (a
    reference named "clip@224" crashed the fit) and Lightning strips them from metric names
    (two references "r(1)" and "r1" shared one series); each key is now cleaned and told apart,
    and the layer map is one parameter per index (MLflow cuts a value at 250 characters)."""
    mlflow = pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="names", tracking_uri=uri,
                          artifact_location=(tmp_path / "artifacts").as_uri())
    refs = {"clip@224": RefMLP(seed=1), "r(1)": RefMLP(seed=2), "r1": RefMLP(seed=3)}
    cb = AlignmentCallback(refs, make_probe(), LAYERS, measures=["linear_cka"],
                           num_permutations=K, on_error="raise", verbose=False,
                           log_heatmaps=False, report=False)
    with pytest.warns(RuntimeWarning, match="makes these keys coincide"):
        trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[cb],
                             enable_checkpointing=False, default_root_dir=str(tmp_path),
                             **FAST_TRAINER)
        trainer.fit(MLP(), train_loader())
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    for ref, key in (("clip@224", "clip224/linear_cka/raw"), ("r(1)", "r1/linear_cka/raw"),
                     ("r1", "r1/linear_cka/raw_2")):  # the later key of a clash gets _2
        history = client.get_metric_history(logger.run_id, f"alignment/{key}")
        logged = dict(sorted((m.step, m.value) for m in history))
        expected = {h["step"]: h[f"alignment/{ref}/linear_cka/raw"] for h in cb.history}
        assert logged.keys() == expected.keys(), ref
        assert list(logged.values()) == pytest.approx(list(expected.values()), rel=1e-6), ref
    params = client.get_run(logger.run_id).data.params
    assert [params[f"alignment/layers/model/{i}"] for i in range(len(LAYERS))] == LAYERS


def test_mlflow_names_longer_than_it_takes_are_shortened(tmp_path):
    """A reference named like a checkpoint path made keys over MLflow's 250 characters: the
    fit crashed at its first step.  The longest part is cut and ends with a hash of the key,
    the measure and field stay at the end, and each key keeps its own series."""
    mlflow = pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="long", tracking_uri=uri, prefix="exp",
                          artifact_location=(tmp_path / "artifacts").as_uri())
    long = "checkpoints_" * 22  # 264 characters
    cb = AlignmentCallback({long: RefMLP(seed=1)}, make_probe(), LAYERS,
                           measures=["linear_cka"], num_permutations=K, on_error="raise",
                           verbose=False, log_heatmaps=False, report=False)
    with pytest.warns(RuntimeWarning, match="MLflow refuses names longer than 250 characters"):
        trainer = pl.Trainer(max_epochs=1, logger=logger, callbacks=[cb],
                             enable_checkpointing=False, default_root_dir=str(tmp_path),
                             **FAST_TRAINER)
        trainer.fit(MLP(), train_loader())
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    names = set(client.get_run(logger.run_id).data.metrics)
    assert all(len(name) <= 250 for name in names)
    for field in ("raw", "calibrated", "p_value"):
        (name,) = [n for n in names if n.endswith(f"/linear_cka/{field}") and "checkpoints" in n]
        logged = {m.step: m.value for m in client.get_metric_history(logger.run_id, name)}
        expected = {h["step"]: h[f"alignment/{long}/linear_cka/{field}"] for h in cb.history}
        assert logged == pytest.approx(expected, rel=1e-6), field


# ------------------------------------------------------------------------- subclassed loggers
def test_subclassed_csv_and_tensorboard_loggers_get_heatmaps_and_text(tmp_path):
    """A user's subclass of a built-in logger is served as the built-in one (before: the kind
    was read from the class name's prefix, so ``ProjectCSVLogger`` got no heatmap files and a
    ``TensorBoardLogger`` subclass named ``MyTB`` no images and no text)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class ProjectCSVLogger(CSVLogger):
        pass

    class MyTB(TensorBoardLogger):
        pass

    csv, tb = ProjectCSVLogger(tmp_path, name="csv"), MyTB(tmp_path, name="tb")
    cb = _callback(measures=["linear_cka"])
    _fit([csv, tb], [cb])
    tb.experiment.flush()
    pngs = sorted(os.listdir(os.path.join(csv.log_dir, "alignment_heatmaps")))
    assert len(pngs) == len(cb.history) == 2 and all(p.endswith(".png") for p in pngs)
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [im.step for im in acc.Images("alignment/linear_cka/heatmap")] == [0, 4]
    assert any(tag.startswith("alignment/linear_cka/best_pair") for tag in acc.Tags()["tensors"])


def test_mlflow_refusing_the_layer_map_is_said():
    """MLflow keeps a parameter's first value: a run resumed with other layers cannot update the
    layer map, which then names the earlier layers; that is now a warning, not silence."""
    from alignment_callback.callback import dispatch

    class MLFlowLogger:  # the name is what a subclass of Lightning's shares
        def __init__(self):
            self.calls = 0

        def log_hyperparams(self, params):
            self.calls += 1
            raise RuntimeError("Changing param values is not allowed")

    class Plain:
        def log_hyperparams(self, params):
            raise NotImplementedError

    logger = MLFlowLogger()
    with pytest.warns(UserWarning, match=r"MLflow refused the layer map alignment/layers/.*"
                                         r"Changing param values is not allowed"):
        dispatch.log_layer_names([logger, Plain()], "alignment",
                                 {"model": ["b"], "reference": ["r"]})
    assert logger.calls == 1


# ------------------------------------------------------------ from an audit of the loggers
def test_a_nested_prefix_is_plotted_against_its_own_axis():
    """W&B: with callbacks logging under ``alignment`` (epochs) and ``alignment/wide`` (global
    steps), every key of the second was defined on ``alignment/epoch``, the first prefix it
    starts with, so its points were plotted at the other callback's stale epochs.  The longest
    prefix decides."""
    from alignment_callback.callback import dispatch

    for axes in ({"alignment": "alignment/epoch", "alignment/wide": "alignment/wide/step"},
                 {"alignment/wide": "alignment/wide/step", "alignment": "alignment/epoch"}):
        state = {"axes": axes, "keys": set()}
        assert dispatch._axis(state, "alignment/wide/linear_cka/raw") == "alignment/wide/step"
        assert dispatch._axis(state, "alignment/linear_cka/raw") == "alignment/epoch"
        assert dispatch._axis(state, "alignment/widen/raw") == "alignment/epoch"
        assert dispatch._axis(state, "alignment/wide/step") is None  # an axis itself
        assert dispatch._axis(state, "other/raw") is None


def test_csv_heatmaps_of_two_prefixes_that_look_alike_keep_their_own_files(tmp_path):
    """``log_prefix="probe/a"`` and ``"probe_a"`` wrote the same PNG names (``/`` became
    ``_``), each step's image of one callback overwriting the other's; the prefix is now
    written as in the report's file names (a hash appended where a character was replaced)."""
    from lightning.pytorch.loggers import CSVLogger

    a = _callback(measures=["linear_cka"], log_prefix="probe/a", verbose=False, report=False)
    b = _callback(measures=["linear_cka"], log_prefix="probe_a", verbose=False, report=False)
    # log_prefix="probe" with a reference named "a": its label a/linear_cka is written like a
    # prefix too (it wrote probe_a_linear_cka_..., b's names)
    c = AlignmentCallback({"a": RefMLP(seed=1), "b": RefMLP(seed=2)}, make_probe(), LAYERS,
                          measures=["linear_cka"], num_permutations=K, log_prefix="probe",
                          verbose=False, report=False)
    logger = CSVLogger(str(tmp_path), name="csv")
    _fit(logger, [a, b, c])
    names = sorted(os.path.basename(p) for p in
                   glob.glob(os.path.join(logger.log_dir, "alignment_heatmaps", "*.png")))
    assert len(names) == 8, names  # 2 steps (baseline, epoch 1) × 4 heatmaps
    assert sum(n.startswith("probe_a-c8729893_linear_cka_heatmap_epoch") for n in names) == 2
    assert sum(n.startswith("probe_a_linear_cka_heatmap_epoch") for n in names) == 2
    assert sum(n.startswith("probe_a_linear_cka-") for n in names) == 2
    assert sum(n.startswith("probe_b_linear_cka-") for n in names) == 2


def _summary(records) -> dict:
    out: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def test_wandb_summary_of_a_resumed_run_is_the_whole_runs_best(tmp_path, wandb_env):
    """W&B keeps each summary (best calibrated and raw score, smallest p) from the values its
    process logged, so a run resumed under the same id summarized the resumed part only; the
    callback now writes the best of its whole history at the end of fit."""
    import wandb
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    run_id, ckpt = None, tmp_path / "ckpt"
    for epochs in (1, 3):
        cb = _callback(log_heatmaps=False, verbose=False, report=False)
        logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="alignment-tests",
                             id=run_id, resume="allow" if run_id else None)
        trainer = pl.Trainer(max_epochs=epochs, logger=logger, enable_checkpointing=True,
                             callbacks=[cb, ModelCheckpoint(dirpath=ckpt, save_last=True)],
                             **FAST_TRAINER)
        trainer.fit(MLP(lr=2.0), train_loader(), ckpt_path=str(ckpt / "last.ckpt") if run_id
                    else None)
        run_id = logger.experiment.id
        wandb.finish()
    files = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2
    summary = _summary(_wait_for_complete_run_file(files[1]))  # the resumed part's run file
    assert len(cb.history) == 4
    first_part_best = 0
    for name in MEASURES:
        for field, pick in (("calibrated", max), ("raw", max), ("p_value", min)):
            key = f"alignment/{name}/{field}"
            best = pick(h[key] for h in cb.history)
            assert summary[key] == {pick.__name__: pytest.approx(best, rel=1e-7)}, key
            first_part_best += best not in [h[key] for h in cb.history[2:]]
    assert first_part_best  # the baseline, before training moves away: what is tested
