// TILED: tiles of W_r dequantized into a reused buffer, then ATen's GEMM (both layouts).
#pragma once

#include "decode.h"
#include "io.h"
#include "outliers.h"
#include "tiled_dequant.h"

namespace fasq_cpu {

// ---------------------------------------------------------------------------------------------
// TILED: dequantize R rows of W_r at a time into a reused fp32 buffer, then GEMM in x's dtype.
//
// One row: dst[c] = scale[g(c)] * sum_m codebook_m[code_m[j(c)]][c % d]  for c < n_sub * d.
static void dequant_row(const int32_t* const* idx, const float* const* cb, const c10::Half* sc, const int64_t* mt,
                        float* dst, int isa) {
  const int64_t nsub = mt[M_NSUB], n_books = mt[M_M], d = mt[M_D], dp = mt[M_DP], gs = mt[M_GS], ng = mt[M_NG];
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
          for (int64_t m = 0; m < n_books; ++m)
            w = _mm512_add_ps(w, _mm512_i32gather_ps(_mm512_loadu_si512(idx[m] + j), cb[m], 4));
          _mm512_storeu_ps(dst + j, _mm512_mul_ps(w, sv));
        } else {
          __m512 w0 = _mm512_setzero_ps(), w1 = _mm512_setzero_ps();
          for (int64_t m = 0; m < n_books; ++m) {
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
        for (int64_t m = 0; m < n_books; ++m)
          w = _mm512_add_ps(w, _mm512_maskz_loadu_ps(km, cb[m] + static_cast<int64_t>(idx[m][j]) * dp));
        _mm512_mask_storeu_ps(dst + j * d, km, _mm512_mul_ps(w, sv));
      }
    }
#endif
    (void)isa;
    for (; j < je; ++j) {
      float* o = dst + j * d;
      for (int64_t c = 0; c < d; ++c) o[c] = 0.f;
      for (int64_t m = 0; m < n_books; ++m) {
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
  const int64_t T = x2.size(0), in = mt[M_IN], out = mt[M_OUT], nsub = mt[M_NSUB], n_books = mt[M_M];
  const int64_t table_size = mt[M_KP];
  const int64_t nrb = (out + RB - 1) / RB, cstride = nsub * RB + (table_size == 512 ? nsub * 8 : 0);
  TORCH_CHECK(table_size == 64 || table_size == 128 || table_size == 256 || table_size == 512,
              "fasq cpu_pq_linear: bad table size");
  TORCH_CHECK(codes.is_contiguous() && codes.numel() == nrb * n_books * cstride,
              "fasq cpu_pq_linear: codes are not in the repacked layout");
  TORCH_CHECK(planes.scalar_type() == at::kByte && planes.is_contiguous() &&
                  planes.numel() == n_books * mt[M_D] * 2 * table_size,
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
  const int nth = n_threads(0.08 * static_cast<double>(R) * in * n_books);  // ~0.08 ns per weight and codebook
  (void)nth;  // unused when built without OpenMP
  for (int64_t rb0 = 0; rb0 < nrb; rb0 += rbs) {
    const int64_t nb = std::min(rbs, nrb - rb0), n = std::min(out, (rb0 + nb) * RB) - rb0 * RB;
#pragma omp parallel for schedule(static) num_threads(nth) if (nth > 1)
    for (int64_t q = 0; q < nb; ++q) {
      const int64_t r0 = (rb0 + q) * RB, r1 = std::min(out, r0 + RB);
      auto fill = [&](auto* tp) {
        if (rot_w) dequant_block_rot(table_size, cp, pp, sp, mt, rb0 + q, rsc, tp + q * RB, R);
        else dequant_block_t(table_size, cp, pp, sp, mt, rb0 + q, in, tp + q * RB, R);
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
  const int64_t T = x2.size(0), in = mt[M_IN], out = mt[M_OUT], nsub = mt[M_NSUB], n_books = mt[M_M];
  const int64_t dp = mt[M_DP], n_centroids = mt[M_K], ng = mt[M_NG], nbytes = mt[M_WORDS] * 4, width = nsub * mt[M_D];
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
  const int nth = n_threads(2.5 * static_cast<double>(R) * nsub * n_books);
  (void)nth;  // unused when built without OpenMP
  for (int64_t o0 = 0; o0 < out; o0 += R) {
    const int64_t n = std::min(R, out - o0);
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
      std::vector<int32_t> idx_v(static_cast<size_t>(n_books * (nsub + 16)));
      std::vector<const int32_t*> idx_p(n_books);
      std::vector<const float*> cb_p(n_books);
      for (int64_t m = 0; m < n_books; ++m)
        idx_p[m] = idx_v.data() + m * (nsub + 16), cb_p[m] = tb + m * n_centroids * dp;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < n; ++r) {
        const int64_t o = o0 + r;
        for (int64_t m = 0; m < n_books; ++m)
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

}  // namespace fasq_cpu
