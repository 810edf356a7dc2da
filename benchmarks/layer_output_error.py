"""Diagnosis only (issue 22): per-layer weight error and *output* error of NF4 against fasq variants.

Uses the activations of the first 1024 Lee tokens, which no quantization method here sees; it explains a
perplexity gap, it does not choose settings.  Needs bitsandbytes (the baselines venv):

    /path/to/baselines-venv/bin/python benchmarks/layer_output_error.py gemma3-270m \
        layers.3.mlp.gate_proj,layers.3.self_attn.v_proj,layers.10.mlp.up_proj

Prints one line per layer: {variant: (|W_q - W| / |W|, |X W_q^T - X W^T| / |X W^T|)}.
"""
from __future__ import annotations

import sys

import torch

from fasq import FASQConfig
from fasq.cli import load_any
from fasq.data import embedded_checkpoint
from fasq.eval import load_text
from fasq.fit.pq import quantize_weight
from fasq.nn import PQLinear


def nf4(w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
    return F.dequantize_4bit(q, st).float()


def fasq(w: torch.Tensor, **settings) -> torch.Tensor:
    spec, bufs = quantize_weight(w, FASQConfig(**settings), name="x")
    return PQLinear.from_tensors(spec, **bufs).dequantize()


VARIANTS = {
    "nf4": nf4,
    "fasq_g256": lambda w: fasq(w, group_size=256),
    "fasq_g64": lambda w: fasq(w, group_size=64),
    "fasq_norot": lambda w: fasq(w, group_size=256, rotation="none"),
    "fasq_d1K16g64": lambda w: fasq(w, subvector_dim=1, codebook_size=16, group_size=64),
}


def main(model_name: str, layers: list[str]) -> None:
    torch.set_num_threads(2)
    model, tok = load_any(str(embedded_checkpoint(model_name)))
    ids = torch.tensor(tok(load_text("lee"))["input_ids"][:1024]).view(2, 512)
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda m, a, o: acts.__setitem__(name, a[0].detach().reshape(-1, a[0].shape[-1]))

    for n, m in model.named_modules():
        if any(n.endswith(suffix) for suffix in layers):
            m.register_forward_hook(keep(n))
    with torch.no_grad():
        model(input_ids=ids)
    for n, m in model.named_modules():
        if n not in acts:
            continue
        w, x = m.weight.detach().float(), acts[n]          # w: [out, in]; x: [tokens, in]
        y = x @ w.T
        row = {}
        for k, fn in VARIANTS.items():
            wq = fn(w)
            row[k] = (round(float((wq - w).norm() / w.norm()), 4), round(float((x @ wq.T - y).norm() / y.norm()), 4))
        print(n, row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
