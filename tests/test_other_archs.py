"""Architectures outside fasq.families' table (the generic entry): equalization stays exact where it acts
(LayerNorm's bias too), layers in another layout (fused q/k/v, mixture-of-experts MLPs, a c_fc MLP) are quantized
without it instead of crashing, what fasq cannot quantize is said (GPT-2's Conv1D, experts kept as 3-D
parameters), and each such model quantizes with a preset, stays close to the original, and saves and loads."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import fasq
from fasq.fit.equalize import equalize
from fasq.planning import NoLayersError

SMALL = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}
EXTRA = {"mixtral": {"num_local_experts": 4}}
# model_type: what its decoder layers are, for fasq
LAYOUTS = {"stablelm": "Llama layout with LayerNorms (bias, mean): equalized",
           "phi3": "fused qkv_proj and gate_up_proj: not equalized",
           "starcoder2": "c_fc / c_proj MLP: not equalized",
           "mixtral": "mixture of experts: not equalized, experts not quantized",
           "falcon": "FalconLinear layers: quantized, not equalized"}


def other_model(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**SMALL, **EXTRA.get(model_type, {})}
    if model_type == "falcon":
        kw.pop("num_key_value_heads")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1, generator=g)
            elif "norm" in n and n.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "norm" in n:
                p.normal_(0, 0.1, generator=g)
    return model


IDS = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("model_type", ["stablelm", "phi3", "mixtral"])
@pytest.mark.parametrize("mode", ["norms", "balance", "full", "sampled"])
def test_equalize_is_exact_or_leaves_the_layer_alone(model_type, mode):
    model = other_model(model_type)
    with torch.no_grad():
        before = model(IDS).logits
    done = equalize(model, mode)
    with torch.no_grad():
        after = model(IDS).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    if model_type == "stablelm" and mode in ("balance", "sampled"):
        assert sum(done.values()) > 0   # it did act (a LayerNorm's bias scaled with its gain)


def test_layers_in_another_layout_are_named_once(caplog):
    model = other_model("phi3")
    assert fasq.families.family_of(model).unmatched_blocks(model) == ["model.layers.0", "model.layers.1"]
    with caplog.at_level(logging.WARNING, logger="fasq.planning"):
        fasq.quantize(model, fasq.preset("4bit"), progress=False)
    lines = [r.getMessage() for r in caplog.records if "other projections" in r.getMessage()]
    assert len(lines) == 1 and "Phi3ForCausalLM" in lines[0] and "without equalization" in lines[0]


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_a_preset_quantizes_it_and_stays_close(model_type, caplog, tmp_path):
    original = other_model(model_type)
    model = fasq.quantize(copy.deepcopy(original), fasq.preset("4bit"), progress=False)
    linears = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = {n for n, m in model.named_modules() if isinstance(m, fasq.PQLinear)}
    assert quantized and quantized <= set(linears)
    assert len(quantized) >= len(linears) - 1     # all but a router / nothing left out
    with torch.no_grad():
        p, q = original(IDS).logits.log_softmax(-1), model(IDS).logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert torch.isfinite(q).all() and kl < 0.2, kl
    experts = [r.getMessage() for r in caplog.records if "does not quantize" in r.getMessage()]
    assert bool(experts) == (model_type == "mixtral"), experts
    fasq.save(model, tmp_path / "q")   # and it saves and loads as the same model
    with torch.no_grad():
        torch.testing.assert_close(fasq.load(tmp_path / "q")(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_a_model_without_linears_is_refused_with_what_it_has():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4,
                                                                 n_positions=64, vocab_size=320))
    with pytest.raises(NoLayersError, match="GPT2LMHeadModel.*besides the output head.*Conv1D"):
        fasq.quantize(gpt2, fasq.preset("4bit"), progress=False)
    with pytest.raises(NoLayersError, match="Conv1D"):
        fasq.quantize(gpt2, fasq.FASQConfig(), progress=False)
