"""Eager vs ``torch.compile(fullgraph=True)`` greedy decoding of a fasq model on the CPU, static KV cache.

    python benchmarks/compile_cpu.py                     # the bundled SmolLM2, --preset 4bit, 1 thread
    python benchmarks/compile_cpu.py --model out/q4 --threads 2

The decode step (one token, static cache) is compiled cold (no eager call first) with fullgraph=True;
eager and compiled runs alternate for ``--rounds`` rounds, and the median step of each is compared.
Writes benchmarks/results/compile_cpu.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def decode_steps(step, cache, first: torch.Tensor, start: int, n: int) -> tuple[list[float], list[int]]:
    """n greedy steps from token ``first`` at position ``start``; per-step seconds and the tokens."""
    tok, times, toks = first, [], []
    for i in range(n):
        pos = torch.tensor([start + i])
        t0 = time.perf_counter()
        logits = step(tok, pos, cache)
        tok = logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
        toks.append(int(tok))
    return times, toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a fasq directory (default: quantize the bundled SmolLM2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import fasq
    from transformers import StaticCache

    tmp = None
    if args.model is None:
        from fasq.data import smollm2_checkpoint
        from fasq.stream import quantize_checkpoint
        tmp = tempfile.TemporaryDirectory()
        args.model = str(Path(tmp.name) / "q4")
        quantize_checkpoint(smollm2_checkpoint(), args.model, fasq.preset("4bit"), progress=False)
    model, tok = fasq.load(args.model, with_tokenizer=True)
    ids = tok("It is a truth universally acknowledged that", return_tensors="pt", add_special_tokens=False).input_ids
    max_len = ids.shape[1] + args.new_tokens + 1

    def new_cache():
        return StaticCache(config=model.config, max_cache_len=max_len)

    def step(tok_ids, pos, cache):
        return model(input_ids=tok_ids, cache_position=pos, past_key_values=cache, use_cache=True).logits

    compiled = torch.compile(step, fullgraph=True)
    results = {"eager": [], "compiled": []}
    tokens = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for name, fn in (("compiled", compiled), ("eager", step)):
                cache = new_cache()
                logits = model(input_ids=ids, cache_position=torch.arange(ids.shape[1]), past_key_values=cache,
                               use_cache=True).logits
                first = logits[:, -1:].argmax(-1)
                t1 = time.perf_counter()
                times, toks = decode_steps(fn, cache, first, ids.shape[1], args.new_tokens)
                if name == "compiled" and r == 0:
                    results["first_compiled_round_s"] = time.perf_counter() - t1
                    times = times[1:]       # the compile itself
                results[name].append(statistics.median(times) * 1e3)
                tokens[name] = toks
        total = time.perf_counter() - t0
    ratios = [e / c for e, c in zip(results["eager"], results["compiled"])]
    out = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", "torch": torch.__version__,
           "command": "python benchmarks/compile_cpu.py " + " ".join(sys.argv[1:]), "threads": args.threads,
           "model": args.model if tmp is None else "SmolLM2-135M-Instruct --preset 4bit (streamed)",
           "eager_step_ms_median": results["eager"], "compiled_step_ms_median": results["compiled"],
           "speedup_compiled_vs_eager_median": statistics.median(ratios),
           "first_compiled_round_s": round(results["first_compiled_round_s"], 1),
           "same_tokens": tokens["eager"] == tokens["compiled"], "seconds": round(total, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
