"""Each method behind one small adapter: quantize the model with the method's own library and return
the quantized model, its quantized layers (in the library's classes) and the library's dequantizer.

Adapters run inside a worker process (see worker.py), one method per process, so that the peak RSS
they report is theirs alone.  RTN is implemented here (the floor); every other baseline calls its
real library.  GPTQ and AWQ artifacts are cached on disk (slow to make, keyed by library version,
settings and calibration); every other method quantizes afresh each run.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..format import pack_codes, packed_words, unpack_codes
from ..nn import set_module
from .points import Point, distill_sequences, distill_steps, fasq_config
from .texts import Calibration

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class Context:
    model_path: str
    tokenizer: Any
    calibration: Calibration
    artifacts: Path            # where GPTQ / AWQ outputs are cached
    threads: int = 2
    progress: bool = True


@dataclass
class Quantized:
    model: nn.Module
    modules: list[tuple[str, nn.Module]]               # quantized layers, in the library's own classes
    dequantize: Callable[[nn.Module], torch.Tensor]    # module -> weight [out, in] decoded by the library
    library: str
    version: str
    config: dict
    quantize_seconds: float
    peak_rss_mb: float                                 # process peak at the end of quantization
    calibration: dict | None = None
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)
    # fasq's quantized embedding / head tables: in the size (total, % of FP16), not in bits/weight, which stays
    # over the body's linears as every other method's
    tables: list[tuple[str, nn.Module]] = field(default_factory=list)
    # (module, x) -> the library's own output for x, where calling the stored module is not how the library
    # runs it (llm-compressor's packed layers have no CPU forward: the library decompresses them first)
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


def load_original(model_path: str, dtype=torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.eval()


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The layers every method quantizes: all linears but the (tied) output head."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# fasq
def run_fasq(point: Point, ctx: Context) -> Quantized:
    from .. import __version__
    from ..model import pq_layers, quantize

    from ..embedding import PQEmbedding
    from ..model import _embedding_tables

    config = fasq_config(point.settings)
    model = load_original(ctx.model_path)
    _, dt = _timed(lambda: quantize(model, config, progress=ctx.progress))
    steps = distill_steps(point.settings)
    if steps:   # the quantize time includes the distillation (and loading the original again for it)
        from ..distill import DistillSettings, distill

        def tune():
            settings = DistillSettings(steps=steps, seed=config.seed,
                                       sequences=distill_sequences(point.settings) or DistillSettings.sequences)
            distill(model, load_original(ctx.model_path), settings, progress=ctx.progress)
        dt += _timed(tune)[1]
    table_names = _embedding_tables(model)
    layers = pq_layers(model)
    tables = [(n, m) for n, m in layers if n in table_names] + [
        (n, m) for n, m in model.named_modules() if isinstance(m, PQEmbedding) and m.tied_head is None]
    return Quantized(model, [(n, m) for n, m in layers if n not in table_names],
                     lambda m: m.dequantize(torch.float32), "fasq", __version__, config.to_dict(), dt, peak_rss_mb(),
                     tables=tables)


# ----------------------------------------------------------------------------------------------
# RTN: the floor, implemented here
class RTNLinear(nn.Module):
    """Round-to-nearest, asymmetric min/max per (row, group of ``group_size`` columns).

    Stored: ``codes`` int32 [out, ceil(in*bits/32)] (each row a packed bit stream, as fasq packs its
    codes), ``scales`` and ``mins`` fp16 [out, ceil(in/group_size)].  w = code * scale + min.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = -(-in_features // group_size)
        self.register_buffer("codes", torch.zeros(out_features, packed_words(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("mins", torch.zeros(out_features, groups, dtype=torch.float16))
        self.bias = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int) -> "RTNLinear":
        out_f, in_f = lin.weight.shape
        m = cls(in_f, out_f, bits, group_size)
        w = lin.weight.detach().float()                                   # [out, in]
        groups = m.scales.shape[1]
        pad = groups * group_size - in_f
        wg = torch.nn.functional.pad(w, (0, pad)).view(out_f, groups, group_size)
        valid = torch.nn.functional.pad(torch.ones(in_f, dtype=torch.bool), (0, pad)).view(groups, group_size)
        lo = torch.where(valid, wg, torch.inf).amin(-1)                   # [out, G]
        hi = torch.where(valid, wg, -torch.inf).amax(-1)
        qmax = 2 ** bits - 1
        scale = ((hi - lo) / qmax).half()
        mins = lo.half()
        s = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        q = torch.round((wg - mins.float()[..., None]) / s[..., None]).clamp_(0, qmax)
        q = q.view(out_f, -1)[:, :in_f].to(torch.int64)
        m.codes.copy_(pack_codes(q, bits))
        m.scales.copy_(scale)
        m.mins.copy_(mins)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return m

    def dequantize(self) -> torch.Tensor:
        q = unpack_codes(self.codes, self.bits, self.in_features).float()          # [out, in]
        col_group = torch.arange(self.in_features) // self.group_size
        return q * self.scales.float()[:, col_group] + self.mins.float()[:, col_group]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)


def run_rtn(point: Point, ctx: Context) -> Quantized:
    from .. import __version__

    bits, group = int(point.settings["bits"]), int(point.settings.get("group_size", 128))
    model = load_original(ctx.model_path)

    def go():
        out = []
        for name, lin in target_linears(model):
            q = RTNLinear.from_linear(lin, bits, group)
            set_module(model, name, q)
            out.append((name, q))
        return out

    modules, dt = _timed(go)
    return Quantized(model, modules, lambda m: m.dequantize(), "fasq.sweep RTN", __version__,
                     {"bits": bits, "group_size": group, "scale": "fp16", "zero": "fp16 min"}, dt, peak_rss_mb())


# ----------------------------------------------------------------------------------------------
# HQQ
def run_hqq(point: Point, ctx: Context) -> Quantized:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    s = dict(point.settings)
    bits, group = int(s.pop("bits")), int(s.pop("group_size", 64))
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, **s)
    model = load_original(ctx.model_path)
    # fp16 compute dtype: scales and zeros are stored in fp16 (HQQ keeps them in the compute dtype).
    _, dt = _timed(lambda: AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=torch.float16,
                                                         device="cpu"))
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, HQQLinear)]
    return Quantized(model, modules, lambda m: m.dequantize(), "hqq", version_of("hqq"),
                     _jsonable(cfg), dt, peak_rss_mb())


# ----------------------------------------------------------------------------------------------
# NF4 (bitsandbytes)
def run_nf4(point: Point, ctx: Context) -> Quantized:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    blocksize = int(point.settings.get("blocksize", 64))
    dq = bool(point.settings.get("double_quant", True))
    model = load_original(ctx.model_path)

    def go():
        out = []
        for name, lin in target_linears(model):
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=dq, quant_type="nf4",
                                  quant_storage=torch.uint8, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, compress_statistics=dq,
                                         quant_type="nf4", blocksize=blocksize, quant_storage=torch.uint8)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            q = q.to("cpu")                           # Params4bit quantizes on its move to a device
            set_module(model, name, q)
            out.append((name, q))
        return out

    modules, dt = _timed(go)
    return Quantized(model, modules, lambda m: F.dequantize_4bit(m.weight.data, m.weight.quant_state).float(),
                     "bitsandbytes", version_of("bitsandbytes"),
                     {"quant_type": "nf4", "blocksize": blocksize, "double_quant": dq, "quant_storage": "uint8"},
                     dt, peak_rss_mb())


# ----------------------------------------------------------------------------------------------
# GPTQ (gptqmodel) and AWQ (autoawq): calibrated, slow, cached on disk
def _artifact(ctx: Context, point: Point, library: str, make: Callable[[Path], dict],
              extra: dict | None = None) -> tuple[Path, dict, bool]:
    """Directory of a cached quantized model (made by ``make(tmpdir) -> meta`` when missing); ``extra`` joins the
    cache key (e.g. a fix applied to the library)."""
    fingerprint = {"point": point.to_dict(), "library": library, "version": version_of(library),
                   "calibration": ctx.calibration.to_dict(), "model": _model_fingerprint(ctx.model_path),
                   **(extra or {})}
    h = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    out = ctx.artifacts / f"{point.key}-{h}"
    meta_file = out / "sweep_meta.json"
    if meta_file.is_file():
        return out, json.loads(meta_file.read_text()), True
    ctx.artifacts.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=ctx.artifacts))
    try:
        meta = make(tmp)
        meta["fingerprint"] = fingerprint
        (tmp / "sweep_meta.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, meta, False


def _model_fingerprint(model_path: str) -> str:
    """Name, config and weight-file sizes of the source model (enough to tell checkpoints apart)."""
    import hashlib

    p = Path(model_path)
    h = hashlib.sha256()
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return f"{p.name}:{h.hexdigest()[:16]}"


def run_gptq(point: Point, ctx: Context) -> Quantized:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(ctx.threads))
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    s = dict(point.settings)
    s.setdefault("offload_to_disk", False)   # a 135M model fits in memory; skip the per-module disk round trip
    qc = QuantizeConfig(bits=int(s.pop("bits")), group_size=int(s.pop("group_size", 128)), **s)

    def make(tmp: Path) -> dict:
        calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in ctx.calibration.samples(ctx.tokenizer)]
        m = GPTQModel.load(ctx.model_path, qc, device="cpu")
        _, dt = _timed(lambda: m.quantize(calib, batch_size=1, tokenizer=ctx.tokenizer))
        rss = peak_rss_mb()
        m.save(str(tmp))
        return {"quantize_seconds": dt, "peak_rss_mb": rss, "config": _jsonable(m.quantize_config.to_dict())}

    path, meta, cached = _artifact(ctx, point, "gptqmodel", make)
    # The default CPU kernel needs in_features % group_size == 0 (SmolLM2's 576 is not a multiple of 128).
    wrapped = GPTQModel.load(str(path), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    model = wrapped.model.eval()
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)]
    return Quantized(model, modules, lambda m: m.dequantize_weight().T.float(), "gptqmodel",
                     version_of("gptqmodel"), meta["config"], meta["quantize_seconds"], meta["peak_rss_mb"],
                     ctx.calibration.to_dict(), cached,
                     ["loaded with backend=BACKEND.TORCH"] + (["quantized in an earlier run (cached artifact)"]
                                                              if cached else []))


def run_awq(point: Point, ctx: Context) -> Quantized:
    """AWQ through GPTQModel's AWQ processor (``AWQConfig``, GEMM format, zero points), or through
    llm-compressor's ``AWQModifier`` with ``library="llm-compressor"`` (:func:`run_awq_llmcompressor`).

    GPTQModel is maintained and quantizes on the CPU; autoawq (archived upstream) searched SmolLM2 at
    ~14 minutes per decoder layer here (docs/accuracy.md).  AWQ needs ``in_features % group_size == 0``.
    """
    library = point.settings.get("library", "gptqmodel")
    if library == "llm-compressor":
        return run_awq_llmcompressor(point, ctx)
    if library != "gptqmodel":
        raise ValueError(f"awq library={library!r} is unknown: allowed are 'gptqmodel', 'llm-compressor'")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(ctx.threads))
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.quantization.config import AWQConfig

    s = dict(point.settings)
    s.pop("library", None)
    s.setdefault("offload_to_disk", False)
    qc = AWQConfig(bits=int(s.pop("bits")), group_size=int(s.pop("group_size", 128)), **s)
    fixes = _fix_gemma3_awq() if _model_type(ctx.model_path) == "gemma3_text" else None

    def make(tmp: Path) -> dict:
        calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in ctx.calibration.samples(ctx.tokenizer)]
        m = GPTQModel.load(ctx.model_path, qc, device="cpu")
        # Gemma 3's rotary embedding takes a layer type (sliding / full attention) that GPTQModel 7.6's AWQ
        # scale search does not pass when it recomputes position embeddings; the ones captured with each
        # layer's inputs are the model's own, so keep them (GPTQModel's switch for such models).
        m.awq_preserve_explicit_position_embeddings = True
        # Without a backend GPTQModel picks its CUDA GEMM kernel for AWQ and refuses on a CPU-only machine.
        _, dt = _timed(lambda: m.quantize(calib, batch_size=1, tokenizer=ctx.tokenizer, backend=BACKEND.TORCH_AWQ))
        rss = peak_rss_mb()
        m.save(str(tmp))
        return {"quantize_seconds": dt, "peak_rss_mb": rss, "config": _jsonable(m.quantize_config.to_dict())}

    path, meta, cached = _artifact(ctx, point, "gptqmodel", make, fixes)
    # bf16 for Gemma: its norm gains (and AWQ's rescaled ones) pass fp16's 65504
    dtype = torch.bfloat16 if fixes else torch.float16
    wrapped = GPTQModel.load(str(path), backend=BACKEND.TORCH_AWQ, device="cpu", dtype=dtype)
    model = wrapped.model.eval()
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)]
    return Quantized(model, modules, _awq_dequantizer, "gptqmodel (AWQ)", version_of("gptqmodel"), meta["config"],
                     meta["quantize_seconds"], meta["peak_rss_mb"], ctx.calibration.to_dict(), cached,
                     [f"loaded with {type(modules[0][1]).__name__}" if modules else "no quantized layers"]
                     + (["quantized in an earlier run (cached artifact)"] if cached else []))


def run_awq_llmcompressor(point: Point, ctx: Context) -> Quantized:
    """AWQ through llm-compressor (vLLM's quantization library): ``oneshot`` with an ``AWQModifier`` and a
    compressed-tensors scheme of asymmetric integer weights in groups along the input (zero points, 16-bit
    scales: what vLLM serves as W4A16 / W3A16), the library's own mappings per architecture (for Gemma 3:
    v->o, pre_feedforward_layernorm->gate/up, up->down, its offset norms handled by the library).

    llm-compressor 0.14 pins transformers <= 5.17, so it runs in its own venv (``fasq sweep --setup-baselines``
    makes one beside the baselines venv; the runner sends these points there).  The quantized model is saved in
    compressed-tensors' ``pack_quantized`` format and loaded back: its layers hold the packed codes, scales
    and zero points that the size counts, and the library decompresses them."""
    import copy
    import sys

    try:
        import llmcompressor  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"llm-compressor is not installed for {sys.executable} ({e}): make its venv with "
                           "`fasq sweep --setup-baselines VENV` (it creates VENV-llmcompressor, which the sweep "
                           "uses for these points) or name an interpreter that has it in "
                           "$FASQ_LLMCOMPRESSOR_PYTHON") from None
    from compressed_tensors.compressors.base import BaseCompressor, decompress_module
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.utils import get_direct_state_dict
    from transformers import AutoModelForCausalLM

    s = dict(point.settings)
    s.pop("library")
    bits, group = int(s.pop("bits")), int(s.pop("group_size", 128))
    if s:
        raise ValueError(f"awq (llm-compressor): unknown settings {sorted(s)}")

    def make(tmp: Path) -> dict:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.accelerator.is_available():
            # llm-compressor 0.14 pins cached activations for GPU copies and fails without an accelerator
            IntermediatesCache.pin_memory = lambda self, *a, **k: None
        ids = ctx.calibration.samples(ctx.tokenizer)
        data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group,
                                scale_dtype=torch.float16)
        recipe = [AWQModifier(), QuantizationModifier(ignore=["lm_head"], config_groups={
            "group_0": QuantizationScheme(targets=["Linear"], weights=args)})]
        model = load_original(ctx.model_path)
        _, dt = _timed(lambda: oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ctx.calibration.seq_len,
                                       num_calibration_samples=len(ids)))
        rss = peak_rss_mb()
        # Scales are stored in the model's dtype (compressed-tensors' pack_quantized ignores scale_dtype); AWQ
        # checkpoints carry 16-bit ones (vLLM serves them in fp16 / bf16), so keep fp16 scales: the packed
        # codes are then computed against the scales as stored.
        for m in model.modules():
            if isinstance(getattr(m, "weight_scale", None), torch.Tensor):
                m.weight_scale.data = m.weight_scale.data.half()
        model.save_pretrained(str(tmp), save_compressed=True)
        ctx.tokenizer.save_pretrained(str(tmp))
        config = json.loads((tmp / "config.json").read_text()).get("quantization_config", {})
        return {"quantize_seconds": dt, "peak_rss_mb": rss, "config": _jsonable(config)}

    path, meta, cached = _artifact(ctx, point, "llmcompressor", make, {"scales": "float16"})
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "weight_packed")]
    _restore_stored_dtypes(path, modules)

    def dequantize(m: nn.Module) -> torch.Tensor:
        scheme = m.quantization_scheme
        compressor = BaseCompressor.get_value_from_registry(CompressionFormat(scheme.format).value)
        return compressor.decompress(get_direct_state_dict(m), scheme)["weight"].float()

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dense = copy.deepcopy(m)
        decompress_module(dense)   # in place, as the library does when a model is loaded to run uncompressed
        return dense(x.to(dense.weight.dtype))

    return Quantized(model, modules, dequantize, "llm-compressor (AWQ)", version_of("llmcompressor"), meta["config"],
                     meta["quantize_seconds"], meta["peak_rss_mb"], ctx.calibration.to_dict(), cached,
                     [f"compressed-tensors {version_of('compressed-tensors')}, {len(modules)} pack_quantized layers, "
                      f"transformers {version_of('transformers')}"]
                     + (["quantized in an earlier run (cached artifact)"] if cached else []), forward=forward)


def _restore_stored_dtypes(path: Path, modules: list[tuple[str, nn.Module]]) -> None:
    """Give each quantized layer's tensors the dtype they have in the checkpoint (from_pretrained's dtype
    casts the 16-bit scales to fp32), so that the layers hold, and the size counts, what is stored."""
    from safetensors import safe_open

    stored = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                stored[k] = sf.get_slice(k).get_dtype()
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    for name, mod in modules:
        for key, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            want = names.get(stored.get(f"{name}.{key}", ""))
            if want is not None and t.is_floating_point() and t.dtype != want:
                t.data = t.data.to(want)


def _model_type(model_path: str) -> str | None:
    try:
        return json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _fix_gemma3_awq() -> dict:
    """Two fixes to GPTQModel 7.6's AWQ for Gemma 3 text models (docs/accuracy.md has the evidence):

    * its Gemma 3 definition inherits Llama's module tree, where the MLP reads ``post_attention_layernorm``;
      Gemma 3's MLP reads ``pre_feedforward_layernorm`` (``post_attention_layernorm`` normalizes the attention's
      output), so AWQ's gate/up scales were folded into the wrong norm;
    * its norm scaling divides ``(1 + w)`` only for GemmaRMSNorm / Gemma2RMSNorm and plain ``w`` for
      Gemma3RMSNorm, which also multiplies by ``(1 + w)``.

    Returns the cache-key entry of the fixed artifacts."""
    import copy

    from gptqmodel.models.definitions import gemma3
    from gptqmodel.quantization.awq.quantize import scale
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    tree = copy.deepcopy(gemma3.Gemma3QModel.module_tree)
    block = tree[-1]
    if "post_attention_layernorm" in block:
        tree[-1] = {("pre_feedforward_layernorm" if k == "post_attention_layernorm" else k):
                    (("pre_feedforward_layernorm:!",) if k == "post_attention_layernorm" else v)
                    for k, v in block.items()}
        gemma3.Gemma3QModel.module_tree = tree
    if not isinstance(scale.GemmaRMSNorm, tuple):
        scale.GemmaRMSNorm = (GemmaRMSNorm, Gemma3RMSNorm)   # isinstance(ln, GemmaRMSNorm) in scale_ln_fcs
    return {"fixes": ["gemma3: MLP norm is pre_feedforward_layernorm", "gemma3: (1 + w) norm scaling"]}


def _awq_dequantizer(m: nn.Module) -> torch.Tensor:
    """W [out, in] from an AWQ GEMM layer (int4 codes, zeros and scales per group of inputs)."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(m.qweight, m.qzeros, m.scales, m.bits, m.group_size).T.float()


def _jsonable(obj: Any) -> Any:
    """A config as plain JSON (dtypes and enums as strings)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


ADAPTERS: dict[str, Callable[[Point, Context], Quantized]] = {
    "fasq": run_fasq, "rtn": run_rtn, "hqq": run_hqq, "nf4": run_nf4, "gptq": run_gptq, "awq": run_awq,
}
