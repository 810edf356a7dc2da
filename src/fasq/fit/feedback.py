"""Error feedback (``error_feedback=True``): codes chosen column pair by column pair, each pair's error pushed onto
the columns not yet coded, weighed by the layer's input covariance measured on text the model writes itself.

The usual fit codes every sub-vector on its own (nearest centroid).  The output error of a layer is
``(W - Q) x``, so what matters is the error weighed by the input covariance ``H = E[x x^T]``; GPTQ's
optimal-brain-surgeon update (Frantar et al., 2022) codes the columns in order and moves each one's error onto the
remaining columns, where the next codes can absorb it.  Here the unit is a sub-vector of ``d`` columns: each is
coded in the metric of ``H``'s inverse restricted to its columns, against the fixed codebook and scales of the
usual fit (:func:`fasq.fit.pq.quantize_weight`), in the rotated basis the codes live in.

``H`` comes from the tokens :mod:`fasq.fit.samples` draws (the model's own text, no data is read): over
:data:`fasq.fit.samples.SEQUENCES` x :data:`fasq.fit.samples.LENGTH` tokens after equalization, so it is the
covariance of the very inputs the stored weights see.  Too few tokens make the update fit those tokens rather than
text in general (docs/experiments.md, twelfth round), hence the presets' larger ``sample_sequences``.
"""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from ..reference import rotate
from .kmeans import assign

log = logging.getLogger(__name__)

DAMP = 0.01          # added to H's diagonal, as a fraction of its mean (GPTQ's default)
BLOCK = 128          # columns updated together before the rest of the matrix is (GPTQ's lazy batch)
PASS_BYTES = 1 << 30  # covariances held at once; more layers take more forward passes over the samples


@torch.no_grad()
def covariances(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` (fp32, CPU) of the input of each linear in ``names`` over the tokens ``ids``
    ``[sequences, length]``, one sequence per forward.  Layers fed the same tensor (q/k/v, gate/up) share
    one matrix object."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []   # this forward's inputs (held, so no other tensor takes their place)

    def keep(name: str):
        def hook(_m, args, _out):
            x = args[0]
            if name in alias:
                return
            owner = next((n for t, n in seen if t is x), None)
            if owner is not None and name not in sums:
                alias[name] = owner
                return
            seen.append((x, name))
            x = x.detach().float().reshape(-1, x.shape[-1])
            h = (x.T @ x).cpu()
            sums[name] = sums[name] + h if name in sums else h
        return hook

    hooks = [modules[n].register_forward_hook(keep(n)) for n in names]
    device = next(model.parameters()).device
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    try:
        for row in ids:
            seen.clear()
            model(input_ids=row[None].to(device), use_cache=False, **keep_last)
    finally:
        for h in hooks:
            h.remove()
    n = ids.numel()
    out = {k: v / n for k, v in sums.items()}
    for k, v in alias.items():
        out[k] = out[v]
    return out


def covariance_passes(model: nn.Module, names: list[str], limit: int | None = None) -> list[list[str]]:
    """``names`` cut into consecutive runs whose covariances take at most ``limit`` bytes (default
    :data:`PASS_BYTES`; at least one layer each)."""
    limit = PASS_BYTES if limit is None else limit
    modules = dict(model.named_modules())
    passes, cur, size = [], [], 0
    for n in names:
        b = 4 * modules[n].in_features ** 2
        if cur and size + b > limit:
            passes.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    if cur:
        passes.append(cur)
    return passes


def rotated(h: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``R^T H R`` for the rotation ``W -> W R`` of :func:`fasq.reference.rotate`: the covariance of the rotated inputs."""
    if not block:
        return h
    return rotate(rotate(h, signs, block).T.contiguous(), signs, block)


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def feedback_codes(wp: torch.Tensor, s: torch.Tensor, g: int, book: torch.Tensor, padded_in: int,
                   h: torch.Tensor, damp: float | None = None) -> torch.Tensor | None:
    """Codes ``[rows * n_sub]`` for the rotated, padded weight ``wp`` ``[rows, cols]`` with per-(row, group)
    scales ``s`` (group width ``g``) and codebook ``book`` ``[K, d]``, coding sub-vectors left to right with
    GPTQ's update; ``h`` ``[in, in]`` is the rotated input covariance (columns past it are padding).  None where
    ``h`` cannot be factored even with damping (the caller keeps its nearest-centroid codes)."""
    rows, cols = wp.shape
    d = book.shape[1]
    dev = wp.device
    if not bool(torch.isfinite(h).all()):
        log.warning("error feedback: the input covariance has NaN/Inf entries; coding without it")
        return None
    hp = torch.eye(cols, device=dev)
    n_in = h.shape[0]
    hp[:n_in, :n_in] = h.to(dev)
    dead = torch.diag(hp) <= 0
    hp[dead, dead] = 1.0
    damp = DAMP if damp is None else damp
    for _ in range(4):   # a covariance too near singular for fp32 gets 10x the damping, then 100x, ...
        try:
            u = _inverse_factor(hp + damp * torch.diag(hp).mean() * torch.eye(cols, device=dev))
            break
        except torch.linalg.LinAlgError:
            damp *= 10
    else:
        log.warning("error feedback: the input covariance is singular even with damping; coding without it")
        return None
    w = wp.clone()
    codes = torch.empty(rows, padded_in // d, dtype=torch.int64, device=dev)
    for b0 in range(0, padded_in, BLOCK):
        b1 = min(b0 + BLOCK, padded_in)
        err = torch.empty(rows, b1 - b0, device=dev)
        for j in range(b0, b1, d):
            a = torch.linalg.inv(u[j:j + d, j:j + d])          # the metric of the pair: (U_jj^T U_jj)^-1 = A A^T
            sc = s[:, j // g, None]
            idx = assign((w[:, j:j + d] / sc @ a).contiguous(), (book @ a).contiguous())
            codes[:, j // d] = idx
            e = (w[:, j:j + d] - book[idx] * sc) @ a
            err[:, j - b0: j - b0 + d] = e
            w[:, j + d:b1] -= e @ u[j:j + d, j + d:b1]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes.reshape(-1)

