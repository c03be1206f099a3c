// Raw-pointer CPU kernels of flowrl_kernels._C. kernels.cpp is compiled once per CPU capability
// (DEFAULT, AVX2, AVX512: CMakeLists.txt), each copy in its own namespace; ops.cpp picks one at run
// time from at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY like ATen's own kernels.
#pragma once

#include <cstdint>

namespace flowrl {

// element type of a floating input/output; the math is always float32
enum class Dt : int { F32 = 0, BF16 = 1, F16 = 2 };

struct StridedIn {  // a [rows, cols] input: element (r, c) at ptr + r * s0 + c * s1 (in elements)
  const void* ptr;
  Dt dt;
  int64_t s0, s1;
};

struct CpuKernels {
  // logits [N, V] (row stride `row_stride`, unit column stride), labels [N] (stride `label_stride`).
  // Writes logp, lse [N] and entropy [N] when `entropy` is non-null.
  void (*token_logprobs_fwd)(const void* logits, Dt dt, int64_t row_stride, const int64_t* labels,
                             int64_t label_stride, int64_t N, int64_t V, float inv_temp,
                             int64_t ignore_index, float* logp, float* lse, float* entropy);
  // grad_logits [N, V] contiguous in dtype `dt`. entropy / grad_entropy may be null (no entropy term).
  void (*token_logprobs_bwd)(const void* logits, Dt dt, int64_t row_stride, const int64_t* labels,
                             int64_t label_stride, int64_t N, int64_t V, float inv_temp,
                             int64_t ignore_index, const float* lse, const float* entropy,
                             const float* grad_logp, const float* grad_entropy, void* grad_logits);
  // [B, T] inputs; mask is bool (mask_is_bool) or float32; log_z, rewards contiguous float32 [B].
  // out = {per_seq, delta, weight, clipped, lp_bar, ref_bar, length}, each contiguous float32 [B].
  void (*flowrl_loss_fwd)(StridedIn logp, StridedIn old_logp, StridedIn ref_logp, const float* log_z,
                          const float* rewards, const void* mask, bool mask_is_bool, int64_t mask_s0,
                          int64_t mask_s1, int64_t B, int64_t T, float beta, int64_t importance,
                          float log_lo, float log_hi, float* const out[7]);
  // grad_logp [B, T] contiguous in dtype `dt`; grad_log_z [B] float32. Inputs contiguous float32 [B].
  void (*flowrl_loss_bwd)(const float* grad_per_seq, const float* delta, const float* weight,
                          const float* length, const void* mask, bool mask_is_bool, int64_t mask_s0,
                          int64_t mask_s1, int64_t B, int64_t T, Dt dt, void* grad_logp,
                          float* grad_log_z);
};

namespace DEFAULT { const CpuKernels& kernels(); }
namespace AVX2 { const CpuKernels& kernels(); }
namespace AVX512 { const CpuKernels& kernels(); }

}  // namespace flowrl
