"""One table of the model families fasq knows: where a family keeps its decoder blocks, projections and
norms, how its norms scale, which modules stay unquantized, and how the size planner ranks its layers.

Everything that depends on a family's layout reads :data:`FAMILIES` (through :func:`family_of`):
:mod:`fasq.fit.equalize` (block walk, norm folding, channel balancing), :mod:`fasq.fit.allocate` (layer
type priority), :mod:`fasq.planning` (skipped modules, the blocks a streaming run equalizes) and the
``skip_modules`` default of :class:`fasq.FASQConfig`.  Adding an architecture is one entry here
(docs/architecture.md says what each field means).

A model is matched by its Hugging Face ``config.model_type``; a model no entry names gets :data:`GENERIC`,
the Llama layout with today's norm detection by class name.  Whatever the entry, a decoder block with a
norm the entry does not place (e.g. Gemma 2/3's pre-/post-feedforward norms under the generic entry) is
refused with :class:`UnknownLayoutError` when equalizing, instead of being equalized wrongly; a layer with the
block's four children whose attention or MLP holds other projections than the entry's (Phi-3's fused
``qkv_proj``, a mixture-of-experts MLP, Starcoder2's ``c_fc``) is not a block the entry can equalize, so it is
left as it is (:meth:`Family.unmatched_blocks`; equalizing it would not be exact) and quantized all the same.

Pure Python on purpose (no torch import): :mod:`fasq.config` reads it at import.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

NORM_KINDS = ("rms", "rms_plus_one", "by_class_name")

# The size planner's type order, most sensitive first: the literature's order (v_proj, down_proj, o_proj,
# then the rest), see fasq.fit.allocate.
LLAMA_PRIORITY = ("v_proj", "down_proj", "o_proj", "k_proj", "q_proj", "up_proj", "gate_proj")
# Menu steps above the base that a type may take beyond the usual one (fasq.fit.allocate caps them at
# EXTRA_STEP_MAX_K).  v_proj: on SmolLM2 at 3.25 bits, K=256 and then K=512 instead of 128 for every v_proj
# (3% of the weights; the rest of the budget to down_proj) lowered perplexity for each seed measured
# (docs/experiments.md rows 46-47); a seed-swap test found v_proj the type whose quantization noise costs
# the most.  (At 4.25 bits the usual step already gives v_proj K=512; row 48 measured K=1024 there.)
LLAMA_EXTRA_STEPS = (("v_proj", 2),)


class UnknownLayoutError(ValueError):
    """A decoder block holds a norm that its family entry does not place: equalizing it could be wrong."""


@dataclass(frozen=True)
class Family:
    """Where one family of decoder-only models keeps what fasq touches.  Names are attribute names (a
    block's child, an attention's or MLP's child) or, for ``head``/``embedding``/``skip``, module-name
    patterns as :func:`fasq.planning.is_skipped` matches them."""

    name: str
    model_types: tuple[str, ...]                  # Hugging Face config.model_type values of this family
    # A decoder block is a module with these four children (the block walk).
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_norm: str = "input_layernorm"       # the norm whose output feeds the attention projections
    mlp_norm: str = "post_attention_layernorm"    # the norm whose output feeds the MLP's gate and up
    other_norms: tuple[str, ...] = ()             # norms of a block that feed no projection (left alone)
    attention_output_norm: str | None = None      # of other_norms: the one normalizing the attention's output
    mlp_output_norm: str | None = None            # ... and the MLP's (Gemma 2/3), before the residual add
    # Projection groups: the linears reading one norm's output, and the exact rescaling pairs.
    attention_inputs: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # children of `attention`
    value: str = "v_proj"                         # value rows and the output columns that read them
    output: str = "o_proj"
    gate: str = "gate_proj"                       # children of `mlp`: down(act(gate x) * up x)
    up: str = "up_proj"
    down: str = "down_proj"
    activation: str = "act_fn"                    # the MLP's activation module (its RMS weighs down's columns)
    norm_kind: str = "rms"                        # "rms": x / rms(x) * w; "rms_plus_one": x / rms(x) * (1 + w);
                                                  # "by_class_name": the generic entry's (Gemma's norms name themselves)
    # Embeddings: the input table and the output head (tied when config.tie_word_embeddings).
    embedding: str = "embed_tokens"
    head: str = "lm_head"
    skip: tuple[str, ...] = ()                    # always unquantized here, besides config.skip_modules
    # Size planner: layer types, most sensitive first, and extra menu steps a type may take.
    priority: tuple[str, ...] = LLAMA_PRIORITY
    extra_steps: tuple[tuple[str, int], ...] = LLAMA_EXTRA_STEPS  # (layer type, steps) pairs

    def __post_init__(self) -> None:
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"Family {self.name!r}: norm_kind={self.norm_kind!r}, allowed are {NORM_KINDS}")
        if self.mlp_norm == self.attention_norm or {self.attention_norm, self.mlp_norm} & set(self.other_norms):
            raise ValueError(f"Family {self.name!r}: attention_norm, mlp_norm and other_norms must differ")
        for field_name in ("attention_output_norm", "mlp_output_norm"):
            norm = getattr(self, field_name)
            if norm is not None and norm not in self.other_norms:
                raise ValueError(f"Family {self.name!r}: {field_name}={norm!r} must be one of other_norms")

    @property
    def mlp_inputs(self) -> tuple[str, ...]:
        """The MLP's linears that read ``mlp_norm``'s output."""
        return (self.gate, self.up)

    @property
    def block_norms(self) -> tuple[str, ...]:
        return (self.attention_norm, self.mlp_norm, *self.other_norms)

    def extra_steps_of(self, layer_type: str) -> int:
        return dict(self.extra_steps).get(layer_type, 0)

    def replace(self, **changes) -> "Family":
        return dataclasses.replace(self, **changes)

    # -- the block walk --------------------------------------------------------------------------------
    def has_block_children(self, module) -> bool:
        return all(hasattr(module, a) for a in (self.attention, self.mlp, self.attention_norm, self.mlp_norm))

    def is_block(self, module) -> bool:
        """A decoder block in this entry's layout: the four children, the attention's projections exactly
        ``attention_inputs`` and ``output``, the MLP's exactly ``gate``, ``up`` and ``down`` (and its activation)."""
        if not self.has_block_children(module):
            return False
        attn, mlp = getattr(module, self.attention), getattr(module, self.mlp)
        return (_projections(attn) == {*self.attention_inputs, self.output} and self.value in self.attention_inputs
                and _projections(mlp) == {self.gate, self.up, self.down} and hasattr(mlp, self.activation))

    def unmatched_blocks(self, model) -> list[str]:
        """The layers with a block's four children whose projections are not this entry's layout (not equalized)."""
        return [name for name, m in model.named_modules() if self.has_block_children(m) and not self.is_block(m)]

    def blocks(self, model) -> Iterator[tuple[str, object]]:
        """(name, block) for each decoder block of ``model``, in module order.  Raises
        :class:`UnknownLayoutError` for a block with a norm child this entry does not place."""
        for name, m in model.named_modules():
            if self.is_block(m):
                self.check_block(name, m)
                yield name, m

    def check_block(self, name: str, block) -> None:
        known = set(self.block_norms)
        unplaced = sorted(n for n, child in block.named_children()
                          if n not in known and "norm" in type(child).__name__.lower())
        if unplaced:
            raise UnknownLayoutError(
                f"decoder block {name or '<root>'!r} ({type(block).__name__}) has norm(s) {unplaced} that the "
                f"{self.name!r} entry of fasq.families does not place (it knows {list(self.block_norms)}); "
                "equalizing would not be exact. Add this model's family to fasq.families.FAMILIES "
                "(docs/architecture.md) or quantize with equalize='none'")

    @property
    def has_output_norms(self) -> bool:
        """Whether each block normalizes its attention and MLP outputs before the residual add (Gemma 2/3)."""
        return self.attention_output_norm is not None and self.mlp_output_norm is not None

    def norm_plus_one(self, norm) -> bool:
        """Whether ``norm`` multiplies by (1 + weight) (Gemma) rather than by weight."""
        if self.norm_kind == "by_class_name":   # the generic entry: Gemma's norms name themselves
            return "gemma" in type(norm).__name__.lower()
        return self.norm_kind == "rms_plus_one"


def _projections(module) -> set[str]:
    """The names of ``module``'s children that are linear layers (nn.Linear, a PQLinear: an ``in_features``)."""
    return {n for n, c in module.named_children() if hasattr(c, "in_features") and hasattr(c, "out_features")}


# ------------------------------------------------------------------------------------------------------
# The table.  One entry per layout; a new model_type with an existing layout is one more string.
LLAMA = Family("llama", ("llama", "mistral", "qwen2", "qwen3"))
GEMMA = Family("gemma", ("gemma",), norm_kind="rms_plus_one")
# Gemma 2 and 3: post_attention_layernorm normalizes the attention's *output*; the MLP reads
# pre_feedforward_layernorm, and post_feedforward_layernorm normalizes the MLP's output.
GEMMA3 = Family("gemma3", ("gemma2", "gemma3_text"), mlp_norm="pre_feedforward_layernorm",
                other_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_kind="rms_plus_one",
                attention_output_norm="post_attention_layernorm", mlp_output_norm="post_feedforward_layernorm")
FAMILIES: tuple[Family, ...] = (LLAMA, GEMMA, GEMMA3)

# Any other model: the Llama layout; blocks with other norms are refused (UnknownLayoutError).
GENERIC = Family("generic", (), norm_kind="by_class_name")

# FASQConfig.skip_modules' default: every family's embeddings and head stay at 16 bits.
DEFAULT_SKIP_MODULES: tuple[str, ...] = tuple(dict.fromkeys(
    p for f in (GENERIC, *FAMILIES) for p in (f.head, f.embedding)))


def _by_model_type() -> dict[str, Family]:
    out: dict[str, Family] = {}
    for f in FAMILIES:
        for t in f.model_types:
            if t in out:
                raise ValueError(f"model_type {t!r} is in two fasq.families entries: {out[t].name}, {f.name}")
            out[t] = f
    return out


_BY_MODEL_TYPE = _by_model_type()


def family_for(model_type: str | None) -> Family:
    """The entry naming ``model_type``, else :data:`GENERIC`."""
    return _BY_MODEL_TYPE.get(model_type, GENERIC) if model_type else GENERIC


def family_of(model) -> Family:
    """The entry for ``model`` (anything with ``.config.model_type``, e.g. a transformers model, or the
    holder a streaming run equalizes one block in), else :data:`GENERIC`."""
    return family_for(getattr(getattr(model, "config", None), "model_type", None))
