"""Perplexity and bits/byte over fixed, non-overlapping windows: the same windows for every model."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # No BOS: every model is scored on exactly the same token stream (and SmolLM2 uses none).
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, context_length: int = 512, max_tokens: int | None = 16384,
               batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``text`` cut into non-overlapping windows of ``context_length`` tokens.

    Only whole windows are scored (the first ``max_tokens`` tokens, rounded down to whole windows).
    Each window's first token is context only, so ``context_length - 1`` tokens are predicted per
    window.  bits/byte = total NLL in bits / UTF-8 bytes of the predicted tokens.
    """
    if context_length < 2:
        raise ValueError(f"context_length={context_length}: must be at least 2")
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_win = ids.numel() // context_length
    if n_win == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {context_length}")
    windows = ids[: n_win * context_length].view(n_win, context_length)
    device = next(model.parameters(), torch.empty(0)).device
    for b in model.buffers():
        device = b.device
        break
    nll, n_tok, n_bytes = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_win, desc="perplexity", unit="win", disable=not progress, leave=False)
    for s in range(0, n_win, batch_size):
        batch = windows[s: s + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()     # [B, L, V]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = batch[:, 1:]
        nll -= float(logp.gather(-1, tgt[..., None]).sum())
        n_tok += tgt.numel()
        for row in tgt.cpu():
            n_bytes += len(tokenizer.decode(row.tolist()).encode("utf-8"))
        bar.update(batch.shape[0])
    bar.close()
    mean = nll / n_tok
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "bits_per_byte": nll / math.log(2) / n_bytes,
            "tokens_scored": n_tok, "bytes_scored": n_bytes, "windows": n_win, "context_length": context_length,
            "seconds": time.perf_counter() - t0}
