"""CUDA decode kernel for PQLinear (1-8 tokens, NVIDIA sm_80+): ``pq_cuda.cu`` built with NVRTC.

The Triton decode kernel (``triton_pq.py``) decodes codes on CUDA cores and gathers centroids
through L1 or ``tl.gather``; on an H200 it reached 6-20% of the copy bandwidth at 1 token
(BENCHMARKS.md).  This kernel does what Triton cannot express (see the source's header): a
shared-memory codebook replicated once per lane, so that a warp's 32 random lookups never conflict
on a bank, looked up by byte address (three instructions per lookup for 8-bit codes), centroids
decoded straight into tensor-core operand registers (``mma.m16n8k16``), so that the multiply-adds
cost no CUDA-core instructions, and the input rotation done in the same launch where that is
cheaper than a separate kernel.  On the H200 it is 1.5-9x faster than the Triton decode kernel and
makes 1-token layer calls 1.3-1.4x faster than FP16 ``F.linear`` at d = 2 (docs/kernels_gpu.md).

Built at first use with ``torch.cuda._compile_kernel`` (NVRTC, which the CUDA builds of PyTorch
ship; no compiler needed), one build per configuration, cached for the process.  A failed build
logs one warning and the registry moves on to the Triton kernels.  Registered as ``cuda_decode``
(priority 40, above ``triton_decode``) for the layers and inputs :func:`plan` accepts; exposed as
the custom op ``torch.ops.fasq.cuda_pq_linear`` (with a fake implementation) so that
``torch.compile`` and CUDA graphs see one opaque call per layer.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import torch

from ..format import code_bits, packed_words
from . import Kernel, outlier_csr_cached, register
from .cuda_common import compile_kernel as _compile
from .cuda_common import rotate

log = logging.getLogger(__name__)

MAX_TOKENS = 8                     # the B fragment's 8 columns
SOURCE = "pq_cuda.cu"
REPL_MAX_BYTES = 64 * 1024         # the per-lane replicated codebook up to this size, else one copy
TABLE_MAX_BYTES = 96 * 1024
SMEM_MAX_BYTES = 112 * 1024        # a block's shared memory at most (two blocks per multiprocessor)
MAX_ROT_BLOCK = 1024               # in-kernel rotation: up to 32 values per lane
FUSE_LIMIT = 64                    # in-kernel rotation while tokens * columns per thread * waves < this
# The sparse outlier correction added in the kernel's epilogue (saving the separate launch of
# triton_add_outliers) when FASQ_CUDA_FUSED_OUTLIERS=1.  Off by default: written after the last GPU
# run, it has passed the compile check only (tests/test_kernels_cuda.py runs it on a GPU).
FUSED_OUTLIERS = os.environ.get("FASQ_CUDA_FUSED_OUTLIERS", "0") == "1"


@dataclass(frozen=True)
class Config:
    """One build (the FQ_* defines) and launch of ``fasq_pq_decode``."""

    bits: int
    d: int
    run: int            # consecutive codes per lane and row in one span (a span: 4 * run sub-vectors)
    nwarps: int
    rowt: int           # 16-row tiles per warp (a block covers 16 * rowt rows)
    bf16: bool
    repl: bool
    scales: bool
    rotb: int           # > 0: the kernel rotates x itself (Hadamard blocks of rotb columns), 0: x comes rotated
    outliers: bool      # the kernel adds the layer's sparse outlier correction (FQ_OUTLIERS)
    splits: int
    spans_per_split: int


def _run_for(bits: int, d: int, n_sub: int, in_features: int, group_cols: int) -> int:
    """Codes per lane-run: the largest of 32, 16, 8 that fills whole code words, keeps x words <= 32
    (registers), divides the row into whole spans and keeps each span inside one scale group
    (``group_cols``: columns per group, 0 when one scale covers the row), preferring runs of <= 8
    code words (fewer registers; 9- to 12-bit codes such as K = 512 need up to 12); 0 when none fits."""
    for max_words in (8, 12):
        for run in (32, 16, 8):
            if (run * bits) % 32 or run * bits // 32 > max_words or (run * d // 2) % 4 or run * d // 2 > 32:
                continue
            if n_sub % (4 * run):
                continue
            if group_cols and group_cols % (4 * run * d):
                continue
            return run
    return 0


def _vec_words(code_words: int) -> int:
    """32-bit words per code load in the kernel (its VEC): 4, 2 or 1."""
    return 4 if code_words % 4 == 0 else 2 if code_words % 2 == 0 else 1


def _table_bytes(k: int, d: int, repl: bool) -> int:
    return k * d * 2 * (32 if repl else 1)


# Launches measured faster than plan()'s heuristics for one (tokens, in, out, d, K, group size, dtype,
# rotation block); filled by whoever measured them (benchmarks/gpu.py's 1-token sweep does, for its
# own run).
TUNED: dict[tuple, "Config"] = {}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(tokens: int, in_features: int, out_features: int, d: int, k: int, n_groups: int, group_size: int,
         dtype: torch.dtype, device, nwarps: int = 0, rowt: int = 0, splits: int = 0,
         rot_block: int = 0, force_rotation: bool = False, outliers: int = 0) -> Optional[Config]:
    """The launch for this layer and input, or None where the kernel does not apply.  ``splits``
    > 0 forces the split of the reduction dim (the benchmark's sweep).  ``rot_block`` > 0: the
    input still needs its rotation (Hadamard blocks of that many columns); the config has the
    kernel do it (``rotb``) where the blocks' column ranges and shared memory allow, else
    ``rotb`` is 0 and the caller rotates first.  The kernel rotates only where that is cheaper
    than the separate rotation (``FUSE_LIMIT``), unless ``force_rotation`` (tests).  ``outliers``:
    the layer's outlier count; the kernel adds them itself where ``FUSED_OUTLIERS`` is on."""
    if not 1 <= tokens <= MAX_TOKENS or d not in (2, 4) or dtype not in (torch.float16, torch.bfloat16):
        return None
    if splits <= 0 and nwarps <= 0 and rowt <= 0:
        tuned = TUNED.get((tokens, in_features, out_features, d, k, group_size, dtype, rot_block))
        if tuned is not None:
            return dataclasses.replace(tuned, outliers=bool(outliers) and FUSED_OUTLIERS)
    bits = code_bits(k)
    if bits > 16 or in_features % 8 or in_features % d:
        return None
    n_sub = in_features // d
    group_cols = group_size if n_groups > 1 else 0
    run = _run_for(bits, d, n_sub, in_features, group_cols)
    if not run:
        return None
    code_words = run * bits // 32
    if packed_words(n_sub, bits) % _vec_words(code_words):   # rows must keep the vector loads aligned
        return None
    repl = _table_bytes(k, d, True) <= REPL_MAX_BYTES
    if not repl and _table_bytes(k, d, False) > TABLE_MAX_BYTES:
        return None
    n_spans = n_sub // (4 * run)
    sms = _sm_count(torch.device(device)) if torch.device(device).type == "cuda" else 132
    # Launch shape measured fastest on an H200 (benchmarks/gpu.py's sweep, BENCHMARKS.md): 8 warps
    # per block and one 16-row tile per warp; 4 tiles per warp for tall layers (fewer blocks to
    # fill the codebook table and rotate x); 16 warps where there are fewer row blocks than SMs.
    if rowt <= 0:
        rowt = 4 if out_features >= 64 * sms and code_words <= 8 else 1
    if nwarps <= 0:   # (16 warps leave 128 registers a thread: only for runs of <= 8 code words)
        nwarps = 16 if math.ceil(out_features / (16 * rowt)) < sms and n_spans >= 16 and code_words <= 8 else 8
    row_blocks = math.ceil(out_features / (16 * rowt))
    if splits <= 0:
        # One split (no second kernel) is fastest down to a few dozen row blocks; below that the
        # card needs the split's extra blocks.
        splits = 1 if 4 * row_blocks >= sms else min(max(1, n_spans // nwarps), math.ceil(sms / row_blocks))
    splits = max(1, min(splits, n_spans))
    per = math.ceil(n_spans / splits)
    splits = math.ceil(n_spans / per)
    rotb = 0
    # Every block rotates all of its columns for every token: worth it while that prologue costs
    # less than the separate rotation it replaces (~7 us with its launch).  On an H200 the
    # prologue cost ~0.1 us per column-token per thread, times the waves of blocks: fused below
    # 64 of those (runs of benchmarks/gpu.py, BENCHMARKS.md).
    width = per * 4 * run * d
    waves = max(1.0, row_blocks * splits / (2 * sms))
    cheap = tokens * width / (32 * nwarps) * waves < FUSE_LIMIT
    if rot_block and (cheap or force_rotation) and os.environ.get("FASQ_CUDA_FUSED_ROTATION", "1") != "0":
        chunk = max(32, rot_block)
        table = (_table_bytes(k, d, repl) + 15) // 16 * 16 + nwarps * 16 * rowt * 8 * 4
        if (rot_block <= MAX_ROT_BLOCK and width % chunk == 0 and in_features % chunk == 0
                and table + tokens * width * 2 <= SMEM_MAX_BYTES):
            rotb = rot_block
    return Config(bits, d, run, nwarps, rowt, dtype == torch.bfloat16, repl, n_groups > 0, rotb,
                  bool(outliers) and FUSED_OUTLIERS, splits, per)


def _fast() -> bool:
    """The kernel's fast lookups and ping-pong loop (``FQ_FAST``); FASQ_CUDA_FAST=0 builds the plain
    version, kept as a fallback and for comparison."""
    return os.environ.get("FASQ_CUDA_FAST", "1") != "0"


def _defines(cfg: Config, split: bool, bias_kind: int, fast: bool = True) -> str:
    vals = dict(FQ_FAST=int(fast), FQ_BITS=cfg.bits, FQ_D=cfg.d, FQ_RUN=cfg.run, FQ_NWARPS=cfg.nwarps, FQ_ROWT=cfg.rowt,
                FQ_XBF16=int(cfg.bf16), FQ_REPL=int(cfg.repl), FQ_SCALES=int(cfg.scales), FQ_SPLIT=int(split),
                FQ_BIAS=bias_kind, FQ_ROTB=cfg.rotb, FQ_OUTLIERS=int(cfg.outliers), FQ_ROTS=f"{1.0 / math.sqrt(cfg.rotb or 1):.9e}f")
    return "".join(f"#define {n} {v}\n" for n, v in vals.items())


@functools.lru_cache(maxsize=None)
def source() -> str:
    return resources.files("fasq.kernels").joinpath(SOURCE).read_text()


_REDUCE = r"""
extern "C" __global__ void fasq_splitk_reduce(const float* __restrict__ ws, const void* __restrict__ bias,
                                              unsigned short* __restrict__ y, int N, int OUT, int SPLITS) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    float v = 0.f;
    for (int s = 0; s < SPLITS; ++s) v += ws[(long long)s * N + i];
#if FQ_BIAS == 1
    { float b; asm("cvt.f32.f16 %0, %1;" : "=f"(b) : "h"(((const unsigned short*)bias)[i % OUT])); v += b; }
#elif FQ_BIAS == 2
    { float b; asm("mov.b32 %0, %1;" : "=f"(b) : "r"(((unsigned)((const unsigned short*)bias)[i % OUT]) << 16)); v += b; }
#elif FQ_BIAS == 3
    v += ((const float*)bias)[i % OUT];
#endif
    unsigned short h;
#if FQ_XBF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
    y[i] = h;
}
"""


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write comes from here (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _build_key(cfg: Config) -> tuple:
    """The fields of a Config that the build depends on (splits are launch arguments)."""
    return cfg.bits, cfg.d, cfg.run, cfg.nwarps, cfg.rowt, cfg.bf16, cfg.repl, cfg.scales, cfg.rotb, cfg.outliers


@functools.lru_cache(maxsize=None)
def _build(build_key: tuple, split: bool, bias_kind: int, fast: bool, device: int):
    """One build per device too: a loaded module belongs to its device's context (the build targets
    that device's compute capability)."""
    cfg = Config(*build_key, splits=1, spans_per_split=1)
    with torch.cuda.device(device):
        return _compile(_defines(cfg, split, bias_kind, fast) + source(), "fasq_pq_decode")


_SMEM_SET: dict[int, int] = {}   # id(kernel) -> dynamic shared memory it was allowed


def _decode_kernel(build_key: tuple, split: bool, bias_kind: int, smem: int, device: int):
    """The build for these defines on this device, allowed ``smem`` bytes of dynamic shared memory."""
    fn = _build(build_key, split, bias_kind, _fast(), device)
    if smem >= 48 * 1024 and _SMEM_SET.get(id(fn), 0) < smem:
        if not hasattr(fn, "set_shared_memory_config"):
            raise RuntimeError(f"torch {torch.__version__}: compiled kernels cannot take {smem} bytes of shared memory")
        with torch.cuda.device(device):
            fn.set_shared_memory_config(smem)
        _SMEM_SET[id(fn)] = smem
    return fn


@functools.lru_cache(maxsize=None)
def _reduce_kernel(bf16: bool, bias_kind: int, device: int):
    with torch.cuda.device(device):
        return _compile(f"#define FQ_XBF16 {int(bf16)}\n#define FQ_BIAS {bias_kind}\n" + _REDUCE, "fasq_splitk_reduce")


_BIAS_KIND = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


def _smem_bytes(cfg: Config, k: int, tokens: int) -> int:
    table = _table_bytes(k, cfg.d, cfg.repl)
    table = (table + 15) // 16 * 16
    xs = tokens * cfg.spans_per_split * 4 * cfg.run * cfg.d * 2 if cfg.rotb else 0
    return table + cfg.nwarps * 16 * cfg.rowt * 8 * 4 + xs


def _launch(x, codes, codebooks, scales, bias, rot_signs, y, cfg: Config, in_features: int, subvector_dim: int,
            group_size: int, n_groups: int, k: int, tokens: int, out: int, dev: int, x_orig, outliers) -> None:
    split = cfg.splits > 1
    bias_kind = 0 if bias is None else _BIAS_KIND[bias.dtype]
    smem = _smem_bytes(cfg, k, tokens)
    fn = _decode_kernel(_build_key(cfg), split, 0 if split else bias_kind, smem, dev)
    dst = _new_buffer((cfg.splits, tokens, out), torch.float32, x.device) if split else y
    n_spans = in_features // subvector_dim // (4 * cfg.run)
    span_cols = 4 * cfg.run * subvector_dim
    spans_per_group = group_size // span_cols if n_groups > 1 else n_spans
    words = codes.shape[2]
    fn(grid=(math.ceil(out / (16 * cfg.rowt)), cfg.splits, 1), block=(32 * cfg.nwarps, 1, 1),
       args=[x, rot_signs if cfg.rotb else x, codes, codebooks, scales,
             bias if bias is not None and not split else x, dst,
             tokens, in_features, out, words, k, max(n_groups, 1), spans_per_group, cfg.spans_per_split, n_spans,
             *((x_orig, *outliers) if cfg.outliers else (x, x, x, x))],
       shared_mem=smem)
    if split:
        n = tokens * out
        _reduce_kernel(cfg.bf16, bias_kind, dev)(grid=(math.ceil(n / 256), 1, 1), block=(256, 1, 1),
                                                 args=[dst, bias if bias is not None else dst, y, n, out, cfg.splits])


def pq_decode(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
              bias: Optional[torch.Tensor], in_features: int, subvector_dim: int, group_size: int,
              cfg: Optional[Config] = None, rot_signs: Optional[torch.Tensor] = None,
              rotation_block: int = 0, outliers: Optional[tuple] = None) -> torch.Tensor:
    """y [T, out] = rotate(x) [T, in] @ W_r^T (+ bias) in x's dtype; x contiguous.  Without
    ``rotation_block`` x is taken as already rotated; with it the kernel rotates x itself where
    the config allows (``cfg.rotb``), else it is rotated first.  ``outliers`` (rowptr, cols, vals
    of :func:`fasq.kernels.outlier_csr`): added by the kernel where ``cfg.outliers``, else left
    out (the registry adds them)."""
    tokens = x.shape[0]
    out = codes.shape[1]
    k = codebooks.shape[1]
    n_groups = scales.shape[1] if scales.dim() == 2 else 0
    if cfg is None:
        cfg = plan(tokens, in_features, out, subvector_dim, k, n_groups, group_size, x.dtype, x.device,
                   rot_block=rotation_block, outliers=0 if outliers is None else outliers[1].numel())
        if cfg is None:
            raise ValueError("cuda_decode: this layer/input is not supported (see cuda_decode.plan)")
    if cfg.outliers and outliers is None:
        raise ValueError("cuda_decode: the config adds outliers, but none were given")
    x_orig = x
    if rotation_block and cfg.rotb != rotation_block:
        if cfg.rotb:
            raise ValueError(f"cuda_decode: config rotates blocks of {cfg.rotb}, the layer's are {rotation_block}")
        x = rotate(x, rot_signs, rotation_block).contiguous()
    elif cfg.rotb and not rotation_block:
        raise ValueError("cuda_decode: the config rotates x, but no rotation was given")
    y = _new_buffer((tokens, out), x.dtype, x.device)
    if tokens == 0 or out == 0:
        return y
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if dev != torch.cuda.current_device():    # launch on x's device (its current stream)
        with torch.cuda.device(dev):
            _launch(x, codes, codebooks, scales, bias, rot_signs, y, cfg, in_features, subvector_dim, group_size,
                    n_groups, k, tokens, out, dev, x_orig, outliers)
    else:
        _launch(x, codes, codebooks, scales, bias, rot_signs, y, cfg, in_features, subvector_dim, group_size,
                n_groups, k, tokens, out, dev, x_orig, outliers)
    return y


# ---------------------------------------------------------------------------------------------
# Rotation, op and registry entry.

@torch.library.custom_op("fasq::cuda_pq_linear", mutates_args=())
def cuda_pq_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                   rot_signs: torch.Tensor, bias: Optional[torch.Tensor], in_features: int, subvector_dim: int,
                   group_size: int, rotation_block: int, orow: Optional[torch.Tensor] = None,
                   ocol: Optional[torch.Tensor] = None, oval: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T + b for a PQ layer with the CUDA decode kernel; x: [..., in], 1-8 tokens.  With
    ``orow`` / ``ocol`` / ``oval`` (the outliers as CSR) the sparse correction is included."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    y = pq_decode(x2, codes.contiguous(), codebooks.contiguous(), scales.contiguous(),
                  None if bias is None else bias.contiguous(), in_features, subvector_dim, group_size,
                  rot_signs=rot_signs.contiguous(), rotation_block=rotation_block,
                  outliers=None if orow is None else (orow, ocol, oval))
    return y.reshape(*lead, codes.shape[1])


@cuda_pq_linear.register_fake
def _(x, codes, codebooks, scales, rot_signs, bias, in_features, subvector_dim, group_size, rotation_block,
      orow=None, ocol=None, oval=None):
    return x.new_empty((*x.shape[:-1], codes.shape[1]))


def _fused_outliers(layer, x=None) -> bool:
    """Whether :func:`layer_linear` includes this layer's outlier correction."""
    return FUSED_OUTLIERS and layer.spec.n_outliers > 0


def layer_linear(x: torch.Tensor, layer) -> torch.Tensor:
    s = layer.spec
    csr = outlier_csr_cached(layer) if _fused_outliers(layer) else (None, None, None)
    return torch.ops.fasq.cuda_pq_linear(x, layer.codes, layer.codebooks, layer.scales, layer.rot_signs, layer.bias,
                                         s.in_features, s.subvector_dim, s.effective_group, s.rotation_block, *csr)


_broken: set[str] = set()


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _supports(layer, x: torch.Tensor) -> bool:
    if _broken or x.device.type != "cuda" or not x.shape[-1]:
        return False
    s = layer.spec
    if s.num_codebooks != 1 or layer.codebooks.dtype != torch.float16 or layer.codes.device != x.device:
        return False
    if _capability(x.device) < (8, 0):
        return False
    tokens = x.numel() // x.shape[-1]
    n_groups = layer.scales.shape[1] if layer.scales.dim() == 2 else 0
    cfg = plan(tokens, s.in_features, s.out_features, s.subvector_dim, s.num_centroids, n_groups,
               s.effective_group, x.dtype, x.device, rot_block=s.rotation_block, outliers=s.n_outliers)
    if cfg is None:
        return False
    try:  # build now, so that a failed build falls back to the next kernel instead of failing the call
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        _decode_kernel(_build_key(cfg), cfg.splits > 1,
                       0 if cfg.splits > 1 or layer.bias is None else _BIAS_KIND[layer.bias.dtype],
                       _smem_bytes(cfg, s.num_centroids, tokens), dev)
        if cfg.splits > 1:
            _reduce_kernel(cfg.bf16, 0 if layer.bias is None else _BIAS_KIND[layer.bias.dtype], dev)
    except Exception as e:  # no NVRTC, an old driver, ...: the Triton kernels serve
        _broken.add(str(e))
        log.warning("fasq: the CUDA decode kernel could not be built (%s); using the Triton kernels", e)
        return False
    return True


register(Kernel("cuda_decode", ("cuda",), _supports, layer_linear, priority=40, adds_outliers=_fused_outliers))

# The v2 kernel (cuda_decode_v2.py) registers itself only when asked for: it has not run on a GPU yet.
if os.environ.get("FASQ_CUDA_V2", "0") == "1":
    from . import cuda_decode_v2  # noqa: E402,F401  (registers cuda_decode_v2, priority 45)
