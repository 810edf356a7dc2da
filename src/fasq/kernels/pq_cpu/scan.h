// LUT and PERM: run_scan, the method's entry point (threads, slices, chunks of tables).
#pragma once

#include "io.h"
#include "scan_kernels.h"
#include "scan_tables.h"

namespace fasq_cpu {

#ifdef FASQ_VBMI
// LUT (perm = false) or PERM (perm = true).  LUT tables: fp32 cb_transposed [M][d + 1][KP] (row d: max |cb|
// per coordinate); PERM tables: uint8 codebook planes [M][d][2][KP].
static void run_scan(bool perm, const at::Tensor& x2, int64_t T, at::Tensor& y, const at::Tensor& codes,
                     const at::Tensor& tables, const at::Tensor& scales, const at::Tensor& signs,
                     const at::Tensor& bias, const int64_t* mt) {
  const int64_t out = mt[M_OUT], nsub = mt[M_NSUB], n_books = mt[M_M], d = mt[M_D], table_size = mt[M_KP];
  const int64_t nrb = (out + RB - 1) / RB, ng = mt[M_NG];
  const int64_t stride = nsub * d + 16;
  const int64_t cstride = nsub * RB + (table_size == 512 ? nsub * 8 : 0);
  TORCH_CHECK(table_size == 64 || table_size == 128 || table_size == 256 || table_size == 512,
              "fasq cpu_pq_linear: bad table size");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == nrb * n_books * cstride,
              "fasq cpu_pq_linear: codes are not in the repacked layout");
  TORCH_CHECK(tables.scalar_type() == (perm ? at::kByte : at::kFloat) && tables.is_contiguous(),
              "fasq cpu_pq_linear: bad tables");
  thread_local std::vector<float> xbuf_v, tmp_v, ts_v, yp_v, yfin_v;
  thread_local std::vector<uint8_t> lut_v;
  // The scans prefetch codes SCAN_PF row blocks ahead, and the LUT's table build the first row
  // blocks' codes (BuildArgs).  Nothing is requested here: requesting the first SCAN_PF row blocks
  // (all of a small layer's codes) in one loop before the rotation made the LUT 5-12% and PERM
  // (4 tokens) 3-5% slower (A/B on SmolLM2 shapes, layers cycled as in a decode step).
  float* xbuf = scratch(xbuf_v, static_cast<size_t>(T * stride));
  prepare_input(x2, T, mt, signs, static_cast<int>(d), xbuf, stride, tmp_v);
  // Per (row block, code): ~8 ns per token's LUT lookup, ~10 ns per coordinate per pass of up to
  // 4 tokens for PERM; the LUT build costs ~50 ns per 256-entry table.
  const double per_code = perm ? 10.0 * d * ((T + 3) / 4) : 8.0 * T;
  const double work = static_cast<double>(nrb) * n_books * nsub * per_code +
                      (perm ? 0.0 : 0.2 * T * n_books * nsub * table_size);
  // One slice of the sub-vector positions per thread: a thread builds the LUT tables of its slice
  // and scans every row over it, so the parallel region has no barrier inside (on a shared
  // machine each barrier can cost a scheduler time slice); slices' partial outputs are summed after.
  const int64_t n_slices = std::min<int64_t>(n_threads(work), nsub);
  constexpr int64_t kRowBlocksPerPass = 8;  // row blocks per pass over a group: its tables are reused from L1
  float* ypart = scratch(yp_v, static_cast<size_t>(n_slices * T * nrb * RB));
  float* ts = scratch(ts_v, static_cast<size_t>(T));
  // LUT: a thread builds the tables of `chunk` positions of its slice (~16 KiB), scans every row
  // block over them, and goes on to the next chunk: the tables stay in L1 for the scan, and a call
  // touches 16 KiB of table scratch instead of n_sub * 2 * KP bytes per token (147 KiB for a
  // SmolLM2 layer: what a decode step whose caches were flushed must fetch again).
  int64_t chunk = std::max<int64_t>(1, kLutChunkBytes / (2 * table_size * n_books * T));
  if (chunk >= mt[M_GS]) chunk = chunk / mt[M_GS] * mt[M_GS];  // whole groups
  const int64_t n_tab = perm ? 0 : T * n_books * chunk;  // tables per thread
  uint8_t* lut = nullptr;
  const float* cb_transposed = perm ? nullptr : tables.data_ptr<float>();
#ifdef __AVX512FP16__
  thread_local std::vector<uint32_t> xh_v;
  uint32_t* xh = perm ? nullptr : scratch(xh_v, static_cast<size_t>(T * stride));
#else
  const uint32_t* xh = nullptr;
#endif
  if (!perm) {
    // Token scale: a bound on |entry| from the per-coordinate maxima of |codebook|, so that the
    // largest possible entry maps to LUT_MAX.
    for (int64_t t = 0; t < T; ++t) {
      float* xt = xbuf + t * stride;
      float bound = 0.f;
      for (int64_t m = 0; m < n_books; ++m) {
        const float* cmax = cb_transposed + (m * (d + 1) + d) * table_size;
        if (16 % d == 0) {
          // 16 / d sub-vectors per register: |x| * cmax, summed within each group of d lanes by
          // butterfly steps, then the max over lanes (zero-padded tail lanes do not change it).
          alignas(64) float pat[16];
          for (int i = 0; i < 16; ++i) pat[i] = cmax[i % d];
          const __m512 pv = _mm512_load_ps(pat);
          __m512 mx = _mm512_setzero_ps();
          for (int64_t i = 0; i < nsub * d; i += 16) {
            const __mmask16 km = nsub * d - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nsub * d - i)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(km, xt + i)), pv);
            if (d >= 2) v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));
            if (d >= 4) v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));
            if (d >= 8) v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
            if (d >= 16) v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
            mx = _mm512_max_ps(mx, v);
          }
          bound = std::max(bound, _mm512_reduce_max_ps(mx));
          continue;
        }
        for (int64_t j = 0; j < nsub; ++j) {
          float b = 0.f;
          for (int64_t c = 0; c < d; ++c) b += std::fabs(xt[j * d + c]) * cmax[c];
          bound = std::max(bound, b);
        }
      }
      const float sc = (bound > 0.f && std::isfinite(bound)) ? bound / LUT_MAX : 1.0f;
      const float inv = 1.0f / sc;
#ifdef __AVX512FP16__
      // x / tscale rounded to fp16, each value twice in a 32-bit word (lut_build_one_fp16)
      uint32_t* xht = xh + t * stride;
      const __m512 iv = _mm512_set1_ps(inv);
      for (int64_t i = 0; i < nsub * d; i += 16) {
        const __mmask16 km = nsub * d - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nsub * d - i)) - 1);
        const __m512i h = _mm512_cvtepu16_epi32(
            _mm512_cvtps_ph(_mm512_mul_ps(_mm512_maskz_loadu_ps(km, xt + i), iv), _MM_FROUND_TO_NEAREST_INT));
        _mm512_mask_storeu_epi32(xht + i, km, _mm512_or_si512(h, _mm512_slli_epi32(h, 16)));
      }
#else
      for (int64_t i = 0; i < nsub * d; ++i) xt[i] *= inv;
#endif
      ts[t] = sc;
    }
    lut = scratch(lut_v, static_cast<size_t>(n_slices * n_tab * 2 * table_size));
    if (mt[M_POISON]) std::fill(lut, lut + n_slices * n_tab * 2 * table_size, uint8_t(0xFF));
  }
  if (mt[M_POISON]) std::fill(ypart, ypart + n_slices * T * nrb * RB, std::numeric_limits<float>::quiet_NaN());
  ScanArgs a{codes.data_ptr<uint8_t>(), perm ? tables.data_ptr<uint8_t>() : lut, xbuf, ts,
             ng ? scales.data_ptr<c10::Half>() : nullptr, ypart, T, n_books, d, nsub, mt[M_GS], ng, nrb, n_slices,
             stride, cstride};
#ifdef __AVX512FP16__
  // fp16 copy of the codebooks [M][d][KP] for the fp16 build (the values are exact fp16).
  thread_local std::vector<uint16_t> cbh_v;
  uint16_t* cbh = perm ? nullptr : scratch(cbh_v, static_cast<size_t>(n_books * d * table_size));
  if (!perm)
    for (int64_t m = 0; m < n_books; ++m)
      for (int64_t i = 0; i < d * table_size; i += 16)  // table_size is a multiple of 64
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cbh + m * d * table_size + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(cb_transposed + m * (d + 1) * table_size + i),
                                            _MM_FROUND_TO_NEAREST_INT));
#else
  const uint16_t* cbh = nullptr;
#endif
  const BuildArgs ba{cb_transposed, cbh, xbuf, xh, stride, T, n_books, d, table_size, nsub, codes.data_ptr<uint8_t>(),
                     std::min<int64_t>(nrb, SCAN_PF), n_books * cstride, cstride};
  const BuildFn build = d == 2 ? &lut_build_chunk<2> : d == 1 ? &lut_build_chunk<1> : d == 4 ? &lut_build_chunk<4>
                      : &lut_build_chunk<0>;
  const ScanFn full = pick_scan(perm, table_size, 4, d);
  const ScanFn tail = pick_scan(perm, table_size, static_cast<int>(T % 4), d);
  // One token, one codebook: scan_lut1, kLut1Rows row blocks per pass (the last pass takes the rest).
  constexpr int64_t kLut1Rows = 4;
  const bool lut1 = !perm && T == 1 && n_books == 1;
  const Lut1Fn lut1_full = pick_lut1(table_size, kLut1Rows);
  const Lut1Fn lut1_tail = pick_lut1(table_size, static_cast<int>(nrb % kLut1Rows));
  auto slice = [&](int64_t s) {
    const int64_t ja = s * nsub / n_slices, jb = (s + 1) * nsub / n_slices;
    if (perm && T > kPermBlockMinTokens) {
      thread_local std::vector<float> pb_v;
      float* buf = scratch(pb_v, static_cast<size_t>(mt[M_GS] * d * RB));  // 64-byte aligned (aligned loads)
      switch (table_size) {
        case 64: perm_blocks<64>(a, 0, nrb, s, ja, jb, buf); break;
        case 128: perm_blocks<128>(a, 0, nrb, s, ja, jb, buf); break;
        case 256: perm_blocks<256>(a, 0, nrb, s, ja, jb, buf); break;
        default: perm_blocks<512>(a, 0, nrb, s, ja, jb, buf);
      }
      return;
    }
    if (perm) {
      for (int64_t rb0 = 0; rb0 < nrb; rb0 += kRowBlocksPerPass)
        for (int64_t t0 = 0; t0 < T; t0 += 4)
          (T - t0 >= 4 ? full : tail)(a, t0, rb0, std::min(nrb, rb0 + kRowBlocksPerPass), s, ja, jb);
      return;
    }
    ScanArgs as = a;
    uint8_t* tab = lut + s * n_tab * 2 * table_size;
    as.tab = tab;
    for (int64_t c0 = ja, c1; c0 < jb; c0 = c1) {
      c1 = std::min(jb, c0 + chunk);
      as.tab_j0 = c0, as.tab_n = c1 - c0, as.accumulate = c0 != ja;
      build(ba, c0, c1, tab);
      if (lut1) {
        for (int64_t rb0 = 0; rb0 < nrb; rb0 += kLut1Rows)
          (nrb - rb0 >= kLut1Rows ? lut1_full : lut1_tail)(as, rb0, s, c0, c1);
        continue;
      }
      for (int64_t rb0 = 0; rb0 < nrb; rb0 += kRowBlocksPerPass)
        for (int64_t t0 = 0; t0 < T; t0 += 4)
          (T - t0 >= 4 ? full : tail)(as, t0, rb0, std::min(nrb, rb0 + kRowBlocksPerPass), s, c0, c1);
    }
  };
  if (n_slices == 1) {
    slice(0);  // no OpenMP region at all: even a team of one costs a call into libgomp
  } else {
#pragma omp parallel for schedule(static, 1) num_threads(n_slices)
    for (int64_t s = 0; s < n_slices; ++s) slice(s);
  }
  // y = sum of the slices' partial outputs (+ bias).
  float* yf = y.scalar_type() == at::kFloat ? y.data_ptr<float>() : nullptr;
  const c10::Half* bp = bias.defined() && bias.numel() ? bias.data_ptr<c10::Half>() : nullptr;
  float* yfin = yf ? yf : scratch(yfin_v, static_cast<size_t>(T * out));
  for (int64_t t = 0; t < T; ++t) {
    float* dst = yfin + t * out;
    const float* p0 = ypart + t * nrb * RB;
    for (int64_t o = 0; o < out; ++o) dst[o] = p0[o] + (bp ? static_cast<float>(bp[o]) : 0.0f);
    for (int64_t s = 1; s < n_slices; ++s) {
      const float* ps = ypart + (s * T + t) * nrb * RB;
      for (int64_t o = 0; o < out; ++o) dst[o] += ps[o];
    }
  }
  if (!yf) store_outputs(y, T, out, yfin, at::Tensor());  // bias already added
}
#endif  // FASQ_VBMI

}  // namespace fasq_cpu
