// CUDA token log-probs (+ entropy): forward and backward. See token_logprobs.h for the API.
//
// Forward: grid (N rows, S splits), 256 threads. Each thread streams 16-byte vectors (8 bf16/fp16 or
// 4 fp32) of its split and keeps an online triple in base 2,
//   m = max y,  s = sum 2^(y - m),  w = sum (y - m) 2^(y - m),     y = x * log2(e) / T,
// rescaled once per vector (one exp2 per element). Triples merge by warp shuffles, then across the 8
// warps through shared memory; with S > 1 each split writes its triple to the workspace and a merge
// kernel (one warp per row) combines them. Outputs (nats):
//   lse = ln2 (m + log2 s),  logp = ln2 (y_label - m - log2 s),  H = ln2 (log2 s - w / s).
// Rows go on grid.x (up to 2^31 - 1; grid.y caps at 65535), splits on grid.y.
//
// Backward: grid (N, S), one read of the logits and one write of the gradient per element:
//   u = x / T - lse,  p = e^u,  g = p (A + B u) + [j == label] g_logp / T,
//   A = -(g_logp + g_H H) / T,  B = -g_H / T.
// 16-byte loads follow the input's alignment; stores are 16-byte too when the output row has the same
// alignment (any contiguous input), else element-wise.
#include "token_logprobs.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace flowrl_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// 2^-300 is 0 in float32 (below 2^-149): clamping exponents there changes no probability but keeps
// (y - m) * 2^(y - m) and B * u finite for -inf logits (0 * -inf would be NaN)
constexpr float kMinExp2 = -300.f;
constexpr float kMinExpE = -200.f;

template <typename T> struct Elem;
template <> struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};
template <> struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <typename T>
union Pack {  // one 16-byte vector
  uint4 raw;
  T v[Elem<T>::kVec];
};

struct Acc {
  float m, s, w;
};

__device__ __forceinline__ Acc acc_empty() { return Acc{-INFINITY, 0.f, 0.f}; }

// NaN-propagating max and lower clamp (fmaxf drops NaN; a NaN logit must give NaN outputs, as in torch)
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float clamp_lo(float a, float lo) { return a < lo ? lo : a; }

// fold values y[0..K) into a (m only grows; one exp2 per value, one more when the max grows)
template <int K>
__device__ __forceinline__ void acc_add(Acc& a, const float (&y)[K]) {
  float lm = y[0];
#pragma unroll
  for (int i = 1; i < K; ++i) lm = nan_max(y[i], lm);
  if (lm != lm) {  // NaN: poison the sums (merges and later adds keep it)
    a.s = NAN;
    return;
  }
  if (lm > a.m) {
    if (a.s > 0.f) {
      const float d = a.m - lm, f = exp2f(d);
      a.w = (a.w + d * a.s) * f;
      a.s *= f;
    }
    a.m = lm;
  }
  if (a.m == -INFINITY) return;  // every value so far is -inf: nothing to add
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float d = clamp_lo(y[i] - a.m, kMinExp2), e = exp2f(d);
    a.s += e;
    a.w = fmaf(d, e, a.w);
  }
}

__device__ __forceinline__ Acc acc_merge(const Acc& a, const Acc& b) {
  if (b.s == 0.f) return a;  // an empty side (m = -inf) would make (m - M) s = -inf * 0 = NaN
  if (a.s == 0.f) return b;  // a NaN s is not 0 and propagates through the general case
  const float M = fmaxf(a.m, b.m), da = a.m - M, db = b.m - M;
  const float fa = exp2f(da), fb = exp2f(db);
  return Acc{M, a.s * fa + b.s * fb, (a.w + da * a.s) * fa + (b.w + db * b.s) * fb};
}

__device__ __forceinline__ Acc warp_merge(Acc a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Acc b{__shfl_xor_sync(0xffffffffu, a.m, off), __shfl_xor_sync(0xffffffffu, a.s, off),
          __shfl_xor_sync(0xffffffffu, a.w, off)};
    a = acc_merge(a, b);
  }
  return a;
}

// elements before the first 16-byte boundary of a row, and the number of whole vectors after it
template <typename T>
__device__ __forceinline__ void row_split(const T* row, int64_t V, int64_t& head, int64_t& nvec) {
  constexpr int kVec = Elem<T>::kVec;
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(T));
  head = (kVec - mis) % kVec;
  if (head > V) head = V;
  nvec = (V - head) / kVec;
}

template <typename T>
__device__ __forceinline__ void finalize(const T* row, int64_t i, int64_t V, int64_t label, int64_t ignore_index,
                                         float scale, const Acc& a, float* logp, float* lse, float* entropy) {
  const float log2s = log2f(a.s);
  lse[i] = kLn2 * (a.m + log2s);
  if (label == ignore_index) {
    logp[i] = 0.f;
    if (entropy) entropy[i] = 0.f;
    return;
  }
  // label == V: the target is in another vocab shard: logp NaN, entropy as usual
  const bool ok = label >= 0 && label < V;
  const float yl = ok ? Elem<T>::to_float(row[label]) * scale : NAN;
  logp[i] = kLn2 * ((yl - a.m) - log2s);
  if (entropy) entropy[i] = (ok || label == V) ? kLn2 * (log2s - a.w / a.s) : NAN;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_logprobs_fwd_kernel(
    // data ptrs
    const T* __restrict__ logits, const int64_t* __restrict__ labels, float* __restrict__ logp,
    float* __restrict__ lse, float* __restrict__ entropy, Acc* __restrict__ partial,
    // shapes
    int64_t V, float scale, int64_t ignore_index,
    // strides
    int64_t row_stride, int64_t label_stride) {
  constexpr int kVec = Elem<T>::kVec;
  const int64_t i = blockIdx.x;
  const int split = blockIdx.y, nsplit = gridDim.y;
  const T* row = logits + i * row_stride;
  int64_t head, nvec;
  row_split(row, V, head, nvec);
  const int64_t per = (nvec + nsplit - 1) / nsplit;
  const int64_t v0 = split * per, v1 = min(nvec, v0 + per);

  Acc a = acc_empty();
  const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
  for (int64_t v = v0 + threadIdx.x; v < v1; v += kThreads) {
    Pack<T> p;
    p.raw = __ldg(vrow + v);
    float y[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) y[k] = Elem<T>::to_float(p.v[k]) * scale;
    acc_add<kVec>(a, y);
  }
  // unaligned head (split 0) and tail (last split): fewer than kVec elements each
  if (split == 0 && threadIdx.x < head) {
    const float y[1] = {Elem<T>::to_float(row[threadIdx.x]) * scale};
    acc_add<1>(a, y);
  }
  const int64_t tail0 = head + nvec * kVec;
  if (split == nsplit - 1 && tail0 + threadIdx.x < V) {
    const float y[1] = {Elem<T>::to_float(row[tail0 + threadIdx.x]) * scale};
    acc_add<1>(a, y);
  }

  __shared__ Acc smem[kWarps];
  a = warp_merge(a);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = a;
  __syncthreads();
  if (warp != 0) return;
  a = lane < kWarps ? smem[lane] : acc_empty();
  a = warp_merge(a);
  if (lane != 0) return;
  if (nsplit > 1) {
    partial[i * nsplit + split] = a;
  } else {
    finalize(row, i, V, labels[i * label_stride], ignore_index, scale, a, logp, lse, entropy);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_logprobs_merge_kernel(
    // data ptrs
    const T* __restrict__ logits, const int64_t* __restrict__ labels, const Acc* __restrict__ partial,
    float* __restrict__ logp, float* __restrict__ lse, float* __restrict__ entropy,
    // shapes
    int64_t N, int64_t V, int nsplit, float scale, int64_t ignore_index,
    // strides
    int64_t row_stride, int64_t label_stride) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;  // one warp per row
  const int lane = threadIdx.x % 32;
  if (i >= N) return;
  Acc a = acc_empty();
  for (int s = lane; s < nsplit; s += 32) a = acc_merge(a, partial[i * nsplit + s]);
  a = warp_merge(a);
  if (lane == 0) finalize(logits + i * row_stride, i, V, labels[i * label_stride], ignore_index, scale, a, logp, lse, entropy);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_logprobs_bwd_kernel(
    // data ptrs
    const T* __restrict__ logits, const int64_t* __restrict__ labels, const float* __restrict__ lse,
    const float* __restrict__ entropy, const float* __restrict__ grad_logp,
    const float* __restrict__ grad_entropy, T* __restrict__ grad,
    // shapes
    int64_t V, float inv_t, int64_t ignore_index,
    // strides
    int64_t row_stride, int64_t label_stride) {
  constexpr int kVec = Elem<T>::kVec;
  const int64_t i = blockIdx.x;
  const int split = blockIdx.y, nsplit = gridDim.y;
  const T* row = logits + i * row_stride;
  T* out = grad + i * V;
  const int64_t label = labels[i * label_stride];
  const bool ignored = label == ignore_index;
  float A = 0.f, B = 0.f, l = 0.f, gl = 0.f;
  if (!ignored) {
    gl = grad_logp[i];
    const float ge = grad_entropy ? grad_entropy[i] : 0.f;
    const float geh = ge != 0.f ? ge * entropy[i] : 0.f;  // a NaN entropy must not poison dlogp
    A = -inv_t * (gl + geh);
    B = -inv_t * ge;
    // label == V: the target is in another vocab shard (no [j == label] term here); other labels
    // outside [0, V] give NaN, never a number
    l = (label >= 0 && label <= V) ? lse[i] : NAN;
  }
  auto grad_of = [&](float x, int64_t j) {
    if (ignored) return 0.f;
    const float u = clamp_lo(fmaf(x, inv_t, -l), kMinExpE);
    const float g = exp2f(u * kLog2e) * fmaf(B, u, A);
    return j == label ? g + inv_t * gl : g;
  };

  int64_t head, nvec, ohead, onvec;
  row_split(row, V, head, nvec);
  row_split(static_cast<const T*>(out), V, ohead, onvec);
  const bool vec_store = head == ohead;
  const int64_t per = (nvec + nsplit - 1) / nsplit;
  const int64_t v0 = split * per, v1 = min(nvec, v0 + per);
  const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
  uint4* vout = reinterpret_cast<uint4*>(out + head);
  for (int64_t v = v0 + threadIdx.x; v < v1; v += kThreads) {
    Pack<T> p;
    p.raw = __ldg(vrow + v);
    const int64_t j0 = head + v * kVec;
#pragma unroll
    for (int k = 0; k < kVec; ++k) p.v[k] = Elem<T>::from_float(grad_of(Elem<T>::to_float(p.v[k]), j0 + k));
    if (vec_store) {
      vout[v] = p.raw;
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[j0 + k] = p.v[k];
    }
  }
  if (split == 0 && threadIdx.x < head) {
    const int64_t j = threadIdx.x;
    out[j] = Elem<T>::from_float(grad_of(Elem<T>::to_float(row[j]), j));
  }
  const int64_t j = head + nvec * kVec + threadIdx.x;
  if (split == nsplit - 1 && j < V) out[j] = Elem<T>::from_float(grad_of(Elem<T>::to_float(row[j]), j));
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int vec_of(int dtype) { return dtype == kF32 ? 4 : 8; }

// Splits per row: enough blocks to fill the GPU (8 per SM of 256 threads) but at least 2 vectors
// per thread per split, so a split never drowns in its merge cost.
int num_splits(int64_t N, int64_t V, int dtype, int num_sms) {
  const int64_t target = 8 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132);
  const int64_t by_work = cdiv(V, static_cast<int64_t>(kThreads) * vec_of(dtype) * 2);
  const int64_t s = std::min(cdiv(target, std::max<int64_t>(N, 1)), by_work);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(s, 65535)));
}

template <typename T>
cudaError_t fwd_typed(const void* logits, int64_t row_stride, const int64_t* labels, int64_t label_stride,
                      int64_t N, int64_t V, float inv_temp, int64_t ignore_index, float* logp, float* lse,
                      float* entropy, void* workspace, int nsplit, cudaStream_t stream) {
  const float scale = inv_temp * kLog2e;
  const T* x = static_cast<const T*>(logits);
  Acc* partial = static_cast<Acc*>(workspace);
  token_logprobs_fwd_kernel<T><<<dim3(static_cast<unsigned>(N), nsplit), kThreads, 0, stream>>>(
      x, labels, logp, lse, entropy, partial, V, scale, ignore_index, row_stride, label_stride);
  if (nsplit > 1) {
    token_logprobs_merge_kernel<T><<<static_cast<unsigned>(cdiv(N, kWarps)), kThreads, 0, stream>>>(
        x, labels, partial, logp, lse, entropy, N, V, nsplit, scale, ignore_index, row_stride, label_stride);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* logits, int64_t row_stride, const int64_t* labels, int64_t label_stride,
                      int64_t N, int64_t V, float inv_temp, int64_t ignore_index, const float* lse,
                      const float* entropy, const float* grad_logp, const float* grad_entropy, void* grad,
                      int nsplit, cudaStream_t stream) {
  token_logprobs_bwd_kernel<T><<<dim3(static_cast<unsigned>(N), nsplit), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), labels, lse, entropy, grad_logp, grad_entropy, static_cast<T*>(grad), V,
      inv_temp, ignore_index, row_stride, label_stride);
  return cudaGetLastError();
}

}  // namespace

size_t token_logprobs_fwd_workspace_bytes(int64_t N, int64_t V, int dtype, int num_sms) {
  const int s = num_splits(N, V, dtype, num_sms);
  return s > 1 ? static_cast<size_t>(N) * s * sizeof(Acc) : 0;
}

cudaError_t token_logprobs_fwd(const void* logits, int dtype, int64_t row_stride, const int64_t* labels,
                               int64_t label_stride, int64_t N, int64_t V, float inv_temp,
                               int64_t ignore_index, float* logp, float* lse, float* entropy,
                               void* workspace, int num_sms, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > INT32_MAX || V < 1) return cudaErrorInvalidValue;
  const int s = num_splits(N, V, dtype, num_sms);
  if (s > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case kF32: return fwd_typed<float>(logits, row_stride, labels, label_stride, N, V, inv_temp, ignore_index, logp, lse, entropy, workspace, s, stream);
    case kBF16: return fwd_typed<__nv_bfloat16>(logits, row_stride, labels, label_stride, N, V, inv_temp, ignore_index, logp, lse, entropy, workspace, s, stream);
    case kF16: return fwd_typed<__half>(logits, row_stride, labels, label_stride, N, V, inv_temp, ignore_index, logp, lse, entropy, workspace, s, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t token_logprobs_bwd(const void* logits, int dtype, int64_t row_stride, const int64_t* labels,
                               int64_t label_stride, int64_t N, int64_t V, float inv_temp,
                               int64_t ignore_index, const float* lse, const float* entropy,
                               const float* grad_logp, const float* grad_entropy, void* grad_logits,
                               int num_sms, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > INT32_MAX || V < 1) return cudaErrorInvalidValue;
  if (grad_entropy != nullptr && entropy == nullptr) return cudaErrorInvalidValue;
  const int s = num_splits(N, V, dtype, num_sms);
  switch (dtype) {
    case kF32: return bwd_typed<float>(logits, row_stride, labels, label_stride, N, V, inv_temp, ignore_index, lse, entropy, grad_logp, grad_entropy, grad_logits, s, stream);
    case kBF16: return bwd_typed<__nv_bfloat16>(logits, row_stride, labels, label_stride, N, V, inv_temp, ignore_index, lse, entropy, grad_logp, grad_entropy, grad_logits, s, stream);
    case kF16: return bwd_typed<__half>(logits, row_stride, labels, label_stride, N, V, inv_temp, ignore_index, lse, entropy, grad_logp, grad_entropy, grad_logits, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flowrl_cuda
