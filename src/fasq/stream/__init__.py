"""Streaming quantization: a checkpoint far larger than memory, tensor by tensor, resumable.

``quantize_checkpoint(src_dir, out_dir, config)`` reads a Hugging Face safetensors checkpoint (one file or
sharded) tensor by tensor, quantizes its linear layers in parallel under a memory budget, and writes a
directory that :func:`fasq.load` reads, bit-identical to ``fasq.quantize`` + ``fasq.save`` of the same model.
``verify(dir)`` checks a directory against its manifest.  Design and guarantees: docs/streaming.md.
"""
from .cli import add_cli, add_stream_args, cmd_quantize_stream, should_stream  # light: no torch at import

_LAZY = {"quantize_checkpoint": "run", "DiskFullError": "run", "parse_size": "schedule", "partial_dir": "run",
         "CheckpointError": "safetensors_io", "verify": "check"}


def __getattr__(name):  # torch and transformers load on first use, so `fasq --help` stays fast
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fasq.stream' has no attribute {name!r}")


__all__ = ["quantize_checkpoint", "verify", "CheckpointError", "DiskFullError", "parse_size", "partial_dir",
           "add_cli", "add_stream_args", "cmd_quantize_stream", "should_stream"]
