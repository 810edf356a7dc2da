"""The lean decode path: a static-KV-cache forward of a whole decoder, written for one sequence on the CPU.

transformers' forward costs a 1-token step far more than its matrix products on a 135M-270M model: per
block it builds masks, position embeddings and cache objects, transposes and concatenates, and calls
``scaled_dot_product_attention`` (~200 us per call for one query on this machine).  Here a step is the
arithmetic alone, as few torch calls as it takes, and every linear layer is called as a module (a
``PQLinear`` answers through its C++ plan, the head and the embedding through whatever class they are).

Per block (x [S, D], S tokens at positions p0..p0+S-1; H query heads of hd, KV heads, G = H / KV):

    h = rms(x) * w                               q = rope(q(h)) * scale, k = rope(k(h)), v = v(h)
    K[:, p0:p0+S], V[:, p0:p0+S] = k, v          o = softmax(q K^T) V over keys p0+S-window .. p0+S-1
    x += post(o_proj(o)) ; x += post(down(act(gate(h')) * up(h')))   with h' = rms(x) * w'

One token goes through the C++ glue of ``lean_cpu.cpp`` (norms, RoPE, cache write and attention in three
calls per block; without that build, the same in torch ops); a prompt (S > 1) goes through torch ops and
``scaled_dot_product_attention`` with a causal (and sliding-window) mask, its linears through the kernels'
matrix-matrix path.  Only the last position's logits are computed unless asked for all.  Norm weights and
RoPE tables are copied when the decoder is built: build a new one after changing the model's weights.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import PQLinear
from .arch import ARCHS, blocks_of, norm_weight, rope_tables, unsupported_reason

log = logging.getLogger(__name__)

ENGINES = ("auto", "lean", "transformers")
# A prompt of at least this many tokens runs its PQ layers on bf16 activations where the CPU has AMX-BF16:
# the kernels' TILED method then dequantizes to a bf16 tile and multiplies with oneDNN's AMX GEMM (the C++
# switches at kTiled16MinTokens = 20, where the bf16 GEMM starts to beat fp32; docs/kernels_cpu.md).  One
# SmolLM2 block's seven layers at 512 tokens, --preset 4bit, 1 thread: 44.8 ms fp32, 6.6 ms bf16 (load 14,
# 2026-12-06).  Norms, RoPE, attention, the residual stream and the head stay fp32; decode steps are fp32.
PREFILL16_MIN_TOKENS = 20


def default_prefill_dtype() -> torch.dtype | None:
    """bf16 where the CPU multiplies it in AMX tiles, else None (fp32 throughout)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return None
    return torch.bfloat16 if " amx_bf16" in flags else None


class LeanDecoder:
    """Greedy decoding of ``model`` (a transformers causal LM of a supported family, on the CPU) with a
    static KV cache of ``max_len`` positions.

        dec = LeanDecoder(model, max_len=256)
        logits = dec.prefill(ids)          # ids [S] or [1, S]: logits of the last position [1, V]
        logits = dec.step(token)           # one token (int or tensor): logits [1, V]
        ids = dec.generate(ids, 64)        # the greedy continuation (list of ints)

    ``prefill_dtype``: the activations' dtype for the PQ layers of a prompt of at least
    PREFILL16_MIN_TOKENS tokens ("auto": bf16 where the CPU has AMX-BF16, else fp32; None: fp32).  bf16
    rounds activations and weight tiles to 8 mantissa bits there (llama.cpp rounds its activations to 8-bit
    blocks); steps of fewer tokens are fp32.  Raises ValueError (naming the reason) for a model it does not
    compute; :func:`lean_decoder` returns None instead.
    """

    def __init__(self, model: nn.Module, max_len: int = 2048, prefill_dtype: torch.dtype | None | str = "auto"):
        why = unsupported_reason(model)
        if why:
            raise ValueError(f"LeanDecoder: unsupported model: {why}")
        cfg = model.config
        self.model, self.arch = model, ARCHS[cfg.model_type]
        self.embed, self.head = model.get_input_embeddings(), model.lm_head
        self.blocks = blocks_of(model)
        self.final_norm = norm_weight(model.model.norm, self.arch.plus_one)
        self.eps = float(cfg.rms_norm_eps)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.n_heads // self.n_kv
        scale = getattr(cfg, "query_pre_attn_scalar", None)
        self.scale = (scale if scale is not None else self.head_dim) ** -0.5
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.max_len = int(max_len)
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos is not None and self.max_len > max_pos:
            raise ValueError(f"LeanDecoder: max_len={max_len} exceeds the model's {max_pos} positions")
        # RoPE tables [max_len, hd]; the query's carry the attention scale (a power of two for both
        # families here: exact), so the scores need no extra multiply.
        self.rope = {k: (c, s, c * self.scale, s * self.scale) for k, (c, s) in rope_tables(model, self.max_len).items()}
        L, shape = len(self.blocks), (self.n_kv, self.max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape) for _ in range(L)]     # [KV, max_len, hd] each
        self.v_cache = [torch.zeros(shape) for _ in range(L)]
        self.pos = 0
        self.prefill_dtype = default_prefill_dtype() if prefill_dtype == "auto" else prefill_dtype
        from .native import library
        self._lib = library()        # the C++ glue of a 1-token step; None: torch ops do it
        self._act = F.silu if self.arch.activations == ("silu",) else (lambda t: F.gelu(t, approximate="tanh"))
        # per block, what a native step passes: (block, k cache, v cache, window, RoPE tables, the next norm)
        nxt = [b.attn_norm for b in self.blocks[1:]] + [self.final_norm]
        self._plan = [(b, kc, vc, b.window or 0, self.rope[b.rope], n)
                      for b, kc, vc, n in zip(self.blocks, self.k_cache, self.v_cache, nxt)]

    # -- public verbs ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten as it refills)."""
        self.pos = 0

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt ``ids`` ([S] or [1, S]) from the current position; logits [1, V] of its last
        token ([S, V] of every token with ``all_logits``)."""
        ids = ids.reshape(1, -1)
        return self._forward(ids, all_logits)

    @torch.inference_mode()
    def step(self, token) -> torch.Tensor:
        """One token (an int or a tensor holding one id) at the next position; logits [1, V]."""
        ids = token.reshape(1, 1) if isinstance(token, torch.Tensor) else torch.tensor([[int(token)]])
        if self._lib is None:
            return self._forward(ids, False)
        return self._step_native(ids)

    def generate(self, ids: torch.Tensor, new_tokens: int, eos_token_id=None) -> list[int]:
        """Greedy continuation of ``ids`` from an empty cache: up to ``new_tokens`` ids (stops after an
        EOS id when ``eos_token_id`` — an int or a list — is given)."""
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self.reset()
        tok = self.prefill(ids).argmax(-1)
        out = [int(tok)]
        while len(out) < new_tokens and out[-1] not in eos:
            tok = self.step(tok).argmax(-1)
            out.append(int(tok))
        return out

    # -- the forward ---------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, w.shape, w, self.eps)

    def _forward(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        S, p0 = ids.shape[1], self.pos
        if p0 + S > self.max_len:
            raise ValueError(f"LeanDecoder: position {p0 + S} is past max_len={self.max_len}")
        x = self.embed(ids).reshape(S, -1).float()                 # [S, D]
        masks = {} if S == 1 else self._masks(p0, S)
        act, lin = self._act, self._linear_for(S)
        for blk, kc, vc in zip(self.blocks, self.k_cache, self.v_cache):
            h = self._rms(x, blk.attn_norm)
            o = self._attention(blk, h, kc, vc, p0, S, masks, lin)
            if blk.post_attn_norm is not None:
                o = self._rms(o, blk.post_attn_norm)
            x = x + o
            h = self._rms(x, blk.mlp_norm)
            m = lin(blk.down, act(lin(blk.gate, h)).mul_(lin(blk.up, h)))
            if blk.post_mlp_norm is not None:
                m = self._rms(m, blk.post_mlp_norm)
            x = x + m
        self.pos = p0 + S
        x = self._rms(x if all_logits else x[-1:], self.final_norm)
        logits = self.head(x)                                      # [S or 1, V]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _step_native(self, ids: torch.Tensor) -> torch.Tensor:
        """_forward for one token with the C++ glue: per block 12 Python-level calls (q, k, v, attend, o,
        residual_norm, gate, up, act, mul, down, residual_norm) instead of ~40 torch ops."""
        lib, p, eps, act = self._lib, self.pos, self.eps, self._act
        if p + 1 > self.max_len:
            raise ValueError(f"LeanDecoder: position {p + 1} is past max_len={self.max_len}")
        x = self.embed(ids).reshape(1, -1).to(torch.float32, copy=True)    # [1, D], updated in place
        h = lib.rms_norm(x, self.blocks[0].attn_norm, eps)
        for blk, kc, vc, window, rope, next_norm in self._plan:
            o = lib.attend(blk.q(h), blk.k(h), blk.v(h), kc, vc, p, window, *rope, blk.q_norm, blk.k_norm, eps)
            h = lib.residual_norm(x, blk.o(o), blk.post_attn_norm, blk.mlp_norm, eps)
            m = blk.down(act(blk.gate(h)).mul_(blk.up(h)))
            h = lib.residual_norm(x, m, blk.post_mlp_norm, next_norm, eps)   # h: the next block's input
        self.pos = p + 1
        logits = self.head(h)                                      # h is already final-normed
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _linear_for(self, S: int):
        """How a pass of S tokens calls a linear layer: as it is, or (a prompt of at least
        PREFILL16_MIN_TOKENS with ``prefill_dtype`` set) a PQLinear on 16-bit activations, widened back."""
        dt = self.prefill_dtype
        if dt is None or S < PREFILL16_MIN_TOKENS:
            return lambda mod, h: mod(h)
        return lambda mod, h: mod(h.to(dt)).float() if isinstance(mod, PQLinear) else mod(h)

    def _attention(self, blk, h, kc, vc, p0: int, S: int, masks: dict, lin) -> torch.Tensor:
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        q = lin(blk.q, h).view(S, H, hd)
        k = lin(blk.k, h).view(S, KV, hd)
        v = lin(blk.v, h).view(S, KV, hd)
        if blk.q_norm is not None:
            q, k = self._rms(q, blk.q_norm), self._rms(k, blk.k_norm)
        cos, sin, qcos, qsin = self.rope[blk.rope]
        half = hd // 2
        c, s = cos[p0:p0 + S, None], sin[p0:p0 + S, None]          # [S, 1, hd]
        q = torch.addcmul(q * qcos[p0:p0 + S, None], q.roll(half, -1), qsin[p0:p0 + S, None])
        k = torch.addcmul(k * c, k.roll(half, -1), s)
        end = p0 + S
        kc[:, p0:end] = k.transpose(0, 1)
        vc[:, p0:end] = v.transpose(0, 1)
        if S == 1:
            start = max(0, end - blk.window) if blk.window else 0
            keys, vals = kc[:, start:end], vc[:, start:end]        # [KV, T, hd]
            att = torch.matmul(q.view(KV, self.group, hd), keys.transpose(1, 2)).softmax(-1)   # [KV, G, T]
            return blk.o(torch.matmul(att, vals).view(1, H * hd))
        # q [1, H, S, hd] against keys [1, KV, end, hd]; the scale is already in q
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kc[None, :, :end], vc[None, :, :end],
                                           attn_mask=masks[blk.window], scale=1.0, enable_gqa=self.group > 1)
        return lin(blk.o, o[0].transpose(0, 1).reshape(S, H * hd))

    def _masks(self, p0: int, S: int) -> dict:
        """{window: bool mask [S, p0+S]}: key j is visible to query i (at p0+i) when j <= p0+i and, with a
        window, p0+i - j < window (transformers' sliding_window_overlay)."""
        qpos = torch.arange(p0, p0 + S)[:, None]
        kpos = torch.arange(p0 + S)[None, :]
        causal = kpos <= qpos
        return {w: causal if w is None else causal & (qpos - kpos < w) for w in {b.window for b in self.blocks}}


def lean_decoder(model: nn.Module, max_len: int, engine: str = "auto") -> LeanDecoder | None:
    """A :class:`LeanDecoder` for ``model`` when ``engine`` is "auto" or "lean" and the model is supported;
    None for "transformers", and for an unsupported model (with one log line saying why and that
    transformers serves instead)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: allowed are {ENGINES}")
    if engine == "transformers":
        return None
    why = unsupported_reason(model)
    if why:
        log.warning("fasq: the lean decode path does not support %s; decoding with transformers", why)
        return None
    return LeanDecoder(model, max_len)
