"""The v2 CUDA decode kernel on one GPU: correctness, then cold-L2 timings against FP16 ``F.linear``, the
v1 kernel and a plain read of the same bytes; a rows sweep; and the issue-21 targets as JSON.

    python benchmarks/gpu_v2.py --out v2.json --targets benchmarks/results/gpu_targets.json   # H100/H200
    python benchmarks/gpu_v2.py --dry-run --out x.json --targets t.json   # CPU: the emulator, no timing

Per format (4-bit d2 K256, 3-bit d2 K64) and Llama-3-8B shape (4096x4096, 14336x4096, 4096x14336,
1024x4096, and the fused launches q/k/v = 4096+1024+1024 x 4096 and gate/up = 2 x 14336 x 4096): the
v2 kernel's output (NaN-poisoned buffers) against x_r W_r^T at 1, 2, 4, 8, 16 tokens; then GPU time
per call by CUDA-graph replay over enough copies of the layer that each call reads from DRAM
(benchmarks/gpu.py's ``gpu_time``): v2, v1 (``cuda_decode``, where it applies; fused launches: the
sum of its separate calls), FP16 ``F.linear`` of the same total shape, and ``fasq_read`` of the v2
operands' bytes (benchmarks/gpu_read.py).  The rows sweep times v2 at 1 token on 1024 ... 14336 x
4096 and fits time = fixed + bytes / rate.  Each part has its own share of ``--budget-s``; what did not
fit is listed in ``skipped``.  ``--targets`` writes the issue's JSON: one entry per target row, the
lowest over shapes, ``measured`` null for what this run did not measure.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu as gb  # noqa: E402
import gpu_read as gr  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fasq.kernels import cuda_layout as L  # noqa: E402

FORMATS = ("4bit d2 K256", "3bit d2 K64")
LAUNCHES = {"4096x4096": (4096,), "14336x4096": (14336,), "4096x14336": (4096,), "1024x4096": (1024,),
            "qkv 6144x4096": (4096, 1024, 1024), "gate/up 28672x4096": (14336, 14336)}
INPUTS = {"4096x14336": 14336}
TOKENS = (1, 2, 4, 8, 16)
SWEEP_ROWS = (1024, 2048, 4096, 8192, 14336)
DRY_LAUNCHES = {"40x1000": (40,), "qkv 64+17+40 x 1000": (64, 17, 40)}
# The target rows (issue 21): name, goal, unit.
TARGETS = [("FP16 harness, share of copy bandwidth per token", 75.0, "%"),
           ("decode kernel at 1 token, 4-bit d2 K256, lowest of the 8B shapes and fused launches", 75.0,
            "% of copy bandwidth"),
           ("decode kernel at 1 token, 3-bit d2 K64, lowest of the 8B shapes and fused launches", 75.0,
            "% of copy bandwidth"),
           ("end-to-end batch 1 vs FP16, ~4 bits", 2.5, "x"),
           ("end-to-end batch 1 vs FP16, ~3 bits", 3.0, "x"),
           ("2, 4, 8, 16 tokens vs FP16 F.linear, lowest over shapes and counts, 4-bit d2 K256", 1.3, "x"),
           ("2, 4, 8, 16 tokens vs FP16 F.linear, lowest over shapes and counts, 3-bit d2 K64", 1.3, "x"),
           ("prefill 2048 tokens vs FP16, 4-bit", 0.9, "x"),
           ("prefill 2048 tokens vs FP16, 3-bit", 0.9, "x"),
           ("--device cuda quantization of the 8B-shaped checkpoint, --preset 4bit, wall time", None, "s"),
           ("--device cuda quantization of the 8B-shaped checkpoint, --preset 4bit, peak GPU memory", None, "GiB")]


def _layers(outs, inp, fmt, device, seed):
    return [gb.random_pq_linear(o, inp, fmt, device, seed=seed * 8 + i) for i, o in enumerate(outs)]


def _operands(layers):
    from fasq.kernels import cuda_decode_v2 as V
    lays = [L.repack(lay.spec, lay.codes, lay.scales) for lay in layers]
    return V.operands(L.fuse(lays) if len(lays) > 1 else lays[0], [lay.codebooks[0] for lay in layers],
                      [None] * len(layers))


def _reference(layers, xr):
    return torch.cat([F.linear(xr.float(), gb._w_rotated(lay)) for lay in layers], dim=1)


def _poisoned(fn):
    from fasq.kernels import cuda_decode_v2 as V
    keep = V._new_buffer
    V._new_buffer = lambda shape, dtype, dev: torch.full(shape, float("nan"), dtype=dtype, device=dev)
    try:
        return fn()
    finally:
        V._new_buffer = keep


def check_case(name, outs, inp, fmt, device, dry) -> list[dict]:
    """Correctness of one launch at every token count (the emulator on a dry run)."""
    from fasq.kernels import cuda_emulate as E
    layers = _layers(outs, inp, fmt, device, 0)
    rows = []
    for t in (TOKENS if not dry else (1, 9)):
        xr = torch.randn(t, inp, device=device, dtype=torch.float16)
        ref = _reference(layers, xr)
        if dry:
            lays = [L.repack(lay.spec, lay.codes, lay.scales) for lay in layers]
            y = E.emulate_linear(L.fuse(lays), [lay.codebooks[0] for lay in layers], xr, 2, 1)
        else:
            from fasq.kernels import cuda_decode_v2 as V
            ops = _operands(layers)
            y = _poisoned(lambda: V.run(xr, ops))
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        ok = bool(torch.isfinite(y).all()) and rel < 2e-3
        rows.append(dict(launch=name, format=fmt, tokens=t, rel_err=rel, all_written=bool(torch.isfinite(y).all()),
                         ok=ok))
        print(f"check {name:>20} {fmt} t={t}: rel err {rel:.2e} {'ok' if ok else 'FAILED'}", flush=True)
    return rows


def time_case(name, outs, inp, fmt, device, read_kernel, sms) -> list[dict]:
    from fasq.kernels import cuda_decode as cd
    from fasq.kernels import cuda_decode_v2 as V
    layers0 = _layers(outs, inp, fmt, device, 0)
    n_bytes = sum(lay.spec.weight_storage_bytes() for lay in layers0)
    copies = [layers0] + [_layers(outs, inp, fmt, device, i) for i in range(1, gb.copies_for(n_bytes, device))]
    ops = [_operands(c) for c in copies]
    v2_bytes = sum(t.numel() * t.element_size() for t in (ops[0].layout.codes, ops[0].layout.scales, ops[0].codebooks))
    bufs = [torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in (o.layout.codes, o.layout.scales,
                                                                               o.codebooks)]) for o in ops]
    bufs = [torch.cat([b, b.new_zeros((-b.numel()) % 16)]) for b in bufs]
    sink = torch.zeros(1, dtype=torch.int32, device=device)
    read_us = gb.gpu_time([gr.read_fn(read_kernel, b, sink, sms) for b in bufs], device)
    total_out = sum(outs)
    fp16 = [torch.randn(total_out, inp, device=device, dtype=torch.float16)
            for _ in range(gb.copies_for(2 * total_out * inp, device))]
    rows = []
    for t in TOKENS:
        xr = torch.randn(t, inp, device=device, dtype=torch.float16)
        row = dict(launch=name, format=fmt, tokens=t, bytes=v2_bytes, copies=len(copies), read_us=read_us,
                   fp16_us=gb.gpu_time([lambda w=w: F.linear(xr, w) for w in fp16], device),
                   v2_us=gb.gpu_time([lambda o=o: V.run(xr, o) for o in ops], device),
                   launch_v2=str(V.plan(ops[0].layout, t, torch.float16, sms)))

        def v1(layers, x=xr):
            ys = []
            for lay in layers:
                s = lay.spec
                ys.append(cd.pq_decode(x, lay.codes, lay.codebooks, lay.scales, None, s.in_features, s.subvector_dim,
                                       s.effective_group))
            return ys
        s0 = layers0[0].spec
        if t <= cd.MAX_TOKENS and cd.plan(t, inp, outs[0], 2, s0.num_centroids, layers0[0].scales.shape[1],
                                          s0.effective_group, torch.float16, device) is not None:
            row["v1_us"] = gb.gpu_time([lambda c=c: v1(c) for c in copies], device)
        row["v2_share_of_read"] = read_us / row["v2_us"]
        row["v2_vs_fp16"] = row["fp16_us"] / row["v2_us"]
        rows.append(row)
        print(f"time {name:>20} {fmt} t={t}: read {read_us:7.2f}  fp16 {row['fp16_us']:7.2f}  "
              f"v1 {row.get('v1_us', float('nan')):7.2f}  v2 {row['v2_us']:7.2f} us", flush=True)
    return rows


def rows_sweep(fmt, device, sms) -> dict:
    """v2 at 1 token on n x 4096 layers: least-squares time = fixed_us + bytes / rate."""
    from fasq.kernels import cuda_decode_v2 as V
    pts = []
    for rows in SWEEP_ROWS:
        layers0 = _layers((rows,), 4096, fmt, device, 0)
        n = layers0[0].spec.weight_storage_bytes()
        copies = [_operands(_layers((rows,), 4096, fmt, device, i)) for i in range(gb.copies_for(n, device))]
        xr = torch.randn(1, 4096, device=device, dtype=torch.float16)
        pts.append((n, gb.gpu_time([lambda o=o: V.run(xr, o) for o in copies], device)))
    b = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    us = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    a_mat = torch.stack([torch.ones_like(b), b], 1)
    sol = torch.linalg.lstsq(a_mat, us[:, None]).solution[:, 0]
    return dict(format=fmt, points=[dict(bytes=n, us=u) for n, u in pts], fixed_us=float(sol[0]),
                stream_GBps=float(1e-3 / sol[1]) if sol[1] > 0 else None)


def targets(res: dict) -> list[dict]:
    copy = res["rates"]["copy_GBps"] if not res["dry"] else None
    out = []
    for name, goal, unit in TARGETS:
        measured = None
        timed = res.get("timings", [])
        if copy and "decode kernel at 1 token" in name:
            fmt = "4bit d2 K256" if "4-bit" in name else "3bit d2 K64"
            vals = [r["bytes"] / r["v2_us"] / 1e3 / copy * 100 for r in timed if r["format"] == fmt and r["tokens"] == 1
                    and r["launch"] != "1024x4096"]
            measured = round(min(vals), 1) if vals else None
        elif copy and "tokens vs FP16 F.linear" in name:
            fmt = "4bit d2 K256" if "4-bit" in name else "3bit d2 K64"
            vals = [r["v2_vs_fp16"] for r in timed if r["format"] == fmt and r["tokens"] > 1]
            measured = round(min(vals), 3) if vals else None
        out.append(dict(name=name, goal=goal, measured=measured, unit=unit))
    return out


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE.parent)
    return r.stdout.strip() or "unknown"


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", type=Path, help="write the issue-21 targets JSON here")
    ap.add_argument("--dry-run", action="store_true", help="CPU: the emulator on tiny shapes, no timing")
    ap.add_argument("--budget-s", type=float, default=200.0)
    a = ap.parse_args(argv)
    dry = a.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    t0 = time.perf_counter()
    res = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
               commit=_commit(), dry=dry, torch=torch.__version__,
               device=torch.cuda.get_device_name() if not dry else "cpu (dry run: emulator, nothing timed)",
               rates=gb.device_rates(device, dry), checks=[], timings=[], sweeps=[], skipped=[])
    launches = DRY_LAUNCHES if dry else LAUNCHES

    def guarded(part: str, share: float, fn):
        if time.perf_counter() - t0 > share * a.budget_s:
            res["skipped"].append(f"{part}: over its share of --budget-s")
            return None
        try:
            return fn()
        except Exception as e:   # report, go on with the rest
            res["skipped"].append(f"{part}: {type(e).__name__}: {e}")
            print(res["skipped"][-1], flush=True)
            return None

    for fmt in FORMATS:
        for name, outs in launches.items():
            inp = 1000 if dry else INPUTS.get(name, 4096)
            res["checks"] += guarded(f"check {name} {fmt}", 0.25, lambda: check_case(name, outs, inp, fmt, device, dry)) or []
    if not dry:
        kernel, sms = gr.read_kernel(), torch.cuda.get_device_properties(device).multi_processor_count
        for fmt in FORMATS:
            for name, outs in launches.items():
                inp = INPUTS.get(name, 4096)
                res["timings"] += guarded(f"time {name} {fmt}", 0.85,
                                          lambda: time_case(name, outs, inp, fmt, device, kernel, sms)) or []
        for fmt in FORMATS:
            sw = guarded(f"rows sweep {fmt}", 1.0, lambda: rows_sweep(fmt, device, sms))
            if sw:
                res["sweeps"].append(sw)
    res["seconds"] = time.perf_counter() - t0
    write_json(a.out, res)
    if a.targets:
        write_json(a.targets, dict(card=res["device"], date=res["date"], commit=res["commit"],
                                   note="dry run: no GPU, nothing measured" if dry else
                                   "measured by benchmarks/gpu_v2.py (v2 decode kernel); rows this script does not "
                                   "run are null", targets=targets(res)))
    failed = [c for c in res["checks"] if not c["ok"]]
    print(f"gpu_v2: {len(res['checks'])} checks ({len(failed)} failed), {len(res['timings'])} timings, "
          f"{len(res['skipped'])} skipped, {res['seconds']:.0f} s", flush=True)
    return 1 if failed or not res["checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
