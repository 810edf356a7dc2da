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
// embedding / output head kept in its stored fp16 form) with fp32 sums (pq_cpu/dense16.h).
//
// All methods rotate the input first (sign flip + fast Walsh-Hadamard transform in fp32) and use
// the rotated weight W_r, exactly like fasq.reference.pq_linear.  Sums are fp32 (LUT: exact int32).
//
// PLAN (pq_cpu/plan.h): a per-layer object that PQLinear.forward calls directly (pybind11) for up
// to kPlanTokens tokens: checks, rotation, the method the registry chose, bias and the sparse
// outlier correction in one C++ call.
//
// One translation unit: this file registers the ops and includes the headers in pq_cpu/, one
// purpose each (so the compiler still sees, and inlines, everything at once as before the split):
//   common.h         includes, ISA macros, the `meta` layout, threads, scratch
//   io.h             the input's rotation (sign flip + FWHT) and padded layout; the output store
//   decode.h         bit-packed codes of the stored layout
//   direct.h         DIRECT
//   scan_lookup.h    byte-permute lookups in the repacked layout (LUT, PERM, repacked TILED)
//   scan_kernels.h   the LUT and PERM scans
//   scan_tables.h    the LUT's per-call int16 tables
//   scan.h           LUT and PERM: run_scan
//   tiled_dequant.h  TILED's byte-permute dequantization of row blocks
//   outliers.h       the sparse outlier correction (checked, folded into tiles or added to y)
//   tiled.h          TILED
//   dense16.h        DENSE16 (the op cpu_dense16_linear)
//   linear.h         the op cpu_pq_linear
//   plan.h           PLAN
// fasq/kernels/cpu.py hashes all of them into the build's cache key.
#include "pq_cpu/common.h"
#include "pq_cpu/dense16.h"
#include "pq_cpu/linear.h"
#include "pq_cpu/plan.h"

namespace fasq_cpu {
// The layout constants and enum values cpu.py must agree with (it checks them when the library
// loads; tests/test_kernels_cpu_constants.py too).
static py::dict constants() {
  py::dict c;
  c["rows_per_block"] = RB;
  c["plan_tokens"] = kPlanTokens;
  py::list fields;
#define FASQ_META_NAME(name, text) fields.append(text);
  FASQ_META_FIELDS(FASQ_META_NAME)
#undef FASQ_META_NAME
  c["meta_fields"] = fields;
  c["modes"] = py::dict(py::arg("direct") = int(DIRECT), py::arg("lut") = int(LUT), py::arg("tiled") = int(TILED),
                        py::arg("perm") = int(PERM));
  c["isas"] = py::dict(py::arg("scalar") = int(SCALAR), py::arg("avx2") = int(AVX2), py::arg("avx512") = int(AVX512));
  c["features"] = py::dict(py::arg("avx2") = int(F_AVX2), py::arg("avx512") = int(F_AVX512),
                           py::arg("vbmi") = int(F_VBMI), py::arg("openmp") = int(F_OPENMP),
                           py::arg("fp16_lut") = int(F_FP16_LUT));
  c["plan_dtypes"] = py::make_tuple("float32", "bfloat16", "float16");  // Plan::set_method's dtype index
  return c;
}
}  // namespace fasq_cpu

// The ops (benchmarks/cpu_ab.py drops these registrations, up to the pybind11 module, to load a
// second copy of the library).
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
  m.def("constants", &fasq_cpu::constants, "layout constants and enum values shared with cpu.py");
  py::class_<fasq_cpu::Plan>(m, "Plan")
      .def(py::init(&fasq_cpu::make_plan))
      .def("run", &fasq_cpu::Plan::run, "y, or None when the plan cannot serve this call")
      .def("valid", &fasq_cpu::Plan::valid)
      .def("set_method", &fasq_cpu::Plan::set_method)
      .def("call", &fasq_cpu::Plan::call, "PQLinear.__call__: y, or None when nn.Module.__call__ must run");
  m.def("set_module_call_fields", &fasq_cpu::ModuleCallFields::set,
        "the private nn.Module fields Plan.call checks (cpu.py: module_call_fields())");
}
