"""The `fasq` command line (also `python -m fasq`)."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

from .cli_args import (_int_at_least, add_quant_args, config_from_args, device_name,  # noqa: F401
                       nonnegative_int, peak_rss_mb, positive_int, announce_sampling)
from .data import embedded_checkpoint
from .decode import ENGINES, lean_decoder
from .io import is_fasq_dir, load_any, source_of

log = logging.getLogger("fasq")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def model_max_positions(model) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


# ----------------------------------------------------------------------------------------------
def cmd_quantize(args) -> int:
    from . import io
    from .model import model_size_report, quantize
    from .outputs import check_output
    from .stream import cmd_quantize_stream, should_stream

    out = Path(args.output)
    source = str(embedded_checkpoint(args.model) or args.model)
    check_output(out, sources=(source,), overwrite=args.overwrite, force=args.force)
    config = config_from_args(args)   # a bad setting is refused before any loading
    if args.distill_sequences and not args.distill_steps:
        raise ValueError("--distill-sequences needs --distill-steps N (it says how many sequences to distill on)")
    # A local safetensors checkpoint streams (tensor by tensor, bounded memory, resumable), unless --distill-steps
    # asks for the original and the quantized model in memory together.
    if should_stream(args) and not args.distill_steps:
        return cmd_quantize_stream(args)
    t0 = time.perf_counter()
    model, tok = load_any(args.model, dtype="stored")  # a local checkpoint as streaming reads it: same output
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    announce_sampling(config, show=not args.quiet)
    teacher = copy.deepcopy(model) if args.distill_steps else None
    quantize(model, config, progress=not args.quiet, device=args.device, target_bits=args.bits,
             target_fraction=args.target_size)
    t_q = time.perf_counter() - t1
    distilled = _distill(args, model, teacher, config.seed, args.distill_steps,
                         args.distill_sequences) if teacher is not None else None
    del teacher   # the original is not needed to save (fasq distill frees it the same way)
    io.save(model, out, tokenizer=tok, overwrite=args.overwrite, force=args.force)
    rep = model_size_report(model)
    result = {"output": str(out), "config": config.to_dict(), "load_seconds": t_load, "quantize_seconds": t_q,
              "peak_rss_mb": peak_rss_mb(), **{k: v for k, v in rep.items() if k != "layers"}}
    if distilled is not None:
        result["distill"] = distilled
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {out}: {rep['quantized_layers']} layers at {rep['bits_per_weight']:.3f} bits/weight"
              f"{_embedding_note(rep)}, model {rep['total_bytes'] / 2**20:.1f} MiB = {100 * rep['fraction_of_fp16']:.1f}% "
              f"of FP16 ({rep['model_bits_per_weight']:.3f} bits/weight); quantized in {t_q:.1f}s, "
              f"peak RSS {result['peak_rss_mb']:.0f} MiB")
    return 0


def _distill(args, model, teacher, seed: int, steps: int, sequences: int | None = None) -> dict:
    """fasq.distill on the quantized ``model`` against the original (``teacher``), as --distill-steps and
    ``fasq distill`` run it, on ``args.device`` where one is named (both models moved there, ``model`` back to
    the CPU after); the JSON record of the run."""
    from .distill import DistillSettings, distill

    settings = DistillSettings(steps=steps, seed=seed, sequences=sequences or DistillSettings.sequences)
    device = getattr(args, "device", None)
    if not args.quiet:
        print(f"distill: tuning norms, codebooks and scales to the original model's outputs on {settings.sequences} "
              f"sequences it samples itself, {settings.steps} steps{f' on {device}' if device else ''}",
              file=sys.stderr)
    if device:
        model.to(device)
        teacher.to(device)
    try:
        r = distill(model, teacher, settings, progress=not args.quiet)
    finally:
        if device:
            model.to("cpu")
    return {"steps": settings.steps, "sequences": settings.sequences, "seed": seed, "seconds": r["seconds"],
            "kl_first": r["kl_first"], "kl_last": r["kl_last"], "micro_batch": r["micro_batch"]}


def cmd_distill(args) -> int:
    """A saved fasq model tuned to the model it was quantized from (what --distill-steps does after quantizing)."""
    from . import io
    from .outputs import check_output

    if not is_fasq_dir(args.model):
        raise ValueError(f"{args.model} is not a fasq-quantized directory: fasq distill tunes one (to quantize and "
                         "distill in one go: fasq quantize MODEL -o OUT --distill-steps N)")
    original = args.original or source_of(args.model)
    if original is None:
        raise ValueError(f"{args.model} does not record the model it was quantized from: pass --original")
    source = str(embedded_checkpoint(original) or original)
    out = check_output(args.output, sources=(args.model, source), overwrite=args.overwrite, force=args.force)
    t0 = time.perf_counter()
    teacher, _ = load_any(original, dtype="stored")
    dtype = next(teacher.parameters()).dtype
    model, tok = io.load(args.model, dtype=dtype, with_tokenizer=True)
    t_load = time.perf_counter() - t0
    seed = args.seed if args.seed is not None else model.fasq_config.seed
    distilled = _distill(args, model, teacher, seed, args.steps, args.sequences)
    del teacher
    model.config._name_or_path = source   # the manifest's source stays the original (fasq eval --reference)
    io.save(model, out, tokenizer=tok, overwrite=args.overwrite, force=args.force)
    result = {"output": str(out), "input": str(args.model), "original": source, "load_seconds": t_load,
              "distill": distilled, "peak_rss_mb": peak_rss_mb()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {out}: {args.model} tuned {args.steps} steps to {source}, KL {distilled['kl_first']:.4f} -> "
              f"{distilled['kl_last']:.4f} (mean of the last steps) in {distilled['seconds']:.0f}s, peak RSS "
              f"{result['peak_rss_mb']:.0f} MiB")
    return 0


def _embedding_note(rep: dict) -> str:
    if not rep.get("embedding_weights"):
        return " (embedding and head at 16 bits)"
    return f" (embedding/head table at {rep['embedding_bits_per_weight']:.3f})"


def cmd_info(args) -> int:
    from .format import LayerSpec
    from .io import load, parse_embeddings, read_quantization_config

    config, specs, raw = read_quantization_config(args.path)
    model = load(args.path, verify=False)
    from .model import model_size_report
    rep = model_size_report(model)
    if args.json:
        print(json.dumps({"config": config.to_dict(), **rep}, indent=2))
        return 0
    print(f"{args.path}: fasq format, config {json.dumps({k: v for k, v in config.to_dict().items() if k != 'skip_modules'})}")
    alloc = raw["quantization_config"].get("allocation")
    if alloc:
        scope = "the whole model" if alloc.get("size_scope") == "model" else "the quantized linears"
        what = (f"{alloc['target_bits']} bits/weight of {scope}" if alloc.get("target_bits") is not None
                else f"{alloc['target_fraction']} of FP16")
        what += f" (linears planned at {alloc['planned_bits']:.3f} bits/weight)"
        print(f"size target: {what}; per-layer settings chosen by fasq.fit.allocate")
    print(f"{'layer':<48} {'out x in':>13} {'d':>2} {'K':>6} {'M':>2} {'group':>5} {'rot':>4} {'outl.':>5} "
          f"{'bits/w':>7}")
    embeddings = parse_embeddings(raw["quantization_config"], specs)
    rows = {**specs, **{n: s for n, (s, _) in embeddings.items()}}
    for name, s in sorted(rows.items(), key=lambda kv: natural_key(kv[0])):
        assert isinstance(s, LayerSpec)
        tied = f"  (embedding, tied: reads {embeddings[name][1]})" if embeddings.get(name, (0, None))[1] else ""
        print(f"{name:<48} {s.out_features:>6}x{s.in_features:<6} {s.subvector_dim:>2} {s.num_centroids:>6} "
              f"{s.num_codebooks:>2} {s.group_size:>5} {s.rotation_block:>4} {s.n_outliers:>5} "
              f"{s.bits_per_weight():>7.3f}{tied}")
    print(f"quantized linears (body): {rep['quantized_weights']:,} weights, "
          f"{rep['bits_per_weight']:.3f} bits/weight ({rep['quantized_bytes']:,} bytes)")
    if rep["embedding_weights"]:
        print(f"embedding/head table (stored once when tied): {rep['embedding_weights']:,} weights, "
              f"{rep['embedding_bits_per_weight']:.3f} bits/weight ({rep['embedding_bytes']:,} bytes)")
    else:
        print("embedding and head: 16 bits (not quantized; fasq quantize --quantize-embeddings quantizes them)")
    print(f"whole model: {rep['total_bytes']:,} bytes = {100 * rep['fraction_of_fp16']:.2f}% of FP16 "
          f"({rep['fp16_bytes']:,} bytes), {rep['model_bits_per_weight']:.3f} bits/weight; unquantized tensors "
          f"{rep['other_bytes']:,} bytes")
    return 0


def cmd_eval(args) -> int:
    from .eval import load_text

    text = load_text(args.text or args.corpus)
    source = source_of(args.model) if is_fasq_dir(args.model) else None
    r = _eval_one(args, args.model, text)
    if args.reference and source is None:
        raise ValueError(f"--reference: {args.model} does not record the model it was quantized from (not a fasq "
                         "directory, or written before fasq recorded it); run `fasq eval SOURCE` with the same options")
    if args.reference:
        r["reference"] = _eval_one(args, source, text)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    rows = [r] + ([r["reference"]] if args.reference else [])
    for row in rows:
        size = (f"{row['bits_per_weight']:.3f} bits/weight, {100 * row['fraction_of_fp16']:.1f}% of FP16"
                if row["quantized"] else "unquantized")
        print(f"{row['model']} on {row['text']}: perplexity {row['perplexity']:.3f}, {row['bits_per_byte']:.4f} "
              f"bits/byte ({row['tokens_scored']} tokens, {row['windows']} windows of {row['context_length']}); {size}")
    if args.reference:
        print(f"perplexity {r['perplexity'] / r['reference']['perplexity']:.3f}x the original's on the same windows")
    elif source is not None and not args.quiet:
        print(f"(quantized from {source}: --reference scores it on the same windows)", file=sys.stderr)
    return 0


def _eval_one(args, model_arg: str, text: str) -> dict:
    from .eval import perplexity
    from .model import model_size_report

    model, tok = load_any(model_arg)
    max_pos = model_max_positions(model)
    if max_pos is not None and args.context_length > max_pos:
        raise ValueError(f"--context-length {args.context_length} is longer than the model's maximum of {max_pos} "
                         "positions")
    r = perplexity(model, tok, text, context_length=args.context_length, max_tokens=args.max_tokens,
                   batch_size=args.batch_size, progress=not args.quiet)
    rep = model_size_report(model)
    r.update({"model": model_arg, "text": args.text or args.corpus, "quantized": bool(rep["quantized_layers"]),
              "bits_per_weight": rep["bits_per_weight"], "fraction_of_fp16": rep["fraction_of_fp16"],
              "total_bytes": rep["total_bytes"]})
    return r


def cmd_generate(args) -> int:
    import torch

    if not args.prompt.strip():
        raise ValueError("the prompt is empty: give the text to continue")
    model, tok = load_any(args.model)
    ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False)
    if ids["input_ids"].shape[1] == 0:
        raise ValueError("the prompt gives no tokens: give the text to continue")
    max_pos = model_max_positions(model)
    if max_pos is not None and ids["input_ids"].shape[1] + args.max_new_tokens > max_pos:
        raise ValueError(f"{ids['input_ids'].shape[1]} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed "
                         f"the model's maximum of {max_pos} positions")
    decoder = lean_decoder(model, max_len=ids["input_ids"].shape[1] + args.max_new_tokens, engine=args.engine)
    t0 = time.perf_counter()
    if decoder is not None:   # fasq's own decode path; greedy, stops at the generation config's EOS like generate
        new_ids = decoder.generate(ids["input_ids"], args.max_new_tokens, model.generation_config.eos_token_id)
        out = torch.cat([ids["input_ids"], torch.tensor([new_ids])], 1)
    else:
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = out.shape[1] - ids["input_ids"].shape[1]
    print(tok.decode(out[0], skip_special_tokens=True))
    if not args.quiet:
        engine = "lean" if decoder is not None else "transformers"
        print(f"[{new} tokens in {dt:.2f}s, {new / dt:.1f} tok/s, engine {engine}]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded defaults: quantize SmolLM2, evaluate both on the Lee corpus."""
    import torch

    from . import io
    from .data import smollm2_checkpoint
    from .eval import load_text, perplexity
    from .model import model_size_report, quantize

    if not args.preset and args.subvector_dim is None and args.codebook_size is None:
        args.preset = "4bit"  # the demo's default operating point
    config = config_from_args(args)
    ckpt = smollm2_checkpoint()
    text = load_text(args.corpus)
    out = Path(args.output)
    model, tok = load_any(str(ckpt))
    target = f" (preset {args.preset})" if args.preset else ""
    target += f", target {config.target_bits} bits/weight" if config.target_bits else ""
    print(f"model: SmolLM2-135M-Instruct ({ckpt}); text: {args.corpus}; config{target}: d={config.subvector_dim} "
          f"K={config.codebook_size} M={config.num_codebooks} group={config.group_size} rotation={config.rotation}")
    base = perplexity(model, tok, text, context_length=args.context_length, max_tokens=args.max_tokens,
                      progress=not args.quiet)
    fp16_bytes = model_size_report(model)["fp16_bytes"]
    t0 = time.perf_counter()
    announce_sampling(config, show=not args.quiet)
    quantize(model, config, progress=not args.quiet)
    t_q = time.perf_counter() - t0
    io.save(model, out, tokenizer=tok, overwrite=True)
    model = io.load(out)
    q = perplexity(model, tok, text, context_length=args.context_length, max_tokens=args.max_tokens,
                   progress=not args.quiet)
    rep = model_size_report(model)
    rows = [("original (fp32 -> FP16 size)", 16.0, 100.0, base), (f"fasq ({out})", rep["bits_per_weight"],
            100 * rep["total_bytes"] / fp16_bytes, q)]
    print(f"\n{'model':<40} {'bits/weight':>11} {'% of FP16':>9} {'perplexity':>10} {'bits/byte':>9}")
    for name, bpw, frac, r in rows:
        print(f"{name:<40} {bpw:>11.3f} {frac:>9.1f} {r['perplexity']:>10.3f} {r['bits_per_byte']:>9.4f}")
    print(f"\nquantized in {t_q:.1f}s; perplexity over {q['tokens_scored']} tokens of {args.corpus} "
          f"({q['windows']} windows of {args.context_length}); peak RSS {peak_rss_mb():.0f} MiB")
    del torch
    return 0


def cmd_bench(args) -> int:
    from . import bench

    args.prompt = args.prompt or bench.DEFAULT_PROMPT
    if args.worker:   # one run, in its own process (bench.bench starts these)
        res = bench.run_one(args.models[0], new_tokens=args.new_tokens, prompt=args.prompt, device=args.device,
                            threads=args.threads, engine=args.engine)
        Path(args.worker).write_text(json.dumps(res))
        return 0
    if args.new_tokens < 2:
        raise SystemExit("fasq bench: --new-tokens must be at least 2")
    rows = bench.bench(args.models, new_tokens=args.new_tokens, prompt=args.prompt, device=args.device,
                       threads=args.threads, repeats=args.repeats, engine=args.engine,
                       log=(lambda *a: None) if args.quiet or args.json else (lambda m: print(m, file=sys.stderr)))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(bench.table(rows))
        print(f"\n{args.new_tokens} greedy tokens after the same prompt, {args.repeats} alternating runs per model "
              f"({args.device}, {rows[0]['threads']} thread(s)); tok/s and ms/step: the fastest run's median decode "
              f"step; vs first: median of run-by-run ratios of median steps; same tokens: greedy tokens equal to "
              f"the first model's")
        note = bench.load_note(args.threads) if args.device == "cpu" else None
        if note:
            print(note, file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
def _add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="decode loop: fasq's lean path (CPU; Llama and Gemma 3), transformers' generate, or "
                        "auto (default: lean where it supports the model, else transformers, with a log line)")


def build_parser() -> argparse.ArgumentParser:
    from .stream import add_cli as add_stream_cli, add_stream_args
    from .sweep import add_cli as add_sweep_cli

    ap = argparse.ArgumentParser(prog="fasq", description="Calibration-free product quantization of LLMs")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="quantize a model and save it")
    p.add_argument("model", help="HF model dir or id, a .gguf file, or an embedded model: 'smollm2' (the default), 'gemma3-270m'")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing fasq output (or empty directory) at -o")
    p.add_argument("--force", action="store_true",
                   help="with --overwrite: replace -o even when it is not a fasq output (it is deleted)")
    p.add_argument("--device", default=None, type=device_name,
                   help="where k-means (and --distill-steps) runs (default: the weights' device)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--bits", type=float, help="target bits/weight of the quantized layers (per-layer d, K chosen); "
                      "with --size-of model, of the whole model")
    size.add_argument("--target-size", dest="target_size", type=float,
                      help="target whole-model size as a fraction of FP16, e.g. 0.35")
    p.add_argument("--distill-steps", dest="distill_steps", type=nonnegative_int, default=0,
                   help="after quantizing, tune the norms, codebooks and scales this many steps to the original "
                        "model's outputs on text it samples itself (fasq.distill; needs both models in memory, so "
                        "it does not stream; 0: off)")
    p.add_argument("--distill-sequences", dest="distill_sequences", type=positive_int, default=None,
                   help="with --distill-steps: how many sequences of its own text the original samples to tune on "
                        "(default 32; 128 gave lower perplexity where measured, docs/accuracy.md, at about 3 more "
                        "minutes of sampling on SmolLM2)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    add_quant_args(p)
    add_stream_args(p)
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("distill", help="tune a quantized model's norms, codebooks and scales to its original model")
    p.add_argument("model", help="a fasq directory (from fasq quantize)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--original", default=None,
                   help="the model it was quantized from (default: the one its manifest records)")
    p.add_argument("--steps", type=positive_int, default=64, help="Adam steps (default 64, as measured)")
    p.add_argument("--sequences", type=positive_int, default=None,
                   help="sequences of its own text the original samples to tune on (default 32; see "
                        "--distill-sequences of fasq quantize)")
    p.add_argument("--seed", type=nonnegative_int, default=None,
                   help="seed of the sampled text and the batches (default: the quantization's seed)")
    p.add_argument("--device", default=None, type=device_name, help="where the tuning runs, e.g. cuda (default: the CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing fasq output (or empty directory) at -o")
    p.add_argument("--force", action="store_true",
                   help="with --overwrite: replace -o even when it is not a fasq output (it is deleted)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("info", help="per-layer settings and sizes of a quantized model")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("eval", help="perplexity and bits/byte on a text")
    p.add_argument("model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file")
    src.add_argument("--corpus", default="lee", choices=["lee", "austen", "wikitext2"])
    p.add_argument("--context-length", type=_int_at_least(2), default=512)
    p.add_argument("--max-tokens", type=nonnegative_int, default=16384, help="tokens scored (whole windows); 0 = all")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--reference", action="store_true",
                   help="also score the model a fasq directory was quantized from, on the same windows")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation from a prompt")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=40)
    _add_engine_arg(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("demo", help="main job: quantize the embedded SmolLM2 and compare perplexity")
    p.add_argument("-o", "--output", default="out/smollm2-fasq")
    p.add_argument("--corpus", default="lee", choices=["lee", "austen"])
    p.add_argument("--context-length", type=_int_at_least(2), default=512)
    p.add_argument("--max-tokens", type=nonnegative_int, default=8192,
                   help="tokens scored (default 8192: the windows of the README's results table and fasq sweep)")
    p.add_argument("-q", "--quiet", action="store_true")
    add_quant_args(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("bench", help="end-to-end decoding speed and peak memory of models, side by side")
    p.add_argument("models", nargs="+", help="fasq directories, 'smollm2' / 'gemma3-270m', HF directories or ids, .gguf files")
    p.add_argument("--new-tokens", dest="new_tokens", type=_int_at_least(2), default=64)
    p.add_argument("--prompt", default=None, help="prompt text (default: a short question, in the chat template)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cuda: 16-bit activations)")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=positive_int, default=3, help="alternating runs per model")
    _add_engine_arg(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_bench)

    add_stream_cli(sub)   # fasq verify
    add_sweep_cli(sub)    # fasq sweep
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "max_tokens", None) == 0:
        args.max_tokens = None
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("fasq: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if args.verbose:
            log.exception("fasq %s failed", args.command)
        print(f"fasq: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # from a library below us: one line, the traceback with -v
        if args.verbose:
            log.exception("fasq %s failed", args.command)
        print(f"fasq: error: {type(e).__name__}: {_one_line(e)}" + ("" if args.verbose else " (-v shows the traceback)"),
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    """The exception's message as one line (libraries such as torch's unpickler write paragraphs)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."
