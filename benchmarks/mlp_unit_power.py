"""How well does fasq's data-free residual model predict the power of each MLP unit (down_proj's inputs)?

Diagnosis only (docs/experiments.md, ninth round): compares :class:`fasq.fit.equalize.ResidualPower`'s estimate
of the second moment of every down_proj input with the one measured on the first 1024 tokens of Lee (text the
quantizer never sees), per block: log-correlation, where the three most powerful measured units rank in the
estimate, and the largest / median unit RMS (estimated and measured).  ``--mean on`` forces the mean-tracking
model on a family that does not use it (how it fails on SmolLM2); ``--mean off`` the zero-mean one.

    python benchmarks/mlp_unit_power.py --model gemma3-270m
    python benchmarks/mlp_unit_power.py --model smollm2 --mean on
"""
from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from fasq.cli import load_any
from fasq.data import embedded_checkpoint
from fasq.embedding import embed_scale_of
from fasq.eval import load_text
from fasq.eval.perplexity import tokenize, wants_bos
from fasq.families import family_of
from fasq.fit.equalize import ResidualPower, embedding_power


def log_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.clamp_min(1e-12).log(), b.clamp_min(1e-12).log()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--mean", choices=("auto", "on", "off"), default="auto",
                    help="track the stream's mean: as fasq does for the family (auto), or force it")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/mlp_unit_power.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, tok = load_any(str(embedded_checkpoint(a.model)))
    fam = family_of(model)
    blocks = [b for _, b in fam.blocks(model)]
    emb = model.get_input_embeddings()
    start = embedding_power(emb.weight, embed_scale_of(emb))
    res = ResidualPower(start, model.config, fam)
    if a.mean != "auto":
        res.tracks_mean = a.mean == "on"
        res.mu = start[1].float().clone() if res.tracks_mean else torch.zeros_like(res.p)
    seen: dict[int, torch.Tensor] = {}
    for i, b in enumerate(blocks):
        down = getattr(getattr(b, fam.mlp), fam.down)
        down.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[0][0].float()))
    ids = tokenize(tok, load_text("lee"))[: a.tokens]
    if wants_bos(tok):   # as the perplexity windows start
        ids = torch.cat([torch.tensor([tok.bos_token_id]), ids[:-1]])
    with torch.no_grad():
        model(ids[None])
    rows = []
    for i, b in enumerate(blocks):
        _, p_mlp, est = res.step(b)
        if est is None:   # not used by fasq where the mean is not tracked: the zero-mean estimate it would give
            est = res.unit_moments(getattr(b, fam.mlp), p_mlp, torch.zeros_like(p_mlp))[1]
        meas = seen[i][1:].pow(2).mean(0)   # the first position is a sink: left out
        top = meas.topk(3).indices
        row = {"block": i, "measured_top_units": top.tolist(),
               "max_over_median_rms_measured": round(float((meas.max() / meas.median()).sqrt()), 1)}
        row.update(log_corr=round(log_corr(est, meas), 3),
                   estimate_rank_of_top=[int((est > est[k]).sum()) for k in top],
                   max_over_median_rms_estimated=round(float((est.max() / est.median()).sqrt()), 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    mean = a.mean if a.mean != "auto" else ("on" if res.tracks_mean else "off")
    data[f"{a.model}/mean-{mean}"] = {"date": str(date.today()), "tokens": a.tokens, "blocks": rows}
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
