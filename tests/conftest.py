"""Shared fixtures: tiny random models of several architectures and a small local tokenizer."""
from __future__ import annotations

import os

import pytest
import torch

from fasq.format import LayerSpec, pack_codes
from fasq.nn import PQLinear

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One per family of fasq.families (gemma3: Gemma3ForCausalLM, text only, with pre/post-feedforward norms).
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3")
MODEL_TYPES = {"gemma3": "gemma3_text"}   # arch name here -> transformers model_type, where they differ


def tiny_config(arch: str, vocab: int = 320):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=arch in ("gemma", "qwen3", "gemma3"))
    if arch in ("qwen3", "gemma", "gemma3"):
        common["head_dim"] = 16
    return AutoConfig.for_model(MODEL_TYPES.get(arch, arch), **common)


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 320):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab), dtype=torch.float32)
    # Random init is N(0, 0.02): make it less degenerate so quantization error is visible in logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model.eval()


_TOKENIZER = None


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences (no download)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return _TOKENIZER


SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters. Hundreds of people have been "
    "forced to vacate their homes in the Southern Highlands of New South Wales as strong winds today pushed "
    "a huge bushfire towards the town of Hill Top. "
) * 6


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(SAMPLE_TEXT)
    return p


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory (config, weights, tokenizer)."""
    d = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


# Tolerance of the CUDA decode kernels (v1 and v2) against the fp32 reference, relative to max |ref|.
CUDA_RTOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def check_cuda_output(y, ref, what: str, dtype) -> None:
    """A CUDA kernel's output against the reference: dtype, shape, every element written (outputs are
    NaN-poisoned first) and the max error within CUDA_RTOL of max |ref|."""
    assert y.dtype == dtype and y.shape == ref.shape, what
    assert bool(torch.isfinite(y).all()), f"{what}: unwritten outputs"
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= CUDA_RTOL[dtype] * scale, f"{what}: max error {err:.3g} vs max |ref| {scale:.3g}"


def check_graph_replay_and_compile(layer, x1, ref):
    """A GPU layer (already run once on x1, giving ref) captured in a CUDA graph replays on new input
    as an eager call computes it, and torch.compile(fullgraph=False) gives ref again."""
    static_x = x1.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    x2 = torch.randn_like(x1)
    static_x.copy_(x2)
    graph.replay()
    torch.testing.assert_close(static_y, layer(x2))
    compiled = torch.compile(layer, fullgraph=False)
    torch.testing.assert_close(compiled(x1), ref)


def random_pq_layer(in_f, out_f, d, k, m=1, group=0, scales=True, rot=0, bias=False, seed=0, device="cpu"):
    """A PQLinear with random (never zero) codes, codebooks, scales, signs and bias."""
    spec = LayerSpec(in_f, out_f, d, k, m, group if scales else 0, scales, rot, bias)
    g = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, k, (m, out_f, spec.n_sub), generator=g), spec.bits)
    codebooks = torch.randn(m, k, d, generator=g).half()
    sc = ((torch.rand(out_f, spec.n_groups, generator=g) + 0.5) *
          (torch.randint(0, 2, (out_f, spec.n_groups), generator=g) * 2 - 1)).half()
    signs = ((torch.randint(0, 2, (in_f,), generator=g) * 2 - 1).to(torch.int8) if rot
             else torch.zeros(0, dtype=torch.int8))
    b = torch.randn(out_f, generator=g).half() if bias else None
    return PQLinear.from_tensors(spec, codes, codebooks, sc, signs, b).to(device)
