// Helpers shared by the CPU ops (ops.cpp) and the CUDA bindings (cuda_bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

namespace flowrl {

// FLOWRL_KERNELS_POISON=1 (the test suite): fresh outputs are NaN, so an unwritten position fails a test
inline bool poison_enabled() {
  static const bool poison = [] {
    const char* v = std::getenv("FLOWRL_KERNELS_POISON");
    return v && std::string(v) != "" && std::string(v) != "0";
  }();
  return poison;
}

inline at::Tensor out_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  if (poison_enabled() && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline void check_token_inputs(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                               const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits needs V >= 1");
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1, op,
              ": logits must have a unit stride in the vocab dim (got stride ", logits.stride(1), ")");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              op, ": logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [N] = [",
              logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels and logits must be on one device");
  TORCH_CHECK(temperature > 0 && temperature < std::numeric_limits<double>::infinity(), op,
              ": temperature must be finite and > 0, got ", temperature);
}

// float32 contiguous [N] copy-if-needed of a per-row input (a no-op for the forward's own outputs), on
// logits' device: a CPU tensor handed to the CUDA kernels would be an illegal address that poisons the
// CUDA context, so the device is checked, not assumed
inline at::Tensor rows_f32(const at::Tensor& t, int64_t N, const at::Device& device, const char* name,
                           const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must be [N] = [", N, "], got ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other inputs are on ",
              device);
  return t.to(at::kFloat).contiguous();
}

// The per-row inputs of token_logprobs_bwd (CPU and CUDA): lse and grad_logp always; entropy and
// grad_entropy only with an entropy gradient (else undefined: the kernels take nullptr).
struct TokenBwdRows {
  at::Tensor lse, grad_logp, entropy, grad_entropy;
};

inline TokenBwdRows token_bwd_rows(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& entropy,
                                   const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                   const char* op) {
  TokenBwdRows r;
  const int64_t N = logits.size(0);
  r.lse = rows_f32(lse, N, logits.device(), "lse", op);
  r.grad_logp = rows_f32(grad_logp, N, logits.device(), "grad_logp", op);
  if (grad_entropy.has_value() && grad_entropy->defined()) {
    r.grad_entropy = rows_f32(*grad_entropy, N, logits.device(), "grad_entropy", op);
    r.entropy = rows_f32(entropy, N, logits.device(), "entropy (the forward ran without return_entropy?)", op);
  }
  return r;
}

}  // namespace flowrl
