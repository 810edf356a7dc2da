"""A torch emulator of the v2 CUDA decode kernel (``pq_cuda_v2.cu``), lane by lane: which words each
lane loads for each span, the ``prmt`` that forms each table address, the table word it reads, the
tensor-core fragments those words become, the per-group scaling, the persistent grid's striped work
units and the split-K sum in slice order.  It runs on the CPU, so CI checks the kernel's addressing
bit for bit against :mod:`fasq.reference` without a GPU (tests/test_kernels_cuda_layout.py).

Fragment layouts are PTX's ``mma.m16n8k16`` (row.col, 16-bit inputs, fp32 accumulators), lane
``(g, q) = (lane // 4, lane % 4)``:

    A (16 x 16): a0 = (row g,     k 2q..2q+1)   a1 = (row g + 8, k 2q..2q+1)
                 a2 = (row g,     k 8+2q..9+2q) a3 = (row g + 8, k 8+2q..9+2q)
    B (16 x 8):  b0 = (k 2q..2q+1, col g)       b1 = (k 8+2q..9+2q, col g)
    C (16 x 8):  c0, c1 = (row g, cols 2q, 2q+1)  c2, c3 = (row g + 8, cols 2q, 2q+1)

At step ``s`` of a span, lane ``(g, q)``'s a0 / a1 are the centroids of its rows' code ``2 s`` (sub-vector
``16 q + 2 s`` of the span) and a2 / a3 those of code ``2 s + 1``; so k position ``k`` of step ``s`` is
column ``2 (16 q + 2 s + [k >= 8]) + k % 2`` of the span, with ``q = (k % 8) // 2``.
"""
from __future__ import annotations

import functools

import torch

from . import cuda_layout as L


@functools.lru_cache(maxsize=None)
def _step_columns() -> torch.Tensor:
    """int64 [8 steps, 16 k]: the span column each k position of each mma step stands for."""
    k = torch.arange(16)
    q, e, hi = (k % 8) // 2, k % 2, (k >= 8).long()
    s = torch.arange(8)[:, None]
    return 2 * (16 * q[None, :] + 2 * s + hi[None, :]) + e[None, :]


def _halves(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 words (32-bit values) [...] -> fp32 [..., 2]: their low and high 16-bit halves read as ``dtype``."""
    h = torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], dim=-1)
    h = torch.where(h >= 2**15, h - 2**16, h).to(torch.int16)
    return h.view(dtype).to(torch.float32)


def a_fragments(layout: L.GpuLayout, table: torch.Tensor, tiles: torch.Tensor, spans: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """The A operands the lanes build for (tile, span): fp32 ``[..., 8 steps, 16 rows, 16 k]``, from the
    words each lane loads (:func:`cuda_layout.lane_code_words`) and the table words it reads
    (:func:`cuda_layout.table_entries`).  tiles, spans: int64 tensors of one shape ``[...]``."""
    words = L.lane_code_words(layout, tiles, spans)                              # [..., 32, 2, W]
    proj = L.tile_projection(layout)[tiles]
    ent = L.table_entries(table, words, layout.bits, proj)                        # [..., 32, 2, 16]
    vals = _halves(ent, dtype)                                                    # [..., 32, 2, 16, 2]
    # A[s, m, k]: row m = g + 8 h, k -> lane g * 4 + q, code 2 s + [k >= 8], half k % 2.
    m = torch.arange(16)
    k = torch.arange(16)
    s = torch.arange(8)
    g, h = (m % 8)[None, :, None], (m // 8)[None, :, None]
    q, e, hi = ((k % 8) // 2)[None, None, :], (k % 2)[None, None, :], (k >= 8).long()[None, None, :]
    lane = g * 4 + q
    code = 2 * s[:, None, None] + hi
    return vals[..., lane, h, code, e]                                            # [..., 8, 16, 16]


def b_fragments(x_pad: torch.Tensor, span: int, nt: int) -> torch.Tensor:
    """The B operands for one span: fp32 ``[8 steps, 16 k, 8 nt]`` from the rotated input ``x_pad``
    ``[tokens, n_spans * 128]`` (absent tokens are zero, as the lanes that would hold them load nothing)."""
    tok = x_pad.new_zeros(8 * nt, x_pad.shape[1])
    tok[: x_pad.shape[0]] = x_pad
    cols = span * L.SPAN_SUBS * L.D + _step_columns()                             # [8, 16]
    return tok[:, cols].permute(1, 2, 0)                                          # [8, 16, 8 nt]


def emulate_weight(layout: L.GpuLayout, codebooks: list[torch.Tensor], dtype=torch.float16) -> list[torch.Tensor]:
    """W_r of each layer of ``layout`` (fp32 ``[out, in]``) rebuilt from the kernel's A fragments, each
    value times its row's group scale in fp32, as the kernel scales its fp32 accumulators."""
    table = L.smem_table(codebooks, layout.bits, dtype)
    n_cols = layout.n_spans * L.SPAN_SUBS * L.D
    w = torch.zeros(layout.n_tiles * L.TILE_ROWS, n_cols)
    tiles = torch.arange(layout.n_tiles)
    cols = _step_columns()
    for span in range(layout.n_spans):
        a = a_fragments(layout, table, tiles, torch.full_like(tiles, span), dtype)   # [tiles, 8, 16, 16]
        grp = span // layout.spans_per_group
        sc = layout.scales[:, grp].to(torch.float32).permute(0, 2, 1).reshape(-1, 1)  # [tiles * 16 (h, g), 1]
        block = a.permute(0, 2, 1, 3).reshape(-1, 8 * 16)                          # [tiles * 16, 8 * 16]
        w[:, span * L.SPAN_SUBS * L.D + cols.reshape(-1)] = block * sc
    out = []
    for p, rows in enumerate(layout.outs):
        t0 = layout.tile_ends[p - 1] if p else 0
        out.append(w[t0 * L.TILE_ROWS: t0 * L.TILE_ROWS + rows, : layout.in_features])
    return out


def units(layout: L.GpuLayout, rowt: int, slices: int) -> tuple[int, int]:
    """(tile groups, work units) of a launch: a unit is ``rowt`` tiles x one of ``slices`` slices."""
    n_tg = -(-layout.n_tiles // rowt)
    return n_tg, n_tg * slices


def schedule(n_units: int, nblocks: int, nwarps: int) -> list[list[int]]:
    """The units each warp of the persistent grid takes, in its order: worker ``w = warp * nblocks +
    block`` takes units ``w, w + W, w + 2 W, ...`` (W = nblocks * nwarps): consecutive units go to
    different multiprocessors."""
    n_workers = nblocks * nwarps
    return [list(range(w, n_units, n_workers)) for w in range(n_workers)]


def emulate_linear(layout: L.GpuLayout, codebooks: list[torch.Tensor], x_r: torch.Tensor, rowt: int,
                   slices: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y ``[T, total_out]`` in x_r's dtype (``x_r`` ``[T, in]`` already rotated, 1-16 tokens) as the
    kernel computes it: per unit, the mma steps of each span accumulated unscaled in fp32, times the
    row's scale at each group's end (or the slice's), added to the unit's sum; then the slices'
    partials summed in slice order (the first, then += each next), the bias added, rounded to x's dtype."""
    dtype = x_r.dtype
    tokens = x_r.shape[0]
    nt = 1 if tokens <= 8 else 2
    if not 1 <= tokens <= 16 or layout.n_spans % slices:
        raise ValueError(f"emulate_linear: tokens={tokens} (1..16), slices={slices} must divide {layout.n_spans} spans")
    table = L.smem_table(codebooks, layout.bits, dtype)
    n_cols = layout.n_spans * L.SPAN_SUBS * L.D
    x_pad = torch.zeros(tokens, n_cols)
    x_pad[:, : layout.in_features] = x_r.to(torch.float32)
    n_tg, n_units = units(layout, rowt, slices)
    per = layout.n_spans // slices
    u = torch.arange(n_units)
    tg, sl = u % n_tg, u // n_tg
    tiles = tg[:, None] * rowt + torch.arange(rowt)[None, :]                       # [U, R]
    tiles = tiles.clamp(max=layout.n_tiles - 1)     # past the last tile: computed, never written
    acc = torch.zeros(n_units, rowt, 16, 8 * nt)
    c = torch.zeros_like(acc)
    bs = torch.stack([b_fragments(x_pad, sp, nt) for sp in range(layout.n_spans)])   # [spans, 8, 16, N]
    for j in range(per):
        span = sl * per + j                                                         # [U]
        a = a_fragments(layout, table, tiles, span[:, None].expand_as(tiles), dtype)   # [U, R, 8, 16, 16]
        b = bs[span]                                                                # [U, 8, 16, N]
        for st in range(8):
            c = c + a[:, :, st] @ b[:, None, st]
        grp_end = ((span + 1) % layout.spans_per_group == 0) | torch.tensor(j == per - 1)
        grp = span // layout.spans_per_group
        sc = layout.scales[tiles, grp[:, None]].to(torch.float32)                   # [U, R, 8 g, 2 h]
        sc = sc.permute(0, 1, 3, 2).reshape(n_units, rowt, 16, 1)
        end = grp_end[:, None, None, None]
        acc = torch.where(end, acc + c * sc, acc)
        c = torch.where(end, torch.zeros_like(c), c)
    # Split-K in slice order: partial of slice 0, then += slices 1, 2, ...
    part = acc.reshape(slices, n_tg, rowt, 16, 8 * nt)
    y_t = part[0].clone()
    for s in range(1, slices):
        y_t = y_t + part[s]
    y_t = y_t.reshape(n_tg * rowt * 16, 8 * nt)[: layout.n_tiles * 16, :tokens]     # [tile rows, T]
    y = torch.empty(tokens, layout.total_out)
    for p, rows in enumerate(layout.outs):
        t0 = layout.tile_ends[p - 1] if p else 0
        off = layout.row_offsets[p]
        y[:, off: off + rows] = y_t[t0 * 16: t0 * 16 + rows].T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)
