"""Command-line pieces of streaming: ``fasq verify`` and the options and command behind ``fasq quantize``
for local safetensors checkpoint directories (wired into :mod:`fasq.cli`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_cli(subparsers) -> None:
    """Register ``fasq verify``."""
    p = subparsers.add_parser("verify", help="check a quantized directory against its manifest (checksums, shapes)")
    p.add_argument("path", help="a fasq output directory (or an unfinished <out>.partial)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_verify)


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """Options of ``fasq quantize`` that apply when it streams a local checkpoint directory."""
    g = p.add_argument_group("streaming (a local directory of safetensors: tensor by tensor, resumable)")
    g.add_argument("--max-memory", default=None,
                   help="bound on the working memory of the tensors in flight, e.g. 3GiB (default: half the "
                        "available memory); see docs/streaming.md for the peak-RSS bound")
    g.add_argument("--workers", type=int, default=None,
                   help="tensors quantized in parallel (default: all cores; 2 with --device cuda)")
    g.add_argument("--max-shard-size", default="5GB", help="largest output safetensors file (default 5GB)")
    g.add_argument("--restart", action="store_true",
                   help="discard an unfinished run's <output>.partial instead of resuming it")
    g.add_argument("--in-memory", action="store_true", help="load the whole model instead of streaming")


def should_stream(args) -> bool:
    """``fasq quantize`` streams a local directory holding safetensors weights, unless --in-memory."""
    from .plan import INDEX_NAME, SINGLE_NAME

    if getattr(args, "in_memory", False):
        return False
    p = Path(args.model)
    return p.is_dir() and ((p / SINGLE_NAME).is_file() or (p / INDEX_NAME).is_file())


def cmd_quantize_stream(args) -> int:
    from ..cli_args import config_from_args, peak_rss_mb
    from .run import DiskFullError, partial_dir, quantize_checkpoint

    config = config_from_args(args)
    try:
        r = quantize_checkpoint(args.model, args.output, config, device=args.device, workers=args.workers,
                                max_memory=args.max_memory, max_shard_size=args.max_shard_size,
                                target_bits=getattr(args, "bits", None),
                                target_fraction=getattr(args, "target_size", None),
                                overwrite=args.overwrite, restart=args.restart,
                                force=getattr(args, "force", False), progress=not args.quiet)
    except DiskFullError as e:
        print(f"fasq: error: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfasq: interrupted; finished tensors are kept in {partial_dir(Path(args.output))}: rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    r["peak_rss_mb"] = peak_rss_mb()   # r["config"]: the config the run used (see fasq.stream.run.streamable)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "unit_seconds"}, indent=2))
    else:
        resumed = f" ({r['units_resumed']} resumed)" if r["units_resumed"] else ""
        print(f"wrote {r['output']}: {r['quantized_layers']} layers at {r['bits_per_weight']:.3f} bits/weight, "
              f"model {r['total_bytes'] / 2**20:.1f} MiB = {100 * r['fraction_of_fp16']:.1f}% of FP16; "
              f"{r['units']} tensors{resumed} in {r['seconds']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MiB")
    return 0


def cmd_verify(args) -> int:
    from ..io import FormatError
    from .check import verify

    try:
        r = verify(args.path)
    except FormatError as e:
        print(f"fasq: verify failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
    elif r["complete"]:
        print(f"{r['path']}: OK ({r['files']} files, {r['tensors']} tensors, {r['tensors_with_checksums']} with "
              f"their own checksum, {r['quantized_modules']} quantized modules, {r['bytes']:,} bytes)")
    else:
        print(f"{r['path']}: unfinished run, {r['units_done']} of {r['units_total']} units done and whole"
              + (f", {r['units_damaged']} damaged (will be redone)" if r["units_damaged"] else "")
              + "; rerun the quantize command to finish it")
    return 0 if r["complete"] else 1
