// The lean decode path's glue between linear layers, for one token on the CPU (fasq/decode/engine.py).
//
// A 1-token step of a 135M-270M model spends most of its time outside the matrix products when each
// norm, RoPE, cache write and attention is a chain of small torch ops: ~2.5 us of dispatch per op, and
// F.rms_norm alone measured ~46 us per call on a 576-wide row (aten::_fused_rms_norm's composite of
// pow/mean/rsqrt/mul, torch 2.13, profiled in a SmolLM2 decode step, busy 2-core machine).  Here each
// of those chains is one pybind11 call (no dispatcher: a torch.library op costs ~2-3 us more per call),
// on fp32 rows small enough that one thread computes them in well under a microsecond.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using torch::Tensor;

void check_f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              "lean_cpu: ", name, " must be a contiguous fp32 CPU tensor");
}

// y[i] = x[i] / rms(x) * w[i] over n values (sum of squares in fp32, as transformers' RMSNorm).
inline void rms_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / float(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// x [S, D] += (post is given ? rms(o) * post : o); returns rms(x) * w  [S, D].
// The residual add of one sub-block fused with the norm that feeds the next one.
Tensor residual_norm(Tensor x, const Tensor& o, const c10::optional<Tensor>& post, const Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(o, "o");
  check_f32(w, "w");
  const int64_t D = w.numel(), S = x.numel() / D;
  TORCH_CHECK(o.numel() == x.numel() && x.numel() == S * D, "lean_cpu.residual_norm: shapes differ");
  Tensor h = torch::empty_like(x);
  float *px = x.data_ptr<float>(), *ph = h.data_ptr<float>();
  const float* po = o.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  std::vector<float> tmp(post ? D : 0);
  for (int64_t s = 0; s < S; ++s) {
    float* xs = px + s * D;
    const float* os = po + s * D;
    if (post) {
      check_f32(*post, "post");
      rms_row(os, post->data_ptr<float>(), tmp.data(), D, float(eps));
      os = tmp.data();
    }
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) xs[i] += os[i];
    rms_row(xs, pw, ph + s * D, D, float(eps));
  }
  return h;
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t D = w.numel(), S = x.numel() / D;
  TORCH_CHECK(x.numel() == S * D, "lean_cpu.rms_norm: x is not a multiple of w");
  Tensor y = torch::empty_like(x);
  for (int64_t s = 0; s < S; ++s) rms_row(x.data_ptr<float>() + s * D, w.data_ptr<float>(), y.data_ptr<float>() + s * D, D, float(eps));
  return y;
}

// x [hd] <- optional per-head norm, then RoPE: x * cos + roll(x, hd/2) * sin_signed (engine.py's tables).
inline void norm_rope(const float* x, const float* norm_w, const float* cos, const float* sin, float* out,
                      int64_t hd, float eps) {
  float buf[1024];
  if (norm_w) {
    rms_row(x, norm_w, buf, hd, eps);
    x = buf;
  }
  const int64_t half = hd / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + x[i + half] * sin[i];
#pragma omp simd
  for (int64_t i = half; i < hd; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// One query token at position pos: q [H*hd], k, v [KV*hd] (the projections' outputs), caches
// kc, vc [KV, max_len, hd].  Applies the q/k norms (when given) and RoPE (q's tables carry the
// attention scale), writes k, v at pos, attends to positions start..pos (start = pos+1-window with a
// sliding window) and returns o [1, H*hd].
Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, Tensor kc, Tensor vc, int64_t pos, int64_t window,
              const Tensor& cos, const Tensor& sin, const Tensor& qcos, const Tensor& qsin,
              const c10::optional<Tensor>& q_norm, const c10::optional<Tensor>& k_norm, double eps) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &kc, &vc, &cos, &sin, &qcos, &qsin})
    check_f32(*t, "attend's inputs");
  const int64_t KV = kc.size(0), L = kc.size(1), hd = kc.size(2);
  const int64_t H = q.numel() / hd, G = H / KV;
  TORCH_CHECK(hd <= 1024 && hd % 2 == 0 && H * hd == q.numel() && G * KV == H && k.numel() == KV * hd &&
              v.numel() == KV * hd && pos >= 0 && pos < L && cos.size(0) >= L && cos.size(1) == hd,
              "lean_cpu.attend: shapes or position out of range");
  const float* qn = q_norm ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm ? k_norm->data_ptr<float>() : nullptr;
  const float *pc = cos.data_ptr<float>() + pos * hd, *ps = sin.data_ptr<float>() + pos * hd;
  const float *pqc = qcos.data_ptr<float>() + pos * hd, *pqs = qsin.data_ptr<float>() + pos * hd;
  float *pk = kc.data_ptr<float>(), *pv = vc.data_ptr<float>();
  for (int64_t g = 0; g < KV; ++g) {   // the new key (normed, rotated) and value into the caches
    norm_rope(k.data_ptr<float>() + g * hd, kn, pc, ps, pk + (g * L + pos) * hd, hd, float(eps));
    std::copy_n(v.data_ptr<float>() + g * hd, hd, pv + (g * L + pos) * hd);
  }
  const int64_t start = window > 0 ? std::max<int64_t>(0, pos + 1 - window) : 0, T = pos + 1 - start;
  Tensor o = torch::empty({1, H * hd}, q.options());
  float* po = o.data_ptr<float>();
  std::vector<float> qr(hd), p(T);
  for (int64_t h = 0; h < H; ++h) {
    norm_rope(q.data_ptr<float>() + h * hd, qn, pqc, pqs, qr.data(), hd, float(eps));
    const int64_t g = h / G;
    const float* keys = pk + (g * L + start) * hd;
    float mx = -INFINITY;
    for (int64_t t = 0; t < T; ++t) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < hd; ++i) s += qr[i] * keys[t * hd + i];
      p[t] = s;
      mx = std::max(mx, s);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < T; ++t) sum += (p[t] = std::exp(p[t] - mx));
    const float inv = 1.f / sum;
    float* out = po + h * hd;
    std::fill_n(out, hd, 0.f);
    const float* vals = pv + (g * L + start) * hd;
    for (int64_t t = 0; t < T; ++t) {
      const float a = p[t] * inv;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) out[i] += a * vals[t * hd + i];
    }
  }
  return o;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "y = x / rms(x) * w, rows of w.numel() values");
  m.def("residual_norm", &residual_norm, "x += (post ? rms(o) * post : o); return rms(x) * w");
  m.def("attend", &attend, "one token's q/k norm, RoPE, cache write and attention");
}
