"""Quantizer experiments on an embedded model (SmolLM2 by default; issues 4 and 22): one config per run,
perplexity on Lee and Austen.

    python benchmarks/experiments.py --name NAME [--model gemma3-270m] key=value ... [--max-tokens 8192]

Appends one JSON line per run to benchmarks/results/experiments.jsonl (docs/experiments.md reads it).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from datetime import date
from pathlib import Path

import torch

from fasq import FASQConfig
from fasq.cli import load_any
from fasq.data import embedded_checkpoint
from fasq.eval import load_text, perplexity
from fasq.model import model_size_report, quantize

OUT = Path(__file__).parent / "results" / "experiments.jsonl"


def parse_kv(items):
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def score_and_record(model, tok, rec: dict, texts, max_tokens: int) -> None:
    """Add the perplexity on each text and the peak RSS to ``rec``; print it and append it to OUT."""
    for t in texts:
        r = perplexity(model, tok, load_text(t), max_tokens=max_tokens, progress=False)
        rec[f"ppl_{t}"] = round(r["perplexity"], 3)
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(rec))
    with open(OUT, "a") as f:
        f.write(json.dumps(rec) + "\n")


def quantize_score_and_record(model, tok, cfg, rec: dict, texts, max_tokens: int, **quantize_kw) -> None:
    """Quantize ``model`` with ``cfg`` (timed), add its config and size to ``rec``, then :func:`score_and_record`."""
    t0 = time.perf_counter()
    quantize(model, cfg, progress=False, **quantize_kw)
    rec["quantize_seconds"] = round(time.perf_counter() - t0, 1)
    rep = model_size_report(model)
    rec.update(config={k: v for k, v in cfg.to_dict().items() if k not in ("skip_modules", "quant_method")},
               bits_per_weight=round(rep["bits_per_weight"], 4), fraction_of_fp16=round(rep["fraction_of_fp16"], 4))
    score_and_record(model, tok, rec, texts, max_tokens)


def main(argv=None):
    """Run one experiment; ``argv`` as on the command line (wrappers such as
    restarts_experiment.py patch the library first, then call this)."""
    torch.manual_seed(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default="smollm2", help="embedded model: smollm2 or gemma3-270m")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--texts", default="lee,austen")
    ap.add_argument("--original", action="store_true", help="evaluate the unquantized model")
    ap.add_argument("--bits", type=float, help="target bits/weight: per-layer allocation (fasq.fit.allocate)")
    ap.add_argument("settings", nargs="*")
    a = ap.parse_args(argv)
    model, tok = load_any(str(embedded_checkpoint(a.model)))
    rec = {"name": a.name, "model": a.model, "date": str(date.today()), "machine": platform.processor() or platform.machine(),
           "max_tokens": a.max_tokens}
    if a.original:
        score_and_record(model, tok, rec, a.texts.split(","), a.max_tokens)
    else:
        rec["target_bits"] = a.bits
        quantize_score_and_record(model, tok, FASQConfig(**parse_kv(a.settings)), rec, a.texts.split(","),
                                  a.max_tokens, target_bits=a.bits)


if __name__ == "__main__":
    main()
