"""Each input channel's power, measured on text the model writes itself (``equalize="sampled"``).

``equalize="power"`` weighs a layer's input columns by a model of the residual stream built from the weights
alone (:class:`fasq.fit.equalize.ResidualPower`).  That model is good where every block normalizes its output
(Gemma 2/3) and poor where a few massive activations carry the stream (Llama-style models such as SmolLM2, whose
massive channels sit on a few tokens the weights do not show).  No dataset is needed to see them: the model
itself, sampled from its start token, writes text whose activations have them.  Here the model writes
:data:`SEQUENCES` sequences (``FASQConfig.sample_sequences``; the presets: 32 at 4 bits, 128 at 3) of
:data:`LENGTH` tokens (temperature 1, nucleus :data:`TOP_P`, a fixed seed), and the mean square of every input
channel of the attention projections, of gate/up and of down_proj over those tokens replaces the estimate.  No
text, file or download is involved: the quantizer stays calibration-free in
the sense that matters to a user (nothing but the model is needed), at the price of running the model for
``sequences * LENGTH`` tokens of decoding (SmolLM2-135M: about 25 s for 8 sequences on 2 CPU cores, about 60 s
for 32, twice that for 64).  The same tokens give the input covariances of error feedback
(:mod:`fasq.fit.feedback`).

Measured on SmolLM2-135M and Gemma-3-270M in docs/experiments.md (eleventh round).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable

import torch
from torch import nn

from ..families import family_of

log = logging.getLogger(__name__)

SEQUENCES = 8     # sequences sampled at once (one batch), where the caller names no number
LENGTH = 256      # tokens per sequence, the start token included
TOP_P = 0.95      # nucleus sampling: the smallest set of tokens holding this much probability
SEED = 0          # the sampler's seed: the same model gives the same tokens on the same device
NUCLEUS_CANDIDATES = 1024   # tokens ranked first; all of them only where these hold less than TOP_P


def start_token(model: nn.Module) -> int:
    """The token a sample starts from: the model's BOS, else its (first) EOS, else 0."""
    for key in ("bos_token_id", "eos_token_id"):
        for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            tid = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(tid, (list, tuple)):
                tid = tid[0] if tid else None
            if isinstance(tid, int) and tid >= 0:
                return tid
    return 0


def _cache_kwarg(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (in the 5.2x releases); the name this model's forward takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _nucleus(logits: torch.Tensor, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row, sampled at temperature 1 from the smallest set of tokens holding ``top_p``."""
    probs = torch.softmax(logits.float().cpu(), -1)
    sp, si = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), -1)   # sorted; sorting 262144 tokens is slow
    if bool((sp.sum(-1) < top_p).any()):   # a flat distribution: the nucleus may reach past the candidates
        sp, si = probs.sort(-1, descending=True)
    sp = sp * (sp.cumsum(-1) - sp < top_p)
    pick = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen)
    return si.gather(1, pick)


@torch.no_grad()
def sample_tokens(model: nn.Module, sequences: int | None = None, length: int | None = None,
                  top_p: float | None = None, seed: int | None = None) -> torch.Tensor:
    """``[sequences, length]`` token ids the model writes from its start token (:func:`start_token`) at
    temperature 1 with nucleus ``top_p``, drawn by a CPU generator seeded with ``seed`` (defaults: this module's
    constants).  One batch, with a KV cache; an EOS is just another token (the model goes on past it)."""
    from transformers import DynamicCache

    sequences = SEQUENCES if sequences is None else sequences
    length = LENGTH if length is None else length
    top_p, seed = top_p or TOP_P, SEED if seed is None else seed
    if length < 2 or sequences < 1:
        raise ValueError(f"sample_tokens: needs length >= 2 and sequences >= 1, got {length} and {sequences}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((sequences, length), start_token(model), dtype=torch.long)
    cache, kw = DynamicCache(), _cache_kwarg(model)
    for t in range(1, length):
        out = model(input_ids=ids[:, t - 1:t].to(device), use_cache=True, **{kw: cache})   # fills ``cache``
        ids[:, t:t + 1] = _nucleus(out.logits[:, -1], top_p, gen)
    return ids


@torch.no_grad()
def forward_each(model: nn.Module, ids: torch.Tensor, before_each: Callable[[], None] | None = None) -> None:
    """One forward of ``model`` per sequence of ``ids`` ``[sequences, length]``, for the hooks that measure them
    (``before_each`` runs before each); no KV cache, and only the last position's logits where the model allows it
    (the head's are not needed)."""
    device = next(model.parameters()).device
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    for row in ids:
        if before_each is not None:
            before_each()
        model(input_ids=row[None].to(device), use_cache=False, **keep_last)


@torch.no_grad()
def channel_powers(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per decoder block: the mean square of each input channel of the attention projections, of gate/up and of
    down_proj (fp32, on the CPU) over the tokens of ``ids`` ``[sequences, length]``, one sequence per forward.
    The format of :func:`fasq.fit.equalize.equalize`'s ``powers``."""
    fam = family_of(model)
    blocks = list(fam.blocks(model))
    sums: dict[tuple[int, int], torch.Tensor] = {}

    def keep(i: int, j: int):
        def hook(_m, args, _out):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = x.pow(2).sum(0).cpu()
            sums[i, j] = sums[i, j] + s if (i, j) in sums else s
        return hook

    hooks = []
    for i, (_, blk) in enumerate(blocks):
        attn, mlp = getattr(blk, fam.attention), getattr(blk, fam.mlp)
        for j, lin in enumerate((getattr(attn, fam.attention_inputs[0]), getattr(mlp, fam.gate),
                                 getattr(mlp, fam.down))):
            hooks.append(lin.register_forward_hook(keep(i, j)))
    try:
        forward_each(model, ids)
    finally:
        for h in hooks:
            h.remove()
    n = ids.numel()
    return [tuple(sums[i, j] / n for j in range(3)) for i in range(len(blocks))]


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode (no dropout while sampling and measuring), its mode restored after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def draw(model: nn.Module, **sampling) -> torch.Tensor:
    """:func:`sample_tokens` in eval mode, logged (``sampling``: its keyword arguments)."""
    with evaluating(model):
        ids = sample_tokens(model, **sampling)
    log.info("sampled %d x %d tokens from token %d", *ids.shape, start_token(model))
    return ids


def sampled_powers(model: nn.Module, ids: torch.Tensor | None = None,
                   **sampling) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`channel_powers` over ``ids``, else over :func:`draw` (``sampling``: its keyword arguments)."""
    ids = draw(model, **sampling) if ids is None else ids
    with evaluating(model):
        return channel_powers(model, ids)
