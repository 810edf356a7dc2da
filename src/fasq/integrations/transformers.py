"""transformers adapter: ``AutoModelForCausalLM.from_pretrained(dir)`` loads what :func:`fasq.save` wrote.

transformers reads ``quantization_config`` from config.json and looks its ``quant_method`` up in two
tables that libraries may extend (``register_quantization_config`` / ``register_quantizer``):

* :class:`FasqHfConfig` parses and checks the stored config (FASQConfig fields, ``format_version``,
  per-module LayerSpecs) with the one reader :func:`fasq.io.parse_quantization_config`;
* :class:`FasqHfQuantizer` swaps the listed ``nn.Linear`` modules of the empty (meta) model for empty
  :class:`~fasq.nn.PQLinear` modules before transformers loads the checkpoint, so the PQ buffers
  (``codes``, ``codebooks``, ``scales``, ``rot_signs``, ``bias``) load like any other tensor.

Only pre-quantized models load this way; fasq quantizes with :func:`fasq.quantize`.  This module
imports transformers at the top: import it only through :mod:`fasq.integrations`, whose hook
runs :func:`register` once transformers has loaded its quantizer tables.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
# Only modules that transformers.quantizers.auto has finished importing when the hook runs inside
# it: importing transformers.modeling_utils here would be circular (it is what imports the tables).
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import QUANT_METHOD
from ..format import FORMAT_VERSION, LayerSpec
from .. import manifest as fasq_manifest
from ..io import MANIFEST_NAME, FormatError, parse_embeddings, parse_quantization_config
from ..nn import PQLinear

log = logging.getLogger(__name__)

_HF_TABLES = "transformers.quantizers.auto"


class FasqHfConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a fasq model as transformers holds it.

    Built from the stored dict (``FasqHfConfig.from_dict``); ``to_dict`` gives that dict back, so
    ``save_pretrained`` writes the config.json that :func:`fasq.save` writes.
    """

    def __init__(self, **stored: Any):
        self.quant_method = QUANT_METHOD
        qc = {"quant_method": QUANT_METHOD, **stored}
        self.fasq_config, self.specs = parse_quantization_config(qc)
        self.embeddings = parse_embeddings(qc, self.specs)   # {name: (spec, tied head or None)}

    def to_dict(self) -> dict[str, Any]:
        emb = {n: {**s.to_dict(), **({"tied_head": t} if t else {})} for n, (s, t) in self.embeddings.items()}
        return {**self.fasq_config.to_dict(), "format_version": FORMAT_VERSION if emb else 1,
                "modules": {name: spec.to_dict() for name, spec in self.specs.items()},
                **({"embeddings": emb} if emb else {})}

    def __iter__(self):
        yield from self.to_dict().items()


class FasqHfQuantizer(HfQuantizer):
    """Loads fasq-quantized checkpoints: PQLinear modules in, stored buffers loaded as they are."""

    requires_calibration = False  # fasq is calibration-free, but it does not quantize inside from_pretrained
    quantization_config: FasqHfConfig

    def __init__(self, quantization_config: FasqHfConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError("fasq does not quantize inside from_pretrained: load the model, run "
                             "fasq.quantize(model, FASQConfig(...)) and fasq.save(model, dir), then "
                             "from_pretrained(dir) (or fasq.load(dir))")

    def _process_model_before_weight_loading(self, model, **kwargs):
        from ..model import replace_with_pq

        from ..embedding import replace_embedding

        specs = _specs_for(model, self.quantization_config.specs)
        embeddings = _specs_for(model, self.quantization_config.embeddings)
        try:
            replace_with_pq(model, specs, device="meta")
            for name, (spec, tied) in embeddings.items():
                replace_embedding(model, name, spec, tied, device="meta")
        except ValueError as e:
            raise FormatError(f"fasq quantization_config does not fit {type(model).__name__}: {e}") from None

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.fasq_config = self.quantization_config.fasq_config   # as fasq.quantize / fasq.load set it
        # save_pretrained then also writes fasq's manifest, so fasq.load reads the directory.  A partial of
        # a module-level function, not a bound method: pickle stores a bound method as getattr(model, its
        # __name__), which the unpickled model lacks; a partial pickles as the function and the model.
        model.save_pretrained = functools.partial(_save_pretrained_with_manifest, model)
        _offload_pq_buffers(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """Store what fasq.save stores: PQ buffers as they are, fp32 tensors as fp16 (ties kept as aliases
        so transformers still stores a tied tensor once)."""
        half: dict[tuple, torch.Tensor] = {}
        state = {}
        for name, t in model.state_dict().items():
            if t.dtype == torch.float32:
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
                if key not in half:
                    half[key] = t.half()
                t = half[key]
            state[name] = t
        return state, {"fasq": str(FORMAT_VERSION)}

    @property
    def is_trainable(self) -> bool:
        # Adapters (PEFT LoRA, fasq.integrations.peft) train on top of the frozen PQ weights; the HF
        # Trainer asks this before training a quantized model (and still refuses one without adapters).
        return True

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """Replace every PQLinear by an nn.Linear holding its dequantized weight (``model.dequantize()``)."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)  # config.dtype: "float32"
        for name, m in list(model.named_modules()):
            if isinstance(m, PQLinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                device=m.codes.device, dtype=dtype)
                with torch.no_grad():
                    lin.weight.copy_(m.dequantize(dtype))
                    if m.bias is not None:
                        lin.bias.copy_(m.bias)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, lin)
        _dequantize_embeddings(model, dtype)
        if hasattr(model, "fasq_config"):
            del model.fasq_config
        model.__dict__.pop("save_pretrained", None)   # back to the class's plain save_pretrained
        return model


def _dequantize_embeddings(model, dtype) -> None:
    """A PQEmbedding becomes an ``nn.Embedding`` of its dequantized table (Gemma's row scale re-applied by a
    forward hook); a tied head then shares that weight again."""
    from ..embedding import PQEmbedding

    for name, m in list(model.named_modules()):
        if not isinstance(m, PQEmbedding):
            continue
        emb = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, device=m.dtype_probe.device, dtype=dtype)
        with torch.no_grad():
            emb.weight.copy_(m.dequantize(dtype))
        if m.embed_scale != 1.0:
            scale = torch.tensor(m.embed_scale, dtype=dtype).item()
            emb.register_forward_hook(lambda mod, args, out, s=scale: out * s)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, emb)
        head = model.get_output_embeddings()
        if m.tied_head is not None and isinstance(head, nn.Linear):
            head.weight = emb.weight


# transformers before 5.13 offloads buffers to disk wrongly: a disk-offloaded PQLinear computed garbage
# (logits off by 3.8 on the tiny test llama with 5.0.0-5.12.1; identical to fasq.load from 5.13.0).
_FIRST_GOOD_BUFFER_OFFLOAD = (5, 13)


def _offload_pq_buffers(model) -> None:
    """Offload the PQ buffers of the PQLinear layers that the device map sends to "cpu" or "disk".

    accelerate offloads a module's buffers only with ``from_pretrained(..., offload_buffers=True)``, and
    a PQLinear's weight is all buffers: without this, a layer mapped to "cpu" / "disk" would keep its whole
    quantized weight in memory on the execution device.  Runs after accelerate's dispatch, whose hooks
    (``_hf_hook``) load an offloaded module's tensors before its forward and drop them after.
    """
    hooks = {name: m._hf_hook for name, m in model.named_modules()
             if isinstance(m, PQLinear) and getattr(getattr(m, "_hf_hook", None), "offload", False)}
    if hooks and _transformers_version() < _FIRST_GOOD_BUFFER_OFFLOAD:
        if any(h.offload_buffers for h in hooks.values()):
            raise RuntimeError(f"fasq: transformers {transformers.__version__} loads offloaded buffers wrongly, "
                               "and fasq's quantized weights are buffers: upgrade to transformers >= 5.13, or "
                               "load without offload_buffers=True")
        log.warning("fasq: %d quantized layers are mapped to cpu/disk offload (%s, ...), but transformers %s "
                    "offloads buffers wrongly, and their weights are buffers: they stay in memory on the "
                    "execution device (transformers >= 5.13 offloads them)", len(hooks), next(iter(hooks)),
                    transformers.__version__)
        return
    for name, hook in hooks.items():
        layer = model.get_submodule(name)
        if not hook.offload_buffers:
            _move_buffers_to_offload(layer, hook)
        # The kernels' per-layer caches (prepared tables, the C++ plan) hold the loaded buffers: dropped
        # after each forward, or the offloaded weight would stay in memory through them.
        layer.register_forward_hook(_drop_kernel_caches)


def _move_buffers_to_offload(layer: PQLinear, hook) -> None:
    """Put the layer's buffers where its hook keeps offloaded tensors (``weights_map``: accelerate's
    loader, in memory for "cpu", files in the offload folder for "disk"), then leave meta tensors."""
    from accelerate.utils import offload_weight, set_module_tensor_to_device

    loader, prefix = hook.weights_map.dataset, hook.weights_map.prefix
    for name, buf in list(layer.named_buffers(recurse=False)):
        key = prefix + name
        # transformers >= 5.13 lists every tensor of a "disk" module in the offload index (read from the
        # checkpoint) and accelerate keeps a "cpu" module's state dict, buffers included: usually there.
        if key not in loader.all_keys:
            if loader.save_folder is not None:      # a .dat file in the offload folder, like accelerate's own
                offload_weight(buf, key, loader.save_folder, index=loader.index)
            else:
                loader.state_dict[key] = buf.to("cpu")
            loader.all_keys.append(key)
        set_module_tensor_to_device(layer, name, "meta")
    hook.offload_buffers = True


def _drop_kernel_caches(layer, args, output):
    for cache in [k for k in layer.__dict__ if k.startswith("_fasq_")]:
        del layer.__dict__[cache]


def _transformers_version() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def _specs_for(model, specs: dict[str, LayerSpec]) -> dict[str, LayerSpec]:
    """Module names are stored from the causal-LM root (``model.layers.0...``); a bare base model
    (``AutoModel``) lacks the ``<base_model_prefix>.`` part."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if prefix == "." or getattr(model, prefix[:-1], None) is not None:
        return specs
    return {name.removeprefix(prefix): spec for name, spec in specs.items()}


def _save_pretrained_with_manifest(self, save_directory, *args, **kwargs):
    """``PreTrainedModel.save_pretrained``, then fasq's manifest (fasq.json), which fasq.load checks."""
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    path = Path(save_directory)
    if path.is_dir() and kwargs.get("is_main_process", True):
        _write_manifest(path, pushed=bool(kwargs.get("push_to_hub")))
    return out


def _write_manifest(path: Path, pushed: bool) -> None:
    """The manifest fasq.save writes (:mod:`fasq.manifest`): every file that defines the model, one
    safetensors file or the shards the index names (atomically)."""
    if pushed:
        log.warning("%s: pushed before fasq.json was written; the pushed copy loads with from_pretrained, "
                    "and with fasq.load(..., verify=False)", path)
    try:
        fasq_manifest.write(path, fasq_manifest.build(path))
    except (FileNotFoundError, FormatError) as e:
        (path / MANIFEST_NAME).unlink(missing_ok=True)  # a stale manifest would describe files that are gone
        log.warning("%s: save_pretrained wrote weights fasq.load cannot find (%s); from_pretrained loads it, "
                    "fasq.load does not (use fasq.save)", path, e)


def register() -> None:
    """Add fasq to transformers' quant_method tables (idempotent)."""
    # Looked up afresh: the hook also fires when the tables module is imported a second time.
    hf_auto = importlib.import_module(_HF_TABLES)
    entries = ((hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, FasqHfConfig, hf_auto.register_quantization_config),
               (hf_auto.AUTO_QUANTIZER_MAPPING, FasqHfQuantizer, hf_auto.register_quantizer))
    for table, cls, add in entries:
        have = table.get(QUANT_METHOD)
        if have is cls:
            continue
        if have is not None and (have.__module__, have.__qualname__) == (cls.__module__, cls.__qualname__):
            table[QUANT_METHOD] = cls   # this module was reloaded: replace our older class
            continue
        add(QUANT_METHOD)(cls)          # raises if another library already took the name "fasq"


# The tables loaded while this module was importing (see _fasq_hook.register_or_warn): register now.
if _HF_TABLES in sys.modules:
    register()
