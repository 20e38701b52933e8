"""plot_scores on a callback history with steps that have no result for the plotted reference,
and feature extraction that must not write a file claiming more of the probe than it holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignment_callback.hooks import collect_activations
from alignment_callback.hooks.extract import check_fingerprint, extract_features
from alignment_callback.metrics.plotting import plot_scores


def _history():
    """Two references; "prev" (reference="previous") has no result at the first step."""
    out = []
    for epoch in range(3):
        h = {"epoch": epoch, "step": 4 * epoch}
        for ref in ("teacher",) + (("prev",) if epoch else ()):
            for field, value in (("raw", 0.5 + 0.1 * epoch), ("calibrated", 0.3),
                                 ("threshold", 0.2), ("p_value", 0.01)):
                h[f"alignment/{ref}/linear_cka/{field}"] = value
        out.append(h)
    return out


def test_plot_scores_skips_steps_without_a_result():
    pytest.importorskip("matplotlib")
    history = _history()
    fig, ax = plot_scores(history, measure="linear_cka", prefix="alignment/prev")
    (raw,) = [line for line in ax.get_lines() if line.get_label() == "raw"]
    assert list(raw.get_xdata()) == [1, 2]  # the epochs that have a "prev" result
    _, ax = plot_scores(history, measure="linear_cka", prefix="alignment/prev",
                        steps=[h["step"] for h in history])  # steps given for every entry
    (raw,) = [line for line in ax.get_lines() if line.get_label() == "raw"]
    assert list(raw.get_xdata()) == [4, 8]
    _, ax = plot_scores(history, measure="linear_cka", prefix="alignment/teacher")
    (raw,) = [line for line in ax.get_lines() if line.get_label() == "raw"]
    assert list(raw.get_xdata()) == [0, 1, 2]


def test_a_partial_extraction_is_not_saved_under_the_whole_probes_fingerprint(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    probe = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="30 of the probe's 100 rows"):
        extract_features(model, probe, ["0"], batch_size=10, max_batches=3,
                         path=tmp_path / "f.pt")
    assert not (tmp_path / "f.pt").exists()
    extract_features(model, probe, ["0"], batch_size=10, path=tmp_path / "f.pt")
    assert check_fingerprint(tmp_path / "f.pt", probe)


def test_an_input_key_missing_from_the_batches_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 8))
    probe = [{"x": torch.randn(5, 4)}]
    with pytest.raises(ValueError, match=r"input_key='y' is not a key .*\['x'\]"):
        collect_activations(model, probe, ["0"], input_key="y")


def test_the_fingerprint_of_a_dict_batch_with_a_text_column_ignores_the_batching():
    """A DataLoader collates a text field into a list of strings per batch: the list indices
    were part of the hashed path, so the same rows batched otherwise were "another probe"."""
    from torch.utils.data import DataLoader

    from alignment_callback.hooks.extract import probe_fingerprint

    x = torch.arange(32.0).reshape(8, 4)
    texts = [f"sample {i}" for i in range(8)]
    whole = {"x": x, "text": texts}
    batched = [{"x": x[i:i + 4], "text": texts[i:i + 4]} for i in (0, 4)]
    rows = [{"x": x[i], "text": texts[i]} for i in range(8)]
    loader = DataLoader(rows, batch_size=3)  # default_collate: "text" becomes a list
    assert probe_fingerprint(whole) == probe_fingerprint(batched) == probe_fingerprint(loader)
    assert probe_fingerprint(whole) != probe_fingerprint({"x": x, "text": texts[::-1]})


def test_feature_files_of_the_earlier_fingerprint_scheme_still_match(tmp_path):
    """Files written before text columns were read as columns hashed each list index as its
    own stream: the same probe, batched the same way, still matches them."""
    from alignment_callback.hooks.extract import _fingerprint, save_features

    x = torch.arange(32.0).reshape(8, 4)
    texts = [f"sample {i}" for i in range(8)]
    batched = [{"x": x[i:i + 4], "text": texts[i:i + 4]} for i in (0, 4)]
    old = _fingerprint(batched, columns=False)
    assert old != _fingerprint(batched)  # the schemes differ on such probes
    path = save_features({"h": torch.zeros(8, 2)}, tmp_path / "old.pt", old)
    assert check_fingerprint(path, batched)
    with pytest.raises(ValueError, match="another probe"):
        check_fingerprint(path, [{"x": x[i:i + 4], "text": texts[::-1][i:i + 4]} for i in (0, 4)])
