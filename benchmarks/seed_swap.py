"""Which layers make one seed of a preset worse than another?  Quantize the model with seeds A and B, then
put one group of B's quantized layers (a layer type, or a decoder block) into A's model at a time and score
each hybrid on the same windows.  The equalization does not depend on the seed, so the swap is exact.

Diagnosis only (docs/experiments.md, ninth round):

    python benchmarks/seed_swap.py --model gemma3-270m --preset 3bit --seeds 6,7 --tokens 4096
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fasq.cli import load_any
from fasq.config import PRESETS, preset
from fasq.data import embedded_checkpoint
from fasq.eval import load_text
from fasq.eval.perplexity import perplexity
from fasq.model import pq_layers, quantize
from fasq.nn import set_module


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--preset", default="3bit", choices=sorted(PRESETS))
    ap.add_argument("--seeds", default="6,7", help="A,B: B's layers go into A's model")
    ap.add_argument("--text", default="lee")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--groups", choices=("all", "types", "blocks"), default="all")
    ap.add_argument("--out", help="write the perplexities here as JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    seed_a, seed_b = (int(s) for s in a.seeds.split(","))
    text = load_text(a.text)

    def build(seed):
        m, tok = load_any(str(embedded_checkpoint(a.model)))
        # the embedding table is left at 16 bits: it is not a decoder layer, and it would be swapped with none
        quantize(m, preset(a.preset, seed=seed, quantize_embeddings=False), progress=False)
        return m.eval(), tok

    model_a, tok = build(seed_a)
    model_b, _ = build(seed_b)
    norms_a = {k: v for k, v in model_a.state_dict().items() if "norm" in k}
    norms_b = {k: v for k, v in model_b.state_dict().items() if "norm" in k}
    if any(not torch.equal(norms_a[k], norms_b[k]) for k in norms_a):
        raise SystemExit("the equalized norms differ between the seeds: a swap would not be exact")
    layers_a, layers_b = dict(pq_layers(model_a)), dict(pq_layers(model_b))

    def score(m):
        with torch.no_grad():
            return perplexity(m, tok, text, max_tokens=a.tokens)["perplexity"]

    res = {f"seed {seed_a}": score(model_a), f"seed {seed_b}": score(model_b)}
    print(json.dumps(res), flush=True)
    groups: dict[str, list[str]] = {}
    for name in layers_a:
        parts = name.split(".")
        block = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "layers"), None)
        if a.groups in ("all", "types"):
            groups.setdefault(parts[-1], []).append(name)
        if a.groups in ("all", "blocks") and block is not None:
            groups.setdefault(f"block {block}", []).append(name)
    for group, names in groups.items():
        t0 = time.perf_counter()
        for n in names:
            set_module(model_a, n, layers_b[n])
        key = f"seed {seed_a} with seed {seed_b}'s {group}"
        res[key] = score(model_a)
        for n in names:
            set_module(model_a, n, layers_a[n])
        print(f"{key:40s} {res[key]:9.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "preset": a.preset, "text": a.text, "tokens": a.tokens, "perplexity": res}, f,
                      indent=1)


if __name__ == "__main__":
    main()
