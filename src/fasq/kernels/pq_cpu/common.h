// Shared by every method: includes, the ISA macros, the `meta` layout, threads and scratch.
#pragma once

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

#ifdef FASQ_AVX2
// The sum of an AVX2 register's 8 lanes (DIRECT, DENSE16).
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace fasq_cpu
