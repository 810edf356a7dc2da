"""Streaming quantization of Llama-shaped checkpoints far larger than the memory it may use.

    python benchmarks/streaming.py --model 1b                        # Llama-3.2-1B shape (2.5 GB bf16)
    python benchmarks/streaming.py --model 8b --max-memory 3.3GiB    # Llama-3-8B shape (16 GB bf16)
    python benchmarks/streaming.py --model 8b --limit-layers 4       # 8B shards, first 4 decoder layers

1. Generates (once; ``--keep`` keeps it) a checkpoint with Llama-3.2-1B's or Llama-3-8B's exact tensor
   shapes and random N(0, 0.02) bf16 weights, sharded like the hub's (5 GB files + index), written tensor
   by tensor in row chunks: generating it never holds more than one chunk.
2. Quantizes it at ~4 bits/weight (d=2, K=256, group 128: the ``4bit`` preset) with
   ``fasq.stream.quantize_checkpoint`` in a child process, while this process polls the child's
   ``/proc/<pid>/status`` (VmHWM, VmRSS, RssAnon, RssFile) every 0.2 s: peak RSS measured from outside.
3. Reports wall time, peak RSS, tensors/s, weights/s, per-shape seconds per tensor (from the output's
   manifest), into ``benchmarks/results/streaming.json`` (one entry per model) and the section between
   ``<!-- streaming:begin -->`` and ``<!-- streaming:end -->`` of BENCHMARKS.md.

``--limit-layers N`` quantizes an N-layer model that reads the full-size shards: a directory of symlinks
to them, with config.json saying N layers and an index naming only those layers' tensors (plus
embeddings, final norm, LM head).  Every tensor shape of the full model is covered; memory does not
depend on the number of layers, and time grows linearly with it (the report extrapolates, labelled so).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import fasq  # noqa: F401
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT / "src"))

import torch

from fasq.stream.plan import INDEX_NAME
from fasq.stream.safetensors_io import FileWriter, plan_file, tensor_bytes

BEGIN, END = "<!-- streaming:begin -->", "<!-- streaming:end -->"
RESULTS = ROOT / "benchmarks" / "results" / "streaming.json"
SHAPES = {  # transformers LlamaConfig fields of the two models (public configs on the hub)
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072),
    "8b": dict(name="Llama-3-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
               tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192),
}
SHARD_BYTES = 5 * 10**9
CHUNK_ELEMS = 1 << 24


def llama_config(shape: dict, layers: int | None = None):
    from transformers import LlamaConfig

    kw = {k: v for k, v in shape.items() if k != "name"}
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return LlamaConfig(**kw, dtype="bfloat16", bos_token_id=128000, eos_token_id=128001)


def tensor_list(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in the order of the model's state_dict."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    model.tie_weights()
    seen, out = set(), []
    for name, t in model.state_dict().items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, tuple(t.shape)))
    if cfg.tie_word_embeddings:
        out = [(n, s) for n, s in out if n != "lm_head.weight"]
    return out


def generate(path: Path, shape: dict, seed: int = 0) -> None:
    """Write a random bf16 checkpoint of ``shape`` to ``path`` (atomically: a .tmp directory renamed)."""
    cfg = llama_config(shape)
    tensors = tensor_list(cfg)
    groups: list[list] = [[]]
    size = 0
    for name, shp in tensors:
        n = 2 * int(torch.tensor(shp).prod())
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, "BF16", shp))
        size += n
    k = len(groups)
    names = ["model.safetensors"] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for fname, group in zip(names, groups):
        layout = plan_file(fname, group, {"format": "pt"})
        w = FileWriter(tmp / fname, layout, fresh=True)
        for name, _, shp in group:
            ent = layout.entries[name]
            pos = ent.begin
            if len(shp) == 1:  # norms: ones, like a fresh checkpoint
                data = tensor_bytes(torch.ones(shp, dtype=torch.bfloat16))
                w.write_at(data, pos)
                pos += len(data)
            else:
                rows = max(1, CHUNK_ELEMS // shp[1])
                for r in range(0, shp[0], rows):
                    chunk = (torch.randn(min(rows, shp[0] - r), shp[1], generator=gen) * 0.02).to(torch.bfloat16)
                    data = tensor_bytes(chunk)
                    w.write_at(data, pos)
                    pos += len(data)
            assert pos == ent.end, name
            weight_map[name] = fname
        w.sync()
        w.close()
        print(f"  wrote {fname} ({layout.size / 1e9:.2f} GB) at {time.perf_counter() - t0:.0f}s", flush=True)
    if k > 1:
        total = sum(2 * int(torch.tensor(s).prod()) for _, s in tensors)
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    cfg.to_json_file(str(tmp / "config.json"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def limited_view(src: Path, dst: Path, shape: dict, layers: int) -> Path:
    """An N-layer checkpoint over the full model's shards: symlinks, a config and an index for N layers."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    wmap = json.loads((src / INDEX_NAME).read_text())["weight_map"] if (src / INDEX_NAME).is_file() else None
    if wmap is None:
        from fasq.stream.safetensors_io import read_header
        wmap = {n: "model.safetensors" for n in read_header(src / "model.safetensors")[0]}
    keep = {}
    for name, f in wmap.items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= layers:
                continue
        keep[name] = f
    for f in set(keep.values()):
        os.symlink(src / f, dst / f)
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=2))
    llama_config(shape, layers).to_json_file(str(dst / "config.json"))
    return dst


DRIVER = """
import json, sys
from fasq import preset
from fasq.stream import quantize_checkpoint
a = json.loads(sys.argv[1])
config = preset("4bit")
r = quantize_checkpoint(a["src"], a["out"], config, max_memory=a["max_memory"], workers=a["workers"],
                        device=a["device"], progress=False)
print("RESULT " + json.dumps({**r, "config": config.to_dict()}))
"""


def read_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_streaming(src: Path, out: Path, max_memory: str | None, workers: int | None, device: str | None,
                  resume: bool = False) -> dict:
    """Quantize in a child process; poll its memory from here."""
    shutil.rmtree(out, ignore_errors=True)
    if not resume:
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    arg = json.dumps({"src": str(src), "out": str(out), "max_memory": max_memory, "workers": workers,
                      "device": device})
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", DRIVER, arg], stdout=subprocess.PIPE, text=True)
    peak = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while p.poll() is None:
        for k, v in read_status(p.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    stdout = p.stdout.read()
    if p.returncode != 0:
        raise SystemExit(f"streaming run failed (exit {p.returncode})")
    r = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    r["wall_seconds"] = wall
    r["peak"] = peak
    return r


def per_shape_seconds(out: Path) -> list[dict]:
    man = json.loads((out / "fasq.json").read_text())
    rows: dict[tuple, list[float]] = {}
    for u in man["units"].values():
        if u["kind"] == "quantize":
            rows.setdefault(tuple(u["shape"]), []).append(u["seconds"])
    return [{"shape": list(s), "tensors": len(v), "mean_seconds": sum(v) / len(v), "max_seconds": max(v)}
            for s, v in sorted(rows.items())]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__}


def fmt_gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def markdown(results: dict) -> str:
    lines = [BEGIN, "## Streaming quantization (benchmarks/streaming.py)", "",
             "Checkpoints with the exact tensor shapes of the named models and random bf16 weights, generated "
             "locally, quantized at ~4 bits/weight (the `4bit` preset with the defaults of the day, in the settings "
             "column) by `fasq.stream.quantize_checkpoint`, tensor by tensor (after a per-block equalize pass when "
             "equalize is on; `tensors` counts those blocks too). Peak RSS is the child's VmHWM polled from outside "
             "(`/proc/<pid>/status`), including mapped libraries. See docs/streaming.md for the bound.", "",
             "| model | decoder layers quantized | settings | tensors | weights quantized | max-memory | workers | "
             "wall | tensors/s | Mweights/s | peak RSS (GiB) | output |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(results):
        r = results[key]
        c = r.get("config") or {}
        settings = (f"d{c['subvector_dim']} K{c['codebook_size']} g{c['group_size']} {c['scale_mode']}, "
                    f"equalize {c.get('equalize', 'none')}" if c else "see command")
        if c.get("target_bits"):
            settings += f", size target {c['target_bits']:g} bits/w (K per layer)"
        if c.get("outlier_fraction"):
            settings += f", {100 * c['outlier_fraction']:g}% outlier table"
        lines.append(f"| {r['model']} | {r['layers_quantized']} of {r['layers_total']} | {settings} | {r['units']} | "
                     f"{r['quantized_weights'] / 1e9:.2f} B | {r['max_memory']} | {r['workers']} | "
                     + (f"{r['wall_seconds']:.0f} s | {r['tensors_per_second']:.2f} | "
                        f"{r['weights_per_second'] / 1e6:.2f} | " if not r.get("units_resumed") else
                        f"{r['wall_seconds']:.0f} s for the last {r['units_run']} (resumed) | "
                        f"{r['tensors_per_second']:.2f} | — | ")
                     + f"{fmt_gib(r['peak']['VmHWM'])} | "
                     f"{r['total_bytes'] / 2**30:.2f} GiB, {r['bits_per_weight']:.3f} bits/w |")
    lines.append("")
    for key in sorted(results):
        r = results[key]
        lines.append(f"**{r['model']}, max-memory {r['max_memory']}** ({r['date']}, {r['machine']['cpu']}, "
                     f"{r['machine']['cores']} cores, {r['machine']['memory_gib']} GiB): "
                     f"`{r['command']}`. Peak RSS {fmt_gib(r['peak']['VmHWM'])} GiB (anonymous "
                     f"{fmt_gib(r['peak']['RssAnon'])}, file-backed {fmt_gib(r['peak']['RssFile'])})."
                     + (f" {r['note']}" if r.get("note") else ""))
        if r["layers_quantized"] < r["layers_total"]:
            lines.append(f"Only {r['layers_quantized']} of {r['layers_total']} decoder layers were quantized (an "
                         "index over the full-size shards)"
                         + (f"; the whole model at this rate would take about "
                            f"{r['extrapolated_full_seconds'] / 60:.0f} min (extrapolated, not measured)."
                            if r.get("extrapolated_full_seconds") else "."))
        lines.append("")
        lines.append("| tensor shape (out x in) | tensors | mean s/tensor | max s/tensor |")
        lines.append("| --- | --- | --- | --- |")
        for row in r["per_shape"]:
            lines.append(f"| {row['shape'][0]} x {row['shape'][1]} | {row['tensors']} | {row['mean_seconds']:.1f} | "
                         f"{row['max_seconds']:.1f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fasq-streaming-bench"))
    ap.add_argument("--max-memory", default=None, help="passed to quantize_checkpoint (default: its default)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--limit-layers", type=int, default=None, help="quantize only the first N decoder layers")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and the output")
    ap.add_argument("--tag", default=None, help="results key suffix, to keep runs of one model with other settings")
    ap.add_argument("--note", default=None, help="recorded with the result, e.g. what else loaded the machine")
    ap.add_argument("--resume", action="store_true",
                    help="resume an interrupted run's <out>.partial (the figures then cover the resumed part only)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    shape = SHAPES[args.model]
    src = args.workdir / f"{args.model}-bf16"
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if not (src / "config.json").is_file():
        print(f"generating {shape['name']}-shaped checkpoint in {src} ({free / 1e9:.0f} GB free)", flush=True)
        generate(src, shape)
    layers_total = shape["num_hidden_layers"]
    run_src = src
    if args.limit_layers and args.limit_layers < layers_total:
        run_src = limited_view(src, args.workdir / f"{args.model}-first{args.limit_layers}", shape, args.limit_layers)
    out = args.workdir / f"{args.model}-fasq"
    print(f"quantizing {run_src} -> {out}", flush=True)
    r = run_streaming(run_src, out, args.max_memory, args.workers, args.device, args.resume)
    layers = args.limit_layers if args.limit_layers and args.limit_layers < layers_total else layers_total
    r.update(model=f"{shape['name']}-shaped", layers_quantized=layers, layers_total=layers_total,
             per_shape=per_shape_seconds(out), tensors_per_second=r["units_run"] / r["wall_seconds"],
             weights_per_second=r["quantized_weights"] / r["wall_seconds"], machine=machine(),
             date=_dt.date.today().isoformat(), max_memory=args.max_memory or "default (half of available)",
             source_bytes=sum(p.stat().st_size for p in run_src.glob("*.safetensors")),
             command=shlex.join(["python", "benchmarks/streaming.py", *(argv if argv is not None else sys.argv[1:])]),
             note=args.note)
    if layers < layers_total and not args.resume:
        per_layer = r["wall_seconds"] / layers
        r["extrapolated_full_seconds"] = per_layer * layers_total
    r.pop("unit_seconds", None)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.model + (f"-{args.tag}" if args.tag else "")] = r
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    update_markdown(args.markdown, markdown(results))
    print(json.dumps({k: r[k] for k in ("model", "layers_quantized", "units", "wall_seconds", "tensors_per_second",
                                        "peak", "total_bytes", "bits_per_weight")}, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
        if run_src != src:
            shutil.rmtree(run_src, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
