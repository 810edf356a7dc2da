"""The family table (fasq.families): every entry matches the models it names, the generic entry keeps unknown
Llama-like models working and refuses layouts it cannot place, and equalize, the size planner and the
skipped modules read it."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import fasq
from fasq import FASQConfig, families
from fasq.families import FAMILIES, GENERIC, Family, UnknownLayoutError, family_of
from fasq.fit import allocate
from fasq.fit.equalize import _gain, equalize
from fasq.planning import quantizable_linears

from conftest import ARCHS, MODEL_TYPES, tiny_model


def random_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 0.1)
    return model


def test_every_arch_has_its_own_entry():
    for arch in ARCHS:
        fam = family_of(tiny_model(arch))
        assert fam is not GENERIC and MODEL_TYPES.get(arch, arch) in fam.model_types, arch
    assert {family_of(tiny_model(a)).name for a in ARCHS} == {f.name for f in FAMILIES}


@pytest.mark.parametrize("arch", ARCHS)
def test_entry_places_every_block_projection_and_norm(arch):
    model = tiny_model(arch)
    fam = family_of(model)
    blocks = list(fam.blocks(model))
    assert [n for n, _ in blocks] == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    for _, blk in blocks:
        attn, mlp = getattr(blk, fam.attention), getattr(blk, fam.mlp)
        for name in (*fam.attention_inputs, fam.value, fam.output):
            assert isinstance(getattr(attn, name), nn.Linear), name
        for name in (*fam.mlp_inputs, fam.down):
            assert isinstance(getattr(mlp, name), nn.Linear), name
        assert isinstance(getattr(mlp, fam.activation), nn.Module)
        norms = {n for n, c in blk.named_children() if "norm" in type(c).__name__.lower()}
        assert norms == set(fam.block_norms)
    # every quantized linear has a type the size planner ranks
    types_ = {n.rsplit(".", 1)[-1] for n, _ in quantizable_linears(model, FASQConfig())}
    assert types_ == set(fam.priority)


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_kind_is_what_the_norm_computes(arch):
    """The entry's norm kind gives the gain the norm really multiplies by (Gemma: 1 + weight)."""
    model = random_norms(tiny_model(arch))
    fam = family_of(model)
    _, blk = next(fam.blocks(model))
    x = torch.randn(3, model.config.hidden_size)
    for name in fam.block_norms:
        norm = getattr(blk, name)
        gain, _ = _gain(norm, fam)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
        with torch.no_grad():
            torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_and_embedding(arch):
    """The head and embeddings the entry names exist, are tied as the config says, and stay unquantized
    by default."""
    model = tiny_model(arch)
    fam = family_of(model)
    head = model.get_submodule(fam.head)
    emb = model.get_submodule(f"model.{fam.embedding}")
    assert (head.weight is emb.weight) == bool(model.config.tie_word_embeddings)
    assert {fam.head, fam.embedding} <= set(FASQConfig().skip_modules)
    names = {n for n, _ in quantizable_linears(model, FASQConfig())}
    assert fam.head not in names and all(n.startswith("model.layers.") for n in names)


def test_default_skip_modules_unchanged():
    assert FASQConfig().skip_modules == ("lm_head", "embed_tokens")


def _holder(block, config, model_type):
    """A block under a config naming ``model_type``, as a streaming run equalizes one block."""
    h = nn.Module()
    h.block = block
    h.config = types.SimpleNamespace(**{**config.to_dict(), "model_type": model_type})
    return h


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("mode", ["norms", "balance", "full"])
def test_unknown_llama_like_model_equalizes_as_today(arch, mode):
    """An unknown model_type gets the generic entry: on a Llama-like block it does what the family's own
    entry does (Gemma's norms recognized by class name), bit for bit."""
    model = random_norms(tiny_model(arch))
    blk = model.model.layers[0]
    known, unknown = _holder(blk, model.config, model.config.model_type), _holder(
        __import__("copy").deepcopy(blk), model.config, "not_a_known_model_type")
    assert family_of(unknown) is GENERIC
    assert equalize(known, mode) == equalize(unknown, mode)
    for (n, a), (_, b) in zip(known.block.state_dict().items(), unknown.block.state_dict().items()):
        assert torch.equal(a, b), n


def test_unplaced_norms_are_refused_not_equalized_wrongly():
    """Gemma 3's blocks under the generic entry (an unknown model_type): its MLP does not read
    post_attention_layernorm, so folding that norm would be wrong; equalize raises and changes nothing."""
    model = random_norms(tiny_model("gemma3"))
    holder = _holder(model.model.layers[0], model.config, "not_a_known_model_type")
    before = {k: v.clone() for k, v in holder.state_dict().items()}
    with pytest.raises(UnknownLayoutError, match="pre_feedforward_layernorm.*fasq.families"):
        equalize(holder, "full")
    assert all(torch.equal(before[k], v) for k, v in holder.state_dict().items())
    assert equalize(holder, "none")["norms_folded"] == 0


def test_gemma3_entry_folds_the_norm_the_mlp_reads():
    model = random_norms(tiny_model("gemma3"))
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    equalize(model, "norms")
    blk = model.model.layers[0]
    assert torch.all(blk.pre_feedforward_layernorm.weight == 0)          # folded: (1 + 0) is the identity
    assert not torch.all(blk.post_attention_layernorm.weight == 0)        # an output norm: left alone
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_family_skip_keeps_modules_unquantized(monkeypatch):
    model = tiny_model("llama")
    fam = family_of(model)
    monkeypatch.setitem(families._BY_MODEL_TYPE, "llama", fam.replace(skip=("down_proj",)))
    names = {n.rsplit(".", 1)[-1] for n, _ in quantizable_linears(model, FASQConfig())}
    assert "down_proj" not in names and "up_proj" in names


def test_size_planner_reads_the_family(monkeypatch):
    """The type order and extra steps come from the model's entry: with v_proj last and no extra steps,
    v_proj layers get no more than the others."""
    cfg = FASQConfig(group_size=32)

    def ks(model):
        targets = quantizable_linears(model, cfg)
        planned, _ = allocate.allocate(model, targets, cfg, 3.5, None, {})
        return {n: c.codebook_size for n, c in planned.items()}

    base = ks(tiny_model("llama"))
    v = [k for n, k in base.items() if n.endswith("v_proj")]
    assert min(v) > min(base.values())
    fam = family_of(tiny_model("llama"))
    monkeypatch.setitem(families._BY_MODEL_TYPE, "llama",
                        fam.replace(priority=fam.priority[1:] + ("v_proj",), extra_steps=()))
    changed = ks(tiny_model("llama"))
    assert max(k for n, k in changed.items() if n.endswith("v_proj")) <= max(
        k for n, k in changed.items() if not n.endswith("v_proj"))


def test_quantize_refuses_unplaced_layout_before_changing_anything(monkeypatch):
    model = random_norms(tiny_model("gemma3"))
    monkeypatch.setitem(families._BY_MODEL_TYPE, "gemma3_text", GENERIC)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnknownLayoutError):
        fasq.quantize(model, FASQConfig(codebook_size=16, equalize="norms"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fasq.quantize(model, FASQConfig(codebook_size=16, equalize="none"), progress=False, num_workers=1)


def test_table_is_checked():
    with pytest.raises(ValueError, match="norm_kind"):
        Family("x", ("x",), norm_kind="layernorm")
    with pytest.raises(ValueError, match="must differ"):
        Family("x", ("x",), mlp_norm="input_layernorm")
    seen = [t for f in FAMILIES for t in f.model_types]
    assert len(seen) == len(set(seen))
