// CUDA kernels of variable-length packing (see tsparse/varlen.h). No torch headers.
//
// seqlens: one block per row counts the kept tokens; one block scans the counts.
// pack:    one block per row walks the row in chunks of kRowThreads tokens; a warp ballot
//          plus a shared-memory pass over the warp totals gives every kept token its rank,
//          so each output stream is written exactly once, with no atomics and no host sync.
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "tsparse/cuda_common.cuh"
#include "tsparse/varlen.h"

namespace tsparse {
namespace cuda {
namespace {

constexpr int kRowThreads = 512;   // threads per row block (16 warps): a chunk of 512 tokens
constexpr int kScanThreads = 1024; // the single block that scans the per-row counts
constexpr int kWarps = kRowThreads / 32;

__device__ __noinline__ void fail_total(long long have, long long want) {
  printf("tsparse.pack_varlen: `total` = %lld but the masks keep %lld tokens\n", want, have);
  TSPARSE_DEVICE_FAIL("tsparse.pack_varlen: `total` does not match the masks");
}

__device__ __noinline__ void fail_cu(long long row, long long begin, long long end, long long total) {
  printf("tsparse.pack_varlen: `cu_seqlens` does not match the masks at row %lld "
         "([%lld, %lld) of %lld packed tokens)\n", row, begin, end, total);
  TSPARSE_DEVICE_FAIL("tsparse.pack_varlen: `cu_seqlens` does not match the masks");
}

template <typename M>
__device__ __forceinline__ bool kept(const M* __restrict__ mask, const bool* __restrict__ keep,
                                     int64_t i) {
  return mask[i] != M(0) && (keep == nullptr || keep[i]);
}

template <typename M>
__global__ void __launch_bounds__(kRowThreads)
seqlens_kernel(const M* __restrict__ mask, const bool* __restrict__ keep, int64_t seqlen,
               int32_t* __restrict__ seqlens) {
  __shared__ int warp_counts[kWarps];
  const int64_t row = int64_t(blockIdx.x) * seqlen;
  int count = 0;
  for (int64_t l = threadIdx.x; l < seqlen; l += blockDim.x) count += kept(mask, keep, row + l) ? 1 : 0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) count += __shfl_xor_sync(0xffffffffu, count, o);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_counts[w];
    seqlens[blockIdx.x] = total;
  }
}

// cu[0] = 0, cu[i + 1] = cu[i] + seqlens[i], in chunks of kScanThreads with a running carry.
__global__ void __launch_bounds__(kScanThreads)
scan_kernel(const int32_t* __restrict__ seqlens, int64_t batch, int32_t* __restrict__ cu) {
  __shared__ int warp_sums[kScanThreads / 32];
  __shared__ int carry;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    carry = 0;
    cu[0] = 0;
  }
  __syncthreads();
  for (int64_t start = 0; start < batch; start += kScanThreads) {
    const int64_t i = start + threadIdx.x;
    int x = i < batch ? seqlens[i] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
      int w = warp_sums[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_sums[lane] = w;
    }
    __syncthreads();
    const int prefix = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + x;
    if (i < batch) cu[i + 1] = prefix;
    __syncthreads();
    if (threadIdx.x == kScanThreads - 1) carry = prefix;
    __syncthreads();
  }
}

template <typename M>
__global__ void __launch_bounds__(kRowThreads) pack_kernel(VarlenPackArgs a) {
  __shared__ int warp_counts[kWarps];
  const int64_t batch = a.base.batch;
  const int64_t seqlen = a.base.seqlen;
  const int32_t* __restrict__ cu = a.base.cu_seqlens;
  const M* __restrict__ mask = static_cast<const M*>(a.base.mask);
  const bool* __restrict__ keep = a.base.keep;
  const int64_t total = a.total;
  // Every block checks the caller's `total` and its own CSR row [cu[b], cu[b + 1]) before it
  // writes anything, then writes only inside that row (a token past its end traps first), and
  // traps if the row held fewer tokens than cu says: a cu_seqlens that disagrees with the masks
  // (possible when the op is called directly) can never write out of bounds or leave holes.
  if (int64_t(cu[batch]) != total) fail_total(cu[batch], total);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x;
  const int64_t row = b * seqlen;
  const int64_t base = cu[b];
  const int64_t end = cu[b + 1];
  if (cu[0] != 0 || base < 0 || end < base || end > total) fail_cu(b, base, end, total);
  const int64_t plane = batch * seqlen;  // one position row of [C, B, L]
  int64_t running = 0;
  for (int64_t chunk = 0; chunk < seqlen; chunk += kRowThreads) {
    const int64_t l = chunk + threadIdx.x;
    const bool in = l < seqlen;
    const bool flag = in && kept(mask, keep, row + l);
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, chunk_total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_counts[w];
      before += w < warp ? c : 0;
      chunk_total += c;
    }
    if (in) {
      const int64_t i = row + l;
      if (flag) {
        const int64_t p = base + running + before + __popc(ballot & ((1u << lane) - 1u));
        if (p >= end) fail_cu(b, base, end, total);
        a.indices[p] = i;
        a.inverse[i] = static_cast<int32_t>(p);
        if (a.ids != nullptr) {
          const int64_t v = a.ids[i];
          a.ids_out[p] = v;
          a.labels_out[p == 0 ? total - 1 : p - 1] = v;  // torch.roll(ids, -1)
        }
        for (int64_t c = 0; c < a.channels; ++c) a.pos_out[c * total + p] = a.pos[c * plane + i];
      } else {
        a.inverse[i] = -1;
      }
    }
    running += chunk_total;
    __syncthreads();  // warp_counts is rewritten by the next chunk
  }
  if (base + running != end) fail_cu(b, base, end, total);  // uniform: every thread agrees
}

template <typename F>
void with_mask_type(MaskType t, F&& f) {
  switch (t) {
    case MaskType::kInt32: f(static_cast<int32_t*>(nullptr)); break;
    case MaskType::kInt64: f(static_cast<int64_t*>(nullptr)); break;
    default: f(static_cast<bool*>(nullptr)); break;
  }
}

}  // namespace

void varlen_seqlens(const VarlenArgs& a, cudaStream_t stream) {
  if (a.batch > 0) {
    auto go = [&](auto* tag) {
      using M = std::remove_pointer_t<decltype(tag)>;
      seqlens_kernel<M><<<static_cast<unsigned>(a.batch), kRowThreads, 0, stream>>>(
          static_cast<const M*>(a.mask), a.keep, a.seqlen, a.seqlens);
    };
    with_mask_type(a.mask_type, go);
  }
  scan_kernel<<<1, kScanThreads, 0, stream>>>(a.seqlens, a.batch, a.cu_seqlens);
}

void varlen_pack(const VarlenPackArgs& a, cudaStream_t stream) {
  if (a.base.batch <= 0) return;
  auto go = [&](auto* tag) {
    using M = std::remove_pointer_t<decltype(tag)>;
    pack_kernel<M><<<static_cast<unsigned>(a.base.batch), kRowThreads, 0, stream>>>(a);
  };
  with_mask_type(a.base.mask_type, go);
}

}  // namespace cuda
}  // namespace tsparse
