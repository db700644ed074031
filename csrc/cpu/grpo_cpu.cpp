// CPU kernels of the fused GRPO op family. The per-row and per-token math is the
// __host__ __device__ code the CUDA kernels run too (tsparse/grpo_math.h).
//
// Rows are split over threads with at::parallel_for (OpenMP); each row is read once in
// chunks of kChunk elements converted to the accumulator type (fp32, fp64 for fp64 logits):
// each chunk's (max, sum, sum * z) state is formed against the chunk's maximum, then merged
// into the row's state (as the CUDA kernels merge per-thread states). The fp32 element loops
// are branch-free and vectorized (`omp simd`) with a polynomial exp; fp64 uses the scalar
// grpo_math.h functions.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
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

// ---- fp32 fast path (16/32-bit logits) ---------------------------------------------------
// The per-element loops below are written so `#pragma omp simd` vectorizes them with the
// baseline x86-64 ISA (no branches, no libm calls): 2^t comes from exp2_nonpos. fp64 logits use
// the scalar grpo_math.h functions (they exist for reference-precision tests).
constexpr float kExp2Floor = -126.0f;  // 2^t < 2^-126 (the smallest normal float): counted as 0

// GCC only if-converts (and so vectorizes) the selects below without trapping-math: nothing
// here reads floating-point exception flags, so the fast path drops them, in this region only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// 2^t for t <= 0 (small positive t is fine too): t = n + f with n = round(t) (so f = t - n is
// exact, |f| <= 1/2), 2^f = exp(f ln2) by a Cephes-style degree-6 polynomial (~1-2 ulp).
// t < kExp2Floor is clamped (callers zero those terms); NaN stays NaN.
inline float exp2_nonpos(float t) {
  const float tc = t < kExp2Floor ? kExp2Floor : t;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: (v + kRound) - kRound rounds v to an integer
  const float fn = (tc + kRound) - kRound;
  const float r = (tc - fn) * 0.693147180559945309f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(fn) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

// The base-2 (max, sum 2^t, sum 2^t t) state of y[0, n) (one chunk of a row, y = x * c).
inline grpo::LseState<float> chunk_state(const float* z, int64_t n) {
  float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
  for (int64_t k = 0; k < n; ++k) bm = z[k] > bm ? z[k] : bm;
  if (!(bm > -INFINITY)) {  // every element is -inf or NaN: contributes nothing, or NaN
    for (int64_t k = 0; k < n; ++k) {
      if (z[k] != z[k]) return {bm, NAN, NAN};
    }
    return grpo::lse_empty<float>();
  }
  float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
  for (int64_t k = 0; k < n; ++k) {
    const float t = z[k] - bm;  // <= 0, -inf for -inf logits, NaN for NaN / +inf
    const float ex = exp2_nonpos(t);
    const float e = t < kExp2Floor ? 0.0f : ex;
    a += e;
    b += e * (t < kExp2Floor ? kExp2Floor : t);
  }
  return {bm, a, b};
}

// d loss / d logits for x[0, n) into out[0, n), target term NOT included (the caller adds it):
// -p_j (A0 + A1 u_j), u_j = (x_j c - m) - log_norm (grpo_math.h, section 2).
inline void grad_chunk(const float* xf, float* out, int64_t n, const grpo::RowGrad<float>& g) {
  const float m = g.row_max, la = g.log_norm, c = g.c, a0 = g.A0;
  if (g.A1 == 0.0f) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const float u = (xf[k] * c - m) - la;
      const float ex = exp2_nonpos(u);
      const float p = u < kExp2Floor ? 0.0f : ex;
      out[k] = -p * a0;
    }
    return;
  }
  const float a1 = g.A1;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float u = (xf[k] * c - m) - la;
    const float ex = exp2_nonpos(u);
    const float p = u < kExp2Floor ? 0.0f : ex;
    const float uc = u < kExp2Floor ? kExp2Floor : u;
    out[k] = -p * (a0 + a1 * uc);
  }
}

// z[k] = float(x[k]) * scale and out[k] = scalar_t(g[k]), vectorized by hand for bf16 (a
// shift, and round-to-nearest-even with NaN kept NaN, exactly c10::BFloat16's conversions).
template <typename scalar_t>
inline void load_scaled(const scalar_t* x, float* z, int64_t n, float scale) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(x);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) z[k] = __builtin_bit_cast(float, uint32_t(u[k]) << 16) * scale;
  } else {
    for (int64_t k = 0; k < n; ++k) z[k] = static_cast<float>(x[k]) * scale;
  }
}

template <typename scalar_t>
inline void store_from_float(const float* g, scalar_t* out, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint16_t* u = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t b = __builtin_bit_cast(uint32_t, g[k]);
      const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
      u[k] = static_cast<uint16_t>(g[k] != g[k] ? 0x7FC0u : r);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<scalar_t>(g[k]);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// fp64: the shared scalar math.
inline grpo::LseState<double> chunk_state(const double* z, int64_t n) {
  double bm = grpo::neg_inf<double>();
  for (int64_t k = 0; k < n; ++k) bm = grpo::max_acc(bm, z[k]);
  grpo::LseState<double> cs = grpo::lse_empty<double>();
  grpo::lse_raise_max(cs, bm);
  const double base = grpo::offset_base(cs.m);
  for (int64_t k = 0; k < n; ++k) grpo::lse_add_offset(cs, z[k] - base);
  return cs;
}

// One row's base-2 state (y = x * c): chunks of kChunk elements converted to the accumulator type, each chunk's
// state formed against its own maximum, then merged (two-level summation keeps the rounding
// error at ~(kChunk + cols / kChunk) ulps instead of ~cols ulps for a serial sum).
template <typename scalar_t>
grpo::LseState<acc_of<scalar_t>> row_state(const scalar_t* x, int64_t cols, acc_of<scalar_t> c) {
  using acc_t = acc_of<scalar_t>;
  std::array<acc_t, kChunk> z;
  grpo::LseState<acc_t> st = grpo::lse_empty<acc_t>();
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
    const int64_t n = std::min(kChunk, cols - c0);
    if constexpr (std::is_same_v<acc_t, float>) {
      load_scaled(x + c0, z.data(), n, c);
    } else {
      for (int64_t k = 0; k < n; ++k) z[size_t(k)] = static_cast<acc_t>(x[c0 + k]) * c;
    }
    st = grpo::lse_merge(st, chunk_state(z.data(), n));
  }
  return st;
}

void check_targets_in_range(const at::Tensor& targets, int64_t cols, const char* op) {
  const int64_t* t = targets.data_ptr<int64_t>();
  const int64_t n = targets.size(0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < cols, "tsparse.", op, ": `targets[", i, "]` = ", t[i],
                      " is out of range [0, ", cols, ")");
  }
}

// One row of d loss / d logits into o[0, cols) (o may be x itself: in-place backward).
template <typename scalar_t>
void row_grad(const scalar_t* x, scalar_t* o, int64_t cols, int64_t t, const grpo::RowGrad<acc_of<scalar_t>>& g) {
  using acc_t = acc_of<scalar_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    const float xt = static_cast<float>(x[t]);  // read before the row is overwritten
    std::array<float, kChunk> xf, gf;
    for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
      const int64_t n = std::min(kChunk, cols - c0);
      load_scaled(x + c0, xf.data(), n, 1.0f);
      grad_chunk(xf.data(), gf.data(), n, g);
      store_from_float(gf.data(), o + c0, n);
    }
    o[t] = static_cast<scalar_t>(grpo::logit_grad(xt, true, g));
  } else {
    for (int64_t j = 0; j < cols; ++j) {
      o[j] = static_cast<scalar_t>(grpo::logit_grad(static_cast<acc_t>(x[j]), j == t, g));
    }
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
    const acc_t c = grpo::row_scale<acc_t>(temperature);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const acc_t g_logp = gl ? gl[r] : acc_t(0);
        const acc_t g_ent = ge ? ge[r] : acc_t(0);
        scalar_t* o = out + r * out_stride;
        if (g_logp == acc_t(0) && g_ent == acc_t(0)) {
          std::memset(static_cast<void*>(o), 0, size_t(cols) * sizeof(scalar_t));
          continue;
        }
        const grpo::RowGrad<acc_t> g = grpo::make_row_grad<acc_t>(
            rmax[r], lnorm[r], g_ent != acc_t(0) ? ent[r] : acc_t(0), g_logp, g_ent, c, inv_temp);
        const scalar_t* x = in + r * in_stride;
        row_grad<scalar_t>(x, o, cols, tg[r], g);
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
  check_temperature(temperature, op, logits_in.scalar_type());
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
    const acc_t c = grpo::row_scale<acc_t>(temperature);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* x = base + r * stride;
        const grpo::LseState<acc_t> st = row_state<scalar_t>(x, cols, c);
        const grpo::RowStats<acc_t> rs = grpo::lse_finish(st);
        lp[r] = grpo::target_logp(static_cast<acc_t>(x[tg[r]]), c, rs);
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
  LogprobsBwdPrep p = prep_logprobs_backward(logits, targets, row_max, log_norm, entropy,
                                             grad_logp, grad_entropy, temperature, op);
  unalias_from_logits(p, logits);
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

// ---------------------------------------------------------------------------------------
// Fused GRPO loss (grpo_loss(impl="single_read")): the CPU computes the two-pass math row by
// row - the row's state, the per-token terms and coefficients, then the row's gradient (the
// row is read twice, while it is in cache) - with the same functions as logprobs,
// grpo_token_terms and logprobs_backward, so its results equal the two-pass path's bit for bit.
namespace {

struct FusedOut {
  at::Tensor logp, entropy, pg, kl, ratio, flags;
};

FusedOut fused_outputs(const GrpoFusedPrep& p) {
  const int64_t n = p.logits.size(0);
  const auto opts = p.logits.options().dtype(logprobs_acc_type(p.logits.scalar_type()));
  FusedOut o;
  o.logp = at::empty({n}, opts);
  o.entropy = at::empty({p.with_entropy ? n : 0}, opts);
  o.pg = at::empty({n}, opts);
  o.kl = at::empty({n}, opts);
  o.ratio = at::empty({n}, opts);
  o.flags = at::empty({n}, opts.dtype(at::kByte));
  return o;
}

void fused_rows_cpu(const GrpoFusedPrep& p, double temperature, FusedOut& o, void* grad_ptr, int64_t grad_stride) {
  const at::Tensor& logits = p.logits;
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  if (rows == 0) return;
  const int64_t stride = row_stride(logits);
  const int64_t* tg = p.targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "grpo_loss_fused", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* base = static_cast<const scalar_t*>(logits.data_ptr());
    scalar_t* gbase = static_cast<scalar_t*>(grad_ptr);
    const acc_t* old = p.old_logp.data_ptr<acc_t>();
    const acc_t* adv = p.advantages.data_ptr<acc_t>();
    const acc_t* ref = p.ref_logp.defined() ? p.ref_logp.data_ptr<acc_t>() : nullptr;
    const acc_t* isw = p.is_weights.defined() ? p.is_weights.data_ptr<acc_t>() : nullptr;
    const acc_t* w = p.token_weight.data_ptr<acc_t>();
    acc_t* lp = o.logp.data_ptr<acc_t>();
    acc_t* en = p.with_entropy ? o.entropy.data_ptr<acc_t>() : nullptr;
    acc_t* pg = o.pg.data_ptr<acc_t>();
    acc_t* kl = o.kl.data_ptr<acc_t>();
    acc_t* ratio = o.ratio.data_ptr<acc_t>();
    uint8_t* flags = o.flags.data_ptr<uint8_t>();
    const acc_t c = grpo::row_scale<acc_t>(temperature);
    const acc_t inv_temp = static_cast<acc_t>(1.0 / temperature);
    const acc_t kl_coef = static_cast<acc_t>(p.kl_coef);
    const acc_t ent_coef = static_cast<acc_t>(p.entropy_coef);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* x = base + r * stride;
        const grpo::RowStats<acc_t> rs = grpo::lse_finish(row_state<scalar_t>(x, cols, c));
        lp[r] = grpo::target_logp(static_cast<acc_t>(x[tg[r]]), c, rs);
        if (en) en[r] = rs.entropy;
        const grpo::GrpoToken<acc_t> tok = grpo::grpo_token<acc_t>(
            lp[r], old[r], adv[r], ref ? ref[r] : acc_t(0), isw ? isw[r] : acc_t(1), p.params);
        pg[r] = tok.pg;
        kl[r] = tok.kl;
        ratio[r] = tok.ratio;
        flags[r] = tok.flags;
        if (gbase == nullptr) continue;
        const grpo::TokenGrads<acc_t> g = grpo::grpo_token_grads<acc_t>(tok, w[r], p.use_kl, kl_coef, ent_coef);
        scalar_t* out = gbase + r * grad_stride;
        if (g.g_logp == acc_t(0) && g.g_ent == acc_t(0)) {
          std::memset(static_cast<void*>(out), 0, size_t(cols) * sizeof(scalar_t));
          continue;
        }
        const grpo::RowGrad<acc_t> rg = grpo::make_row_grad<acc_t>(
            rs.row_max, rs.log_norm, g.g_ent != acc_t(0) ? rs.entropy : acc_t(0), g.g_logp, g.g_ent, c, inv_temp);
        row_grad<scalar_t>(x, out, cols, tg[r], rg);
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_loss_fused_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& old_logp, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& ref_logp, const c10::optional<at::Tensor>& is_weights,
    const at::Tensor& token_weight, double temperature, double clip_low, double clip_high, double clip_ratio_c,
    c10::string_view kl_type, int64_t clamp_edges, double kl_coef, double entropy_coef, bool with_entropy,
    bool with_grad, bool /*single_read: the CPU always computes the two-pass math*/) {
  constexpr const char* op = "grpo_loss";
  const GrpoFusedPrep p = prep_grpo_fused(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight,
                                          temperature, clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges,
                                          kl_coef, entropy_coef, with_entropy, op);
  check_targets_in_range(p.targets, p.logits.size(1), op);
  FusedOut o = fused_outputs(p);
  at::Tensor grad = with_grad ? alloc_grad_like_rows(p.logits) : at::empty({0, p.logits.size(1)}, p.logits.options());
  fused_rows_cpu(p, temperature, o, with_grad ? grad.data_ptr() : nullptr, with_grad ? row_stride(grad) : 0);
  return {o.logp, o.entropy, o.pg, o.kl, o.ratio, o.flags, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_loss_fused_inplace_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& old_logp, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& ref_logp, const c10::optional<at::Tensor>& is_weights,
    const at::Tensor& token_weight, double temperature, double clip_low, double clip_high, double clip_ratio_c,
    c10::string_view kl_type, int64_t clamp_edges, double kl_coef, double entropy_coef, bool with_entropy,
    bool /*single_read*/) {
  constexpr const char* op = "grpo_loss";
  check_inplace_logits(logits, op);
  GrpoFusedPrep p = prep_grpo_fused(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight,
                                    temperature, clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges, kl_coef,
                                    entropy_coef, with_entropy, op);
  unalias_fused_from_logits(p, logits);
  check_targets_in_range(p.targets, p.logits.size(1), op);
  FusedOut o = fused_outputs(p);
  fused_rows_cpu(p, temperature, o, logits.data_ptr(), row_stride(logits));
  return {o.logp, o.entropy, o.pg, o.kl, o.ratio, o.flags};
}

void scale_rows_cpu(const at::Tensor& x, const at::Tensor& scale) {
  check_scale_rows(x, scale);
  if (x.numel() == 0) return;
  const at::Tensor s = scale.reshape({}).to(logprobs_acc_type(x.scalar_type()));
  if (s.item<double>() == 1.0) return;  // a CPU tensor: reading it is no sync
  at::Tensor xm = x;
  xm.mul_(s);
}

TORCH_LIBRARY_IMPL(tsparse, CPU, m) {
  m.impl("grpo_loss_fused", &grpo_loss_fused_cpu);
  m.impl("grpo_loss_fused_", &grpo_loss_fused_inplace_cpu);
  m.impl("scale_rows_", &scale_rows_cpu);
  m.impl("logprobs", &logprobs_cpu);
  m.impl("logprobs_backward", &logprobs_backward_cpu);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_cpu);
  m.impl("grpo_token_terms", &grpo_token_terms_cpu);
}

}  // namespace tsparse
