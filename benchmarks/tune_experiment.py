"""Experiment: after quantization, :func:`fasq.distill.distill` (the norms' gains, the PQ layers' codebooks and
scales tuned so the quantized model's next-token distribution matches the original model's, on text the original
model samples itself; no data is read).

    python benchmarks/tune_experiment.py --name NAME [--model M] [--preset 3bit] [--seed S] [--train norms,scales,codebooks]
        [--seqs 32] [--steps 64] [--batch 4] [--lr 1e-3] [--lr-scales 1e-3] [--lr-codebooks 3e-4]

--train    what is tuned: a part left out gets a learning rate of 0 (the eighteenth round's norms-only row).

The quantized model of (model, preset, seed) is kept under /tmp/fasq-tune-cache (quantizing again is the slow
part); the record holds the perplexity before and after the tuning. One JSON line per run goes to
benchmarks/results/experiments.jsonl, as benchmarks/experiments.py writes.
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
from datetime import date
from pathlib import Path

import torch
from experiments import score_and_record

from fasq import io
from fasq.cli import load_any
from fasq.config import preset
from fasq.data import embedded_checkpoint
from fasq.distill import DistillSettings, distill
from fasq.model import model_size_report, quantize

CACHE = Path("/tmp/fasq-tune-cache")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--preset", default="3bit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", default="norms,scales,codebooks")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-scales", type=float, default=1e-3)
    ap.add_argument("--lr-codebooks", type=float, default=3e-4)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--texts", default="lee,austen")
    ap.add_argument("--skip-before", action="store_true", help="do not score the untuned model")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    texts = a.texts.split(",")
    teacher, tok = load_any(str(embedded_checkpoint(a.model)))
    teacher.eval()
    cache = CACHE / f"{a.model}-{a.preset}-s{a.seed}"
    rec = {"name": a.name, "model": a.model, "date": str(date.today()),
           "machine": platform.processor() or platform.machine(), "max_tokens": a.max_tokens,
           "preset": a.preset, "seed": a.seed, "train": a.train, "seqs": a.seqs, "steps": a.steps,
           "batch": a.batch, "lr": a.lr, "lr_scales": a.lr_scales, "lr_codebooks": a.lr_codebooks}
    if (cache / "config.json").exists():
        model, _ = load_any(str(cache))
    else:
        model = copy.deepcopy(teacher)
        t0 = time.perf_counter()
        quantize(model, preset(a.preset, seed=a.seed), progress=False)
        rec["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        io.save(model, cache, tok)
    rec["bits_per_weight"] = round(model_size_report(model)["bits_per_weight"], 4)
    if not a.skip_before:
        before = dict(rec, name=a.name + "-before")
        score_and_record(model, tok, before, texts, a.max_tokens)
        rec.update({f"before_{k}": v for k, v in before.items() if k.startswith("ppl_")})
    train = set(a.train.split(","))
    settings = DistillSettings(steps=a.steps, sequences=a.seqs, batch=a.batch, seed=a.seed,
                               lr_norms=a.lr if "norms" in train else 0.0,
                               lr_scales=a.lr_scales if "scales" in train else 0.0,
                               lr_codebooks=a.lr_codebooks if "codebooks" in train else 0.0)
    r = distill(model, teacher, settings)
    rec["tune_seconds"] = round(r["seconds"], 1)   # the sampling included
    rec["kl_first"], rec["kl_last8"] = round(r["kl_first"], 5), round(r["kl_last"], 5)
    score_and_record(model, tok, rec, texts, a.max_tokens)


if __name__ == "__main__":
    main()
