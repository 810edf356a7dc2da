"""fasq against llama.cpp on the CPU (issue 25): greedy decode and a 512-token prompt, same model, same ids.

    PYTHONPATH=src python benchmarks/cpu_llamacpp.py --llamacpp-python /work/venv-baselines/bin/python

For each model (SmolLM2-135M, Gemma-3-270M) and thread count (1, 2), every round runs each engine once, in
its own process (so its peak RSS is its own), alternating (the order reverses every round): fasq
``--preset 4bit`` / ``3bit`` through ``fasq.bench.run_one`` (whatever engine fasq.bench picks; its ``engine``
is recorded when it reports one) and llama.cpp Q4_K_M / Q4_0 / Q3_K_M through llama-cpp-python
(``Llama.eval`` on token ids, greedy argmax over its logits).  Each process measures

* decode: greedy decoding of ``--new-tokens`` (128) tokens after the short prompt of ``fasq bench`` (in the
  chat template where the tokenizer has one); tokens/s from the median decode step, after a warm-up;
* prompt: one forward over a prompt of ``--prompt-tokens`` (512) tokens (the Lee corpus in the same template),
  after a warm-up; tokens/s = prompt tokens / seconds to the first token's logits.

Both engines get the same token ids (tokenized once here with the model's Hugging Face tokenizer).  Ratios
are fasq / llama.cpp per round (runs of the same round sit next to each other in time), and the table shows
their median: on a machine shared with other jobs, only ratios measured side by side mean anything.
Writes benchmarks/results/cpu_llamacpp.json (raw figures included) and benchmarks/results/cpu_llamacpp.md.
The fasq models are quantized once with this checkout (FASQ_CACHE/bench/MODEL-fasq-PRESET), the GGUFs made
once by :func:`fasq.sweep.llamacpp.gguf_for` (FASQ_CACHE/gguf/MODEL/TYPE.gguf).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("4bit", "Q4_K_M"), ("4bit", "Q4_0"), ("3bit", "Q3_K_M"))   # (fasq preset, llama.cpp type) compared
MODEL_TITLES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}


# ---------------------------------------------------------------------------------------------------
# workers: one engine, one process
def fasq_worker(req: dict) -> dict:
    import torch

    from fasq.bench import run_one

    torch.set_num_threads(req["threads"])
    dec = run_one(req["path"], new_tokens=req["new_tokens"], prompt=req["short_text"], threads=req["threads"])
    pre = run_one(req["path"], new_tokens=2, prompt=req["long_text"], threads=req["threads"])
    return {"decode_tok_s": 1e3 / dec["decode_step_ms_median"], "decode_tok_s_total": dec["decode_tokens_per_s"],
            "decode_cpu_s_per_token": dec["decode_cpu_s_per_token"], "prompt_tokens": pre["prompt_tokens"],
            "short_prompt_tokens": dec["prompt_tokens"], "prompt_tok_s": pre["prompt_tokens"] / pre["prefill_s"],
            "generated": dec["generated"], "engine": dec.get("engine"), "bits_per_weight": dec.get("bits_per_weight"),
            "peak_rss_mib": max(dec["peak_rss_mib"], pre["peak_rss_mib"])}


def llamacpp_worker(req: dict) -> dict:
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    from fasq.sweep.llamacpp_eval import model_params

    with model_params(use_extra_bufts=req["extra_buffer_types"]):   # llama.cpp's default: on (repacked weights)
        llm = Llama(model_path=req["path"], n_ctx=1024, n_threads=req["threads"], n_threads_batch=req["threads"],
                    verbose=False)
    n_vocab = llm.n_vocab()

    def run(ids: list[int], n: int):
        """Prefill ``ids``, then greedy-decode until ``n`` tokens: (tokens, prefill s, [(wall, cpu)] per token)."""
        llm.reset()                      # eval() then drops the KV cache from position 0
        t0 = time.perf_counter()
        toks, marks = [], []
        batch = ids
        for _ in range(n):
            llm.eval(batch)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            toks.append(int(logits.argmax()))
            marks.append((time.perf_counter(), time.process_time()))
            batch = [toks[-1]]
        return toks, marks[0][0] - t0, marks

    run(req["short_ids"], 4)                                       # warm-up, as fasq.bench does
    toks, _, marks = run(req["short_ids"], req["new_tokens"])
    steps = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    run(req["long_ids"], 1)
    _, prefill_s, _ = run(req["long_ids"], 1)
    return {"decode_tok_s": 1.0 / statistics.median(steps), "decode_tok_s_total": len(steps) / (marks[-1][0] - marks[0][0]),
            "decode_cpu_s_per_token": (marks[-1][1] - marks[0][1]) / len(steps),
            "prompt_tokens": len(req["long_ids"]), "short_prompt_tokens": len(req["short_ids"]),
            "prompt_tok_s": len(req["long_ids"]) / prefill_s, "generated": toks, "engine": "llama.cpp",
            "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(python: str, req: dict, timeout: float = 1200) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rq, out = Path(tmp) / "req.json", Path(tmp) / "out.json"
        rq.write_text(json.dumps(req))
        env = dict(os.environ, OMP_NUM_THREADS=str(req["threads"]), TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        load0 = os.getloadavg()[0]
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(rq), str(out)],
                              capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{req['engine']} {req['path']}: worker failed (exit {proc.returncode}): "
                               f"{proc.stderr[-2000:]}")
        res = json.loads(out.read_text())
    res["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return res


# ---------------------------------------------------------------------------------------------------
# what is compared: the models, files and prompts
def fasq_model(model: str, preset: str, embedding: str | None = None) -> Path:
    """fasq --preset PRESET of ``model``, quantized once with this checkout (the cache directory is named after
    the preset's resolved config, so a changed preset is quantized again); ``embedding`` "d:K" sets the token
    embedding / tied head table (``--quantize-embeddings``), "none" keeps them 16-bit, None as the preset says."""
    import hashlib

    from fasq import preset as fasq_preset
    from fasq.data import cache_dir
    from fasq.io import is_fasq_dir

    extra: list[str] = []
    overrides: dict = {}
    suffix = ""
    if embedding == "none":
        extra, overrides, suffix = ["--no-quantize-embeddings"], {"quantize_embeddings": False}, "-emb16"
    elif embedding:
        d, k = embedding.split(":")
        extra = ["--quantize-embeddings", "--embedding-subvector-dim", d, "--embedding-codebook-size", k]
        overrides = {"quantize_embeddings": True, "embedding_subvector_dim": int(d), "embedding_codebook_size": int(k)}
        suffix = f"-emb{d}x{k}"
    cfg = fasq_preset(preset, **overrides).to_dict()
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]
    out = cache_dir() / "bench" / f"{model}-fasq-{preset}{suffix}-{key}"
    if not is_fasq_dir(out):
        print(f"quantizing {model} --preset {preset} {' '.join(extra)} -> {out}", flush=True)
        subprocess.run([sys.executable, "-m", "fasq", "quantize", model, "-o", str(out), "--preset", preset,
                        *extra, "--overwrite"], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    return out


def gguf_files(python: str, model_dir: Path, types: list[str], threads: int) -> dict[str, Path]:
    """The GGUFs (made on first use) by fasq.sweep.llamacpp.gguf_for, in the interpreter that has llama_cpp."""
    code = ("import json, sys; from fasq.sweep.llamacpp import gguf_for; "
            "print(json.dumps({t: str(gguf_for(sys.argv[1], t, int(sys.argv[2]))) for t in sys.argv[3:]}))")
    proc = subprocess.run([python, "-c", code, str(model_dir), str(threads), *types], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    if proc.returncode != 0:
        raise RuntimeError(f"making the GGUFs of {model_dir} failed: {proc.stderr[-2000:]}")
    return {t: Path(p) for t, p in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def prompts(model_dir: Path, prompt_tokens: int) -> dict:
    """The short decode prompt (as fasq.bench.bench_model builds it) and a long prompt of exactly
    ``prompt_tokens`` ids (the Lee corpus in the same template): text for fasq.bench, ids for llama.cpp."""
    from transformers import AutoTokenizer

    from fasq.bench import DEFAULT_PROMPT
    from fasq.eval.texts import load_text

    tok = AutoTokenizer.from_pretrained(model_dir)

    def ids_of(text: str) -> list[int]:
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids

    corpus = tok(load_text("lee")[:20000], add_special_tokens=False).input_ids
    n = prompt_tokens - (len(ids_of("x")) - 1)       # minus the template's own tokens
    long_text = tok.decode(corpus[:n])
    for _ in range(10):                              # BPE merges at the cut can move the count by a token
        got = len(ids_of(long_text))
        if got == prompt_tokens:
            break
        n += prompt_tokens - got
        long_text = tok.decode(corpus[:n])
    return {"short_text": DEFAULT_PROMPT, "short_ids": ids_of(DEFAULT_PROMPT), "long_text": long_text,
            "long_ids": ids_of(long_text)}


def file_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------
def bench_model(model: str, args, llama_python: str, progress=lambda rows, raw: None) -> tuple[list[dict], dict]:
    from fasq.data import resolve_model

    model_dir = Path(resolve_model(model)[0])
    presets = sorted({p for p, _ in PAIRS}, reverse=True)
    types = list(dict.fromkeys(t for _, t in PAIRS))
    fasq_dirs = {p: fasq_model(model, p, args.embedding) for p in presets}
    ggufs = gguf_files(llama_python, model_dir, types, max(args.threads))
    pr = prompts(model_dir, args.prompt_tokens)
    engines = [("fasq", p, str(fasq_dirs[p]), sys.executable) for p in presets]
    engines += [("llamacpp", t, str(ggufs[t]), llama_python) for t in types]
    engines = [engines[i] for i in (0, 2, 3, 1, 4)] if len(engines) == 5 else engines   # 4bit, Q4_K_M, Q4_0, 3bit, Q3_K_M
    raw: dict = {"model_dir": str(model_dir), "prompt_tokens": len(pr["long_ids"]),
                 "short_prompt_tokens": len(pr["short_ids"]), "runs": []}
    for threads in args.threads:
        for r in range(args.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            for engine, setting, path, python in order:
                req = {"engine": engine, "path": path, "threads": threads, "new_tokens": args.new_tokens,
                       "extra_buffer_types": args.extra_buffer_types == "on", **pr}
                res = run_worker(python, req)
                res.update(engine_name=engine, setting=setting, threads=threads, round=r,
                           file_bytes=file_bytes(Path(path)))
                raw["runs"].append(res)
                progress(summarize(model, args.threads, raw), raw)
                print(f"{model} t={threads} round {r + 1}/{args.rounds} {engine} {setting}: decode "
                      f"{res['decode_tok_s']:.1f} tok/s, prompt {res['prompt_tok_s']:.0f} tok/s, peak RSS "
                      f"{res['peak_rss_mib']:.0f} MiB, load {res['load_avg_1min']}", flush=True)
    return summarize(model, args.threads, raw), raw


def summarize(model: str, thread_counts: list[int], raw: dict) -> list[dict]:
    """One row per (threads, pair) from the runs so far (pairs without a complete round are left out)."""
    rows = []
    for threads in thread_counts:
        runs = [x for x in raw["runs"] if x["threads"] == threads]
        for preset, qtype in PAIRS:
            f = {x["round"]: x for x in runs if x["engine_name"] == "fasq" and x["setting"] == preset}
            ll = {x["round"]: x for x in runs if x["engine_name"] == "llamacpp" and x["setting"] == qtype}
            rounds = sorted(set(f) & set(ll))
            if not rounds:
                continue
            dr = [f[i]["decode_tok_s"] / ll[i]["decode_tok_s"] for i in rounds]
            pr_ = [f[i]["prompt_tok_s"] / ll[i]["prompt_tok_s"] for i in rounds]
            med = lambda xs: round(statistics.median(xs), 3)   # noqa: E731
            rows.append({
                "model": model, "threads": threads, "fasq": preset, "llamacpp": qtype,
                "decode_ratio": med(dr), "prompt_ratio": med(pr_),
                "decode_ratios": [round(v, 3) for v in dr], "prompt_ratios": [round(v, 3) for v in pr_],
                "fasq_decode_tok_s": med([f[i]["decode_tok_s"] for i in rounds]),
                "llamacpp_decode_tok_s": med([ll[i]["decode_tok_s"] for i in rounds]),
                "fasq_prompt_tok_s": med([f[i]["prompt_tok_s"] for i in rounds]),
                "llamacpp_prompt_tok_s": med([ll[i]["prompt_tok_s"] for i in rounds]),
                "fasq_peak_rss_mib": max(f[i]["peak_rss_mib"] for i in rounds),
                "llamacpp_peak_rss_mib": max(ll[i]["peak_rss_mib"] for i in rounds),
                "fasq_file_bytes": f[rounds[0]]["file_bytes"], "llamacpp_file_bytes": ll[rounds[0]]["file_bytes"],
                "fasq_engine": f[rounds[0]].get("engine"),
                "load_avg_1min": [x["load_avg_1min"][0] for x in runs],
            })
    return rows


def machine(llama_python: str) -> dict:
    import platform

    import torch

    from fasq.bench import peak_rss_mib  # noqa: F401  (fasq importable: the same checkout the workers run)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    info = subprocess.run([llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__); "
                           "print(llama_cpp.llama_print_system_info().decode())"], capture_output=True, text=True)
    lines = info.stdout.strip().splitlines()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "llama_cpp_python": lines[0] if lines else "?", "llama_cpp_system_info": " ".join(lines[1:]),
            "load_avg_start": [round(v, 2) for v in os.getloadavg()]}


def commit() -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + ("-dirty" if dirty else "")


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"fasq against llama.cpp on the CPU (issue 25): {doc['date']}, commit {doc['commit']}, {m['cpu']} "
             f"({m['cores']} cores, shared with other jobs: 1-minute load average {doc['load_summary']} over the "
             f"runs), llama-cpp-python {m['llama_cpp_python']}, torch {m['torch']}. Command: `{doc['command']}`.",
             "", f"Greedy decode of {doc['new_tokens']} tokens after a short prompt and a {doc['prompt_tokens']}-token "
             f"prompt; same token ids for both engines; {doc['rounds']} rounds, each engine in its own process, "
             "alternating; tok/s are medians over rounds (decode: from each run's median step), ratios the median "
             "of per-round fasq / llama.cpp ratios (> 1: fasq faster). fasq's token embedding / tied head: "
             f"{doc.get('fasq_embedding', '16-bit')} (d:K of its PQ table when quantized).", "",
             "| model | threads | fasq | fasq engine | llama.cpp | decode tok/s fasq / llama.cpp | decode ratio "
             "| prompt tok/s fasq / llama.cpp | prompt ratio | peak RSS MiB fasq / llama.cpp | file MiB fasq / llama.cpp |",
             "|---|--:|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in doc["rows"]:
        lines.append(
            f"| {MODEL_TITLES.get(r['model'], r['model'])} | {r['threads']} | {r['fasq']} | {r['fasq_engine'] or 'transformers'} "
            f"| {r['llamacpp']} | {r['fasq_decode_tok_s']:.1f} / {r['llamacpp_decode_tok_s']:.1f} "
            f"| **{r['decode_ratio']:.2f}x** | {r['fasq_prompt_tok_s']:.0f} / {r['llamacpp_prompt_tok_s']:.0f} "
            f"| **{r['prompt_ratio']:.2f}x** | {r['fasq_peak_rss_mib']:.0f} / {r['llamacpp_peak_rss_mib']:.0f} "
            f"| {r['fasq_file_bytes'] / 2**20:.1f} / {r['llamacpp_file_bytes'] / 2**20:.1f} |")
    if not doc.get("complete", True):
        lines += ["", "Incomplete run: the rows above are the pairs measured before it stopped."]
    lines += ["", "Targets (issue 25): decode fasq 4-bit >= Q4_K_M and 3-bit >= Q3_K_M (ratio >= 1); prompt "
              "ratio >= 0.8."]
    for r in doc["rows"]:
        if (r["fasq"], r["llamacpp"]) in (("4bit", "Q4_K_M"), ("3bit", "Q3_K_M")):
            lines.append(f"- {MODEL_TITLES.get(r['model'], r['model'])}, {r['threads']} thread(s), {r['fasq']} vs "
                         f"{r['llamacpp']}: decode {r['decode_ratio']:.2f}x ({'met' if r['decode_ratio'] >= 1 else 'NOT met'}), "
                         f"prompt {r['prompt_ratio']:.2f}x ({'met' if r['prompt_ratio'] >= 0.8 else 'NOT met'}).")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        req = json.loads(Path(argv[1]).read_text())
        res = (fasq_worker if req["engine"] == "fasq" else llamacpp_worker)(req)
        Path(argv[2]).write_text(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--llamacpp-python", default=os.environ.get("FASQ_SWEEP_PYTHON", sys.executable),
                    help="interpreter with llama_cpp (e.g. the venv of fasq sweep --setup-baselines)")
    ap.add_argument("--extra-buffer-types", choices=("on", "off"), default="on",
                    help="llama.cpp's extra CPU buffer types (weight repacking; AMX where built in): on is its "
                         "default; off only for a build whose AMX path crashes (see docs/accuracy.md)")
    ap.add_argument("--embedding", metavar="D:K",
                    help="fasq's token embedding / tied head table (e.g. 1:256), or 'none' for 16-bit; default: "
                         "as the presets say (an 8-bit table, 1:256)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_llamacpp.json"))
    args = ap.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    doc = {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine(args.llamacpp_python),
           "command": "python benchmarks/cpu_llamacpp.py " + " ".join(argv), "new_tokens": args.new_tokens,
           "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
           "llamacpp_extra_buffer_types": args.extra_buffer_types,
           "fasq_embedding": {None: "as the preset stores it (1:256, an 8-bit table)", "none": "16-bit"}.get(
               args.embedding, args.embedding),
           "rows": [], "raw": {}}
    t0 = time.time()
    out = Path(args.out)
    done: list[dict] = []

    def write(rows: list[dict], raw: dict, model: str, final: bool = False) -> None:
        """Rewrite the JSON and the table after every run: an interrupted benchmark keeps what it measured."""
        doc["rows"] = done + rows
        doc["raw"][model] = raw
        doc["complete"] = final
        loads = [v for r in doc["rows"] for v in r["load_avg_1min"]] or [float("nan")]
        doc["load_summary"] = f"{min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f})"
        doc["seconds"] = round(time.time() - t0)
        write_atomic(out, json.dumps(doc, indent=2) + "\n")
        write_atomic(out.with_suffix(".md"), markdown(doc))

    models = args.models.split(",")
    for i, model in enumerate(models):
        rows, raw = bench_model(model, args, args.llamacpp_python, lambda r, w, m=model: write(r, w, m))
        write(rows, raw, model, final=i == len(models) - 1)
        done += rows
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
