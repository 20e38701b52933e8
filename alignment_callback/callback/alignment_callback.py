"""``AlignmentCallback``: calibrated alignment to a frozen reference, live during training."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from alignment_callback.callback import dispatch as lg
from alignment_callback.callback.background import BackgroundQueue, Job
from alignment_callback.callback.probe import Probe, iterate_probe, load_probe, load_reference
from alignment_callback.functional.aggregation import Aggregate
from alignment_callback.hooks import collect_activations
from alignment_callback.hooks.collect import model_device as model_device_of
from alignment_callback.hooks.collect import preserved_rng
from alignment_callback.metrics import LayerAlignment

Layers = Union[str, Sequence[str], Mapping[str, str]]
MetricsSpec = Union[str, Sequence[str], Mapping[str, Mapping[str, Any]]]

DEFAULT_METRICS = ("linear_cka", "mutual_knn", "cknna")
LOGGED_FIELDS = ("raw", "calibrated", "p_value", "threshold", "null_mean", "effect_size")


class AlignmentCallback(Callback):
    """Track permutation-calibrated alignment between the model in training and a frozen
    reference on a fixed probe set.

    At the start of training (baseline, logged as epoch 0) and then every ``every_n_epochs``
    epochs (or every ``every_n_train_steps`` steps) the callback runs the probe through the
    model under ``no_grad`` in eval mode, captures the chosen layers with forward hooks, and
    for each metric computes the raw LA×LB layer matrix and the aggregation-aware calibrated
    aggregate (METHOD.md §4) against the reference's activations, which are computed once and
    cached with their grams / neighbor lists.  The same seeded permutations are used every
    time, so the curve is comparable across epochs.

    Logged through every attached logger, per metric ``<prefix>/<metric>/{raw, calibrated,
    p_value, threshold, null_mean, effect_size}``, the arg-max pair indices, per-pair raw
    values when ``log_pairs``, and a layer×layer heatmap image ``<prefix>/<metric>/heatmap``
    (raw and per-pair calibrated side by side) where the logger takes images (W&B,
    TensorBoard, MLflow; PNG files for CSV) plus a ``wandb.Table`` of every pair.
    ``<prefix>/epoch`` and ``<prefix>/step`` are logged alongside; W&B plots the series against
    the epoch (the global step with ``every_n_train_steps``).  The
    calibrated aggregates are also ``pl_module.log``-ged (logger=False) so ``ModelCheckpoint``
    and ``EarlyStopping`` can monitor e.g. ``"alignment/mutual_knn/calibrated"``.

    Training is unchanged: global RNG states are restored, train/eval modes restored, no
    gradients, hooks removed, activations freed after each step.  Under DDP the alignment is
    computed on global rank 0 only (no collective inside the computation, so nothing can hang)
    and the scalar results are broadcast so every rank's ``callback_metrics`` agree.

    With ``background=True`` the metrics, their permutation nulls and the heatmaps are computed
    by one worker thread while training goes on, and each result is logged, in order and with
    its own epoch/step, at the first training hook after it is ready (all of them by the end of
    ``fit``).  For a model on the CPU the probe's forward passes run in the worker too, on a
    private copy of the model (made once with ``deepcopy``; its weights are refreshed from a
    snapshot taken in the loop, and the probe batches are materialized once); the eval-mode
    forward must then not draw random numbers.  On an accelerator, or when the model cannot be
    copied, the capture stays in the loop.  The values are identical to the synchronous ones.
    They are not ``pl_module.log``-ged (when a value arrives depends on timing, so a monitor on
    it would make training timing-dependent).  At most two steps are outstanding (the loop
    waits beyond that); a checkpoint never waits (steps in flight are redone on resume).
    Single-process runs only: under DDP the callback runs synchronously.

    Args:
        reference: frozen reference (``nn.Module``/``LightningModule``) or a checkpoint path
            (see ``reference_class``).  It is put in eval mode with ``requires_grad_(False)``.
        probe: the probe inputs: a non-shuffling ``DataLoader``, a tensor, a ``.pt`` path, a
            callable returning batches, or a list of batches; the same rows every time.
        layers: model layers (names, globs, ``"re:"`` regexes; see ``resolve_layers``), or a
            mapping ``{model layer: reference layer}`` to compare only those pairs (the
            aggregate is then taken over the mapped pairs).
        reference_layers: reference layers (default: the same names as ``layers``).
        metrics: names (default ``("linear_cka", "mutual_knn", "cknna")``) or a mapping
            ``{name: {kwargs}}`` e.g. ``{"mutual_knn": {"k": 5}}``.
        every_n_epochs: run after every n-th training epoch (default 1).
        every_n_train_steps: run every n optimizer steps instead (default None).
        num_permutations: K (default 500). alpha: τ level (default 0.05).
        aggregate: ``"max"`` (default), ``"mean"``, ``"topK"`` or a callable.
        seed: permutation seed (default 0). baseline: run once before training (default True).
        pool / reference_pool: pooling of 3-D+ outputs (default ``"mean"``).
        preprocess: metric preprocessing (default True: L2-normalize rows).
        log_prefix: key prefix (default ``"alignment"``). log_heatmaps: default True.
        log_pairs: also log every pair's raw score (default False).
        on_error: ``"warn"`` (default: warn with the reason and keep training) or ``"raise"``.
        input_key / batch_transform: how to get the model input from a batch (dict batches).
        reference_inputs: a separate probe for the reference (row-aligned with ``probe``; for
            cross-modal pairs), with ``reference_input_key`` / ``reference_batch_transform``.
        reference_class: ``LightningModule`` class to load a checkpoint path ``reference``.
        compute_device: where metrics run (default: the model's device).
        log_to_module: also ``pl_module.log`` calibrated values for monitors (default True;
            not with ``background``).
        background: compute in a worker thread, overlapping training (default False).
    """

    def __init__(
        self,
        reference: Union[nn.Module, str, os.PathLike],
        probe: Probe,
        layers: Layers,
        reference_layers: Union[str, Sequence[str], None] = None,
        metrics: MetricsSpec = DEFAULT_METRICS,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        num_permutations: int = 500,
        alpha: float = 0.05,
        aggregate: Aggregate = "max",
        seed: int = 0,
        baseline: bool = True,
        pool: Any = "mean",
        reference_pool: Any = None,
        preprocess: Any = True,
        log_prefix: str = "alignment",
        log_heatmaps: bool = True,
        log_pairs: bool = False,
        on_error: str = "warn",
        input_key: str | None = None,
        batch_transform: Callable[[Any], Any] | None = None,
        reference_inputs: Probe | None = None,
        reference_input_key: str | None = None,
        reference_batch_transform: Callable[[Any], Any] | None = None,
        reference_class: Any = None,
        compute_device: Union[str, torch.device, None] = None,
        log_to_module: bool = True,
        background: bool = False,
    ) -> None:
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if every_n_train_steps is None and (every_n_epochs is None or every_n_epochs < 1):
            raise ValueError("give every_n_epochs >= 1 or every_n_train_steps >= 1")
        self.reference = load_reference(reference, reference_class)
        self.probe = load_probe(probe)
        self.reference_inputs = load_probe(reference_inputs) if reference_inputs is not None else None
        self.pair_map: dict[str, str] | None = None
        if isinstance(layers, Mapping):
            self.pair_map = dict(layers)
            layers, reference_layers = list(layers.keys()), list(layers.values())
        self.layers = layers
        self.reference_layers = reference_layers if reference_layers is not None else layers
        if isinstance(metrics, str):
            metrics = [metrics]
        self.metric_specs: dict[str, dict[str, Any]] = (
            {name: dict(kw) for name, kw in metrics.items()} if isinstance(metrics, Mapping)
            else {name: {} for name in metrics}
        )
        if not self.metric_specs:
            raise ValueError("no metrics given")
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.num_permutations = num_permutations
        self.alpha = alpha
        self.aggregate = aggregate
        self.seed = seed
        self.baseline = baseline
        self.pool = pool
        self.reference_pool = pool if reference_pool is None else reference_pool
        self.preprocess = preprocess
        self.log_prefix = log_prefix
        self.log_heatmaps = log_heatmaps
        self.log_pairs = log_pairs
        self.on_error = on_error
        self.input_key = input_key
        self.batch_transform = batch_transform
        self.reference_input_key = reference_input_key if reference_inputs is not None else input_key
        self.reference_batch_transform = (
            reference_batch_transform if reference_inputs is not None else batch_transform
        )
        self.compute_device = compute_device
        self.log_to_module = log_to_module
        self.background = background
        self._queue = BackgroundQueue()
        self._threaded = False  # background in effect for the current fit
        self._shadow: Any = None  # background, CPU model: the worker's copy (False: not possible)
        self._shadow_tensors: list[Tensor] = []
        self._probe_batches: Any = None
        self._device = torch.device("cpu")  # where the metrics compute
        self._scratch: str | None = None  # heatmap PNGs for W&B when no CSV logger writes them
        self._resume_pending: list[tuple[int, int]] = []  # from a checkpoint: steps to redo
        self.history: list[dict[str, Any]] = []
        self._metrics: dict[str, LayerAlignment] | None = None
        self.last_results: dict[str, Any] = {}

    # ------------------------------------------------------------------------- identity
    @property
    def state_key(self) -> str:
        return self._generate_state_key(log_prefix=self.log_prefix, metrics=sorted(self.metric_specs))

    def state_dict(self) -> dict[str, Any]:
        """History of results (primitives only, safe for ``weights_only`` checkpoints).

        Does not wait for the newest background step: finished steps not yet logged are
        included, and a step still being computed is kept as ``pending`` ``(epoch, step)``; a
        run resumed from the checkpoint recomputes it at its start (same weights: the
        checkpoint's, when the checkpoint was written at that step).
        """
        done, running = self._queue.snapshot()
        history = self.history + [outcome[0] for outcome in done if outcome is not None]
        return {"history": [dict(h) for h in history], "pending": [list(p) for p in running]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._resume_pending = [(int(e), int(s)) for e, s in state_dict.get("pending", [])]

    # ---------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        axis = "step" if self.every_n_train_steps is not None else "epoch"
        lg.define_axes(trainer.loggers, self.log_prefix, f"{self.log_prefix}/{axis}")
        if self.log_heatmaps and importlib.util.find_spec("matplotlib") is None:
            warnings.warn("log_heatmaps needs matplotlib; skipping heatmaps", RuntimeWarning, stacklevel=2)
            self.log_heatmaps = False
        self._threaded = self.background and trainer.world_size == 1
        if self.background and not self._threaded:
            warnings.warn("AlignmentCallback(background=True) runs synchronously under multi-process "
                          "strategies (rank 0 computes, results are broadcast)", UserWarning, stacklevel=2)
        if self.baseline and not self.history:
            # in step mode the baseline is not pl_module.log-ged: an epoch-level value logged
            # here would replace the latest step value in callback_metrics at every epoch end
            self._maybe_run(trainer, pl_module, epoch=0, monitor=self.every_n_train_steps is None)
        for epoch, step in self._resume_pending:  # in flight when the checkpoint was written
            if step == trainer.global_step:
                self._maybe_run(trainer, pl_module, epoch=epoch, monitor=False)
        self._resume_pending = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_train_steps is not None or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0:
            self._maybe_run(trainer, pl_module, epoch=epoch)
        self._publish(trainer, self._queue.ready())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        n = self.every_n_train_steps
        if n is not None and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._maybe_run(trainer, pl_module, epoch=trainer.current_epoch, in_batch_hook=True)
        if len(self._queue):
            self._publish(trainer, self._queue.ready())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._publish(trainer, self._queue.ready(wait=True))
        self._queue.shutdown()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._queue.shutdown(cancel=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._queue.shutdown(cancel=True)
        self._metrics = None  # drop cached reference state (memory)
        self._shadow, self._shadow_tensors, self._probe_batches = None, [], None
        if self._scratch is not None:  # W&B copied the files into its run directory
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    # -------------------------------------------------------------------------- running
    def _maybe_run(self, trainer: Trainer, pl_module: LightningModule, epoch: int,
                   in_batch_hook: bool = False, monitor: bool = True) -> None:
        step = int(trainer.global_step)
        if self._queue.has(epoch, step) or any(h["step"] == step and h["epoch"] == epoch
                                               for h in self.history):
            return  # already done (resumed run): no duplicate steps
        if self._threaded:
            render = bool(trainer.loggers)
            if self._guarded(epoch, step, self._devices, pl_module) is None:
                return  # the reference pass failed (warned)
            weights = self._snapshot(pl_module)
            if weights is not None:  # capture in the worker, on the model's copy
                job = (self._compute_on_copy, weights, epoch, step, render)
            else:
                acts = self._guarded(epoch, step, self._capture, pl_module)
                job = None if acts is None else (self._compute, acts, epoch, step, render)
            if job is not None:
                self._publish(trainer, self._queue.submit(self._guarded, epoch, step, *job,
                                                          epoch=epoch, step=step))
            return
        values: dict[str, float] | None = None
        if trainer.is_global_zero:
            outcome = self._guarded(epoch, step, self._capture_and_compute, pl_module, epoch, step,
                                    bool(trainer.loggers))
            if outcome is not None:
                self._log_outcome(trainer, outcome)
                values = outcome[0]
        if trainer.world_size > 1:
            values = trainer.strategy.broadcast(values, src=0)
            if values is not None and not trainer.is_global_zero:
                self.history.append(dict(values))
        if values is not None and monitor:
            self._log_to_module(pl_module, values, in_batch_hook)

    def _guarded(self, epoch: int, step: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; a failure warns and returns None unless ``on_error="raise"``."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - reported, training goes on unless asked
            if self.on_error == "raise":
                raise
            warnings.warn(f"alignment step at epoch {epoch} (step {step}) skipped: "
                          f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
            return None
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _publish(self, trainer: Trainer, jobs: list[Job]) -> None:
        """Log finished background jobs in order (main thread); re-raise under ``on_error="raise"``."""
        for job in jobs:
            error = job.future.exception()
            if error is not None:  # only with on_error="raise": _guarded warned otherwise
                self._queue.shutdown(cancel=True)
                raise error
            outcome = job.future.result()
            if outcome is not None:
                self._log_outcome(trainer, outcome)

    def _log_to_module(self, pl_module: LightningModule, values: Mapping[str, Any],
                       in_batch_hook: bool) -> None:
        if not self.log_to_module:
            return
        for name in self.metric_specs:
            key = f"{self.log_prefix}/{name}/calibrated"
            if key in values:
                # from a batch hook log on_step: with on_epoch the monitors would see the
                # epoch mean of the steps' values, and only at the end of the epoch
                pl_module.log(key, float(values[key]), logger=False, on_step=in_batch_hook,
                              on_epoch=not in_batch_hook)

    def _build_metrics(self, device: torch.device, model_device: torch.device) -> dict[str, LayerAlignment]:
        """Reference activations once, then one cached-reference metric per measure."""
        self.reference.to(model_device)
        ref_probe = self.probe if self.reference_inputs is None else self.reference_inputs
        ref = collect_activations(
            self.reference, iterate_probe(ref_probe), self.reference_layers,
            pool=self.reference_pool, device=model_device, input_key=self.reference_input_key,
            batch_transform=self.reference_batch_transform,
        )
        ref = {name: t.to(device) for name, t in ref.items()}
        metrics = {}
        for name, kwargs in self.metric_specs.items():
            m = LayerAlignment(
                name, aggregate=self._aggregate(list(ref)), num_permutations=self.num_permutations,
                alpha=self.alpha, seed=self.seed, preprocess=self.preprocess, sync_on_compute=False,
                **kwargs,
            )
            m.set_reference(ref)
            metrics[name] = m
        return metrics

    def _aggregate(self, ref_names: list[str]) -> Aggregate:
        if self.pair_map is None:
            return self.aggregate
        return _MappedAggregate(self.pair_map, ref_names, self.aggregate)

    def _devices(self, pl_module: LightningModule) -> tuple[torch.device, torch.device]:
        """(compute device, model device); builds the metrics (reference pass) the first time."""
        model_device = model_device_of(pl_module)
        device = model_device if self.compute_device is None else torch.device(self.compute_device)
        if self._metrics is None:
            self._metrics = self._build_metrics(device, model_device)
        self._device = device
        return device, model_device

    @torch.no_grad()
    def _capture(self, pl_module: LightningModule) -> tuple[dict[str, Tensor], float]:
        """The model's probe activations on the compute device (training thread), and the
        seconds it took."""
        start = time.perf_counter()
        _, model_device = self._devices(pl_module)
        acts = self._model_activations(pl_module, iterate_probe(self.probe), model_device)
        return acts, time.perf_counter() - start

    def _model_activations(self, model: nn.Module, batches: Any, model_device: torch.device,
                           restore_rng: bool = True) -> dict[str, Tensor]:
        """The chosen layers of ``model`` on the probe batches, on the compute device."""
        acts = collect_activations(
            model, batches, self.layers, pool=self.pool, device=model_device,
            input_key=self.input_key, batch_transform=self.batch_transform, restore_rng=restore_rng,
        )
        return {k: v.to(self._device) for k, v in acts.items()}

    @torch.no_grad()
    def _snapshot(self, pl_module: LightningModule) -> list[Tensor] | None:
        """Background mode, CPU model: a copy of this step's weights for the worker's model
        copy (made on first use), or None when the capture has to stay in the loop."""
        if self._shadow is False:
            return None
        if model_device_of(pl_module).type != "cpu":
            self._shadow = False
            return None
        tensors = [*pl_module.parameters(), *pl_module.buffers()]
        if self._shadow is None:
            try:  # the trainer (and what hangs off it) is not copied
                trainer = getattr(pl_module, "_trainer", None)
                shadow = copy.deepcopy(pl_module, {id(trainer): None} if trainer is not None else {})
            except Exception as err:  # noqa: BLE001 - fall back to capturing in the loop
                warnings.warn(f"background=True: the model cannot be copied ({type(err).__name__}: "
                              f"{err}); the probe runs in the training loop", RuntimeWarning,
                              stacklevel=2)
                self._shadow = False
                return None
            shadow.requires_grad_(False)
            for p in shadow.parameters():
                p.grad = None
            self._shadow_tensors = [*shadow.parameters(), *shadow.buffers()]
            if [t.shape for t in self._shadow_tensors] != [t.shape for t in tensors]:
                self._shadow = False
                return None
            probe = iterate_probe(self.probe)
            if not isinstance(probe, (Tensor, list)):
                with preserved_rng():  # a DataLoader draws a seed from the global RNG
                    probe = list(probe)
            self._shadow, self._probe_batches = shadow, probe
        return [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def _compute_on_copy(self, weights: list[Tensor], epoch: int, step: int, render: bool
                         ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Worker thread: load the snapshot into the model copy, capture, compute."""
        start = time.perf_counter()
        for dst, src in zip(self._shadow_tensors, weights):
            dst.copy_(src)
        del weights
        # restore_rng=False: restoring from this thread would rewind the training loop's RNG
        acts = self._model_activations(self._shadow, self._probe_batches, torch.device("cpu"),
                                       restore_rng=False)
        return self._compute((acts, time.perf_counter() - start), epoch, step, render)

    @torch.no_grad()
    def _compute(self, captured: tuple[dict[str, Tensor], float], epoch: int, step: int,
                 render: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Every metric on captured activations: ``(history entry, results, heatmap images)``.

        Touches only the callback's own metric objects, so it may run in the worker thread.
        """
        start = time.perf_counter()
        acts, capture_seconds = captured
        values: dict[str, Any] = {f"{self.log_prefix}/epoch": float(epoch),
                                  f"{self.log_prefix}/step": float(step)}
        results = {}
        for name, metric in self._metrics.items():
            metric.reset()
            metric.update(acts)
            out = metric.compute()
            result = metric.last_result
            results[name] = result
            for field in LOGGED_FIELDS:
                values[f"{self.log_prefix}/{name}/{field}"] = float(out[field])
            values[f"{self.log_prefix}/{name}/best_model_layer"] = float(result.argmax[0])
            values[f"{self.log_prefix}/{name}/best_reference_layer"] = float(result.argmax[1])
            if self.log_pairs:
                for a, xa in enumerate(result.x_names):
                    for b, yb in enumerate(result.y_names):
                        values[f"{self.log_prefix}/{name}/pair/{xa}__{yb}"] = float(result.matrix[a, b])
            metric.reset()
        del acts, captured
        values[f"{self.log_prefix}/seconds"] = capture_seconds + time.perf_counter() - start
        images = {}
        if self.log_heatmaps and render:
            from alignment_callback.metrics.plotting import heatmap_image

            for name, r in results.items():
                image = heatmap_image(r, f"{name} after epoch {epoch} (step {step})")
                images[name] = (image, lg.encode_png(image))
        entry = dict(values)
        entry.update(epoch=epoch, step=step)
        entry.update({f"{self.log_prefix}/{n}/best_pair": "|".join(r.best_pair) for n, r in results.items()})
        return entry, results, images

    def _capture_and_compute(self, pl_module: LightningModule, epoch: int, step: int, render: bool
                             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        return self._compute(self._capture(pl_module), epoch, step, render)

    def run(self, trainer: Trainer, pl_module: LightningModule, epoch: int, step: int) -> dict[str, Any]:
        """One synchronous alignment step: capture, compute every metric, log; returns the
        history entry (the logged scalars plus ``epoch``, ``step`` and the best pairs)."""
        outcome = self._capture_and_compute(pl_module, epoch, step, bool(trainer.loggers))
        self._log_outcome(trainer, outcome)
        return outcome[0]

    def _log_outcome(self, trainer: Trainer, outcome: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
                     ) -> None:
        """Scalars, heatmaps and tables to the loggers; the entry to the history (main thread)."""
        entry, results, images = outcome
        step = int(entry["step"])
        scalars = {k: v for k, v in entry.items() if k.startswith(f"{self.log_prefix}/")
                   and not k.endswith("/best_pair")}
        lg.log_scalars(trainer.loggers, scalars, step)
        for name, (image, png) in images.items():
            if self._scratch is None:
                self._scratch = tempfile.mkdtemp(prefix="alignment_heatmaps_")
            lg.log_image(trainer.loggers, f"{self.log_prefix}/{name}/heatmap", image, png, step,
                         f"epoch{int(entry['epoch']):04d}_step{step:06d}", self._scratch)
        if self.log_heatmaps and trainer.loggers:
            for name, r in results.items():
                rows = [[xa, yb, float(r.matrix[a, b]), float(r.pair_calibrated[a, b]),
                         float(r.pair_p_value[a, b])]
                        for a, xa in enumerate(r.x_names) for b, yb in enumerate(r.y_names)]
                lg.log_table(trainer.loggers, f"{self.log_prefix}/{name}/pairs",
                             ["model_layer", "reference_layer", "raw", "calibrated", "p_value"],
                             rows, step)
        self.last_results = results
        self.history.append(entry)


class _MappedAggregate:
    """Aggregate over the mapped (model layer → reference layer) pairs only."""

    def __init__(self, pair_map: Mapping[str, str], ref_names: list[str], aggregate: Aggregate) -> None:
        from alignment_callback.functional.aggregation import aggregate_fn

        self.__name__ = f"{aggregate if isinstance(aggregate, str) else 'custom'}_over_pairs"
        model_names = list(pair_map)
        self.index = [(model_names.index(a), ref_names.index(b)) for a, b in pair_map.items()]
        self.inner = aggregate_fn(aggregate)[1]

    def __call__(self, matrix: Tensor) -> Tensor:
        vals = torch.stack([matrix[a, b] for a, b in self.index])
        return self.inner(vals.view(1, 1, -1))[0]


