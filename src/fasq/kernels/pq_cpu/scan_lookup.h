// Byte-permute lookups in the repacked layout (LUT, PERM and the repacked TILED).
#pragma once

#include "common.h"

namespace fasq_cpu {

#ifdef FASQ_VBMI
// LUT and PERM scan the repacked codes [n_rb][M][n_sub][64] (one byte per code, the codes of 64
// rows at one sub-vector position side by side): one 64-byte load feeds 64 table lookups done
// with byte permutes (vpermt2b), so no gather is needed.  Tables are fp16 split into a lo-byte
// plane and a hi-byte plane of KP entries each (KP = 64, 128, 256 or 512 >= K).  With KP = 512
// (9-bit codes) each (row block, codebook) holds the low bytes [n_sub][64] followed by the ninth
// bits [n_sub] as one 64-bit mask per position (bit i = byte lane i): a code byte picks an entry
// in each 256-entry half and the mask picks the half.
//   LUT:  per (token, codebook, j), entry k = <codebook[k], x_j> / tscale[t]; one lookup per code.
//   PERM: the codebook itself, per (codebook, coordinate); d lookups per code, then fp32 FMAs with
//         x.  Exact; the lookups are shared by all tokens of a pass.
struct ScanArgs {
  const uint8_t* codes;     // repacked [n_rb][M][cstride]: [n_sub][64] low bytes (+ [n_sub] u64 ninth bits)
  const uint8_t* tab;       // LUT: [T][M][n_sub][2][KP];  PERM: codebook planes [M][d][2][KP]
  const float* x;           // PERM: prepared input [T][stride]
  const float* tscale;      // LUT: [T]
  const c10::Half* scales;  // repacked [n_rb][G][64], or nullptr
  float* ypart;             // [n_slices][T][n_rb*64]
  int64_t T, n_books, d, nsub, gs, ng, nrb, n_slices, stride;
  int64_t cstride;                // bytes of codes per (row block, codebook): n_sub * 64 (* 9 / 8 for KP = 512)
  int64_t tab_j0 = 0, tab_n = 0;  // LUT: the tables held are those of positions [tab_j0, tab_j0 + tab_n)
  bool accumulate = false;        // add to ypart from the first group on (a later chunk of a slice)
};


// Table lookups of 64 code bytes at once.  A byte plane of KP entries is KP / 64 registers of 64
// entries; a single-source byte permute (vpermb: one uop, one per cycle on port 5) looks up the low
// six bits of every code in one register, a masked one (bit 6 of the code) merges the next
// register's entries in, and byte blends (bit 7, then the ninth bit) pick among those pairs.  The
// two-source vpermi2b covers 128 entries per instruction but costs ~2.75 cycles here (measured:
// 1.03 ns vs 0.40 ns per instruction, 8 independent chains), so the single-source chain is cheaper
// for every KP > 64: 256 entries in 4 permutes + 1 blend instead of 2 two-source permutes.
struct CodeMasks {
  __mmask64 b6, b7, b8;  // bits 6 and 7 of each code byte; b8: the ninth bits (KP = 512)
};

template <int KP>
static inline CodeMasks code_masks(__m512i idx, __mmask64 upper) {
  CodeMasks m{0, 0, upper};
  if constexpr (KP > 64) m.b6 = _mm512_test_epi8_mask(idx, _mm512_set1_epi8(0x40));
  if constexpr (KP > 128) m.b7 = _mm512_movepi8_mask(idx);
  return m;
}

// Entries [0, 128) of the plane at T for the low seven bits of each code.
static inline __m512i lookup_128(const __m512i* T, __m512i idx, __mmask64 b6) {
  const __m512i r = _mm512_permutexvar_epi8(idx, _mm512_load_si512(T));
  return _mm512_mask_permutexvar_epi8(r, b6, idx, _mm512_load_si512(T + 1));
}

template <int KP>
static inline __m512i lookup_plane(const __m512i* T, __m512i idx, const CodeMasks& m) {
  if constexpr (KP == 64) {
    return _mm512_permutexvar_epi8(idx, _mm512_load_si512(T));
  } else if constexpr (KP == 128) {
    return lookup_128(T, idx, m.b6);
  } else if constexpr (KP == 256) {
    return _mm512_mask_blend_epi8(m.b7, lookup_128(T, idx, m.b6), lookup_128(T + 2, idx, m.b6));
  } else {
    const __m512i lo = _mm512_mask_blend_epi8(m.b7, lookup_128(T, idx, m.b6), lookup_128(T + 2, idx, m.b6));
    const __m512i hi = _mm512_mask_blend_epi8(m.b7, lookup_128(T + 4, idx, m.b6), lookup_128(T + 6, idx, m.b6));
    return _mm512_mask_blend_epi8(m.b8, lo, hi);
  }
}

// Look up a byte plane pair (lo bytes, hi bytes) of one table for the 64 codes in idx (KP = 512:
// the ninth bits in `upper`, ignored otherwise).
template <int KP>
static inline void lookup_planes(const uint8_t* L, __m512i idx, __mmask64 upper, __m512i& lo, __m512i& hi) {
  const __m512i* T = reinterpret_cast<const __m512i*>(L);
  const CodeMasks m = code_masks<KP>(idx, upper);
  lo = lookup_plane<KP>(T, idx, m);
  hi = lookup_plane<KP>(T + KP / 64, idx, m);
}

// Row order inside a repacked row block: byte lane 2i holds row i, lane 2i + 1 row 32 + i
// (cpu.py: _lut_tensors).  So the even bytes of a looked-up plane, taken as 16-bit words, are
// rows 0..31 and the odd bytes rows 32..63: joining or widening the planes needs only and / shift /
// ternary-logic ops (ports 0 and 5) instead of byte permutes (port 5 only, two cycles each on this
// CPU, which already does the lookups).
static inline __m512i odd_bytes(__m512i v) { return _mm512_srli_epi16(v, 8); }

// 64 fp16 codebook values (one per row) as fp16 words: w0 rows 0..31, w1 rows 32..63; cm: the
// codes' masks (code_masks), shared by the lookups of every coordinate at one position.
template <int KP>
static inline void lookup64_h(const uint8_t* L, __m512i idx, const CodeMasks& cm, __m512i& w0, __m512i& w1) {
  const __m512i* T = reinterpret_cast<const __m512i*>(L);
  const __m512i lo = lookup_plane<KP>(T, idx, cm), hi = lookup_plane<KP>(T + KP / 64, idx, cm);
  // w0 = (lo & 0x00FF) | (hi << 8): rows 0..31;  w1 = (lo >> 8) | (hi & 0xFF00): rows 32..63
  const __m512i m = _mm512_set1_epi16(0x00FF);
  w0 = _mm512_ternarylogic_epi32(m, lo, _mm512_slli_epi16(hi, 8), 0xEA);   // (m & lo) | c
  w1 = _mm512_ternarylogic_epi32(m, hi, _mm512_srli_epi16(lo, 8), 0xAE);   // (~m & hi) | c
}

// PERM: the same 64 values as fp32, 4 x 16 lanes in row order.
template <int KP>
static inline void lookup64(const uint8_t* L, __m512i idx, const CodeMasks& cm, __m512 w[4]) {
  __m512i w0, w1;
  lookup64_h<KP>(L, idx, cm, w0, w1);
  w[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(w0));
  w[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w0, 1));
  w[2] = _mm512_cvtph_ps(_mm512_castsi512_si256(w1));
  w[3] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w1, 1));
}

// The ninth bits of position j's 64 codes (KP = 512; 0 otherwise): cb = one (row block, codebook)'s
// repacked codes, [n_sub][64] low bytes, then [n_sub] 64-bit masks.
template <int KP>
static inline __mmask64 ninth_bits(const uint8_t* cb, int64_t nsub, int64_t j) {
  if constexpr (KP == 512) {
    uint64_t u;
    std::memcpy(&u, cb + nsub * RB + j * 8, 8);
    return static_cast<__mmask64>(u);
  } else {
    return 0;
  }
}

// A row block's 64 weights of W_r at position j, fp32 in row order, for each coordinate c in
// [c0, c1): its M codebooks' centroids looked up (lookup64) and summed, times the group scale sv,
// handed to emit(c, w) (PERM's blocks and TILED).  The first codebook's codes and their masks are
// read once for all the coordinates (the common case, M = 1, then does one code_masks per position).
// codes_rb = the row block's repacked codes (M x cstride bytes), planes = codebook planes [M][d][2][KP].
template <int KP, typename Emit>
static inline void weights64(const uint8_t* codes_rb, const uint8_t* planes, int64_t n_books, int64_t cstride,
                             int64_t nsub, int64_t d, int64_t j, int64_t c0, int64_t c1, const __m512 sv[4], Emit&& emit) {
  const __m512i idx0 = _mm512_loadu_si512(codes_rb + j * RB);
  const CodeMasks cm0 = code_masks<KP>(idx0, ninth_bits<KP>(codes_rb, nsub, j));
  for (int64_t c = c0; c < c1; ++c) {
    __m512 out[4];
    lookup64<KP>(planes + c * 2 * KP, idx0, cm0, out);
    for (int64_t m = 1; m < n_books; ++m) {
      const uint8_t* cb = codes_rb + m * cstride;
      const __m512i idx = _mm512_loadu_si512(cb + j * RB);
      __m512 w[4];
      lookup64<KP>(planes + (m * d + c) * 2 * KP, idx, code_masks<KP>(idx, ninth_bits<KP>(cb, nsub, j)), w);
      for (int q = 0; q < 4; ++q) out[q] = _mm512_add_ps(out[q], w[q]);
    }
    for (int q = 0; q < 4; ++q) out[q] = _mm512_mul_ps(out[q], sv[q]);
    emit(c, out);
  }
}

// LUT entries are int16 fixed point: entry = round(<codebook[k], x_j> / tscale) with
// |entry| <= LUT_MAX (the token scale tscale comes from a bound on |entry|), stored as a lo-byte
// plane and an offset-binary hi-byte plane (hi ^ 0x80, so both planes are unsigned).  A scan adds
// the bytes in 16-bit lanes (exact, for up to 256 positions), then combines them in int32:
// sum = 256 * (sum_hi - 128 n) + sum_lo, exact, converted to fp32 once per 256 positions.  So the
// only rounding is one per table entry (at most 1/2 of 1/32000 of the bound; fp16 arithmetic in
// the AVX512-FP16 build adds up to 2^-12 relative), and the scan does no conversions per code.
constexpr float LUT_MAX = 32000.0f;  // < 32767 with room for the fp16 build's rounding
constexpr int64_t kSumSpan = 256;    // positions summed in 16-bit lanes before widening

// One row block's int16 sums over a span of positions: per plane the whole 16-bit words (even
// byte + 256 * odd byte, wrapping) and the odd bytes, so the even bytes' sum is recovered at the
// flush (words - 256 * odd, mod 2^16, and it is < 2^16: at most 256 x 255), one and per plane
// fewer per code.
struct IntSums {
  __m512i lo_w, lo_o, hi_w, hi_o;
  void zero() { lo_w = lo_o = hi_w = hi_o = _mm512_setzero_si512(); }
  // Add the looked-up planes of one position.
  void add(__m512i lo, __m512i hi) {
    lo_w = _mm512_add_epi16(lo_w, lo);
    lo_o = _mm512_add_epi16(lo_o, odd_bytes(lo));
    hi_w = _mm512_add_epi16(hi_w, hi);
    hi_o = _mm512_add_epi16(hi_o, odd_bytes(hi));
  }
  // acc[0..3] (rows 0..15, 16..31, 32..47, 48..63) += the entries summed over the n positions.
  void flush(int64_t n, __m512 acc[4]) const {
    const __m512i lo_e = _mm512_sub_epi16(lo_w, _mm512_slli_epi16(lo_o, 8));
    const __m512i hi_e = _mm512_sub_epi16(hi_w, _mm512_slli_epi16(hi_o, 8));
    const __m512i off = _mm512_set1_epi32(static_cast<int>(-32768 * n));
    auto part = [&](__m512i lo, __m512i hi, int half) {
      const __m256i l = half ? _mm512_extracti64x4_epi64(lo, 1) : _mm512_castsi512_si256(lo);
      const __m256i h = half ? _mm512_extracti64x4_epi64(hi, 1) : _mm512_castsi512_si256(hi);
      const __m512i v = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 8),
                                                           _mm512_cvtepu16_epi32(l)), off);
      return _mm512_cvtepi32_ps(v);
    };
    acc[0] = _mm512_add_ps(acc[0], part(lo_e, hi_e, 0));
    acc[1] = _mm512_add_ps(acc[1], part(lo_e, hi_e, 1));
    acc[2] = _mm512_add_ps(acc[2], part(lo_o, hi_o, 0));
    acc[3] = _mm512_add_ps(acc[3], part(lo_o, hi_o, 1));
  }
};

// A row block's 64 fp16 group scales as fp32 (rows in order), or ones when sc is nullptr (no scales).
static inline void scales64(const c10::Half* sc, __m512 sv[4]) {
  for (int q = 0; q < 4; ++q)
    sv[q] = sc ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + 16 * q)))
               : _mm512_set1_ps(1.0f);
}

// yp[0..63] (+)= acc * group scale * token scale: sc = the row block's 64 fp16 scales of the group,
// or nullptr (no scales); first: write instead of add.
static inline void store_scaled(float* yp, const __m512 acc[4], const c10::Half* sc, float ts, bool first) {
  const __m512 tv = _mm512_set1_ps(ts);
  for (int q = 0; q < 4; ++q) {
    const __m512 s = sc ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + 16 * q)))
                        : _mm512_set1_ps(1.0f);
    const __m512 v = _mm512_mul_ps(acc[q], _mm512_mul_ps(s, tv));
    _mm512_storeu_ps(yp + 16 * q, first ? v : _mm512_add_ps(_mm512_loadu_ps(yp + 16 * q), v));
  }
}
#endif  // FASQ_VBMI

}  // namespace fasq_cpu
