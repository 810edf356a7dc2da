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

// The int[] `meta` argument of cpu_pq_linear and the Plan: one int per field, in this order
// (M_IN = 0, M_OUT = 1, ...).  cpu.py builds it by name (META_FIELDS, checked against the names
// exported here by constants() in pq_cpu.cpp when the library loads).
#define FASQ_META_FIELDS(X)                                                                       \
  X(M_IN, "in_features") X(M_OUT, "out_features") X(M_D, "subvector_dim") X(M_K, "num_centroids") \
  X(M_M, "num_codebooks") X(M_BITS, "bits") X(M_NSUB, "n_sub")                                    \
  X(M_GS, "group_subvectors") /* sub-vector positions per scale group */                           \
  X(M_NG, "n_groups") X(M_ROT, "rotation_block") X(M_MODE, "mode") X(M_ISA, "isa")                 \
  X(M_DP, "padded_dim") /* d rounded up to a power of two (DIRECT, stored-layout TILED) */         \
  X(M_KP, "table_size") /* entries of a LUT / PERM table plane: 64, 128, 256 or 512 >= K */        \
  X(M_WORDS, "words_per_row") X(M_POISON, "poison")
enum Meta {
#define FASQ_META_ENUM(name, text) name,
  FASQ_META_FIELDS(FASQ_META_ENUM)
#undef FASQ_META_ENUM
  M_COUNT
};
enum Mode { DIRECT = 0, LUT = 1, TILED = 2, PERM = 3 };  // meta[M_MODE]: cpu.py's METHODS
enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2 };           // meta[M_ISA]: cpu.py's ISAS
// Rows per block in the repacked (LUT / PERM) layout: one byte lane of a 64-byte register per row.
constexpr int RB = 64;

// What the library was compiled with: the bits of features().
enum Feature {
  F_AVX2 = 1,
  F_AVX512 = 2,
  F_VBMI = 4,
  F_OPENMP = 8,
  F_FP16_LUT = 16,  // the LUT tables are built in fp16 arithmetic (lut_build_one_fp16)
};

int64_t features() {
  int64_t f = 0;
#ifdef FASQ_AVX2
  f |= F_AVX2;
#endif
#ifdef FASQ_AVX512
  f |= F_AVX512;
#endif
#ifdef FASQ_VBMI
  f |= F_VBMI;
#endif
#ifdef _OPENMP
  f |= F_OPENMP;
#endif
#if defined(FASQ_VBMI) && defined(__AVX512FP16__)
  f |= F_FP16_LUT;
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
