// The LUT and PERM scans over the repacked codes, and their dispatch on table size and tokens.
#pragma once

#include "scan_lookup.h"

namespace fasq_cpu {

#ifdef FASQ_VBMI
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
  const int64_t pf_ahead = SCAN_PF * a.n_books * a.cstride;
  for (int64_t g = g0; g < g1; ++g)
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const int64_t pf = rb + SCAN_PF < a.nrb ? pf_ahead : 0;
    const int64_t js = std::max(g * a.gs, ja), je = std::min({(g + 1) * a.gs, jb, a.nsub});
    __m512 acc[NT][4];
    for (int t = 0; t < NT; ++t)
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
    for (int64_t m = 0; m < a.n_books; ++m) {
      const uint8_t* cbase = a.codes + (rb * a.n_books + m) * a.cstride;
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
        for (int t = 0; t < NT; ++t) lp[t] = a.tab + (((t0 + t) * a.n_books + m) * a.tab_n + js - a.tab_j0) * 2 * KP;
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
        weights64<KP>(a.codes + rb * a.n_books * a.cstride, a.tab, a.n_books, a.cstride, a.nsub, d, j, 0, d, sv,
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

static Lut1Fn pick_lut1(int64_t table_size, int nr) {
  return table_size == 64 ? pick_lut1_nr<64>(nr) : table_size == 128 ? pick_lut1_nr<128>(nr)
       : table_size == 256 ? pick_lut1_nr<256>(nr)
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

static ScanFn pick_scan(bool perm, int64_t table_size, int nt, int64_t d) {
  if (perm) return table_size == 64 ? pick_scan_d<true, 64>(nt, d) : table_size == 128 ? pick_scan_d<true, 128>(nt, d)
                : table_size == 256 ? pick_scan_d<true, 256>(nt, d) : pick_scan_d<true, 512>(nt, d);
  return table_size == 64 ? pick_scan_d<false, 64>(nt, d) : table_size == 128 ? pick_scan_d<false, 128>(nt, d)
                : table_size == 256 ? pick_scan_d<false, 256>(nt, d) : pick_scan_d<false, 512>(nt, d);
}
#endif  // FASQ_VBMI

}  // namespace fasq_cpu
