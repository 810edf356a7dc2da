"""Experiment: the preset with error feedback (``error_feedback=True``, :mod:`fasq.fit.feedback`): codes chosen
column pair by column pair with GPTQ's update against each layer's input covariance, measured on the tokens the
model samples itself (no data is read).

    python benchmarks/feedback_experiment.py --name NAME [--model M] [--preset 4bit] [--seqs 32] [--damp 0.01]
        [--off] [--within-blocks] key=value ...

--off      the control: the preset with the same samples (sample_sequences) and no error feedback.
--seqs     sequences of 256 tokens sampled (config.sample_sequences).
--damp     added to the covariance's diagonal, as a fraction of its mean (fasq.fit.feedback.DAMP, patched).
--within-blocks
           GPTQ's "true sequential" order (patched in): within each block q/k/v, then o, then gate/up, then down,
           each measured with the block's layers before it quantized (fasq measures a block's layers together).

One JSON line per run goes to benchmarks/results/experiments.jsonl, as benchmarks/experiments.py writes.
"""
from __future__ import annotations

import argparse
import platform
from datetime import date

import torch

import fasq.fit.feedback as feedback
from experiments import parse_kv, quantize_score_and_record
from fasq.cli import load_any
from fasq.config import preset
from fasq.data import embedded_checkpoint


def _groups(block, prefix, x, call, names):  # a fasq.fit.feedback.Split
    """``names`` in the order one call of ``block`` first feeds them, layers fed the same tensor together."""
    order = []

    def hook_of(name):
        def hook(_m, args, _out):
            for t, group in order:
                if t is args[0]:
                    group.append(name)
                    return
            order.append((args[0], [name]))
        return hook

    hooks = [block.get_submodule(n[len(prefix) + 1:]).register_forward_hook(hook_of(n)) for n in names]
    try:
        feedback._call(block, x, call)
    finally:
        for h in hooks:
            h.remove()
    return [g for _, g in order]


_SEQUENTIAL = feedback.sequential_covariances


def within_blocks(model, ids, names):
    """fasq.fit.feedback.sequential_covariances with each block's step split into its layers' groups."""
    return _SEQUENTIAL(model, ids, names, split=_groups)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--preset", default="4bit")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--damp", type=float, default=feedback.DAMP)
    ap.add_argument("--off", action="store_true")
    ap.add_argument("--within-blocks", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--texts", default="lee,austen")
    ap.add_argument("settings", nargs="*")
    a = ap.parse_intermixed_args(argv)
    torch.set_num_threads(2)
    feedback.DAMP = a.damp
    if a.within_blocks:
        feedback.sequential_covariances = within_blocks
    model, tok = load_any(str(embedded_checkpoint(a.model)))
    rec = {"name": a.name, "model": a.model, "date": str(date.today()),
           "machine": platform.processor() or platform.machine(), "max_tokens": a.max_tokens,
           "feedback": not a.off, "damp": a.damp, "seqs": a.seqs,
           "order": "within blocks" if a.within_blocks else "blocks"}
    cfg = preset(a.preset, **{"error_feedback": not a.off, "sample_sequences": a.seqs, **parse_kv(a.settings)})
    quantize_score_and_record(model, tok, cfg, rec, a.texts.split(","), a.max_tokens)


if __name__ == "__main__":
    main()
