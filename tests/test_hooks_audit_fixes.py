"""Regression tests for the audit of ``alignment_callback.hooks`` (batch transforms and masks,
text probes, nested tensors, batch containers, torch.compile, empty probes, error messages,
DataParallel)."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import UserDict, namedtuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from alignment_callback.hooks import ActivationRecorder, collect_activations, list_layers
from alignment_callback.hooks.collect import LayerCountError, to_device
from alignment_callback.hooks.extract import (
    _fingerprint,
    check_fingerprint,
    extract_features,
    probe_fingerprint,
    read_fingerprint,
)
from alignment_callback.hooks.selection import resolve_layers


def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _masked_mean(h: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """From the definition: the mean of the rows' real tokens, in float64."""
    out = np.zeros((h.shape[0], h.shape[2]))
    for i in range(h.shape[0]):
        out[i] = h[i][keep[i].astype(bool)].mean(0)
    return out


# ------------------------------------------------------------------ 1. batch_transform's mask
class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 4)
        self.block = nn.Identity()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.block(self.emb(input_ids))


def _tokenize(texts: list[str]) -> dict[str, Tensor]:
    """A padding tokenizer, as ``tokenizer(texts, padding=True)``."""
    width = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, :len(t)] = torch.tensor([ord(c) for c in t])
        mask[i, :len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_the_mask_a_tokenizing_batch_transform_returns_excludes_padding_from_the_mean():
    torch.manual_seed(0)
    model = TinyLM()
    texts = ["hi", "a much longer sentence", "mid size"]
    got = collect_activations(model, [texts], "block", batch_transform=_tokenize)["block"]
    enc = _tokenize(texts)
    table = _np(model.emb.weight)
    expected = _masked_mean(table[enc["input_ids"].numpy()], enc["attention_mask"].numpy())
    np.testing.assert_allclose(_np(got), expected, rtol=1e-6, atol=1e-6)


def test_a_batch_transform_without_a_mask_keeps_the_dict_batchs_mask():
    torch.manual_seed(0)
    model = TinyLM()
    enc = _tokenize(["hi", "a longer one"])
    got = collect_activations(model, [enc], "block",
                              batch_transform=lambda b: (b["input_ids"], b["input_ids"]))
    expected = _masked_mean(_np(model.emb.weight)[enc["input_ids"].numpy()],
                            enc["attention_mask"].numpy())
    np.testing.assert_allclose(_np(got["block"]), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ 2. text probes
class ByteBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(256, 8, mode="mean")

    def forward(self, ids: Tensor) -> Tensor:
        return self.emb(ids)


def _bytes(batch: list[str]) -> Tensor:
    return torch.tensor([[ord(c) for c in s[:6].ljust(6)] for s in batch])


TEXTS = ["the cat", "a dog", "one bird", "two fish", "a newt"]


def test_a_text_probe_fingerprint_counts_and_hashes_every_row():
    fp = probe_fingerprint(DataLoader(TEXTS, batch_size=2))
    assert fp["rows"] == len(TEXTS)
    # independent of the batching
    assert fp == probe_fingerprint(DataLoader(TEXTS, batch_size=3)) == probe_fingerprint([TEXTS])
    # any row counts, not only the first of each batch
    for i in range(len(TEXTS)):
        changed = TEXTS[:i] + ["XXXX"] + TEXTS[i + 1:]
        assert probe_fingerprint(DataLoader(changed, batch_size=2)) != fp
    assert probe_fingerprint(DataLoader(TEXTS[::-1], batch_size=2)) != fp
    # (texts, labels) batches: the texts are the inputs
    pairs = DataLoader(list(zip(TEXTS, range(5))), batch_size=2)
    assert probe_fingerprint(pairs)["rows"] == len(TEXTS)


def test_numbers_in_a_column_are_separated_row_by_row():
    assert probe_fingerprint([[12, 3]]) != probe_fingerprint([[1, 23]])


def test_tensor_and_dict_probe_fingerprints_are_those_of_the_earlier_scheme():
    x = torch.arange(24.0).reshape(8, 3)
    y = torch.zeros(8)
    for probe in (x, list(x.split(3)), DataLoader(TensorDataset(x, y), batch_size=3),
                  {"a": x, "b": x.long()}, [{"a": x[:4]}, {"a": x[4:]}]):
        assert probe_fingerprint(probe) == _fingerprint(probe, columns=False)


def test_extract_features_saves_a_text_probe_and_checks_it(tmp_path):
    torch.manual_seed(0)
    model = ByteBag()
    loader = DataLoader(TEXTS, batch_size=2)
    path = tmp_path / "text.pt"
    feats = extract_features(model, loader, "emb", path=path, batch_transform=_bytes)
    expected = _np(model.emb.weight)[_bytes(TEXTS).numpy()].mean(1)
    np.testing.assert_allclose(_np(feats["emb"]), expected, rtol=1e-6, atol=1e-6)
    assert read_fingerprint(path)["rows"] == len(TEXTS)
    assert check_fingerprint(path, DataLoader(TEXTS, batch_size=4))
    with pytest.raises(ValueError, match="another probe"):
        check_fingerprint(path, DataLoader(TEXTS[:4] + ["other"], batch_size=2))


def test_a_column_batch_is_fed_whole_to_a_model_that_takes_texts():
    class TextModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = ByteBag()

        def forward(self, texts: list[str]) -> Tensor:
            return self.inner(_bytes(texts))

    torch.manual_seed(0)
    model = TextModel()
    got = collect_activations(model, DataLoader(TEXTS, batch_size=2), "inner.emb")["inner.emb"]
    expected = _np(model.inner.emb.weight)[_bytes(TEXTS).numpy()].mean(1)
    np.testing.assert_allclose(_np(got), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ 3. nested tensors
def _encoder() -> tuple[nn.TransformerEncoder, Tensor, Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2)
    src = torch.randn(4, 6, 8)
    pad = torch.zeros(4, 6, dtype=torch.bool)  # True = padding; no row is full length
    pad[0, 3:] = True
    pad[1, 5:] = True
    pad[2, 4:] = True
    pad[3, 5:] = True
    return enc, src, pad


def _slow_path(enc: nn.TransformerEncoder, src: Tensor, pad: Tensor) -> list[np.ndarray]:
    """Each layer's output on the dense (non-nested) path: train mode, no dropout."""
    enc.train()
    outs, h = [], src
    with torch.no_grad():
        for layer in enc.layers:
            h = layer(h, src_key_padding_mask=pad)
            outs.append(_np(h))
    enc.eval()
    return outs


@pytest.mark.parametrize("pool", ["mean", "last", "cls"])
def test_transformer_encoder_nested_outputs_pool_the_real_tokens(pool):
    enc, src, pad = _encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype"
        got = collect_activations(enc, [{"src": src, "src_key_padding_mask": pad}],
                                  "layers.*", pool=pool)
    keep = ~pad.numpy()
    for name, h in zip(["layers.0", "layers.1"], _slow_path(enc, src, pad)):
        if pool == "mean":
            expected = _masked_mean(h, keep)
        elif pool == "last":
            expected = h[np.arange(4), keep.sum(1) - 1]
        else:
            expected = h[:, 0]
        np.testing.assert_allclose(_np(got[name]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_the_encoder_itself_pools_its_real_tokens(pool):
    """The encoder module returns a dense output, zero at the padding: hooked itself, it was
    pooled over every position (the mean counted the zeros, "last" took a zero row).  The
    padding mask it is called with now says which tokens are real."""

    class Wrapped(nn.Module):  # the encoder as a named submodule, called with the mask
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, src, src_key_padding_mask):
            return self.enc(src, src_key_padding_mask=src_key_padding_mask)

    enc, src, pad = _encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = collect_activations(Wrapped(enc), [{"src": src, "src_key_padding_mask": pad}],
                                  ["enc"], pool=pool)
    keep = ~pad.numpy()
    h = _slow_path(enc, src, pad)[-1]  # the encoder's output: its last layer's (no norm)
    expected = _masked_mean(h, keep) if pool == "mean" else h[np.arange(4), keep.sum(1) - 1]
    np.testing.assert_allclose(_np(got["enc"]), expected, rtol=1e-5, atol=1e-5)


def test_list_layers_reports_the_padded_shape_of_nested_outputs():
    enc, src, pad = _encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        shapes = dict(list_layers(enc, {"src": src, "src_key_padding_mask": pad}))
    longest = int((~pad).sum(1).max())
    assert shapes["layers.0"] == (4, longest, 8)
    assert shapes["layers.1.linear1"] == (4, longest, 16)


# ------------------------------------------------------------------ 4. batch containers
Batch = namedtuple("Batch", "x y")


class Encoding(UserDict):
    """Like ``transformers.BatchEncoding``: a mapping with attribute access to its keys."""

    def __getattr__(self, key: str):
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None


@dataclasses.dataclass
class DataBatch:
    x: Tensor
    tag: str = "probe"


class Movable:
    """A batch object with an in-place ``to`` (as graph-batch libraries have)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.moves = 0

    def to(self, device: torch.device) -> Movable:
        self.x = self.x.to(device)
        self.moves += 1
        return self


def test_batch_containers_keep_their_type_for_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x = torch.randn(5, 3)
    w, b = _np(model[0].weight), _np(model[0].bias)
    expected = np.maximum(_np(x) @ w.T + b, 0.0)
    movable = Movable(x)
    for batch, ty in ((Batch(x, torch.zeros(5)), Batch), (Encoding(x=x), Encoding),
                      (DataBatch(x), DataBatch), (movable, Movable)):
        seen: list[type] = []

        def forward(m: nn.Module, bt, seen: list[type] = seen) -> Tensor:
            seen.append(type(bt))
            return m(bt.x)

        got = collect_activations(model, [batch], "1", forward=forward)["1"]
        assert seen == [ty]
        np.testing.assert_allclose(_np(got), expected, rtol=1e-6, atol=1e-6)
    assert movable.moves == 0  # the caller's object was copied before its in-place move


def test_to_device_rebuilds_namedtuples_mappings_and_dataclasses():
    x = torch.randn(2, 3)
    cpu = torch.device("cpu")
    moved = to_device(Batch(x, [x]), cpu)
    assert type(moved) is Batch and moved.x is not None and isinstance(moved.y, list)
    enc = to_device(Encoding(x=x, n=3), cpu)
    assert type(enc) is Encoding and enc.n == 3 and torch.equal(enc.x, x)
    dc = to_device(DataBatch(x, tag="t"), cpu)
    assert type(dc) is DataBatch and dc.tag == "t" and torch.equal(dc.x, x)


# ------------------------------------------------------------------ 5. torch.compile
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _net_by_hand(net: Net, x: Tensor) -> dict[str, np.ndarray]:
    out, h = {}, _np(x)
    for i, block in enumerate(net.blocks):
        pre = h @ _np(block[0].weight).T + _np(block[0].bias)
        out[f"blocks.{i}.0"] = pre
        h = np.maximum(pre, 0.0)
        out[f"blocks.{i}"] = h
    out["head"] = h @ _np(net.head.weight).T + _np(net.head.bias)
    return out


def test_new_layers_of_an_already_compiled_model_are_captured():
    torch.manual_seed(0)
    net = Net()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(6, 4)
    expected = _net_by_hand(net, x)
    with torch.no_grad():
        compiled(x)  # a graph cached without any hook
    for layers in (["blocks.*", "head"], ["blocks.*.0", "head"]):
        got = collect_activations(compiled, x, layers)
        assert sorted(got) == sorted(resolve_layers(net, layers))
        for name, value in got.items():
            np.testing.assert_allclose(_np(value), expected[name], rtol=1e-5, atol=1e-6)
    shapes = dict(list_layers(compiled, x))
    assert shapes["blocks.0.0"] == (6, 4) and shapes["head"] == (6, 2)


def test_the_never_ran_message_mentions_torch_compile():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(x) if self.training else self.a(x)

    with pytest.raises(LayerCountError, match=r"never ran.*torch\.compile"):
        collect_activations(Branchy(), torch.randn(4, 3), ["a", "b"])


# ------------------------------------------------------------------ 6. empty probes
@pytest.mark.parametrize("probe", [torch.empty(0, 3), [torch.empty(0, 3)],
                                   DataLoader(TensorDataset(torch.empty(0, 3)), batch_size=2)])
def test_a_probe_without_rows_is_an_error(probe, tmp_path):
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="dataloader_or_batches"):
        collect_activations(model, probe, "0")
    path = tmp_path / "empty.pt"
    with pytest.raises(ValueError):
        extract_features(model, probe, "0", path=path)
    assert not path.exists()


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.0])
def test_collect_activations_validates_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        collect_activations(nn.Sequential(nn.Linear(3, 4)), torch.randn(4, 3), "0",
                            batch_size=batch_size)


def test_an_empty_tuple_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="empty tuple / list batch"):
        collect_activations(nn.Sequential(nn.Linear(3, 4)), [()], "0")


# ------------------------------------------------------------------ 7. error messages
MODEL = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Tanh()))


@pytest.mark.parametrize("spec", ["re:[", "[z-a]", "2.[z-a]"])
def test_an_invalid_regex_or_glob_is_a_value_error_naming_it(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        resolve_layers(MODEL, spec)
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        resolve_layers(MODEL, ["0", spec])


@pytest.mark.parametrize("layers", [1, None, 2.5, {"0": 1}])
def test_a_layers_value_that_is_no_spec_names_layers(layers):
    with pytest.raises(TypeError, match="layers"):
        resolve_layers(MODEL, layers)
    with pytest.raises(TypeError, match="layers"):
        collect_activations(MODEL, torch.randn(4, 3), layers)


def test_pooling_errors_name_the_layer():
    seq = nn.Sequential(nn.Linear(4, 4), nn.Identity())
    with pytest.raises(ValueError, match=r"layer '0'.*pool='none'"):
        collect_activations(seq, torch.randn(5, 3, 4), ["0", "1"], pool="none")
    with pytest.raises(ValueError, match=r"layer '0'.*callable"):
        collect_activations(seq, torch.randn(5, 3, 4), ["0", "1"], pool=lambda t: t)


def test_variable_length_batches_with_flatten_name_the_layer():
    batches = [torch.randn(2, 3, 4), torch.randn(2, 5, 4)]
    with pytest.raises(ValueError, match=r"layer '0'.*different shapes.*flatten"):
        collect_activations(nn.Sequential(nn.Identity()), batches, "0", pool="flatten")


# ------------------------------------------------------------------ 8. DataParallel
def test_data_parallel_runs_as_its_module(monkeypatch):
    torch.manual_seed(0)
    net = Net()
    wrapped = nn.DataParallel(net)
    x = torch.randn(6, 4)

    def no_replicas(self, *args, **kwargs):
        raise AssertionError("DataParallel.forward would copy the hooks to every replica")

    monkeypatch.setattr(nn.DataParallel, "forward", no_replicas)
    layers = ["blocks.*", "module.head"]
    got = collect_activations(wrapped, x, layers)
    assert sorted(got) == ["blocks.0", "blocks.1", "head"]
    expected = _net_by_hand(net, x)
    for name, value in got.items():
        np.testing.assert_allclose(_np(value), expected[name], rtol=1e-5, atol=1e-6)
    assert [n for n, _ in list_layers(wrapped, x)] == [n for n, _ in list_layers(net, x)]
    with ActivationRecorder(wrapped, "head") as rec:  # names normalized for direct use too
        assert rec.layers == ["head"]


def test_a_compiled_model_under_ddp_runs_eagerly(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = Net()
        wrapped = DistributedDataParallel(torch.compile(net, backend="eager"))
        x = torch.randn(6, 4)
        with torch.no_grad():
            wrapped(x)  # a graph cached without any hook
        got = collect_activations(wrapped, x, ["module.blocks.*.0", "head"])
    finally:
        dist.destroy_process_group()
    assert sorted(got) == ["blocks.0.0", "blocks.1.0", "head"]
    expected = _net_by_hand(net, x)
    for name, value in got.items():
        np.testing.assert_allclose(_np(value), expected[name], rtol=1e-5, atol=1e-6)


def test_a_packed_sequence_batch_moves_as_it_moves_itself():
    """PackedSequence is a namedtuple whose batch_sizes must stay on the CPU: rebuilding it
    field by field on another device raised (every probe pass on a GPU; "meta" stands in)."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    from alignment_callback.hooks.collect import to_device

    packed = pack_padded_sequence(torch.randn(3, 5, 4), torch.tensor([5, 3, 2]),
                                  batch_first=True)
    moved = to_device((packed, torch.arange(3)), torch.device("meta"))
    assert isinstance(moved[0], PackedSequence) and moved[0].data.device.type == "meta"
    assert moved[0].batch_sizes.device.type == "cpu" and moved[1].device.type == "meta"


def test_a_dict_batch_of_texts_counts_its_rows():
    """{"text": [...]} batches gave rows 0 (only tensors were counted), so mismatch errors
    spoke of a 0-row probe; the hash, and so files written before, stays the same."""
    from alignment_callback.hooks.extract import probe_fingerprint

    texts = [f"sample {i}" for i in range(10)]
    whole = probe_fingerprint([{"text": texts}])
    split = probe_fingerprint([{"text": texts[:4]}, {"text": texts[4:]}])
    assert whole == split and whole["rows"] == 10


def test_a_plain_list_of_texts_has_the_fingerprint_of_its_rows():
    """Each text of a plain list is its own batch: they were hashed but not counted (0 rows),
    so extract_features refused the probe and a matching feature file was rejected."""
    from alignment_callback.hooks.extract import probe_fingerprint

    texts = [f"sample {i}" for i in range(20)]
    fp = probe_fingerprint(texts)
    assert fp["rows"] == 20
    assert fp == probe_fingerprint(DataLoader(texts, batch_size=5)) == probe_fingerprint(
        [texts[:7], texts[7:]])


def test_texts_reaching_the_model_say_so():
    """A DataLoader of texts without batch_transform, or a tokenizer without
    return_tensors='pt', ended in the model's own "'list' object has no attribute 'size'"."""

    class Embedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(10, 4)

        def forward(self, input_ids):
            return self.emb(input_ids)

    texts = ["a b", "c", "d e f"]
    with pytest.raises(AttributeError,
                       match=r"probe batch 0 \(a list of 3 str\).*batch_transform="):
        collect_activations(Embedder(), DataLoader(texts, batch_size=3), ["emb"])
    lists = lambda batch: {"input_ids": [[1, 2], [3, 0], [4, 5]]}  # noqa: E731 - no tensors
    with pytest.raises(AttributeError,
                       match=r"input_ids: a list of 3 list.*return_tensors=.pt."):
        collect_activations(Embedder(), DataLoader(texts, batch_size=3), ["emb"],
                            batch_transform=lists)


# ------------------------------------------------------- from an audit of the capture (14th)
class _HalfTokens(nn.Module):
    """A bfloat16 / float16 token model: (n, T, 8) -> (n, T, 32)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.proj = nn.Linear(8, 32).to(dtype)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x.to(self.proj.weight.dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_outputs_are_pooled_at_the_precision_recorded(dtype):
    """A bfloat16 / float16 model's token mean was formed (or, with a mask, rounded back) in
    its dtype before the cast to the recorded dtype: relative errors of 1.7e-3 (bfloat16), also
    with dtype=torch.float64, and the same tensor given as reference features scored
    differently.  The mean of the very outputs, from float64 arithmetic, is now what is
    recorded, to float32 rounding (float64: exactly)."""
    from alignment_callback.functional.preprocessing import pool_features

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, 8, generator=g)
    mask = (torch.arange(12) < torch.randint(3, 13, (40, 1), generator=g)).long()
    model = _HalfTokens(dtype)
    with torch.no_grad():
        out = model(x).double()  # the outputs the hook sees, in float64
    exact = out.mean(1)
    m = mask.double().unsqueeze(-1)
    exact_masked = (out * m).sum(1) / m.sum(1)
    for recorded, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        got = collect_activations(model, x, ["act"], pool="mean", dtype=recorded)["act"]
        assert got.dtype == recorded
        assert float(((got.double() - exact).norm() / exact.norm())) < tol, recorded
        with ActivationRecorder(model, ["act"], pool="mean", dtype=recorded) as rec:
            rec.mask = mask
            with torch.no_grad():
                model(x)
        got = rec["act"]
        assert float(((got.double() - exact_masked).norm() / exact_masked.norm())) < tol
    # the pools that select values are cast after the selection (no float32 copy of every
    # token); they are exact either way.  dtype=None keeps the output's dtype, but a mean is
    # float32 at least
    first = collect_activations(model, x, ["act"], pool="cls", dtype=torch.float32)["act"]
    assert torch.equal(first.double(), out[:, 0])
    kept = collect_activations(model, x, ["act"], pool="cls", dtype=None)["act"]
    assert kept.dtype == dtype
    assert collect_activations(model, x, ["act"], pool="mean", dtype=None)["act"].dtype == \
        torch.float32
    # a pool callable too (the REPA preset's patch mean): with dtype=None it received the
    # half-precision tokens and averaged them there; they are now cast to float32 first
    def patch_mean(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].mean(1)

    kept = collect_activations(model, x, ["act"], pool=patch_mean, dtype=None)["act"]
    assert kept.dtype == torch.float32
    exact_patches = out[:, 1:].mean(1)
    assert float(((kept.double() - exact_patches).norm() / exact_patches.norm())) < 1e-6
    pooled = pool_features(out.to(dtype), "mean")  # the function alone: float32 at least
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.double(), out.to(dtype).double().mean(1), rtol=1e-6,
                               atol=1e-7)


def test_a_second_name_of_a_module_is_explained():
    """``self.tied = self.inp``: named_modules lists the module once, under its first name, so
    'tied' "matched none" of the layers with no word of why."""
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.tied = self.inp
            self.out = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.tied(x))

    with pytest.raises(ValueError, match=r"'tied' is another name of the module 'inp'"):
        resolve_layers(Tied(), ["tied"])
    with pytest.raises(ValueError, match=r"matched none") as info:
        resolve_layers(Tied(), ["nope"])
    assert "another name" not in str(info.value)
    got = collect_activations(Tied(), torch.randn(6, 4), ["inp"])["inp"]
    assert got.shape == (6, 4)


# ======================================================= second audit of activation capture
# (output_key on tensor outputs, non-finite padding, sampler generators, a mask that does not
# fit a layer, one-shot / callable probes of extract_features, compiled-regex hint)
def _linear_np(layer: nn.Linear, x: Tensor) -> np.ndarray:
    """``layer(x)`` from its weights, in NumPy float64."""
    return _np(x) @ _np(layer.weight).T + _np(layer.bias)


class _ProjGRU(nn.Module):
    """A Linear (tensor output) feeding a GRU (tuple output ``(output, h_n)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4).double()
        self.gru = nn.GRU(4, 3, batch_first=True).double()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.gru(self.proj(x))


def test_output_key_leaves_a_tensor_output_as_it_is():
    """A run-wide output_key (for the GRU's tuple) indexed the Linear's tensor output along
    the batch axis: the first sample's tokens came back as rows."""
    from alignment_callback.hooks import select_output

    torch.manual_seed(0)
    model, x = _ProjGRU(), torch.randn(10, 7, 4, dtype=torch.float64)
    got = collect_activations(model, x, ["proj", "gru"], output_key=0, batch_size=5, dtype=None)
    assert got["proj"].shape == (10, 4)
    np.testing.assert_allclose(_np(got["proj"]), _linear_np(model.proj, x).mean(1),
                               rtol=0, atol=1e-12)
    with torch.no_grad():
        seq, _ = model.gru(model.proj(x))
    np.testing.assert_allclose(_np(got["gru"]), _np(seq).mean(1), rtol=0, atol=1e-12)
    assert dict(list_layers(model, x, output_key=0))["proj"] == (10, 7, 4)
    hidden = torch.zeros(3, 2)
    assert select_output(hidden, output_key=1) is select_output(hidden, output_key="x") is hidden


def _padded_rows(fill: float) -> tuple[Tensor, Tensor, np.ndarray]:
    """(n, T, d) activations whose padded positions hold ``fill``, their mask, and the NumPy
    float64 mean of each row's real tokens."""
    g = torch.Generator().manual_seed(0)
    n, T, d = 6, 5, 3
    lengths = np.array([5, 2, 3, 1, 4, 5])
    keep = np.arange(T)[None] < lengths[:, None]
    h = torch.randn(n, T, d, generator=g, dtype=torch.float64)
    x = h.masked_fill(~torch.from_numpy(keep)[..., None], fill)
    return x, torch.from_numpy(keep.astype(np.int64)), _masked_mean(_np(h), keep)


@pytest.mark.parametrize("fill", [float("-inf"), float("inf"), float("nan")])
def test_a_masked_pool_never_reads_the_padding(fill):
    """The masked mean multiplied by the mask: -inf * 0 = NaN turned every padded row NaN."""
    from alignment_callback.functional.preprocessing import pool_features

    x, mask, expected = _padded_rows(fill)
    np.testing.assert_allclose(_np(pool_features(x, "mean", mask=mask)), expected,
                               rtol=0, atol=1e-12)
    last = np.stack([_np(x)[i, int(mask[i].sum()) - 1] for i in range(len(x))])
    np.testing.assert_array_equal(_np(pool_features(x, "last", mask=mask)), last)
    # through the recorder, from a dict batch's attention_mask, float16 activations too
    for dtype, atol in ((torch.float64, 1e-12), (torch.float16, 2e-3)):
        class Fill(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.filled = nn.Identity()

            def forward(self, h: Tensor, attention_mask: Tensor) -> Tensor:
                return self.filled(h)

        batch = {"h": x.to(dtype), "attention_mask": mask}
        got = collect_activations(Fill(), [batch], "filled", dtype=None)["filled"]
        exp = _masked_mean(_np(x.to(dtype).masked_fill(mask[..., None] == 0, 0)),
                           _np(mask))
        np.testing.assert_allclose(_np(got), exp, rtol=0, atol=atol)


def _loaders(n: int) -> dict[str, tuple[DataLoader, list[torch.Generator]]]:
    """DataLoaders whose order comes from a generator of their own, and those generators."""
    from torch.utils.data import BatchSampler, RandomSampler

    ds = TensorDataset(torch.arange(n, dtype=torch.float64)[:, None].repeat(1, 4))
    g1, g2, g3, g4 = (torch.Generator().manual_seed(s) for s in (1, 2, 3, 4))
    return {
        "sampler": (DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, generator=g1)), [g1]),
        "batch_sampler": (DataLoader(ds, batch_sampler=BatchSampler(
            RandomSampler(ds, generator=g2), batch_size=4, drop_last=False)), [g2]),
        "shared": (DataLoader(ds, batch_size=4, shuffle=True, generator=g3), [g3]),
        "loader and sampler": (DataLoader(ds, batch_size=4, generator=g4,
                                          sampler=RandomSampler(ds, generator=g1)), [g4, g1]),
    }


@pytest.mark.parametrize("kind", ["sampler", "batch_sampler", "shared", "loader and sampler"])
def test_a_samplers_own_generator_is_put_back_after_a_pass(kind):
    """Only loader.generator was restored: a RandomSampler(generator=g) moved at every pass, so
    two passes (and two fingerprints) saw the rows in other orders."""
    n = 10
    loader, gens = _loaders(n)[kind]
    states = [g.get_state().clone() for g in gens]
    x = torch.cat([b[0] for b in loader])  # the rows of a first pass, then rewound by hand
    for s, g in zip(states, gens):
        g.set_state(s)
    model = nn.Sequential(nn.Linear(4, 3).double())
    first = collect_activations(model, loader, "0", dtype=None)["0"]
    assert all(torch.equal(s, g.get_state()) for s, g in zip(states, gens))
    second = collect_activations(model, loader, "0", dtype=None)["0"]
    assert torch.equal(first, second)
    assert not torch.equal(x[:, 0], torch.arange(n, dtype=x.dtype))  # shuffled indeed
    np.testing.assert_allclose(_np(first), _linear_np(model[0], x), rtol=0, atol=1e-12)
    assert probe_fingerprint(loader) == probe_fingerprint(loader)
    assert all(torch.equal(s, g.get_state()) for s, g in zip(states, gens))


class _WithCLS(nn.Module):
    """Prepends a CLS token: ``body`` is (n, T + 1, d) for an (n, T) attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 4).double()
        self.cls = nn.Parameter(torch.randn(1, 1, 4, dtype=torch.float64))
        self.body = nn.Linear(4, 4).double()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = torch.cat([self.cls.expand(len(input_ids), 1, 4), self.emb(input_ids)], 1)
        return self.body(h)


def test_a_mask_that_does_not_fit_a_layer_is_warned_about_once():
    """The (n, T) mask was silently dropped for an (n, T + 1, d) output: its mean counted the
    padding with no word."""
    torch.manual_seed(0)
    model, n, T = _WithCLS(), 6, 5
    ids = torch.randn(n, T, 3, dtype=torch.float64)
    keep = np.arange(T)[None] < np.array([5, 2, 3, 1, 4, 5])[:, None]
    mask = torch.from_numpy(keep.astype(np.int64))
    batches = [{"input_ids": ids[:3], "attention_mask": mask[:3]},
               {"input_ids": ids[3:], "attention_mask": mask[3:]}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = collect_activations(model, batches, ["emb", "body"], dtype=None)
    texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(texts) == 1, texts  # once for the layer, not once per batch; none for 'emb'
    assert all(s in texts[0] for s in ("'body'", "(3, 6, 4)", "(3, 5)", "not applied"))
    np.testing.assert_allclose(_np(got["emb"]), _masked_mean(_linear_np(model.emb, ids), keep),
                               rtol=0, atol=1e-12)
    with torch.no_grad():
        full = _np(model(ids, mask))
    np.testing.assert_allclose(_np(got["body"]), full.mean(1), rtol=0, atol=1e-12)
    with warnings.catch_warnings(record=True) as caught:  # cls does not use the mask
        warnings.simplefilter("always")
        collect_activations(model, batches, ["body"], pool="cls")
    assert not [w for w in caught if "not applied" in str(w.message)]


@pytest.mark.parametrize("how", ["iterator", "generator", "callable", "callable of generator"])
def test_extract_features_reads_a_one_shot_or_callable_probe_once(how, tmp_path):
    """probe_fingerprint consumed a one-shot iterator before the capture ("yielded no batch"),
    and a callable probe was iterated itself ("'function' object is not iterable")."""
    torch.manual_seed(0)
    x = torch.randn(12, 4, dtype=torch.float64)
    parts = list(x.split(5))
    probe = {"iterator": lambda: iter(parts), "generator": lambda: (p for p in parts),
             "callable": lambda: lambda: parts,
             "callable of generator": lambda: lambda: (p for p in parts)}[how]()
    model = nn.Sequential(nn.Linear(4, 3).double())
    path = tmp_path / "f.pt"
    feats = extract_features(model, probe, ["0"], path=path, dtype=None)
    np.testing.assert_allclose(_np(feats["0"]), _linear_np(model[0], x), rtol=0, atol=1e-12)
    assert read_fingerprint(path) == probe_fingerprint(x)


def test_a_compiled_pattern_that_matches_nothing_says_it_must_match_the_whole_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match=r"must match the whole name") as info:
        resolve_layers(model, re.compile(r"blocks\.9"))
    assert "blocks" in str(info.value)
    with pytest.raises(ValueError, match=r"must match the whole name"):
        resolve_layers(model, [re.compile("0"), re.compile("1.")])  # "1." needs two characters


# ------------------------------------------------------------ a capture of real models' layers
class PassesFeaturesOn(nn.Module):
    """A sentence-transformers-style module: adds its output to the features dict it was
    given (token ids and mask first) and returns the dict."""

    def __init__(self, adds_embeddings: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.adds_embeddings = adds_embeddings

    def forward(self, features: dict, x: Tensor) -> dict:
        out = {**features, "cls_embedding": None}  # an optional output this model leaves out
        if self.adds_embeddings:
            out["token_embeddings"] = self.proj(x)
        return out


class FeaturesModel(nn.Module):
    def __init__(self, adds_embeddings: bool = True) -> None:
        super().__init__()
        self.block = PassesFeaturesOn(adds_embeddings)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, x: Tensor) -> dict:
        return self.block({"input_ids": input_ids, "attention_mask": attention_mask}, x)


def _features_batch(n: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(100, 2000, (n, 5), generator=g),
            "attention_mask": torch.ones(n, 5, dtype=torch.long),
            "x": torch.randn(n, 5, 4, generator=g)}


def test_a_dict_output_of_ids_and_activations_gives_the_activations():
    """The first tensor value of such a dict is input_ids: the layer was recorded as the
    token ids cast to float, silently (the "sentence embedding" layer of a
    SentenceTransformer)."""
    model, batch = FeaturesModel(), _features_batch()
    acts = collect_activations(model, [batch], ["block"], pool="mean")
    expected = model.block.proj(batch["x"]).mean(1)
    torch.testing.assert_close(acts["block"], expected)
    with pytest.raises(TypeError, match="only integer or boolean tensors.*output_key"):
        collect_activations(FeaturesModel(adds_embeddings=False), [batch], ["block"])


def test_an_output_key_that_selects_no_tensor_is_not_called_a_model_failure():
    """"the model failed on probe batch 0": the model ran; output_key picked None."""
    from alignment_callback.hooks.outputs import LayerOutputError

    with pytest.raises(LayerOutputError, match="output_key='cls_embedding' selects a "
                       "NoneType") as err:
        collect_activations(FeaturesModel(), [_features_batch()], ["block"],
                            output_key="cls_embedding")
    assert "model failed" not in str(err.value)


def test_a_mistyped_pool_fails_when_the_recorder_is_made():
    with pytest.raises(ValueError, match="unknown pool 'avg'"):
        ActivationRecorder(nn.Sequential(nn.Linear(2, 2)), ["0"], pool="avg")
