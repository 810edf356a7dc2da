"""Save / load quantized models: safetensors + config.json (with quantization_config) + tokenizer.

Layout of a saved directory::

    config.json          the model config; ``quantization_config`` = FASQConfig + format_version +
                         per-module LayerSpecs ("modules")
    model.safetensors    PQLinear buffers and every unquantized tensor (16-bit)
    fasq.json            manifest: fasq/format versions, sha256 and size of each data file
    tokenizer files, generation_config.json when present

Writes are atomic: everything goes to a temporary directory beside the target, which is renamed into
place only when complete.  Loading checks versions, checksums, shapes and dtypes and raises
:class:`FormatError` naming what is wrong instead of returning a silently wrong model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import QUANT_METHOD, FASQConfig
from .format import BUFFER_DTYPES, FORMAT_VERSION, LayerSpec

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "fasq.json"


class FormatError(ValueError):
    """A saved fasq directory is incomplete, corrupted, or of an unsupported version."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def round_unquantized_to_16bit(model: torch.nn.Module) -> None:
    """fp32 tensors outside quantized layers are stored as fp16; round them in memory so the in-memory
    model computes exactly what a save/load round trip gives."""
    from .nn import PQLinear

    pq_ptrs = {b.data_ptr() for m in model.modules() if isinstance(m, PQLinear) for b in m.buffers()}
    with torch.no_grad():
        # state_dict: only what is stored (non-persistent buffers such as rotary tables are rebuilt at load)
        for t in model.state_dict(keep_vars=True).values():
            if t.dtype == torch.float32 and t.data_ptr() not in pq_ptrs:
                t.data.copy_(t.data.half().float())


def _state_to_store(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once and fp32 tensors as fp16 (PQ buffers are already packed)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue  # tied (e.g. lm_head.weight = embed_tokens.weight): re-tied at load
        if key is not None:
            seen[key] = name
        if t.dtype == torch.float32:
            t = t.half()
        out[name] = t.detach().cpu().contiguous()
    return out


def save(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write a quantized model to ``out_dir`` atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(qc, "to_dict"):  # a model loaded through transformers' from_pretrained holds a config object
        qc = qc.to_dict()
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError("save: the model is not fasq-quantized (run fasq.quantize(model, config) first)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(_state_to_store(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "fasq": str(FORMAT_VERSION)})
        model.config.to_json_file(str(tmp / "config.json"))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(tmp))
            except Exception as e:  # a generation config is a convenience, not part of the format
                log.warning("generation_config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest = {"fasq_version": _fasq_version(), "format_version": FORMAT_VERSION,
                    "files": {WEIGHTS_NAME: {"sha256": sha256_file(tmp / WEIGHTS_NAME),
                                             "bytes": (tmp / WEIGHTS_NAME).stat().st_size}}}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _fasq_version() -> str:
    from . import __version__
    return __version__


def read_quantization_config(path: str | os.PathLike) -> tuple[FASQConfig, dict[str, LayerSpec], dict]:
    """(config, per-module specs, raw config.json) of a saved directory, with version checks."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FormatError(f"{path}: no config.json; not a saved fasq model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_file}: not valid JSON ({e})") from None
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{cfg_file}: no fasq quantization_config (this is not a fasq-quantized model)")
    fv = qc.get("format_version")
    if fv != FORMAT_VERSION:
        raise FormatError(f"{cfg_file}: format_version={fv!r}, but this fasq reads format version "
                          f"{FORMAT_VERSION}; upgrade fasq or re-quantize")
    qc = dict(qc)
    qc.pop("format_version")
    modules = qc.pop("modules", None)
    qc.pop("allocation", None)
    if not isinstance(modules, dict) or not modules:
        raise FormatError(f"{cfg_file}: quantization_config has no 'modules' table")
    try:
        config = FASQConfig.from_dict(qc)
        specs = {name: LayerSpec.from_dict(d) for name, d in modules.items()}
    except ValueError as e:
        raise FormatError(f"{cfg_file}: {e}") from None
    return config, specs, raw


def verify_files(path: str | os.PathLike) -> None:
    """Check each data file against the manifest's size and sha256."""
    path = Path(path)
    mf = path / MANIFEST_NAME
    if not mf.is_file():
        raise FormatError(f"{path}: manifest {MANIFEST_NAME} missing (incomplete or not written by fasq)")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{mf}: unreadable manifest ({e})") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise FormatError(f"{path}: data file {name} is missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise FormatError(f"{f}: {size} bytes, manifest says {info.get('bytes')} (truncated or replaced)")
        if sha256_file(f) != info.get("sha256"):
            raise FormatError(f"{f}: checksum mismatch (the file is corrupted)")


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         verify: bool = True, with_tokenizer: bool = False, dense_16bit: bool = False):
    """Load a saved fasq model (and, with ``with_tokenizer``, its tokenizer).

    Unquantized tensors are cast to ``dtype``; PQ buffers keep their stored dtypes.  No full-precision
    model is built first: the skeleton is made on the meta device and every tensor is assigned
    straight from the file (cast where ``dtype`` asks), so peak memory is about the loaded model.

    ``dense_16bit`` (for an fp32 ``dtype``): the token embedding and the output head (tied or not)
    keep their stored 16-bit values instead of an fp32 copy of twice the size
    (:mod:`fasq.kernels.dense16`); activations stay fp32 and the head sums in fp32, so logits equal
    the fp32 model's up to the order of fp32 sums (not bit for bit).  On the CPU the head reads half
    the bytes per decoded token.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import attach_config, replace_with_pq

    path = Path(path)
    config, specs, raw = read_quantization_config(path)
    if verify:
        verify_files(path)
    hf_config = AutoConfig.from_pretrained(str(path))
    qc = hf_config.quantization_config
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # build a plain model; we swap the layers ourselves
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    replace_with_pq(model, specs, device="meta")
    try:
        f = safe_open(str(path / WEIGHTS_NAME), framework="pt", device="cpu")
    except Exception as e:
        raise FormatError(f"{path / WEIGHTS_NAME}: cannot be read as safetensors ({e})") from None
    if dense_16bit and dtype == torch.float32:
        _use_16bit_embeddings(model, f, dtype)
    expected = model.state_dict()
    stored = set(f.keys())
    unexpected = sorted(stored - set(expected))
    if unexpected:
        raise FormatError(f"{path}: tensors not in the model: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    tensors = {}
    for name, ref in expected.items():
        if name not in stored:
            continue  # tied weights are checked after tie_weights below
        t = f.get_tensor(name)
        if tuple(t.shape) != tuple(ref.shape):
            raise FormatError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the config implies "
                              f"{tuple(ref.shape)}")
        if ref.dtype in (torch.int32, torch.int8, torch.float16) and _is_pq_buffer(name, specs):
            if t.dtype != ref.dtype:
                raise FormatError(f"{path}: tensor {name} is {t.dtype}, the format stores {ref.dtype}")
        else:
            t = t.to(ref.dtype) if t.is_floating_point() else t
        tensors[name] = t
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise FormatError(f"{path}: tensors missing from {WEIGHTS_NAME}: {missing[:5]}")
    _materialize_nonpersistent(model, hf_config)
    model.to(device)
    model.eval()
    hf_config.quantization_config = qc
    attach_config(model, config, {n: s.to_dict() for n, s in specs.items()},
                  raw["quantization_config"].get("allocation"))
    if with_tokenizer:
        from transformers import AutoTokenizer
        return model, AutoTokenizer.from_pretrained(str(path))
    return model


def _use_16bit_embeddings(model: torch.nn.Module, f, out_dtype: torch.dtype) -> None:
    """Swap the (meta) input embedding and output head for 16-bit modules of the stored dtype."""
    from torch import nn

    from .kernels.dense16 import DTYPES, Embedding16, Linear16
    from .nn import PQLinear

    names = {id(m): n for n, m in model.named_modules()}
    stored = set(f.keys())

    def stored_dtype(module, default=torch.float16):
        key = f"{names[id(module)]}.weight"
        dt = f.get_slice(key).get_dtype() if key in stored else None
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(dt, default)

    emb = model.get_input_embeddings()
    emb_dtype = torch.float16
    if type(emb) is nn.Embedding:
        emb_dtype = stored_dtype(emb)
        model.set_input_embeddings(Embedding16(emb.num_embeddings, emb.embedding_dim, emb.padding_idx,
                                               emb_dtype, out_dtype, device="meta"))
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and not isinstance(head, PQLinear):
        dt = stored_dtype(head, emb_dtype)  # a tied head is not stored: it takes the embedding's dtype
        model.set_output_embeddings(Linear16(head.in_features, head.out_features, head.bias is not None,
                                             dt if dt in DTYPES else torch.float16, device="meta"))


def _is_pq_buffer(name: str, specs: dict) -> bool:
    mod, _, leaf = name.rpartition(".")
    return mod in specs and leaf in BUFFER_DTYPES


def _materialize_nonpersistent(model: torch.nn.Module, hf_config) -> None:
    """Buffers not stored in the checkpoint (rotary inv_freq, ...) were built under init_empty_weights
    on the CPU already (include_buffers=False); nothing should remain on the meta device."""
    for name, b in model.named_buffers():
        if b.is_meta:
            raise FormatError(f"buffer {name} could not be materialized")
