// Launcher API of the CUDA token_logprobs kernels (token_logprobs.cu). Plain CUDA C++: no torch
// headers, so the kernels compile with nvcc alone (tests/test_native.py compiles them for sm_90 on
// machines without a GPU); csrc/cuda_bindings.cpp adapts torch tensors to these calls.
//
// Layout: logits [N, V], element (i, j) at logits + i * row_stride + j; labels [N] int64 at
// labels + i * label_stride. Outputs are contiguous: logp, lse, entropy float32 [N]; grad_logits [N, V]
// in the logits dtype. A label outside [0, V) that is not ignore_index gives NaN (no out-of-bounds read).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace flowrl_cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// blocks each row is split across in the forward (1 = no merge step), and the workspace that needs
size_t token_logprobs_fwd_workspace_bytes(int64_t N, int64_t V, int dtype, int num_sms);

// entropy may be null (not computed); workspace: token_logprobs_fwd_workspace_bytes(...) bytes.
cudaError_t token_logprobs_fwd(const void* logits, int dtype, int64_t row_stride, const int64_t* labels,
                               int64_t label_stride, int64_t N, int64_t V, float inv_temp,
                               int64_t ignore_index, float* logp, float* lse, float* entropy,
                               void* workspace, int num_sms, cudaStream_t stream);

// entropy and grad_entropy may be null (no entropy gradient).
cudaError_t token_logprobs_bwd(const void* logits, int dtype, int64_t row_stride, const int64_t* labels,
                               int64_t label_stride, int64_t N, int64_t V, float inv_temp,
                               int64_t ignore_index, const float* lse, const float* entropy,
                               const float* grad_logp, const float* grad_entropy, void* grad_logits,
                               int num_sms, cudaStream_t stream);

}  // namespace flowrl_cuda
