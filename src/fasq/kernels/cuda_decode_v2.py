"""The v2 CUDA decode kernel (``pq_cuda_v2.cu``, NVRTC): 1-16 tokens, d = 2, 6- or 8-bit codes, in the
GPU layout of :mod:`fasq.kernels.cuda_layout`; fused launches for layers that share their input.

**Status: compiled and statically checked only; not yet run on a GPU.**  It is therefore *not* the
default: the registry entry ``cuda_decode_v2`` (priority 45, above ``cuda_decode``'s 40) exists only
when ``FASQ_CUDA_V2=1``.  ``scripts/gpu_check.sh`` holds the prepared GPU run (correctness against the
reference and timings); docs/kernels_gpu.md ("Decode kernel v2") has the design and the static figures.

What the host does: builds the layer's GPU layout once (cached on the layer, rebuilt when its codes
change), plans the launch (:func:`plan`: the persistent grid's size, the split of the reduction dim
into slices, the ring depth), rotates x once (the same op as the v1 kernel's unfused path) and launches
one kernel, which also does the split-K sum (in slice order: deterministic).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import torch

from . import Kernel, register
from . import cuda_layout as L
from .cuda_common import compile_kernel, rotate

log = logging.getLogger(__name__)

SOURCE = "pq_cuda_v2.cu"
MAX_TOKENS = 16
NWARPS = 8
ROWT = 2
ENABLED = os.environ.get("FASQ_CUDA_V2", "0") == "1"
# The most dynamic shared memory one block may take (sm_80 / sm_90 opt-in limits, bytes).
SMEM_OPTIN = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024}


@dataclass(frozen=True)
class Launch:
    """One build (the FQ2_* defines) and launch of ``fasq_pq_decode_v2``."""

    bits: int
    nproj: int
    nt: int          # 8-token column tiles: 1 (1-8 tokens) or 2 (9-16)
    depth: int       # spans in flight per warp (the register ring)
    bf16: bool
    bias: bool
    xtail: bool      # in % 128 != 0
    nblocks: int
    slices: int
    per: int         # spans per slice
    nwarps: int = NWARPS
    rowt: int = ROWT

    @property
    def regions(self) -> int:
        return (self.nproj + 1) // 2

    @property
    def smem_bytes(self) -> int:
        """The table's regions plus up to 64 KiB to align it on a 64 KiB boundary of the shared window."""
        return self.regions * L.REGION_BYTES + L.REGION_BYTES - 16


def _smem_optin(capability: tuple[int, int]) -> int:
    return SMEM_OPTIN.get(capability, 99 * 1024 if capability < (9, 0) else 227 * 1024)


def plan(layout: L.GpuLayout, tokens: int, dtype: torch.dtype, sms: int = 132, capability=(9, 0),
         bias: bool = False, slices: int = 0) -> Optional[Launch]:
    """The launch for this layout and input, or None where the kernel does not apply.  ``slices`` > 0
    forces the split (tests, sweeps).  The split is the divisor of the span count that minimizes
    ``waves x (spans per slice + 1)`` (one span's worth of fixed cost per unit), times the ring's
    shortfall where a slice is shorter than the wanted depth (the kernel finishes at most one unit per
    round of ``depth`` spans, so ``depth <= spans per slice``).  A first guess, to be tuned on a card."""
    if not 1 <= tokens <= MAX_TOKENS or dtype not in (torch.float16, torch.bfloat16):
        return None
    nproj = len(layout.outs)
    nt = 1 if tokens <= 8 else 2
    want_depth = 3 if nt == 1 else 2
    n_tg = math.ceil(layout.n_tiles / ROWT)
    workers = sms * NWARPS
    best = None
    for s in range(1, layout.n_spans + 1):
        if layout.n_spans % s or (slices and s != slices):
            continue
        per = layout.n_spans // s
        depth = min(want_depth, per)
        if per < depth:
            continue
        waves = math.ceil(n_tg * s / workers)
        cost = (waves * (per + 1.0) * want_depth / depth, s)   # a shallower ring holds fewer bytes in flight
        if best is None or cost < best[0]:
            best = (cost, s, per, depth)
    if best is None:
        return None
    _, s, per, depth = best
    launch = Launch(layout.bits, nproj, nt, depth, dtype == torch.bfloat16, bias,
                    layout.in_features % (L.SPAN_SUBS * L.D) != 0,
                    max(1, min(sms, math.ceil(n_tg * s / NWARPS))), s, per)
    if launch.smem_bytes > _smem_optin(tuple(capability)):
        return None
    return launch


_DEFINES = ("FQ2_BITS", "FQ2_NWARPS", "FQ2_ROWT", "FQ2_DEPTH", "FQ2_NT", "FQ2_XBF16", "FQ2_NPROJ", "FQ2_BIAS",
            "FQ2_XTAIL")


def build_key(launch: Launch) -> tuple:
    """The fields of a launch that its build depends on, in the order of ``_DEFINES``."""
    return (launch.bits, launch.nwarps, launch.rowt, launch.depth, launch.nt, int(launch.bf16), launch.nproj,
            int(launch.bias), int(launch.xtail))


def defines(launch: Launch) -> str:
    return "".join(f"#define {n} {v}\n" for n, v in zip(_DEFINES, build_key(launch)))


@functools.lru_cache(maxsize=None)
def source() -> str:
    return resources.files("fasq.kernels").joinpath(SOURCE).read_text()


@functools.lru_cache(maxsize=None)
def _build(key: tuple, device: int, smem: int):
    """One build per (defines, device): a loaded module belongs to its device's context."""
    with torch.cuda.device(device):
        fn = compile_kernel("".join(f"#define {n} {v}\n" for n, v in zip(_DEFINES, key)) + source(), "fasq_pq_decode_v2")
        if not hasattr(fn, "set_shared_memory_config"):
            raise RuntimeError(f"torch {torch.__version__}: compiled kernels cannot take {smem} bytes of shared memory")
        fn.set_shared_memory_config(smem)
    return fn


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernel writes comes from here (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# The device tensors of a layout (one layer, or several fused).

@dataclass
class Operands:
    layout: L.GpuLayout
    codebooks: torch.Tensor   # int32 [nproj, 256]: each layer's centroids as fp16 pairs, zero-padded
    meta: torch.Tensor        # int32 [13]: tile_ends[4], outs[4], row offsets[4], total_out
    counters: torch.Tensor    # int32 [tile groups]: zeros between launches
    bias: Optional[torch.Tensor]   # fp32 [total_out]


def operands(layout: L.GpuLayout, codebooks: list[torch.Tensor], biases: list[Optional[torch.Tensor]]) -> Operands:
    dev = layout.codes.device
    cbs = torch.zeros(len(codebooks), 256, 2, dtype=torch.float16, device=dev)
    for p, cb in enumerate(codebooks):
        cbs[p, : cb.shape[0]] = cb.to(torch.float16)
    meta = [0] * 13
    for p in range(len(layout.outs)):
        meta[p], meta[4 + p], meta[8 + p] = layout.tile_ends[p], layout.outs[p], layout.row_offsets[p]
    meta[12] = layout.total_out
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.float() if b is not None else torch.zeros(o, device=dev)
                          for b, o in zip(biases, layout.outs)]).to(dev)
    return Operands(layout, cbs.view(torch.int32).reshape(len(codebooks), 256).contiguous(),
                    torch.tensor(meta, dtype=torch.int32, device=dev),
                    torch.zeros(math.ceil(layout.n_tiles / ROWT), dtype=torch.int32, device=dev), bias)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def run(x_r: torch.Tensor, ops: Operands, slices: int = 0) -> torch.Tensor:
    """y [T, total_out] in x's dtype from the rotated input x_r [T, in] (contiguous, CUDA)."""
    lay = ops.layout
    return torch.ops.fasq.cuda_pq_linear_v2(x_r, lay.codes, ops.codebooks, lay.scales, ops.bias, ops.counters,
                                            ops.meta, lay.in_features, lay.n_spans, lay.spans_per_group,
                                            lay.total_out, lay.bits, len(lay.outs), slices)


@torch.library.custom_op("fasq::cuda_pq_linear_v2", mutates_args=())
def cuda_pq_linear_v2(x_r: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                      bias: Optional[torch.Tensor], counters: torch.Tensor, meta: torch.Tensor, in_features: int,
                      n_spans: int, spans_per_group: int, total_out: int, bits: int, nproj: int,
                      slices: int = 0) -> torch.Tensor:
    """The v2 kernel on a GPU layout (tensors of :class:`Operands`).  ``counters`` is written during the
    launch and left as it was found (all zero), so the op has no visible side effect."""
    tokens = x_r.shape[0]
    n_tiles, n_groups = codes.shape[0], scales.shape[1]
    lay = L.GpuLayout(L.LAYOUT_VERSION, bits, total_out, in_features, n_tiles, n_spans,
                      spans_per_group * L.SPAN_SUBS * L.D, codes, scales, tuple(range(nproj)), (0,) * nproj)
    launch = plan(lay, tokens, x_r.dtype, _sms(x_r.device), _capability(x_r.device), bias is not None, slices)
    if launch is None:
        raise ValueError(f"cuda_decode_v2: no launch for {tokens} tokens of {x_r.dtype} "
                         f"({n_tiles} tiles x {n_spans} spans, {nproj} layers)")
    y = _new_buffer((tokens, total_out), x_r.dtype, x_r.device)
    if tokens == 0:
        return y
    ws = _new_buffer((launch.slices, tokens, n_tiles * 16) if launch.slices > 1 else (1,), torch.float32, x_r.device)
    dev = x_r.device.index if x_r.device.index is not None else torch.cuda.current_device()
    fn = _build(build_key(launch), dev, launch.smem_bytes)
    with torch.cuda.device(dev):
        fn(grid=(launch.nblocks, 1, 1), block=(32 * launch.nwarps, 1, 1),
           args=[x_r, codes, codebooks, scales, bias if bias is not None else ws, y, ws, counters, meta, tokens,
                 in_features, n_tiles, n_spans, n_groups, spans_per_group, launch.slices, launch.per],
           shared_mem=launch.smem_bytes)
    return y


@cuda_pq_linear_v2.register_fake
def _(x_r, codes, codebooks, scales, bias, counters, meta, in_features, n_spans, spans_per_group, total_out, bits,
      nproj, slices=0):
    return x_r.new_empty((x_r.shape[0], total_out))


# ---------------------------------------------------------------------------------------------
# Layers: the layout cached on the layer, one rotation, one launch.

def _layer_key(layer) -> tuple:
    c = layer.codes
    return (c.data_ptr(), c.device, None if c.is_inference() else c._version, layer.scales.data_ptr())


def layer_operands(layers) -> Operands:
    """The operands of one layer or of layers fused into one launch, cached on the first layer
    (rebuilt when any layer's codes or scales are replaced or changed in place)."""
    layers = list(layers)
    key = tuple(_layer_key(lay) for lay in layers) + tuple(id(lay) for lay in layers)
    cache = layers[0].__dict__.setdefault("_fasq_v2_operands", {})
    hit = cache.get(len(layers))
    if hit is not None and (hit[0] == key or torch.compiler.is_compiling()):
        return hit[1]
    lays = [L.repack(lay.spec, lay.codes, lay.scales) for lay in layers]
    ops = operands(L.fuse(lays) if len(lays) > 1 else lays[0], [lay.codebooks[0] for lay in layers],
                   [lay.bias for lay in layers])
    cache[len(layers)] = (key, ops)
    return ops


def check_fusable(layers) -> str:
    """Why these layers cannot share one launch ('' when they can): one input width, the same
    rotation (signs and block: one rotation of x serves all), code width, scale groups; at most 4."""
    layers = list(layers)
    if not 1 <= len(layers) <= L.MAX_PROJECTIONS:
        return f"{len(layers)} layers (1..{L.MAX_PROJECTIONS})"
    s0 = layers[0].spec
    for i, lay in enumerate(layers):
        why = L.supports(lay.spec)
        if why:
            return f"layer {i}: {why}"
        s = lay.spec
        if (s.in_features, s.rotation_block, L.layout_bits(s.num_centroids), s.effective_group, s.has_scales) != \
                (s0.in_features, s0.rotation_block, L.layout_bits(s0.num_centroids), s0.effective_group, s0.has_scales):
            return f"layer {i}: input width, rotation block, code width or scale groups differ from layer 0's"
        if s.rotation_block and not torch.equal(lay.rot_signs, layers[0].rot_signs):
            return f"layer {i}: its rotation signs differ from layer 0's (one rotation of x must serve all)"
    return ""


def fused_linear(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """Each layer's ``x W^T + b`` (outliers not included) from one rotation of x and one launch:
    q/k/v, or gate/up.  x: [..., in], 1-16 tokens."""
    layers = list(layers)
    why = check_fusable(layers)
    if why:
        raise ValueError(f"cuda_decode_v2.fused_linear: {why}")
    s = layers[0].spec
    lead = x.shape[:-1]
    x2 = x.reshape(-1, s.in_features).contiguous()
    if s.rotation_block:
        x2 = rotate(x2, layers[0].rot_signs, s.rotation_block).contiguous()
    ops = layer_operands(layers)
    y = run(x2, ops)
    return [y[:, off: off + o].reshape(*lead, o) for off, o in zip(ops.layout.row_offsets, ops.layout.outs)]


def layer_linear(x: torch.Tensor, layer) -> torch.Tensor:
    return fused_linear(x, [layer])[0]


_broken: set[str] = set()


def _supports(layer, x: torch.Tensor) -> bool:
    if _broken or x.device.type != "cuda" or not x.shape[-1] or layer.codes.device != x.device:
        return False
    if L.supports(layer.spec) or layer.codebooks.dtype != torch.float16 or _capability(x.device) < (8, 0):
        return False
    tokens = x.numel() // x.shape[-1]
    try:
        ops = layer_operands([layer])
        launch = plan(ops.layout, tokens, x.dtype, _sms(x.device), _capability(x.device), ops.bias is not None)
        if launch is None:
            return False
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        _build(build_key(launch), dev, launch.smem_bytes)
    except Exception as e:   # no NVRTC, an old driver, ...: the next kernel serves
        _broken.add(str(e))
        log.warning("fasq: the v2 CUDA decode kernel could not be used (%s); using the next kernel", e)
        return False
    return True


if ENABLED:
    register(Kernel("cuda_decode_v2", ("cuda",), _supports, layer_linear, priority=45))
