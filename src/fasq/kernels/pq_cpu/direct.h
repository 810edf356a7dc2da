// DIRECT: one output row at a time from the stored layout (AVX-512, AVX2, scalar).
#pragma once

#include "common.h"
#include "decode.h"
#include "io.h"

namespace fasq_cpu {

// DIRECT: one row at a time.  idx[m] = decoded codes of codebook m; cb[m] = fp32 codebook
// [K][DP]; xs[t] = prepared input of token t.  Returns sum over groups of scale * (W_n row . x).
struct RowArgs {
  const int32_t* const* idx;  // [M] -> [n_sub (+16)]
  const float* const* cb;     // [M] -> [K][DP]
  const float* const* xs;     // [NT] -> prepared input
  const c10::Half* scales;    // row's scales [G] or nullptr
  int64_t n_books, nsub, gs, ng;
};

template <int DP, int NT>
static void row_scalar(const RowArgs& a, float* out) {
  float tot[NT] = {};
  const int64_t ngroups = a.ng ? a.ng : 1;
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t js = g * a.gs, je = std::min(js + a.gs, a.nsub);
    float acc[NT] = {};
    for (int64_t j = js; j < je; ++j) {
      float w[DP] = {};
      for (int64_t m = 0; m < a.n_books; ++m) {
        const float* c = a.cb[m] + static_cast<int64_t>(a.idx[m][j]) * DP;
        for (int q = 0; q < DP; ++q) w[q] += c[q];
      }
      for (int t = 0; t < NT; ++t) {
        const float* xv = a.xs[t] + j * DP;
        float s = 0.f;
        for (int q = 0; q < DP; ++q) s += w[q] * xv[q];
        acc[t] += s;
      }
    }
    const float sc = a.scales ? static_cast<float>(a.scales[g]) : 1.0f;
    for (int t = 0; t < NT; ++t) tot[t] += sc * acc[t];
  }
  for (int t = 0; t < NT; ++t) out[t] = tot[t];
}

#ifdef FASQ_AVX512
template <int DP, int NT>
static void row_avx512(const RowArgs& a, float* out) {
  __m512 tot[NT];
  for (int t = 0; t < NT; ++t) tot[t] = _mm512_setzero_ps();
  const int64_t ngroups = a.ng ? a.ng : 1;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t js = g * a.gs, je = std::min(js + a.gs, a.nsub);
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    if constexpr (DP <= 2) {
      for (int64_t j0 = js; j0 < je; j0 += 16) {
        const int64_t n = std::min<int64_t>(16, je - j0);
        const __mmask16 km = static_cast<__mmask16>((1u << n) - 1u);
        if constexpr (DP == 1) {
          __m512 w = zero;
          for (int64_t m = 0; m < a.n_books; ++m) {
            const __m512i iv = _mm512_loadu_si512(a.idx[m] + j0);
            w = _mm512_add_ps(w, _mm512_mask_i32gather_ps(zero, km, iv, a.cb[m], 4));
          }
          for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.xs[t] + j0), acc[t]);
        } else {
          __m512d w0 = _mm512_setzero_pd(), w1 = _mm512_setzero_pd();
          for (int64_t m = 0; m < a.n_books; ++m) {
            const __m512i iv = _mm512_loadu_si512(a.idx[m] + j0);
            const double* cbd = reinterpret_cast<const double*>(a.cb[m]);
            w0 = _mm512_castps_pd(_mm512_add_ps(_mm512_castpd_ps(w0), _mm512_castpd_ps(_mm512_mask_i32gather_pd(
                _mm512_setzero_pd(), static_cast<__mmask8>(km), _mm512_castsi512_si256(iv), cbd, 8))));
            w1 = _mm512_castps_pd(_mm512_add_ps(_mm512_castpd_ps(w1), _mm512_castpd_ps(_mm512_mask_i32gather_pd(
                _mm512_setzero_pd(), static_cast<__mmask8>(km >> 8), _mm512_extracti64x4_epi64(iv, 1), cbd, 8))));
          }
          for (int t = 0; t < NT; ++t) {
            acc[t] = _mm512_fmadd_ps(_mm512_castpd_ps(w0), _mm512_loadu_ps(a.xs[t] + 2 * j0), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_castpd_ps(w1), _mm512_loadu_ps(a.xs[t] + 2 * j0 + 16), acc[t]);
          }
        }
      }
    } else {
      // DP in {4, 8, 16}: 16/DP sub-vectors per register, one plain load per sub-vector (lanes
      // past the group's end stay zero).
      constexpr int PER = 16 / DP;
      for (int64_t j0 = js; j0 < je; j0 += PER) {
        const int n = static_cast<int>(std::min<int64_t>(PER, je - j0));
        const __mmask16 km = static_cast<__mmask16>(n == PER ? 0xFFFF : (1u << (n * DP)) - 1u);
        __m512 w = _mm512_setzero_ps();
        for (int64_t m = 0; m < a.n_books; ++m) {
          const int32_t* ip = a.idx[m] + j0;
          const float* cb = a.cb[m];
          __m512 v;
          if constexpr (DP == 16) {
            v = _mm512_loadu_ps(cb + static_cast<int64_t>(ip[0]) * 16);
          } else if constexpr (DP == 8) {
            v = _mm512_castps256_ps512(_mm256_loadu_ps(cb + static_cast<int64_t>(ip[0]) * 8));
            v = _mm512_insertf32x8(v, _mm256_loadu_ps(cb + static_cast<int64_t>(ip[n > 1]) * 8), 1);
          } else {
            v = _mm512_castps128_ps512(_mm_loadu_ps(cb + static_cast<int64_t>(ip[0]) * 4));
            v = _mm512_insertf32x4(v, _mm_loadu_ps(cb + static_cast<int64_t>(ip[n > 1 ? 1 : 0]) * 4), 1);
            v = _mm512_insertf32x4(v, _mm_loadu_ps(cb + static_cast<int64_t>(ip[n > 2 ? 2 : 0]) * 4), 2);
            v = _mm512_insertf32x4(v, _mm_loadu_ps(cb + static_cast<int64_t>(ip[n > 3 ? 3 : 0]) * 4), 3);
          }
          w = _mm512_add_ps(w, v);
        }
        w = _mm512_maskz_mov_ps(km, w);
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.xs[t] + j0 * DP), acc[t]);
      }
    }
    const __m512 sc = _mm512_set1_ps(a.scales ? static_cast<float>(a.scales[g]) : 1.0f);
    for (int t = 0; t < NT; ++t) tot[t] = _mm512_fmadd_ps(acc[t], sc, tot[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(tot[t]);
}
#endif

#ifdef FASQ_AVX2
template <int DP, int NT>
static void row_avx2(const RowArgs& a, float* out) {
  alignas(32) static const int32_t lane_ids[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_ids));
  __m256 tot[NT];
  for (int t = 0; t < NT; ++t) tot[t] = _mm256_setzero_ps();
  const int64_t ngroups = a.ng ? a.ng : 1;
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t js = g * a.gs, je = std::min(js + a.gs, a.nsub);
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    if constexpr (DP == 1) {
      for (int64_t j0 = js; j0 < je; j0 += 8) {
        const __m256i km = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(je - j0)), lanes);
        __m256 w = _mm256_setzero_ps();
        for (int64_t m = 0; m < a.n_books; ++m) {
          const __m256i iv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.idx[m] + j0));
          w = _mm256_add_ps(w, _mm256_mask_i32gather_ps(_mm256_setzero_ps(), a.cb[m], iv, _mm256_castsi256_ps(km), 4));
        }
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.xs[t] + j0), acc[t]);
      }
    } else if constexpr (DP == 2) {
      for (int64_t j0 = js; j0 < je; j0 += 4) {
        const __m256i n4 = _mm256_set1_epi64x(je - j0);
        const __m256i km = _mm256_cmpgt_epi64(n4, _mm256_set_epi64x(3, 2, 1, 0));
        __m256d w = _mm256_setzero_pd();
        for (int64_t m = 0; m < a.n_books; ++m) {
          const __m128i iv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.idx[m] + j0));
          const __m256d gv = _mm256_mask_i32gather_pd(_mm256_setzero_pd(), reinterpret_cast<const double*>(a.cb[m]), iv,
                                                      _mm256_castsi256_pd(km), 8);
          w = _mm256_castps_pd(_mm256_add_ps(_mm256_castpd_ps(w), _mm256_castpd_ps(gv)));
        }
        for (int t = 0; t < NT; ++t)
          acc[t] = _mm256_fmadd_ps(_mm256_castpd_ps(w), _mm256_loadu_ps(a.xs[t] + 2 * j0), acc[t]);
      }
    } else {
      constexpr int PER = DP >= 8 ? 1 : 8 / DP;  // sub-vectors per 8-float register
      for (int64_t j0 = js; j0 < je; j0 += PER) {
        for (int h = 0; h < (DP >= 8 ? DP / 8 : 1); ++h) {
          alignas(32) float wbuf[8];
          for (int q = 0; q < 8; ++q) wbuf[q] = 0.f;
          for (int q = 0; q < PER; ++q) {
            const int64_t j = j0 + q;
            if (j >= je) break;
            for (int64_t m = 0; m < a.n_books; ++m) {
              const float* cp = a.cb[m] + static_cast<int64_t>(a.idx[m][j]) * DP + h * 8;
              for (int c = 0; c < std::min(DP, 8); ++c) wbuf[q * std::min(DP, 8) + c] += cp[c];
            }
          }
          const __m256 w = _mm256_load_ps(wbuf);
          for (int t = 0; t < NT; ++t)
            acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.xs[t] + j0 * DP + h * 8), acc[t]);
        }
      }
    }
    const __m256 sc = _mm256_set1_ps(a.scales ? static_cast<float>(a.scales[g]) : 1.0f);
    for (int t = 0; t < NT; ++t) tot[t] = _mm256_fmadd_ps(acc[t], sc, tot[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum256(tot[t]);
}
#endif

using RowFn = void (*)(const RowArgs&, float*);

template <int NT>
static RowFn pick_row_fn(int isa, int dp) {
#define FASQ_DP_SWITCH(FN)                     \
  switch (dp) {                                \
    case 1: return &FN<1, NT>;                 \
    case 2: return &FN<2, NT>;                 \
    case 4: return &FN<4, NT>;                 \
    case 8: return &FN<8, NT>;                 \
    case 16: return &FN<16, NT>;               \
  }
#ifdef FASQ_AVX512
  if (isa >= AVX512) { FASQ_DP_SWITCH(row_avx512) }
#endif
#ifdef FASQ_AVX2
  if (isa >= AVX2) { FASQ_DP_SWITCH(row_avx2) }
#endif
  (void)isa;
  FASQ_DP_SWITCH(row_scalar)
#undef FASQ_DP_SWITCH
  TORCH_CHECK(false, "fasq cpu_pq_linear: padded sub-vector dim ", dp, " not in {1,2,4,8,16}");
}

static RowFn pick_row_fn(int isa, int dp, int nt) {
  switch (nt) {
    case 1: return pick_row_fn<1>(isa, dp);
    case 2: return pick_row_fn<2>(isa, dp);
    case 4: return pick_row_fn<4>(isa, dp);
    case 8: return pick_row_fn<8>(isa, dp);
  }
  TORCH_CHECK(false, "fasq cpu_pq_linear: bad token block ", nt);
}

static void run_direct(const at::Tensor& x2, int64_t T, at::Tensor& y, const at::Tensor& codes, const at::Tensor& tables,
                       const at::Tensor& scales, const at::Tensor& signs, const at::Tensor& bias, const int64_t* mt) {
  const int64_t out = mt[M_OUT], nsub = mt[M_NSUB], n_books = mt[M_M], dp = mt[M_DP], n_centroids = mt[M_K];
  const int isa = static_cast<int>(mt[M_ISA]), b = static_cast<int>(mt[M_BITS]);
  const int64_t words = mt[M_WORDS], nbytes = words * 4;
  // Token blocks of 1, 2, 4 or 8 (zero-padded): the gathers of a row are shared by a block's tokens.
  const int nt = T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : 8;
  const int64_t T_pad = (T + nt - 1) / nt * nt;
  const int64_t stride = nsub * dp + 64;
  thread_local std::vector<float> xbuf_v, tmp_v, ybuf_v;
  float* xbuf = scratch(xbuf_v, static_cast<size_t>(T_pad * stride));
  prepare_input(x2, T, mt, signs, static_cast<int>(dp), xbuf, stride, tmp_v);
  std::fill(xbuf + T * stride, xbuf + T_pad * stride, 0.0f);
  float* ybuf = scratch(ybuf_v, static_cast<size_t>(T_pad * out));
  const RowFn fn = pick_row_fn(isa, static_cast<int>(dp), nt);
  const uint8_t* cbase = reinterpret_cast<const uint8_t*>(codes.data_ptr<int32_t>());
  const float* tb = tables.data_ptr<float>();
  const c10::Half* sp = mt[M_NG] ? scales.data_ptr<c10::Half>() : nullptr;
  const int64_t ng = mt[M_NG];
  // ~2.5 ns per (row, code) for decode + gather, plus the FMAs of each token.
  const int nth = n_threads(static_cast<double>(out) * nsub * n_books * (2.5 + 0.1 * T_pad * dp));
  (void)nth;  // unused when built without OpenMP
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
    std::vector<int32_t> idx_v(static_cast<size_t>(n_books * (nsub + 16)));
    std::vector<const int32_t*> idx_p(n_books);
    std::vector<const float*> cb_p(n_books);
    for (int64_t m = 0; m < n_books; ++m) {
      idx_p[m] = idx_v.data() + m * (nsub + 16);
      cb_p[m] = tb + m * n_centroids * dp;
    }
    const float* xs[8];
    float res[8];
#pragma omp for schedule(static)
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t m = 0; m < n_books; ++m)
        decode_row(cbase + (m * out + o) * nbytes, nbytes, b, nsub, idx_v.data() + m * (nsub + 16), isa);
      RowArgs ra{idx_p.data(), cb_p.data(), xs, sp ? sp + o * ng : nullptr, n_books, nsub, mt[M_GS], ng};
      for (int64_t t0 = 0; t0 < T_pad; t0 += nt) {
        for (int t = 0; t < nt; ++t) xs[t] = xbuf + (t0 + t) * stride;
        fn(ra, res);
        for (int t = 0; t < nt; ++t) ybuf[(t0 + t) * out + o] = res[t];
      }
    }
  }
  store_outputs(y, T, out, ybuf, bias);
}

}  // namespace fasq_cpu
