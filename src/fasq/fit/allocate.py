"""Flexible size: choose per-layer (d, K) so that the model lands on a target size.

Targets are either bits per weight of the quantized layers (``--bits 3.6``) or the whole model's size
as a fraction of FP16 (``--target-size 0.35``).  The menu is ``d = 2`` with ``K = 2^b`` (b = 2..16:
1 to 8 code bits per weight in steps of 0.5) at the config's group size; the planner takes the
richest menu point every layer can afford and then, in a fixed, data-free priority order (layer types
that the literature finds most sensitive first: v_proj, down_proj, o_proj, then the rest; within a
type, earlier decoder layers first), moves layers one menu step up while the budget allows; v_proj
layers, the most sensitive and among the smallest, may move up to three steps, but not past
K = EXTRA_STEP_MAX_K.  The type order and the extra steps are the model family's ``priority`` and
``extra_steps`` (:mod:`fasq.families`).  Sizes are computed
exactly with :class:`fasq.format.LayerSpec`, so the result lands within a fraction of a percent.
"""
from __future__ import annotations

import logging
import re

from torch import nn

from ..config import FASQConfig
from ..families import GENERIC, Family, family_of
from .pq import planned_spec

log = logging.getLogger(__name__)

# The largest K an extra menu step (a family's extra_steps, fasq.families) may reach: 9-bit codes at most,
# which the fast CPU kernels take.
EXTRA_STEP_MAX_K = 512


def menu(config: FASQConfig) -> list[FASQConfig]:
    """Candidate settings, cheapest first."""
    return [config.replace(subvector_dim=2, codebook_size=2 ** b, num_codebooks=1,
                           group_size=config.group_size if config.group_size % 2 == 0 else 0)
            for b in range(2, 17)]


def layer_bytes(lin: nn.Linear, cfg: FASQConfig) -> int:
    return planned_spec(lin.out_features, lin.in_features, cfg, lin.bias is not None).weight_storage_bytes()


def _type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _priority(name: str, family: Family = GENERIC) -> tuple:
    last = _type(name)
    order = family.priority
    t = order.index(last) if last in order else len(order)
    m = re.search(r"\.(\d+)\.", name)
    return (t, int(m.group(1)) if m else 0, name)


def plan(layers: list[tuple[str, nn.Linear]], config: FASQConfig, target_bits: float,
         family: Family = GENERIC) -> dict[str, FASQConfig]:
    """Per-layer configs whose exact bits/weight over ``layers`` is as close to ``target_bits`` as the
    menu allows without exceeding it (when the target is reachable); ``family`` ranks the layer types."""
    if not layers:
        raise ValueError("plan: no layers to allocate")
    n_weights = sum(lin.in_features * lin.out_features for _, lin in layers)
    budget = target_bits * n_weights / 8.0
    options = menu(config)
    cost = [sum(layer_bytes(lin, c) for _, lin in layers) for c in options]
    lo_bits, hi_bits = 8 * cost[0] / n_weights, 8 * cost[-1] / n_weights
    if not lo_bits <= target_bits <= hi_bits:
        raise TargetOutOfRange(f"target of {target_bits:.3f} bits/weight is outside what fasq can reach for "
                               f"this model ({lo_bits:.3f} to {hi_bits:.3f})")
    i = max(j for j in range(len(options)) if cost[j] <= budget)
    lo = options[i]
    result = {name: lo for name, _ in layers}
    spent = cost[i]
    for name, lin in sorted(layers, key=lambda x: _priority(x[0], family)):
        top = min(len(options) - 1, i + 1 + family.extra_steps_of(_type(name)))
        while top > i + 1 and options[top].codebook_size > EXTRA_STEP_MAX_K:
            top -= 1
        for j in range(top, i, -1):  # the richest step that fits
            extra = layer_bytes(lin, options[j]) - layer_bytes(lin, lo)
            if spent + extra <= budget:
                result[name] = options[j]
                spent += extra
                break
    return result


class TargetOutOfRange(ValueError):
    """The size target cannot be reached with the menu of settings for these layers."""


def allocate(model: nn.Module, layers: list[tuple[str, nn.Linear]], config: FASQConfig,
             target_bits: float | None, target_fraction: float | None,
             layer_configs: dict[str, FASQConfig], fixed_bytes: dict[int, int] | None = None
             ) -> tuple[dict[str, FASQConfig], dict | None]:
    """Per-layer configs for a size target (``layer_configs`` given by the caller win) and the
    ``allocation`` record for ``quantization_config``; with no explicit target, the config's own
    ``target_bits`` (presets set one) applies, and is skipped with a warning where it is out of reach
    (e.g. layers so small that the codebooks alone exceed it).

    ``config.size_scope == "model"``: ``target_bits`` are bits per weight of the whole model (every parameter,
    tied ones once), i.e. ``target_bits / 16`` of its FP16 size.  ``fixed_bytes`` ({parameter id: stored bytes})
    are tensors quantized outside ``layers`` (the embedding tables): a whole-model target counts them at
    that size instead of 16 bits."""
    if target_bits is not None and target_fraction is not None:
        raise ValueError("give target_bits or target_fraction, not both")
    from_config = target_bits is None and target_fraction is None
    if from_config:
        target_bits = config.target_bits
        if target_bits is None:
            return layer_configs, None
    fraction = target_fraction
    if target_bits is not None and config.size_scope == "model":
        fraction = target_bits / 16.0
    bits = target_bits if fraction is None else target_bits_for_fraction(model, layers, fraction, fixed_bytes)
    try:
        planned = plan(layers, config, bits, family_of(model))
    except TargetOutOfRange as e:
        if not from_config:
            raise
        log.warning("%s; quantizing every layer with the config's own settings instead", e)
        return layer_configs, None
    record = {"target_bits": target_bits, "target_fraction": target_fraction, "planned_bits": bits}
    if config.size_scope != "linears":
        record["size_scope"] = config.size_scope
    return {**planned, **layer_configs}, record


def target_bits_for_fraction(model: nn.Module, layers: list[tuple[str, nn.Linear]], fraction: float,
                             fixed_bytes: dict[int, int] | None = None) -> float:
    """Bits/weight of the quantized layers that make the whole model ``fraction`` of its FP16 size
    (everything not quantized stays at 16 bits, or takes its ``fixed_bytes`` entry; tied tensors counted once)."""
    fixed_bytes = fixed_bytes or {}
    if not 0 < fraction < 1:
        raise ValueError(f"target size {fraction}: must be a fraction of the FP16 size between 0 and 1")
    qnames = {id(lin.weight) for _, lin in layers}
    seen, fp16_total, other = set(), 0, 0
    for t in list(model.parameters()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        fp16_total += 2 * t.numel()
        if id(t) not in qnames:
            other += fixed_bytes.get(id(t), 2 * t.numel())
    n_weights = sum(lin.in_features * lin.out_features for _, lin in layers)
    bits = 8.0 * (fraction * fp16_total - other) / n_weights
    if bits <= 0:
        raise ValueError(f"target size {fraction:.3f} of FP16 is below the unquantized tensors alone "
                         f"({other / fp16_total:.3f} of FP16)")
    return bits
