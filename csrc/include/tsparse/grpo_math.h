// Per-row and per-token math of the fused GRPO ops, shared by the CPU and CUDA kernels.
//
// No torch headers here: this file is included by .cu translation units.
//
// 1. Online log-sum-exp WITH entropy (one read of a logits row), in BASE-2 units. With
//        c = log2(e) / temperature   (rounded once to the accumulator type by the host: row_scale)
//        y_j = x_j * c               (z_j = x_j / temperature = y_j * ln 2)
//    a row's state is (m, a, b) with
//        m = max_j y_j,   a = sum_j 2^(y_j - m),   b = sum_j 2^(y_j - m) * (y_j - m)
//    States combine associatively (merge), so any split of a row over threads, warps, CTAs or
//    a CTA cluster reduces to the same result up to rounding. Finally (RowStats)
//        row_max  = m,  log_norm = log2(a)                 (base-2 lse = m + log_norm)
//        entropy  = ln2 * (log2(a) - b / a)                (nats)
//        logp_t   = ln2 * ((x_t c - m) - log_norm)         (nats)
//    Why base 2: every element costs one FFMA (x * c - m), one exp2 (MUFU.EX2 on the GPU: no
//    multiplication by log2(e) per element) and two accumulations. The offsets x_j c - m are
//    formed with the same arithmetic in the forward and in the backward (offset2), so the
//    rounding of m (|m| 2^-24, ~1e-3 for logits of 1e4) cancels between them; m and log_norm
//    are kept apart (not summed into one lse) for the same reason.
//
// 2. Backward of one logits element (one pass, nothing [T, V]-sized saved). With
//        u_j = (x_j c - m) - log_norm = log2 p_j,   p_j = 2^u_j,   H = entropy (nats):
//        dz_j      = g_logp ([j == t] - p_j) - g_ent p_j (ln2 u_j + H)       (dH/dz_j = -p_j (ln p_j + H))
//        dlogits_j = dz_j / T = [j == t] G - p_j (A0 + A1 u_j)
//    with the per-row constants (RowGrad) G = g_logp / T, A0 = (g_logp + g_ent H) / T,
//    A1 = g_ent ln2 / T. u_j is clamped at min_log2 (where p_j is exactly 0) before A1
//    multiplies it, so -inf logits give 0, not 0 * inf.
//
// 3. Per-token GRPO terms: verl 0.9.1 compute_policy_loss_vanilla and kl_penalty, value AND
//    derivative with respect to logp, with torch autograd's conventions at ties and clamp
//    edges (maximum/minimum split the gradient in halves at ties; whether clamp passes the
//    gradient AT its bounds changed in 2026, pytorch PR 191142: older releases pass it, torch
//    2.14 does not (minimum-norm subgradient) - so the caller passes the installed torch's
//    convention), so the gradients equal verl's autograd under the torch that runs it.
//    grpo_token_grads turns them into the per-token gradient coefficients of the aggregated
//    loss (g_logp, g_ent), exactly as autograd chains them in tsparse/ops/grpo.py.
//
// -inf logits are allowed (p = 0, no NaN from 0 * -inf); NaN logits give NaN outputs; a row
// whose logits are all -inf gives NaN log-prob and entropy (as torch's log_softmax).
//
// Accuracy of the GPU forward (fp32 accumulation; derivation in profiling/NOTES.md "Accuracy of
// the row kernels", checked by a CPU emulation of the device arithmetic in
// python_tests/test_grpo_device_math.py), with tau_j the exact base-2 offsets from the row max:
//   |logp - logp_exact| <= ln2 2u (|tau_t| + E_p|tau|) + eps_a + ln2 2u |log2 a| + 2u |logp|,
//   u = 2^-24, eps_a = 2^-22 + (9 + R) u + R (2^-22 + u) + levels (2^-22 + 3u)
// (R: batches one thread folds in, levels: merge levels above it); ~1e-5 at V = 152,064.
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

constexpr double kLog2e = 1.44269504088896340736;  // log2(e)
constexpr double kLn2 = 0.693147180559945309417;   // ln(2)

// A base-2 offset that multiplies a probability which may be exactly 0 is clamped here first:
// 2^min_log2 is 0 in the accumulator type (fp32 underflows below 2^-150, fp64 below 2^-1075),
// and min_log2 times any finite coefficient a row uses cannot overflow.
template <typename Acc>
TSPARSE_HD Acc min_log2() {
  return sizeof(Acc) == 4 ? Acc(-256) : Acc(-2048);
}

// Scale of the logits in base-2 units, computed once by the host: c = log2(e) / temperature.
template <typename Acc>
inline Acc row_scale(double temperature) {
  return static_cast<Acc>(kLog2e / temperature);
}

// 2^t for the softmax terms of the row kernels (one per logit). On the device: MUFU.EX2 without
// the denormal fix-up (ex2.approx.ftz.f32; at most 2 ulp for results >= 2^-126, 0 below, where
// a probability is negligible). The CPU uses the accurate exp2 (its vectorized loops use a
// polynomial, grpo_cpu.cpp).
TSPARSE_HD float exp2_row(float t) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
#else
  return std::exp2(t);
#endif
}
TSPARSE_HD double exp2_row(double t) { return exp2(t); }
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
TSPARSE_HD float log2_acc(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}
TSPARSE_HD double log2_acc(double x) { return log2(x); }
TSPARSE_HD float max_acc(float a, float b) { return fmaxf(a, b); }  // NaN-ignoring max
TSPARSE_HD double max_acc(double a, double b) { return fmax(a, b); }

// x * c - m, the base-2 offset of one logit from the row maximum. On the device one FFMA
// (a single rounding); on the host a product and a difference, as the CPU's vectorized loops
// form it (y = x * c, then y - m), so each backend's forward and backward agree bit for bit.
TSPARSE_HD float offset2(float x, float c, float m) {
#if defined(__CUDA_ARCH__)
  return fmaf(x, c, -m);
#else
  return x * c - m;
#endif
}
TSPARSE_HD double offset2(double x, double c, double m) {
#if defined(__CUDA_ARCH__)
  return fma(x, c, -m);
#else
  return x * c - m;
#endif
}

template <typename Acc>
TSPARSE_HD Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

// ---------------------------------------------------------------------------------------
// 1. Online log-sum-exp + entropy state (base 2).
template <typename Acc>
struct LseState {
  Acc m;  // running max of y = x * c (-inf while empty)
  Acc a;  // sum 2^(y - m)
  Acc b;  // sum 2^(y - m) * (y - m)
};

template <typename Acc>
TSPARSE_HD LseState<Acc> lse_empty() {
  return {neg_inf<Acc>(), Acc(0), Acc(0)};
}

// The subtrahend used for offsets against a running maximum m: m itself, or 0 while the state
// is empty (m = -inf: every element so far was -inf, and -inf - -inf would be NaN).
template <typename Acc>
TSPARSE_HD Acc offset_base(Acc m) {
  return m == neg_inf<Acc>() ? Acc(0) : m;
}

// Moves the state to the maximum max(s.m, m_new) (branch-free: a state that is empty, or
// whose maximum does not change, is rescaled by 2^-inf = 0 or 2^0 = 1).
template <typename Acc>
TSPARSE_HD void lse_raise_max(LseState<Acc>& s, Acc m_new) {
  const Acc m = max_acc(s.m, m_new);
  const Acc d = s.m - offset_base(m);  // <= 0; -inf for an empty state
  const Acc f = exp2_row(d);
  s.b = (s.b + s.a * max_acc(d, min_log2<Acc>())) * f;
  s.a = s.a * f;
  s.m = m;
}

// Adds one element with base-2 offset t = offset2(x, c, offset_base(s.m)) <= ~0 (call
// lse_raise_max with the batch maximum first). A -inf element adds 2^-inf = 0 (and its offset
// is clamped before it multiplies that 0); NaN (and +inf, whose max makes the offsets NaN)
// turn the sums into NaN, as torch's softmax does.
template <typename Acc>
TSPARSE_HD void lse_add_offset(LseState<Acc>& s, Acc t) {
  const Acc e = exp2_row(t);
  s.a += e;
  s.b += e * max_acc(t, min_log2<Acc>());
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
    const Acc f = exp2_row(d);
    r.a += x.a * f;
    r.b += (x.b + x.a * max_acc(d, min_log2<Acc>())) * f;
  }
  if (y.m != neg_inf<Acc>()) {
    const Acc d = y.m - m;
    const Acc f = exp2_row(d);
    r.a += y.a * f;
    r.b += (y.b + y.a * max_acc(d, min_log2<Acc>())) * f;
  }
  return r;
}

template <typename Acc>
struct RowStats {
  Acc row_max;   // m (base-2 units of x * c)
  Acc log_norm;  // log2(a)
  Acc entropy;   // ln2 * (log2(a) - b / a), nats
};

template <typename Acc>
TSPARSE_HD RowStats<Acc> lse_finish(const LseState<Acc>& s) {
  const Acc la = log2_acc(s.a);
  return {s.m, la, Acc(kLn2) * (la - s.b / s.a)};
}

// log p of the target (nats) from its logit x_t.
template <typename Acc>
TSPARSE_HD Acc target_logp(Acc x_t, Acc c, const RowStats<Acc>& st) {
  return Acc(kLn2) * (offset2(x_t, c, st.row_max) - st.log_norm);
}

// ---------------------------------------------------------------------------------------
// 2. Backward coefficients of one row and the gradient of one element.
template <typename Acc>
struct RowGrad {
  Acc row_max;   // m
  Acc log_norm;  // log2(a)
  Acc c;         // log2(e) / temperature
  Acc G;         // g_logp / T: the target's extra term
  Acc A0;        // (g_logp + g_ent H) / T
  Acc A1;        // g_ent ln2 / T (0 without an entropy gradient)
  bool zero;     // g_logp == 0 and g_ent == 0: the row's gradient is 0 (written without reading)
};

// g_logp, g_ent: upstream gradients of logp_t and of the entropy; entropy only read when
// g_ent != 0.
template <typename Acc>
TSPARSE_HD RowGrad<Acc> make_row_grad(Acc row_max, Acc log_norm, Acc entropy, Acc g_logp, Acc g_ent,
                                      Acc c, Acc inv_temp) {
  RowGrad<Acc> g;
  g.row_max = row_max;
  g.log_norm = log_norm;
  g.c = c;
  g.zero = g_logp == Acc(0) && g_ent == Acc(0);
  g.G = g_logp * inv_temp;
  g.A0 = (g_ent != Acc(0) ? g_logp + g_ent * entropy : g_logp) * inv_temp;
  g.A1 = g_ent * Acc(kLn2) * inv_temp;
  return g;
}

// d loss / d logits_j WITHOUT the target term (the caller adds G at j == t): -p_j (A0 + A1 u_j).
// WITH_ENT = false drops the A1 term (the row has no entropy gradient).
template <bool WITH_ENT, typename Acc>
TSPARSE_HD Acc logit_grad_nt(Acc x, const RowGrad<Acc>& g) {
  const Acc u = offset2(x, g.c, g.row_max) - g.log_norm;  // log2 p (-inf for -inf logits)
  const Acc p = exp2_row(u);
  if (WITH_ENT) return -p * (g.A0 + g.A1 * max_acc(u, min_log2<Acc>()));
  return -p * g.A0;
}

// The same for any element, target term included.
template <typename Acc>
TSPARSE_HD Acc logit_grad(Acc x, bool is_target, const RowGrad<Acc>& g) {
  const Acc d = g.A1 != Acc(0) ? logit_grad_nt<true>(x, g) : logit_grad_nt<false>(x, g);
  return is_target ? d + g.G : d;
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

// Per-token gradient coefficients of the aggregated GRPO loss with respect to logp_t and to the
// entropy_t, as autograd chains them through tsparse/ops/grpo.py's two-pass graph:
// loss = sum_t w_t * (pg_t + kl_coef kl_t - entropy_coef H_t), w_t = 0 for masked tokens
// (`weight` below), and grpo_token_terms' backward drops a term whose upstream gradient is 0
// (torch.where(g != 0, g * d, 0)), so a masked token's NaN derivative never leaks.
template <typename Acc>
struct TokenGrads {
  Acc g_logp;
  Acc g_ent;
};

template <typename Acc>
TSPARSE_HD TokenGrads<Acc> grpo_token_grads(const GrpoToken<Acc>& o, Acc weight, bool use_kl, Acc kl_coef,
                                            Acc entropy_coef) {
  TokenGrads<Acc> g;
  g.g_logp = weight != Acc(0) ? weight * o.dpg : Acc(0);
  if (use_kl) {
    const Acc gk = kl_coef * weight;
    g.g_logp = g.g_logp + (gk != Acc(0) ? gk * o.dkl : Acc(0));
  }
  g.g_ent = entropy_coef != Acc(0) ? -weight * entropy_coef : Acc(0);
  return g;
}

}  // namespace grpo
}  // namespace tsparse
