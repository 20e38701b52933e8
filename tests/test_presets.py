"""Presets: contents and provenance, explicit arguments override, unknown names, and that a
preset's arguments make an AlignmentCallback compute what the preset says (checked against the
NumPy reference measures)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from alignment_callback import AlignmentCallback
from alignment_callback.callback.presets import (
    PRESET_ARGUMENTS,
    PRESETS,
    UNSET,
    Preset,
    patch_mean,
    resolve_preset,
)
from alignment_callback.engine import AlignmentEngine
from alignment_callback.functional.preprocessing import pool_features
from tests import numpy_reference as ref
from tests.helpers import LAYERS, RefMLP, make_probe


def test_preset_contents():
    assert set(PRESETS) == {"prh", "repa"}
    assert dict(PRESETS["prh"].arguments) == {
        "measures": {"mutual_knn": {"k": 10}},
        "preprocess": {"clamp_quantile": 0.95, "normalize": True},
        "aggregate": "max",
    }
    assert dict(PRESETS["repa"].arguments) == {
        "measures": {"cknna": {"k": 10}},
        "pool": "mean",
        "preprocess": True,
    }
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.summary and preset.provenance
        assert set(preset.arguments) <= set(PRESET_ARGUMENTS)


def test_provenance_names_sources_and_unknowns():
    prh, repa = PRESETS["prh"], PRESETS["repa"]
    assert any("minyoungg/platonic-rep @ dcd76ba3c950c1b197a2ae8b1c6713535c94ecf9" in s
               for s in prh.sources)
    assert any("measure_alignment.py" in s and "metrics.py" in s for s in prh.sources)
    assert "0.95" in prh.provenance and "per layer" in prh.provenance
    assert any("sihyun-yu/REPA/issues/24" in s for s in repa.sources)
    assert any("67f714503e3892f993844aab088ffc5791c92613" in s for s in repa.sources)
    assert "no code for its CKNNA" in repa.provenance
    unknown = " ".join(repa.unknown)
    for what in ("k (10 assumed", "normalized", "layers", "probe"):
        assert what in unknown
    import alignment_callback.callback.presets as module

    for text in ("platonic-rep", "issues/24", "Unknown", "remove_outliers"):
        assert text in module.__doc__


def test_explicit_arguments_override():
    out = resolve_preset("prh", {"aggregate": "mean", "measures": ["cknna"], "pool": "cls"})
    assert out == {"measures": ["cknna"], "aggregate": "mean", "pool": "cls",
                   "preprocess": {"clamp_quantile": 0.95, "normalize": True}}
    # an explicit value replaces the preset's whole, nested options included
    out = resolve_preset("repa", {"measures": {"cknna": {"k": 5}, "mutual_knn": {}}})
    assert out["measures"] == {"cknna": {"k": 5}, "mutual_knn": {}}
    # explicit arguments a preset does not set pass through
    assert resolve_preset("repa", {"num_permutations": 50})["num_permutations"] == 50


def test_unset_and_no_preset():
    assert resolve_preset("repa", {"pool": UNSET, "aggregate": UNSET})["pool"] == "mean"
    assert "aggregate" not in resolve_preset("repa", {"aggregate": UNSET})
    assert resolve_preset(None, {"pool": "cls", "aggregate": UNSET}) == {"pool": "cls"}
    assert repr(UNSET) == "UNSET"


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'platonic'; the presets are: 'prh' "
                                         r"\(.*\), 'repa' \("):
        resolve_preset("platonic", {})
    with pytest.raises(ValueError, match="unknown preset 3"):
        resolve_preset(3, {})  # type: ignore[arg-type]


def test_presets_cannot_be_changed_through_results():
    out = resolve_preset("prh", {})
    out["measures"]["mutual_knn"]["k"] = 3
    out["preprocess"]["clamp_quantile"] = None
    assert PRESETS["prh"].arguments["measures"] == {"mutual_knn": {"k": 10}}
    assert PRESETS["prh"].arguments["preprocess"]["clamp_quantile"] == 0.95
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["prh"].name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        PRESETS["prh"].arguments["aggregate"] = "mean"  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["mine"] = PRESETS["prh"]  # type: ignore[index]
    with pytest.raises(TypeError):  # nested options too (they were plain dicts)
        PRESETS["prh"].arguments["measures"]["mutual_knn"]["k"] = 3  # type: ignore[index]
    assert resolve_preset("prh", {})["measures"] == {"mutual_knn": {"k": 10}}
    assert type(resolve_preset("prh", {})["measures"]["mutual_knn"]) is dict  # the caller's


def test_a_preset_sets_only_measurement_arguments():
    with pytest.raises(ValueError, match=r"arguments \['num_permutations'\] cannot be set"):
        Preset("x", "s", {"num_permutations": 10}, (), "p")


# ------------------------------------------------------------- what the callback then computes
def _features(seed, layers=3, n=80, d=12):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    # heavy-tailed entries so that the 0.95 clamp changes something
    return {f"l{i}": base @ torch.randn(d, d, generator=g) + torch.randn(n, d, generator=g) ** 3
            for i in range(layers)}


def _prh_rows(x: np.ndarray, q=0.95) -> np.ndarray:
    c = np.quantile(np.abs(x), q)  # per layer, linear interpolation
    x = np.clip(x, -c, c)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _engine(preset):
    """An engine with the preset's measurement arguments (pooling happens at capture)."""
    args = resolve_preset(preset, {})
    return AlignmentEngine(args["measures"], num_permutations=20,
                           aggregate=args.get("aggregate", "max"), preprocess=args["preprocess"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_callback_accepts_each_preset(name):
    cb = AlignmentCallback(RefMLP(), make_probe(), LAYERS, num_permutations=20,
                           **resolve_preset(name, {}))
    assert sorted(cb.measures) == sorted(PRESETS[name].arguments["measures"])


def test_prh_preset_is_max_over_pairs_of_mutual_knn_on_clamped_normalized_rows():
    engine = _engine("prh")
    xs, ys = _features(0), _features(1)
    engine.set_reference(ys)
    result = engine.step(xs, epoch=1).results["mutual_knn"]
    scores = np.array([[ref.mutual_knn(_prh_rows(x.double().numpy()),
                                       _prh_rows(y.double().numpy()), k=10)
                        for y in ys.values()] for x in xs.values()])
    np.testing.assert_allclose(result.matrix.double().numpy(), scores, atol=1e-6)  # float32
    assert float(result.raw) == pytest.approx(scores.max(), abs=1e-6)


def test_repa_preset_is_cknna_on_patch_means():
    g = torch.Generator().manual_seed(2)
    tokens_x, tokens_y = torch.randn(60, 16, 8, generator=g), torch.randn(60, 16, 6, generator=g)
    tokens_y = tokens_y + tokens_x[..., :6]  # related
    pool = resolve_preset("repa", {})["pool"]
    pooled_x, pooled_y = pool_features(tokens_x, pool), pool_features(tokens_y, pool)
    torch.testing.assert_close(pooled_x, tokens_x.mean(1))  # the patch average
    engine = _engine("repa")
    engine.set_reference({"r": pooled_y})
    result = engine.step({"m": pooled_x}, epoch=1).results["cknna"]
    unit = [p.double().numpy() / np.linalg.norm(p.double().numpy(), axis=1, keepdims=True)
            for p in (pooled_x, pooled_y)]
    assert float(result.raw) == pytest.approx(ref.cknna(*unit, k=10), abs=1e-6)  # float32


def test_patch_mean():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    torch.testing.assert_close(patch_mean(1)(x), x[:, 1:].mean(1))
    torch.testing.assert_close(patch_mean(0)(x), x.mean(1))
    assert patch_mean(5).__name__ == "patch_mean(5)"
    with pytest.raises(ValueError, match="more than 5 tokens"):
        patch_mean(5)(x)
    with pytest.raises(ValueError, match="patch_mean: prefix_tokens must be"):
        patch_mean(-1)
    for bad in (True, 1.0, "1"):
        with pytest.raises(ValueError, match="patch_mean: prefix_tokens must be"):
            patch_mean(bad)
    for integer in (np.int64(1), torch.tensor(1).item(), np.uint8(1)):  # any integer type
        torch.testing.assert_close(patch_mean(integer)(x), x[:, 1:].mean(1))
        assert patch_mean(integer).__name__ == "patch_mean(1)"
