// fasq CPU kernels: y = x W^T (+ bias) straight from the stored product-quantized format.
//
// Built on first use by fasq/kernels/cpu.py (torch.utils.cpp_extension, -O3 -march=native
// -fopenmp) and registered as the op `fasq::cpu_pq_linear`.  Four methods (docs/kernels_cpu.md
// has the measurements behind the choice):
//
//   LUT     1 token, K <= 512, AVX-512 VBMI.  Per sub-vector position j a table
//           LUT[j][k] = <codebook[k], x_j> in int16 fixed point (one scale per token).  Codes are
//           repacked once per layer so that one 64-byte load holds the codes of 64 rows at one j;
//           the table (lo/hi byte planes, 512 bytes for K = 256) is looked up for the 64 rows with
//           byte permutes (no gathers) and the bytes summed exactly in 16-bit lanes.  Tables are
//           built and scanned in ~32 KiB chunks (kLutChunkBytes).
//   PERM    2..16 tokens (and 1 token on small layers), K <= 512, AVX-512 VBMI.  Same layout, but
//           the table is the fp16 codebook itself (per coordinate), then fp32 FMAs with x.  Exact.
//           From 5 tokens a (row block, group)'s weights are looked up once into an L1 buffer
//           (perm_blocks), then multiplied with every token.
//   DIRECT  few tokens, any K, any CPU: per row, decode the codes, gather fp32 centroids and FMA
//           them with x; the gathers are shared by all tokens.  AVX-512, AVX2 and scalar paths.
//   TILED   many tokens: dequantize tiles of rows of W_r into a reused buffer and multiply with
//           ATen's GEMM.  With VBMI and K <= 512 it reads PERM's layout and dequantizes by byte
//           permutes (run_tiled_repacked); elsewhere by gathers from the stored layout.
//
// A second op, `fasq::cpu_dense16_linear`, multiplies by an unquantized 16-bit weight (a tied
// embedding / output head kept in its stored fp16 form) with fp32 sums; see DENSE16 below.
//
// All methods rotate the input first (sign flip + fast Walsh-Hadamard transform in fp32) and use
// the rotated weight W_r, exactly like fasq.reference.pq_linear.  Sums are fp32 (LUT: exact int32).
//
// PLAN (end of file): a per-layer object that PQLinear.forward calls directly (pybind11) for up
// to 16 tokens: checks, rotation, the method the registry chose, bias and the sparse outlier
// correction in one C++ call.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__F16C__) && defined(__FMA__)
#define FASQ_AVX512 1
#endif
#if defined(FASQ_AVX512) && defined(__AVX512VBMI__)
#define FASQ_VBMI 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FASQ_AVX2 1
#endif

namespace fasq_cpu {

// Layout of the int[] `meta` argument (cpu.py builds it once per layer).
enum Meta {
  M_IN, M_OUT, M_D, M_K, M_M, M_BITS, M_NSUB, M_GS, M_NG, M_ROT, M_MODE, M_ISA, M_DP, M_KP, M_WORDS, M_POISON, M_COUNT
};
enum Mode { DIRECT = 0, LUT = 1, TILED = 2, PERM = 3 };
enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
constexpr int RB = 64;  // rows per block in the LUT / PERM layout: one byte lane per row (see lookup64_fp16)

int64_t features() {
  int64_t f = 0;
#ifdef FASQ_AVX2
  f |= 1;
#endif
#ifdef FASQ_AVX512
  f |= 2;
#endif
#ifdef FASQ_VBMI
  f |= 4;
#endif
#ifdef _OPENMP
  f |= 8;
#endif
#if defined(FASQ_VBMI) && defined(__AVX512FP16__)
  f |= 16;  // the LUT tables are built in fp16 arithmetic (lut_build_one_fp16)
#endif
  return f;
}

// Threads for a call of about `work_ns` single-thread nanoseconds: each thread gets at least
// ~kGrainNs of work, because a parallel region costs microseconds on an idle machine and can cost
// a scheduler time slice when the cores are shared (SmolLM2-size layers are ~10-50 us of work).
constexpr double kGrainNs = 12000.0;
static inline int n_threads(double work_ns) {
  const int most = std::max(1, at::get_num_threads());
  return static_cast<int>(std::max(1.0, std::min<double>(most, work_ns / kGrainNs)));
}

// Grow-only scratch owned by the calling thread: no page faults per call after the first.  64-byte
// aligned (a vector's data is 16-byte aligned): oneDNN's AMX GEMM took 1.5x as long on a bf16 x
// [512, 576] 16 bytes off a cache line (0.96 against 0.65 ms), and the TILED paths hand it their
// rotated x and tiles from here.
template <typename T>
static T* scratch(std::vector<T>& v, size_t n) {
  constexpr size_t pad = 64 / sizeof(T);
  if (v.size() < n + pad) v.resize(n + pad);
  const auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>((p + 63) & ~static_cast<uintptr_t>(63));
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// DIRECT: one row at a time.  idx[m] = decoded codes of codebook m; cb[m] = fp32 codebook
// [K][DP]; xs[t] = prepared input of token t.  Returns sum over groups of scale * (W_n row . x).
struct RowArgs {
  const int32_t* const* idx;  // [M] -> [n_sub (+16)]
  const float* const* cb;     // [M] -> [K][DP]
  const float* const* xs;     // [NT] -> prepared input
  const c10::Half* scales;    // row's scales [G] or nullptr
  int64_t M, nsub, gs, ng;
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
      for (int64_t m = 0; m < a.M; ++m) {
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
          for (int64_t m = 0; m < a.M; ++m) {
            const __m512i iv = _mm512_loadu_si512(a.idx[m] + j0);
            w = _mm512_add_ps(w, _mm512_mask_i32gather_ps(zero, km, iv, a.cb[m], 4));
          }
          for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.xs[t] + j0), acc[t]);
        } else {
          __m512d w0 = _mm512_setzero_pd(), w1 = _mm512_setzero_pd();
          for (int64_t m = 0; m < a.M; ++m) {
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
        for (int64_t m = 0; m < a.M; ++m) {
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
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

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
        for (int64_t m = 0; m < a.M; ++m) {
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
        for (int64_t m = 0; m < a.M; ++m) {
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
            for (int64_t m = 0; m < a.M; ++m) {
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

static void run_direct(const at::Tensor& x2, int64_t T, at::Tensor& y, const at::Tensor& codes, const at::Tensor& tables,
                       const at::Tensor& scales, const at::Tensor& signs, const at::Tensor& bias, const int64_t* mt) {
  const int64_t out = mt[M_OUT], nsub = mt[M_NSUB], Mb = mt[M_M], dp = mt[M_DP], K_ = mt[M_K];
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
  const int nth = n_threads(static_cast<double>(out) * nsub * Mb * (2.5 + 0.1 * T_pad * dp));
  (void)nth;  // unused when built without OpenMP
#pragma omp parallel num_threads(nth) if (nth > 1)
  {
    std::vector<int32_t> idx_v(static_cast<size_t>(Mb * (nsub + 16)));
    std::vector<const int32_t*> idx_p(Mb);
    std::vector<const float*> cb_p(Mb);
    for (int64_t m = 0; m < Mb; ++m) {
      idx_p[m] = idx_v.data() + m * (nsub + 16);
      cb_p[m] = tb + m * K_ * dp;
    }
    const float* xs[8];
    float res[8];
#pragma omp for schedule(static)
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t m = 0; m < Mb; ++m)
        decode_row(cbase + (m * out + o) * nbytes, nbytes, b, nsub, idx_v.data() + m * (nsub + 16), isa);
      RowArgs ra{idx_p.data(), cb_p.data(), xs, sp ? sp + o * ng : nullptr, Mb, nsub, mt[M_GS], ng};
      for (int64_t t0 = 0; t0 < T_pad; t0 += nt) {
        for (int t = 0; t < nt; ++t) xs[t] = xbuf + (t0 + t) * stride;
        fn(ra, res);
        for (int t = 0; t < nt; ++t) ybuf[(t0 + t) * out + o] = res[t];
      }
    }
  }
  store_outputs(y, T, out, ybuf, bias);
}

// ---------------------------------------------------------------------------------------------
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
  float* ypart;             // [S][T][n_rb*64]
  int64_t T, M, d, nsub, gs, ng, nrb, S, stride;
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
static inline void weights64(const uint8_t* codes_rb, const uint8_t* planes, int64_t M, int64_t cstride, int64_t nsub,
                             int64_t d, int64_t j, int64_t c0, int64_t c1, const __m512 sv[4], Emit&& emit) {
  const __m512i idx0 = _mm512_loadu_si512(codes_rb + j * RB);
  const CodeMasks cm0 = code_masks<KP>(idx0, ninth_bits<KP>(codes_rb, nsub, j));
  for (int64_t c = c0; c < c1; ++c) {
    __m512 out[4];
    lookup64<KP>(planes + c * 2 * KP, idx0, cm0, out);
    for (int64_t m = 1; m < M; ++m) {
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

#ifndef SCAN_PF
#define SCAN_PF 4
#endif
constexpr int64_t kLutChunkBytes = 32768;  // LUT tables built and scanned at a time per thread
#ifndef PERM_BLOCK_MIN
#define PERM_BLOCK_MIN 4
#endif
constexpr int64_t kPermBlockMinTokens = PERM_BLOCK_MIN;  // PERM above this many tokens: perm_blocks

// Row blocks [rb0, rb1) over the sub-vector positions [ja, jb) (a thread's slice), tokens
// [t0, t0 + NT).  Groups are the outer loop so that a group's LUT tables (gs * 2 * KP bytes per
// token) stay in L1 while the row blocks use them.  A group cut by the slice edge is summed in
// part here and in part by the neighbour slice: both multiply by its scale, and the partial
// outputs of all slices are added at the end.
// DD: sub-vector dim for PERM when known at compile time (0: runtime a.d).
template <bool PERM, int KP, int NT, int DD>
static void scan_item(const ScanArgs& a, int64_t t0, int64_t rb0, int64_t rb1, int64_t s, int64_t ja, int64_t jb) {
  const int64_t d = DD ? DD : a.d;
  const int64_t g0 = ja / a.gs, g1 = (jb + a.gs - 1) / a.gs;
  // The codes of one (group, row block) item are gs * 64 contiguous bytes, but consecutive items
  // are a row block (M * n_sub * 64 bytes) apart: each starts a new 4 KiB page, where the hardware
  // prefetcher stops.  In a decode step the layer's codes come from DRAM / L3, so each code line
  // is prefetched SCAN_PF row blocks ahead.  Not past the last row block: a prefetch never faults,
  // but one to an address the TLB does not hold walks the page tables for nothing (a small layer's
  // every prefetch would).
  const int64_t pf_ahead = SCAN_PF * a.M * a.cstride;
  for (int64_t g = g0; g < g1; ++g)
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t pf = rb + SCAN_PF < a.nrb ? pf_ahead : 0;
    const int64_t js = std::max(g * a.gs, ja), je = std::min({(g + 1) * a.gs, jb, a.nsub});
    __m512 acc[NT][4];
    for (int t = 0; t < NT; ++t)
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
    for (int64_t m = 0; m < a.M; ++m) {
      const uint8_t* cbase = a.codes + (rb * a.M + m) * a.cstride;
      const uint8_t* cp = cbase + js * RB;
      // KP = 512: the ninth bits of position j (read unaligned: 8 bytes, inside the block)
      const uint8_t* up = cbase + a.nsub * RB + js * 8;
      auto upper = [&]() -> __mmask64 {
        if constexpr (KP == 512) {
          uint64_t u;
          std::memcpy(&u, up, 8);
          up += 8;
          return static_cast<__mmask64>(u);
        } else {
          return 0;
        }
      };
      if constexpr (PERM) {
        const uint8_t* pl = a.tab + m * d * 2 * KP;
        const float* xp[NT];
        for (int t = 0; t < NT; ++t) xp[t] = a.x + (t0 + t) * a.stride + js * d;
        for (int64_t j = js; j < je; ++j, cp += RB) {
          _mm_prefetch(reinterpret_cast<const char*>(cp + pf), _MM_HINT_T0);
          const __m512i idx = _mm512_loadu_si512(cp);
          const CodeMasks cm = code_masks<KP>(idx, upper());
          for (int64_t c = 0; c < d; ++c) {
            __m512 w[4];
            lookup64<KP>(pl + c * 2 * KP, idx, cm, w);
            for (int t = 0; t < NT; ++t) {
              const __m512 xv = _mm512_set1_ps(xp[t][c]);
              for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_fmadd_ps(w[q], xv, acc[t][q]);
            }
          }
          for (int t = 0; t < NT; ++t) xp[t] += d;
        }
      } else {
        const uint8_t* lp[NT];
        for (int t = 0; t < NT; ++t) lp[t] = a.tab + (((t0 + t) * a.M + m) * a.tab_n + js - a.tab_j0) * 2 * KP;
        for (int64_t j0 = js; j0 < je; j0 += kSumSpan) {
          const int64_t j1 = std::min(je, j0 + kSumSpan);
          IntSums sums[NT];
          for (int t = 0; t < NT; ++t) sums[t].zero();
          for (int64_t j = j0; j < j1; ++j, cp += RB) {
            _mm_prefetch(reinterpret_cast<const char*>(cp + pf), _MM_HINT_T0);
            const __m512i idx = _mm512_loadu_si512(cp);
            const __mmask64 hb = upper();
            for (int t = 0; t < NT; ++t) {
              __m512i lo, hi;
              lookup_planes<KP>(lp[t], idx, hb, lo, hi);
              lp[t] += 2 * KP;
              sums[t].add(lo, hi);
            }
          }
          for (int t = 0; t < NT; ++t) sums[t].flush(j1 - j0, acc[t]);
        }
      }
    }
    // ypart[t][rows] (+)= acc * group scale * token scale; the first group writes.
    const c10::Half* sc = a.scales ? a.scales + (rb * a.ng + g) * RB : nullptr;
    for (int t = 0; t < NT; ++t)
      store_scaled(a.ypart + (s * a.T + t0 + t) * a.nrb * RB + rb * RB, acc[t], sc, PERM ? 1.0f : a.tscale[t0 + t],
                   g == g0 && !a.accumulate);
  }
}

using ScanFn = void (*)(const ScanArgs&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

// PERM for more than 4 tokens: the weights of one (row block, group) are looked up once, times the
// group scale, into buf ([positions * d][64] fp32, in L1 for the usual groups), then multiplied with
// every token, NT = 4 at a time (16 accumulators; a column costs 4 loads, 4 broadcasts and 16 FMAs).
// scan_item instead redoes the lookups for every 4 tokens: at 16 tokens 4x the permutes.
template <int NT>
static inline void perm_fma_block(const float* buf, int64_t ncol, const float* const* xp, __m512 acc[4][4]) {
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
  for (int64_t c = 0; c < ncol; ++c, buf += RB) {
    const __m512 w0 = _mm512_load_ps(buf), w1 = _mm512_load_ps(buf + 16), w2 = _mm512_load_ps(buf + 32),
                 w3 = _mm512_load_ps(buf + 48);
    for (int t = 0; t < NT; ++t) {
      const __m512 xv = _mm512_set1_ps(xp[t][c]);
      acc[t][0] = _mm512_fmadd_ps(w0, xv, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(w1, xv, acc[t][1]);
      acc[t][2] = _mm512_fmadd_ps(w2, xv, acc[t][2]);
      acc[t][3] = _mm512_fmadd_ps(w3, xv, acc[t][3]);
    }
  }
}

template <int KP>
static void perm_blocks(const ScanArgs& a, int64_t rb0, int64_t rb1, int64_t s, int64_t ja, int64_t jb, float* buf) {
  const int64_t d = a.d, gs = a.gs;
  const int64_t g0 = ja / gs, g1 = (jb + gs - 1) / gs;
  for (int64_t rb = rb0; rb < rb1; ++rb)
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t js = std::max(g * gs, ja), je = std::min({(g + 1) * gs, jb, a.nsub});
      __m512 sv[4];
      scales64(a.scales ? a.scales + (rb * a.ng + g) * RB : nullptr, sv);
      for (int64_t j = js; j < je; ++j)
        weights64<KP>(a.codes + rb * a.M * a.cstride, a.tab, a.M, a.cstride, a.nsub, d, j, 0, d, sv,
                      [&](int64_t c, const __m512* w) {
                        float* bp = buf + ((j - js) * d + c) * RB;
                        for (int q = 0; q < 4; ++q) _mm512_store_ps(bp + 16 * q, w[q]);
                      });
      const int64_t ncol = (je - js) * d;
      const bool first = g == g0 && !a.accumulate;
      for (int64_t t0 = 0; t0 < a.T; t0 += 4) {
        const int nt = static_cast<int>(std::min<int64_t>(4, a.T - t0));
        const float* xp[4];
        for (int t = 0; t < nt; ++t) xp[t] = a.x + (t0 + t) * a.stride + js * d;
        __m512 acc[4][4];
        switch (nt) {
          case 1: perm_fma_block<1>(buf, ncol, xp, acc); break;
          case 2: perm_fma_block<2>(buf, ncol, xp, acc); break;
          case 3: perm_fma_block<3>(buf, ncol, xp, acc); break;
          default: perm_fma_block<4>(buf, ncol, xp, acc);
        }
        for (int t = 0; t < nt; ++t)  // the scales are in buf already
          store_scaled(a.ypart + (s * a.T + t0 + t) * a.nrb * RB + rb * RB, acc[t], nullptr, 1.0f, first);
      }
    }
}

// LUT, one token: the same sums as scan_item<false, KP, 1, .>, but with positions outer and NR
// row blocks inner, so that each position's table is read once per NR row blocks (instead of once
// per row block) and the NR blocks' lookups are independent work for the out-of-order core.  The
// int16 sums of a span are converted, scaled and added to ypart right away (no fp32 accumulators
// held across the position loop: with NR = 4 they and the int16 sums would not fit the 32 vector
// registers).  Measured on a SmolLM2 k_proj (192 x 576, K = 256): scan 3.3 us instead of 3.7.
template <int KP, int NR>
static void scan_lut1(const ScanArgs& a, int64_t rb0, int64_t s, int64_t ja, int64_t jb) {
  const int64_t g0 = ja / a.gs, g1 = (jb + a.gs - 1) / a.gs;
  const int64_t cstride = a.cstride;
  // Prefetch as scan_item does, SCAN_PF row blocks ahead and not past the last one: blocks
  // q < npf of this pass prefetch theirs.
  const int64_t pf = SCAN_PF * cstride, npf = std::min<int64_t>(NR, std::max<int64_t>(0, a.nrb - rb0 - SCAN_PF));
  const float tsc = a.tscale[0];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t js = std::max(g * a.gs, ja), je = std::min({(g + 1) * a.gs, jb, a.nsub});
    const uint8_t* lp = a.tab + (js - a.tab_j0) * 2 * KP;
    for (int64_t j0 = js; j0 < je; j0 += kSumSpan) {
      const int64_t j1 = std::min(je, j0 + kSumSpan);
      IntSums sums[NR];
#pragma GCC unroll 4
      for (int q = 0; q < NR; ++q) sums[q].zero();
      const uint8_t* cp = a.codes + rb0 * cstride + j0 * RB;
      const uint8_t* up = a.codes + rb0 * cstride + a.nsub * RB + j0 * 8;  // KP = 512: ninth bits
      for (int64_t j = j0; j < j1; ++j, cp += RB, up += 8, lp += 2 * KP) {
#pragma GCC unroll 4
        for (int q = 0; q < NR; ++q) {
          if (q < npf) _mm_prefetch(reinterpret_cast<const char*>(cp + q * cstride + pf), _MM_HINT_T0);
          const __m512i idx = _mm512_loadu_si512(cp + q * cstride);
          __mmask64 hb = 0;
          if constexpr (KP == 512) {
            uint64_t u;
            std::memcpy(&u, up + q * cstride, 8);
            hb = static_cast<__mmask64>(u);
          }
          __m512i lo, hi;
          lookup_planes<KP>(lp, idx, hb, lo, hi);
          sums[q].add(lo, hi);
        }
      }
      const bool first = g == g0 && j0 == js && !a.accumulate;
#pragma GCC unroll 4
      for (int q = 0; q < NR; ++q) {
        const int64_t rb = rb0 + q;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        sums[q].flush(j1 - j0, acc);
        store_scaled(a.ypart + s * a.nrb * RB + rb * RB, acc, a.scales ? a.scales + (rb * a.ng + g) * RB : nullptr,
                     tsc, first);
      }
    }
  }
}

using Lut1Fn = void (*)(const ScanArgs&, int64_t, int64_t, int64_t, int64_t);

template <int KP>
static Lut1Fn pick_lut1_nr(int nr) {
  switch (nr) {
    case 1: return &scan_lut1<KP, 1>;
    case 2: return &scan_lut1<KP, 2>;
    case 3: return &scan_lut1<KP, 3>;
    default: return &scan_lut1<KP, 4>;
  }
}

static Lut1Fn pick_lut1(int64_t kp, int nr) {
  return kp == 64 ? pick_lut1_nr<64>(nr) : kp == 128 ? pick_lut1_nr<128>(nr) : kp == 256 ? pick_lut1_nr<256>(nr)
                  : pick_lut1_nr<512>(nr);
}

template <bool PERM, int KP, int DD>
static ScanFn pick_scan_nt(int nt) {
  switch (nt) {
    case 1: return &scan_item<PERM, KP, 1, DD>;
    case 2: return &scan_item<PERM, KP, 2, DD>;
    case 3: return &scan_item<PERM, KP, 3, DD>;
    default: return &scan_item<PERM, KP, 4, DD>;
  }
}

template <bool PERM, int KP>
static ScanFn pick_scan_d(int nt, int64_t d) {
  if constexpr (PERM) {
    if (d == 1) return pick_scan_nt<PERM, KP, 1>(nt);
    if (d == 2) return pick_scan_nt<PERM, KP, 2>(nt);
    if (d == 4) return pick_scan_nt<PERM, KP, 4>(nt);
  }
  return pick_scan_nt<PERM, KP, 0>(nt);
}

static ScanFn pick_scan(bool perm, int64_t kp, int nt, int64_t d) {
  if (perm) return kp == 64 ? pick_scan_d<true, 64>(nt, d) : kp == 128 ? pick_scan_d<true, 128>(nt, d)
                : kp == 256 ? pick_scan_d<true, 256>(nt, d) : pick_scan_d<true, 512>(nt, d);
  return kp == 64 ? pick_scan_d<false, 64>(nt, d) : kp == 128 ? pick_scan_d<false, 128>(nt, d)
                : kp == 256 ? pick_scan_d<false, 256>(nt, d) : pick_scan_d<false, 512>(nt, d);
}

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

// Table of one (token, codebook, j): entry k = <cbT[:, k], xj> (xj already divided by the token
// scale, so |entry| <= LUT_MAX) rounded to int16, stored as a lo-byte plane [kp] then an
// offset-binary hi-byte plane [kp] (see LUT_MAX).
template <int DD>
__attribute__((always_inline)) static inline void lut_build_one(const float* cbT, const float* xj, int64_t d_rt, int64_t kp, uint8_t* L) {
  const int64_t d = DD ? DD : d_rt;
  __m512 xv[16];
  for (int64_t c = 0; c < d; ++c) xv[c] = _mm512_set1_ps(xj[c]);
  for (int64_t k0 = 0; k0 < kp; k0 += 64) {
    __m256i h[4];
    for (int q = 0; q < 4; ++q) {
      const float* cp = cbT + k0 + 16 * q;
      __m512 e = _mm512_mul_ps(xv[0], _mm512_loadu_ps(cp));
      for (int64_t c = 1; c < d; ++c) e = _mm512_fmadd_ps(xv[c], _mm512_loadu_ps(cp + c * kp), e);
      h[q] = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(e));  // int16, rounded to nearest
    }
    const __m512i wa = _mm512_inserti64x4(_mm512_castsi256_si512(h[0]), h[1], 1);  // entries k0..k0+31
    const __m512i wb = _mm512_inserti64x4(_mm512_castsi256_si512(h[2]), h[3], 1);  // k0+32..k0+63
    store_planes(wa, wb, L + k0, L + kp + k0);
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
__attribute__((always_inline)) static inline void lut_build_one_fp16(const uint16_t* cbh, const uint32_t* xh, int64_t d_rt, int64_t kp, uint8_t* L) {
  const int64_t d = DD ? DD : d_rt;
  __m512h xv[16];
  for (int64_t c = 0; c < d; ++c) xv[c] = _mm512_castsi512_ph(_mm512_set1_epi32(static_cast<int>(xh[c])));
  for (int64_t k0 = 0; k0 < kp; k0 += 64) {
    const uint16_t* cp = cbh + k0;
    __m512h e0 = _mm512_mul_ph(xv[0], _mm512_loadu_ph(cp)), e1 = _mm512_mul_ph(xv[0], _mm512_loadu_ph(cp + 32));
    for (int64_t c = 1; c < d; ++c) {
      e0 = _mm512_fmadd_ph(xv[c], _mm512_loadu_ph(cp + c * kp), e0);
      e1 = _mm512_fmadd_ph(xv[c], _mm512_loadu_ph(cp + c * kp + 32), e1);
    }
    const __m512i wa = _mm512_cvtph_epi16(e0), wb = _mm512_cvtph_epi16(e1);  // int16, rounded to nearest
    store_planes(wa, wb, L + k0, L + kp + k0);
  }
}
#endif

// What a chunk's table build reads.  x: the prepared input [T][stride], divided by the token
// scales; xh: the same as fp16 pairs (lut_build_one_fp16), or nullptr without AVX512-FP16;
// cbT: fp32 codebooks [M][d + 1][KP]; cbh: fp16 codebooks [M][d][KP] (AVX512-FP16 only).
// pf_codes (the repacked codes), pf_rbs, rb_stride, cb_stride: while it builds the tables of
// position j, the build requests the code line of position j of the first pf_rbs row blocks of
// each codebook (every other position: the L2 prefetcher fetches the pair of each line it
// misses), the lines the scan reads right after the build and does not prefetch itself.  Spread over the build, these prefetches use the load
// ports the build leaves idle.  As one loop before the rotation (until 2026-11-27) the same
// requests made SmolLM2-shape calls 5-12% slower when the codes came from beyond L2, as in a
// decode step (benchmarks/cpu_ab.py STREAM=1), and up to 4% slower when they were in L2.
struct BuildArgs {
  const float* cbT;
  const uint16_t* cbh;
  const float* x;
  const uint32_t* xh;
  int64_t stride, T, Mb, d, kp, nsub;
  const uint8_t* pf_codes;
  int64_t pf_rbs, rb_stride, cb_stride;  // row blocks to prefetch; bytes per row block, per codebook
};

// The tables of positions [c0, c1) of every token and codebook, in the order the scan reads
// them: [t][m][j - c0][2 * kp].  One call per chunk rather than per table: no indirect call per
// table, and d is a compile-time constant for the usual d (288 calls cost ~1 us of a SmolLM2
// k_proj's ~12).
template <int DD>
static void lut_build_chunk(const BuildArgs& b, int64_t c0, int64_t c1, uint8_t* tab) {
  const int64_t d = DD ? DD : b.d, n = c1 - c0, kp = b.kp;
  for (int64_t t = 0; t < b.T; ++t)
    for (int64_t m = 0; m < b.Mb; ++m) {
      uint8_t* L = tab + (t * b.Mb + m) * n * 2 * kp;
      const uint8_t* pf = t == 0 ? b.pf_codes + m * b.cb_stride : nullptr;
      for (int64_t j = c0; j < c1; ++j, L += 2 * kp) {
        if (pf && (j & 1) == 0)
          for (int64_t r = 0; r < b.pf_rbs; ++r) {
            const uint8_t* rp = pf + r * b.rb_stride;
            _mm_prefetch(reinterpret_cast<const char*>(rp + j * RB), _MM_HINT_T1);
            if (kp == 512 && (j & 7) == 0)  // the ninth bits: 8 bytes per position
              _mm_prefetch(reinterpret_cast<const char*>(rp + b.nsub * RB + j * 8), _MM_HINT_T1);
          }
#ifdef __AVX512FP16__
        lut_build_one_fp16<DD>(b.cbh + m * d * kp, b.xh + t * b.stride + j * d, d, kp, L);
#else
        lut_build_one<DD>(b.cbT + m * (d + 1) * kp, b.x + t * b.stride + j * d, d, kp, L);
#endif
      }
    }
}
using BuildFn = void (*)(const BuildArgs&, int64_t, int64_t, uint8_t*);

// LUT (perm = false) or PERM (perm = true).  LUT tables: fp32 cbT [M][d + 1][KP] (row d: max |cb|
// per coordinate); PERM tables: uint8 codebook planes [M][d][2][KP].
static void run_scan(bool perm, const at::Tensor& x2, int64_t T, at::Tensor& y, const at::Tensor& codes,
                     const at::Tensor& tables, const at::Tensor& scales, const at::Tensor& signs,
                     const at::Tensor& bias, const int64_t* mt) {
  const int64_t out = mt[M_OUT], nsub = mt[M_NSUB], Mb = mt[M_M], d = mt[M_D], kp = mt[M_KP];
  const int64_t nrb = (out + RB - 1) / RB, ng = mt[M_NG];
  const int64_t stride = nsub * d + 16;
  const int64_t cstride = nsub * RB + (kp == 512 ? nsub * 8 : 0);
  TORCH_CHECK(kp == 64 || kp == 128 || kp == 256 || kp == 512, "fasq cpu_pq_linear: bad table size");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == nrb * Mb * cstride,
              "fasq cpu_pq_linear: codes are not in the repacked layout");
  TORCH_CHECK(tables.scalar_type() == (perm ? at::kByte : at::kFloat) && tables.is_contiguous(),
              "fasq cpu_pq_linear: bad tables");
  thread_local std::vector<float> xbuf_v, tmp_v, ts_v, yp_v, yfin_v;
  thread_local std::vector<uint8_t> lut_v;
  // The scans prefetch codes SCAN_PF row blocks ahead, and the LUT's table build the first row
  // blocks' codes (BuildArgs).  Until 2026-11-27 the first SCAN_PF row blocks (all of a small
  // layer's codes) were requested here, in one loop before the rotation; A/B on SmolLM2 shapes,
  // layers cycled as in a decode step: the LUT 5-12% and PERM (4 tokens) 3-5% faster without it.
  float* xbuf = scratch(xbuf_v, static_cast<size_t>(T * stride));
  prepare_input(x2, T, mt, signs, static_cast<int>(d), xbuf, stride, tmp_v);
  // Per (row block, code): ~8 ns per token's LUT lookup, ~10 ns per coordinate per pass of up to
  // 4 tokens for PERM; the LUT build costs ~50 ns per 256-entry table.
  const double per_code = perm ? 10.0 * d * ((T + 3) / 4) : 8.0 * T;
  const double work = static_cast<double>(nrb) * Mb * nsub * per_code + (perm ? 0.0 : 0.2 * T * Mb * nsub * kp);
  // One slice of the sub-vector positions per thread: a thread builds the LUT tables of its slice
  // and scans every row over it, so the parallel region has no barrier inside (on a shared
  // machine each barrier can cost a scheduler time slice); slices' partial outputs are summed after.
  const int64_t S = std::min<int64_t>(n_threads(work), nsub);
  const int64_t RBB = 8;  // row blocks per pass over a group: its tables are reused from L1
  float* ypart = scratch(yp_v, static_cast<size_t>(S * T * nrb * RB));
  float* ts = scratch(ts_v, static_cast<size_t>(T));
  // LUT: a thread builds the tables of `chunk` positions of its slice (~16 KiB), scans every row
  // block over them, and goes on to the next chunk: the tables stay in L1 for the scan, and a call
  // touches 16 KiB of table scratch instead of n_sub * 2 * KP bytes per token (147 KiB for a
  // SmolLM2 layer: what a decode step whose caches were flushed must fetch again).
  int64_t chunk = std::max<int64_t>(1, kLutChunkBytes / (2 * kp * Mb * T));
  if (chunk >= mt[M_GS]) chunk = chunk / mt[M_GS] * mt[M_GS];  // whole groups
  const int64_t n_tab = perm ? 0 : T * Mb * chunk;  // tables per thread
  uint8_t* lut = nullptr;
  const float* cbT = perm ? nullptr : tables.data_ptr<float>();
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
      for (int64_t m = 0; m < Mb; ++m) {
        const float* cmax = cbT + (m * (d + 1) + d) * kp;
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
    lut = scratch(lut_v, static_cast<size_t>(S * n_tab * 2 * kp));
    if (mt[M_POISON]) std::fill(lut, lut + S * n_tab * 2 * kp, uint8_t(0xFF));
  }
  if (mt[M_POISON]) std::fill(ypart, ypart + S * T * nrb * RB, std::numeric_limits<float>::quiet_NaN());
  ScanArgs a{codes.data_ptr<uint8_t>(), perm ? tables.data_ptr<uint8_t>() : lut, xbuf, ts,
             ng ? scales.data_ptr<c10::Half>() : nullptr, ypart, T, Mb, d, nsub, mt[M_GS], ng, nrb, S, stride,
             cstride};
#ifdef __AVX512FP16__
  // fp16 copy of the codebooks [M][d][KP] for the fp16 build (the values are exact fp16).
  thread_local std::vector<uint16_t> cbh_v;
  uint16_t* cbh = perm ? nullptr : scratch(cbh_v, static_cast<size_t>(Mb * d * kp));
  if (!perm)
    for (int64_t m = 0; m < Mb; ++m)
      for (int64_t i = 0; i < d * kp; i += 16)  // kp is a multiple of 64
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cbh + m * d * kp + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(cbT + m * (d + 1) * kp + i), _MM_FROUND_TO_NEAREST_INT));
#else
  const uint16_t* cbh = nullptr;
#endif
  const BuildArgs ba{cbT, cbh, xbuf, xh, stride, T, Mb, d, kp, nsub, codes.data_ptr<uint8_t>(),
                     std::min<int64_t>(nrb, SCAN_PF), Mb * cstride, cstride};
  const BuildFn build = d == 2 ? &lut_build_chunk<2> : d == 1 ? &lut_build_chunk<1> : d == 4 ? &lut_build_chunk<4>
                      : &lut_build_chunk<0>;
  const ScanFn full = pick_scan(perm, kp, 4, d);
  const ScanFn tail = pick_scan(perm, kp, static_cast<int>(T % 4), d);
  // One token, one codebook: scan_lut1, kLut1Rows row blocks per pass (the last pass takes the rest).
  constexpr int64_t kLut1Rows = 4;
  const bool lut1 = !perm && T == 1 && Mb == 1;
  const Lut1Fn lut1_full = pick_lut1(kp, kLut1Rows), lut1_tail = pick_lut1(kp, static_cast<int>(nrb % kLut1Rows));
  auto slice = [&](int64_t s) {
    const int64_t ja = s * nsub / S, jb = (s + 1) * nsub / S;
    if (perm && T > kPermBlockMinTokens) {
      thread_local std::vector<float> pb_v;
      float* buf = scratch(pb_v, static_cast<size_t>(mt[M_GS] * d * RB));  // 64-byte aligned (aligned loads)
      switch (kp) {
        case 64: perm_blocks<64>(a, 0, nrb, s, ja, jb, buf); break;
        case 128: perm_blocks<128>(a, 0, nrb, s, ja, jb, buf); break;
        case 256: perm_blocks<256>(a, 0, nrb, s, ja, jb, buf); break;
        default: perm_blocks<512>(a, 0, nrb, s, ja, jb, buf);
      }
      return;
    }
    if (perm) {
      for (int64_t rb0 = 0; rb0 < nrb; rb0 += RBB)
        for (int64_t t0 = 0; t0 < T; t0 += 4)
          (T - t0 >= 4 ? full : tail)(a, t0, rb0, std::min(nrb, rb0 + RBB), s, ja, jb);
      return;
    }
    ScanArgs as = a;
    uint8_t* tab = lut + s * n_tab * 2 * kp;
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
      for (int64_t rb0 = 0; rb0 < nrb; rb0 += RBB)
        for (int64_t t0 = 0; t0 < T; t0 += 4)
          (T - t0 >= 4 ? full : tail)(as, t0, rb0, std::min(nrb, rb0 + RBB), s, c0, c1);
    }
  };
  if (S == 1) {
    slice(0);  // no OpenMP region at all: even a team of one costs a call into libgomp
  } else {
#pragma omp parallel for schedule(static, 1) num_threads(S)
    for (int64_t s = 0; s < S; ++s) slice(s);
  }
  // y = sum of the slices' partial outputs (+ bias).
  float* yf = y.scalar_type() == at::kFloat ? y.data_ptr<float>() : nullptr;
  const c10::Half* bp = bias.defined() && bias.numel() ? bias.data_ptr<c10::Half>() : nullptr;
  float* yfin = yf ? yf : scratch(yfin_v, static_cast<size_t>(T * out));
  for (int64_t t = 0; t < T; ++t) {
    float* dst = yfin + t * out;
    const float* p0 = ypart + t * nrb * RB;
    for (int64_t o = 0; o < out; ++o) dst[o] = p0[o] + (bp ? static_cast<float>(bp[o]) : 0.0f);
    for (int64_t s = 1; s < S; ++s) {
      const float* ps = ypart + (s * T + t) * nrb * RB;
      for (int64_t o = 0; o < out; ++o) dst[o] += ps[o];
    }
  }
  if (!yf) store_outputs(y, T, out, yfin, at::Tensor());  // bias already added
}

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
  const int64_t nsub = mt[M_NSUB], Mb = mt[M_M], d = mt[M_D], gs = mt[M_GS], ng = mt[M_NG];
  const int64_t cstride = nsub * RB + (KP == 512 ? nsub * 8 : 0);
#ifdef __AVX512FP16__
  if constexpr (std::is_same_v<OutT, c10::Half>) {
    // fp16 out, one codebook: the fp16 product centroid * scale, rounded once, is what fp32
    // arithmetic rounded to fp16 gives (the exact product of two fp16 values fits in fp32).
    if (Mb == 1) {
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
  const uint8_t* cb = codes + rb * Mb * cstride;
  for (int64_t j = 0; j < nsub; ++j) {
    if (j % gs == 0) scales64(scales ? scales + (rb * ng + j / gs) * RB : nullptr, sv);
    weights64<KP>(cb, planes, Mb, cstride, nsub, d, j, 0, std::min<int64_t>(d, width - j * d), sv,
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
  const int64_t nsub = mt[M_NSUB], Mb = mt[M_M], d = mt[M_D], gs = mt[M_GS], ng = mt[M_NG], in = mt[M_IN];
  const int64_t h = mt[M_ROT], cstride = nsub * RB + (KP == 512 ? nsub * 8 : 0);
  thread_local std::vector<float> buf_v;
  float* buf = scratch(buf_v, static_cast<size_t>(h * 64));  // [4 strips of 16 columns][h][16]
  __m512 sv[4];
  int64_t group = -1;
  const uint8_t* cb = codes + rb * Mb * cstride;
  for (int64_t b0 = 0; b0 < in; b0 += h) {
    // the positions whose rows (j * d + c) fall in [b0, b0 + h): a position may straddle two blocks
    for (int64_t j = b0 / d; j * d < b0 + h; ++j) {
      if (j / gs != group) {
        group = j / gs;
        scales64(scales ? scales + (rb * ng + group) * RB : nullptr, sv);
      }
      const int64_t c0 = std::max<int64_t>(0, b0 - j * d), c1 = std::min<int64_t>(d, b0 + h - j * d);
      weights64<KP>(cb, planes, Mb, cstride, nsub, d, j, c0, c1, sv, [&](int64_t c, const __m512* w) {
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
static void dequant_block_rot(int64_t kp, const uint8_t* codes, const uint8_t* planes, const c10::Half* scales,
                              const int64_t* mt, int64_t rb, const float* rsc, OutT* dst, int64_t ld) {
  switch (kp) {
    case 64: return dequant_block_rot<64, OutT>(codes, planes, scales, mt, rb, rsc, dst, ld);
    case 128: return dequant_block_rot<128, OutT>(codes, planes, scales, mt, rb, rsc, dst, ld);
    case 256: return dequant_block_rot<256, OutT>(codes, planes, scales, mt, rb, rsc, dst, ld);
    default: return dequant_block_rot<512, OutT>(codes, planes, scales, mt, rb, rsc, dst, ld);
  }
}

template <typename OutT>
static void dequant_block_t(int64_t kp, const uint8_t* codes, const uint8_t* planes, const c10::Half* scales,
                            const int64_t* mt, int64_t rb, int64_t width, OutT* dst, int64_t ld) {
  switch (kp) {
    case 64: return dequant_block_t<64, OutT>(codes, planes, scales, mt, rb, width, dst, ld);
    case 128: return dequant_block_t<128, OutT>(codes, planes, scales, mt, rb, width, dst, ld);
    case 256: return dequant_block_t<256, OutT>(codes, planes, scales, mt, rb, width, dst, ld);
    default: return dequant_block_t<512, OutT>(codes, planes, scales, mt, rb, width, dst, ld);
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// TILED: dequantize R rows of W_r at a time into a reused fp32 buffer, then GEMM in x's dtype.
//
// One row: dst[c] = scale[g(c)] * sum_m codebook_m[code_m[j(c)]][c % d]  for c < n_sub * d.
static void dequant_row(const int32_t* const* idx, const float* const* cb, const c10::Half* sc, const int64_t* mt,
                        float* dst, int isa) {
  const int64_t nsub = mt[M_NSUB], Mb = mt[M_M], d = mt[M_D], dp = mt[M_DP], gs = mt[M_GS], ng = mt[M_NG];
  const int64_t ngroups = ng ? ng : 1;
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t js = g * gs, je = std::min(js + gs, nsub);
    const float s = sc ? static_cast<float>(sc[g]) : 1.0f;
    int64_t j = js;
#ifdef FASQ_AVX512
    if (isa >= AVX512 && dp <= 2 && d == dp) {
      const __m512 sv = _mm512_set1_ps(s);
      for (; j + 16 <= je; j += 16) {
        if (dp == 1) {
          __m512 w = _mm512_setzero_ps();
          for (int64_t m = 0; m < Mb; ++m)
            w = _mm512_add_ps(w, _mm512_i32gather_ps(_mm512_loadu_si512(idx[m] + j), cb[m], 4));
          _mm512_storeu_ps(dst + j, _mm512_mul_ps(w, sv));
        } else {
          __m512 w0 = _mm512_setzero_ps(), w1 = _mm512_setzero_ps();
          for (int64_t m = 0; m < Mb; ++m) {
            const __m512i iv = _mm512_loadu_si512(idx[m] + j);
            const double* cbd = reinterpret_cast<const double*>(cb[m]);
            w0 = _mm512_add_ps(w0, _mm512_castpd_ps(_mm512_i32gather_pd(_mm512_castsi512_si256(iv), cbd, 8)));
            w1 = _mm512_add_ps(w1, _mm512_castpd_ps(_mm512_i32gather_pd(_mm512_extracti64x4_epi64(iv, 1), cbd, 8)));
          }
          _mm512_storeu_ps(dst + 2 * j, _mm512_mul_ps(w0, sv));
          _mm512_storeu_ps(dst + 2 * j + 16, _mm512_mul_ps(w1, sv));
        }
      }
    }
    if (isa >= AVX512) {  // any d: one masked load per codebook and one masked store per sub-vector
      const __mmask16 km = static_cast<__mmask16>((1u << d) - 1u);
      const __m512 sv = _mm512_set1_ps(s);
      for (; j < je; ++j) {
        __m512 w = _mm512_setzero_ps();
        for (int64_t m = 0; m < Mb; ++m)
          w = _mm512_add_ps(w, _mm512_maskz_loadu_ps(km, cb[m] + static_cast<int64_t>(idx[m][j]) * dp));
        _mm512_mask_storeu_ps(dst + j * d, km, _mm512_mul_ps(w, sv));
      }
    }
#endif
    (void)isa;
    for (; j < je; ++j) {
      float* o = dst + j * d;
      for (int64_t c = 0; c < d; ++c) o[c] = 0.f;
      for (int64_t m = 0; m < Mb; ++m) {
        const float* cp = cb[m] + static_cast<int64_t>(idx[m][j]) * dp;
        for (int64_t c = 0; c < d; ++c) o[c] += cp[c];
      }
      for (int64_t c = 0; c < d; ++c) o[c] *= s;
    }
  }
}

// x [T, in] rotated (sign flip + Walsh-Hadamard in fp32), in dtype dt; without rotation x itself
// (in dt).  Tokens over ATen's threads: at prefill sizes this is ~0.1 ms per layer call.
static at::Tensor rotated_input(const at::Tensor& x2, const at::Tensor& signs, const int64_t* mt, at::ScalarType dt) {
  if (!mt[M_ROT]) return x2.to(dt);
  const int64_t T = x2.size(0), in = mt[M_IN], rot = mt[M_ROT];
  const auto xdt = x2.scalar_type();
  TORCH_CHECK(xdt == at::kFloat || xdt == at::kBFloat16 || xdt == at::kHalf, "fasq cpu_pq_linear: x dtype ", xdt,
              " not supported");
  // Up to kRotScratchBytes in the calling thread's grow-only scratch (a fresh tensor per call is
  // fresh pages); the result lives until this thread's next call, and the TILED paths use it only
  // within theirs.  Larger inputs (long prompts) get a tensor of their own, so that no thread keeps
  // a prompt-sized buffer after the call.
  constexpr int64_t kRotScratchBytes = int64_t(8) << 20;
  thread_local std::vector<float> xr_v, sc_v;
  const int64_t esize = dt == at::kFloat ? 4 : 2;
  at::Tensor xr = T * in * esize <= kRotScratchBytes
                      ? at::from_blob(scratch(xr_v, static_cast<size_t>((T * in * esize + 3) / 4)), {T, in},
                                      x2.options().dtype(dt))
                      : at::empty({T, in}, x2.options().dtype(dt));
  const float* sc = rotation_scale(signs, in, rot, scratch(sc_v, static_cast<size_t>(in)));
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(in, 1)), [&](int64_t t0, int64_t t1) {
    std::vector<float> row(dt == at::kFloat ? 0 : in);
    for (int64_t t = t0; t < t1; ++t) {
      float* r = dt == at::kFloat ? xr.data_ptr<float>() + t * in : row.data();
      switch (xdt) {
        case at::kFloat: fwht_from(x2.data_ptr<float>() + t * in, r, in, rot, sc); break;
        case at::kBFloat16: fwht_from(x2.data_ptr<c10::BFloat16>() + t * in, r, in, rot, sc); break;
        default: fwht_from(x2.data_ptr<c10::Half>() + t * in, r, in, rot, sc);
      }
      if (dt == at::kBFloat16) store_row(r, xr.data_ptr<c10::BFloat16>() + t * in, in);
      else if (dt == at::kHalf) store_row(r, xr.data_ptr<c10::Half>() + t * in, in);
    }
  });
  return xr;
}

// A layer's sparse outlier correction S (W = W_r R^T + S) as the TILED paths fold it into their
// tiles: row r's entries are cols / vals[rowptr[r] : rowptr[r + 1]] (int32 / fp32, sorted by row).
// In the rotated basis S is S R: an entry (r, c, v) becomes, within the rotation block of c
// (column c0 = c - a, a = c mod h), v * signs[c] * H[a][j] / sqrt(h) at column c0 + j, with H the
// Sylvester Hadamard matrix (H[a][j] = (-1)^popcount(a & j)): h values instead of one.  A tile
// serves every token, so folding costs O(n h) per call where adding S x to y costs O(n T).
static inline uint32_t parity64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
  return static_cast<uint32_t>(__builtin_parityll(v));
#else
  v ^= v >> 32, v ^= v >> 16, v ^= v >> 8, v ^= v >> 4, v ^= v >> 2, v ^= v >> 1;
  return static_cast<uint32_t>(v & 1);
#endif
}
static inline uint32_t f32_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
static inline float bits_f32(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

struct Sparse {
  const int32_t* rowptr = nullptr;
  const int32_t* cols = nullptr;
  const float* vals = nullptr;
  const int32_t* nz = nullptr;    // the rows with entries
  int64_t n_nz = 0;
  const int32_t* erow = nullptr;  // each entry's row
};

// The lists behind a Sparse's nz and erow (the Plan keeps them; the op makes them per call).
struct SparseRows {
  std::vector<int32_t> nz, erow;
};

// Checks the outlier operands (kernels.outlier_csr's layout, fp32 values) in full, since the methods
// index y, x and the tiles with them; the rows with entries go to `nz`.
static Sparse check_sparse(const at::Tensor& rp, const at::Tensor& oc, const at::Tensor& ov, int64_t in, int64_t out,
                           SparseRows& rows, const char* who) {
  TORCH_CHECK(rp.scalar_type() == at::kInt && oc.scalar_type() == at::kInt && ov.scalar_type() == at::kFloat &&
              rp.is_contiguous() && oc.is_contiguous() && ov.is_contiguous() && rp.numel() == out + 1 &&
              oc.numel() == ov.numel(),
              who, ": outliers must be contiguous int32 rowptr [out + 1], int32 cols and fp32 vals");
  const int32_t* r = rp.data_ptr<int32_t>();
  const int32_t* c = oc.data_ptr<int32_t>();
  TORCH_CHECK(r[0] == 0 && r[out] == oc.numel(), who, ": outlier rowptr does not cover cols");
  rows.nz.clear();
  rows.erow.resize(static_cast<size_t>(oc.numel()));
  for (int64_t i = 0; i < out; ++i) {
    TORCH_CHECK(r[i] <= r[i + 1], who, ": outlier rowptr decreases");
    if (r[i + 1] > r[i]) rows.nz.push_back(static_cast<int32_t>(i));
    for (int32_t k = r[i]; k < r[i + 1]; ++k) rows.erow[k] = static_cast<int32_t>(i);
  }
  for (int64_t k = 0; k < oc.numel(); ++k)
    TORCH_CHECK(c[k] >= 0 && c[k] < in, who, ": outlier column ", c[k], " out of range");
  return Sparse{r, c, ov.data_ptr<float>(), rows.nz.data(), static_cast<int64_t>(rows.nz.size()), rows.erow.data()};
}

// Adds rows [r0, r1)'s entries into a tile whose element (column c, row r) is at
// dst[c * cs + (r - r0) * rs]: the repacked TILED tile [in, R] (cs = R, rs = 1), the stored-layout
// one [R, width] (cs = 1, rs = width).  With a rotation, the entries go by rotation block, and each
// of the block's h tile columns takes all of them before the next (the repacked tile's rows of
// R values: one stays in L1 while the entries of up to 64 rows are added to it).  A 16-bit tile
// gets each sum rounded once more.
template <typename OutT>
static void fold_outliers(const Sparse& sp, const int8_t* signs, int64_t h, int64_t r0, int64_t r1, OutT* dst,
                          int64_t cs, int64_t rs) {
  auto add = [](OutT& e, float v) { e = static_cast<OutT>(static_cast<float>(e) + v); };
  const int32_t k0 = sp.rowptr[r0], k1 = sp.rowptr[r1];
  if (k0 == k1) return;
  if (!h) {
    for (int64_t r = r0; r < r1; ++r)
      for (int32_t k = sp.rowptr[r]; k < sp.rowptr[r + 1]; ++k) add(dst[sp.cols[k] * cs + (r - r0) * rs], sp.vals[k]);
    return;
  }
  struct E { int64_t c; int64_t off; uint32_t w; };  // column, the row's offset, signed scaled value (bits)
  thread_local std::vector<E> es;
  es.clear();
  const float inv = 1.0f / std::sqrt(static_cast<float>(h));
  for (int64_t r = r0; r < r1; ++r)
    for (int32_t k = sp.rowptr[r]; k < sp.rowptr[r + 1]; ++k)
      es.push_back({sp.cols[k], (r - r0) * rs, f32_bits(sp.vals[k] * static_cast<float>(signs[sp.cols[k]]) * inv)});
  std::sort(es.begin(), es.end(), [](const E& a, const E& b) { return a.c < b.c; });
  for (size_t e0 = 0; e0 < es.size();) {
    const int64_t c0 = es[e0].c & ~(h - 1);
    size_t e1 = e0;
    while (e1 < es.size() && es[e1].c < c0 + h) ++e1;
    for (int64_t j = 0; j < h; ++j) {
      OutT* col = dst + (c0 + j) * cs;
      // H's sign by flipping the sign bit (a branch on it would be mispredicted half the time)
      for (size_t e = e0; e < e1; ++e)
        add(col[es[e].off],
            bits_f32(es[e].w ^ (parity64(static_cast<uint64_t>(es[e].c & j)) << 31)));
    }
    e0 = e1;
  }
}

// Whether TILED folds the outliers into its tiles (n h updates per call) rather than adding S x to
// y afterwards (n T, at a few times the cost per entry).  Measured (885 outliers, 1 thread, noisy
// host, time over the op without outliers): 1536x576 at h = 64, folding 0.02-0.12 ms, adding
// 0.03 / 0.21 / 1.2 ms at 17 / 64 / 512 tokens; 576x1536 at h = 256, folding ~0.25 ms, adding
// 0.05 / 0.14 / 0.73 ms.
static bool fold_outliers_for(int64_t T, int64_t h) { return (h ? h : 1) <= 2 * T; }

// y[t, r] += sum_k vals[k] * x[t, cols[k]] over row r's entries, in fp32; x [T, in] and y [T, out]
// contiguous, one dtype.  An fp32 y takes the entries one by one (no branch but the loop's: rows
// hold 1-2 entries, and a loop per row mispredicts its exit); a 16-bit y gets each row's sum,
// rounded once, over the rows with entries.
static void add_sparse(at::Tensor& y, const at::Tensor& x, const Sparse& sp, int64_t out) {
  const int64_t T = y.numel() / std::max<int64_t>(out, 1), in = x.size(-1), n = sp.rowptr[out];
  auto go = [&](auto* yp, const auto* xp) {
    using Y = std::remove_pointer_t<decltype(yp)>;
    at::parallel_for(0, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        Y* yt = yp + t * out;
        const auto* xt = xp + t * in;
        if constexpr (std::is_same_v<Y, float>) {
          for (int64_t k = 0; k < n; ++k) yt[sp.erow[k]] += sp.vals[k] * xt[sp.cols[k]];
        } else {
          for (int64_t i = 0; i < sp.n_nz; ++i) {
            const int32_t r = sp.nz[i];
            float acc = 0.0f;
            for (int32_t k = sp.rowptr[r]; k < sp.rowptr[r + 1]; ++k) acc += sp.vals[k] * static_cast<float>(xt[sp.cols[k]]);
            yt[r] = static_cast<Y>(static_cast<float>(yt[r]) + acc);
          }
        }
      }
    });
  };
  switch (y.scalar_type()) {
    case at::kFloat: go(y.data_ptr<float>(), x.data_ptr<float>()); break;
    case at::kBFloat16: go(y.data_ptr<c10::BFloat16>(), x.data_ptr<c10::BFloat16>()); break;
    default: go(y.data_ptr<c10::Half>(), x.data_ptr<c10::Half>());
  }
}

// Whether TILED (on the repacked layout) rotates its tiles of W_r back (dequant_block_rot, ~0.16 ns
// per weight at h = 64, ~0.3 at h = 256) rather than rotating x (~0.35 ns per value).  Measured
// (1 thread, time with / without, op alone): at 512 tokens 0.70-0.96 on SmolLM2's shapes (out <= 3T),
// fp32 and bf16; at 128 tokens 0.94-1.03 where out <= 1.5T, 1.09-1.21 at out = 4.5T; at 20 tokens
// 1.1-1.7 (out >= 10T).
static bool rotate_weights_for(int64_t T, int64_t out) { return out <= 3 * T; }

#ifdef FASQ_VBMI
// TILED on the repacked layout: row blocks of W_r dequantized by byte permutes (dequant_block_t),
// transposed, R rows at a time, then y[:, rows] = x_r @ tile (ATen GEMM).  The tile and GEMM are
// fp32, except for a 16-bit x of at least kTiled16MinTokens tokens on a CPU with AMX for its type
// (oneDNN's AMX GEMM; built with -march=native, so the build machine's flags): there the GEMM is in
// x's dtype, as the reference computes.  Measured here (Sapphire Rapids, 1 thread, tiles as below),
// bf16 / fp32 GEMM time: 1.09-1.17 at 16 tokens, 0.61-0.74 at 24, 0.30-0.48 at 64; fp16 (no
// AMX-FP16 here) is no faster than fp32 at 512.  fp32 products for a 16-bit x are what PERM
// computes too: y differs from the reference's by less than its rounding of W_r to x's dtype.
constexpr int64_t kTiled16MinTokens = 20;

static bool gemm_in_dtype(at::ScalarType dt, int64_t T) {
  if (T < kTiled16MinTokens) return false;
#ifdef __AMX_BF16__
  if (dt == at::kBFloat16) return true;
#endif
#ifdef __AMX_FP16__
  if (dt == at::kHalf) return true;
#endif
  return dt == at::kFloat;
}
static void run_tiled_repacked(const at::Tensor& x2, at::Tensor& y, const at::Tensor& codes,
                               const at::Tensor& planes, const at::Tensor& scales, const at::Tensor& signs,
                               const at::Tensor& bias, const int64_t* mt, const Sparse* sparse) {
  const int64_t T = x2.size(0), in = mt[M_IN], out = mt[M_OUT], nsub = mt[M_NSUB], Mb = mt[M_M], kp = mt[M_KP];
  const int64_t nrb = (out + RB - 1) / RB, cstride = nsub * RB + (kp == 512 ? nsub * 8 : 0);
  TORCH_CHECK(kp == 64 || kp == 128 || kp == 256 || kp == 512, "fasq cpu_pq_linear: bad table size");
  TORCH_CHECK(codes.is_contiguous() && codes.numel() == nrb * Mb * cstride,
              "fasq cpu_pq_linear: codes are not in the repacked layout");
  TORCH_CHECK(planes.scalar_type() == at::kByte && planes.is_contiguous() && planes.numel() == Mb * mt[M_D] * 2 * kp,
              "fasq cpu_pq_linear: bad codebook planes");
  const auto xdt = x2.scalar_type();
  const auto dt = gemm_in_dtype(xdt, T) ? xdt : at::kFloat;  // of the tile and the GEMM
  // Rotate W's tiles back to the original basis instead of rotating x, where that is less work.
  const bool rot_w = mt[M_ROT] && rotate_weights_for(T, out);
  thread_local std::vector<float> rsc_v;
  const float* rsc = rot_w ? rotation_scale(signs, in, mt[M_ROT], scratch(rsc_v, static_cast<size_t>(in))) : nullptr;
  const at::Tensor xr = rot_w ? x2.to(dt) : rotated_input(x2, signs, mt, dt);
  // The outliers fold into a tile of W as themselves (h = 0), into one of W_r rotated (see Sparse),
  // or are added to y at the end where the tiles serve too few tokens for that to pay.
  const int64_t fold_h = rot_w ? 0 : mt[M_ROT];
  const Sparse* fold = sparse && fold_outliers_for(T, fold_h) ? sparse : nullptr;
  const int64_t esize = dt == at::kFloat ? 4 : 2;
  // Row blocks per tile: ~1 MiB of tile (it stays in L2 while the GEMM reads it for every token);
  // 2 MiB for an fp32 tile with 2+ threads (SmolLM2 layers, 512 tokens, 2 threads: 1.11-1.19x dense
  // fp32 instead of 1.14-1.39x; bf16 tiles showed no steady gain, and 1 thread none either way).
  const int64_t tile_bytes = int64_t(1) << (dt == at::kFloat && at::get_num_threads() > 1 ? 21 : 20);
  const int64_t rbs = std::min(nrb, std::max<int64_t>(1, tile_bytes / (in * esize * RB)));
  const int64_t R = rbs * RB;
  // The tile in grow-only scratch of the calling thread: a fresh 1 MiB tensor per call is a fresh
  // mapping, whose page faults cost as much as dequantizing a small layer at 16 tokens.
  thread_local std::vector<float> tile_v;
  at::Tensor tile = at::from_blob(scratch(tile_v, static_cast<size_t>((in * R * esize + 3) / 4)), {in, R},
                                  x2.options().dtype(dt));
  if (mt[M_POISON]) tile.fill_(std::numeric_limits<float>::quiet_NaN());
  at::Tensor y2 = dt == xdt ? y.view({T, out}) : at::empty({T, out}, x2.options().dtype(dt));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* pp = planes.data_ptr<uint8_t>();
  const c10::Half* sp = mt[M_NG] ? scales.data_ptr<c10::Half>() : nullptr;
  const int8_t* sg = fold && fold_h ? signs.data_ptr<int8_t>() : nullptr;
  const int nth = n_threads(0.08 * static_cast<double>(R) * in * Mb);  // ~0.08 ns per weight and codebook
  (void)nth;  // unused when built without OpenMP
  for (int64_t rb0 = 0; rb0 < nrb; rb0 += rbs) {
    const int64_t nb = std::min(rbs, nrb - rb0), n = std::min(out, (rb0 + nb) * RB) - rb0 * RB;
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1)
    for (int64_t q = 0; q < nb; ++q) {
      const int64_t r0 = (rb0 + q) * RB, r1 = std::min(out, r0 + RB);
      auto fill = [&](auto* tp) {
        if (rot_w) dequant_block_rot(kp, cp, pp, sp, mt, rb0 + q, rsc, tp + q * RB, R);
        else dequant_block_t(kp, cp, pp, sp, mt, rb0 + q, in, tp + q * RB, R);
        if (fold) fold_outliers(*fold, sg, fold_h, r0, r1, tp + q * RB, R, 1);
      };
      switch (dt) {
        case at::kFloat: fill(tile.data_ptr<float>()); break;
        case at::kBFloat16: fill(tile.data_ptr<c10::BFloat16>()); break;
        default: fill(tile.data_ptr<c10::Half>());
      }
    }
    at::Tensor dst = y2.narrow(1, rb0 * RB, n);
    at::mm_out(dst, xr, tile.narrow(1, 0, n));
  }
  if (bias.defined() && bias.numel()) y2.add_(bias.to(dt));
  if (dt != xdt) y.view({T, out}).copy_(y2);
  if (sparse && !fold) add_sparse(y, x2, *sparse, out);
}
#endif

static void run_tiled(const at::Tensor& x2, at::Tensor& y, const at::Tensor& codes, const at::Tensor& tables,
                      const at::Tensor& scales, const at::Tensor& signs, const at::Tensor& bias, const int64_t* mt,
                      const Sparse* sparse) {
  if (codes.scalar_type() == at::kByte) {  // the repacked layout (cpu.py passes it where VBMI runs)
#ifdef FASQ_VBMI
    run_tiled_repacked(x2, y, codes, tables, scales, signs, bias, mt, sparse);
    return;
#else
    TORCH_CHECK(false, "fasq cpu_pq_linear: the repacked layout needs AVX-512 VBMI (not compiled in)");
#endif
  }
  const int64_t T = x2.size(0), in = mt[M_IN], out = mt[M_OUT], nsub = mt[M_NSUB], Mb = mt[M_M];
  const int64_t dp = mt[M_DP], K_ = mt[M_K], ng = mt[M_NG], nbytes = mt[M_WORDS] * 4, width = nsub * mt[M_D];
  const int isa = static_cast<int>(mt[M_ISA]), b = static_cast<int>(mt[M_BITS]);
  const auto dt = x2.scalar_type();
  const at::Tensor xr = rotated_input(x2, signs, mt, dt);
  // ~2 MiB fp32 tiles: large enough for an efficient GEMM, small enough to stay in cache.
  int64_t R = std::max<int64_t>(16, (int64_t(2) << 20) / std::max<int64_t>(1, width * 4));
  R = std::min<int64_t>(out, (R + 15) / 16 * 16);
  at::Tensor tile = at::empty({R, width}, x2.options().dtype(at::kFloat));
  at::Tensor y2 = y.view({T, out});
  if (mt[M_POISON]) tile.fill_(std::numeric_limits<float>::quiet_NaN());
  const uint8_t* cbase = reinterpret_cast<const uint8_t*>(codes.data_ptr<int32_t>());
  const float* tb = tables.data_ptr<float>();
  const c10::Half* sp = ng ? scales.data_ptr<c10::Half>() : nullptr;
  const Sparse* fold = sparse && fold_outliers_for(T, mt[M_ROT]) ? sparse : nullptr;  // else added to y at the end
  const int8_t* sg = fold && mt[M_ROT] ? signs.data_ptr<int8_t>() : nullptr;
  float* tp = tile.data_ptr<float>();
  const int nth = n_threads(2.5 * static_cast<double>(R) * nsub * Mb);
  (void)nth;  // unused when built without OpenMP
  for (int64_t o0 = 0; o0 < out; o0 += R) {
    const int64_t n = std::min(R, out - o0);
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
      std::vector<int32_t> idx_v(static_cast<size_t>(Mb * (nsub + 16)));
      std::vector<const int32_t*> idx_p(Mb);
      std::vector<const float*> cb_p(Mb);
      for (int64_t m = 0; m < Mb; ++m) idx_p[m] = idx_v.data() + m * (nsub + 16), cb_p[m] = tb + m * K_ * dp;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < n; ++r) {
        const int64_t o = o0 + r;
        for (int64_t m = 0; m < Mb; ++m)
          decode_row(cbase + (m * out + o) * nbytes, nbytes, b, nsub, idx_v.data() + m * (nsub + 16), isa);
        dequant_row(idx_p.data(), cb_p.data(), sp ? sp + o * ng : nullptr, mt, tp + r * width, isa);
        if (fold) fold_outliers(*fold, sg, mt[M_ROT], o, o + 1, tp + r * width, 1, width);
      }
    }
    at::Tensor w = tile.narrow(0, 0, n).narrow(1, 0, in);
    if (dt != at::kFloat) w = w.to(dt);  // the reference also rounds W_r to x's dtype
    // Straight into y's columns [o0, o0 + n) (a strided GEMM output: no transposed copy of y).
    at::Tensor dst = y2.narrow(1, o0, n);
    at::mm_out(dst, xr, w.t());
  }
  if (bias.defined() && bias.numel()) y2.add_(bias.to(dt));
  if (sparse && !fold) add_sparse(y, x2, *sparse, out);
}

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

// ---------------------------------------------------------------------------------------------
// y = x W_r^T (+ bias) by the method meta[M_MODE], into a new tensor of x's dtype.
static at::Tensor pq_linear_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables,
                                 const at::Tensor& scales, const at::Tensor& rot_signs, const at::Tensor& b,
                                 const int64_t* mt, const Sparse* sparse = nullptr) {
  const int64_t in = mt[M_IN], out = mt[M_OUT], rot = mt[M_ROT];
  // The rotation runs over blocks of `rot` values in place: a block past the row's end would write
  // outside it (LayerSpec does not check that the block divides in_features; the registry does).
  TORCH_CHECK(rot == 0 || (rot > 0 && (rot & (rot - 1)) == 0 && in % rot == 0 && rot_signs.numel() == in &&
                           rot_signs.scalar_type() == at::kChar),
              "fasq cpu_pq_linear: rotation block ", rot, " must be a power of two dividing in_features=", in,
              ", with in_features int8 signs");
  c10::SmallVector<int64_t, 4> osize(x.sizes().begin(), x.sizes().end());
  osize.back() = out;
  // Straight to the CPU allocator, not through the dispatcher (x is a plain CPU tensor here; an
  // inference-mode call still gets an inference tensor: TensorImpl reads the mode)
  at::Tensor y = at::detail::empty_cpu(osize, x.scalar_type());
  const int64_t T = in ? x.numel() / in : 0;
  if (T == 0 || out == 0) return y;
  if (mt[M_POISON]) y.fill_(std::numeric_limits<float>::quiet_NaN());
  const at::Tensor x2 = x.contiguous();  // [.., in]: the methods but TILED read it as T rows
  switch (mt[M_MODE]) {
    case LUT:
    case PERM:
#ifdef FASQ_VBMI
      run_scan(mt[M_MODE] == PERM, x2, T, y, codes, tables, scales, rot_signs, b, mt);
      break;
#else
      TORCH_CHECK(false, "fasq cpu_pq_linear: the LUT and PERM methods need AVX-512 VBMI (not compiled in)");
#endif
    case DIRECT: run_direct(x2, T, y, codes, tables, scales, rot_signs, b, mt); break;
    case TILED:  // folds the outliers into its tiles or adds them itself
      run_tiled(x2.reshape({T, in}), y, codes, tables, scales, rot_signs, b, mt, sparse);
      return y;
    default: TORCH_CHECK(false, "fasq cpu_pq_linear: unknown mode ", mt[M_MODE]);
  }
  if (sparse) add_sparse(y, x2, *sparse, out);
  return y;
}

at::Tensor cpu_pq_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tables,
                         const at::Tensor& scales, const at::Tensor& rot_signs, const c10::optional<at::Tensor>& bias,
                         at::IntArrayRef meta, const c10::optional<at::Tensor>& orowptr,
                         const c10::optional<at::Tensor>& ocols, const c10::optional<at::Tensor>& ovals) {
  TORCH_CHECK(meta.size() == M_COUNT, "fasq cpu_pq_linear: meta must have ", int(M_COUNT), " entries, got ",
              meta.size());
  const int64_t* mt = meta.data();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == mt[M_IN], "fasq cpu_pq_linear: x has last dim ", x.size(-1),
              ", the layer expects in_features=", mt[M_IN]);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "fasq cpu_pq_linear: x dtype ", dt, " not supported (float32, bfloat16, float16)");
  const at::Tensor bt = bias.has_value() ? *bias : at::Tensor();
  if (!orowptr.has_value() && !ocols.has_value() && !ovals.has_value())
    return pq_linear_impl(x, codes, tables, scales, rot_signs, bt, mt);
  // The sparse outlier correction, sorted by row (kernels.outlier_csr)
  TORCH_CHECK(orowptr.has_value() && ocols.has_value() && ovals.has_value(),
              "fasq cpu_pq_linear: outliers need all of rowptr, cols and vals");
  SparseRows rows;
  const Sparse sp = check_sparse(*orowptr, *ocols, *ovals, mt[M_IN], mt[M_OUT], rows, "fasq cpu_pq_linear");
  return pq_linear_impl(x, codes, tables, scales, rot_signs, bt, mt, &sp);
}

// ---------------------------------------------------------------------------------------------
// PLAN: the eager fast path of one layer (PQLinear.forward), so that a decode-sized call costs one
// C++ call from Python instead of the registry's dispatch + the op's argument parsing + the
// outlier correction as separate ATen ops (together ~15 us of Python and dispatcher on this
// machine, as much as a SmolLM2 layer's kernel).  It holds every tensor the methods need and the
// method the registry chose per (dtype, token count); run() checks, in C++, everything that choice
// and the cached tensors depend on and returns None when any of it changed (the caller then goes
// through the registry, which rebuilds the plan):
//   * x: a plain CPU tensor of a supported dtype, last dim in_features, 1..kPlanTokens tokens, no
//     autograd, not being traced, no Python dispatch mode active;
//   * the layer's buffers: the same objects (by identity in the module's _buffers dict) with the
//     same version counters (in-place updates);
//   * the registry's generation and $FASQ_DISABLE_KERNELS.
// The sparse outlier correction y[t, row] += val * x[t, col] is added here too, in fp32.
constexpr int kPlanTokens = 16;  // = FEW_MAX_TOKENS in cpu.py

struct Plan {
  at::Tensor codes, tables, scales, signs, bias;  // stored layout (direct / tiled)
  at::Tensor rcodes, cbt, rscales, planes;        // repacked layout (lut / perm); undefined without VBMI
  at::Tensor orowptr, ocol, oval;                 // outliers by row: int32 rowptr, int32 cols, fp32 values
  SparseRows orows;                               // the rows with outliers, each outlier's row
  Sparse sparse;
  std::vector<int64_t> meta;
  std::vector<std::pair<py::str, py::object>> bufs;  // (name, the buffer object at build time)
  std::vector<std::pair<at::Tensor, uint32_t>> versions;
  std::string env;
  bool env_set = false;
  int64_t generation = 0;
  int8_t methods[3][kPlanTokens + 1];  // [float32, bfloat16, float16][tokens] -> Mode, -1 = unknown

  void set_method(int64_t dtype_idx, int64_t tokens, int64_t mode) {
    TORCH_CHECK(dtype_idx >= 0 && dtype_idx < 3 && tokens >= 1 && tokens <= kPlanTokens && mode >= -1 && mode <= 3,
                "fasq Plan.set_method: bad arguments");
    methods[dtype_idx][tokens] = static_cast<int8_t>(mode);
  }

  bool valid(py::handle buffers, int64_t gen) const {
    if (gen != generation) return false;
    const char* e = std::getenv("FASQ_DISABLE_KERNELS");
    if ((e != nullptr) != env_set || (e && env != e)) return false;
    if (!PyDict_Check(buffers.ptr())) return false;
    for (const auto& nb : bufs) {
      PyObject* cur = PyDict_GetItem(buffers.ptr(), nb.first.ptr());  // borrowed; the key's hash is cached
      if (cur != nb.second.ptr()) return false;
    }
    for (const auto& tv : versions)
      if (tv.first._version() != tv.second) return false;
    return true;
  }

  py::object run(py::handle xh, py::handle buffers, int64_t gen) const {
    if (!THPVariable_CheckExact(xh.ptr())) return py::none();
    const at::Tensor& x = THPVariable_Unpack(xh.ptr());
    const int64_t in = meta[M_IN];
    if (!x.defined() || x.dim() < 1 || !x.device().is_cpu() || x.layout() != at::kStrided || x.size(-1) != in ||
        in == 0)
      return py::none();
    const auto dt = x.scalar_type();
    const int di = dt == at::kFloat ? 0 : dt == at::kBFloat16 ? 1 : dt == at::kHalf ? 2 : -1;
    const int64_t T = x.numel() / in;
    if (di < 0 || T < 1 || T > kPlanTokens) return py::none();
    const int mode = methods[di][T];
    if (mode < 0) return py::none();
    if (x.requires_grad() && at::GradMode::is_enabled()) return py::none();
    if (torch::jit::tracer::isTracing() || c10::impl::dispatch_mode_enabled()) return py::none();
    if (!valid(buffers, gen)) return py::none();
    int64_t mt[M_COUNT];
    std::copy(meta.begin(), meta.end(), mt);
    mt[M_MODE] = mode;
    // LUT and PERM need the repacked layout; TILED takes it where it exists (VBMI: byte-permute dequantization)
    const bool repacked = mode == LUT || mode == PERM || (mode == TILED && rcodes.defined());
    at::Tensor y;
    auto compute = [&] {
      y = pq_linear_impl(x, repacked ? rcodes : codes, mode == LUT ? cbt : repacked ? planes : tables,
                         repacked ? rscales : scales, signs, bias, mt, sparse.n_nz ? &sparse : nullptr);
    };
    // ATen's Python bindings release the GIL around every op, so that other Python threads run
    // meanwhile; releasing and taking it back costs ~0.3 us (a mutex and a condition variable), 3%
    // of a SmolLM2 k/v call.  Calls below ~1M multiply-adds (~10 us or less) keep it: Python's own
    // switch interval is 5 ms.
    if (T * in * meta[M_OUT] < (int64_t(1) << 20)) {
      compute();
    } else {
      pybind11::gil_scoped_release no_gil;
      compute();
    }
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y)));
  }

  // PQLinear.__call__'s fast path: the checks of nn.Module._call_impl (no hooks of the module or
  // global ones, no module.compile(), forward not replaced on the instance, e.g. by accelerate's
  // hooks), then run().  `d` is the module's __dict__.  None: call nn.Module.__call__ instead.  Cold
  // (a decode step whose model does not fit the caches) nn.Module.__call__ + forward cost ~60 us of
  // interpreter cache misses on a SmolLM2-size layer, as much as the kernel.
  py::object call(py::handle d, py::handle xh, int64_t gen) const {
    PyObject* dict = d.ptr();
    if (!PyDict_Check(dict)) return py::none();
    const CallKeys& k = call_keys();
    PyObject* v = PyDict_GetItem(dict, k.compiled.ptr());  // borrowed references throughout
    if (v != nullptr && v != Py_None) return py::none();
    if (PyDict_GetItem(dict, k.forward.ptr()) != nullptr) return py::none();
    for (const py::str& name : k.hooks) {
      v = PyDict_GetItem(dict, name.ptr());
      if (v == nullptr || !PyDict_Check(v) || PyDict_GET_SIZE(v) != 0) return py::none();
    }
    if (!k.globals) return py::none();
    for (const py::str& name : k.global_hooks) {
      v = PyDict_GetItem(k.globals, name.ptr());
      if (v == nullptr || !PyDict_Check(v) || PyDict_GET_SIZE(v) != 0) return py::none();
    }
    PyObject* buffers = PyDict_GetItem(dict, k.buffers.ptr());
    if (buffers == nullptr) return py::none();
    return run(xh, buffers, gen);
  }

  // Interned key strings, and torch.nn.modules.module's globals (set_module_globals).
  struct CallKeys {
    py::str compiled{"_compiled_call_impl"}, forward{"forward"}, buffers{"_buffers"};
    std::vector<py::str> hooks{py::str("_forward_hooks"), py::str("_forward_pre_hooks"), py::str("_backward_hooks"),
                               py::str("_backward_pre_hooks")};
    std::vector<py::str> global_hooks{py::str("_global_forward_hooks"), py::str("_global_forward_pre_hooks"),
                                      py::str("_global_backward_hooks"), py::str("_global_backward_pre_hooks")};
    PyObject* globals = nullptr;  // a strong reference, never released (module globals live as long)
    CallKeys() {
      for (py::str* s : {&compiled, &forward, &buffers}) intern(*s);
      for (auto& s : hooks) intern(s);
      for (auto& s : global_hooks) intern(s);
    }
    static void intern(py::str& s) {
      PyObject* o = s.release().ptr();
      PyUnicode_InternInPlace(&o);
      s = py::reinterpret_steal<py::str>(o);
    }
  };
  static CallKeys& call_keys() {
    static CallKeys* k = new CallKeys();  // leaked on purpose: no Python calls at interpreter exit
    return *k;
  }

};

static at::Tensor opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

static std::unique_ptr<Plan> make_plan(const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scales,
                                       const at::Tensor& signs, const c10::optional<at::Tensor>& bias,
                                       const c10::optional<at::Tensor>& rcodes, const c10::optional<at::Tensor>& cbt,
                                       const c10::optional<at::Tensor>& rscales,
                                       const c10::optional<at::Tensor>& planes, const c10::optional<at::Tensor>& orowptr,
                                       const c10::optional<at::Tensor>& ocol, const c10::optional<at::Tensor>& oval,
                                       std::vector<int64_t> meta, py::dict buffers, std::vector<at::Tensor> watched,
                                       int64_t generation) {
  TORCH_CHECK(meta.size() == M_COUNT, "fasq Plan: meta must have ", int(M_COUNT), " entries");
  auto p = std::make_unique<Plan>();
  p->codes = codes, p->tables = tables, p->scales = scales, p->signs = signs, p->bias = opt(bias);
  p->rcodes = opt(rcodes), p->cbt = opt(cbt), p->rscales = opt(rscales), p->planes = opt(planes);
  p->orowptr = opt(orowptr), p->ocol = opt(ocol), p->oval = opt(oval);
  if (p->orowptr.defined() || p->ocol.defined() || p->oval.defined()) {
    TORCH_CHECK(p->orowptr.defined() && p->ocol.defined() && p->oval.defined(),
                "fasq Plan: outliers need all of rowptr, cols and vals");
    p->sparse = check_sparse(p->orowptr, p->ocol, p->oval, meta[M_IN], meta[M_OUT], p->orows, "fasq Plan");
  }
  p->meta = std::move(meta);
  for (auto item : buffers)
    p->bufs.emplace_back(py::reinterpret_borrow<py::str>(item.first), py::reinterpret_borrow<py::object>(item.second));
  for (auto& t : watched) p->versions.emplace_back(t, t._version());
  const char* e = std::getenv("FASQ_DISABLE_KERNELS");
  p->env_set = e != nullptr;
  p->env = e ? e : "";
  p->generation = generation;
  std::memset(p->methods, -1, sizeof(p->methods));
  return p;
}

}  // namespace fasq_cpu

TORCH_LIBRARY_FRAGMENT(fasq, m) {
  m.def("cpu_pq_linear(Tensor x, Tensor codes, Tensor tables, Tensor scales, Tensor rot_signs, Tensor? bias, "
        "int[] meta, Tensor? orowptr=None, Tensor? ocols=None, Tensor? ovals=None) -> Tensor");
  m.def("cpu_dense16_linear(Tensor x, Tensor weight, Tensor? bias, int isa, bool poison) -> Tensor");
  m.def("cpu_features() -> int", &fasq_cpu::features);
}

TORCH_LIBRARY_IMPL(fasq, CPU, m) {
  m.impl("cpu_pq_linear", &fasq_cpu::cpu_pq_linear);
  m.impl("cpu_dense16_linear", &fasq_cpu::cpu_dense16_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<fasq_cpu::Plan>(m, "Plan")
      .def(py::init(&fasq_cpu::make_plan))
      .def("run", &fasq_cpu::Plan::run, "y, or None when the plan cannot serve this call")
      .def("valid", &fasq_cpu::Plan::valid)
      .def("set_method", &fasq_cpu::Plan::set_method)
      .def("call", &fasq_cpu::Plan::call, "PQLinear.__call__: y, or None when nn.Module.__call__ must run");
  m.def("set_module_globals", [](py::dict g) {
    auto& k = fasq_cpu::Plan::call_keys();
    Py_XDECREF(k.globals);
    k.globals = g.inc_ref().ptr();
  }, "torch.nn.modules.module.__dict__, where the global module hooks live (Plan.call checks them)");
}
