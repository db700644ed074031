// CUDA kernels of variable-length packing (see tsparse/varlen.h). No torch headers.
//
// seqlens: one block per row counts the kept tokens; one block scans the counts.
// pack:    a (chunks, B) grid of blocks of kRowThreads tokens (flattened to one dimension).
//          One small kernel counts each chunk's kept tokens; the pack kernel then gives every
//          kept token its rank (the row's earlier chunks + a warp ballot + a shared-memory pass
//          over the warp totals), so each output stream is written exactly once, with no
//          atomics and no host sync, and every block works independently.
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
constexpr int kMaxPosRows = 4;     // position rows a pack thread holds in registers (M-RoPE 3, verl 4)

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

// Kept tokens of chunk c of row b, for every (row, chunk): the pack kernel's blocks start
// from the sum of their row's earlier chunks (no block waits for another).
template <typename M>
__global__ void __launch_bounds__(kRowThreads)
chunk_counts_kernel(const M* __restrict__ mask, const bool* __restrict__ keep, int64_t seqlen,
                    int64_t chunks, int32_t* __restrict__ counts) {
  __shared__ int warp_counts[kWarps];
  const int64_t b = blockIdx.x / chunks;
  const int64_t c = blockIdx.x - b * chunks;
  const int64_t l = c * kRowThreads + threadIdx.x;
  const bool flag = l < seqlen && kept(mask, keep, b * seqlen + l);
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = __popc(ballot);
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_counts[w];
    counts[blockIdx.x] = total;
  }
}

// One block per (row, chunk of kRowThreads tokens), one thread per token. Every load of a
// token (mask, keep, id, the first kMaxPosRows position rows) is issued before the block-wide
// rank and before any store; all pointers are restrict-qualified locals, so the compiler may
// keep them in flight. A kept token's packed position p = cu[b] + (kept tokens of the row's
// earlier chunks, from chunk_counts_kernel) + (rank inside the chunk).
// Every block checks the caller's `total` and its own CSR row [cu[b], cu[b + 1]) before it
// writes anything, then writes only inside that row (a token past its end traps first), and
// the row's last chunk traps if the row held fewer tokens than cu says: a cu_seqlens that
// disagrees with the masks (possible when the op is called directly) can never write out of
// bounds or leave holes.
template <typename M>
__global__ void __launch_bounds__(kRowThreads) pack_kernel(VarlenPackArgs a) {
  __shared__ int warp_counts[kWarps];
  __shared__ long long chunk_base;
  const M* __restrict__ mask = static_cast<const M*>(a.base.mask);
  const bool* __restrict__ keep = a.base.keep;
  const int32_t* __restrict__ cu = a.base.cu_seqlens;
  const int32_t* __restrict__ counts = a.chunk_counts;
  const int64_t* __restrict__ ids = a.ids;
  const int64_t* __restrict__ pos = a.pos;
  int64_t* __restrict__ indices = a.indices;
  int32_t* __restrict__ inverse = a.inverse;
  int64_t* __restrict__ ids_out = a.ids_out;
  int64_t* __restrict__ labels_out = a.labels_out;
  int64_t* __restrict__ pos_out = a.pos_out;
  const int64_t batch = a.base.batch;
  const int64_t seqlen = a.base.seqlen;
  const int64_t chunks = a.chunks;
  const int64_t total = a.total;
  const int64_t channels = a.channels;
  const int64_t plane = batch * seqlen;  // one position row of [C, B, L]

  const int64_t b = blockIdx.x / chunks;
  const int64_t c = blockIdx.x - b * chunks;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t l = c * kRowThreads + threadIdx.x;
  const bool in = l < seqlen;
  const int64_t i = b * seqlen + l;

  // ---- loads: the CSR row, this token's flags and values, the row's earlier chunk counts ----
  const int64_t cu_total = cu[batch];
  const int64_t cu0 = cu[0];
  const int64_t base = cu[b];
  const int64_t end = cu[b + 1];
  const bool flag = in && kept(mask, keep, i);
  int64_t id = 0;
  if (flag && ids != nullptr) id = ids[i];
  int64_t pv[kMaxPosRows];
#pragma unroll
  for (int ch = 0; ch < kMaxPosRows; ++ch) pv[ch] = (flag && ch < channels) ? pos[ch * plane + i] : 0;
  if (warp == 0) {  // kept tokens of chunks [0, c) of this row
    long long before = 0;
    for (int64_t k = lane; k < c; k += 32) before += counts[b * chunks + k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) before += __shfl_xor_sync(0xffffffffu, before, o);
    if (lane == 0) chunk_base = before;
  }
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();

  // ---- checks (uniform over the block), then the rank ----
  if (cu_total != total) fail_total(cu_total, total);
  if (cu0 != 0 || base < 0 || end < base || end > total) fail_cu(b, base, end, total);
  int before = 0, chunk_total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int n = warp_counts[w];
    before += w < warp ? n : 0;
    chunk_total += n;
  }
  const int64_t first = base + chunk_base;  // packed position of this chunk's first kept token
  if (c == chunks - 1 && first + chunk_total != end) fail_cu(b, base, end, total);  // uniform

  // ---- stores ----
  if (!in) return;
  if (!flag) {
    inverse[i] = -1;
    return;
  }
  const int64_t p = first + before + __popc(ballot & ((1u << lane) - 1u));
  if (p >= end) fail_cu(b, base, end, total);
  indices[p] = i;
  inverse[i] = static_cast<int32_t>(p);
  if (ids != nullptr) {
    ids_out[p] = id;
    labels_out[p == 0 ? total - 1 : p - 1] = id;  // torch.roll(ids, -1)
  }
#pragma unroll
  for (int ch = 0; ch < kMaxPosRows; ++ch) {
    if (ch < channels) pos_out[ch * total + p] = pv[ch];
  }
  for (int64_t ch = kMaxPosRows; ch < channels; ++ch) pos_out[ch * total + p] = pos[ch * plane + i];  // C > 4: rare
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

int64_t varlen_pack_chunks(int64_t seqlen) {
  const int64_t c = (seqlen + kRowThreads - 1) / kRowThreads;
  return c > 0 ? c : 1;  // one block per row even when L == 0, so every row is checked
}

void varlen_pack(const VarlenPackArgs& in, cudaStream_t stream) {
  if (in.base.batch <= 0) return;
  VarlenPackArgs a = in;
  a.chunks = varlen_pack_chunks(a.base.seqlen);
  const unsigned blocks = static_cast<unsigned>(a.base.batch * a.chunks);  // <= B * max(L, 1) < 2^32
  auto go = [&](auto* tag) {
    using M = std::remove_pointer_t<decltype(tag)>;
    chunk_counts_kernel<M><<<blocks, kRowThreads, 0, stream>>>(static_cast<const M*>(a.base.mask), a.base.keep,
                                                               a.base.seqlen, a.chunks, a.chunk_counts);
    pack_kernel<M><<<blocks, kRowThreads, 0, stream>>>(a);
  };
  with_mask_type(a.base.mask_type, go);
}

}  // namespace cuda
}  // namespace tsparse
