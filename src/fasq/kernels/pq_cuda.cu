// fasq: product-quantized matrix-vector kernel for 1-8 tokens on NVIDIA GPUs (sm_80 and newer).
//
// Compiled at run time with NVRTC (fasq/kernels/cuda_decode.py), one build per configuration: the
// host prepends the FQ_* defines below.  No CUDA headers are included (NVRTC may not find them):
// conversions and the tensor-core product are written in PTX.
//
// What it computes: y[t, o] = sum_c x_r[t, c] * W_r[o, c] (+ bias), x_r already rotated, with
//   W_r[o, j*D + e] = scale[o, group of j] * codebook[codes[o, j], e]
// for one codebook of K centroids of D = 2 or 4 fp16 values and codes of FQ_BITS bits packed
// LSB-first per row (docs/format.md).
//
// How (one warp per 16-row tile and "span" of the reduction dim):
// * The codebook sits in shared memory, converted to x's dtype.  Where it fits (FQ_REPL) it is
//   stored 32 times, entry k of lane l at word k*32 + l, so that the 32 lanes of a warp reading 32
//   random centroids always hit 32 different banks: one shared-memory wavefront per lookup.
// * Each decoded centroid is already a tensor-core operand register (two fp16 / bf16 values).  A
//   warp's 16x16 A fragment of mma.m16n8k16 is 16 rows x 16 columns of W_r; the 8 columns of B are
//   the tokens (1-8; unused ones are zero).  The reduction order inside a span is permuted so that
//   each lane decodes FQ_RUN *consecutive* codes of its row (one contiguous, vectorized load): lane
//   (g = lane/4, q = lane%4) takes sub-vectors [span*4*RUN + q*RUN, +RUN) of rows g and g+8, and
//   feeds x's matching columns in its B fragment, so the sum is unchanged.
// * A span lies inside one scale group: its products accumulate unscaled and are scaled once per
//   (row, span) in fp32.
// * Warps of a block take different spans of the same rows; their partial sums meet in shared
//   memory, and the block writes its rows once: the output in x's dtype (+ bias), or fp32
//   partials of its split of the reduction dim (FQ_SPLIT) that a second kernel sums in order.

#ifndef FQ_BITS
#define FQ_BITS 8
#endif
#ifndef FQ_D
#define FQ_D 2
#endif
#ifndef FQ_RUN
#define FQ_RUN 32
#endif
#ifndef FQ_NWARPS
#define FQ_NWARPS 4
#endif
#ifndef FQ_ROWT
#define FQ_ROWT 2
#endif
#ifndef FQ_XBF16
#define FQ_XBF16 0
#endif
#ifndef FQ_REPL
#define FQ_REPL 1
#endif
#ifndef FQ_SCALES
#define FQ_SCALES 1
#endif
#ifndef FQ_SPLIT
#define FQ_SPLIT 0
#endif
#ifndef FQ_BIAS
#define FQ_BIAS 0   // 0: none, 1: fp16, 2: bf16, 3: fp32
#endif
#ifndef FQ_ROTB
#define FQ_ROTB 0   // > 0: x arrives unrotated; each block rotates its columns (blocks of FQ_ROTB) into shared memory
#endif
#ifndef FQ_ROTS
#define FQ_ROTS 1.0f  // 1 / sqrt(FQ_ROTB)
#endif
#ifndef FQ_OUTLIERS
#define FQ_OUTLIERS 0 // 1: add the layer's sparse outlier correction (CSR by row) in the epilogue
#endif
#ifndef FQ_FAST
#define FQ_FAST 1     // shared-memory lookups by byte address in PTX, and a ping-pong span loop
#endif

typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) V4 { u32 x, y, z, w; };   // own vector types: no CUDA headers under NVRTC
struct alignas(8) V2 { u32 x, y; };

constexpr int BITS = FQ_BITS;
constexpr int D = FQ_D;
constexpr int RUN = FQ_RUN;                 // consecutive codes per lane and row in one span
constexpr int NWARPS = FQ_NWARPS;
constexpr int ROWT = FQ_ROWT;               // 16-row tiles per warp
constexpr int HW = D / 2;                   // 32-bit words per centroid (2 fp16 each)
constexpr int CW = RUN * BITS / 32;         // code words per lane and row in one span
constexpr int XW = RUN * HW;                // x words per lane in one span
constexpr int STEPS = RUN * D / 4;          // mma k16 steps per span
constexpr int SPAN_SUBS = 4 * RUN;          // sub-vectors per span
constexpr u32 MASK = (BITS == 32) ? 0xffffffffu : ((1u << BITS) - 1u);
constexpr int VEC = (CW % 4 == 0) ? 4 : ((CW % 2 == 0) ? 2 : 1);   // words per code load
constexpr int ROTB = FQ_ROTB;
constexpr int ROT_E = ROTB > 32 ? ROTB / 32 : 1;   // elements per lane in the rotation (a warp: 32 * ROT_E columns)

static_assert(D == 2 || D == 4, "D must be 2 or 4");
static_assert((RUN * BITS) % 32 == 0, "a lane's run of codes must fill whole words");
static_assert(XW % 4 == 0, "x is loaded in 16-byte vectors");

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float b2f(u16 h) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(((u32)h) << 16));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u16 f2b(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// One fp16 pair of the codebook as it goes into the table: unchanged for fp16 inputs, each value
// rounded to bf16 for bf16 inputs (W_r in x's dtype, as the reference computes it).
__device__ __forceinline__ u32 table_word(u32 w) {
#if FQ_XBF16
    return (u32)f2b(h2f((u16)(w & 0xffffu))) | ((u32)f2b(h2f((u16)(w >> 16))) << 16);
#else
    return w;
#endif
}

// One 16-bit value of x's dtype to fp32, and back (round to nearest even).
__device__ __forceinline__ float x2f(u16 h) {
#if FQ_XBF16
    return b2f(h);
#else
    return h2f(h);
#endif
}

__device__ __forceinline__ u16 f2x(float f) {
#if FQ_XBF16
    return f2b(f);
#else
    return f2h(f);
#endif
}

#if FQ_ROTB
// x_r for columns [c0, c1) of every token into shared memory ``xs`` ([T, c1 - c0], x's dtype): the
// input rotation of fasq.reference.rotate (sign flip, then the orthonormal Hadamard transform of
// each block of ROTB columns), as a fast Walsh-Hadamard transform in fp32 registers.  A warp takes
// 32 * ROT_E consecutive columns of one token at a time, lane l holding columns l*ROT_E + i:
// butterflies of stride < ROT_E stay in the lane, wider ones pair lane l with lane l ^ (stride / ROT_E).
__device__ __forceinline__ void rotate_to_smem(const u16* __restrict__ x, const signed char* __restrict__ signs,
                                               u16* xs, int T, int IN, int c0, int c1, int warp, int lane) {
    const int width = c1 - c0, chunk = 32 * ROT_E, chunks = width / chunk;
    // The Hadamard entries as the reference holds them: 1/sqrt(ROTB) rounded to x's dtype.
    const float hs = x2f(f2x(FQ_ROTS));     // FQ_ROTS: 1/sqrt(ROTB) as a float literal (no math header)
    for (int task = warp; task < T * chunks; task += NWARPS) {
        const int t = task / chunks, col = c0 + (task % chunks) * chunk + lane * ROT_E;
        float v[ROT_E];
#pragma unroll
        for (int i = 0; i < ROT_E; ++i) {
            const float xv = x2f(x[(long long)t * IN + col + i]);
            v[i] = signs[col + i] < 0 ? -xv : xv;
        }
#pragma unroll
        for (int st = 1; st < ROTB; st *= 2) {
            if (st < ROT_E) {
#pragma unroll
                for (int i = 0; i < ROT_E; ++i) {
                    if ((i & st) == 0) {
                        const float a = v[i], b = v[i + st];
                        v[i] = a + b; v[i + st] = a - b;
                    }
                }
            } else {
                const int m = st / ROT_E;
                const bool upper = (lane & m) != 0;
#pragma unroll
                for (int i = 0; i < ROT_E; ++i) {
                    float o;
                    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=f"(o) : "f"(v[i]), "r"(m));
                    v[i] = upper ? o - v[i] : v[i] + o;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < ROT_E; ++i) xs[t * width + col - c0 + i] = f2x(v[i] * hs);
    }
}
#endif

__device__ __forceinline__ void mma16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if FQ_XBF16
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Code i (compile-time) of a lane's run, from its CW words.
__device__ __forceinline__ u32 code_at(const u32 (&w)[CW], int i) {
    const int bit = i * BITS, k = bit >> 5, sh = bit & 31;
    if (sh + BITS <= 32) return (w[k] >> sh) & MASK;
    return (u32)((((unsigned long long)w[k + 1] << 32) | w[k]) >> sh) & MASK;
}

__device__ __forceinline__ void load_words(u32 (&dst)[CW], const u32* __restrict__ src, bool ok) {
    if (!ok) {
#pragma unroll
        for (int i = 0; i < CW; ++i) dst[i] = 0u;
        return;
    }
#pragma unroll
    for (int i = 0; i < CW; i += VEC) {
        if (VEC == 4) {
            const V4 v = *reinterpret_cast<const V4*>(src + i);
            dst[i] = v.x; dst[i + 1] = v.y; dst[i + 2] = v.z; dst[i + 3] = v.w;
        } else if (VEC == 2) {
            const V2 v = *reinterpret_cast<const V2*>(src + i);
            dst[i] = v.x; dst[i + 1] = v.y;
        } else {
            dst[i] = src[i];
        }
    }
}

#if FQ_D == 2
typedef u32 entry_t;
#else
typedef V2 entry_t;
#endif

__device__ __forceinline__ entry_t lookup(const entry_t* __restrict__ tab, u32 code) {
#if FQ_REPL
    return tab[code << 5];        // tab already points at this lane's column
#else
    return tab[code];
#endif
}

// The fast path's lookups: the table by 32-bit shared-memory byte address.  For 8-bit codes one
// byte-permute extracts a code and one shift-add makes its entry's address (3 instructions per
// lookup with the load, against 5 when the compiler forms the index from the pointer).
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

#if FQ_REPL
constexpr int ENTRY_SHIFT = (D == 2) ? 7 : 8;     // 32 lanes x 4 or 8 bytes per table row
#else
constexpr int ENTRY_SHIFT = (D == 2) ? 2 : 3;
#endif

__device__ __forceinline__ u32 code_fast(const u32 (&w)[CW], int i) {
    if (BITS == 8) {
        u32 c;
        asm("prmt.b32 %0, %1, 0, %2;" : "=r"(c) : "r"(w[i >> 2]), "r"(0x4440u | (u32)(i & 3)));
        return c;
    }
    return code_at(w, i);
}

__device__ __forceinline__ entry_t lookup_addr(u32 base, u32 code) {
    const u32 a = base + (code << ENTRY_SHIFT);
    entry_t e;
#if FQ_D == 2
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(e) : "r"(a));
#else
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(e.x), "=r"(e.y) : "r"(a));
#endif
    return e;
}

// One span's products for one lane: ROWT tiles x STEPS mma, scaled into acc.
__device__ __forceinline__ void compute_span(const u32 (&xr)[XW], const u32 (&cw)[ROWT][2][CW],
                                             const float (&sc)[ROWT][2], float (&acc)[ROWT][4],
                                             const entry_t* __restrict__ tab, u32 tab_addr) {
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
#if FQ_SCALES
        float c[4] = {0.f, 0.f, 0.f, 0.f};
#else
        float* c = acc[r];
#endif
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            u32 a0, a1, a2, a3;
#if FQ_D == 2
            // Two codes per row and step: sub-vectors 2s (columns 2q, 2q+1 of the k16 step)
            // and 2s + 1 (columns 8 + 2q, 9 + 2q).
#if FQ_FAST
            a0 = lookup_addr(tab_addr, code_fast(cw[r][0], 2 * s));
            a2 = lookup_addr(tab_addr, code_fast(cw[r][0], 2 * s + 1));
            a1 = lookup_addr(tab_addr, code_fast(cw[r][1], 2 * s));
            a3 = lookup_addr(tab_addr, code_fast(cw[r][1], 2 * s + 1));
#else
            a0 = lookup(tab, code_at(cw[r][0], 2 * s));
            a2 = lookup(tab, code_at(cw[r][0], 2 * s + 1));
            a1 = lookup(tab, code_at(cw[r][1], 2 * s));
            a3 = lookup(tab, code_at(cw[r][1], 2 * s + 1));
#endif
#else
            // One code per row and step: its centroid's first pair at columns 2q, 2q+1 and
            // its second pair at 8 + 2q, 9 + 2q.
#if FQ_FAST
            const entry_t ea = lookup_addr(tab_addr, code_fast(cw[r][0], s));
            const entry_t eb = lookup_addr(tab_addr, code_fast(cw[r][1], s));
#else
            const entry_t ea = lookup(tab, code_at(cw[r][0], s));
            const entry_t eb = lookup(tab, code_at(cw[r][1], s));
#endif
            a0 = ea.x; a2 = ea.y; a1 = eb.x; a3 = eb.y;
#endif
            mma16816(c, a0, a1, a2, a3, xr[2 * s], xr[2 * s + 1]);
        }
#if FQ_SCALES
        acc[r][0] += c[0] * sc[r][0]; acc[r][1] += c[1] * sc[r][0];
        acc[r][2] += c[2] * sc[r][1]; acc[r][3] += c[3] * sc[r][1];
#endif
    }
}

__device__ __forceinline__ void zero_operands(u32 (&xr)[XW], u32 (&cw)[ROWT][2][CW], float (&sc)[ROWT][2]) {
#pragma unroll
    for (int i = 0; i < XW; ++i) xr[i] = 0u;
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        sc[r][0] = sc[r][1] = 0.f;
#pragma unroll
        for (int i = 0; i < CW; ++i) cw[r][0][i] = cw[r][1][i] = 0u;
    }
}

// x words, code words and scales of one span for this lane.
__device__ __forceinline__ void load_span(int span, bool ok, const u32* __restrict__ x, const u32* __restrict__ codes,
                                          const u16* __restrict__ scales, int T, int OUT, int WORDS, int NG,
                                          int SPANS_PER_GROUP, int xwords, int xoff, int row0, int g, int q,
                                          u32 (&xr)[XW], u32 (&cw)[ROWT][2][CW], float (&sc)[ROWT][2]) {
    // Past the last span nothing is loaded: the registers keep older, valid operands that the
    // caller never multiplies.  Lanes of absent tokens (g >= T) keep the zeros they start with.
    if (!ok) return;
    const int sub0 = span * SPAN_SUBS + q * RUN;             // first sub-vector of this lane's run
    // B fragment words: x of token g for this lane's sub-vectors.
    if (g < T) {
        const V4* xp = reinterpret_cast<const V4*>(x + (long long)g * xwords + sub0 * HW - xoff);
#pragma unroll
        for (int i = 0; i < XW / 4; ++i) {
            const V4 v = xp[i];
            xr[4 * i] = v.x; xr[4 * i + 1] = v.y; xr[4 * i + 2] = v.z; xr[4 * i + 3] = v.w;
        }
    }
    // Codes (and scales) of rows g and g + 8 of each tile.
    const int word0 = sub0 * BITS / 32;
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        const int ra = row0 + 16 * r + g, rb = ra + 8;
        load_words(cw[r][0], codes + (long long)ra * WORDS + word0, ra < OUT);   // rows past OUT: code 0
        load_words(cw[r][1], codes + (long long)rb * WORDS + word0, rb < OUT);
#if FQ_SCALES
        const int grp = span / SPANS_PER_GROUP;
        sc[r][0] = ra < OUT ? h2f(scales[(long long)ra * NG + grp]) : 0.f;
        sc[r][1] = rb < OUT ? h2f(scales[(long long)rb * NG + grp]) : 0.f;
#else
        sc[r][0] = sc[r][1] = 0.f;
#endif
    }
}

extern "C" __global__ void __launch_bounds__(FQ_NWARPS * 32)
fasq_pq_decode(const u32* __restrict__ x,        // [T, IN/2]: x (fp16 / bf16) as 32-bit words, rotated
                                                 // unless FQ_ROTB (then rotated here)
               const signed char* __restrict__ signs,  // [IN] the rotation's signs (FQ_ROTB)
               const u32* __restrict__ codes,    // [OUT, WORDS]
               const u32* __restrict__ cb,       // [K, D] fp16 as [K, HW] words
               const u16* __restrict__ scales,   // [OUT, NG] fp16
               const void* __restrict__ bias,    // [OUT] (FQ_BIAS)
               void* __restrict__ y,             // [T, OUT] in x's dtype, or fp32 [splits, T, OUT]
               int T, int IN, int OUT, int WORDS, int K, int NG, int SPANS_PER_GROUP,
               int SPANS_PER_SPLIT, int NSPANS,
               const u16* __restrict__ xo,       // [T, IN] the unrotated input (FQ_OUTLIERS)
               const int* __restrict__ orow,     // [OUT + 1] CSR row pointers of the outliers (FQ_OUTLIERS)
               const int* __restrict__ ocol,     // [n] their columns
               const u16* __restrict__ oval) {   // [n] their values, fp16
    extern __shared__ __align__(16) u32 smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;

    // Codebook table.
#if FQ_REPL
    constexpr int TAB_WORDS_PER_K = 32 * HW;
#else
    constexpr int TAB_WORDS_PER_K = HW;
#endif
    const int tab_words = K * TAB_WORDS_PER_K;
#if FQ_REPL
    // Row k of the table is 32 copies of centroid k (HW words each): 16-byte stores, each lane
    // writing 4 consecutive words of one row; a warp covers 128 words per store.
    for (int p = tid * 4; p < tab_words; p += NWARPS * 32 * 4) {
        const int k = p / TAB_WORDS_PER_K;
        V4 v;
        if (HW == 1) {
            const u32 w = table_word(cb[k]);
            v.x = w; v.y = w; v.z = w; v.w = w;
        } else {
            const u32 w0 = table_word(cb[k * 2]), w1 = table_word(cb[k * 2 + 1]);
            v.x = w0; v.y = w1; v.z = w0; v.w = w1;
        }
        *reinterpret_cast<V4*>(smem + p) = v;
    }
#else
    for (int p = tid; p < tab_words; p += NWARPS * 32) smem[p] = table_word(cb[p]);
#endif
    float* red = reinterpret_cast<float*>(smem + ((tab_words + 3) & ~3));
    const int row0 = blockIdx.x * (16 * ROWT);
    const int span_begin = blockIdx.y * SPANS_PER_SPLIT;
    const int span_end = span_begin + SPANS_PER_SPLIT < NSPANS ? span_begin + SPANS_PER_SPLIT : NSPANS;
#if FQ_ROTB
    // This block's columns of x_r, rotated into shared memory after the reduction scratch.
    const int c0 = span_begin * SPAN_SUBS * D, c1 = span_end * SPAN_SUBS * D;
    u32* xs = reinterpret_cast<u32*>(red + NWARPS * 16 * ROWT * 8);
    rotate_to_smem(reinterpret_cast<const u16*>(x), signs, reinterpret_cast<u16*>(xs), T, IN, c0, c1, warp, lane);
    const u32* xsrc = xs;
    const int xwords = (c1 - c0) / 2, xoff = c0 / 2;
#else
    const u32* xsrc = x;
    const int xwords = IN / 2, xoff = 0;
#endif
    __syncthreads();

#if FQ_REPL
    const entry_t* tab = reinterpret_cast<const entry_t*>(smem) + lane;
#else
    const entry_t* tab = reinterpret_cast<const entry_t*>(smem);
#endif


    float acc[ROWT][4];
#pragma unroll
    for (int r = 0; r < ROWT; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;

    const u32 tab_addr = smem_u32(tab);
    // Operands of one span, loaded one span ahead of their use (software pipelining).
    u32 xr[XW], cw[ROWT][2][CW];
    float sc[ROWT][2];
    zero_operands(xr, cw, sc);
    int span = span_begin + warp;
    load_span(span, span < span_end, xsrc, codes, scales, T, OUT, WORDS, NG, SPANS_PER_GROUP, xwords, xoff, row0,
              g, q, xr, cw, sc);
#if FQ_FAST
    // Two operand sets used in turn (no register copies between spans).
    u32 xn[XW], cn[ROWT][2][CW];
    float sn[ROWT][2];
    zero_operands(xn, cn, sn);
    while (span < span_end) {
        load_span(span + NWARPS, span + NWARPS < span_end, xsrc, codes, scales, T, OUT, WORDS, NG,
                  SPANS_PER_GROUP, xwords, xoff, row0, g, q, xn, cn, sn);
        compute_span(xr, cw, sc, acc, tab, tab_addr);
        span += NWARPS;
        if (span >= span_end) break;
        load_span(span + NWARPS, span + NWARPS < span_end, xsrc, codes, scales, T, OUT, WORDS, NG,
                  SPANS_PER_GROUP, xwords, xoff, row0, g, q, xr, cw, sc);
        compute_span(xn, cn, sn, acc, tab, tab_addr);
        span += NWARPS;
    }
#else
    u32 xn[XW], cn[ROWT][2][CW];
    float sn[ROWT][2];
    zero_operands(xn, cn, sn);
    for (; span < span_end; span += NWARPS) {
        const int nxt = span + NWARPS;
        load_span(nxt, nxt < span_end, xsrc, codes, scales, T, OUT, WORDS, NG, SPANS_PER_GROUP, xwords, xoff,
                  row0, g, q, xn, cn, sn);
        compute_span(xr, cw, sc, acc, tab, tab_addr);
#pragma unroll
        for (int i = 0; i < XW; ++i) xr[i] = xn[i];
#pragma unroll
        for (int r = 0; r < ROWT; ++r) {
            sc[r][0] = sn[r][0]; sc[r][1] = sn[r][1];
#pragma unroll
            for (int i = 0; i < CW; ++i) { cw[r][0][i] = cn[r][0][i]; cw[r][1][i] = cn[r][1][i]; }
        }
    }
#endif

    // Block reduction over warps: red[warp][row in block][token].
    constexpr int BR = 16 * ROWT;
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        float* w = red + (warp * BR + 16 * r + g) * 8 + 2 * q;
        w[0] = acc[r][0]; w[1] = acc[r][1];
        w[8 * 8] = acc[r][2]; w[8 * 8 + 1] = acc[r][3];
    }
    __syncthreads();
    for (int i = tid; i < BR * T; i += NWARPS * 32) {
        const int r = i % BR, tok = i / BR, row = row0 + r;
        if (row >= OUT) continue;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) v += red[(w * BR + r) * 8 + tok];
#if FQ_OUTLIERS
        if (blockIdx.y == 0)   // once per output: split 0 carries it into the sum of the splits
            for (int p = orow[row]; p < orow[row + 1]; ++p)
                v += h2f(oval[p]) * x2f(xo[(long long)tok * IN + ocol[p]]);
#endif
#if FQ_SPLIT
        reinterpret_cast<float*>(y)[((long long)blockIdx.y * T + tok) * OUT + row] = v;
#else
#if FQ_BIAS == 1
        v += h2f(reinterpret_cast<const u16*>(bias)[row]);
#elif FQ_BIAS == 2
        v += b2f(reinterpret_cast<const u16*>(bias)[row]);
#elif FQ_BIAS == 3
        v += reinterpret_cast<const float*>(bias)[row];
#endif
#if FQ_XBF16
        reinterpret_cast<u16*>(y)[(long long)tok * OUT + row] = f2b(v);
#else
        reinterpret_cast<u16*>(y)[(long long)tok * OUT + row] = f2h(v);
#endif
#endif
    }
}
