"""``AlignmentCallback``: calibrated alignment to a frozen reference, live during training.

The callback decides *when* an alignment step runs, captures the probe's activations, hands them
to the :class:`~alignment_callback.engine.AlignmentEngine` and logs what comes back.  The
computing lives in the engine, the worker thread and model copy in ``background.py``, the logger
calls in ``dispatch.py``, the probe's handling in ``probe.py`` and what a checkpoint records of the
settings in ``settings.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import tempfile
import time
import warnings
import weakref
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from alignment_callback.callback import dispatch, feedback, monitors, settings
from alignment_callback.callback.background import BackgroundQueue, Job, ModelCopy, Snapshot
from alignment_callback.callback.distributed import first_error, from_rank_zero, guarded_step
from alignment_callback.callback.presets import resolve_preset
from alignment_callback.callback.probe import (
    Probe,
    freeze,
    iterate_probe,
    load_probe,
    seeded_rng,
    shared_with,
)
from alignment_callback.callback.progress import epoch_cut_short, last_batch_ran
from alignment_callback.callback.reference import (
    Reference,
    ReferenceSpec,
    check_features,
    count_rows,
    feature_dtype,
    resolve_references,
)
from alignment_callback.engine import AlignmentEngine
from alignment_callback.engine.engine import MeasuresSpec
from alignment_callback.functional._validation import (
    ShapeOptionError,
    check_device,
    is_integer,
    resource_error,
)
from alignment_callback.functional.aggregation import Aggregate
from alignment_callback.functional.calibration import few_permutations_unsaid, warn_if_few
from alignment_callback.functional.preprocessing import check_pool
from alignment_callback.functional.registry import MeasureOutputError, renamed_argument
from alignment_callback.hooks import collect_activations, resolve_layers
from alignment_callback.hooks.batches import compute_dtype, each_batch, in_dtype_of
from alignment_callback.hooks.collect import (
    LayerCountError,
    preserved_loader_seed,
    random_states,
    same_random_states,
)
from alignment_callback.hooks.collect import model_device as model_device_of
from alignment_callback.hooks.outputs import LayerOutputError, LayerShapeError
from alignment_callback.hooks.selection import about_argument


class FrozenReferenceError(ValueError):
    """A frozen reference's probe activations cannot be measured (a measure option its widths
    cannot take, NaN activations, ...): they never change, so every step would fail."""


class ProbeInputError(RuntimeError):
    """The model in training failed on the probe although it has run training batches, and it
    never ran on the probe in this fit (inputs of another width, dtype or structure than it
    takes): every step would fail the same way."""


# configuration mistakes only a forward pass (or a measure callable's value) can show: raised
# whatever on_error says
LAYER_ERRORS = (LayerCountError, LayerOutputError, LayerShapeError, FrozenReferenceError,
                ProbeInputError, ShapeOptionError, MeasureOutputError)

_INITIAL_RESUMED = ("reference='initial' on a resumed run compares with the activations at the "
                    "start of this fit (the resumed weights), not of the original one: the "
                    "checkpoint does not hold them")

LayerSpec = Union[str, Sequence[str], Mapping[str, str]]

DEFAULT_MEASURES = ("linear_cka", "mutual_knn", "cknna")
Results = dict  # {reference name (None: the single reference): StepResult}
Outcome = tuple[Results, dict[str, Any], int, int, float]  # results, heatmaps, epoch, step, s


class AlignmentCallback(Callback):
    """Track permutation-calibrated alignment between the model in training and a frozen
    reference on a fixed probe set.

    At the start of training (baseline, logged as epoch 0) and then every ``every_n_epochs``
    epochs (or every ``every_n_train_steps`` steps) the callback runs the probe through the
    model under ``no_grad`` in eval mode, captures the chosen layers with forward hooks, and
    for each measure computes the raw LA×LB layer matrix and the aggregation-aware calibrated
    aggregate against the reference's activations, which are computed once and cached with
    their grams / neighbor lists.  The same seeded permutations are used every time, so the
    curve is comparable across epochs.

    What a step computes, per measure s (docs/calibration.md): **raw** is the aggregate
    A = agg_{a,b} s(X_a, Y_b) of the LA×LB matrix of model layers X_a and reference layers Y_b
    (``aggregate``; scores clamped to the measure's range), and its null A_1..A_K applies each
    of the K seeded permutations π_k to the rows of every reference layer at once and
    aggregates the recomputed matrix (Westfall–Young maxT for ``"max"``).  With α = ``alpha``,
    the threshold **τ** is the ⌈(1 − α)(K + 1)⌉-th smallest value of {A, A_1, …, A_K} (an
    order statistic, not an interpolated quantile); **calibrated** =
    max((A − τ)/(s_max − τ), 0), clamped to ≤ 1, with s_max the measure's maximum (1 for every
    built-in; [A − τ]₊ for an unbounded measure; 0 when s_max − τ is below the float
    resolution); the **p-value** is p = (1 + #{k : A_k ≥ A})/(K + 1), so under the null
    P(p ≤ α) ≤ α and P(calibrated > 0) ≤ α.  With ``null="moments"`` τ and p come from a
    Pearson type III fit to the exact permutation moments instead of drawn permutations.

    Logged through every attached logger, per measure ``<prefix>/<measure>/{raw, calibrated,
    p_value, threshold, null_mean, null_std, effect_size}`` and the text ``null_method``
    (where the logger takes text), the arg-max pair indices, per-pair raw
    values when ``log_pairs``, and a layer×layer heatmap image ``<prefix>/<measure>/heatmap``
    (raw and per-pair calibrated side by side) where the logger takes images (W&B,
    TensorBoard, MLflow; PNG files for CSV) plus a ``wandb.Table`` of every pair.
    ``<prefix>/epoch`` (the training epochs finished) and ``<prefix>/step`` (the global step)
    are logged alongside; W&B plots the series against the epoch (the global step with
    ``every_n_train_steps``).  The calibrated aggregates are also ``pl_module.log``-ged
    (logger=False) so ``ModelCheckpoint`` and ``EarlyStopping`` can monitor e.g.
    ``"alignment/mutual_knn/calibrated"`` (foreground mode); a monitor that would check where
    no fresh value is (at a validation end before the epoch's step, on epochs without a step)
    is warned about at setup, with the setting that fixes it.

    Training is unchanged: global RNG states are restored, train/eval modes restored, no
    gradients, hooks removed, activations freed after each step.  Under a multi-process
    strategy (DDP) every process runs the probe and computes its share of the K permutations;
    the null is gathered (values identical to one process's), rank 0 logs and its results are
    broadcast.  An error on any process reaches every process, so all raise (or warn) the same
    and no collective waits forever.

    Configuration mistakes fail before the first training step, whatever ``on_error`` says:
    an unknown measure or option, bad arguments (at construction), layers that match nothing
    in the student or the reference model, a reference model that shares parameters the
    model in training trains, a probe with too few samples for a measure (e.g.
    k >= n; a probe whose size only running it tells, such as an ``IterableDataset``, is
    counted once at the start of fit), a shuffling probe, features or ``reference_inputs``
    with other row counts than the probe, ``null="moments"`` with a measure it cannot
    calibrate or several layer pairs, and ``background=True`` with a checkpoint or
    early-stopping monitor on an alignment key;
    a chosen layer that does not run exactly once per forward pass, returns no tensor to
    record, or gives no row per probe sample (a 0-dim loss, an output that is not batch-first),
    and a frozen reference whose probe activations cannot be measured (NaN values, a
    measure option its widths cannot take, such as SVCCA's ``cca_dim``), are raised at the
    baseline (the first step with ``baseline=False``).  ``on_error`` governs failures that
    depend on the model's data during training (NaN activations).

    With ``background=True`` the measures, their permutation nulls and the heatmaps are computed
    by one worker thread while training goes on, and each result is logged, in order and with
    its own epoch/step, at the first training hook after it is ready (all of them by the end of
    ``fit``; finished ones also when training stops on an exception).  For a model on the CPU
    the probe's forward passes run in the worker too, on a private copy of the model refreshed
    at every step from the model's weights, buffers and plain attributes (a stage flag or a
    schedule: numbers, strings, enums, small tensors and containers of them, and its other
    public attributes, large tensors included, deep-copied); at the first step the model's
    activations are captured in the loop and the worker checks the copy's against them (a next
    step that comes before the check has finished waits for it), and if they differ (a forward
    that reads the trainer, or state the copy cannot hold) the capture stays in the loop with a
    warning.  The values equal the
    foreground ones.  They are not ``pl_module.log``-ged (when a value arrives depends on
    timing).  At most two steps are outstanding; a checkpoint waits for an earlier step still
    being computed, not for one taken at its own global step, which it saves as pending and a
    resumed run recomputes.  Should the model's state stop being copyable later in training, the
    capture moves to the loop with a warning; training never fails on it.
    Single-process runs only: under DDP the callback runs in the foreground.

    Parameters
    ----------
    reference : nn.Module, LightningModule, str, path, mapping, "initial" or "previous"
        What the model is compared with: a frozen model (``nn.Module`` /
        ``LightningModule``, put in eval mode with ``requires_grad_(False)`` at setup; one
        that shares trained parameters with the model in training is refused: pass a
        ``copy.deepcopy``; a frozen module kept on the model is used as it is) or a
        checkpoint path (see ``reference_class``); its features instead, a
        ``{layer: (n, ...) tensor}`` mapping (``(n, T, d)`` features are pooled with
        ``reference_pool``) or a feature file (``.pt``, ``.npz``, ``.safetensors``, ...; one
        written by ``alignment-callback extract`` carries its probe's fingerprint, checked
        against ``probe``); ``"initial"`` (the model's own activations at the start of fit; on
        a resumed run, of the resumed weights, with a warning) or ``"previous"`` (at the
        previous step), layer by layer; or ``{name: reference}`` for several, sharing the
        model's probe pass, keys ``<prefix>/<name>/<measure>/...`` (``reference_layers`` /
        ``reference_inputs`` may then be keyed by name too).
    probe : DataLoader, Tensor, ndarray, str, path, callable or list of batches
        The probe inputs: a ``DataLoader`` with a sequential sampler, a tensor or numeric
        NumPy array, a ``.pt`` path (a tensor, a dict batch, a tuple batch
        ``(inputs, labels)`` or a list of batches), a callable returning batches, or a list
        of batches; the same rows in the same order every time (every probe pass runs with
        the global random generators seeded with 0 and put back after, so a probe that draws
        gives the same rows).
    layers : str, sequence of str or mapping of str to str
        Student layers (names, globs, ``"re:"`` regexes; see ``resolve_layers``), or a
        mapping ``{student layer: reference layer}`` to aggregate over those pairs only
        (then without ``reference_layers``).
    reference_layers : str, sequence of str or mapping, default=None
        Reference layers: names, globs or ``"re:"`` regexes as for ``layers``, matched
        against a model reference's modules (chosen in model order) or the layer names of
        features (in the features' order; ``resolve_names``).  None: a model reference's are
        ``layers``; features use all their layers.
        With several references, ``{name: layers}`` per reference (a name left out: None;
        ``"initial"`` / ``"previous"`` take none).
    measures : sequence of str or mapping of str to dict, default=None
        Names, or a mapping ``{name: {options}}`` e.g. ``{"mutual_knn": {"k": 5}}``; None:
        ``("linear_cka", "mutual_knn", "cknna")``, or the ``preset``'s.
    every_n_epochs : int or None, default=None
        Run at the end of every n-th finished training epoch; None: 1 unless
        ``every_n_train_steps`` is given (giving both is an error).
    every_n_train_steps : int or None, default=None
        Run every n optimizer steps (Lightning's ``global_step``) instead; None: by epochs.
    num_permutations : int, default=500
        K, the permutations of every null.
    alpha : float, default=0.05
        α, the level of the threshold τ.
    aggregate : {"max", "mean", "top<m>"} or callable, default=None
        How the LA×LB layer matrix is aggregated (``"top<m>"`` e.g. ``"top3"``); None:
        ``"max"``, or the ``preset``'s.
    seed : int, default=0
        The permutation seed.
    baseline : bool, default=True
        Run once before training (logged as epoch 0).
    pool : str or callable, default=None
        Pooling of 3-D+ outputs: one of ``"flatten"``, ``"mean"``, ``"cls"``, ``"first"``,
        ``"last"``, ``"none"`` or a callable ``(n, ...) -> (n, d)``; None: ``"mean"``, or
        the ``preset``'s.  Dict batches are passed to the model as ``**kwargs``, and token
        outputs are pooled over the ``mask_key`` entry of the batch (default
        ``"attention_mask"``; a ``mask_key`` of None disables it).
    reference_pool : str, callable or mapping, default=None
        Pooling of the reference's outputs; it also pools reference features of more than
        two dimensions (without a mask).  None: ``pool``, or the ``preset``'s.  With several
        references, ``{name: pool}`` per reference (a name left out: ``pool``).
    preprocess : bool, mapping or callable, default=None
        Feature preprocessing: True L2-normalizes rows, False uses rows as given, a mapping
        passes ``pool`` / ``clamp_quantile`` / ``normalize`` to ``prepare_features``, a
        callable maps (n, d) rows to features; None: True, or the ``preset``'s.
    log_prefix : str, default="alignment"
        The key prefix ``<prefix>``.
    log_heatmaps : bool, default=True
        Log the layer×layer heatmaps (needs matplotlib).
    log_pairs : bool, default=False
        Also log every pair's raw score.
    on_error : {"warn", "raise"}, default="warn"
        ``"warn"``: warn with the reason and keep training; ``"raise"``: raise.  For
        failures that depend on the model's data during training only (configuration
        mistakes and a frozen reference that cannot be measured are always raised).
    input_key : str or None, default=None
        How to get the model input from a dict batch: ``model(batch[input_key])``; None:
        ``model(**batch)``.
    batch_transform : callable or None, default=None
        ``f(batch) -> inputs``, how to get the model input from a batch, replacing the rules
        above.
    reference_inputs : probe-like or None, default=None
        A separate probe for the reference (row-aligned with ``probe``; for cross-modal
        pairs); None: the reference runs on ``probe``.
    reference_input_key : str or None, default=None
        ``input_key`` of the reference's pass: over ``reference_inputs``, or over ``probe``
        when the reference needs its batches otherwise than the model.  None: none for
        ``reference_inputs``, the model's ``input_key`` for ``probe``.
    reference_batch_transform : callable or None, default=None
        ``batch_transform`` of the reference's pass, likewise (e.g. the reference's own
        normalization of the probe's images).  None: none for ``reference_inputs``, the
        model's ``batch_transform`` for ``probe``.
    reference_class : type, mapping or None, default=None
        ``LightningModule`` class to load a checkpoint path ``reference``: a path of
        another suffix than a feature file's (``.ckpt``), or a ``.pt`` / ``.pth`` holding a
        Lightning checkpoint (``state_dict``, ``pytorch-lightning_version``); a feature file
        is read as features all the same.  With several references, ``{name: class}`` per
        reference.
    compute_device : str, torch.device or None, default=None
        Where measures run; None: the model's device (the CPU for an MPS model, which has
        no float64).  Checked at construction (a CUDA device must exist); ``"cuda"`` without
        an index is the training process's current CUDA device when training starts.
    log_to_module : bool, default=True
        Also ``pl_module.log`` calibrated values for monitors (not with ``background``).
    background : bool, default=False
        Compute in a worker thread, overlapping training (see above).
    null : {"permutation", "moments", "auto"}, default="permutation"
        ``"permutation"``: K permutations; ``"moments"``: exact permutation moments with a
        Pearson type III null, a p-value at every step for the cost of a few traces
        (gram-family measures on one layer pair); ``"auto"``: moments where validated,
        permutations elsewhere, e.g. for an aggregate over layer pairs.
    verbose : bool, default=True
        One console line per measure after each step, and the reference's probe pass as a
        progress bar (rank 0).
    progress_bar : bool, default=True
        Show the calibrated values on Lightning's progress bar (with the values logged to
        the module: not with ``log_to_module=False`` nor ``background=True``).
    report : bool, default=True
        Write ``alignment_report.md`` / ``.html`` next to the logs at the end of fit
        (curves, last heatmaps, final values with Benjamini–Hochberg p, settings, one
        sentence per curve; W&B also keeps it as a file; none with ``fast_dev_run``).  Needs
        matplotlib (without it, a warning at the start of fit says no report will be written).
    mask_key : str or None, default="attention_mask"
        The dict-batch key of an attention mask for pooling; None: no mask.  Another key that
        the batches do not hold is refused at the start of fit.
    preset : {"prh", "repa"} or None, default=None
        ``"prh"``: mutual kNN k = 10, rows clamped at the 0.95 quantile and L2-normalized,
        max over layer pairs (PRH's ``measure_alignment``); ``"repa"``: CKNNA k = 10 on
        token-averaged features, as REPA's public threads describe it (``pool="mean"``
        averages every token, a ViT's CLS and register tokens too: pass
        ``reference_pool=patch_mean(1)`` from ``alignment_callback.callback.presets`` to
        average a DINOv2 reference's patch tokens only); each documents its sources and
        what is unknown (``PRESETS``).  Explicit ``measures`` / ``aggregate`` / ``pool`` /
        ``reference_pool`` / ``preprocess`` override it.
    metrics : sequence of str or mapping of str to dict, default=None
        Deprecated name of ``measures`` (a ``DeprecationWarning``).

    Attributes
    ----------
    history : list of dict
        One entry per alignment step with a result, in order: the logged scalars
        (``<prefix>[/<reference>]/<measure>/<field>``, the best layer indices, with
        ``log_pairs`` every pair's raw score), ``<prefix>/epoch``, ``<prefix>/step``,
        ``<prefix>/seconds``, each measure's ``best_pair`` (``"<model layer>|<reference
        layer>"``) and ``null_method``, per-layer raw and calibrated scores for an
        ``"initial"`` / ``"previous"`` reference, and plain ``epoch`` and ``step``.  Saved
        in checkpoints; a step without a result of some reference has no keys of it (see
        :meth:`has_result`).
    skipped : list of dict
        Steps that failed under ``on_error="warn"``: ``{"epoch", "step", "reason"}`` each
        (saved in checkpoints and listed in the report).
    last_results : dict
        The last step's ``{measure label: LayerAlignmentResult}``, labels prefixed by the
        reference's name for several references; empty before the first result (and on every
        process but rank 0 under a multi-process strategy, where ``history`` is complete).
    report_paths : tuple of (str, str) or None
        The paths of the end-of-fit report (``.md``, ``.html``); None until it is written (on
        rank 0 only, which writes it).
    restarted : set of str
        Key prefixes (``<prefix>/<label>/``) of the curves the last checkpoint loaded did not
        continue (written with other settings): an ``AlignmentPlateau`` restarts its count.

    See Also
    --------
    AlignmentPlateau : call a function once when an alignment value stops improving.
    alignment_callback.engine.AlignmentEngine : the computation of one step, without Lightning.
    alignment_callback.functional.calibrated_layer_alignment : aggregation-aware calibration.
    alignment_callback.functional.calibrate : τ, calibrated score and p of one score and null.
    alignment_callback.callback.presets.PRESETS : the ``preset`` settings and their sources.

    References
    ----------
    Kornblith, Norouzi, Lee, Hinton. Similarity of neural network representations revisited.
    ICML 2019 (linear CKA).

    Huh, Cheung, Wang, Isola. The Platonic Representation Hypothesis. ICML 2024 (mutual kNN,
    CKNNA; code: github.com/minyoungg/platonic-rep).

    Permutation calibration of representational similarity, arXiv 2602.14486 (Algorithms 1
    and 2: τ, the calibrated score, p, and the aggregation-aware calibration).

    Westfall & Young (1993), *Resampling-Based Multiple Testing* (maxT).

    Kazi-Aoual, Hitier, Sabatier & Lebreton (1995), "Refined approximations to permutation
    tests for multivariate inference", *Computational Statistics & Data Analysis* 20; Josse,
    Pagès & Husson (2008), "Testing the significance of the RV coefficient", *Computational
    Statistics & Data Analysis* 53 (``null="moments"``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from alignment_callback.callback import AlignmentCallback
    >>> _ = torch.manual_seed(0)
    >>> reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> probe = torch.randn(64, 8)
    >>> cb = AlignmentCallback(reference, probe, layers=["0", "2"], num_permutations=99)
    >>> list(cb.measures), cb.every_n_epochs, cb.every_n_train_steps, cb.num_permutations
    (['linear_cka', 'mutual_knn', 'cknna'], 1, None, 99)
    >>> cb.history, cb.skipped, cb.last_results, cb.report_paths
    ([], [], {}, None)
    >>> prh = AlignmentCallback(reference, probe, layers="0", preset="prh",
    ...                         every_n_train_steps=50)
    >>> dict(prh.measures["mutual_knn"].params), prh.every_n_epochs
    ({'k': 10}, None)

    In training (``module`` a ``LightningModule`` holding ``self.net``, a model with the
    reference's layout, and ``train_loader`` its data)::

        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint

        cb = AlignmentCallback(reference, probe, layers=["net.0", "net.2"],
                               reference_layers=["0", "2"], every_n_epochs=2)
        # checks on the epochs of an alignment step, at their end (where the step runs)
        best = ModelCheckpoint(monitor="alignment/mutual_knn/calibrated", mode="max",
                               every_n_epochs=2, save_on_train_epoch_end=True)
        trainer = Trainer(max_epochs=10, callbacks=[cb, best])
        trainer.fit(module, train_loader)
        cb.history[-1]["alignment/mutual_knn/calibrated"], cb.report_paths
    """

    def __init__(
        self,
        reference: ReferenceSpec,
        probe: Probe,
        layers: LayerSpec,
        reference_layers: Any = None,
        measures: MeasuresSpec | None = None,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        num_permutations: int = 500,
        alpha: float = 0.05,
        aggregate: Aggregate | None = None,
        seed: int = 0,
        baseline: bool = True,
        pool: Any = None,
        reference_pool: Any = None,
        preprocess: Any = None,
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
        null: str = "permutation",
        verbose: bool = True,
        progress_bar: bool = True,
        report: bool = True,
        mask_key: str | None = "attention_mask",
        preset: str | None = None,
        metrics: MeasuresSpec | None = None,
    ) -> None:
        measures = renamed_argument("measures", measures, "metrics", metrics)
        given = {"measures": measures, "aggregate": aggregate, "pool": pool,
                 "reference_pool": reference_pool, "preprocess": preprocess}
        chosen = resolve_preset(preset, {k: v for k, v in given.items() if v is not None})
        measures = chosen.get("measures", DEFAULT_MEASURES)
        aggregate = chosen.get("aggregate", "max")
        pool = check_pool(chosen.get("pool", "mean"), "pool")
        reference_pool = chosen.get("reference_pool")
        preprocess = chosen.get("preprocess", True)
        self.preset = preset
        self.__validate_init_configuration(on_error, log_prefix, every_n_epochs,
                                           every_n_train_steps)
        _check_flags(baseline=baseline, log_heatmaps=log_heatmaps, log_pairs=log_pairs,
                     log_to_module=log_to_module, background=background, verbose=verbose,
                     progress_bar=progress_bar, report=report)
        _check_transforms(batch_transform=batch_transform,
                          reference_batch_transform=reference_batch_transform)
        if mask_key is not None and not isinstance(mask_key, str):
            raise TypeError(f"mask_key must be a str (the dict batch's entry holding the "
                            f"attention mask) or None, got {mask_key!r}")
        if getattr(check_device(compute_device, "compute_device"), "type", None) == "meta":
            raise ValueError("compute_device='meta' holds no data: the measures need a real "
                             "device such as 'cpu' or 'cuda'")
        self.__init_triggers(every_n_epochs, every_n_train_steps, baseline)
        self.pair_map: dict[str, str] | None = None
        if isinstance(layers, Mapping):
            if reference_layers is not None:
                raise ValueError(
                    "layers is a mapping {model layer: reference layer}, which chooses the "
                    f"reference layers already; reference_layers={reference_layers!r} conflicts "
                    "with it: give the reference layers in one place only")
            if not layers:
                raise ValueError("layers is an empty mapping: give {model layer: reference "
                                 "layer} pairs, or a list of model layers (or None for the "
                                 "default) to compare every pair")
            for key, value in layers.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(
                        "layers: a mapping pairs a model layer's name with a reference layer's "
                        f"name, both str; got {key!r}: {value!r} "
                        f"({type(key).__name__}: {type(value).__name__})")
            self.pair_map = dict(layers)
            layers, reference_layers = list(layers.keys()), list(layers.values())
        self.layers = layers
        engine_options = dict(measures=measures, num_permutations=num_permutations, alpha=alpha,
                              seed=seed, aggregate=aggregate, preprocess=preprocess, null=null)
        with few_permutations_unsaid():  # said once, below
            checked = AlignmentEngine(**engine_options)  # checks the options before training
            self.references = resolve_references(
                reference, lambda pairs: AlignmentEngine(pairs=pairs, **engine_options),
                layers=layers, reference_layers=reference_layers,
                reference_inputs=reference_inputs, reference_input_key=reference_input_key,
                reference_batch_transform=reference_batch_transform,
                reference_pool=pool if reference_pool is None else reference_pool,
                reference_class=reference_class, input_key=input_key,
                batch_transform=batch_transform, pairs=self.pair_map, pool=pool)
        if checked.null == "permutation":
            warn_if_few(checked.num_permutations, checked.alpha)
        self.probe = load_probe(probe)
        self.pool = pool
        self._preprocess = preprocess  # as given: part of the settings a checkpoint records
        self.log_prefix = log_prefix
        self.log_heatmaps = log_heatmaps
        self.log_pairs = log_pairs
        self.on_error = on_error
        self.input_key = input_key
        self.batch_transform = batch_transform
        self.mask_key = mask_key
        self.compute_device = compute_device
        self.log_to_module = log_to_module
        self.background = background
        self.verbose = verbose
        self.progress_bar = progress_bar
        self.report = report
        self.report_paths: tuple[str, str] | None = None
        self._tables: dict[str, list[list[Any]]] = {}  # W&B: every pair at every step, per key
        self._shared_frozen: list[tuple[Reference, Any]] = []  # (reference, frozen shared param)
        self._ended = False
        self._resolved_layers: list[str] | None = None  # the model layers layers= chose
        self._reference_layers: dict[str, list[str]] = {}  # per reference: the layers chosen
        #: key prefixes (``<prefix>/<label>/``) of the curves the last checkpoint loaded did not
        #: continue (written with other settings): an ``AlignmentPlateau`` restarts its count
        self.restarted: set[str] = set()
        self._samples: int | None = None  # probe samples (known after the first step)
        self._probe_known: dict[str, Any] | None = None  # the probe's settings, once per fit
        self._names_logged: set[str] = set()  # whose layer index -> name map was logged
        self._queue = BackgroundQueue()
        self._threaded = False  # background in effect for the current fit
        # the worker's model copy: None before the first step, a Future while the worker checks
        # it, False when the capture stays in the loop
        self._copy: ModelCopy | Future | bool | None = None
        self._probe_batches: Any = None
        self._device = torch.device("cpu")  # where the measures compute
        self._scratch: str | None = None  # heatmap PNGs for W&B when no CSV logger writes them
        self._resume_pending: list[tuple[int, int]] = []  # from a checkpoint: steps to redo
        self._state_loaded = False  # this fit resumed from a checkpoint of this callback
        self._probe_ran = False  # the model ran on the probe in this fit (see _model_activations)
        # (epoch, step) whose activations are "initial"'s: the fit's first step (None: taken
        # when training starts, or not taken)
        self._initial_at: tuple[int, int] | None = None
        # a step redone at a resume, which anchors "initial" and has no value of it
        self._redone_at: tuple[int, int] | None = None
        # "initial" / "previous" anchor on the resumed weights at the first training batch,
        # unless a step comes first (see _anchor_drift)
        self._anchor_due = False
        # under several processes, a step's activations "previous" takes once every process
        # knows the step succeeded (see _distributed_run)
        self._advance_with: dict[str, Tensor] | None = None
        self._readers: list[Callable[[Trainer, LightningModule], None]] = []
        self._lost: set[str | None] = set()  # "initial" references warned to have no values
        self._trainer: weakref.ref | None = None  # the fit's trainer (its global step)
        self._stage: str | None = None  # the trainer's stage, from setup to teardown
        self.history: list[dict[str, Any]] = []
        #: steps that failed under ``on_error="warn"``: ``{"epoch", "step", "reason"}`` each
        self.skipped: list[dict[str, Any]] = []
        self.last_results: dict[str, Any] = {}
        self._last_pngs: dict[str, bytes] = {}  # the last step's heatmaps, PNG-encoded

    def __validate_init_configuration(self, on_error: str, log_prefix: str,
                                      every_n_epochs: int | None,
                                      every_n_train_steps: int | None) -> None:
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        dispatch.check_key_part(log_prefix, "log_prefix")
        for name, value in (("every_n_epochs", every_n_epochs),
                            ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (not is_integer(value) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise ValueError(f"give every_n_epochs ({every_n_epochs}) or every_n_train_steps "
                             f"({every_n_train_steps}), not both: an alignment step runs on one "
                             "schedule")

    def __init_triggers(self, every_n_epochs: int | None, every_n_train_steps: int | None,
                        baseline: bool) -> None:
        as_int = (lambda v: None if v is None else int(v))  # a NumPy integer as Python's
        self.every_n_epochs = 1 if every_n_epochs is None and every_n_train_steps is None \
            else as_int(every_n_epochs)
        self.every_n_train_steps = as_int(every_n_train_steps)
        self.baseline = baseline

    @property
    def engine(self) -> AlignmentEngine:
        """The first reference's engine (every reference's has the same measures and options)."""
        return self.references[0].engine

    @property
    def reference(self) -> Any:
        """The reference: its model, features or drift mode (a dict by name for several)."""
        def one(ref: Reference) -> Any:
            return ref.module if ref.kind == "model" else ref.features if ref.kind == "features" else ref.kind

        if len(self.references) == 1 and self.references[0].name is None:
            return one(self.references[0])
        return {ref.name: one(ref) for ref in self.references}

    @property
    def measures(self) -> dict[str, Any]:
        """``{label: Measure}`` of the measures this callback computes."""
        return self.engine.measures

    @property
    def num_permutations(self) -> int:
        """K, the permutations of every null."""
        return self.engine.num_permutations

    @property
    def alpha(self) -> float:
        """The level of the threshold τ."""
        return self.engine.alpha

    @property
    def seed(self) -> int:
        """The permutation seed."""
        return self.engine.seed

    # ------------------------------------------------------------------------- identity
    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the class name with ``log_prefix``
        and the sorted measure names."""
        return self._generate_state_key(log_prefix=self.log_prefix, metrics=sorted(self.measures))

    def state_dict(self) -> dict[str, Any]:
        """History of results, the W&B pair tables, the probe size and the settings the values
        were computed with (primitives only, safe for ``weights_only`` checkpoints).

        Finished background steps not yet logged are included.  A step still being computed
        that was taken at the checkpoint's global step is not waited for: it is kept as
        ``pending`` ``(epoch, step)`` and a run resumed from the checkpoint recomputes it at
        its start, from the checkpoint's weights, which are the ones it saw.  An earlier step
        cannot be recomputed from them, so the checkpoint waits for it.
        """
        trainer = self._fit_trainer()
        done, running = self._queue.snapshot(None if trainer is None else int(trainer.global_step))
        finished = [outcome for outcome in done if outcome is not None]
        history = self.history + [self._entry(outcome) for outcome in finished]
        tables = {label: [list(row) for row in rows] for label, rows in self._tables.items()}
        if trainer is not None and dispatch.keeps_tables(trainer.loggers):
            for results, _, epoch, step, _ in finished:
                for label, rows in dispatch.pair_rows(self._flat(results), epoch, step).items():
                    tables.setdefault(label, []).extend(rows)
        samples = next((next(iter(o[0].values())).n for o in reversed(finished) if o[0]),
                       self._samples)
        return {"history": [dict(h) for h in history], "pending": [list(p) for p in running],
                "tables": tables, "samples": None if samples is None else int(samples),
                "skipped": [dict(s) for s in self.skipped],
                "settings": {**self._settings(), **self._probe_settings()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The history of a checkpoint.  When it was written with other settings (layers,
        references, measures or their options, K, seed, α, aggregate, preprocessing, pooling,
        null, the probe's rows or its inputs: rank 0's under DDP), the curves those
        settings change are not continued: a warning names what differs, their values are
        dropped from the history and their curves start anew (all of them, with a baseline,
        when a setting of every curve changed).  Outside a fit (``trainer.validate`` / ``test``
        / ``predict`` given a ``ckpt_path``, which Lightning loads callback states for too) the
        state is left as it is: the history stays the fit's."""
        if self._stage in (None, "fit"):
            self._load_state(state_dict, None)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A checkpoint of this callback written with other measures stores its state under
        another key (the key names the measures): found by its ``log_prefix``, and loaded with
        the settings check of :meth:`load_state_dict` (Lightning loads a state under this
        callback's own key itself)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or self._stage not in (None, "fit"):
            return
        taken = {cb.state_key for cb in trainer.callbacks if cb is not self}
        found = []
        for key, state in states.items():
            fields = settings.state_key_fields(key, type(self).__qualname__)
            if key not in taken and fields.get("log_prefix") == self.log_prefix:
                found.append((state, fields.get("metrics")))
        if len(found) == 1 and isinstance(found[0][0], Mapping):
            state, measures = found[0]
            self._load_state(copy.deepcopy(dict(state)),
                             list(measures) if isinstance(measures, (list, tuple)) else None)

    def _load_state(self, state: Mapping[str, Any], key_measures: list[str] | None) -> None:
        """Load ``state``; ``key_measures``: the measures its checkpoint key names (a state
        found under another key), the only settings known of a checkpoint written before
        settings were saved."""
        self.history = [dict(h) for h in state.get("history", [])]
        self._state_loaded = True
        self._resume_pending = [(int(e), int(s)) for e, s in state.get("pending", [])]
        self.skipped = [dict(s) for s in state.get("skipped", [])]
        self._tables = {str(k): [list(r) for r in rows]
                        for k, rows in (state.get("tables") or {}).items()}
        samples = state.get("samples")
        self._samples = None if samples is None else int(samples)
        saved = state.get("settings")
        if not isinstance(saved, Mapping):  # written before settings were saved
            saved = {} if key_measures is None else {"measures": dict.fromkeys(key_measures)}
        self.restarted = set()
        if not self.history:
            return
        # the probe: a checkpoint written before its settings recorded it has its rows only
        saved = {**settings.probe_settings(self._samples), **saved}
        current = {**self._settings(), **self._probe_settings()}
        saved = self._same_reference_layers(saved, current)
        changes = settings.setting_changes(saved, current)
        if not changes:
            return
        kept, dropped = self._keep_curves(saved, current)
        self.restarted = {f"{self.log_prefix}/{label}/" for label in self._labels()
                          if label not in kept}
        new = [label for label in self._labels() if label not in kept]
        rank_zero_warn(settings.resume_warning(self.log_prefix, changes, kept, dropped, new,
                                               self.baseline), category=UserWarning)

    def _labels(self, drift_only: bool = False) -> list[str]:
        """The labels ``[<reference>/]<measure>`` of this callback's curves (``drift_only``:
        of its ``"initial"`` / ``"previous"`` references)."""
        return [m if ref.name is None else f"{ref.name}/{m}"
                for ref in self.references if ref.drift or not drift_only for m in self.measures]

    def _settings(self) -> dict[str, Any]:
        """What the logged values depend on, as primitives: saved in checkpoints and compared
        when a run resumes (``references`` and ``measures`` by their key level)."""
        engine = self.engine
        return {
            # the layers chosen, however spelled ("blocks.*" or the names it matches)
            "layers": (self._resolved_layers if self._resolved_layers is not None
                       else settings.describe(settings.as_list(self.layers))),
            "pairs": settings.describe(self.pair_map),
            "pool": settings.describe(self.pool), "num_permutations": engine.num_permutations,
            "seed": engine.seed, "alpha": engine.alpha, "aggregate": settings.describe(engine.aggregate),
            "preprocess": settings.describe(self._preprocess), "null": engine.null,
            "references": {ref.name or "": settings.reference_settings(ref) for ref in self.references},
            "measures": {label: {"name": m.name, "options": settings.describe(m.kwargs)}
                         for label, m in self.measures.items()},
            # how the batches become inputs (a checkpoint without them is taken as unchanged)
            "input_key": settings.describe(self.input_key),
            "batch_transform": settings.describe(self.batch_transform),
            "mask_key": settings.describe(self.mask_key),  # which tokens the mean / last pools read
            "reference input rules": {
                ref.name or "": {"input_key": settings.describe(ref.input_key),
                                 "batch_transform": settings.describe(ref.batch_transform)}
                for ref in self.references if ref.kind == "model"},
        }

    def _probe_settings(self) -> dict[str, Any]:
        """The probe's part of the settings (``settings.probe_settings``), taken once per fit:
        its rows and a hash of its inputs.  Under several processes they are rank 0's, sent to
        every process by :meth:`setup` (rank 0's activations are the ones used, and every
        process must decide alike whether the curves go on).  What cannot be read (rows only
        a ``batch_transform`` understands) is not compared."""
        if self._probe_known is None:
            self._probe_known = self._read_probe_settings()
        return dict(self._probe_known)

    def _read_probe_settings(self) -> dict[str, Any]:
        """This process's probe rows and input hash (``settings.probe_settings``)."""
        try:
            rows = self._probe_size()
        except Exception:  # noqa: BLE001 - raised at the start of fit, where it belongs
            rows = None
        digest = None
        if rows is not None:
            with self._iterated_probe() as batches:
                digest = settings.probe_digest(batches)
        known = settings.probe_settings(rows, digest)
        inputs = {}  # what each reference model is fed: the probe, or its reference_inputs
        for ref in self.references:
            if ref.kind != "model":
                continue
            inputs[ref.name or ""] = "the probe"
            if ref.inputs is not None:
                with self._iterated_probe(ref.inputs) as batches:
                    inputs[ref.name or ""] = settings.probe_digest(batches) or "not readable"
        if inputs:
            known["reference inputs"] = inputs
        return known

    @contextmanager
    def _iterated_probe(self, probe: Any = None) -> Iterator[Any]:
        """The batches of ``probe`` (default: the probe), to iterate outside a probe pass: the
        global random states and a DataLoader's own generator are put back afterward
        (iterating draws a seed)."""
        with seeded_rng():  # iterated as in a probe pass: a probe that draws gives its rows
            batches = iterate_probe(self.probe if probe is None else probe)
            with preserved_loader_seed(batches):
                yield batches

    def _same_reference_layers(self, saved: Mapping[str, Any], current: Mapping[str, Any]
                               ) -> Mapping[str, Any]:
        """``saved`` with a reference model's ``layers`` taken as ``current``'s where the
        checkpoint's spelling (its ``reference_layers``, or ``layers=`` when they were not
        given) chooses the same layers of this model as this fit's (``"fc*"`` for ``["fc1",
        "fc2"]``), as the student's layers are compared; a spelling that does not resolve
        counts as changed (features' layers are compared as spelled)."""
        old, new = saved.get("references"), current.get("references")
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            return saved
        refs = {ref.name or "": ref for ref in self.references}
        same = {}
        for key, was in old.items():
            ref, now, chosen = refs.get(key), new.get(key), self._reference_layers.get(key)
            if not (isinstance(was, Mapping) and isinstance(now, Mapping) and ref is not None
                    and ref.kind == "model" and chosen is not None
                    and was.get("layers") != now.get("layers")
                    and {k: v for k, v in was.items() if k != "layers"}
                    == {k: v for k, v in now.items() if k != "layers"}):
                continue
            spelled = was.get("layers")
            if spelled == "as layers=":
                spelled = saved.get("layers")
            try:
                names = [str(n) for n in resolve_layers(ref.module, spelled, "reference")]
            except Exception:  # noqa: BLE001 - not these layers any more: a change
                continue
            if names == chosen:
                same[key] = {**was, "layers": now.get("layers")}
        return {**saved, "references": {**old, **same}} if same else saved

    def _keep_curves(self, saved: Mapping[str, Any], current: Mapping[str, Any]
                     ) -> tuple[list[str], list[str]]:
        """Drop from the history and the tables the curves that ``saved`` settings computed and
        ``current`` ones compute otherwise (or not at all); returns the labels of the curves
        kept and dropped.  With none kept, the history is cleared (a new one, with a
        baseline)."""
        kept, dropped = settings.curves_kept(saved, current)
        if not kept:
            self.history, self._resume_pending, self._tables, self._samples = [], [], {}, None
            self.skipped, self._state_loaded = [], False  # a new history
            return [], dropped
        heads = tuple(f"{self.log_prefix}/{label}/" for label in dropped)
        self.history = [{k: v for k, v in h.items() if not k.startswith(heads)}
                        for h in self.history]
        self._tables = {k: v for k, v in self._tables.items() if k not in dropped}
        return kept, dropped

    # ---------------------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Configuration checks that need the models, before training starts."""
        self._stage = stage  # a checkpoint is loaded after setup, for every stage
        if stage != "fit":
            return
        if any(isinstance(cb, AlignmentCallback) and cb is not self
               and cb.log_prefix == self.log_prefix for cb in trainer.callbacks):
            raise ValueError(
                f"log_prefix={self.log_prefix!r}: another AlignmentCallback of this Trainer has "
                "it too, so their logged keys, report files and checkpoint states would mix; "
                "give each callback its own log_prefix")
        self._trainer = weakref.ref(trainer)
        self._readers = []  # this fit's readers sign up at on_fit_start (after every setup)
        self.restarted = set()  # a checkpoint loaded after setup says which curves restart
        self._state_loaded = False  # set when it is loaded
        self._probe_known = None  # taken anew for this fit (a callable probe is called again)
        self._ended = False  # on_train_end ran (on_fit_end covers a run resumed at its end)
        if trainer.ckpt_path is None and trainer.global_step == 0:
            # a new training run (not resumed, not continued): a history left by an earlier fit
            # of this callback object is another run's, and would mark these steps as done
            self.history, self._resume_pending, self.skipped = [], [], []
            self._tables, self._names_logged, self.last_results = {}, set(), {}
            self._last_pngs, self._samples, self.report_paths = {}, None, None
        self._freeze_references(pl_module)
        model_layers = resolve_layers(pl_module, self.layers, "student model")
        self._resolved_layers = [str(name) for name in model_layers]  # for the settings
        count = len(model_layers)
        if self.pair_map is not None and set(model_layers) != set(self.pair_map):
            raise ValueError(
                f"layers: a mapping pairs model layers with reference layers by exact name, but "
                f"its keys {sorted(self.pair_map)} resolve to the layers {sorted(model_layers)}; "
                "give each model layer's name as a key (patterns are for a list of layers)")
        for ref in self.references:
            chosen = list(ref.features) if ref.kind == "features" else None
            if ref.kind == "model":
                what = "reference model" if ref.name is None else f"reference model {ref.name!r}"
                try:
                    chosen = resolve_layers(ref.module, ref.layers, what)
                except (TypeError, ValueError) as err:
                    argument = ("layers (the mapping's values, the reference layers)"
                                if self.pair_map is not None else "reference_layers"
                                if ref.layers_given else
                                "reference_layers (not given, so it is layers)")
                    raise about_argument(err, argument)
            if chosen is not None:  # compared at a resume however they are spelled
                self._reference_layers[ref.name or ""] = [str(c) for c in chosen]
            wanted = set(self.pair_map.values()) if self.pair_map is not None else set()
            if chosen is not None and wanted and not wanted <= {str(c) for c in chosen}:
                raise ValueError(
                    f"layers: a mapping pairs model layers with {_which(ref)}'s layers by exact "
                    f"name, but its values {sorted(wanted)} resolve to the layers "
                    f"{sorted(str(c) for c in chosen)}; give each reference layer's name as a "
                    "value (patterns are for a list of layers)")
            if ref.engine.null != "moments":
                continue
            if chosen is None:  # "initial" / "previous": each layer against its own past
                pairs, how = count, f"{count} layers, each against its own earlier activations"
            else:
                pairs = count * len(chosen)
                how = f"{count} model layer(s) × {len(chosen)} reference layer(s)"
            if pairs > 1:
                raise ValueError(
                    f"null='moments' calibrates one layer pair, but {pairs} pairs were chosen "
                    f"({how}): their aggregate needs their joint permutation null; use "
                    "null='permutation', or null='auto' to use moments where they apply")
        watching = monitors.alignment_monitors(trainer, self)
        if self.background:
            monitors.refuse_in_background(watching)
        monitors.refuse_unlogged(watching, self._calibrated_keys() if self.log_to_module else [])
        if not self.background and self.every_n_train_steps is None:
            for message in monitors.stale_monitor_warnings(trainer, pl_module, watching,
                                                           self.every_n_epochs):
                rank_zero_warn(message, category=UserWarning)
        if trainer.world_size > 1:  # every process compares rank 0's probe at a resume
            known = self._read_probe_settings() if trainer.is_global_zero else None
            self._probe_known = trainer.strategy.broadcast(known, src=0)

    def _freeze_references(self, pl_module: LightningModule) -> None:
        """Freeze the reference models (eval mode, ``requires_grad_(False)``).  A reference
        that shares modules or parameters with the model in training is left as it is when
        every shared parameter is already frozen (a REPA target kept on the model for its
        loss; its probe pass runs in eval mode and restores the mode), and refused when one
        is trained: freezing it would stop that part's training."""
        trained = {id(p) for p in pl_module.parameters() if p.requires_grad}
        model_params = {id(p) for p in pl_module.parameters()}
        self._shared_frozen = []
        for ref in self.references:
            if ref.kind != "model":
                continue
            if not shared_with(ref.module, pl_module):
                freeze(ref.module)
                continue
            self._shared_frozen += [(ref, p) for p in ref.module.parameters()
                                    if id(p) in model_params]
            shared = [n for n, p in ref.module.named_parameters() if id(p) in trained]
            if shared:
                which = "reference" if ref.name is None else f"reference[{ref.name!r}]"
                parts = ", ".join(repr(n) for n in shared[:5])
                raise ValueError(
                    f"{which} shares parameters the model in training trains ({parts}"
                    f"{', ...' if len(shared) > 5 else ''}): a reference is frozen, which would "
                    "stop their training. To compare the model with its own earlier "
                    "activations use reference='initial' or reference='previous'; to compare "
                    "with a fixed copy, pass reference=copy.deepcopy(module)")

    def _probe_size(self) -> int | None:
        """The probe's rows, before training: a callable probe is called (a DataLoader it
        returns must be sequential) and a probe whose size is not known otherwise is iterated
        once, with the global random states put back; None when its batches' rows cannot be
        read (batches only a ``batch_transform`` understands)."""
        with self._iterated_probe() as batches:
            return count_rows(batches)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The references' probe pass (or features), once per fit; a probe too small for a
        measure, or features or ``reference_inputs`` of another size, is an error.  Under a
        multi-process strategy every process takes rank 0's reference activations, as it takes
        rank 0's model activations at every step (a reference model or probe that differs
        between processes, e.g. unseeded, would otherwise mix two references in the null), and
        a failure on any process is every process's error (none waits in a collective)."""
        self._probe_ran, self._initial_at, self._lost = False, None, set()
        self._redone_at, self._anchor_due = None, False
        if trainer.world_size == 1:
            self._prepare_references(trainer, pl_module)
            return
        error = None
        try:
            self._prepare_references(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - every rank learns it below
            error = err
        failed = first_error(None if error is None else f"{type(error).__name__}: {error}")
        if failed is not None:
            raise _from_rank(*failed) from error
        for ref in self.references:  # the same references on every rank (their state is)
            if ref.pending is not None:
                ref.pending = from_rank_zero(ref.pending)

    def _prepare_references(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """This process's part of :meth:`on_fit_start`."""
        model_device = model_device_of(pl_module)
        self._device = _compute_device(self.compute_device, model_device)
        n_probe = self._probe_size()
        if self._samples is None:
            self._samples = n_probe
        for ref in self.references:
            ref.engine.device = self._device
            if ref.drift and n_probe is not None:  # its rows are the probe's, known now
                ref.engine.check_samples(n_probe, "the probe")
            if ref.engine.reference is not None or ref.drift:
                continue
            if ref.kind == "features":
                with self._iterated_probe() as batches:  # fingerprinting iterates the probe
                    check_features(ref, batches, n_probe)
                where = "reference_pool" if ref.name is None else f"reference_pool[{ref.name!r}]"
                acts = feature_dtype(ref.features, self._device, ref.pool, where)
            else:
                acts = self._reference_activations(ref, model_device, trainer.is_global_zero)
            n = next(iter(acts.values())).shape[0]
            ref.engine.check_samples(n, "the probe")
            if ref.inputs is not None and n_probe is not None and n != n_probe:
                raise ValueError(f"{ref.label}: its reference_inputs give {n} rows but the probe "
                                 f"has {n_probe}: they must be the same samples, in the same order")
            ref.pending = acts

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the loggers' axes and summaries, then run the baseline, or on a resumed run go on
        from the checkpoint's history (anchoring ``"initial"`` / ``"previous"`` references
        and redoing the steps that were in flight when it was written).  Lazy modules that
        the probe pass at the start initialized are an error (training would have drawn
        their parameters at another point of the random streams)."""
        lazy = _uninitialized_lazy(pl_module)
        self._start_of_training(trainer, pl_module)
        initialized = sorted(set(lazy) - set(_uninitialized_lazy(pl_module)))
        if initialized:
            raise ValueError(
                f"the model's lazy modules {initialized} were not initialized when training "
                "started, and the probe pass at the start of fit (baseline=True, or "
                "reference='initial') initialized them, with other random numbers than "
                "training would have. Run one forward pass on an example batch before fit, or "
                "pass baseline=False (and no reference='initial')")

    def _start_of_training(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """What :meth:`on_train_start` does, but for the check of lazy modules."""
        axis = "step" if self.every_n_train_steps is not None else "epoch"
        if not self.background:  # the epoch's length is known now
            watching = monitors.alignment_monitors(trainer, self)
            messages = [] if axis == "epoch" else monitors.stale_step_monitor_warnings(
                trainer, pl_module, watching, self.every_n_train_steps,
                baseline=self.baseline or bool(self.history))
            messages += monitors.cut_epoch_warnings(
                trainer, pl_module, watching, self.every_n_train_steps, self.every_n_epochs or 1,
                baseline=self.baseline or bool(self.history))
            for message in messages:
                rank_zero_warn(message, category=UserWarning)
        dispatch.define_axes(trainer.loggers, self.log_prefix, f"{self.log_prefix}/{axis}")
        dispatch.define_summaries(trainer.loggers, self._summary_keys())
        if importlib.util.find_spec("matplotlib") is None:
            if self.log_heatmaps:
                rank_zero_warn("log_heatmaps needs matplotlib; skipping heatmaps",
                               category=RuntimeWarning)
                self.log_heatmaps = False
            if self.report and not trainer.fast_dev_run:
                rank_zero_warn("report needs matplotlib (pip install matplotlib): no end-of-fit "
                               "report will be written", category=RuntimeWarning)
        self._threaded = self.background and trainer.world_size == 1
        if self.background and not self._threaded:
            rank_zero_warn("AlignmentCallback(background=True) runs in the foreground under "
                           "multi-process strategies (the null is split over the processes; rank "
                           "0 logs, and its results are broadcast)",
                           category=UserWarning)
        pending = [(e, s) for e, s in self._resume_pending if s == trainer.global_step]
        self._resume_pending = []
        missed = self._missed_epoch_step(trainer, pending)
        resumed = bool(self.history)
        retaken = bool(pending) or missed is not None
        if retaken:  # a step redone now: its activations are "initial"'s
            self._initial_at = pending[0] if pending else (missed, int(trainer.global_step))
            self._redone_at = self._initial_at
        if resumed:  # resumed with this callback's history: it goes on from there
            self._anchor_drift(trainer, pl_module, retaken=retaken)
        elif self.baseline:  # a new history (also for weights trained before: a warm start)
            if trainer.global_step > 0 and any(ref.kind == "initial" for ref in self.references):
                rank_zero_warn(_INITIAL_RESUMED, category=UserWarning)
            self._initial_at = (int(trainer.current_epoch), int(trainer.global_step))
            self._maybe_run(trainer, pl_module, epoch=int(trainer.current_epoch), baseline=True)
        else:  # no step now: "initial" takes the activations at the start all the same
            self._anchor_drift(trainer, pl_module, retaken=retaken)
        for epoch, step in pending:  # in flight when the checkpoint was written
            self._maybe_run(trainer, pl_module, epoch=epoch, monitor=False)
        if missed is not None:
            self._maybe_run(trainer, pl_module, epoch=missed, monitor=False)
        if resumed:  # the history's last values (the missed step's too) to the monitors, once
            self._resume_monitors(trainer, pl_module)

    def _missed_epoch_step(self, trainer: Trainer, pending: list[tuple[int, int]]) -> int | None:
        """Epoch mode, a run resumed with this callback's history: the epoch whose step is due
        but was not run because the checkpoint was written after the epoch's last batch and
        before its end (a checkpoint every n training steps); Lightning resumes with the next
        epoch, so the step is run now, on the same weights.  None when there is no such epoch
        (also for a checkpoint written in the middle of an epoch).  With ``baseline=False`` a
        checkpoint of this callback written before its first step holds an empty history: its
        missed step is due all the same."""
        continued = self.history or (self._state_loaded and not self.baseline)
        if (self.every_n_train_steps is not None or trainer.ckpt_path is None
                or not continued or not last_batch_ran(trainer)):
            return None
        epoch = int(trainer.current_epoch)
        if epoch == 0 or epoch % self.every_n_epochs or any(e == epoch for e, _ in pending):
            return None
        if any(int(h["epoch"]) == epoch for h in [*self.history, *self.skipped]):
            return None
        return epoch

    def _unanchored(self, step: int) -> list[Reference]:
        """The drift references without activations to compare with at global step ``step``
        (``"previous"`` needs none before training)."""
        return [ref for ref in self.references if ref.drift and ref.engine.reference is None
                and (step > 0 or ref.kind == "initial")]

    def _anchor_drift(self, trainer: Trainer, pl_module: LightningModule, retaken: bool) -> None:
        """A resumed (or continued) fit: the activations an ``"initial"`` / ``"previous"``
        reference compares with are not in the checkpoint, so they are taken once from the
        resumed weights, at the first training batch (or by a step due before it, which then
        has no value of them; a new fit takes them now).  ``"initial"`` then measures the
        drift from these weights, with a warning; ``"previous"`` continues exactly when the
        checkpoint was written at the last alignment step (else it warns).  ``retaken``: a
        step in flight at the checkpoint is redone now, on these weights, and anchors the
        references itself.  A new fit without a
        baseline (``global_step`` 0) anchors ``"initial"`` only, with no warning: ``"previous"``
        has no value before the first step."""
        step = int(trainer.global_step)
        drift = self._unanchored(step)
        if not drift:
            return
        kinds = {ref.kind for ref in drift}
        if "initial" in kinds and step > 0:
            rank_zero_warn(_INITIAL_RESUMED, category=UserWarning)
        at_last_step = bool(self.history) and int(self.history[-1]["step"]) == step
        if "previous" in kinds and retaken:
            rank_zero_warn("reference='previous' on a resumed run: the step the checkpoint "
                           "could not hold (in flight in the background, or due at the end of "
                           "its epoch) is computed again at the resume, on the checkpoint's "
                           "weights, and has no 'previous' value (the activations of the step "
                           "before it are not in the checkpoint); the steps after it compare "
                           "with it, as in the original run", category=UserWarning)
        elif "previous" in kinds and not at_last_step:
            rank_zero_warn("reference='previous' on a resumed run: the checkpoint was not written "
                           "at the last alignment step, whose activations it does not hold; the "
                           "first step after the resume compares with the resumed weights' "
                           "activations instead (a step due before any training, as at the end "
                           "of an epoch whose validation wrote the checkpoint, has no 'previous' "
                           "value)", category=UserWarning)
        if retaken:
            return
        if step > 0:
            # taken at the first training batch: a step due before it (the epoch end that
            # Lightning runs first when the checkpoint was written at that epoch's validation)
            # is on these same weights, and anchors them itself with no value (not 1.0, the
            # weights against themselves)
            self._anchor_due = True
            return
        # a new fit: now, where lazy modules the probe pass would initialize are caught
        self._take_anchor(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """A resumed (or continued) fit's ``"initial"`` / ``"previous"`` anchor, on the weights
        training starts from (see ``_anchor_drift``)."""
        if self._anchor_due:
            self._anchor_due = False
            self._take_anchor(trainer, pl_module)

    def _take_anchor(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Capture the probe's activations and make them the drift references' anchor."""
        step = int(trainer.global_step)
        drift = self._unanchored(step)
        if not drift:
            return
        acts, error = None, None
        try:
            acts = self._capture(pl_module)[0]
        except Exception as err:  # noqa: BLE001 - reported below, as a failed step
            error = err
        if trainer.world_size > 1:  # every process anchors, or none does (no collective hangs)
            failed = first_error(None if error is None else f"{type(error).__name__}: {error}")
            if failed is not None and error is None:
                rebuilt = _from_rank(*failed)
                kind = type(rebuilt) if isinstance(rebuilt, LAYER_ERRORS) else RuntimeError
                error = kind(f"the probe pass failed on rank {failed[0]}: {failed[1]}")
        if error is not None:
            self._guarded(int(trainer.current_epoch), step, _reraise, error)
            return
        if trainer.world_size > 1:
            acts = from_rank_zero(acts)  # all anchor at rank 0's model (see _distributed_run)
        for ref in drift:
            _anchor(ref, acts)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A frozen module of the model used as the reference that training unfreezes later
        (e.g. ``BackboneFinetuning``) is warned about once: its features were taken at the
        start of fit, and a resumed run would take them from the trained weights."""
        unfrozen = {ref.label for ref, p in self._shared_frozen if p.requires_grad}
        if unfrozen:
            self._shared_frozen = []
            rank_zero_warn(
                f"{', '.join(sorted(unfrozen))}: the model now trains parameters of this "
                "reference (unfrozen after setup, e.g. by BackboneFinetuning); its features are "
                "those of the start of this fit, and a resumed run would take them from the "
                "trained weights. Pass reference=copy.deepcopy(module) for a fixed reference",
                category=UserWarning)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run a step after every ``every_n_epochs``-th epoch (not with ``every_n_train_steps``)
        and log the background results that are ready."""
        if self.every_n_train_steps is not None or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        # an epoch cut short (max_steps, a stop requested mid-epoch) is not a finished epoch:
        # a resumed run finishes it, and its step comes at its end, as in an uninterrupted run
        if epoch % self.every_n_epochs == 0 and not epoch_cut_short(trainer):
            self._maybe_run(trainer, pl_module, epoch=epoch)
        self._publish(trainer, self._queue.ready())
        self._read_by_readers(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """With ``every_n_train_steps``: run a step at every n-th global step; log the
        background results that are ready."""
        n = self.every_n_train_steps
        if n is not None and trainer.global_step > 0 and trainer.global_step % n == 0:
            # the epoch label counts finished epochs, as in epoch mode: the last batch of an
            # epoch finishes it
            epoch = trainer.current_epoch + int(last_batch_ran(trainer))
            self._maybe_run(trainer, pl_module, epoch=epoch, in_batch_hook=True)
        if len(self._queue):
            self._publish(trainer, self._queue.ready())
        self._read_by_readers(trainer, pl_module)

    def add_history_reader(self, read: Callable[[Trainer, LightningModule], None]) -> None:
        """Have ``read(trainer, pl_module)`` called at the end of each training hook that may
        add to :attr:`history` (an ``AlignmentPlateau`` reads its new entries there, whichever
        comes first in the trainer's callback list); once per reader."""
        if read not in self._readers:
            self._readers.append(read)

    def remove_history_reader(self, read: Callable[[Trainer, LightningModule], None]) -> None:
        """Undo :meth:`add_history_reader` (nothing when ``read`` is not a reader)."""
        if read in self._readers:
            self._readers.remove(read)

    def _read_by_readers(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for read in list(self._readers):
            read(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the background results still outstanding (waiting for them), stop the worker,
        and on rank 0 write the end-of-fit charts, table and report."""
        self.publish_outstanding(trainer)
        self._queue.shutdown()
        self._ended = True
        if trainer.is_global_zero and (self.history or self.skipped):
            self._fit_end(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A run resumed at its end (Lightning skips the training loop, so ``on_train_end``
        never comes) still gets its end-of-fit charts, table and report."""
        if not self._ended and trainer.is_global_zero and (self.history or self.skipped):
            self._fit_end(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Publish the background steps: the outstanding ones (at most two, taken before the
        failure from weights a checkpoint written now could not reproduce) are finished first,
        so that a checkpoint written on the exception (``OnExceptionCheckpoint``, which runs
        after this) holds them; on a ``KeyboardInterrupt`` only the running one is, and the
        one waiting is dropped."""
        jobs = self._queue.drain(wait=not isinstance(exception, KeyboardInterrupt))
        finished = [job for job in jobs if job.future.exception() is None]
        try:
            self._publish(trainer, finished)
        finally:
            self._release()  # Lightning calls no teardown after an exception
            self._remove_scratch()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Drop what the fit built (cached reference state, the model copy, the probe's
        batches) and remove the temporary heatmap folder."""
        self._stage = None
        self._release()
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        """Remove the temporary heatmap folder (W&B copied the files into its run folder)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _release(self) -> None:
        """Drop what one fit built (cached references and drift anchors, the model copy, the
        probe's batches), so that the object can serve another fit."""
        self._queue.shutdown(cancel=True)
        for ref in self.references:  # drop cached reference state (memory)
            ref.engine.clear()
            ref.pending = None
        self._copy, self._probe_batches = None, None
        self._trainer = None

    # -------------------------------------------------------------------------- running
    def _already_done(self, epoch: int, step: int) -> bool:
        """A step that was computed, is queued or failed (``skipped``): never twice.  In step
        mode the global step alone identifies it (gradient accumulation calls the batch hook
        several times per step, and an epoch may end between them); in epoch mode the epoch
        does too."""
        done = [*self.history, *self.skipped]
        if self.every_n_train_steps is not None:
            return any(j.step == step for j in self._queue) or any(h["step"] == step for h in done)
        return self._queue.has(epoch, step) or any(
            h["step"] == step and h["epoch"] == epoch for h in done)

    def _maybe_run(self, trainer: Trainer, pl_module: LightningModule, epoch: int,
                   in_batch_hook: bool = False, monitor: bool = True,
                   baseline: bool = False) -> None:
        step = int(trainer.global_step)
        if self._already_done(epoch, step):
            return
        if self._anchor_due:  # resumed weights, no training since: the step anchors them
            self._anchor_due = False
            self._initial_at = self._redone_at = (epoch, step)
        if self._threaded:
            self._submit(trainer, pl_module, epoch, step)
            return
        if trainer.world_size > 1:
            entry = self._distributed_run(trainer, pl_module, epoch, step)
        else:
            outcome = self._guarded(epoch, step, self._capture_and_compute, pl_module, epoch, step,
                                    bool(trainer.loggers))
            entry = None if outcome is None else self._log_outcome(trainer, outcome)
        if entry is None and monitor and not baseline and self.history:  # a failed step
            watching = monitors.alignment_monitors(trainer, self)
            if watching:
                rank_zero_warn(monitors.failed_step_warning(watching, self.history[-1], epoch,
                                                            step), category=RuntimeWarning)
        if entry is None or not monitor:
            return
        if baseline:
            self._monitor_before_training(trainer, pl_module, entry)
        else:
            self._log_to_module(pl_module, entry, in_batch_hook)

    def _monitor_before_training(self, trainer: Trainer, pl_module: LightningModule,
                                 values: Mapping[str, Any]) -> None:
        """The calibrated ``values`` for the monitors at the start of training (the baseline's,
        or on a resumed run the history's last): put straight into ``trainer.callback_metrics``
        (see ``_seed_monitors``), where a monitor checking before the first epoch end finds them
        (a mid-epoch validation, a checkpoint every n training steps), and in epoch mode also
        logged as an epoch-level value."""
        self._seed_monitors(trainer, values)
        if self.every_n_train_steps is None:
            self._log_to_module(pl_module, values, in_batch_hook=False)

    def _resume_monitors(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A resumed run: the last value of each calibrated key in the history goes back to the
        monitors (``ModelCheckpoint``, ``EarlyStopping``, ``AlignmentPlateau(source="metrics")``),
        which in an uninterrupted run hold it until the next step; not to the loggers, which
        have it already.  Not in background mode, whose values the module never logs."""
        if self._threaded:
            return
        last: dict[str, Any] = {}
        keys = self._calibrated_keys()
        for entry in self.history:
            last.update({key: entry[key] for key in keys if key in entry})
        if last:
            self._monitor_before_training(trainer, pl_module, last)

    def _distributed_run(self, trainer: Trainer, pl_module: LightningModule, epoch: int,
                         step: int) -> dict[str, Any] | None:
        """Every process captures and computes its share of the permutations; the null is
        gathered, rank 0 logs, and its entry is broadcast.  A failure on any process, in the
        probe pass or in the null, is every process's failure (no collective waits for a
        process that raised)."""
        outcome, error, captured = None, None, None
        origin: tuple[int, str] | None = None  # the failed process and its "<Type>: <message>"
        try:
            captured = self._capture(pl_module)
        except Exception as err:  # noqa: BLE001 - every rank learns it below
            error = f"{type(err).__name__}: {err}"
        failed = first_error(error)  # before any process enters the null's collective
        rebuilt = None if failed is None else _from_rank(*failed)
        if isinstance(rebuilt, LAYER_ERRORS):  # a configuration mistake: raised on every process
            raise rebuilt
        if failed is not None:
            error, origin = f"the probe pass failed on rank {failed[0]}: {failed[1]}", failed
        else:
            # DDP replicas can differ where DDP does not synchronize them (BatchNorm running
            # statistics follow each rank's own batches): every share of the null must score
            # the same model, the one rank 0 logs
            captured = (from_rank_zero(captured[0]), captured[1])
            try:
                outcome = self._compute(captured, epoch, step,
                                        trainer.is_global_zero and bool(trainer.loggers),
                                        distributed=True)
            except Exception as err:  # noqa: BLE001 - every rank reports the same below
                origin = getattr(err, "origin", None)  # a process's failure, gathered by all
                rebuilt = None if origin is None else _from_rank(*origin)
                if isinstance(rebuilt, LAYER_ERRORS):  # a configuration mistake: as above
                    raise rebuilt from err
                error = _reason(err)
                origin = origin or (trainer.global_rank, error)
        entry, logging, failure = None, None, None
        if trainer.is_global_zero and outcome is not None:
            try:
                entry = self._log_outcome(trainer, outcome)
            except Exception as err:  # noqa: BLE001 - the others wait in the broadcast below
                logging, failure = f"{type(err).__name__}: {err}", err
        entry, error, origin, logging = trainer.strategy.broadcast(
            (entry, error, origin, logging), src=0)
        if logging is not None:  # not the data's failure: raised, as one process raises it
            raise _from_rank(0, logging) from failure
        acts, self._advance_with = self._advance_with, None
        if error is None and acts is not None:  # every process: the step is in the history
            self._advance_previous(acts, epoch, step)
        if error is not None:
            if self.on_error == "raise":  # the failed process's error, of its type
                raise _from_rank(*origin)
            self.skipped.append({"epoch": int(epoch), "step": int(step), "reason": error})
            rank_zero_warn(f"alignment step at epoch {epoch} (step {step}) skipped: {error}",
                           category=RuntimeWarning)
            return None
        if entry is not None and not trainer.is_global_zero:
            self.history.append(dict(entry))
        return entry

    def _advance_previous(self, acts: dict[str, Tensor], epoch: int, step: int) -> None:
        """Under several processes: ``"previous"`` takes this (logged) step's activations on
        every process.  A failure there (the same on every process) warns, or raises with
        ``on_error="raise"``; the next step then compares with the step before this one."""
        for ref in self.references:
            if ref.kind != "previous":
                continue
            try:
                guarded_step(_advance, ref.engine.num_permutations, ref=ref, acts=acts)
            except Exception as err:  # noqa: BLE001 - the same on every process
                origin = getattr(err, "origin", None)
                if self.on_error == "raise" and origin is None:
                    raise
                if self.on_error == "raise":
                    raise _from_rank(*origin) from err
                rank_zero_warn(f"{_which(ref)} ('previous') did not take the activations of "
                               f"the step at epoch {epoch} (step {step}): {_reason(err)}; the "
                               "next step compares with the step before it",
                               category=RuntimeWarning)

    def _submit(self, trainer: Trainer, pl_module: LightningModule, epoch: int, step: int) -> None:
        """Background mode: capture on the model copy in the worker, or in the loop."""
        render = bool(trainer.loggers)
        if isinstance(self._copy, Future):  # the first step's check: normally done long ago
            self._copy = self._copy.result()
        if self._copy is None and model_device_of(pl_module).type != "cpu":
            self._copy = False  # a model off the CPU: the capture stays in the loop
        snapshot = self._snapshot(pl_module)
        if snapshot is not None:
            # the copy goes with the job: a later step may give it up before the worker runs
            job = (self._compute_on_copy, self._copy, snapshot, epoch, step, render)
        else:
            # the first step's capture also starts the copy's check; a failure there is a
            # failed step like any other (the check is tried again at the next step)
            capture = self._start_copy_check if self._copy is None else self._capture
            captured = self._guarded(epoch, step, capture, pl_module)
            job = None if captured is None else (self._compute, captured, epoch, step, render)
        if job is not None:
            self._publish(trainer, self._queue.submit(self._guarded, epoch, step, *job,
                                                      epoch=epoch, step=step))

    def _guarded(self, epoch: int, step: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; a failure warns and returns None unless ``on_error="raise"`` or it is
        a configuration mistake only a forward pass can show (a chosen layer that does not run
        exactly once per pass, returns no tensor to record, or gives no row per probe sample),
        which is raised: at the baseline (or the first step), before training.  With several
        references, the reason (warned, and kept in ``skipped``) names the one that failed,
        and its measure when it has a single one; the step is skipped for all of them."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - reported, training goes on unless asked
            if self.on_error == "raise" or isinstance(err, LAYER_ERRORS):
                raise
            reason = _reason(err)
            self.skipped.append({"epoch": int(epoch), "step": int(step), "reason": reason})
            warnings.warn(f"alignment step at epoch {epoch} (step {step}) skipped: {reason}",
                          RuntimeWarning, stacklevel=2)
            return None
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def publish_outstanding(self, trainer: Trainer) -> None:
        """Wait for the background steps still being computed and add them to the history (and
        the loggers), in order; nothing to do in the foreground.  Called at the end of
        training, and by an ``AlignmentPlateau`` that reads the history there first (listed
        before this callback)."""
        self._publish(trainer, self._queue.ready(wait=True))

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
        for key in self._calibrated_keys():
            if key in values:
                # from a batch hook log on_step: with on_epoch the monitors would see the
                # epoch mean of the steps' values, and only at the end of the epoch
                # sync_dist: the values are rank 0's on every rank (broadcast), so the mean is
                # theirs; without it Lightning warns that epoch-level values are not synced
                pl_module.log(key, float(values[key]), logger=False, on_step=in_batch_hook,
                              on_epoch=not in_batch_hook, prog_bar=self.progress_bar,
                              sync_dist=pl_module.trainer.world_size > 1)

    def _seed_monitors(self, trainer: Trainer, values: Mapping[str, Any]) -> None:
        """Before training (the baseline, or a resumed run's last values): the calibrated values
        go straight into ``trainer.callback_metrics``, so a monitor on them finds its key
        wherever it checks before the first step (in step mode ``pl_module.log`` cannot be used
        here: an epoch-level value logged before training would replace the latest step's value
        at the first epoch end; in epoch mode an epoch-level value reaches the monitors only at
        the first epoch end, after a mid-epoch validation).  The steps' values replace them as
        they come."""
        if not self.log_to_module:
            return
        metrics = trainer.callback_metrics
        for key in self._calibrated_keys():
            if key in values and key not in metrics:
                metrics[key] = torch.tensor(float(values[key]))

    def has_result(self, entry: Mapping[str, Any], key: str) -> bool:
        """Whether the step of the history ``entry`` has a result for the reference and measure
        of ``key`` (``<prefix>[/<reference>]/<measure>/...``): False when that reference had
        none at that step (the first capture of ``reference="previous"``, next to other
        references), True for a key of no reference and measure of this callback."""
        for ref in self.references:
            head = f"{self._key_prefix(ref)}/"
            parts = key[len(head):].split("/") if key.startswith(head) else []
            if len(parts) > 1 and parts[0] in self.measures:
                return any(k.startswith(f"{head}{parts[0]}/") for k in entry)
        return True

    def measure_prefixes(self) -> list[str]:
        """``<prefix>[/<reference name>]/<measure>``: how every key this callback logs for a
        reference and measure begins (``<prefix>/<measure>`` for a single unnamed
        reference)."""
        return [f"{self.log_prefix}/{label}" for label in self._labels()]

    def _calibrated_keys(self) -> list[str]:
        return [f"{head}/calibrated" for head in self.measure_prefixes()]

    def _key_prefix(self, ref: Reference) -> str:
        return self.log_prefix if ref.name is None else f"{self.log_prefix}/{ref.name}"

    # -------------------------------------------------------------------------- capture
    def _collect(self, model: nn.Module, batches: Any, layers: Any, pool: Any, input_key: Any,
                 transform: Any, model_device: torch.device, restore_rng: bool = True,
                 forward_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        acts = collect_activations(
            model, batches, layers, pool=pool, device=model_device, input_key=input_key,
            batch_transform=transform, restore_rng=restore_rng, mask_key=self.mask_key,
            to_cpu=self._device.type == "cpu", dtype=None, default_dtype=forward_dtype,
        )  # recorded in the output's dtype (half precision averaged in float32 by "mean" or a
        # pool callable), then compared in float64 when the model computes in float64
        # (precision="64-true"), else in float32
        return {k: v.to(self._device, compute_dtype(v)) for k, v in acts.items()}

    def _reference_activations(self, ref: Reference, model_device: torch.device,
                               show: bool) -> dict[str, Tensor]:
        """A reference model's probe pass (with a progress bar on rank 0 when verbose)."""
        ref.module.to(model_device)
        try:
            with seeded_rng():  # the rows a probe that draws gives the model's passes too
                probe = iterate_probe(self.probe if ref.inputs is None else ref.inputs)
                batches = feedback.progress(probe, f"alignment: {ref.label} probe pass",
                                            self.verbose and show
                                            and not isinstance(probe, (Tensor, Mapping)))
                with preserved_loader_seed(probe):
                    return self._collect(ref.module, in_dtype_of(ref.module, batches),
                                         ref.layers, ref.pool, ref.input_key,
                                         ref.batch_transform, model_device)
        except Exception as err:  # which model failed: there may be several references
            if (ref.inputs is None and ref.batch_transform is None
                    and "failed on probe batch" in str(err)):
                raise _named(err, f"{_which(ref)} model", _OWN_INPUTS) from err
            raise _named(err, f"{_which(ref)} model") from err

    def _model_activations(self, model: nn.Module, batches: Any, model_device: torch.device,
                           restore_rng: bool = True, forward_dtype: torch.dtype | None = None
                           ) -> dict[str, Tensor]:
        """The chosen layers of ``model`` on the probe batches, on the compute device; the
        batches are converted as the trainer converts its own (e.g. floating-point inputs to
        bfloat16 with ``precision="bf16-true"``), and tensors the forward creates get
        ``forward_dtype`` (:meth:`_forward_dtype`; only from the training loop's thread: the
        default dtype is the process's), while the probe's batches are built as training's
        are."""
        try:
            with _logging_off(model):
                acts = self._collect(model, self._as_trained(batches), self.layers, self.pool,
                                     self.input_key, self.batch_transform, model_device,
                                     restore_rng, forward_dtype)
        except LayerCountError as err:
            raise LayerCountError(f"student model: {err}") from err
        except Exception as err:
            # a model that runs training batches but has never run on the probe in this fit
            # cannot take the probe (its width, dtype or structure): a configuration mistake.
            # Before the first training batch a forward may legitimately fail (statistics
            # initialized from the first batch), so the baseline's failure follows on_error.
            if (self._probe_ran or not self._has_trained() or resource_error(err)
                    or isinstance(err, LAYER_ERRORS)):
                raise
            raise ProbeInputError(f"the model in training runs its training batches but failed "
                                  f"on the probe, on which it has not run in this fit "
                                  f"({type(err).__name__}: {err})") from err
        self._probe_ran = True
        return acts

    def _fit_trainer(self) -> Trainer | None:
        """The trainer of the fit in progress (None outside a fit, or once it is gone)."""
        return self._trainer() if self._trainer is not None else None

    def _has_trained(self) -> bool:
        """Whether the fit's model has run a training batch (read from the training thread or
        the worker: the global step only grows)."""
        trainer = self._fit_trainer()
        return trainer is not None and int(trainer.global_step) > 0

    def _forward_dtype(self) -> torch.dtype | None:
        """The default dtype the trainer's precision plugin sets for a training forward (float64
        with ``precision="64-true"``, bfloat16 / float16 with ``"bf16-true"`` / ``"16-true"``),
        so that the probe's forward creates tensors as training's does; None where it sets
        none.  Read by entering the plugin's forward context with no forward in it (a mixed
        precision's autocast is not used: the probe runs without it)."""
        plugin = getattr(self._fit_trainer(), "precision_plugin", None)
        if plugin is None:
            return None
        outside = torch.get_default_dtype()
        try:
            with plugin.forward_context():
                inside = torch.get_default_dtype()
        except Exception:  # noqa: BLE001 - a plugin whose context needs more: none is set
            return None
        return inside if inside != outside else None

    def _as_trained(self, batches: Any) -> Any:
        plugin = getattr(self._fit_trainer(), "precision_plugin", None)
        if plugin is None or type(plugin).convert_input is Precision.convert_input:  # no-op
            return batches
        return each_batch(plugin.convert_input, batches)

    @torch.no_grad()
    def _capture(self, pl_module: LightningModule) -> tuple[dict[str, Tensor], float]:
        """The model's probe activations on the compute device (training thread), and the
        seconds it took."""
        start = time.perf_counter()
        with seeded_rng():  # a probe that draws as it is iterated: the same rows every pass
            probe = iterate_probe(self.probe)
            with preserved_loader_seed(probe):
                acts = self._model_activations(pl_module, probe, model_device_of(pl_module),
                                               forward_dtype=self._forward_dtype())
        return acts, time.perf_counter() - start

    def _probe_list(self) -> Any:
        with seeded_rng():  # the rows of a foreground pass (a DataLoader draws a seed too)
            probe = iterate_probe(self.probe)
            if not isinstance(probe, (Tensor, list, Mapping)):  # a Mapping is one dict batch
                with preserved_loader_seed(probe):
                    probe = list(probe)
        return probe

    @torch.no_grad()
    def _start_copy_check(self, pl_module: LightningModule) -> tuple[dict[str, Tensor], float]:
        """Background mode, first step on a CPU model: capture this step's activations in the
        loop, make the worker's copy and queue its check against them (``_check_copy``);
        returns the activations and the seconds they took."""
        batches = self._probe_list()
        start = time.perf_counter()
        forward_dtype = self._forward_dtype()
        with seeded_rng():  # as a foreground pass starts
            before = random_states()
            actual = self._model_activations(pl_module, batches, torch.device("cpu"),
                                             restore_rng=False, forward_dtype=forward_dtype)
            draws = not same_random_states(before, random_states())
        seconds = time.perf_counter() - start
        if forward_dtype is not None:  # the worker cannot set the process's default dtype
            self._copy = False
            return actual, seconds
        if draws:  # the copy would draw from the loop's streams, from another thread
            # this step's values as every later step's, a foreground pass (a DataLoader probe
            # draws its seed between the forward's draws there, not before the pass)
            actual, again = self._capture(pl_module)
            seconds += again
            self._copy = False
            rank_zero_warn("background=True: the model's forward draws random numbers in eval "
                           "mode (sampling, noise); its copy in the worker would draw from the "
                           "training loop's random streams, so the probe runs in the training "
                           "loop", category=RuntimeWarning)
            return actual, seconds
        try:
            copy, snapshot = ModelCopy(pl_module), ModelCopy.snapshot(pl_module)
        except Exception as err:  # noqa: BLE001 - fall back to capturing in the loop
            self._copy = False
            rank_zero_warn(f"background=True: the model cannot be copied ({type(err).__name__}: "
                           f"{err}); the probe runs in the training loop", category=RuntimeWarning)
        else:
            self._copy = self._queue.call(self._check_copy, copy, snapshot, batches, actual)
        return actual, seconds

    @torch.no_grad()
    def _check_copy(self, copy: ModelCopy, snapshot: Snapshot, batches: Any,
                    actual: dict[str, Tensor]) -> ModelCopy | bool:
        """Worker thread: the copy, loaded with the first step's snapshot, must give the
        model's activations bitwise; returns the copy, or False (with a warning) when it does
        not or cannot run the probe."""
        reason = None
        try:
            copy.load(snapshot)
            # restore_rng=False: restoring from this thread would rewind the training loop's RNG
            seen = self._model_activations(copy.model, batches, torch.device("cpu"),
                                           restore_rng=False)
        except Exception as err:  # noqa: BLE001 - fall back to capturing in the loop
            reason = (f"the model's copy cannot run the probe ({type(err).__name__}: {err}); "
                      "its forward reads state the copy does not have, such as the trainer")
        else:
            if seen.keys() != actual.keys() or any(not _same(seen[k], actual[k]) for k in seen):
                reason = ("the model's copy gives other activations than the model: its "
                          "forward reads state that is not copied")
        if reason is not None:
            rank_zero_warn(f"background=True: {reason}; the probe runs in the training loop",
                           category=RuntimeWarning)
            return False
        self._probe_batches = batches
        return copy

    def _snapshot(self, pl_module: LightningModule) -> Snapshot | None:
        """Background mode: this step's weights and plain state for the worker's model copy,
        or None when the capture has to stay in the loop (no copy, or not checked yet).  A
        snapshot that cannot be taken, or that the copy cannot take (a parameter or buffer
        added or removed in training; one that changed its shape is refreshed on the copy),
        never fails training: the copy is given up, with a warning, and this and every later
        step capture in the loop."""
        if not isinstance(self._copy, ModelCopy):
            return None
        try:
            snapshot = ModelCopy.snapshot(pl_module)
            self._copy.check(snapshot)
            return snapshot
        except Exception as err:  # noqa: BLE001 - fall back to capturing in the loop
            self._copy = False
            rank_zero_warn(f"background=True: the model's state cannot be copied any more "
                           f"({type(err).__name__}: {err}); the probe runs in the training loop",
                           category=RuntimeWarning)
            return None

    # -------------------------------------------------------------------------- compute
    @torch.no_grad()
    def _compute_on_copy(self, copy: ModelCopy, snapshot: Snapshot, epoch: int, step: int,
                         render: bool) -> Outcome:
        """Worker thread: load the snapshot into the model copy, capture, compute."""
        start = time.perf_counter()
        model = copy.load(snapshot)
        del snapshot
        # restore_rng=False: restoring from this thread would rewind the training loop's RNG
        acts = self._model_activations(model, self._probe_batches, torch.device("cpu"),
                                       restore_rng=False)
        return self._compute((acts, time.perf_counter() - start), epoch, step, render)

    @torch.no_grad()
    def _compute(self, captured: tuple[dict[str, Tensor], float], epoch: int, step: int,
                 render: bool, distributed: bool = False) -> Outcome:
        """Every reference and measure on captured activations, and the heatmaps: may run in
        the worker.  ``distributed``: this process computes its share of the permutations."""
        start = time.perf_counter()
        acts, capture_seconds = captured
        results: Results = {}
        for ref in self.references:  # the start's activations, whatever fails below
            if _initial_unset(ref) and (epoch, step) == self._initial_at:
                ref.pending = acts  # kept until the engine has prepared them
        for ref in self.references:
            if _initial_unset(ref):
                self._initial_lost(ref)  # the step at the start failed before its capture
                continue
            redone = (epoch, step) == self._redone_at
            if ref.kind == "initial" and ref.pending is not None and redone:
                # the first run's value at this step compared with its start, which the
                # checkpoint does not hold: anchored here, "initial" has no value of this step
                # (as "previous"), rather than the resumed weights against themselves
                _set_reference(ref)
                continue
            try:
                if distributed:  # every failure of this reference's step meets the others
                    result = guarded_step(self._reference_step, ref.engine.num_permutations,
                                          ref=ref, acts=acts, epoch=epoch, step=step)
                else:
                    result = self._reference_step(ref, acts, epoch, step)
            except Exception as err:
                if ref.name is not None:  # one of several: the warning says which failed,
                    labels = list(ref.engine.measures)  # and its measure when it has one
                    err._alignment_where = _which(ref) + (
                        f", measure {labels[0]!r}" if len(labels) == 1 else "")
                raise
            if result is not None:
                results[ref.name] = result
        # the step succeeded: "previous" compares the next one with this one (a failed step,
        # which the history does not hold, is no one's previous step).  One process: after
        # the heatmaps, which can fail too; several: once every process knows that rank 0's
        # heatmaps and logging succeeded (_distributed_run)
        advance = [ref for ref in self.references if ref.kind == "previous"]
        if distributed:
            self._advance_with = acts if advance else None
        images = {}
        if self.log_heatmaps and render:
            from alignment_callback.metrics.plotting import heatmap_image

            for label, r in self._flat(results).items():
                image = heatmap_image(r, f"{label} after epoch {epoch} (step {step})")
                images[label] = (image, dispatch.encode_png(image))
        if not distributed:
            for ref in advance:
                _advance(ref, acts)
        del acts, captured
        return results, images, epoch, step, capture_seconds + time.perf_counter() - start

    @staticmethod
    def _reference_step(ref: Reference, acts: dict[str, Tensor], epoch: int, step: int,
                        **split: Any) -> Any:
        """One reference's step on the captured activations (its reference set first when
        needed: a model's or features' probe activations, or ``"initial"``'s, are pending
        until then); None at the first step of ``reference="previous"``.  ``split``: ``share``
        and ``gather`` of the null over processes."""
        engine = ref.engine
        if engine.reference is None:
            if ref.kind == "previous":
                return None  # nothing before the first step
            _set_reference(ref)
        return engine.step(acts, epoch=epoch, step=step, **split)

    def _initial_lost(self, ref: Reference) -> None:
        """Warn (once per fit) that ``"initial"`` reports nothing: the step at the start of the
        fit failed, and a later step's activations are not the start's."""
        if ref.name not in self._lost:
            self._lost.add(ref.name)
            rank_zero_warn(f"{_which(ref)} ('initial') has no values: the activations at the "
                           f"start of the fit, which it measures drift from, were not taken (the "
                           f"probe pass there failed: see its warning; or no fit is running)",
                           category=RuntimeWarning)

    @staticmethod
    def _flat(results: Results) -> dict[str, Any]:
        """``{measure label: result}``, prefixed by the reference's name for several."""
        return {(m if name is None else f"{name}/{m}"): r
                for name, step in results.items() for m, r in step.results.items()}

    def _capture_and_compute(self, pl_module: LightningModule, epoch: int, step: int,
                             render: bool) -> Outcome:
        return self._compute(self._capture(pl_module), epoch, step, render)

    def _entry(self, outcome: Outcome) -> dict[str, Any]:
        """The history entry of a step: the logged scalars, ``epoch``, ``step`` and the best
        pairs by name (``<prefix>[/<reference>]/<measure>/...`` keys)."""
        results, _, epoch, step, seconds = outcome
        entry: dict[str, Any] = {f"{self.log_prefix}/epoch": float(epoch),
                                 f"{self.log_prefix}/step": float(step)}
        own = {f"{{}}/{field}" for field in ("epoch", "step", "seconds")}
        for ref in self.references:
            if ref.name not in results:
                continue
            prefix = self._key_prefix(ref)
            scalars = results[ref.name].history_entry(prefix, self.log_pairs)
            entry.update({k: v for k, v in scalars.items()
                          if k not in {o.format(prefix) for o in own} and k not in ("epoch", "step")})
            if ref.drift:  # per layer: each layer against its own earlier activations
                for m, r in results[ref.name].results.items():
                    for a, name in enumerate(r.x_names):
                        b = r.y_names.index(name)
                        entry[f"{prefix}/{m}/layer/{name}/raw"] = float(r.matrix[a, b])
                        entry[f"{prefix}/{m}/layer/{name}/calibrated"] = float(r.pair_calibrated[a, b])
        entry[f"{self.log_prefix}/seconds"] = float(seconds)
        entry.update(epoch=epoch, step=step)
        return entry

    def run(self, trainer: Trainer, pl_module: LightningModule, epoch: int, step: int) -> dict[str, Any]:
        """One synchronous alignment step: capture, compute every measure, log; returns the
        history entry (the logged scalars plus ``epoch``, ``step`` and the best pairs)."""
        return self._log_outcome(trainer, self._capture_and_compute(pl_module, epoch, step,
                                                                    bool(trainer.loggers)))

    def _log_outcome(self, trainer: Trainer, outcome: Outcome) -> dict[str, Any]:
        """Scalars, best pairs by name, heatmaps to the loggers; the entry to the history and a
        line per measure to the console (main thread); returns the entry.  A step without a
        result of some reference (the first capture of ``reference="previous"`` only stores
        the activations) has no keys of that reference in its entry: :meth:`has_result` tells
        a reader of the history (``AlignmentPlateau``) to skip it."""
        results, images, epoch, step, _ = outcome
        entry = self._entry(outcome)
        flat = self._flat(results)
        if trainer.loggers:
            if set(flat) - self._names_logged:  # a reference's first result ("previous": at
                self._log_layer_names(trainer, flat)  # its second step)
            texts = {k: v for k, v in entry.items() if isinstance(v, str)}
            dispatch.log_text(trainer.loggers, texts, step)
            dispatch.log_scalars(trainer.loggers, {k: v for k, v in entry.items()
                                                   if k.startswith(f"{self.log_prefix}/")
                                                   and not isinstance(v, str)}, step)
        for label, (image, png) in images.items():
            if self._scratch is None:
                self._scratch = tempfile.mkdtemp(prefix="alignment_heatmaps_")
            # prefix and label (<reference>/<measure>) as in the report's file names: probe/a and
            # probe_a, or probe with a reference "a" and probe_a, keep their own files
            stem = (f"{feedback.report_stem(self.log_prefix)}_{feedback.report_stem(label)}"
                    "_heatmap")
            dispatch.log_image(trainer.loggers, f"{self.log_prefix}/{label}/heatmap", image, png,
                               step, f"epoch{epoch:04d}_step{step:06d}", self._scratch, stem)
        if dispatch.keeps_tables(trainer.loggers):  # kept (and checkpointed) for W&B only
            for label, rows in dispatch.pair_rows(flat, epoch, step).items():
                self._tables.setdefault(label, []).extend(rows)
        if self.verbose:
            feedback.emit(trainer, feedback.step_lines(results, epoch, step, self.log_prefix))
        self.last_results = flat
        self._last_pngs = {label: png for label, (_, png) in images.items()}  # for the report
        self._samples = next(iter(results.values())).n if results else self._samples
        self.history.append(entry)
        return entry

    def _log_layer_names(self, trainer: Trainer, flat: dict[str, Any]) -> None:
        """The index → name map of the best-layer scalars, once per reference and measure
        (every logger)."""
        names = {}
        if "model" not in self._names_logged:
            names["model"] = next(iter(flat.values())).x_names
        for label, r in flat.items():
            if label not in self._names_logged:
                names[f"reference/{label}"] = r.y_names
        dispatch.log_layer_names(trainer.loggers, self.log_prefix, names)
        self._names_logged |= {"model", *flat}

    def _summary_keys(self) -> list[str]:
        """The keys with a W&B run summary: each curve's best calibrated and raw score and its
        smallest p-value."""
        return [f"{head}/{field}" for head in self.measure_prefixes()
                for field in ("calibrated", "raw", "p_value")]

    def _curve_labels(self) -> list[str]:
        """The labels (``[<reference>/]<measure>``) of the curves the history holds: the last
        step's, or, when this fit took none (resumed at its end), every one with a value."""
        if self.last_results:
            return list(self.last_results)
        return [label for label in self._labels()
                if any(f"{self.log_prefix}/{label}/raw" in h for h in self.history)]

    def _fit_end(self, trainer: Trainer) -> None:
        """W&B: one chart of raw, τ and calibrated and one table of every pair per measure;
        every run: the end-of-fit report next to the logs (a file in W&B)."""
        xs = [h["epoch"] if self.every_n_train_steps is None else h["step"] for h in self.history]
        xname = "epoch" if self.every_n_train_steps is None else "step"
        best = {}  # over the whole history, a resumed run's too (W&B: this process's values)
        for key in self._summary_keys():
            values = [h[key] for h in self.history if key in h]
            if values:
                best[key] = min(values) if dispatch.summary_of(key) == "min" else max(values)
        dispatch.write_summaries(trainer.loggers, best)
        for label in self._curve_labels():
            prefix = f"{self.log_prefix}/{label}"
            series = {"raw": [h.get(f"{prefix}/raw") for h in self.history],
                      "τ": [h.get(f"{prefix}/threshold") for h in self.history],
                      "calibrated": [h.get(f"{prefix}/calibrated") for h in self.history]}
            keep = [i for i, v in enumerate(series["raw"]) if v is not None]
            dispatch.log_curves(trainer.loggers, f"{prefix}/curves", [xs[i] for i in keep],
                                {k: [v[i] for i in keep] for k, v in series.items()},
                                f"{label}: raw, τ and calibrated", xname)
            dispatch.log_table(trainer.loggers, f"{prefix}/pairs",
                               ["epoch", "step", "model_layer", "reference_layer", "raw",
                                "calibrated", "p_value"], self._tables.get(label, []))
        if not self.report or importlib.util.find_spec("matplotlib") is None:
            return
        if trainer.fast_dev_run:  # Lightning's dry run logs nothing: no report files either
            return
        labels = [label for label in self._labels()
                  if any(f"{self.log_prefix}/{label}/raw" in h for h in self.history)]
        layers = self._resolved_layers or settings.as_list(self.layers)
        shown = {"n": self._samples, "alpha": self.alpha, "seed": self.seed,
                 "measures": {k: m.kwargs for k, m in self.measures.items()},
                 "aggregate": str(settings.describe(self.engine.aggregate)),
                 "null": self.engine.null, "model layers": ", ".join(map(str, layers)),
                 "references": "; ".join(f"{ref.label} ({ref.kind}: {ref.path or ref.layers})"
                                         for ref in self.references),
                 "preprocess": settings.describe(self._preprocess),
                 "pool": settings.describe(self.pool)}
        pools = {ref.label: settings.describe(ref.pool) for ref in self.references
                 if not ref.drift and ref.pool != self.pool}
        if pools:  # a reference's own pool
            shown["reference pool"] = "; ".join(f"{k}: {v}" for k, v in pools.items())
        if self.preset is not None:
            shown["preset"] = self.preset
        methods = {label: self.history[-1].get(f"{self.log_prefix}/{label}/null_method")
                   for label in labels}
        if self.engine.null == "auto" and any(methods.values()):  # which null each curve got
            shown["null methods"] = "; ".join(f"{label}: {method}" for label, method
                                              in methods.items() if method)
        if self.engine.null != "moments":  # K permutations were drawn
            shown["permutations"] = self.num_permutations
        if not trainer.loggers:  # no logger: no logs to write it next to
            return
        # a logger without a directory of its own (MLflow's database store): the trainer's
        folder = dispatch.log_dir(trainer.loggers) or trainer.default_root_dir
        try:
            self.report_paths = feedback.write_report(folder, self.history, shown,
                                                      self.last_results, self.log_prefix,
                                                      self.alpha, self._last_pngs, labels=labels,
                                                      skipped=self.skipped,
                                                      drift=self._labels(drift_only=True))
        except Exception as err:  # noqa: BLE001 - a report never fails a finished fit
            rank_zero_warn(f"the alignment report could not be written: {type(err).__name__}: {err}",
                           category=RuntimeWarning)
            return
        try:
            dispatch.save_files(trainer.loggers, feedback.report_files(self.report_paths[0]))
        except Exception as err:  # noqa: BLE001 - nor does its copy to a logger
            rank_zero_warn(f"the alignment report ({self.report_paths[0]}) could not be saved to "
                           f"the loggers: {type(err).__name__}: {err}", category=RuntimeWarning)
        if self.verbose:
            feedback.emit(trainer, [f"{self.log_prefix} report: {self.report_paths[0]}"])


_OWN_INPUTS = ("; the reference model is fed the model's probe batches: if it takes other "
               "inputs (images where the model is fed latents), pass them as reference_inputs= "
               "(the same samples in the same order) or map each batch with "
               "reference_batch_transform=")


def _named(error: Exception, what: str, hint: str = "") -> Exception:
    """``error`` with ``what: `` before its message (and ``hint`` after it): of its own type
    where that type takes one message as it is (a configuration mistake stays one), else a
    ``RuntimeError``."""
    text = f"{what}: {error}{hint}"
    try:
        named = type(error)(text)
    except Exception:  # noqa: BLE001 - a type that takes other arguments
        return RuntimeError(text)
    return named if str(named) == text else RuntimeError(text)


def _reason(error: BaseException) -> str:
    """A failed step's reason, ``"<Type>: <message>"``, after the reference that failed (and
    its measure when it has a single one) when it is one of several."""
    reason = f"{type(error).__name__}: {error}"
    where = getattr(error, "_alignment_where", None)
    return reason if where is None else f"{where}: {reason}"


def _from_rank(rank: int, error: str) -> Exception:
    """The error ``"<Type>: <message>"`` of process ``rank`` as every process raises it: of its
    type where that is a common or configuration error (``"on rank <rank>: <message>"``), else
    a ``RuntimeError`` of the whole text."""
    kinds = {kind.__name__: kind for kind in (ValueError, TypeError, RuntimeError, OSError,
                                              FileNotFoundError, *LAYER_ERRORS)}
    name, _, message = error.partition(": ")
    kind = kinds.get(name)
    return RuntimeError(f"on rank {rank}: {error}") if kind is None else \
        kind(f"on rank {rank}: {message}")


def _check_transforms(**transforms: Any) -> None:
    """Each transform is None or a callable ``f(batch) -> inputs`` (a mapping of them, per
    reference, for ``reference_batch_transform``)."""
    for argument, value in transforms.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for name, fn in items:
            if fn is not None and not callable(fn):
                where = argument if name is None else f"{argument}[{name!r}]"
                raise TypeError(f"{where} must be a callable f(batch) -> inputs or None, got "
                                f"{fn!r}")


def _which(ref: Reference) -> str:
    """``"the reference"``, or ``"reference 'name'"`` for one of several."""
    return "the reference" if ref.name is None else f"reference {ref.name!r}"


def _reraise(error: BaseException) -> None:
    raise error


def _anchor(ref: Reference, acts: dict[str, Tensor]) -> None:
    """A drift reference's first activations: each layer is compared with its own."""
    ref.engine.pairs = {name: name for name in acts}
    ref.engine.set_reference(acts)


_LOGGING = ("log", "log_dict")


@contextmanager
def _logging_off(model: nn.Module) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing on the LightningModules of ``model`` while
    the probe runs: a forward that logs (an activation statistic) would put the probe's
    eval-mode values into the epoch's metrics, which checkpoints, early stopping and
    schedulers read.  Methods set on an instance before are put back."""
    modules = [m for m in model.modules() if isinstance(m, LightningModule)]
    saved = [(m, {k: vars(m)[k] for k in _LOGGING if k in vars(m)}) for m in modules]
    for module in modules:
        vars(module).update(dict.fromkeys(_LOGGING, _log_nothing))
    try:
        yield
    finally:
        for module, own in saved:
            for name in _LOGGING:
                if name in own:
                    vars(module)[name] = own[name]
                else:
                    vars(module).pop(name, None)


def _log_nothing(*args: Any, **kwargs: Any) -> None:
    """``self.log`` / ``self.log_dict`` during a probe pass (see :func:`_logging_off`)."""


def _uninitialized_lazy(model: nn.Module) -> list[str]:
    """The lazy modules of ``model`` (``nn.LazyLinear``, ...) whose parameters are not
    initialized yet: their first forward draws them from the global RNG."""
    return [name or type(model).__name__ for name, module in model.named_modules()
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()]


def _set_reference(ref: Reference) -> None:
    """Set a reference's pending activations (a model's or features' probe activations, or
    ``"initial"``'s) as its engine's reference."""
    what = ("the model's probe activations at the start of the fit" if ref.drift
            else "the frozen reference's probe activations")
    try:
        if ref.drift:
            _anchor(ref, ref.pending)
        else:
            ref.engine.set_reference(ref.pending)
    except ValueError as err:  # NaN, an option the widths cannot take (not: out of memory)
        raise FrozenReferenceError(
            f"{what} cannot be measured, which no step would change: {err}") from err
    ref.pending = None


def _initial_unset(ref: Reference) -> bool:
    """An ``"initial"`` reference without its activations, neither prepared nor pending."""
    return ref.kind == "initial" and ref.engine.reference is None and ref.pending is None


def _advance(ref: Reference, acts: dict[str, Tensor], **split: Any) -> None:
    """``"previous"``: the activations the next step compares with (``split`` unused: the
    call meets the other processes as a step does)."""
    _anchor(ref, acts)


def _check_flags(**flags: Any) -> None:
    """Boolean arguments must be ``True`` or ``False`` (``"no"`` would read as true)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def _compute_device(compute_device: Any, model_device: torch.device) -> torch.device:
    """Where the measures run: ``compute_device``, else the model's device, unless that has no
    float64 (MPS), which the measures need: then the CPU.  A ``"cuda"`` without an index is
    this process's current CUDA device, resolved now, in the training thread (a background
    worker thread has its own current device, ``cuda:0``, whatever device the Trainer set)."""
    if compute_device is not None:
        device = torch.device(compute_device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    return torch.device("cpu") if model_device.type == "mps" else model_device


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise-equal values (NaN equal to NaN: a NaN model is a data problem, reported later)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
