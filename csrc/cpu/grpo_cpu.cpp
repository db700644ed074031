// CPU kernels of the fused GRPO op family. The per-row and per-token math is the
// __host__ __device__ code the CUDA kernels run too (tsparse/grpo_math.h).
//
// Rows are split over threads with at::parallel_for (OpenMP); each row is read once in
// chunks of kChunk elements converted to the accumulator type (fp32, fp64 for fp64 logits):
// each chunk's (max, sum, sum * z) state is formed against the chunk's maximum, then merged
// into the row's state (as the CUDA kernels merge per-thread states).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "../common/grpo_args.h"
#include "tsparse/grpo_math.h"

namespace tsparse {

namespace {

constexpr int64_t kChunk = 512;             // elements converted per step of a row
constexpr int64_t kElemsPerTask = 1 << 16;  // parallel_for grain, in logits elements

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(cols, 1)); }

void check_targets_in_range(const at::Tensor& targets, int64_t cols, const char* op) {
  const int64_t* t = targets.data_ptr<int64_t>();
  const int64_t n = targets.size(0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < cols, "tsparse.", op, ": `targets[", i, "]` = ", t[i],
                      " is out of range [0, ", cols, ")");
  }
}

// Writes d loss / d logits of rows [0, rows) into `out` (row stride `out_stride` elements);
// `out` may be the logits' own storage.
void backward_into(const LogprobsBwdPrep& p, void* out_ptr, int64_t out_stride, double temperature) {
  const at::Tensor& logits = p.logits;
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  if (rows == 0) return;
  const int64_t in_stride = row_stride(logits);
  const int64_t* tg = p.targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* in = static_cast<const scalar_t*>(logits.data_ptr());
    scalar_t* out = static_cast<scalar_t*>(out_ptr);
    const acc_t* rmax = p.row_max.data_ptr<acc_t>();
    const acc_t* lnorm = p.log_norm.data_ptr<acc_t>();
    const acc_t* ent = p.entropy.defined() ? p.entropy.data_ptr<acc_t>() : nullptr;
    const acc_t* gl = p.grad_logp.defined() ? p.grad_logp.data_ptr<acc_t>() : nullptr;
    const acc_t* ge = p.grad_entropy.defined() ? p.grad_entropy.data_ptr<acc_t>() : nullptr;
    const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        grpo::RowGrad<acc_t> g;
        g.g_logp = gl ? gl[r] : acc_t(0);
        g.g_ent = ge ? ge[r] : acc_t(0);
        g.inv_temp = inv_temp;
        scalar_t* o = out + r * out_stride;
        if (g.zero()) {
          std::memset(static_cast<void*>(o), 0, size_t(cols) * sizeof(scalar_t));
          continue;
        }
        g.row_max = rmax[r];
        g.log_norm = lnorm[r];
        g.mu = g.g_ent != acc_t(0) ? g.log_norm - ent[r] : acc_t(0);
        const scalar_t* x = in + r * in_stride;
        const int64_t t = tg[r];
        for (int64_t j = 0; j < cols; ++j) {
          o[j] = static_cast<scalar_t>(grpo::logit_grad(static_cast<acc_t>(x[j]), j == t, g));
        }
      }
    });
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& logits_in,
                                                                       const at::Tensor& targets_in,
                                                                       double temperature,
                                                                       bool with_entropy) {
  constexpr const char* op = "logprobs";
  check_logits(logits_in, op);
  check_temperature(temperature, op);
  const at::Tensor logits = logits_rows(logits_in);
  const at::Tensor targets = prep_targets(targets_in, logits, op);
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  check_targets_in_range(targets, cols, op);
  const auto opts = logits.options().dtype(logprobs_acc_type(logits.scalar_type()));
  at::Tensor logp = at::empty({rows}, opts);
  at::Tensor row_max = at::empty({rows}, opts);
  at::Tensor log_norm = at::empty({rows}, opts);
  at::Tensor entropy = at::empty({with_entropy ? rows : 0}, opts);
  if (rows == 0) return {logp, row_max, log_norm, entropy};
  const int64_t stride = row_stride(logits);
  const int64_t* tg = targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* base = static_cast<const scalar_t*>(logits.data_ptr());
    acc_t* lp = logp.data_ptr<acc_t>();
    acc_t* rm = row_max.data_ptr<acc_t>();
    acc_t* ln = log_norm.data_ptr<acc_t>();
    acc_t* en = with_entropy ? entropy.data_ptr<acc_t>() : nullptr;
    const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
      std::array<acc_t, kChunk> z;
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* x = base + r * stride;
        grpo::LseState<acc_t> st = grpo::lse_empty<acc_t>();
        for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
          const int64_t n = std::min(kChunk, cols - c0);
          acc_t bm = grpo::neg_inf<acc_t>();
          for (int64_t k = 0; k < n; ++k) {
            z[size_t(k)] = static_cast<acc_t>(x[c0 + k]) * inv_temp;
            bm = grpo::max_acc(bm, z[size_t(k)]);
          }
          // The chunk's own sums, then merged: two-level summation keeps the fp32 rounding
          // error at ~(kChunk + cols / kChunk) ulps instead of ~cols ulps for a serial sum.
          grpo::LseState<acc_t> cs = grpo::lse_empty<acc_t>();
          grpo::lse_raise_max(cs, bm);
          for (int64_t k = 0; k < n; ++k) grpo::lse_add(cs, z[size_t(k)]);
          st = grpo::lse_merge(st, cs);
        }
        const grpo::RowStats<acc_t> rs = grpo::lse_finish(st);
        lp[r] = grpo::target_logp(static_cast<acc_t>(x[tg[r]]) * inv_temp, rs);
        rm[r] = rs.row_max;
        ln[r] = rs.log_norm;
        if (en) en[r] = rs.entropy;
      }
    });
  });
  return {logp, row_max, log_norm, entropy};
}

at::Tensor logprobs_backward_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& row_max, const at::Tensor& log_norm,
                                 const at::Tensor& entropy, const c10::optional<at::Tensor>& grad_logp,
                                 const c10::optional<at::Tensor>& grad_entropy, double temperature) {
  constexpr const char* op = "logprobs_backward";
  const LogprobsBwdPrep p = prep_logprobs_backward(logits, targets, row_max, log_norm, entropy,
                                                   grad_logp, grad_entropy, temperature, op);
  check_targets_in_range(p.targets, p.logits.size(1), op);
  at::Tensor grad = at::empty({p.logits.size(0), p.logits.size(1)}, p.logits.options());
  backward_into(p, grad.data_ptr(), p.logits.size(1), temperature);
  return grad;
}

void logprobs_backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                   const at::Tensor& row_max, const at::Tensor& log_norm,
                                   const at::Tensor& entropy, const c10::optional<at::Tensor>& grad_logp,
                                   const c10::optional<at::Tensor>& grad_entropy, double temperature) {
  constexpr const char* op = "logprobs_backward_";
  check_inplace_logits(logits, op);
  const LogprobsBwdPrep p = prep_logprobs_backward(logits, targets, row_max, log_norm, entropy,
                                                   grad_logp, grad_entropy, temperature, op);
  check_targets_in_range(p.targets, p.logits.size(1), op);
  backward_into(p, logits.data_ptr(), row_stride(logits), temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
grpo_token_terms_cpu(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                     const c10::optional<at::Tensor>& ref_logp, const c10::optional<at::Tensor>& is_weights,
                     double clip_low, double clip_high, double clip_ratio_c, c10::string_view kl_type,
                     int64_t clamp_edges) {
  const GrpoTokenPrep p = prep_grpo_token_terms(logp, old_logp, advantages, ref_logp, is_weights,
                                                clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges);
  const int64_t n = p.logp.size(0);
  const auto opts = p.logp.options();
  at::Tensor pg = at::empty({n}, opts), kl = at::empty({n}, opts), ratio = at::empty({n}, opts);
  at::Tensor dpg = at::empty({n}, opts), dkl = at::empty({n}, opts), dratio = at::empty({n}, opts);
  at::Tensor flags = at::empty({n}, opts.dtype(at::kByte));
  if (n == 0) return {pg, kl, ratio, flags, dpg, dkl, dratio};
  AT_DISPATCH_FLOATING_TYPES(p.logp.scalar_type(), "grpo_token_terms", [&] {
    const scalar_t* lp = p.logp.data_ptr<scalar_t>();
    const scalar_t* old = p.old_logp.data_ptr<scalar_t>();
    const scalar_t* adv = p.advantages.data_ptr<scalar_t>();
    const scalar_t* ref = p.ref_logp.defined() ? p.ref_logp.data_ptr<scalar_t>() : nullptr;
    const scalar_t* isw = p.is_weights.defined() ? p.is_weights.data_ptr<scalar_t>() : nullptr;
    scalar_t* o_pg = pg.data_ptr<scalar_t>();
    scalar_t* o_kl = kl.data_ptr<scalar_t>();
    scalar_t* o_ratio = ratio.data_ptr<scalar_t>();
    scalar_t* o_dpg = dpg.data_ptr<scalar_t>();
    scalar_t* o_dkl = dkl.data_ptr<scalar_t>();
    scalar_t* o_dratio = dratio.data_ptr<scalar_t>();
    uint8_t* o_flags = flags.data_ptr<uint8_t>();
    at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const grpo::GrpoToken<scalar_t> o = grpo::grpo_token<scalar_t>(
            lp[i], old[i], adv[i], ref ? ref[i] : scalar_t(0), isw ? isw[i] : scalar_t(1), p.params);
        o_pg[i] = o.pg;
        o_kl[i] = o.kl;
        o_ratio[i] = o.ratio;
        o_dpg[i] = o.dpg;
        o_dkl[i] = o.dkl;
        o_dratio[i] = o.dratio;
        o_flags[i] = o.flags;
      }
    });
  });
  return {pg, kl, ratio, flags, dpg, dkl, dratio};
}

TORCH_LIBRARY_IMPL(tsparse, CPU, m) {
  m.impl("logprobs", &logprobs_cpu);
  m.impl("logprobs_backward", &logprobs_backward_cpu);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_cpu);
  m.impl("grpo_token_terms", &grpo_token_terms_cpu);
}

}  // namespace tsparse
