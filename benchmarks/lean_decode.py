"""fasq's lean decode path against transformers and llama.cpp on the CPU: decode and prompt tokens/s.

    python benchmarks/lean_decode.py                                  # smollm2 + gemma3-270m, 1 and 2 threads
    python benchmarks/lean_decode.py --models smollm2 --threads 1 --rounds 5 --fasq-root /tmp/q

Per (model, threads) every engine runs in its own process, the engines alternating, for ``--rounds``
rounds: fasq ``--preset 4bit`` and ``3bit`` through the lean path (``fasq.decode``), fasq 4bit through
transformers (the path before it), and each llama.cpp type found as ``~/.cache/fasq/gguf/<checkpoint>/<TYPE>.gguf``
(run by ``--llamacpp-python``, default /work/venv-baselines/bin/python, which imports ``llama_cpp``).
Every process gets the same token ids (the Hugging Face tokenizer's; the GGUFs carry the same vocabulary):

* prompt: the first 512 tokens of the Lee text (a BOS first where the tokenizer adds one), prefilled once
  to warm up, then ``--prefill-reps`` times; prompt tokens/s from the fastest;
* decode: ``--new-tokens`` (128) greedy tokens after ``fasq bench``'s prompt (in the chat template where the tokenizer has one); tokens/s from
  the median step (robust to other jobs on the shared machine), after a 4-token warm-up.

Ratios (fasq / llama.cpp, lean / transformers) are medians of round-by-round ratios of runs made minutes
apart under the same load.  Writes benchmarks/results/lean_decode.json (with the load average before and
after) and prints a table.  fasq models are read from ``--fasq-root/<model>-<preset>`` (quantized there
by ``fasq.stream.quantize_checkpoint`` when missing).
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

ROOT = Path(__file__).resolve().parent.parent
GGUF_ROOT = Path.home() / ".cache" / "fasq" / "gguf"
LLAMACPP_TYPES = ("Q4_K_M", "Q3_K_M", "Q4_0")
PAIRS = {"4bit": "Q4_K_M", "3bit": "Q3_K_M"}       # the targets: fasq preset -> the llama.cpp type to beat
SHORT_PROMPT = "Explain in a few sentences why the sky is blue."


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))


def dir_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf")]
    return sum(p.stat().st_size for p in files) / 2**20


# -- workers (one process each) ----------------------------------------------------------------------------
def worker_fasq(req: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    import fasq
    from fasq.bench import bench_decode, bench_decode_lean
    from fasq.decode import LeanDecoder

    torch.set_num_threads(req["threads"])
    model = fasq.load(req["path"], dense_16bit=True)
    short, long_ = torch.tensor([req["short_ids"]]), torch.tensor([req["long_ids"]])
    n = req["new_tokens"]
    if req["engine"] == "lean":
        dec = LeanDecoder(model, max_len=max(long_.shape[1], short.shape[1] + n) + 1)

        def prefill():
            dec.reset()
            dec.prefill(long_)
        res = bench_decode_lean(dec, short, new_tokens=n)
    else:
        def prefill():
            with torch.inference_mode():
                model(input_ids=long_, logits_to_keep=1)
        res = bench_decode(model, short, new_tokens=n)
    times = []
    for _ in range(req["prefill_reps"] + 1):
        t0 = time.perf_counter()
        prefill()
        times.append(time.perf_counter() - t0)
    return {"generated": res["generated"], "step_ms": res["decode_step_ms_median"],
            "prefill_s": min(times[1:]), "peak_rss_mib": peak_rss_mib()}


def worker_llamacpp(req: dict) -> dict:
    import ctypes

    import llama_cpp
    import llama_cpp.llama
    import numpy as np

    if not req["extra_bufts"]:
        # llama-cpp-python 0.3.36 as built in /work/venv-baselines (AVX512, VNNI, AMX_INT8, REPACK) segfaulted in
        # its first decode of every quantized GGUF here (Q4_K_M, Q4_0, Q3_K_M, IQ4_XS; F16 ran), also with AMX
        # tile permission requested first; with the extra buffer types (the repacked / AMX weight layouts)
        # off it runs.  So llama.cpp runs on its plain ggml CPU kernels (AVX512/VNNI dot products), which may
        # be slower than its repacked ones: the table says so.
        default_params = llama_cpp.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=req["path"], n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=req["threads"],
                          n_threads_batch=req["threads"], verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits():   # a view of llama.cpp's own buffer: no copy per token
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    times = []
    for _ in range(req["prefill_reps"] + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(req["long_ids"])
        times.append(time.perf_counter() - t0)

    def run(n):
        llm.reset()
        llm.eval(req["short_ids"])
        tok, toks, marks = int(last_logits().argmax()), [], [time.perf_counter()]
        toks.append(tok)
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(last_logits().argmax())
            toks.append(tok)
            marks.append(time.perf_counter())
        return toks, [b - a for a, b in zip(marks, marks[1:])]

    run(4)
    toks, steps = run(req["new_tokens"])
    return {"generated": toks, "step_ms": 1e3 * statistics.median(steps), "prefill_s": min(times[1:]),
            "peak_rss_mib": peak_rss_mib(), "llama_cpp": llama_cpp.__version__, "extra_bufts": req["extra_bufts"],
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}


# -- driver ------------------------------------------------------------------------------------------------
def token_ids(model: str) -> tuple[list[int], list[int]]:
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from fasq.data import embedded_checkpoint
    from fasq.eval.texts import lee

    tok = AutoTokenizer.from_pretrained(str(embedded_checkpoint(model)))
    if getattr(tok, "chat_template", None):
        chat = tok.apply_chat_template([{"role": "user", "content": SHORT_PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
        short = tok(chat, add_special_tokens=False).input_ids
    else:   # Gemma-3-270M's tokenizer here has no chat template: the plain question, BOS first
        short = tok(SHORT_PROMPT, add_special_tokens=True).input_ids
    long_ = tok(lee(), add_special_tokens=True).input_ids[:512]
    return short, long_


def checkpoint_name(model: str) -> str:
    """The cached checkpoint's directory name (the llamacpp benchmark's GGUF folder is named after it)."""
    sys.path.insert(0, str(ROOT / "src"))
    from fasq.data import embedded_checkpoint

    return embedded_checkpoint(model).name


def fasq_model(root: Path, model: str, preset: str) -> Path:
    path = root / f"{model}-{preset}"
    if not path.is_dir():
        sys.path.insert(0, str(ROOT / "src"))
        import fasq
        from fasq.data import embedded_checkpoint
        from fasq.stream import quantize_checkpoint

        quantize_checkpoint(embedded_checkpoint(model), str(path), fasq.preset(preset), progress=False)
    return path


def run_worker(python: str, req: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rq, out = Path(tmp) / "req.json", Path(tmp) / "out.json"
        rq.write_text(json.dumps(req))
        env = dict(os.environ, OMP_NUM_THREADS=str(req["threads"]))
        proc = subprocess.run([python, __file__, "--worker", str(rq), str(out)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{req['name']}: worker failed: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--fasq-root", default=str(Path.home() / ".cache" / "fasq" / "lean"))
    ap.add_argument("--llamacpp-python", default="/work/venv-baselines/bin/python")
    ap.add_argument("--no-transformers", action="store_true", help="skip fasq 4bit through transformers")
    ap.add_argument("--llamacpp-types", default=",".join(LLAMACPP_TYPES))
    ap.add_argument("--llamacpp-extra-bufts", action="store_true",
                    help="let llama.cpp use its repacked / AMX weight buffers (segfaulted here, see worker_llamacpp)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lean_decode.json"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        req = json.loads(Path(args.worker[0]).read_text())
        res = (worker_fasq if req["kind"] == "fasq" else worker_llamacpp)(req)
        Path(args.worker[1]).write_text(json.dumps(res))
        return
    load_before, t_start = os.getloadavg(), time.time()
    rows, runs_all = [], {}
    for model in args.models.split(","):
        short, long_ = token_ids(model)
        engines = [(f"fasq-{p}-lean", "fasq", str(fasq_model(Path(args.fasq_root), model, p)), "lean")
                   for p in ("4bit", "3bit")]
        if not args.no_transformers:
            engines.append(("fasq-4bit-transformers", "fasq", engines[0][2], "transformers"))
        gguf_dir = GGUF_ROOT / checkpoint_name(model)
        ggufs = {t: gguf_dir / f"{t}.gguf" for t in args.llamacpp_types.split(",")}
        engines += [(f"llamacpp-{t}", "llamacpp", str(g), "llamacpp") for t, g in ggufs.items() if g.is_file()]
        for threads in (int(t) for t in args.threads.split(",")):
            runs = {name: [] for name, *_ in engines}
            for r in range(args.rounds):
                for name, kind, path, engine in engines:
                    req = dict(name=name, kind=kind, path=path, engine=engine, threads=threads, short_ids=short,
                               long_ids=long_, new_tokens=args.new_tokens, prefill_reps=args.prefill_reps,
                               extra_bufts=args.llamacpp_extra_bufts)
                    res = run_worker(sys.executable if kind == "fasq" else args.llamacpp_python, req)
                    res["load"] = os.getloadavg()[0]
                    runs[name].append(res)
                    print(f"{model} t={threads} round {r + 1} {name}: {1e3 / res['step_ms']:.1f} tok/s decode, "
                          f"{len(long_) / res['prefill_s']:.0f} tok/s prompt (load {res['load']:.1f})", flush=True)
            runs_all[f"{model}/t{threads}"] = runs
            rows += summarize(model, threads, runs, engines, len(long_))
            write(args, rows, runs_all, load_before, t_start)     # after each (model, threads): a stopped run keeps them
    print(table(rows))


def write(args, rows: list, runs_all: dict, load_before, t_start: float) -> None:
    out = {"date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
           "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
           "load_average_before": [round(v, 1) for v in load_before],
           "load_average_after": [round(v, 1) for v in os.getloadavg()],
           "command": "python benchmarks/lean_decode.py " + " ".join(sys.argv[1:]),
           "seconds": round(time.time() - t_start), "prompt_tokens": 512, "new_tokens": args.new_tokens,
           "rows": rows, "runs": runs_all}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)


def summarize(model: str, threads: int, runs: dict, engines: list, n_prompt: int) -> list[dict]:
    """One row per engine: best-run figures, and per-round ratios against llama.cpp's paired type and
    against fasq 4bit through transformers."""
    def ratio(a: str, b: str, key: str) -> float | None:
        """a's speed over b's (tokens/s): the median over rounds of b's time / a's time."""
        if a not in runs or b not in runs:
            return None
        return round(statistics.median(y[key] / x[key] for x, y in zip(runs[a], runs[b])), 3)

    rows = []
    for name, kind, path, engine in engines:
        rs = runs[name]
        row = {"model": model, "threads": threads, "engine": name, "size_mib": round(dir_mib(Path(path)), 1),
               "decode_tok_s": round(1e3 / min(r["step_ms"] for r in rs), 1),
               "prompt_tok_s": round(n_prompt / min(r["prefill_s"] for r in rs), 1),
               "decode_tok_s_runs": [round(1e3 / r["step_ms"], 1) for r in rs],
               "prompt_tok_s_runs": [round(n_prompt / r["prefill_s"], 1) for r in rs],
               "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs)), "load": [r["load"] for r in rs]}
        preset = name.split("-")[1] if kind == "fasq" else None
        if kind == "fasq" and engine == "lean":
            ll = f"llamacpp-{PAIRS[preset]}"
            row.update(llamacpp=PAIRS[preset], decode_ratio=ratio(name, ll, "step_ms"),
                       prompt_ratio=ratio(name, ll, "prefill_s"))
            if "fasq-4bit-transformers" in runs and preset == "4bit":
                row["decode_vs_transformers"] = ratio(name, "fasq-4bit-transformers", "step_ms")
                row["prompt_vs_transformers"] = ratio(name, "fasq-4bit-transformers", "prefill_s")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | threads | engine | MiB | decode tok/s | prompt tok/s | decode / llama.cpp | prompt / llama.cpp | "
             "peak RSS MiB |", "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        vs = f"{r['decode_ratio']} ({r['llamacpp']})" if r.get("decode_ratio") else "-"
        pv = f"{r['prompt_ratio']}" if r.get("prompt_ratio") else "-"
        lines.append(f"| {r['model']} | {r['threads']} | {r['engine']} | {r['size_mib']} | {r['decode_tok_s']} | "
                     f"{r['prompt_tok_s']} | {vs} | {pv} | {r['peak_rss_mib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
