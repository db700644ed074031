// Per-row and per-token math of the fused GRPO ops, shared by the CPU and CUDA kernels.
//
// No torch headers here: this file is included by .cu translation units.
//
// 1. Online log-sum-exp WITH entropy (one read of a logits row). For z = logits / temperature,
//    a row's state is (m, a, b) with
//        m = max_j z_j,   a = sum_j exp(z_j - m),   b = sum_j exp(z_j - m) * (z_j - m)
//    States combine associatively (merge), so any split of a row over threads, warps or CTAs
//    reduces to the same result up to rounding. Finally
//        log_norm = log(a)          (lse = m + log_norm)
//        entropy  = log(a) - b / a  (= lse - sum_j p_j z_j)
//        logp_t   = (z_t - m) - log_norm
//    The row maximum and log_norm are kept apart (not summed into one lse) so the backward
//    recomputes p_j = exp((z_j - m) - log_norm) without the cancellation an fp32 lse would
//    suffer for logits of magnitude ~1e4 (ulp(1e4) ~ 1e-3).
//
// 2. Backward of one logits element (one pass, nothing [T, V]-sized saved):
//        dz_j = g_logp * ([j == t] - p_j) + g_ent * dH/dz_j,   dH/dz_j = -p_j (z_j - sum_k p_k z_k)
//        dlogits_j = dz_j / temperature
//    with z_j - sum_k p_k z_k = (z_j - m) - mu and mu = b / a = log_norm - entropy.
//
// 3. Per-token GRPO terms: verl 0.9.1 compute_policy_loss_vanilla and kl_penalty, value AND
//    derivative with respect to logp, with torch autograd's conventions at ties and clamp
//    edges (maximum/minimum split the gradient in halves at ties; whether clamp passes the
//    gradient AT its bounds changed in 2026, pytorch PR 191142: older releases pass it, torch
//    2.14 does not (minimum-norm subgradient) - so the caller passes the installed torch's
//    convention), so the gradients equal verl's autograd under the torch that runs it.
//
// -inf logits are allowed (p = 0, no NaN from 0 * -inf); NaN logits give NaN outputs.
#pragma once

#include <cmath>
#include <cstdint>

#if !defined(TSPARSE_HD)
#if defined(__CUDACC__)
#define TSPARSE_HD __host__ __device__ __forceinline__
#else
#define TSPARSE_HD inline
#endif
#endif

namespace tsparse {
namespace grpo {

// Exponent floor used where a probability that is exactly 0 multiplies a log-space offset
// that may be -inf: exp(kMinOffset) == 0 in fp32 and fp64, and 0 * kMinOffset == 0.
constexpr float kMinOffset = -1e30f;

// exp for the softmax terms of the row kernels (one per logit): on the device MUFU.EX2 of
// x * log2(e). Rounding x * log2(e) to fp32 adds ~|x| * 6e-8 relative error on top of ex2's
// ~2 ulp; harmless here, where x <= 0 and a large |x| means a negligible probability.
TSPARSE_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x * 1.4426950408889634f);
#else
  return std::exp(x);
#endif
}
TSPARSE_HD double exp_acc(double x) { return exp(x); }
// exp for the per-token terms (ratio, k3 KL), whose arguments reach +-20: the accurate
// expf (proper range reduction, ~2 ulp), as the CPU's std::exp; one per token, so free.
TSPARSE_HD float exp_token(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
TSPARSE_HD double exp_token(double x) { return exp(x); }
TSPARSE_HD float log_acc(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
TSPARSE_HD double log_acc(double x) { return log(x); }
TSPARSE_HD float max_acc(float a, float b) { return fmaxf(a, b); }  // NaN-ignoring max
TSPARSE_HD double max_acc(double a, double b) { return fmax(a, b); }

template <typename Acc>
TSPARSE_HD Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

// ---------------------------------------------------------------------------------------
// 1. Online log-sum-exp + entropy state.
template <typename Acc>
struct LseState {
  Acc m;  // running max of z (-inf while empty)
  Acc a;  // sum exp(z - m)
  Acc b;  // sum exp(z - m) * (z - m)
};

template <typename Acc>
TSPARSE_HD LseState<Acc> lse_empty() {
  return {neg_inf<Acc>(), Acc(0), Acc(0)};
}

// Moves the state to a new maximum `m_new` >= s.m (no-op when it is not larger).
template <typename Acc>
TSPARSE_HD void lse_raise_max(LseState<Acc>& s, Acc m_new) {
  if (!(m_new > s.m)) return;
  if (s.m == neg_inf<Acc>()) {  // empty (a = b = 0), or NaN-poisoned (kept)
    s.m = m_new;
    return;
  }
  const Acc d = s.m - m_new;  // < 0, finite (m_new may be +inf: then d = -inf)
  const Acc f = exp_acc(d);
  s.b = (s.b + s.a * max_acc(d, Acc(kMinOffset))) * f;
  s.a = s.a * f;
  s.m = m_new;
}

// Adds one element z <= s.m (call lse_raise_max with the batch maximum first). A -inf
// element contributes nothing (and is skipped so an all -inf prefix never forms -inf - -inf);
// NaN (and +inf, whose max makes z - m NaN) turn the sums into NaN, as torch's softmax does.
template <typename Acc>
TSPARSE_HD void lse_add(LseState<Acc>& s, Acc z) {
  if (z == neg_inf<Acc>()) return;
  const Acc t = z - s.m;
  const Acc e = exp_acc(t);
  s.a += e;
  s.b += e * t;
}

template <typename Acc>
TSPARSE_HD LseState<Acc> lse_merge(const LseState<Acc>& x, const LseState<Acc>& y) {
  const Acc m = max_acc(x.m, y.m);
  // A NaN seen anywhere poisons the row, even in a part whose maximum is -inf (the NaN does not
  // raise the NaN-ignoring maximum).
  if (x.a != x.a || y.a != y.a) return {m, x.a + y.a, x.a + y.a};
  if (m == neg_inf<Acc>()) return lse_empty<Acc>();
  LseState<Acc> r{m, Acc(0), Acc(0)};
  if (x.m != neg_inf<Acc>()) {
    const Acc d = x.m - m;
    const Acc f = exp_acc(d);
    r.a += x.a * f;
    r.b += (x.b + x.a * max_acc(d, Acc(kMinOffset))) * f;
  }
  if (y.m != neg_inf<Acc>()) {
    const Acc d = y.m - m;
    const Acc f = exp_acc(d);
    r.a += y.a * f;
    r.b += (y.b + y.a * max_acc(d, Acc(kMinOffset))) * f;
  }
  return r;
}

template <typename Acc>
struct RowStats {
  Acc row_max;   // m
  Acc log_norm;  // log(a)
  Acc entropy;   // log(a) - b / a
};

template <typename Acc>
TSPARSE_HD RowStats<Acc> lse_finish(const LseState<Acc>& s) {
  const Acc la = log_acc(s.a);
  return {s.m, la, la - s.b / s.a};
}

// log p of the target: (z_t - m) - log_norm.
template <typename Acc>
TSPARSE_HD Acc target_logp(Acc z_t, const RowStats<Acc>& st) {
  return (z_t - st.row_max) - st.log_norm;
}

// ---------------------------------------------------------------------------------------
// 2. Backward coefficients of one row and the gradient of one element.
template <typename Acc>
struct RowGrad {
  Acc row_max;    // m
  Acc log_norm;   // log(a)
  Acc mu;         // sum_k p_k (z_k - m) = log_norm - entropy
  Acc g_logp;     // upstream gradient of logp_t
  Acc g_ent;      // upstream gradient of the entropy (0 when none)
  Acc inv_temp;   // 1 / temperature
  TSPARSE_HD bool zero() const { return g_logp == Acc(0) && g_ent == Acc(0); }
};

// d loss / d logits_j for z_j = x * inv_temp; `is_target` marks j == t.
template <typename Acc>
TSPARSE_HD Acc logit_grad(Acc x, bool is_target, const RowGrad<Acc>& g) {
  const Acc t = x * g.inv_temp - g.row_max;  // z_j - m (-inf for -inf logits)
  const Acc p = exp_acc(t - g.log_norm);
  Acc dz = -p * g.g_logp;
  if (g.g_ent != Acc(0)) dz -= g.g_ent * (p * (max_acc(t, Acc(kMinOffset)) - g.mu));
  if (is_target) dz += g.g_logp;
  return dz * g.inv_temp;
}

// ---------------------------------------------------------------------------------------
// 3. Per-token GRPO terms (verl 0.9.1 core_algos.compute_policy_loss_vanilla + kl_penalty).
enum class KlType : int32_t {
  kNone = 0,  // no reference policy: kl = 0
  kK1 = 1,    // "k1" / "kl":           logp - ref
  kAbs = 2,   // "abs":                 |logp - ref|
  kK2 = 3,    // "k2" / "mse":          0.5 (logp - ref)^2
  kK3 = 4,    // "k3" / "low_var_kl":   clamp(exp(c) - c - 1, -10, 10), c = clamp(ref - logp, -20, 20)
};

struct GrpoParams {
  double ratio_lo = 0.8;       // 1 - clip_low
  double ratio_hi = 1.2;       // 1 + clip_high
  double clip_ratio_c = 3.0;   // dual-clip constant (> 1)
  KlType kl = KlType::kNone;
  bool kl_straight_through = false;  // "k1+", "abs+", "k3+": value of the estimator,
                                     // gradient of k2 (logp - ref)
  bool clamp_lo_edge = true;  // clamp(x, lo, hi) passes the gradient at x == lo
  bool clamp_hi_edge = true;  // ... and at x == hi
};

enum : uint8_t {
  kFlagClipped = 1,       // pg_losses2 > pg_losses1   (verl's pg_clipfrac)
  kFlagClippedLower = 2,  // clip_pg_losses1 > pg_losses3 and A < 0   (pg_clipfrac_lower)
};

template <typename Acc>
struct GrpoToken {
  Acc pg;      // per-token policy loss (times the importance weight)
  Acc kl;      // kl penalty estimate (0 without a reference)
  Acc ratio;   // exp(clamp(logp - old_logp, -20, 20))
  Acc dpg;     // d pg / d logp
  Acc dkl;     // d kl / d logp
  Acc dratio;  // d ratio / d logp
  uint8_t flags;
};

// clamp(x, lo, hi) and its derivative mask with torch's conventions (NaN passes through;
// the gradient flows inside (lo, hi) and at an edge when the convention says so).
template <typename Acc>
TSPARSE_HD Acc clamp_acc(Acc x, Acc lo, Acc hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}
template <typename Acc>
TSPARSE_HD bool clamp_passes(Acc x, Acc lo, Acc hi, const GrpoParams& p) {
  return (p.clamp_lo_edge ? x >= lo : x > lo) && (p.clamp_hi_edge ? x <= hi : x < hi);
}

template <typename Acc>
TSPARSE_HD GrpoToken<Acc> grpo_token(Acc logp, Acc old_logp, Acc adv, Acc ref_logp, Acc is_weight,
                                     const GrpoParams& p) {
  GrpoToken<Acc> o;
  o.flags = 0;
  // ratio = exp(clamp(logp - old, -20, 20))
  const Acc nak = logp - old_logp;
  const Acc c = clamp_acc(nak, Acc(-20), Acc(20));
  o.ratio = exp_token(c);
  o.dratio = clamp_passes(nak, Acc(-20), Acc(20), p) ? o.ratio : Acc(0);

  const Acc neg_a = -adv;
  const Acc lo = static_cast<Acc>(p.ratio_lo);
  const Acc hi = static_cast<Acc>(p.ratio_hi);
  // pg_losses1 = -A * ratio; pg_losses2 = -A * clamp(ratio, lo, hi)
  const Acc l1 = neg_a * o.ratio;
  const Acc dl1 = neg_a * o.dratio;
  const Acc l2 = neg_a * clamp_acc(o.ratio, lo, hi);
  const Acc dl2 = clamp_passes(o.ratio, lo, hi, p) ? neg_a * o.dratio : Acc(0);
  if (l2 > l1) o.flags |= kFlagClipped;
  // clip_pg_losses1 = maximum(l1, l2)
  Acc c1, dc1;
  if (l1 > l2) {
    c1 = l1;
    dc1 = dl1;
  } else if (l1 < l2) {
    c1 = l2;
    dc1 = dl2;
  } else {  // tie (or NaN): torch splits the gradient in halves
    c1 = l1 == l2 ? l1 : l1 + l2;  // NaN if either is NaN
    dc1 = Acc(0.5) * dl1 + Acc(0.5) * dl2;
  }
  // pg_losses3 = -A * clip_ratio_c; clip_pg_losses2 = minimum(l3, c1)
  const Acc l3 = neg_a * static_cast<Acc>(p.clip_ratio_c);
  Acc c2, dc2;
  if (l3 < c1) {
    c2 = l3;
    dc2 = Acc(0);
  } else if (l3 > c1) {
    c2 = c1;
    dc2 = dc1;
  } else {
    c2 = l3 == c1 ? c1 : l3 + c1;
    dc2 = Acc(0.5) * dc1;
  }
  if (c1 > l3 && adv < Acc(0)) o.flags |= kFlagClippedLower;
  // pg_losses = where(A < 0, c2, c1) * rollout_is_weights
  o.pg = adv < Acc(0) ? c2 : c1;
  o.dpg = adv < Acc(0) ? dc2 : dc1;
  o.pg *= is_weight;
  o.dpg *= is_weight;

  // kl_penalty(logp, ref, type)
  o.kl = Acc(0);
  o.dkl = Acc(0);
  const Acc d = logp - ref_logp;
  switch (p.kl) {
    case KlType::kK1:
      o.kl = d;
      o.dkl = Acc(1);
      break;
    case KlType::kAbs:
      o.kl = d < Acc(0) ? -d : d;
      o.dkl = d > Acc(0) ? Acc(1) : (d < Acc(0) ? Acc(-1) : Acc(0));
      break;
    case KlType::kK2:
      o.kl = Acc(0.5) * (d * d);
      o.dkl = d;
      break;
    case KlType::kK3: {
      const Acc kl = ref_logp - logp;
      const Acc kc = clamp_acc(kl, Acc(-20), Acc(20));
      const Acc r = exp_token(kc);
      const Acc kld = r - kc - Acc(1);
      o.kl = clamp_acc(kld, Acc(-10), Acc(10));
      const bool pass = clamp_passes(kld, Acc(-10), Acc(10), p) && clamp_passes(kl, Acc(-20), Acc(20), p);
      o.dkl = pass ? -(r - Acc(1)) : Acc(0);
      break;
    }
    default:
      break;
  }
  if (p.kl != KlType::kNone && p.kl_straight_through) o.dkl = d;
  return o;
}

}  // namespace grpo
}  // namespace tsparse
