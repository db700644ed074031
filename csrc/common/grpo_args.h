// Argument validation and preparation of the GRPO ops, shared by the CPU and CUDA glue so
// both backends reject exactly the same inputs with the same messages. Checks that need the
// target VALUES are backend-specific: the CPU scans them on the host (IndexError), the CUDA
// kernels check them on the device (trap naming the op).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "checks.h"
#include "tsparse/grpo_math.h"

namespace tsparse {

// fp32 statistics for 16/32-bit logits, fp64 for fp64 logits.
inline c10::ScalarType logprobs_acc_type(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// The kernels scale by log2(e) / temperature (and 1 / temperature) in the accumulator type:
// both must be finite there (a float32 accumulator overflows below ~4.2e-39).
inline void check_temperature(double temperature, const char* op, c10::ScalarType logits_type) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "tsparse.", op,
                    ": `temperature` must be a finite number > 0, got ", temperature);
  const double inv_max = logits_type == c10::kDouble ? double(std::numeric_limits<double>::max())
                                                     : double(std::numeric_limits<float>::max());
  TORCH_CHECK_VALUE(grpo::kLog2e / temperature <= inv_max, "tsparse.", op, ": `temperature` = ",
                    temperature, " is too small: log2(e) / temperature overflows the ",
                    logits_type == c10::kDouble ? "float64" : "float32", " accumulator");
}

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_TYPE(is_row_dtype(logits.scalar_type()), "tsparse.", op,
                   ": `logits` must be float32, float16, bfloat16 or float64, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2, "tsparse.", op, ": `logits` must be 2-D [T, V], got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "tsparse.", op,
                    ": `logits` must have at least one column (V >= 1), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) < (int64_t(1) << 31) / logits.element_size(), "tsparse.", op,
                    ": `logits` rows of ", logits.size(1),
                    " elements are too wide (2 GiB per row at most)");
  check_int32_rows(logits.size(0), op, "logits");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0,
                    "tsparse.", op, ": `logits` must be aligned to its element size");
}

// Logits whose inner dimension is contiguous are used in place (any row stride); anything
// else is copied once.
inline at::Tensor logits_rows(const at::Tensor& logits) { return rows_view(logits); }

// The in-place backward writes the gradient into `logits` itself: its rows must be distinct
// memory with a contiguous last dimension (otherwise a copy would be written instead).
inline void check_inplace_logits(const at::Tensor& logits, const char* op) {
  check_logits(logits, op);
  TORCH_CHECK_VALUE(logits.size(1) <= 1 || logits.stride(1) == 1, "tsparse.", op,
                    ": the in-place backward needs `logits` with a contiguous last dimension, got "
                    "strides ", logits.strides());
  TORCH_CHECK_VALUE(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), "tsparse.", op,
                    ": the in-place backward needs non-overlapping `logits` rows, got strides ",
                    logits.strides());
}

// scale_rows_ (x[r, :] *= scale, in place): floating rows written once each, a one-element
// floating scale on x's device.
inline void check_scale_rows(const at::Tensor& x, const at::Tensor& scale) {
  constexpr const char* op = "scale_rows_";
  // The dispatcher lets None through for a required Tensor: name it instead of torch's
  // "tensor does not have a device".
  TORCH_CHECK_TYPE(x.defined(), "tsparse.", op, ": `x` must be a tensor, got None");
  TORCH_CHECK_TYPE(scale.defined(), "tsparse.", op, ": `scale` must be a tensor, got None");
  TORCH_CHECK_TYPE(is_row_dtype(x.scalar_type()), "tsparse.", op,
                   ": `x` must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "tsparse.", op, ": `x` must be 2-D, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, "tsparse.", op,
                    ": `x` must have a contiguous last dimension, got strides ", x.strides());
  TORCH_CHECK_VALUE(x.size(0) <= 1 || x.stride(0) >= x.size(1), "tsparse.", op,
                    ": `x` rows must not overlap (each element is scaled once), got strides ", x.strides());
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.device() == x.device(), "tsparse.", op,
                    ": `scale` must be a one-element tensor on ", x.device(), ", got shape ", scale.sizes(), " on ",
                    scale.device());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "tsparse.", op,
                   ": `scale` must be a floating tensor, got ", scale.scalar_type());
}

inline at::Tensor prep_targets(const at::Tensor& targets, const at::Tensor& logits, const char* op) {
  TORCH_CHECK_TYPE(targets.scalar_type() == c10::kLong || targets.scalar_type() == c10::kInt,
                   "tsparse.", op, ": `targets` must be int64 (or int32), got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), "tsparse.", op,
                    ": `targets` must have shape [T] = [", logits.size(0), "], got ",
                    targets.sizes());
  check_same_device(targets, logits, op, "targets", "logits");
  return targets.to(c10::kLong).contiguous();
}

// A per-row / per-token [n] tensor of the accumulator dtype (given or converted), contiguous.
inline at::Tensor prep_vector(const at::Tensor& t, int64_t n, c10::ScalarType acc,
                              const at::Tensor& ref, const char* op, const char* arg,
                              const char* ref_arg) {
  TORCH_CHECK_TYPE(c10::isFloatingType(t.scalar_type()), "tsparse.", op, ": `", arg,
                   "` must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "tsparse.", op, ": `", arg,
                    "` must have shape [", n, "], got ", t.sizes());
  check_same_device(t, ref, op, arg, ref_arg);
  return t.to(acc).contiguous();
}

// ---- logprobs backward ------------------------------------------------------------------
struct LogprobsBwdPrep {
  at::Tensor logits;     // rows view
  at::Tensor targets;    // int64 contiguous
  at::Tensor row_max;    // acc [T]
  at::Tensor log_norm;   // acc [T]
  at::Tensor entropy;    // acc [T] (undefined unless grad_entropy)
  at::Tensor grad_logp;  // acc [T] or undefined
  at::Tensor grad_entropy;
};

inline LogprobsBwdPrep prep_logprobs_backward(const at::Tensor& logits, const at::Tensor& targets,
                                              const at::Tensor& row_max, const at::Tensor& log_norm,
                                              const at::Tensor& entropy,
                                              const c10::optional<at::Tensor>& grad_logp,
                                              const c10::optional<at::Tensor>& grad_entropy,
                                              double temperature, const char* op) {
  check_logits(logits, op);
  check_temperature(temperature, op, logits.scalar_type());
  const int64_t n = logits.size(0);
  const c10::ScalarType acc = logprobs_acc_type(logits.scalar_type());
  LogprobsBwdPrep p;
  p.logits = logits_rows(logits);
  p.targets = prep_targets(targets, logits, op);
  p.row_max = prep_vector(row_max, n, acc, logits, op, "row_max", "logits");
  p.log_norm = prep_vector(log_norm, n, acc, logits, op, "log_norm", "logits");
  if (grad_logp.has_value()) {
    p.grad_logp = prep_vector(*grad_logp, n, acc, logits, op, "grad_logp", "logits");
  }
  if (grad_entropy.has_value()) {
    p.grad_entropy = prep_vector(*grad_entropy, n, acc, logits, op, "grad_entropy", "logits");
    p.entropy = prep_vector(entropy, n, acc, logits, op, "entropy", "logits");
  }
  return p;
}

// The in-place backward overwrites `logits` row by row while later rows still read the per-row
// inputs: any of them that shares storage with `logits` (e.g. `targets` passed as a view of
// the logits' memory) is copied first, or it would be overwritten before it is read.
inline void unalias_from_logits(LogprobsBwdPrep& p, const at::Tensor& logits) {
  for (at::Tensor* t : {&p.targets, &p.row_max, &p.log_norm, &p.entropy, &p.grad_logp, &p.grad_entropy}) {
    if (t->defined() && t->is_alias_of(logits)) *t = t->clone();
  }
}

// ---- per-token GRPO terms -------------------------------------------------------------------
inline grpo::GrpoParams parse_grpo_params(double clip_low, double clip_high, double clip_ratio_c,
                                          c10::string_view kl_type, int64_t clamp_edges,
                                          bool has_ref, const char* op) {
  TORCH_CHECK_VALUE(clamp_edges >= 0 && clamp_edges <= 3, "tsparse.", op,
                    ": `clamp_edges` must be a 2-bit mask in [0, 3], got ", clamp_edges);
  TORCH_CHECK_VALUE(std::isfinite(clip_low) && clip_low >= 0.0, "tsparse.", op,
                    ": `clip_low` must be a finite number >= 0, got ", clip_low);
  TORCH_CHECK_VALUE(std::isfinite(clip_high) && clip_high >= 0.0, "tsparse.", op,
                    ": `clip_high` must be a finite number >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(std::isfinite(clip_ratio_c) && clip_ratio_c > 1.0, "tsparse.", op,
                    ": `clip_ratio_c` must be a finite number > 1 (dual-clip lower bound), got ",
                    clip_ratio_c);
  grpo::GrpoParams p;
  p.ratio_lo = 1.0 - clip_low;
  p.ratio_hi = 1.0 + clip_high;
  p.clip_ratio_c = clip_ratio_c;
  std::string s(kl_type.data(), kl_type.size());
  p.kl_straight_through = !s.empty() && s.back() == '+';
  const std::string base = p.kl_straight_through ? s.substr(0, s.size() - 1) : s;
  grpo::KlType k;
  if (base == "k1" || base == "kl") {
    k = grpo::KlType::kK1;
  } else if (base == "abs") {
    k = grpo::KlType::kAbs;
  } else if (base == "k2" || base == "mse") {
    k = grpo::KlType::kK2;
  } else if (base == "k3" || base == "low_var_kl") {
    k = grpo::KlType::kK3;
  } else {
    TORCH_CHECK_VALUE(false, "tsparse.", op, ": `kl_type` must be one of k1, kl, abs, k2, mse, k3, ",
                      "low_var_kl (optionally with a '+' suffix: straight-through k2 gradient), got '",
                      s, "'");
  }
  p.kl = has_ref ? k : grpo::KlType::kNone;
  p.clamp_lo_edge = (clamp_edges & 1) != 0;
  p.clamp_hi_edge = (clamp_edges & 2) != 0;
  return p;
}

struct GrpoTokenPrep {
  at::Tensor logp, old_logp, advantages, ref_logp, is_weights;  // acc [T] contiguous
  grpo::GrpoParams params;
};

inline GrpoTokenPrep prep_grpo_token_terms(const at::Tensor& logp, const at::Tensor& old_logp,
                                           const at::Tensor& advantages,
                                           const c10::optional<at::Tensor>& ref_logp,
                                           const c10::optional<at::Tensor>& is_weights,
                                           double clip_low, double clip_high, double clip_ratio_c,
                                           c10::string_view kl_type, int64_t clamp_edges) {
  constexpr const char* op = "grpo_token_terms";
  TORCH_CHECK_TYPE(logp.scalar_type() == c10::kFloat || logp.scalar_type() == c10::kDouble,
                   "tsparse.", op, ": `logp` must be float32 or float64, got ", logp.scalar_type());
  TORCH_CHECK_VALUE(logp.dim() == 1, "tsparse.", op, ": `logp` must be 1-D [T], got shape ",
                    logp.sizes());
  const int64_t n = logp.size(0);
  const c10::ScalarType acc = logp.scalar_type();
  GrpoTokenPrep p;
  p.params = parse_grpo_params(clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges,
                               ref_logp.has_value(), op);
  p.logp = logp.contiguous();
  p.old_logp = prep_vector(old_logp, n, acc, logp, op, "old_logp", "logp");
  p.advantages = prep_vector(advantages, n, acc, logp, op, "advantages", "logp");
  if (ref_logp.has_value()) p.ref_logp = prep_vector(*ref_logp, n, acc, logp, op, "ref_logp", "logp");
  if (is_weights.has_value()) {
    p.is_weights = prep_vector(*is_weights, n, acc, logp, op, "is_weights", "logp");
  }
  return p;
}

// ---- fused GRPO loss (grpo_loss_fused / grpo_loss_fused_) --------------------------------
struct GrpoFusedPrep {
  at::Tensor logits;  // rows view
  at::Tensor targets;
  at::Tensor old_logp, advantages, ref_logp, is_weights, token_weight;  // acc [T] contiguous
  grpo::GrpoParams params;
  bool use_kl = false;  // ref_logp given and kl_coef != 0: the loss has kl_coef * kl
  double kl_coef = 0.0;
  double entropy_coef = 0.0;
  bool with_entropy = false;  // entropy output (forced when entropy_coef != 0)
};

inline GrpoFusedPrep prep_grpo_fused(const at::Tensor& logits, const at::Tensor& targets,
                                     const at::Tensor& old_logp, const at::Tensor& advantages,
                                     const c10::optional<at::Tensor>& ref_logp,
                                     const c10::optional<at::Tensor>& is_weights,
                                     const at::Tensor& token_weight, double temperature, double clip_low,
                                     double clip_high, double clip_ratio_c, c10::string_view kl_type,
                                     int64_t clamp_edges, double kl_coef, double entropy_coef,
                                     bool with_entropy, const char* op) {
  check_logits(logits, op);
  check_temperature(temperature, op, logits.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(kl_coef), "tsparse.", op, ": `kl_coef` must be finite, got ", kl_coef);
  TORCH_CHECK_VALUE(std::isfinite(entropy_coef), "tsparse.", op, ": `entropy_coef` must be finite, got ",
                    entropy_coef);
  TORCH_CHECK_VALUE(kl_coef == 0.0 || ref_logp.has_value(), "tsparse.", op,
                    ": `ref_logp` is required when kl_coef != 0 (got kl_coef=", kl_coef, ")");
  const int64_t n = logits.size(0);
  const c10::ScalarType acc = logprobs_acc_type(logits.scalar_type());
  GrpoFusedPrep p;
  p.params = parse_grpo_params(clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges, ref_logp.has_value(), op);
  p.logits = logits_rows(logits);
  p.targets = prep_targets(targets, logits, op);
  p.old_logp = prep_vector(old_logp, n, acc, logits, op, "old_logp", "logits");
  p.advantages = prep_vector(advantages, n, acc, logits, op, "advantages", "logits");
  p.token_weight = prep_vector(token_weight, n, acc, logits, op, "token_weight", "logits");
  if (ref_logp.has_value()) p.ref_logp = prep_vector(*ref_logp, n, acc, logits, op, "ref_logp", "logits");
  if (is_weights.has_value()) p.is_weights = prep_vector(*is_weights, n, acc, logits, op, "is_weights", "logits");
  p.use_kl = ref_logp.has_value() && kl_coef != 0.0;
  p.kl_coef = kl_coef;
  p.entropy_coef = entropy_coef;
  p.with_entropy = with_entropy || entropy_coef != 0.0;
  return p;
}

// The in-place variant overwrites `logits` row by row while other rows' per-token inputs are
// still read: inputs that share its storage are copied first.
inline void unalias_fused_from_logits(GrpoFusedPrep& p, const at::Tensor& logits) {
  for (at::Tensor* t : {&p.targets, &p.old_logp, &p.advantages, &p.ref_logp, &p.is_weights, &p.token_weight}) {
    if (t->defined() && t->is_alias_of(logits)) *t = t->clone();
  }
}

// A [rows, cols] gradient buffer whose rows start at the same offset from a 16-byte boundary
// as the logits' rows (so a kernel can move both with the same 16-byte vectors): contiguous
// when the logits' rows are (the usual case), else the smallest row stride >= cols that is
// congruent to the logits' row stride modulo a 16-byte vector, and the logits' base phase.
// The gradient's rows never overlap, even where the logits' rows do (an expanded or unfolded
// view with a row stride below cols: its rows' gradients differ and autograd sums them).
inline at::Tensor alloc_grad_like_rows(const at::Tensor& rows) {
  const int64_t t = rows.size(0), v = rows.size(1), e = rows.element_size();
  const int64_t s = row_stride(rows);
  const int64_t per_vec = 16 / e;
  const int64_t stride = v + (((s - v) % per_vec) + per_vec) % per_vec;  // >= v, = s mod per_vec
  const int64_t phase = static_cast<int64_t>(reinterpret_cast<uintptr_t>(rows.data_ptr()) % 16) / e;
  if (stride == v && phase == 0) return at::empty({t, v}, rows.options());
  at::Tensor buf = at::empty({t * stride + per_vec}, rows.options());  // storage is 16-byte aligned
  return buf.as_strided({t, v}, {stride, 1}, phase);
}

}  // namespace tsparse
