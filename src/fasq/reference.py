"""Dequantize and linear in plain PyTorch: the oracle every kernel is tested against.

Runs on any device and any float dtype.  The maths (see docs/format.md):

    W_n[o, j*d:(j+1)*d] = sum_m codebooks[m, codes[m, o, j]]          # normalized, rotated
    W_r[o, c]           = W_n[o, c] * scales[o, c // group]            # rotated
    W                   = W_r[:, :in] @ R    with R = blockdiag(H_h / sqrt(h)) @ diag(rot_signs)

so ``y = W x = W_r (R x)``: a kernel may rotate the input once and use ``W_r`` directly.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .format import LayerSpec, unpack_codes


@functools.lru_cache(maxsize=32)
def _hadamard_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / (n ** 0.5)


@functools.lru_cache(maxsize=64)
def _hadamard_on(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _hadamard_cpu(n).to(device=device, dtype=dtype)


def hadamard_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of size n (a power of two); symmetric; cached per device
    and dtype (callers must not modify it in place)."""
    return _hadamard_on(n, torch.device(device) if device is not None else torch.device("cpu"), dtype)


def rotation_block_for(in_features: int, max_block: int) -> int:
    """Largest power of two that divides in_features and is at most max_block."""
    b = in_features & -in_features
    return min(b, max_block)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R x along the last dim: sign flip, then orthonormal Hadamard per block. x: [..., in]."""
    n = x.shape[-1]
    h = hadamard_matrix(block, x.device, x.dtype)
    y = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], n // block, block) @ h
    return y.reshape(x.shape)


def unrotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R^T x along the last dim (inverse of :func:`rotate`)."""
    n = x.shape[-1]
    h = hadamard_matrix(block, x.device, x.dtype)
    y = (x.reshape(*x.shape[:-1], n // block, block) @ h).reshape(x.shape)
    return y * signs.to(x.dtype)


def dequantize_rotated(spec: LayerSpec, codes: torch.Tensor, codebooks: torch.Tensor,
                       scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """W_r ``[out, in]`` in the rotated basis (equal to W when there is no rotation)."""
    d, n_sub = spec.subvector_dim, spec.n_sub
    idx = unpack_codes(codes, spec.bits, n_sub)                     # [M, out, n_sub]
    cb = codebooks.to(dtype)                                        # [M, K, d]
    w = torch.zeros(spec.out_features, n_sub, d, dtype=dtype, device=codebooks.device)
    for m in range(spec.num_codebooks):
        w += cb[m][idx[m]]                                          # [out, n_sub, d]
    w = w.reshape(spec.out_features, n_sub * d)
    if spec.has_scales:
        g = spec.effective_group
        s = scales.to(dtype).repeat_interleave(g, dim=1)[:, : n_sub * d]
        w = w * s
    return w[:, : spec.in_features]


def dequantize(spec: LayerSpec, codes, codebooks, scales, rot_signs, dtype=torch.float32) -> torch.Tensor:
    """The full-precision weight ``W[out, in]`` that the stored buffers stand for."""
    w = dequantize_rotated(spec, codes, codebooks, scales, dtype)
    if spec.rotation_block:
        w = unrotate(w, rot_signs, spec.rotation_block)
    return w


def add_outliers_to_weight(w: torch.Tensor, outliers) -> torch.Tensor:
    """W + the sparse correction (``W.view(-1)[idx] += val``); ``outliers`` is (idx, val) or None."""
    if outliers is None:
        return w
    idx, val = outliers
    w = w.clone()
    w.view(-1).index_add_(0, idx.long(), val.to(w.dtype))
    return w


def outlier_rows_cols(idx: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column (int64) of each flat outlier index ``row * in + col``."""
    idx = idx.long()
    return idx // in_features, idx % in_features


def add_outliers_to_output(y: torch.Tensor, x: torch.Tensor, rows, cols, val) -> torch.Tensor:
    """y + x S^T for the sparse correction S (n entries): ``y[..., row] += x[..., col] * val``.
    The kernel dispatcher adds this to every kernel's output; it costs O(tokens * n)."""
    return y.index_add(-1, rows, x[..., cols] * val.to(x.dtype))


def pq_linear(x: torch.Tensor, spec: LayerSpec, codes, codebooks, scales, rot_signs,
              bias=None) -> torch.Tensor:
    """y = x W^T + b computed as dequantize-then-F.linear in the input's dtype. x: [..., in]."""
    if spec.rotation_block:
        x = rotate(x, rot_signs, spec.rotation_block)
        w = dequantize_rotated(spec, codes, codebooks, scales, torch.float32).to(x.dtype)
    else:
        w = dequantize_rotated(spec, codes, codebooks, scales, torch.float32).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
