import pytest
import torch

import fasq
from fasq import FASQConfig, PQLinear
from fasq.model import model_size_report

from conftest import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_architectures(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    fasq.quantize(model, FASQConfig(codebook_size=64), progress=False)
    layers = [m for m in model.modules() if isinstance(m, PQLinear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per decoder layer
    assert not any(type(m) is torch.nn.Linear and n.startswith("model.layers") for n, m in model.named_modules())
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    # quantized logits track the original (correlation of the flattened logits)
    corr = torch.corrcoef(torch.stack([ref.flatten(), out.flatten()]))[0, 1]
    assert corr > 0.8, corr
    qc = model.config.quantization_config
    assert qc["quant_method"] == "fasq" and len(qc["modules"]) == 14


def test_skip_modules_and_lm_head_kept():
    model = tiny_model("llama")
    fasq.quantize(model, FASQConfig(codebook_size=16, skip_modules=("lm_head", "embed_tokens", "down_proj")),
                  progress=False)
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, PQLinear)


def test_same_result_for_any_worker_count():
    a = fasq.quantize(tiny_model("llama"), FASQConfig(codebook_size=16), progress=False, num_workers=1)
    b = fasq.quantize(tiny_model("llama"), FASQConfig(codebook_size=16), progress=False, num_workers=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_size_report_counts_every_byte():
    model = tiny_model("llama")  # untied lm_head
    fasq.quantize(model, FASQConfig(codebook_size=64), progress=False)
    rep = model_size_report(model)
    pq = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, PQLinear)
             for b in m.buffers())
    other = sum(p.numel() * 2 for n, p in model.named_parameters())  # fp32 params stored as fp16
    assert rep["quantized_bytes"] == pq
    assert rep["total_bytes"] == pq + other
    n_lin = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PQLinear))
    assert rep["bits_per_weight"] == pytest.approx(8 * pq / n_lin)
    assert 0 < rep["fraction_of_fp16"] < 1


def test_no_linears_raises():
    with pytest.raises(ValueError, match="no nn.Linear"):
        fasq.quantize(torch.nn.Sequential(torch.nn.ReLU()), FASQConfig(), progress=False)


@pytest.mark.parametrize("bits", [2.3, 3.6, 4.25, 5.1])
def test_target_bits_lands_within_one_percent(bits):
    model = tiny_model("llama")
    fasq.quantize(model, FASQConfig(group_size=32), progress=False, target_bits=bits)
    got = model_size_report(model)["bits_per_weight"]
    assert bits * 0.99 <= got <= bits, got
    assert model.config.quantization_config["allocation"]["target_bits"] == bits


def test_planner_steps_v_proj_two_menu_points_up():
    """The size planner moves layers one menu step above the base, v_proj layers (the family's extra_steps) up to
    three but not past EXTRA_STEP_MAX_K, most sensitive types first, and never exceeds the budget."""
    from fasq.fit import allocate

    torch.manual_seed(0)
    layers = [(f"model.layers.{i}.{kind}", torch.nn.Linear(inp, out, bias=False))
              for i in range(2) for kind, out, inp in (("self_attn.v_proj", 64, 256), ("mlp.down_proj", 256, 512),
                                                      ("mlp.up_proj", 512, 256))]
    cfg = FASQConfig(group_size=64)
    options = allocate.menu(cfg)
    n = sum(lin.in_features * lin.out_features for _, lin in layers)
    bits = lambda plan: 8 * sum(allocate.layer_bytes(lin, plan[name]) for name, lin in layers) / n  # noqa: E731
    base = 8 * sum(allocate.layer_bytes(lin, options[2]) for _, lin in layers) / n   # K = 16 everywhere
    plan = allocate.plan(layers, cfg, base + 0.3)
    k = {name: plan[name].codebook_size for name, _ in layers}
    assert all(k[nm] == 128 for nm in k if nm.endswith("v_proj")), k      # three steps: 16 -> 128
    assert all(k[nm] in (16, 32) for nm in k if not nm.endswith("v_proj")), k
    assert any(k[nm] == 32 for nm in k if nm.endswith("down_proj")), k     # next in priority
    assert bits(plan) <= base + 0.3
    # From a base of K = 256 the extra steps would pass K = 512: v_proj stops at 512 (the usual step).
    base8 = 8 * sum(allocate.layer_bytes(lin, options[6]) for _, lin in layers) / n
    plan8 = allocate.plan(layers, cfg, base8 + 0.6)
    assert {plan8[nm].codebook_size for nm, _ in layers if nm.endswith("v_proj")} == {allocate.EXTRA_STEP_MAX_K}
    assert bits(plan8) <= base8 + 0.6


def test_target_size_fraction_of_fp16():
    model = tiny_model("llama")
    fasq.quantize(model, FASQConfig(group_size=32), progress=False, target_fraction=0.6)
    frac = model_size_report(model)["fraction_of_fp16"]
    assert 0.594 <= frac <= 0.6, frac


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(ValueError, match="outside what fasq can reach"):
        fasq.quantize(tiny_model("llama"), FASQConfig(), progress=False, target_bits=0.5)
    with pytest.raises(ValueError, match="below the unquantized tensors"):
        fasq.quantize(tiny_model("llama"), FASQConfig(), progress=False, target_fraction=0.05)


def test_config_target_bits_plans_like_an_explicit_target():
    """A config's own target_bits (presets carry one) plans exactly as target_bits= does."""
    a, b = tiny_model("llama"), tiny_model("llama")
    fasq.quantize(a, FASQConfig(group_size=32, target_bits=3.6), progress=False)
    fasq.quantize(b, FASQConfig(group_size=32), progress=False, target_bits=3.6)
    assert a.config.quantization_config["modules"] == b.config.quantization_config["modules"]
    assert a.config.quantization_config["allocation"]["target_bits"] == 3.6
    got = model_size_report(a)["bits_per_weight"]
    assert 3.6 * 0.99 <= got <= 3.6


def test_config_target_out_of_reach_falls_back_with_a_warning(caplog):
    """Where the config's target cannot be met (1 bit/weight: below the cheapest menu point once scales
    and codebooks are counted), the config's own settings are used and a warning says so."""
    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="fasq.fit.allocate"):
        fasq.quantize(model, FASQConfig(target_bits=1.0), progress=False)
    assert "outside what fasq can reach" in caplog.text
    assert "allocation" not in model.config.quantization_config
