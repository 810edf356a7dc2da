"""Quantized embedding and head: whole-model size and perplexity with and without them (issue 22).

    python benchmarks/embedding.py                                   # both models, 4bit and 3bit, seed 0, Lee
    python benchmarks/embedding.py --models smollm2 --presets 4bit --seeds 0 1 2 --texts lee austen \\
        --embedding 2:256 2:512

For each model, preset and seed: the body linears are quantized once with the preset (embedding and head at
16 bits, as before) and scored; then, for each embedding setting ``d:K``, a copy of that model gets its
embedding and (tied) head quantized by ``fasq.quantize`` with ``quantize_embeddings=True`` (the body's
PQLinears are already quantized and are left alone; ``equalize='none'`` and no size target for this second
call, which the table fit does not read) and is scored on the same windows.  The tables come out exactly
as in a one-shot ``fasq.quantize(model, preset(..., quantize_embeddings=True))``
(tests/test_embedding.py checks that on the tiny models).  Perplexity: 8192 tokens of each text in windows
of 512 (fasq sweep's windows).  Appends rows to benchmarks/results/embedding.json as they finish.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "embedding.json"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _size(model) -> dict:
    import fasq

    r = fasq.model_size_report(model)
    return {k: r[k] for k in SIZE_KEYS}


def original_tables(model) -> dict[str, torch.Tensor]:
    """The fp32 embedding and head weights, before the first fasq.quantize rounds them to fp16."""
    mods = {"embedding": model.get_input_embeddings(), "head": model.get_output_embeddings()}
    return {k: m.weight.detach().clone() for k, m in mods.items() if m is not None}


def restore_tables(model, tables: dict[str, torch.Tensor]) -> None:
    """Put the fp32 tables back, so that the table fit reads what a one-shot fasq.quantize reads."""
    mods = {"embedding": model.get_input_embeddings(), "head": model.get_output_embeddings()}
    with torch.no_grad():
        for k, w in tables.items():
            mods[k].weight.copy_(w)


def table(rows: list[dict]) -> str:
    """Markdown: one line per (model, preset, seed, text, table setting), with the change against the 16-bit table."""
    base = {(r["model"], r["preset"], r["seed"], r["text"]): r for r in rows if r["embedding"] == "16-bit"}
    out = ["| model | preset | seed | text | embedding/head | table bits/w | whole model % FP16 | whole-model bits/w "
           "| perplexity | vs 16-bit table | load (1 min) |", "|---|---|--:|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        b = base.get((r["model"], r["preset"], r["seed"], r["text"]))
        change = f"{100 * (r['perplexity'] / b['perplexity'] - 1):+.2f}%" if b and b is not r else ""
        tb = f"{r['embedding_bits_per_weight']:.3f}" if r["embedding_bits_per_weight"] else "16"
        label = "16-bit (as before)" if r["embedding"] == "16-bit" else f"d:K = {r['embedding']}"
        out.append(f"| {r['model']} | {r['preset']} | {r['seed']} | {r['text']} | {label} | {tb} | "
                   f"{100 * r['fraction_of_fp16']:.1f} | {r['model_bits_per_weight']:.3f} | {r['perplexity']:.3f} | "
                   f"{change} | {r['load_1min']:.1f} |")
    return "\n".join(out)


SIZE_KEYS = ("bits_per_weight", "embedding_bits_per_weight", "fraction_of_fp16", "model_bits_per_weight",
             "total_bytes", "fp16_bytes")


def planned_sizes(models: list[str], presets: list[str], settings: list[str]) -> list[dict]:
    """Exact stored sizes from the streaming plan (shapes only, no fitting): each preset with the 16-bit table,
    with each table setting, and ``--size-of model`` (the preset's bits over the whole model) at the default."""
    import fasq
    from fasq.data import embedded_checkpoint
    from fasq.stream.plan import build_plan, open_source

    rows = []
    for name in models:
        src = open_source(embedded_checkpoint(name))
        for preset in presets:
            cases = [("16-bit", {})] + [(e, dict(quantize_embeddings=True, embedding_subvector_dim=int(e.split(":")[0]),
                                                 embedding_codebook_size=int(e.split(":")[1]))) for e in settings]
            cases.append((f"default, --size-of model", dict(quantize_embeddings=True, size_scope="model")))
            for label, kw in cases:
                r = build_plan(src, fasq.preset(preset, **kw)).size_report()
                rows.append({"model": name, "preset": preset, "embedding": label, **{k: r[k] for k in SIZE_KEYS}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2"])
    ap.add_argument("--presets", nargs="+", default=["4bit", "3bit"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--texts", nargs="+", default=["lee"])
    ap.add_argument("--embedding", nargs="+", default=["2:256", "2:512"], help="d:K settings of the table")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward (Gemma's 262k-wide logits: 1)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--body", type=Path, help="a saved fasq model of the (single) model, preset and seed: its body "
                    "is used instead of quantizing again")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the 16-bit table's row")
    ap.add_argument("--sizes", action="store_true", help="store and print the planned sizes (no fitting) and exit")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(table(_load(args.out)["rows"]))
        return
    if args.sizes:
        data = _load(args.out)
        data["planned_sizes"] = planned_sizes(args.models, args.presets, args.embedding)
        _write(args.out, data)
        for r in data["planned_sizes"]:
            print(f"{r['model']} {r['preset']} {r['embedding']}: body {r['bits_per_weight']:.3f} b/w, whole model "
                  f"{100 * r['fraction_of_fp16']:.2f}% of FP16 = {r['model_bits_per_weight']:.3f} b/w")
        return

    import fasq
    from fasq.data import embedded_checkpoint
    from fasq.eval import texts as T
    from fasq.eval.perplexity import perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _load(args.out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    text = {t: getattr(T, t)() for t in args.texts}
    for name in args.models:
        path = embedded_checkpoint(name)
        tok = AutoTokenizer.from_pretrained(path)
        for preset in args.presets:
            for seed in args.seeds:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                tables = original_tables(model)
                t0 = time.perf_counter()
                if args.body:   # the body saved by `fasq quantize MODEL --preset P --seed S` (the same body)
                    model = fasq.load(args.body)
                    saved = model.fasq_config
                    if (saved.target_bits, saved.seed) != (fasq.preset(preset).target_bits, seed):
                        raise SystemExit(f"--body {args.body} is not --preset {preset} at seed {seed}")
                else:
                    fasq.quantize(model, fasq.preset(preset, seed=seed), progress=False)
                body_s = time.perf_counter() - t0
                variants = [("16-bit", None)] * args.baseline + [(e, tuple(int(v) for v in e.split(":"))) for e in args.embedding]
                for i, (label, dk) in enumerate(variants):
                    m = model
                    secs = body_s
                    if dk is not None:   # the last variant takes the model itself (Gemma's copy: +1 GB)
                        m = copy.deepcopy(model) if i < len(variants) - 1 else model
                        restore_tables(m, tables)
                        cfg = fasq.preset(preset, seed=seed, quantize_embeddings=True, embedding_subvector_dim=dk[0],
                                          embedding_codebook_size=dk[1], equalize="none", target_bits=None)
                        t0 = time.perf_counter()
                        fasq.quantize(m, cfg, progress=False)
                        secs = time.perf_counter() - t0
                    for tname, tx in text.items():
                        r = perplexity(m, tok, tx, max_tokens=args.max_tokens, batch_size=args.batch_size, progress=False)
                        row = {"model": name, "preset": preset, "seed": seed, "embedding": label, "text": tname,
                               "perplexity": r["perplexity"], "tokens_scored": r["tokens_scored"],
                               **_size(m), "quantize_seconds": round(secs, 1),
                               "load_1min": os.getloadavg()[0], "commit": commit,
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "machine": f"{platform.machine()} {os.cpu_count()} cores"}
                        data["rows"].append(row)
                        _write(args.out, data)
                        print(json.dumps({k: row[k] for k in ("model", "preset", "seed", "embedding", "text",
                                                              "perplexity", "fraction_of_fp16", "load_1min")}),
                              flush=True)
                    del m


if __name__ == "__main__":
    main()
