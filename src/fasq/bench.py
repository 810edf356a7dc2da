"""``fasq bench``: end-to-end greedy decoding speed and peak memory of whole models, side by side.

    fasq bench smollm2 out/smollm2-fasq            # the original and a quantized model, CPU
    fasq bench out/model-fasq --device cuda --new-tokens 128

Each model is loaded and decoded in its own subprocess (so that each peak memory is its own), the
models alternate for ``--repeats`` rounds, and the table reports each model's decode speed and its
speed relative to the first model, both from the median decode step of each run (robust to other jobs
on a shared machine: a stall of a few steps moves a run's total time, not its median step; the relative
speed is the median of round-by-round ratios), its peak memory and its size.  The same prompt (in the chat
template where the tokenizer has one) and the same number of new tokens for every model.
"""
from __future__ import annotations

import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


@torch.inference_mode()
def bench_decode(model, input_ids: torch.Tensor, new_tokens: int = 64, warmup: int = 4) -> dict:
    """Greedy decode ``new_tokens`` after ``input_ids`` [1, S] with a Hugging Face causal LM.

    Returns the generated ids, prefill seconds, decode tokens/s, the median decode step (ms) and
    CPU seconds per decoded token (the prompt is prefilled once, then one token per forward with the
    KV cache; a warm-up run first prepares per-layer kernel caches and compiles GPU kernels).  On a
    GPU every step is synchronized before its time is read.
    """
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"     # transformers >= 5 says "cache"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)

    def run(n):
        out = model(input_ids=input_ids, use_cache=True, **extra)
        past, tok = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)
        sync()
        marks = [(time.perf_counter(), time.process_time())]
        toks = [tok]
        for _ in range(n - 1):
            out = model(input_ids=tok, use_cache=True, **{cache_kw: past}, **extra)
            past, tok = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)
            toks.append(tok)
            sync()
            marks.append((time.perf_counter(), time.process_time()))
        return torch.cat(toks, 1), marks

    if warmup:
        run(min(warmup, new_tokens))
    sync()
    t0 = time.perf_counter()
    ids, marks = run(new_tokens)
    return _decode_result(ids[0].tolist(), t0, marks, new_tokens)


@torch.inference_mode()
def bench_decode_lean(decoder, input_ids: torch.Tensor, new_tokens: int = 64, warmup: int = 4) -> dict:
    """:func:`bench_decode` (same keys) with fasq's lean decode path (:class:`fasq.decode.LeanDecoder`):
    prefill of the prompt, then one :meth:`step` per token, timed the same way."""
    def run(n):
        decoder.reset()
        tok = decoder.prefill(input_ids).argmax(-1)
        marks = [(time.perf_counter(), time.process_time())]
        toks = [int(tok)]
        for _ in range(n - 1):
            tok = decoder.step(tok).argmax(-1)
            toks.append(int(tok))
            marks.append((time.perf_counter(), time.process_time()))
        return toks, marks

    if warmup:
        run(min(warmup, new_tokens))
    t0 = time.perf_counter()
    toks, marks = run(new_tokens)
    return _decode_result(toks, t0, marks, new_tokens)


def _decode_result(toks: list[int], t0: float, marks: list, new_tokens: int) -> dict:
    (t1, c1), (t2, c2) = marks[0], marks[-1]
    steps = [b[0] - a[0] for a, b in zip(marks, marks[1:])] or [float("nan")]
    return {"generated": toks, "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_tokens_per_s": len(steps) / (t2 - t1) if new_tokens > 1 else float("nan"),
            # robust to other jobs on a shared machine: the median step, and CPU time per step
            "decode_step_ms_median": 1e3 * statistics.median(steps),
            "decode_cpu_s_per_token": (c2 - c1) / len(steps)}


def bench_model(model, tokenizer, prompt: str = DEFAULT_PROMPT, new_tokens: int = 64, warmup: int = 4,
                chat: bool = True, engine: str = "auto") -> dict:
    """:func:`bench_decode` from a text prompt (wrapped in the tokenizer's chat template when it has
    one and ``chat``); adds the prompt length, prompt tokens/s, the decoded text and ``engine``: "lean"
    (fasq's own decode path, the default where it supports the model: ``engine`` "auto" or "lean") or
    "transformers"."""
    from .decode import lean_decoder

    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    decoder = lean_decoder(model, max_len=ids.shape[1] + new_tokens, engine=engine)
    if decoder is not None:
        res = bench_decode_lean(decoder, ids, new_tokens=new_tokens, warmup=warmup)
    else:
        res = bench_decode(model, ids, new_tokens=new_tokens, warmup=warmup)
    res.update(prompt_tokens=int(ids.shape[1]), prompt_tokens_per_s=ids.shape[1] / res["prefill_s"],
               engine="lean" if decoder is not None else "transformers",
               text=tokenizer.decode(res["generated"], skip_special_tokens=True))
    return res


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM where /proc has it).  Not ru_maxrss first: after
    fork + exec that starts at the parent's resident size, so every worker would report at least
    the parent's memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def weights_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, shared storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_one(model_arg: str, new_tokens: int = 64, prompt: str = DEFAULT_PROMPT, device: str = "cpu",
            threads: int = 0, dense_16bit: bool = True, engine: str = "auto") -> dict:
    """Load one model (a fasq directory, ``smollm2``, an HF directory or id, a .gguf) and decode with
    ``engine`` ("auto": fasq's lean path where it supports the model, else transformers; the result's
    ``engine`` says which ran)."""
    from . import io
    from .io import is_fasq_dir, load_any
    from .model import model_size_report

    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    if is_fasq_dir(model_arg):
        model, tok = io.load(model_arg, device=device, dtype=dtype, with_tokenizer=True,
                             dense_16bit=dense_16bit and not device.startswith("cuda"))
    else:
        model, tok = load_any(model_arg, dtype=dtype)
        model.to(device)
    model.eval()
    load_s = time.perf_counter() - t0
    rep = model_size_report(model)
    quantized = bool(rep.get("quantized_layers"))
    dense = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    res = bench_model(model, tok, prompt, new_tokens=new_tokens, engine=engine)
    res.update(model=model_arg, device=device, threads=torch.get_num_threads(), load_s=round(load_s, 2),
               quantized=quantized, bits_per_weight=(rep["bits_per_weight"] if quantized else
                                                     8.0 * dense.element_size() if dense is not None else None),
               weights_mib=round(weights_bytes(model) / 2**20, 1), peak_rss_mib=round(peak_rss_mib(), 1))
    if device.startswith("cuda"):
        res["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return res


def bench(models: list[str], new_tokens: int = 64, prompt: str = DEFAULT_PROMPT, device: str = "cpu",
          threads: int = 0, repeats: int = 3, log=print, engine: str = "auto") -> list[dict]:
    """Every model decoded ``repeats`` times, alternating, each run in a fresh subprocess."""
    runs: dict[str, list[dict]] = {m: [] for m in models}
    for r in range(repeats):
        for m in models:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "run.json")
                cmd = [sys.executable, "-m", "fasq", "bench", m, "--worker", out, "--new-tokens", str(new_tokens),
                       "--prompt", prompt, "--device", device, "--threads", str(threads), "--engine", engine]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:   # the child's last line is its error message
                    last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "no output")
                    raise ValueError(f"bench: loading or decoding {m} failed: {last}")
                with open(out) as f:
                    res = json.load(f)
            runs[m].append(res)
            log(f"round {r + 1}/{repeats} {m} ({res['engine']}): {res['decode_tokens_per_s']:.1f} tok/s, "
                f"peak RSS {res['peak_rss_mib']:.0f} MiB")
    return summarize(runs)


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per model (in order; the first is the baseline) from its runs, round by round."""
    models = list(runs)
    rows = []
    for m in models:
        best = dict(max(runs[m], key=lambda d: d["decode_tokens_per_s"]))
        best["all_tokens_per_s"] = [round(d["decode_tokens_per_s"], 2) for d in runs[m]]
        best["peak_rss_mib"] = max(d["peak_rss_mib"] for d in runs[m])
        best["decode_step_ms_median"] = min(d["decode_step_ms_median"] for d in runs[m])
        rows.append(best)
    base = rows[0]
    for row in rows:
        row["all_step_ms_median"] = [round(d["decode_step_ms_median"], 3) for d in runs[row["model"]]]
        row["tokens_per_s_median_step"] = 1e3 / row["decode_step_ms_median"]
    for row in rows:
        ratios = [b / a for a, b in zip(row["all_step_ms_median"], base["all_step_ms_median"])]
        row["speedup_vs_first_run_median"] = round(statistics.median(ratios), 3)
        row["speedup_vs_first_runs"] = [round(v, 3) for v in ratios]
        row["same_tokens_as_first"] = sum(a == b for a, b in zip(row["generated"], base["generated"]))
    return rows


def load_note(threads: int) -> str | None:
    """A warning when other work loads this machine and torch would use every core (measured on a loaded
    2-core machine: torch's default of 2 threads decoded 7-15x slower than 1 thread, fp32 too)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if threads == 0 and cores > 1 and load > 0.5 * cores:
        return (f"note: load average {load:.1f} on {cores} cores: other jobs share this machine, and torch's "
                f"default of {torch.get_num_threads()} threads per run can be many times slower than "
                "--threads 1 here; the ratios compare runs under the same load")
    return None


def table(rows: list[dict]) -> str:
    name_w = max(12, *(len(r["model"]) for r in rows))
    mem = "peak GPU MiB" if "peak_gpu_mib" in rows[0] else "peak RSS MiB"
    lines = [f"{'model':<{name_w}} {'engine':>12} {'bits/w':>7} {'weights MiB':>11} {'tok/s':>8} {'vs first':>8} "
             f"{'ms/step':>8} {mem:>12} {'same tokens':>11}"]
    for r in rows:
        bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "-"
        peak = r.get("peak_gpu_mib", r["peak_rss_mib"])
        lines.append(f"{r['model']:<{name_w}} {r.get('engine', '-'):>12} {bpw:>7} {r['weights_mib']:>11.1f} {r['tokens_per_s_median_step']:>8.1f} "
                     f"{r['speedup_vs_first_run_median']:>7.2f}x {r['decode_step_ms_median']:>8.2f} {peak:>12.0f} "
                     f"{r['same_tokens_as_first']:>5}/{len(r['generated'])}")
    return "\n".join(lines)
