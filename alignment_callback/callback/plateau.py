"""``AlignmentPlateau``: call a function once, when an alignment value stops improving.

The use case is REPA-style training, where an auxiliary loss pulls a model's hidden states
toward a frozen encoder's features: that loss helps early and can hurt later (HASTE, "REPA
Works Until It Doesn't", reports both), so one wants to switch it off once the alignment it
buys has plateaued.  ``AlignmentPlateau`` watches a key such as
``"alignment/cknna/calibrated"`` with :class:`~lightning.pytorch.callbacks.EarlyStopping`'s
rule (improvement by more than ``min_delta`` over the last value that improved, in the
direction of ``mode``; ``patience`` checks in a row without one) and, instead of stopping
training, calls ``on_plateau(trainer, pl_module)`` exactly once.

Where the values come from (``source``):

* an :class:`AlignmentCallback`'s ``history`` (the default whenever the trainer has an
  ``AlignmentCallback`` that logs the monitored key, or ``source=<that callback>``): every new
  history entry is one check, read at the first training hook after it was added (batch start or
  end, epoch end, train end).  Nothing is counted twice, a value recomputed less often than the
  hooks run is never re-read as a stale "no improvement", and it works with
  ``AlignmentCallback(background=True)``, whose results reach the history (in order) but not
  ``trainer.callback_metrics``.  The order of the two callbacks in the list does not matter:
  the ``AlignmentCallback`` has its readers read a new entry at the end of the hook that added
  it, so ``on_plateau`` runs in that hook (before the epoch's checkpoint) either way.  The
  baseline (the entry at global step 0, before any training) is not a check, nor is a step at
  which the monitored reference had no result (the first step of ``reference="previous"`` next
  to other references); but the baseline holds every key a step logs, so with ``strict`` a key
  it lacks (a layer's key of a frozen reference, a pair's key without ``log_pairs``) is an
  error at the first training batch, not after the first period of training;
* ``trainer.callback_metrics`` (``source="metrics"``, or the default when no
  ``AlignmentCallback`` logs the key: a value ``pl_module.log``-ged by anything else): one check
  at every training epoch end (``check_on="epoch"``; an epoch cut short by ``max_steps``,
  ``max_time`` or a stop is checked at its real end when the run resumes, once, unlike
  ``EarlyStopping``) or after every optimizer step
  (``check_on="step"``), like ``EarlyStopping``.  The key must then be logged afresh for every
  check (a value left over from an earlier epoch counts as one more check without improvement),
  and the logging code must run before this callback's hook (put this callback after the one
  that logs).

State (best value, checks without improvement, whether and where it fired, the last history
entry read) is saved in checkpoints, so a resumed run continues the count and never calls
``on_plateau`` a second time; a new fit (not resumed, at step 0) with the same object starts a
new count, as the ``AlignmentCallback`` starts a new history.  A resume in which the
``AlignmentCallback`` starts the monitored curve anew (a checkpoint written with other
settings) restarts the count (best value, checks without improvement) but not ``fired``: an
``on_plateau`` that ran is not called again.  With ``AlignmentCallback(background=True)`` the
decision is the foreground's (the same values, in order), but ``on_plateau`` runs at the first
training hook after the deciding result is ready, so the step at which training changes
depends on timing (``fired_at["called_at_step"]``); use ``background=False`` where that step
must be reproducible.  Note what this does *not* restore: whatever ``on_plateau``
changed.  Keep that in the checkpoint too (e.g. the loss weight as a registered buffer, as in
``examples/plateau.py``), or read :attr:`AlignmentPlateau.fired` in ``training_step``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from alignment_callback.callback.alignment_callback import AlignmentCallback
from alignment_callback.callback.progress import epoch_cut_short, last_batch_ran
from alignment_callback.engine.result import LOGGED_FIELDS

#: The numbers logged per measure as ``<prefix>/<measure>/<field>``
_FIELDS = (*LOGGED_FIELDS, "best_model_layer", "best_reference_layer")
_TEXT_FIELDS = ("best_pair", "null_method")  # logged per measure too, as texts

OnPlateau = Callable[["pl.Trainer", "pl.LightningModule"], Any]
Source = None | str | AlignmentCallback

MODES = ("min", "max")
CHECK_ON = ("epoch", "step")


class AlignmentPlateau(Callback):
    """Call ``on_plateau(trainer, pl_module)`` once, at the first check where ``monitor`` has
    not improved by more than ``min_delta`` for ``patience`` consecutive checks.

    Improvement follows ``EarlyStopping``: with ``mode="max"`` a value ``v`` improves on the
    value to beat ``b``, the last value that improved, when ``v - min_delta > b``
    (``mode="min"``: ``v + min_delta < b``); the first value checked always does.  With
    ``min_delta > 0`` a later value that is higher by no more than ``min_delta`` leaves ``b``
    as it is, so ``b`` need not be the largest value seen.  An improvement resets the count,
    anything else adds one; when the count reaches ``patience`` the function is called and
    the callback stops checking.
    Non-finite values are skipped with a warning.

    Parameters
    ----------
    monitor : str, default="alignment/cknna/calibrated"
        The key to watch.
    mode : {"max", "min"}, default="max"
        ``"max"``: alignment should rise; ``"min"``: it should fall.
    patience : int, default=3
        Checks without improvement before ``on_plateau`` is called (an integer >= 1).
    min_delta : float, default=0.0
        The smallest change that counts as an improvement (>= 0).
    on_plateau : callable
        ``f(trainer, pl_module)``, called once (keyword-only, required).  Under DDP it is
        called on every rank at the same check.
    source : None, "metrics" or AlignmentCallback, default=None
        ``None``: the history of the trainer's ``AlignmentCallback`` that logs ``monitor``,
        else ``trainer.callback_metrics``; an ``AlignmentCallback``: its history;
        ``"metrics"``: ``trainer.callback_metrics``.  See the module docstring.
    check_on : {"epoch", "step"}, default="epoch"
        When ``trainer.callback_metrics`` is read (ignored for a history source, where every
        new entry is a check).
    strict : bool, default=True
        As ``EarlyStopping``: a check without the key is an error (and so, at setup, is a
        source that does not log it, or a ``<prefix>/<measure>/<field>`` key whose field is
        not one it logs, such as ``calibrate``); ``False``: such checks are skipped, and a key
        that never appeared is reported with a warning when training ends.  A text field
        (``best_pair``, ``null_method``) is an error either way.
    verbose : bool, default=False
        Log each check's outcome and the call (rank 0).
    name : str or None, default=None
        An extra label for :attr:`state_key`, needed only to use two plateaus with the same
        ``monitor`` and ``mode`` in one trainer.

    Attributes
    ----------
    best : float or None
        The value to beat ``b``: the last value that improved (the largest so far when
        ``min_delta=0``); None before the first check.
    wait : int
        Checks since the last improvement.
    fired : bool
        Whether ``on_plateau`` has been called (also in an earlier, resumed run).
    fired_at : dict or None
        None until ``on_plateau`` is called, then the check that called it:
        ``{"epoch", "step", "value", "best", "called_at_step"}``.  ``epoch`` and ``step``
        are numbered like ``AlignmentCallback``'s history (the epoch count after an
        epoch-end check; the global step of the alignment result that decided); ``value`` is
        the monitored value at that check (None on a DDP rank that lacked the key and fired
        with the others) and ``best`` the value to beat then; ``called_at_step`` is the
        ``trainer.global_step`` at which ``on_plateau`` ran: ``step`` in the foreground,
        later with ``AlignmentCallback(background=True)``, where the call comes at the first
        training hook after the deciding result arrives (so it depends on timing).

    Examples
    --------
    >>> from alignment_callback.callback import AlignmentPlateau
    >>> plateau = AlignmentPlateau("alignment/cknna/calibrated", patience=3, min_delta=0.01,
    ...                            on_plateau=lambda trainer, module: None)
    >>> plateau.fired, plateau.fired_at is None, plateau.best
    (False, True, None)

    In a training run (``dinov2``, ``probe`` and ``layers`` as for ``AlignmentCallback``)::

        plateau = AlignmentPlateau("alignment/cknna/calibrated", patience=3, min_delta=0.01,
                                   on_plateau=lambda trainer, module: module.repa_weight.zero_())
        trainer = Trainer(callbacks=[AlignmentCallback(dinov2, probe, layers), plateau])
    """

    def __init__(
        self,
        monitor: str = "alignment/cknna/calibrated",
        mode: str = "max",
        patience: int = 3,
        min_delta: float = 0.0,
        *,
        on_plateau: OnPlateau,
        source: Source = None,
        check_on: str = "epoch",
        strict: bool = True,
        verbose: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        _validate(monitor, mode, patience, min_delta, on_plateau, source, check_on, strict,
                  verbose, name)
        self.monitor = monitor
        self.mode = mode
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.on_plateau = on_plateau
        self.source = source
        self.check_on = check_on
        self.strict = strict
        self.verbose = verbose
        self.name = name
        self.best: float | None = None
        self.wait = 0
        self.fired = False
        self.fired_at: dict[str, Any] | None = None
        self._cursor: tuple[int, int] | None = None  # (step, epoch) of the last entry read
        self._last_step: int | None = None  # metrics source, check_on="step": last step read
        self._seen = False  # the key was present at some check
        self._missed = 0  # checks without the key (this run)
        self._stage: str | None = None  # the trainer's stage, from setup to teardown
        self._history: AlignmentCallback | None = None  # resolved at setup

    # ------------------------------------------------------------------------- identity
    @property
    def state_key(self) -> str:
        if self.name is None:
            return self._generate_state_key(monitor=self.monitor, mode=self.mode)
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, name=self.name)

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (safe for ``weights_only`` checkpoints)."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "wait": self.wait,
            "fired": self.fired,
            "fired_at": None if self.fired_at is None else dict(self.fired_at),
            "cursor": None if self._cursor is None else list(self._cursor),
            "last_step": self._last_step,
            "seen": self._seen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The count, best value and firing of a checkpoint; outside a fit (``validate`` /
        ``test`` / ``predict`` given a ``ckpt_path``) the state is left as it is."""
        if self._stage not in (None, "fit"):
            return
        best = state_dict.get("best")
        self.best = None if best is None else float(best)
        self.wait = int(state_dict.get("wait", 0))
        self.fired = bool(state_dict.get("fired", False))
        fired_at = state_dict.get("fired_at")
        self.fired_at = None if fired_at is None else dict(fired_at)
        cursor = state_dict.get("cursor")
        self._cursor = None if cursor is None else (int(cursor[0]), int(cursor[1]))
        last_step = state_dict.get("last_step")
        self._last_step = None if last_step is None else int(last_step)
        self._seen = bool(state_dict.get("seen", False))

    @property
    def reads_metrics(self) -> bool:
        """Whether this plateau may read ``trainer.callback_metrics`` (False: its ``source``
        is an ``AlignmentCallback``, whose history it reads, whatever other callbacks log)."""
        return not isinstance(self.source, AlignmentCallback)

    def reads_history_of(self, callback: Any) -> bool:
        """Whether this plateau reads ``callback``'s history rather than
        ``trainer.callback_metrics`` (so it may watch a ``background=True`` callback)."""
        if isinstance(self.source, AlignmentCallback):
            return self.source is callback
        return (self.source is None and isinstance(callback, AlignmentCallback)
                and self._logs_monitor(callback))

    # ---------------------------------------------------------------------------- setup
    def _head(self, callback: AlignmentCallback) -> str | None:
        """The ``<prefix>[/<reference name>]/<measure>`` of ``callback`` that ``monitor``
        begins with (None: it logs no such key; a key without the reference's name, when the
        callback has several references, is none of its keys)."""
        return next((head for head in callback.measure_prefixes()
                     if self.monitor.startswith(f"{head}/")), None)

    def _logs_monitor(self, callback: AlignmentCallback) -> bool:
        """``callback`` logs ``monitor``: ``<prefix>[/<reference name>]/<measure>/...`` of one
        of its references and measures."""
        return self._head(callback) is not None

    def _unknown_field(self, callback: AlignmentCallback) -> str | None:
        """The last part of ``monitor`` when it names no number ``callback`` logs per measure
        (``<prefix>/<measure>/calibrate``); None otherwise (longer keys, such as a layer's or a
        pair's, are not checked here)."""
        head = self._head(callback)
        rest = [] if head is None else self.monitor[len(head) + 1:].split("/")
        return rest[0] if len(rest) == 1 and rest[0] not in _FIELDS else None

    def _check_field(self, callback: AlignmentCallback) -> None:
        field = self._unknown_field(callback)
        if field is not None:
            message = (f"AlignmentPlateau(monitor={self.monitor!r}): {field!r} is not a number "
                       f"the AlignmentCallback logs per measure; those are {', '.join(_FIELDS)}")
            if field in _TEXT_FIELDS:  # a text, never a number: an error even without strict
                raise ValueError(message + f" ({field!r} is a text)")
            self._report(message)

    def _keys_of(self, callback: AlignmentCallback) -> str:
        return ", ".join(f"{head}/calibrated" for head in callback.measure_prefixes())

    def _report(self, message: str, error: type[Exception] = ValueError) -> None:
        """An error with ``strict``, else a warning."""
        if self.strict:
            raise error(message)
        rank_zero_warn(message, category=RuntimeWarning)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the source: an ``AlignmentCallback``'s history or ``callback_metrics``."""
        self._stage = stage  # a checkpoint is loaded after setup, for every stage
        if stage != "fit":
            return
        self._missed = 0
        if trainer.ckpt_path is None and trainer.global_step == 0:
            # a new training run: the count, the best value and "fired" of an earlier fit of
            # this object are another run's (a resumed run's state is loaded after setup)
            self.load_state_dict({})
        aligners = [cb for cb in trainer.callbacks if isinstance(cb, AlignmentCallback)]
        if isinstance(self.source, AlignmentCallback):
            if not any(cb is self.source for cb in aligners):
                raise ValueError("AlignmentPlateau(source=...) must be one of the trainer's "
                                 "callbacks: pass the same AlignmentCallback object to "
                                 "Trainer(callbacks=[...])")
            self._history = self.source
            if not self._logs_monitor(self.source):
                self._report(f"AlignmentPlateau(monitor={self.monitor!r}): the source "
                             f"AlignmentCallback does not log this key; it logs e.g. "
                             f"{self._keys_of(self.source)}")
            else:
                self._check_field(self.source)
            return
        self._history = None
        if self.source == "metrics":
            return
        matches = [cb for cb in aligners if self._logs_monitor(cb)]
        if len(matches) > 1:
            raise ValueError(f"AlignmentPlateau(monitor={self.monitor!r}): {len(matches)} "
                             "AlignmentCallbacks log this key; pass the one to watch as source=")
        if matches:
            self._history = matches[0]
            self._check_field(matches[0])
            return
        prefixed = [cb for cb in aligners if self.monitor.startswith(f"{cb.log_prefix}/")]
        if prefixed:
            self._report(f"AlignmentPlateau(monitor={self.monitor!r}): no AlignmentCallback "
                         f"logs this key (they log e.g. "
                         f"{'; '.join(self._keys_of(cb) for cb in prefixed)}); "
                         + ("with strict=False it is read from trainer.callback_metrics"
                            if self.strict else "reading trainer.callback_metrics instead"))

    # ---------------------------------------------------------------------------- hooks
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._history is not None:
            self._read_history(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._history is not None:
            self._read_history(trainer, pl_module)
        elif self.check_on == "step":
            step = int(trainer.global_step)
            # once per optimizer step (gradient accumulation calls this hook several times)
            if step > 0 and step != self._last_step:
                self._last_step = step
                # finished epochs, as the AlignmentCallback's history numbers its steps
                epoch = int(trainer.current_epoch) + int(last_batch_ran(trainer))
                self._read_metrics(trainer, pl_module, epoch, step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._history is not None:
            self._read_history(trainer, pl_module)
        elif (self.check_on == "epoch" and not trainer.sanity_checking
              and not epoch_cut_short(trainer)):
            # an epoch cut short (max_steps, max_time, a stop) is checked at its real end
            # when the run resumes, once, as in a run that was not interrupted
            self._read_metrics(trainer, pl_module, int(trainer.current_epoch) + 1,
                               int(trainer.global_step))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a checkpoint is loaded: a curve the source did not continue (the checkpoint
        was written with other settings) is a new curve, so the count starts anew too (with
        ``source="metrics"``, when any ``AlignmentCallback`` restarted the monitored key).
        A history source has this plateau read its new entries in the hook that adds them."""
        if self._history is not None:
            self._history.add_history_reader(self._read_history)
        sources = ([self._history] if self._history is not None else
                   [cb for cb in trainer.callbacks if isinstance(cb, AlignmentCallback)])
        restarted = {prefix for cb in sources for prefix in getattr(cb, "restarted", ())}
        if any(self.monitor.startswith(prefix) for prefix in restarted) and (
                self.best is not None or self.wait):
            rank_zero_warn(f"AlignmentPlateau(monitor={self.monitor!r}): the curve starts anew "
                           "(its AlignmentCallback resumed with other settings), and so does "
                           "the count (best value, checks without improvement); a plateau "
                           "that fired stays fired (its on_plateau is not called again)",
                           category=UserWarning)
            # the history holds only the new curve's values of the key: read it from the start
            fired, fired_at = self.fired, self.fired_at
            self.load_state_dict({})
            self.fired, self.fired_at = fired, fired_at

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._history is not None:  # its last background steps too, when it ends after us
            self._history.publish_outstanding(trainer)
            self._read_history(trainer, pl_module)
        if not self._seen and self._missed:
            where = ("the AlignmentCallback's history" if self._history is not None
                     else "trainer.callback_metrics")
            rank_zero_warn(f"AlignmentPlateau(monitor={self.monitor!r}): the key never appeared "
                           f"in {where} ({self._missed} check(s) without it), so on_plateau was "
                           "never called", category=RuntimeWarning)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = None
        if self._history is not None:
            self._history.remove_history_reader(self._read_history)

    # --------------------------------------------------------------------------- checks
    def _read_history(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every history entry added since the last read is one check (the baseline, and an
        entry without a result of the monitored reference, excepted)."""
        new = []
        for entry in reversed(self._history.history):
            key = (int(entry["step"]), int(entry["epoch"]))
            if self._cursor is not None and key <= self._cursor:
                break
            new.append((key, entry))
        for key, entry in reversed(new):
            self._cursor = key
            step, epoch = key
            if step == 0 and not self.fired and self.strict and self.monitor not in entry and \
                    self._history.has_result(entry, self.monitor):
                # the baseline is no check, but every step logs the keys it holds
                self._missing(sorted(k for k in entry if isinstance(k, str)),
                              "baseline's history entry (step 0), which holds every key a "
                              "step logs")
            if step == 0 or self.fired:  # the baseline: before any training
                continue
            value = entry.get(self.monitor)
            if value is None and not self._history.has_result(entry, self.monitor):
                # the monitored reference had no result at this step (the first capture of
                # reference="previous" only stores the activations): not a check
                self._missed += 1
                continue
            if value is None:
                self._missing(sorted(k for k in entry if isinstance(k, str)), "history entry")
                continue
            if isinstance(value, str):  # a text where a number was expected: no check
                self._missed += 1
                continue
            self._check(trainer, pl_module, float(value), epoch, step)

    def _read_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int,
                      step: int) -> None:
        if self.fired or trainer.fast_dev_run:
            return
        logs = trainer.callback_metrics
        raw = logs.get(self.monitor)
        value = None if raw is None else float(raw.squeeze() if hasattr(raw, "squeeze") else raw)
        fire = False
        if value is None:
            self._missing(sorted(logs), "trainer.callback_metrics")
        else:
            fire = self._evaluate(value, epoch, step)
        if trainer.world_size > 1:  # every rank fires at the same check (like EarlyStopping)
            fire = bool(trainer.strategy.reduce_boolean_decision(fire, all=False))
        if fire:
            self._fire(trainer, pl_module, epoch, step, value)

    def _missing(self, available: list[str], where: str) -> None:
        self._missed += 1
        if self.strict:
            raise RuntimeError(
                f"AlignmentPlateau(monitor={self.monitor!r}): the key is not in the {where}; "
                f"available keys: {', '.join(available) or '(none)'}. Pass another monitor, "
                "or strict=False to skip checks without it")

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float,
               epoch: int, step: int) -> None:
        if self._evaluate(value, epoch, step):
            self._fire(trainer, pl_module, epoch, step, value)

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value - self.min_delta > self.best
        return value + self.min_delta < self.best

    def _evaluate(self, value: float, epoch: int, step: int) -> bool:
        """One check: update best / wait; True when the plateau is reached now."""
        if not math.isfinite(value):
            rank_zero_warn(f"AlignmentPlateau: {self.monitor} = {value} at epoch {epoch} (step "
                           f"{step}) is not finite; the check is skipped", category=RuntimeWarning)
            return False
        self._seen = True
        if self._improves(value):
            self.best, self.wait = value, 0
            if self.verbose:
                rank_zero_info(f"AlignmentPlateau: {self.monitor} = {value:.4f} at epoch {epoch} "
                               f"(step {step}): new best")
            return False
        self.wait += 1
        if self.verbose:
            rank_zero_info(f"AlignmentPlateau: {self.monitor} = {value:.4f} at epoch {epoch} "
                           f"(step {step}): no improvement over {self.best:.4f} by more than "
                           f"{self.min_delta:g} for {self.wait} of {self.patience} check(s)")
        return self.wait >= self.patience

    def _fire(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int,
              step: int, value: float | None) -> None:
        self.fired = True
        # step: the alignment step whose value decided; called_at_step: where on_plateau ran
        # (later with background=True: at the first training hook after the result arrived)
        self.fired_at = {"epoch": int(epoch), "step": int(step), "value": value,
                         "best": self.best, "called_at_step": int(trainer.global_step)}
        if self.verbose:
            decided = (f"at epoch {epoch} (step {step})" if int(trainer.global_step) == step
                       else f"at training step {int(trainer.global_step)} (the alignment step "
                            f"of epoch {epoch}, step {step}, decided)")
            rank_zero_info(f"AlignmentPlateau: {self.monitor} has not improved by more than "
                           f"{self.min_delta:g} for {self.wait} check(s) (best "
                           f"{'none' if self.best is None else format(self.best, '.4f')}); "
                           f"calling on_plateau {decided}")
        self.on_plateau(trainer, pl_module)


def _validate(monitor: Any, mode: Any, patience: Any, min_delta: Any, on_plateau: Any,
              source: Any, check_on: Any, strict: Any, verbose: Any, name: Any) -> None:
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"AlignmentPlateau: monitor must be a non-empty string, got {monitor!r}")
    if mode not in MODES:
        raise ValueError(f"AlignmentPlateau: mode must be 'min' or 'max', got {mode!r}")
    if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 1:
        raise ValueError(f"AlignmentPlateau: patience must be an integer >= 1, got {patience!r}")
    if (isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real)
            or not math.isfinite(min_delta) or min_delta < 0):
        raise ValueError(f"AlignmentPlateau: min_delta must be a finite number >= 0, got "
                         f"{min_delta!r}")
    if not callable(on_plateau):
        raise TypeError(f"AlignmentPlateau: on_plateau must be a callable f(trainer, pl_module), "
                        f"got {on_plateau!r}")
    if not (source is None or source == "metrics" or isinstance(source, AlignmentCallback)):
        raise ValueError(f"AlignmentPlateau: source must be None, 'metrics' or an "
                         f"AlignmentCallback, got {source!r}")
    if check_on not in CHECK_ON:
        raise ValueError(f"AlignmentPlateau: check_on must be 'epoch' or 'step', got {check_on!r}")
    for arg, value in (("strict", strict), ("verbose", verbose)):
        if not isinstance(value, bool):
            raise TypeError(f"AlignmentPlateau: {arg} must be True or False, got {value!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"AlignmentPlateau: name must be a non-empty string or None, got {name!r}")
