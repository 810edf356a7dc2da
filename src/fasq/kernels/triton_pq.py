"""Triton kernels for the fasq stored format (GPU; also run by the Triton interpreter in CI).

Everything here works on ``W_r``, the weight in the rotated basis (see :mod:`fasq.reference`): the
caller rotates the input once, and ``y = x_r @ W_r^T``.

The kernels walk the reduction dim in blocks of ``BLOCK_J`` sub-vectors (``BLOCK_J * D``
columns).  Per block and row tile they unpack one code per (row, sub-vector, codebook) with
:func:`_codes`, load one scale per (row, sub-vector), and then, for each element ``e < D`` of
the sub-vector, gather ``codebooks[m, code, e]`` into a ``[BLOCK_O, BLOCK_J]`` tile that
multiplies the input's columns ``j*D + e``.  Splitting by ``e`` keeps every tile 2-D and a power
of two whatever ``D`` is (1, 2, 3, 4, 8, ...), so no reshape or interleave is needed, and the
``D`` products of a block add up to exactly the block's share of ``x @ W_r^T``.

* :func:`pq_matmul_kernel`  ``y[t, o] = sum_c x_r[t, c] * W_r[o, c]``, launched two ways by
  ``fasq.kernels.triton_kernels``: *decode* (1-16 tokens, one token tile, split-K, a
  broadcast-multiply-reduce on CUDA cores for <= 4 tokens and ``tl.dot`` above) and *prefill*
  (many tokens, token x output tiles, ``tl.dot`` on tensor cores, no split).
* :func:`splitk_reduce_kernel`  sums split-K partials in a fixed order (deterministic), adds the
  bias and casts to the output dtype.
* :func:`dequant_kernel`  writes ``W_r`` to memory (for dequantize-then-cuBLAS).

Decoding is LUT-free: no per-token table of ``codebook . x`` is built.  With few tokens a table
costs more to build than it saves, and this way one tile routine serves decode and prefill.

This module imports Triton: import it only where Triton is wanted (never at ``import fasq``).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes(codes_ptr, m, offs_o, j0, N_SUB, OUT, WORDS, BITS: tl.constexpr, BLOCK_J: tl.constexpr):
    """int32 ``[BLOCK_O, BLOCK_J]`` codes of codebook m for rows offs_o, sub-vectors j0 + arange.

    Code j of a row sits at bits [j*BITS, (j+1)*BITS) of the row's LSB-first bit stream.  ``j0``
    is a multiple of BLOCK_J (itself a multiple of 32 // BITS).  Rows >= OUT and sub-vectors >=
    N_SUB give code 0 (always a valid index).
    """
    row = (offs_o + m * OUT).to(tl.int64) * WORDS            # [BO] int64: M*out*words can pass 2**31
    mask_o = offs_o < OUT
    if (32 % BITS) == 0:
        # Codes never straddle words: load the block's words as one contiguous tile (coalesced,
        # vectorizable) and split each word into its 32 // BITS codes in registers.
        offs_w = j0 // (32 // BITS) + tl.arange(0, BLOCK_J // (32 // BITS))
        words = tl.load(codes_ptr + row[:, None] + offs_w[None, :],
                        mask=mask_o[:, None] & (offs_w < WORDS)[None, :], other=0)
        words = words.to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, 32 // BITS) * BITS).to(tl.uint32)
        code = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        code = tl.reshape(code, [offs_o.shape[0], BLOCK_J])
        offs_j = j0 + tl.arange(0, BLOCK_J)
        code = tl.where((offs_j < N_SUB)[None, :], code, 0)
    else:
        # Widths like 6, 10, 12 bits: a code may straddle two words.  Read the word holding its
        # low bits and, only where it straddles, the next word's low bits.
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask = mask_o[:, None] & (offs_j < N_SUB)[None, :]
        pos = offs_j * BITS
        shift = (pos & 31).to(tl.uint32)
        ptrs = codes_ptr + row[:, None] + (pos >> 5)[None, :]
        lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
        straddle = (shift + BITS) > 32
        hi = tl.load(ptrs + 1, mask=mask & straddle[None, :], other=0).to(tl.uint32, bitcast=True)
        code = ((lo >> shift[None, :]) | (hi << ((32 - shift) & 31)[None, :])) & ((1 << BITS) - 1)
    return code.to(tl.int32)


@triton.jit
def _scales(scales_ptr, offs_o, offs_j, OUT, N_GROUPS, GROUP, D: tl.constexpr):
    """fp32 ``[BLOCK_O, BLOCK_J]`` scale of each (row, sub-vector); GROUP is a multiple of D."""
    mask = (offs_o < OUT)[:, None] & (offs_j * D < N_GROUPS * GROUP)[None, :]
    s = tl.load(scales_ptr + offs_o[:, None] * N_GROUPS + ((offs_j * D) // GROUP)[None, :], mask=mask, other=0.0)
    return s.to(tl.float32)


@triton.jit
def _codes_typed(codes_ptr, m, offs_o, offs_j, N_SUB, OUT, WORDS, BITS: tl.constexpr):
    """Like :func:`_codes` for 8- and 16-bit codes, read through a uint8 / int16 view of the words.

    On a little-endian machine code j of a row is then simply element j of the row (the row is
    ``4 * WORDS`` bytes long): one coalesced load per code, no unpacking and no reshape.
    """
    per_row = WORDS * (32 // BITS)
    row = (offs_o + m * OUT).to(tl.int64) * per_row
    mask = (offs_o < OUT)[:, None] & (offs_j < N_SUB)[None, :]
    code = tl.load(codes_ptr + row[:, None] + offs_j[None, :], mask=mask, other=0).to(tl.int32)
    return code & ((1 << BITS) - 1)


@triton.jit
def _block_codes(codes_ptr, m, offs_o, j0, offs_j, N_SUB, OUT, WORDS, BITS: tl.constexpr, BLOCK_J: tl.constexpr,
                 CODE_TYPED: tl.constexpr):
    """int32 ``[BLOCK_O, BLOCK_J]`` codes of one block: :func:`_codes_typed` through the typed view
    (``CODE_TYPED``), else :func:`_codes` from the int32 words."""
    if CODE_TYPED:
        code = _codes_typed(codes_ptr, m, offs_o, offs_j, N_SUB, OUT, WORDS, BITS)
    else:
        code = _codes(codes_ptr, m, offs_o, j0, N_SUB, OUT, WORDS, BITS, BLOCK_J)
    return code


@triton.jit
def _block_scales(scales_ptr, offs_o, offs_j, j0, OUT, N_GROUPS, GROUP, D: tl.constexpr,
                  BLOCK_SCALE: tl.constexpr):
    """fp32 scales of one block: ``[BLOCK_O, 1]`` when the block lies inside one scale group
    (``BLOCK_SCALE``: one load per row), else ``[BLOCK_O, BLOCK_J]`` from :func:`_scales`."""
    if BLOCK_SCALE:
        s = tl.load(scales_ptr + offs_o * N_GROUPS + (j0 * D) // GROUP, mask=offs_o < OUT,
                    other=0.0).to(tl.float32)[:, None]
    else:
        s = _scales(scales_ptr, offs_o, offs_j, OUT, N_GROUPS, GROUP, D)
    return s


@triton.jit
def _unpack(packed, e: tl.constexpr, ELEM: tl.constexpr):
    """fp32 element e of vectors loaded whole as one 32- or 64-bit word (``packed``) of 16-bit
    elements of type ELEM (fp16 or bf16), element 0 in the low bits (little-endian)."""
    if packed.dtype == tl.int64:
        bits = packed.to(tl.uint64, bitcast=True)
    else:
        bits = packed.to(tl.uint32, bitcast=True)
    return ((bits >> (16 * e)) & 0xFFFF).to(tl.uint16).to(ELEM, bitcast=True).to(tl.float32)


@triton.jit(do_not_specialize=["T", "stride_ys"])  # token counts vary call to call: no recompiles
def pq_matmul_kernel(x_ptr, codes_ptr, cb_ptr, scales_ptr, bias_ptr, y_ptr,
                     T, IN, OUT, N_SUB, WORDS, K, N_GROUPS, GROUP, SUBS_PER_SPLIT, stride_ys,
                     BITS: tl.constexpr, D: tl.constexpr, NUM_BOOKS: tl.constexpr, HAS_SCALES: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                     BLOCK_J: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                     ACC_WIDE: tl.constexpr = False, BLOCK_SCALE: tl.constexpr = False,
                     CB_VEC: tl.constexpr = False, CODE_TYPED: tl.constexpr = False,
                     X_VEC: tl.constexpr = False, X_DTYPE: tl.constexpr = tl.float16,
                     CB_SMEM: tl.constexpr = False, K_POW2: tl.constexpr = 1):
    """y[split, t, o] = sum over this split's columns c of x[t, c] * W_r[o, c] (+ bias).

    x: [T, IN] contiguous (already rotated); y: [splits, T, OUT] contiguous, fp32 partials when
    split, else the output itself in x's dtype.  Grid: (token tiles, output tiles, splits); split
    k covers sub-vectors [k*SUBS_PER_SPLIT, (k+1)*SUBS_PER_SPLIT).

    Fast-path switches (the host sets each only where it applies; all off is the plain path):

    * ``ACC_WIDE`` (CUDA-core path): accumulate ``[BLOCK_T, BLOCK_O, BLOCK_J]`` products and sum
      over BLOCK_J once at the end instead of once per block; the weight is not rounded to x's
      dtype first (fp32 products of the fp16 codebook and scale).
    * ``BLOCK_SCALE``: each reduction block lies inside one scale group, so one scale per row is
      loaded per block instead of one per (row, sub-vector).
    * ``CB_VEC``: ``cb_ptr`` is the codebook viewed as int32 (d = 2) or int64 (d = 4): one
      gather per sub-vector fetches the whole fp16 centroid.
    * ``CODE_TYPED``: ``codes_ptr`` is the codes viewed as uint8 (8-bit) or int16 (16-bit).
    * ``CB_SMEM`` (with CB_VEC, one codebook): the packed codebook (K_POW2 >= K words) is held by
      the program and looked up with ``tl.gather`` (on a GPU: through shared memory) instead of
      one global-memory gather per sub-vector.
    * ``X_VEC``: ``x_ptr`` is x (fp16 or bf16: X_DTYPE) viewed as one int32 / int64 word per
      sub-vector (IN is a multiple of D): one load per sub-vector instead of D strided ones.
    """
    pid_t = tl.program_id(0)   # fastest: programs sharing an output tile run together (L2 reuse)
    pid_o = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_t = offs_t < T
    if X_VEC:
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * (IN // D)               # [BT, 1]
    else:
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * IN                      # [BT, 1]
    if ACC_WIDE:
        acc3 = tl.zeros([BLOCK_T, BLOCK_O, BLOCK_J], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    if CB_SMEM:
        offs_k = tl.arange(0, K_POW2)
        book = tl.load(cb_ptr + offs_k, mask=offs_k < K, other=0)                   # [K_POW2] words
    j_begin = pid_k * SUBS_PER_SPLIT
    j_end = tl.minimum(j_begin + SUBS_PER_SPLIT, N_SUB)
    for j0 in range(j_begin, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < j_end
        if HAS_SCALES:
            s = _block_scales(scales_ptr, offs_o, offs_j, j0, OUT, N_GROUPS, GROUP, D, BLOCK_SCALE)
        for m in tl.static_range(NUM_BOOKS):
            code = _block_codes(codes_ptr, m, offs_o, j0, offs_j, j_end, OUT, WORDS, BITS, BLOCK_J,
                                CODE_TYPED)                                         # [BO, BJ]
            if CB_SMEM:
                packed = tl.reshape(tl.gather(book, tl.reshape(code, [BLOCK_O * BLOCK_J]), 0),
                                    [BLOCK_O, BLOCK_J])
            elif CB_VEC:
                packed = tl.load(cb_ptr + (m * K + code))                           # whole centroids
            else:
                cb_rows = cb_ptr + (m * K + code) * D
            if X_VEC:
                x_packed = tl.load(x_rows + offs_j[None, :], mask=mask_t[:, None] & mask_j[None, :], other=0)
            for e in tl.static_range(D):
                if X_VEC:
                    x = _unpack(x_packed, e, X_DTYPE).to(X_DTYPE)                    # [BT, BJ]
                else:
                    cols = offs_j * D + e
                    x = tl.load(x_rows + cols[None, :], mask=mask_t[:, None] & (mask_j & (cols < IN))[None, :],
                                other=0.0)                                          # [BT, BJ]
                if CB_VEC or CB_SMEM:
                    w = _unpack(packed, e, tl.float16)                              # [BO, BJ]
                else:
                    w = tl.load(cb_rows + e).to(tl.float32)                         # [BO, BJ]; L1 hits
                if HAS_SCALES:
                    w = w * s
                if ACC_WIDE:
                    acc3 += x.to(tl.float32)[:, None, :] * w[None, :, :]
                else:
                    w = w.to(x.dtype)   # W_r rounded to the input's dtype, as the reference does
                    if USE_DOT:
                        if DOT_FP32:    # Triton interpreter (wrong bf16 dot) or fp32 input: exact products
                            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
                        else:
                            acc += tl.dot(x, tl.trans(w))
                    else:               # few tokens: CUDA cores, [BT, BO, BJ] products summed over BJ
                        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if ACC_WIDE:
        acc += tl.sum(acc3, axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=offs_o < OUT, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_t.to(tl.int64)[:, None] * OUT + offs_o[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_o < OUT)[None, :])


@triton.jit(do_not_specialize=["N"])
def splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, N, OUT, SPLITS,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = sum_s ws[s, i] (+ bias[i % OUT]), summed in split order (deterministic). N = T*OUT."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws_ptr + s * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % OUT, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_kernel(codes_ptr, cb_ptr, scales_ptr, w_ptr, IN, OUT, N_SUB, WORDS, K, N_GROUPS, GROUP,
                   BITS: tl.constexpr, D: tl.constexpr, NUM_BOOKS: tl.constexpr, HAS_SCALES: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr, PACKED: tl.constexpr = False,
                   CODE_TYPED: tl.constexpr = False, BLOCK_SCALE: tl.constexpr = False,
                   W_DTYPE: tl.constexpr = tl.float16):
    """w[o, c] = W_r[o, c] in w's dtype; w: [OUT, IN] contiguous.  Grid: (sub-vector tiles, row tiles).

    ``PACKED`` (d = 2 or 4, one fp16 codebook, IN a multiple of d, w fp16 / bf16 = W_DTYPE):
    ``cb_ptr`` is the codebook as one int32 / int64 word per centroid and ``w_ptr`` is w as one
    word per sub-vector, so each sub-vector costs one gather and one coalesced store instead of d
    of each.  ``CODE_TYPED`` and ``BLOCK_SCALE`` mean what they mean to :func:`pq_matmul_kernel`.
    """
    j0 = tl.program_id(0) * BLOCK_J
    offs_j = j0 + tl.arange(0, BLOCK_J)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    if HAS_SCALES:
        s = _block_scales(scales_ptr, offs_o, offs_j, j0, OUT, N_GROUPS, GROUP, D, BLOCK_SCALE)
    if PACKED:
        code = _block_codes(codes_ptr, 0, offs_o, j0, offs_j, N_SUB, OUT, WORDS, BITS, BLOCK_J, CODE_TYPED)
        packed = tl.load(cb_ptr + code)
        if D == 2:
            word = tl.zeros([BLOCK_O, BLOCK_J], dtype=tl.uint32)
        else:
            word = tl.zeros([BLOCK_O, BLOCK_J], dtype=tl.uint64)
        for e in tl.static_range(D):
            v = _unpack(packed, e, tl.float16)
            if HAS_SCALES:
                v = v * s
            word = word | (v.to(W_DTYPE).to(tl.uint16, bitcast=True).to(word.dtype) << (16 * e))
        if D == 2:
            out_word = word.to(tl.int32, bitcast=True)
        else:
            out_word = word.to(tl.int64, bitcast=True)
        tl.store(w_ptr + offs_o.to(tl.int64)[:, None] * N_SUB + offs_j[None, :], out_word,
                 mask=(offs_o < OUT)[:, None] & (offs_j < N_SUB)[None, :])
    else:
        w_rows = w_ptr + offs_o.to(tl.int64)[:, None] * IN
        for e in tl.static_range(D):
            w = tl.zeros([BLOCK_O, BLOCK_J], dtype=tl.float32)
            for m in tl.static_range(NUM_BOOKS):   # codes re-read per e: L1 hits
                code = _codes(codes_ptr, m, offs_o, j0, N_SUB, OUT, WORDS, BITS, BLOCK_J)
                w += tl.load(cb_ptr + (m * K + code) * D + e).to(tl.float32)
            if HAS_SCALES:
                w = w * s
            cols = offs_j * D + e
            tl.store(w_rows + cols[None, :], w.to(w_ptr.dtype.element_ty),
                     mask=(offs_o < OUT)[:, None] & (cols < IN)[None, :])


@triton.jit(do_not_specialize=["T"])
def rotate_kernel(x_ptr, signs_ptr, h_ptr, y_ptr, T, IN, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """y[t, b*BLOCK + c] = sum_k x[t, b*BLOCK + k] * signs[b*BLOCK + k] * H[k, c]: the input rotation
    (sign flip, then the orthonormal Hadamard matrix ``h`` of one block) in one pass over x.

    x, y: [T, IN] contiguous, same dtype; signs: int8 [IN]; h: [BLOCK, BLOCK] in x's dtype.
    Grid: (token tiles, IN // BLOCK).  Like :func:`fasq.reference.rotate`, the signed input is in
    x's dtype and the products are summed in fp32.
    """
    pid_t = tl.program_id(0)
    blk = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_c = tl.arange(0, BLOCK)
    rows = offs_t.to(tl.int64)[:, None] * IN + blk * BLOCK
    acc = tl.zeros([BLOCK_T, BLOCK], dtype=tl.float32)
    for k0 in tl.static_range(0, BLOCK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + rows + offs_k[None, :], mask=mask_t[:, None], other=0.0)
        sk = tl.load(signs_ptr + blk * BLOCK + offs_k).to(tl.float32)
        xs = (xk.to(tl.float32) * sk[None, :]).to(xk.dtype)                # exact: signs are +-1
        hk = tl.load(h_ptr + offs_k[:, None] * BLOCK + offs_c[None, :])
        if DOT_FP32:
            acc += tl.dot(xs.to(tl.float32), hk.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xs, hk)
    tl.store(y_ptr + rows + offs_c[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None])


@triton.jit(do_not_specialize=["T"])
def outlier_add_kernel(y_ptr, x_ptr, rowptr_ptr, cols_ptr, vals_ptr, out_ptr, T, IN, OUT,
                       BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[t, r] = y[t, r] + sum over the layer's outliers p in row r of vals[p] * x[t, cols[p]].

    The sparse correction of a layer (``docs/format.md``) in one launch: rowptr int32 [OUT + 1] and
    cols int32 / vals fp16 [n] sorted by row (CSR); x [T, IN] is the unrotated input, y and out
    [T, OUT] in y's dtype; products and sums in fp32.  Grid: (token tiles, row tiles).
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < OUT
    start = tl.load(rowptr_ptr + offs_r, mask=mask_r, other=0)
    nnz = tl.load(rowptr_ptr + offs_r + 1, mask=mask_r, other=0) - start
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * IN
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for i in range(0, tl.max(nnz, axis=0)):
        m = mask_r & (i < nnz)
        c = tl.load(cols_ptr + start + i, mask=m, other=0)
        v = tl.load(vals_ptr + start + i, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x_rows + c[None, :], mask=mask_t[:, None] & m[None, :], other=0.0).to(tl.float32)
        acc += xv * v[None, :]
    ptrs = offs_t.to(tl.int64)[:, None] * OUT + offs_r[None, :]
    mask = mask_t[:, None] & mask_r[None, :]
    y = tl.load(y_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + ptrs, (y + acc).to(out_ptr.dtype.element_ty), mask=mask)
