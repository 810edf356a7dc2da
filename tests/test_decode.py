"""fasq's lean decode path (fasq.decode) against transformers on the same model: logits of a prompt and of
every decode step close, the same greedy tokens, sliding windows and a prompt longer than the window, the
C++ glue against the torch ops, the fall-back for unsupported models, and its use by bench / generate."""
from __future__ import annotations

import functools
import logging

import pytest
import torch
from transformers import DynamicCache

import fasq
from fasq.decode import LeanDecoder, lean_decoder, unsupported_reason

from conftest import tiny_config, tiny_model


def gemma3_windowed(seed: int = 0):
    """A tiny Gemma 3 with sliding and full layers, a window of 5 and distinct RoPE bases."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("gemma3")
    cfg.num_hidden_layers, cfg.sliding_window = 3, 5
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1 if p.dim() == 2 else 0.3)     # norm weights away from 0: (1 + w) matters
    return model


@functools.lru_cache(maxsize=None)
def models():
    llama = tiny_model("llama")
    with torch.no_grad():
        for m in llama.modules():
            if hasattr(m, "variance_epsilon"):
                m.weight.normal_(1, 0.3)
    q = tiny_model("llama", seed=1)
    fasq.quantize(q, fasq.FASQConfig(subvector_dim=2, codebook_size=16, kmeans_iters=4))
    gq = gemma3_windowed(2)
    fasq.quantize(gq, fasq.FASQConfig(subvector_dim=2, codebook_size=16, kmeans_iters=4, equalize="none"))
    return {"llama": llama, "llama-fasq": q, "gemma3": gemma3_windowed(), "gemma3-fasq": gq}



def hf_steps(model, ids, n):
    """transformers' logits for the prompt's last token and n greedy steps (DynamicCache)."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True)
    logits, toks = [out.logits[0, -1]], []
    for _ in range(n):
        toks.append(int(logits[-1].argmax()))
        out = model(input_ids=torch.tensor([[toks[-1]]]), cache=out.cache, use_cache=True)
        logits.append(out.logits[0, -1])
    return toks, torch.stack(logits)


@pytest.mark.parametrize("name, native", [("llama", True), ("llama-fasq", True), ("gemma3", True),
                                          ("gemma3-fasq", True), ("gemma3-fasq", False)])
def test_lean_matches_transformers(name, native):
    """Prompt logits (every position) and 12 greedy steps: same tokens, logits within 1e-4 of the largest;
    the prompt (9 tokens) and the decode run past Gemma's window of 5."""
    model = models()[name]
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    dec = LeanDecoder(model, max_len=32)
    if not native:
        dec._lib = None                       # the torch-ops step
    with torch.inference_mode():
        ref_all = model(input_ids=ids).logits[0]
        assert unsupported_reason(model) is None
        got_all = dec.prefill(ids, all_logits=True)
        torch.testing.assert_close(got_all, ref_all, atol=1e-4 * ref_all.abs().max().item(), rtol=0)
        toks, ref = hf_steps(model, ids, 12)
        dec.reset()
        got = [dec.prefill(ids)[0]]
        for t in toks:
            got.append(dec.step(t)[0])
    got = torch.stack(got)
    torch.testing.assert_close(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    assert dec.generate(ids, 12) == toks
    assert dec.pos == 9 + 11


def test_native_glue_equals_torch_ops():
    """The C++ glue (rms norms, attend) and the torch-op step give the same logits to fp32 rounding."""
    model = models()["gemma3-fasq"]
    a, b = LeanDecoder(model, max_len=16), LeanDecoder(model, max_len=16)
    if a._lib is None:
        pytest.skip("the lean decode glue did not build here")
    b._lib = None
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 8]])
    la, lb = a.prefill(ids), b.prefill(ids)
    for _ in range(6):
        t = int(la.argmax())
        la, lb = a.step(t), b.step(t)
        torch.testing.assert_close(la, lb, atol=1e-4 * lb.abs().max().item(), rtol=0)


def test_unsupported_model_falls_back_with_one_log_line(caplog):
    model = tiny_model("qwen2")
    assert "qwen2" in unsupported_reason(model)
    with caplog.at_level(logging.WARNING, logger="fasq.decode"):
        assert lean_decoder(model, max_len=8) is None
    assert len(caplog.records) == 1 and "transformers" in caplog.records[0].getMessage()
    with pytest.raises(ValueError, match="qwen2"):
        LeanDecoder(model, max_len=8)
    assert "float16" in unsupported_reason(tiny_model("llama").half())
    assert lean_decoder(models()["llama"], max_len=8, engine="transformers") is None
    with pytest.raises(ValueError, match="engine"):
        lean_decoder(models()["llama"], max_len=8, engine="fast")


def test_positions_past_max_len_raise():
    dec = LeanDecoder(models()["llama"], max_len=4)
    dec.prefill(torch.tensor([[1, 2, 3]]))
    dec.step(4)
    with pytest.raises(ValueError, match="max_len"):
        dec.step(5)
    with pytest.raises(ValueError, match="max_len"):
        LeanDecoder(models()["llama"], max_len=10**6)


def test_bench_model_reports_engine(tokenizer):
    from fasq.bench import bench_model

    model = models()["llama-fasq"]
    lean = bench_model(model, tokenizer, "It is a truth", new_tokens=5, warmup=1, engine="auto")
    hf = bench_model(model, tokenizer, "It is a truth", new_tokens=5, warmup=1, engine="transformers")
    assert (lean["engine"], hf["engine"]) == ("lean", "transformers")
    assert lean["generated"] == hf["generated"] and len(lean["generated"]) == 5
    assert lean["prompt_tokens_per_s"] > 0 and lean["decode_step_ms_median"] > 0


def test_cli_generate_engines_agree(model_dir, capsys):
    """fasq generate: --engine lean (the default here) and --engine transformers print the same text."""
    from fasq.cli import main

    texts = {}
    for engine in ("lean", "transformers"):
        assert main(["generate", str(model_dir), "It is a truth", "--max-new-tokens", "6", "--engine", engine]) == 0
        out = capsys.readouterr()
        texts[engine] = out.out
        assert f"engine {engine}" in out.err
    assert texts["lean"] == texts["transformers"] and texts["lean"].startswith("It is a truth")


def test_bf16_prefill_is_close_and_optional():
    """A prompt of >= PREFILL16_MIN_TOKENS runs the PQ layers on bf16 activations when asked (the AMX path):
    logits within 3% of the largest; prefill_dtype=None keeps fp32 (1e-4)."""
    from fasq.decode.engine import PREFILL16_MIN_TOKENS

    model = models()["llama-fasq"]
    ids = torch.randint(0, 320, (1, PREFILL16_MIN_TOKENS + 4), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits[0]
    tol = ref.abs().max().item()
    for dtype, rel in ((None, 1e-4), (torch.bfloat16, 3e-2)):
        got = LeanDecoder(model, max_len=32, prefill_dtype=dtype).prefill(ids, all_logits=True)
        torch.testing.assert_close(got, ref, atol=rel * tol, rtol=0)
