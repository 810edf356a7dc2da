"""Flexible size: choose per-layer (d, K) so that the model lands on a target size.

Targets are either bits per weight of the quantized layers (``--bits 3.6``) or the whole model's size
as a fraction of FP16 (``--target-size 0.35``).  The menu is ``d = 2`` with ``K = 2^b`` (b = 2..16:
1 to 8 code bits per weight in steps of 0.5) at the config's group size; the planner takes the
richest menu point every layer can afford and then, in a fixed, data-free priority order (layer types
that the literature finds most sensitive first: v_proj, down_proj, o_proj, then the rest; within a
type, earlier decoder layers first), moves layers one menu step up while the budget allows; v_proj
layers, the most sensitive and among the smallest, may move up to three steps, but not past
K = EXTRA_STEP_MAX_K (TYPE_EXTRA_STEPS).  Sizes are computed
exactly with :class:`fasq.format.LayerSpec`, so the result lands within a fraction of a percent.
"""
from __future__ import annotations

import logging
import re

from torch import nn

from ..config import FASQConfig
from .pq import planned_spec

log = logging.getLogger(__name__)

TYPE_PRIORITY = ("v_proj", "down_proj", "o_proj", "k_proj", "q_proj", "up_proj", "gate_proj")
# Menu steps above the base that a type may take beyond the usual one, and the largest K such an
# extra step may reach.  v_proj: on SmolLM2 at 3.25 bits, K=256 and then K=512 instead of 128 for every
# v_proj (3% of the weights; the rest of the budget to down_proj) lowered perplexity for each seed
# measured (docs/experiments.md rows 46-47); a seed-swap test found v_proj the type whose quantization
# noise costs the most.  The cap keeps 9-bit codes at most, which the fast CPU kernels take (at
# 4.25 bits the usual step already gives v_proj K=512; row 48 measured K=1024 there).
TYPE_EXTRA_STEPS = {"v_proj": 2}
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


def _priority(name: str) -> tuple:
    last = _type(name)
    t = TYPE_PRIORITY.index(last) if last in TYPE_PRIORITY else len(TYPE_PRIORITY)
    m = re.search(r"\.(\d+)\.", name)
    return (t, int(m.group(1)) if m else 0, name)


def plan(layers: list[tuple[str, nn.Linear]], config: FASQConfig, target_bits: float) -> dict[str, FASQConfig]:
    """Per-layer configs whose exact bits/weight over ``layers`` is as close to ``target_bits`` as the
    menu allows without exceeding it (when the target is reachable)."""
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
    for name, lin in sorted(layers, key=lambda x: _priority(x[0])):
        top = min(len(options) - 1, i + 1 + TYPE_EXTRA_STEPS.get(_type(name), 0))
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
             layer_configs: dict[str, FASQConfig]) -> tuple[dict[str, FASQConfig], dict | None]:
    """Per-layer configs for a size target (``layer_configs`` given by the caller win) and the
    ``allocation`` record for ``quantization_config``; with no explicit target, the config's own
    ``target_bits`` (presets set one) applies, and is skipped with a warning where it is out of reach
    (e.g. layers so small that the codebooks alone exceed it)."""
    if target_bits is not None and target_fraction is not None:
        raise ValueError("give target_bits or target_fraction, not both")
    from_config = target_bits is None and target_fraction is None
    if from_config:
        target_bits = config.target_bits
        if target_bits is None:
            return layer_configs, None
    bits = target_bits if target_bits is not None else target_bits_for_fraction(model, layers, target_fraction)
    try:
        planned = plan(layers, config, bits)
    except TargetOutOfRange as e:
        if not from_config:
            raise
        log.warning("%s; quantizing every layer with the config's own settings instead", e)
        return layer_configs, None
    return {**planned, **layer_configs}, {"target_bits": target_bits, "target_fraction": target_fraction,
                                          "planned_bits": bits}


def target_bits_for_fraction(model: nn.Module, layers: list[tuple[str, nn.Linear]], fraction: float) -> float:
    """Bits/weight of the quantized layers that make the whole model ``fraction`` of its FP16 size
    (everything not quantized stays at 16 bits; tied tensors counted once)."""
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
            other += 2 * t.numel()
    n_weights = sum(lin.in_features * lin.out_features for _, lin in layers)
    bits = 8.0 * (fraction * fp16_total - other) / n_weights
    if bits <= 0:
        raise ValueError(f"target size {fraction:.3f} of FP16 is below the unquantized tensors alone "
                         f"({other / fp16_total:.3f} of FP16)")
    return bits
