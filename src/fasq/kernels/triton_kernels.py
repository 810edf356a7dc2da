"""Triton GPU kernels for PQLinear: launch heuristics, ``torch.library`` ops and registry entries.

Importing this module imports Triton and registers three kernels with :mod:`fasq.kernels`
(the registry imports it the first time a layer runs on a CUDA device):

==================  =========  ==================================================================
name                priority   used for
==================  =========  ==================================================================
``triton_decode``   30         1-4 tokens (1-16 where the packed dequantize does not apply):
                               LUT-free direct compute, split-K, CUDA cores / tl.dot
``triton_dequant``  20         more tokens: write W_r in x's dtype, then cuBLAS ``F.linear``
``triton_prefill``  10         fallback: decode W_r tiles to registers, ``tl.dot``
==================  =========  ==================================================================

Above them all, ``cuda_decode`` (priority 40, :mod:`fasq.kernels.cuda_decode`) takes 1-8 tokens
wherever its layout rules allow (d = 2 or 4, one fp16 codebook, fp16 / bf16 inputs); on the H200 it
is 1.5-9x faster than ``triton_decode``.  The thresholds below come from ``benchmarks/gpu.py`` on an
H200 (BENCHMARKS.md): from 5 tokens on,
the packed dequantize (about 2.3 TB/s written) plus cuBLAS beats the decode kernel, and at every
token count from 16 to 2048 it beats the prefill kernel by 4-10x.

All three compute ``y = rotate(x) @ W_r^T + b`` like :func:`fasq.reference.pq_linear` and are
exposed as one custom op, ``torch.ops.fasq.triton_pq_linear`` (with a fake implementation), so
``torch.compile`` and CUDA graphs see one opaque call per layer.  The op allocates nothing that
outlives the call, except one cached Hadamard matrix per (block, device, dtype): run a layer
once before capturing a CUDA graph (as warm-up always does) so that it is built outside capture.
The op also runs on CPU tensors under ``TRITON_INTERPRET=1``; that is how CI checks it.

The 1-token decode launch (8-row tiles, 2 warps, ``tl.gather`` codebook for 8-bit codes) is the
fastest of ``benchmarks/gpu.py``'s sweep on every Llama-3-8B shape measured there (H200); the other
launch sizes are first choices that the benchmark reports on.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from .. import reference
from ..format import code_bits, packed_words
from . import Kernel, hadamard_cached, outlier_csr_cached, register, register_outlier_adder, rotate_cached
from .triton_pq import dequant_kernel, outlier_add_kernel, pq_matmul_kernel, rotate_kernel, splitk_reduce_kernel

DECODE_MAX_TOKENS = 16
METHODS = ("decode", "prefill", "dequant")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SUBVECTOR_DIM = 16
MAX_CODE_BITS = 16
MAX_CODEBOOKS = 8
CB_SMEM_MAX_K = 4096     # codebooks a program may hold whole for tl.gather (Launch.cb_smem)

# True when the Triton interpreter runs the kernels (TRITON_INTERPRET=1 at import): the
# interpreter computes bf16 tl.dot wrongly, so dots are done on fp32 operands there.
INTERPRETED = not isinstance(pq_matmul_kernel, triton.runtime.JITFunction)


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Launch:
    """Block sizes and grid split of one pq_matmul launch (reduction blocks count sub-vectors)."""

    block_t: int
    block_o: int
    block_j: int
    use_dot: bool
    splits: int
    subs_per_split: int
    num_warps: int = 4
    num_stages: int = 2
    # Fast paths of pq_matmul_kernel (see its docstring); each is used only where it applies.
    acc_wide: bool = True
    block_scale: bool = True
    cb_vec: bool = True
    code_typed: bool = True
    x_vec: bool = True
    cb_smem: bool = False


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter on CPU: any small number


def _block_j(columns: int, subvector_dim: int, bits: int) -> int:
    """Sub-vectors per reduction block: about ``columns`` input columns; at least 16 (tl.dot's
    least K) and a multiple of the codes per word when codes do not straddle words."""
    per_word = 32 // bits if 32 % bits == 0 else 1
    return max(16, per_word, triton.next_power_of_2(max(1, columns // subvector_dim)))


# Launches measured faster than the heuristics below for one (tokens, in, out, d, code bits, group
# size) key; filled by whoever measured them (benchmarks/gpu.py's 1-token sweep does, for its run).
DECODE_TUNED: dict[tuple, Launch] = {}


def _fit_group(block_j: int, subvector_dim: int, bits: int, group_size: int) -> int:
    """block_j, halved while that lets every reduction block lie inside one scale group (so the
    kernel loads one scale per row and block) and keeps it >= 16; never below the least block
    ``_block_j`` allows for these codes.  ``group_size`` 0: per-row scales (or none)."""
    subs = group_size // subvector_dim if group_size and group_size % subvector_dim == 0 else 0
    while subs and subs % block_j and block_j // 2 >= 16:
        block_j //= 2
    return max(block_j, _block_j(1, subvector_dim, bits))


def decode_launch(tokens: int, in_features: int, out_features: int, subvector_dim: int, bits: int,
                  device, split_k: int = 0, group_size: int = 0) -> Launch:
    """Few tokens: one token tile, small output tiles, the reduction dim split over programs.

    For 1-4 tokens a [tokens, BLOCK_O, BLOCK_J] multiply-and-sum on CUDA cores; for 5-16 the
    token tile is padded to 16 and fed to ``tl.dot``.  ``split_k`` > 0 forces the split count.
    ``group_size``: columns per scale group (0: per-row scales or none), to align the blocks.
    """
    if tokens > DECODE_MAX_TOKENS:
        raise ValueError(f"decode kernel: {tokens} tokens, at most {DECODE_MAX_TOKENS} allowed")
    tuned = DECODE_TUNED.get((tokens, in_features, out_features, subvector_dim, bits, group_size))
    if tuned is not None and split_k <= 0:
        return tuned
    bt = triton.next_power_of_2(max(tokens, 1))
    if bt <= 4:
        block_o, block_j, use_dot = 16, _block_j(256 // bt, subvector_dim, bits), False
    else:
        bt, block_o, block_j, use_dot = 16, 16, _block_j(128, subvector_dim, bits), True
    block_j = _fit_group(block_j, subvector_dim, bits, group_size)
    n_sub = triton.cdiv(in_features, subvector_dim)
    chunks = triton.cdiv(n_sub, block_j)
    if split_k > 0:
        splits = min(split_k, chunks)
    else:  # enough programs to fill the card several times over, each still looping >= 2 blocks
        programs = 4 * _sm_count(torch.device(device))
        splits = max(1, min(triton.cdiv(programs, triton.cdiv(out_features, block_o)), chunks // 2))
    per = triton.cdiv(chunks, splits)
    if bt == 1:
        # Measured (H200, benchmarks/gpu.py sweep): the same split with 8-row tiles on 2 warps is
        # 5-35% faster on every 8B shape, and the tl.gather codebook helps 8-bit codes only.
        return Launch(1, 8, block_j, False, triton.cdiv(chunks, per), per * block_j, num_warps=2,
                      cb_smem=bits == 8)
    return Launch(bt, block_o, block_j, use_dot, triton.cdiv(chunks, per), per * block_j)


def prefill_launch(tokens: int, in_features: int, out_features: int, subvector_dim: int, bits: int,
                   group_size: int = 0) -> Launch:
    """Many tokens: [BLOCK_T, BLOCK_O] output tiles, whole reduction per program, tensor cores."""
    bt = 128 if tokens >= 128 else max(16, triton.next_power_of_2(tokens))
    n_sub = triton.cdiv(in_features, subvector_dim)
    block_j = _fit_group(_block_j(32, subvector_dim, bits), subvector_dim, bits, group_size)
    return Launch(bt, 128, block_j, True, 1, n_sub, num_warps=8 if bt >= 64 else 4, num_stages=3)


# ---------------------------------------------------------------------------------------------
# Host side of the kernels.  Tensors: x [T, in] (rotated), codes int32 [M, out, words],
# codebooks [M, K, d], scales [out, G] (G = 0: no scales), bias [out] or None.

def _geometry(codes, codebooks, scales, in_features: int, subvector_dim: int, group_size: int) -> dict:
    m, out, words = codes.shape
    k = codebooks.shape[1]
    bits = code_bits(k)
    n_groups = scales.shape[1] if scales.dim() == 2 else 0
    return dict(IN=in_features, OUT=out, N_SUB=math.ceil(in_features / subvector_dim), WORDS=words, K=k,
                N_GROUPS=n_groups, GROUP=group_size if n_groups else 1, BITS=bits, D=subvector_dim,
                NUM_BOOKS=m, HAS_SCALES=n_groups > 0)


def check_layout(codes, codebooks, scales, in_features: int, subvector_dim: int, group_size: int) -> None:
    """Raise ValueError naming the buffer when the tensors do not form a layer these kernels read."""
    if codes.dim() != 3 or codes.dtype != torch.int32:
        raise ValueError(f"codes: expected int32 [M, out, words], got {codes.dtype} {tuple(codes.shape)}")
    m, out, words = codes.shape
    if codebooks.dim() != 3 or codebooks.shape[0] != m or codebooks.shape[2] != subvector_dim:
        raise ValueError(f"codebooks: expected [{m}, K, {subvector_dim}], got {tuple(codebooks.shape)}")
    k = codebooks.shape[1]
    if not 2 <= k <= 1 << MAX_CODE_BITS or subvector_dim > MAX_SUBVECTOR_DIM or m > MAX_CODEBOOKS:
        raise ValueError(f"Triton kernels take K in 2..{1 << MAX_CODE_BITS}, d <= {MAX_SUBVECTOR_DIM} and "
                         f"M <= {MAX_CODEBOOKS}; got K={k}, d={subvector_dim}, M={m}")
    want = packed_words(math.ceil(in_features / subvector_dim), code_bits(k))
    if words != want:
        raise ValueError(f"codes: {words} words per row, but in_features={in_features}, d={subvector_dim}, "
                         f"K={k} pack into {want}")
    if scales.numel() and (tuple(scales.shape) != (out, math.ceil(math.ceil(in_features / subvector_dim)
                                                                 * subvector_dim / group_size))):
        raise ValueError(f"scales: shape {tuple(scales.shape)} does not fit out={out}, in={in_features}, "
                         f"group_size={group_size}")
    if scales.numel() and group_size % subvector_dim:
        raise ValueError(f"group_size={group_size} must be a multiple of subvector_dim={subvector_dim}")


_TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_LITTLE = sys.byteorder == "little"   # the word views below put element 0 in the low bits


def _scale_group(geo: dict) -> int:
    """Columns per scale group as the launch heuristics take it: 0 for per-row scales or none."""
    return geo["GROUP"] if geo["N_GROUPS"] > 1 else 0


def _blocks_in_group(geo: dict, block_j: int) -> bool:
    """Every reduction block of ``block_j`` sub-vectors lies inside one scale group."""
    return geo["HAS_SCALES"] and (geo["N_GROUPS"] == 1 or geo["GROUP"] % (block_j * geo["D"]) == 0)


def _centroid_words(subvector_dim: int, codebook_dtype) -> bool:
    """fp16 centroids of d = 2 or 4 can be read as one int32 / int64 word (:func:`_centroid_view`)."""
    return _LITTLE and subvector_dim in (2, 4) and codebook_dtype == torch.float16


def _typed_codes(bits: int) -> bool:
    """8- and 16-bit codes can be read through a uint8 / int16 view (:func:`_code_view`)."""
    return _LITTLE and bits in (8, 16)


def fast_paths(cfg: Launch, geo: dict, codebooks: torch.Tensor, x: torch.Tensor) -> dict:
    """The kernel's fast-path switches for this launch: those ``cfg`` asks for that apply."""
    d = geo["D"]
    x_word = d * x.element_size() if x.element_size() == 2 else 0   # fp16 / bf16 inputs
    cb_vec = cfg.cb_vec and _centroid_words(d, codebooks.dtype)
    cb_smem = cfg.cb_smem and cb_vec and geo["NUM_BOOKS"] == 1 and geo["K"] <= CB_SMEM_MAX_K
    return dict(CB_SMEM=cb_smem, K_POW2=triton.next_power_of_2(geo["K"]) if cb_smem else 1,
                ACC_WIDE=cfg.acc_wide and not cfg.use_dot,
                BLOCK_SCALE=bool(cfg.block_scale and _blocks_in_group(geo, cfg.block_j)),
                CB_VEC=cb_vec,
                CODE_TYPED=cfg.code_typed and _typed_codes(geo["BITS"]),
                X_VEC=cfg.x_vec and _LITTLE and x_word in (4, 8) and geo["IN"] % d == 0
                and x.data_ptr() % x_word == 0,
                X_DTYPE=getattr(triton.language, _TL_DTYPES[x.dtype]))


def _x_view(x: torch.Tensor, d: int) -> torch.Tensor:
    """x [T, in] as one int32 / int64 word per sub-vector: [T, in / d]."""
    return x.view(torch.int32 if d * x.element_size() == 4 else torch.int64)


def _code_view(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The int32 code words as uint8 (8-bit codes) or int16 (16-bit codes): code j is element j."""
    return codes.view(torch.uint8 if bits == 8 else torch.int16)


def _centroid_view(codebooks: torch.Tensor) -> torch.Tensor:
    """fp16 codebooks [M, K, d] (d = 2 or 4) as one int32 / int64 word per centroid: [M, K, 1]."""
    return codebooks.view(torch.int32 if codebooks.shape[-1] == 2 else torch.int64)


def pq_matmul(x: torch.Tensor, codes, codebooks, scales, bias, in_features: int, subvector_dim: int,
              group_size: int, method: str = "decode", split_k: int = 0, launch: Launch | None = None
              ) -> torch.Tensor:
    """y [T, out] = x [T, in] @ W_r^T (+ bias) in x's dtype; x is already in the rotated basis.

    ``launch`` overrides the block sizes the heuristics pick (the benchmark's sweep uses it).
    """
    geo = _geometry(codes, codebooks, scales, in_features, subvector_dim, group_size)
    tokens, out = x.shape[0], geo["OUT"]
    y = _new_buffer((tokens, out), x.dtype, x.device)
    if tokens == 0 or out == 0:
        return y
    group = _scale_group(geo)
    if launch is not None:
        cfg = launch
    elif method == "decode":
        cfg = decode_launch(tokens, in_features, out, subvector_dim, geo["BITS"], x.device, split_k, group)
    elif method == "prefill":
        cfg = prefill_launch(tokens, in_features, out, subvector_dim, geo["BITS"], group)
    else:
        raise ValueError(f"method={method!r}: pq_matmul takes 'decode' or 'prefill'")
    split = cfg.splits > 1
    dst = _new_buffer((cfg.splits, tokens, out), torch.float32, x.device) if split else y
    grid = (triton.cdiv(tokens, cfg.block_t), triton.cdiv(out, cfg.block_o), cfg.splits)
    has_bias = bias is not None and not split
    fast = fast_paths(cfg, geo, codebooks, x)
    pq_matmul_kernel[grid](
        _x_view(x, geo["D"]) if fast["X_VEC"] else x, _code_view(codes, geo["BITS"]) if fast["CODE_TYPED"] else codes,
        _centroid_view(codebooks) if fast["CB_VEC"] else codebooks, scales, bias if has_bias else x, dst,
        tokens, in_features, out, geo["N_SUB"], geo["WORDS"], geo["K"], geo["N_GROUPS"], geo["GROUP"],
        cfg.subs_per_split, tokens * out,
        BITS=geo["BITS"], D=geo["D"], NUM_BOOKS=geo["NUM_BOOKS"], HAS_SCALES=geo["HAS_SCALES"],
        HAS_BIAS=has_bias, BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o, BLOCK_J=cfg.block_j,
        USE_DOT=cfg.use_dot, DOT_FP32=INTERPRETED or x.dtype == torch.float32, **fast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split:
        n, block = tokens * out, 1024
        splitk_reduce_kernel[(triton.cdiv(n, block),)](
            dst, bias if bias is not None else dst, y, n, out, cfg.splits,
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return y


def packed_dequant_applies(subvector_dim: int, num_books: int, codebook_dtype, dtype, in_features: int) -> bool:
    """Whether :func:`dequantize_rotated` can take its packed path (one word per sub-vector)."""
    return (_centroid_words(subvector_dim, codebook_dtype) and num_books == 1
            and dtype in (torch.float16, torch.bfloat16) and in_features % subvector_dim == 0)


def dequantize_rotated(codes, codebooks, scales, in_features: int, subvector_dim: int, group_size: int,
                       dtype=torch.float16, packed: bool = True) -> torch.Tensor:
    """W_r [out, in] in ``dtype``, written by the Triton dequant kernel (``packed``: its one-word-
    per-sub-vector path where it applies)."""
    geo = _geometry(codes, codebooks, scales, in_features, subvector_dim, group_size)
    out, d = geo["OUT"], subvector_dim
    w = _new_buffer((out, in_features), dtype, codes.device)
    if out == 0 or in_features == 0:
        return w
    if packed and packed_dequant_applies(d, geo["NUM_BOOKS"], codebooks.dtype, dtype, in_features):
        block_o, block_j = 16, _fit_group(_block_j(256 // d, d, geo["BITS"]), d, geo["BITS"], _scale_group(geo))
        typed = _typed_codes(geo["BITS"])
        block_scale = _blocks_in_group(geo, block_j)
        dequant_kernel[(triton.cdiv(geo["N_SUB"], block_j), triton.cdiv(out, block_o))](
            _code_view(codes, geo["BITS"]) if typed else codes, _centroid_view(codebooks), scales, _x_view(w, d),
            in_features, out, geo["N_SUB"], geo["WORDS"], geo["K"], geo["N_GROUPS"], geo["GROUP"],
            BITS=geo["BITS"], D=d, NUM_BOOKS=1, HAS_SCALES=geo["HAS_SCALES"], BLOCK_O=block_o, BLOCK_J=block_j,
            PACKED=True, CODE_TYPED=typed, BLOCK_SCALE=bool(block_scale),
            W_DTYPE=getattr(triton.language, _TL_DTYPES[dtype]), num_warps=4)
        return w
    block_o, block_j = 32, _block_j(128, d, geo["BITS"])
    dequant_kernel[(triton.cdiv(geo["N_SUB"], block_j), triton.cdiv(out, block_o))](
        codes, codebooks, scales, w, in_features, out, geo["N_SUB"], geo["WORDS"], geo["K"], geo["N_GROUPS"],
        geo["GROUP"], BITS=geo["BITS"], D=d, NUM_BOOKS=geo["NUM_BOOKS"], HAS_SCALES=geo["HAS_SCALES"],
        BLOCK_O=block_o, BLOCK_J=block_j, num_warps=4)
    return w


# The one-pass rotation kernel (rotate_fused) is used by rotate() where it applies.  Measured on an
# H200 (benchmarks/gpu.py, "rotation only" vs "rotation only, fused kernel"): as fast as the two
# torch ops at 1 token (5.3 us) and 18% faster at 2048 tokens (34.7 vs 42.2 us for 4096 columns).
FUSED_ROTATION = True


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Same maths as :func:`fasq.reference.rotate`, with the Hadamard matrix cached on x's device
    (a CUDA graph cannot capture a host-to-device copy); the one-pass kernel where
    ``FUSED_ROTATION`` is set and it applies."""
    if FUSED_ROTATION and fused_rotation_applies(x, block):
        return rotate_fused(x, signs, block)
    return rotate_cached(x, signs, block)


def fused_rotation_applies(x: torch.Tensor, block: int) -> bool:
    return 16 <= block <= 256 and x.dtype in SUPPORTED_DTYPES and (x.device.type == "cuda" or INTERPRETED)


def rotate_fused(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`rotate` by ``rotate_kernel``: one read and one write of x (block 16-256)."""
    if not fused_rotation_applies(x, block):
        raise ValueError(f"rotate_fused: block {block} (16-256) on {x.device} with {x.dtype} is not supported")
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = _new_buffer(x2.shape, x.dtype, x.device)
    tokens = x2.shape[0]
    if tokens == 0 or n == 0:
        return y.reshape(x.shape)
    bt = 16 if tokens <= 16 else 64
    rotate_kernel[(triton.cdiv(tokens, bt), n // block)](
        x2, signs, hadamard_cached(block, x.device, x.dtype), y, tokens, n, BLOCK=block, BLOCK_T=bt,
        BLOCK_K=min(block, 64), DOT_FP32=INTERPRETED or x.dtype == torch.float32,
        num_warps=8 if bt == 64 and block >= 128 else 4)
    return y.reshape(x.shape)


def _forward(x, codes, codebooks, scales, rot_signs, bias, in_features, subvector_dim, group_size,
             rotation_block, method, split_k):
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed are {METHODS}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} is not supported; allowed are {SUPPORTED_DTYPES}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: last dim {x.shape[-1]} != in_features={in_features}")
    check_layout(codes, codebooks, scales, in_features, subvector_dim, group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if rotation_block:
        x2 = rotate(x2, rot_signs, rotation_block)
    x2 = x2.contiguous()
    codes, codebooks, scales = codes.contiguous(), codebooks.contiguous(), scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    if method == "dequant":
        w = dequantize_rotated(codes, codebooks, scales, in_features, subvector_dim, group_size, x.dtype)
        y = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
    else:
        y = pq_matmul(x2, codes, codebooks, scales, bias, in_features, subvector_dim, group_size, method,
                      split_k)
    return y.reshape(*lead, codes.shape[1])


@torch.library.custom_op("fasq::triton_pq_linear", mutates_args=())
def triton_pq_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                     rot_signs: torch.Tensor, bias: Optional[torch.Tensor], in_features: int,
                     subvector_dim: int, group_size: int, rotation_block: int, method: str,
                     split_k: int = 0) -> torch.Tensor:
    """y = x W^T + b for a PQ layer with the Triton kernel named by ``method``; x: [..., in]."""
    return _forward(x, codes, codebooks, scales, rot_signs, bias, in_features, subvector_dim, group_size,
                    rotation_block, method, split_k)


@triton_pq_linear.register_fake
def _(x, codes, codebooks, scales, rot_signs, bias, in_features, subvector_dim, group_size, rotation_block,
      method, split_k=0):
    return x.new_empty((*x.shape[:-1], codes.shape[1]))


def layer_linear(x: torch.Tensor, layer, method: str, split_k: int = 0) -> torch.Tensor:
    """Run a :class:`fasq.nn.PQLinear` with one of the Triton kernels (no registry choice)."""
    s = layer.spec
    return torch.ops.fasq.triton_pq_linear(x, layer.codes, layer.codebooks, layer.scales, layer.rot_signs,
                                           layer.bias, s.in_features, s.subvector_dim, s.effective_group,
                                           s.rotation_block, method, split_k)


# ---------------------------------------------------------------------------------------------
# Registry entries.

@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _layer_ok(layer, x: torch.Tensor) -> bool:
    s = layer.spec
    if x.device.type != "cuda" or x.dtype not in SUPPORTED_DTYPES or x.shape[-1] != s.in_features:
        return False
    if layer.codes.device != x.device or s.bits > MAX_CODE_BITS or s.subvector_dim > MAX_SUBVECTOR_DIM:
        return False
    if s.num_codebooks > MAX_CODEBOOKS:
        return False
    cc = _capability(x.device)
    return cc >= (7, 5) and (x.dtype != torch.bfloat16 or cc >= (8, 0))


def _method_fn(method: str):
    def fn(x: torch.Tensor, layer) -> torch.Tensor:
        return layer_linear(x, layer, method)
    fn.__name__ = f"triton_{method}"
    return fn


DECODE_FEW_TOKENS = 4    # the registry's decode kernel limit where the packed dequantize applies


def _packed(layer, x: torch.Tensor) -> bool:
    s = layer.spec
    return packed_dequant_applies(s.subvector_dim, s.num_codebooks, layer.codebooks.dtype, x.dtype, s.in_features)


def _decode_ok(layer, x: torch.Tensor) -> bool:
    limit = DECODE_FEW_TOKENS if _packed(layer, x) else DECODE_MAX_TOKENS
    return _layer_ok(layer, x) and _tokens(x) <= limit


def _dequant_ok(layer, x: torch.Tensor) -> bool:
    return _layer_ok(layer, x) and (_packed(layer, x) or _tokens(x) > DECODE_MAX_TOKENS)


# ---------------------------------------------------------------------------------------------
# The sparse outlier correction in one launch (the reference's index_add takes four on a GPU).

from . import outlier_csr  # noqa: E402  (re-exported: the tests build CSR through this module)


@torch.library.custom_op("fasq::triton_add_outliers", mutates_args=())
def triton_add_outliers(y: torch.Tensor, x: torch.Tensor, rowptr: torch.Tensor, cols: torch.Tensor,
                        vals: torch.Tensor) -> torch.Tensor:
    """y + x S^T for a layer's sparse correction S given as CSR (:func:`outlier_csr`); y: [..., out],
    x: [..., in] (the layer's unrotated input)."""
    out_f, in_f = y.shape[-1], x.shape[-1]
    y2 = y.reshape(-1, out_f).contiguous()
    x2 = x.reshape(-1, in_f).contiguous()
    out = _new_buffer(y2.shape, y.dtype, y.device)
    tokens = y2.shape[0]
    if tokens and out_f:
        bt = min(16, triton.next_power_of_2(tokens))
        outlier_add_kernel[(triton.cdiv(tokens, bt), triton.cdiv(out_f, 64))](
            y2, x2, rowptr, cols, vals, out, tokens, in_f, out_f, BLOCK_T=bt, BLOCK_R=64, num_warps=4)
    return out.reshape(y.shape)


@triton_add_outliers.register_fake
def _(y, x, rowptr, cols, vals):
    return torch.empty_like(y)


def _add_outliers(y: torch.Tensor, x: torch.Tensor, layer) -> torch.Tensor:
    return torch.ops.fasq.triton_add_outliers(y, x, *outlier_csr_cached(layer))


register_outlier_adder("cuda", _add_outliers)
register(Kernel("triton_decode", ("cuda",), _decode_ok, _method_fn("decode"), priority=30))
register(Kernel("triton_dequant", ("cuda",), _dequant_ok, _method_fn("dequant"), priority=20))
register(Kernel("triton_prefill", ("cuda",), _layer_ok, _method_fn("prefill"), priority=10))
