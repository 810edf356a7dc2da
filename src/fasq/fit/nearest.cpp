// Nearest-centroid assignment for k-means on the CPU (fasq.fit.native): the hot loop of fitting.
//
// For d <= 8 a distance is a handful of FMAs, so a BLAS distance matrix (what faiss and torch do)
// spends its time writing and re-reading N x K floats.  Here each thread keeps a block of 64 points
// transposed in registers-sized arrays and walks the codebook once, keeping the running minimum:
// the inner loop over points is branch-free and vectorizes (AVX2 / AVX-512 with -march=native).
#include <torch/extension.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int B = 64;  // points per block

template <int D>
void nearest_blocks(const float* x, int64_t n, int dd, const float* c, const float* cn, int64_t k,
                    int64_t* out) {
  const int d = D > 0 ? D : dd;
  const int64_t nblocks = (n + B - 1) / B;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    alignas(64) float xs[8][B];
    alignas(64) float best[B];
    alignas(64) int32_t bi[B];
    const int64_t p0 = blk * B;
    const int np = (int)std::min<int64_t>(B, n - p0);
    for (int j = 0; j < d; ++j)
      for (int p = 0; p < B; ++p) xs[j][p] = p < np ? x[(p0 + p) * d + j] : 0.f;
    for (int p = 0; p < B; ++p) {
      best[p] = std::numeric_limits<float>::infinity();
      bi[p] = 0;
    }
    for (int64_t q = 0; q < k; ++q) {
      float cq[8];
      for (int j = 0; j < d; ++j) cq[j] = -2.f * c[q * d + j];
      const float base = cn[q];
      const int32_t qi = (int32_t)q;
#pragma omp simd
      for (int p = 0; p < B; ++p) {
        float dist = base;
        for (int j = 0; j < (D > 0 ? D : d); ++j) dist += xs[j][p] * cq[j];
        const bool better = dist < best[p];  // strict: ties keep the lowest index, as argmin does
        best[p] = better ? dist : best[p];
        bi[p] = better ? qi : bi[p];
      }
    }
    for (int p = 0; p < np; ++p) out[p0 + p] = bi[p];
  }
}


#if defined(__AVX512F__) || defined(__AVX2__)
// What the SIMD walk needs from an instruction set: a float vector, a vector of centroid indices, and
// "take dist and q where dist < best".
#if defined(__AVX512F__)
struct Isa {
  static constexpr int L = 16;  // lanes
  using F = __m512;
  using I = __m512i;
  static F load(const float* p) { return _mm512_load_ps(p); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static I index(int64_t q) { return _mm512_set1_epi32((int32_t)q); }
  static I zero_index() { return _mm512_setzero_si512(); }
  static void keep_smaller(F dist, I q, F& best, I& idx) {
    const __mmask16 better = _mm512_cmp_ps_mask(dist, best, _CMP_LT_OQ);
    best = _mm512_mask_mov_ps(best, better, dist);
    idx = _mm512_mask_mov_epi32(idx, better, q);
  }
  static void store_index(int32_t* p, I idx) { _mm512_store_si512((void*)p, idx); }
};
#else
struct Isa {
  static constexpr int L = 8;
  using F = __m256;
  using I = __m256;  // indices kept as exact floats (< 2^24) so that one blend serves both
  static F load(const float* p) { return _mm256_load_ps(p); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static I index(int64_t q) { return _mm256_set1_ps((float)q); }
  static I zero_index() { return _mm256_setzero_ps(); }
  static void keep_smaller(F dist, I q, F& best, I& idx) {
    const __m256 better = _mm256_cmp_ps(dist, best, _CMP_LT_OQ);
    best = _mm256_blendv_ps(best, dist, better);
    idx = _mm256_blendv_ps(idx, q, better);
  }
  static void store_index(int32_t* p, I idx) { _mm256_store_si256((__m256i*)p, _mm256_cvtps_epi32(idx)); }
};
#endif

// 4 vectors of points per block (64 with AVX-512, 32 with AVX2), held in registers across the codebook.
template <int D>
void nearest_blocks_simd(const float* x, int64_t n, const float* c, const float* cn, int64_t k, int64_t* out) {
  constexpr int V = 4, L = Isa::L, BB = V * L;
  const int64_t nblocks = (n + BB - 1) / BB;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    alignas(64) float xs[D][BB];
    alignas(64) int32_t bi[BB];
    const int64_t p0 = blk * BB;
    const int np = (int)std::min<int64_t>(BB, n - p0);
    for (int j = 0; j < D; ++j)
      for (int p = 0; p < BB; ++p) xs[j][p] = p < np ? x[(p0 + p) * D + j] : 0.f;
    typename Isa::F xv[D][V], best[V];
    typename Isa::I idx[V];
    for (int v = 0; v < V; ++v) {
      for (int j = 0; j < D; ++j) xv[j][v] = Isa::load(&xs[j][v * L]);
      best[v] = Isa::set1(std::numeric_limits<float>::infinity());
      idx[v] = Isa::zero_index();
    }
    for (int64_t q = 0; q < k; ++q) {
      typename Isa::F cq[D];
      for (int j = 0; j < D; ++j) cq[j] = Isa::set1(-2.f * c[q * D + j]);
      const typename Isa::F base = Isa::set1(cn[q]);
      const typename Isa::I qv = Isa::index(q);
      for (int v = 0; v < V; ++v) {
        typename Isa::F dist = base;
        for (int j = 0; j < D; ++j) dist = Isa::fmadd(xv[j][v], cq[j], dist);
        Isa::keep_smaller(dist, qv, best[v], idx[v]);  // strict <: ties keep the lowest index
      }
    }
    for (int v = 0; v < V; ++v) Isa::store_index(&bi[v * L], idx[v]);
    for (int p = 0; p < np; ++p) out[p0 + p] = bi[p];
  }
}
#endif

torch::Tensor nearest(torch::Tensor x, torch::Tensor centroids) {
  TORCH_CHECK(x.dim() == 2 && centroids.dim() == 2 && x.size(1) == centroids.size(1),
              "fasq nearest: x [N, d] and centroids [K, d] must agree in d");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && centroids.scalar_type() == torch::kFloat,
              "fasq nearest: float32 inputs expected");
  const int d = (int)x.size(1);
  TORCH_CHECK(d >= 1 && d <= 8, "fasq nearest: d must be 1..8, got ", d);
  TORCH_CHECK(centroids.size(0) >= 1, "fasq nearest: no centroids");
  x = x.contiguous();
  auto c = centroids.contiguous();
  auto cn = (c * c).sum(1).contiguous();
  auto out = torch::empty({x.size(0)}, torch::kLong);
  if (x.size(0) == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* cnp = cn.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(0), k = c.size(0);
#if defined(__AVX512F__) || defined(__AVX2__)
  if (k < (1 << 24)) {
    switch (d) {
      case 1: nearest_blocks_simd<1>(xp, n, cp, cnp, k, op); return out;
      case 2: nearest_blocks_simd<2>(xp, n, cp, cnp, k, op); return out;
      case 3: nearest_blocks_simd<3>(xp, n, cp, cnp, k, op); return out;
      case 4: nearest_blocks_simd<4>(xp, n, cp, cnp, k, op); return out;
      default: break;
    }
  }
#endif
  switch (d) {
    case 1: nearest_blocks<1>(xp, n, d, cp, cnp, k, op); break;
    case 2: nearest_blocks<2>(xp, n, d, cp, cnp, k, op); break;
    case 3: nearest_blocks<3>(xp, n, d, cp, cnp, k, op); break;
    case 4: nearest_blocks<4>(xp, n, d, cp, cnp, k, op); break;
    default: nearest_blocks<0>(xp, n, d, cp, cnp, k, op); break;
  }
  return out;
}

// One Lloyd iteration's statistics: the codes, and per centroid the sum of its points and their count.
// The points are cut into kLloydChunks fixed ranges, each summed in double in point order, and the
// ranges are added in order: the result does not depend on the thread count (a run with 2 workers,
// each single-threaded, gives what 1 worker on 2 threads gives).
constexpr int kLloydChunks = 8;

std::vector<torch::Tensor> lloyd_stats(torch::Tensor x, torch::Tensor centroids) {
  auto codes = nearest(x, centroids);
  x = x.contiguous();
  const int64_t n = x.size(0), k = centroids.size(0), d = x.size(1);
  std::vector<double> part((size_t)kLloydChunks * k * (d + 1), 0.0);
  const float* xp = x.data_ptr<float>();
  const int64_t* cp = codes.data_ptr<int64_t>();
  const int nt = std::max(1, std::min(kLloydChunks, at::get_num_threads()));
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int c = 0; c < kLloydChunks; ++c) {
    double* acc = part.data() + (size_t)c * k * (d + 1);
    const int64_t lo = n * c / kLloydChunks, hi = n * (c + 1) / kLloydChunks;
    for (int64_t i = lo; i < hi; ++i) {
      double* a = acc + cp[i] * (d + 1);
      for (int64_t j = 0; j < d; ++j) a[j] += xp[i * d + j];
      a[d] += 1.0;
    }
  }
  auto sums = torch::zeros({k, d}, torch::kDouble);
  auto counts = torch::zeros({k}, torch::kDouble);
  double* sp = sums.data_ptr<double>();
  double* np_ = counts.data_ptr<double>();
  for (int c = 0; c < kLloydChunks; ++c) {
    const double* acc = part.data() + (size_t)c * k * (d + 1);
    for (int64_t q = 0; q < k; ++q) {
      for (int64_t j = 0; j < d; ++j) sp[q * d + j] += acc[q * (d + 1) + j];
      np_[q] += acc[q * (d + 1) + d];
    }
  }
  return {codes, sums, counts};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nearest", &nearest, "index of the nearest centroid for each row of x (float32, d <= 8)");
  m.def("lloyd_stats", &lloyd_stats, "(codes, per-centroid sums [K, d] f64, counts [K] f64) for one Lloyd step");
}
