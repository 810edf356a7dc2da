"""Which layers make one seed of `--preset 3bit` worse than another? (docs/experiments.md, fifth round)

    python benchmarks/seed_swap_experiment.py A B [TOKENS [ROTATION_BLOCK]]   # repo root

Quantizes every layer with seed A and with seed B (the preset's per-layer plan, weights dequantized
into the dense model), then scores the model with seed A's layers except one group taken from seed B:
none, all, each layer type, each run of 5 decoder layers.  Perplexity over the first TOKENS tokens
of Lee and Austen; one JSON line per group on stdout (benchmarks/results/seed_swap_0_3.jsonl holds
the run `0 3 4096 256`: the preset's rotation blocks before row 37).  Changes no library code.
"""
import json
import re
import sys
import time

import torch

from fasq import preset
from fasq.cli import load_any
from fasq.data import smollm2_checkpoint
from fasq.eval import load_text, perplexity
from fasq.fit.allocate import allocate
from fasq.fit.equalize import equalize
from fasq.fit.pq import quantize_weight
from fasq.model import quantizable_linears
from fasq.nn import PQLinear

A, B = int(sys.argv[1]), int(sys.argv[2])
NTOK = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
torch.manual_seed(0)
model, tok = load_any(str(smollm2_checkpoint()))
cfg = preset("3bit") if len(sys.argv) <= 4 else preset("3bit", rotation_block=int(sys.argv[4]))
equalize(model, cfg.equalize)
targets = quantizable_linears(model, cfg)
plan, _ = allocate(model, targets, cfg, 3.25, None, {})
W = {A: {}, B: {}}
with torch.no_grad():
    for name, lin in targets:
        w = lin.weight.detach().float()
        for s in (A, B):
            spec, t = quantize_weight(w, plan[name].replace(seed=s), name)
            wh = PQLinear.from_tensors(spec, **t).dequantize()
            W[s][name] = wh
texts = {t: load_text(t) for t in ("lee", "austen")}
def score(from_b):
    with torch.no_grad():
        for name, lin in targets:
            lin.weight.data = W[B if name in from_b else A][name]
    return {t: round(perplexity(model, tok, x, max_tokens=NTOK, progress=False)["perplexity"], 2) for t, x in texts.items()}
names = [n for n, _ in targets]
groups = {"none": set(), "all": set(names)}
for typ in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
    groups[typ] = {n for n in names if n.endswith(typ)}
for i in range(0, 30, 5):
    groups[f"layers{i}-{i+4}"] = {n for n in names if i <= int(re.search(r"\.(\d+)\.", n).group(1)) <= i + 4}
for g, members in groups.items():
    t0 = time.time()
    r = score(members)
    print(json.dumps({"A": A, "B": B, "group": g, **r, "s": round(time.time() - t0)}), flush=True)
