// CUDA implementations of flowrl_kernels_native::token_logprobs_{fwd,bwd}: checks, allocation, the
// current stream and device, then the raw-pointer launchers of csrc/cuda/token_logprobs.cu.
// Compiled only when torch has CUDA and nvcc is found (CMakeLists.txt, FLOWRL_WITH_CUDA).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "common.h"
#include "cuda/token_logprobs.h"

namespace flowrl {
namespace {

using at::Tensor;

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return flowrl_cuda::kF32;
    case at::kBFloat16: return flowrl_cuda::kBF16;
    default: return flowrl_cuda::kF16;  // check_token_inputs allows only these three
  }
}

int sm_count(int device) {  // cached: the launch heuristic reads it on every call
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device));
  }
  return cache[device];
}

std::tuple<Tensor, Tensor, Tensor> token_logprobs_fwd_cuda(const Tensor& logits, const Tensor& labels,
                                                          double temperature, bool return_entropy,
                                                          int64_t ignore_index) {
  const char* op = "flowrl_kernels_native.token_logprobs_fwd";
  check_token_inputs(logits, labels, temperature, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = out_empty({N}, opts), lse = out_empty({N}, opts);
  Tensor ent = out_empty({return_entropy ? N : 0}, opts);
  if (N == 0) return {logp, lse, ent};
  const int dt = dtype_code(logits), sms = sm_count(logits.get_device());
  const size_t ws_bytes = flowrl_cuda::token_logprobs_fwd_workspace_bytes(N, V, dt, sms);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  C10_CUDA_CHECK(flowrl_cuda::token_logprobs_fwd(
      logits.const_data_ptr(), dt, logits.stride(0), labels.const_data_ptr<int64_t>(), labels.stride(0), N, V,
      static_cast<float>(1.0 / temperature), ignore_index, logp.mutable_data_ptr<float>(),
      lse.mutable_data_ptr<float>(), return_entropy ? ent.mutable_data_ptr<float>() : nullptr,
      ws_bytes ? ws.mutable_data_ptr() : nullptr, sms, c10::cuda::getCurrentCUDAStream().stream()));
  return {logp, lse, ent};
}

Tensor token_logprobs_bwd_cuda(const Tensor& logits, const Tensor& labels, const Tensor& lse,
                               const Tensor& entropy, const Tensor& grad_logp,
                               const std::optional<Tensor>& grad_entropy, double temperature,
                               int64_t ignore_index) {
  const char* op = "flowrl_kernels_native.token_logprobs_bwd";
  check_token_inputs(logits, labels, temperature, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  Tensor grad = out_empty({N, V}, logits.options());
  if (N == 0) return grad;
  // lse, grad_logp, entropy, grad_entropy: shape, float dtype and device checked (not only labels)
  const TokenBwdRows r = token_bwd_rows(logits, lse, entropy, grad_logp, grad_entropy, op);
  C10_CUDA_CHECK(flowrl_cuda::token_logprobs_bwd(
      logits.const_data_ptr(), dtype_code(logits), logits.stride(0), labels.const_data_ptr<int64_t>(),
      labels.stride(0), N, V, static_cast<float>(1.0 / temperature), ignore_index,
      r.lse.const_data_ptr<float>(), r.entropy.defined() ? r.entropy.const_data_ptr<float>() : nullptr,
      r.grad_logp.const_data_ptr<float>(), r.grad_entropy.defined() ? r.grad_entropy.const_data_ptr<float>() : nullptr,
      grad.mutable_data_ptr(), sm_count(logits.get_device()), c10::cuda::getCurrentCUDAStream().stream()));
  return grad;
}

}  // namespace
}  // namespace flowrl

TORCH_LIBRARY_IMPL(flowrl_kernels_native, CUDA, m) {
  m.impl("token_logprobs_fwd", &flowrl::token_logprobs_fwd_cuda);
  m.impl("token_logprobs_bwd", &flowrl::token_logprobs_bwd_cuda);
}
