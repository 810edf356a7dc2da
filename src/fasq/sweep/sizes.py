"""One size accounting for every method: the bytes each quantized layer stores, everything else at 16 bits.

* bits/weight = 8 * (stored bytes of the quantized layers, bias excluded) / (their weight count).  The
  stored bytes are every tensor in the layer's ``state_dict`` as its library saves it: packed codes or
  ints, codebooks, scales, zeros, group indices, and the small metadata tensors some libraries keep.
* % of FP16 = (those bytes + every other tensor at 16 bits, tied tensors once) / (the model at FP16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class SizePlan:
    """Measured on the unquantized model: the FP16 size and the shape of every linear layer."""

    fp16_bytes: int
    linears: dict[str, tuple[int, int]]   # name -> (out_features, in_features)


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of the model stored at FP16: persistent floating tensors, tied ones counted once."""
    nonpersistent: set[int] = set()
    for mod in model.modules():
        for bname in getattr(mod, "_non_persistent_buffers_set", ()):
            b = mod._buffers.get(bname)
            if b is not None:
                nonpersistent.add(id(b))
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in nonpersistent or not t.is_floating_point() or t.numel() == 0:
            continue
        ptr = id(t) if t.is_meta else t.data_ptr()   # tied tensors share storage (or are one Parameter)
        if ptr in seen:
            continue
        seen.add(ptr)
        total += 2 * t.numel()
    return total


def size_plan(model: nn.Module) -> SizePlan:
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return SizePlan(fp16_bytes(model), linears)


def module_stored_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes per state_dict entry of one quantized module (bias excluded: it is counted at 16 bits)."""
    out: dict[str, int] = {}
    for key, t in module.state_dict().items():
        if key == "bias" or key.endswith(".bias") or not isinstance(t, torch.Tensor):
            continue
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def stored_size(plan: SizePlan, modules: Iterable[tuple[str, nn.Module]],
                tables: Iterable[tuple[str, nn.Module]] = ()) -> dict:
    """Size report of a quantized model from its quantized modules (name, module) and the plan.

    ``tables``: quantized embedding / head tables (modules with a ``spec``: fasq's PQEmbedding or head), stored
    in place of their 16-bit tensors: they count in the total and % of FP16, not in bits/weight."""
    q_bytes = q_weights = 0
    breakdown: dict[str, int] = {}
    names = []
    for name, mod in modules:
        if name not in plan.linears:
            raise ValueError(f"quantized module {name!r} is not a linear layer of the original model")
        out_f, in_f = plan.linears[name]
        per = module_stored_bytes(mod)
        for k, v in per.items():
            breakdown[k] = breakdown.get(k, 0) + v
        q_bytes += sum(per.values())
        q_weights += out_f * in_f
        names.append(name)
    if not q_weights:
        raise ValueError("no quantized modules found: nothing to account")
    t_bytes = t_weights = 0
    for name, mod in tables:
        t_bytes += sum(module_stored_bytes(mod).values())
        t_weights += mod.spec.out_features * mod.spec.in_features
    other = plan.fp16_bytes - 2 * q_weights - 2 * t_weights + t_bytes
    total = q_bytes + other
    return {
        "quantized_layers": len(names),
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "bits_per_weight": 8.0 * q_bytes / q_weights,
        "other_bytes": other,
        "total_bytes": total,
        "fp16_bytes": plan.fp16_bytes,
        "fraction_of_fp16": total / plan.fp16_bytes,
        "table_bytes": t_bytes,
        "table_weights": t_weights,
        "stored_tensors": dict(sorted(breakdown.items())),
        "unquantized_linears": sorted(set(plan.linears) - set(names)),
    }


def unquantized_size(plan: SizePlan) -> dict:
    """The original model, stored at FP16."""
    q_weights = sum(o * i for o, i in plan.linears.values())
    return {"quantized_layers": 0, "quantized_weights": 0, "quantized_bytes": 0, "bits_per_weight": 16.0,
            "other_bytes": plan.fp16_bytes, "total_bytes": plan.fp16_bytes, "fp16_bytes": plan.fp16_bytes,
            "fraction_of_fp16": 1.0, "stored_tensors": {}, "linear_weights": q_weights,
            "unquantized_linears": sorted(plan.linears)}
