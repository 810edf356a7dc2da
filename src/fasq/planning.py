"""What quantizing a model will do, decided from its architecture alone: the one plan that both the
in-memory path (:func:`fasq.model.quantize`) and the streaming path (:func:`fasq.stream.plan.build_plan`,
on a skeleton model on the meta device) carry out, so that the two cannot drift apart.

A plan holds the model's family (:mod:`fasq.families`), the linears to quantize (every ``nn.Linear`` not
skipped), the config of each (a size target's allocation, :mod:`fasq.fit.allocate`, with the caller's
``layer_configs`` winning), each one's stored layout (:class:`fasq.format.LayerSpec`), and the decoder
blocks that :func:`fasq.fit.equalize.equalize` will transform.  Nothing here reads a weight's values:
the plan depends on shapes and names only, so it is the same before and after equalization, and on the
meta device as on a loaded model.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from .config import FASQConfig
from .families import Family, family_of
from .fit.allocate import allocate
from .fit.equalize import MODES as EQUALIZE_MODES
from .fit.pq import planned_spec
from .format import FORMAT_VERSION, LayerSpec


class NoLayersError(ValueError):
    """Every linear layer of the model is skipped: there is nothing to quantize."""


def is_skipped(name: str, patterns: Iterable[str]) -> bool:
    """A module is kept unquantized when a pattern matches its full name or its last component."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) or name == p for p in patterns)


def quantizable_linears(model: nn.Module, config: FASQConfig) -> list[tuple[str, nn.Linear]]:
    """Every plain ``nn.Linear`` of ``model`` that neither ``config.skip_modules`` nor the family's
    ``skip`` keeps unquantized, in module order."""
    skip = (*config.skip_modules, *family_of(model).skip)
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not is_skipped(n, skip)]


@dataclass(frozen=True)
class LayerPlan:
    name: str
    linear: nn.Linear          # on the meta device in a streaming plan
    config: FASQConfig         # the global config, or this layer's own (allocation, layer_configs)
    spec: LayerSpec            # what fasq.fit.pq.quantize_weight will store for it


@dataclass
class QuantPlan:
    config: FASQConfig
    family: Family
    layers: list[LayerPlan]
    layer_configs: dict[str, FASQConfig]       # per-layer configs that differ from ``config``'s
    allocation: dict | None = None             # the size target that chose them, recorded in the config
    blocks: list[tuple[str, nn.Module]] = field(default_factory=list)  # (name, block) equalize transforms

    @property
    def targets(self) -> list[tuple[str, nn.Linear]]:
        return [(lp.name, lp.linear) for lp in self.layers]

    def quantization_config(self, modules: dict[str, dict] | None = None) -> dict:
        """The ``quantization_config`` record; ``modules`` (name -> LayerSpec dict) defaults to the plan's."""
        if modules is None:
            modules = {lp.name: lp.spec.to_dict() for lp in self.layers}
        return quantization_record(self.config, modules, self.allocation)


def quantization_record(config: FASQConfig, modules: dict[str, dict], allocation: dict | None = None) -> dict:
    """What a quantized model's ``config.json`` stores as ``quantization_config``."""
    qc = config.to_dict()
    qc["format_version"] = FORMAT_VERSION
    qc["modules"] = modules
    if allocation:
        qc["allocation"] = allocation
    return qc


def equalize_blocks(model: nn.Module, mode: str) -> list[tuple[str, nn.Module]]:
    """(name, block) of each decoder block that :func:`fasq.fit.equalize.equalize` transforms in ``mode``
    (none for "none"); raises :class:`fasq.families.UnknownLayoutError` for a block it cannot place."""
    if mode not in EQUALIZE_MODES:
        raise ValueError(f"equalize={mode!r}: allowed are {EQUALIZE_MODES}")
    if mode == "none":
        return []
    return list(family_of(model).blocks(model))


def plan_quantization(model: nn.Module, config: FASQConfig, layer_configs: dict[str, FASQConfig] | None = None,
                      target_bits: float | None = None, target_fraction: float | None = None) -> QuantPlan:
    """The plan for quantizing ``model`` with ``config`` (the global config's ``equalize`` applies to every
    block).  ``target_bits`` / ``target_fraction`` choose per-layer settings (:func:`fasq.fit.allocate.allocate`);
    ``layer_configs`` given by the caller win and must name quantized linears."""
    arch = type(model).__name__
    targets = quantizable_linears(model, config)
    if not targets:
        raise NoLayersError("no nn.Linear layers to quantize (all skipped by skip_modules="
                            f"{config.skip_modules}?)")
    layer_configs, allocation = allocate(model, targets, config, target_bits, target_fraction,
                                         dict(layer_configs or {}))
    unknown = sorted(set(layer_configs) - {n for n, _ in targets})
    if unknown:
        raise ValueError(f"layer_configs names modules that are not quantized linears of {arch}: {unknown[:5]}")
    layers = []
    for name, lin in targets:
        cfg = layer_configs.get(name, config)
        layers.append(LayerPlan(name, lin, cfg, planned_spec(lin.out_features, lin.in_features, cfg,
                                                             lin.bias is not None)))
    return QuantPlan(config, family_of(model), layers, layer_configs, allocation,
                     equalize_blocks(model, config.equalize))
