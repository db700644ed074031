// Argument checks shared by the CPU and CUDA torch glue. Every message names the op and
// the argument, so a user can tell which input was wrong without reading C++.
//   TORCH_CHECK_TYPE  -> TypeError   (dtype)
//   TORCH_CHECK_VALUE -> ValueError  (shape, device, value)
//   TORCH_CHECK_INDEX -> IndexError  (index out of range)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <limits>

namespace tsparse {

inline bool is_row_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16 || t == c10::kDouble;
}

// [rows, D] tensor whose rows the kernels can address with a row stride. Row COPIES work for
// any dtype (`any_dtype`); ops that compute on the values need float32/16, bfloat16 or float64.
inline void check_rows(const at::Tensor& t, const char* op, const char* arg, bool any_dtype = false) {
  TORCH_CHECK_TYPE(any_dtype || is_row_dtype(t.scalar_type()), "tsparse.", op, ": `", arg,
                   "` must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, "tsparse.", op, ": `", arg,
                    "` must be 2-D [rows, D], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) < (int64_t(1) << 31) / t.element_size(), "tsparse.", op, ": `",
                    arg, "` rows of ", t.size(1), " elements are too wide (2 GiB per row at most)");
}

// A check whose verdict `ok` (a bool scalar) was computed on the inputs' device: eager on the CPU
// (a ValueError), an asynchronous device assert on CUDA (no host sync; the error surfaces at the
// next synchronization and leaves the CUDA context unusable, like PyTorch's own index checks).
inline void check_on_device(const at::Tensor& ok, const char* op, const std::string& what) {
  if (ok.device().is_cpu()) {
    TORCH_CHECK_VALUE(ok.item<bool>(), "tsparse.", op, ": ", what);
  } else {
    at::_assert_async(ok, std::string("tsparse.") + op + ": " + what);
  }
}

inline void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "tsparse.", op,
                    ": `eps` must be a finite number > 0, got ", eps);
}

inline void check_index_tensor(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == c10::kInt || t.scalar_type() == c10::kLong, "tsparse.", op,
                   ": `", arg, "` must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, "tsparse.", op, ": `", arg, "` must be 1-D, got shape ",
                    t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* arg, const char* ref_arg) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "tsparse.", op, ": `", arg, "` is on ", t.device(),
                    " but `", ref_arg, "` is on ", ref.device(), "; they must be on the same device");
}

// Rows with a contiguous inner dimension are used in place (any row stride); anything
// else is copied once.
inline at::Tensor rows_view(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

inline int64_t row_stride(const at::Tensor& t) {
  return t.size(0) <= 1 ? t.size(1) : t.stride(0);
}

inline void check_int32_rows(int64_t rows, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(rows <= std::numeric_limits<int32_t>::max(), "tsparse.", op, ": `", arg,
                    "` has ", rows, " rows; at most 2^31 - 1 are supported here");
}

}  // namespace tsparse
