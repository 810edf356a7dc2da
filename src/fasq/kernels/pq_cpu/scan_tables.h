// The LUT method's per-call tables: int16 <codebook entry, x_j>, as byte planes.
#pragma once

#include "scan_lookup.h"
#include "scan_kernels.h"

namespace fasq_cpu {

#ifdef FASQ_VBMI
// Store 64 int16 table entries (wa: entries k0..k0+31, wb: k0+32..k0+63) as a lo-byte plane and an
// offset-binary hi-byte plane.  Byte 2i of a plane holds entry k0 + i and byte 2i + 1 entry k0 + 32 + i:
// and / shift / ternary-logic ops instead of two-source byte permutes (~2.75 cycles each on port 5);
// the repacked codes name entries by that position (cpu.py: _lut_tensors, PLANE_ORDER).
static inline void store_planes(__m512i wa, __m512i wb, uint8_t* lo_dst, uint8_t* hi_dst) {
  // The shifted operand comes first: ternary logic overwrites its first operand, and the shift
  // result is dead afterwards (with the constant first, GCC copied it before each of the two).
  const __m512i m = _mm512_set1_epi16(0x00FF);
  const __m512i lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(wb, 8), wa, m, 0xF8);  // (wb << 8) | (wa & m)
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(wa, 8), wb, m, 0xF4);  // (wa >> 8) | (wb & ~m)
  _mm512_store_si512(lo_dst, lo);
  _mm512_store_si512(hi_dst, _mm512_xor_si512(hi, _mm512_set1_epi8(-128)));
}

// Table of one (token, codebook, j): entry k = <cb_transposed[:, k], xj> (xj already divided by the token
// scale, so |entry| <= LUT_MAX) rounded to int16, stored as a lo-byte plane [table_size] then an
// offset-binary hi-byte plane [table_size] (see LUT_MAX).
template <int DD>
__attribute__((always_inline)) static inline void lut_build_one(const float* cb_transposed, const float* xj, int64_t d_rt,
                                                                int64_t table_size, uint8_t* L) {
  const int64_t d = DD ? DD : d_rt;
  __m512 xv[16];
  for (int64_t c = 0; c < d; ++c) xv[c] = _mm512_set1_ps(xj[c]);
  for (int64_t k0 = 0; k0 < table_size; k0 += 64) {
    __m256i h[4];
    for (int q = 0; q < 4; ++q) {
      const float* cp = cb_transposed + k0 + 16 * q;
      __m512 e = _mm512_mul_ps(xv[0], _mm512_loadu_ps(cp));
      for (int64_t c = 1; c < d; ++c) e = _mm512_fmadd_ps(xv[c], _mm512_loadu_ps(cp + c * table_size), e);
      h[q] = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(e));  // int16, rounded to nearest
    }
    const __m512i wa = _mm512_inserti64x4(_mm512_castsi256_si512(h[0]), h[1], 1);  // entries k0..k0+31
    const __m512i wb = _mm512_inserti64x4(_mm512_castsi256_si512(h[2]), h[3], 1);  // k0+32..k0+63
    store_planes(wa, wb, L + k0, L + table_size + k0);
  }
}

#ifdef __AVX512FP16__
// The same table computed in fp16 arithmetic (AVX512-FP16: 32 entries per instruction, then
// one fp16 -> int16 conversion): cbh = fp16 codebook [d][KP] (exact: codebooks are stored in fp16),
// xh = x_j rounded to fp16, each value twice in a 32-bit word, so that a broadcast from memory
// (vpbroadcastd, a load alone) fills a register instead of a conversion and a word broadcast
// (port 5, which the scan and the build's conversions keep busy).  About 3x fewer instructions
// than the fp32 build, which matters when a layer has few rows per table (SmolLM2's 192- and
// 576-row layers); costs at most two more fp16 roundings per entry (x_j, the product): the worst
// relative error on y in the kernel tests stays below 5e-4 (they allow 2e-3).
template <int DD>
__attribute__((always_inline)) static inline void lut_build_one_fp16(const uint16_t* cbh, const uint32_t* xh, int64_t d_rt,
                                                                     int64_t table_size, uint8_t* L) {
  const int64_t d = DD ? DD : d_rt;
  __m512h xv[16];
  for (int64_t c = 0; c < d; ++c) xv[c] = _mm512_castsi512_ph(_mm512_set1_epi32(static_cast<int>(xh[c])));
  for (int64_t k0 = 0; k0 < table_size; k0 += 64) {
    const uint16_t* cp = cbh + k0;
    __m512h e0 = _mm512_mul_ph(xv[0], _mm512_loadu_ph(cp)), e1 = _mm512_mul_ph(xv[0], _mm512_loadu_ph(cp + 32));
    for (int64_t c = 1; c < d; ++c) {
      e0 = _mm512_fmadd_ph(xv[c], _mm512_loadu_ph(cp + c * table_size), e0);
      e1 = _mm512_fmadd_ph(xv[c], _mm512_loadu_ph(cp + c * table_size + 32), e1);
    }
    const __m512i wa = _mm512_cvtph_epi16(e0), wb = _mm512_cvtph_epi16(e1);  // int16, rounded to nearest
    store_planes(wa, wb, L + k0, L + table_size + k0);
  }
}
#endif

// What a chunk's table build reads.  x: the prepared input [T][stride], divided by the token
// scales; xh: the same as fp16 pairs (lut_build_one_fp16), or nullptr without AVX512-FP16;
// cb_transposed: fp32 codebooks [M][d + 1][KP]; cbh: fp16 codebooks [M][d][KP] (AVX512-FP16 only).
// pf_codes (the repacked codes), pf_rbs, rb_stride, cb_stride: while it builds the tables of
// position j, the build requests the code line of position j of the first pf_rbs row blocks of
// each codebook (every other position: the L2 prefetcher fetches the pair of each line it
// misses), the lines the scan reads right after the build and does not prefetch itself.  Spread
// over the build, these prefetches use the load ports the build leaves idle; as one loop before the
// rotation the same requests made SmolLM2-shape calls 5-12% slower when the codes came from beyond
// L2, as in a decode step (benchmarks/cpu_ab.py STREAM=1), and up to 4% slower when they were in L2.
struct BuildArgs {
  const float* cb_transposed;
  const uint16_t* cbh;
  const float* x;
  const uint32_t* xh;
  int64_t stride, T, n_books, d, table_size, nsub;
  const uint8_t* pf_codes;
  int64_t pf_rbs, rb_stride, cb_stride;  // row blocks to prefetch; bytes per row block, per codebook
};

// The tables of positions [c0, c1) of every token and codebook, in the order the scan reads
// them: [t][m][j - c0][2 * table_size].  One call per chunk rather than per table: no indirect call per
// table, and d is a compile-time constant for the usual d (288 calls cost ~1 us of a SmolLM2
// k_proj's ~12).
template <int DD>
static void lut_build_chunk(const BuildArgs& b, int64_t c0, int64_t c1, uint8_t* tab) {
  const int64_t d = DD ? DD : b.d, n = c1 - c0, table_size = b.table_size;
  for (int64_t t = 0; t < b.T; ++t)
    for (int64_t m = 0; m < b.n_books; ++m) {
      uint8_t* L = tab + (t * b.n_books + m) * n * 2 * table_size;
      const uint8_t* pf = t == 0 ? b.pf_codes + m * b.cb_stride : nullptr;
      for (int64_t j = c0; j < c1; ++j, L += 2 * table_size) {
        if (pf && (j & 1) == 0)
          for (int64_t r = 0; r < b.pf_rbs; ++r) {
            const uint8_t* rp = pf + r * b.rb_stride;
            _mm_prefetch(reinterpret_cast<const char*>(rp + j * RB), _MM_HINT_T1);
            if (table_size == 512 && (j & 7) == 0)  // the ninth bits: 8 bytes per position
              _mm_prefetch(reinterpret_cast<const char*>(rp + b.nsub * RB + j * 8), _MM_HINT_T1);
          }
#ifdef __AVX512FP16__
        lut_build_one_fp16<DD>(b.cbh + m * d * table_size, b.xh + t * b.stride + j * d, d, table_size, L);
#else
        lut_build_one<DD>(b.cb_transposed + m * (d + 1) * table_size, b.x + t * b.stride + j * d, d, table_size, L);
#endif
      }
    }
}
using BuildFn = void (*)(const BuildArgs&, int64_t, int64_t, uint8_t*);
#endif  // FASQ_VBMI

}  // namespace fasq_cpu
