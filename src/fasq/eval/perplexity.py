"""Perplexity and bits/byte over fixed, non-overlapping windows: the same windows for every model."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # The text's tokens alone: a BOS, where the model wants one, starts each window (perplexity below).
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def wants_bos(tokenizer) -> bool:
    """True when the tokenizer itself puts a BOS first (Gemma; SmolLM2 does not, and gets none)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


LOGITS_BUDGET = 1 << 30   # bytes of fp32 logits per forward (one window of Gemma-3's vocabulary is 0.5 GB)
NLL_CHUNK = 128           # positions per log-softmax: its temporaries stay a fraction of the logits


def _nll_sum(logits: torch.Tensor, tgt: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``tgt`` [B, T] under ``logits`` [B, T, V], a few positions at a time
    (a whole-batch log-softmax would allocate as much again as the logits)."""
    total = 0.0
    for s in range(0, tgt.shape[1], NLL_CHUNK):
        logp = torch.log_softmax(logits[:, s: s + NLL_CHUNK].float(), dim=-1)
        total -= float(logp.gather(-1, tgt[:, s: s + NLL_CHUNK, None]).sum())
    return total


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, context_length: int = 512, max_tokens: int | None = 16384,
               batch_size: int = 4, progress: bool = True, bos: bool | None = None) -> dict:
    """Perplexity of ``model`` on ``text`` cut into non-overlapping windows of ``context_length`` tokens.

    Only whole windows are scored (the first ``max_tokens`` text tokens, rounded down to whole windows).
    Without a BOS each window's first token is context only; with one (``bos``, default
    :func:`wants_bos`: where the tokenizer adds it, as Gemma's does) each window is the BOS and
    ``context_length - 1`` text tokens, every one predicted.  Either way ``context_length - 1`` tokens
    are predicted per window.  bits/byte = total NLL in bits / UTF-8 bytes of the predicted tokens.
    """
    device = next(model.parameters(), torch.empty(0)).device
    for b in model.buffers():
        device = b.device
        break
    # A batch's logits are B x L x vocab fp32: Gemma-3's 262k vocabulary makes that 2.1 GB at B=4, L=512 (sweep
    # workers peaked at 5.5-10 GB and were OOM-killed on a shared 24 GB host).  Fewer windows per forward keep
    # them under LOGITS_BUDGET; the scores are the same windows.
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    batch_size = max(1, min(batch_size, LOGITS_BUDGET // max(1, context_length * vocab * 4)))
    return perplexity_of(lambda batch: model(input_ids=batch.to(device), use_cache=False).logits, tokenizer, text,
                         context_length=context_length, max_tokens=max_tokens, batch_size=batch_size,
                         progress=progress, bos=bos)


def windows(tokenizer, text: str, *, context_length: int = 512, max_tokens: int | None = 16384,
            bos: bool | None = None) -> tuple[torch.Tensor, bool, int]:
    """The scored windows of :func:`perplexity`: ``(windows [n_win, context_length], bos, text tokens used)``."""
    if context_length < 2:
        raise ValueError(f"context_length={context_length}: must be at least 2")
    bos = wants_bos(tokenizer) if bos is None else bos
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    span = context_length - 1 if bos else context_length     # text tokens per window
    n_win = ids.numel() // span
    if n_win == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {context_length}")
    wins = ids[: n_win * span].view(n_win, span)
    if bos:
        wins = torch.cat([torch.full((n_win, 1), tokenizer.bos_token_id, dtype=ids.dtype), wins], 1)
    return wins, bos, n_win * span


@torch.no_grad()
def perplexity_of(logits_of, tokenizer, text: str, *, context_length: int = 512, max_tokens: int | None = 16384,
                  batch_size: int = 4, progress: bool = True, bos: bool | None = None) -> dict:
    """:func:`perplexity` with the logits from ``logits_of(ids [B, L] int64) -> [B, L, V]``: another engine
    (llama.cpp in the sweep) scored on exactly the windows, BOS and byte counts of a torch model."""
    wins, bos, text_tokens = windows(tokenizer, text, context_length=context_length, max_tokens=max_tokens, bos=bos)
    n_win = wins.shape[0]
    nll, n_tok, n_bytes = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_win, desc="perplexity", unit="win", disable=not progress, leave=False)
    for s in range(0, n_win, batch_size):
        batch = wins[s: s + batch_size]
        logits = logits_of(batch)                                               # [B, L, V]
        tgt = batch[:, 1:]
        nll += _nll_sum(logits[:, :-1], tgt.to(logits.device))
        n_tok += tgt.numel()
        for row in tgt:
            n_bytes += len(tokenizer.decode(row.tolist()).encode("utf-8"))
        bar.update(batch.shape[0])
    bar.close()
    mean = nll / n_tok
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "bits_per_byte": nll / math.log(2) / n_bytes,
            "tokens_scored": n_tok, "bytes_scored": n_bytes, "windows": n_win, "context_length": context_length,
            "bos": bos, "text_tokens": text_tokens,
            "seconds": time.perf_counter() - t0}
