"""Error feedback (``error_feedback=True``): codes chosen column pair by column pair, each pair's error pushed onto
the columns not yet coded, weighed by the layer's input covariance measured on text the model writes itself.

The usual fit codes every sub-vector on its own (nearest centroid).  The output error of a layer is
``(W - Q) x``, so what matters is the error weighed by the input covariance ``H = E[x x^T]``; GPTQ's
optimal-brain-surgeon update (Frantar et al., 2022) codes the columns in order and moves each one's error onto the
remaining columns, where the next codes can absorb it.  Here the unit is a sub-vector of ``d`` columns: each is
coded in the metric of ``H``'s inverse restricted to its columns, against the fixed codebook and scales of the
usual fit (:func:`fasq.fit.pq.quantize_weight`), in the rotated basis the codes live in.

``H`` comes from the tokens :mod:`fasq.fit.samples` draws (the model's own text, no data is read): over
``sample_sequences`` x :data:`fasq.fit.samples.LENGTH` tokens after equalization, so it is the covariance of the
very inputs the stored weights see.  It is measured in GPTQ's order (:func:`sequential_covariances`): block by
block, each block's with the blocks before it already quantized, so each layer is coded for the inputs the
quantized model will feed it.  Too few tokens make the update fit those
tokens rather than text in general (docs/experiments.md, twelfth round), hence the presets' larger
``sample_sequences``.
"""
from __future__ import annotations

import logging
from concurrent.futures import Executor
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from ..reference import rotate
from .kmeans import assign
from .samples import evaluating, forward_each

log = logging.getLogger(__name__)

DAMP = 0.01          # added to H's diagonal, as a fraction of its mean (GPTQ's default)
BLOCK = 128          # columns updated together before the rest of the matrix is (GPTQ's lazy batch)
PASS_BYTES = 1 << 30  # covariances held at once; more layers take more forward passes over the samples

R = TypeVar("R")
# (block, its name, the first sample's hidden states, its call's other arguments, its layers) -> groups of them
Split = Callable[[nn.Module, str, torch.Tensor, tuple, list[str]], list[list[str]]]


class _Covariances:
    """Forward hooks that sum ``x^T x`` over the input ``x`` of each named linear (fp32, on the CPU).  Layers fed the
    same tensor within one forward (q/k/v, gate/up) share one matrix: a forward's inputs are held until
    :meth:`next_forward`, so no freed tensor's memory is taken for a shared input."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self.seen: list[tuple[torch.Tensor, str]] = []
        self.hooks = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_m, args, _out):
            x = args[0]
            if name in self.alias:
                return
            owner = next((n for t, n in self.seen if t is x), None)
            if owner is not None and name not in self.sums:
                self.alias[name] = owner
                return
            self.seen.append((x, name))
            x = x.detach().float().reshape(-1, x.shape[-1])
            h = (x.T @ x).cpu()
            self.sums[name] = self.sums[name] + h if name in self.sums else h
        return hook

    def next_forward(self) -> None:
        self.seen.clear()

    def result(self, tokens: int) -> dict[str, torch.Tensor]:
        """The means over ``tokens`` inputs; shared inputs give one matrix object.  Removes the hooks."""
        self.remove()
        out = {k: v / tokens for k, v in self.sums.items()}
        for k, v in self.alias.items():
            out[k] = out[v]
        return out

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


@torch.no_grad()
def covariances(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` (fp32, CPU) of the input of each linear in ``names`` over the tokens ``ids``
    ``[sequences, length]``, one sequence per forward.  Layers fed the same tensor (q/k/v, gate/up) share
    one matrix object."""
    modules = dict(model.named_modules())
    acc = _Covariances({n: modules[n] for n in names})
    try:
        forward_each(model, ids, acc.next_forward)
    finally:
        acc.remove()
    return acc.result(ids.numel())


def decoder_blocks(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for each element of the ``nn.ModuleList`` of ``model`` that holds the most of ``names``
    (a decoder's blocks), in order; ``[]`` where no list holds layers of two of its elements."""
    best, count = [], 0
    for lname, m in model.named_modules():
        if not lname or not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        held = [n for n in names if n.startswith(lname + ".")]
        if len({n[len(lname) + 1:].split(".", 1)[0] for n in held}) >= 2 and len(held) > count:
            best, count = [(f"{lname}.{i}", b) for i, b in enumerate(m)], len(held)
    return best


def _block_calls(model: nn.Module, ids: torch.Tensor, blocks: list[tuple[str, nn.Module]]):
    """One forward per sequence: the first block's input hidden states, and the other arguments every block is
    called with (masks, position embeddings: each block's own), per sequence; also the second block's input for
    the first sequence (:func:`_replays` checks against it)."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    second: list[torch.Tensor] = []

    def pre(i: int):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                hidden.append(x)
            elif i == 1 and not second:
                second.append(x)
            calls[i].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return hook

    hooks = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, (_, b) in enumerate(blocks)]
    try:
        forward_each(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return hidden, calls, second[0] if second else None


def _call(block: nn.Module, x: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    y = block(x, *call[0], **call[1])
    return y[0] if isinstance(y, (tuple, list)) else y


def _replays(block: nn.Module, x: torch.Tensor, call: tuple[tuple, dict], want: torch.Tensor | None) -> bool:
    """Whether calling ``block`` alone on what it was given in the model's forward gives the next block's input
    (False where the next block was never called)."""
    if want is None:
        return False
    try:
        y = _call(block, x, call)
    except Exception as e:   # noqa: BLE001  (a block that cannot be called alone: the caller falls back)
        log.debug("replaying a decoder block failed: %r", e)
        return False
    return isinstance(y, torch.Tensor) and y.shape == want.shape and torch.allclose(y, want, rtol=1e-4, atol=1e-5)


def sequential_covariances(model: nn.Module, ids: torch.Tensor, names: list[str], split: Split | None = None
                           ) -> Iterator[dict[str, torch.Tensor | None]]:
    """The input covariances of ``names`` in GPTQ's order, a step at a time: **the caller replaces each step's layers
    by their quantized form before asking for the next step**, so each layer's covariance is that of the inputs the
    quantized blocks before it give it.  A step is a decoder block (:func:`decoder_blocks`): the samples' hidden
    states enter the block, its layers' covariances are measured, then the quantized block's outputs feed the next
    block.  Within a block all layers are measured on the block as it was unquantized; ``split(block, prefix, x,
    call, layers)`` (an experiment's hook) may cut a block's layers into groups, each its own step, measured with
    the groups before it quantized: GPTQ's "true sequential" order, which scored worse here (docs/experiments.md,
    thirteenth round).  Layers outside the blocks come last, measured by whole forwards (at most :data:`PASS_BYTES`
    of covariances a pass).  Where the blocks cannot be called one by one (the check: block 0 alone must give block
    1's input), every layer is measured by whole forwards, pass after pass, with a warning.  Each step is a dict name
    -> covariance (layers fed one tensor share a matrix; None for a layer no sample reached, such as an expert never
    routed to); ``model`` must stay in eval mode while the iterator runs."""
    blocks = decoder_blocks(model, names)
    hidden: list[torch.Tensor] = []
    if blocks:
        with torch.no_grad():
            hidden, calls, second = _block_calls(model, ids, blocks)
            if not _replays(blocks[0][1], hidden[0], calls[0][0], second):
                log.warning("error feedback: this model's decoder blocks cannot be called one by one (%s), so each "
                            "layer's input covariance is measured by whole forward passes",
                            type(blocks[0][1]).__name__)
                blocks = []
    inside = set()
    for i, (prefix, block) in enumerate(blocks):
        mine = [n for n in names if n.startswith(prefix + ".")]
        inside.update(mine)
        with torch.no_grad():
            groups = split(block, prefix, hidden[0], calls[i][0], mine) if split and mine else [mine]
        for group in filter(None, groups):
            with torch.no_grad():
                acc = _Covariances({n: block.get_submodule(n[len(prefix) + 1:]) for n in group})
                try:
                    for x, call in zip(hidden, calls[i]):
                        acc.next_forward()
                        _call(block, x, call)
                finally:
                    acc.remove()
            yield {n: None for n in group} | acc.result(ids.numel())
        if i + 1 < len(blocks):
            with torch.no_grad():
                hidden = [_call(block, x, call) for x, call in zip(hidden, calls[i])]
    hidden = []
    for p in covariance_passes(model, [n for n in names if n not in inside]):
        yield {n: None for n in p} | covariances(model, ids, p)


def fitted_in_order(model: nn.Module, ids: torch.Tensor, names: list[str], fit: Callable[[str, Any], R],
                    pool: Executor) -> Iterator[R]:
    """``fit(name, covariance)`` of each of ``names`` in GPTQ's order (:func:`sequential_covariances`), a step's
    layers on ``pool`` together; yields the results.  **The caller replaces each layer by its fit as it gets it**:
    the next step is measured only when the caller asks for the result after a step's last."""
    with evaluating(model):
        for step in sequential_covariances(model, ids, names):
            mine = [n for n in names if n in step]
            yield from pool.map(fit, mine, [step[n] for n in mine])


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

