// fasq: product-quantized decode kernel v2 (1-16 tokens, d = 2, 6- or 8-bit codes; NVIDIA sm_80+).
//
// Built at run time with NVRTC (fasq/kernels/cuda_decode_v2.py), one build per configuration of the
// FQ2_* defines the host prepends.  The codes arrive in the GPU layout of fasq/kernels/cuda_layout.py
// (repacked once at load time); fasq/kernels/cuda_emulate.py emulates this file lane by lane, and CI
// checks that emulation bit for bit against fasq/reference.py.  The geometry (tiles of 16 rows, spans
// of 64 sub-vectors, lane (g, q) decoding codes 16q..16q+15 of rows g and g + 8) is the layout's.
//
// What differs from pq_cuda.cu, and why (issue 21; docs/kernels_gpu.md "Decode kernel v2"):
// * Persistent grid: one block per SM; its warps are independent workers taking striped work units
//   (ROWT tiles x one slice of the reduction dim): worker w = warp * gridDim.x + block takes units
//   w, w + W, ...  The codebook table is filled once per SM, not once per 32-row block.
// * Codes stream straight into registers, DEPTH spans ahead (a ring of register sets; the span
//   DEPTH ahead is loaded as soon as a set is consumed, across unit boundaries), never through shared
//   memory, whose bandwidth the lookups need.  The first loads are issued before the table fill.
// * Two instructions per code: the table sits at byte address region << 16 | code << 8 | slot << 7 |
//   lane << 2 (plus the table's base, which LDS adds from a uniform register), so one PRMT of the code
//   word and the lane's constant forms the address, and one LDS reads the centroid.  6-bit codes are
//   byte-aligned in the layout (16 in 3 words); 4 of every 16 need two SHF + two LOP3 first.
// * Split-K reduced in a fixed order: each unit writes fp32 partials; the last of a tile group's
//   slices to arrive (an atomic counter per group) sums the slices in slice order and writes y, so
//   the result is the same whatever the arrival order (deterministic), in one launch.
// * q/k/v (or gate/up) in one launch: up to 4 layers' tiles in one layout, each with its codebook in
//   its own table slot, each output at its row offset.

#ifndef FQ2_BITS
#define FQ2_BITS 8      // 6 or 8
#endif
#ifndef FQ2_NWARPS
#define FQ2_NWARPS 8
#endif
#ifndef FQ2_ROWT
#define FQ2_ROWT 2      // 16-row tiles per work unit
#endif
#ifndef FQ2_DEPTH
#define FQ2_DEPTH 3     // spans of codes in flight per warp
#endif
#ifndef FQ2_NT
#define FQ2_NT 1        // 8-token column tiles of the mma: 1 (1-8 tokens) or 2 (9-16)
#endif
#ifndef FQ2_XBF16
#define FQ2_XBF16 0
#endif
#ifndef FQ2_NPROJ
#define FQ2_NPROJ 1     // layers in the launch (1-4)
#endif
#ifndef FQ2_XTAIL
#define FQ2_XTAIL 0     // 1: IN % 128 != 0 (the last span's x words past IN read as zeros)
#endif
#ifndef FQ2_BIAS
#define FQ2_BIAS 0      // 1: fp32 bias [total_out]
#endif

typedef unsigned int u32;
typedef unsigned short u16;
struct alignas(16) V4 { u32 x, y, z, w; };
struct alignas(8) V2 { u32 x, y; };

constexpr int BITS = FQ2_BITS;
constexpr int NWARPS = FQ2_NWARPS;
constexpr int ROWT = FQ2_ROWT;
constexpr int DEPTH = FQ2_DEPTH;
constexpr int NT = FQ2_NT;
constexpr int NPROJ = FQ2_NPROJ;
constexpr int NREG = (NPROJ + 1) / 2;                 // 64 KiB table regions
constexpr int CW = BITS == 8 ? 8 : 6;                 // code words per lane, tile and span (rows g, g + 8)
constexpr int CHUNK = BITS == 8 ? 256 : 192;          // words per (tile, span) in the layout
constexpr int XW = 16;                                // x words per lane, token and span (16 sub-vectors)
constexpr int SPAN_SUBS = 64;
static_assert(BITS == 6 || BITS == 8, "FQ2_BITS must be 6 or 8");
static_assert(NPROJ >= 1 && NPROJ <= 4, "FQ2_NPROJ must be 1..4");

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u16 f2b(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

// A codebook word (two fp16) as the table holds it: x's dtype (bf16: each value rounded).
__device__ __forceinline__ u32 table_word(u32 w) {
#if FQ2_XBF16
    return (u32)f2b(h2f((u16)(w & 0xffffu))) | ((u32)f2b(h2f((u16)(w >> 16))) << 16);
#else
    return w;
#endif
}

__device__ __forceinline__ u16 f2x(float f) {
#if FQ2_XBF16
    return f2b(f);
#else
    return f2h(f);
#endif
}

// Byte `byte` of the code word w into byte 1 of the address; bytes 0, 2, 3 from the lane's constant.
// (`byte` is a constant once the loops are unrolled: ptxas makes the selector an immediate.)
__device__ __forceinline__ u32 code_addr(u32 w, u32 lane_word, int byte) {
    u32 a;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(a) : "r"(w), "r"(lane_word), "r"(0x7604u | ((u32)byte << 4)));
    return a;
}

// Bit-select: the bits of c set from a, the others from b (one LOP3).
__device__ __forceinline__ u32 bitsel(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xe4;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ u32 lds(u32 addr) {
    u32 v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}

// No CUDA headers (NVRTC may not find them, as in pq_cuda.cu): the few intrinsics needed, in PTX.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ float ld_cg(const float* p) {     // L2 only: another SM wrote it
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ void fence_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ int atomic_inc_gpu(int* p) {
    int old;
    asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
    return old;
}

__device__ __forceinline__ int shfl0(int v) {
    int o;
    asm volatile("shfl.sync.idx.b32 %0, %1, 0, 0x1f, 0xffffffff;" : "=r"(o) : "r"(v));
    return o;
}

// Streamed once: no L1 allocation.
__device__ __forceinline__ V4 ldg_stream4(const u32* p) {
    V4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ V2 ldg_stream2(const u32* p) {
    V2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if FQ2_XBF16
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// One span's operands for one lane: code words of its ROWT tiles, x words of its tokens, the scale
// word (rows g, g + 8) of the span's group per tile.
struct Slot {
    u32 c[ROWT][CW];
    u32 x[NT][XW];
    u32 s[ROWT];
};

// The load side of a worker's stream of spans: its unit, the span within the unit's slice, and word
// offsets that step by one span (32-bit: a layer's codes are < 2^31 words; no division per span).
// A tile past the last loads tile n_tiles - 1 again (computed, never written): no check per load.
struct Loader {
    int unit, j, gcount, xcol;       // xcol: this lane's first x column in the span
    int co[ROWT];                    // this lane's code words of the span, per tile
    int so[ROWT];                    // the scale word of the span's group, per tile
    int xo;                          // x word of token g (token g + 8: + 8 * IN / 2) for this lane
};

__device__ __forceinline__ void loader_at(Loader& L, int unit, int n_tg, int per, int spg, int IN, int n_tiles,
                                          int n_spans, int NG, int lane) {
    L.unit = unit;
    L.j = 0;
    const int tg = unit % n_tg, span0 = (unit / n_tg) * per, g = lane >> 2, q = lane & 3;
    L.gcount = span0 % spg;
    L.xcol = 2 * (span0 * SPAN_SUBS + q * 16);
    L.xo = g * (IN / 2) + span0 * SPAN_SUBS + q * 16;
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        const int tile = tg * ROWT + r < n_tiles ? tg * ROWT + r : n_tiles - 1;
        L.co[r] = (tile * n_spans + span0) * CHUNK + lane * 4;
        L.so[r] = (tile * NG + span0 / spg) * 8 + g;
    }
}

__device__ __forceinline__ void load_span(Slot& sl, const Loader& L, int n_units, const u32* __restrict__ codes,
                                          const u32* __restrict__ x, const u32* __restrict__ scales, int T, int IN,
                                          int lane) {
    if (L.unit >= n_units) return;                       // past the worker's last unit: nothing to load
    const int g = lane >> 2;
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        const u32* cp = codes + L.co[r];
        if (BITS == 8) {
            const V4 a = ldg_stream4(cp), b = ldg_stream4(cp + 128);
            sl.c[r][0] = a.x; sl.c[r][1] = a.y; sl.c[r][2] = a.z; sl.c[r][3] = a.w;
            sl.c[r][4] = b.x; sl.c[r][5] = b.y; sl.c[r][6] = b.z; sl.c[r][7] = b.w;
        } else {
            const V4 a = ldg_stream4(cp);
            const V2 b = ldg_stream2(cp + 128 - lane * 2);   // words 4-5 of the lane: at 128 + lane * 2
            sl.c[r][0] = a.x; sl.c[r][1] = a.y; sl.c[r][2] = a.z; sl.c[r][3] = a.w;
            sl.c[r][4] = b.x; sl.c[r][5] = b.y;
        }
        sl.s[r] = scales[L.so[r]];
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        if (n * 8 + g < T) {                             // lanes of absent tokens keep their zeros
            const u32* xp = x + L.xo + n * 8 * (IN / 2);
#pragma unroll
            for (int i = 0; i < XW / 4; ++i) {
#if FQ2_XTAIL
                // The row's last span is partial (IN % 128 != 0): columns past IN read as zeros.
                V4 v = {0u, 0u, 0u, 0u};
                if (L.xcol + 8 * i < IN) v = *reinterpret_cast<const V4*>(xp + 4 * i);
#else
                const V4 v = *reinterpret_cast<const V4*>(xp + 4 * i);
#endif
                sl.x[n][4 * i] = v.x; sl.x[n][4 * i + 1] = v.y; sl.x[n][4 * i + 2] = v.z; sl.x[n][4 * i + 3] = v.w;
            }
        }
    }
}

// The next span of the stream (the next unit's first where this one's slice ends).
__device__ __forceinline__ void loader_next(Loader& L, int n_workers, int n_tg, int per, int spg, int IN, int n_tiles,
                                            int n_spans, int NG, int lane) {
    if (++L.j == per) {
        loader_at(L, L.unit + n_workers, n_tg, per, spg, IN, n_tiles, n_spans, NG, lane);
        return;
    }
    L.xo += SPAN_SUBS;
    L.xcol += 2 * SPAN_SUBS;
    const bool next_group = ++L.gcount == spg;
    if (next_group) L.gcount = 0;
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        L.co[r] += CHUNK;
        L.so[r] += next_group ? 8 : 0;
    }
}

// The compute side of the stream: unit, span within its slice, spans of the current scale group
// done, and the unit's first tile.
struct Cursor {
    int unit, j, g, tile0;
};

__device__ __forceinline__ void cursor_at(Cursor& k, int unit, int n_tg, int per, int spg) {
    k.unit = unit;
    k.j = 0;
    k.tile0 = (unit % n_tg) * ROWT;
    k.g = ((unit / n_tg) * per) % spg;
}

// One span's products: ROWT tiles x 8 k16 steps x NT column tiles, accumulated unscaled in c.
__device__ __forceinline__ void compute_span(const Slot& sl, const u32 (&lw)[ROWT],
                                             float (&c)[ROWT][NT][4]) {
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        // The 4 words per row half whose bytes are the 16 codes (6-bit: codes 12-15 rebuilt).
        u32 src[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (BITS == 8) {
#pragma unroll
                for (int i = 0; i < 4; ++i) src[h][i] = sl.c[r][4 * h + i];
            } else {
                const u32 w0 = sl.c[r][3 * h], w1 = sl.c[r][3 * h + 1], w2 = sl.c[r][3 * h + 2];
                src[h][0] = w0; src[h][1] = w1; src[h][2] = w2;
                src[h][3] = bitsel(bitsel(w0 >> 6, w1 >> 4, 0x03030303u), w2 >> 2, 0x0f0f0f0fu);
            }
        }
#pragma unroll
        for (int st = 0; st < 8; ++st) {
            // codes 2 st (a0: row g, a1: row g + 8) and 2 st + 1 (a2, a3)
            const int i0 = 2 * st, i1 = 2 * st + 1;
            u32 a0, a1, a2, a3;
#define FQ2_LOOK(h, i) lds(code_addr(src[h][(i) >> 2], lw[r], (i) & 3))
            a0 = FQ2_LOOK(0, i0); a2 = FQ2_LOOK(0, i1);
            a1 = FQ2_LOOK(1, i0); a3 = FQ2_LOOK(1, i1);
#undef FQ2_LOOK
#pragma unroll
            for (int n = 0; n < NT; ++n) mma16816(c[r][n], a0, a1, a2, a3, sl.x[n][i0], sl.x[n][i1]);
        }
    }
}

__device__ __forceinline__ int proj_of(int tile, const int* __restrict__ meta) {
    int p = 0;
#pragma unroll
    for (int i = 0; i < NPROJ - 1; ++i) p += tile >= meta[i];
    return p;
}

// The end of a unit: its fp32 sums (c scaled into acc already) to y, directly (one slice) or through
// the slice partials, summed in slice order by the unit that completes its tile group.
__device__ __forceinline__ void finish_unit(const Cursor& k, const float (&acc)[ROWT][NT][4], int n_tiles, int n_tg,
                                            int slices, int T, const int* __restrict__ meta,
                                            const float* __restrict__ bias, u16* __restrict__ y,
                                            float* __restrict__ ws, int* __restrict__ counters, int lane) {
    const int g = lane >> 2, q = lane & 3;
    const int rows_pad = n_tiles * 16;
    // meta: [0, NPROJ): tile_ends, [4, 4 + NPROJ): outs, [8, 8 + NPROJ): row offsets, 12: total_out
    const int total_out = meta[12];
    bool last = true;
    if (slices > 1) {
        const int sl = k.unit / n_tg;
#pragma unroll
        for (int r = 0; r < ROWT; ++r)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int row = (k.tile0 + r) * 16 + g + 8 * (i >> 1), tok = n * 8 + 2 * q + (i & 1);
                    if (k.tile0 + r < n_tiles && tok < T) ws[((long long)sl * T + tok) * rows_pad + row] = acc[r][n][i];
                }
        fence_gpu();                                   // this lane's partials, before the count
        asm volatile("bar.warp.sync 0xffffffff;" ::: "memory");
        int old = 0;
        if (lane == 0) old = atomic_inc_gpu(counters + k.unit % n_tg);
        old = shfl0(old);
        last = old == slices - 1;
        if (last) {
            fence_gpu();                               // the other slices' partials, after the count
            if (lane == 0) counters[k.unit % n_tg] = 0;   // ready for the next launch (graph replays)
        }
    }
    if (!last) return;
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        const int tile = k.tile0 + r;
        if (tile >= n_tiles) continue;
        const int p = proj_of(tile, meta);
        const int t_start = p ? meta[p - 1] : 0;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = g + 8 * (i >> 1), tok = n * 8 + 2 * q + (i & 1);
                const int local = (tile - t_start) * 16 + m;
                if (tok >= T || local >= meta[4 + p]) continue;
                float v = acc[r][n][i];
                if (slices > 1) {      // the slices' partials, in slice order (this unit's own included)
                    const float* w = ws + (long long)tok * rows_pad + tile * 16 + m;
                    const long long stride = (long long)T * rows_pad;
                    v = ld_cg(w);
#pragma unroll 1
                    for (int s = 1; s < slices; ++s) v += ld_cg(w + s * stride);
                }
                const int o = meta[8 + p] + local;
#if FQ2_BIAS
                v += bias[o];
#endif
                y[(long long)tok * total_out + o] = f2x(v);
            }
    }
}

// A unit's start: its tiles' table constants (layer -> region, slot) and zero sums.
// lane_base: the lane index | the table's (64 KiB-aligned) base address.
__device__ __forceinline__ void unit_begin(const Cursor& k, u32 (&lw)[ROWT], float (&acc)[ROWT][NT][4],
                                           const int* __restrict__ meta, u32 lane_base) {
#pragma unroll
    for (int r = 0; r < ROWT; ++r) {
        const int p = proj_of(k.tile0 + r, meta);
        lw[r] = (lane_base & ~0xffffu) + ((u32)(p >> 1) << 16) + ((u32)(p & 1) << 7) + ((lane_base & 31u) << 2);
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][n][i] = 0.f;
    }
}

extern "C" __global__ void __launch_bounds__(FQ2_NWARPS * 32, 1)
fasq_pq_decode_v2(const u32* __restrict__ x,        // [T, IN / 2]: rotated x (fp16 / bf16 pairs)
                  const u32* __restrict__ codes,    // [n_tiles, n_spans, CHUNK] (cuda_layout.GpuLayout.codes)
                  const u32* __restrict__ cbs,      // [NPROJ, 256]: each layer's centroids (fp16 pairs), zero-padded
                  const u32* __restrict__ scales,   // [n_tiles, NG, 8]: fp16 pairs (rows g, g + 8)
                  const float* __restrict__ bias,   // [total_out] fp32 (FQ2_BIAS)
                  u16* __restrict__ y,              // [T, total_out] in x's dtype
                  float* __restrict__ ws,           // [slices, T, n_tiles * 16] fp32 partials (slices > 1)
                  int* __restrict__ counters,       // [n_tg] zeros: slices arrived per tile group
                  const int* __restrict__ meta,     // tile_ends[4], outs[4], row offsets[4], total_out
                  int T, int IN, int n_tiles, int n_spans, int NG, int spg, int slices, int per) {
    extern __shared__ __align__(16) u32 smem[];
    // The table starts at the first 64 KiB boundary of the shared window, so that a lane's constant
    // can carry the base's high bytes and the permute's output is the whole address.  (Adding a base
    // to it costs one IADD per lookup: nvcc 13.0 keeps the base in a per-thread register here, not in
    // a uniform one that LDS [R + UR] would add for free.)  The host allocates 64 KiB more for that.
    const u32 sbase = smem_addr(smem);
    const u32 tbase = (sbase + 0xffffu) & ~0xffffu;
    u32* table = smem + (tbase - sbase) / 4;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_tg = (n_tiles + ROWT - 1) / ROWT, n_units = n_tg * slices;
    const int n_workers = gridDim.x * NWARPS;

    // 1. The first DEPTH spans of this worker's stream: issued before anything else.
    Slot ring[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
#pragma unroll
        for (int r = 0; r < ROWT; ++r) {
            ring[d].s[r] = 0u;
#pragma unroll
            for (int i = 0; i < CW; ++i) ring[d].c[r][i] = 0u;
        }
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < XW; ++i) ring[d].x[n][i] = 0u;
    }
    Loader ld;
    loader_at(ld, warp * gridDim.x + blockIdx.x, n_tg, per, spg, IN, n_tiles, n_spans, NG, lane);
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
        load_span(ring[d], ld, n_units, codes, x, scales, T, IN, lane);
        loader_next(ld, n_workers, n_tg, per, spg, IN, n_tiles, n_spans, NG, lane);
    }

    // 2. The table, while those loads are in flight: word (region << 14 | v << 6 | slot << 5 | lane)
    //    = layer (2 region + slot)'s centroid v (v & 63 for 6-bit codes), 16-byte stores.
    for (int w4 = threadIdx.x; w4 < NREG * 4096; w4 += NWARPS * 32) {
        const int wi = w4 * 4, p = ((wi >> 14) << 1) | ((wi >> 5) & 1), v = (wi >> 6) & 255;
        const u32 e = p < NPROJ ? table_word(cbs[p * 256 + (BITS == 6 ? (v & 63) : v)]) : 0u;
        *reinterpret_cast<V4*>(table + wi) = V4{e, e, e, e};
    }
    __syncthreads();

    // 3. The stream, DEPTH spans a round: compute span i from ring slot i % DEPTH, then load span
    //    i + DEPTH into it.  A unit that ends in a round is finished after the round (the planner
    //    keeps per >= DEPTH, so at most one does), which keeps a single copy of the epilogue.
    Cursor cu, done;
    cursor_at(cu, warp * gridDim.x + blockIdx.x, n_tg, per, spg);
    done = cu;
    float c[ROWT][NT][4], acc[ROWT][NT][4], acc_done[ROWT][NT][4];
    u32 lw[ROWT];
#pragma unroll
    for (int r = 0; r < ROWT; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) c[r][n][i] = acc_done[r][n][i] = 0.f;
    unit_begin(cu, lw, acc, meta, lane | tbase);
    while (cu.unit < n_units) {
        bool pending = false;
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            if (cu.unit < n_units) {       // (no break: the ring's slot index must stay a constant)
                compute_span(ring[d], lw, c);
                const bool unit_end = cu.j == per - 1;
                if (unit_end || ++cu.g == spg) {     // a scale group ends: scale its sums into acc
                    cu.g = 0;
#pragma unroll
                    for (int r = 0; r < ROWT; ++r) {
                        const float s_lo = h2f((u16)(ring[d].s[r] & 0xffffu)), s_hi = h2f((u16)(ring[d].s[r] >> 16));
#pragma unroll
                        for (int n = 0; n < NT; ++n) {
                            acc[r][n][0] += c[r][n][0] * s_lo; acc[r][n][1] += c[r][n][1] * s_lo;
                            acc[r][n][2] += c[r][n][2] * s_hi; acc[r][n][3] += c[r][n][3] * s_hi;
                            c[r][n][0] = c[r][n][1] = c[r][n][2] = c[r][n][3] = 0.f;
                        }
                    }
                }
                load_span(ring[d], ld, n_units, codes, x, scales, T, IN, lane);
                loader_next(ld, n_workers, n_tg, per, spg, IN, n_tiles, n_spans, NG, lane);
                if (unit_end) {
                    pending = true;
                    done = cu;
#pragma unroll
                    for (int r = 0; r < ROWT; ++r)
#pragma unroll
                        for (int n = 0; n < NT; ++n)
#pragma unroll
                            for (int i = 0; i < 4; ++i) acc_done[r][n][i] = acc[r][n][i];
                    cursor_at(cu, cu.unit + n_workers, n_tg, per, spg);
                    unit_begin(cu, lw, acc, meta, lane | tbase);
                } else {
                    ++cu.j;
                }
            }
        }
        if (pending) finish_unit(done, acc_done, n_tiles, n_tg, slices, T, meta, bias, y, ws, counters, lane);
    }
}
