"""``alignment-callback extract`` and the probe fingerprint of feature files.

The saved features are reloaded with the CLI's reader and compared with ``collect_activations``
on the same model and probe; the fingerprint detects a file made from another probe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alignment_callback.hooks import collect_activations
from alignment_callback.hooks.extract import (
    PROBE_KEY,
    check_fingerprint,
    extract_features,
    probe_fingerprint,
    read_fingerprint,
)
from alignment_callback.reporting import cli
from alignment_callback.reporting.io import load_features

ROOT = Path(__file__).resolve().parents[1]
N, IN = 40, 8


class Tiny(nn.Module):
    def __init__(self, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(IN, hidden)
        self.fc2 = nn.Linear(hidden, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model(hidden: int = 16, seed: int = 0) -> nn.Module:
    """The factory the CLI imports as ``tests.test_cli_extract:make_model``."""
    return Tiny(hidden, seed)


def not_a_model() -> str:
    return "nope"


class KeyModel(nn.Module):
    """Takes ``model(batch["x"])`` (``--input-key x``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Tiny(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.fixture()
def probe(tmp_path):
    x = torch.randn(N, IN, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "probe.pt")
    return x, tmp_path / "probe.pt"


def run(*argv) -> int:
    return cli.main(["extract", *map(str, argv)])


def assert_same(feats: dict, expected: dict) -> None:
    assert list(feats) == list(expected)
    for name in expected:
        torch.testing.assert_close(feats[name], expected[name], rtol=0, atol=0)


def test_extract_from_factory_equals_collect_activations(probe, tmp_path, capsys):
    x, probe_path = probe
    out = tmp_path / "feats.pt"
    assert run("--model", "tests.test_cli_extract:make_model", "--model-kwargs",
               '{"hidden": 12, "seed": 3}', "--probe", probe_path, "--layers", "fc1", "fc2",
               "--batch-size", "16", "--out", out) == 0
    assert "2 layer(s)" in capsys.readouterr().out
    expected = collect_activations(make_model(12, 3), x, ["fc1", "fc2"], batch_size=16)
    assert_same(load_features(out), expected)
    raw = torch.load(out, weights_only=True)
    assert raw[PROBE_KEY] == probe_fingerprint(x) == read_fingerprint(out)
    assert raw[PROBE_KEY]["rows"] == N
    assert check_fingerprint(out, x) is True
    assert check_fingerprint(out, list(x.split(7))) is True  # batching does not matter
    loader = DataLoader(TensorDataset(x, torch.randn(N, 2)), batch_size=9)
    assert check_fingerprint(out, loader) is True  # nor labels next to the inputs


def make_bf16_model() -> nn.Module:
    return Tiny().to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_extract_feeds_the_probe_in_the_models_dtype(probe, tmp_path, dtype):
    """A bfloat16 or float64 model fed the float32 probe failed ("mat1 and mat2 must have the
    same dtype"); a probe cast by hand had another fingerprint, which the callback refuses
    for the float32 probe; and a float64 model's features were saved in float32.  The probe
    is now cast as the callback casts it, the fingerprint is the probe's as given, and the
    features are kept as the callback keeps a reference's (float64 stays float64)."""
    x, _ = probe
    model = Tiny().to(dtype)
    feats = extract_features(model, x, ["fc1", "fc2"], tmp_path / "f.pt")
    want = collect_activations(model, x.to(dtype), ["fc1", "fc2"], dtype=None)
    kept = torch.float64 if dtype == torch.float64 else torch.float32
    for name, t in feats.items():
        assert t.dtype == kept
        torch.testing.assert_close(t, want[name].to(kept), rtol=0, atol=0)
    assert check_fingerprint(tmp_path / "f.pt", x)  # the float32 probe the callback is given
    if dtype == torch.bfloat16:
        assert run("--model", "tests.test_cli_extract:make_bf16_model", "--probe", probe[1],
                   "--layers", "fc1", "--out", tmp_path / "cli.pt") == 0
        assert_same(load_features(tmp_path / "cli.pt"), {"fc1": feats["fc1"]})


def test_extract_from_lightning_checkpoint(probe, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from tests.helpers import MLP

    x, probe_path = probe
    model = MLP(in_dim=IN, hidden=10, seed=4)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, ckpt)
    out = tmp_path / "lit.pt"
    assert run("--lightning-class", "tests.helpers:MLP", "--checkpoint", ckpt, "--probe",
               probe_path, "--layers", "fc*", "head", "--out", out) == 0
    expected = collect_activations(model, x, ["fc*", "head"])
    assert_same(load_features(out), expected)
    assert read_fingerprint(out) == probe_fingerprint(x)
    # the same weights through a factory and a state-dict checkpoint (Lightning's format too)
    out2 = tmp_path / "sd.pt"
    assert run("--model", "tests.helpers:MLP", "--model-kwargs", '{"in_dim": 8, "hidden": 10}',
               "--checkpoint", ckpt, "--probe", probe_path, "--layers", "fc*", "head",
               "--out", out2) == 0
    assert_same(load_features(out2), expected)


def test_fingerprint_mismatch_and_old_files(probe, tmp_path):
    x, _ = probe
    out = tmp_path / "a.pt"
    feats = extract_features(make_model(), x, ["fc1"], out)
    with pytest.raises(ValueError, match=r"a\.pt: the features were made from another probe"):
        check_fingerprint(out, x.flip(0))  # same rows, other order
    with pytest.raises(ValueError, match="another probe"):
        check_fingerprint(out, probe_fingerprint(x[:-1]))
    torch.save(feats, tmp_path / "old.pt")  # written before fingerprints existed
    assert read_fingerprint(tmp_path / "old.pt") is None
    assert check_fingerprint(tmp_path / "old.pt", x) is False
    assert_same(load_features(tmp_path / "old.pt"), load_features(out))
    x2 = x.clone()
    x2[3, 2] += 1e-3
    assert probe_fingerprint(x2) != probe_fingerprint(x)
    assert probe_fingerprint(x.double()) != probe_fingerprint(x)


def test_dict_probe_input_key_and_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    x = torch.randn(N, IN, generator=torch.Generator().manual_seed(2))
    batch = {"x": x, "ids": torch.arange(N)}
    torch.save(batch, tmp_path / "probe.pt")
    out = tmp_path / "f.safetensors"
    assert run("--model", "tests.test_cli_extract:KeyModel", "--probe", tmp_path / "probe.pt",
               "--input-key", "x", "--layers", "inner.fc1", "--batch-size", "8",
               "--out", out) == 0
    expected = collect_activations(KeyModel(), x, ["inner.fc1"], batch_size=8)
    torch.testing.assert_close(load_features(out)["inner.fc1"], expected["inner.fc1"])
    assert read_fingerprint(out) == probe_fingerprint(batch)
    assert read_fingerprint(out)["rows"] == N


@pytest.mark.parametrize("argv, text", [
    (["--model", "no_such_module_xyz:f"], "--model no_such_module_xyz:f: cannot import"),
    (["--model", "tests.test_cli_extract:missing"], "has no attribute 'missing'"),
    (["--model", "tests.test_cli_extract"], "expected MODULE:NAME"),
    (["--model", "tests.test_cli_extract:not_a_model"], "returned a str, not an nn.Module"),
    (["--model", "tests.test_cli_extract:make_model", "--model-kwargs", "{bad"],
     "--model-kwargs: not valid JSON"),
    (["--model", "tests.test_cli_extract:make_model", "--checkpoint", "nowhere.ckpt"],
     "--checkpoint nowhere.ckpt: no such file"),
    (["--lightning-class", "tests.test_cli_extract:Tiny", "--checkpoint", "probe.pt"],
     "not a LightningModule class"),
])
def test_extract_errors_name_the_option(probe, tmp_path, capsys, monkeypatch, argv, text):
    monkeypatch.chdir(tmp_path)
    code = run(*argv, "--probe", "probe.pt", "--layers", "fc1", "--out", "o.pt")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and text in err[0], err


def test_extract_layer_and_probe_errors(probe, tmp_path, capsys):
    _, probe_path = probe
    base = ["--model", "tests.test_cli_extract:make_model", "--out", tmp_path / "o.pt"]
    assert run(*base, "--probe", probe_path, "--layers", "nope*") == 2
    err = capsys.readouterr().err
    assert "--layers: layer 'nope*' matched none" in err and "list_layers" not in err
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 cut")
    assert run(*base, "--probe", tmp_path / "bad.pt", "--layers", "fc1") == 2
    err = capsys.readouterr().err
    assert "--probe" in err and "bad.pt: not a readable .pt file (truncated or corrupt" in err
    torch.save(torch.randn(N, IN + 1), tmp_path / "wide.pt")
    assert run(*base, "--probe", tmp_path / "wide.pt", "--layers", "fc1") == 2
    assert "running the model on it failed" in capsys.readouterr().err


def test_extract_console_script_subprocess(probe, tmp_path):
    """``python -m alignment_callback extract`` from another folder: the factory's module is
    found in the current folder."""
    _, probe_path = probe
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "alignment_callback", "extract", "--model", "my_models:make",
         "--probe", str(probe_path), "--layers", "0", "2", "--out", "feats.pt"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    feats = load_features(tmp_path / "feats.pt")
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"0": (N, 6), "2": (N, 3)}


class Embedding(nn.Module):
    """A token model: ids outside its vocabulary raise IndexError."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)

    def forward(self, x):
        return self.emb(x)


def make_embedding() -> nn.Module:
    return Embedding()


def test_extract_input_and_output_mistakes_exit_2_naming_the_option(probe, tmp_path, capsys):
    _, probe_path = probe
    base = ["--model", "tests.test_cli_extract:make_model", "--layers", "fc1"]
    assert run(*base, "--probe", probe_path, "--out", probe_path) == 2  # would overwrite it
    assert "is the --probe file" in capsys.readouterr().err
    assert torch.load(probe_path).shape[0] == N  # the probe is intact
    (tmp_path / "dir.pt").mkdir()
    assert run(*base, "--probe", probe_path, "--out", tmp_path / "dir.pt") == 2
    assert "is a directory" in capsys.readouterr().err
    assert not list(tmp_path.glob("dir.pt.tmp"))
    torch.save(torch.tensor([[1, 2], [7, 9]]), tmp_path / "ids.pt")  # ids beyond 5 tokens
    assert run("--model", "tests.test_cli_extract:make_embedding", "--layers", "emb",
               "--probe", tmp_path / "ids.pt", "--out", tmp_path / "e.pt") == 2
    err = capsys.readouterr().err
    assert "--probe" in err and "running the model on it failed (IndexError" in err


def test_extract_blames_out_for_a_write_failure(probe, tmp_path, capsys, monkeypatch):
    from alignment_callback.reporting import extract as cli_extract

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli_extract, "save_features", full_disk)
    _, probe_path = probe
    assert run("--model", "tests.test_cli_extract:make_model", "--layers", "fc1", "--probe",
               probe_path, "--out", tmp_path / "o.pt") == 2
    err = capsys.readouterr().err
    assert "--out" in err and "No space left" in err and "--probe" not in err


def test_a_tuple_probe_file_is_one_batch_as_the_callback_reads_it(probe, tmp_path, capsys):
    """torch.save((inputs, labels)): the model gets the inputs, and the fingerprint matches the
    callback's reading of the same file (a tuple was read as two batches, labels fed too)."""
    from alignment_callback.callback.probe import load_probe

    x, _ = probe
    torch.save((x, torch.randn(N, 2)), tmp_path / "pair.pt")
    out = tmp_path / "feats.pt"
    assert run("--model", "tests.test_cli_extract:make_model", "--probe", tmp_path / "pair.pt",
               "--layers", "fc1", "--out", out) == 0
    capsys.readouterr()
    assert_same(load_features(out), collect_activations(make_model(), x, ["fc1"]))
    assert read_fingerprint(out)["rows"] == N
    assert check_fingerprint(out, load_probe(str(tmp_path / "pair.pt"))) is True


def test_a_probe_file_of_texts_is_refused_with_the_way_to_tokenize_it(tmp_path, capsys):
    """The command line has no tokenizer; it suggested batch_transform=..., which it does not
    take."""
    torch.save([f"text {i}" for i in range(N)], tmp_path / "texts.pt")
    assert run("--model", "tests.test_cli_extract:make_model", "--probe", tmp_path / "texts.pt",
               "--layers", "fc1", "--out", tmp_path / "f.pt") == 2
    err = capsys.readouterr().err
    assert "holds texts" in err and "return_tensors='pt'" in err and "extract_features" in err
    assert not (tmp_path / "f.pt").exists()


def test_safetensors_features_keep_their_layer_order(tmp_path):
    """safetensors stores tensors by name: features of layers 0, 2, …, 10 written by
    save_features read back as 0, 10, 2, …; a file of another writer is read in the names'
    natural order (h.2 before h.10) rather than as strings sort."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from alignment_callback.hooks.extract import save_features

    g = torch.Generator().manual_seed(0)
    names = ["0", "2", "4", "10", "12", "1b", "1a"]  # the model's order, not a sorted one
    feats = {name: torch.randn(N, 3, generator=g) for name in names}
    save_features(feats, tmp_path / "ours.safetensors")
    loaded = load_features(tmp_path / "ours.safetensors")
    assert list(loaded) == names
    assert all(torch.equal(loaded[k], feats[k]) for k in names)
    save_file({f"h.{i}": torch.randn(N, 2, generator=g) for i in (10, 2, 1)},
              str(tmp_path / "theirs.safetensors"))
    assert list(load_features(tmp_path / "theirs.safetensors")) == ["h.1", "h.2", "h.10"]
