// CUDA kernels of the fused GRPO op family: log-probs (+ entropy) from logits in one read,
// their backward in one pass (optionally in place), and the per-token GRPO terms.
//
// No torch headers: raw pointers and sizes in, launchers out (see grpo_launchers.h). The
// math is grpo_math.h, shared with the CPU kernels.
//
// Layout of the row kernels (forward and backward alike): a "row group" of threads owns one
// row of logits.
//   * cols <= 4096:   one warp per row, 8 rows per 256-thread CTA (warp shuffles only);
//   * cols <= 32768:  one 128-thread CTA per row;
//   * wider rows:     one 512-thread CTA per row (V = 152,064 bf16: 19,008 16-byte vectors,
//                     ~37 per thread).
// Each row is split into a scalar head (up to the first 16-byte boundary), 16-byte vectors
// (ld.global.cs / st.global.cs: the logits are streamed once) and a scalar tail, so any V
// and any row alignment use 16-byte accesses for all but < 2 x 8 elements per row. Every
// thread keeps kUnroll vectors (64 B) in flight; at 2-4 resident 512-thread CTAs per SM that
// is 64-128 KB per SM, above the ~20-40 KB that saturates HBM3.
// Reductions: the forward's (max, sum, sum * z) state is combined by warp butterflies
// (every lane of the warp participates: trip counts differ only BEFORE the shuffles) and,
// for CTA rows, through shared memory. fp32 accumulation (fp64 for fp64 logits).
// Row offsets are 64-bit (rows * stride can exceed 2^31); offsets within a row are 32-bit
// (the host checks that a row has < 2^31 elements). Grids are never empty (the launchers
// return early) and have at most 2^31 - 1 CTAs (the host checks rows).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "tsparse/cuda_common.cuh"
#include "tsparse/grpo_launchers.h"
#include "tsparse/grpo_math.h"

namespace tsparse {
namespace cuda {
namespace {

using grpo::LseState;
using grpo::RowGrad;
using grpo::RowStats;

constexpr int kWarpRowThreads = 256;   // warp-per-row CTAs: 8 rows each
constexpr int kWarpRowMaxCols = 4096;  // up to 16 vectors per lane (bf16)
constexpr int kMidThreads = 128;
constexpr int kMidRowMaxCols = 32768;
constexpr int kWideThreads = 512;
constexpr int kUnroll = 4;             // 16-byte vectors in flight per thread
constexpr int kTokenThreads = 256;
constexpr int kTokenBlocksPerSm = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// Elem<T> (load/store with fp32 or fp64 accumulation): tsparse/cuda_common.cuh.

template <typename T>
union Vec16 {
  uint4 u;
  T e[16 / sizeof(T)];
};

// A row split into [0, head) scalars, nvec 16-byte vectors, [tail0, cols) scalars.
struct RowSplit {
  int head;
  int nvec;
  int tail0;
  int ntail;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void* row, int cols) {
  constexpr int kVec = 16 / int(sizeof(T));
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(row) & 15);
  int head = mis == 0 ? 0 : (16 - mis) / int(sizeof(T));  // row is element-aligned (host check)
  if (head > cols) head = cols;
  const int nvec = (cols - head) / kVec;
  const int tail0 = head + nvec * kVec;
  return {head, nvec, tail0, cols - tail0};
}

__device__ __noinline__ void fail_target(long long row, long long value, long long cols) {
  printf("tsparse.logprobs: `targets[%lld]` = %lld is out of range [0, %lld)\n", row, value, cols);
  TSPARSE_DEVICE_FAIL("tsparse.logprobs: a `targets` value is out of range");
}

// ---------------------------------------------------------------------------------------
// Reductions of the online log-sum-exp state.
template <typename Acc>
__device__ __forceinline__ LseState<Acc> warp_merge(LseState<Acc> s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    LseState<Acc> r;
    r.m = __shfl_xor_sync(kFullMask, s.m, o);
    r.a = __shfl_xor_sync(kFullMask, s.a, o);
    r.b = __shfl_xor_sync(kFullMask, s.b, o);
    s = grpo::lse_merge(s, r);
  }
  return s;
}

// Every thread of the CTA must call this (it contains __syncthreads). Returns the CTA's
// merged state to every thread.
template <typename Acc, int THREADS>
__device__ __forceinline__ LseState<Acc> cta_merge(LseState<Acc> s, LseState<Acc>* red /*[33]*/) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
  constexpr int kWarps = THREADS / 32;
  s = warp_merge(s);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (warp == 0) {
    LseState<Acc> r = lane < kWarps ? red[lane] : grpo::lse_empty<Acc>();
    r = warp_merge(r);  // all 32 lanes of warp 0 take part
    if (lane == 0) red[32] = r;
  }
  __syncthreads();
  return red[32];
}

// ---------------------------------------------------------------------------------------
// Forward.
template <typename T>
struct FwdParams {
  using Acc = typename Elem<T>::Acc;
  const T* logits;
  int64_t rows;
  int cols;
  int64_t stride;
  const int64_t* targets;
  Acc inv_temp;
  Acc* logp;
  Acc* row_max;
  Acc* log_norm;
  Acc* entropy;  // may be null
};

// This thread's partial state over its elements of the row.
template <typename T>
__device__ __forceinline__ LseState<typename Elem<T>::Acc> stream_row(const T* row, int cols,
                                                                      typename Elem<T>::Acc inv_temp,
                                                                      int lane, int group) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  constexpr int kVec = 16 / int(sizeof(T));
  LseState<Acc> st = grpo::lse_empty<Acc>();
  const RowSplit s = split_row<T>(row, cols);
  {
    // Scalar head and tail: fewer than kVec (<= 8 < 32 <= group) elements each.
    Acc z0 = grpo::neg_inf<Acc>();
    Acc z1 = grpo::neg_inf<Acc>();
    if (lane < s.head) z0 = E::load(row[lane]) * inv_temp;
    if (lane < s.ntail) z1 = E::load(row[s.tail0 + lane]) * inv_temp;
    grpo::lse_raise_max(st, grpo::max_acc(z0, z1));
    grpo::lse_add(st, z0);
    grpo::lse_add(st, z1);
  }
  const uint4* vp = reinterpret_cast<const uint4*>(row + s.head);  // 16-byte aligned
  for (int v0 = lane; v0 < s.nvec; v0 += group * kUnroll) {
    Vec16<T> pk[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (v0 + k * group < s.nvec) pk[k].u = __ldcs(vp + v0 + k * group);
    }
    Acc bm = grpo::neg_inf<Acc>();
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (v0 + k * group < s.nvec) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) bm = grpo::max_acc(bm, E::load(pk[k].e[e]) * inv_temp);
      }
    }
    grpo::lse_raise_max(st, bm);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (v0 + k * group < s.nvec) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) grpo::lse_add(st, E::load(pk[k].e[e]) * inv_temp);
      }
    }
  }
  return st;
}

template <typename T>
__device__ __forceinline__ void finish_forward(const FwdParams<T>& p, int64_t r, const T* row,
                                               int64_t t,
                                               const LseState<typename Elem<T>::Acc>& st) {
  using Acc = typename Elem<T>::Acc;
  if (t < 0 || t >= p.cols) fail_target(r, t, p.cols);
  const RowStats<Acc> rs = grpo::lse_finish(st);
  const Acc zt = Elem<T>::load(row[t]) * p.inv_temp;
  p.logp[r] = grpo::target_logp(zt, rs);
  p.row_max[r] = rs.row_max;
  p.log_norm[r] = rs.log_norm;
  if (p.entropy != nullptr) p.entropy[r] = rs.entropy;
}

template <typename T>
__global__ void __launch_bounds__(kWarpRowThreads) logprobs_fwd_warp_kernel(FwdParams<T> p) {
  const int64_t r = int64_t(blockIdx.x) * (kWarpRowThreads / 32) + (threadIdx.x >> 5);
  if (r >= p.rows) return;  // the whole warp leaves together; no CTA-wide barrier below
  const int lane = threadIdx.x & 31;
  const T* row = p.logits + r * p.stride;
  // The target is loaded before the row streams, so its latency hides behind the row.
  const int64_t t = lane == 0 ? p.targets[r] : 0;
  auto st = stream_row<T>(row, p.cols, p.inv_temp, lane, 32);
  st = warp_merge(st);
  if (lane == 0) finish_forward(p, r, row, t, st);
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) logprobs_fwd_cta_kernel(FwdParams<T> p) {
  using Acc = typename Elem<T>::Acc;
  __shared__ LseState<Acc> red[33];
  const int64_t r = blockIdx.x;  // grid == rows
  const T* row = p.logits + r * p.stride;
  const int64_t t = threadIdx.x == 0 ? p.targets[r] : 0;  // loaded early (see the warp kernel)
  auto st = stream_row<T>(row, p.cols, p.inv_temp, threadIdx.x, THREADS);
  st = cta_merge<Acc, THREADS>(st, red);
  if (threadIdx.x == 0) finish_forward(p, r, row, t, st);
}

// ---------------------------------------------------------------------------------------
// Backward.
template <typename T>
struct BwdParams {
  using Acc = typename Elem<T>::Acc;
  const T* logits;
  T* grad;  // may alias logits
  int64_t rows;
  int cols;
  int64_t lstride;
  int64_t gstride;
  const int64_t* targets;
  const Acc* row_max;
  const Acc* log_norm;
  const Acc* entropy;
  const Acc* g_logp;
  const Acc* g_ent;
  Acc inv_temp;
};

template <typename T>
__device__ __forceinline__ void zero_row(T* out, int cols, int lane, int group) {
  const RowSplit s = split_row<T>(out, cols);
  const T z = Elem<T>::store(typename Elem<T>::Acc(0));
  if (lane < s.head) out[lane] = z;
  if (lane < s.ntail) out[s.tail0 + lane] = z;
  uint4* vo = reinterpret_cast<uint4*>(out + s.head);
  for (int v = lane; v < s.nvec; v += group) __stcs(vo + v, make_uint4(0u, 0u, 0u, 0u));
}

template <typename T>
__device__ __forceinline__ void backward_row(const BwdParams<T>& p, int64_t r, int lane, int group) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  constexpr int kVec = 16 / int(sizeof(T));
  const int64_t t = p.targets[r];
  if (t < 0 || t >= p.cols) {
    if (lane == 0) fail_target(r, t, p.cols);
    return;
  }
  RowGrad<Acc> g;
  g.g_logp = p.g_logp != nullptr ? p.g_logp[r] : Acc(0);
  g.g_ent = p.g_ent != nullptr ? p.g_ent[r] : Acc(0);
  g.inv_temp = p.inv_temp;
  const T* in = p.logits + r * p.lstride;
  T* out = p.grad + r * p.gstride;
  if (g.zero()) {  // e.g. a masked token: write zeros, read nothing
    zero_row<T>(out, p.cols, lane, group);
    return;
  }
  g.row_max = p.row_max[r];
  g.log_norm = p.log_norm[r];
  g.mu = g.g_ent != Acc(0) ? g.log_norm - p.entropy[r] : Acc(0);
  const int tt = static_cast<int>(t);

  if (((reinterpret_cast<uintptr_t>(in) ^ reinterpret_cast<uintptr_t>(out)) & 15) != 0) {
    // Input and output rows sit at different offsets from a 16-byte boundary (a strided
    // logits view with an out-of-place gradient): element-wise.
    for (int j = lane; j < p.cols; j += group) out[j] = E::store(grpo::logit_grad(E::load(in[j]), j == tt, g));
    return;
  }
  const RowSplit s = split_row<T>(out, p.cols);
  if (lane < s.head) out[lane] = E::store(grpo::logit_grad(E::load(in[lane]), lane == tt, g));
  if (lane < s.ntail) {
    const int j = s.tail0 + lane;
    out[j] = E::store(grpo::logit_grad(E::load(in[j]), j == tt, g));
  }
  const uint4* vin = reinterpret_cast<const uint4*>(in + s.head);
  uint4* vout = reinterpret_cast<uint4*>(out + s.head);
  for (int v0 = lane; v0 < s.nvec; v0 += group * kUnroll) {
    Vec16<T> pk[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (v0 + k * group < s.nvec) pk[k].u = __ldcs(vin + v0 + k * group);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int v = v0 + k * group;
      if (v < s.nvec) {
        const int j0 = s.head + v * kVec;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          pk[k].e[e] = E::store(grpo::logit_grad(E::load(pk[k].e[e]), j0 + e == tt, g));
        }
        __stcs(vout + v, pk[k].u);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpRowThreads) logprobs_bwd_warp_kernel(BwdParams<T> p) {
  const int64_t r = int64_t(blockIdx.x) * (kWarpRowThreads / 32) + (threadIdx.x >> 5);
  if (r >= p.rows) return;
  backward_row<T>(p, r, threadIdx.x & 31, 32);
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) logprobs_bwd_cta_kernel(BwdParams<T> p) {
  backward_row<T>(p, blockIdx.x, threadIdx.x, THREADS);
}

// ---------------------------------------------------------------------------------------
// Per-token GRPO terms.
template <typename Acc>
__global__ void __launch_bounds__(kTokenThreads) grpo_token_kernel(GrpoTokenArgs a) {
  const Acc* logp = static_cast<const Acc*>(a.logp);
  const Acc* old_logp = static_cast<const Acc*>(a.old_logp);
  const Acc* adv = static_cast<const Acc*>(a.advantages);
  const Acc* ref = static_cast<const Acc*>(a.ref_logp);
  const Acc* isw = static_cast<const Acc*>(a.is_weights);
  Acc* pg = static_cast<Acc*>(a.pg);
  Acc* kl = static_cast<Acc*>(a.kl);
  Acc* ratio = static_cast<Acc*>(a.ratio);
  Acc* dpg = static_cast<Acc*>(a.dpg);
  Acc* dkl = static_cast<Acc*>(a.dkl);
  Acc* dratio = static_cast<Acc*>(a.dratio);
  for (int64_t i = int64_t(blockIdx.x) * kTokenThreads + threadIdx.x; i < a.n;
       i += int64_t(gridDim.x) * kTokenThreads) {
    const grpo::GrpoToken<Acc> o =
        grpo::grpo_token<Acc>(logp[i], old_logp[i], adv[i], ref != nullptr ? ref[i] : Acc(0),
                              isw != nullptr ? isw[i] : Acc(1), a.params);
    pg[i] = o.pg;
    kl[i] = o.kl;
    ratio[i] = o.ratio;
    dpg[i] = o.dpg;
    dkl[i] = o.dkl;
    dratio[i] = o.dratio;
    a.flags[i] = o.flags;
  }
}

// ---------------------------------------------------------------------------------------
template <typename T>
void launch_forward(const LogprobsFwdArgs& a, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  FwdParams<T> p;
  p.logits = static_cast<const T*>(a.logits);
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.stride = a.row_stride;
  p.targets = a.targets;
  p.inv_temp = static_cast<Acc>(1.0 / a.temperature);
  p.logp = static_cast<Acc*>(a.logp);
  p.row_max = static_cast<Acc*>(a.row_max);
  p.log_norm = static_cast<Acc*>(a.log_norm);
  p.entropy = static_cast<Acc*>(a.entropy);
  if (a.cols <= kWarpRowMaxCols) {
    constexpr int64_t kRowsPerCta = kWarpRowThreads / 32;
    const int64_t grid = (a.rows + kRowsPerCta - 1) / kRowsPerCta;
    logprobs_fwd_warp_kernel<T><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(p);
  } else if (a.cols <= kMidRowMaxCols) {
    logprobs_fwd_cta_kernel<T, kMidThreads><<<static_cast<unsigned>(a.rows), kMidThreads, 0, stream>>>(p);
  } else {
    logprobs_fwd_cta_kernel<T, kWideThreads><<<static_cast<unsigned>(a.rows), kWideThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_backward(const LogprobsBwdArgs& a, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  BwdParams<T> p;
  p.logits = static_cast<const T*>(a.logits);
  p.grad = static_cast<T*>(a.grad);
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.lstride = a.logits_stride;
  p.gstride = a.grad_stride;
  p.targets = a.targets;
  p.row_max = static_cast<const Acc*>(a.row_max);
  p.log_norm = static_cast<const Acc*>(a.log_norm);
  p.entropy = static_cast<const Acc*>(a.entropy);
  p.g_logp = static_cast<const Acc*>(a.grad_logp);
  p.g_ent = static_cast<const Acc*>(a.grad_entropy);
  p.inv_temp = static_cast<Acc>(1.0 / a.temperature);
  if (a.cols <= kWarpRowMaxCols) {
    constexpr int64_t kRowsPerCta = kWarpRowThreads / 32;
    const int64_t grid = (a.rows + kRowsPerCta - 1) / kRowsPerCta;
    logprobs_bwd_warp_kernel<T><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(p);
  } else if (a.cols <= kMidRowMaxCols) {
    logprobs_bwd_cta_kernel<T, kMidThreads><<<static_cast<unsigned>(a.rows), kMidThreads, 0, stream>>>(p);
  } else {
    logprobs_bwd_cta_kernel<T, kWideThreads><<<static_cast<unsigned>(a.rows), kWideThreads, 0, stream>>>(p);
  }
}

template <typename F>
void dispatch_logits(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(static_cast<__half*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case DType::kFloat64: f(static_cast<double*>(nullptr)); break;
    default: f(static_cast<float*>(nullptr)); break;
  }
}

}  // namespace

void logprobs_forward(const LogprobsFwdArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.cols <= 0) return;
  dispatch_logits(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_forward<T>(a, stream);
  });
}

void logprobs_backward(const LogprobsBwdArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.cols <= 0) return;
  dispatch_logits(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_backward<T>(a, stream);
  });
}

void grpo_token_terms(const GrpoTokenArgs& a, cudaStream_t stream) {
  if (a.n <= 0) return;
  int64_t blocks = (a.n + kTokenThreads - 1) / kTokenThreads;
  const int64_t cap = int64_t(num_sms()) * kTokenBlocksPerSm;
  if (blocks > cap) blocks = cap;
  if (a.fp64) {
    grpo_token_kernel<double><<<static_cast<unsigned>(blocks), kTokenThreads, 0, stream>>>(a);
  } else {
    grpo_token_kernel<float><<<static_cast<unsigned>(blocks), kTokenThreads, 0, stream>>>(a);
  }
}

}  // namespace cuda
}  // namespace tsparse
