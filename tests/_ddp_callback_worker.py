"""Worker for ``test_callback_ddp.py``:
``python -m tests._ddp_callback_worker OUT_DIR STRATEGY MODE[,MODE...]``.

For each mode in turn, trains ``MLP(lr=0)`` (weights never change) on 2 CPU processes (gloo)
with an ``AlignmentCallback`` and writes, from every rank, its callback history and the
alignment values in ``trainer.callback_metrics`` (or the error it ended with) to
``OUT_DIR/MODE/rank{r}.json``.  Under ``strategy="ddp"`` the script is launched once for all
the modes: Lightning starts rank 1 (this script again, same arguments) at the first fit, and
the later fits of both processes reuse the process group, as a script calling ``fit`` then
``test`` does.  A mode that raises on every rank leaves its error in its files and the next
mode runs.  Not collected by pytest.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from alignment_callback import AlignmentCallback
from tests.helpers import FAST_TRAINER, LAYERS, MLP, RefMLP, make_probe, train_loader

K = 30
METRICS = ["linear_cka", "mutual_knn"]
MAX_EPOCHS = 2


class Dump(pl.Callback):
    def __init__(self, out: str, watched: AlignmentCallback) -> None:
        self.out, self.watched = out, watched

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        payload = {"rank": trainer.global_rank, "error": f"{type(exception).__name__}: {exception}"}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        payload = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "history": self.watched.history,
            "skipped": self.watched.skipped,
            "restarted": sorted(self.watched.restarted),
            "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()
                                 if k.startswith("alignment/")},
            "params": {k: v.tolist() for k, v in pl_module.state_dict().items()},
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))


class BreakRank1(pl.Callback):
    """Rank 1 computes on NaN activations (its share of the null, or its analytic null,
    fails), or its probe pass raises (``where="probe"``), or setting its reference raises
    (``where="reference"``)."""

    def __init__(self, aligner: AlignmentCallback, where: str = "null") -> None:
        self.aligner, self.where = aligner, where

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 1:
            return
        if self.where == "reference":
            def broken(layers):
                raise RuntimeError("rank 1's reference broke")
            self.aligner.references[0].engine.set_reference = broken
        elif self.where in ("probe", "layer_count"):
            def hook(module, args):
                if not module.training:  # the probe pass runs in eval mode
                    if self.where == "layer_count":  # fc2 runs twice in rank 1's forward
                        module.fc2(module.fc2.weight.new_zeros(1, module.fc2.in_features))
                    else:
                        raise RuntimeError("rank 1's probe pass broke")
            pl_module.register_forward_pre_hook(hook)
        else:  # rank 1 scores its share on NaN activations (every rank gets rank 0's)
            compute = self.aligner._compute

            def broken(captured, *args, **kwargs):
                acts, seconds = captured
                nan = {k: torch.full_like(v, float("nan")) for k, v in acts.items()}
                return compute((nan, seconds), *args, **kwargs)
            self.aligner._compute = broken


class FailingLogger(CSVLogger):
    """Rank 0's logger: writing the alignment values fails (a full disk)."""

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("alignment/") for k in metrics):
            raise OSError("disk full (simulated)")
        super().log_metrics(metrics, step)


class EpochMLP(MLP):
    """``MLP`` whose hidden activations grow with the epoch (weights unchanged at lr=0), so
    each alignment step's fc2 activations differ from the step before's."""

    def forward(self, x):
        h = self.act1(self.fc1(x) * (1 + self.current_epoch) ** 2)
        return self.head(self.act2(self.fc2(h)))


def previous_callback() -> AlignmentCallback:
    return AlignmentCallback("previous", make_probe(), ["fc1", "fc2"], measures=["linear_cka"],
                             num_permutations=K, log_heatmaps=True, verbose=False, report=False)


def fit_previous(cb: AlignmentCallback, devices: int, strategy: str | None, out: str,
                 extra: Sequence[pl.Callback] = ()) -> None:
    """A fit of ``EpochMLP`` with ``cb`` (``reference="previous"``) for 3 epochs, whose heatmap
    of the step after epoch 2 fails to draw (where it is drawn: rank 0 under DDP): that step is
    skipped, so the next one compares with the step after epoch 1, in one process as in several
    (the steps after epochs 1, 2 and 3 run at current_epoch 0, 1 and 2)."""
    import alignment_callback.metrics.plotting as plotting

    drawn = plotting.heatmap_image

    def failing(result, title, *args, **kwargs):
        if "after epoch 2 " in title:
            raise RuntimeError("the heatmap could not be drawn (simulated)")
        return drawn(result, title, *args, **kwargs)

    plotting.heatmap_image = failing
    try:
        trainer = pl.Trainer(**{**FAST_TRAINER, "devices": devices},
                             **({"strategy": strategy} if strategy else {}),
                             max_epochs=3, default_root_dir=out,
                             logger=CSVLogger(out, name="csv"), enable_checkpointing=False,
                             callbacks=[cb, *extra])
        trainer.fit(EpochMLP(lr=0.0), train_loader())
    finally:
        plotting.heatmap_image = drawn


class BatchNormMLP(MLP):
    """``MLP`` with a BatchNorm after fc1: its running statistics are updated by each rank's
    own batches, so after a training epoch the replicas differ (DDP broadcasts buffers only at
    the start of a training forward)."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)
        self.bn = torch.nn.BatchNorm1d(self.fc1.out_features, momentum=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act1(self.bn(self.fc1(x))))
        return self.head(self.act2(self.fc2(h)))


class LocalRecompute(pl.Callback):
    """At the end, this rank's single-process step on its own model (the same permutations),
    and its BatchNorm running mean, next to the logged values."""

    def __init__(self, out: str, watched: AlignmentCallback) -> None:
        self.out, self.watched = out, watched

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        acts = self.watched._capture(pl_module)[0]
        res = self.watched.references[0].engine.step(acts, epoch=99).results["linear_cka"]
        payload = {"local": {k: float(getattr(res, k)) for k in ("raw", "null_std", "threshold")},
                   "running_mean": pl_module.bn.running_mean.tolist()}
        Path(self.out, f"local{trainer.global_rank}.json").write_text(json.dumps(payload))


def main(out: str, strategy: str, modes: str = "ok") -> None:
    """Each of the comma-separated ``modes`` in turn, in ``OUT_DIR/MODE`` (``run``); a mode's
    ``started`` file there marks how far a launch got."""
    for mode in modes.split(","):
        target = Path(out, mode)
        target.mkdir(parents=True, exist_ok=True)
        (target / "started").touch()
        try:
            run(str(target), strategy, mode)
        except Exception:  # its rank files hold the error (Dump.on_exception): on to the next
            print(f"== {mode} raised:", traceback.format_exc(), sep="\n", flush=True)


def run(out: str, strategy: str, mode: str) -> None:
    """One fit (two for ``resume_probe``) writing to ``out``.  ``mode``: ``ok``;
    ``fail_rank1`` (rank 1's permutation null fails), ``fail_moments_rank1`` (the same with
    linear CKA on the analytic null: nothing to gather), ``fail_probe_rank1`` (rank 1's probe
    pass raises), ``fail_reference_rank1`` (setting rank 1's reference raises),
    ``fail_layer_count_rank1`` (a chosen layer runs twice in rank 1's probe pass: a
    configuration error, raised under ``on_error="warn"`` too); ``batchnorm`` (replicas whose
    BatchNorm statistics differ, linear CKA on fc2 only); ``rank_reference`` (rank 1 holds
    another reference model and another probe: every rank must use rank 0's);
    ``fail_reference_pass_rank1`` (the reference model's probe pass raises on rank 1, at the
    start of fit); ``config_error`` (svcca's ``cca_dim`` above the frozen reference's widths,
    ``on_error="warn"``: raised before training); ``fail_named_rank1`` (rank 1's null fails
    for reference ``"m"`` of two, ``on_error="warn"``); ``resume_probe`` (one epoch with
    checkpoints, then a resumed fit with a probe of the same rows and other values);
    ``fail_logger_rank0`` (rank 0's logger raises OSError on the alignment values,
    ``on_error="warn"``: not the data's failure, raised on every rank);
    ``previous_heatmap_rank0`` (see :func:`fit_previous`)."""
    if mode == "previous_heatmap_rank0":
        cb = previous_callback()
        fit_previous(cb, 2, strategy, out, [Dump(out, cb)])
        return
    if mode == "resume_probe":
        from lightning.pytorch.callbacks import ModelCheckpoint

        ckpt = Path(out, "ckpt")
        for epochs, probe in ((1, make_probe()), (MAX_EPOCHS, make_probe(seed=999))):
            cb = AlignmentCallback(RefMLP(seed=1), probe, LAYERS, measures=METRICS,
                                   num_permutations=K, log_heatmaps=False, verbose=False)
            trainer = pl.Trainer(**{**FAST_TRAINER, "devices": 2}, strategy=strategy,
                                 max_epochs=epochs, logger=False,
                                 callbacks=[cb, Dump(out, cb),
                                            ModelCheckpoint(dirpath=ckpt, save_last=True)])
            trainer.fit(MLP(lr=0.0), train_loader(),
                        ckpt_path=str(ckpt / "last.ckpt") if epochs > 1 else None)
        return
    if mode == "batchnorm":
        cb = AlignmentCallback(RefMLP(seed=1), make_probe(), ["fc2"], measures=["linear_cka"],
                               num_permutations=K, on_error="raise", verbose=False)
        trainer = pl.Trainer(**{**FAST_TRAINER, "devices": 2}, strategy=strategy,
                             max_epochs=MAX_EPOCHS, logger=False, enable_checkpointing=False,
                             callbacks=[cb, Dump(out, cb), LocalRecompute(out, cb)])
        trainer.fit(BatchNormMLP(), train_loader())
        return
    if mode in ("rank_reference", "fail_reference_pass_rank1"):
        import torch.distributed as dist

        rank = int(os.environ.get("LOCAL_RANK", "0"))  # before the process group exists
        reference = RefMLP(seed=1 + rank if mode == "rank_reference" else 1)
        probe = make_probe(seed=123 + rank) if mode == "rank_reference" else make_probe()
        if mode == "fail_reference_pass_rank1":
            def hook(module, args):
                if dist.is_initialized() and dist.get_rank() == 1:
                    raise RuntimeError("rank 1's reference pass broke")
            reference.register_forward_pre_hook(hook)
        cb = AlignmentCallback(reference, probe, LAYERS, measures=METRICS, num_permutations=K,
                               log_heatmaps=False, verbose=False, on_error="warn")
        trainer = pl.Trainer(**{**FAST_TRAINER, "devices": 2}, strategy=strategy,
                             max_epochs=MAX_EPOCHS, logger=False, enable_checkpointing=False,
                             callbacks=[cb, Dump(out, cb)])
        trainer.fit(MLP(lr=0.0), train_loader())
        return
    if mode in ("config_error", "fail_named_rank1"):
        named = mode == "fail_named_rank1"
        cb = AlignmentCallback({"m": RefMLP(seed=1), "init": "initial"} if named else
                               RefMLP(seed=1), make_probe(), LAYERS,
                               measures=METRICS if named else {"svcca": {"cca_dim": 20}},
                               num_permutations=K, log_heatmaps=False, verbose=False,
                               on_error="warn")  # wider than the layers: a configuration error
        trainer = pl.Trainer(**{**FAST_TRAINER, "devices": 2}, strategy=strategy,
                             max_epochs=MAX_EPOCHS, logger=False, enable_checkpointing=False,
                             callbacks=[cb, Dump(out, cb)] + ([BreakRank1(cb)] if named else []))
        trainer.fit(MLP(lr=0.0), train_loader())
        return
    if mode == "fail_logger_rank0":
        cb = AlignmentCallback(RefMLP(seed=1), make_probe(), LAYERS, measures=METRICS,
                               num_permutations=K, log_heatmaps=False, verbose=False,
                               on_error="warn")
        trainer = pl.Trainer(**{**FAST_TRAINER, "devices": 2}, strategy=strategy,
                             max_epochs=MAX_EPOCHS, logger=FailingLogger(out, name="csv"),
                             enable_checkpointing=False, callbacks=[cb, Dump(out, cb)])
        trainer.fit(MLP(lr=0.0), train_loader())
        return
    failing = mode != "ok"
    moments = mode == "fail_moments_rank1"
    cb = AlignmentCallback(RefMLP(seed=1), make_probe(), ["fc2"] if moments else LAYERS,
                           measures=["linear_cka"] if moments else METRICS,  # one pair
                           null="moments" if moments else "permutation",
                           num_permutations=K, log_heatmaps=True,
                           on_error="raise" if failing and "layer_count" not in mode else "warn",
                           background=True)  # ignored under DDP: every rank computes in the loop
    trainer = pl.Trainer(
        **{**FAST_TRAINER, "devices": 2}, strategy=strategy, max_epochs=MAX_EPOCHS,
        logger=CSVLogger(out, name="csv"),
        callbacks=[cb, Dump(out, cb)] + (
            [BreakRank1(cb, {"fail_probe_rank1": "probe", "fail_reference_rank1": "reference",
                             "fail_layer_count_rank1": "layer_count"}.get(mode, "null"))]
            if failing else []),
        enable_checkpointing=False,
    )
    trainer.fit(MLP(lr=0.0), train_loader())


if __name__ == "__main__":
    main(*sys.argv[1:])
