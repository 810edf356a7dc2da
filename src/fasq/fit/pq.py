"""Weight -> stored format, calibration-free: rotation, group normalization, k-means, scale refinement."""
from __future__ import annotations

import dataclasses
import logging
import zlib

import torch

from ..config import FASQConfig
from ..errors import check_fp16_range
from ..format import LayerSpec, outlier_count, pack_codes, packed_words
from ..reference import dequantize, rotate, rotation_block_for
from . import feedback
from .kmeans import assign, few_distinct, kmeans, sample_indices, train_centroids

log = logging.getLogger(__name__)


class NonFiniteWeightError(ValueError):
    pass


# A fit holds about a dozen fp32/int64 copies of its matrix (rotated, padded, normalized, residuals, codes):
# ~40 B/weight, 2.7 GB at this many weights.  A larger matrix, and every embedding table (``table=True``),
# is fit in blocks of rows instead (:func:`_quantize_blocked`), so that its working memory is one block's
# (~80-100 B/weight of the block at d=1: pack_codes' int64 temporaries) plus the outputs.  Every linear
# of an 8B-class model is below it, and fit whole exactly as before blocks existed.
CHUNK_FROM_WEIGHTS = 1 << 26
BLOCK_WEIGHTS = 1 << 20  # weights per block of rows: Gemma-3-270M's table fit is +0.25 GB, outputs included


def fit_block_rows(out_features: int, in_features: int, table: bool = False) -> int:
    """Rows per block :func:`quantize_weight` fits a weight of this shape in; 0: the whole matrix at once."""
    if not table and out_features * in_features <= CHUNK_FROM_WEIGHTS:
        return 0
    return max(1, BLOCK_WEIGHTS // in_features)


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


def _non_finite(name: str, bad: int) -> NonFiniteWeightError:
    return NonFiniteWeightError(f"layer {name!r}: weight has {bad} NaN/Inf values; fasq cannot quantize it")


def quantize_weight(weight: torch.Tensor, config: FASQConfig, name: str = "weight", bias=None,
                    device=None, *, table: bool = False, block_rows: int | None = None,
                    hessian: torch.Tensor | None = None) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """Product-quantize ``weight`` [out, in]; returns (spec, buffers for :class:`fasq.nn.PQLinear`).

    Runs on ``device`` (default: the weight's device).  Deterministic for a config seed and name.
    A matrix over :data:`CHUNK_FROM_WEIGHTS` weights, or any with ``table`` (an embedding table, or the head
    that shares or mirrors it), is fit in blocks of rows (:func:`_quantize_blocked`); ``block_rows`` sets
    the block instead of :func:`fit_block_rows` (0: the whole matrix at once, the unblocked fit).
    ``hessian`` ``[in, in]``, the covariance of the layer's inputs: the codes are then chosen with error feedback
    (:mod:`fasq.fit.feedback`; one codebook, unblocked fits only: elsewhere it is ignored, with a log line).
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    dev = torch.device(device) if device is not None else weight.device
    out_f, in_f = weight.shape
    seed = layer_seed(config, name)
    spec = planned_spec(out_f, in_f, config, bias is not None)
    signs = rotation_signs(in_f, seed) if spec.rotation_block else torch.zeros(0, dtype=torch.int8)
    rows = fit_block_rows(out_f, in_f, table) if block_rows is None else block_rows
    if hessian is not None and (rows or config.num_codebooks != 1):
        log.info("%s: error feedback needs one codebook and a fit of the whole matrix; coding it without", name)
        hessian = None
    if rows:
        return _quantize_blocked(weight, config, name, bias, dev, spec, seed, signs, rows)
    w = weight.detach().to(dev, torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise _non_finite(name, int((~torch.isfinite(w)).sum()))
    d, k, m_books = config.subvector_dim, config.codebook_size, config.num_codebooks

    # 0. Outliers: the largest-magnitude weights leave the matrix (set to 0, so that they neither set a
    #    group's scale nor pull a centroid) and are corrected exactly afterwards by a sparse side table.
    out_idx = out_orig = None
    if spec.n_outliers:
        w = w.clone()  # never write into the caller's tensor
        out_idx = w.reshape(-1).abs().topk(spec.n_outliers).indices.sort().values
        out_orig = w.reshape(-1)[out_idx].clone()
        w.reshape(-1)[out_idx] = 0.0

    # 1-3. Rotation, padding, per-(row, group) scales.
    wp, s, g = _prepare(w, signs, spec, config, name)

    # 4. k-means per stage on normalized sub-vectors (residual stages fit what is left).
    x = _normalized(wp, s, g, spec.padded_in).reshape(-1, d)           # [out*n_sub, d]
    books, codes = [], []
    resid = x
    for m in range(m_books):
        cent, idx = kmeans(resid, k, iters=config.kmeans_iters, init=config.kmeans_init,
                           seed=seed + m, backend=config.kmeans_backend, max_points=config.kmeans_max_points)
        books.append(cent)
        codes.append(idx)
        resid = resid - cent[idx]

    # 5. Alternate: least-squares scales for the current codes, then re-assign codes.
    s, codes = _refine(wp, s, g, books, codes, spec, config)

    # 6. Error feedback: re-code column pair by column pair against the input covariance (fasq.fit.feedback).
    if hessian is not None:
        h = feedback.rotated(hessian.to(dev, torch.float32), signs.to(dev), spec.rotation_block)
        fed = feedback.feedback_codes(wp, s, g, books[0], spec.padded_in, h)
        codes = codes if fed is None else [fed]

    codes_t = torch.stack([c.reshape(out_f, spec.n_sub) for c in codes])       # [M, out, n_sub]
    return spec, _stored(spec, name, pack_codes(codes_t, spec.bits).cpu(), torch.stack(books), s, signs, bias,
                         out_idx, out_orig)


def _prepare(w: torch.Tensor, signs: torch.Tensor, spec: LayerSpec, config: FASQConfig,
             name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows ``w`` [rows, in] (outliers already zeroed) -> (rotated rows zero-padded to whole sub-vectors
    and groups [rows, cols], their per-(row, group) scales [rows, G], the group width).  Row by row: a
    block of rows gets what the whole matrix would."""
    rows, in_f = w.shape
    dev = w.device
    # 1. Rotation along in_features (randomized block Hadamard): makes rows Gaussian-like.
    if spec.rotation_block:
        w = rotate(w, signs.to(dev), spec.rotation_block)

    # 2. Pad columns to whole sub-vectors and whole groups (padding is zero and never read back).
    g = spec.effective_group
    cols = spec.n_groups * g if spec.has_scales else spec.padded_in
    wp = torch.zeros(rows, cols, device=dev)
    wp[:, :in_f] = w
    valid = torch.zeros(cols, dtype=torch.bool, device=dev)
    valid[:in_f] = True

    # 3. Per-(row, group) scales that normalize each group before clustering.
    if not spec.has_scales:
        return wp, torch.ones(rows, 1, device=dev), cols
    wg = _group_view(wp, g)
    cnt = _group_view(valid[None].float(), g).sum(-1).clamp_min(1)  # real columns per group
    if config.scale_mode == "rms":
        s = (wg.pow(2).sum(-1) / cnt).sqrt()
    else:
        s = wg.abs().amax(-1)
    s = torch.where(s > 0, s, torch.ones_like(s))                   # [rows, G]
    check_fp16_range(s, f"layer {name!r}: scales")
    return wp, s, g


def _normalized(wp: torch.Tensor, s: torch.Tensor, g: int, padded_in: int) -> torch.Tensor:
    """[rows, cols] / scales per group -> [rows, padded_in]."""
    return (_group_view(wp, g) / s[..., None]).reshape(wp.shape)[:, :padded_in]


def _assign_stages(x: torch.Tensor, books: list[torch.Tensor]) -> list[torch.Tensor]:
    """Codes of sub-vectors ``x`` [N, d] in each residual stage's codebook: [N] per stage."""
    codes = []
    for book in books:
        codes.append(assign(x, book))
        x = x - book[codes[-1]]
    return codes


def _refine(wp: torch.Tensor, s: torch.Tensor, g: int, books: list[torch.Tensor], codes: list[torch.Tensor],
            spec: LayerSpec, config: FASQConfig) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Alternate least-squares scales for the current codes and re-assigned codes (row by row)."""
    rows = wp.shape[0]
    for _ in range(config.refine_iters if spec.has_scales else 0):
        recon = sum(b[c] for b, c in zip(books, codes)).reshape(rows, spec.padded_in)
        rp = torch.zeros_like(wp)
        rp[:, : spec.padded_in] = recon
        num = (_group_view(wp, g) * _group_view(rp, g)).sum(-1)
        den = _group_view(rp, g).pow(2).sum(-1)
        s_new = torch.where(den > 0, num / den.clamp_min(1e-30), s)
        s = torch.where(s_new.abs() > 0, s_new, s).half().float()      # scales are stored in fp16
        codes = _assign_stages(_normalized(wp, s, g, spec.padded_in).reshape(-1, spec.subvector_dim), books)
    return s, codes


def _stored(spec: LayerSpec, name: str, codes: torch.Tensor, books: torch.Tensor, s: torch.Tensor,
            signs: torch.Tensor, bias, out_idx: torch.Tensor | None, out_orig: torch.Tensor | None) -> dict:
    """The buffers of a fit from packed codes [M, out, W] (on the CPU), codebooks [M, K, d], fp32 scales
    [out, G]: with the bias and the outlier table (each outlier's original value minus the stored weight there)."""
    check_fp16_range(books, f"layer {name!r}: codebooks")
    check_fp16_range(s, f"layer {name!r}: scales")
    tensors = {
        "codes": codes,
        "codebooks": books.half().cpu(),
        "scales": s.half().cpu() if spec.has_scales else torch.zeros(spec.out_features, 0, dtype=torch.float16),
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
    return tensors


# ----------------------------------------------------------------------------------------------
# The blocked fit: the same steps, never more than one block of rows in fp32 at a time.
def _quantize_blocked(weight: torch.Tensor, config: FASQConfig, name: str, bias, dev: torch.device,
                      spec: LayerSpec, seed: int, signs: torch.Tensor,
                      block_rows: int) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """:func:`quantize_weight` in blocks of ``block_rows`` rows.  Outliers are the exact global top
    magnitudes (ties: the lowest flat index); each stage's codebook is trained on sub-vectors sampled
    with :func:`fasq.fit.kmeans.sample_indices` (as k-means samples ``kmeans_max_points`` of them), and
    every row is then coded, scaled and refined with its block.  The result depends on neither the block
    size nor the thread count; it equals the whole-matrix fit whenever the matrix has no more sub-vectors
    than the sample (all are then drawn) and no two outlier candidates tie."""
    out_f, in_f = weight.shape
    d, k, n_sub = config.subvector_dim, config.codebook_size, spec.n_sub
    starts = range(0, out_f, block_rows)
    out_idx, out_orig = _top_magnitudes(weight, spec.n_outliers, block_rows, dev, name)

    def block(r0: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rows r0.. prepared (_prepare) with their outliers zeroed."""
        w = weight[r0: r0 + block_rows].detach().to(dev, torch.float32, copy=True)   # [rows, in]
        if spec.n_outliers:
            lo, hi = torch.searchsorted(out_idx, torch.tensor([r0 * in_f, (r0 + w.shape[0]) * in_f]))
            w.reshape(-1)[out_idx[lo:hi].to(dev) - r0 * in_f] = 0.0
        return _prepare(w, signs, spec, config, name)

    # 4a. Sample the normalized sub-vectors each stage's codebook is trained on.
    gens = [torch.Generator().manual_seed(seed + m) for m in range(config.num_codebooks)]
    picks = [sample_indices(out_f * n_sub, max(config.kmeans_max_points, k), gen) for gen in gens]
    train = [torch.empty(p.shape[0], d, device=dev) for p in picks]
    for r0 in starts:
        wp, s, g = block(r0)
        x = _normalized(wp, s, g, spec.padded_in).reshape(-1, d)        # sub-vectors r0*n_sub.. of the table
        bounds = torch.tensor([r0 * n_sub, r0 * n_sub + x.shape[0]])
        for p, t in zip(picks, train):
            lo, hi = torch.searchsorted(p, bounds)
            t[lo:hi] = x[(p[lo:hi] - r0 * n_sub).to(dev)]

    # 4b. Codebooks, stage by stage on the sample's residuals.
    books = []
    for m, (t, gen) in enumerate(zip(train, gens)):
        for book, c in zip(books, _assign_stages(t, books)):
            t = t - book[c]
        cent = few_distinct(t, k)
        books.append(cent if cent is not None else train_centroids(
            t, k, iters=config.kmeans_iters, init=config.kmeans_init, seed=seed + m,
            backend=config.kmeans_backend, gen=gen))

    # 4c-5. Per block: codes, then alternate least-squares scales and codes.
    codes = torch.empty(config.num_codebooks, out_f, packed_words(n_sub, spec.bits), dtype=torch.int32)
    scales = torch.ones(out_f, spec.n_groups if spec.has_scales else 1)
    for r0 in starts:
        wp, s, g = block(r0)
        rows = wp.shape[0]
        c = _assign_stages(_normalized(wp, s, g, spec.padded_in).reshape(-1, d), books)
        s, c = _refine(wp, s, g, books, c, spec, config)
        codes[:, r0: r0 + rows] = pack_codes(torch.stack([ci.reshape(rows, n_sub) for ci in c]), spec.bits).cpu()
        scales[r0: r0 + rows] = s.cpu()
    return spec, _stored(spec, name, codes, torch.stack(books), scales, signs, bias, out_idx, out_orig)


def _top_magnitudes(weight: torch.Tensor, n: int, block_rows: int, dev: torch.device,
                    name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The flat indices (sorted int64 [n]) and fp32 values of the ``n`` largest-magnitude weights, ties
    going to the lowest index, in two passes over blocks of rows (also refuses NaN/Inf weights)."""
    out_f, in_f = weight.shape
    starts = range(0, out_f, block_rows)
    top, bad = torch.zeros(0, device=dev), 0
    for r0 in starts:                      # pass 1: the n largest magnitudes, values only
        a = weight[r0: r0 + block_rows].detach().to(dev, torch.float32).abs().reshape(-1)
        bad += int((~torch.isfinite(a)).sum())
        if n:
            top = torch.cat([top, a.topk(min(n, a.numel())).values]).topk(min(n, top.numel() + a.numel())).values
    if bad:
        raise _non_finite(name, bad)
    if not n:
        return None, None
    least = top[-1]                        # the n-th largest; (top > least) are all above it
    ties_left = n - int((top > least).sum())
    idx, val = [], []
    for r0 in starts:                      # pass 2: every weight above it, and the first ties in flat order
        w = weight[r0: r0 + block_rows].detach().to(dev, torch.float32).reshape(-1)
        a = w.abs()
        tied = (a == least).nonzero()[:ties_left, 0]
        ties_left -= tied.numel()
        i = torch.cat([(a > least).nonzero()[:, 0], tied]).sort().values
        idx.append(i.cpu() + r0 * in_f)
        val.append(w[i].cpu())
    return torch.cat(idx), torch.cat(val)
