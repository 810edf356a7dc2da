"""The sweep's ``llamacpp`` rows: a GGUF type scored by llama.cpp's own logits, sized from the GGUF file.

A ``llamacpp`` point (settings ``{"type": "Q4_K_M"}``) has no torch model: the worker scores it with
:func:`fasq.eval.perplexity.perplexity_of` and :class:`LlamaCppLogits`, i.e. on exactly the windows, the
BOS and the byte counts of every other row.  The token ids of each window go to llama.cpp as they are
(``Llama.eval`` adds no BOS and no special tokens; the windows already hold a BOS where the tokenizer adds
one).  Sizes use the sweep's accounting (sizes.py) with the GGUF's stored bytes: bits/weight over the
same layers as every other method (each decoder block's linears), and the whole model as llama.cpp stores
it, which quantizes the token embedding too (every other row keeps it at 16 bits) and keeps norms in F32.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from pathlib import Path

import torch

from .sizes import SizePlan

# Hugging Face linear (inside model.layers.N) -> GGUF tensor (inside blk.N), for Llama and Gemma 3.
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_tensor_name(hf_name: str) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if not m or m.group(2) not in GGUF_NAMES:
        raise ValueError(f"linear {hf_name!r}: no GGUF tensor name known for it (known: model.layers.N. + "
                         f"{sorted(GGUF_NAMES)})")
    return f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.weight"


def gguf_size(path: str | Path, plan: SizePlan) -> dict:
    """The sweep's size report (the keys of :func:`fasq.sweep.sizes.stored_size`) for a GGUF file.

    Quantized layers: every linear of the plan but the output head (what every method quantizes), at the
    bytes the GGUF stores for it.  ``other_bytes``: every other tensor in the file, as stored.
    ``stored_tensors``: bytes of the quantized layers per GGUF type; ``tensor_types``: how many tensors
    of each kind have each type (e.g. ``{"ffn_down": {"Q6_K": 15, "Q4_K": 15}}``).
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    linears = {n: s for n, s in plan.linears.items() if not n.endswith("lm_head")}
    q_bytes = q_weights = 0
    by_type: Counter = Counter()
    kinds: dict[str, Counter] = {}
    used = set()
    for name, (out_f, in_f) in linears.items():
        tname = gguf_tensor_name(name)
        t = tensors.get(tname)
        if t is None:
            raise ValueError(f"{path}: no tensor {tname!r} for linear {name!r}")
        if int(t.n_elements) != out_f * in_f:
            raise ValueError(f"{path}: {tname} has {int(t.n_elements)} elements, {name} has {out_f}x{in_f}")
        q_bytes += int(t.n_bytes)
        q_weights += out_f * in_f
        by_type[t.tensor_type.name] += int(t.n_bytes)
        used.add(tname)
    for t in reader.tensors:
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.removesuffix(".weight")
        kinds.setdefault(kind, Counter())[t.tensor_type.name] += 1
    other = sum(int(t.n_bytes) for n, t in tensors.items() if n not in used)
    total = q_bytes + other
    return {
        "quantized_layers": len(linears), "quantized_weights": q_weights, "quantized_bytes": q_bytes,
        "bits_per_weight": 8.0 * q_bytes / q_weights, "other_bytes": other, "total_bytes": total,
        "fp16_bytes": plan.fp16_bytes, "fraction_of_fp16": total / plan.fp16_bytes,
        "stored_tensors": dict(sorted(by_type.items())),
        "tensor_types": {k: dict(sorted(v.items())) for k, v in sorted(kinds.items())},
        "unquantized_linears": sorted(set(plan.linears) - set(linears)),
        "file_bytes": Path(path).stat().st_size,
    }


class LlamaCppLogits:
    """``ids [B, L] -> logits [B, L, V]`` (float32) from llama.cpp, one window at a time, from an empty
    KV cache each time.

    ``extra_buffer_types=False`` (the default) loads the weights without llama.cpp's extra CPU buffer types
    (weights repacked for its GEMM kernels, AMX): every row is scored by ggml's plain CPU kernels, whatever
    the build, so rows made on other builds agree.  A build with AMX (``-DGGML_NATIVE=ON`` on this Xeon)
    segfaults in ``ggml_backend_amx_mul_mat`` on every quantized SmolLM2 file with them on (gdb,
    2026-12-06); the largest logit of 8 tokens of SmolLM2 Q4_0 differed by 0.2% between this build's plain
    kernels and a non-AMX build's repacked ones.
    The price: ~17-25 prompt tokens/s on SmolLM2 here, about 8 minutes per text on 2 busy cores.
    """

    def __init__(self, path: str | Path, context_length: int, threads: int, extra_buffer_types: bool = False):
        from llama_cpp import Llama

        self.extra_buffer_types = extra_buffer_types
        with model_params(use_extra_bufts=self.extra_buffer_types):
            self.llm = Llama(model_path=str(path), n_ctx=context_length, n_batch=context_length,
                             n_ubatch=context_length, logits_all=True, n_threads=threads, n_threads_batch=threads,
                             verbose=False)
        self.context_length = context_length

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.context_length:
            raise ValueError(f"window of {ids.shape[1]} tokens > n_ctx={self.context_length}")
        out = []
        for row in ids.tolist():
            self.llm.reset()                 # n_tokens = 0: eval() then drops the whole KV cache
            self.llm.eval(row)               # exactly these ids: no BOS added
            out.append(torch.from_numpy(self.llm.scores[: len(row)].copy()))
        return torch.stack(out)


@contextlib.contextmanager
def model_params(**fields):
    """Set ``llama_model_params`` fields that ``llama_cpp.Llama`` has no argument for, while a model loads
    inside (it reads ``llama_model_default_params()`` in its constructor)."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def patched():
        params = default()
        for k, v in fields.items():
            setattr(params, k, v)
        return params

    C.llama_model_default_params = patched
    try:
        yield
    finally:
        C.llama_model_default_params = default


def grid_note(model_path: str) -> str:
    """Where llama.cpp's blocks line up with the GGUF grid the original was dequantized from."""
    name = Path(model_path).name.lower()
    if "smollm2" in name:
        return ("SmolLM2's original is a Q4_1 GGUF dequantized (16 levels with an fp16 scale and min per block "
                "of 32 along each row; embedding Q8_0). Every llama.cpp type here quantizes rows in blocks or "
                "sub-blocks of 32 or 16 starting at the same columns, so each holds whole Q4_1 blocks (or "
                "halves): Q4_K's sub-blocks of 32 with a scale and a min are Q4_1's structure (6-bit scales), and "
                f"the 32-wide fallbacks Q5_0/Q5_1/IQ4_NL have more levels than the original; this flatters them.")
    if "gemma" in name:
        return ("Gemma-3-270M's original is a Q4_K_M GGUF dequantized (640-wide rows Q5_0, attn_output and half "
                "of ffn_down Q4_K, the other ffn_down Q6_K, half of attn_v Q8_0; embedding Q8_0). Q4_K_M made "
                "from it applies the same per-tensor rules to the same blocks and can nearly reproduce it, which "
                "flatters Q4_K_M most; every other type's blocks (32 or 16 wide, or 256 = 8 x 32) also start at "
                "the original's block boundaries.")
    return "The original model is taken as 16-bit; no GGUF grid is known for it."


def prepare(point, model_path: str, plan: SizePlan, context_length: int, threads: int) -> tuple[dict, dict, LlamaCppLogits]:
    """Make (or reuse) the point's GGUF; return (row fields, size report, logits function)."""
    from .llamacpp import QTYPES, gguf_for, llama_cpp_version

    qtype = str(point.settings.get("type", "")).upper()
    if not qtype or set(point.settings) != {"type"}:
        raise ValueError(f"llamacpp settings {point.settings!r}: expected {{'type': T}} with T one of {list(QTYPES)} "
                         "(or another llama.cpp file type)")
    gguf_for(model_path, "F16", threads)            # the conversion is not part of a type's quantize time
    t0, wall0 = time.perf_counter(), time.time()
    path = gguf_for(model_path, qtype, threads)
    seconds = time.perf_counter() - t0
    cached = path.stat().st_mtime < wall0
    size = gguf_size(path, plan)
    logits = LlamaCppLogits(path, context_length, threads)
    from .methods import peak_rss_mb

    notes = [grid_note(model_path),
             f"perplexity from llama.cpp's logits (CPU backend, extra buffer types "
             f"{'on' if logits.extra_buffer_types else 'off'}, F16 KV cache) on the same token ids; whole-model "
             "size as the GGUF stores it (embedding quantized by llama.cpp, norms F32)",
             "no importance matrix"]
    fields = {"library": "llama-cpp-python", "version": llama_cpp_version(),
              "config": {"type": qtype, "gguf": str(path), "imatrix": None, "tensor_types": size["tensor_types"]},
              "quantize_seconds": seconds, "peak_rss_mb": peak_rss_mb(), "calibration": None,
              "from_cache": cached, "notes": notes}
    return fields, size, logits
