"""Feature files and fingerprints, from an audit of the capture layer: a dict probe with a
broadcast ``(1, ...)`` entry whose key sorts first counted 1 row per batch (saving its features
was refused: "the features hold 20 of the probe's 2 rows"); a scalar entry of a dict batch made
the fingerprint depend on the batching; ``read_fingerprint`` raised raw reader errors; a
truncated legacy ``.pt`` file was said to hold pickled objects; ``save_features`` wrote a
slice's whole storage (``.pt``) or refused tensors sharing memory (``.safetensors``); a nested
namedtuple's fields, which are not searched, were reported as "nested" with no tensor."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from alignment_callback.hooks import LayerOutputError, collect_activations
from alignment_callback.hooks.extract import (
    _fingerprint,
    check_fingerprint,
    extract_features,
    probe_fingerprint,
    read_fingerprint,
    save_features,
)
from alignment_callback.hooks.feature_files import FeatureFileError, load_features


class Conditioned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, cond):  # cond: (1, 4), broadcast over the batch's rows
        return self.lin(x + cond)


def test_a_broadcast_entry_sorting_first_does_not_set_the_row_count(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(20, 4, generator=g), torch.randn(1, 4, generator=g)
    probe = [{"x": x[:10], "cond": cond}, {"x": x[10:], "cond": cond}]
    assert probe_fingerprint(probe)["rows"] == 20 == probe_fingerprint(x)["rows"]
    model = Conditioned()
    feats = extract_features(model, probe, "lin", path=tmp_path / "f.pt")
    torch.testing.assert_close(feats["lin"], model.lin(x + cond), rtol=0, atol=1e-6)
    assert check_fingerprint(tmp_path / "f.pt", probe)


@pytest.mark.parametrize("scalar", [0.5, torch.tensor(0.5)], ids=["number", "0-dim tensor"])
def test_a_constant_scalar_entry_does_not_tie_the_fingerprint_to_the_batching(tmp_path, scalar):
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    by_4 = [{"x": b, "t": scalar} for b in x.split(4)]
    by_6 = [{"x": b, "t": scalar} for b in x.split(6)]
    assert probe_fingerprint(by_4) == probe_fingerprint(by_6)
    assert probe_fingerprint(by_4) != probe_fingerprint([{"x": b, "t": 0.25} for b in x.split(4)])
    # a file stamped by the earlier scheme (the scalar hashed in every batch) still checks
    save_features({"a": x}, tmp_path / "old.pt", _fingerprint(by_4, repeat_scalars=True))
    assert check_fingerprint(tmp_path / "old.pt", by_4)
    with pytest.raises(ValueError, match="made from another probe"):
        check_fingerprint(tmp_path / "old.pt", by_6)  # that scheme depended on the batching


@pytest.mark.parametrize("name,content", [
    ("empty.pt", b""), ("garbage.pt", b"not a torch file at all"),
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......}")])
def test_read_fingerprint_of_an_unreadable_file_names_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FeatureFileError, match=rf"{name}: .*(truncated or corrupt|cannot read)"):
        read_fingerprint(path)
    with pytest.raises(FeatureFileError, match=name):
        check_fingerprint(path, torch.zeros(3, 2))


def test_a_truncated_legacy_file_is_not_said_to_hold_pickled_objects(tmp_path):
    x = torch.randn(8, 3)
    whole = tmp_path / "legacy.pt"
    torch.save({"a": x, "b": collections.OrderedDict(c=x)}, whole,
               _use_new_zipfile_serialization=False)
    raw = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    said = []
    for end in range(1, len(raw)):
        cut.write_bytes(raw[:end])
        with pytest.raises(FeatureFileError) as err:
            load_features(cut)
        said.append(str(err.value))
    assert not [s for s in said if "pickled Python objects" in s], \
        sorted({s for s in said if "pickled Python objects" in s})[:3]
    assert all("truncated or corrupt" in s for s in said)


def test_a_file_of_pickled_objects_is_still_named_so(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"a": torch.zeros(3, 2), "b": nn.Linear(2, 2)}, path)
    with pytest.raises(FeatureFileError, match=r"holds pickled Python objects "
                                               r"\(torch\.nn\.modules\.linear\.Linear\)"):
        load_features(path)


def test_save_features_writes_a_slice_alone_and_tensors_sharing_memory(tmp_path):
    big = torch.randn(10_000, 64)
    save_features({"a": big[:10]}, tmp_path / "slice.pt")
    assert (tmp_path / "slice.pt").stat().st_size < 20_000  # the whole storage is 2.5 MB
    shared = {"a": big[:10], "b": big[:10]}
    save_features(shared, tmp_path / "shared.safetensors")
    loaded = load_features(tmp_path / "shared.safetensors")
    assert torch.equal(loaded["a"], big[:10]) and torch.equal(loaded["b"], big[:10])


def test_a_nested_namedtuple_is_named_as_not_searched():
    class Values(nn.Module):
        def forward(self, x):
            return x.argmax(-1), x.max(dim=1)  # (ids, torch.return_types.max)

    model = nn.Sequential(nn.Linear(4, 6), Values())
    with pytest.raises(LayerOutputError, match=r"the fields of a namedtuple, here "
                                               r"torch\.return_types\.max, are not searched"):
        collect_activations(model, torch.randn(5, 4), ["1"])
