"""Send alignment results to whatever Lightning loggers are attached.

Scalars go through each logger's ``log_metrics`` (rank-zero only inside each logger; W&B's
logger keeps its own step sync, we never call ``wandb.log(step=...)``).  Heatmaps, rendered
once to an RGB array, go where a logger takes images: W&B (``log_image``), TensorBoard
(``add_image``), MLflow (``log_image``); the CSV logger gets PNG files in its log directory.  W&B also gets a
``wandb.Table`` of the layer matrix.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

_DEFINED_ATTR = "_alignment_callback_axes"  # prefixes already defined, kept on the logger


def _kind(logger: Any) -> str:
    name = type(logger).__name__
    for kind in ("Wandb", "TensorBoard", "CSV", "MLFlow"):
        if name.startswith(kind):
            return kind.lower()
    return "other"


def define_axes(loggers: Sequence[Any], prefix: str, step_metric: str) -> None:
    """W&B: plot every ``prefix/*`` series against ``step_metric`` (epoch or global step)."""
    for logger in loggers:
        if _kind(logger) != "wandb":
            continue
        done = getattr(logger, _DEFINED_ATTR, None)
        if done is None:
            done = set()
            try:
                setattr(logger, _DEFINED_ATTR, done)
            except AttributeError:
                pass
        if (prefix, step_metric) in done:
            continue
        try:
            exp = logger.experiment
            exp.define_metric(step_metric)
            exp.define_metric(f"{prefix}/*", step_metric=step_metric)
            done.add((prefix, step_metric))
        except Exception:  # a disabled run has no define_metric: nothing to configure
            pass


def log_scalars(loggers: Sequence[Any], metrics: Mapping[str, float], step: int) -> None:
    """``log_metrics`` on every logger."""
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


def encode_png(image: Any) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array (done once, off the training loop if possible)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def log_image(loggers: Sequence[Any], key: str, image: Any, png: bytes, step: int, label: str,
              scratch: str) -> list[str]:
    """Log an (H, W, 3) uint8 image, already encoded as ``png``, where supported.

    CSV loggers get ``<log_dir>/alignment_heatmaps/<key>_<label>.png``; W&B gets that file (or
    one written to ``scratch``) so the image is not encoded again; TensorBoard and MLflow take
    the array.  Returns the files written into CSV log directories.
    """
    written: list[str] = []
    path = None
    for logger in sorted(loggers, key=lambda lg: _kind(lg) != "csv"):  # CSV files first
        kind = _kind(logger)
        if kind == "csv" and getattr(logger, "log_dir", None):
            folder = os.path.join(logger.log_dir, "alignment_heatmaps")
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, f"{key.replace('/', '_')}_{label}.png")
            with open(target, "wb") as f:
                f.write(png)
            written.append(target)
            path = path or target
        elif kind == "wandb":
            if path is None:
                os.makedirs(scratch, exist_ok=True)
                path = os.path.join(scratch, f"{key.replace('/', '_')}_{label}.png")
                with open(path, "wb") as f:
                    f.write(png)
            logger.log_image(key=key, images=[path], step=step)
        elif kind == "tensorboard":
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
        elif kind == "mlflow":
            logger.experiment.log_image(logger.run_id, image, f"{key}/{label}.png")
    return written


def log_table(loggers: Sequence[Any], key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
    """W&B tables (other loggers have no table type)."""
    for logger in loggers:
        if _kind(logger) == "wandb":
            logger.log_table(key=key, columns=columns, data=rows, step=step)
