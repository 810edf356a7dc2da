"""Experiment (docs/experiments.md, twentieth round): after error feedback's codes (GPTQ's one left-to-right pass),
passes of coordinate descent on each layer's own objective ``tr((W - Q) H (W - Q)^T)``: every sub-vector in turn
takes the code that lowers it most with all other codes held (QuantEase's idea, over sub-vectors and a codebook).

    python benchmarks/cd_experiment.py --name NAME [--model M] [--preset 4bit] [--seed S] [--passes 2] [--damp 0.01]

It changes no library code: ``fasq.fit.feedback.feedback_codes`` is wrapped for this process only (the quantizer's
worker pool is threads).  One JSON line per run goes to benchmarks/results/experiments.jsonl.
"""
from __future__ import annotations

import argparse
import platform
import threading
import time
from datetime import date

import torch
from experiments import quantize_score_and_record

import fasq.fit.feedback as fb
from fasq.cli import load_any
from fasq.config import preset
from fasq.data import embedded_checkpoint

_original = fb.feedback_codes
_lock = threading.Lock()
_stats = {"layers": 0, "changed": 0, "codes": 0, "gain": 0.0}


def descend(wp, s, g, book, h, codes, passes: int, damp: float) -> torch.Tensor:
    """``passes`` sweeps of coordinate descent over sub-vectors; ``codes`` [rows, n_sub] (changed in place)."""
    wp = wp[:, : codes.shape[1] * book.shape[1]]   # (columns past the sub-vectors: scale-group padding)
    rows, cols = wp.shape
    d = book.shape[1]
    hp = torch.eye(cols, device=wp.device)
    n = h.shape[0]
    hp[:n, :n] = h
    dead = torch.diag(hp) <= 0
    hp[dead, dead] = 1.0
    hp = hp + damp * torch.diag(hp).mean() * torch.eye(cols)
    sc_full = s.repeat_interleave(g, dim=1)[:, :cols]                                  # [rows, cols]
    q = (book[codes].reshape(rows, -1) * sc_full)                                     # [rows, cols]
    e = wp - q
    before = float((e @ hp * e).sum())
    grad = e @ hp                                                                      # [rows, cols]
    changed = 0
    block = 128   # the gradient of columns past the block is brought up to date once a block (GPTQ's lazy batch)
    for _ in range(passes):
        for b0 in range(0, cols, block):
            b1 = min(b0 + block, cols)
            q0 = q[:, b0:b1].clone()
            for j in range(b0, b1, d):
                c = slice(j, j + d)
                hcc = hp[c, c]
                quad = torch.einsum("kd,de,ke->k", book, hcc, book)                     # [K]
                sc = sc_full[:, j]                                                      # [rows]
                qj = q[:, c]
                lin = (grad[:, c] + qj @ hcc) @ book.T                                  # [rows, K]
                new = (sc[:, None] ** 2 * quad[None] - 2 * sc[:, None] * lin).argmin(1)
                move = new != codes[:, j // d]
                if not bool(move.any()):
                    continue
                changed += int(move.sum())
                delta = book[new] * sc[:, None] - qj                                    # [rows, d]
                delta[~move] = 0
                codes[:, j // d] = new
                q[:, c] += delta
                grad[:, b0:b1] -= delta @ hp[c, b0:b1]
            moved = q[:, b0:b1] - q0
            grad[:, :b0] -= moved @ hp[b0:b1, :b0]
            grad[:, b1:] -= moved @ hp[b0:b1, b1:]
    e = wp - q
    after = float((e @ hp * e).sum())
    with _lock:
        _stats["layers"] += 1
        _stats["changed"] += changed
        _stats["codes"] += codes.numel()
        _stats["gain"] += (before - after) / max(before, 1e-30)
    return codes


def main(argv=None):
    torch.manual_seed(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--preset", default="4bit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--texts", default="lee,austen")
    a = ap.parse_args(argv)

    def wrapped(wp, s, g, book, padded_in, h, damp=None):
        codes = _original(wp, s, g, book, padded_in, h, damp)
        if codes is None or a.passes == 0:
            return codes
        rows = wp.shape[0]
        return descend(wp, s, g, book, h.to(wp.device), codes.reshape(rows, -1).clone(), a.passes,
                       a.damp).reshape(-1)

    fb.feedback_codes = wrapped
    model, tok = load_any(str(embedded_checkpoint(a.model)))
    rec = {"name": a.name, "model": a.model, "date": str(date.today()),
           "machine": platform.processor() or platform.machine(), "max_tokens": a.max_tokens, "preset": a.preset,
           "seed": a.seed, "cd_passes": a.passes, "cd_damp": a.damp}
    rec["cd"] = _stats   # (filled in as the layers are coded; "gain": the summed relative drop of the objective)
    t0 = time.perf_counter()
    quantize_score_and_record(model, tok, preset(a.preset, seed=a.seed), rec, a.texts.split(","), a.max_tokens)
    print(_stats, round(time.perf_counter() - t0), "s")


if __name__ == "__main__":
    main()
