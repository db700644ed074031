// Torch glue for the CUDA kernels of the fused GRPO op family: argument checks (shared
// with the CPU backend), allocation, device guard and stream, launch checks. Target VALUES
// are checked on the device (a trap naming the op, see grpo_launchers.h); nothing here
// waits for the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "cuda_glue.h"
#include "../common/grpo_args.h"
#include "tsparse/grpo_launchers.h"

namespace tsparse {

namespace {

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void launch_backward(const LogprobsBwdPrep& p, void* grad, int64_t grad_stride, double temperature) {
  cuda::LogprobsBwdArgs a;
  a.logits = p.logits.data_ptr();
  a.rows = p.logits.size(0);
  a.cols = p.logits.size(1);
  a.logits_stride = row_stride(p.logits);
  a.grad = grad;
  a.grad_stride = grad_stride;
  a.targets = p.targets.data_ptr<int64_t>();
  a.row_max = p.row_max.data_ptr();
  a.log_norm = p.log_norm.data_ptr();
  a.entropy = ptr_or_null(p.entropy);
  a.grad_logp = ptr_or_null(p.grad_logp);
  a.grad_entropy = ptr_or_null(p.grad_entropy);
  a.dtype = cuda_dtype(p.logits.scalar_type());
  a.temperature = temperature;
  cuda::logprobs_backward(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_cuda(const at::Tensor& logits_in,
                                                                        const at::Tensor& targets_in,
                                                                        double temperature,
                                                                        bool with_entropy) {
  constexpr const char* op = "logprobs";
  check_logits(logits_in, op);
  check_temperature(temperature, op, logits_in.scalar_type());
  check_cuda(logits_in, op, "logits");
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_rows(logits_in);
  const at::Tensor targets = prep_targets(targets_in, logits, op);
  const int64_t rows = logits.size(0);
  const auto opts = logits.options().dtype(logprobs_acc_type(logits.scalar_type()));
  at::Tensor logp = at::empty({rows}, opts);
  at::Tensor row_max = at::empty({rows}, opts);
  at::Tensor log_norm = at::empty({rows}, opts);
  at::Tensor entropy = at::empty({with_entropy ? rows : 0}, opts);
  cuda::LogprobsFwdArgs a;
  a.logits = logits.data_ptr();
  a.rows = rows;
  a.cols = logits.size(1);
  a.row_stride = row_stride(logits);
  a.targets = targets.data_ptr<int64_t>();
  a.dtype = cuda_dtype(logits.scalar_type());
  a.temperature = temperature;
  a.logp = logp.data_ptr();
  a.row_max = row_max.data_ptr();
  a.log_norm = log_norm.data_ptr();
  a.entropy = with_entropy ? entropy.data_ptr() : nullptr;
  cuda::logprobs_forward(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, row_max, log_norm, entropy};
}

at::Tensor logprobs_backward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& row_max, const at::Tensor& log_norm,
                                  const at::Tensor& entropy, const c10::optional<at::Tensor>& grad_logp,
                                  const c10::optional<at::Tensor>& grad_entropy, double temperature) {
  constexpr const char* op = "logprobs_backward";
  check_cuda(logits, op, "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  const LogprobsBwdPrep p = prep_logprobs_backward(logits, targets, row_max, log_norm, entropy,
                                                   grad_logp, grad_entropy, temperature, op);
  at::Tensor grad = at::empty({p.logits.size(0), p.logits.size(1)}, p.logits.options());
  launch_backward(p, grad.data_ptr(), p.logits.size(1), temperature);
  return grad;
}

void logprobs_backward_inplace_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& row_max, const at::Tensor& log_norm,
                                    const at::Tensor& entropy, const c10::optional<at::Tensor>& grad_logp,
                                    const c10::optional<at::Tensor>& grad_entropy, double temperature) {
  constexpr const char* op = "logprobs_backward_";
  check_cuda(logits, op, "logits");
  check_inplace_logits(logits, op);
  c10::cuda::CUDAGuard guard(logits.device());
  LogprobsBwdPrep p = prep_logprobs_backward(logits, targets, row_max, log_norm, entropy,
                                             grad_logp, grad_entropy, temperature, op);
  unalias_from_logits(p, logits);  // rows are written while other CTAs still read these
  launch_backward(p, logits.data_ptr(), row_stride(logits), temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
grpo_token_terms_cuda(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                      const c10::optional<at::Tensor>& ref_logp, const c10::optional<at::Tensor>& is_weights,
                      double clip_low, double clip_high, double clip_ratio_c, c10::string_view kl_type,
                     int64_t clamp_edges) {
  check_cuda(logp, "grpo_token_terms", "logp");
  c10::cuda::CUDAGuard guard(logp.device());
  const GrpoTokenPrep p = prep_grpo_token_terms(logp, old_logp, advantages, ref_logp, is_weights,
                                                clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges);
  const int64_t n = p.logp.size(0);
  const auto opts = p.logp.options();
  at::Tensor pg = at::empty({n}, opts), kl = at::empty({n}, opts), ratio = at::empty({n}, opts);
  at::Tensor dpg = at::empty({n}, opts), dkl = at::empty({n}, opts), dratio = at::empty({n}, opts);
  at::Tensor flags = at::empty({n}, opts.dtype(at::kByte));
  cuda::GrpoTokenArgs a;
  a.n = n;
  a.fp64 = p.logp.scalar_type() == at::kDouble;
  a.logp = p.logp.data_ptr();
  a.old_logp = p.old_logp.data_ptr();
  a.advantages = p.advantages.data_ptr();
  a.ref_logp = ptr_or_null(p.ref_logp);
  a.is_weights = ptr_or_null(p.is_weights);
  a.params = p.params;
  a.pg = pg.data_ptr();
  a.kl = kl.data_ptr();
  a.ratio = ratio.data_ptr();
  a.dpg = dpg.data_ptr();
  a.dkl = dkl.data_ptr();
  a.dratio = dratio.data_ptr();
  a.flags = flags.data_ptr<uint8_t>();
  cuda::grpo_token_terms(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pg, kl, ratio, flags, dpg, dkl, dratio};
}

// ---------------------------------------------------------------------------------------
// Fused GRPO loss: the single-read cluster kernel when asked for and possible, else the
// two-pass kernels (grpo_launchers.h). Nothing here waits for the GPU.
namespace {

struct FusedOutCuda {
  at::Tensor logp, entropy, pg, kl, ratio, flags;
};

FusedOutCuda fused_outputs_cuda(const GrpoFusedPrep& p) {
  const int64_t n = p.logits.size(0);
  const auto opts = p.logits.options().dtype(logprobs_acc_type(p.logits.scalar_type()));
  FusedOutCuda o;
  o.logp = at::empty({n}, opts);
  o.entropy = at::empty({p.with_entropy ? n : 0}, opts);
  o.pg = at::empty({n}, opts);
  o.kl = at::empty({n}, opts);
  o.ratio = at::empty({n}, opts);
  o.flags = at::empty({n}, opts.dtype(at::kByte));
  return o;
}

// Whether the single-read kernel can write `grad` rows: same 16-byte phase as the logits' rows.
bool same_row_phase(const at::Tensor& logits, void* grad, int64_t grad_stride) {
  const int64_t e = logits.element_size();
  const bool base = ((reinterpret_cast<uintptr_t>(logits.data_ptr()) ^ reinterpret_cast<uintptr_t>(grad)) & 15) == 0;
  return base && ((row_stride(logits) - grad_stride) * e) % 16 == 0;
}

void run_fused_cuda(const GrpoFusedPrep& p, double temperature, FusedOutCuda& o, void* grad, int64_t grad_stride,
                    bool single_read) {
  const int64_t rows = p.logits.size(0);
  if (rows == 0) return;
  cuda::GrpoFusedArgs a;
  a.logits = p.logits.data_ptr();
  a.rows = rows;
  a.cols = p.logits.size(1);
  a.logits_stride = row_stride(p.logits);
  a.grad = grad;
  a.grad_stride = grad_stride;
  a.dtype = cuda_dtype(p.logits.scalar_type());
  a.targets = p.targets.data_ptr<int64_t>();
  a.temperature = temperature;
  a.old_logp = p.old_logp.data_ptr();
  a.advantages = p.advantages.data_ptr();
  a.ref_logp = ptr_or_null(p.ref_logp);
  a.is_weights = ptr_or_null(p.is_weights);
  a.token_weight = p.token_weight.data_ptr();
  a.params = p.params;
  a.use_kl = p.use_kl;
  a.kl_coef = p.kl_coef;
  a.entropy_coef = p.entropy_coef;
  a.logp = o.logp.data_ptr();
  a.entropy = p.with_entropy ? o.entropy.data_ptr() : nullptr;
  a.pg = o.pg.data_ptr();
  a.kl = o.kl.data_ptr();
  a.ratio = o.ratio.data_ptr();
  a.flags = o.flags.data_ptr<uint8_t>();
  // Host-side choice from V, the dtype and the layout (no device work): the cluster kernel needs
  // a gradient to write, 16/32-bit logits, rows that fit 8 CTAs' shared memory and a device that
  // can co-schedule the cluster (grpo_layout.h plan_cluster, cudaOccupancyMaxActiveClusters).
  if (single_read && grad != nullptr && same_row_phase(p.logits, grad, grad_stride) &&
      cuda::grpo_loss_single_read_supported(rows, a.cols, a.dtype)) {
    C10_CUDA_CHECK(cuda::grpo_loss_single_read(a, current_stream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const auto opts = o.logp.options();
  at::Tensor row_max = at::empty({rows}, opts), log_norm = at::empty({rows}, opts);
  at::Tensor g_logp = at::empty({rows}, opts), g_ent = at::empty({rows}, opts);
  cuda::GrpoTwoPassTemps tmp;
  tmp.row_max = row_max.data_ptr();
  tmp.log_norm = log_norm.data_ptr();
  tmp.g_logp = g_logp.data_ptr();
  tmp.g_ent = g_ent.data_ptr();
  cuda::grpo_loss_two_pass(a, tmp, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_loss_fused_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& old_logp, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& ref_logp, const c10::optional<at::Tensor>& is_weights,
    const at::Tensor& token_weight, double temperature, double clip_low, double clip_high, double clip_ratio_c,
    c10::string_view kl_type, int64_t clamp_edges, double kl_coef, double entropy_coef, bool with_entropy,
    bool with_grad, bool single_read) {
  constexpr const char* op = "grpo_loss";
  check_cuda(logits, op, "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  const GrpoFusedPrep p = prep_grpo_fused(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight,
                                          temperature, clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges,
                                          kl_coef, entropy_coef, with_entropy, op);
  FusedOutCuda o = fused_outputs_cuda(p);
  at::Tensor grad = with_grad ? alloc_grad_like_rows(p.logits) : at::empty({0, p.logits.size(1)}, p.logits.options());
  run_fused_cuda(p, temperature, o, with_grad ? grad.data_ptr() : nullptr, with_grad ? row_stride(grad) : 0,
                 single_read);
  return {o.logp, o.entropy, o.pg, o.kl, o.ratio, o.flags, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_loss_fused_inplace_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& old_logp, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& ref_logp, const c10::optional<at::Tensor>& is_weights,
    const at::Tensor& token_weight, double temperature, double clip_low, double clip_high, double clip_ratio_c,
    c10::string_view kl_type, int64_t clamp_edges, double kl_coef, double entropy_coef, bool with_entropy,
    bool single_read) {
  constexpr const char* op = "grpo_loss";
  check_cuda(logits, op, "logits");
  check_inplace_logits(logits, op);
  c10::cuda::CUDAGuard guard(logits.device());
  GrpoFusedPrep p = prep_grpo_fused(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight,
                                    temperature, clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges, kl_coef,
                                    entropy_coef, with_entropy, op);
  unalias_fused_from_logits(p, logits);
  FusedOutCuda o = fused_outputs_cuda(p);
  run_fused_cuda(p, temperature, o, logits.data_ptr(), row_stride(logits), single_read);
  return {o.logp, o.entropy, o.pg, o.kl, o.ratio, o.flags};
}

void scale_rows_cuda(const at::Tensor& x, const at::Tensor& scale) {
  check_cuda(x, "scale_rows_", "x");
  check_scale_rows(x, scale);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor s = scale.reshape({}).to(logprobs_acc_type(x.scalar_type())).contiguous();
  cuda::scale_rows_by_device_scalar(x.data_ptr(), x.size(0), x.size(1), row_stride(x), cuda_dtype(x.scalar_type()),
                                    s.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(tsparse, CUDA, m) {
  m.impl("grpo_loss_fused", &grpo_loss_fused_cuda);
  m.impl("grpo_loss_fused_", &grpo_loss_fused_inplace_cuda);
  m.impl("scale_rows_", &scale_rows_cuda);
  m.impl("logprobs", &logprobs_cuda);
  m.impl("logprobs_backward", &logprobs_backward_cuda);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_cuda);
  m.impl("grpo_token_terms", &grpo_token_terms_cuda);
}

}  // namespace tsparse
