"""Library measures vs the shared reference values (shared/reference/prh_reference.{json,npz}).

Each entry holds `exact` (the definitions of docs/measures.md in float64 NumPy) and `prh_value` (the public
code of The Platonic Representation Hypothesis, run as published). We must match `exact` to 1e-6
relative and `prh_value` to 1e-2 relative (the published code adds 1e-6 to the denominators of
unbiased CKA and CKNNA).

The directory is found at $ALIGNMENT_REFERENCE_DIR, else at <clone>/../shared/reference. It is
part of the CI checkout: a missing directory is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import alignment_callback.functional as F

_DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


def reference_dir() -> Path:
    env = os.environ.get("ALIGNMENT_REFERENCE_DIR")
    return Path(env).expanduser().resolve() if env else _DEFAULT_DIR


def _missing_message(d: Path) -> str:
    return (
        f"reference values not found: expected prh_reference.json and prh_reference.npz in {d}. "
        "Check out the shared/ directory beside the clone, or set ALIGNMENT_REFERENCE_DIR to "
        "the directory that holds them."
    )


def _load_entries():
    d = reference_dir()
    jpath, npath = d / "prh_reference.json", d / "prh_reference.npz"
    if not (jpath.is_file() and npath.is_file()):
        return None
    with open(jpath) as fh:
        return json.load(fh)


_ENTRIES = _load_entries()


def _entry_id(e: dict) -> str:
    kw = "".join(f"-{k}={v}" for k, v in sorted(e["kwargs"].items()))
    return f"{e['case']}-{e['metric']}{kw}"


if _ENTRIES is None:
    _PARAMS = [pytest.param(None, id="reference-dir-missing")]
else:
    _PARAMS = [pytest.param(e, id=_entry_id(e)) for e in _ENTRIES]


@pytest.fixture(scope="module")
def arrays():
    d = reference_dir()
    if _ENTRIES is None:
        pytest.fail(_missing_message(d), pytrace=False)
    with np.load(d / "prh_reference.npz") as z:
        return {k: z[k] for k in z.files}


def _compute(entry: dict, arrays: dict) -> float:
    x = torch.from_numpy(arrays[entry["case"] + "__x"])
    y = torch.from_numpy(arrays[entry["case"] + "__y"])
    out = getattr(F, entry["metric"])(x, y, **entry["kwargs"])
    assert out.dim() == 0 and out.dtype == torch.float64
    return out.item()


def test_reference_files_present_and_complete(arrays):
    assert _ENTRIES, "prh_reference.json holds no entries"
    for e in _ENTRIES:
        assert {"case", "metric", "kwargs", "exact", "prh_value"} <= set(e), e
        assert e["case"] + "__x" in arrays and e["case"] + "__y" in arrays, e["case"]
        assert hasattr(F, e["metric"]), f"alignment_callback.functional has no {e['metric']}"


@pytest.mark.parametrize("entry", _PARAMS)
def test_matches_exact(entry, arrays):
    got = _compute(entry, arrays)
    assert got == pytest.approx(entry["exact"], rel=1e-6, abs=1e-9), _entry_id(entry)


@pytest.mark.parametrize("entry", _PARAMS)
def test_close_to_prh_value(entry, arrays):
    got = _compute(entry, arrays)
    assert got == pytest.approx(entry["prh_value"], rel=1e-2, abs=1e-4), _entry_id(entry)
