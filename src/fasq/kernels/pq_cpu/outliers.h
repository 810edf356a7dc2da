// The sparse outlier correction: checked operands, folded into TILED's tiles or added to y.
#pragma once

#include "common.h"

namespace fasq_cpu {

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

}  // namespace fasq_cpu
