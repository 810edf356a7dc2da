"""CPU speed of fasq (issue 6): the kernel against dense F.linear, and end-to-end SmolLM2 decode.

    python benchmarks/cpu.py                       # everything (~20 min on 2 busy cores)
    python benchmarks/cpu.py --skip-e2e --quick    # kernels only, fewer rounds

1. Kernels: y = x W^T on random PQ layers (fp32 and bf16 dense F.linear vs the fasq module call,
   which includes the kernel registry's dispatch, and each method's op alone) on 4096x4096,
   11008x4096 and every SmolLM2-135M linear shape, at 1, 4 and 16 tokens, for several configs.
   Every candidate is timed in the same rounds, interleaved; the figure is the median of rounds.
   "hot" repeats calls on the same weights (they stay in the CPU caches); "stream" cycles through
   enough distinct layers of the shape (up to 32, >= STREAM_MB of fp32 weights) that each call finds
   its weights outside L1/L2, as in a decode step that runs every layer once; "cold" evicts the caches
   before each call, like a decode step that streams a model much larger than the cache.
2. End to end: greedy decode of SmolLM2-135M-Instruct (fp32 model vs fasq at ~4 and ~3
   bits/weight), same prompt and length, each model in its own subprocess so that peak memory
   (VmHWM) is its own; with all threads and with 1 thread.

Writes JSON (--out) and the section between ``<!-- cpu:begin -->`` and ``<!-- cpu:end -->`` of
BENCHMARKS.md.  For whole models side by side see ``fasq bench`` (``fasq.bench``); this
file's :func:`bench_kernels` and :func:`bench_e2e` are importable too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fasq import kernels as _kernels

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (out, in)
    "4096x4096": (4096, 4096), "11008x4096": (11008, 4096),
    "smollm2 q/o": (576, 576), "smollm2 k/v": (192, 576), "smollm2 gate/up": (1536, 576),
    "smollm2 down": (576, 1536),
}
CONFIGS = {  # name: LayerSpec settings (group 128, Hadamard rotation as fasq.quantize uses)
    "4bit d2 K256": dict(subvector_dim=2, num_centroids=256),
    "4bit d2 K512": dict(subvector_dim=2, num_centroids=512),  # --preset 4bit's v_proj and some down_proj
    "3bit d2 K64": dict(subvector_dim=2, num_centroids=64),
    "2bit d4 K256": dict(subvector_dim=4, num_centroids=256),
    "4bit d4 K65536": dict(subvector_dim=4, num_centroids=65536),
}
MAIN_CONFIG = "4bit d2 K256"
PROMPT = "Explain in a few sentences why the sky is blue."
E2E_VARIANTS = ("fp32", "fasq-4bit", "fasq-3bit")


# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_layer(out: int, inp: int, cfg: dict, seed: int = 0):
    from fasq.format import LayerSpec, pack_codes
    from fasq.nn import PQLinear
    from fasq.reference import rotation_block_for

    spec = LayerSpec(inp, out, group_size=128, rotation_block=rotation_block_for(inp, 256), **cfg)
    g = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, spec.num_centroids, (1, out, spec.n_sub), generator=g), spec.bits)
    books = torch.randn(1, spec.num_centroids, spec.subvector_dim, generator=g).half()
    scales = (torch.rand(out, spec.n_groups, generator=g) * 0.02).half()
    signs = (torch.randint(0, 2, (inp,), generator=g) * 2 - 1).to(torch.int8)
    return PQLinear.from_tensors(spec, codes, books, scales, signs)


class _Evictor:
    """Reads a buffer larger than the last-level cache, so the next call finds its data in DRAM."""

    def __init__(self, mib: int):
        self.buf = torch.ones(mib << 18)  # fp32

    def __call__(self):
        self.buf.add_(1.0)


def time_interleaved(fns: dict, rounds: int, evict=None, target_s: float = 0.003) -> dict:
    """Median and min seconds per call of each fn, timed in the same rounds (order rotated)."""
    names = list(fns)
    reps = {}
    for n in names:  # warm up (first calls prepare per-layer caches) and size each sample
        for _ in range(2):
            fns[n]()
        t = time.perf_counter()
        fns[n]()
        dt = time.perf_counter() - t
        reps[n] = 1 if evict else max(1, min(1000, int(target_s / max(dt, 1e-7))))
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if evict:
                evict()
            t = time.perf_counter()
            for _ in range(reps[n]):
                fns[n]()
            samples[n].append((time.perf_counter() - t) / reps[n])
    return {n: {"median_s": statistics.median(s), "min_s": min(s)} for n, s in samples.items()}


STREAM_MB = 48  # fp32 weights cycled through in "stream" mode: far above L2, as one decode step's layers


def _stream(fns_per_copy: list) -> callable:
    def run():
        for f in fns_per_copy:
            f()
    return run


@torch.inference_mode()
def bench_kernels(shapes=SHAPES, configs=CONFIGS, tokens=(1, 4, 16), caches=("hot", "stream", "cold"), rounds=15,
                  main_config=MAIN_CONFIG, log=print) -> list[dict]:
    """Dense F.linear (fp32, bf16) vs fasq per (shape, config, tokens, cache state).

    The main config gets every token count; the others 1 token only.  Returns one row per case.
    """
    from fasq.kernels import cpu, select

    if not cpu.available():
        raise RuntimeError("the fasq CPU kernel could not be built (see the warning above)")
    evictor = _Evictor(512) if "cold" in caches else None
    rows = []
    for cfg_name, cfg in configs.items():
        for shape_name, (out, inp) in shapes.items():
            n_copies = min(32, -(-(STREAM_MB << 20) // (out * inp * 4))) if "stream" in caches else 1
            layers = [random_layer(out, inp, cfg, seed=i) for i in range(n_copies)]
            w32s = [torch.randn(out, inp) * 0.02 for _ in range(n_copies)]
            w16s = [w.bfloat16() for w in w32s]
            mods = [torch.nn.Linear(inp, out, bias=False) for _ in range(n_copies)]
            for m, w in zip(mods, w32s):
                m.weight.data = w
            layer, w32, w16 = layers[0], w32s[0], w16s[0]
            for t in tokens if cfg_name == main_config else tokens[:1]:
                x32 = torch.randn(t, inp)
                x16 = x32.bfloat16()
                methods = [m for m in cpu.METHODS if m not in ("lut", "perm") or cpu.lut_supported(layer.spec)]

                def candidates(ls, a32, a16, ms):  # name -> one call per copy
                    c = {"dense_fp32": [lambda w=w: F.linear(x32, w) for w in a32],
                         "dense_bf16": [lambda w=w: F.linear(x16, w) for w in a16],
                         "dense_module": [lambda m=m: m(x32) for m in ms],
                         "fasq_fp32": [lambda q=q: q(x32) for q in ls], "fasq_bf16": [lambda q=q: q(x16) for q in ls],
                         "fasq_kernel": [lambda q=q: _kernel_call(q, x32) for q in ls]}
                    for m in methods:
                        c[f"op_{m}"] = [lambda q=q, m=m: cpu.cpu_linear(x32, q, m) for q in ls]
                    return c
                chosen = select(layer, x32).name
                for cache in caches:
                    if cache == "stream" and n_copies == 1:
                        continue  # one layer is already far larger than L2: "hot" measures the same
                    cold = cache == "cold"  # each cold sample pays an eviction: fewer rounds
                    n = n_copies if cache == "stream" else 1
                    fns = {k: _stream(v) for k, v in candidates(layers[:n], w32s[:n], w16s[:n], mods[:n]).items()}
                    res = time_interleaved(fns, max(5, rounds // 4) if cold else rounds, evict=evictor if cold else None)
                    res = {k: {q: v / n for q, v in r.items()} for k, r in res.items()}  # per layer call
                    row = {"config": cfg_name, "shape": shape_name, "out": out, "in": inp, "tokens": t,
                           "cache": cache, "layers_cycled": n, "bits_per_weight": round(layer.spec.bits_per_weight(), 3),
                           "kernel": chosen, **{f"{k}_us": round(v["median_s"] * 1e6, 1) for k, v in res.items()},
                           **{f"{k}_min_us": round(v["min_s"] * 1e6, 1) for k, v in res.items()}}
                    best_dense = min(row["dense_fp32_us"], row["dense_bf16_us"])
                    row["speedup_vs_best_dense"] = round(best_dense / row["fasq_fp32_us"], 2)
                    best_dense_min = min(row["dense_fp32_min_us"], row["dense_bf16_min_us"])
                    row["speedup_vs_best_dense_min"] = round(best_dense_min / row["fasq_fp32_min_us"], 2)
                    row["kernel_speedup_vs_best_dense"] = round(best_dense / row["fasq_kernel_us"], 2)
                    row["module_speedup_vs_dense_module"] = round(row["dense_module_us"] / row["fasq_fp32_us"], 2)
                    rows.append(row)
                    log(f"{cfg_name:15s} {shape_name:16s} t={t:<2d} {cache:6s} fp32 {row['dense_fp32_us']:9.1f}  "
                        f"bf16 {row['dense_bf16_us']:9.1f}  fasq {row['fasq_fp32_us']:9.1f} us ({chosen}) "
                        f"x{row['speedup_vs_best_dense']:.2f}  kernel {row['fasq_kernel_us']:.1f} "
                        f"x{row['kernel_speedup_vs_best_dense']:.2f}  nn.Linear {row['dense_module_us']:.1f} "
                        f"x{row['module_speedup_vs_dense_module']:.2f}  "
                        + " ".join(f"{m} {row[f'op_{m}_us']:.1f}" for m in methods))
            del layers, layer, w32s, w16s, w32, w16, mods
    return rows


def _kernel_call(layer, x):
    """The fasq kernel without the module: the layer's C++ plan (checks, rotation, the method the
    registry chose, output), as PQLinear.__call__ runs it; the registry when there is no plan."""
    plan = layer.__dict__.get("_fasq_plan")
    y = plan.run(x, layer._buffers, _kernels._generation) if plan is not None else None
    return y if y is not None else _kernels.pq_linear(x, layer)


# ----------------------------------------------------------------------------------------------
def _bench_dir() -> Path:
    from fasq.data import cache_dir
    return cache_dir() / "bench"


def quantized_smollm2(preset_name: str, log=print) -> Path:
    """fasq-quantized SmolLM2 saved under the cache (made once per preset and config, in a subprocess)."""
    import hashlib

    import fasq
    key = hashlib.sha256(fasq.preset(preset_name).to_json().encode()).hexdigest()[:8]
    out = _bench_dir() / f"smollm2-{preset_name}-{key}"
    if (out / "config.json").is_file():
        return out
    log(f"quantizing SmolLM2 with preset {preset_name} (once) -> {out}")
    code = ("import sys, torch, fasq; from fasq.data import smollm2_checkpoint;"
            "from transformers import AutoModelForCausalLM, AutoTokenizer;"
            "ck = smollm2_checkpoint(); m = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32);"
            f"fasq.quantize(m, fasq.preset({preset_name!r}), progress=False);"
            f"fasq.save(m, {str(out)!r}, AutoTokenizer.from_pretrained(ck), overwrite=True)")
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def _e2e_worker(variant: str, new_tokens: int, threads: int) -> dict:
    """Runs in its own process: load one model, greedy-decode, report speed and peak memory."""
    import fasq
    from fasq.data import smollm2_checkpoint
    from fasq.bench import bench_model, peak_rss_mib, weights_bytes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    ck = smollm2_checkpoint()
    t0 = time.perf_counter()
    if variant in ("fp32", "bf16"):
        model = AutoModelForCausalLM.from_pretrained(ck, dtype=getattr(torch, {"fp32": "float32"}.get(variant, "bfloat16")))
        bits = 32.0 if variant == "fp32" else 16.0
    else:
        # dense_16bit: the tied embedding / head stay in their stored fp16 form (fp32 sums); see
        # fasq.kernels.dense16.  Activations are fp32 like the fp32 model's.
        model = fasq.load(quantized_smollm2(variant.split("-", 1)[1]), dense_16bit=True)
        rep = fasq.model_size_report(model)
        bits = rep["bits_per_weight"]
    model.eval()
    load_s = time.perf_counter() - t0
    res = bench_model(model, AutoTokenizer.from_pretrained(ck), PROMPT, new_tokens=new_tokens)
    res.update(variant=variant, bits_per_weight=bits, load_s=round(load_s, 2), threads=threads,
               weights_mb=round(weights_bytes(model) / 2**20, 1),
               peak_rss_mb=round(peak_rss_mib(), 1))
    return res


def bench_e2e(variants=E2E_VARIANTS, new_tokens: int = 64, threads=(None,), repeats: int = 2, log=print) -> list[dict]:
    """Each variant decoded ``repeats`` times per thread count, alternating, each run in a fresh
    subprocess; the fastest run is kept (the machine is shared) and the peak memory is the largest."""
    threads = [t or torch.get_num_threads() for t in threads]
    for v in variants:  # prepare checkpoints before timing anything
        if v.startswith("fasq-"):
            quantized_smollm2(v.split("-", 1)[1], log=log)
    rows = []
    for th in threads:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(repeats):
            for v in variants:
                with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
                    subprocess.run([sys.executable, __file__, "--worker", v, "--new-tokens", str(new_tokens),
                                    "--threads", str(th), "--out", f.name], check=True)
                    res = json.load(open(f.name))
                runs[v].append(res)
                log(f"{v:10s} {th} thread(s) run {r}: {res['decode_tokens_per_s']:.1f} tok/s, "
                    f"{res['decode_cpu_s_per_token'] * 1e3:.1f} CPU ms/token, peak RSS {res['peak_rss_mb']:.0f} MB")
        group = []
        for v in variants:
            best = max(runs[v], key=lambda d: d["decode_tokens_per_s"])
            best["decode_cpu_s_per_token"] = min(d["decode_cpu_s_per_token"] for d in runs[v])
            best["decode_step_ms_median"] = min(d["decode_step_ms_median"] for d in runs[v])
            best["peak_rss_mb"] = max(d["peak_rss_mb"] for d in runs[v])
            best["all_tokens_per_s"] = [round(d["decode_tokens_per_s"], 2) for d in runs[v]]
            group.append(best)
        base = next((r for r in group if r["variant"] == "fp32"), None)
        for r in group:
            if base:
                _add_run_ratios(r, base)
                r["speedup_vs_fp32"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
                r["step_speedup_vs_fp32"] = round(base["decode_step_ms_median"] / r["decode_step_ms_median"], 2)
                r["cpu_speedup_vs_fp32"] = round(base["decode_cpu_s_per_token"] / r["decode_cpu_s_per_token"], 2)
                r["same_tokens_as_fp32"] = sum(a == b for a, b in zip(r["generated"], base["generated"]))
        rows += group
    return rows


def _add_run_ratios(r: dict, base: dict) -> None:
    """Run i of a model against run i of fp32 (they ran back to back): the median of these ratios
    is less sensitive than the best-of figures to the host's slow and fast phases."""
    ratios = [a / b for a, b in zip(r["all_tokens_per_s"], base["all_tokens_per_s"])]
    r["speedup_vs_fp32_runs"] = [round(v, 2) for v in ratios]
    r["speedup_vs_fp32_run_median"] = round(statistics.median(ratios), 2)


# ----------------------------------------------------------------------------------------------
def _load_words(meta: dict) -> str:
    """What the load averages say: the benchmark itself keeps about one core busy."""
    loads = [v for k in ("load_average_start", "load_average_end") for v in (meta.get(k) or [])[:1]]
    if loads and max(loads) <= float(meta.get("threads") or 1) + 0.5:
        return "nothing else of note ran on the machine"
    return f"the {os.cpu_count()} cores were shared with other jobs"


def markdown(meta: dict, kernels: list[dict], e2e: list[dict]) -> str:
    out = ["## CPU (issue 6)", "",
           f"Machine: {meta['cpu']}, {meta['threads']} threads (torch {meta['torch']}); {meta['date']}.  ",
           f"Command: `{meta['command']}` at commit {meta.get('commit', 'unknown')}  ",
           f"Load average (1/5/15 min) at start {meta.get('load_average_start')}, at end "
           f"{meta.get('load_average_end')}: {_load_words(meta)}; "
           "compare ratios within a row (candidates are timed in the same interleaved rounds).", ""]
    if kernels:
        out += ["### Kernel: y = x W^T, microseconds per call",
                "",
                "fasq = the `PQLinear` module call; dense = `F.linear`; fasq kernel = the layer's C++ plan "
                "called directly (what `PQLinear.__call__` runs: checks, rotation, the chosen method, output "
                "tensor), dense module = an `nn.Linear` module call (fp32). "
                "hot: the same weights every call (they stay in L1/L2 if they fit); stream: calls cycle through "
                f"distinct random layers of the shape (up to 32, >= {STREAM_MB} MB of fp32 weights; shapes larger "
                "than that have no stream row), as a decode step runs every layer once; cold: caches evicted "
                "(a 512 MB write) before each call, which also evicts the Python interpreter's state. "
                "x = faster of dense fp32 / bf16 over fasq (fp32 input), from medians; x min = the same from "
                "the fastest samples (less sensitive to other jobs); x kernel = faster dense `F.linear` over "
                "the fasq kernel; x module = `nn.Linear` over `PQLinear`, module call against module call, "
                "as in a model.", "",
                "| config | shape (out x in) | tokens | cache | dense fp32 | dense bf16 | dense module | fasq fp32 "
                "| fasq bf16 | fasq kernel | x | x min | x kernel | x module | kernel | lut / perm / direct / tiled (op only) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in kernels:
            ops = " / ".join(f"{r[f'op_{m}_us']:.0f}" if f"op_{m}_us" in r else "-"
                             for m in ("lut", "perm", "direct", "tiled"))
            nan = float("nan")
            out.append(f"| {r['config']} ({r['bits_per_weight']:.2f} b/w) | {r['shape']} ({r['out']}x{r['in']}) "
                       f"| {r['tokens']} | {r['cache']} | {r['dense_fp32_us']:.0f} | {r['dense_bf16_us']:.0f} "
                       f"| {r.get('dense_module_us', nan):.0f} | {r['fasq_fp32_us']:.0f} | {r['fasq_bf16_us']:.0f} "
                       f"| {r.get('fasq_kernel_us', nan):.0f} | **{r['speedup_vs_best_dense']:.2f}** "
                       f"| {r['speedup_vs_best_dense_min']:.2f} | {r.get('kernel_speedup_vs_best_dense', nan):.2f} "
                       f"| {r.get('module_speedup_vs_dense_module', nan):.2f} | {r['kernel']} | {ops} |")
        out.append("")
    if e2e:
        out += ["### End to end: SmolLM2-135M-Instruct greedy decode",
                "",
                f"Prompt: \"{PROMPT}\" (chat template), {e2e[0]['prompt_tokens']} prompt tokens, "
                f"{len(e2e[0]['generated'])} new tokens; best of {len(e2e[0]['all_tokens_per_s'])} runs, each "
                "model in its own process (peak RSS = VmHWM, includes Python + torch + transformers, about "
                "470 MB before any weight). fasq models are loaded with `fasq.load(..., dense_16bit=True)`: the "
                "tied embedding / head keep their stored fp16 values (fp32 sums, `fasq.kernels.dense16`) instead "
                "of an fp32 copy. CPU ms/token = "
                "CPU time of all threads per decoded token (less sensitive to other jobs on the machine). "
                "x fp32 (runs) = the median over runs of tok/s against the fp32 run just before it, and "
                "the range of those ratios.", "",
                "| model | threads | bits/weight (linears) | decode tok/s | x fp32 | x fp32 (runs) | median step ms "
                "| x fp32 (median) | CPU ms/token | x fp32 (CPU) | peak RSS MB | weights MB | tokens equal to fp32 |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        nan = float("nan")
        for r in e2e:
            runs = r.get("speedup_vs_fp32_runs") or [nan]
            out.append(f"| {r['variant']} | {r['threads']} | {r['bits_per_weight']:.2f} | {r['decode_tokens_per_s']:.1f} "
                       f"| **{r.get('speedup_vs_fp32', nan):.2f}** | {r.get('speedup_vs_fp32_run_median', nan):.2f} "
                       f"({min(runs):.2f}-{max(runs):.2f}) | {r['decode_step_ms_median']:.1f} "
                       f"| {r.get('step_speedup_vs_fp32', nan):.2f} | {r['decode_cpu_s_per_token'] * 1e3:.1f} "
                       f"| {r.get('cpu_speedup_vs_fp32', nan):.2f} | {r['peak_rss_mb']:.0f} | {r['weights_mb']:.0f} "
                       f"| {r.get('same_tokens_as_fp32', '-')}/{len(r['generated'])} |")
        out.append("")
    return "\n".join(out)


def write_section(path: Path, text: str, begin="<!-- cpu:begin -->", end="<!-- cpu:end -->") -> None:
    """Replace (or append) only the marked section; written atomically."""
    old = path.read_text() if path.exists() else "# fasq benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu.json"))
    ap.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--quick", action="store_true", help="fewer rounds, hot cache only, one e2e run")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--caches", default="hot,stream,cold", help="kernel cache states, comma-separated")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="kernel shapes, comma-separated (names in SHAPES)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="kernel configs, comma-separated (names in CONFIGS)")
    ap.add_argument("--tokens", default="1,4,16", help="token counts of the main config, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None,
                    help="end-to-end runs per model, interleaved; the fastest is kept (default 2, --quick 1)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = _e2e_worker(a.worker, a.new_tokens, a.threads or torch.get_num_threads())
        Path(a.out).write_text(json.dumps(res))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
            "load_average_start": [round(v, 1) for v in os.getloadavg()],
            "date": datetime.date.today().isoformat(), "command": "python benchmarks/cpu.py " + " ".join(argv or sys.argv[1:])}
    out = Path(a.out)
    previous = json.loads(out.read_text()) if out.exists() else {}  # a skipped part keeps its last results
    for arg, table in (("shapes", SHAPES), ("configs", CONFIGS)):
        bad = [n for n in getattr(a, arg).split(",") if n not in table]
        if bad:
            ap.error(f"--{arg}: unknown {bad}; allowed are {list(table)}")
    kernels = previous.get("kernels", []) if a.skip_kernels else bench_kernels(
        shapes={n: SHAPES[n] for n in a.shapes.split(",")}, configs={n: CONFIGS[n] for n in a.configs.split(",")},
        tokens=tuple(int(t) for t in a.tokens.split(",")),
        rounds=5 if a.quick else a.rounds, caches=("hot",) if a.quick else tuple(a.caches.split(",")))
    e2e_threads = (meta["threads"],) if a.quick or meta["threads"] == 1 else (meta["threads"], 1)
    e2e = previous.get("e2e", []) if a.skip_e2e else bench_e2e(
        new_tokens=a.new_tokens, threads=e2e_threads, repeats=a.repeats or (1 if a.quick else 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta["load_average_end"] = [round(v, 1) for v in os.getloadavg()]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "kernels": kernels, "e2e": e2e}, indent=1))
    tmp.replace(out)
    write_section(Path(a.markdown), markdown(meta, kernels, e2e))
    print(f"wrote {out} and the cpu section of {a.markdown}")


if __name__ == "__main__":
    main()
