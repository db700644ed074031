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

// One read of every logits row: online base-2 (max, sum 2^t, sum 2^t t) over y = logits * c,
// c = log2(e) / T (grpo_math.h):
//   logp[r]     = log softmax(logits / T)[targets[r]]            (nats)
//   row_max[r]  = max_j y_j,   log_norm[r] = log2 sum_j 2^(y_j - row_max[r])   (base 2)
//   entropy[r]  = -sum_j p_j log p_j   (nats; skipped when `entropy` is null)
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

// One pass over the logits writing d loss / d logits (row_max / log_norm from the forward):
//   grad[r, j] = (g_logp[r] * ([j == t] - p_j) - g_ent[r] * p_j * (log p_j + entropy[r])) / T
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

// The fused GRPO loss rows: log-prob (+ entropy), the per-token terms of GrpoTokenArgs and
// d loss / d logits with the per-token coefficients of grpo_math.h grpo_token_grads
// (token_weight[r] = d loss / d per-token loss, 0 for masked tokens), for every row.
struct GrpoFusedArgs {
  const void* logits = nullptr;  // [rows, cols] of `dtype`; inner dim contiguous
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t logits_stride = 0;
  void* grad = nullptr;  // [rows, cols]; may be `logits`; null: no gradient (forward only)
  int64_t grad_stride = 0;
  DType dtype = DType::kFloat32;
  const int64_t* targets = nullptr;
  double temperature = 1.0;
  // Per token, contiguous [rows] of Acc: old_logp, advantages, token_weight; optional ref_logp
  // (needed when params.kl != kNone) and is_weights (1 when null).
  const void* old_logp = nullptr;
  const void* advantages = nullptr;
  const void* ref_logp = nullptr;
  const void* is_weights = nullptr;
  const void* token_weight = nullptr;
  grpo::GrpoParams params;
  bool use_kl = false;  // the loss has kl_coef * kl (ref_logp given, kl_coef != 0)
  double kl_coef = 0.0;
  double entropy_coef = 0.0;
  // Outputs, [rows] of Acc (flags uint8); `entropy` null unless wanted.
  void* logp = nullptr;
  void* entropy = nullptr;
  void* pg = nullptr;
  void* kl = nullptr;
  void* ratio = nullptr;
  uint8_t* flags = nullptr;
};

// Single read (csrc/cuda/grpo_fused_kernels.cu): one thread-block cluster per row keeps the row
// in shared memory, reduces the row statistics through distributed shared memory and writes
// the gradient from shared memory: each logit is read once and its gradient written once
// (4 B per bf16 element). Needs `grad` and rows whose grad and logits start at the same offset
// from a 16-byte boundary (the host allocates the gradient so). True when the plan fits
// (grpo_layout.h plan_cluster: 16/32-bit logits, rows up to 8 x 200 KB) and the device can
// run the cluster; otherwise the caller uses grpo_loss_two_pass.
bool grpo_loss_single_read_supported(int64_t rows, int64_t cols, DType dtype);
// Returns the launch's error (the cluster launch goes through cudaLaunchKernelEx).
cudaError_t grpo_loss_single_read(const GrpoFusedArgs& args, cudaStream_t stream);

// The same results in three launches: the logprobs forward, one per-token kernel (terms and
// coefficients), the logprobs backward (6 B per bf16 element; forward only when grad is null).
// Temporaries [rows] of Acc: row_max, log_norm, g_logp, g_ent (caller-allocated, see below).
struct GrpoTwoPassTemps {
  void* row_max = nullptr;
  void* log_norm = nullptr;
  void* g_logp = nullptr;
  void* g_ent = nullptr;
};
void grpo_loss_two_pass(const GrpoFusedArgs& args, const GrpoTwoPassTemps& temps, cudaStream_t stream);

// x[r, :] *= *scale for rows of `cols` elements (row stride `stride`); every CTA reads the
// device scalar first and returns at once when it is 1 (no pass over x, no host sync).
// scale: a device pointer to one Acc.
void scale_rows_by_device_scalar(void* x, int64_t rows, int64_t cols, int64_t stride, DType dtype,
                                 const void* scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace tsparse
