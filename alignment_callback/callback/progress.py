"""Where Lightning's training loop is: whether an epoch ran its last batch or was cut short.
The epoch numbers of the alignment steps and of the plateau checks count finished epochs."""

from __future__ import annotations

from lightning.pytorch import Trainer


def last_batch_ran(trainer: Trainer) -> bool:
    """Whether the batch just run (or, right after a checkpoint is restored, the batch it was
    written at) is the last of its epoch, by Lightning's batch progress; False where that is
    not known (a ``training_step`` that takes the ``dataloader_iter``: the epoch ends when the
    iterator does)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return bool(getattr(getattr(loop, "batch_progress", None), "is_last_batch", False))


def epoch_cut_short(trainer: Trainer) -> bool:
    """At a training epoch end: whether ``max_steps`` or a requested stop ended the epoch
    before its last batch."""
    if last_batch_ran(trainer):
        return False
    max_steps = getattr(trainer, "max_steps", -1)
    return bool(trainer.should_stop) or (max_steps is not None and max_steps >= 0
                                         and trainer.global_step >= max_steps)
