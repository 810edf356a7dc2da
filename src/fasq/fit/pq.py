"""Weight -> stored format, calibration-free: rotation, group normalization, k-means, scale refinement."""
from __future__ import annotations

import dataclasses
import zlib

import torch

from ..config import FASQConfig
from ..errors import check_fp16_range
from ..format import LayerSpec, outlier_count, pack_codes
from ..reference import dequantize, rotate, rotation_block_for
from .kmeans import assign, kmeans


class NonFiniteWeightError(ValueError):
    pass


def layer_seed(config: FASQConfig, name: str) -> int:
    """A per-layer seed derived from the config seed and the layer name (stable across runs)."""
    return (config.seed * 1000003 + zlib.crc32(name.encode())) % (2**31 - 1)


def rotation_signs(in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (in_features,), generator=gen) * 2 - 1).to(torch.int8)


def planned_spec(out_features: int, in_features: int, config: FASQConfig, has_bias: bool) -> LayerSpec:
    """The LayerSpec :func:`quantize_weight` returns for a weight of this shape and config (known
    before any fitting: allocation and streaming size their output with it)."""
    rot = rotation_block_for(in_features, config.rotation_block) if config.rotation == "hadamard" else 0
    has_scales = config.scale_mode != "none"
    return LayerSpec(in_features=in_features, out_features=out_features, subvector_dim=config.subvector_dim,
                     num_centroids=config.codebook_size, num_codebooks=config.num_codebooks,
                     group_size=config.group_size if has_scales else 0, has_scales=has_scales,
                     rotation_block=rot if rot >= 2 else 0, has_bias=has_bias,
                     n_outliers=outlier_count(out_features, in_features, config.outlier_fraction))


def _dequantized_at(flat_idx, spec: LayerSpec, tensors: dict, chunk_rows: int = 1024) -> torch.Tensor:
    """Values of the stored weight (``reference.dequantize`` of ``tensors``) at flat indices
    ``row * in + col``, dequantizing only the rows involved, ``chunk_rows`` at a time."""
    rows, cols = flat_idx // spec.in_features, flat_idx % spec.in_features
    uniq, inv = torch.unique(rows, return_inverse=True)
    out = torch.empty(flat_idx.shape[0], dtype=torch.float32)
    for a in range(0, uniq.shape[0], chunk_rows):
        r = uniq[a: a + chunk_rows]
        part = dataclasses.replace(spec, out_features=r.shape[0], has_bias=False, n_outliers=0)
        w = dequantize(part, tensors["codes"][:, r], tensors["codebooks"], tensors["scales"][r], tensors["rot_signs"])
        sel = (inv >= a) & (inv < a + chunk_rows)
        out[sel] = w[inv[sel] - a, cols[sel]]
    return out


def _group_view(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, C] with C a multiple of group -> [out, C/group, group]."""
    return w.reshape(w.shape[0], -1, group)


def quantize_weight(weight: torch.Tensor, config: FASQConfig, name: str = "weight", bias=None,
                    device=None) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """Product-quantize ``weight`` [out, in]; returns (spec, buffers for :class:`fasq.nn.PQLinear`).

    Runs on ``device`` (default: the weight's device).  Deterministic for a config seed and name.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    dev = torch.device(device) if device is not None else weight.device
    w = weight.detach().to(dev, torch.float32)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise NonFiniteWeightError(f"layer {name!r}: weight has {bad} NaN/Inf values; fasq cannot quantize it")
    out_f, in_f = w.shape
    d, k, m_books = config.subvector_dim, config.codebook_size, config.num_codebooks
    seed = layer_seed(config, name)
    spec = planned_spec(out_f, in_f, config, bias is not None)

    # 0. Outliers: the largest-magnitude weights leave the matrix (set to 0, so that they neither set a
    #    group's scale nor pull a centroid) and are corrected exactly afterwards by a sparse side table.
    if spec.n_outliers:
        w = w.clone()  # never write into the caller's tensor
        out_idx = w.reshape(-1).abs().topk(spec.n_outliers).indices.sort().values
        out_orig = w.reshape(-1)[out_idx].clone()
        w.reshape(-1)[out_idx] = 0.0

    # 1. Rotation along in_features (randomized block Hadamard): makes rows Gaussian-like.
    rot_block = spec.rotation_block
    signs = rotation_signs(in_f, seed) if rot_block else torch.zeros(0, dtype=torch.int8)
    if rot_block:
        w = rotate(w, signs.to(dev), rot_block)

    has_scales = spec.has_scales

    # 2. Pad columns to whole sub-vectors and whole groups (padding is zero and never read back).
    g = spec.effective_group
    cols = spec.n_groups * g if has_scales else spec.padded_in
    wp = torch.zeros(out_f, cols, device=dev)
    wp[:, :in_f] = w
    valid = torch.zeros(cols, dtype=torch.bool, device=dev)
    valid[:in_f] = True

    # 3. Per-(row, group) scales that normalize each group before clustering.
    if has_scales:
        wg = _group_view(wp, g)
        cnt = _group_view(valid[None].float(), g).sum(-1).clamp_min(1)  # real columns per group
        if config.scale_mode == "rms":
            s = (wg.pow(2).sum(-1) / cnt).sqrt()
        else:
            s = wg.abs().amax(-1)
        s = torch.where(s > 0, s, torch.ones_like(s))                   # [out, G]
        check_fp16_range(s, f"layer {name!r}: scales")
    else:
        s = torch.ones(out_f, 1, device=dev)
        g = cols

    def normalized(scale):
        return (_group_view(wp, g) / scale[..., None]).reshape(out_f, cols)[:, : spec.padded_in]

    # 4. k-means per stage on normalized sub-vectors (residual stages fit what is left).
    x = normalized(s).reshape(-1, d)                                   # [out*n_sub, d]
    books, codes = [], []
    resid = x
    for m in range(m_books):
        cent, idx = kmeans(resid, k, iters=config.kmeans_iters, init=config.kmeans_init,
                           seed=seed + m, backend=config.kmeans_backend, max_points=config.kmeans_max_points)
        books.append(cent)
        codes.append(idx)
        resid = resid - cent[idx]

    # 5. Alternate: least-squares scales for the current codes, then re-assign codes.
    for _ in range(config.refine_iters if has_scales else 0):
        recon = sum(b[c] for b, c in zip(books, codes)).reshape(out_f, spec.padded_in)
        rp = torch.zeros(out_f, cols, device=dev)
        rp[:, : spec.padded_in] = recon
        num = (_group_view(wp, g) * _group_view(rp, g)).sum(-1)
        den = _group_view(rp, g).pow(2).sum(-1)
        s_new = torch.where(den > 0, num / den.clamp_min(1e-30), s)
        s = torch.where(s_new.abs() > 0, s_new, s).half().float()      # scales are stored in fp16
        resid = normalized(s).reshape(-1, d)
        for m in range(m_books):
            codes[m] = assign(resid, books[m])
            resid = resid - books[m][codes[m]]

    codes_t = torch.stack([c.reshape(out_f, spec.n_sub) for c in codes])       # [M, out, n_sub]
    books_t = torch.stack(books)
    check_fp16_range(books_t, f"layer {name!r}: codebooks")
    check_fp16_range(s, f"layer {name!r}: scales")
    tensors = {
        "codes": pack_codes(codes_t, spec.bits).cpu(),
        "codebooks": books_t.half().cpu(),
        "scales": (s.half().cpu() if has_scales else torch.zeros(out_f, 0, dtype=torch.float16)),
        "rot_signs": signs.cpu(),
    }
    if bias is not None:
        check_fp16_range(bias.detach().float(), f"layer {name!r}: bias")
        tensors["bias"] = bias.detach().half().cpu()
    if spec.n_outliers:
        out_idx = out_idx.cpu()
        tensors["outlier_idx"] = out_idx.to(torch.int32)
        val = out_orig.cpu() - _dequantized_at(out_idx, spec, tensors)
        check_fp16_range(val, f"layer {name!r}: outlier table (the largest weights, kept exactly)")
        tensors["outlier_val"] = val.half()
    return spec, tensors
