// Decoding the stored layout's bit-packed codes (DIRECT and the stored-layout TILED).
#pragma once

#include "common.h"

namespace fasq_cpu {

// Code decoding.  A row's codes are one LSB-first bit stream of n_sub codes of b bits (bytes in
// little-endian order, so code j sits at bits [j*b, (j+1)*b) of the row's bytes).
static void decode_row_scalar(const uint8_t* row, int64_t nbytes, int b, int64_t n, int32_t* idx) {
  const uint32_t mask = (1u << b) - 1u;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = j * b, byte = p >> 3;
    uint32_t v = 0;
    const int64_t avail = std::min<int64_t>(4, nbytes - byte);
    std::memcpy(&v, row + byte, static_cast<size_t>(avail));  // little-endian host assumed
    idx[j] = static_cast<int32_t>((v >> (p & 7)) & mask);
  }
}

#ifdef FASQ_VBMI
// 16 codes per step: bytes of the 16*b-bit window are moved so that lane i holds the 4 bytes
// starting at byte (i*b)/8, then shifted right by (i*b)%8 and masked.  Masked loads never fault.
struct DecodeTables {
  alignas(64) uint8_t perm[17][64];
  alignas(64) int32_t shift[17][16];
  DecodeTables() {
    for (int b = 1; b <= 16; ++b)
      for (int i = 0; i < 16; ++i) {
        const int p = i * b;
        for (int k = 0; k < 4; ++k) perm[b][4 * i + k] = static_cast<uint8_t>((p >> 3) + k);
        shift[b][i] = p & 7;
      }
  }
};
static const DecodeTables kDecode;

static void decode_row_vbmi(const uint8_t* row, int64_t nbytes, int b, int64_t n, int32_t* idx) {
  const __m512i perm = _mm512_load_si512(kDecode.perm[b]);
  const __m512i shift = _mm512_load_si512(kDecode.shift[b]);
  const __m512i mask = _mm512_set1_epi32((1 << b) - 1);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t off = (j0 * b) >> 3, rem = nbytes - off;
    const __mmask64 lm = rem >= 64 ? ~0ULL : ((1ULL << rem) - 1);
    const __m512i w = _mm512_maskz_loadu_epi8(lm, row + off);
    __m512i v = _mm512_permutexvar_epi8(perm, w);
    v = _mm512_and_si512(_mm512_srlv_epi32(v, shift), mask);
    _mm512_storeu_si512(idx + j0, v);  // idx has room for n rounded up to 16
  }
}
#endif

static void decode_row(const uint8_t* row, int64_t nbytes, int b, int64_t n, int32_t* idx, int isa) {
#ifdef FASQ_VBMI
  if (isa >= AVX512) return decode_row_vbmi(row, nbytes, b, n, idx);
#endif
  (void)isa;
  decode_row_scalar(row, nbytes, b, n, idx);
}

}  // namespace fasq_cpu
