// Single-read fused GRPO loss: d loss / d logits written in the same pass that reads the logits.
//
// Design (profiling/NOTES.md "Fused GRPO", single read): the per-token gradient coefficients of
// the GRPO loss are known as soon as a row's (max, sum, sum * t) state and its target logit are:
// the aggregation weights (token_weight) do not depend on the logits. So one thread-block
// cluster of `ctas` CTAs (grpo_layout.h plan_cluster: 1-8) owns one row:
//   1. each CTA streams its contiguous slice of the row's 16-byte vectors (LDG.E.128, evict
//      first) into shared memory (STS.128) while folding them into its online state (the same
//      branch-free loop as the two-pass forward, grpo_device.cuh); rank 0 also takes the row's
//      scalar head, the last rank its scalar tail (kept in registers);
//   2. the CTA's state is reduced (warp butterflies + shared memory), then the cluster's:
//      cluster barrier, and thread 0 of EVERY CTA reads all CTAs' states through distributed
//      shared memory (mapa + ld.shared::cluster) and merges them in rank order, so every CTA
//      computes bit-identical row statistics and per-token coefficients (grpo_token,
//      grpo_token_grads, make_row_grad); rank 0 writes the per-token outputs;
//   3. each CTA writes the gradient of its slice from shared memory (LDS.128 -> STG.E.128),
//      the thread that wrote the target's element writes it again with the target term;
//      a second cluster barrier keeps every CTA's shared memory alive until all remote reads
//      are done (arrive after reading, wait before exit).
// DRAM traffic: 2 B read + 2 B written per bf16 logit (4 B/element), plus O(rows).
// The upstream gradient of the loss is applied in backward by scale_rows_by_device_scalar,
// whose CTAs return at once when it is 1 (the usual loss.backward()).
//
// No torch headers (grpo_cuda.cpp holds the glue).
#include <cooperative_groups.h>
#include <atomic>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "tsparse/cuda_common.cuh"
#include "tsparse/grpo_device.cuh"
#include "tsparse/grpo_launchers.h"
#include "tsparse/grpo_layout.h"
#include "tsparse/grpo_math.h"

namespace tsparse {
namespace cuda {
namespace {

namespace cg = cooperative_groups;
using grpo::LseState;
using grpo::RowGrad;
using grpo::RowSplit;
using grpo::RowStats;

constexpr int kUnroll = 4;               // 16-byte vectors in flight per thread in the read phase
// CTAs per SM the cluster kernel is compiled for: 512 threads, 16-bit logits: 3 (<= 40 registers;
// the reference row's 76,032 B slices let 3 reside); 128 threads (slices <= 16 KB): 12; fp32
// logits get 64 registers (2 / 8 CTAs) instead of spilling.
constexpr int kClusterMinBlocks = 3;
constexpr int kClusterSmallMinBlocks = 12;

template <typename T, int THREADS>
constexpr int cluster_min_blocks() {
  return THREADS == grpo::kClusterThreads ? (sizeof(T) == 2 ? kClusterMinBlocks : 2)
                                          : (sizeof(T) == 2 ? kClusterSmallMinBlocks : 8);
}
constexpr int kTokenThreads = 256;
constexpr int kTokenBlocksPerSm = 8;
constexpr int kScaleThreads = 256;
constexpr int kScaleBlocksPerSm = 8;

__device__ __noinline__ void fail_target_fused(long long row, long long value, long long cols) {
  printf("tsparse.grpo_loss: `targets[%lld]` = %lld is out of range [0, %lld)\n", row, value, cols);
  TSPARSE_DEVICE_FAIL("tsparse.grpo_loss: a `targets` value is out of range");
}

template <typename T>
struct FusedParams {
  using Acc = typename Elem<T>::Acc;
  const T* logits;
  T* grad;
  int64_t rows;
  int cols;
  int64_t lstride;
  int64_t gstride;
  const int64_t* targets;
  const Acc* old_logp;
  const Acc* adv;
  const Acc* ref;  // may be null
  const Acc* isw;  // may be null
  const Acc* weight;
  grpo::GrpoParams params;
  bool use_kl;
  Acc kl_coef;
  Acc entropy_coef;
  Acc c;
  Acc inv_temp;
  Acc* logp;
  Acc* entropy;  // may be null
  Acc* pg;
  Acc* kl;
  Acc* ratio;
  uint8_t* flags;
  int slice_vecs;
};

// The per-token part of a row once its state is known: outputs (when `write`) and the row's
// gradient coefficients. Shared by the cluster kernel (one thread per CTA) and the two-pass
// token kernel's math (grpo_token + grpo_token_grads).
template <typename Acc>
struct RowResult {
  RowStats<Acc> stats;
  Acc logp;
  grpo::GrpoToken<Acc> tok;
  grpo::TokenGrads<Acc> grads;
};

template <typename Acc>
__device__ __forceinline__ RowResult<Acc> row_result(const LseState<Acc>& st, Acc x_t, Acc c, Acc old_logp,
                                                     Acc adv, Acc ref, Acc isw, Acc weight,
                                                     const grpo::GrpoParams& params, bool use_kl, Acc kl_coef,
                                                     Acc entropy_coef) {
  RowResult<Acc> o;
  o.stats = grpo::lse_finish(st);
  o.logp = grpo::target_logp(x_t, c, o.stats);
  o.tok = grpo::grpo_token<Acc>(o.logp, old_logp, adv, ref, isw, params);
  o.grads = grpo::grpo_token_grads<Acc>(o.tok, weight, use_kl, kl_coef, entropy_coef);
  return o;
}

// Distributed shared memory and cluster barriers, in raw PTX so the SASS shows exactly what
// runs (MAPA + LDS through the shared::cluster window, UCGABAR_ARV / UCGABAR_WAIT).
__device__ __forceinline__ float dsmem_load(const float* local, unsigned rank) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(local));
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}

__device__ __forceinline__ LseState<float> dsmem_load_state(const LseState<float>* local, unsigned rank) {
  return {dsmem_load(&local->m, rank), dsmem_load(&local->a, rank), dsmem_load(&local->b, rank)};
}

// arrive.release + wait.acquire: this CTA's shared-memory writes before it are visible to the
// cluster's ld.shared::cluster after it.
__device__ __forceinline__ void cluster_sync_acq_rel() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// A relaxed arrive: "this CTA is done reading the others' shared memory". The remote loads it
// follows have returned (their values were consumed before), so no fence is needed; paired
// with cluster_wait() before the CTA exits.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

// What thread 0 of each CTA hands to the others through shared memory.
template <typename Acc>
struct RowShared {
  RowGrad<Acc> g;
  Acc x_t;
  int t;
};

template <typename T, int THREADS, bool WITH_ENT>
__global__ void __launch_bounds__(THREADS, cluster_min_blocks<T, THREADS>())
    grpo_loss_cluster_kernel(FusedParams<T> p) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  constexpr int kElem = int(sizeof(T));
  extern __shared__ uint4 slice[];  // this CTA's vectors of the row (p.slice_vecs at most)
  __shared__ LseState<Acc> red[33];
  __shared__ RowShared<Acc> shared_row;
  __shared__ Acc tok_in[5];  // old_logp, advantage, ref_logp, is_weight, token_weight of the row

  const int rank = static_cast<int>(cg::this_cluster().block_rank());
  const int ctas = static_cast<int>(cg::this_cluster().num_blocks());
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x / ctas;  // clusters are consecutive CTAs along x
  const T* in = p.logits + r * p.lstride;
  T* out = p.grad + r * p.gstride;
  const RowSplit s = grpo::split_row(static_cast<int>(reinterpret_cast<uintptr_t>(in) & 15), p.cols, kElem);
  const grpo::Slice sl = grpo::cluster_slice(s.nvec, p.slice_vecs, rank);
  const int nlocal = sl.end - sl.begin;

  // Per-token inputs first (their latency hides behind the row instead of stalling the CTA after
  // the reduction); the target's logit is read before any CTA of the cluster writes (the writes
  // follow the cluster barrier below).
  // Threads 1-5 each hold one per-token input in a register (one register for every thread, not
  // five for thread 0) and hand it over through shared memory before the reduction.
  int64_t t = 0;
  Acc x_t = Acc(0);
  if (tid == 0) {
    t = p.targets[r];
    if (t < 0 || t >= p.cols) fail_target_fused(r, t, p.cols);
    x_t = E::load(in[t]);
  }
  Acc tok_val = Acc(0);
  if (tid >= 1 && tid <= 5) {
    const Acc* src = tid == 1 ? p.old_logp : tid == 2 ? p.adv : tid == 3 ? p.ref : tid == 4 ? p.isw : p.weight;
    tok_val = src != nullptr ? src[r] : (tid == 4 ? Acc(1) : Acc(0));  // is_weights default 1, ref 0
  }

  // 1. Read phase: the row's scalar head (rank 0) and tail (last rank) into registers, the
  // slice's vectors into shared memory, everything into this thread's state.
  const bool head_lane = rank == 0 && tid < s.head;
  const bool tail_lane = rank == ctas - 1 && tid < s.ntail;
  const Acc x0 = head_lane ? E::load(in[tid]) : grpo::neg_inf<Acc>();
  const Acc x1 = tail_lane ? E::load(in[s.tail0 + tid]) : grpo::neg_inf<Acc>();
  LseState<Acc> st = grpo::lse_empty<Acc>();
  grpo_dev::add_scalars(x0, x1, p.c, st);
  const uint4* vin = reinterpret_cast<const uint4*>(in + s.head) + sl.begin;  // 16-byte aligned
  grpo_dev::stream_vectors<T, WITH_ENT, kUnroll>(vin, tid, nlocal, THREADS, p.c, st,
                                                 [](int i, const uint4& q) { slice[i] = q; });

  // 2. Row statistics: CTA, then cluster (every CTA merges all ranks in rank order).
  static_assert(std::is_same_v<Acc, float>, "the cluster kernel runs 16/32-bit logits");
  if (tid >= 1 && tid <= 5) tok_in[tid - 1] = tok_val;  // visible to thread 0 after the barriers below
  grpo_dev::cta_merge<Acc, THREADS>(st, red);  // red[32] = this CTA's state
  cluster_sync_acq_rel();                       // every CTA's red[32] is written and visible
  if (tid == 0) {
    LseState<Acc> row = grpo::lse_empty<Acc>();
    for (int k = 0; k < ctas; ++k) row = grpo::lse_merge(row, dsmem_load_state(&red[32], static_cast<unsigned>(k)));
    const RowResult<Acc> o = row_result<Acc>(row, x_t, p.c, tok_in[0], tok_in[1], tok_in[2], tok_in[3], tok_in[4],
                                             p.params, p.use_kl, p.kl_coef, p.entropy_coef);
    if (rank == 0) {
      p.logp[r] = o.logp;
      if (p.entropy != nullptr) p.entropy[r] = o.stats.entropy;
      p.pg[r] = o.tok.pg;
      p.kl[r] = o.tok.kl;
      p.ratio[r] = o.tok.ratio;
      p.flags[r] = o.tok.flags;
    }
    shared_row.g = grpo::make_row_grad<Acc>(o.stats.row_max, o.stats.log_norm, o.stats.entropy, o.grads.g_logp,
                                            o.grads.g_ent, p.c, p.inv_temp);
    shared_row.x_t = x_t;
    shared_row.t = static_cast<int>(t);
  }
  cluster_arrive_relaxed();  // this CTA's reads of the others' red[32] are done
  __syncthreads();           // shared_row and the slice are visible to the whole CTA

  // 3. Write phase: the gradient of the slice from shared memory.
  const RowGrad<Acc> g = shared_row.g;
  uint4* vout = reinterpret_cast<uint4*>(out + s.head) + sl.begin;
  if (g.zero) {  // a masked token (weight 0): zeros, no reads
    for (int i = tid; i < nlocal; i += THREADS) __stcs(vout + i, make_uint4(0u, 0u, 0u, 0u));
    const T z = E::store(Acc(0));
    if (head_lane) out[tid] = z;
    if (tail_lane) out[s.tail0 + tid] = z;
  } else {
    const auto load = [](int i) { return slice[i]; };
    if (g.A1 != Acc(0)) {
      grpo_dev::grad_vectors<T, true, kUnroll>(load, vout, tid, nlocal, THREADS, g);
      if (head_lane) out[tid] = E::store(grpo::logit_grad_nt<true>(x0, g));
      if (tail_lane) out[s.tail0 + tid] = E::store(grpo::logit_grad_nt<true>(x1, g));
    } else {
      grpo_dev::grad_vectors<T, false, kUnroll>(load, vout, tid, nlocal, THREADS, g);
      if (head_lane) out[tid] = E::store(grpo::logit_grad_nt<false>(x0, g));
      if (tail_lane) out[s.tail0 + tid] = E::store(grpo::logit_grad_nt<false>(x1, g));
    }
    // The target's element, again, by the thread that wrote it (program order keeps this one).
    const int tt = shared_row.t;
    grpo::ClusterPlan plan{true, ctas, THREADS, p.slice_vecs, 0};
    const grpo::Owner own = grpo::cluster_owner(s, plan, tt, kElem);
    if (own.rank == rank && own.thread == tid) out[tt] = E::store(grpo::logit_grad(shared_row.x_t, true, g));
  }
  cluster_wait();  // no CTA leaves while another may still read its red[32]
}

// ---------------------------------------------------------------------------------------
// Two-pass fallback: per-token terms and gradient coefficients (one thread per token).
template <typename Acc>
__global__ void __launch_bounds__(kTokenThreads) grpo_token_grads_kernel(GrpoFusedArgs a, GrpoTwoPassTemps tmp) {
  const Acc* logp = static_cast<const Acc*>(a.logp);
  const Acc* old_logp = static_cast<const Acc*>(a.old_logp);
  const Acc* adv = static_cast<const Acc*>(a.advantages);
  const Acc* ref = static_cast<const Acc*>(a.ref_logp);
  const Acc* isw = static_cast<const Acc*>(a.is_weights);
  const Acc* w = static_cast<const Acc*>(a.token_weight);
  Acc* pg = static_cast<Acc*>(a.pg);
  Acc* kl = static_cast<Acc*>(a.kl);
  Acc* ratio = static_cast<Acc*>(a.ratio);
  Acc* g_logp = static_cast<Acc*>(tmp.g_logp);
  Acc* g_ent = static_cast<Acc*>(tmp.g_ent);
  for (int64_t i = int64_t(blockIdx.x) * kTokenThreads + threadIdx.x; i < a.rows;
       i += int64_t(gridDim.x) * kTokenThreads) {
    const grpo::GrpoToken<Acc> o =
        grpo::grpo_token<Acc>(logp[i], old_logp[i], adv[i], ref != nullptr ? ref[i] : Acc(0),
                              isw != nullptr ? isw[i] : Acc(1), a.params);
    pg[i] = o.pg;
    kl[i] = o.kl;
    ratio[i] = o.ratio;
    a.flags[i] = o.flags;
    const grpo::TokenGrads<Acc> g = grpo::grpo_token_grads<Acc>(o, w[i], a.use_kl, static_cast<Acc>(a.kl_coef),
                                                                static_cast<Acc>(a.entropy_coef));
    g_logp[i] = g.g_logp;
    g_ent[i] = g.g_ent;
  }
}

// ---------------------------------------------------------------------------------------
// x[r, :] *= *scale, nothing when *scale == 1.
template <typename T>
__global__ void __launch_bounds__(kScaleThreads) scale_rows_kernel(T* x, int64_t rows, int cols, int64_t stride,
                                                                   const typename Elem<T>::Acc* scale) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  using V = grpo_dev::RowVec<T>;
  const Acc s = *scale;
  if (s == Acc(1)) return;  // the usual loss.backward(): the gradient is already final
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* row = x + r * stride;
    const RowSplit sp = grpo::split_row(static_cast<int>(reinterpret_cast<uintptr_t>(row) & 15), cols, int(sizeof(T)));
    if (int(threadIdx.x) < sp.head) row[threadIdx.x] = E::store(E::load(row[threadIdx.x]) * s);
    if (int(threadIdx.x) < sp.ntail) row[sp.tail0 + threadIdx.x] = E::store(E::load(row[sp.tail0 + threadIdx.x]) * s);
    uint4* vp = reinterpret_cast<uint4*>(row + sp.head);
    const auto scaled = [s](const uint4& q) {
      Acc e[V::kElems];
      V::unpack(q, e);
#pragma unroll
      for (int k = 0; k < V::kElems; ++k) e[k] *= s;
      return grpo_dev::pack_vec<T>(e);
    };
    int v = threadIdx.x;
#pragma unroll 1  // one trip per iteration: its loads stay ahead of its stores
    for (; v + (kUnroll - 1) * kScaleThreads < sp.nvec; v += kUnroll * kScaleThreads) {
      uint4 q[kUnroll];  // every load of the trip before its first store
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) q[k] = vp[v + k * kScaleThreads];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) vp[v + k * kScaleThreads] = scaled(q[k]);
    }
    for (; v < sp.nvec; v += kScaleThreads) vp[v] = scaled(vp[v]);
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

int elem_size(DType d) {
  switch (d) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    default: return 4;
  }
}

// Raises the kernel's dynamic shared memory limit to the largest slice any plan uses, once per
// device (the limit does not change occupancy; the launch's own size does).
template <typename T, int THREADS, bool WITH_ENT>
cudaError_t allow_max_slice() {
  auto kernel = grpo_loss_cluster_kernel<T, THREADS, WITH_ENT>;
  static std::atomic<bool> done[64];  // one set per instantiation (= per kernel) and device
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < 64 && done[dev].load()) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, grpo::kClusterSliceMaxBytes);
  if (err == cudaSuccess && dev >= 0 && dev < 64) done[dev].store(true);
  return err;
}

template <typename T, int THREADS, bool WITH_ENT>
cudaError_t launch_cluster(const FusedParams<T>& p, const grpo::ClusterPlan& plan, cudaStream_t stream) {
  auto kernel = grpo_loss_cluster_kernel<T, THREADS, WITH_ENT>;
  cudaError_t err = allow_max_slice<T, THREADS, WITH_ENT>();
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.rows * plan.ctas), 1, 1);
  cfg.blockDim = dim3(THREADS, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(plan.smem_bytes);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(plan.ctas);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

template <typename T, int THREADS>
int max_active_clusters(const grpo::ClusterPlan& plan) {
  auto kernel = grpo_loss_cluster_kernel<T, THREADS, true>;
  if (allow_max_slice<T, THREADS, true>() != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(plan.ctas), 1, 1);
  cfg.blockDim = dim3(THREADS, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(plan.smem_bytes);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(plan.ctas);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace

bool grpo_loss_single_read_supported(int64_t rows, int64_t cols, DType dtype) {
  const grpo::ClusterPlan plan = grpo::plan_cluster(cols, elem_size(dtype));
  if (!plan.ok || rows <= 0) return false;
  if (rows > (int64_t(1) << 31) / plan.ctas - 1) return false;  // grid.x = rows * ctas
  int dev = 0, cc = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (cc < 9) return false;  // thread-block clusters need sm_90
  // The occupancy query is a host-side calculation, cached per device and plan (a few calls).
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int, int>, bool> cache;
  const auto key = std::make_tuple(dev, static_cast<int>(dtype), plan.ctas, plan.threads, plan.smem_bytes);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int active = 0;
  dispatch_logits(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (sizeof(T) == 2 || sizeof(T) == 4) {
      active = plan.threads == grpo::kClusterThreads ? max_active_clusters<T, grpo::kClusterThreads>(plan)
                                                     : max_active_clusters<T, grpo::kClusterSmallThreads>(plan);
    }
  });
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = active > 0;
  return active > 0;
}

cudaError_t grpo_loss_single_read(const GrpoFusedArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.cols <= 0) return cudaSuccess;
  const grpo::ClusterPlan plan = grpo::plan_cluster(a.cols, elem_size(a.dtype));
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_logits(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (sizeof(T) == 2 || sizeof(T) == 4) {
      using Acc = typename Elem<T>::Acc;
      FusedParams<T> p;
      p.logits = static_cast<const T*>(a.logits);
      p.grad = static_cast<T*>(a.grad);
      p.rows = a.rows;
      p.cols = static_cast<int>(a.cols);
      p.lstride = a.logits_stride;
      p.gstride = a.grad_stride;
      p.targets = a.targets;
      p.old_logp = static_cast<const Acc*>(a.old_logp);
      p.adv = static_cast<const Acc*>(a.advantages);
      p.ref = static_cast<const Acc*>(a.ref_logp);
      p.isw = static_cast<const Acc*>(a.is_weights);
      p.weight = static_cast<const Acc*>(a.token_weight);
      p.params = a.params;
      p.use_kl = a.use_kl;
      p.kl_coef = static_cast<Acc>(a.kl_coef);
      p.entropy_coef = static_cast<Acc>(a.entropy_coef);
      p.c = grpo::row_scale<Acc>(a.temperature);
      p.inv_temp = static_cast<Acc>(1.0 / a.temperature);
      p.logp = static_cast<Acc*>(a.logp);
      p.entropy = static_cast<Acc*>(a.entropy);
      p.pg = static_cast<Acc*>(a.pg);
      p.kl = static_cast<Acc*>(a.kl);
      p.ratio = static_cast<Acc*>(a.ratio);
      p.flags = a.flags;
      p.slice_vecs = plan.slice_vecs;
      // The entropy's sum is needed for the entropy output and for an entropy gradient.
      const bool with_ent = a.entropy != nullptr || a.entropy_coef != 0.0;
      if (plan.threads == grpo::kClusterThreads) {
        err = with_ent ? launch_cluster<T, grpo::kClusterThreads, true>(p, plan, stream)
                       : launch_cluster<T, grpo::kClusterThreads, false>(p, plan, stream);
      } else {
        err = with_ent ? launch_cluster<T, grpo::kClusterSmallThreads, true>(p, plan, stream)
                       : launch_cluster<T, grpo::kClusterSmallThreads, false>(p, plan, stream);
      }
    }
  });
  return err;
}

void grpo_loss_two_pass(const GrpoFusedArgs& a, const GrpoTwoPassTemps& tmp, cudaStream_t stream) {
  if (a.rows <= 0) return;
  LogprobsFwdArgs f;
  f.logits = a.logits;
  f.rows = a.rows;
  f.cols = a.cols;
  f.row_stride = a.logits_stride;
  f.targets = a.targets;
  f.dtype = a.dtype;
  f.temperature = a.temperature;
  f.logp = a.logp;
  f.row_max = tmp.row_max;
  f.log_norm = tmp.log_norm;
  f.entropy = a.entropy;
  logprobs_forward(f, stream);
  int64_t blocks = (a.rows + kTokenThreads - 1) / kTokenThreads;
  const int64_t cap = int64_t(num_sms()) * kTokenBlocksPerSm;
  if (blocks > cap) blocks = cap;
  if (a.dtype == DType::kFloat64) {
    grpo_token_grads_kernel<double><<<static_cast<unsigned>(blocks), kTokenThreads, 0, stream>>>(a, tmp);
  } else {
    grpo_token_grads_kernel<float><<<static_cast<unsigned>(blocks), kTokenThreads, 0, stream>>>(a, tmp);
  }
  if (a.grad == nullptr) return;
  LogprobsBwdArgs b;
  b.logits = a.logits;
  b.rows = a.rows;
  b.cols = a.cols;
  b.logits_stride = a.logits_stride;
  b.grad = a.grad;
  b.grad_stride = a.grad_stride;
  b.targets = a.targets;
  b.row_max = tmp.row_max;
  b.log_norm = tmp.log_norm;
  b.entropy = a.entropy;
  b.grad_logp = tmp.g_logp;
  b.grad_entropy = a.entropy_coef != 0.0 ? tmp.g_ent : nullptr;
  b.dtype = a.dtype;
  b.temperature = a.temperature;
  logprobs_backward(b, stream);
}

void scale_rows_by_device_scalar(void* x, int64_t rows, int64_t cols, int64_t stride, DType dtype,
                                 const void* scale, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  int64_t blocks = rows;
  const int64_t cap = int64_t(num_sms()) * kScaleBlocksPerSm;
  if (blocks > cap) blocks = cap;
  dispatch_logits(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename Elem<T>::Acc;
    scale_rows_kernel<T><<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(
        static_cast<T*>(x), rows, static_cast<int>(cols), stride, static_cast<const Acc*>(scale));
  });
}

}  // namespace cuda
}  // namespace tsparse
