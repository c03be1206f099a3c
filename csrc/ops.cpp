// flowrl_kernels._C: op schemas (namespace flowrl_kernels_native, see CONTRACTS.md), the CPU and Meta
// implementations, and the Python module object. The CUDA implementations live in cuda_bindings.cpp
// (compiled only when torch has CUDA and nvcc is found). Autograd is done in Python
// (flowrl_kernels/ops/token_logprobs.py, ops/flowrl_loss.py): these ops are plain forward / backward kernels.
#include <Python.h>

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymInt.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common.h"
#include "cpu/kernels.h"

namespace flowrl {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------------
// plumbing
// ---------------------------------------------------------------------------------------------------
const CpuKernels& cpu_kernels(const char** name = nullptr) {
  static const char* chosen = "DEFAULT";
  static const CpuKernels* k = [] {
    const std::string cap = at::get_cpu_capability();  // ATEN_CPU_CAPABILITY=default|avx2 lowers it
#ifdef FLOWRL_HAVE_AVX512
    if (cap == "AVX512") { chosen = "AVX512"; return &AVX512::kernels(); }
#endif
#ifdef FLOWRL_HAVE_AVX2
    if (cap == "AVX2" || cap == "AVX512") { chosen = "AVX2"; return &AVX2::kernels(); }
#endif
    return &DEFAULT::kernels();
  }();
  if (name) *name = chosen;
  return *k;
}

Dt to_dt(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kBFloat16: return Dt::BF16;
    case at::kHalf: return Dt::F16;
    default: TORCH_CHECK(false, "flowrl_kernels_native: ", name, " must be float32, bfloat16 or float16, got ",
                         t.scalar_type());
  }
}

// ---------------------------------------------------------------------------------------------------
// CPU implementations
// ---------------------------------------------------------------------------------------------------
// A fresh [N, V] gradient (311 MB at N=1024, V=151936, bf16) is new mmap'ed memory: first-touch page
// faults at 4 KiB cost about as much as the kernel itself (~0.2 s single-threaded for 311 MB here).
// Asking for transparent huge pages on it (the common THP "madvise" mode) cuts the faults 512x.
// Advisory only: any error is ignored, and FLOWRL_KERNELS_NO_THP=1 turns it off.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool off = [] {
    const char* v = std::getenv("FLOWRL_KERNELS_NO_THP");
    return v && std::string(v) != "" && std::string(v) != "0";
  }();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.nbytes();
  if (off || bytes < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

std::tuple<Tensor, Tensor, Tensor> token_logprobs_fwd_cpu(const Tensor& logits, const Tensor& labels,
                                                         double temperature, bool return_entropy,
                                                         int64_t ignore_index) {
  const char* op = "flowrl_kernels_native.token_logprobs_fwd";
  check_token_inputs(logits, labels, temperature, op);
  const Dt dt = to_dt(logits, "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = out_empty({N}, opts), lse = out_empty({N}, opts);
  Tensor ent = out_empty({return_entropy ? N : 0}, opts);
  if (N == 0) return {logp, lse, ent};
  cpu_kernels().token_logprobs_fwd(logits.const_data_ptr(), dt, logits.stride(0),
                                   labels.const_data_ptr<int64_t>(), labels.stride(0), N, V,
                                   static_cast<float>(1.0 / temperature), ignore_index,
                                   logp.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                                   return_entropy ? ent.mutable_data_ptr<float>() : nullptr);
  return {logp, lse, ent};
}

Tensor token_logprobs_bwd_cpu(const Tensor& logits, const Tensor& labels, const Tensor& lse,
                              const Tensor& entropy, const Tensor& grad_logp,
                              const std::optional<Tensor>& grad_entropy, double temperature,
                              int64_t ignore_index) {
  const char* op = "flowrl_kernels_native.token_logprobs_bwd";
  check_token_inputs(logits, labels, temperature, op);
  const Dt dt = to_dt(logits, "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  Tensor grad = at::empty({N, V}, logits.options());
  advise_huge_pages(grad);  // before the first touch (the poison fill below is one)
  if (poison_enabled()) grad.fill_(std::numeric_limits<double>::quiet_NaN());
  if (N == 0) return grad;
  const TokenBwdRows r = token_bwd_rows(logits, lse, entropy, grad_logp, grad_entropy, op);
  cpu_kernels().token_logprobs_bwd(logits.const_data_ptr(), dt, logits.stride(0),
                                   labels.const_data_ptr<int64_t>(), labels.stride(0), N, V,
                                   static_cast<float>(1.0 / temperature), ignore_index,
                                   r.lse.const_data_ptr<float>(),
                                   r.entropy.defined() ? r.entropy.const_data_ptr<float>() : nullptr,
                                   r.grad_logp.const_data_ptr<float>(),
                                   r.grad_entropy.defined() ? r.grad_entropy.const_data_ptr<float>() : nullptr,
                                   grad.mutable_data_ptr());
  return grad;
}

void check_mask(const Tensor& mask, int64_t B, int64_t T, const char* op) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T, op, ": mask must be [B, T] = [",
              B, ", ", T, "], got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat, op,
              ": mask must be bool or float32 (convert other dtypes to float32), got ", mask.scalar_type());
}

StridedIn strided_in(const Tensor& t, int64_t B, int64_t T, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, op, ": ", name, " must be [B, T] = [", B,
              ", ", T, "], got ", t.sizes());
  return StridedIn{t.const_data_ptr(), to_dt(t, name), t.stride(0), t.stride(1)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> flowrl_loss_fwd_cpu(
    const Tensor& logp, const Tensor& old_logp, const Tensor& ref_logp, const Tensor& log_z,
    const Tensor& rewards, const Tensor& mask, double beta, int64_t importance, double log_lo,
    double log_hi) {
  const char* op = "flowrl_kernels_native.flowrl_loss_fwd";
  TORCH_CHECK(logp.dim() == 2, op, ": logp must be [B, T], got ", logp.sizes());
  TORCH_CHECK(importance >= 0 && importance <= 2, op, ": importance must be 0 (none), 1 (sequence) or 2 "
              "(sequence_mean), got ", importance);
  const int64_t B = logp.size(0), T = logp.size(1);
  const StridedIn lp = strided_in(logp, B, T, "logp", op), old = strided_in(old_logp, B, T, "old_logp", op),
                  ref = strided_in(ref_logp, B, T, "ref_logp", op);
  check_mask(mask, B, T, op);
  const Tensor lz = rows_f32(log_z, B, logp.device(), "log_z", op),
               rw = rows_f32(rewards, B, logp.device(), "rewards", op);
  const auto opts = logp.options().dtype(at::kFloat);
  Tensor outs[7];
  float* ptrs[7];
  for (int k = 0; k < 7; ++k) {
    outs[k] = out_empty({B}, opts);
    ptrs[k] = outs[k].mutable_data_ptr<float>();
  }
  if (B > 0) {
    cpu_kernels().flowrl_loss_fwd(lp, old, ref, lz.const_data_ptr<float>(), rw.const_data_ptr<float>(),
                                  mask.const_data_ptr(), mask.scalar_type() == at::kBool, mask.stride(0),
                                  mask.stride(1), B, T, static_cast<float>(beta), importance,
                                  static_cast<float>(log_lo), static_cast<float>(log_hi), ptrs);
  }
  return {outs[0], outs[1], outs[2], outs[3], outs[4], outs[5], outs[6]};
}

std::tuple<Tensor, Tensor> flowrl_loss_bwd_cpu(const Tensor& grad_per_seq, const Tensor& delta,
                                               const Tensor& weight, const Tensor& length,
                                               const Tensor& mask, at::ScalarType logp_dtype) {
  const char* op = "flowrl_kernels_native.flowrl_loss_bwd";
  TORCH_CHECK(mask.dim() == 2, op, ": mask must be [B, T], got ", mask.sizes());
  const int64_t B = mask.size(0), T = mask.size(1);
  check_mask(mask, B, T, op);
  const at::Device dev = mask.device();
  const Tensor g = rows_f32(grad_per_seq, B, dev, "grad_per_seq", op), d = rows_f32(delta, B, dev, "delta", op),
               w = rows_f32(weight, B, dev, "weight", op), L = rows_f32(length, B, dev, "length", op);
  Tensor grad_logp = out_empty({B, T}, mask.options().dtype(logp_dtype));
  const Dt dt = to_dt(grad_logp, "logp_dtype");
  Tensor grad_log_z = out_empty({B}, mask.options().dtype(at::kFloat));
  if (B > 0) {
    cpu_kernels().flowrl_loss_bwd(g.const_data_ptr<float>(), d.const_data_ptr<float>(),
                                  w.const_data_ptr<float>(), L.const_data_ptr<float>(), mask.const_data_ptr(),
                                  mask.scalar_type() == at::kBool, mask.stride(0), mask.stride(1), B, T, dt,
                                  grad_logp.mutable_data_ptr(), grad_log_z.mutable_data_ptr<float>());
  }
  return {grad_logp, grad_log_z};
}

// ---------------------------------------------------------------------------------------------------
// Meta (fake) implementations: shapes and dtypes only, symbolic sizes kept symbolic for torch.compile
// ---------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> token_logprobs_fwd_meta(const Tensor& logits, const Tensor& labels,
                                                          double, bool return_entropy, int64_t) {
  TORCH_CHECK(logits.dim() == 2, "token_logprobs_fwd: logits must be 2-D [N, V]");
  const auto opts = logits.options().dtype(at::kFloat);
  const c10::SymInt N = logits.sym_size(0);
  return {at::empty_symint({N}, opts), at::empty_symint({N}, opts),
          at::empty_symint({return_entropy ? N : c10::SymInt(0)}, opts)};
}

Tensor token_logprobs_bwd_meta(const Tensor& logits, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const std::optional<Tensor>&, double, int64_t) {
  return at::empty_symint(logits.sym_sizes(), logits.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> flowrl_loss_fwd_meta(
    const Tensor& logp, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    double, int64_t, double, double) {
  const auto opts = logp.options().dtype(at::kFloat);
  const c10::SymInt B = logp.sym_size(0);
  auto e = [&] { return at::empty_symint({B}, opts); };
  return {e(), e(), e(), e(), e(), e(), e()};
}

std::tuple<Tensor, Tensor> flowrl_loss_bwd_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor& mask, at::ScalarType logp_dtype) {
  return {at::empty_symint(mask.sym_sizes(), mask.options().dtype(logp_dtype)),
          at::empty_symint({mask.sym_size(0)}, mask.options().dtype(at::kFloat))};
}

}  // namespace

const char* cpu_capability_name() {
  const char* name = nullptr;
  cpu_kernels(&name);
  return name;
}

}  // namespace flowrl

TORCH_LIBRARY(flowrl_kernels_native, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, bool return_entropy, "
        "int ignore_index) -> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def("token_logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor entropy, Tensor grad_logp, "
        "Tensor? grad_entropy, float temperature, int ignore_index) -> Tensor grad_logits");
  m.def("flowrl_loss_fwd(Tensor logp, Tensor old_logp, Tensor ref_logp, Tensor log_z, Tensor rewards, "
        "Tensor mask, float beta, int importance, float log_lo, float log_hi) -> (Tensor per_seq, "
        "Tensor delta, Tensor weight, Tensor clipped, Tensor lp_bar, Tensor ref_bar, Tensor length)");
  m.def("flowrl_loss_bwd(Tensor grad_per_seq, Tensor delta, Tensor weight, Tensor length, Tensor mask, "
        "ScalarType logp_dtype) -> (Tensor grad_logp, Tensor grad_log_z)");
}

TORCH_LIBRARY_IMPL(flowrl_kernels_native, CPU, m) {
  m.impl("token_logprobs_fwd", &flowrl::token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &flowrl::token_logprobs_bwd_cpu);
  m.impl("flowrl_loss_fwd", &flowrl::flowrl_loss_fwd_cpu);
  m.impl("flowrl_loss_bwd", &flowrl::flowrl_loss_bwd_cpu);
}

TORCH_LIBRARY_IMPL(flowrl_kernels_native, Meta, m) {
  m.impl("token_logprobs_fwd", &flowrl::token_logprobs_fwd_meta);
  m.impl("token_logprobs_bwd", &flowrl::token_logprobs_bwd_meta);
  m.impl("flowrl_loss_fwd", &flowrl::flowrl_loss_fwd_meta);
  m.impl("flowrl_loss_bwd", &flowrl::flowrl_loss_bwd_meta);
}

// ---------------------------------------------------------------------------------------------------
// Python module: importing flowrl_kernels._C runs the registrations above (static initializers)
// ---------------------------------------------------------------------------------------------------
static PyObject* py_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(flowrl::cpu_capability_name());
}

static PyMethodDef flowrl_methods[] = {
    {"cpu_capability", py_cpu_capability, METH_NOARGS,
     "The CPU kernel variant in use: DEFAULT, AVX2 or AVX512 (follows ATEN_CPU_CAPABILITY)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef flowrl_module = {PyModuleDef_HEAD_INIT, "_C",
                                    "flowrl_kernels native ops: torch.ops.flowrl_kernels_native.*", -1,
                                    flowrl_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&flowrl_module);
  if (m == nullptr) return nullptr;
#ifdef FLOWRL_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
