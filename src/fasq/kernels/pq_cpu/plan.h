// PLAN: a layer's whole call (PQLinear's fast path) in one C++ call from Python.
#pragma once

#include "linear.h"

namespace fasq_cpu {

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
constexpr int kPlanTokens = 16;  // cpu.py's FEW_MAX_TOKENS (checked against constants() at load)

// The private nn.Module fields Plan.call reads, as cpu.py's module_call_fields() names them (the
// one place that knows them; set once when the library loads): the module __dict__ keys of its
// hook dicts, of module.compile()'s compiled call and of a forward assigned on the instance; the
// global hook dicts' names in torch.nn.modules.module's namespace (`globals`).  Keys are interned,
// so that the dict look-ups compare pointers.
struct __attribute__((visibility("hidden"))) ModuleCallFields {
  py::str compiled, forward, buffers;
  std::vector<py::str> hooks, global_hooks;
  PyObject* globals = nullptr;  // a strong reference, never released (module globals live as long)

  static const ModuleCallFields* get() { return current(); }
  static void set(const py::dict& f) {
    auto* k = new ModuleCallFields();  // leaked on purpose: no Python calls at interpreter exit
    k->compiled = interned(f["compiled"]), k->forward = interned(f["forward"]), k->buffers = interned(f["buffers"]);
    for (auto name : py::list(f["instance_hooks"])) k->hooks.push_back(interned(name));
    for (auto name : py::list(f["global_hooks"])) k->global_hooks.push_back(interned(name));
    k->globals = py::dict(f["globals"]).inc_ref().ptr();
    current() = k;  // a previous one stays allocated: a Plan.call may be reading it
  }

 private:
  static const ModuleCallFields*& current() {
    static const ModuleCallFields* k = nullptr;
    return k;
  }
  static py::str interned(py::handle name) {
    PyObject* o = py::str(name).release().ptr();
    PyUnicode_InternInPlace(&o);
    return py::reinterpret_steal<py::str>(o);
  }
};

// Hidden like pybind11's own types (its py::object fields): GCC warns about a type defined outside
// the main file that is more visible than its fields.
struct __attribute__((visibility("hidden"))) Plan {
  at::Tensor codes, tables, scales, signs, bias;      // stored layout (direct / tiled)
  at::Tensor rcodes, cb_transposed, rscales, planes;  // repacked layout (lut / perm); undefined without VBMI
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
      y = pq_linear_impl(x, repacked ? rcodes : codes, mode == LUT ? cb_transposed : repacked ? planes : tables,
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

  // PQLinear.__call__'s fast path: the checks nn.Module._call_impl makes before it calls forward
  // straight away (the module fields ModuleCallFields names), then run().  `d` is the module's
  // __dict__.  None: call nn.Module.__call__ instead (also before cpu.py has set the fields).  Cold
  // (a decode step whose model does not fit the caches) nn.Module.__call__ + forward cost ~60 us of
  // interpreter cache misses on a SmolLM2-size layer, as much as the kernel.
  py::object call(py::handle d, py::handle xh, int64_t gen) const {
    PyObject* dict = d.ptr();
    const ModuleCallFields* k = ModuleCallFields::get();
    if (k == nullptr || !PyDict_Check(dict)) return py::none();
    PyObject* v = PyDict_GetItem(dict, k->compiled.ptr());  // borrowed references throughout
    if (v != nullptr && v != Py_None) return py::none();
    if (PyDict_GetItem(dict, k->forward.ptr()) != nullptr) return py::none();
    for (const py::str& name : k->hooks) {
      v = PyDict_GetItem(dict, name.ptr());
      if (v == nullptr || !PyDict_Check(v) || PyDict_GET_SIZE(v) != 0) return py::none();
    }
    for (const py::str& name : k->global_hooks) {
      v = PyDict_GetItem(k->globals, name.ptr());
      if (v == nullptr || !PyDict_Check(v) || PyDict_GET_SIZE(v) != 0) return py::none();
    }
    PyObject* buffers = PyDict_GetItem(dict, k->buffers.ptr());
    if (buffers == nullptr) return py::none();
    return run(xh, buffers, gen);
  }
};

static at::Tensor opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

static std::unique_ptr<Plan> make_plan(const at::Tensor& codes, const at::Tensor& tables, const at::Tensor& scales,
                                       const at::Tensor& signs, const c10::optional<at::Tensor>& bias,
                                       const c10::optional<at::Tensor>& rcodes, const c10::optional<at::Tensor>& cb_transposed,
                                       const c10::optional<at::Tensor>& rscales,
                                       const c10::optional<at::Tensor>& planes, const c10::optional<at::Tensor>& orowptr,
                                       const c10::optional<at::Tensor>& ocol, const c10::optional<at::Tensor>& oval,
                                       std::vector<int64_t> meta, py::dict buffers, std::vector<at::Tensor> watched,
                                       int64_t generation) {
  TORCH_CHECK(meta.size() == M_COUNT, "fasq Plan: meta must have ", int(M_COUNT), " entries");
  auto p = std::make_unique<Plan>();
  p->codes = codes, p->tables = tables, p->scales = scales, p->signs = signs, p->bias = opt(bias);
  p->rcodes = opt(rcodes), p->cb_transposed = opt(cb_transposed), p->rscales = opt(rscales), p->planes = opt(planes);
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
