"""Send alignment results to whatever Lightning loggers are attached.

Scalars go through each logger's ``log_metrics`` (rank-zero only inside each logger; W&B's
logger keeps its own step sync, we never call ``wandb.log(step=...)``).  Heatmaps, rendered
once to an RGB array, go where a logger takes images: W&B (``log_image``), TensorBoard
(``add_image``), MLflow (``log_image``); the CSV logger gets PNG files in its log directory.
Best layer pairs are logged by name where a logger takes text (W&B, TensorBoard, MLflow tags);
a layer index → name map goes to every logger's hyperparameters once.  At the end of fit W&B
gets, per measure, a summary (best calibrated and raw, smallest p), one chart of raw, τ and
calibrated, and one table of every pair at every step; the end-of-fit report goes to W&B as a
file.  A logger's own ``prefix=`` names every key sent to it, the direct calls to its
experiment as its ``log_metrics`` does (hyperparameters excepted, as in Lightning).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
from typing import Any, Mapping, Sequence

_DEFINED_ATTR = "_alignment_callback_wandb"  # what was defined on the run (_wandb_state)


def _kind(logger: Any) -> str:
    """Which built-in Lightning logger ``logger`` is, or extends ("other": none of them).  The
    class names of its bases are compared, so that a user's subclass is recognized without
    importing the optional W&B / MLflow packages."""
    for cls in type(logger).__mro__:
        for kind in ("Wandb", "TensorBoard", "CSV", "MLFlow"):
            if cls.__name__.startswith(kind):
                return kind.lower()
    return "other"


def _named(logger: Any, key: str) -> str:
    """``key`` as ``logger`` writes it: after the ``prefix=`` of a Lightning logger
    (``<prefix><LOGGER_JOIN_CHAR><key>``, what its ``log_metrics`` does), for the calls that go
    to the logger's experiment directly (axes, texts, images, summaries, charts)."""
    prefix = getattr(logger, "_prefix", "")
    if not prefix or not isinstance(prefix, str):
        return key
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}{key}"


def _wandb_state(logger: Any) -> dict[str, Any]:
    """What was defined on a W&B logger's run: ``axes`` (prefix → step metric) and ``keys``
    (the keys given their own definition), kept on the logger."""
    state = getattr(logger, _DEFINED_ATTR, None)
    if state is None:
        state = {"axes": {}, "keys": set()}
        try:
            setattr(logger, _DEFINED_ATTR, state)
        except AttributeError:
            pass
    return state


def define_axes(loggers: Sequence[Any], prefix: str, step_metric: str) -> None:
    """W&B: plot every ``prefix/*`` series against ``step_metric`` (epoch or global step).

    Each key also gets its own definition when first logged (:func:`_define_keys`): W&B applies
    a key's own definition before any glob, and picks among overlapping globs (Lightning's
    ``*`` against ``trainer/global_step`` and this ``prefix/*``) in no fixed order."""
    for logger in loggers:
        if _kind(logger) != "wandb":
            continue
        state = _wandb_state(logger)
        if state["axes"].get(prefix) == step_metric:
            continue
        try:
            exp = logger.experiment
            exp.define_metric(_named(logger, step_metric))
            exp.define_metric(_named(logger, f"{prefix}/*"),
                              step_metric=_named(logger, step_metric))
            state["axes"][prefix] = step_metric
        except Exception:  # a disabled run has no define_metric: nothing to configure
            pass


def _axis(state: Mapping[str, Any], key: str) -> str | None:
    """The step metric of ``key``'s prefix, the longest of the defined prefixes it starts with
    (``alignment/wide/...`` is ``alignment/wide``'s, not ``alignment``'s); None for an axis
    itself or another key."""
    if key in state["axes"].values():
        return None
    prefixes = [prefix for prefix in state["axes"] if key.startswith(f"{prefix}/")]
    return state["axes"][max(prefixes, key=len)] if prefixes else None


def _define_keys(logger: Any, keys: Sequence[str]) -> None:
    """W&B: give each new key of a defined prefix its own ``define_metric`` on its axis."""
    state = _wandb_state(logger)
    for key in keys:
        axis = _axis(state, key)
        if key in state["keys"] or axis is None:
            continue
        try:
            logger.experiment.define_metric(_named(logger, key),
                                            step_metric=_named(logger, axis))
        except Exception:  # noqa: BLE001 - a disabled run: nothing to configure
            return
        state["keys"].add(key)


def check_key_part(value: Any, argument: str) -> str:
    """``value``, a name that becomes part of every logged key (``log_prefix``, a reference's
    name): a non-empty string whose ``/``-separated parts are neither empty nor ``.`` or
    ``..``, and which does not start with ``..``.  ``alignment/``, ``a//b``, ``a/../b`` or
    ``..v2`` would make keys that MLflow refuses (as paths that resolve to other names, or
    that start with ``..``) in the middle of training."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{argument} must be a non-empty string, got {value!r}")
    if any(part in ("", ".", "..") for part in value.split("/")) or value.startswith(".."):
        raise ValueError(f"{argument}={value!r}: it is part of every logged key, so it may not "
                         "start or end with '/', start with '..', hold '//', or have a '.' or "
                         "'..' part (MLflow refuses such keys as paths that resolve to other "
                         "names)")
    return value


MLFLOW_NAME_LIMIT = 250  # MLflow's longest metric, tag and parameter name


def mlflow_keys(logger: Any, keys: Sequence[str]) -> dict[str, str]:
    """MLflow's name for each key: characters outside ``[A-Za-z0-9_/. -]`` dropped (what
    Lightning's MLFlowLogger does to metric names; tags and params are refused otherwise), a
    ``/``-separated part left empty, ``.`` or ``..`` written ``_`` and a name that starts with
    ``..`` prefixed with ``_`` (MLflow refuses names that resolve to other paths or start with
    ``..``), and a key whose name would then be one an earlier key of this
    logger has told apart by ``_2``, ``_3``, ... (the first suffix no key has; warned once), so
    two layers or references never share one series.  A name longer than MLflow's 250
    characters (less the logger's ``prefix``) has its longest ``/``-separated part cut and
    ended with 8 hex digits of the key's SHA-1 (warned once), so the measure and field at its
    end stay readable."""
    names = logger.__dict__.setdefault("_alignment_mlflow_names", {"names": {}})["names"]
    used = set(names.values())
    prefix = getattr(logger, "_prefix", "") or ""
    limit = MLFLOW_NAME_LIMIT - (len(prefix) + 1 if prefix else 0) - 4  # 4: room for "_<n>"
    for key in keys:
        if key in names:
            continue
        clean = "/".join(part if part not in ("", ".", "..") else "_"
                         for part in re.sub(r"[^a-zA-Z0-9_/. -]+", "", key).split("/"))
        if clean.startswith(".."):
            clean = "_" + clean
        if len(clean) > limit:
            short = _shortened(clean, limit, hashlib.sha1(key.encode()).hexdigest()[:8])
            warnings.warn(f"MLflow refuses names longer than {MLFLOW_NAME_LIMIT} characters: "
                          f"{key!r} is logged as {short!r}", RuntimeWarning, stacklevel=3)
            clean = short
        name = clean
        suffix = 1
        while name in used:
            suffix += 1
            name = f"{clean}_{suffix}"
        if name != clean:
            earlier = [k for k, v in names.items() if v == clean]
            warnings.warn(f"MLflow drops characters outside [A-Za-z0-9_/. -] from names, which "
                          f"makes these keys coincide: {earlier + [key]}; {key!r} is logged as "
                          f"{name!r}", RuntimeWarning, stacklevel=3)
        names[key] = name
        used.add(name)
    return {key: names[key] for key in keys}


def _shortened(name: str, limit: int, digest: str) -> str:
    """``name`` cut to ``limit`` characters, ending its longest part (or, if that is not
    enough, the whole name) with ``_<digest>``."""
    parts = name.split("/")
    longest = max(range(len(parts)), key=lambda i: len(parts[i]))
    keep = len(parts[longest]) - (len(name) - limit) - len(digest) - 1
    if keep < 1:
        return f"{name[:limit - len(digest) - 1]}_{digest}"
    parts[longest] = f"{parts[longest][:keep]}_{digest}"
    return "/".join(parts)


def log_scalars(loggers: Sequence[Any], metrics: Mapping[str, float], step: int) -> None:
    """``log_metrics`` on every logger (MLflow under :func:`mlflow_keys`)."""
    for logger in loggers:
        kind = _kind(logger)
        if kind == "wandb":
            _define_keys(logger, list(metrics))
        if kind == "mlflow":
            names = mlflow_keys(logger, list(metrics))
            logger.log_metrics({names[k]: v for k, v in metrics.items()}, step=step)
        else:
            logger.log_metrics(dict(metrics), step=step)


def encode_png(image: Any) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array (done once, off the training loop if possible)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def log_image(loggers: Sequence[Any], key: str, image: Any, png: bytes, step: int, label: str,
              scratch: str, file_stem: str | None = None) -> list[str]:
    """Log an (H, W, 3) uint8 image, already encoded as ``png``, where supported.

    CSV loggers get ``<log_dir>/alignment_heatmaps/<file_stem>_<label>.png`` (``file_stem``
    default: ``key`` with ``/`` as ``_``); W&B gets that file (or one written to ``scratch``) so
    the image is not encoded again; TensorBoard and MLflow take the array.  Returns the files
    written into CSV log directories.
    """
    written: list[str] = []
    path = None
    name = f"{file_stem or key.replace('/', '_')}_{label}.png"
    for logger in sorted(loggers, key=lambda lg: _kind(lg) != "csv"):  # CSV files first
        kind = _kind(logger)
        if kind == "csv" and getattr(logger, "log_dir", None):
            folder = os.path.join(logger.log_dir, "alignment_heatmaps")
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, name)
            with open(target, "wb") as f:
                f.write(png)
            written.append(target)
            path = path or target
        elif kind == "wandb":
            if path is None:
                os.makedirs(scratch, exist_ok=True)
                path = os.path.join(scratch, name)
                with open(path, "wb") as f:
                    f.write(png)
            _define_keys(logger, [key])
            logger.log_image(key=key, images=[path], step=step)
        elif kind == "tensorboard":
            logger.experiment.add_image(_named(logger, key), image, global_step=step,
                                        dataformats="HWC")
        elif kind == "mlflow":
            tagged = _named(logger, f"{key}/{label}")  # prefixed, then cleaned, as Lightning does
            artifact = mlflow_keys(logger, [tagged])[tagged]
            logger.experiment.log_image(logger.run_id, image, f"{artifact}.png")
    return written


def log_text(loggers: Sequence[Any], texts: Mapping[str, str], step: int) -> None:
    """Strings (best layer pairs by name) where a logger takes text."""
    for logger in loggers:
        kind = _kind(logger)
        if kind == "wandb":
            _define_keys(logger, list(texts))
            logger.experiment.log({_named(logger, k): v for k, v in texts.items()}, commit=False)
        elif kind == "tensorboard":
            for key, text in texts.items():
                logger.experiment.add_text(_named(logger, key), text, global_step=step)
        elif kind == "mlflow":
            names = mlflow_keys(logger, [_named(logger, key) for key in texts])
            for key, text in texts.items():
                logger.experiment.set_tag(logger.run_id, names[_named(logger, key)], text)


def log_layer_names(loggers: Sequence[Any], prefix: str, names: Mapping[str, Sequence[str]]) -> None:
    """The index → name map of the ``best_model_layer`` / ``best_reference_layer`` scalars, as
    hyperparameters (``<prefix>/layers/<side>``: the names in index order), once.  MLflow,
    which cuts a parameter's value at 250 characters, gets one parameter per index
    (``<prefix>/layers/<side>/<index>``); TensorBoard, whose HParams view keeps the first
    session only (the model's) and whose ``hparams.yaml`` is written before, also gets it as
    text (``0: name, 1: name, ...``), and no ``hp_metric`` point."""
    params = {f"{prefix}/layers/{side}": list(map(str, values)) for side, values in names.items()}
    per_index = {f"{key}/{i}": name for key, values in params.items()
                 for i, name in enumerate(values)}
    for logger in loggers:
        try:
            if _kind(logger) == "mlflow":
                keys = mlflow_keys(logger, list(per_index))
                logger.log_hyperparams({keys[k]: v for k, v in per_index.items()})
                continue
            if _kind(logger) == "tensorboard":
                logger.log_hyperparams(params, metrics={})  # {}: no hp_metric point
                for key, values in params.items():
                    text = ", ".join(f"{i}: {name}" for i, name in enumerate(values))
                    logger.experiment.add_text(_named(logger, key), text, global_step=0)
                continue
            logger.log_hyperparams(params)
        except Exception as err:  # noqa: BLE001 - a logger without hyperparameters: nothing to do
            if _kind(logger) == "mlflow":  # a run resumed with other layers: its params stay
                warnings.warn(
                    f"MLflow refused the layer map {prefix}/layers/... ({err.__class__.__name__}: "
                    f"{str(err)[:200]}); MLflow keeps a parameter's first value, so in a run "
                    "resumed with other layers the map names the earlier layers: read the layer "
                    "names from the logged best_pair tags or the end-of-fit report",
                    UserWarning, stacklevel=2)


def pair_rows(flat: Mapping[str, Any], epoch: int, step: int) -> dict[str, list[list[Any]]]:
    """The W&B pair table's rows of one step, by measure label: epoch, step, model layer,
    reference layer, raw, calibrated, p (primitives, so that a checkpoint keeps them)."""
    return {label: [[int(epoch), int(step), str(xa), str(yb), float(r.matrix[a, b]),
                     float(r.pair_calibrated[a, b]), float(r.pair_p_value[a, b])]
                    for a, xa in enumerate(r.x_names) for b, yb in enumerate(r.y_names)]
            for label, r in flat.items()}


def keeps_tables(loggers: Sequence[Any]) -> bool:
    """Whether a logger takes the end-of-fit table of every pair (W&B)."""
    return any(_kind(logger) == "wandb" for logger in loggers)


def summary_of(key: str) -> str:
    """The W&B summary of a key: ``"min"`` for a p-value, else ``"max"``."""
    return "min" if key.endswith("/p_value") else "max"


def define_summaries(loggers: Sequence[Any], keys: Sequence[str]) -> None:
    """W&B run summary: the best calibrated score and raw score, the smallest p-value."""
    for logger in loggers:
        if _kind(logger) != "wandb":
            continue
        state = _wandb_state(logger)
        try:
            exp = logger.experiment
            for key in keys:  # a key's own definition: its axis too, or it would have none
                axis = _axis(state, key)
                exp.define_metric(_named(logger, key), summary=summary_of(key),
                                  step_metric=None if axis is None else _named(logger, axis))
                state["keys"].add(key)
        except Exception:  # noqa: BLE001 - a disabled run: nothing to configure
            pass


def write_summaries(loggers: Sequence[Any], best: Mapping[str, float]) -> None:
    """W&B run summary: ``best`` (key → the best value over the whole history) written as the
    summaries :func:`define_summaries` asks for (``{"max": v}``, p-values ``{"min": v}``).  W&B
    tracks them from the values this process logged, so a resumed run's summary covered the
    resumed part only."""
    for logger in loggers:
        if _kind(logger) != "wandb":
            continue
        try:
            summary = logger.experiment.summary
            for key, value in best.items():
                summary[_named(logger, key)] = {summary_of(key): value}
        except Exception:  # noqa: BLE001 - a disabled run: no summary
            pass


def log_curves(loggers: Sequence[Any], key: str, xs: Sequence[float],
               series: Mapping[str, Sequence[float]], title: str, xname: str) -> None:
    """W&B: one line chart of several series (raw, τ, calibrated) against the epoch."""
    for logger in loggers:
        if _kind(logger) != "wandb":
            continue
        import wandb

        chart = wandb.plot.line_series(xs=list(xs), ys=[list(v) for v in series.values()],
                                       keys=list(series), title=title, xname=xname)
        logger.experiment.log({_named(logger, key): chart}, commit=False)


def log_table(loggers: Sequence[Any], key: str, columns: list[str], rows: list[list[Any]],
              step: int | None = None) -> None:
    """W&B tables (other loggers have no table type)."""
    for logger in loggers:
        if _kind(logger) == "wandb":
            logger.log_table(key=key, columns=columns, data=rows, step=step)


def _wandb_files(logger: Any) -> str | None:
    """The folder of a W&B run's own files (``<save_dir>/wandb/<run>/files``), or None (also
    for a disabled run, whose folder is a temporary one outside ``save_dir``)."""
    if getattr(logger.experiment, "disabled", False):
        return None
    folder = getattr(logger.experiment, "dir", None)
    return folder if isinstance(folder, str) and folder else None


def save_files(loggers: Sequence[Any], paths: Sequence[str]) -> None:
    """Keep files (the end-of-fit report and its images) with the run: W&B run files (copied
    into the run's folder, so that an offline run holds the files themselves rather than links
    to another logger's, which ``wandb sync`` would follow to whatever is there by then),
    MLflow artifacts."""
    for logger in loggers:
        kind = _kind(logger)
        for path in paths:
            if kind == "wandb":
                run_files = _wandb_files(logger)
                if run_files is not None and os.path.dirname(os.path.abspath(path)) != \
                        os.path.abspath(run_files):
                    path = shutil.copy2(path, os.path.join(run_files, os.path.basename(path)))
                logger.experiment.save(path, base_path=os.path.dirname(path), policy="now")
            elif kind == "mlflow":
                logger.experiment.log_artifact(logger.run_id, path, "alignment_report")


def log_dir(loggers: Sequence[Any]) -> str | None:
    """Where files written next to the logs go: the first logger's directory (a W&B run's own
    folder: its ``save_dir`` is shared by every run, and a disabled run has none; None when no
    logger has one)."""
    for logger in loggers:
        folder = _wandb_files(logger) if _kind(logger) == "wandb" else (
            getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None))
        if folder:
            return str(folder)
    return None
