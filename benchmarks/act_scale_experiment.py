"""Issue 22 experiment: scale the input columns of q/k/v and gate/up by an estimate of their input channels'
RMS before quantizing (folded into the norm gain in front of them, so the model is unchanged in real
arithmetic), so that the weight error the quantizer minimizes weighs each column by its activation power.

    python benchmarks/act_scale_experiment.py SOURCE --alpha A --name NAME [--model M] [--bits B] key=value ...

SOURCE:
  model   data-free: a model of the residual stream's per-channel power, built from the weights alone
          (embedding table, o_proj / down_proj rows, Gemma's post-norm gains, the input norms' gains).
  oracle  diagnosis only: the measured RMS of each channel over the first 1024 Lee tokens (calibration data,
          which fasq does not use; it bounds what a perfect data-free estimate could give).
  none    no scaling (the control).

The scale of channel i is rms_i ** alpha (geometrically normalized).  Both estimates are always computed and
their agreement (correlation of the logs, per layer) is recorded.  One JSON line per run goes to
benchmarks/results/experiments.jsonl, as benchmarks/experiments.py writes.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
from experiments import parse_kv, score_and_record

from fasq import FASQConfig
from fasq.cli import load_any
from fasq.data import embedded_checkpoint
from fasq.eval import load_text
from fasq.families import family_of
from fasq.fit.equalize import _act_rms, _gain
from fasq.fit.samples import channel_powers
from fasq.model import model_size_report, quantize


def _lin(parent, name):
    return getattr(parent, name).weight.detach().float()


@torch.no_grad()
def residual_model(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Data-free per-block (attention input power, MLP input power), each a [hidden] vector."""
    fam = family_of(model)
    cfg = model.config
    emb = model.get_input_embeddings()
    scale = float(getattr(emb, "embed_scale", 1.0))
    w = emb.weight.detach()
    P = torch.zeros(w.shape[1])
    for i in range(0, w.shape[0], 16384):
        P += w[i:i + 16384].float().pow(2).sum(0)
    P = P / w.shape[0] * scale * scale
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    out = []
    for _, blk in fam.blocks(model):
        attn, mlp = getattr(blk, fam.attention), getattr(blk, fam.mlp)
        g_in = _gain(getattr(blk, fam.attention_norm), fam)[0]
        x = P / P.mean() * g_in.pow(2)
        vp = _lin(attn, fam.value).pow(2) @ x                       # [n_kv * head_dim]
        col = torch.arange(n_heads * head_dim)
        kv_row = (col // head_dim) // (n_heads // n_kv) * head_dim + col % head_dim
        op = _lin(attn, fam.output).pow(2) @ vp[kv_row]             # [hidden]
        post = getattr(blk, "post_attention_layernorm", None) if "post_attention_layernorm" in fam.other_norms else None
        P = P + (_gain(post, fam)[0].pow(2) * op / op.mean() if post is not None else op)
        g_m = _gain(getattr(blk, fam.mlp_norm), fam)[0]
        xm = P / P.mean() * g_m.pow(2)
        gp = _lin(mlp, fam.gate).pow(2) @ xm
        up = _lin(mlp, fam.up).pow(2) @ xm
        dp_in = _act_rms(getattr(mlp, fam.activation), gp.sqrt()).pow(2) * up
        dp = _lin(mlp, fam.down).pow(2) @ dp_in
        post = getattr(blk, "post_feedforward_layernorm", None) if "post_feedforward_layernorm" in fam.other_norms else None
        P = P + (_gain(post, fam)[0].pow(2) * dp / dp.mean() if post is not None else dp)
        out.append((x, xm))
    return out


@torch.no_grad()
def measured(model, tok, tokens: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mean square of each input channel of q_proj and gate_proj, per block, over Lee's first tokens (calibration
    text: a diagnosis only), by :func:`fasq.fit.samples.channel_powers`."""
    ids = torch.tensor(tok(load_text("lee"))["input_ids"][:tokens]).view(tokens // 512, 512)
    return [(attn, gate) for attn, gate, _down in channel_powers(model, ids)]


def log_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    la, lb = a.clamp_min(1e-30).log(), b.clamp_min(1e-30).log()
    la, lb = la - la.mean(), lb - lb.mean()
    return float((la * lb).sum() / (la.norm() * lb.norm() + 1e-30))


@torch.no_grad()
def fold_scales(model, powers, alpha: float) -> None:
    """Scale q/k/v (gate/up) columns by s = power ** (alpha / 2) and divide the norm gain by s."""
    fam = family_of(model)
    for (_, blk), (pa, pm) in zip(fam.blocks(model), powers):
        for norm_name, parent, names, p in ((fam.attention_norm, getattr(blk, fam.attention), fam.attention_inputs, pa),
                                            (fam.mlp_norm, getattr(blk, fam.mlp), fam.mlp_inputs, pm)):
            s = p.clamp_min(p.max() * 1e-8).pow(alpha / 2)
            s = s / torch.exp(s.log().mean())
            norm = getattr(blk, norm_name)
            gain, ident = _gain(norm, fam)
            norm.weight.copy_((gain / s - (1.0 - ident)).to(norm.weight.dtype))
            for n in names:
                lin = getattr(parent, n)
                lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def main(argv=None):
    torch.manual_seed(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("source", choices=("model", "oracle", "none"))
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--bits", type=float)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--texts", default="lee,austen")
    ap.add_argument("--diagnose-only", action="store_true")
    ap.add_argument("settings", nargs="*")
    a = ap.parse_intermixed_args(argv)
    torch.set_num_threads(2)
    model, tok = load_any(str(embedded_checkpoint(a.model)))
    est, meas = residual_model(model), measured(model, tok)
    corr_a = [round(log_corr(e[0], m[0]), 3) for e, m in zip(est, meas)]
    corr_m = [round(log_corr(e[1], m[1]), 3) for e, m in zip(est, meas)]
    # The gain alone (what a fold of the norms assumes) against the measured power.
    fam = family_of(model)
    gain_a = [round(log_corr(_gain(getattr(b, fam.attention_norm), fam)[0].pow(2), m[0]), 3)
              for (_, b), m in zip(fam.blocks(model), meas)]
    print("log-corr model/measured, attention inputs:", corr_a)
    print("log-corr model/measured, MLP inputs:      ", corr_m)
    print("log-corr gain^2/measured, attention inputs:", gain_a)
    if a.diagnose_only:
        return
    if a.source != "none":
        fold_scales(model, est if a.source == "model" else meas, a.alpha)
    cfg = FASQConfig(**parse_kv(a.settings))
    rec = {"name": a.name, "model": a.model, "date": str(date.today()),
           "machine": platform.processor() or platform.machine(), "max_tokens": a.max_tokens,
           "act_scale": {"source": a.source, "alpha": a.alpha},
           "log_corr_attention": corr_a, "log_corr_mlp": corr_m}
    t0 = time.perf_counter()
    quantize(model, cfg, progress=False, target_bits=a.bits)
    rec["quantize_seconds"] = round(time.perf_counter() - t0, 1)
    rep = model_size_report(model)
    rec.update(config={k: v for k, v in cfg.to_dict().items() if k not in ("skip_modules", "quant_method")},
               target_bits=a.bits, bits_per_weight=round(rep["bits_per_weight"], 4),
               fraction_of_fp16=round(rep["fraction_of_fp16"], 4))
    score_and_record(model, tok, rec, a.texts.split(","), a.max_tokens)


if __name__ == "__main__":
    main()
