"""Command-line argument plumbing shared by ``fasq``'s commands and their sub-packages (``stream``,
``sweep``): the quantization options, their config, checked integer types, peak memory, the sampling notice."""
from __future__ import annotations

import argparse
import resource
import sys

from .config import EQUALIZE_MODES, PRESETS, FASQConfig, preset


def config_from_args(args) -> FASQConfig:
    fields = {}
    for name in ("subvector_dim", "codebook_size", "num_codebooks", "group_size", "rotation", "scale_mode",
                 "kmeans_iters", "refine_iters", "seed", "equalize", "rotation_block", "outlier_fraction",
                 "quantize_embeddings", "embedding_subvector_dim", "embedding_codebook_size", "size_scope",
                 "error_feedback", "sample_sequences"):
        v = getattr(args, name, None)
        if v is not None:
            fields[name] = v
    if getattr(args, "skip", None):
        fields["skip_modules"] = tuple(args.skip)
    if getattr(args, "preset", None):
        return preset(args.preset, **fields)
    return FASQConfig(**fields)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} is out of range: allowed is an integer >= {lo}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


positive_int, nonnegative_int = _int_at_least(1), _int_at_least(0)


def device_name(text: str) -> str:
    """A ``--device`` value: a torch device this machine has (refused before anything is loaded)."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: allowed are cpu, cuda, cuda:N, ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


device_name.__name__ = "device"


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization settings (defaults: FASQConfig)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named operating point")
    g.add_argument("-d", "--subvector-dim", dest="subvector_dim", type=int, help="sub-vector size d")
    g.add_argument("-k", "--codebook-size", dest="codebook_size", type=int, help="codebook size K (2..65536)")
    g.add_argument("--num-codebooks", dest="num_codebooks", type=int, help="residual codebooks M")
    g.add_argument("--group-size", dest="group_size", type=int, help="input columns per scale (0: per row)")
    g.add_argument("--rotation", choices=["none", "hadamard"])
    g.add_argument("--scale-mode", dest="scale_mode", choices=["rms", "absmax", "none"])
    g.add_argument("--kmeans-iters", dest="kmeans_iters", type=int)
    g.add_argument("--refine-iters", dest="refine_iters", type=int)
    g.add_argument("--outlier-fraction", dest="outlier_fraction", type=float,
                   help="fraction of each layer's largest weights kept exactly in a sparse fp16 table (6 bytes each)")
    g.add_argument("--equalize", choices=list(EQUALIZE_MODES),
                   help="exact rescalings before fitting (the presets: sampled, which measures the activations on "
                        "text the model samples itself; otherwise balance)")
    g.add_argument("--rotation-block", dest="rotation_block", type=int, help="largest Hadamard block")
    g.add_argument("--seed", type=int)
    g.add_argument("--skip", nargs="*", help="module-name patterns kept unquantized")
    g.add_argument("--quantize-embeddings", dest="quantize_embeddings", action=argparse.BooleanOptionalAction,
                   default=None, help="also quantize the token embedding and the output head (one table when "
                   "tied; the 4bit and 3bit presets do, as an 8-bit table); --no-quantize-embeddings keeps them 16-bit")
    g.add_argument("--embedding-subvector-dim", dest="embedding_subvector_dim", type=int,
                   help="d of the embedding/head table")
    g.add_argument("--embedding-codebook-size", dest="embedding_codebook_size", type=int,
                   help="K of the embedding/head table")
    g.add_argument("--error-feedback", dest="error_feedback", action=argparse.BooleanOptionalAction, default=None,
                   help="choose codes with GPTQ-style error feedback against each layer's input covariance, measured "
                        "on text the model samples itself (no data is read; the 4bit and 3bit presets do)")
    g.add_argument("--sample-sequences", dest="sample_sequences", type=positive_int,
                   help="sequences of 256 tokens the model samples for equalize=sampled and --error-feedback")
    g.add_argument("--size-of", dest="size_scope", choices=["linears", "model"],
                   help="what --bits and a preset's size target measure: the quantized linears (default) or the "
                        "whole model (embeddings, norms and all)")


def announce_sampling(config, show: bool = True) -> None:
    """Tell the user (stderr) what ``equalize="sampled"`` and ``error_feedback`` do during the first minute or so
    of a quantization, before it starts; nothing where neither is on or when ``show`` is false (--quiet)."""
    if not (config.equalize == "sampled" or config.error_feedback) or not show:
        return
    from .fit.samples import LENGTH

    what = " and ".join(w for w, on in (("the activations' powers", config.equalize == "sampled"),
                                        ("each layer's input covariance", config.error_feedback)) if on)
    print(f"sampling: measuring {what} on {config.sample_sequences} x {LENGTH} tokens the model samples itself "
          "(no data is read)", file=sys.stderr)
