"""The GPU layout of the v2 CUDA decode kernel (``pq_cuda_v2.cu``): codes repacked, at load time,
into the order each lane of the kernel consumes them.  Pure torch: runs on any device (CPU in CI).

The stored format (docs/format.md) packs each row's codes LSB-first into int32 words; 6-bit codes
(K = 64) straddle words.  The kernel wants instead, for every warp-wide load, 512 contiguous bytes
that are exactly the codes its 32 lanes decode next, and every code in a byte of its own, so that one
byte-permute (``prmt``) turns a code into its table address.  So the codes are rewritten once, from
the stored format, into :class:`GpuLayout` (versioned: ``LAYOUT_VERSION``); the stored file does not
change.

Geometry (d = 2; K <= 64 as 6-bit codes or 128 < K <= 256 as 8-bit codes):

* a **tile** is 16 rows; a **span** is 64 sub-vectors (128 columns) of one tile.  The tensor-core
  product ``mma.m16n8k16`` takes 16 rows x 16 columns (8 sub-vectors) of W_r per step, 8 steps a span.
* lane ``(g, q) = (lane // 4, lane % 4)`` decodes rows ``g`` and ``g + 8`` of the tile, sub-vectors
  ``[16 q, 16 q + 16)`` of the span: at step ``s`` sub-vector ``16 q + 2 s`` is its A-fragment register
  for columns ``2q, 2q+1`` and ``16 q + 2 s + 1`` the one for columns ``8+2q, 9+2q`` (that permutation of
  the reduction order is matched by the x words the lane feeds its B fragment, so the sum is unchanged).
* a lane's 16 codes of one row are 4 words at 8 bits (code ``i`` = byte ``i % 4`` of word ``i // 4``) and
  3 words at 6 bits: codes ``0..11`` in the low 6 bits of the 12 bytes (code ``i`` in byte ``i % 4`` of
  word ``i // 4``), codes ``12 + j`` split in three 2-bit pieces, bits 6-7 of byte ``j`` of words 0, 1, 2
  (code bits 0-1, 2-3, 4-5).  Two shifts-and-selects (``lop3``) per 4 such codes rebuild them as bytes.
* a span's **chunk** is lane-major so that each load instruction of a warp reads contiguous memory:
  8-bit: ``[row half h (g / g+8)][lane][4 words]`` (two 16-byte loads a lane, 256 words); 6-bit:
  ``[lane][words 0-3 of the lane's 6]`` then ``[lane][words 4-5]`` (a 16- and an 8-byte load, 192 words).
* ``codes``: int32 ``[n_tiles, n_spans, chunk_words]``; rows past ``out`` and sub-vectors past ``n_sub``
  are code 0 (their x columns are absent: the kernel loads zeros there).
* ``scales``: fp16 ``[n_tiles, n_groups, 8, 2]``: lane ``(g, q)`` reads one word, the scales of its rows
  ``g`` and ``g + 8`` in the group (1.0 where the layer has none or the row is padding).

The table the kernel looks codes up in (``smem_table``): shared memory in regions of 64 KiB, byte
address ``region * 65536 + v * 256 + slot * 128 + lane * 4`` holding the centroid (two values of x's
dtype) of code ``v`` (``v & 63`` at 6 bits: a byte's two top bits, which belong to another code, just
select one of four copies).  A lane's ``prmt`` takes byte 0 and bytes 2-3 from its constant
``lane_word = region << 16 | slot << 7 | lane << 2`` and byte 1 from the code word: the address is the
permute's output, plus the table's base, which the load instruction adds for free (``LDS [R+UR]``).
32 lanes read 32 banks whatever their codes.  Two codebooks share a region (slots 0 and 1), so a fused
q/k/v launch needs two regions (128 KiB), gate/up one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..format import code_bits, unpack_codes

LAYOUT_VERSION = 1
TILE_ROWS = 16
SPAN_SUBS = 64            # sub-vectors per span: 4 lanes (q) x 16
LANE_CODES = 16           # codes per lane and row in one span
D = 2
SUPPORTED_BITS = (6, 8)
ROW_WORDS = {8: 4, 6: 3}          # words per lane and row in one span
CHUNK_WORDS = {8: 256, 6: 192}    # words per (tile, span)
REGION_BYTES = 65536
MAX_PROJECTIONS = 4               # two 64 KiB regions, two codebook slots each


def layout_bits(num_centroids: int) -> int:
    """The code width of the GPU layout for K centroids (6 or 8), or 0 where the layout does not apply."""
    b = code_bits(num_centroids)
    return b if b in SUPPORTED_BITS else 0


def prmt(a: torch.Tensor, b: torch.Tensor, sel: int) -> torch.Tensor:
    """PTX ``prmt.b32 d, a, b, sel`` (default mode, no sign replication): byte i of d is byte
    ``(sel >> 4 i) & 7`` of the 8-byte value ``b:a``.  a, b: int64 tensors holding 32-bit values."""
    out = torch.zeros_like(a)
    for i in range(4):
        k = (sel >> (4 * i)) & 7
        src = a if k < 4 else b
        out |= ((src >> (8 * (k & 3))) & 0xFF) << (8 * i)
    return out


def code_selector(byte: int) -> int:
    """The ``prmt`` selector that puts byte ``byte`` of the code word into byte 1 of the address and
    bytes 0, 2, 3 of the lane's word around it."""
    return 0x7604 | (byte << 4)


def lane_word(lane: int, projection: int) -> int:
    """A lane's constant for the table address of ``projection``'s codebook."""
    return ((projection // 2) << 16) | ((projection % 2) << 7) | (lane << 2)


@dataclass(frozen=True)
class GpuLayout:
    """One layer's codes and scales in the v2 kernel's order (see the module docstring)."""

    version: int
    bits: int
    out_features: int
    in_features: int
    n_tiles: int
    n_spans: int
    group_cols: int         # columns per scale group (a multiple of 128 or the whole padded row)
    codes: torch.Tensor     # int32 [n_tiles, n_spans, CHUNK_WORDS[bits]]
    scales: torch.Tensor    # fp16 [n_tiles, n_groups, 8, 2]
    # A fused launch (q/k/v, gate/up) holds several layers' tiles one after another: layer p owns
    # tiles [tile_ends[p-1], tile_ends[p]) and output rows [row_offsets[p], row_offsets[p] + outs[p]).
    tile_ends: tuple = ()
    outs: tuple = ()

    @property
    def row_offsets(self) -> tuple:
        return tuple(sum(self.outs[:p]) for p in range(len(self.outs)))

    @property
    def total_out(self) -> int:
        return sum(self.outs)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def spans_per_group(self) -> int:
        return self.group_cols // (SPAN_SUBS * D)


def supports(spec) -> str:
    """Why the GPU layout cannot hold this layer ('' when it can)."""
    if spec.subvector_dim != D:
        return f"subvector_dim={spec.subvector_dim} (the layout takes 2)"
    if spec.num_codebooks != 1:
        return f"num_codebooks={spec.num_codebooks} (the layout takes 1)"
    if not layout_bits(spec.num_centroids):
        return f"num_centroids={spec.num_centroids} ({code_bits(spec.num_centroids)}-bit codes; the layout takes 6 or 8)"
    if spec.in_features % 8:
        return f"in_features={spec.in_features} (a multiple of 8: x is read 8 columns at a time)"
    if spec.has_scales and spec.n_groups > 1 and spec.effective_group % (SPAN_SUBS * D):
        return f"group_size={spec.group_size} (a multiple of {SPAN_SUBS * D} columns, or one group per row)"
    return ""


def _pack_lane_codes(c: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., 16] codes -> [..., ROW_WORDS[bits]] int64 words holding 32-bit values."""
    if bits == 8:
        b = c.reshape(*c.shape[:-1], 4, 4)                      # [..., word, byte]
        return (b << (8 * torch.arange(4, device=c.device))).sum(-1)
    lo = c[..., :12].reshape(*c.shape[:-1], 3, 4)               # codes 0..11: low 6 bits of each byte
    hi = c[..., 12:]                                            # codes 12..15: [..., j]
    piece = torch.stack([(hi >> (2 * w)) & 3 for w in range(3)], dim=-2)   # [..., word, j]
    byte = lo | (piece << 6)
    return (byte << (8 * torch.arange(4, device=c.device))).sum(-1)


def repack(spec, codes: torch.Tensor, scales: torch.Tensor) -> GpuLayout:
    """The GPU layout of one layer from its stored ``codes`` int32 ``[1, out, words]`` and ``scales``
    fp16 ``[out, G]`` (on their device)."""
    why = supports(spec)
    if why:
        raise ValueError(f"cuda_layout.repack: {why}")
    bits = layout_bits(spec.num_centroids)
    out, n_sub = spec.out_features, spec.n_sub
    n_tiles, n_spans = math.ceil(out / TILE_ROWS), math.ceil(n_sub / SPAN_SUBS)
    idx = unpack_codes(codes[0], spec.bits, n_sub)                             # [out, n_sub] int64
    full = idx.new_zeros(n_tiles * TILE_ROWS, n_spans * SPAN_SUBS)
    full[:out, :n_sub] = idx
    # [tile, h, g, span, q, i] -> [tile, span, h, g, q, i]: lane = 4 g + q
    lanes = full.reshape(n_tiles, 2, 8, n_spans, 4, LANE_CODES).permute(0, 3, 1, 2, 4, 5)
    lanes = lanes.reshape(n_tiles, n_spans, 2, 32, LANE_CODES)                  # [tile, span, h, lane, 16]
    words = _pack_lane_codes(lanes, bits)                                       # [tile, span, h, lane, W]
    if bits == 8:
        chunk = words.reshape(n_tiles, n_spans, CHUNK_WORDS[8])                 # [h][lane][4]
    else:
        per_lane = words.permute(0, 1, 3, 2, 4).reshape(n_tiles, n_spans, 32, 6)   # lane: h0 w0-2, h1 w0-2
        chunk = torch.cat([per_lane[..., :4].reshape(n_tiles, n_spans, 128),
                           per_lane[..., 4:].reshape(n_tiles, n_spans, 64)], dim=-1)
    chunk = torch.where(chunk >= 2**31, chunk - 2**32, chunk).to(torch.int32).contiguous()
    group_cols = spec.effective_group if spec.has_scales and spec.n_groups > 1 else n_spans * SPAN_SUBS * D
    n_groups = n_spans * SPAN_SUBS * D // group_cols if spec.has_scales and spec.n_groups > 1 else 1
    s = torch.ones(n_tiles * TILE_ROWS, n_groups, dtype=torch.float16, device=codes.device)
    if spec.has_scales:
        s[:out, :scales.shape[1]] = scales.to(torch.float16)
    s = s.reshape(n_tiles, 2, 8, n_groups).permute(0, 3, 2, 1).contiguous()   # [tile, group, g, h]
    return GpuLayout(LAYOUT_VERSION, bits, out, spec.in_features, n_tiles, n_spans, group_cols, chunk, s,
                     (n_tiles,), (out,))


def fuse(layouts: list[GpuLayout]) -> GpuLayout:
    """One layout for layers that share their input (q/k/v, gate/up): their tiles one after another.
    They must agree on code width, input width and scale groups."""
    if not 1 <= len(layouts) <= MAX_PROJECTIONS:
        raise ValueError(f"cuda_layout.fuse: {len(layouts)} layers (1..{MAX_PROJECTIONS})")
    first = layouts[0]
    for i, lay in enumerate(layouts):
        got = (lay.bits, lay.in_features, lay.n_spans, lay.group_cols, lay.n_groups)
        want = (first.bits, first.in_features, first.n_spans, first.group_cols, first.n_groups)
        if got != want:
            raise ValueError(f"cuda_layout.fuse: layer {i} has (bits, in, spans, group columns, groups) {got}, "
                             f"layer 0 {want}")
    ends = tuple(int(sum(lay.n_tiles for lay in layouts[:p + 1])) for p in range(len(layouts)))
    outs = tuple(o for lay in layouts for o in lay.outs)
    return GpuLayout(LAYOUT_VERSION, first.bits, sum(outs), first.in_features, ends[-1], first.n_spans,
                     first.group_cols, torch.cat([lay.codes for lay in layouts]),
                     torch.cat([lay.scales for lay in layouts]), ends, outs)


def tile_projection(layout: GpuLayout) -> torch.Tensor:
    """int64 [n_tiles]: the layer (codebook) of each tile."""
    ends = torch.tensor(layout.tile_ends)
    return torch.bucketize(torch.arange(layout.n_tiles), ends, right=True)


def lane_code_words(layout: GpuLayout, tile: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """The words each lane loads for (tile, span), as the kernel addresses them: int64 ``[..., 32, 2,
    ROW_WORDS]`` (lane, row half h, word), from the flat chunk.  tile, span: int64 tensors of one shape."""
    flat = layout.codes.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    base = (tile * layout.n_spans + span) * CHUNK_WORDS[layout.bits]               # [...]
    lane = torch.arange(32, device=flat.device)
    if layout.bits == 8:
        # load h: 16 bytes at chunk + h * 128 + lane * 4 (words)
        off = (torch.arange(2, device=flat.device)[:, None] * 128 + lane[None, :] * 4)   # [h, lane]
        w = flat[base[..., None, None, None] + off.T[None, :, :, None] + torch.arange(4, device=flat.device)]
        return w                                                                        # [..., lane, h, 4]
    v4 = flat[base[..., None, None] + lane[:, None] * 4 + torch.arange(4, device=flat.device)]      # [..., lane, 4]
    v2 = flat[base[..., None, None] + 128 + lane[:, None] * 2 + torch.arange(2, device=flat.device)]  # [..., lane, 2]
    six = torch.cat([v4, v2], dim=-1)
    return six.reshape(*six.shape[:-1], 2, 3)


def lane_code_bytes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """A lane's 4 byte-holding words per row half: ``[..., W]`` code words -> ``[..., 4]``, code ``i`` in
    byte ``i % 4`` of word ``i // 4`` (its ``prmt`` source; the other bits of that byte only pick a table
    copy).  At 8 bits the code words themselves; at 6 bits words 0-2 and, for codes 12-15,
    ``lop3(lop3(w0 >> 6, w1 >> 4, 0x03030303), w2 >> 2, 0x0f0f0f0f)`` (bit-select: the mask's bits from
    the first operand, the others from the second), as the kernel computes it."""
    if bits == 8:
        return words
    w0, w1, w2 = words[..., 0], words[..., 1], words[..., 2]
    m1, m2 = 0x03030303, 0x0F0F0F0F
    t = ((w0 >> 6) & m1) | ((w1 >> 4) & ~m1 & 0xFFFFFFFF)
    e = (t & m2) | ((w2 >> 2) & ~m2 & 0xFFFFFFFF)
    return torch.stack([w0, w1, w2, e], dim=-1)


def smem_table(codebooks: list[torch.Tensor], bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's shared-memory table for up to four codebooks ``[K, 2]`` fp16: int64 words (32-bit
    values) ``[regions * 16384]`` at the byte addresses of the module docstring, each centroid
    converted to ``dtype`` (fp16 or bf16) and stored as the two 16-bit halves of one word."""
    if not 1 <= len(codebooks) <= MAX_PROJECTIONS:
        raise ValueError(f"smem_table: {len(codebooks)} codebooks (1..{MAX_PROJECTIONS})")
    regions = (len(codebooks) + 1) // 2
    tab = torch.zeros(regions * REGION_BYTES // 4, dtype=torch.int64)
    v = torch.arange(256)
    for p, cb in enumerate(codebooks):
        k = cb.shape[0]
        half = cb.to(torch.float32).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF     # [K, 2]
        word = torch.zeros(256, dtype=torch.int64)
        src = v & 63 if bits == 6 else v
        ok = src < k
        word[ok] = half[src[ok], 0] | (half[src[ok], 1] << 16)
        addr = lane_word(0, p) + v[:, None] * 256 + torch.arange(32)[None, :] * 4          # [v, lane] bytes
        tab[addr.reshape(-1) // 4] = word[:, None].expand(256, 32).reshape(-1)
    return tab


def table_entries(table: torch.Tensor, words: torch.Tensor, bits: int, projection: torch.Tensor) -> torch.Tensor:
    """The table word each lane loads for each of its 16 codes: ``words`` int64 ``[..., 32, 2, W]``
    (lane, row half, word) -> ``[..., 32, 2, 16]``, code ``i`` through ``prmt(word, lane_word,
    code_selector(i % 4))`` and the table at that byte address.  ``projection``: int64 ``[...]``."""
    src = lane_code_bytes(words, bits).to(table.device)                 # [..., 32, 2, 4]
    lane = torch.arange(32, device=table.device)
    lw = ((projection[..., None] // 2) << 16) | ((projection[..., None] % 2) << 7) | (lane << 2)  # [..., 32]
    out = []
    for i in range(LANE_CODES):
        addr = prmt(src[..., i // 4], lw[..., None], code_selector(i % 4))   # [..., 32, 2]
        out.append(table[addr // 4])
    return torch.stack(out, dim=-1)
