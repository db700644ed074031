// 16 bytes of logits / features as one uint4, taken apart into accumulators and built back:
// the unit of the 16-byte loads and stores (LDG.E.128 / STG.E.128) of the row kernels
// (csrc/cuda/visual_tokens_kernels.cu) and the GRPO row kernels (grpo_device.cuh). No torch
// headers.
//
// Vec16<T>: kElems elements of T <-> kElems values of Acc (fp32 for bf16 / fp16 / fp32, fp64
// for fp64), with the conversions of Elem<T> (cuda_common.cuh): bf16 / fp16 -> fp32 exact,
// fp32 -> bf16 / fp16 round to nearest even. The 16-byte value is built explicitly from its
// words: a store through a union member or a per-element struct compiles to four 32-bit STG.E.
// The 16-bit types also give the packed maximum of two words (bf16x2 / fp16x2, NaN-ignoring
// like fmaxf) and the larger half of one word.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace tsparse {
namespace cuda {

// The bits of `f` as a `To` of the same size (a register move; memcpy is the defined way).
template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}

template <typename T>
struct Vec16;

template <>
struct Vec16<__nv_bfloat16> {
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
  __device__ static uint32_t pack2(float lo, float hi) { return bits_as<uint32_t>(__floats2bfloat162_rn(lo, hi)); }
  __device__ static uint4 pack(const float (&x)[8]) {
    return make_uint4(pack2(x[0], x[1]), pack2(x[2], x[3]), pack2(x[4], x[5]), pack2(x[6], x[7]));
  }
  __device__ static uint32_t max2(uint32_t a, uint32_t b) {
    return bits_as<uint32_t>(__hmax2(bits_as<__nv_bfloat162>(a), bits_as<__nv_bfloat162>(b)));
  }
  __device__ static float word_max(uint32_t w) {
    return fmaxf(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
};

template <>
struct Vec16<__half> {
  using Acc = float;
  static constexpr int kElems = 8;
  __device__ static void unpack(const uint4& q, float (&x)[8]) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(bits_as<__half2>(w[i]));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  __device__ static uint32_t pack2(float lo, float hi) { return bits_as<uint32_t>(__floats2half2_rn(lo, hi)); }
  __device__ static uint4 pack(const float (&x)[8]) {
    return make_uint4(pack2(x[0], x[1]), pack2(x[2], x[3]), pack2(x[4], x[5]), pack2(x[6], x[7]));
  }
  __device__ static uint32_t max2(uint32_t a, uint32_t b) {
    return bits_as<uint32_t>(__hmax2(bits_as<__half2>(a), bits_as<__half2>(b)));
  }
  __device__ static float word_max(uint32_t w) {
    const float2 f = __half22float2(bits_as<__half2>(w));
    return fmaxf(f.x, f.y);
  }
};

template <>
struct Vec16<float> {
  using Acc = float;
  static constexpr int kElems = 4;
  __device__ static void unpack(const uint4& q, float (&x)[4]) {
    x[0] = __uint_as_float(q.x);
    x[1] = __uint_as_float(q.y);
    x[2] = __uint_as_float(q.z);
    x[3] = __uint_as_float(q.w);
  }
  __device__ static uint4 pack(const float (&x)[4]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
  }
};

template <>
struct Vec16<double> {
  using Acc = double;
  static constexpr int kElems = 2;
  __device__ static void unpack(const uint4& q, double (&x)[2]) {
    x[0] = __hiloint2double(static_cast<int>(q.y), static_cast<int>(q.x));
    x[1] = __hiloint2double(static_cast<int>(q.w), static_cast<int>(q.z));
  }
  __device__ static uint4 pack(const double (&x)[2]) {
    return make_uint4(static_cast<uint32_t>(__double2loint(x[0])), static_cast<uint32_t>(__double2hiint(x[0])),
                      static_cast<uint32_t>(__double2loint(x[1])), static_cast<uint32_t>(__double2hiint(x[1])));
  }
};

}  // namespace cuda
}  // namespace tsparse
