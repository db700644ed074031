// Torch-side helpers shared by the CUDA glue files (*_cuda.cpp): dtype mapping for the
// raw-pointer launchers, the current stream, and the device check with a message naming the
// op and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "tsparse/launchers.h"

namespace tsparse {

inline cuda::DType cuda_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kHalf: return cuda::DType::kFloat16;
    case c10::kBFloat16: return cuda::DType::kBFloat16;
    case c10::kDouble: return cuda::DType::kFloat64;
    case c10::kFloat: return cuda::DType::kFloat32;
    default: TORCH_CHECK(false, "tsparse: unsupported dtype ", t);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.is_cuda(), "tsparse.", op, ": `", arg, "` must be a CUDA tensor here, got ",
                    t.device());
}

}  // namespace tsparse
