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

* ``power``: ``balance`` after scaling the input columns of q/k/v and gate/up by ``s_i = p_i ** (1/4)``
  (``p_i ** (POWER_EXPONENT / 2)``), where ``p_i`` is a data-free estimate of input channel i's power, and
  dividing the norm gain in front of them by ``s`` (exact).  The Frobenius error the quantizer minimizes then
  weighs column i by ``s_i^2 = sqrt(p_i)``: half-way (in the log) between the weight error and the output
  error for inputs of power ``p``.  ``p`` comes from :class:`ResidualPower`, a model of the residual
  stream's per-channel power built from the weights alone: the embedding table's mean square per channel,
  then per block what the attention and the MLP add, each through the squared rows of o_proj / down_proj
  (the MLP's inner power as ``balance`` estimates it), normalized by the post-norm gains where the family has
  post-norms (Gemma 2/3), and finally the input norm's gain.  Where the family has those post-norms the model
  also tracks the stream's mean, which finds the MLP units that are on for every token, and down_proj's
  columns then weigh their estimated input power ``** POWER_EXPONENT`` too.  docs/experiments.md (eighth and
  ninth rounds) measures it on SmolLM2 and Gemma-3-270M.
* ``sampled``: ``power`` with every power (q/k/v and gate/up inputs, and down_proj's inputs on every family)
  measured on text the model samples from its own start token instead of estimated from the weights
  (:mod:`fasq.fit.samples`: no data is read; the model first runs for a few thousand tokens).

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

MODES = ("none", "norms", "balance", "full", "power", "sampled")
POWER_MODES = ("power", "sampled")   # the modes that scale input columns by a channel power

# ``power``: columns weigh p ** POWER_EXPONENT in the fitted error (0: the weight error, 1: the output error
# for inputs of the estimated power p).  0.5 was best of 0.25 / 0.5 / 1 on both models (docs/experiments.md).
POWER_EXPONENT = 0.5
EMBEDDING_ROWS = 16384    # rows of the embedding table summed at a time by embedding_power


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
    if any(lin.in_features != gain.numel() for lin in linears) or getattr(norm, "bias", None) is not None:
        return False   # a norm's bias (LayerNorm) would need dividing by the gain, which may be 0
    for lin in linears:
        lin.weight.mul_(gain.to(lin.weight.dtype)[None, :])
    norm.weight.fill_(ident)
    return True


# The quadrature grid of _act_rms and _act_moments: z on [-6, 6] and the standard normal's weights there.
_Z = torch.linspace(-6, 6, 241)
_PDF = torch.exp(-0.5 * _Z * _Z) / torch.exp(-0.5 * _Z * _Z).sum()


def _act_rms(act: nn.Module, sigma: torch.Tensor) -> torch.Tensor:
    """RMS of act(z) for z ~ N(0, sigma^2), by Gauss-Hermite-like quadrature on a fixed grid."""
    vals = act(sigma[:, None] * _Z[None, :]).pow(2)          # [n, 241]
    return (vals * _PDF).sum(1).sqrt()


def _geo_normalize(a: torch.Tensor) -> torch.Tensor:
    a = a.clamp_min(a.max() * 1e-4 + 1e-30)
    return a / torch.exp(torch.log(a).mean())


@torch.no_grad()
def balance_mlp(mlp: nn.Module, gain: torch.Tensor | None = None, family: Family = GENERIC,
                inner: torch.Tensor | None = None) -> bool:
    """Rescale up_proj's rows by ``1/a`` and down_proj's columns by ``a`` (exact), ``a`` the estimated RMS of each
    unit: down_proj's Frobenius error then weighs column i by its input's power.  ``gain``: the (unfolded)
    RMSNorm gain in front of gate/up, if it was not folded (the estimate takes unit-power inputs times the gain).
    ``inner``: the second moment of down_proj's inputs from :class:`ResidualPower` (``equalize="power"`` where it
    tracks the stream's mean); then column i weighs ``inner_i ** POWER_EXPONENT``, as the power-scaled columns of
    q/k/v and gate/up do."""
    gate, up, down = (getattr(mlp, n, None) for n in (family.gate, family.up, family.down))
    act = getattr(mlp, family.activation, None)
    if not all(isinstance(m, nn.Linear) for m in (gate, up, down)) or act is None:
        return False
    gw, uw = gate.weight.float(), up.weight.float()
    if gain is not None and gain.numel() == gw.shape[1]:
        gw, uw = gw * gain[None, :], uw * gain[None, :]
    if inner is not None and inner.numel() == down.in_features:
        a = inner.float().clamp_min(0).pow(POWER_EXPONENT / 2)
    else:
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
    layout = _head_layout(config)
    if layout is None:
        return False
    n_heads, n_kv, head_dim = layout
    if v.out_features != n_kv * head_dim or o.in_features != n_heads * head_dim:
        return False
    vw = v.weight.float()
    if gain is not None and gain.numel() == vw.shape[1]:
        vw = vw * gain[None, :]
    b = _geo_normalize(vw.norm(dim=1))                                    # [n_kv * head_dim]
    v.weight.div_(b[:, None].to(v.weight.dtype))
    if v.bias is not None:
        v.bias.div_(b.to(v.bias.dtype))
    o.weight.mul_(b[_kv_row(n_heads, n_kv, head_dim)][None, :].to(o.weight.dtype))
    return True


def _head_layout(config) -> tuple[int, int, int] | None:
    """(attention heads, key/value heads, head dim) from a model config, or None where it does not say."""
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // n_heads if n_heads else None)
    return (n_heads, n_kv, head_dim) if n_heads and head_dim else None


def _kv_row(n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """For each o_proj input column, the v_proj row it reads: column (head h, dim t) reads kv head
    h // (n_heads / n_kv), dim t."""
    col = torch.arange(n_heads * head_dim)
    return (col // head_dim) // (n_heads // n_kv) * head_dim + col % head_dim


@torch.no_grad()
def embedding_power(weight: torch.Tensor, embed_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean square, mean) of each column of an embedding table ``[vocab, hidden]`` (any dtype), times
    ``embed_scale^2`` / ``embed_scale``: the residual stream's moments at its start when every token is equally
    likely."""
    rows = weight.shape[0]
    return power_of_row_blocks((weight[i:i + EMBEDDING_ROWS] for i in range(0, rows, EMBEDDING_ROWS)), rows,
                               embed_scale)


@torch.no_grad()
def power_of_row_blocks(blocks, rows: int, embed_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`embedding_power` from the table's consecutive blocks of :data:`EMBEDDING_ROWS` rows (a streaming
    run reads them from disk): fp32 sums in this order, so the same values give the same result."""
    sq = tot = None
    for b in blocks:
        b = b.float()
        part, first = b.pow(2).sum(0), b.sum(0)
        sq, tot = (part, first) if sq is None else (sq + part, tot + first)
    es = float(embed_scale)
    return sq / rows * es ** 2, tot / rows * es


def _act_moments(act: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[act(z)], E[act(z)^2]) for z ~ N(mean, std^2), elementwise, by quadrature on a fixed grid (rows in
    chunks, so an 8B model's 14336 units need no large temporary)."""
    m1, m2 = [], []
    for i in range(0, mean.numel(), 4096):
        v = act(mean[i:i + 4096, None] + std[i:i + 4096, None] * _Z[None, :])
        m1.append(v @ _PDF)
        m2.append(v.pow(2) @ _PDF)
    return torch.cat(m1), torch.cat(m2)


class ResidualPower:
    """Data-free per-channel moments of the residual stream, advanced one decoder block at a time.

    The stream is modelled as independent Gaussian channels with a mean (``mu``) and a second moment (``p``):
    a large part of a decoder's residual stream is one direction that every token shares, and the MLP units
    that read it are "always on" (their inputs to down_proj are 10-60x the median unit's on Gemma-3-270M), which
    a zero-mean model cannot see.  Norms divide both moments by the stream's RMS and multiply by the gain;
    the attention passes the values' mean through (an average of values keeps it) and their variance
    (not reduced by the averaging); the MLP's units are ``act(g . x) * (u . x)`` with g . x and u . x
    Gaussian and independent of each other; each block's outputs add to the stream.

    The mean is tracked only where the family normalizes each block's outputs before the residual add
    (``Family.has_output_norms``: Gemma 2/3), which holds every block's contribution at its gain's scale.
    Without those norms (Llama, SmolLM2) the modelled mean runs away, because the massive activations of
    such models are carried by a few tokens, not by every token: on SmolLM2 the estimated units reach
    1000-23000x the median unit (measured: 4-61x) and the quantized model collapses (docs/experiments.md,
    ninth round); there the mean is zero, which is the zero-mean model of earlier versions, estimate for
    estimate, and balance keeps its own unit estimate (``inner`` is None).

    ``step(block)`` returns (second moment of the attention projections' inputs, of gate/up's inputs, each a
    ``[hidden]`` vector normalized to mean 1 before the norm gain; second moment of down_proj's inputs
    ``[intermediate]``, or None where the mean is not tracked), and adds the block's two outputs to the stream.
    Reads only the block's weights, so a streaming run can call it block by block."""

    def __init__(self, start: tuple[torch.Tensor, torch.Tensor], config, family: Family):
        self.p, self.mu = (t.float().clone() for t in start)
        self.fam = family
        self.tracks_mean = family.has_output_norms
        if not self.tracks_mean:
            self.mu.zero_()
        layout = _head_layout(config)
        if layout is None:
            raise ValueError("equalize='power': the model config does not give its attention heads")
        self.kv_row = _kv_row(*layout)   # the v_proj row each o_proj input column reads

    def _input(self, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(second moment, mean) after the norm: the stream divided by its RMS, times the gain."""
        gain = _gain(norm, self.fam)
        g = gain[0] if gain is not None else torch.ones_like(self.p)
        ms = self.p.mean().clamp_min(1e-30)
        return self.p / ms * g.pow(2), self.mu / ms.sqrt() * g

    def _add(self, block: nn.Module, post_norm: str | None, power: torch.Tensor, mean: torch.Tensor) -> None:
        norm = getattr(block, post_norm, None) if post_norm else None
        gain = _gain(norm, self.fam) if norm is not None else None
        if gain is not None:   # the post-norm rescales the output to unit mean square, then multiplies by its gain
            rms = power.mean().clamp_min(1e-30).sqrt()
            power, mean = gain[0].pow(2) * power / rms.pow(2), gain[0] * mean / rms
        self.p = self.p + power + 2 * self.mu * mean
        self.mu = self.mu + mean

    @torch.no_grad()
    def unit_moments(self, mlp: nn.Module, p_in: torch.Tensor,
                     mu_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, second moment) of the MLP's units, down_proj's inputs, when gate/up read inputs of second moment
        ``p_in`` and mean ``mu_in``; zero-mean arithmetic where the mean is not tracked."""
        fam = self.fam
        var = (p_in - mu_in.pow(2)).clamp_min(0)
        gate, up = (getattr(mlp, n).weight.float() for n in (fam.gate, fam.up))
        act, std = getattr(mlp, fam.activation), (gate.pow(2) @ var).sqrt()
        if self.tracks_mean:
            a1, a2 = _act_moments(act, gate @ mu_in, std)
        else:   # zero mean: the same arithmetic as the zero-mean model of earlier versions (same estimates)
            a1, a2 = torch.zeros_like(std), _act_rms(act, std).pow(2)
        u_mean = up @ mu_in
        return a1 * u_mean, a2 * (u_mean.pow(2) + up.pow(2) @ var)

    @torch.no_grad()
    def step(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        fam = self.fam
        attn, mlp = getattr(block, fam.attention), getattr(block, fam.mlp)
        p_attn, mu_attn = self._input(getattr(block, fam.attention_norm))
        v, o = getattr(attn, fam.value).weight.float(), getattr(attn, fam.output).weight.float()
        v_mean, v_var = v @ mu_attn, v.pow(2) @ (p_attn - mu_attn.pow(2)).clamp_min(0)
        o_mean = o @ v_mean[self.kv_row]
        self._add(block, fam.attention_output_norm, o_mean.pow(2) + o.pow(2) @ v_var[self.kv_row], o_mean)
        p_mlp, mu_mlp = self._input(getattr(block, fam.mlp_norm))
        inner_mean, inner = self.unit_moments(mlp, p_mlp, mu_mlp)
        down = getattr(mlp, fam.down).weight.float()
        d_mean = down @ inner_mean
        self._add(block, fam.mlp_output_norm, d_mean.pow(2) + down.pow(2) @ (inner - inner_mean.pow(2)).clamp_min(0),
                  d_mean)
        return p_attn, p_mlp, inner if self.tracks_mean else None


def block_input_powers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """:class:`ResidualPower` over every decoder block of ``model``, from its input embedding table."""
    from ..embedding import embed_scale_of

    fam = family_of(model)
    emb = model.get_input_embeddings()
    res = ResidualPower(embedding_power(emb.weight, embed_scale_of(emb)), model.config, fam)
    return [res.step(blk) for _, blk in list(fam.blocks(model))]


@torch.no_grad()
def scale_inputs(norm: nn.Module, linears: list[nn.Linear], power: torch.Tensor, family: Family = GENERIC) -> bool:
    """Multiply the linears' input columns by ``s = power ** (POWER_EXPONENT / 2)`` (geometric mean 1) and
    divide the norm's gain (and bias) by ``s``: exact, and the linears' Frobenius error then weighs column i by
    s_i^2."""
    g = _gain(norm, family)
    if g is None or not linears or any(lin.in_features != power.numel() for lin in linears):
        return False
    gain, ident = g
    s = power.float().clamp_min(float(power.max()) * 1e-8 + 1e-30).pow(POWER_EXPONENT / 2)
    s = s / torch.exp(s.log().mean())
    norm.weight.copy_((gain / s - (1.0 - ident)).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:   # LayerNorm: x_hat * w + b, all of it divided by s
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return True


@torch.no_grad()
def equalize(model: nn.Module, mode: str,
             powers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None) -> dict:
    """Apply the data-free transforms of ``mode`` in place; returns counts of what was done.

    The decoder blocks, their norms and projections are those of ``model``'s entry in
    :mod:`fasq.families`; a block with a norm the entry does not place raises
    :class:`fasq.families.UnknownLayoutError` before anything is changed.  ``powers`` (mode ``power``):
    each block's (attention input power, MLP input power, MLP unit power or None), as :func:`block_input_powers`
    gives it for the whole
    model (a streaming run computes them block by block and equalizes one block at a time)."""
    if mode not in MODES:
        raise ValueError(f"equalize={mode!r}: allowed are {MODES}")
    done = {"norms_folded": 0, "inputs_scaled": 0, "mlp_balanced": 0, "attention_balanced": 0}
    if mode == "none":
        return done
    cfg = getattr(model, "config", None)
    fam = family_of(model)
    blocks = list(fam.blocks(model))   # list: every block is checked before any is changed
    if mode == "power" and powers is None:
        powers = block_input_powers(model)
    if mode == "sampled" and powers is None:
        from .samples import sampled_powers
        powers = sampled_powers(model)
    if mode in POWER_MODES and len(powers) != len(blocks):
        raise ValueError(f"equalize={mode!r}: {len(powers)} power estimates for {len(blocks)} decoder blocks")
    for i, (_, blk) in enumerate(blocks):
        attn, mlp = getattr(blk, fam.attention), getattr(blk, fam.mlp)
        attn_norm, mlp_norm = getattr(blk, fam.attention_norm), getattr(blk, fam.mlp_norm)
        g_attn = g_mlp = None
        if mode in POWER_MODES:
            done["inputs_scaled"] += scale_inputs(attn_norm, _linears(attn, fam.attention_inputs), powers[i][0], fam)
            done["inputs_scaled"] += scale_inputs(mlp_norm, _linears(mlp, fam.mlp_inputs), powers[i][1], fam)
        if mode in ("norms", "full"):
            done["norms_folded"] += fold_norm(attn_norm, _linears(attn, fam.attention_inputs), fam)
            done["norms_folded"] += fold_norm(mlp_norm, _linears(mlp, fam.mlp_inputs), fam)
        else:  # balance without folding: the gains still shape the channel power estimates
            g_attn = (_gain(attn_norm, fam) or (None,))[0]
            g_mlp = (_gain(mlp_norm, fam) or (None,))[0]
        if mode in ("balance", "full") + POWER_MODES:
            done["mlp_balanced"] += balance_mlp(mlp, g_mlp, fam, powers[i][2] if mode in POWER_MODES else None)
            if cfg is not None:
                done["attention_balanced"] += balance_attention(attn, cfg, g_attn, fam)
    log.info("equalize(%s, %s): %s", mode, fam.name, done)
    return done
