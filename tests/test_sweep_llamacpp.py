"""The sweep's llama.cpp rows: GGUF size accounting (on a GGUF written here with the gguf package), names and
labels, and, where llama_cpp is importable (the baselines venv; CI has none), llama.cpp's logits on the
sweep's windows against transformers' on a tiny random Llama converted to an F32 GGUF, with and without a
BOS: the same windows, no BOS added by llama.cpp."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fasq.sweep.llamacpp_eval import gguf_size, gguf_tensor_name
from fasq.sweep.points import Point
from fasq.sweep.report import _bits
from fasq.sweep.sizes import SizePlan

from conftest import SAMPLE_TEXT, tiny_model

SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_names_labels_and_bits():
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj") == "blk.3.attn_output.weight"
    assert gguf_tensor_name("model.layers.12.mlp.down_proj") == "blk.12.ffn_down.weight"
    with pytest.raises(ValueError, match="lm_head"):
        gguf_tensor_name("lm_head")
    p = Point("llamacpp", {"type": "IQ4_XS"})
    assert p.label == "IQ4_XS" and p.key == "llamacpp-typeIQ4_XS"
    assert [_bits(Point("llamacpp", {"type": t}).to_dict()) for t in ("Q4_K_M", "IQ4_XS", "Q3_K_S", "IQ3_XXS")] \
        == [4, 4, 3, 3]


def _write_gguf(path: Path, n_layers: int, vocab: int, qtype) -> SizePlan:
    """A GGUF holding a tiny Llama's tensors: linears in ``qtype`` (attention) and F16 (MLP), the rest F32."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    linears = {}
    for i in range(n_layers):
        for name, (o, n) in SHAPES.items():
            hf = f"model.layers.{i}.{'self_attn' if name in ATTN else 'mlp'}.{name}"
            linears[hf] = (o, n)
            x = rng.standard_normal((o, n)).astype(np.float32)
            if name in ATTN:
                q = gguf.quants.quantize(x, qtype)
                w.add_tensor(gguf_tensor_name(hf), q, raw_shape=q.shape, raw_dtype=qtype)
            else:
                w.add_tensor(gguf_tensor_name(hf), x.astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, np.float32))
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    linears["lm_head"] = (vocab, 64)   # tied: in the plan, not in the file, never counted as quantized
    fp16 = 2 * (sum(o * n for k, (o, n) in linears.items() if k != "lm_head") + vocab * 64 + n_layers * 64)
    return SizePlan(fp16, linears)


def test_gguf_size_accounting(tmp_path):
    gguf = pytest.importorskip("gguf")
    plan = _write_gguf(tmp_path / "m.gguf", n_layers=2, vocab=96, qtype=gguf.GGMLQuantizationType.Q8_0)
    size = gguf_size(tmp_path / "m.gguf", plan)
    attn = sum(o * n for name, (o, n) in SHAPES.items() if name in ATTN) * 2
    mlp = sum(o * n for name, (o, n) in SHAPES.items() if name not in ATTN) * 2
    q8 = attn // 32 * 34                                     # Q8_0: 32 int8 + one fp16 scale per block
    assert size["quantized_weights"] == attn + mlp and size["quantized_layers"] == 14
    assert size["quantized_bytes"] == q8 + 2 * mlp
    assert size["stored_tensors"] == {"Q8_0": q8, "F16": 2 * mlp}
    assert size["bits_per_weight"] == pytest.approx(8 * (q8 + 2 * mlp) / (attn + mlp))
    assert size["other_bytes"] == 96 * 64 * 2 + 2 * 64 * 4    # embedding F16, norms F32, as stored
    assert size["total_bytes"] == size["quantized_bytes"] + size["other_bytes"]
    assert size["fraction_of_fp16"] == pytest.approx(size["total_bytes"] / plan.fp16_bytes)
    assert size["tensor_types"]["attn_q"] == {"Q8_0": 2} and size["tensor_types"]["ffn_down"] == {"F16": 2}
    assert size["unquantized_linears"] == ["lm_head"]
    bad = SizePlan(plan.fp16_bytes, {**plan.linears, "model.layers.0.mlp.up_proj": (64, 64)})
    with pytest.raises(ValueError, match="elements"):
        gguf_size(tmp_path / "m.gguf", bad)


# ---------------------------------------------------------------------------------------------------
# llama.cpp itself: only where llama_cpp imports and llama.cpp's converter and a real tokenizer are at hand
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sentencepiece")     # convert_hf_to_gguf.py imports it for every Llama
    from fasq.data import cache_dir
    from fasq.sweep import llamacpp

    tok_src = cache_dir() / "smollm2-135m-instruct"   # a tokenizer llama.cpp's converter recognizes
    if not (tok_src / "tokenizer.json").is_file():
        pytest.skip("the cached SmolLM2 checkpoint (its tokenizer) is not here")
    try:
        src = llamacpp.converter_dir()
    except Exception as e:  # no converter and no way to fetch one: nothing to test here
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py is not available: {e}")
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("m") / "tiny-llama-gguf"
    model = tiny_model("llama", vocab=49152)
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_src / f, d / f)
    mp = pytest.MonkeyPatch()
    mp.setenv("FASQ_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("FASQ_LLAMA_CPP_SRC", str(src))
    try:
        path = llamacpp.gguf_for(d, "F32", threads=1)
        again = llamacpp.gguf_for(d, "F32", threads=1)      # cached: same file, not rebuilt
        assert again == path and path.name == "F32.gguf"
    finally:
        mp.undo()
    return model, AutoTokenizer.from_pretrained(d), path


@pytest.mark.parametrize("bos", [False, True])
def test_llamacpp_logits_match_transformers_on_the_sweep_windows(tiny_gguf, bos):
    from fasq.eval.perplexity import perplexity, perplexity_of, windows
    from fasq.sweep.llamacpp_eval import LlamaCppLogits

    model, tok, path = tiny_gguf
    text = SAMPLE_TEXT * 2
    logits_of = LlamaCppLogits(path, context_length=64, threads=1)
    wins, used_bos, _ = windows(tok, text, context_length=64, max_tokens=256, bos=bos)
    assert used_bos is bos and bool((wins[:, 0] == tok.bos_token_id).all()) is bos
    got = logits_of(wins[:2])                                            # [2, 64, V]
    with torch.no_grad():
        ref = model(input_ids=wins[:2]).logits
    assert got.shape == ref.shape
    # position by position: a BOS added by llama.cpp would shift every row by one token
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 1e-3, f"llama.cpp vs transformers logits: relative max error {err:.2e}"
    a = perplexity_of(logits_of, tok, text, context_length=64, max_tokens=256, batch_size=1, progress=False, bos=bos)
    b = perplexity(model, tok, text, context_length=64, max_tokens=256, progress=False, bos=bos)
    assert a["tokens_scored"] == b["tokens_scored"] and a["bytes_scored"] == b["bytes_scored"]
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-3)
