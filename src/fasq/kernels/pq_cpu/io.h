// The input of every method (sign flip + Walsh-Hadamard rotation, padded layout) and its output store.
#pragma once

#include "common.h"

namespace fasq_cpu {

// Input: x [T, in] (fp32/bf16/fp16) -> rotated fp32, laid out as [T][stride] with sub-vector j
// at [j*dp, j*dp + d) and zeros elsewhere (padding columns, padded coordinates, tail).
// In-place orthonormal Walsh-Hadamard transform of each block of h values, after multiplying
// value i by scale[i] = signs[i] / sqrt(h) (rotation_scale: the randomized rotation R = H diag(signs)
// with H's normalization folded in).
static const float* rotation_scale(const at::Tensor& signs, int64_t n, int64_t h, float* sc) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(h));
  const int8_t* sg = signs.defined() && signs.numel() ? signs.data_ptr<int8_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) sc[i] = sg ? norm * static_cast<float>(sg[i]) : norm;
  return sc;
}

// 16 values of a row of x as fp32.
template <typename T>
static inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, c10::Half>) return _mm512_cvtph_ps(h);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// v[0..n) = the transform of src[0..n) (any of x's dtypes; v may be src when T is float).  The first
// pass reads src, so that a rotated row costs no separate copy or conversion pass (at prefill sizes
// the rows do not stay in L2 between passes over the whole input).
template <typename T>
static void fwht_from(const T* src, float* v, int64_t n, int64_t h, const float* scale) {
#ifdef FASQ_AVX512
  if (h >= 16) {
    // Stages of span 1, 2, 4, 8 inside each 16-float register: with y the register with its
    // span-s partners swapped, lanes whose bit s is 0 become x + y and the others y - x, i.e.
    // fma(x, +-1, y) (exact products, so the same single rounding as the add or subtract).  The
    // wider stages go across registers, two per pass over the row (radix 4).  A SmolLM2 input (576
    // values, h = 64) took ~1.5 us scalar, as much as a small layer's whole table build.
    const __m512 s1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    const __m512 s2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
    const __m512 s4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
    const __m512 s8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int64_t i = 0; i < n; i += 16) {
      __m512 x = _mm512_mul_ps(load16(src + i), _mm512_loadu_ps(scale + i));
      x = _mm512_fmadd_ps(x, s1, _mm512_permute_ps(x, 0xB1));
      x = _mm512_fmadd_ps(x, s2, _mm512_permute_ps(x, 0x4E));
      x = _mm512_fmadd_ps(x, s4, _mm512_shuffle_f32x4(x, x, 0xB1));
      x = _mm512_fmadd_ps(x, s8, _mm512_shuffle_f32x4(x, x, 0x4E));
      _mm512_storeu_ps(v + i, x);
    }
    for (int64_t b0 = 0; b0 < n; b0 += h) {
      int64_t len = 16;
      for (; 4 * len <= h; len *= 4)  // stages len and 2 len
        for (int64_t i = b0; i < b0 + h; i += 4 * len)
          for (int64_t k = i; k < i + len; k += 16) {
            const __m512 a = _mm512_loadu_ps(v + k), b = _mm512_loadu_ps(v + k + len);
            const __m512 c = _mm512_loadu_ps(v + k + 2 * len), d = _mm512_loadu_ps(v + k + 3 * len);
            const __m512 ab = _mm512_add_ps(a, b), a_b = _mm512_sub_ps(a, b);
            const __m512 cd = _mm512_add_ps(c, d), c_d = _mm512_sub_ps(c, d);
            _mm512_storeu_ps(v + k, _mm512_add_ps(ab, cd));
            _mm512_storeu_ps(v + k + len, _mm512_add_ps(a_b, c_d));
            _mm512_storeu_ps(v + k + 2 * len, _mm512_sub_ps(ab, cd));
            _mm512_storeu_ps(v + k + 3 * len, _mm512_sub_ps(a_b, c_d));
          }
      if (len < h)  // one stage left
        for (int64_t i = b0; i < b0 + h; i += 2 * len)
          for (int64_t k = i; k < i + len; k += 16) {
            const __m512 a = _mm512_loadu_ps(v + k), b = _mm512_loadu_ps(v + k + len);
            _mm512_storeu_ps(v + k, _mm512_add_ps(a, b));
            _mm512_storeu_ps(v + k + len, _mm512_sub_ps(a, b));
          }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(src[i]) * scale[i];
  for (int64_t b0 = 0; b0 < n; b0 += h) {
    float* p = v + b0;
    for (int64_t len = 1; len < h; len <<= 1)
      for (int64_t i = 0; i < h; i += 2 * len)
        for (int64_t k = 0; k < len; ++k) {
          const float u = p[i + k], w = p[i + k + len];
          p[i + k] = u + w;
          p[i + k + len] = u - w;
        }
  }
}

template <typename T>
static void load_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef FASQ_AVX512
  if constexpr (!std::is_same_v<T, float>)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// fp32 src[n] rounded to nearest even into a 16-bit row (as torch rounds finite values).
template <typename T>
static void store_row(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
#ifdef FASQ_AVX512
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    __m256i h;
    if constexpr (std::is_same_v<T, c10::Half>) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
#ifdef __AVX512BF16__
      h = (__m256i)_mm512_cvtneps_pbh(v);
#else
      break;  // the scalar loop below (rounds NaN and the like as torch does)
#endif
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

static void prepare_input(const at::Tensor& x2, int64_t T, const int64_t* mt, const at::Tensor& signs,
                          int dp, float* out, int64_t stride, std::vector<float>& tmp_v) {
  const int64_t in = mt[M_IN], d = mt[M_D], nsub = mt[M_NSUB], rot = mt[M_ROT];
  float* tmp = scratch(tmp_v, static_cast<size_t>(2 * in));  // [row | rotation scale]
  const float* sc = rot ? rotation_scale(signs, in, rot, tmp + in) : nullptr;
  for (int64_t t = 0; t < T; ++t) {
    auto row = [&](const auto* src) { rot ? fwht_from(src + t * in, tmp, in, rot, sc) : load_row(src + t * in, tmp, in); };
    switch (x2.scalar_type()) {
      case at::kFloat: row(x2.data_ptr<float>()); break;
      case at::kBFloat16: row(x2.data_ptr<c10::BFloat16>()); break;
      case at::kHalf: row(x2.data_ptr<c10::Half>()); break;
      default: TORCH_CHECK(false, "fasq cpu_pq_linear: x dtype ", x2.scalar_type(), " not supported");
    }
    float* o = out + t * stride;
    std::fill(o, o + stride, 0.0f);
    if (dp == d) {
      std::memcpy(o, tmp, sizeof(float) * in);
    } else {
      for (int64_t j = 0; j < nsub; ++j)
        for (int64_t c = 0; c < d && j * d + c < in; ++c) o[j * dp + c] = tmp[j * d + c];
    }
  }
}

// y[t][o] = src[t * out + o] (+ bias[o]), converted to y's dtype.
static void store_outputs(at::Tensor& y, int64_t T, int64_t out, const float* src, const at::Tensor& bias) {
  const c10::Half* bp = bias.defined() && bias.numel() ? bias.data_ptr<c10::Half>() : nullptr;
  auto put = [&](auto* yp) {
    using O = std::remove_pointer_t<decltype(yp)>;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < out; ++o)
        yp[t * out + o] = static_cast<O>(src[t * out + o] + (bp ? static_cast<float>(bp[o]) : 0.0f));
  };
  switch (y.scalar_type()) {
    case at::kFloat: put(y.data_ptr<float>()); break;
    case at::kBFloat16: put(y.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: put(y.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "fasq cpu_pq_linear: bad output dtype");
  }
}

}  // namespace fasq_cpu
