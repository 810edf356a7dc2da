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

import logging
import os
import shutil
from pathlib import Path

import torch

from . import manifest as _manifest
from .config import QUANT_METHOD, FASQConfig
from .errors import FormatError, StorageRangeError
from .format import BUFFER_DTYPES, FORMAT_VERSION, READABLE_FORMAT_VERSIONS, LayerSpec
from .manifest import INDEX_NAME, WEIGHTS_NAME, sha256_file
from .outputs import MANIFEST_NAME, check_output, move_into_place, temporary_dir
from .storage import to_stored

log = logging.getLogger(__name__)

__all__ = ["FormatError", "INDEX_NAME", "MANIFEST_NAME", "WEIGHTS_NAME", "load", "read_quantization_config",
           "save", "sha256_file", "verify_files"]


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
            t = to_stored(name, t)
        elif t.dtype == torch.float16 and not bool(t.isfinite().all()) and name.rpartition(".")[2] in BUFFER_DTYPES:
            raise StorageRangeError(f"tensor {name}: non-finite values in a quantized layer's buffer; nothing was "
                                    "written")
        out[name] = t.detach().cpu().contiguous()
    return out


def save(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False,
         force: bool = False) -> Path:
    """Write a quantized model to ``out_dir`` atomically.

    ``overwrite`` replaces an existing fasq output (or an empty directory); anything else there needs
    ``force`` too.  ``out_dir`` may not be, contain or lie inside the directory the model was loaded from
    (:mod:`fasq.outputs`).  Of two saves racing for one new directory, one fails with FileExistsError.
    """
    from safetensors.torch import save_file

    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(qc, "to_dict"):  # a model loaded through transformers' from_pretrained holds a config object
        qc = qc.to_dict()
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError("save: the model is not fasq-quantized (run fasq.quantize(model, config) first)")
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    out = check_output(out_dir, sources=(source,), overwrite=overwrite, force=force)
    state = _state_to_store(model)  # checked before anything is written
    tmp = temporary_dir(out)
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt",
                                                                 "fasq": str(qc.get("format_version", FORMAT_VERSION))})
        model.config.to_json_file(str(tmp / "config.json"))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(tmp))
            except Exception as e:  # a generation config is a convenience, not part of the format
                log.warning("generation_config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _manifest.write(tmp, _manifest.build(tmp, source=_source_name(source)))
        move_into_place(tmp, out, overwrite=overwrite, force=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _source_name(source) -> str | None:
    """How the manifest records the model a directory was quantized from: an absolute path when it is a
    local directory or file, else the name it was loaded by (a hub id)."""
    if not source:
        return None
    p = Path(source)
    return str(p.resolve()) if p.exists() else str(source)


def _json_object_or_none(file: Path) -> dict | None:
    """The JSON object in ``file``, or None when it is missing, unreadable or not an object."""
    try:
        return _manifest.read_json_object(file, "")
    except (OSError, FormatError):
        return None


def source_of(path: str | os.PathLike) -> str | None:
    """The model a saved directory was quantized from, as its manifest records it (None if unknown)."""
    src = (_json_object_or_none(Path(path) / MANIFEST_NAME) or {}).get("source")
    return src if isinstance(src, str) and src else None


def parse_quantization_config(qc, where: str = "quantization_config") -> tuple[FASQConfig, dict[str, LayerSpec]]:
    """(config, per-module specs) of a stored fasq ``quantization_config`` dict (from config.json, or as
    transformers holds it); anything malformed (a wrong type, a value out of range, a missing table)
    raises :class:`FormatError` naming ``where``."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{where}: no fasq quantization_config (this is not a fasq-quantized model)")
    fv = qc.get("format_version")
    if fv not in READABLE_FORMAT_VERSIONS or isinstance(fv, bool):
        raise FormatError(f"{where}: format_version={fv!r}, but this fasq reads format versions "
                          f"{list(READABLE_FORMAT_VERSIONS)}; upgrade fasq or re-quantize")
    qc = dict(qc)
    qc.pop("format_version")
    modules = qc.pop("modules", None)
    qc.pop("allocation", None)
    qc.pop("embeddings", None)   # parse_embeddings
    if not isinstance(modules, dict) or not modules:
        raise FormatError(f"{where}: quantization_config has no 'modules' table (fasq models are made by "
                          "fasq.quantize + fasq.save; from_pretrained cannot quantize on the fly)")
    try:
        return FASQConfig.from_dict(qc), {name: LayerSpec.from_dict(d) for name, d in modules.items()}
    except (ValueError, TypeError) as e:
        raise FormatError(f"{where}: {e}") from None


def parse_embeddings(qc: dict, specs: dict[str, LayerSpec], where: str = "quantization_config"
                     ) -> dict[str, tuple[LayerSpec, str | None]]:
    """{embedding module: (table spec, the quantized head it is tied to or None)} of a stored
    ``quantization_config`` (format version 2; none in version 1).  A tied head must be a quantized module of
    the same spec."""
    table = qc.get("embeddings") or {}
    if table and qc.get("format_version") != 2:
        raise FormatError(f"{where}: 'embeddings' needs format_version 2, the config says {qc.get('format_version')!r}")
    if not isinstance(table, dict):
        raise FormatError(f"{where}: 'embeddings' must be an object of embedding module -> table spec")
    out = {}
    for name, rec in table.items():
        if not isinstance(rec, dict):
            raise FormatError(f"{where}: embeddings[{name!r}] must be an object of LayerSpec fields")
        rec = dict(rec)
        tied = rec.pop("tied_head", None)
        try:
            spec = LayerSpec.from_dict(rec)
        except ValueError as e:
            raise FormatError(f"{where}: embeddings[{name!r}]: {e}") from None
        if tied is not None and (not isinstance(tied, str) or specs.get(tied) != spec):
            raise FormatError(f"{where}: embeddings[{name!r}] is tied to {tied!r}, which is not a quantized module "
                              "of the same shape and settings in 'modules'")
        out[name] = (spec, tied)
    return out


def read_quantization_config(path: str | os.PathLike) -> tuple[FASQConfig, dict[str, LayerSpec], dict]:
    """(config, per-module specs, raw config.json) of a saved directory, with version checks.  Anything
    malformed (a wrong type, a value out of range, a missing table) raises :class:`FormatError`."""
    cfg_file = Path(path) / "config.json"
    raw = _manifest.read_json_object(cfg_file, f"{path}: no config.json; not a saved fasq model directory")
    config, specs = parse_quantization_config(raw.get("quantization_config"), str(cfg_file))
    return config, specs, raw


def verify_files(path: str | os.PathLike) -> None:
    """Check every file that defines the model against the manifest's size and sha256."""
    _manifest.verify(Path(path))


class _Weights:
    """The stored tensors of a directory, one file or the shards its index names, by tensor name."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        wmap = _manifest.read_index(path)
        self.where = {}
        for fname in _manifest.weight_files(path):
            try:
                f = safe_open(str(path / fname), framework="pt", device="cpu")
            except Exception as e:  # the library's own error types vary by version
                raise FormatError(f"{path / fname}: cannot be read as safetensors ({e})") from None
            for key in f.keys():
                if key in self.where:
                    raise FormatError(f"{path}: tensor {key} is stored in two files")
                if wmap is not None and wmap.get(key) != fname:
                    raise FormatError(f"{path}: tensor {key} is in {fname}, but {INDEX_NAME} says "
                                      f"{wmap.get(key)}")
                self.where[key] = f
        if wmap is not None and set(wmap) != set(self.where):
            absent = sorted(set(wmap) - set(self.where))
            raise FormatError(f"{path}: {INDEX_NAME} names tensors no shard holds: {absent[:5]}")

    def keys(self):
        return self.where.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)

    def get_slice(self, name: str):
        return self.where[name].get_slice(name)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         verify: bool = True, with_tokenizer: bool = False, dense_16bit: bool = False):
    """Load a saved fasq model (and, with ``with_tokenizer``, its tokenizer).

    Reads one ``model.safetensors`` or the shards its index names.  Unquantized tensors are cast to
    ``dtype``; PQ buffers keep their stored dtypes.  No full-precision model is built first: the
    skeleton is made on the meta device and every tensor is assigned straight from the files (cast where
    ``dtype`` asks), so peak memory is about the loaded model.

    ``dense_16bit`` (for an fp32 ``dtype``): the token embedding and the output head (tied or not)
    keep their stored 16-bit values instead of an fp32 copy of twice the size
    (:mod:`fasq.kernels.dense16`); activations stay fp32 and the head sums in fp32, so logits equal
    the fp32 model's up to the order of fp32 sums (not bit for bit).  On the CPU the head reads half
    the bytes per decoded token.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .embedding import replace_embedding
    from .model import attach_config, replace_with_pq

    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path}: no such directory")
    config, specs, raw = read_quantization_config(path)
    embeddings = parse_embeddings(raw["quantization_config"], specs, str(path / "config.json"))
    if verify:
        verify_files(path)
    try:  # config.json is to blame for anything that fails while the skeleton is built
        hf_config = AutoConfig.from_pretrained(str(path))
        qc = hf_config.quantization_config
        del hf_config.quantization_config  # build a plain model; we swap the layers ourselves
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        replace_with_pq(model, specs, device="meta")
        for name, (spec, tied) in embeddings.items():
            replace_embedding(model, name, spec, tied, device="meta")
    except Exception as e:
        raise FormatError(f"{path / 'config.json'}: cannot build the model it describes "
                          f"({type(e).__name__}: {e})") from None
    f = _Weights(path)
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
        if ref.dtype in (torch.int32, torch.int8, torch.float16) and _is_pq_buffer(name, {**specs, **embeddings}):
            if t.dtype != ref.dtype:
                raise FormatError(f"{path}: tensor {name} is {t.dtype}, the format stores {ref.dtype}")
        else:
            t = t.to(ref.dtype) if t.is_floating_point() else t
        tensors[name] = t
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise FormatError(f"{path}: tensors missing from the weights: {missing[:5]}")
    _materialize_nonpersistent(model, hf_config)
    model.to(device)
    model.eval()
    hf_config.quantization_config = qc
    attach_config(model, config, {n: s.to_dict() for n, s in specs.items()},
                  raw["quantization_config"].get("allocation"), raw["quantization_config"].get("embeddings"))
    if with_tokenizer:
        from transformers import AutoTokenizer
        return model, AutoTokenizer.from_pretrained(str(path))
    return model


# ----------------------------------------------------------------------------------------------
# any model argument the CLI and benchmarks take
def is_fasq_dir(path: str) -> bool:
    qc = (_json_object_or_none(Path(path) / "config.json") or {}).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def load_any(model_arg: str, dtype=None):
    """(model, tokenizer) for a fasq directory, the embedded default ``smollm2``, a .gguf file, an HF
    directory, or a hub id.  ``dtype="stored"``: a local checkpoint in the dtype its config.json records
    (what streaming quantizes from), else fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import resolve_model

    if dtype == "stored":
        dtype = stored_dtype(model_arg)
    dtype = dtype or torch.float32
    if is_fasq_dir(model_arg):
        return load(model_arg, dtype=dtype, with_tokenizer=True)
    path, kw = resolve_model(model_arg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    if getattr(model.config, "quantization_config", None) is not None:   # GGUF: dequantized on load
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model.eval()
    return model, tok


def stored_dtype(model_arg: str):
    """The 16-bit dtype a local safetensors checkpoint declares in its config.json, else None (fp32)."""
    raw = _json_object_or_none(Path(model_arg) / "config.json") or {}
    name = raw.get("dtype") or raw.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


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
