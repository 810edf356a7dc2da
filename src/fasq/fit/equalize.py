"""Data-free function-preserving transforms applied before quantization.

Product quantization minimizes the Frobenius error of each weight, but what matters is the error of
the layer's *output*, ``E||dW x||^2``, which weighs each input column by the power of its input
channel.  Without calibration data we can still know part of that power from the weights themselves:

* ``norms``: the RMSNorm gain ``g`` in front of q/k/v and gate/up multiplies input channel i by
  ``g_i``.  Folding it into the next linears (``W <- W diag(g)``, gain <- 1) is exact and makes the
  Frobenius error of the folded weight the output error for unit-power normalized inputs.
* ``full``: ``norms`` plus channel balancing across the two exact rescalings of a decoder block:
  - MLP: channel i of down_proj's input is ``act(g_i . h) * (u_i . h)``.  For ``h ~ N(0, I)`` (the
    normalized, gain-folded hidden state) its RMS is ``a_i = rms(act(N(0, |g_i|^2))) * |u_i|``.
    Scaling up_proj's row i by ``1/a_i`` and down_proj's column i by ``a_i`` is exact; up_proj's
    per-row scales absorb the row factor, so only down_proj's error metric changes (to the right one).
  - attention: o_proj's input channels are attention-weighted values, of power ~ ``|v_j|^2``; v_proj
    rows and the o_proj columns that read them are rescaled the same way.

Everything here is exact in real arithmetic; logits change only by float rounding.  Which modules are a
model's blocks, norms and projections (and whether a norm scales by ``w`` or ``1 + w``) comes from its entry
in :mod:`fasq.families`; the names above are the Llama ones.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..families import GENERIC, Family, family_of

log = logging.getLogger(__name__)

MODES = ("none", "norms", "balance", "full")


def _gain(norm: nn.Module, family: Family = GENERIC) -> tuple[torch.Tensor, float] | None:
    """(effective gain, identity value of the weight) for an RMSNorm, or None if unsupported."""
    w = getattr(norm, "weight", None)
    if w is None or w.dim() != 1:
        return None
    if family.norm_plus_one(norm):      # Gemma's RMSNorm multiplies by (1 + weight)
        return 1.0 + w.detach().float(), 0.0
    return w.detach().float(), 1.0


def _linears(parent: nn.Module, names) -> list[nn.Linear]:
    out = []
    for n in names:
        m = getattr(parent, n, None)
        if isinstance(m, nn.Linear):
            out.append(m)
    return out


@torch.no_grad()
def fold_norm(norm: nn.Module, linears: list[nn.Linear], family: Family = GENERIC) -> bool:
    g = _gain(norm, family)
    if g is None or not linears:
        return False
    gain, ident = g
    if any(lin.in_features != gain.numel() for lin in linears):
        return False
    for lin in linears:
        lin.weight.mul_(gain.to(lin.weight.dtype)[None, :])
    norm.weight.fill_(ident)
    return True


def _act_rms(act: nn.Module, sigma: torch.Tensor) -> torch.Tensor:
    """RMS of act(z) for z ~ N(0, sigma^2), by Gauss-Hermite-like quadrature on a fixed grid."""
    z = torch.linspace(-6, 6, 241)
    pdf = torch.exp(-0.5 * z * z)
    pdf = pdf / pdf.sum()
    vals = act(sigma[:, None] * z[None, :]).pow(2)          # [n, 241]
    return (vals * pdf).sum(1).sqrt()


def _geo_normalize(a: torch.Tensor) -> torch.Tensor:
    a = a.clamp_min(a.max() * 1e-4 + 1e-30)
    return a / torch.exp(torch.log(a).mean())


@torch.no_grad()
def balance_mlp(mlp: nn.Module, gain: torch.Tensor | None = None, family: Family = GENERIC) -> bool:
    """``gain``: the (unfolded) RMSNorm gain in front of gate/up, if it was not folded."""
    gate, up, down = (getattr(mlp, n, None) for n in (family.gate, family.up, family.down))
    act = getattr(mlp, family.activation, None)
    if not all(isinstance(m, nn.Linear) for m in (gate, up, down)) or act is None:
        return False
    gw, uw = gate.weight.float(), up.weight.float()
    if gain is not None and gain.numel() == gw.shape[1]:
        gw, uw = gw * gain[None, :], uw * gain[None, :]
    a = _act_rms(act, gw.norm(dim=1)) * uw.norm(dim=1)
    a = _geo_normalize(a)
    up.weight.div_(a[:, None].to(up.weight.dtype))
    if up.bias is not None:
        up.bias.div_(a.to(up.bias.dtype))
    down.weight.mul_(a[None, :].to(down.weight.dtype))
    return True


@torch.no_grad()
def balance_attention(attn: nn.Module, config, gain: torch.Tensor | None = None,
                      family: Family = GENERIC) -> bool:
    v, o = getattr(attn, family.value, None), getattr(attn, family.output, None)
    if not (isinstance(v, nn.Linear) and isinstance(o, nn.Linear)):
        return False
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // n_heads if n_heads else None)
    if not n_heads or not head_dim or v.out_features != n_kv * head_dim or o.in_features != n_heads * head_dim:
        return False
    vw = v.weight.float()
    if gain is not None and gain.numel() == vw.shape[1]:
        vw = vw * gain[None, :]
    b = _geo_normalize(vw.norm(dim=1))                                    # [n_kv * head_dim]
    v.weight.div_(b[:, None].to(v.weight.dtype))
    if v.bias is not None:
        v.bias.div_(b.to(v.bias.dtype))
    # o_proj column (head h, dim t) reads kv head h // (n_heads / n_kv), dim t
    group = n_heads // n_kv
    col = torch.arange(n_heads * head_dim)
    kv_row = (col // head_dim) // group * head_dim + col % head_dim
    o.weight.mul_(b[kv_row][None, :].to(o.weight.dtype))
    return True


@torch.no_grad()
def equalize(model: nn.Module, mode: str) -> dict:
    """Apply the data-free transforms of ``mode`` in place; returns counts of what was done.

    The decoder blocks, their norms and projections are those of ``model``'s entry in
    :mod:`fasq.families`; a block with a norm the entry does not place raises
    :class:`fasq.families.UnknownLayoutError` before anything is changed."""
    if mode not in MODES:
        raise ValueError(f"equalize={mode!r}: allowed are {MODES}")
    done = {"norms_folded": 0, "mlp_balanced": 0, "attention_balanced": 0}
    if mode == "none":
        return done
    cfg = getattr(model, "config", None)
    fam = family_of(model)
    for _, blk in list(fam.blocks(model)):   # list: every block is checked before any is changed
        attn, mlp = getattr(blk, fam.attention), getattr(blk, fam.mlp)
        attn_norm, mlp_norm = getattr(blk, fam.attention_norm), getattr(blk, fam.mlp_norm)
        g_attn = g_mlp = None
        if mode in ("norms", "full"):
            done["norms_folded"] += fold_norm(attn_norm, _linears(attn, fam.attention_inputs), fam)
            done["norms_folded"] += fold_norm(mlp_norm, _linears(mlp, fam.mlp_inputs), fam)
        else:  # balance without folding: the gains still shape the channel power estimates
            g_attn = (_gain(attn_norm, fam) or (None,))[0]
            g_mlp = (_gain(mlp_norm, fam) or (None,))[0]
        if mode in ("balance", "full"):
            done["mlp_balanced"] += balance_mlp(mlp, g_mlp, fam)
            if cfg is not None:
                done["attention_balanced"] += balance_attention(attn, cfg, g_attn, fam)
    log.info("equalize(%s, %s): %s", mode, fam.name, done)
    return done
