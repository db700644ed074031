// Raw-pointer launchers of the fused GRPO kernels (csrc/cuda/grpo_kernels.cu).
//
// Same contract as launchers.h: no torch headers, raw pointers and sizes in, nothing
// launched for empty work, callers check cudaGetLastError() afterwards. The math is the
// __host__ __device__ code in grpo_math.h that the CPU kernels run too.
//
// Accumulator type ("Acc"): float for fp32/fp16/bf16 logits, double for fp64 logits.
// Every per-row / per-token input and output below is a contiguous [rows] array of Acc.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "tsparse/grpo_math.h"
#include "tsparse/launchers.h"

namespace tsparse {
namespace cuda {

// One read of every logits row: online (max, sum exp, sum exp * z) with z = logits / T.
//   logp[r]     = log softmax(z)[targets[r]]
//   row_max[r]  = max_j z_j,   log_norm[r] = log sum_j exp(z_j - row_max[r])
//   entropy[r]  = -sum_j p_j log p_j   (skipped when `entropy` is null)
// targets outside [0, cols) abort the kernel (a device-side assert naming the op).
struct LogprobsFwdArgs {
  const void* logits = nullptr;  // [rows, cols] of `dtype`; inner dim contiguous
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;        // elements between rows
  const int64_t* targets = nullptr;
  DType dtype = DType::kFloat32;
  double temperature = 1.0;
  void* logp = nullptr;
  void* row_max = nullptr;
  void* log_norm = nullptr;
  void* entropy = nullptr;  // optional
};
void logprobs_forward(const LogprobsFwdArgs& args, cudaStream_t stream);

// One pass over the logits writing d loss / d logits:
//   grad[r, j] = (g_logp[r] * ([j == t] - p_j) - g_ent[r] * p_j * (z_j - sum_k p_k z_k)) / T
// `grad` may be `logits` itself (in-place backward: each element is read, then written, by
// the same thread). Rows whose g_logp and g_ent are both 0 are written as zeros without
// reading the logits.
struct LogprobsBwdArgs {
  const void* logits = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t logits_stride = 0;
  void* grad = nullptr;  // [rows, cols] of `dtype`, inner dim contiguous
  int64_t grad_stride = 0;
  const int64_t* targets = nullptr;
  const void* row_max = nullptr;
  const void* log_norm = nullptr;
  const void* entropy = nullptr;       // needed when grad_entropy is given
  const void* grad_logp = nullptr;     // optional (zero when null)
  const void* grad_entropy = nullptr;  // optional (zero when null)
  DType dtype = DType::kFloat32;
  double temperature = 1.0;
};
void logprobs_backward(const LogprobsBwdArgs& args, cudaStream_t stream);

// Per-token GRPO terms (grpo_math.h: grpo_token), one thread per token.
struct GrpoTokenArgs {
  int64_t n = 0;
  bool fp64 = false;  // Acc = double (else float)
  const void* logp = nullptr;
  const void* old_logp = nullptr;
  const void* advantages = nullptr;
  const void* ref_logp = nullptr;    // optional (params.kl must be kNone when null)
  const void* is_weights = nullptr;  // optional (1 when null)
  grpo::GrpoParams params;
  void* pg = nullptr;
  void* kl = nullptr;
  void* ratio = nullptr;
  void* dpg = nullptr;
  void* dkl = nullptr;
  void* dratio = nullptr;
  uint8_t* flags = nullptr;
};
void grpo_token_terms(const GrpoTokenArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tsparse
