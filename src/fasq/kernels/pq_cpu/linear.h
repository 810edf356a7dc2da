// The op cpu_pq_linear: checks, then the method meta[M_MODE] names.
#pragma once

#include "direct.h"
#include "outliers.h"
#include "scan.h"
#include "tiled.h"

namespace fasq_cpu {

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

}  // namespace fasq_cpu
