// DENSE16: y = x W^T for an unquantized 16-bit weight (the op cpu_dense16_linear).
#pragma once

#include "common.h"

namespace fasq_cpu {

// ---------------------------------------------------------------------------------------------
// DENSE16: y = x W^T (+ b) for an unquantized 16-bit weight (fp16 or bf16) [out, in], e.g. a tied
// embedding / output head that fasq keeps in its stored 16-bit form instead of an fp32 copy.  Each
// weight is widened to fp32 in registers and FMA'd with the fp32 input: fp32 sums over exactly the
// stored values, so the result equals F.linear(x, W.float()) up to summation order, with half the
// bytes read.  Rows go four at a time (four independent FMA chains) for blocks of up to 4 tokens.
template <bool BF16>
static inline float widen1(uint16_t v) {
  if (BF16) {
    uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
}

template <bool BF16, int NT>
static void dense16_rows_scalar(const uint16_t* w, int64_t in, const float* const* xs, int64_t o0, int64_t o1,
                                float* acc_out /* [NT][rows] */) {
  for (int64_t o = o0; o < o1; ++o) {
    float acc[NT] = {};
    const uint16_t* wr = w + o * in;
    for (int64_t i = 0; i < in; ++i) {
      const float wv = widen1<BF16>(wr[i]);
      for (int t = 0; t < NT; ++t) acc[t] += wv * xs[t][i];
    }
    for (int t = 0; t < NT; ++t) acc_out[t * (o1 - o0) + (o - o0)] = acc[t];
  }
}

#ifdef FASQ_AVX512
#ifndef FASQ_PF
#define FASQ_PF 16
#endif
template <bool BF16>
static inline __m512 widen16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  if (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

template <bool BF16, int NT>
static void dense16_rows_avx512(const uint16_t* w, int64_t in, const float* const* xs, int64_t o0, int64_t o1,
                                float* acc_out) {
  const int64_t rows = o1 - o0;
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    __m512 acc[4][NT];
    for (int r = 0; r < 4; ++r)
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 16) {
      const __mmask16 m = in - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in - i)) - 1);
      __m512 xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = _mm512_maskz_loadu_ps(m, xs[t] + i);
      // Software prefetch FASQ_PF rows ahead: the hardware prefetcher alone left this loop at ~2/3
      // of the bandwidth an fp32 F.linear reaches on one core.
      if ((i & 31) == 0)  // (a prefetch never faults, even past the end)
        for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (o + FASQ_PF + r) * in + i), _MM_HINT_T0);
      for (int r = 0; r < 4; ++r) {
        const __m512 wv = widen16<BF16>(w + (o + r) * in + i, m);
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int t = 0; t < NT; ++t) acc_out[t * rows + (o + r - o0)] = _mm512_reduce_add_ps(acc[r][t]);
  }
  if (o < o1) {
    float tail[NT * 4];
    dense16_rows_scalar<BF16, NT>(w, in, xs, o, o1, tail);
    for (int t = 0; t < NT; ++t)
      for (int64_t r = 0; r < o1 - o; ++r) acc_out[t * rows + (o + r - o0)] = tail[t * (o1 - o) + r];
  }
}
#endif

#ifdef FASQ_AVX2
template <bool BF16>
static inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <bool BF16, int NT>
static void dense16_rows_avx2(const uint16_t* w, int64_t in, const float* const* xs, int64_t o0, int64_t o1,
                              float* acc_out) {
  const int64_t rows = o1 - o0, in8 = in / 8 * 8;
  for (int64_t o = o0; o < o1; ++o) {
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    const uint16_t* wr = w + o * in;
    for (int64_t i = 0; i < in8; i += 8) {
      const __m256 wv = widen8<BF16>(wr + i);
      for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t] + i), acc[t]);
    }
    for (int t = 0; t < NT; ++t) {
      float s = hsum256(acc[t]);
      for (int64_t i = in8; i < in; ++i) s += widen1<BF16>(wr[i]) * xs[t][i];
      acc_out[t * rows + (o - o0)] = s;
    }
  }
}
#endif

using Dense16Fn = void (*)(const uint16_t*, int64_t, const float* const*, int64_t, int64_t, float*);

template <bool BF16, int NT>
static Dense16Fn pick_dense16(int isa) {
#ifdef FASQ_AVX512
  if (isa >= AVX512) return &dense16_rows_avx512<BF16, NT>;
#endif
#ifdef FASQ_AVX2
  if (isa >= AVX2) return &dense16_rows_avx2<BF16, NT>;
#endif
  (void)isa;
  return &dense16_rows_scalar<BF16, NT>;
}

template <bool BF16>
static Dense16Fn pick_dense16(int isa, int nt) {
  switch (nt) {
    case 1: return pick_dense16<BF16, 1>(isa);
    case 2: return pick_dense16<BF16, 2>(isa);
    default: return pick_dense16<BF16, 4>(isa);
  }
}

at::Tensor cpu_dense16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              int64_t isa, bool poison) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "fasq cpu_dense16_linear: weight must be a contiguous "
              "[out, in] matrix, got sizes ", weight.sizes());
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kHalf || wt == at::kBFloat16, "fasq cpu_dense16_linear: weight dtype ", wt,
              " not supported (float16, bfloat16)");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "fasq cpu_dense16_linear: x has last dim ", x.size(-1),
              ", the weight expects in_features=", in);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "fasq cpu_dense16_linear: x dtype ", dt, " not supported (float32, bfloat16, float16)");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "fasq cpu_dense16_linear: bias must have ", out,
                " entries");
  std::vector<int64_t> osize(x.sizes().begin(), x.sizes().end());
  osize.back() = out;
  at::Tensor y = at::empty(osize, x.options());
  const int64_t T = in ? x.numel() / in : 0;
  if (T == 0 || out == 0) return y;
  const at::Tensor x32 = x.reshape({T, in}).to(at::kFloat).contiguous();
  const float* xp = x32.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  at::Tensor acc = at::empty({T, out}, x32.options());
  if (poison) acc.fill_(std::numeric_limits<float>::quiet_NaN());
  float* ap = acc.data_ptr<float>();
  // Row chunks of 64 (a multiple of 4) per task; ~0.1 ns per weight byte streamed from memory.
  constexpr int64_t kRows = 64;
  const int64_t n_chunks = (out + kRows - 1) / kRows;
  const int nth = n_threads(0.1 * 2.0 * static_cast<double>(out) * in * ((T + 3) / 4));
  (void)nth;
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const int nt = static_cast<int>(std::min<int64_t>(4, T - t0)), nt_fn = nt == 3 ? 4 : nt;
    const Dense16Fn fn = wt == at::kBFloat16 ? pick_dense16<true>(static_cast<int>(isa), nt_fn)
                                             : pick_dense16<false>(static_cast<int>(isa), nt_fn);
    std::vector<float> zeros(nt_fn > nt ? in : 0, 0.0f);
    const float* xs[4];
    for (int t = 0; t < 4; ++t) xs[t] = t < nt ? xp + (t0 + t) * in : zeros.data();
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t o0 = c * kRows, o1 = std::min(out, o0 + kRows);
      float part[4 * kRows];
      fn(wp, in, xs, o0, o1, part);
      for (int t = 0; t < nt; ++t)
        std::memcpy(ap + (t0 + t) * out + o0, part + t * (o1 - o0), sizeof(float) * (o1 - o0));
    }
  }
  if (has_bias) acc.add_(bias->to(at::kFloat));
  y.view({T, out}).copy_(acc);
  return y;
}

}  // namespace fasq_cpu
