"""Experiment (docs/experiments.md rows 40-41): `--preset 3bit` with a wider input rotation than the
block Hadamard, measured by fake quantization (changes no library code).

    python benchmarks/rotation_experiment.py {control,dense,kron} --seed S [--bits 3.25]   # repo root

Every layer gets the preset's per-layer setting (size planner at ``--bits``) and its 0.1% outliers
(taken out before rotating, restored exactly after), then:
  control  fasq.fit.pq.quantize_weight as the library runs it (block Hadamard, 64 columns for
           SmolLM2's 576-column layers, 256 for down_proj's 1536): the reference for this script;
  dense    W Q with Q a random orthogonal in x in matrix (seeded per layer), quantized without
           rotation, then multiplied back by Q^T: every input column mixed with every other;
  kron     Q = signs . blockdiag(Hadamard) . (random orthogonal across blocks (x) I): the same full
           mixing at Hadamard cost (what a kernel could afford).
The weight is dequantized into the dense model, which is then scored like benchmarks/experiments.py
(8192 tokens of each text, its score_and_record) and appended to benchmarks/results/experiments.jsonl.
"""
from __future__ import annotations

import argparse
import time
from datetime import date

import torch
from experiments import score_and_record  # benchmarks/experiments.py (this script's folder is on sys.path)

from fasq import preset
from fasq.cli import load_any
from fasq.data import smollm2_checkpoint
from fasq.fit.allocate import allocate
from fasq.fit.equalize import equalize
from fasq.fit.pq import layer_seed, planned_spec, quantize_weight
from fasq.model import quantizable_linears
from fasq.nn import PQLinear
from fasq.reference import hadamard_matrix

def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()


def rotation(variant: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if variant == "dense":
        return orthogonal(n, g)
    b = min(n & -n, 256)  # the library's block (rotation_block_for(n, 256))
    signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()
    blocks = torch.block_diag(*[hadamard_matrix(b)] * (n // b))
    return torch.diag(signs) @ blocks @ torch.kron(orthogonal(n // b, g), torch.eye(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant", choices=("control", "dense", "kron"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--max-tokens", type=int, default=8192)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_any(str(smollm2_checkpoint()))
    # The preset as it was for these rows (row 37 later set blocks of 64 for --preset 3bit).
    cfg = preset("3bit" if a.bits < 4 else "4bit").replace(seed=a.seed, rotation_block=256)
    equalize(model, cfg.equalize)
    targets = quantizable_linears(model, cfg)
    per_layer, _ = allocate(model, targets, cfg, a.bits, None, {})
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, lin in targets:
            c = per_layer.get(name, cfg)
            w = lin.weight.detach().float()
            if a.variant == "control":
                spec, t = quantize_weight(w, c, name)
                w_hat = PQLinear.from_tensors(spec, **t).dequantize()
            else:
                idx = w.reshape(-1).abs().topk(planned_spec(*w.shape, c, False).n_outliers).indices
                w0 = w.clone()
                w0.reshape(-1)[idx] = 0.0
                q = rotation(a.variant, w.shape[1], layer_seed(c, name))
                spec, t = quantize_weight(w0 @ q, c.replace(rotation="none", outlier_fraction=0.0), name)
                w_hat = PQLinear.from_tensors(spec, **t).dequantize() @ q.T
                w_hat.reshape(-1)[idx] = w.reshape(-1)[idx]
            lin.weight.data = w_hat.to(lin.weight.dtype)
    rec = {"name": f"3bit-rotation-{a.variant}-s{a.seed}", "date": str(date.today()),
           "script": "benchmarks/rotation_experiment.py", "variant": a.variant, "seed": a.seed,
           "target_bits": a.bits, "max_tokens": a.max_tokens, "quantize_seconds": round(time.perf_counter() - t0, 1)}
    score_and_record(model, tok, rec, ("lee", "austen"), a.max_tokens)


if __name__ == "__main__":
    main()
