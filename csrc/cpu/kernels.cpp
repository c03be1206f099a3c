// CPU kernels: token log-probs (+ entropy) forward / backward and the FlowRL loss forward / backward.
// Compiled once per CPU capability (CPU_CAPABILITY = DEFAULT | AVX2 | AVX512, see CMakeLists.txt):
// at::vec::Vectorized<float> is 8 lanes under AVX2, 16 under AVX512, a plain array under DEFAULT.
//
// token_logprobs forward, per row: ONE pass over memory. The row is cut into chunks of kChunk
// elements (8 KiB of fp32, 4 KiB of bf16: they stay in L1); each chunk is swept twice from L1, first
// for its max, then for exp(z - m) and (z - m) exp(z - m), so there is one exp per element and the
// running sums are rescaled at most once per chunk, only when the max grows:
//   m = max z,  S = sum e^(z - m),  W = sum (z - m) e^(z - m),   z = x / T
//   lse = m + log S,  logp = (z_label - m) - log S,  H = log S - W / S.
// Backward, per row: one read of the logits and one write of the gradient:
//   u = z - lse,  p = e^u,  dlogits = p * (A + B u)  (+ g_logp / T at the label)
//   A = -(g_logp + g_H H) / T,  B = -g_H / T        [dH/dz = -p (u + H)]
#include "cpu/kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace flowrl {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;

constexpr int64_t kChunk = 2048;
// exp(-200) is 0 in float32 (anything below -103.97 is), so clamping z - m (or z - lse) at -200
// changes no probability but keeps u * e and B * u finite for -inf logits (0 * -inf would be NaN).
constexpr float kMinExponent = -200.f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Loads W consecutive elements as two float vectors (W = 2 * fVec::size() for every element type).
template <typename T>
struct Io {
  static constexpr int64_t W = Vectorized<T>::size();
  static_assert(W == 2 * fVec::size(), "a reduced-precision vector must widen to two float vectors");
  static inline void load(const T* p, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  static inline void store(T* p, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
};
template <>
struct Io<float> {
  static constexpr int64_t W = 2 * fVec::size();
  static inline void load(const float* p, fVec& a, fVec& b) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + fVec::size());
  }
  static inline void store(float* p, const fVec& a, const fVec& b) {
    a.store(p);
    b.store(p + fVec::size());
  }
};

// kRoundedZ: z = x / T is rounded to fp32 once, and every exponent is (rounded z) - m or - lse, never
// fma(x, 1 / T, -m). m is the rounded max z, so the max entry's exponent is exactly 0 (as in torch's
// softmax); an fma kept the rounding residual of z instead (up to ulp(|z|) / 2), which the backward,
// against the fp32-rounded lse, turned into a relative error of ~|z| 2^-24 in p: 4e-4 of the gradient at
// |z| = 1e4 (T = 1e-4, unit logits) where torch is exact. The build passes -ffp-contract=off
// (CMakeLists.txt) so the compiler does not contract a * b + c into an fma behind our back.
template <typename T>
inline float scaled(T x, float inv_t) { return static_cast<float>(x) * inv_t; }

// max that propagates NaN (like torch.max), for the scalar tails
inline float nan_max(float a, float b) { return (a > b || std::isnan(a)) ? a : b; }

inline float reduce_max(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return at::vec::maximum(x, y); }, v);
}
inline float reduce_sum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, v);
}

template <typename T>
void token_logprobs_fwd_rows(const T* logits, int64_t row_stride, const int64_t* labels,
                             int64_t label_stride, int64_t begin, int64_t end, int64_t V,
                             float inv_t, int64_t ignore_index, float* logp_out, float* lse_out,
                             float* ent_out) {
  constexpr int64_t W = Io<T>::W;
  const fVec vinv(inv_t), vmin(kMinExponent);
  for (int64_t i = begin; i < end; ++i) {
    const T* x = logits + i * row_stride;
    const int64_t label = labels[i * label_stride];
    const bool valid = label != ignore_index;
    // label == V: the target is in another vocab shard (tensor-parallel vocab): lse and entropy as
    // usual, logp NaN (the caller takes the target logit from the shard that holds it). Any other label
    // outside [0, V) poisons the row (NaN logp, lse, entropy), as the CUDA and Triton kernels do: the
    // Python layer checks CPU labels, so only a direct or traced (torch.compile) call gets here.
    const bool bad = valid && (label < 0 || label > V);
    float m = -kInf;      // running max of z
    double S = 0., Wz = 0.;  // sum e^(z-m), sum (z-m) e^(z-m): across-chunk totals in double
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const T* xc = x + c0;
      const int64_t n = std::min(kChunk, V - c0);
      // sweep 1: chunk max (of x; T > 0 so max z = max x / T)
      fVec mx0(-kInf), mx1(-kInf), a, b;
      int64_t j = 0;
      for (; j + W <= n; j += W) {
        Io<T>::load(xc + j, a, b);
        mx0 = at::vec::maximum(mx0, a);
        mx1 = at::vec::maximum(mx1, b);
      }
      float cmax = reduce_max(at::vec::maximum(mx0, mx1));
      for (int64_t k = j; k < n; ++k) cmax = nan_max(cmax, static_cast<float>(xc[k]));
      const float cm = cmax * inv_t;
      if (cm == -kInf) continue;  // an all -inf chunk adds e^-inf = 0 to every sum
      if (!(cm <= m)) {           // the max grew (or is NaN, which then propagates to every output)
        if (S > 0.) {
          const double d = static_cast<double>(m) - cm, f = std::exp(d);
          Wz = (Wz + d * S) * f;
          S *= f;
        }
        m = cm;
      }
      // sweep 2 (from L1): e = exp(z - m), accumulate e and (z - m) e
      const fVec vnm(-m);
      fVec s0(0.f), s1(0.f), w0(0.f), w1(0.f);
      for (j = 0; j + W <= n; j += W) {
        Io<T>::load(xc + j, a, b);
        const fVec za = at::vec::maximum(a * vinv + vnm, vmin);  // z rounded, then - m: see kRoundedZ
        const fVec zb = at::vec::maximum(b * vinv + vnm, vmin);
        const fVec ea = za.exp(), eb = zb.exp();
        s0 = s0 + ea;
        s1 = s1 + eb;
        w0 = at::vec::fmadd(za, ea, w0);
        w1 = at::vec::fmadd(zb, eb, w1);
      }
      float st = reduce_sum(s0 + s1), wt = reduce_sum(w0 + w1);
      for (; j < n; ++j) {
        const float z = std::max(scaled(xc[j], inv_t) - m, kMinExponent);
        const float e = std::exp(z);
        st += e;
        wt += z * e;
      }
      S += st;
      Wz += wt;
    }
    constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
    const double logS = bad ? kNaN : std::log(S);
    lse_out[i] = static_cast<float>(m + logS);
    if (valid) {
      const double zl = label >= 0 && label < V ? static_cast<double>(scaled(x[label], inv_t) - m) : kNaN;
      logp_out[i] = static_cast<float>(zl - logS);
      if (ent_out) ent_out[i] = static_cast<float>(logS - Wz / S);
    } else {
      logp_out[i] = 0.f;
      if (ent_out) ent_out[i] = 0.f;
    }
  }
}

template <typename T>
void token_logprobs_bwd_rows(const T* logits, int64_t row_stride, const int64_t* labels,
                             int64_t label_stride, int64_t begin, int64_t end, int64_t V,
                             float inv_t, int64_t ignore_index, const float* lse,
                             const float* entropy, const float* grad_logp,
                             const float* grad_entropy, T* grad) {
  constexpr int64_t W = Io<T>::W;
  const fVec vinv(inv_t), vmin(kMinExponent), vzero(0.f);
  for (int64_t i = begin; i < end; ++i) {
    const T* x = logits + i * row_stride;
    T* g = grad + i * V;
    const int64_t label = labels[i * label_stride];
    int64_t j = 0;
    if (label == ignore_index) {
      for (; j + W <= V; j += W) Io<T>::store(g + j, vzero, vzero);
      for (; j < V; ++j) g[j] = T(0.f);
      continue;
    }
    // label == V: the target is in another vocab shard, so no [j == label] term in this one; any other
    // label outside [0, V) gives a NaN row (through l), never an out-of-bounds write
    const bool bad = label < 0 || label > V;
    const float gl = grad_logp[i];
    const float ge = grad_entropy ? grad_entropy[i] : 0.f;
    // skip H entirely without an entropy gradient: a NaN entropy must not poison dlogp
    const float geh = ge != 0.f ? ge * entropy[i] : 0.f;
    const float A = -inv_t * (gl + geh), B = -inv_t * ge;
    const float l = bad ? std::numeric_limits<float>::quiet_NaN() : lse[i];
    const fVec vA(A), vB(B), vnl(-l);
    fVec a, b;
    for (; j + W <= V; j += W) {
      Io<T>::load(x + j, a, b);
      const fVec ua = at::vec::maximum(a * vinv + vnl, vmin);
      const fVec ub = at::vec::maximum(b * vinv + vnl, vmin);
      Io<T>::store(g + j, ua.exp() * at::vec::fmadd(vB, ua, vA), ub.exp() * at::vec::fmadd(vB, ub, vA));
    }
    for (; j < V; ++j) {
      const float u = std::max(scaled(x[j], inv_t) - l, kMinExponent);
      g[j] = T(std::exp(u) * std::fma(B, u, A));
    }
    // the label's entry, recomputed in float and rounded once
    if (label >= 0 && label < V) {
      const float u = std::max(scaled(x[label], inv_t) - l, kMinExponent);
      g[label] = T(std::fma(std::exp(u), std::fma(B, u, A), inv_t * gl));
    }
  }
}

// ~32K elements per task: enough work to amortize a thread hand-off, small rows are batched
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

template <typename F>
void dispatch_dt(Dt dt, F&& f) {
  switch (dt) {
    case Dt::F32: return f(float{});
    case Dt::BF16: return f(c10::BFloat16{});
    case Dt::F16: return f(c10::Half{});
  }
}

void token_logprobs_fwd(const void* logits, Dt dt, int64_t row_stride, const int64_t* labels,
                        int64_t label_stride, int64_t N, int64_t V, float inv_temp,
                        int64_t ignore_index, float* logp, float* lse, float* entropy) {
  dispatch_dt(dt, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      token_logprobs_fwd_rows<T>(static_cast<const T*>(logits), row_stride, labels, label_stride,
                                 begin, end, V, inv_temp, ignore_index, logp, lse, entropy);
    });
  });
}

void token_logprobs_bwd(const void* logits, Dt dt, int64_t row_stride, const int64_t* labels,
                        int64_t label_stride, int64_t N, int64_t V, float inv_temp,
                        int64_t ignore_index, const float* lse, const float* entropy,
                        const float* grad_logp, const float* grad_entropy, void* grad_logits) {
  dispatch_dt(dt, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      token_logprobs_bwd_rows<T>(static_cast<const T*>(logits), row_stride, labels, label_stride,
                                 begin, end, V, inv_temp, ignore_index, lse, entropy, grad_logp,
                                 grad_entropy, static_cast<T*>(grad_logits));
    });
  });
}

// ---------------------------------------------------------------------------------------------------
// FlowRL loss: O(B T) work, one task per block of rows; sums in double (the reference sums in fp32).
// ---------------------------------------------------------------------------------------------------
inline float load(const void* p, Dt dt, int64_t off) {
  switch (dt) {
    case Dt::F32: return static_cast<const float*>(p)[off];
    case Dt::BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[off]);
    case Dt::F16: return static_cast<float>(static_cast<const c10::Half*>(p)[off]);
  }
  return 0.f;
}
inline float load(const StridedIn& t, int64_t r, int64_t c) { return load(t.ptr, t.dt, r * t.s0 + c * t.s1); }
inline float load_mask(const void* mask, bool is_bool, int64_t off) {
  return is_bool ? (static_cast<const bool*>(mask)[off] ? 1.f : 0.f) : static_cast<const float*>(mask)[off];
}

void flowrl_loss_fwd(StridedIn logp, StridedIn old_logp, StridedIn ref_logp, const float* log_z,
                     const float* rewards, const void* mask, bool mask_is_bool, int64_t mask_s0,
                     int64_t mask_s1, int64_t B, int64_t T, float beta, int64_t importance,
                     float log_lo, float log_hi, float* const out[7]) {
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double L = 0., slp = 0., sref = 0., sdiff = 0.;
      for (int64_t t = 0; t < T; ++t) {
        const float m = load_mask(mask, mask_is_bool, b * mask_s0 + t * mask_s1);
        if (m == 0.f) continue;  // masked values never leak in, even inf / NaN ones
        const float lp = load(logp, b, t);
        L += m;
        slp += static_cast<double>(m) * lp;
        sref += static_cast<double>(m) * load(ref_logp, b, t);
        if (importance != 0) sdiff += static_cast<double>(m) * (lp - load(old_logp, b, t));
      }
      const bool valid = L != 0.;
      const double lp_bar = valid ? slp / L : 0., ref_bar = valid ? sref / L : 0.;
      const float delta = static_cast<float>(log_z[b] + lp_bar - static_cast<double>(beta) * rewards[b] - ref_bar);
      float w = valid ? 1.f : 0.f, clipped = 0.f;
      if (importance != 0 && valid) {
        const float logr = static_cast<float>(importance == 2 ? sdiff / L : sdiff);
        clipped = (logr < log_lo || logr > log_hi) ? 1.f : 0.f;
        w = std::exp(std::min(std::max(logr, log_lo), log_hi));  // NaN stays NaN (x first)
      }
      out[0][b] = w * delta * delta;
      out[1][b] = delta;
      out[2][b] = w;
      out[3][b] = clipped;
      out[4][b] = static_cast<float>(lp_bar);
      out[5][b] = static_cast<float>(ref_bar);
      out[6][b] = static_cast<float>(L);
    }
  });
}

template <typename T>
void flowrl_loss_bwd_rows(const float* g, const float* delta, const float* weight, const float* length,
                          const void* mask, bool mask_is_bool, int64_t mask_s0, int64_t mask_s1,
                          int64_t b0, int64_t b1, int64_t T_, T* grad_logp, float* grad_log_z) {
  for (int64_t b = b0; b < b1; ++b) {
    const float gz = 2.f * g[b] * weight[b] * delta[b];
    grad_log_z[b] = gz;
    const float L = length[b];
    const float scale = L != 0.f ? gz / L : 0.f;
    T* out = grad_logp + b * T_;
    for (int64_t t = 0; t < T_; ++t) {
      const float m = load_mask(mask, mask_is_bool, b * mask_s0 + t * mask_s1);
      out[t] = T(m != 0.f ? scale * m : 0.f);
    }
  }
}

void flowrl_loss_bwd(const float* grad_per_seq, const float* delta, const float* weight,
                     const float* length, const void* mask, bool mask_is_bool, int64_t mask_s0,
                     int64_t mask_s1, int64_t B, int64_t T, Dt dt, void* grad_logp, float* grad_log_z) {
  dispatch_dt(dt, [&](auto tag) {
    using E = decltype(tag);
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
      flowrl_loss_bwd_rows<E>(grad_per_seq, delta, weight, length, mask, mask_is_bool, mask_s0, mask_s1,
                              b0, b1, T, static_cast<E*>(grad_logp), grad_log_z);
    });
  });
}

}  // namespace

const CpuKernels& kernels() {
  static const CpuKernels k{token_logprobs_fwd, token_logprobs_bwd, flowrl_loss_fwd, flowrl_loss_bwd};
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace flowrl
