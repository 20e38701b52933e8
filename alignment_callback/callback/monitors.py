"""The monitors of an AlignmentCallback's keys (``ModelCheckpoint``, ``EarlyStopping``): when
they check, set against when the alignment step runs.

A monitor reads ``trainer.callback_metrics``, which holds the last alignment step's value until
the next step replaces it.  A monitor that checks between two steps reads a value measured on
earlier weights: a checkpoint is then scored (and chosen as best) by another model's alignment,
and ``EarlyStopping`` counts the repeated value as no improvement.  In epoch mode
(``every_n_epochs``) the step runs at the training epoch end, so a monitor must check there,
and on the epochs of a step.  In step mode (``every_n_train_steps``) the step runs in the
batch hook, before any monitor of that batch, so a monitor reads the latest step's value; that
value belongs to the weights it checks only where it checks on the step of an alignment step
(``ModelCheckpoint(every_n_train_steps=n)`` or a multiple of n).  A monitor at epoch ends
reads the last step's value, up to n − 1 training steps old, unless the optimizer steps
between its checks are a multiple of n; one at validation ends (inside epochs too), unless
every validation it sees ends at a multiple of n optimizer steps.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden


def alignment_monitors(trainer: Trainer, owner: Any) -> list[Callback]:
    """The callbacks of ``trainer`` whose ``monitor`` is one of ``owner``'s keys (under one of
    its ``measure_prefixes()``; not a key the user logs under the same prefix, nor another
    callback's), except those that read ``owner``'s history instead of the logged metrics
    (``AlignmentPlateau``)."""
    heads = tuple(f"{head}/" for head in owner.measure_prefixes())
    found = []
    for cb in trainer.callbacks:
        monitor = getattr(cb, "monitor", None)
        if not (isinstance(monitor, str) and monitor.startswith(heads)):
            continue
        reads_history_of = getattr(cb, "reads_history_of", None)
        if callable(reads_history_of) and reads_history_of(owner):
            continue
        if getattr(cb, "reads_metrics", True) is False:  # it reads another callback's history
            continue
        found.append(cb)
    return found


def _plateau_advice(cb: Callback) -> str | None:
    """The fix for an ``AlignmentPlateau(source="metrics")`` (it reads the logged metrics only
    because it was told to), None for other monitors."""
    if not callable(getattr(cb, "reads_history_of", None)):
        return None
    return ("Drop source=\"metrics\": by default AlignmentPlateau reads the callback's "
            "history, which holds every field and the background results")


def refuse_in_background(monitors: list[Callback]) -> None:
    """``background=True``: results arrive whenever the worker finishes and are not logged to
    the module, so no monitor can watch them."""
    if monitors:
        cb = monitors[0]
        raise ValueError(
            f"{type(cb).__name__}(monitor={cb.monitor!r}) cannot watch an alignment key "
            "computed with AlignmentCallback(background=True): background results arrive "
            "whenever the worker finishes, so they are not logged to the module and a monitor "
            "would see them late or never. "
            + (_plateau_advice(cb) or "Use background=False for monitored keys.")
        )


def failed_step_warning(watching: list[Callback], last: Mapping[str, Any], epoch: int,
                        step: int) -> str:
    """What the monitors read after the alignment step at ``epoch`` / ``step`` failed: the
    value of ``last``, the history's last step, measured on earlier weights."""
    names = ", ".join(f"{type(cb).__name__}(monitor={cb.monitor!r})" for cb in watching)
    return (f"{names}: the alignment step at epoch {epoch} (step {step}) failed, so until the "
            f"next alignment step it reads the value of the last step that succeeded (epoch "
            f"{int(last['epoch'])}, step {int(last['step'])}), measured on earlier weights")


def refuse_unlogged(monitors: list[Callback], logged: list[str]) -> None:
    """A monitor reads ``trainer.callback_metrics``, which gets only the ``logged`` keys (the
    calibrated scores, with ``log_to_module=True``); the other fields go to the loggers only,
    so a monitor on one would fail after the first epoch (``EarlyStopping``) or never save
    (``ModelCheckpoint``)."""
    for cb in monitors:
        if cb.monitor not in logged:
            kept = (f"only the calibrated scores ({', '.join(logged)}) are logged to the "
                    "module, where monitors read them" if logged else "with log_to_module=False "
                    "nothing is logged to the module, where monitors read values")
            raise ValueError(
                f"{type(cb).__name__}(monitor={cb.monitor!r}) watches an alignment key that "
                f"monitors never see: {kept}; "
                "the other fields go to the loggers only. "
                + (_plateau_advice(cb) or "Monitor a calibrated score (with "
                   "log_to_module=True), or use AlignmentPlateau, which reads any field from "
                   "the callback's history"))


def stale_monitor_warnings(trainer: Trainer, pl_module: LightningModule, monitors: list[Callback],
                           every_n_epochs: int) -> list[str]:
    """Epoch mode: one message per monitor that would check where no fresh alignment value is
    (at a validation end, which comes before the training epoch end; or on epochs, or at
    training steps, between two alignment steps), naming the setting that fixes it."""
    messages = []
    for cb in monitors:
        if _never_checks(cb, trainer, pl_module):
            continue
        name = f"{type(cb).__name__}(monitor={cb.monitor!r})"
        why = _checks_at_validation_end(cb, trainer, pl_module)
        if why is not None:
            fix = ("save_on_train_epoch_end=True" if isinstance(cb, ModelCheckpoint)
                   else "check_on_train_epoch_end=True")
            messages.append(
                f"{name} checks at the validation end ({why}), which comes before the training "
                "epoch end where the epoch's alignment step runs: it would read the previous "
                f"step's value, measured on earlier weights. Pass {type(cb).__name__}({fix})")
        elif isinstance(cb, ModelCheckpoint):
            steps, epochs, timed = _checkpoint_schedule(cb)
            if steps > 0 or timed:
                what = f"every_n_train_steps={steps}" if steps > 0 else "train_time_interval"
                messages.append(
                    f"{name} saves by training steps or time ({what}) while the alignment step "
                    f"runs every {every_n_epochs} epoch(s): its checkpoints between two steps "
                    "would be scored with the last step's value, measured on earlier weights. "
                    f"Pass ModelCheckpoint(every_n_epochs={every_n_epochs}), or "
                    "AlignmentCallback(every_n_train_steps=...) to align by steps")
            elif epochs > 0 and epochs % every_n_epochs != 0:
                messages.append(
                    f"{name} saves every {epochs} epoch(s) while the alignment step runs every "
                    f"{every_n_epochs}: on the epochs between, its checkpoints would be scored "
                    "with the last step's value, measured on earlier weights. Pass "
                    f"ModelCheckpoint(every_n_epochs={every_n_epochs}) (or a multiple)")
        elif isinstance(cb, EarlyStopping) and every_n_epochs > 1:
            messages.append(
                f"{name} checks at every epoch end while the alignment step runs every "
                f"{every_n_epochs} epochs: on the epochs between, it reads the last step's value "
                f"again and counts it as no improvement, so patience={cb.patience} counts epochs "
                "rather than alignment steps. Use AlignmentPlateau (which counts alignment "
                "steps) or every_n_epochs=1")
    return messages


def stale_step_monitor_warnings(trainer: Trainer, pl_module: LightningModule,
                                monitors: list[Callback], every_n_train_steps: int,
                                baseline: bool = True) -> list[str]:
    """Step mode, at the start of training (the epoch's length is known then): one message per
    monitor that would read a value measured on earlier weights.  A ``ModelCheckpoint`` that
    saves by training steps (every m with m not a multiple of the callback's n) or by time; a
    monitor that checks at epoch ends (``EarlyStopping``; a ``ModelCheckpoint`` on no step or
    time schedule), when the optimizer steps from one of its checks to the next are not a
    multiple of n (it would read a value up to n − 1 steps old); one that checks at validation
    ends (at epoch ends, or inside epochs by ``val_check_interval``), when a validation it
    sees ends at an optimizer step that is not a multiple of n (the validation ends are listed
    from Lightning's schedule up to ``max_epochs`` and ``max_steps``, over at most two periods
    of the schedule).  Validation by time, manual optimization, an epoch of unknown length and
    a schedule too long to list whose listed validations are all fresh are not judged.  With
    ``baseline=False`` a check before step n finds no value at all (see :func:`_no_value`)."""
    n, per_epoch = every_n_train_steps, _optimizer_steps_per_epoch(trainer, pl_module)
    messages = []
    for cb in monitors:
        if _never_checks(cb, trainer, pl_module):
            continue
        epochs = 1
        if isinstance(cb, ModelCheckpoint):
            steps, epochs, timed = _checkpoint_schedule(cb)
            if steps > 0 or timed:
                if steps % n != 0 or timed:
                    what = (f"every {steps} training steps" if steps > 0
                            else "by time (train_time_interval)")
                    early = "" if baseline or (steps >= n and not timed) else (
                        f" A save before step {n}, the first alignment step (baseline=False), "
                        f"would find no value at all: {_no_value(cb)}.")
                    messages.append(
                        f"ModelCheckpoint(monitor={cb.monitor!r}) saves {what} while the "
                        f"alignment step runs every {n}: its checkpoints between two steps "
                        "would be scored with the last step's value, measured on earlier "
                        f"weights.{early} Pass ModelCheckpoint(every_n_train_steps={n}) (or a "
                        "multiple)")
                continue
            if epochs < 1:
                continue  # it never saves at an epoch end
        elif not isinstance(cb, EarlyStopping):
            continue
        if per_epoch is None:
            continue
        max_steps = trainer.max_steps if trainer.max_steps >= 0 else math.inf
        if _checks_at_validation_end(cb, trainer, pl_module) is None:
            interval = per_epoch * epochs
            max_epochs = trainer.max_epochs
            if (interval % n == 0 or interval > max_steps  # fresh, or never reached
                    or max_epochs is not None and 0 <= max_epochs < epochs):
                continue
            where, first = "at the training epoch end", interval
            when = f"every {interval} optimizer step(s)"
            end = max_steps if max_epochs is None or max_epochs < 0 else min(
                max_steps, max_epochs * per_epoch)
            later = _stale_from(interval, n, end)
        else:
            where = "at the validation end"
            listed = _validation_steps(trainer, trainer.num_training_batches, per_epoch,
                                       epochs, n, max_steps)
            if listed is None:
                continue  # by time, or a long schedule fresh as far as listed: not judged
            steps, extent = listed
            stale = [s for s in steps if s % n]
            if not stale:
                continue
            when, first = _describe(steps, extent), stale[0]
            later = extent != "all" or any(s >= n for s in stale)
        fix = (f"Pass ModelCheckpoint(every_n_train_steps={n})" if isinstance(cb, ModelCheckpoint)
               else "Use AlignmentPlateau (which counts alignment steps)")
        stale_read = f"it would read the last step's value, up to {n - 1} step(s) old"
        before = f"at step {first}, before the first alignment step (baseline=False)"
        if baseline or first >= n:
            read = (f"{stale_read} (at step {first}, step {first - first % n}'s), measured on "
                    "earlier weights")
        elif later:  # stale checks after the first step too
            read = (f"{stale_read}, measured on earlier weights, and {before}, no value at "
                    f"all: {_no_value(cb)}")
        else:
            read = f"{before}, it would find no value at all: {_no_value(cb)}"
        messages.append(
            f"{type(cb).__name__}(monitor={cb.monitor!r}) checks {where}, {when}, while the "
            f"alignment step runs every {n}: {read}. {fix}, or choose every_n_train_steps to "
            "divide the steps of its checks")
    return messages


#: Validation ends listed to judge a monitor's schedule: a longer schedule is judged by the
#: ones listed when one of them is stale, else not judged.
MAX_LISTED_CHECKS = 100_000


def _validation_steps(trainer: Trainer, batches: int, per_epoch: int, every_epochs: int,
                      n: int, max_steps: float) -> tuple[list[int], str] | None:
    """The optimizer steps (``global_step``) at which the validations a monitor checking on
    every ``every_epochs``-th epoch sees end, by Lightning's schedule: after training batch b
    (1-based) of epoch e when ``b`` is a multiple of ``val_check_batch`` and ``e + 1`` one of
    ``check_val_every_n_epoch``, or, with ``check_val_every_n_epoch=None``, when the batches
    since the start are a multiple of ``val_check_batch``.  Listed in order up to
    ``max_epochs`` and ``max_steps``, and over at most two periods of the schedule (after one,
    the steps repeat modulo n, shifted by the period's steps); with how far they reach:
    ``"all"`` (to the end of training), ``"periods"`` (two whole periods: the rest repeats
    them) or ``"some"`` (the first :data:`MAX_LISTED_CHECKS`, one of them stale).  None:
    validation by time, or more validations than that to list, none of the listed stale."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return None
    every_val, v = trainer.check_val_every_n_epoch, int(trainer.val_check_batch)
    accumulate = trainer.accumulate_grad_batches
    period = math.lcm(every_epochs, every_val or 1, n // math.gcd(per_epoch, n),
                      v // math.gcd(batches, v) if every_val is None else 1)
    limit = math.inf if trainer.max_epochs is None or trainer.max_epochs < 0 else trainer.max_epochs
    if max_steps < math.inf:
        limit = min(limit, math.ceil(max_steps / per_epoch))  # epochs that start
    epochs = min(limit, 2 * period)
    extent = "periods" if epochs < limit else "all"

    def ends():  # (epoch, batch of the epoch) of each validation, in order
        if every_val is None:  # every v batches counted from the start
            for g in range(v, epochs * batches + 1, v):
                yield (g - 1) // batches, (g - 1) % batches + 1
        else:
            every = math.lcm(every_epochs, every_val)
            for e in range(every - 1, epochs, every):
                for b in range(v, batches + 1, v):
                    yield e, b

    steps: list[int] = []
    for visited, (e, b) in enumerate(ends()):
        if visited >= MAX_LISTED_CHECKS:
            return (steps, "some") if any(s % n for s in steps) else None
        if (e + 1) % every_epochs:
            continue
        step = e * per_epoch + (per_epoch if b == batches else b // accumulate)
        if step > max_steps:
            return steps, "all"
        steps.append(step)
    return steps, extent


def _describe(steps: list[int], extent: str) -> str:
    """``every d optimizer step(s)`` for the steps d, 2d, 3d, … (listed to the end of training,
    or over two whole periods, which the rest repeats); else the first few (``…``: more
    follow)."""
    d = steps[0]
    if (extent != "some" and len(steps) > 1
            and all(s == d * (i + 1) for i, s in enumerate(steps))):
        return f"every {d} optimizer step(s)"
    if extent == "all" and len(steps) == 1:
        return f"at optimizer step {d}"
    shown = ", ".join(map(str, steps[:6]))
    return f"at optimizer steps {shown}{', …' if extent != 'all' or len(steps) > 6 else ''}"


def _never_checks(cb: Callback, trainer: Trainer, pl_module: LightningModule) -> bool:
    """Whether ``cb`` (a ``ModelCheckpoint`` or ``EarlyStopping``) checks nowhere: without a
    validation loop, one that Lightning has check at validation ends only (its own setting, or
    by Lightning's rule for each when unset: ``EarlyStopping`` with ``val_check_interval`` or
    ``check_val_every_n_epoch`` other than 1, ``ModelCheckpoint`` with
    ``check_val_every_n_epoch`` other than 1) never reads a value, fresh or not."""
    if _validates(trainer, pl_module):
        return False
    if isinstance(cb, ModelCheckpoint):
        setting = getattr(cb, "_save_on_train_epoch_end", None)
        if setting is None:
            setting = trainer.check_val_every_n_epoch == 1
    elif isinstance(cb, EarlyStopping):
        setting = getattr(cb, "_check_on_train_epoch_end", None)
        if setting is None:
            setting = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
    else:
        return False
    return not setting


def _validates(trainer: Trainer, pl_module: LightningModule) -> bool:
    """Whether the fit has a validation loop: a ``validation_step``, ``limit_val_batches > 0``
    and validation data (Lightning's ``Trainer.enable_validation``, taken as true where it
    cannot say)."""
    if not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0:
        return False
    try:
        return bool(trainer.enable_validation)
    except Exception:  # noqa: BLE001 - no module attached yet, another Lightning: assume so
        return True


def cut_epoch_warnings(trainer: Trainer, pl_module: LightningModule, monitors: list[Callback],
                       every_n_train_steps: int | None, every_n_epochs: int = 1,
                       baseline: bool = True) -> list[str]:
    """At the start of training: one message per monitor that checks at the end of an epoch
    that ``max_steps`` cuts short, where it would read a value measured on earlier weights (in
    epoch mode a cut epoch gets no alignment step; in step mode the value is fresh only when
    ``max_steps`` is a multiple of the steps' n), or with ``baseline=False`` no value at all
    when no step came before.  Monitors at validation ends, manual optimization and epochs of
    unknown length are not judged here."""
    per_epoch, max_steps = _optimizer_steps_per_epoch(trainer, pl_module), trainer.max_steps
    if per_epoch is None or max_steps <= 0:
        return []
    epoch, done = divmod(max_steps, per_epoch)
    n = every_n_train_steps
    max_epochs = trainer.max_epochs
    if done == 0 or (max_epochs is not None and 0 <= max_epochs <= epoch) or \
            (n is not None and max_steps % n == 0):
        return []  # no epoch cut short, or the cut comes after the last epoch, or fresh
    last = (f"step {max_steps - max_steps % n}'s value" if n is not None
            else "the value of an earlier epoch's alignment step (a cut epoch gets none)")
    earlier = max_steps >= n if n is not None else epoch >= every_n_epochs
    fix = f"a multiple of {n}" if n is not None else f"a multiple of {per_epoch}"
    messages = []
    for cb in monitors:
        if _never_checks(cb, trainer, pl_module) or \
                _checks_at_validation_end(cb, trainer, pl_module) is not None:
            continue
        if isinstance(cb, ModelCheckpoint):
            steps, epochs, timed = _checkpoint_schedule(cb)
            if steps > 0 or timed or epochs < 1 or (epoch + 1) % epochs:
                continue  # it does not save at that epoch end
        elif not isinstance(cb, EarlyStopping):
            continue
        read = (f"{last}, measured on earlier weights" if baseline or earlier
                else "no value, as no alignment step has run before it (baseline=False): "
                f"{_no_value(cb)}")
        messages.append(
            f"{type(cb).__name__}(monitor={cb.monitor!r}) checks at the training epoch end, and "
            f"Trainer(max_steps={max_steps}) ends training {done} optimizer step(s) into epoch "
            f"{epoch} (of {per_epoch}): at that end it would read {read}. Choose max_steps {fix}")
    return messages


def _stale_from(every: int, n: int, end: float) -> bool:
    """Whether checks at every, 2·every, … (up to step ``end``) fall on a step at or after n
    that is not a multiple of n (the residues repeat after n / gcd(every, n) checks)."""
    k = max(1, -(-n // every))
    for _ in range(n // math.gcd(every, n) + 1):
        if k * every > end:
            return False
        if (k * every) % n:
            return True
        k += 1
    return False


def _optimizer_steps_per_epoch(trainer: Trainer, pl_module: LightningModule) -> int | None:
    """The optimizer steps of one training epoch; None where they are not known in advance
    (manual optimization, an epoch of unknown length)."""
    batches = trainer.num_training_batches
    if not (pl_module.automatic_optimization and 0 < batches < math.inf):
        return None
    return math.ceil(batches / trainer.accumulate_grad_batches)


def _no_value(cb: Callback) -> str:
    """What Lightning does where ``cb`` checks a key that has no value yet (an alignment step
    with ``baseline=False`` has not run)."""
    if isinstance(cb, EarlyStopping):
        return ("EarlyStopping(strict=True) stops training with an error there" if cb.strict
                else "EarlyStopping(strict=False) skips that check")
    return ("ModelCheckpoint skips that save, or stops training with an error once a validation "
            "has run")


def _checkpoint_schedule(cb: ModelCheckpoint) -> tuple[int, int, bool]:
    """A ``ModelCheckpoint``'s ``every_n_train_steps``, ``every_n_epochs`` (0: unset) and
    whether it saves by time (``train_time_interval``)."""
    return (getattr(cb, "_every_n_train_steps", 0) or 0, getattr(cb, "_every_n_epochs", 0) or 0,
            getattr(cb, "_train_time_interval", None) is not None)


def _checks_at_validation_end(cb: Callback, trainer: Trainer, pl_module: LightningModule
                              ) -> str | None:
    """Why ``cb`` (a ``ModelCheckpoint`` or ``EarlyStopping``) checks at the validation end
    rather than the training epoch end, by Lightning's rule for each; None when it checks at
    the training epoch end, when there is no validation loop (no ``validation_step``, no
    validation data, or ``limit_val_batches=0``: a validation end never comes), or for another
    kind of monitor."""
    if isinstance(cb, ModelCheckpoint):
        setting, option = getattr(cb, "_save_on_train_epoch_end", None), "save_on_train_epoch_end"
    elif isinstance(cb, EarlyStopping):
        setting, option = getattr(cb, "_check_on_train_epoch_end", None), "check_on_train_epoch_end"
    else:
        return None
    if not _validates(trainer, pl_module) or setting is True:
        return None
    # the Trainer's settings first: EarlyStopping's own setup turns its None into False when
    # one of them holds, so False alone does not say that the user passed it
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return "validation by time"
    if trainer.check_val_every_n_epoch != 1:
        return f"Trainer(check_val_every_n_epoch={trainer.check_val_every_n_epoch})"
    if trainer.val_check_interval != 1.0:
        return f"Trainer(val_check_interval={trainer.val_check_interval})"
    if setting is False:
        return f"{option}=False"
    return None
