"""Attention masks found where the model's inputs are, and "cls" under left padding: an audit
found the mask of ``(inputs_dict, labels)`` batches ignored (padding averaged in, silently)
and ``pool="cls"`` reading a padding token on left-padded rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from alignment_callback.functional import pool_features
from alignment_callback.hooks import collect_activations

N, T, D = 6, 5, 4


class DictInput(nn.Module):
    """A model whose forward takes one dict (as in a DataLoader of (features, label))."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, inputs):
        return self.proj(inputs["x"])


def _data(left: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, D, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    pos = torch.arange(T)[None]
    mask = (pos >= T - lengths[:, None]) if left else (pos < lengths[:, None])
    return x, mask.long()


def _masked_mean(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.stack([h[i][mask[i] != 0].mean(0) for i in range(len(h))])


@pytest.mark.parametrize("mask_key", [None, "pad"], ids=["default", "custom"])
def test_the_mask_of_an_inputs_labels_batch_is_used(mask_key):
    model = DictInput()
    x, mask = _data()
    key = mask_key or "attention_mask"
    batches = [({"x": x[:3], key: mask[:3]}, torch.zeros(3)),
               ({"x": x[3:], key: mask[3:]}, torch.zeros(3))]
    kwargs = {} if mask_key is None else {"mask_key": mask_key}
    got = collect_activations(model, batches, ["proj"], pool="mean", **kwargs)["proj"]
    with torch.no_grad():
        h = model.proj(x).double().numpy()
    np.testing.assert_allclose(got.double().numpy(), _masked_mean(h, mask.numpy()),
                               rtol=1e-5, atol=1e-6)


def test_a_custom_mask_key_missing_from_the_inputs_dict_is_refused():
    x, mask = _data()
    batches = [({"x": x, "attention_mask": mask}, torch.zeros(N))]
    with pytest.raises(ValueError, match=r"mask_key='pad' is not a tensor entry of the probe's "
                                         r"batches \(they have \['attention_mask', 'x'\]\)"):
        collect_activations(DictInput(), batches, ["proj"], pool="mean", mask_key="pad")


@pytest.mark.parametrize("pool", ["cls", "first"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_cls_takes_the_first_real_token(pool, left):
    x, mask = _data(left)
    got = pool_features(x, pool, mask=mask)
    first = [int(np.flatnonzero(m)[0]) for m in mask.numpy()]
    expected = np.stack([x.numpy()[i, j] for i, j in enumerate(first)])
    np.testing.assert_array_equal(got.numpy(), expected)
    if not left:  # right padding: position 0, as without a mask
        assert torch.equal(got, pool_features(x, pool))


def test_cls_of_left_padded_batches_through_collect_activations():
    model = DictInput()
    x, mask = _data(left=True)
    got = collect_activations(model, [{"inputs": {"x": x}, "attention_mask": mask}], ["proj"],
                              pool="cls", forward=lambda m, b: m(b["inputs"]))["proj"]
    with torch.no_grad():
        h = model.proj(x)
    first = mask.argmax(1)
    assert torch.equal(got, h[torch.arange(N), first])


# ------------------------------------------------------------------ nested container outputs
def test_nested_outputs_give_the_first_float_tensor_depth_first():
    """((hidden, attn), ids) was an error saying it held "only integer or boolean tensors";
    output_key=0 selected the inner tuple and failed."""
    from alignment_callback.hooks import select_output
    from alignment_callback.hooks.outputs import LayerOutputError

    h, g = torch.randn(2, 3), torch.randn(2, 4)
    ids = torch.ones(2, 3, dtype=torch.long)
    assert select_output(((h, g), ids)) is h
    assert select_output(((h, g), g)) is g  # the top level first, as documented
    assert select_output(((h, g), ids), output_key=0) is h
    assert select_output({"inner": {"ids": ids, "x": h}}) is h
    with pytest.raises(LayerOutputError, match="no floating-point tensor, at its top level or "
                                               "nested"):
        select_output(((ids,), ids), layer="block")


def test_nested_outputs_recorded_by_collect_activations():
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(D, D)

        def forward(self, x):
            h = self.proj(x)
            return (h, h.softmax(-1)), torch.zeros(x.shape[0], dtype=torch.long)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Nested()

        def forward(self, x):
            return self.block(x)[0][0].sum(-1)

    model = Model()
    x = torch.randn(N, D)
    got = collect_activations(model, x, ["block"])["block"]
    with torch.no_grad():
        assert torch.equal(got, model.block.proj(x))


# ------------------------------------------------------------------ sequence-first modules
def test_sequence_first_modules_are_warned_about():
    """nn.MultiheadAttention / nn.TransformerEncoderLayer default to batch_first=False: their
    (T, n, d) outputs were read as rows of samples without a word (silently wrong at T = n)."""

    class SeqFirstInside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(D, 2)  # batch_first=False
            self.out = nn.Linear(D, D)

        def forward(self, x):  # x: (n, T, D), batch-first outside
            h = x.transpose(0, 1)
            h, _ = self.attn(h, h, h)
            return self.out(h.transpose(0, 1))

    x = torch.randn(N, N, D)  # T = n: the rows of 'attn' are positions, with no other sign
    with pytest.warns(UserWarning, match=r"layers \['attn'\] are sequence-first modules"):
        acts = collect_activations(SeqFirstInside(), x, ["attn", "out"], pool="mean")
    assert acts["attn"].shape == acts["out"].shape == (N, D)
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")  # a batch-first layer: no warning
        collect_activations(SeqFirstInside(), x, ["out"], pool="mean")


def test_with_forward_the_mask_is_not_taken_from_a_part_the_model_may_not_be_fed():
    """With forward=, what the model is fed is unknown: (query, doc) batches fed the doc had
    their outputs pooled with the query's mask (batch[0])."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, D)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    torch.manual_seed(0)
    model = Encoder()
    query = {"input_ids": torch.randint(1, 50, (3, T)),
             "attention_mask": torch.tensor([[1, 1, 0, 0, 0]] * 3)}
    doc = {"input_ids": torch.randint(1, 50, (3, T))}
    got = collect_activations(model, [(query, doc)], ["emb"], pool="mean",
                              forward=lambda m, b: m(**b[1]))["emb"]
    with torch.no_grad():
        assert torch.allclose(got, model.emb(doc["input_ids"]).mean(1), atol=1e-6)


def test_a_packed_sequence_output_is_refused_with_its_reason():
    """An LSTM fed packed sequences returns (PackedSequence, (h, c)): the nested search took
    PackedSequence.data, one row per token of every sample."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from alignment_callback.hooks.outputs import LayerOutputError

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(D, 5, batch_first=True)

        def forward(self, x):
            packed = pack_padded_sequence(x, torch.tensor([5, 3, 1, 1]), batch_first=True)
            return self.lstm(packed)[1][0][-1]

    for key in (None, 0):
        with pytest.raises(LayerOutputError, match="returned a PackedSequence"):
            collect_activations(Packed(), torch.randn(4, T, D), ["lstm"], output_key=key)


def test_an_output_key_picking_a_container_without_floats_says_so():
    from alignment_callback.hooks import select_output
    from alignment_callback.hooks.outputs import LayerOutputError

    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(LayerOutputError, match=r"layer 'blk': output_key='masks' selects a tuple "
                                               r"holding no floating-point tensor"):
        select_output({"h": torch.randn(2, 3), "masks": (ids, ids)}, "masks", layer="blk")


def test_tie_keys_of_no_rows():
    from alignment_callback.functional.neighbors import tie_keys

    assert tie_keys(0, "x", data=torch.zeros(0, 4)).shape == (0,)
