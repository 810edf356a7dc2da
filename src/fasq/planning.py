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
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from .config import FASQConfig
from .families import Family, family_of
from .fit.allocate import allocate
from .fit.equalize import MODES as EQUALIZE_MODES
from .fit.pq import planned_spec
from .format import FORMAT_VERSION, LayerSpec
from .nn import PQLinear

log = logging.getLogger(__name__)

# nn.Linear subclasses whose forward is F.linear(x, weight, bias) (so a PQLinear computes what they do).
PLAIN_LINEAR_SUBCLASSES = ("FalconLinear",)


class NoLayersError(ValueError):
    """Every linear layer of the model is skipped: there is nothing to quantize."""


def is_skipped(name: str, patterns: Iterable[str]) -> bool:
    """A module is kept unquantized when a pattern matches its full name or its last component."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) or name == p for p in patterns)


def quantizable_linears(model: nn.Module, config: FASQConfig) -> list[tuple[str, nn.Linear]]:
    """Every plain ``nn.Linear`` of ``model`` that neither ``config.skip_modules`` nor the family's
    ``skip`` keeps unquantized, in module order; with ``config.quantize_embeddings`` the output head too."""
    skip = (*config.skip_modules, *family_of(model).skip)
    head = model.get_output_embeddings() if config.quantize_embeddings and hasattr(model, "get_output_embeddings") \
        else None
    return [(n, m) for n, m in model.named_modules()
            if _plain_linear(m) and (m is head or not is_skipped(n, skip))]


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (isinstance(m, nn.Linear) and type(m).__name__ in PLAIN_LINEAR_SUBCLASSES)


def _no_layers(model: nn.Module, config: FASQConfig, what: str) -> NoLayersError:
    """The error for a model with nothing to quantize, naming the layer types it has instead."""
    others = Counter(type(m).__name__ for m in model.modules() if not _plain_linear(m)
                     and not isinstance(m, nn.Embedding) and getattr(getattr(m, "weight", None), "ndim", 0) == 2)
    found = ", ".join(f"{n} ({k})" for n, k in others.most_common(4)) or "none"
    return NoLayersError(f"{type(model).__name__}: no nn.Linear layers to quantize {what} (skip_modules="
                         f"{config.skip_modules}); fasq quantizes torch.nn.Linear layers, and this model's other "
                         f"layers with a matrix are: {found}")


@dataclass(frozen=True)
class LayerPlan:
    name: str
    linear: nn.Linear          # on the meta device in a streaming plan
    config: FASQConfig         # the global config, or this layer's own (allocation, layer_configs)
    spec: LayerSpec            # what fasq.fit.pq.quantize_weight will store for it
    table: bool = False        # the output head quantized as an embedding table: fit in blocks of rows


@dataclass(frozen=True)
class EmbeddingPlan:
    """The token embedding's table, quantized with ``config.embedding_config()``.  Tied to the head: the head's
    LayerPlan fits the one table and the embedding reads it (``tied_head`` names it); untied: the table is
    fit on its own under ``name``."""
    name: str
    module: nn.Module           # the model's embedding module (meta device in a streaming plan)
    config: FASQConfig
    spec: LayerSpec
    tied_head: str | None

    def record(self) -> dict:
        """What ``quantization_config["embeddings"][name]`` stores (docs/format.md)."""
        return {**self.spec.to_dict(), **({"tied_head": self.tied_head} if self.tied_head else {})}


def embedding_targets(model: nn.Module) -> tuple[tuple[str, nn.Module], tuple[str, nn.Linear] | None, bool]:
    """((name, embedding), (name, head) or None, tied) of ``model`` as transformers exposes them."""
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or id(emb) not in names or not hasattr(emb, "weight"):
        raise ValueError(f"quantize_embeddings: {type(model).__name__} has no token embedding with a weight "
                         "(get_input_embeddings)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or id(head) not in names:
        return (names[id(emb)], emb), None, False
    return (names[id(emb)], emb), (names[id(head)], head), head.weight is emb.weight


@dataclass
class QuantPlan:
    config: FASQConfig
    family: Family
    layers: list[LayerPlan]
    layer_configs: dict[str, FASQConfig]       # per-layer configs that differ from ``config``'s
    allocation: dict | None = None             # the size target that chose them, recorded in the config
    blocks: list[tuple[str, nn.Module]] = field(default_factory=list)  # (name, block) equalize transforms
    embedding: EmbeddingPlan | None = None     # with config.quantize_embeddings

    @property
    def targets(self) -> list[tuple[str, nn.Linear]]:
        return [(lp.name, lp.linear) for lp in self.layers]

    def quantization_config(self, modules: dict[str, dict] | None = None) -> dict:
        """The ``quantization_config`` record; ``modules`` (name -> LayerSpec dict) defaults to the plan's."""
        if modules is None:
            modules = {lp.name: lp.spec.to_dict() for lp in self.layers}
        embeddings = {self.embedding.name: self.embedding.record()} if self.embedding else None
        return quantization_record(self.config, modules, self.allocation, embeddings)


def quantization_record(config: FASQConfig, modules: dict[str, dict], allocation: dict | None = None,
                        embeddings: dict[str, dict] | None = None) -> dict:
    """What a quantized model's ``config.json`` stores as ``quantization_config``.  The format version is the
    oldest that describes the model: 2 only with quantized embeddings, so other models stay readable by
    fasq versions that read only version 1."""
    qc = config.to_dict()
    qc["format_version"] = FORMAT_VERSION if embeddings else 1
    qc["modules"] = modules
    if embeddings:
        qc["embeddings"] = embeddings
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
    fam = family_of(model)
    unmatched = fam.unmatched_blocks(model)
    if unmatched:
        log.warning("equalize=%s: %d decoder layer(s) of %s (e.g. %s) hold other projections than the %r layout of "
                    "fasq.families: they are quantized without equalization (add the layout there to equalize "
                    "them)", mode, len(unmatched), type(model).__name__, unmatched[0], fam.name)
    return list(fam.blocks(model))


def _warn_unquantized(model: nn.Module, config: FASQConfig, targets: list[tuple[str, nn.Linear]]) -> None:
    """Warn where a large share of the model's matrices is in layers fasq does not quantize (not skipped on
    purpose, not embeddings): e.g. a mixture-of-experts block that keeps its experts as one 3-D parameter."""
    skip = (*config.skip_modules, *family_of(model).skip)
    quantized = {id(lin.weight) for _, lin in targets}
    left: Counter = Counter()
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) or (name and is_skipped(name, skip)):
            continue
        for p in m.parameters(recurse=False):
            if p.ndim >= 2 and id(p) not in quantized:
                left[type(m).__name__] += p.numel()
    done = sum(lin.weight.numel() for _, lin in targets)
    if sum(left.values()) > 0.1 * done:
        what = ", ".join(f"{n} ({k / 1e6:.1f}M weights)" for n, k in left.most_common(3))
        log.warning("%s: %.0f%% of its matrix weights are in layers fasq does not quantize (only nn.Linear is): %s; "
                    "they stay as they are, so the model shrinks less than the bits/weight of its linears say",
                    type(model).__name__, 100 * sum(left.values()) / (sum(left.values()) + done), what)


def plan_quantization(model: nn.Module, config: FASQConfig, layer_configs: dict[str, FASQConfig] | None = None,
                      target_bits: float | None = None, target_fraction: float | None = None) -> QuantPlan:
    """The plan for quantizing ``model`` with ``config`` (the global config's ``equalize`` applies to every
    block).  ``target_bits`` / ``target_fraction`` choose per-layer settings (:func:`fasq.fit.allocate.allocate`);
    ``layer_configs`` given by the caller win and must name quantized linears."""
    arch = type(model).__name__
    targets = quantizable_linears(model, config)
    if not targets:
        raise _no_layers(model, config, "")
    emb_plan, head, fixed = _embedding_plan(model, config)
    body = [t for t in targets if head is None or t[0] != head[0]]
    if not body and not any(isinstance(m, PQLinear) for m in model.modules()):   # (a quantized body: the table only)
        raise _no_layers(model, config, "besides the output head")
    _warn_unquantized(model, config, targets)
    layer_configs, allocation = allocate(model, body, config, target_bits, target_fraction,
                                         dict(layer_configs or {}), fixed_bytes=fixed)
    if head is not None:   # the head takes the embedding's settings, never the planner's
        targets = body + [head]
        layer_configs[head[0]] = config.embedding_config()
    unknown = sorted(set(layer_configs) - {n for n, _ in targets})
    if unknown:
        raise ValueError(f"layer_configs names modules that are not quantized linears of {arch}: {unknown[:5]}")
    layers = []
    for name, lin in targets:
        cfg = layer_configs.get(name, config)
        layers.append(LayerPlan(name, lin, cfg, planned_spec(lin.out_features, lin.in_features, cfg,
                                                             lin.bias is not None),
                                table=head is not None and name == head[0]))
    return QuantPlan(config, family_of(model), layers, layer_configs, allocation,
                     equalize_blocks(model, config.equalize), emb_plan)


def _embedding_plan(model: nn.Module, config: FASQConfig):
    """(EmbeddingPlan, (head name, head) to quantize with the embedding's settings, {parameter id: stored bytes}
    of the tables for the size planner); (None, None, {}) without ``config.quantize_embeddings``."""
    if not config.quantize_embeddings:
        return None, None, {}
    (ename, emb), head, tied = embedding_targets(model)
    ecfg = config.embedding_config()
    vocab, hidden = emb.weight.shape
    spec = planned_spec(vocab, hidden, ecfg, False)
    plan = EmbeddingPlan(ename, emb, ecfg, spec, head[0] if tied else None)
    fixed = {id(emb.weight): spec.storage_bytes()}
    if head is not None and not tied:
        hspec = planned_spec(head[1].out_features, head[1].in_features, ecfg, head[1].bias is not None)
        fixed[id(head[1].weight)] = hspec.weight_storage_bytes()
    return plan, head, fixed
