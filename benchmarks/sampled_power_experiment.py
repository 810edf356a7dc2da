"""Experiment: equalize="power" with each channel's power measured on text the model writes itself
(no data: the model samples it from its own start token) instead of the weights-only residual model.

    python benchmarks/sampled_power_experiment.py {weights,samples} --name NAME [--model M] [--preset 4bit]
        [--seqs 8] [--length 256] [--exponent 0.5] key=value ...

weights  the preset with equalize="power" (ResidualPower, from the weights alone): the control.
samples  the preset with equalize="sampled": the model generates --seqs sequences of --length tokens
         (fasq.fit.samples) and the mean square of every input channel of q/k/v, gate/up and down_proj over
         them replaces the estimate.
--exponent  columns weigh power ** exponent (fasq.fit.equalize.POWER_EXPONENT, patched for the run).

One JSON line per run goes to benchmarks/results/experiments.jsonl, as benchmarks/experiments.py writes.
"""
from __future__ import annotations

import argparse
import platform
from datetime import date

import torch

import fasq.fit.equalize as eq
import fasq.fit.samples as samples
from experiments import parse_kv, quantize_score_and_record
from fasq.cli import load_any
from fasq.config import preset
from fasq.data import embedded_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("source", choices=("weights", "samples"))
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--preset", default="4bit")
    ap.add_argument("--seqs", type=int, default=samples.SEQUENCES)
    ap.add_argument("--length", type=int, default=samples.LENGTH)
    ap.add_argument("--exponent", type=float, default=eq.POWER_EXPONENT)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--texts", default="lee,austen")
    ap.add_argument("settings", nargs="*")
    a = ap.parse_intermixed_args(argv)
    torch.set_num_threads(2)
    model, tok = load_any(str(embedded_checkpoint(a.model)))
    rec = {"name": a.name, "model": a.model, "date": str(date.today()),
           "machine": platform.processor() or platform.machine(), "max_tokens": a.max_tokens,
           "power_source": a.source}
    eq.POWER_EXPONENT = a.exponent
    rec["exponent"] = a.exponent
    settings = parse_kv(a.settings)
    if a.source == "samples":
        settings["equalize"] = "sampled"
        samples.SEQUENCES, samples.LENGTH = a.seqs, a.length
        rec.update(seqs=a.seqs, length=a.length)
    cfg = preset(a.preset, **settings)
    quantize_score_and_record(model, tok, cfg, rec, a.texts.split(","), a.max_tokens)


if __name__ == "__main__":
    main()
