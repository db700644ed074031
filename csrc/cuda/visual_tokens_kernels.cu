// CUDA kernels for the visual-token op family: row gather/scatter/compose, segment
// reduction (token fusion pooling, non-unique gather backward), row norms, and the
// box -> merged-token mask.
//
// No torch headers: raw pointers and sizes in, launchers out (see launchers.h).
//
// Row kernels share one layout: a "row group" of 2^k lanes (k <= 5, chosen on the host
// from the row width) owns one row at a time and walks the grid-stride loop over rows.
// Rows are moved in the widest unit (16, 8, 4, 2 or 1 bytes) that the row width, the
// base pointers and the row strides allow, so rows of bf16 with D % 8 == 0 use 16-byte
// vector loads/stores (LDG.E.128 / STG.E.128 in the SASS). Each lane keeps kUnroll units in
// flight: every load of a trip is issued before its first store.
// Row base offsets use 64-bit math (rows * stride can exceed 2^31); offsets INSIDE a row are
// 32-bit unsigned (`Off` = uint32_t: one IMAD.WIDE.U32 per address) whenever the row and one
// trip past it fit in 32 bits - always for the ops, whose rows are < 2 GiB (check_rows) -
// and 64-bit otherwise (the launchers check; profiling/sass_report.py shows the difference).
// 16-byte values are built and taken apart as uint4 explicitly (V16 below): a store through
// a union member or a per-element struct compiles to four 32-bit STG.E.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "tsparse/box_math.h"
#include "tsparse/cuda_common.cuh"
#include "tsparse/launchers.h"
#include "tsparse/segment_plan.h"

namespace tsparse {
namespace cuda {
namespace {

constexpr int kThreads = 256;   // threads per block for every row kernel
constexpr int kUnroll = 4;      // units each lane has in flight per iteration
constexpr int kMinBlocks = 4;   // row kernels: CTAs per SM ptxas must allow (64 registers at most):
                                // 4 x 256 threads x kUnroll x 16 B = 64 KB in flight per SM, and
                                // room for ptxas to issue all kUnroll loads before the stores
constexpr int kBlocksPerSm = 8; // grid-stride cap: enough blocks to fill every SM several times
constexpr int kBoxChunk = 64;   // boxes staged in shared memory at a time (box mask)
constexpr int kPlanThreads = 1024;  // the one block that plans the box mask on the device

int lanes_log2_for(int64_t units_per_row) {
  int l = 0;
  while (l < 5 && (int64_t(1) << l) < units_per_row) ++l;
  return l;
}

unsigned grid_for(int64_t rows, int lanes_log2) {
  const int64_t groups_per_block = kThreads >> lanes_log2;
  int64_t blocks = (rows + groups_per_block - 1) / groups_per_block;
  const int64_t cap = int64_t(num_sms()) * kBlocksPerSm;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

// In-row offsets of `units` units (plus one step of any row loop past the end: a trip of up to
// 32 lanes x kUnroll, or segment_pieces_kernel's stride of kThreads) fit in 32 bits: the row
// kernels then use uint32_t offsets.
constexpr int64_t kOffSlack = 32 * kUnroll > kThreads ? 32 * kUnroll : kThreads;
bool fits_u32(int64_t units) { return units >= 0 && units <= int64_t(UINT32_MAX) - kOffSlack; }

// ---------------------------------------------------------------------------------
// Device-side contract violations. Like PyTorch's CUDA_KERNEL_ASSERT these abort the
// kernel (the CUDA context is then unusable); the host-side checks in the torch glue
// catch every violation that can be found without a device->host sync.
__device__ const char* op_name(OpTag op) {
  switch (op) {
    case OpTag::kGatherTokens: return "gather_tokens";
    case OpTag::kScatterTokens: return "scatter_tokens";
    case OpTag::kFuseTokens: return "fuse_tokens";
    default: return "internal";
  }
}

__device__ __noinline__ void fail_out_of_range(OpTag op, long long value, long long bound) {
  printf("tsparse.%s: `index` value %lld is out of range [0, %lld)\n", op_name(op), value, bound);
  switch (op) {
    case OpTag::kGatherTokens: TSPARSE_DEVICE_FAIL("tsparse.gather_tokens: an `index` value is out of range"); break;
    case OpTag::kScatterTokens: TSPARSE_DEVICE_FAIL("tsparse.scatter_tokens: an `index` value is out of range"); break;
    case OpTag::kFuseTokens: TSPARSE_DEVICE_FAIL("tsparse.fuse_tokens: an index is out of range"); break;
    default: TSPARSE_DEVICE_FAIL("tsparse (internal row op): an index or offset is out of range");
  }
}

__device__ __noinline__ void fail_duplicate(OpTag op, long long value) {
  printf("tsparse.%s: `index` holds %lld more than once, but unique indices were promised\n",
         op_name(op), value);
  switch (op) {
    case OpTag::kGatherTokens: TSPARSE_DEVICE_FAIL("tsparse.gather_tokens: `index` holds a value more than once, but unique indices were promised"); break;
    case OpTag::kScatterTokens: TSPARSE_DEVICE_FAIL("tsparse.scatter_tokens: `index` holds a value more than once"); break;
    default: TSPARSE_DEVICE_FAIL("tsparse (internal row op): an index occurs more than once");
  }
}

// A row's base pointer, opaque to the optimizer: without it nvcc folds the 64-bit row offset
// (row * stride) into every access of the loop and rebuilds it per unit (IMAD + IMAD.WIDE +
// LEA + LEA.HI.X per access instead of one IMAD.WIDE.U32 on a 32-bit offset); the assumption
// keeps the accesses global (LDG / STG, not generic LD / ST).
template <typename T>
__device__ __forceinline__ T* row_base(T* p) {
  asm("" : "+l"(p));
  __builtin_assume(__isGlobal(p));
  return p;
}

struct RowGroups {
  int lanes_log2;
  __device__ int lanes() const { return 1 << lanes_log2; }
  __device__ int lane() const { return threadIdx.x & ((1 << lanes_log2) - 1); }
  __device__ int64_t first() const {
    return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> lanes_log2;
  }
  __device__ int64_t stride() const { return (int64_t(gridDim.x) * blockDim.x) >> lanes_log2; }
};

// One row, `units` Units from src to dst, the group's lanes interleaved (coalesced). Full
// trips first (kUnroll loads, then kUnroll stores, no per-unit predicates), then the last
// partial trip. Off: uint32_t or int64_t in-row unit offsets (see the file comment).
template <typename Unit, typename Off>
__device__ __forceinline__ void copy_row(Unit* __restrict__ dst, const Unit* __restrict__ src,
                                         Off units, Off lane, Off lanes) {
  const Off step = lanes * Off(kUnroll);
  const Off span = lanes * Off(kUnroll - 1);
  Off u = lane;
  for (; u + span < units; u += step) {
    Unit v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) v[k] = __ldg(src + (u + Off(k) * lanes));
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) dst[u + Off(k) * lanes] = v[k];
  }
  Unit v[kUnroll - 1];
#pragma unroll
  for (int k = 0; k < kUnroll - 1; ++k) {
    if (u + Off(k) * lanes < units) v[k] = __ldg(src + (u + Off(k) * lanes));
  }
#pragma unroll
  for (int k = 0; k < kUnroll - 1; ++k) {
    if (u + Off(k) * lanes < units) dst[u + Off(k) * lanes] = v[k];
  }
}

template <typename Unit, typename Off>
__device__ __forceinline__ void zero_row(Unit* __restrict__ dst, Off units, Off lane, Off lanes) {
  const Unit z{};
  for (Off u = lane; u < units; u += lanes) dst[u] = z;
}

// ---------------------------------------------------------------------------------
// compose_rows, copy flavour (no scale): dtype-agnostic, moves `Unit`s.
template <typename Unit, typename IndexT, typename Off>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
compose_copy_kernel(Unit* __restrict__ out, int64_t out_rows, int64_t units,
                    const Unit* __restrict__ src, int64_t src_rows, int64_t src_stride,
                    const IndexT* __restrict__ map, bool negative_means_fill,
                    const Unit* __restrict__ fill, int64_t fill_stride,
                    int32_t* __restrict__ inverse, OpTag op, int lanes_log2) {
  const RowGroups g{lanes_log2};
  const Off lane = Off(g.lane());
  const Off lanes = Off(g.lanes());
  const Off n = Off(units);
  for (int64_t r = g.first(); r < out_rows; r += g.stride()) {
    const int64_t s = static_cast<int64_t>(map[r]);
    Unit* dst = row_base(out + r * units);
    if (s >= 0) {
      if (s >= src_rows) fail_out_of_range(op, s, src_rows);
      if (inverse != nullptr && lane == 0) {
        const int32_t prev = atomicCAS(inverse + s, -1, static_cast<int32_t>(r));
        if (prev != -1) fail_duplicate(op, s);
      }
      if (src != nullptr) {
        copy_row<Unit, Off>(dst, row_base(src + s * src_stride), n, lane, lanes);
      } else {
        zero_row<Unit, Off>(dst, n, lane, lanes);
      }
    } else {
      if (!negative_means_fill) fail_out_of_range(op, s, src_rows);
      if (fill != nullptr) {
        copy_row<Unit, Off>(dst, row_base(fill + r * fill_stride), n, lane, lanes);
      } else {
        zero_row<Unit, Off>(dst, n, lane, lanes);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Element traits (Elem<T>: load/store with fp32 or fp64 accumulation): tsparse/cuda_common.cuh.
// V16<T>: 16 bytes of T (one uint4) <-> N accumulators, element by element with the same
// conversions as Elem<T> (bf16/fp16 -> fp32 exact, fp32 -> bf16/fp16 round to nearest even).
template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}

template <typename T> struct V16;
template <> struct V16<__nv_bfloat16> {
  static constexpr int N = 8;
  using A = float;
  __device__ static void unpack(const uint4& u, float (&a)[N]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a[2 * i] = __uint_as_float(w[i] << 16);
      a[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static uint32_t pair(float lo, float hi) {
    return bits_as<uint32_t>(__floats2bfloat162_rn(lo, hi));
  }
  __device__ static uint4 pack(const float (&a)[N]) {
    return make_uint4(pair(a[0], a[1]), pair(a[2], a[3]), pair(a[4], a[5]), pair(a[6], a[7]));
  }
};
template <> struct V16<__half> {
  static constexpr int N = 8;
  using A = float;
  __device__ static void unpack(const uint4& u, float (&a)[N]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(bits_as<__half2>(w[i]));
      a[2 * i] = f.x;
      a[2 * i + 1] = f.y;
    }
  }
  __device__ static uint32_t pair(float lo, float hi) { return bits_as<uint32_t>(__floats2half2_rn(lo, hi)); }
  __device__ static uint4 pack(const float (&a)[N]) {
    return make_uint4(pair(a[0], a[1]), pair(a[2], a[3]), pair(a[4], a[5]), pair(a[6], a[7]));
  }
};
template <> struct V16<float> {
  static constexpr int N = 4;
  using A = float;
  __device__ static void unpack(const uint4& u, float (&a)[N]) {
    a[0] = __uint_as_float(u.x);
    a[1] = __uint_as_float(u.y);
    a[2] = __uint_as_float(u.z);
    a[3] = __uint_as_float(u.w);
  }
  __device__ static uint4 pack(const float (&a)[N]) {
    return make_uint4(__float_as_uint(a[0]), __float_as_uint(a[1]), __float_as_uint(a[2]), __float_as_uint(a[3]));
  }
};
template <> struct V16<double> {
  static constexpr int N = 2;
  using A = double;
  __device__ static void unpack(const uint4& u, double (&a)[N]) {
    a[0] = __hiloint2double(int(u.y), int(u.x));
    a[1] = __hiloint2double(int(u.w), int(u.z));
  }
  __device__ static uint4 pack(const double (&a)[N]) {
    return make_uint4(uint32_t(__double2loint(a[0])), uint32_t(__double2hiint(a[0])),
                      uint32_t(__double2loint(a[1])), uint32_t(__double2hiint(a[1])));
  }
};

// VEC elements of T at p: 16-byte access when VEC * sizeof(T) == 16 (the pointer is 16-byte
// aligned: the launchers check), one element when VEC == 1.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, typename Elem<T>::Acc (&a)[VEC]) {
  if constexpr (VEC == 1) {
    a[0] = Elem<T>::load(p[0]);
  } else {
    static_assert(VEC == V16<T>::N, "VEC * sizeof(T) must be 16");
    V16<T>::unpack(__ldg(reinterpret_cast<const uint4*>(p)), a);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const typename Elem<T>::Acc (&a)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = Elem<T>::store(a[0]);
  } else {
    *reinterpret_cast<uint4*>(p) = V16<T>::pack(a);
  }
}

// Accumulator rows of the segment workspace (fp32 / fp64), in 16-byte pieces where they fit.
template <typename A, int N>
__device__ __forceinline__ void store_acc(A* p, const A (&a)[N]) {
  if constexpr ((sizeof(A) * N) % 16 == 0) {
    constexpr int per = 16 / int(sizeof(A));
#pragma unroll
    for (int j = 0; j < N / per; ++j) {
      A part[per];
#pragma unroll
      for (int i = 0; i < per; ++i) part[i] = a[j * per + i];
      reinterpret_cast<uint4*>(p)[j] = V16<A>::pack(part);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = a[i];
  }
}

template <typename A, int N>
__device__ __forceinline__ void add_acc(A (&a)[N], const A* __restrict__ p) {
  if constexpr ((sizeof(A) * N) % 16 == 0) {
    constexpr int per = 16 / int(sizeof(A));
#pragma unroll
    for (int j = 0; j < N / per; ++j) {
      A part[per];
      V16<A>::unpack(__ldg(reinterpret_cast<const uint4*>(p) + j), part);
#pragma unroll
      for (int i = 0; i < per; ++i) a[j * per + i] += part[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) a[i] += __ldg(p + i);
  }
}

// compose_rows, scaled flavour: out[r] = map[r] >= 0 ? src[map[r]] * scale[map[r]] : 0.
// (Token-fusion backward: each input row receives its output row's gradient / count.)
template <typename T, int VEC, typename IndexT, typename Off>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
compose_scaled_kernel(T* __restrict__ out, int64_t out_rows, int64_t cols,
                      const T* __restrict__ src, int64_t src_rows, int64_t src_stride,
                      const IndexT* __restrict__ map, const float* __restrict__ scale,
                      OpTag op, int lanes_log2) {
  using E = Elem<T>;
  using A = typename E::Acc;
  const RowGroups g{lanes_log2};
  const Off lane = Off(g.lane());
  const Off lanes = Off(g.lanes());
  const Off vecs = Off(cols / VEC);
  const Off span = lanes * Off(kUnroll - 1);
  for (int64_t r = g.first(); r < out_rows; r += g.stride()) {
    const int64_t s = static_cast<int64_t>(map[r]);
    T* dst = row_base(out + r * cols);
    if (s < 0) {
      A z[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = A(0);
      for (Off v = lane; v < vecs; v += lanes) store_vec<T, VEC>(dst + v * Off(VEC), z);
      continue;
    }
    if (s >= src_rows) fail_out_of_range(op, s, src_rows);
    const A sc = static_cast<A>(scale[s]);
    const T* row = row_base(src + s * src_stride);
    Off v = lane;
    for (; v + span < vecs; v += lanes * Off(kUnroll)) {  // full trips: kUnroll loads, then stores
      A p[kUnroll][VEC];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) load_vec<T, VEC>(row + (v + Off(k) * lanes) * Off(VEC), p[k]);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) p[k][e] *= sc;
        store_vec<T, VEC>(dst + (v + Off(k) * lanes) * Off(VEC), p[k]);
      }
    }
    for (; v < vecs; v += lanes) {
      A p[VEC];
      load_vec<T, VEC>(row + v * Off(VEC), p);
#pragma unroll
      for (int e = 0; e < VEC; ++e) p[e] *= sc;
      store_vec<T, VEC>(dst + v * Off(VEC), p);
    }
  }
}

// ---------------------------------------------------------------------------------
// Segment reduction (tsparse/segment_plan.h): short segments are summed by the row kernel
// directly; long ones are cut into pieces that segment_pieces_kernel sums in parallel into
// the workspace, and the row kernel adds the pieces in order.

// acc += src[perm[i]][col .. col + VEC) for i in [i0, i1), in member order. Four members per
// trip: their indices are loaded and range-checked together (one branch to the failure path),
// then the four rows' vectors are loaded before any is added.
template <typename T, int VEC, typename Off>
__device__ __forceinline__ void sum_members(typename Elem<T>::Acc (&acc)[VEC], const T* __restrict__ src,
                                            int64_t src_rows, int64_t src_stride,
                                            const int64_t* __restrict__ perm, int64_t i0, int64_t i1, Off col) {
  using A = typename Elem<T>::Acc;
  constexpr int M = 4;
  int64_t i = i0;
  for (; i + M <= i1; i += M) {
    int64_t s[M];
    bool bad = false;
#pragma unroll
    for (int k = 0; k < M; ++k) {
      s[k] = perm[i + k];
      bad |= (s[k] < 0) | (s[k] >= src_rows);
    }
    if (bad) {
#pragma unroll
      for (int k = 0; k < M; ++k) {
        if (s[k] < 0 || s[k] >= src_rows) fail_out_of_range(OpTag::kInternal, s[k], src_rows);
      }
    }
    A p[M][VEC];
#pragma unroll
    for (int k = 0; k < M; ++k) load_vec<T, VEC>(row_base(src + s[k] * src_stride) + col, p[k]);
#pragma unroll
    for (int k = 0; k < M; ++k) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += p[k][e];
    }
  }
  for (; i < i1; ++i) {
    const int64_t s = perm[i];
    if (s < 0 || s >= src_rows) fail_out_of_range(OpTag::kInternal, s, src_rows);
    A p[VEC];
    load_vec<T, VEC>(row_base(src + s * src_stride) + col, p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] += p[e];
  }
}

// Largest r in [0, rows] with offsets[r] <= pos (offsets non-decreasing), or -1. Called by a
// whole warp: each round probes 32 positions and keeps the last one that is <= pos, so it
// takes ~log32(rows) dependent loads. Non-monotone offsets give some r in range (the row
// kernel rejects them and the launch fails).
__device__ int64_t warp_find_row(const int64_t* __restrict__ offsets, int64_t rows, int64_t pos) {
  const int lane = threadIdx.x & 31;
  int64_t lo = -1, hi = rows + 1;  // offsets[lo] <= pos < offsets[hi] (virtual ends)
  while (hi - lo > 1) {
    const int64_t q = lo + 1 + ((hi - lo - 1) * lane) / 32;
    const unsigned m = __ballot_sync(0xffffffffu, offsets[q] <= pos);
    if (m == 0) break;  // offsets[lo + 1] > pos: the answer is lo
    const int j = 31 - __clz(m);
    const int64_t qj = __shfl_sync(0xffffffffu, q, j);
    const int64_t qn = __shfl_sync(0xffffffffu, q, j < 31 ? j + 1 : 31);
    lo = qj;
    if (j < 31) hi = qn;
  }
  return lo;
}

template <typename T, int VEC, typename Off>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
segment_pieces_kernel(typename Elem<T>::Acc* __restrict__ ws, int64_t cols,
                      const T* __restrict__ src, int64_t src_rows, int64_t src_stride,
                      const int64_t* __restrict__ perm, int64_t perm_len,
                      const int64_t* __restrict__ offsets, int64_t rows) {
  using A = typename Elem<T>::Acc;
  __shared__ int64_t piece[2][2];  // slot 0 (a later piece) and slot 1 (a first piece): [begin, end)
  const int64_t chunks = segment_chunks(perm_len);
  const Off vecs = Off(cols / VEC);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int64_t pos0 = c * kSegmentPiece;
    const int64_t pos1 = pos0 + kSegmentPiece < perm_len ? pos0 + kSegmentPiece : perm_len;
    if (threadIdx.x < 32) {
      const int64_t ra = warp_find_row(offsets, rows, pos0);
      const int64_t rb = warp_find_row(offsets, rows, pos1 - 1);
      if (threadIdx.x == 0) {
        piece[0][0] = piece[1][0] = -1;
        if (ra >= 0 && ra < rows) {  // the segment holding pos0, begun in an earlier chunk
          const int64_t b = offsets[ra], e = offsets[ra + 1];
          if (b < pos0 && pos0 < e && segment_is_split(b, e)) {
            piece[0][0] = pos0;
            piece[0][1] = e < pos1 ? e : pos1;
          }
        }
        if (rb >= 0 && rb < rows) {  // a long segment that begins in this chunk runs past its end
          const int64_t b = offsets[rb], e = offsets[rb + 1];
          if (b >= pos0 && b < pos1 && pos1 - 1 < e && segment_is_split(b, e)) {
            piece[1][0] = b;
            piece[1][1] = pos1;
          }
        }
      }
    }
    __syncthreads();
#pragma unroll 1
    for (int sl = 0; sl < 2; ++sl) {
      const int64_t pb = piece[sl][0], pe = piece[sl][1];
      if (pb < 0) continue;
      A* w = row_base(ws + segment_slot(c, sl == 1) * cols);
      for (Off v = threadIdx.x; v < vecs; v += Off(blockDim.x)) {
        A acc[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = A(0);
        sum_members<T, VEC, Off>(acc, src, src_rows, src_stride, perm, pb, pe, v * Off(VEC));
        store_acc<A, VEC>(w + v * Off(VEC), acc);
      }
    }
    __syncthreads();  // piece[] is rewritten for the next chunk
  }
}

template <typename T, int VEC, typename Off>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
segment_reduce_kernel(T* __restrict__ out, int64_t out_rows, int64_t cols,
                      const T* __restrict__ src, int64_t src_rows, int64_t src_stride,
                      const int64_t* __restrict__ perm, int64_t perm_len,
                      const int64_t* __restrict__ offsets, bool mean,
                      const typename Elem<T>::Acc* __restrict__ ws, int lanes_log2) {
  using E = Elem<T>;
  using A = typename E::Acc;
  const RowGroups g{lanes_log2};
  const Off lane = Off(g.lane());
  const Off lanes = Off(g.lanes());
  const Off vecs = Off(cols / VEC);
  for (int64_t r = g.first(); r < out_rows; r += g.stride()) {
    const int64_t beg = offsets[r];
    const int64_t end = offsets[r + 1];
    if (beg < 0 || end > perm_len || end < beg) {  // the CPU rejects decreasing offsets too
      fail_out_of_range(OpTag::kInternal, beg < 0 ? beg : end, perm_len + 1);
    }
    const A inv_n = (mean && end > beg) ? A(1) / static_cast<A>(end - beg) : A(1);
    const bool split = segment_is_split(beg, end);
    const int64_t c0 = beg / kSegmentPiece;
    const int64_t c1 = split ? (end - 1) / kSegmentPiece : c0;
    T* dst = row_base(out + r * cols);
    for (Off v = lane; v < vecs; v += lanes) {
      A acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = A(0);
      if (!split) {
        sum_members<T, VEC, Off>(acc, src, src_rows, src_stride, perm, beg, end, v * Off(VEC));
      } else {
        add_acc<A, VEC>(acc, row_base(ws + segment_slot(c0, true) * cols) + v * Off(VEC));
        for (int64_t c = c0 + 1; c <= c1; ++c) {
          add_acc<A, VEC>(acc, row_base(ws + segment_slot(c, false) * cols) + v * Off(VEC));
        }
      }
      if (mean) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] *= inv_n;
      }
      store_vec<T, VEC>(dst + v * Off(VEC), acc);
    }
  }
}

// ---------------------------------------------------------------------------------
// One warp per row (uniform trip counts, so full-mask shuffles are safe).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
row_inv_norms_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t stride,
                     double eps, float* __restrict__ out) {
  using E = Elem<T>;
  using A = typename E::Acc;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const uint32_t vecs = static_cast<uint32_t>(cols / VEC);  // < 2^31: a row is < 2 GiB
  for (int64_t r = warp; r < rows; r += warps) {
    const T* row = x + r * stride;
    A ss = A(0);
    for (uint32_t v = lane; v < vecs; v += 32) {
      A p[VEC];
      load_vec<T, VEC>(row + v * uint32_t(VEC), p);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ss += p[k] * p[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) {
      const double n = sqrt(static_cast<double>(ss));
      out[r] = static_cast<float>(1.0 / (n > eps ? n : eps));
    }
  }
}

// ---------------------------------------------------------------------------------
// Checks every index against [0, n_rows); with `inverse`, also records inverse[index[m]] = m.
template <typename IndexT>
__global__ void __launch_bounds__(kThreads)
build_inverse_kernel(const IndexT* __restrict__ index, int64_t m_rows, int32_t* __restrict__ inverse,
                     int64_t n_rows, OpTag op) {
  for (int64_t m = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; m < m_rows;
       m += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = static_cast<int64_t>(index[m]);
    if (s < 0 || s >= n_rows) fail_out_of_range(op, s, n_rows);
    if (inverse != nullptr) {
      const int32_t prev = atomicCAS(inverse + s, -1, static_cast<int32_t>(m));
      if (prev != -1) fail_duplicate(op, s);
    }
  }
}

// ---------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) box_mask_kernel(BoxMaskArgs a) {
  __shared__ CellBox sbox[kBoxChunk];
  __shared__ int warp_counts[kThreads / 32];

  const int64_t img = blockIdx.x;
  const int64_t* meta = a.image_meta + img * 6;
  const ImageCells cells{meta[0], meta[1], meta[2]};
  const int64_t tok0 = meta[3];
  const int64_t box_begin = meta[4];
  const int64_t nb = meta[5] - box_begin;
  const int64_t per_slice = cells.cells_h * cells.cells_w;
  bool* keep = a.keep + tok0;

  const int64_t chunks = nb > 0 ? (nb + kBoxChunk - 1) / kBoxChunk : 1;
  int local = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t cb = ch * kBoxChunk;
    const int64_t cn = nb - cb < kBoxChunk ? nb - cb : kBoxChunk;  // <= 0 when nb == 0
    if (threadIdx.x < cn) {
      const double* b = a.boxes + (box_begin + cb + threadIdx.x) * 4;
      sbox[threadIdx.x] =
          box_to_cells(b[0], b[1], b[2], b[3], a.pixel_coords, a.cell_px, cells, a.margin);
    }
    __syncthreads();
    local = 0;
    for (int64_t k = threadIdx.x; k < per_slice; k += blockDim.x) {
      bool kept = ch > 0 ? keep[k] : false;
      if (!kept) {
        const int64_t row = k / cells.cells_w;
        const int64_t col = k - row * cells.cells_w;
        for (int64_t j = 0; j < cn; ++j) {
          if (cell_is_kept(cell_coverage(sbox[j], row, col), a.min_coverage)) {
            kept = true;
            break;
          }
        }
      }
      keep[k] = kept;
      local += kept ? 1 : 0;
    }
    __syncthreads();
  }

  // Block reduction of the kept cells of slice 0.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) local += __shfl_xor_sync(0xffffffffu, local, o);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = local;
  __syncthreads();
  int64_t kept_cells = 0;
  for (int w = 0; w < kThreads / 32; ++w) kept_cells += warp_counts[w];

  const bool all = kept_cells == 0 && a.keep_all_when_empty;
  for (int64_t tt = 0; tt < cells.t; ++tt) {
    for (int64_t k = threadIdx.x; k < per_slice; k += blockDim.x) {
      // Slice 0 was written by this same thread above, so reading it back is safe.
      keep[tt * per_slice + k] = all ? true : keep[k];
    }
  }
  if (threadIdx.x == 0) {
    a.kept_counts[img] = static_cast<int32_t>(all ? cells.t * per_slice : cells.t * kept_cells);
  }
}

// The per-image table of box_mask_kernel, computed on the device from `image_grid_thw` and
// `box_offsets` that live on the GPU (no device->host copy): the same checks as the host plan
// (box_mask_plan.cpp), as device-side asserts. One block; a running carry over chunks of
// kPlanThreads images gives each image its first token (exclusive prefix sum of t*h*w/merge^2).
__device__ __noinline__ void fail_plan(int what, long long image, long long a, long long b, long long c) {
  switch (what) {
    case 0:
      printf("tsparse.box_to_patch_mask: `image_grid_thw[%lld]` = (%lld, %lld, %lld) must be positive, h and w "
             "multiples of merge_size, and describe at most 2^30 tokens\n", image, a, b, c);
      TSPARSE_DEVICE_FAIL("tsparse.box_to_patch_mask: an `image_grid_thw` row is invalid");
      break;
    case 1:
      printf("tsparse.box_to_patch_mask: `box_offsets` must start at 0, be non-decreasing and end at the number "
             "of boxes (%lld); entry %lld is %lld\n", c, image, a);
      TSPARSE_DEVICE_FAIL("tsparse.box_to_patch_mask: `box_offsets` is invalid");
      break;
    default:
      printf("tsparse.box_to_patch_mask: `num_tokens` = %lld but `image_grid_thw` describes %lld merged tokens\n", a, b);
      TSPARSE_DEVICE_FAIL("tsparse.box_to_patch_mask: `num_tokens` does not match `image_grid_thw`");
  }
}

template <typename G, typename O>
__global__ void __launch_bounds__(kPlanThreads)
box_plan_kernel(const G* __restrict__ grid, const O* __restrict__ offs, int64_t num_images, int64_t num_boxes,
                int64_t num_tokens, int64_t merge, int64_t* __restrict__ meta) {
  __shared__ long long warp_sums[kPlanThreads / 32];
  __shared__ long long carry;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    carry = 0;
    if (static_cast<int64_t>(offs[0]) != 0) fail_plan(1, 0, static_cast<int64_t>(offs[0]), 0, num_boxes);
    if (static_cast<int64_t>(offs[num_images]) != num_boxes) {
      fail_plan(1, num_images, static_cast<int64_t>(offs[num_images]), 0, num_boxes);
    }
  }
  __syncthreads();
  for (int64_t start = 0; start < num_images; start += kPlanThreads) {
    const int64_t i = start + threadIdx.x;
    long long tokens = 0;
    int64_t t = 0, hc = 0, wc = 0, b0 = 0, b1 = 0;
    if (i < num_images) {
      t = static_cast<int64_t>(grid[i * 3]);
      const int64_t h = static_cast<int64_t>(grid[i * 3 + 1]), w = static_cast<int64_t>(grid[i * 3 + 2]);
      const bool ok = t >= 1 && h >= 1 && w >= 1 && h % merge == 0 && w % merge == 0;
      hc = ok ? h / merge : 1;
      wc = ok ? w / merge : 1;
      if (!ok || hc > (int64_t(1) << 30) / wc || t > (int64_t(1) << 30) / (hc * wc)) fail_plan(0, i, t, h, w);
      b0 = static_cast<int64_t>(offs[i]);
      b1 = static_cast<int64_t>(offs[i + 1]);
      if (b1 < b0) fail_plan(1, i + 1, b1, 0, num_boxes);
      tokens = t * hc * wc;
    }
    long long x = tokens;  // inclusive scan
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
      long long w = warp_sums[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const long long y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_sums[lane] = w;
    }
    __syncthreads();
    const long long incl = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + x;
    if (i < num_images) {
      int64_t* m = meta + i * 6;
      m[0] = t;
      m[1] = hc;
      m[2] = wc;
      m[3] = incl - tokens;
      m[4] = b0;
      m[5] = b1;
    }
    __syncthreads();
    if (threadIdx.x == kPlanThreads - 1) carry = incl;
    __syncthreads();
  }
  if (threadIdx.x == 0 && carry != num_tokens) fail_plan(2, 0, num_tokens, carry, 0);
}

// ---------------------------------------------------------------------------------
template <typename Unit>
bool aligned_for(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % sizeof(Unit)) == 0;
}

template <typename Unit, typename IndexT>
void launch_compose_copy(const ComposeRowsArgs& a, int64_t esize, cudaStream_t stream) {
  const int64_t units = a.cols * esize / int64_t(sizeof(Unit));
  const int l2 = lanes_log2_for(units);
  auto go = [&](auto off_tag) {
    using Off = decltype(off_tag);
    compose_copy_kernel<Unit, IndexT, Off><<<grid_for(a.out_rows, l2), kThreads, 0, stream>>>(
        static_cast<Unit*>(a.out), a.out_rows, units,
        static_cast<const Unit*>(a.src), a.src_rows, a.src_stride * esize / int64_t(sizeof(Unit)),
        static_cast<const IndexT*>(a.map), a.negative_means_fill, static_cast<const Unit*>(a.fill),
        a.fill_stride * esize / int64_t(sizeof(Unit)), a.inverse, a.op, l2);
  };
  fits_u32(units) ? go(uint32_t{}) : go(int64_t{});
}

template <typename Unit>
bool unit_fits(const ComposeRowsArgs& a, int64_t esize) {
  const int64_t u = sizeof(Unit);
  return (a.cols * esize) % u == 0 && (a.src_stride * esize) % u == 0 &&
         (a.fill_stride * esize) % u == 0 && aligned_for<Unit>(a.out) &&
         aligned_for<Unit>(a.src) && aligned_for<Unit>(a.fill);
}

template <typename IndexT>
void dispatch_compose_copy(const ComposeRowsArgs& a, int64_t esize, cudaStream_t stream) {
  if (unit_fits<uint4>(a, esize)) return launch_compose_copy<uint4, IndexT>(a, esize, stream);
  if (unit_fits<uint2>(a, esize)) return launch_compose_copy<uint2, IndexT>(a, esize, stream);
  if (unit_fits<uint32_t>(a, esize)) return launch_compose_copy<uint32_t, IndexT>(a, esize, stream);
  if (unit_fits<uint16_t>(a, esize)) return launch_compose_copy<uint16_t, IndexT>(a, esize, stream);
  return launch_compose_copy<uint8_t, IndexT>(a, esize, stream);
}

// Calls f.template operator()<T>() for the element type of `d`.
template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(static_cast<__half*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case DType::kFloat64: f(static_cast<double*>(nullptr)); break;
    default: f(static_cast<float*>(nullptr)); break;
  }
}

template <typename T>
bool vec16_ok(int64_t cols, int64_t stride, const void* a, const void* b) {
  constexpr int64_t V = 16 / sizeof(T);
  return cols % V == 0 && stride % V == 0 && aligned_for<uint4>(a) && aligned_for<uint4>(b);
}

}  // namespace

// ---------------------------------------------------------------------------------
void compose_rows(const ComposeRowsArgs& a, cudaStream_t stream) {
  // The inverse map is preset first: it must be valid even when there is nothing to move.
  if (a.inverse != nullptr && a.src_rows > 0) {
    cudaMemsetAsync(a.inverse, 0xff, size_t(a.src_rows) * sizeof(int32_t), stream);
  }
  if (a.out_rows <= 0) return;
  if (a.cols <= 0) {
    // No data to move (D == 0), but indices are still checked and the inverse map built.
    if (a.inverse != nullptr || !a.negative_means_fill) {
      build_inverse(a.map, a.map_is_int64, a.out_rows, a.inverse, a.src_rows, a.op, stream);
    }
    return;
  }
  if (a.scale == nullptr) {
    const int64_t esize = a.elem_bytes;
    if (a.map_is_int64) {
      dispatch_compose_copy<int64_t>(a, esize, stream);
    } else {
      dispatch_compose_copy<int32_t>(a, esize, stream);
    }
    return;
  }
  dispatch_dtype(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto go = [&](auto vec_tag, auto* idx_tag, auto off_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      using IndexT = std::remove_pointer_t<decltype(idx_tag)>;
      using Off = decltype(off_tag);
      const int l2 = lanes_log2_for(a.cols / VEC);
      compose_scaled_kernel<T, VEC, IndexT, Off><<<grid_for(a.out_rows, l2), kThreads, 0, stream>>>(
          static_cast<T*>(a.out), a.out_rows, a.cols, static_cast<const T*>(a.src), a.src_rows,
          a.src_stride, static_cast<const IndexT*>(a.map), a.scale, a.op, l2);
    };
    using V16c = std::integral_constant<int, int(16 / sizeof(T))>;
    using V1 = std::integral_constant<int, 1>;
    const bool vec = vec16_ok<T>(a.cols, a.src_stride, a.src, a.out);
    const bool narrow = fits_u32(a.cols);  // element offsets inside a row
    auto with_vec = [&](auto* idx_tag) {
      if (vec) {
        narrow ? go(V16c{}, idx_tag, uint32_t{}) : go(V16c{}, idx_tag, int64_t{});
      } else {
        narrow ? go(V1{}, idx_tag, uint32_t{}) : go(V1{}, idx_tag, int64_t{});
      }
    };
    if (a.map_is_int64) {
      with_vec(static_cast<int64_t*>(nullptr));
    } else {
      with_vec(static_cast<int32_t*>(nullptr));
    }
  });
}

void build_inverse(const void* index, bool index_is_int64, int64_t m_rows, int32_t* inverse,
                   int64_t n_rows, OpTag op, cudaStream_t stream) {
  if (inverse != nullptr && n_rows > 0) {
    cudaMemsetAsync(inverse, 0xff, size_t(n_rows) * sizeof(int32_t), stream);
  }
  if (m_rows <= 0) return;
  int64_t blocks = (m_rows + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(num_sms()) * kBlocksPerSm;
  if (blocks > cap) blocks = cap;
  if (index_is_int64) {
    build_inverse_kernel<int64_t><<<unsigned(blocks), kThreads, 0, stream>>>(
        static_cast<const int64_t*>(index), m_rows, inverse, n_rows, op);
  } else {
    build_inverse_kernel<int32_t><<<unsigned(blocks), kThreads, 0, stream>>>(
        static_cast<const int32_t*>(index), m_rows, inverse, n_rows, op);
  }
}

int64_t segment_reduce_workspace_bytes(int64_t perm_len, int64_t cols, DType dtype) {
  const int64_t acc = dtype == DType::kFloat64 ? 8 : 4;
  return segment_workspace_rows(perm_len) * cols * acc;
}

void segment_reduce_rows(const SegmentReduceArgs& a, cudaStream_t stream) {
  if (a.out_rows <= 0 || a.cols <= 0) return;
  dispatch_dtype(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = typename Elem<T>::Acc;
    auto go = [&](auto vec_tag, auto off_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      using Off = decltype(off_tag);
      A* ws = static_cast<A*>(a.workspace);
      const int64_t chunks = segment_chunks(a.perm_len);
      if (segment_workspace_rows(a.perm_len) > 0) {  // some segment may be long enough to split
        int64_t blocks = chunks;
        const int64_t cap = int64_t(num_sms()) * kBlocksPerSm;
        if (blocks > cap) blocks = cap;
        segment_pieces_kernel<T, VEC, Off><<<unsigned(blocks), kThreads, 0, stream>>>(
            ws, a.cols, static_cast<const T*>(a.src), a.src_rows, a.src_stride, a.perm, a.perm_len,
            a.offsets, a.out_rows);
      }
      const int l2 = lanes_log2_for(a.cols / VEC);
      segment_reduce_kernel<T, VEC, Off><<<grid_for(a.out_rows, l2), kThreads, 0, stream>>>(
          static_cast<T*>(a.out), a.out_rows, a.cols, static_cast<const T*>(a.src), a.src_rows,
          a.src_stride, a.perm, a.perm_len, a.offsets, a.mean, ws, l2);
    };
    const bool narrow = fits_u32(a.cols);
    if (vec16_ok<T>(a.cols, a.src_stride, a.src, a.out) && aligned_for<uint4>(a.workspace)) {
      using V = std::integral_constant<int, int(16 / sizeof(T))>;
      narrow ? go(V{}, uint32_t{}) : go(V{}, int64_t{});
    } else {
      using V = std::integral_constant<int, 1>;
      narrow ? go(V{}, uint32_t{}) : go(V{}, int64_t{});
    }
  });
}

void row_inv_norms(const void* x, int64_t rows, int64_t cols, int64_t stride, DType dtype,
                   double eps, float* out, cudaStream_t stream) {
  if (rows <= 0) return;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const unsigned grid = grid_for(rows, 5);
    if (vec16_ok<T>(cols, stride, x, nullptr)) {
      row_inv_norms_kernel<T, int(16 / sizeof(T))><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(x), rows, cols, stride, eps, out);
    } else {
      row_inv_norms_kernel<T, 1><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), rows,
                                                                cols, stride, eps, out);
    }
  });
}

void box_mask_plan(const BoxPlanArgs& a, cudaStream_t stream) {
  if (a.num_images <= 0) return;
  auto go = [&](auto* g_tag, auto* o_tag) {
    using G = std::remove_pointer_t<decltype(g_tag)>;
    using O = std::remove_pointer_t<decltype(o_tag)>;
    box_plan_kernel<G, O><<<1, kPlanThreads, 0, stream>>>(static_cast<const G*>(a.grid), static_cast<const O*>(a.offsets),
                                                          a.num_images, a.num_boxes, a.num_tokens, a.merge_size,
                                                          a.image_meta);
  };
  if (a.grid_is_int64) {
    a.offsets_is_int64 ? go(static_cast<int64_t*>(nullptr), static_cast<int64_t*>(nullptr))
                       : go(static_cast<int64_t*>(nullptr), static_cast<int32_t*>(nullptr));
  } else {
    a.offsets_is_int64 ? go(static_cast<int32_t*>(nullptr), static_cast<int64_t*>(nullptr))
                       : go(static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr));
  }
}

void box_to_patch_mask(const BoxMaskArgs& a, cudaStream_t stream) {
  if (a.num_images <= 0) return;
  box_mask_kernel<<<static_cast<unsigned>(a.num_images), kThreads, 0, stream>>>(a);
}

}  // namespace cuda
}  // namespace tsparse
