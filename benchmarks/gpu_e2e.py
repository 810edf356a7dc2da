"""A gpt-fast-class decode harness (issue 21): the same Llama-shaped model with FP16, fasq or null linears.

    python benchmarks/gpu_e2e.py --out e2e.json [--targets benchmarks/results/gpu_targets.json]   # H100/H200
    python benchmarks/gpu_e2e.py --dry-run --out x.json     # CPU: tiny model, eager, checks the harness

The decode step (``decode_one_token``) is one function over a static KV cache, compiled with
``torch.compile(mode="reduce-overhead", fullgraph=True)`` on CUDA (CUDA graphs; fasq's ops are custom
ops with fake implementations, so there is no graph break); q/k/v are one fused linear (``wqkv``) and
gate/up another (``w13``), attention is ``F.scaled_dot_product_attention(..., enable_gqa=True)`` on the
cache (no ``repeat_interleave``), RMSNorm and RoPE are a few fused-able ops.  Models: FP16; fasq at
~4 bits (d2 K256) and ~3 bits (d2 K64), each fused linear one v2 launch where the v2 kernel is enabled
(``FASQ_CUDA_V2=1``), else one registry call per layer (the v1 kernel); and **null** linears, stubs that
only write zeros of their output's shape, whose time is the model's non-linear work.  Reported: tok/s,
each model vs FP16, FP16's share of copy bandwidth per token (weight bytes read per token / time /
copy bandwidth), and the null model's time per token.  Random weights (speed only); the LM head stays
FP16 in every model, as fasq's default leaves it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu as gb  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@dataclass(frozen=True)
class Cfg:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv: int = 8
    inter: int = 14336
    vocab: int = 128256
    max_seq: int = 512
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


TINY = Cfg(dim=256, n_layers=2, n_heads=4, n_kv=2, inter=512, vocab=320, max_seq=64)


class NullLinear(nn.Module):
    """Writes zeros of the output's shape: a linear layer of zero cost but its output write."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class FasqFused(nn.Module):
    """Several PQ layers reading one input (q/k/v or gate/up), outputs concatenated: one v2 launch where
    the v2 kernel serves them (operands built once here, one rotation of x), else one call per layer."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.v2 = None
        x_dev = layers[0].codes.device
        if x_dev.type == "cuda":
            from fasq.kernels import cuda_decode_v2 as V
            if V.ENABLED and not V.check_fusable(layers):
                self.v2 = V.layer_operands(layers)

    def forward(self, x):
        if self.v2 is None:
            return torch.cat([lay(x) for lay in self.layers], dim=-1)
        from fasq.kernels.cuda_common import rotate
        s = self.layers[0].spec
        lead = x.shape[:-1]
        x2 = x.reshape(-1, s.in_features)
        if s.rotation_block:
            x2 = rotate(x2, self.layers[0].rot_signs, s.rotation_block)
        lay = self.v2.layout
        y = torch.ops.fasq.cuda_pq_linear_v2(x2.contiguous(), lay.codes, self.v2.codebooks, lay.scales, self.v2.bias,
                                             self.v2.counters, self.v2.meta, lay.in_features, lay.n_spans,
                                             lay.spans_per_group, lay.total_out, lay.bits, len(lay.outs), 0)
        return y.reshape(*lead, lay.total_out)


def make_linear(kind: str, outs: tuple, inp: int, device, dtype, seed: int) -> nn.Module:
    """``kind``: 'fp16', 'null' or a benchmarks/gpu.py format ('4bit d2 K256', ...)."""
    total = sum(outs)
    if kind == "fp16":
        lin = nn.Linear(inp, total, bias=False, device=device, dtype=dtype)
        nn.init.normal_(lin.weight, std=0.02)
        return lin
    if kind == "null":
        return NullLinear(total)
    layers = [gb.random_pq_linear(o, inp, kind, device, seed=seed * 8 + i) for i, o in enumerate(outs)]
    for lay in layers[1:]:   # one rotation serves a fused launch: the same signs (the fit does not do this yet)
        lay.rot_signs.copy_(layers[0].rot_signs)
    return FasqFused(layers) if len(layers) > 1 else layers[0]


def rms_norm(x, w, eps=1e-5):                                   # x: [B, S, D]
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def rope(x, cos, sin):                                          # x: [B, S, H, hd]; cos, sin: [S, hd/2]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg: Cfg, kind: str, device, dtype, seed: int):
        super().__init__()
        hd, q, kv = cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv * cfg.head_dim
        self.cfg = cfg
        self.wqkv = make_linear(kind, (q, kv, kv), cfg.dim, device, dtype, 4 * seed)
        self.wo = make_linear(kind, (cfg.dim,), q, device, dtype, 4 * seed + 1)
        self.w13 = make_linear(kind, (cfg.inter, cfg.inter), cfg.dim, device, dtype, 4 * seed + 2)
        self.w2 = make_linear(kind, (cfg.dim,), cfg.inter, device, dtype, 4 * seed + 3)
        self.attn_norm = nn.Parameter(torch.ones(cfg.dim, device=device, dtype=dtype))
        self.ffn_norm = nn.Parameter(torch.ones(cfg.dim, device=device, dtype=dtype))
        shape = (1, cfg.n_kv, cfg.max_seq, hd)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x, cos, sin, pos, mask):                  # x: [1, S, D]; pos: [S]
        c = self.cfg
        b, s, _ = x.shape
        q, k, v = self.wqkv(rms_norm(x, self.attn_norm)).split(
            [c.n_heads * c.head_dim, c.n_kv * c.head_dim, c.n_kv * c.head_dim], dim=-1)
        q = rope(q.view(b, s, c.n_heads, c.head_dim), cos, sin).transpose(1, 2)    # [1, H, S, hd]
        k = rope(k.view(b, s, c.n_kv, c.head_dim), cos, sin).transpose(1, 2)       # [1, KV, S, hd]
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v.view(b, s, c.n_kv, c.head_dim).transpose(1, 2))
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, s, -1))
        g, u = self.w13(rms_norm(x, self.ffn_norm)).chunk(2, dim=-1)
        return x + self.w2(F.silu(g) * u)


class Model(nn.Module):
    def __init__(self, cfg: Cfg, kind: str, device, dtype):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.dim, device=device, dtype=dtype)    # first: the same in every model
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(Block(cfg, kind, device, dtype, i) for i in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(cfg.dim, device=device, dtype=dtype))
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
        ang = torch.outer(torch.arange(cfg.max_seq, device=device).float(), inv)
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())
        self.register_buffer("causal", torch.tril(torch.ones(cfg.max_seq, cfg.max_seq, dtype=torch.bool,
                                                             device=device)))

    def forward(self, tokens, pos):                             # tokens: [1, S]; pos: [S] -> logits [1, S, vocab]
        x = self.emb(tokens)
        cos, sin, mask = self.cos[pos], self.sin[pos], self.causal[pos][None, None]
        for blk in self.blocks:
            x = blk(x, cos, sin, pos, mask)
        return self.head(rms_norm(x, self.norm))


def decode_one_token(model, token, pos):                        # token: [1, 1]; pos: [1]
    return model(token, pos)[:, -1].argmax(-1, keepdim=True)


def linear_bytes(model: Model) -> int:
    """Weight bytes a decode step reads in its decoder linears (stored bytes) and the FP16 LM head."""
    n = 2 * model.head.weight.numel()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not model.head:
            n += m.weight.numel() * m.weight.element_size()
        elif hasattr(m, "spec") and hasattr(m, "codes"):
            n += m.spec.weight_storage_bytes()
    return n


def run_model(cfg: Cfg, kind: str, device, dtype, prompt_len: int, new_tokens: int, compile_: bool) -> dict:
    torch.manual_seed(0)
    model = Model(cfg, kind, device, dtype).eval()
    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if compile_ else decode_one_token
    with torch.inference_mode():
        prompt = torch.randint(0, cfg.vocab, (1, prompt_len), device=device)
        tok = model(prompt, torch.arange(prompt_len, device=device))[:, -1].argmax(-1, keepdim=True)
        out = []
        t_compile = time.perf_counter()
        for i in range(3):        # warm-up (compile, capture) on the positions after the prompt
            step(model, tok, torch.tensor([prompt_len + i], device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_compile = time.perf_counter() - t_compile
        t0 = time.perf_counter()
        for i in range(new_tokens):
            tok = step(model, tok.clone(), torch.tensor([prompt_len + i], device=device)).clone()
            out.append(tok)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    res = dict(kind=kind, tok_s=new_tokens / dt, ms_per_token=1e3 * dt / new_tokens, warmup_s=t_compile,
               linear_bytes=linear_bytes(model), tokens=torch.cat(out, 1)[0].tolist()[:8])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", type=Path, help="fill this gpu_targets.json's end-to-end and FP16-share rows")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny model, eager")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kinds", default="fp16,null,4bit d2 K256,3bit d2 K64")
    a = ap.parse_args(argv)
    dry = a.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    cfg = TINY if dry else Cfg(n_layers=a.layers)
    dtype = torch.float32 if dry else torch.float16
    res = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
               device="cpu (dry run: nothing meaningful timed)" if dry else torch.cuda.get_device_name(),
               torch=torch.__version__, cfg=cfg.__dict__, dry=dry, rates=gb.device_rates(device, dry), runs=[],
               errors=[])
    for kind in a.kinds.split(","):
        try:
            res["runs"].append(run_model(cfg, kind, device, dtype, 16 if dry else 128,
                                         4 if dry else a.new_tokens, not dry))
            print(json.dumps(res["runs"][-1]), flush=True)
        except Exception as e:   # report, run the rest
            res["errors"].append(f"{kind}: {type(e).__name__}: {e}")
            print(res["errors"][-1], flush=True)
    by = {r["kind"]: r for r in res["runs"]}
    if "fp16" in by:
        f = by["fp16"]
        for r in res["runs"]:
            r["vs_fp16"] = r["tok_s"] / f["tok_s"]
        f["copy_share"] = f["linear_bytes"] / (f["ms_per_token"] * 1e-3) / (res["rates"]["copy_GBps"] * 1e9)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(a.out)
    if a.targets and not dry and a.targets.exists():
        t = json.loads(a.targets.read_text())
        full = cfg.n_layers == 32
        for row in t["targets"]:
            if row["name"].startswith("FP16 harness") and "fp16" in by and full:
                row["measured"] = round(100 * by["fp16"]["copy_share"], 1)
            for fmt, tag in (("4bit d2 K256", "~4 bits"), ("3bit d2 K64", "~3 bits")):
                if row["name"].startswith("end-to-end") and tag in row["name"] and fmt in by and full:
                    row["measured"] = round(by[fmt]["vs_fp16"], 3)
        if not full:
            t["note"] = t.get("note", "") + f"; end-to-end rows left null: the harness ran {cfg.n_layers} of 32 layers"
        t["e2e"] = {k: dict(tok_s=v["tok_s"], vs_fp16=v.get("vs_fp16")) for k, v in by.items()}
        tmp = a.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps(t, indent=1))
        tmp.replace(a.targets)
    return 0 if res["runs"] and not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
