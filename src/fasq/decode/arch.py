"""What the lean decode path needs to know of a model: one :class:`Arch` per supported ``config.model_type``,
the check that a loaded model is one it serves (else the reason, for the one log line of the fall-back), and
the per-block view (:class:`Block`) the engine walks.

Module names come from :mod:`fasq.families` (the one table of layouts); what only a forward pass needs
(q/k norms, norms on the attention's and the MLP's outputs, the activation, sliding windows) is here.
Everything the engine computes outside the linear layers is read from the model itself: norm weights,
RoPE inverse frequencies (the model's rotary module's buffers, so a RoPE variant computes what the model
computes), eps and scaling from its config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..families import family_of


@dataclass(frozen=True)
class Arch:
    """A decoder layout the lean path computes: ``x += post_attn(attn(attn_norm(x)))``,
    ``x += post_mlp(down(act(gate(h)) * up(h)))`` with ``h = mlp_norm(x)``."""

    model_types: tuple[str, ...]
    plus_one: bool = False                       # RMSNorm multiplies by (1 + w) (Gemma)
    qk_norm: bool = False                        # per-head RMSNorm of q and k before RoPE (Gemma 3, Qwen 3)
    post_attention_norm: str | None = None       # a norm of the attention's output (Gemma 2/3)
    post_mlp_norm: str | None = None             # a norm of the MLP's output
    activations: tuple[str, ...] = ("silu",)     # config activation names it computes
    act_key: str = "hidden_act"                  # where the config names the activation


LLAMA = Arch(("llama",))
GEMMA3 = Arch(("gemma3_text",), plus_one=True, qk_norm=True, post_attention_norm="post_attention_layernorm",
              post_mlp_norm="post_feedforward_layernorm", activations=("gelu_pytorch_tanh",),
              act_key="hidden_activation")
ARCHS: dict[str, Arch] = {t: a for a in (LLAMA, GEMMA3) for t in a.model_types}
ROPE_TYPES = ("default", "linear", "llama3")     # static inverse frequencies (no length-dependent update)


def _rope_params(config) -> dict:
    """{layer_type or None: rope parameters}: Gemma 3 keeps one set per layer type."""
    rp = getattr(config, "rope_parameters", None) or {}
    if all(isinstance(v, dict) for v in rp.values()) and rp:
        return dict(rp)
    return {None: rp}


def unsupported_reason(model: nn.Module) -> str | None:
    """None when :class:`fasq.decode.LeanDecoder` computes ``model`` exactly as transformers does, else why not."""
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        return f"model_type {mt!r} (supported: {sorted(ARCHS)})"
    arch = ARCHS[mt]
    act = getattr(config, arch.act_key, None)
    if act not in arch.activations:
        return f"{arch.act_key}={act!r} (supported: {arch.activations})"
    for key in ("attn_logit_softcapping",):
        if getattr(config, key, None) is not None:
            return f"{key}={getattr(config, key)}"
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention=True"
    for lt, p in _rope_params(config).items():
        if (p or {}).get("rope_type", "default") not in ROPE_TYPES:
            return f"rope_type {p.get('rope_type')!r} (supported: {ROPE_TYPES})"
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices != {"cpu"}:
        return f"devices {sorted(devices)} (the lean path is for the CPU)"
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()} - {torch.float32}
    if dtypes:   # the residual stream is fp32: an nn.Linear of another dtype could not take it
        return f"parameters in {sorted(map(str, dtypes))} (the lean path computes in fp32)"
    if getattr(model, "lm_head", None) is None or getattr(getattr(model, "model", None), "layers", None) is None:
        return "no model.lm_head / model.model.layers"
    return None


@dataclass
class Block:
    """One decoder block, as the engine calls it (modules are called, never unpacked into weights, so
    any linear class — nn.Linear, PQLinear, a quantized head's class — serves)."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    attn_norm: torch.Tensor                      # [D] fp32, (1 + w) folded in where the arch says so
    mlp_norm: torch.Tensor                       # [D]
    post_attn_norm: torch.Tensor | None          # [D]
    post_mlp_norm: torch.Tensor | None           # [D]
    q_norm: torch.Tensor | None                  # [head_dim]
    k_norm: torch.Tensor | None                  # [head_dim]
    rope: str | None                             # key of the RoPE table (layer type; None: the only one)
    window: int | None                           # sliding window (keys at distance < window), or None


def norm_weight(norm: nn.Module, plus_one: bool) -> torch.Tensor:
    w = norm.weight.detach().float()
    return (1.0 + w) if plus_one else w.clone()


def blocks_of(model: nn.Module) -> list[Block]:
    config, fam = model.config, family_of(model)
    arch = ARCHS[config.model_type]
    layer_types = getattr(config, "layer_types", None)
    per_type = None not in _rope_params(config)     # Gemma 3: one RoPE table per layer type
    out = []
    for i, blk in enumerate(model.model.layers):
        att, mlp = getattr(blk, fam.attention), getattr(blk, fam.mlp)
        lt = layer_types[i] if layer_types else None
        nw = lambda name: norm_weight(getattr(blk, name), arch.plus_one) if name else None   # noqa: E731
        out.append(Block(
            q=att.q_proj, k=att.k_proj, v=getattr(att, fam.value), o=getattr(att, fam.output),
            gate=getattr(mlp, fam.gate), up=getattr(mlp, fam.up), down=getattr(mlp, fam.down),
            attn_norm=nw(fam.attention_norm), mlp_norm=nw(fam.mlp_norm),
            post_attn_norm=nw(arch.post_attention_norm), post_mlp_norm=nw(arch.post_mlp_norm),
            q_norm=norm_weight(att.q_norm, arch.plus_one) if arch.qk_norm else None,
            k_norm=norm_weight(att.k_norm, arch.plus_one) if arch.qk_norm else None,
            rope=lt if per_type else None,
            window=getattr(config, "sliding_window", None) if lt == "sliding_attention" else None))
    return out


def rope_tables(model: nn.Module, max_len: int) -> dict:
    """{key: (cos, sin_signed)} [max_len, head_dim] fp32, as the model's rotary module computes cos/sin
    (its own inverse frequencies and attention scaling).  ``sin_signed`` = cat(-sin[:h/2], sin[h/2:]), so
    that rotate_half(x) * sin = roll(x, h/2) * sin_signed: one roll instead of two slices, a neg and a cat."""
    rot = model.model.rotary_emb
    keys = list(_rope_params(model.config))
    pos = torch.arange(max_len, dtype=torch.float32)
    out = {}
    for key in keys:
        suffix = f"{key}_" if key is not None else ""
        inv_freq = getattr(rot, f"{suffix}inv_freq").float()
        scaling = float(getattr(rot, f"{suffix}attention_scaling", getattr(rot, "attention_scaling", 1.0)))
        freqs = pos[:, None] * inv_freq[None, :]                  # [max_len, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)                   # [max_len, hd]
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        half = sin.shape[-1] // 2
        out[key] = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
    return out
