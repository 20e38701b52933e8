"""The resumable record of a ``matrix`` run: one JSON line per finished pair.

A single process appends to ``--out/pairs.jsonl``; under ``torchrun`` process ``r`` appends to
``--out/pairs.rank{r}.jsonl`` (no two processes ever write one file).  Every line is flushed and
fsynced before the next pair starts.  Reading takes the valid lines of *every* such file, so a
rerun with another number of processes reuses all finished pairs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from alignment_callback.reporting.plan import resume_key

PAIRS_FILE = "pairs.jsonl"
_PAIRS_NAME = re.compile(r"pairs(?:\.rank(\d+))?\.jsonl")

Done = dict[tuple[str, str], dict[str, dict]]


def pairs_file(out: str | Path, rank: int | None = None) -> Path:
    """``out/pairs.jsonl``, or ``out/pairs.rank{rank}.jsonl`` for a process of a group."""
    return Path(out) / (PAIRS_FILE if rank is None else f"pairs.rank{rank}.jsonl")


def pair_files(out: str | Path) -> list[Path]:
    """Every pairs file in ``out``: ``pairs.jsonl`` first, then the rank files by rank."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(p, _PAIRS_NAME.fullmatch(p.name)) for p in out.iterdir() if p.is_file()]
    ranked = [(-1 if m.group(1) is None else int(m.group(1)), p) for p, m in found if m]
    return [p for _, p in sorted(ranked)]


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line and make it durable (flush + fsync).

    A previous line cut short by a crash is ended first, so the new line stays readable.
    """
    line = json.dumps(record, allow_nan=False) + "\n"
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a crash: start a fresh line
                prefix = "\n"
    with open(path, "a") as f:
        f.write(prefix + line)
        f.flush()
        os.fsync(f.fileno())


def _normalized(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def merge_line(done: Done, rec: dict, settings: dict, kwargs: dict[str, dict],
               fingerprints: dict[str, list[int]]) -> None:
    """Add the results of one line to ``done`` if they are valid for these settings (equal
    :func:`~alignment_callback.reporting.plan.resume_key`: with ``--null moments`` the line's
    ``permutations`` and ``seed`` may differ, as they change no result).

    ``settings`` and ``kwargs`` must be JSON-normalized (as read back from a line).
    """
    stored = rec.get("settings")
    if not isinstance(stored, dict) or resume_key(stored) != resume_key(settings):
        return
    xf, yf = rec["x_file"], rec["y_file"]
    if (fingerprints.get(xf) != rec["x_fingerprint"]
            or fingerprints.get(yf) != rec["y_fingerprint"]):
        return
    for measure, res in rec["results"].items():
        if measure in kwargs and res.get("kwargs") == kwargs[measure]:
            done.setdefault((xf, yf), {})[measure] = res


def read_pairs(paths: Path | Iterable[Path], settings: dict, kwargs: dict[str, dict],
               fingerprints: dict[str, list[int]]) -> Done:
    """Results valid for these settings: ``{(x_file, y_file): {measure: record}}``.

    A line counts if its settings match ``settings`` (:func:`merge_line`), both files still
    have the recorded fingerprint (size, mtime), and per measure the measure's options match;
    later lines (and later files) win.  Malformed lines (e.g. cut by a crash) are skipped.

    Parameters
    ----------
    paths : Path or iterable of Path
        One pairs file or several (see :func:`pair_files`); missing files are skipped.
    settings : dict
    kwargs : dict measure -> options
    fingerprints : dict file -> [size, mtime_ns]
    """
    done: Done = {}
    settings, kwargs = _normalized(settings), _normalized(kwargs)
    for path in [paths] if isinstance(paths, Path) else list(paths):
        if not path.exists():
            continue
        with open(path) as f:
            for line in f:
                try:
                    merge_line(done, json.loads(line), settings, kwargs, fingerprints)
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
    return done


def merge_records(done: Done, lines: Iterable[dict], settings: dict, kwargs: dict[str, dict],
                  fingerprints: dict[str, list[int]]) -> Done:
    """Add lines received from other processes (not read from disk) to ``done``."""
    settings, kwargs = _normalized(settings), _normalized(kwargs)
    for rec in lines:
        merge_line(done, _normalized(rec), settings, kwargs, fingerprints)
    return done


__all__ = [
    "PAIRS_FILE",
    "append_line",
    "merge_records",
    "pair_files",
    "pairs_file",
    "read_pairs",
]
