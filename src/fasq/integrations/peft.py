"""PEFT adapter: LoRA on fasq models (``get_peft_model(model, LoraConfig(...))``, the HF ``Trainer``).

PEFT builds a LoRA layer around each target module through a list of dispatchers, one per layer type it
knows (``nn.Linear``, bitsandbytes, HQQ, GPTQ, ...), and refuses any other type.  :func:`register` puts
:func:`dispatch_fasq` first in that list (it wraps ``LoraModel._create_new_module``): a ``PQLinear``
target becomes a :class:`PQLoraLinear`, everything else goes to PEFT's own dispatchers unchanged.  It
also wraps ``LoraModel._replace_module``, which looks for the old module's weight to place the adapter
(PEFT's ``LoraConfig._register_custom_module`` would need that call on every config, and still fails
there).
``_fasq_hook`` runs :func:`register` when PEFT imports ``peft.tuners.lora.model`` (or at once if it has),
so no call is needed.

The quantized weight stays frozen (it is buffers, not parameters); the adapters train.  Gradients reach
the layer's input through ``PQLinear``'s backward (``fasq.nn``), which dequantizes the weight with the
reference.  Merging an adapter into a PQ weight would need re-quantizing it, so ``merge`` raises, and
so do LoRA variants that read the base weight (DoRA and the others).
"""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Optional

from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from ..nn import PQLinear

_LORA_MODEL = "peft.tuners.lora.model"


class PQLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` around a ``PQLinear``: ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``."""

    def __init__(self, base_layer, adapter_name: str, config, **kwargs):
        if config.lora_bias:
            raise ValueError(f"{type(self).__name__}: lora_bias=True is not supported on fasq's PQLinear")
        if config.fan_in_fan_out:
            raise ValueError(f"{type(self).__name__}: fan_in_fan_out=True does not apply to PQLinear "
                             "(its weight is stored [out, in] like nn.Linear's)")
        with warnings.catch_warnings():   # PEFT warns of any layer type it does not know; this one it now does
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"{type(self).__name__}: LoRA variants ({type(variant).__name__}) read the base "
                             "weight, which PQLinear stores quantized; only plain LoRA is supported")
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError("merging a LoRA adapter into fasq's PQLinear would need re-quantizing its "
                                  "weight; keep the adapter unmerged (it runs as a side branch), or dequantize "
                                  "first (model.dequantize() on a model loaded with from_pretrained)")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} never merges")


def dispatch_fasq(target, adapter_name: str, config, **kwargs):
    """PEFT dispatcher: a :class:`PQLoraLinear` for a ``PQLinear`` target, None for anything else."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, PQLinear):
        return PQLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def register() -> None:
    """Put :func:`dispatch_fasq` before PEFT's LoRA dispatchers (idempotent)."""
    # Looked up in sys.modules first: inside the hook, the peft.tuners.lora package is still importing.
    cls = (sys.modules.get(_LORA_MODEL) or importlib.import_module(_LORA_MODEL)).LoraModel
    create, replace = cls._create_new_module, cls._replace_module      # a staticmethod, a method
    if getattr(create, "_fasq_wrapped", None) is not None:
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = dispatch_fasq(target, adapter_name, config=lora_config, **kwargs)
        return new if new is not None else create(lora_config, adapter_name, target, **kwargs)

    def _replace_module(self, parent, child_name, new_module, child):
        # PEFT's own finds the device to put the adapter on from the old module's weight or first
        # parameter, and a PQLinear has neither (its tensors are buffers).
        if not isinstance(getattr(child, "base_layer", child), PQLinear):
            return replace(self, parent, child_name, new_module, child)
        setattr(parent, child_name, new_module)
        device = getattr(child, "base_layer", child).codes.device
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                module.to(device)

    _create_new_module._fasq_wrapped = create
    _replace_module._fasq_wrapped = replace
    cls._create_new_module = staticmethod(_create_new_module)
    cls._replace_module = _replace_module


# PEFT loaded while this module was importing (see _fasq_hook.register_or_warn): register now.
if _LORA_MODEL in sys.modules:
    register()
