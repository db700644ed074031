// Device building blocks of the fused GRPO row kernels (csrc/cuda/grpo_kernels.cu: the
// two-pass logprobs forward / backward; csrc/cuda/grpo_fused_kernels.cu: the single-read
// cluster kernel). No torch headers. The math is grpo_math.h (shared with the CPU kernels);
// the row layout is grpo_layout.h (shared with the host and the CPU emulation tests).
//
// Hot loops (what the SASS must show, profiling/NOTES.md "Fused GRPO"):
//   * one 16-byte load (LDG.E.128) per 8 bf16 / fp16 logits, kUnroll of them in flight per
//     thread, no predicate or branch per vector inside a full trip (the partial last trip runs
//     a one-vector loop after it);
//   * per element of the forward: one unpack, one FFMA (x * c - m), one MUFU.EX2
//     (ex2.approx.ftz), one FADD (+ one FMNMX and one FFMA for the entropy's sum); the batch
//     maximum costs half an instruction per element (bf16x2 / fp16x2 max on the packed words);
//   * per element of the backward: unpack, FFMA, FADD, MUFU.EX2, FMUL (+ FMNMX, FFMA with an
//     entropy gradient), half a pack (F2FP); no compare per element: the target's extra term is
//     written by the thread that owns the target afterwards (grpo_layout.h: owner_lane).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "tsparse/cuda_common.cuh"
#include "tsparse/grpo_layout.h"
#include "tsparse/grpo_math.h"

namespace tsparse {
namespace cuda {
namespace grpo_dev {

using grpo::LseState;
using grpo::RowGrad;

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// 16-byte vectors of logits: unpack to the accumulator type, pack back, batch maximum.
template <typename T>
struct RowVec;

template <>
struct RowVec<__nv_bfloat16> {
  using Acc = float;
  static constexpr int kElems = 8;
  __device__ static void unpack(const uint4& q, float (&x)[8]) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint32_t max2(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r =
        __hmax2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static float word_max(uint32_t w) {
    return fmaxf(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
};

template <>
struct RowVec<__half> {
  using Acc = float;
  static constexpr int kElems = 8;
  __device__ static void unpack(const uint4& q, float (&x)[8]) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  __device__ static uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint32_t max2(uint32_t a, uint32_t b) {
    const __half2 r = __hmax2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static float word_max(uint32_t w) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    return fmaxf(f.x, f.y);
  }
};

// Packed 16-bit types: the maximum of N vectors is a tree of bf16x2 / fp16x2 max over their
// words (NaN-ignoring, like fmaxf), then the larger half.
template <typename T, int N>
__device__ __forceinline__ float batch_max16(const uint4 (&q)[N]) {
  using V = RowVec<T>;
  uint32_t w[4 * N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    w[4 * k] = q[k].x;
    w[4 * k + 1] = q[k].y;
    w[4 * k + 2] = q[k].z;
    w[4 * k + 3] = q[k].w;
  }
#pragma unroll
  for (int s = 1; s < 4 * N; s *= 2) {
#pragma unroll
    for (int i = 0; i + s < 4 * N; i += 2 * s) w[i] = V::max2(w[i], w[i + s]);
  }
  return V::word_max(w[0]);
}

template <>
struct RowVec<float> {
  using Acc = float;
  static constexpr int kElems = 4;
  __device__ static void unpack(const uint4& q, float (&x)[4]) {
    x[0] = __uint_as_float(q.x);
    x[1] = __uint_as_float(q.y);
    x[2] = __uint_as_float(q.z);
    x[3] = __uint_as_float(q.w);
  }
};

template <>
struct RowVec<double> {
  using Acc = double;
  static constexpr int kElems = 2;
  __device__ static void unpack(const uint4& q, double (&x)[2]) {
    x[0] = __hiloint2double(static_cast<int>(q.y), static_cast<int>(q.x));
    x[1] = __hiloint2double(static_cast<int>(q.w), static_cast<int>(q.z));
  }
};

template <typename T>
__device__ __forceinline__ uint4 pack_vec(const typename RowVec<T>::Acc (&g)[RowVec<T>::kElems]) {
  if constexpr (sizeof(T) == 2) {
    using V = RowVec<T>;
    return make_uint4(V::pack2(g[0], g[1]), V::pack2(g[2], g[3]), V::pack2(g[4], g[5]), V::pack2(g[6], g[7]));
  } else if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(g[0]), __float_as_uint(g[1]), __float_as_uint(g[2]), __float_as_uint(g[3]));
  } else {
    return make_uint4(static_cast<unsigned>(__double2loint(g[0])), static_cast<unsigned>(__double2hiint(g[0])),
                      static_cast<unsigned>(__double2loint(g[1])), static_cast<unsigned>(__double2hiint(g[1])));
  }
}

// Maximum RAW logit of N vectors (the scale c > 0 is applied once to it afterwards:
// fl(max(x) * c) = max(fl(x * c)) since rounding is monotonic).
template <typename T, int N>
__device__ __forceinline__ typename RowVec<T>::Acc batch_max(const uint4 (&q)[N]) {
  if constexpr (sizeof(T) == 2) {
    return batch_max16<T, N>(q);
  } else {
    using Acc = typename RowVec<T>::Acc;
    constexpr int kE = RowVec<T>::kElems;
    Acc bm = grpo::neg_inf<Acc>();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      Acc x[kE];
      RowVec<T>::unpack(q[k], x);
#pragma unroll
      for (int e = 0; e < kE; ++e) bm = grpo::max_acc(bm, x[e]);
    }
    return bm;
  }
}

// ---------------------------------------------------------------------------------------
// Forward: one batch of N vectors into the state (branch-free). Each vector's terms are summed
// in registers first (8 terms), the N partial sums pairwise, then added to the rescaled state:
// the serial part of each thread's sum stays short (accuracy: grpo_math.h header).
template <typename T, bool WITH_ENT, int N>
__device__ __forceinline__ void add_batch(const uint4 (&q)[N], typename RowVec<T>::Acc c,
                                          LseState<typename RowVec<T>::Acc>& st) {
  using Acc = typename RowVec<T>::Acc;
  constexpr int kE = RowVec<T>::kElems;
  grpo::lse_raise_max(st, batch_max<T, N>(q) * c);
  const Acc base = grpo::offset_base(st.m);
  Acc as[N], bs[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    Acc x[kE];
    RowVec<T>::unpack(q[k], x);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const Acc t = grpo::offset2(x[e], c, base);  // one FFMA
      const Acc ex = grpo::exp2_row(t);            // one MUFU.EX2 (fp32)
      const Acc tb = grpo::max_acc(t, grpo::min_log2<Acc>());
      if (e == 0) {
        as[k] = ex;
        if (WITH_ENT) bs[k] = ex * tb;
      } else {
        as[k] += ex;
        if (WITH_ENT) bs[k] = fma(ex, tb, bs[k]);
      }
    }
  }
#pragma unroll
  for (int s = 1; s < N; s *= 2) {
#pragma unroll
    for (int k = 0; k + s < N; k += 2 * s) {
      as[k] += as[k + s];
      if (WITH_ENT) bs[k] += bs[k + s];
    }
  }
  st.a += as[0];
  if (WITH_ENT) st.b += bs[0];
}

// This thread's vectors v, v + group, ... (< nvec) of a row: full trips of kUnroll vectors
// (all loads issued before any math, no per-vector predicate), then single vectors. Returns
// nothing; the state is updated in place. `vp` is 16-byte aligned; `Store` receives each
// vector after it was loaded (the cluster kernel keeps the row in shared memory; the two-pass
// forward passes a no-op).
template <typename T, bool WITH_ENT, int kUnroll, typename Store>
__device__ __forceinline__ void stream_vectors(const uint4* __restrict__ vp, int v, int nvec, int group,
                                               typename RowVec<T>::Acc c,
                                               LseState<typename RowVec<T>::Acc>& st, Store&& store) {
  for (; v + (kUnroll - 1) * group < nvec; v += kUnroll * group) {
    uint4 q[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) q[k] = __ldcs(vp + v + k * group);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) store(v + k * group, q[k]);
    add_batch<T, WITH_ENT, kUnroll>(q, c, st);
  }
  for (; v < nvec; v += group) {
    uint4 q[1] = {__ldcs(vp + v)};
    store(v, q[0]);
    add_batch<T, WITH_ENT, 1>(q, c, st);
  }
}

// Up to two scalar logits (the row's head and tail) into the state; absent ones are -inf.
template <typename Acc>
__device__ __forceinline__ void add_scalars(Acc x0, Acc x1, Acc c, LseState<Acc>& st) {
  grpo::lse_raise_max(st, grpo::max_acc(x0, x1) * c);
  const Acc base = grpo::offset_base(st.m);
  grpo::lse_add_offset(st, grpo::offset2(x0, c, base));
  grpo::lse_add_offset(st, grpo::offset2(x1, c, base));
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
// merged state to every thread. red: [33] shared slots.
template <typename Acc, int THREADS>
__device__ __forceinline__ LseState<Acc> cta_merge(LseState<Acc> s, LseState<Acc>* red) {
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
// Backward: d loss / d logits of N vectors, target term excluded (grpo_math.h logit_grad_nt).
template <typename T, bool WITH_ENT>
__device__ __forceinline__ uint4 grad_vec(const uint4& q, const RowGrad<typename RowVec<T>::Acc>& g) {
  using Acc = typename RowVec<T>::Acc;
  constexpr int kE = RowVec<T>::kElems;
  Acc x[kE];
  RowVec<T>::unpack(q, x);
#pragma unroll
  for (int e = 0; e < kE; ++e) x[e] = grpo::logit_grad_nt<WITH_ENT>(x[e], g);
  return pack_vec<T>(x);
}

// This thread's vectors v, v + group, ... (< nvec): read (from `load`), gradient, 16-byte
// streaming store to `vout`. Full trips of kUnroll vectors, then single vectors.
template <typename T, bool WITH_ENT, int kUnroll, typename Load>
__device__ __forceinline__ void grad_vectors(Load&& load, uint4* __restrict__ vout, int v, int nvec, int group,
                                             const RowGrad<typename RowVec<T>::Acc>& g) {
  for (; v + (kUnroll - 1) * group < nvec; v += kUnroll * group) {
    uint4 q[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) q[k] = load(v + k * group);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) __stcs(vout + v + k * group, grad_vec<T, WITH_ENT>(q[k], g));
  }
  for (; v < nvec; v += group) __stcs(vout + v, grad_vec<T, WITH_ENT>(load(v), g));
}

}  // namespace grpo_dev
}  // namespace cuda
}  // namespace tsparse
