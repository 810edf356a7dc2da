"""GPU speed of fasq's Triton kernels and of end-to-end decoding, against FP16, in one command.

    python benchmarks/gpu.py                      # one H100/H200: under 5 minutes
    python benchmarks/gpu.py --dry-run            # tiny shapes on CPU under the Triton interpreter

1. The card's device-to-device copy bandwidth and FP16 matmul rate.
2. Each kernel on Llama-3-8B's layer shapes (out x in: 4096x4096, 1024x4096, 14336x4096,
   4096x14336) at 1, 2, 4, 8, 16, 512 and 2048 tokens, against ``F.linear`` in FP16: µs, achieved
   GB/s (bytes of the stored weight read / time) and that as a fraction of the copy bandwidth.
   Layers hold random codes of the right format (no k-means: speed does not depend on values).
   A small sweep of decode launch sizes at 1 token records what tuning would gain.
3. 128 tokens decoded after a 128-token prompt by a Llama-3-8B-shaped model (dims from a
   transformers ``LlamaConfig``, random FP16 weights, no download) with a static KV cache and the
   decode step captured in a CUDA graph; FP16 vs fasq at ~4 and ~3 bits/weight (every linear layer
   of the decoder swapped for a random PQLinear; the LM head stays FP16, as fasq's default
   skip_modules leaves it).  Every model runs the same code: same cache, same graph, same loop.

Writes JSON (``--out``) and the section between ``<!-- gpu:begin -->`` and ``<!-- gpu:end -->``
of BENCHMARKS.md (``--markdown``), with the card's name, the date and the command.
The model is a ~60-line gpt-fast-style Llama so that the static cache and graph capture do not
depend on the transformers version; its linear layers have exactly Llama-3-8B's shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # must precede the first Triton import: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FASQ_DISABLE_KERNELS", "all")  # PQLinear on CPU: the reference, no C++ build

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
try:
    import fasq  # noqa: F401
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT / "src"))

from fasq.format import LayerSpec, code_bits
from fasq.nn import PQLinear
from fasq.reference import rotation_block_for

BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"

# name -> (subvector_dim, num_centroids, group_size)
# The two d=2 formats use the presets' scale groups (one fp16 scale per 256 columns).
FORMATS = {"4bit d2 K256": (2, 256, 256), "3bit d2 K64": (2, 64, 256), "3bit d4 K4096": (4, 4096, 128)}
FAST_PATHS = ("acc_wide", "block_scale", "cb_vec", "code_typed", "x_vec")  # Launch switches of the kernel
PLAIN = {f: False for f in FAST_PATHS}
PLAIN_AT = (1, 16, 2048)
SWEEP_FORMATS = ("4bit d2 K256", "3bit d2 K64")   # formats the 1-token launch sweep covers   # token counts where the kernel also runs with every fast path off
E2E_FORMATS = ("4bit d2 K256", "3bit d2 K64", "3bit d4 K4096")
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]          # (out, in); run in this order
TOKENS = [1, 2, 4, 8, 16, 512, 2048]
DRY_SHAPES = [(40, 72), (24, 128)]
DRY_TOKENS = [1, 20]


# ---------------------------------------------------------------------------------------------
# Timing

GRAPH_TARGET_MS = 4.0    # GPU time per graph replay
GRAPH_REPLAYS = 7


def bench(fn, device) -> float:
    """Median µs of one eager fn() call, host launch cost included (triton's do_bench, L2 flushed
    before each run); CPU (--dry-run): one wall-clock run."""
    if device.type == "cuda":
        import triton.testing
        return 1000.0 * triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def copies_for(n_bytes: int, device) -> int:
    """Weight copies to cycle through so that each call reads its weight from DRAM, not from L2
    (together at least 2.5x the L2 size), at most 64."""
    if device.type != "cuda":
        return 2                                      # --dry-run: checks the cycling, times nothing
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(64, math.ceil(2.5 * l2 / max(n_bytes, 1))))


def gpu_time(fns: list, device) -> float:
    """Median µs per call of the GPU work alone: the calls ``fns`` (one per weight copy, each
    reading a different weight) captured in a CUDA graph and replayed, so host launch costs are
    not in the figure and each call finds its weight outside L2, as one decoding step does.
    CPU (--dry-run): wall-clock time of one pass / len(fns)."""
    if device.type != "cuda":
        for f in fns:
            f()
        t0 = time.perf_counter()
        for f in fns:
            f()
        return 1e6 * (time.perf_counter() - t0) / len(fns)
    for f in fns:                                     # compile, allocate, build caches
        f()
    cur = torch.cuda.current_stream()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for f in fns:
        f()
    e1.record()
    torch.cuda.synchronize()
    passes = max(1, min(50, math.ceil(GRAPH_TARGET_MS / max(e0.elapsed_time(e1), 1e-3))))
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for f in fns:
            f()
    cur.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(passes):
            for f in fns:
                f()
    graph.replay()
    times = []
    for _ in range(GRAPH_REPLAYS):
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    del graph
    times.sort()
    return 1000.0 * times[len(times) // 2] / (passes * len(fns))


def device_rates(device, dry: bool) -> dict:
    n_bytes = (4 << 20) if dry else (1 << 30)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src), device)
    n = 128 if dry else 8192
    dt = torch.float32 if dry else torch.float16
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    mm_us = bench(lambda: a @ b, device)
    return {"copy_GBps": 2 * n_bytes / us / 1e3, "copy_bytes": n_bytes,
            "copy_note": "device-to-device copy: (bytes read + bytes written) / time",
            "matmul_TFLOPs": 2 * n ** 3 / mm_us / 1e6, "matmul_n": n, "matmul_dtype": str(dt)}


# ---------------------------------------------------------------------------------------------
# Random layers of a given format

OUTLIER_FRACTION = 1e-3   # as fasq's default config (FASQConfig.outlier_fraction); --outliers sets it


def random_pq_linear(out_f: int, in_f: int, fmt: str, device, seed: int = 0) -> PQLinear:
    """A PQLinear with random buffers of the format: any bit pattern is a valid code (K = 2**bits),
    and OUTLIER_FRACTION of the weights in the sparse correction, as fasq's default config keeps."""
    d, k, group = FORMATS[fmt]
    if k & (k - 1):
        raise ValueError(f"format {fmt!r}: random codes need K a power of two, got {k}")
    n_out = round(OUTLIER_FRACTION * out_f * in_f)
    spec = LayerSpec(in_f, out_f, d, k, 1, group, True, rotation_block_for(in_f, 256), False, n_out)
    layer = PQLinear(spec, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    m, o, w = layer.codes.shape
    layer.codes.copy_(torch.randint(0, 256, (m, o, 4 * w), generator=g, device=device, dtype=torch.uint8)
                      .view(torch.int32))
    layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=g, device=device))
    layer.scales.copy_(0.02 * (0.5 + torch.rand(layer.scales.shape, generator=g, device=device)))
    layer.rot_signs.copy_(torch.randint(0, 2, layer.rot_signs.shape, generator=g, device=device) * 2 - 1)
    if n_out:
        idx = torch.randperm(out_f * in_f, generator=g, device=device)[:n_out]
        layer.outlier_idx.copy_(idx.sort().values.to(torch.int32))
        layer.outlier_val.copy_(0.05 * torch.randn(n_out, generator=g, device=device))
    return layer


def make_launch(tk, tokens: int, n_sub: int, block_o: int, block_j: int, splits: int, num_warps: int):
    bt = triton_next_pow2(tokens)
    use_dot = bt > 4
    bt = 16 if use_dot else bt
    chunks = math.ceil(n_sub / block_j)
    per = math.ceil(chunks / max(1, min(splits, chunks)))
    return tk.Launch(bt, block_o, block_j, use_dot, math.ceil(chunks / per), per * block_j, num_warps=num_warps)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# The CUDA kernel's 1-token launch sweep: (warps per block, 16-row tiles per warp, splits; 0 = plan's choice).
CUDA_SWEEP = [(8, 1, 0), (8, 2, 0), (8, 4, 0), (4, 1, 0), (4, 2, 0), (16, 1, 0), (8, 1, 2), (8, 1, 4), (8, 2, 2),
              (4, 1, 4)]


def cuda_rows(tokens: int, x, xr, copies, base: dict, fmt: str, device, cuda_sweep: bool, rows: list,
              sweeps: list, skipped: list) -> None:
    """The CUDA decode kernel (fasq.kernels.cuda_decode) on a rotated input: its default launch
    at each token count it serves, and at 1 token a sweep of launches (``sweeps``)."""
    from fasq.kernels import cuda_decode as cd
    from fasq.kernels import outlier_csr_cached
    s = copies[0].spec
    n_groups = copies[0].scales.shape[1]
    rb = s.rotation_block

    def plan(rot, **kw):
        return cd.plan(tokens, s.in_features, s.out_features, s.subvector_dim, s.num_centroids, n_groups,
                       s.effective_group, x.dtype, device, rot_block=rot, **kw)

    def run(L, cfg, fused):
        if fused:   # the input as the model has it: the kernel rotates it (or rotates it first where it cannot)
            csr = outlier_csr_cached(L) if cfg.outliers else None
            return cd.pq_decode(x, L.codes, L.codebooks, L.scales, None, s.in_features, s.subvector_dim,
                                s.effective_group, cfg, rot_signs=L.rot_signs, rotation_block=rb, outliers=csr)
        return cd.pq_decode(xr, L.codes, L.codebooks, L.scales, None, s.in_features, s.subvector_dim,
                            s.effective_group, cfg)
    dflt, dflt_rot = plan(0), plan(rb)
    if dflt is None:
        return
    ref = F.linear(xr.float(), _w_rotated(copies[0]))
    if s.n_outliers:
        from fasq import reference
        rows_o, cols_o = reference.outlier_rows_cols(copies[0].outlier_idx, s.in_features)
        ref_o = reference.add_outliers_to_output(ref, x.float(), rows_o, cols_o, copies[0].outlier_val)
    variants = [("cuda decode", dflt, False, None), ("cuda decode, rotation fused", dflt_rot, True, None)]
    if tokens == 1:   # the kernel built without its fast lookups (FQ_FAST=0), for comparison
        variants.append(("cuda decode, rotation fused, plain lookups", dflt_rot, True, "0"))
    if s.n_outliers:  # the outlier correction in the kernel's epilogue (FASQ_CUDA_FUSED_OUTLIERS=1)
        variants.append(("cuda decode + outliers in the epilogue", dataclasses.replace(dflt_rot, outliers=True),
                         True, None))
    for name, cfg, fused, fast in variants:
        try:
            with env_var("FASQ_CUDA_FAST", fast):
                y = run(copies[0], cfg, fused)
                want = ref_o if cfg.outliers else ref
                err = ((y.float() - want).abs().max() / want.abs().max()).item()
                us = gpu_time([lambda L=L: run(L, cfg, fused) for L in copies], device)
        except Exception as e:  # report, keep measuring the rest
            skipped.append(f"{name} {base['shape']} {fmt} tokens={tokens}: {type(e).__name__}: {e}")
            print(skipped[-1], flush=True)
            continue
        rows.append(dict(base, format=fmt, method=name, us=us, bytes=s.weight_storage_bytes(),
                         bits_per_weight=s.bits_per_weight(), copies=len(copies), launch=dataclasses.asdict(cfg),
                         rel_err_vs_dequant=err))
    if not (cuda_sweep and tokens == 1):
        return
    for nw, rt, sp in CUDA_SWEEP:
        cfg = plan(rb, nwarps=nw, rowt=rt, splits=sp)
        try:
            us = gpu_time([lambda L=L, cfg=cfg: run(L, cfg, True) for L in copies], device)
        except Exception as e:
            skipped.append(f"cuda sweep {base['shape']} {fmt} w{nw} r{rt} s{sp}: {type(e).__name__}: {e}")
            continue
        sweeps.append(dict(base, format=fmt, variant=f"w{nw}_r{rt}_s{sp or 'auto'}({cfg.splits})",
                           launch=dataclasses.asdict(cfg), default=cfg == dflt_rot, us=us, rot_block=rb,
                           bytes=s.weight_storage_bytes()))


def _w_rotated(layer):
    """W_r of a PQLinear in fp32 (for a correctness figure next to the timings)."""
    from fasq import reference
    return reference.dequantize_rotated(layer.spec, layer.codes, layer.codebooks, layer.scales)


def kernel_timings(device, dry: bool, deadline: float, sweep: bool, cuda_sweep: bool = True
                   ) -> tuple[list, list, list, list]:
    """Every row's ``us`` is GPU time per call from :func:`gpu_time` (graph replay, weights cold in
    L2); ``auto op, eager`` alone is one eager call with its host launch cost."""
    from fasq.kernels import triton_kernels as tk
    dtype = torch.float32 if dry else torch.float16
    shapes, token_list = (DRY_SHAPES, DRY_TOKENS) if dry else (SHAPES, TOKENS)
    rows, sweeps, skipped, csweeps = [], [], [], []
    for out_f, in_f in shapes:
        if time.monotonic() > deadline:
            skipped.append(f"kernels {out_f}x{in_f}: time budget spent")
            continue
        n16 = copies_for(out_f * in_f * 2, device)
        w16 = [torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02 for _ in range(n16)]
        layers = {}
        for i, fmt in enumerate(FORMATS):
            first = random_pq_linear(out_f, in_f, fmt, device, seed=100 * i)
            n = copies_for(first.spec.weight_storage_bytes(), device)
            layers[fmt] = [first] + [random_pq_linear(out_f, in_f, fmt, device, seed=100 * i + c) for c in range(1, n)]
        for tokens in token_list:
            if time.monotonic() > deadline:
                skipped.append(f"kernels {out_f}x{in_f} tokens={tokens}: time budget spent")
                continue
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            base = dict(shape=f"{out_f}x{in_f}", out=out_f, **{"in": in_f}, tokens=tokens)
            us = gpu_time([lambda w=w: F.linear(x, w) for w in w16], device)
            rows.append(dict(base, format="fp16", method="F.linear", us=us, bytes=w16[0].numel() * w16[0].element_size(),
                             copies=n16))
            for fmt, copies in layers.items():
                s = copies[0].spec
                xr = tk.rotate(x, copies[0].rot_signs, s.rotation_block)
                group = s.effective_group if copies[0].scales.shape[1] > 1 else 0

                def args(L):
                    return (L.codes, L.codebooks, L.scales, None, s.in_features, s.subvector_dim, s.effective_group)
                decode = tokens <= tk.DECODE_MAX_TOKENS
                kind = "decode" if decode else "prefill"
                if decode:
                    dflt = tk.decode_launch(tokens, in_f, out_f, s.subvector_dim, s.bits, device, 0, group)
                else:
                    dflt = tk.prefill_launch(tokens, in_f, out_f, s.subvector_dim, s.bits, group)
                methods = {kind: lambda L: tk.pq_matmul(xr, *args(L), launch=dflt),
                           "auto op (with rotation)": lambda L: L(x)}
                if tokens >= 16 or dry:
                    methods["dequant+F.linear"] = lambda L: F.linear(xr, tk.dequantize_rotated(
                        *args(L)[:3], *args(L)[4:], dtype=dtype))
                if tokens in PLAIN_AT or dry:
                    plain = dataclasses.replace(dflt, **PLAIN)
                    methods[f"{kind}, fast paths off"] = lambda L: tk.pq_matmul(xr, *args(L), launch=plain)
                if tokens in (1, max(token_list)) or dry:
                    methods["rotation only"] = lambda L: tk.rotate(x, L.rot_signs, s.rotation_block)
                    if tk.fused_rotation_applies(x, s.rotation_block):
                        methods["rotation only, fused kernel"] = lambda L: tk.rotate_fused(x, L.rot_signs,
                                                                                           s.rotation_block)
                if copies[0].spec.n_outliers and (tokens in (1, max(token_list)) or dry):
                    y0 = torch.zeros(tokens, out_f, device=device, dtype=dtype)
                    methods["outlier correction"] = lambda L: (tk._add_outliers(y0, x, L) if device.type == "cuda"
                                                               else None)
                if tokens == 1 or dry:
                    methods["dequant only"] = lambda L: tk.dequantize_rotated(*args(L)[:3], *args(L)[4:], dtype=dtype)
                    methods["dequant only, unpacked"] = lambda L: tk.dequantize_rotated(
                        *args(L)[:3], *args(L)[4:], dtype=dtype, packed=False)
                    methods[f"{kind} + cb_smem"] = lambda L: tk.pq_matmul(xr, *args(L), launch=dataclasses.replace(
                        dflt, cb_smem=True))
                if device.type == "cuda" and tokens <= 8:
                    cuda_rows(tokens, x, xr, copies, base, fmt, device, cuda_sweep, rows, csweeps, skipped)
                for name, fn in methods.items():
                    us = gpu_time([lambda L=L, fn=fn: fn(L) for L in copies], device)
                    rows.append(dict(base, format=fmt, method=name, us=us, bytes=s.weight_storage_bytes(),
                                     bits_per_weight=s.bits_per_weight(), copies=len(copies)))
                if tokens == 1:
                    us = bench(lambda: copies[0](x), device)
                    rows.append(dict(base, format=fmt, method="auto op, eager (host launch included)", us=us,
                                     bytes=s.weight_storage_bytes(), bits_per_weight=s.bits_per_weight(), copies=1))
                if sweep and tokens == 1 and fmt in SWEEP_FORMATS and time.monotonic() < deadline:
                    variants = {"default": dflt, "all fast paths off": dataclasses.replace(dflt, **PLAIN)}
                    for flag in FAST_PATHS:
                        variants[f"no {flag}"] = dataclasses.replace(dflt, **{flag: False})
                    for bo, bj, nw in ((8, dflt.block_j, 2), (32, dflt.block_j, 4),
                                       (16, max(16, dflt.block_j // 2), 2), (64, max(16, dflt.block_j // 4), 4)):
                        for smem in (False, True):
                            variants[f"o{bo}_j{bj}_w{nw}" + ("_smem" if smem else "")] = dataclasses.replace(
                                make_launch(tk, 1, s.n_sub, bo, bj, dflt.splits, nw), cb_smem=smem)
                    for sp in sorted({1, max(1, dflt.splits // 2), 2 * dflt.splits}):
                        for smem in (False, True):
                            variants[f"splits{sp}" + ("_smem" if smem else "")] = dataclasses.replace(
                                make_launch(tk, 1, s.n_sub, dflt.block_o, dflt.block_j, sp, dflt.num_warps),
                                cb_smem=smem)
                    for vname, launch in variants.items():
                        us = gpu_time([lambda L=L, launch=launch: tk.pq_matmul(xr, *args(L), launch=launch)
                                       for L in copies], device)
                        sweeps.append(dict(base, format=fmt, variant=vname, launch=launch.__dict__, us=us,
                                           bytes=s.weight_storage_bytes()))
        del w16, layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, sweeps, skipped, csweeps


def by_case(rows: list) -> dict:
    """Rows grouped by (shape, format), in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["format"]), []).append(r)
    return groups


def sweep_wins(rows: list, is_default) -> list:
    """(shape, format, default row, fastest row) for each case whose fastest launch beats the
    default (``is_default(row)``) by >= 3%."""
    wins = []
    for (shape, fmt), rs in by_case(rows).items():
        d = next((r for r in rs if is_default(r)), None)
        b = min(rs, key=lambda r: r["us"])
        if d is not None and b["us"] < 0.97 * d["us"]:
            wins.append((shape, fmt, d, b))
    return wins


@contextlib.contextmanager
def env_var(name: str, value):
    """``os.environ[name] = value`` inside the block (nothing when value is None), restored after."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def tune_cuda(csweeps: list) -> dict:
    """For each (shape, format): the CUDA sweep's fastest launch, if >= 3% faster than the planner's
    default; installed in ``cuda_decode.TUNED`` for the end-to-end run."""
    from fasq.kernels import cuda_decode as cd
    chosen = {}
    for shape, fmt, d, b in sweep_wins(csweeps, lambda r: r["default"]):
        sd, k, group = FORMATS[fmt]
        cd.TUNED[(1, d["in"], d["out"], sd, k, group, torch.float16, d["rot_block"])] = cd.Config(**b["launch"])
        chosen[f"{shape} {fmt}"] = b["variant"]
    return chosen


def tune_decode(sweeps: list) -> dict:
    """For each (shape, format): the 1-token sweep's fastest launch, if >= 3% faster than the
    heuristics' default; installed in ``triton_kernels.DECODE_TUNED`` for the end-to-end run."""
    from fasq.kernels import triton_kernels as tk
    chosen = {}
    for shape, fmt, d, b in sweep_wins(sweeps, lambda r: r["variant"] == "default"):
        sd, k, group = FORMATS[fmt]
        tk.DECODE_TUNED[(1, d["in"], d["out"], sd, code_bits(k), group)] = tk.Launch(**b["launch"])
        chosen[f"{shape} {fmt}"] = b["variant"]
    return chosen


# ---------------------------------------------------------------------------------------------
# End to end: a gpt-fast-style Llama with a static KV cache

class RMSNorm(nn.Module):
    def __init__(self, dim, eps, device, dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, cfg, max_len, device, dtype):
        super().__init__()
        h, self.n_h, self.n_kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = h // self.n_h
        lin = lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=dtype)  # noqa: E731
        self.q_proj, self.k_proj = lin(h, self.n_h * self.hd), lin(h, self.n_kv * self.hd)
        self.v_proj, self.o_proj = lin(h, self.n_kv * self.hd), lin(self.n_h * self.hd, h)
        self.gate_proj, self.up_proj = lin(h, cfg.intermediate_size), lin(h, cfg.intermediate_size)
        self.down_proj = lin(cfg.intermediate_size, h)
        self.norm1 = RMSNorm(h, cfg.rms_norm_eps, device, dtype)
        self.norm2 = RMSNorm(h, cfg.rms_norm_eps, device, dtype)
        self.register_buffer("k_cache", torch.zeros(1, self.n_kv, max_len, self.hd, device=device, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(1, self.n_kv, max_len, self.hd, device=device, dtype=dtype))

    def forward(self, x, pos, cos, sin, mask):          # x: [1, T, h], pos: [T]
        t = x.shape[1]
        a = self.norm1(x)
        q = self.q_proj(a).view(1, t, self.n_h, self.hd).transpose(1, 2)
        k = self.k_proj(a).view(1, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(a).view(1, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        rep = self.n_h // self.n_kv
        o = F.scaled_dot_product_attention(q, self.k_cache.repeat_interleave(rep, 1),
                                           self.v_cache.repeat_interleave(rep, 1), attn_mask=mask)
        x = x + self.o_proj(o.transpose(1, 2).reshape(1, t, self.n_h * self.hd))
        m = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


def rope(x, cos, sin):                                   # x: [1, H, T, hd]; cos, sin: [T, hd]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def rope_theta(cfg) -> float:
    """RoPE base: ``rope_parameters['rope_theta']`` in transformers 5, ``rope_theta`` before."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 500000.0)


class Llama(nn.Module):
    def __init__(self, cfg, max_len, device, dtype):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, max_len, device, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        hd = cfg.hidden_size // cfg.num_attention_heads
        inv = 1.0 / (rope_theta(cfg) ** (torch.arange(0, hd, 2, device=device).float() / hd))
        ang = torch.outer(torch.arange(max_len, device=device).float(), inv)
        self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1))
        self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1))
        self.register_buffer("positions", torch.arange(max_len, device=device))

    def forward(self, tokens, pos):                      # tokens: [1, T], pos: [T] -> logits [1, vocab]
        x = self.embed(tokens)
        cos, sin = self.cos[pos], self.sin[pos]
        mask = self.positions[None, :] <= pos[:, None]  # [T, max_len]
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        return self.lm_head(self.norm(x[:, -1]))


def swap_linears(model: Llama, fmt: str, device) -> None:
    """Replace every decoder linear layer (FP16 or PQ) by a random PQLinear of ``fmt``."""
    for i, block in enumerate(model.layers):
        for j, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            old = getattr(block, name)
            setattr(block, name, None)
            new = random_pq_linear(old.out_features, old.in_features, fmt, device, seed=1000 * i + j)
            del old
            setattr(block, name, new)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def weight_bytes(model: Llama) -> int:
    total = 0
    for mod in model.modules():
        if isinstance(mod, PQLinear):
            total += mod.spec.weight_storage_bytes()
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def decode_speed(model: Llama, prompt: torch.Tensor, new_tokens: int, mode: str) -> dict:
    """Prefill the prompt (eager; timed on its second run), then time ``new_tokens`` greedy decode steps."""
    device = prompt.device
    p = prompt.shape[1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(2):                              # the first run compiles kernels
            sync()
            t0 = time.perf_counter()
            first = model(prompt, torch.arange(p, device=device)).argmax(-1).view(1, 1)
            sync()
        prefill_ms = 1e3 * (time.perf_counter() - t0)
        tok, pos = first.clone(), torch.full((1,), p, device=device, dtype=torch.long)
        generated = torch.zeros(new_tokens, device=device, dtype=torch.long)

        def step():
            nxt = model(tok, pos).argmax(-1).view(1, 1)
            generated.index_copy_(0, (pos - p).clamp(0, new_tokens - 1), nxt.view(1))
            tok.copy_(nxt)
            pos.add_(1)

        run = step
        if mode == "cuda_graph":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            pos.fill_(p)
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        times = []
        for _ in range(2):                              # first pass warms up, second is timed
            pos.fill_(p)
            tok.copy_(first)
            sync()
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                run()
            sync()
            times.append(time.perf_counter() - t0)
    return {"tok_s": new_tokens / times[-1], "decode_s": times[-1], "prefill_ms": prefill_ms,
            "first_tokens": generated[:8].tolist()}


def end_to_end(device, dry: bool, layers: int | None) -> dict:
    from transformers import LlamaConfig
    if dry:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, rope_theta=500000.0)
        prompt_len, new_tokens, dtype, mode = 4, 3, torch.float32, "eager"
    else:  # Llama-3-8B
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5)
        prompt_len, new_tokens, dtype, mode = 128, 128, torch.float16, "cuda_graph"
    note = ""
    if layers:
        cfg.num_hidden_layers = layers
        note = f"{layers} decoder layers (of Llama-3-8B's 32), by --layers"
    elif device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 40 << 30:
        cfg.num_hidden_layers = 8
        note = "8 decoder layers (of Llama-3-8B's 32): the card has under 40 GiB"
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    result = {"config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads", "vocab_size")},
              "prompt_tokens": prompt_len, "new_tokens": new_tokens, "dtype": str(dtype), "note": note,
              "shape_note": "tiny Llama config (dry run)" if dry else "Llama-3-8B-shaped",
              "lm_head": "the LM head stays unquantized (baseline dtype) in every model, as fasq skips lm_head by default", "errors": []}
    # Every model runs in the same mode: if the graph capture fails for any of them, all of them
    # are run again eagerly (the model is rebuilt, as the FP16 weights were swapped out).
    for m in ([mode, "eager"] if mode != "eager" else ["eager"]):
        try:
            result.update(mode=m, runs=_e2e_runs(cfg, prompt, new_tokens, device, dtype, m))
            break
        except Exception as e:
            result["errors"].append(f"mode {m} failed, {type(e).__name__}: {e}")
            if m == "eager":
                raise
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    base = result["runs"][0]["tok_s"]
    for r in result["runs"]:
        r["vs_fp16"] = r["tok_s"] / base
    return result


def _e2e_runs(cfg, prompt, new_tokens, device, dtype, mode) -> list[dict]:
    torch.manual_seed(0)
    with torch.no_grad():
        model = Llama(cfg, prompt.shape[1] + new_tokens, device, dtype)
        for prm in model.parameters():
            if prm.dim() == 2:
                prm.normal_(0, 0.02)
    runs = []
    base = "fp16" if dtype == torch.float16 else str(dtype).replace("torch.", "")
    for name, fmt in [(base, None)] + [(f"fasq {fmt}", fmt) for fmt in E2E_FORMATS]:
        if fmt:
            swap_linears(model, fmt, device)
        run = decode_speed(model, prompt, new_tokens, mode)
        bits = 16.0 if fmt is None else model.layers[0].q_proj.spec.bits_per_weight()
        runs.append(dict(run, model=name, bits_per_weight_linear=bits, weight_bytes=weight_bytes(model)))
        print(f"e2e {name}: {run['tok_s']:.1f} tok/s ({mode})", flush=True)
        if fmt == E2E_FORMATS[0] and device.type == "cuda":   # the same model on the Triton decode kernel
            off = ",".join(filter(None, [os.environ.get("FASQ_DISABLE_KERNELS"), "cuda_decode"]))
            with env_var("FASQ_DISABLE_KERNELS", off):
                run = decode_speed(model, prompt, new_tokens, mode)
            runs.append(dict(run, model=f"{name}, Triton decode", bits_per_weight_linear=bits,
                             weight_bytes=weight_bytes(model)))
            print(f"e2e {name}, Triton decode: {run['tok_s']:.1f} tok/s ({mode})", flush=True)
    del model
    return runs


# ---------------------------------------------------------------------------------------------
# Report

def annotate(rows: list, copy_gbps: float) -> None:
    fp16 = {(r["shape"], r["tokens"]): r["us"] for r in rows if r["format"] == "fp16"}
    for r in rows:
        r["GBps"] = r["bytes"] / r["us"] / 1e3
        r["frac_copy_bw"] = r["GBps"] / copy_gbps
        r["speedup_vs_fp16"] = fp16[(r["shape"], r["tokens"])] / r["us"] if (r["shape"], r["tokens"]) in fp16 else None


def targets(res: dict) -> list[str]:
    """Each issue-5 target, checked against this run's measurements (no estimates)."""
    out = []
    dec = [r for r in res["kernels"] if r["method"] == "decode" and r["tokens"] == 1]
    for fmt in FORMATS:
        f = [r["frac_copy_bw"] for r in dec if r["format"] == fmt]
        if f:
            out.append(f"decode kernel at 1 token, {fmt}: lowest fraction of copy bandwidth over the shapes "
                       f"{min(f):.0%} (target >= 80%)")
    for method in ("cuda decode", "cuda decode, rotation fused"):
        cdec = [r for r in res["kernels"] if r["method"] == method and r["tokens"] == 1]
        for fmt in FORMATS:
            f = [r["frac_copy_bw"] for r in cdec if r["format"] == fmt]
            if f:
                out.append(f"{method.replace('cuda', 'CUDA')} at 1 token, {fmt}: lowest fraction of copy bandwidth "
                           f"over the shapes {min(f):.0%}, highest {max(f):.0%} (target >= 80%)")
    runs = {r["model"]: r for r in res.get("end_to_end", {}).get("runs", [])}
    for name, goal in (("fasq 4bit d2 K256", 3.0), ("fasq 3bit d2 K64", 3.5), ("fasq 3bit d4 K4096", 3.5)):
        if name in runs and runs[name]["vs_fp16"]:
            out.append(f"end-to-end {name}: {runs[name]['vs_fp16']:.2f}x FP16 tok/s (target >= {goal}x)")
    big = max(r["tokens"] for r in res["kernels"]) if res["kernels"] else 0
    pre = [r for r in res["kernels"] if r["tokens"] == big and r["method"] in ("prefill", "dequant+F.linear")]
    for fmt in FORMATS:
        best = {}
        for r in pre:
            if r["format"] == fmt:
                best[r["shape"]] = max(best.get(r["shape"], 0), r["speedup_vs_fp16"] or 0)
        if best:
            out.append(f"prefill at {big} tokens, {fmt}: lowest speed vs FP16 F.linear over the shapes "
                       f"{min(best.values()):.2f}x, best of prefill kernel and dequant+F.linear (target >= 0.9x)")
    return out


def res_shapes(res: dict) -> list[str]:
    return list(dict.fromkeys(r["shape"] for r in res["kernels"]))


def markdown(res: dict) -> str:
    dev, rates = res["device"], res["device_rates"]
    lines = [BEGIN, "## GPU kernels and decoding (benchmarks/gpu.py)", ""]
    if res["dry_run"]:
        lines += ["**DRY RUN** on CPU with the Triton interpreter and tiny shapes: a check of the script, "
                  "not speed figures.", ""]
    lines += [f"- card: {dev['name']} (compute capability {dev.get('capability')}); date: {res['date']}",
              f"- command: `{res['command']}`",
              f"- torch {res['versions']['torch']}, triton {res['versions']['triton']}, "
              f"transformers {res['versions']['transformers']}",
              f"- layers: random codes of each format, {res.get('outlier_fraction', 0):g} of the weights in the "
              "sparse outlier correction (fasq's default keeps 1e-3)",
              f"- copy bandwidth {rates['copy_GBps']:.0f} GB/s ({rates['copy_note']}); "
              f"{rates['matmul_dtype']} matmul {rates['matmul_TFLOPs']:.1f} TFLOP/s at n={rates['matmul_n']}",
              "", "### Targets (issue 5), as measured", ""]
    lines += [f"- {t}" for t in targets(res)] + [""]
    lines += ["### Kernels", "",
              "GPU µs per call: calls replayed from a CUDA graph (no host launch cost), cycling through enough "
              "copies of the layer that its weight is read from DRAM, not L2 (median of 7 replays). `auto op` is "
              "PQLinear's forward as a model runs it (the registry's choice, input rotation included); the kernel "
              "columns take a rotated input; `outliers` is the sparse outlier correction alone (included in "
              "`auto op`); `rotation` is the input rotation alone (sign flip and Hadamard matmul "
              "in torch, as the op runs it; `fused`: the one-pass `rotate_kernel`). "
              "'% copy BW' = (bytes of the stored weight / decode-kernel time) / copy bandwidth. "
              "Every row is in the JSON, with GB/s.", ""]
    by = {(r["shape"], r["tokens"], r["format"], r["method"]): r for r in res["kernels"]}
    keys = sorted({(r["shape"], r["tokens"]) for r in res["kernels"]},
                  key=lambda k: (res_shapes(res).index(k[0]), k[1]))
    cols = ("cuda decode", "cuda decode, rotation fused", "decode", "decode, fast paths off", "prefill", "prefill, fast paths off", "dequant+F.linear",
            "rotation only", "rotation only, fused kernel", "outlier correction", "auto op (with rotation)")
    for fmt in FORMATS:
        bpw = next((r["bits_per_weight"] for r in res["kernels"] if r["format"] == fmt), None)
        if bpw is None:
            continue
        lines += [f"**{fmt}** ({bpw:.3f} bits/weight on the first shape)", "",
                  "| shape (out x in) | tokens | FP16 F.linear | CUDA decode | CUDA decode + rotation | decode "
                  "| decode, plain | prefill | prefill, plain | dequant+F.linear | rotation | rotation, fused "
                  "| outliers | auto op | auto vs FP16 | CUDA decode % copy BW | decode % copy BW |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                  "| ---: | ---: | ---: |"]
        for shape, t in keys:
            fp16 = by.get((shape, t, "fp16", "F.linear"))
            cells = [f"{by[(shape, t, fmt, c)]['us']:.1f}" if (shape, t, fmt, c) in by else "" for c in cols]
            auto = by.get((shape, t, fmt, cols[-1]))
            dec = by.get((shape, t, fmt, "decode"))
            cdec = by.get((shape, t, fmt, "cuda decode"))
            lines.append(f"| {shape} | {t} | {fp16['us']:.1f} | " + " | ".join(cells) +
                         f" | {auto['speedup_vs_fp16']:.2f}x | " + (f"{cdec['frac_copy_bw']:.0%}" if cdec else "") +
                         " | " + (f"{dec['frac_copy_bw']:.0%}" if dec else "") + " |"
                         if fp16 and auto else f"| {shape} | {t} |" + " |" * 15)
        lines.append("")
    extra = ("decode + cb_smem", "dequant only", "dequant only, unpacked", "auto op, eager (host launch included)")
    if any(r["method"] in extra for r in res["kernels"]):
        lines += ["At 1 token: the decode kernel with the codebook looked up through `tl.gather` (`cb_smem`); "
                  "the dequantize kernel alone (GB/s = bytes of the 16-bit weight written / time), with and "
                  "without its packed path; and one eager call of the auto op, host launch cost included "
                  "(µs):", "",
                  "| shape | format | decode | decode + cb_smem | dequant only | GB/s written | dequant, unpacked "
                  "| auto op (graph) | auto op, eager |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for shape in res_shapes(res):
            for fmt in FORMATS:
                g = {r["method"]: r for r in res["kernels"] if r["shape"] == shape and r["format"] == fmt
                     and r["tokens"] == 1}
                if "dequant only" not in g:
                    continue
                out_f, in_f = g["dequant only"]["out"], g["dequant only"]["in"]
                cell = lambda m: f"{g[m]['us']:.1f}" if m in g else ""  # noqa: E731
                lines.append(f"| {shape} | {fmt} | {cell('decode')} | {cell('decode + cb_smem')} | "
                             f"{cell('dequant only')} | {2 * out_f * in_f / g['dequant only']['us'] / 1e3:.0f} | "
                             f"{cell('dequant only, unpacked')} | {cell('auto op (with rotation)')} | "
                             f"{cell('auto op, eager (host launch included)')} |")
        lines.append("")
    if res["decode_sweep"]:
        lines += ["Decode launch sweep at 1 token (`default` is what the heuristics pick; `_smem`: with "
                  "`cb_smem`):", "",
                  "| shape | format | default µs | best variant | best µs | best % copy BW |",
                  "| --- | --- | ---: | --- | ---: | ---: |"]
        groups = by_case(res["decode_sweep"])
        for (shape, fmt), rs in groups.items():
            d = next(r for r in rs if r["variant"] == "default")
            b = min(rs, key=lambda r: r["us"])
            lines.append(f"| {shape} | {fmt} | {d['us']:.1f} | {b['variant']} | {b['us']:.1f} | {b['frac_copy_bw']:.0%} |")
        ablate = ["all fast paths off"] + [f"no {f}" for f in FAST_PATHS]
        lines += ["", "Fast paths of the decode kernel at 1 token, one switched off at a time (µs; "
                  "`default` has every one that applies on):", "",
                  "| shape | format | default | " + " | ".join(ablate) + " |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in ablate) + " |"]
        for (shape, fmt), rs in groups.items():
            by_v = {r["variant"]: r["us"] for r in rs}
            lines.append(f"| {shape} | {fmt} | {by_v['default']:.1f} | " +
                         " | ".join(f"{by_v[v]:.1f}" if v in by_v else "" for v in ablate) + " |")
    if res.get("cuda_sweep"):
        lines += ["", "CUDA decode kernel launches at 1 token, input rotation fused (`w`: warps per block, `r`: "
                  "16-row tiles per warp, `s`: splits of the reduction dim asked for (made)); `default` is what "
                  "`cuda_decode.plan` picks:", "",
                  "| shape | format | default | default µs | best | best µs | best % copy BW | worst µs |",
                  "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
        for (shape, fmt), rs in by_case(res["cuda_sweep"]).items():
            d = next((r for r in rs if r["default"]), None)
            b = min(rs, key=lambda r: r["us"])
            w = max(rs, key=lambda r: r["us"])
            lines.append(f"| {shape} | {fmt} | {d['variant'] if d else ''} | {d['us'] if d else float('nan'):.1f} | "
                         f"{b['variant']} | {b['us']:.1f} | {b['frac_copy_bw']:.0%} | {w['us']:.1f} |")
    e2e = res.get("end_to_end")
    if e2e:
        lines += ["", f"### End to end: {e2e['new_tokens']} tokens after a {e2e['prompt_tokens']}-token prompt, "
                  f"batch 1, {e2e['dtype']}, mode {e2e['mode']}", ""]
        if e2e["note"]:
            lines += [f"Model: {e2e['note']}.", ""]
        if res.get("cuda_tuned"):
            lines += ["CUDA decode launches in this run: the 1-token sweep's fastest where it beat `plan` by >= 3% (" +
                      "; ".join(f"{k}: {v}" for k, v in res["cuda_tuned"].items()) + ").", ""]
        if res.get("decode_tuned"):
            lines += ["Decode launches in this run: the 1-token sweep's fastest where it beat the heuristics by "
                      ">= 3% (" + "; ".join(f"{k}: {v}" for k, v in res["decode_tuned"].items()) + ").", ""]
        lines += [f"{e2e['shape_note']}, random weights; {e2e['lm_head']}.", "",
                  "| model | bits/weight (linear layers) | weight GB | tok/s | vs FP16 | prefill ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in e2e["runs"]:
            vs = f"{r['vs_fp16']:.2f}x" if r["vs_fp16"] else ""
            lines.append(f"| {r['model']} | {r['bits_per_weight_linear']:.3f} | {r['weight_bytes'] / 1e9:.2f} | "
                         f"{r['tok_s']:.1f} | {vs} | {r['prefill_ms']:.1f} |")
        for e in e2e["errors"]:
            lines.append(f"\nNote: {e}")
    for s in res["skipped"]:
        lines.append(f"\nSkipped: {s}")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def update_markdown(path: Path, section: str) -> None:
    """Replace the text between the gpu markers (markers included); append them if missing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_atomic(path, text)


def main(argv=None) -> int:
    global OUTLIER_FRACTION
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu.json)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="Markdown file whose gpu section is rewritten (default BENCHMARKS.md; none in --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the end-to-end model (default 32)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the decode launch sweep")
    ap.add_argument("--no-cuda-sweep", action="store_true", help="skip the CUDA decode kernel's launch sweep")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode")
    ap.add_argument("--no-tune", action="store_true",
                    help="end to end with the heuristics' decode launches, not the sweep's fastest")
    ap.add_argument("--kernel-budget-s", type=float, default=150.0, help="stop kernel timings after this long")
    ap.add_argument("--tokens", type=str, default=None, help="comma-separated token counts (default: all)")
    ap.add_argument("--outliers", type=float, default=OUTLIER_FRACTION,
                    help="fraction of each layer's weights in the sparse outlier correction (default: fasq's, 1e-3)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    OUTLIER_FRACTION = args.outliers
    if args.tokens:
        TOKENS[:] = [int(t) for t in args.tokens.split(",")]
    if not dry and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    out = args.out or ROOT / "benchmarks" / "results" / ("gpu_dry_run.json" if dry else "gpu.json")
    md = args.markdown if args.markdown is not None else (None if dry else ROOT / "BENCHMARKS.md")
    t_start = time.monotonic()

    import triton
    import transformers
    res = {"dry_run": dry, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]) if argv is None
           else "python benchmarks/gpu.py " + " ".join(argv),
           "versions": {"torch": torch.__version__, "triton": triton.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version()},
           "device": ({"name": torch.cuda.get_device_name(device),
                       "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                       "memory_GiB": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
                      if not dry else {"name": f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"}),
           "skipped": []}
    print(f"device: {res['device']['name']}", flush=True)
    res["device_rates"] = device_rates(device, dry)
    print(f"copy {res['device_rates']['copy_GBps']:.0f} GB/s, matmul {res['device_rates']['matmul_TFLOPs']:.1f} "
          f"TFLOP/s", flush=True)
    rows, sweeps, skipped, csweeps = kernel_timings(device, dry, time.monotonic() + args.kernel_budget_s,
                                                    not args.no_sweep, not args.no_cuda_sweep)
    annotate(rows, res["device_rates"]["copy_GBps"])
    annotate(sweeps, res["device_rates"]["copy_GBps"])
    annotate(csweeps, res["device_rates"]["copy_GBps"])
    res.update(kernels=rows, decode_sweep=sweeps, cuda_sweep=csweeps)
    res["skipped"] += skipped
    print(f"kernel timings: {len(rows)} rows, {len(sweeps)} sweep rows, {time.monotonic() - t_start:.0f} s", flush=True)
    res["formats"] = {fmt: dict(zip(("subvector_dim", "num_centroids", "group_size"), v)) for fmt, v in FORMATS.items()}
    res["outlier_fraction"] = OUTLIER_FRACTION
    write_atomic(out, json.dumps(res, indent=1))          # kernel figures survive a failure below
    if not args.no_e2e:
        res["decode_tuned"] = tune_decode(sweeps) if not args.no_tune else {}
        res["cuda_tuned"] = tune_cuda(csweeps) if not args.no_tune else {}
        res["end_to_end"] = end_to_end(device, dry, args.layers)
    res["wall_s"] = time.monotonic() - t_start
    write_atomic(out, json.dumps(res, indent=1))
    print(f"wrote {out}")
    if md is not None:
        update_markdown(md, markdown(res))
        print(f"updated {md}")
    for t in targets(res):
        print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
