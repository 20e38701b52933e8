"""``alignment-callback``: calibrated alignment of saved features, from the command line.

``compare A B``        one feature file against another (all layers of A × all layers of B,
                       aggregation-aware calibration, docs/calibration.md).
``matrix DIR_X DIR_Y`` every file of DIR_X against every file of DIR_Y (PRH's model-pair matrix),
                       with Benjamini–Hochberg adjusted p-values across pairs and a report;
                       resumable; sharded over processes under ``torchrun``.
``extract``            a model's probe activations to a feature file (with the probe's
                       fingerprint).

Exit codes: 0 success, 2 bad input (one ``error: ...`` line on stderr), 130 interrupted,
1 unexpected internal error.  ``--debug`` shows tracebacks (above that line; the exit code stays
the same).  See ``docs/cli.md``.

The work is split by what it is about: :mod:`.plan` (measures, options, settings, pairs, what
is done), :mod:`.compute` (pairs through the engine), :mod:`.store` (``pairs*.jsonl``),
:mod:`.write` (files and console), :mod:`.distributed` (``torchrun``), :mod:`.extract` and
:mod:`.io` (feature files).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from alignment_callback.reporting import compute, store, write
from alignment_callback.reporting.distributed import (
    DEFAULT_TIMEOUT_S,
    GroupFailure,
    Outcome,
    ProcessGroup,
    first_failure,
)
from alignment_callback.reporting.plan import (
    DEFAULT_MEASURES,
    CLIError,
    check_args,
    choose_measures,
    deprecation_note,
    describe_settings,
    ignored_shorthand_note,
    measure_names_text,
    moments_layers,
    out_folder,
    parameters_text,
    plan_matrix,
    run_settings,
    shard,
    shorthand_help,
    topk_note,
    warn_bootstrap,
    warn_resolution,
)

#: Kept for callers of the earlier name.
DEFAULT_METRICS = DEFAULT_MEASURES

EPILOG = """\
saving features (one file per model; rows = the same probe inputs, in the same order):

  alignment-callback extract --model my_models:make_model --probe probe.pt \\
      --layers 'encoder.layer.*' --out model_a.pt
  # or in Python:
  import torch
  from alignment_callback import collect_activations
  feats = collect_activations(model, probe_loader, layers="encoder.layer.*", pool="mean")
  torch.save(feats, "model_a.pt")        # {layer name: (n, d) tensor}

accepted files: .pt/.pth (a tensor, a {layer: tensor} dict or a list of tensors; read with
torch.load(weights_only=True)), .npy (one array), .npz (one array per layer), .safetensors
(one tensor per layer). 3-D+ activations are pooled with --pool.

exit codes: 0 ok, 2 bad input, 130 interrupted (matrix: finished pairs are kept), 1 internal
error. Documentation: docs/cli.md
"""


# --------------------------------------------------------------------------------- arguments
def _sigma(text: str) -> float | str:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'median', got {text!r}")
    return value


def _aggregate(text: str) -> str:
    if text in ("max", "mean") or re.fullmatch(r"top[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(f"expected max, mean or top<m> (e.g. top3), got {text!r}")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("calibration")
    g.add_argument("--measure", action="append", metavar="M",
                   help="measure (repeatable or comma-separated; default: "
                        f"{' '.join(DEFAULT_MEASURES)}); one of: {measure_names_text()}")
    g.add_argument("--metric", action="append", metavar="M",
                   help="deprecated alias of --measure")
    g.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a measure parameter, checked by its declaration and applied to every "
                        "chosen measure that declares it (repeatable), e.g. --option alpha=0.5, "
                        f"--option folds=3. Parameters: {parameters_text()}")
    g.add_argument("--k", type=int, default=None, help=shorthand_help("k", "K"))
    g.add_argument("--sigma", type=_sigma, default=None, metavar="SIGMA",
                   help=shorthand_help("sigma", "SIGMA") + "; a number or 'median'")
    g.add_argument("--permutations", type=int, default=500, metavar="K",
                   help="permutations K (default 500)")
    g.add_argument("--null", choices=("permutation", "moments", "auto"), default="permutation",
                   help="the null: K permutations (default), the exact permutation moments with "
                        "a Pearson III distribution (gram-family measures on one layer pair), or "
                        "moments where validated and permutations elsewhere")
    g.add_argument("--alpha", type=float, default=0.05,
                   help="level of the threshold tau and of the BH FDR (default 0.05)")
    g.add_argument("--aggregate", type=_aggregate, default="max",
                   help="aggregate over layer pairs: max (default), mean or top<m> (the mean of "
                        "the m largest; an m above the number of layer pairs is clamped to it)")
    g.add_argument("--seed", type=int, default=0, help="permutation seed (default 0)")
    g.add_argument("--groups", metavar="FILE",
                   help="group labels, one per row (.npy/.txt/.csv): rows of a group are "
                        "permuted together (several captions per image, frames of a video)")
    g.add_argument("--bootstrap", type=int, default=0, metavar="B",
                   help="approximate 95%% interval of the calibrated score from B subsamples of "
                        "80%% of the rows without replacement (default 0: off; else B >= 2, "
                        "and below 40 a warning; costs B calibrations)")
    p = common.add_argument_group("features")
    p.add_argument("--pool", choices=("mean", "cls", "last", "flatten"), default="mean",
                   help="pooling of 3-D+ activations (default mean: over dimension 1 of (n, T, d), "
                        "over dimensions 2 and up of (n, C, H, W)); 2-D ones are used as is")
    p.add_argument("--clamp-quantile", type=float, default=None, metavar="Q",
                   help="clamp |x| at its Q-quantile (PRH: 0.95; default off)")
    p.add_argument("--no-normalize", action="store_true",
                   help="do not L2-normalize rows (default: normalize, PRH convention)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    o = common.add_argument_group("output")
    o.add_argument("--out", default="alignment_out", metavar="DIR",
                   help="output folder (default ./alignment_out)")
    o.add_argument("--debug", action="store_true", help="show tracebacks")
    return common


def _extract_parser(sub: Any, fmt: Any) -> None:
    ex = sub.add_parser(
        "extract", formatter_class=fmt,
        help="save a model's probe activations to a feature file",
        description="Run a model over the probe and save {layer: (n, d)} activations to a "
                    "feature file that compare/matrix read, with a fingerprint of the probe "
                    "(rows and sha256) under the reserved key '__probe__'.",
    )
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="MODULE:FACTORY",
                     help="an importable function or class returning the nn.Module (called with "
                          "no arguments or --model-kwargs; --checkpoint then loads a state dict)")
    src.add_argument("--lightning-class", metavar="MODULE:CLASS",
                     help="a LightningModule class, loaded with load_from_checkpoint(--checkpoint)")
    ex.add_argument("--checkpoint", metavar="CKPT",
                    help="Lightning checkpoint or state dict (.ckpt/.pt)")
    ex.add_argument("--model-kwargs", metavar="JSON",
                    help="keyword arguments of the factory (or of load_from_checkpoint) as a "
                         "JSON object")
    ex.add_argument("--probe", required=True, metavar="PROBE.pt",
                    help="the probe inputs: a tensor, a tuple or dict batch, or a list of "
                         "batches (.pt, read with weights_only=True)")
    ex.add_argument("--layers", required=True, action="append", nargs="+", metavar="PATTERN",
                    help="layer names, globs ('encoder.layer.*') or regexes (repeatable)")
    ex.add_argument("--out", required=True, metavar="FEATS.pt",
                    help="feature file to write (.pt, .pth or .safetensors)")
    ex.add_argument("--pool", choices=("mean", "cls", "first", "last", "flatten"),
                    default="mean", help="pooling of 3-D+ outputs at capture time (default mean)")
    ex.add_argument("--batch-size", type=int, default=256, help="rows per forward pass "
                    "(default 256)")
    ex.add_argument("--input-key", metavar="KEY",
                    help="for dict probes: call model(batch[KEY]) instead of model(**batch)")
    ex.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    ex.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The ``alignment-callback`` argument parser."""
    from alignment_callback import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="alignment-callback",
        description="Permutation-calibrated representational alignment of saved features.",
        epilog=EPILOG, formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{compare,matrix,extract}")
    common = _common_options()
    compare = sub.add_parser(
        "compare", parents=[common], formatter_class=fmt, epilog=EPILOG,
        help="calibrated alignment of two feature files",
        description="Calibrated alignment of feature file A against feature file B: all layers "
                    "of A x all layers of B, aggregated (max by default) and calibrated "
                    "aggregation-aware. Writes alignment.json, alignment.csv and "
                    "heatmap_<measure>.png to --out.",
    )
    compare.add_argument("a", help="feature file of model A")
    compare.add_argument("b", help="feature file of model B")
    matrix = sub.add_parser(
        "matrix", parents=[common], formatter_class=fmt, epilog=EPILOG,
        help="every feature file of DIR_X against every file of DIR_Y",
        description="Model-pair matrix: every feature file of DIR_X against every feature file "
                    "of DIR_Y, with Benjamini-Hochberg adjusted p-values across all pairs (per "
                    "measure). Resumable: finished pairs are appended to --out/pairs.jsonl and "
                    "skipped on a rerun with the same settings. Writes matrix.json, matrix.csv, "
                    "matrix_<measure>.png, report.md and report.html. Under torchrun "
                    "(torchrun --nproc-per-node N -m alignment_callback matrix ...) the pairs "
                    "are shared among the processes.",
    )
    matrix.add_argument("dir_x", help="folder of feature files (rows of the matrix)")
    matrix.add_argument("dir_y", help="folder of feature files (columns of the matrix)")
    matrix.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        metavar="SECONDS",
                        help="under torchrun: how long a process waits for the others at the "
                             "end (default 7 days; > 0 and at most 1e9)")
    _extract_parser(sub, fmt)
    return parser


def _note_deprecations(args: argparse.Namespace) -> None:
    """The notes on how the command line was written, after the outputs."""
    for note in (ignored_shorthand_note(args), deprecation_note(args)):
        if note:
            print(note, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- compare
def run_compare(args: argparse.Namespace) -> int:
    """``compare A B``: load both files, one engine step for every measure, write."""
    from alignment_callback.reporting.io import load_groups

    measures = choose_measures(args)
    check_args(args, measures)
    if _world_size() > 1:
        raise CLIError("compare runs in one process; launch it without torchrun (WORLD_SIZE > 1)")
    groups = load_groups(args.groups) if args.groups else None
    loader = compute.FeatureLoader(args, measures, groups)
    xa = loader.load(args.a)
    xb = loader.load(args.b, check_rows=False)
    na, nb = (int(next(iter(x.values())).shape[0]) for x in (xa, xb))
    if na != nb:
        raise CLIError(
            f"row mismatch: {args.a} has {na} rows but {args.b} has {nb}; both files must hold "
            "the same probe inputs in the same order"
        )
    moments_layers(args.null, (len(xa), len(xb)), (args.a, args.b))
    note = topk_note(args.aggregate, len(xa) * len(xb))
    if note is not None:
        print(f"note: {note}", file=sys.stderr, flush=True)
    warn_resolution(args.permutations, 1, args.alpha, args.null)
    warn_bootstrap(args.bootstrap)
    out = out_folder(args.out)
    start = time.perf_counter()
    results = compute.compare_pair(xa, xb, args.a, args.b, measures,
                                   compute.Calibration.from_args(args), groups,
                                   warn=write.warn_line)
    write.write_compare(out, args, xa, xb, results, describe_settings(args, measures, groups),
                        time.perf_counter() - start, groups is not None)
    _note_deprecations(args)
    return 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# ---------------------------------------------------------------------------------- matrix
class _Interrupted(Exception):
    def __init__(self, finished: int) -> None:
        super().__init__("interrupted")
        self.finished = finished


def _plan_pairs(args: argparse.Namespace, measures: dict, group: ProcessGroup
                ) -> tuple[Any, Any, list]:
    """Plan: the pairs, those already stored (a resumed run), the pending ones.  Returns
    ``(plan, groups, pending tasks)``."""
    from alignment_callback.reporting.io import load_groups

    groups = load_groups(args.groups) if args.groups else None
    plan = plan_matrix(args, measures, groups)
    out = out_folder(args.out)
    plan.done = store.read_pairs(store.pair_files(out), plan.settings, plan.kwargs,
                                 plan.fingerprints)
    tasks = plan.pending()
    if group.rank == 0:
        own = store.pairs_file(out, group.rank if group.active else None)
        warn_resolution(args.permutations, plan.tested_pairs, args.alpha, args.null)
        warn_bootstrap(args.bootstrap)
        read = [p for p in store.pair_files(out) if p != own]
        write.matrix_intro(plan, tasks, own if not group.active and not read
                           else f"{out}/pairs*.jsonl", group.world_size)
    return plan, groups, tasks


def _compute_share(args: argparse.Namespace, measures: dict, plan: Any, groups: Any,
                   tasks: list, group: ProcessGroup, lines: list[dict]) -> None:
    """Compute this process's share of the pending ``tasks`` (the same list on every
    process), appending each pair to its pairs file (and to ``lines``)."""
    import torch

    total = len(plan.pairs)
    own = store.pairs_file(Path(args.out), group.rank if group.active else None)
    mine = shard(tasks, group.rank, group.world_size)
    device = args.device
    if device == "cuda" and group.active:
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    loader = compute.FeatureLoader(args, measures, groups, device=device)
    cal = compute.Calibration.from_args(args)
    compute.check_first_pair(mine, plan, loader, cal)  # before the progress bar
    progress = write.Progress(len(mine), enabled=group.rank == 0)
    try:
        for task, line in compute.iter_pairs(mine, plan, loader, cal, groups,
                                             warn=lambda t: progress.write(f"warning: {t}"),
                                             note=lambda t: progress.write(f"note: {t}")):
            store.append_line(own, line)
            lines.append(line)
            progress.update(f"{plan.names_x[task.i]} vs {plan.names_y[task.j]}")
    except KeyboardInterrupt:
        progress.close()
        finished = total - len(tasks) + len(lines)
        if not group.active:
            write.interrupted_line(finished, total, len(lines), own)
        raise _Interrupted(finished) from None
    finally:
        progress.close()


def _outcome(group: ProcessGroup, err: BaseException, debug: bool) -> Outcome:
    if debug:
        traceback.print_exc()
    if isinstance(err, (_Interrupted, KeyboardInterrupt)):
        return Outcome(group.rank, 130, "interrupted; finished pairs are saved, rerun the same "
                       "command to resume")
    if isinstance(err, GroupFailure):
        return Outcome(group.rank, err.code, err.message)
    if isinstance(err, _BAD_INPUT):
        return Outcome(group.rank, 2, _error_text(err))
    return Outcome(group.rank, 1, f"internal error ({type(err).__name__}: {_one_line(err)}); "
                   "rerun with --debug for the traceback")


def _agree(group: ProcessGroup, outcome: Outcome) -> list[Outcome]:
    """Every process's outcome; raise the first failure on every process."""
    outcomes = group.all_gather(outcome)
    failed = first_failure(outcomes)
    if failed is not None:
        prefix = f"rank {failed.rank}: " if failed.code != 130 else ""
        failure = GroupFailure(failed.code, prefix + failed.message, printed=True)
        sys.stderr.write(failure.line + "\n")  # one write: lines of processes do not mix
        sys.stderr.flush()
        group.barrier()  # every process has printed before any exits (torchrun then stops all)
        raise failure
    return outcomes


def _write_outputs(args: argparse.Namespace, plan: Any, groups: Any,
                   received: list[dict]) -> None:
    out = Path(args.out)
    files = store.pair_files(out)
    plan.done = store.read_pairs(files, plan.settings, plan.kwargs, plan.fingerprints)
    store.merge_records(plan.done, received, plan.settings, plan.kwargs, plan.fingerprints)
    if not plan.is_complete():
        missing = len(plan.pending())
        raise RuntimeError(f"{missing} pair(s) are still missing after the run")
    summary = compute.matrix_summary(plan, args.alpha)
    settings = {**describe_settings(args, plan.measures, groups)}
    write.write_matrix(out, args, plan, summary, settings, files, groups is not None)


def run_matrix(args: argparse.Namespace) -> int:
    """``matrix DIR_X DIR_Y``: plan, compute the pending pairs (this process's share), store
    them, and (rank 0) write the summary of every pair."""
    measures = choose_measures(args)
    check_args(args, measures)
    group = ProcessGroup.from_env(args.dist_timeout)
    try:
        if not group.active:
            lines: list[dict] = []
            plan, groups, tasks = _plan_pairs(args, measures, group)
            try:
                _compute_share(args, measures, plan, groups, tasks, group, lines)
            except _Interrupted:
                return 130
            _write_outputs(args, plan, groups, lines)
            _note_deprecations(args)
            return 0
        return _run_group(args, measures, group)
    finally:
        group.close()


def _run_group(args: argparse.Namespace, measures: dict, group: ProcessGroup) -> int:
    lines: list[dict] = []
    plan = groups = None
    try:
        plan, groups, tasks = _plan_pairs(args, measures, group)
        outcome = Outcome(group.rank, tasks=tasks)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - gathered, then re-raised
        outcome = _outcome(group, err, args.debug)
    # no process appends a pair before every process has read the stored ones, and all share
    # rank 0's pending list: a resumed run's shards are the same everywhere
    tasks = _agree(group, outcome)[0].tasks
    try:
        _compute_share(args, measures, plan, groups, tasks, group, lines)
        outcome = Outcome(group.rank, finished=len(lines), lines=lines)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - gathered, then re-raised
        outcome = _outcome(group, err, args.debug)
    outcomes = _agree(group, outcome)  # every process reaches this collective
    outcome = Outcome(group.rank)
    if group.rank == 0:
        try:
            received = [line for o in outcomes for line in (o.lines or [])]
            _write_outputs(args, plan, groups, received)
            _note_deprecations(args)
        except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001
            outcome = _outcome(group, err, args.debug)
    _agree(group, outcome)
    return 0


# -------------------------------------------------------------------------------- entry point
def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


#: Errors that are bad input (exit code 2): FeatureFileError is a ValueError, and a MemoryError
#: is the library's refusal, before allocating, of what would not fit
_BAD_INPUT = (ValueError, TypeError, OSError, MemoryError)


def _error_text(err: BaseException) -> str:
    """The one line of a bad-input error, in the command line's words."""
    text = _one_line(err)
    if text.startswith("num_permutations="):  # the library's name of --permutations
        text = "--permutations " + text[len("num_permutations="):]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 130 interrupted, 141
    stdout closed by its reader, 1 bug).

    With ``--debug`` the traceback is printed above the ``error:`` line; the exit code is the
    same."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        if args.command == "compare":
            return run_compare(args)
        if args.command == "extract":
            from alignment_callback.reporting.extract import run_extract

            return run_extract(args)
        return run_matrix(args)
    except GroupFailure as err:  # the same on every process of a torchrun group
        if not err.printed:
            print(err.line, file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        _traceback(args.debug)
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed by its reader (`... | head -1`): stop quietly
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a tool killed by the signal
    except _BAD_INPUT as err:
        _traceback(args.debug)
        print(f"error: {_error_text(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything else is a bug: one line, exit 1
        _traceback(args.debug)
        hint = "" if args.debug else "; rerun with --debug for the traceback"
        print(f"error: internal error ({type(err).__name__}: {_one_line(err)}){hint}",
              file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at the null device, so that flushing it at exit raises no second
    ``BrokenPipeError`` (the recipe of Python's ``signal`` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stdout)
        pass


def _traceback(debug: bool) -> None:
    """``--debug``: print the traceback of the exception being handled (to stderr)."""
    if debug:
        traceback.print_exc()
        sys.stderr.flush()


__all__ = ["DEFAULT_MEASURES", "DEFAULT_METRICS", "CLIError", "build_parser", "main",
           "run_compare", "run_matrix", "run_settings"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
