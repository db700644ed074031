// CUDA kernels of the fused GRPO op family: log-probs (+ entropy) from logits in one read,
// their backward in one pass (optionally in place), and the per-token GRPO terms.
//
// No torch headers: raw pointers and sizes in, launchers out (see grpo_launchers.h). The
// math is grpo_math.h, shared with the CPU kernels.
//
// Layout of the row kernels (forward and backward alike): a "row group" of threads owns one
// row of logits.
//   * cols <= 4096:   one warp per row, 8 rows per 256-thread CTA (warp shuffles only);
//   * cols <= 32768:  one 128-thread CTA per row;
//   * wider rows:     one 512-thread CTA per row (V = 152,064 bf16: 19,008 16-byte vectors,
//                     ~37 per thread).
// Each row is split into a scalar head (up to the first 16-byte boundary), 16-byte vectors
// (ld.global.cs / st.global.cs: the logits are streamed once) and a scalar tail, so any V
// and any row alignment use 16-byte accesses for all but < 2 x 8 elements per row. Every
// thread keeps kUnroll vectors (64 B) in flight; at 2-4 resident 512-thread CTAs per SM that
// is 64-128 KB per SM, above the ~20-40 KB that saturates HBM3.
// Math in base-2 units (grpo_math.h): per element one FFMA x * c - m and one ex2.approx.ftz; the
// hot loops are branch-free (grpo_device.cuh; the SASS is read in profiling/NOTES.md).
// Reductions: the forward's (max, sum, sum * t) state is combined by warp butterflies
// (every lane of the warp participates: trip counts differ only BEFORE the shuffles) and,
// for CTA rows, through shared memory. fp32 accumulation (fp64 for fp64 logits).
// Row offsets are 64-bit (rows * stride can exceed 2^31); offsets within a row are 32-bit
// (the host checks that a row has < 2^31 elements). Grids are never empty (the launchers
// return early) and have at most 2^31 - 1 CTAs (the host checks rows).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "tsparse/cuda_common.cuh"
#include "tsparse/grpo_device.cuh"
#include "tsparse/grpo_launchers.h"
#include "tsparse/grpo_math.h"

namespace tsparse {
namespace cuda {
namespace {

using grpo::LseState;
using grpo::RowGrad;
using grpo::RowSplit;
using grpo::RowStats;
using grpo_dev::RowVec;

constexpr int kWarpRowThreads = 256;   // warp-per-row CTAs: 8 rows each
constexpr int kWarpRowMaxCols = 4096;  // up to 16 vectors per lane (bf16)
constexpr int kMidThreads = 128;
constexpr int kMidRowMaxCols = 32768;
constexpr int kWideThreads = 512;
// 16-byte vectors in flight per thread (64 B): with 3-4 resident 512-thread CTAs that is
// 96-128 KB per SM, above the ~20-40 KB that saturates HBM3.
constexpr int kUnroll = 4;
// Minimum resident CTAs per SM the wide row kernels are compiled for (registers <= 40).
constexpr int kWideMinBlocks = 3;
// ... and the 128-thread (mid-width) row kernels (registers <= 40).
constexpr int kMidMinBlocks = 12;
constexpr int kTokenThreads = 256;
constexpr int kTokenBlocksPerSm = 8;

// The occupancy the row kernels are compiled for (their register budget); fp64 logits (tests
// only) get the registers they need rather than spilling inside their loops.
template <typename T, int THREADS>
constexpr int min_blocks() {
  return sizeof(T) == 8 ? 1 : (THREADS == kWideThreads ? kWideMinBlocks : kMidMinBlocks);
}

// ---------------------------------------------------------------------------------------
// Elem<T> (load/store with fp32 or fp64 accumulation): tsparse/cuda_common.cuh.

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void* row, int cols) {
  // The row is element-aligned (host check), so the misalignment is a multiple of sizeof(T).
  return grpo::split_row(static_cast<int>(reinterpret_cast<uintptr_t>(row) & 15), cols, int(sizeof(T)));
}

__device__ __noinline__ void fail_target(long long row, long long value, long long cols) {
  printf("tsparse.logprobs: `targets[%lld]` = %lld is out of range [0, %lld)\n", row, value, cols);
  TSPARSE_DEVICE_FAIL("tsparse.logprobs: a `targets` value is out of range");
}

// ---------------------------------------------------------------------------------------
// Forward.
template <typename T>
struct FwdParams {
  using Acc = typename Elem<T>::Acc;
  const T* logits;
  int64_t rows;
  int cols;
  int64_t stride;
  const int64_t* targets;
  Acc c;  // log2(e) / temperature
  Acc* logp;
  Acc* row_max;
  Acc* log_norm;
  Acc* entropy;  // null unless WITH_ENT
};

struct NoStore {
  __device__ void operator()(int, const uint4&) const {}
};

// This thread's partial state over its elements of the row (a row group of `group` threads).
template <typename T, bool WITH_ENT>
__device__ __forceinline__ LseState<typename Elem<T>::Acc> stream_row(const T* row, int cols,
                                                                      typename Elem<T>::Acc c, int lane,
                                                                      int group) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  LseState<Acc> st = grpo::lse_empty<Acc>();
  const RowSplit s = split_row<T>(row, cols);
  {
    // Scalar head and tail: fewer than 16 / sizeof(T) (<= 8 <= group) elements each.
    const Acc x0 = lane < s.head ? E::load(row[lane]) : grpo::neg_inf<Acc>();
    const Acc x1 = lane < s.ntail ? E::load(row[s.tail0 + lane]) : grpo::neg_inf<Acc>();
    grpo_dev::add_scalars(x0, x1, c, st);
  }
  const uint4* vp = reinterpret_cast<const uint4*>(row + s.head);  // 16-byte aligned
  grpo_dev::stream_vectors<T, WITH_ENT, kUnroll>(vp, lane, s.nvec, group, c, st, NoStore{});
  return st;
}

// The target index and its logit, loaded before the row streams (the logit's load overlaps
// the stream instead of following the reduction). Called by one thread per row.
template <typename T>
__device__ __forceinline__ typename Elem<T>::Acc load_target(const FwdParams<T>& p, int64_t r, const T* row,
                                                             int64_t& t) {
  t = p.targets[r];
  if (t < 0 || t >= p.cols) fail_target(r, t, p.cols);
  return Elem<T>::load(row[t]);
}

template <typename T, bool WITH_ENT>
__device__ __forceinline__ void finish_forward(const FwdParams<T>& p, int64_t r, typename Elem<T>::Acc x_t,
                                               const LseState<typename Elem<T>::Acc>& st) {
  using Acc = typename Elem<T>::Acc;
  const RowStats<Acc> rs = grpo::lse_finish(st);
  p.logp[r] = grpo::target_logp(x_t, p.c, rs);
  p.row_max[r] = rs.row_max;
  p.log_norm[r] = rs.log_norm;
  if (WITH_ENT) p.entropy[r] = rs.entropy;
}

template <typename T, bool WITH_ENT>
__global__ void __launch_bounds__(kWarpRowThreads) logprobs_fwd_warp_kernel(FwdParams<T> p) {
  using Acc = typename Elem<T>::Acc;
  const int64_t r = int64_t(blockIdx.x) * (kWarpRowThreads / 32) + (threadIdx.x >> 5);
  if (r >= p.rows) return;  // the whole warp leaves together; no CTA-wide barrier below
  const int lane = threadIdx.x & 31;
  const T* row = p.logits + r * p.stride;
  int64_t t = 0;
  Acc x_t = Acc(0);
  if (lane == 0) x_t = load_target(p, r, row, t);
  auto st = stream_row<T, WITH_ENT>(row, p.cols, p.c, lane, 32);
  st = grpo_dev::warp_merge(st);
  if (lane == 0) finish_forward<T, WITH_ENT>(p, r, x_t, st);
}

template <typename T, int THREADS, bool WITH_ENT>
__global__ void __launch_bounds__(THREADS, min_blocks<T, THREADS>())
    logprobs_fwd_cta_kernel(FwdParams<T> p) {
  using Acc = typename Elem<T>::Acc;
  __shared__ LseState<Acc> red[33];
  const int64_t r = blockIdx.x;  // grid == rows
  const T* row = p.logits + r * p.stride;
  int64_t t = 0;
  Acc x_t = Acc(0);
  if (threadIdx.x == 0) x_t = load_target(p, r, row, t);
  auto st = stream_row<T, WITH_ENT>(row, p.cols, p.c, threadIdx.x, THREADS);
  st = grpo_dev::cta_merge<Acc, THREADS>(st, red);
  if (threadIdx.x == 0) finish_forward<T, WITH_ENT>(p, r, x_t, st);
}

// ---------------------------------------------------------------------------------------
// Backward.
template <typename T>
struct BwdParams {
  using Acc = typename Elem<T>::Acc;
  const T* logits;
  T* grad;  // may alias logits
  int64_t rows;
  int cols;
  int64_t lstride;
  int64_t gstride;
  const int64_t* targets;
  const Acc* row_max;
  const Acc* log_norm;
  const Acc* entropy;
  const Acc* g_logp;
  const Acc* g_ent;
  Acc c;         // log2(e) / temperature
  Acc inv_temp;  // 1 / temperature
};

template <typename T>
__device__ __forceinline__ void zero_row(T* out, int cols, int lane, int group) {
  const RowSplit s = split_row<T>(out, cols);
  const T z = Elem<T>::store(typename Elem<T>::Acc(0));
  if (lane < s.head) out[lane] = z;
  if (lane < s.ntail) out[s.tail0 + lane] = z;
  uint4* vo = reinterpret_cast<uint4*>(out + s.head);
  for (int v = lane; v < s.nvec; v += group) __stcs(vo + v, make_uint4(0u, 0u, 0u, 0u));
}

// One row of d loss / d logits: every element without the target term (no compare per
// element), then the thread that wrote the target's element writes it again with the term
// (the same thread, so program order makes its second store the one that stays). In place,
// that thread read the target's logit before anything of its vector was overwritten.
template <typename T, bool WITH_ENT>
__device__ __forceinline__ void backward_row_body(const BwdParams<T>& p, const T* in, T* out, int tt, int lane,
                                                  int group, const RowGrad<typename Elem<T>::Acc>& g) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  if (((reinterpret_cast<uintptr_t>(in) ^ reinterpret_cast<uintptr_t>(out)) & 15) != 0) {
    // Input and output rows sit at different offsets from a 16-byte boundary (a strided
    // logits view with an out-of-place gradient): element-wise. Element j is lane j % group's.
    const Acc x_t = lane == tt % group ? E::load(in[tt]) : Acc(0);
    for (int j = lane; j < p.cols; j += group) out[j] = E::store(grpo::logit_grad_nt<WITH_ENT>(E::load(in[j]), g));
    if (lane == tt % group) out[tt] = E::store(grpo::logit_grad_nt<WITH_ENT>(x_t, g) + g.G);
    return;
  }
  const RowSplit s = split_row<T>(out, p.cols);
  const bool owner = lane == grpo::owner_lane(s, tt, int(sizeof(T)), group);
  const Acc x_t = owner ? E::load(in[tt]) : Acc(0);
  if (lane < s.head) out[lane] = E::store(grpo::logit_grad_nt<WITH_ENT>(E::load(in[lane]), g));
  if (lane < s.ntail) {
    const int j = s.tail0 + lane;
    out[j] = E::store(grpo::logit_grad_nt<WITH_ENT>(E::load(in[j]), g));
  }
  const uint4* vin = reinterpret_cast<const uint4*>(in + s.head);
  uint4* vout = reinterpret_cast<uint4*>(out + s.head);
  grpo_dev::grad_vectors<T, WITH_ENT, kUnroll>([vin](int v) { return __ldcs(vin + v); }, vout, lane, s.nvec,
                                               group, g);
  if (owner) out[tt] = E::store(grpo::logit_grad_nt<WITH_ENT>(x_t, g) + g.G);
}

template <typename T>
__device__ __forceinline__ void backward_row(const BwdParams<T>& p, int64_t r, int lane, int group) {
  using Acc = typename Elem<T>::Acc;
  const int64_t t = p.targets[r];
  if (t < 0 || t >= p.cols) {
    if (lane == 0) fail_target(r, t, p.cols);
    return;
  }
  const Acc g_logp = p.g_logp != nullptr ? p.g_logp[r] : Acc(0);
  const Acc g_ent = p.g_ent != nullptr ? p.g_ent[r] : Acc(0);
  const T* in = p.logits + r * p.lstride;
  T* out = p.grad + r * p.gstride;
  if (g_logp == Acc(0) && g_ent == Acc(0)) {  // e.g. a masked token: write zeros, read nothing
    zero_row<T>(out, p.cols, lane, group);
    return;
  }
  const RowGrad<Acc> g = grpo::make_row_grad<Acc>(p.row_max[r], p.log_norm[r],
                                                  g_ent != Acc(0) ? p.entropy[r] : Acc(0), g_logp, g_ent,
                                                  p.c, p.inv_temp);
  const int tt = static_cast<int>(t);
  if (g_ent != Acc(0)) {
    backward_row_body<T, true>(p, in, out, tt, lane, group, g);
  } else {
    backward_row_body<T, false>(p, in, out, tt, lane, group, g);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpRowThreads) logprobs_bwd_warp_kernel(BwdParams<T> p) {
  const int64_t r = int64_t(blockIdx.x) * (kWarpRowThreads / 32) + (threadIdx.x >> 5);
  if (r >= p.rows) return;
  backward_row<T>(p, r, threadIdx.x & 31, 32);
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS, min_blocks<T, THREADS>())
    logprobs_bwd_cta_kernel(BwdParams<T> p) {
  backward_row<T>(p, blockIdx.x, threadIdx.x, THREADS);
}

// ---------------------------------------------------------------------------------------
// Per-token GRPO terms.
template <typename Acc>
__global__ void __launch_bounds__(kTokenThreads) grpo_token_kernel(GrpoTokenArgs a) {
  const Acc* logp = static_cast<const Acc*>(a.logp);
  const Acc* old_logp = static_cast<const Acc*>(a.old_logp);
  const Acc* adv = static_cast<const Acc*>(a.advantages);
  const Acc* ref = static_cast<const Acc*>(a.ref_logp);
  const Acc* isw = static_cast<const Acc*>(a.is_weights);
  Acc* pg = static_cast<Acc*>(a.pg);
  Acc* kl = static_cast<Acc*>(a.kl);
  Acc* ratio = static_cast<Acc*>(a.ratio);
  Acc* dpg = static_cast<Acc*>(a.dpg);
  Acc* dkl = static_cast<Acc*>(a.dkl);
  Acc* dratio = static_cast<Acc*>(a.dratio);
  for (int64_t i = int64_t(blockIdx.x) * kTokenThreads + threadIdx.x; i < a.n;
       i += int64_t(gridDim.x) * kTokenThreads) {
    const grpo::GrpoToken<Acc> o =
        grpo::grpo_token<Acc>(logp[i], old_logp[i], adv[i], ref != nullptr ? ref[i] : Acc(0),
                              isw != nullptr ? isw[i] : Acc(1), a.params);
    pg[i] = o.pg;
    kl[i] = o.kl;
    ratio[i] = o.ratio;
    dpg[i] = o.dpg;
    dkl[i] = o.dkl;
    dratio[i] = o.dratio;
    a.flags[i] = o.flags;
  }
}

// ---------------------------------------------------------------------------------------
template <typename T, bool WITH_ENT>
void launch_forward_t(const FwdParams<T>& p, cudaStream_t stream) {
  if (p.cols <= kWarpRowMaxCols) {
    constexpr int64_t kRowsPerCta = kWarpRowThreads / 32;
    const int64_t grid = (p.rows + kRowsPerCta - 1) / kRowsPerCta;
    logprobs_fwd_warp_kernel<T, WITH_ENT><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(p);
  } else if (p.cols <= kMidRowMaxCols) {
    logprobs_fwd_cta_kernel<T, kMidThreads, WITH_ENT><<<static_cast<unsigned>(p.rows), kMidThreads, 0, stream>>>(p);
  } else {
    logprobs_fwd_cta_kernel<T, kWideThreads, WITH_ENT><<<static_cast<unsigned>(p.rows), kWideThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_forward(const LogprobsFwdArgs& a, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  FwdParams<T> p;
  p.logits = static_cast<const T*>(a.logits);
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.stride = a.row_stride;
  p.targets = a.targets;
  p.c = grpo::row_scale<Acc>(a.temperature);
  p.logp = static_cast<Acc*>(a.logp);
  p.row_max = static_cast<Acc*>(a.row_max);
  p.log_norm = static_cast<Acc*>(a.log_norm);
  p.entropy = static_cast<Acc*>(a.entropy);
  if (p.entropy != nullptr) {
    launch_forward_t<T, true>(p, stream);
  } else {
    launch_forward_t<T, false>(p, stream);
  }
}

template <typename T>
void launch_backward(const LogprobsBwdArgs& a, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  BwdParams<T> p;
  p.logits = static_cast<const T*>(a.logits);
  p.grad = static_cast<T*>(a.grad);
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.lstride = a.logits_stride;
  p.gstride = a.grad_stride;
  p.targets = a.targets;
  p.row_max = static_cast<const Acc*>(a.row_max);
  p.log_norm = static_cast<const Acc*>(a.log_norm);
  p.entropy = static_cast<const Acc*>(a.entropy);
  p.g_logp = static_cast<const Acc*>(a.grad_logp);
  p.g_ent = static_cast<const Acc*>(a.grad_entropy);
  p.c = grpo::row_scale<Acc>(a.temperature);
  p.inv_temp = static_cast<Acc>(1.0 / a.temperature);
  if (a.cols <= kWarpRowMaxCols) {
    constexpr int64_t kRowsPerCta = kWarpRowThreads / 32;
    const int64_t grid = (a.rows + kRowsPerCta - 1) / kRowsPerCta;
    logprobs_bwd_warp_kernel<T><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(p);
  } else if (a.cols <= kMidRowMaxCols) {
    logprobs_bwd_cta_kernel<T, kMidThreads><<<static_cast<unsigned>(a.rows), kMidThreads, 0, stream>>>(p);
  } else {
    logprobs_bwd_cta_kernel<T, kWideThreads><<<static_cast<unsigned>(a.rows), kWideThreads, 0, stream>>>(p);
  }
}

template <typename F>
void dispatch_logits(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(static_cast<__half*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case DType::kFloat64: f(static_cast<double*>(nullptr)); break;
    default: f(static_cast<float*>(nullptr)); break;
  }
}

}  // namespace

void logprobs_forward(const LogprobsFwdArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.cols <= 0) return;
  dispatch_logits(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_forward<T>(a, stream);
  });
}

void logprobs_backward(const LogprobsBwdArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.cols <= 0) return;
  dispatch_logits(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_backward<T>(a, stream);
  });
}

void grpo_token_terms(const GrpoTokenArgs& a, cudaStream_t stream) {
  if (a.n <= 0) return;
  int64_t blocks = (a.n + kTokenThreads - 1) / kTokenThreads;
  const int64_t cap = int64_t(num_sms()) * kTokenBlocksPerSm;
  if (blocks > cap) blocks = cap;
  if (a.fp64) {
    grpo_token_kernel<double><<<static_cast<unsigned>(blocks), kTokenThreads, 0, stream>>>(a);
  } else {
    grpo_token_kernel<float><<<static_cast<unsigned>(blocks), kTokenThreads, 0, stream>>>(a);
  }
}

}  // namespace cuda
}  // namespace tsparse
