"""``fasq sweep``: the compression-accuracy map from the command line (wired in by :func:`add_cli`)."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from .points import METHOD_ORDER, parse_setting
from .runner import DEFAULT_MAX_TOKENS, llmcompressor_venv

# Baseline libraries that work with torch 2.13 (CPU) and transformers 5.24, installed with --no-deps so
# that pip never replaces torch (newer gptqmodel wants torch>=2.14).  Their own dependencies follow.
BASELINE_PACKAGES = (
    "bitsandbytes==0.50.2", "hqq==0.2.8.post1", "einops", "termcolor",
    "gptqmodel==7.6.0", "torchao==0.18.0", "defuser==0.0.28", "tokenicer==0.0.14", "device-smi==0.5.7",
    "logbar==0.4.15", "pypcre==0.6.4", "threadpoolctl", "protobuf",
    "datasets", "pyarrow", "dill", "multiprocess<0.70.20", "xxhash", "pandas", "zstandard",
    # llama.cpp (the llamacpp rows and benchmarks/cpu_llamacpp.py): built from its sdist for this CPU
    # (CMAKE_ARGS, e.g. -DGGML_NATIVE=ON, are passed through; a wheel in FASQ_CACHE/wheels is used first);
    # gguf reads the files' tensor types, sentencepiece is imported by convert_hf_to_gguf.py.
    "llama-cpp-python==0.3.36", "diskcache", "gguf==0.19.0", "sentencepiece",
)


# llm-compressor's AWQ rows: its own venv beside the baselines venv, since llm-compressor 0.14 pins
# transformers <= 5.17 (and huggingface-hub < 2 with it); torch and fasq come from this environment.
LLMCOMPRESSOR_PACKAGES = (
    "llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "transformers==5.17.0", "huggingface-hub>=1.5,<2",
    "auto-round==0.15.1", "loguru", "nvidia-ml-py", "httpx", "httpcore", "anyio", "sniffio", "h11",
    "datasets", "pyarrow", "dill", "multiprocess<0.70.20", "xxhash", "pandas",
)


def default_out(model: str, texts: list[str]) -> Path:
    """benchmarks/results/accuracy[/MODEL][/TEXT]: the embedded default (SmolLM2) keeps the top level, any
    other model gets its own directory, so two models' sweeps never share a cache or a table."""
    root = Path("benchmarks/results/accuracy")
    if model != "smollm2":
        root = root / Path(model).name       # 'gemma3-270m', or a local directory's name
    return root / Path(texts[0]).stem if len(texts) == 1 else root


def setup_baselines_venv(path: str) -> str:
    """Create a venv that sees this environment's packages (torch, transformers, fasq) and add the
    baseline libraries to it only; returns its python.  Keeps the main environment free of them."""
    venv = Path(path)
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    from ..data import cache_dir

    wheels = cache_dir() / "wheels"   # e.g. llama-cpp-python built once: pip wheel ... -w FASQ_CACHE/wheels
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--find-links", str(wheels),
                    *BASELINE_PACKAGES], check=True)
    setup_llmcompressor_venv(str(llmcompressor_venv(venv)))
    return str(py)


def setup_llmcompressor_venv(path: str) -> str:
    """The venv for llm-compressor's AWQ points (``runner.python_for`` finds it beside the baselines venv);
    returns its python."""
    venv = Path(path)
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *LLMCOMPRESSOR_PACKAGES], check=True)
    return str(py)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``fasq sweep`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "sweep", help="compression-accuracy sweep: fasq grid vs GPTQ, AWQ, HQQ, NF4, llama.cpp, RTN",
        description="Quantize a model with fasq over a grid of settings and with each baseline library, score "
                    "every result on the same text windows, and write results.json, table.md and plot.png. "
                    "Finished points are cached in OUT/runs, so a rerun resumes.")
    p.add_argument("--model", default="smollm2", help="'smollm2' (the embedded default), 'gemma3-270m', or a local HF model directory")
    p.add_argument("--text", default="lee",
                   help="evaluation text(s), comma-separated: lee, austen, wikitext2 or files; with several, "
                        "each point is quantized once and scored on all, written to OUT/<text name>")
    p.add_argument("--out", required=False,
                   help="output directory (default benchmarks/results/accuracy[/MODEL]/TEXT, or without /TEXT for "
                        "several texts; MODEL is left out for the embedded default, smollm2)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHOD_ORDER)} to run; rows of the "
                                     "other methods are kept from OUT's previous results")
    p.add_argument("--fasq-grid", nargs="+", metavar="SETTING",
                   help="fasq settings instead of the default grid, each JSON or key=value "
                        "(e.g. 'd=2,K=256' '{\"subvector_dim\": 4, \"codebook_size\": 256}')")
    p.add_argument("--force", action="store_true", help="re-run the selected points even when cached")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rewrite results.json, table.md and plot.png from the cached rows")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="tokens scored per model and text (whole windows; 0 = the whole text)")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--calibration", default="persuasion", help="GPTQ/AWQ calibration slice: persuasion, lee-tail")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="threads per worker")
    p.add_argument("--python", help="interpreter for the workers (default $FASQ_SWEEP_PYTHON or this one); "
                                    "e.g. the venv made by --setup-baselines")
    p.add_argument("--artifacts", help="cache of GPTQ/AWQ quantized models (default ~/.cache/fasq/sweep-artifacts)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per point before it is recorded as failed")
    p.add_argument("--benchmarks-md", metavar="PATH",
                   help="also rewrite the accuracy section of this Markdown file (e.g. BENCHMARKS.md): the "
                        "model's own section, or for an --out other than the default one a section named after "
                        "that directory (<!-- accuracy-DIR:begin -->)")
    p.add_argument("--setup-baselines", metavar="VENV", help="create VENV with the baseline libraries (and VENV-llmcompressor for llm-compressor's "
                        "AWQ, which pins an older transformers) and exit")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=cmd_sweep)
    return p


def cmd_sweep(args) -> int:
    from .runner import SweepSettings, run_sweep
    from .table import render
    from .texts import Calibration

    if args.setup_baselines:
        print(setup_baselines_venv(args.setup_baselines))
        return 0
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    grid = tuple(parse_setting(s) for s in args.fasq_grid) if args.fasq_grid else None
    if grid is not None:
        from .points import fasq_config
        for s in grid:
            fasq_config(s)  # a bad setting fails now, not inside a worker
    max_tokens = args.max_tokens or None   # 0 (or None, as fasq's main passes 0) = the whole text
    texts = [t.strip() for t in args.text.split(",") if t.strip()]
    settings = SweepSettings(model=args.model, text=texts[0], context_length=args.context_length,
                             max_tokens=max_tokens, batch_size=args.batch_size,
                             calibration=Calibration(args.calibration, args.calib_samples, args.calib_seq_len),
                             threads=args.threads)
    Calibration(args.calibration).char_range()  # unknown names fail before any work
    out = args.out or str(default_out(args.model, texts))
    import signal

    def _stop(signum, frame):  # a terminated sweep stops its worker too (see runner._run_subprocess)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)
    args_text = " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = (f"python benchmarks/accuracy.py {args_text}" if Path(sys.argv[0]).name == "accuracy.py"
               else f"fasq {args_text}")
    docs = run_sweep(settings, out, texts=texts, methods=methods, fasq_grid=grid, force=args.force,
                     python=args.python, artifacts=args.artifacts, timeout=args.timeout, progress=not args.quiet,
                     command=command, report_only=args.report_only)
    if not args.quiet:
        for text, doc in docs.items():
            print(render(doc))
        print(f"wrote results.json, table.md, plot.png under {out}")
    if args.benchmarks_md:
        from .report import section, update_markdown
        base = Path(out).parent if len(texts) == 1 else Path(out)
        default_base = default_out(args.model, texts[:1]).parent
        # a sweep written elsewhere than the model's default directory gets a section of its own
        name = None if base.resolve() == default_base.resolve() else base.name
        update_markdown(args.benchmarks_md, section(docs, [docs[texts[0]]["command"] or command], base=str(base),
                                                    model=args.model, name=name), model=args.model, name=name)
    return 0 if all(r.get("status") == "ok" for doc in docs.values() for r in doc["rows"]
                    if r.get("method") in ("original", "fasq")) else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (benchmarks/accuracy.py): the same arguments as ``fasq sweep``."""
    import logging

    ap = argparse.ArgumentParser(prog="accuracy.py")
    sub = ap.add_subparsers(dest="command")
    add_cli(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(["sweep", *argv])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"fasq sweep: error: {e}", file=sys.stderr)
        return 2
