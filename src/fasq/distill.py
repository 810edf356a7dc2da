"""After quantization: tune what stays continuous to the original model's outputs (``--distill-steps``).

A quantized model keeps its codes, but its norms' gains, each layer's codebooks and its per-(row, group) scales are
real numbers that the fit chose layer by layer, each for its own weight (or its own input covariance).  Here they
are tuned together, end to end, so that the quantized model's next-token distribution matches the original
model's: Adam on ``KL(original || quantized)`` over every position of text the *original* model samples itself
(:func:`fasq.fit.samples.draw`, a seed apart from the quantizer's samples).  No data is read, so the quantizer
stays calibration-free; the codes, the format and the size are unchanged (the scales and codebooks are rounded to
fp16 as stored).  AQLM and PV-tuning fine-tune the same continuous parameters after coding, on calibration text.

The scales are tuned as a factor on the stored ones (so Adam's steps are relative to each scale), the codebooks
and the norms' gains directly.  The output head stays as it is (a tied head's table is also the token
embedding's).  Cost: the original and the quantized model in memory together, and ``steps`` forward and backward
passes of ``batch`` sequences (SmolLM2-135M: about 10 s a step on 2 CPU cores); measured in docs/experiments.md
(eighteenth round).  A step's sequences go through the models in micro-batches whose fp32 logits stay under
:data:`LOGITS_BYTES` (Gemma's 262144-token vocabulary), each layer's weight built once per step.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import reference
from .fit.samples import LENGTH, draw, evaluating
from .model import pq_layers
from .nn import PQLinear, set_module

log = logging.getLogger(__name__)

SAMPLE_SEED = 1000   # the distillation's text is sampled with seed SAMPLE_SEED + seed (the quantizer's: the seed)
LOGITS_BYTES = 256 * 2**20   # a micro-batch's fp32 logits at most this large (by default; one sequence at least)
TAIL = 8             # "kl_last": the mean of the last TAIL steps' KL


@dataclass(frozen=True)
class DistillSettings:
    """How :func:`distill` tunes (the defaults are those measured in docs/experiments.md, eighteenth round)."""

    steps: int = 64            # Adam steps (cosine decay of the rate to 0)
    sequences: int = 32        # sampled sequences of LENGTH tokens
    batch: int = 4             # sequences per step
    lr_norms: float = 1e-3
    lr_scales: float = 1e-3    # on the factor each stored scale is multiplied by
    lr_codebooks: float = 3e-4
    seed: int = 0
    micro_batch: int | None = None   # sequences per forward/backward pass (None: fp32 logits <= LOGITS_BYTES)

    def __post_init__(self) -> None:
        for name in ("steps", "sequences", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"DistillSettings.micro_batch must be None (chosen by memory) or >= 1, got "
                             f"{self.micro_batch}")
        for name in ("lr_norms", "lr_scales", "lr_codebooks"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"DistillSettings.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr_norms or self.lr_scales or self.lr_codebooks):
            raise ValueError("DistillSettings: every learning rate is 0, so nothing would be tuned")


class _Tunable(nn.Module):
    """A PQLinear's weight as a differentiable function of its codebooks and a factor on its scales (codes fixed)."""

    def __init__(self, layer: PQLinear, codebooks: bool, scales: bool):
        super().__init__()
        self.__dict__["layer"] = layer   # not a submodule: its buffers stay where they are
        self.codebooks = nn.Parameter(layer.codebooks.float().clone(), requires_grad=codebooks)
        self.scale_factor = nn.Parameter(torch.ones_like(layer.scales, dtype=torch.float32), requires_grad=scales)
        self.fixed = None if codebooks or scales else self.weight().detach()
        self.built: torch.Tensor | None = None   # during a step: weight() with its graph ...
        self.leaf: torch.Tensor | None = None    # ... and a detached copy the micro-batches use and sum gradients in

    def weight(self) -> torch.Tensor:
        lay = self.layer
        scales = lay.scales.float() * self.scale_factor
        w = reference.dequantize(lay.spec, lay.codes, self.codebooks, scales, lay.rot_signs)   # [out, in]
        return reference.add_outliers_to_weight(w, lay.outliers())

    def begin_step(self) -> None:
        """Build the weight once for a step's micro-batches (the dequantization not repeated per micro-batch)."""
        if self.fixed is None:
            self.built = self.weight()
            self.leaf = self.built.detach().requires_grad_(True)

    def end_step(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight and its summed gradient, to carry back to the codebooks and scales (None: no gradient)."""
        built, leaf, self.built, self.leaf = self.built, self.leaf, None, None
        return None if leaf is None or leaf.grad is None else (built, leaf.grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fixed if self.fixed is not None else self.leaf if self.leaf is not None else self.weight()
        bias = self.layer.bias
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def write_back(self) -> None:
        """The tuned codebooks and scales into the PQLinear's buffers, rounded to their stored dtypes."""
        lay = self.layer
        lay.codebooks.copy_(self.codebooks.to(lay.codebooks.dtype))
        lay.scales.copy_((lay.scales.float() * self.scale_factor).to(lay.scales.dtype))


def _norm_gains(model: nn.Module) -> list[nn.Parameter]:
    """Each normalization module's gain (RMSNorm / LayerNorm ``weight``)."""
    return [m.weight for m in model.modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)]


def _kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions (the start token's excluded) of KL(teacher || student); ids: [B, T]."""
    with torch.no_grad():
        t = teacher(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)      # [B, T, V]
    s = student(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
    return F.kl_div(s[:, 1:], t[:, 1:], log_target=True, reduction="none").sum(-1).mean()


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


def micro_batch(settings: DistillSettings, model: nn.Module, length: int) -> int:
    """Sequences per forward/backward pass: ``settings.micro_batch``, else as many as keep a pass's fp32 logits
    ``[n, length, vocab]`` under :data:`LOGITS_BYTES` (at least 1, at most ``settings.batch``)."""
    if settings.micro_batch is not None:
        return min(settings.micro_batch, settings.batch)
    vocab = _vocab_size(model)
    fits = LOGITS_BYTES // (4 * length * vocab) if vocab else settings.batch
    return max(1, min(settings.batch, fits))


def _step(model: nn.Module, teacher: nn.Module, tunables: list[_Tunable], ids: torch.Tensor, micro: int) -> float:
    """One step's gradient, summed over micro-batches of ``micro`` sequences: the mean KL over ``ids`` [batch, T]."""
    for t in tunables:
        t.begin_step()
    try:
        total = 0.0
        for part in ids.split(micro):
            loss = _kl(model, teacher, part) * (part.shape[0] / ids.shape[0])
            loss.backward()
            total += loss.item()
        carried = [c for c in (t.end_step() for t in tunables) if c is not None]
        if carried:   # each layer's summed weight gradient on through its dequantization, once
            torch.autograd.backward([w for w, _ in carried], [g for _, g in carried])
    finally:
        for t in tunables:
            t.end_step()
    return total


def distill(model: nn.Module, teacher: nn.Module, settings: DistillSettings | None = None, *,
            ids: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Tune ``model``'s (quantized, in place) norms, codebooks and scales to ``teacher`` (the original model); a
    part whose rate in ``settings`` is 0 stays as it is.

    ``ids`` ``[sequences, length]``: the text to tune on; by default ``settings.sequences`` sequences the teacher
    samples itself.  Returns ``{"kl": per-step losses, "kl_first", "kl_last": the mean of the last TAIL steps',
    "seconds": ..., "parameters": ..., "micro_batch": ...}``.
    """
    s = settings or DistillSettings()
    layers = pq_layers(model)
    if not layers:
        raise ValueError("distill: the model has no quantized (PQLinear) layers; quantize it first")
    device = next(teacher.parameters()).device
    t0 = time.perf_counter()
    if ids is None:
        ids = draw(teacher, sequences=s.sequences, length=LENGTH, seed=SAMPLE_SEED + s.seed)
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    tunables = {n: _Tunable(m, codebooks=s.lr_codebooks > 0 and not n.endswith("lm_head"),
                            scales=s.lr_scales > 0 and not n.endswith("lm_head")) for n, m in layers}
    norms = _norm_gains(model) if s.lr_norms > 0 else []
    # fp32 copies take Adam's steps (a bf16 gain near 1 would round a step of 1e-3 away), the model's gains follow.
    masters = [p.detach().float().clone() for p in norms]
    groups = [{"params": masters, "lr": s.lr_norms},
              {"params": [t.codebooks for t in tunables.values() if t.codebooks.requires_grad], "lr": s.lr_codebooks},
              {"params": [t.scale_factor for t in tunables.values() if t.scale_factor.requires_grad],
               "lr": s.lr_scales}]
    n_params = sum(p.numel() for g in groups for p in g["params"])
    for p, m in zip(norms, masters):
        p.requires_grad_(True)
        m.requires_grad_(True)
    for n, t in tunables.items():
        set_module(model, n, t)
    saved_norms = [p.detach().clone() for p in norms]
    micro = micro_batch(s, teacher, ids.shape[1])
    curve: list[float] = []
    done = False
    try:
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / s.steps)))
        gen = torch.Generator().manual_seed(s.seed)
        with evaluating(model), evaluating(teacher):
            for _ in tqdm(range(s.steps), desc="distill", unit="step", disable=not progress):
                pick = torch.randperm(ids.shape[0], generator=gen)[:s.batch]
                opt.zero_grad()
                loss = _step(model, teacher, list(tunables.values()), ids[pick].to(device), micro)  # [batch, T]
                for p, m in zip(norms, masters):
                    if p.grad is not None:
                        m.grad, p.grad = p.grad.float(), None
                opt.step()
                sched.step()
                with torch.no_grad():
                    for p, m in zip(norms, masters):
                        p.copy_(m)
                curve.append(loss)
        done = True
    finally:   # an interrupted run leaves the model as it was
        with torch.no_grad():
            for n, t in tunables.items():
                if done:
                    t.write_back()
                set_module(model, n, t.layer)
            if not done:
                for p, v in zip(norms, saved_norms):
                    p.copy_(v)
        for p, r in requires.items():
            p.requires_grad_(r)
    seconds = time.perf_counter() - t0
    tail = curve[-TAIL:]
    r = {"kl": curve, "kl_first": curve[0], "kl_last": sum(tail) / len(tail), "seconds": seconds,
         "parameters": n_params, "micro_batch": micro}
    log.info("distill: %d parameters, %d steps of %d sequences (%d per pass), KL %.4f -> %.4f (last %d steps) in "
             "%.0f s", n_params, s.steps, s.batch, micro, r["kl_first"], r["kl_last"], TAIL, seconds)
    return r
