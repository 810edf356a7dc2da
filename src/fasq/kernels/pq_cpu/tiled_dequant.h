// TILED on the repacked layout: row blocks of W_r (or W) dequantized by byte permutes.
#pragma once

#include "io.h"
#include "scan_lookup.h"

namespace fasq_cpu {

#ifdef FASQ_VBMI
// TILED on the repacked layout (PERM's operands: uint8 codes, codebook byte planes, scales
// [n_rb][G][64]): row block rb of W_r, transposed, into dst[i * ld + r] (input column i, row r of
// the block), rounded to OutT.  The centroids are looked up as PERM does (byte permutes, 64 rows
// per instruction), then the sum over codebooks times the group scale in fp32: the same values as
// dequant_row, ~0.5 instructions per weight instead of its gathers (~1 ns per weight here).
template <typename OutT>
static inline void store_row64(OutT* p, const __m512 v[4]) {
  if constexpr (std::is_same_v<OutT, float>) {
    for (int q = 0; q < 4; ++q) _mm512_storeu_ps(p + 16 * q, v[q]);
  } else if constexpr (std::is_same_v<OutT, c10::Half>) {
    for (int q = 0; q < 4; ++q)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * q),
                          _mm512_cvtps_ph(v[q], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bf16, rounded to nearest even as torch rounds (the values are finite)
#ifdef __AVX512BF16__
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    _mm512_storeu_si512(p + 32, (__m512i)_mm512_cvtne2ps_pbh(v[3], v[2]));
#else
    for (int q = 0; q < 4; ++q) {
      const __m512i b = _mm512_castps_si512(v[q]);
      const __m512i r = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)),
                                         _mm512_set1_epi32(0x7FFF));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * q),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(b, r), 16)));
    }
#endif
  }
}

template <int KP, typename OutT>
static void dequant_block_t(const uint8_t* codes, const uint8_t* planes, const c10::Half* scales, const int64_t* mt,
                            int64_t rb, int64_t width, OutT* dst, int64_t ld) {
  // width: the input columns wanted (in_features; n_sub * d can be larger)
  const int64_t nsub = mt[M_NSUB], n_books = mt[M_M], d = mt[M_D], gs = mt[M_GS], ng = mt[M_NG];
  const int64_t cstride = nsub * RB + (KP == 512 ? nsub * 8 : 0);
#ifdef __AVX512FP16__
  if constexpr (std::is_same_v<OutT, c10::Half>) {
    // fp16 out, one codebook: the fp16 product centroid * scale, rounded once, is what fp32
    // arithmetic rounded to fp16 gives (the exact product of two fp16 values fits in fp32).
    if (n_books == 1) {
      const uint8_t* cb = codes + rb * cstride;
      __m512h s0 = _mm512_set1_ph(1.0f), s1 = s0;
      for (int64_t j = 0; j < nsub; ++j) {
        if (scales && j % gs == 0) {
          s0 = _mm512_loadu_ph(scales + (rb * ng + j / gs) * RB);
          s1 = _mm512_loadu_ph(scales + (rb * ng + j / gs) * RB + 32);
        }
        const __m512i idx = _mm512_loadu_si512(cb + j * RB);
        const CodeMasks cm = code_masks<KP>(idx, ninth_bits<KP>(cb, nsub, j));
        for (int64_t c = 0; c < d && j * d + c < width; ++c) {
          __m512i w0, w1;
          lookup64_h<KP>(planes + c * 2 * KP, idx, cm, w0, w1);
          c10::Half* p = dst + (j * d + c) * ld;
          _mm512_storeu_ph(p, _mm512_mul_ph(_mm512_castsi512_ph(w0), s0));
          _mm512_storeu_ph(p + 32, _mm512_mul_ph(_mm512_castsi512_ph(w1), s1));
        }
      }
      return;
    }
  }
#endif
  __m512 sv[4];
  const uint8_t* cb = codes + rb * n_books * cstride;
  for (int64_t j = 0; j < nsub; ++j) {
    if (j % gs == 0) scales64(scales ? scales + (rb * ng + j / gs) * RB : nullptr, sv);
    weights64<KP>(cb, planes, n_books, cstride, nsub, d, j, 0, std::min<int64_t>(d, width - j * d), sv,
                  [&](int64_t c, const __m512* w) { store_row64(dst + (j * d + c) * ld, w); });
  }
}

// In-place FWHT along h rows of 16 fp32 values (a strip of 16 columns, one register per row), not
// normalized: radix-4 passes (two butterfly stages per load / store of four rows), then a radix-2
// one when log2(h) is odd.  A strip is 4 KiB at h = 64, 16 KiB at 256: L1.
static void fwht_rows16(float* buf, int64_t h) {
  int64_t len = 1;
  for (; len * 4 <= h; len *= 4)
    for (int64_t i = 0; i < h; i += 4 * len)
      for (int64_t a = i; a < i + len; ++a) {
        float* p0 = buf + a * 16;
        const __m512 u0 = _mm512_load_ps(p0), u1 = _mm512_load_ps(p0 + len * 16);
        const __m512 u2 = _mm512_load_ps(p0 + 2 * len * 16), u3 = _mm512_load_ps(p0 + 3 * len * 16);
        const __m512 s0 = _mm512_add_ps(u0, u1), d0 = _mm512_sub_ps(u0, u1);
        const __m512 s1 = _mm512_add_ps(u2, u3), d1 = _mm512_sub_ps(u2, u3);
        _mm512_store_ps(p0, _mm512_add_ps(s0, s1));
        _mm512_store_ps(p0 + len * 16, _mm512_add_ps(d0, d1));
        _mm512_store_ps(p0 + 2 * len * 16, _mm512_sub_ps(s0, s1));
        _mm512_store_ps(p0 + 3 * len * 16, _mm512_sub_ps(d0, d1));
      }
  if (len < h)  // one stage left (len = h / 2)
    for (int64_t a = 0; a < len; ++a) {
      float* p0 = buf + a * 16;
      const __m512 u0 = _mm512_load_ps(p0), u1 = _mm512_load_ps(p0 + len * 16);
      _mm512_store_ps(p0, _mm512_add_ps(u0, u1));
      _mm512_store_ps(p0 + len * 16, _mm512_sub_ps(u0, u1));
    }
}

// dequant_block_t's tile, but of W = W_r R^T (the original basis) instead of W_r: each rotation
// block's h rows of the row block's 64 columns are dequantized into an fp32 buffer (strips of 16
// columns), transformed along the rows (fwht_rows16), scaled by rsc = signs / sqrt(h) (rotation_scale's) and stored as
// OutT.  x then needs no rotation: this costs ~out * in FWHT work per call where rotating x costs
// ~T * in (with permutes: a 16-value register holds 16 columns here, so every stage is a plain
// add / subtract of rows).
template <int KP, typename OutT>
static void dequant_block_rot(const uint8_t* codes, const uint8_t* planes, const c10::Half* scales, const int64_t* mt,
                              int64_t rb, const float* rsc, OutT* dst, int64_t ld) {
  const int64_t nsub = mt[M_NSUB], n_books = mt[M_M], d = mt[M_D], gs = mt[M_GS], ng = mt[M_NG], in = mt[M_IN];
  const int64_t h = mt[M_ROT], cstride = nsub * RB + (KP == 512 ? nsub * 8 : 0);
  thread_local std::vector<float> buf_v;
  float* buf = scratch(buf_v, static_cast<size_t>(h * 64));  // [4 strips of 16 columns][h][16]
  __m512 sv[4];
  int64_t group = -1;
  const uint8_t* cb = codes + rb * n_books * cstride;
  for (int64_t b0 = 0; b0 < in; b0 += h) {
    // the positions whose rows (j * d + c) fall in [b0, b0 + h): a position may straddle two blocks
    for (int64_t j = b0 / d; j * d < b0 + h; ++j) {
      if (j / gs != group) {
        group = j / gs;
        scales64(scales ? scales + (rb * ng + group) * RB : nullptr, sv);
      }
      const int64_t c0 = std::max<int64_t>(0, b0 - j * d), c1 = std::min<int64_t>(d, b0 + h - j * d);
      weights64<KP>(cb, planes, n_books, cstride, nsub, d, j, c0, c1, sv, [&](int64_t c, const __m512* w) {
        for (int q = 0; q < 4; ++q) _mm512_store_ps(buf + (q * h + j * d + c - b0) * 16, w[q]);
      });
    }
    for (int q = 0; q < 4; ++q) fwht_rows16(buf + q * h * 16, h);
    for (int64_t a = 0; a < h; ++a) {  // row a times signs / sqrt(h), in the tile's dtype
      const __m512 f = _mm512_set1_ps(rsc[b0 + a]);
      __m512 v[4];
      for (int q = 0; q < 4; ++q) v[q] = _mm512_mul_ps(_mm512_load_ps(buf + (q * h + a) * 16), f);
      store_row64(dst + (b0 + a) * ld, v);
    }
  }
}

template <typename OutT>
static void dequant_block_rot(int64_t table_size, const uint8_t* codes, const uint8_t* planes, const c10::Half* scales,
                              const int64_t* mt, int64_t rb, const float* rsc, OutT* dst, int64_t ld) {
  switch (table_size) {
    case 64: return dequant_block_rot<64, OutT>(codes, planes, scales, mt, rb, rsc, dst, ld);
    case 128: return dequant_block_rot<128, OutT>(codes, planes, scales, mt, rb, rsc, dst, ld);
    case 256: return dequant_block_rot<256, OutT>(codes, planes, scales, mt, rb, rsc, dst, ld);
    default: return dequant_block_rot<512, OutT>(codes, planes, scales, mt, rb, rsc, dst, ld);
  }
}

template <typename OutT>
static void dequant_block_t(int64_t table_size, const uint8_t* codes, const uint8_t* planes, const c10::Half* scales,
                            const int64_t* mt, int64_t rb, int64_t width, OutT* dst, int64_t ld) {
  switch (table_size) {
    case 64: return dequant_block_t<64, OutT>(codes, planes, scales, mt, rb, width, dst, ld);
    case 128: return dequant_block_t<128, OutT>(codes, planes, scales, mt, rb, width, dst, ld);
    case 256: return dequant_block_t<256, OutT>(codes, planes, scales, mt, rb, width, dst, ld);
    default: return dequant_block_t<512, OutT>(codes, planes, scales, mt, rb, width, dst, ld);
  }
}
#endif  // FASQ_VBMI

}  // namespace fasq_cpu
