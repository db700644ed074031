// Device-side helpers shared by tsparse's .cu files (no torch headers): the SM count and the
// grid of a grid-stride loop, the launchers' dtype dispatch, and the element traits (fp32
// accumulation for 16/32-bit floats, fp64 for fp64).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cassert>  // __assert_fail, declared for device code by CUDA's crt headers
#include <cstdint>

#include "tsparse/launchers.h"  // DType

namespace tsparse {
namespace cuda {

// Multiprocessors of the current device, cached per device (132 if the query fails). The
// cache is atomic: launchers may run on several host threads (one per device, e.g.).
inline int num_sms() {
  static std::atomic<int> cache[64];  // static storage: zero-initialized
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = 0;
  if (dev >= 0 && dev < 64) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    cudaGetLastError();  // clear the error of the failed query
    sms = 132;
  }
  if (dev >= 0 && dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

// Blocks of a grid-stride loop over `work` items, `per_block` items per block: enough to cover
// every item, at most `per_sm` blocks per SM (more only add scheduling), at least one.
inline unsigned grid_stride_blocks(int64_t work, int64_t per_block, int per_sm) {
  int64_t blocks = (work + per_block - 1) / per_block;
  const int64_t cap = int64_t(num_sms()) * per_sm;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

// Calls f(static_cast<T*>(nullptr)) with T the element type of `d` (__half, __nv_bfloat16,
// double, else float): a launcher's one switch from the runtime dtype to its kernel template.
template <typename F>
void dispatch_float_type(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(static_cast<__half*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case DType::kFloat64: f(static_cast<double*>(nullptr)); break;
    default: f(static_cast<float*>(nullptr)); break;
  }
}

#if defined(__CUDACC__)
// Ends the kernel on a broken contract (an index out of range, a wrong `total`, ...) with a
// device-side assertion whose message is `what`, a string literal naming the op and the fault.
// Details printed with printf just before may be lost when a kernel aborts; the assertion's
// own message is not: CUDA prints it, and the launch fails with cudaErrorAssert ("device-side
// assert triggered"; the CUDA context is then unusable, as after PyTorch's CUDA_KERNEL_ASSERT).
// Called directly, so NDEBUG does not remove it; the trap after it guarantees the thread never
// goes on to the access the check protected.
#define TSPARSE_DEVICE_FAIL(what)                          \
  do {                                                     \
    __assert_fail(what, __FILE__, __LINE__, __func__);     \
    __trap();                                              \
  } while (0)

template <typename T> struct Elem;
template <> struct Elem<float> {
  using Acc = float;
  __device__ static Acc load(float v) { return v; }
  __device__ static float store(Acc v) { return v; }
};
template <> struct Elem<double> {
  using Acc = double;
  __device__ static Acc load(double v) { return v; }
  __device__ static double store(Acc v) { return v; }
};
template <> struct Elem<__half> {
  using Acc = float;
  __device__ static Acc load(__half v) { return __half2float(v); }
  __device__ static __half store(Acc v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  using Acc = float;
  __device__ static Acc load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(Acc v) { return __float2bfloat16_rn(v); }
};
#endif

}  // namespace cuda
}  // namespace tsparse
