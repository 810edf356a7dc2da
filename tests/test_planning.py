"""The planning core (fasq.planning): the same plan on a loaded model and on the meta skeleton a streaming
run builds, the specs it plans are what quantization stores, and both pipelines carry it out alike."""
from __future__ import annotations

import json

import pytest
import torch

import fasq
from fasq import FASQConfig
from fasq.planning import NoLayersError, plan_quantization
from fasq.stream import quantize_checkpoint
from fasq.stream.plan import build_skeleton, open_source

from conftest import ARCHS, tiny_model
from test_stream import assert_same_tensors, in_memory, make_checkpoint, stored_tensors


def summary(plan) -> dict:
    return {"layers": [(lp.name, lp.config, lp.spec) for lp in plan.layers], "family": plan.family,
            "allocation": plan.allocation, "blocks": [n for n, _ in plan.blocks],
            "record": plan.quantization_config()}


@pytest.mark.parametrize("arch", ARCHS)
def test_same_plan_on_the_meta_skeleton(tmp_path, arch):
    src = make_checkpoint(tmp_path / "src", arch, torch.float32, shard="1GB")
    skeleton = build_skeleton(open_source(src))
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    # the preset also quantizes the (tied or not) head as its embedding table: 14 linears + the head
    for cfg, kw, n in ((fasq.preset("3bit"), {}, 15), (FASQConfig(equalize="full"), {"target_fraction": 0.6}, 14)):
        a, b = plan_quantization(loaded, cfg, **kw), plan_quantization(skeleton, cfg, **kw)
        assert summary(a) == summary(b)
        assert len(a.layers) == n and len(a.blocks) == 2


def test_planned_specs_are_what_quantize_stores():
    cfg = fasq.preset("4bit", outlier_fraction=0.002)
    plan = plan_quantization(tiny_model("qwen2"), cfg)   # q/k/v biases
    model = fasq.quantize(tiny_model("qwen2"), cfg, progress=False, num_workers=2)
    assert model.config.quantization_config == plan.quantization_config()
    assert len({lp.config.codebook_size for lp in plan.layers}) > 1     # the preset's size target allocates


def test_layer_configs_name_quantized_linears_in_both_paths():
    with pytest.raises(ValueError, match="not quantized linears of LlamaForCausalLM.*lm_head"):
        fasq.quantize(tiny_model("llama"), FASQConfig(codebook_size=16), progress=False,
                      layer_configs={"lm_head": FASQConfig(codebook_size=16)})


def test_nothing_to_quantize():
    with pytest.raises(NoLayersError, match="skip_modules"):
        plan_quantization(tiny_model("llama"), FASQConfig(skip_modules=("*proj", "lm_head")))


def test_gemma3_streams_as_in_memory(tmp_path):
    """Gemma 3's blocks (pre/post-feedforward norms), equalized block by block in a streaming run through
    the family entry, give the in-memory result bit for bit."""
    cfg = FASQConfig(codebook_size=16, equalize="full")
    src = make_checkpoint(tmp_path / "src", "gemma3", torch.bfloat16)
    r = quantize_checkpoint(src, tmp_path / "out", cfg, workers=2, progress=False)
    assert r["blocks_equalized"] == 2
    ref = in_memory(src, torch.bfloat16, cfg, tmp_path / "ref")
    assert_same_tensors(stored_tensors(ref), stored_tensors(tmp_path / "out"))
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(tmp_path / "out") == qc(ref)
