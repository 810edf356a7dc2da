"""The CUDA decode kernel against FP16 ``F.linear`` and a plain read of the same bytes, cold in L2.

    python benchmarks/gpu_read.py --out gpu_read.json          # one H100/H200: about 1-2 minutes
    python benchmarks/gpu_read.py --dry-run --out x.json       # CPU: checks the script, times nothing real

For each of Llama-3-8B's four layer shapes, the three benchmark formats and 1, 2, 4, 8 tokens:
the CUDA decode kernel on a rotated input (``cuda_decode.pq_decode``, the planner's launch) checked
against the dequantized weight, FP16 ``F.linear`` on the same shape, and ``fasq_read``: a kernel that
only reads the layer's stored bytes (codes, scales, codebook) with 16-byte loads and keeps nothing.
That read is the floor the decode kernel is judged against (issue 21): the same bytes, no work.
Every figure is GPU time per call from CUDA-graph replay, cycling through enough copies of each
buffer that every call reads from DRAM (benchmarks/gpu.py's ``gpu_time`` and ``copies_for``).
Each case has its own deadline share; what did not fit is listed in the JSON's ``skipped``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu as gb  # noqa: E402  (benchmarks/gpu.py: timing, random layers, shapes, formats)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOKENS = (1, 2, 4, 8)

READ_SRC = r"""
struct alignas(16) V4 { unsigned x, y, z, w; };
// Reads n 16-byte words (4 loads in flight per thread per step) and folds them into one word that is
// written only if it equals a value random data practically never gives: the loads stay, no stores.
extern "C" __global__ void fasq_read(const V4* __restrict__ p, int n, unsigned* __restrict__ out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    unsigned acc = 0u;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const V4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) { const V4 a = p[i]; acc ^= a.x ^ a.y ^ a.z ^ a.w; }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
"""


def read_kernel():
    return torch.cuda._compile_kernel(READ_SRC, "fasq_read")


def compile_check() -> str:
    """Dry run: compile the read kernel with nvcc for sm_90 where nvcc is installed."""
    import subprocess
    import tempfile
    from fasq.kernels.cuda_static import find_tool
    nvcc = find_tool("nvcc")
    if nvcc is None:
        return "nvcc not found: read kernel not compiled"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "read.cu"
        src.write_text(READ_SRC)
        r = subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-o", str(Path(tmp) / "read.cubin"), str(src)],
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the read kernel does not compile: {r.stderr[-2000:]}")
    return "read kernel compiles for sm_90"


def read_fn(kernel, buf: torch.Tensor, sink: torch.Tensor, sms: int):
    """One launch reading all of ``buf`` (uint8, a multiple of 16 bytes); CPU: a sum over it."""
    n = buf.numel() // 16
    if buf.device.type != "cuda":
        return lambda: buf.view(torch.int32).sum()
    blocks = max(1, min(4 * sms, math.ceil(n / 256)))
    return lambda: kernel(grid=(blocks, 1, 1), block=(256, 1, 1), args=[buf, n, sink])


def stored_bytes(layer) -> torch.Tensor:
    """The layer's stored bytes (codes, scales, codebooks) in one uint8 buffer padded to 16 bytes."""
    parts = [t.contiguous().view(torch.uint8).reshape(-1) for t in (layer.codes, layer.scales, layer.codebooks)]
    flat = torch.cat(parts)
    pad = (-flat.numel()) % 16
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def case_rows(out_f: int, in_f: int, fmt: str, device, kernel, sms: int, tokens_list) -> list[dict]:
    from fasq.kernels import cuda_decode as cd
    layer0 = gb.random_pq_linear(out_f, in_f, fmt, device)
    n_bytes = layer0.spec.weight_storage_bytes()
    copies = [layer0] + [gb.random_pq_linear(out_f, in_f, fmt, device, seed=i)
                         for i in range(1, gb.copies_for(n_bytes, device))]
    bufs = [stored_bytes(L) for L in copies]
    sink = torch.zeros(1, dtype=torch.int32, device=device)
    fp16 = [torch.randn(out_f, in_f, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
            for _ in range(gb.copies_for(2 * out_f * in_f, device))]
    read_us = gb.gpu_time([read_fn(kernel, b, sink, sms) for b in bufs], device)
    s = layer0.spec
    n_groups = layer0.scales.shape[1]
    rows = []
    for tokens in tokens_list:
        dt = fp16[0].dtype
        xr = torch.randn(tokens, in_f, device=device, dtype=dt)
        f16_us = gb.gpu_time([lambda w=w: F.linear(xr, w) for w in fp16], device)
        row = dict(shape=f"{out_f}x{in_f}", format=fmt, tokens=tokens, bytes=n_bytes, read_bytes=bufs[0].numel(),
                   copies=len(copies),
                   read_us=read_us, fp16_us=f16_us, fp16_bytes=2 * out_f * in_f)
        cfg = cd.plan(tokens, in_f, out_f, s.subvector_dim, s.num_centroids, n_groups, s.effective_group,
                      torch.float16, device) if device.type == "cuda" else None
        if cfg is not None:
            def run(L, x=xr.half()):
                return cd.pq_decode(x, L.codes, L.codebooks, L.scales, None, s.in_features, s.subvector_dim,
                                    s.effective_group, cfg)
            new_buffer = cd._new_buffer   # outputs start as NaN: every element must be written
            cd._new_buffer = lambda shape, dtype, dev: torch.full(shape, float("nan"), dtype=dtype, device=dev)
            try:
                y = run(layer0)
            finally:
                cd._new_buffer = new_buffer
            ref = F.linear(xr.float(), gb._w_rotated(layer0))
            row.update(rel_err=((y.float() - ref).norm() / ref.norm()).item(), all_written=bool(torch.isfinite(y).all()),
                       cuda_us=gb.gpu_time([lambda L=L: run(L) for L in copies], device),
                       launch=dataclasses.asdict(cfg))
            row["cuda_vs_read"] = row["read_us"] / row["cuda_us"]
            row["cuda_vs_fp16"] = row["fp16_us"] / row["cuda_us"]
        rows.append(row)
        print(f"{row['shape']:>11} {fmt:14} t={tokens}: read {read_us:8.2f} us  fp16 {f16_us:8.2f} us  "
              f"cuda {row.get('cuda_us', float('nan')):8.2f} us", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new cases after this long")
    a = ap.parse_args(argv)
    dry = a.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    kernel = None if dry else read_kernel()
    sms = 1 if dry else torch.cuda.get_device_properties(device).multi_processor_count
    shapes = gb.DRY_SHAPES[:1] if dry else gb.SHAPES
    t0, rows, skipped = time.perf_counter(), [], []
    res = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
               device=torch.cuda.get_device_name() if not dry else "cpu (dry run: no timing is meaningful)",
               torch=torch.__version__, rates=gb.device_rates(device, dry))
    if dry:
        res["read_kernel"] = compile_check()
    for fmt in gb.FORMATS:
        for out_f, in_f in shapes:
            if time.perf_counter() - t0 > a.budget_s:
                skipped.append(f"{out_f}x{in_f} {fmt}: over --budget-s")
                continue
            try:
                rows += case_rows(out_f, in_f, fmt, device, kernel, sms, (1,) if dry else TOKENS)
            except Exception as e:   # report, measure the rest
                skipped.append(f"{out_f}x{in_f} {fmt}: {type(e).__name__}: {e}")
                print(skipped[-1], flush=True)
    res.update(rows=rows, skipped=skipped, seconds=time.perf_counter() - t0)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(a.out)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
