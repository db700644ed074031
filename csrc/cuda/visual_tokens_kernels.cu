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
// vector loads/stores (ld.global.nc.v4). Each lane keeps kUnroll units in flight.
// Row base offsets use 64-bit math (rows * stride can exceed 2^31); offsets inside a
// row are 32-bit (the host checks that a row is < 2^31 bytes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "tsparse/box_math.h"
#include "tsparse/cuda_common.cuh"
#include "tsparse/launchers.h"

namespace tsparse {
namespace cuda {
namespace {

constexpr int kThreads = 256;   // threads per block for every row kernel
constexpr int kUnroll = 4;      // units each lane has in flight per iteration
constexpr int kBlocksPerSm = 8; // grid-stride cap: enough blocks to fill every SM several times
constexpr int kBoxChunk = 64;   // boxes staged in shared memory at a time (box mask)

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

struct RowGroups {
  int lanes_log2;
  __device__ int lanes() const { return 1 << lanes_log2; }
  __device__ int lane() const { return threadIdx.x & ((1 << lanes_log2) - 1); }
  __device__ int64_t first() const {
    return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> lanes_log2;
  }
  __device__ int64_t stride() const { return (int64_t(gridDim.x) * blockDim.x) >> lanes_log2; }
};

template <typename Unit>
__device__ __forceinline__ void copy_row(Unit* __restrict__ dst, const Unit* __restrict__ src,
                                         int units, int lane, int lanes) {
  // 64-bit loop indices: `units` may be up to 2^31 - 1 (a row of bytes), and u + k * lanes
  // would overflow an int in the last trip.
  for (int64_t u = lane; u < units; u += int64_t(lanes) * kUnroll) {
    Unit v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t uu = u + int64_t(k) * lanes;
      if (uu < units) v[k] = __ldg(src + uu);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t uu = u + int64_t(k) * lanes;
      if (uu < units) dst[uu] = v[k];
    }
  }
}

template <typename Unit>
__device__ __forceinline__ void zero_row(Unit* __restrict__ dst, int units, int lane, int lanes) {
  const Unit z{};
  for (int64_t u = lane; u < units; u += lanes) dst[u] = z;
}

// ---------------------------------------------------------------------------------
// compose_rows, copy flavour (no scale): dtype-agnostic, moves `Unit`s.
template <typename Unit, typename IndexT>
__global__ void __launch_bounds__(kThreads)
compose_copy_kernel(Unit* __restrict__ out, int64_t out_rows, int units,
                    const Unit* __restrict__ src, int64_t src_rows, int64_t src_stride,
                    const IndexT* __restrict__ map, bool negative_means_fill,
                    const Unit* __restrict__ fill, int64_t fill_stride,
                    int32_t* __restrict__ inverse, OpTag op, int lanes_log2) {
  const RowGroups g{lanes_log2};
  const int lane = g.lane();
  const int lanes = g.lanes();
  for (int64_t r = g.first(); r < out_rows; r += g.stride()) {
    const int64_t s = static_cast<int64_t>(map[r]);
    Unit* dst = out + r * units;
    if (s >= 0) {
      if (s >= src_rows) fail_out_of_range(op, s, src_rows);
      if (inverse != nullptr && lane == 0) {
        const int32_t prev = atomicCAS(inverse + s, -1, static_cast<int32_t>(r));
        if (prev != -1) fail_duplicate(op, s);
      }
      if (src != nullptr) {
        copy_row(dst, src + s * src_stride, units, lane, lanes);
      } else {
        zero_row(dst, units, lane, lanes);
      }
    } else {
      if (!negative_means_fill) fail_out_of_range(op, s, src_rows);
      if (fill != nullptr) {
        copy_row(dst, fill + r * fill_stride, units, lane, lanes);
      } else {
        zero_row(dst, units, lane, lanes);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Element traits (Elem<T>: load/store with fp32 or fp64 accumulation): tsparse/cuda_common.cuh.

// VEC elements of T moved as one access (VEC * sizeof(T) == 16, or VEC == 1).
template <typename T, int VEC> struct Pack {
  union {
    uint4 u;
    T e[VEC];
  };
};
template <typename T> struct Pack<T, 1> {
  T e[1];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  Pack<T, VEC> v;
  if constexpr (VEC == 1) {
    v.e[0] = p[0];
  } else {
    v.u = __ldg(reinterpret_cast<const uint4*>(p));
  }
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  if constexpr (VEC == 1) {
    p[0] = v.e[0];
  } else {
    *reinterpret_cast<uint4*>(p) = v.u;
  }
}

// compose_rows, scaled flavour: out[r] = map[r] >= 0 ? src[map[r]] * scale[map[r]] : 0.
// (Token-fusion backward: each input row receives its output row's gradient / count.)
template <typename T, int VEC, typename IndexT>
__global__ void __launch_bounds__(kThreads)
compose_scaled_kernel(T* __restrict__ out, int64_t out_rows, int64_t cols,
                      const T* __restrict__ src, int64_t src_rows, int64_t src_stride,
                      const IndexT* __restrict__ map, const float* __restrict__ scale,
                      OpTag op, int lanes_log2) {
  using E = Elem<T>;
  const RowGroups g{lanes_log2};
  const int lane = g.lane();
  const int lanes = g.lanes();
  const int vecs = static_cast<int>(cols / VEC);
  for (int64_t r = g.first(); r < out_rows; r += g.stride()) {
    const int64_t s = static_cast<int64_t>(map[r]);
    T* dst = out + r * cols;
    if (s < 0) {
      Pack<T, VEC> z;
#pragma unroll
      for (int k = 0; k < VEC; ++k) z.e[k] = E::store(typename E::Acc(0));
      for (int v = lane; v < vecs; v += lanes) store_pack<T, VEC>(dst + v * VEC, z);
      continue;
    }
    if (s >= src_rows) fail_out_of_range(op, s, src_rows);
    const typename E::Acc sc = static_cast<typename E::Acc>(scale[s]);
    const T* row = src + s * src_stride;
    for (int v = lane; v < vecs; v += lanes) {
      Pack<T, VEC> p = load_pack<T, VEC>(row + v * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) p.e[k] = E::store(E::load(p.e[k]) * sc);
      store_pack<T, VEC>(dst + v * VEC, p);
    }
  }
}

// ---------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
segment_reduce_kernel(T* __restrict__ out, int64_t out_rows, int64_t cols,
                      const T* __restrict__ src, int64_t src_rows, int64_t src_stride,
                      const int64_t* __restrict__ perm, int64_t perm_len,
                      const int64_t* __restrict__ offsets, bool mean, int lanes_log2) {
  using E = Elem<T>;
  using A = typename E::Acc;
  const RowGroups g{lanes_log2};
  const int lane = g.lane();
  const int lanes = g.lanes();
  const int vecs = static_cast<int>(cols / VEC);
  for (int64_t r = g.first(); r < out_rows; r += g.stride()) {
    const int64_t beg = offsets[r];
    const int64_t end = offsets[r + 1];
    if (beg < 0 || end > perm_len || end < beg) {  // the CPU rejects decreasing offsets too
      fail_out_of_range(OpTag::kInternal, beg < 0 ? beg : end, perm_len + 1);
    }
    const A inv_n = (mean && end > beg) ? A(1) / static_cast<A>(end - beg) : A(1);
    T* dst = out + r * cols;
    for (int v = lane; v < vecs; v += lanes) {
      A acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = A(0);
      for (int64_t i = beg; i < end; ++i) {
        const int64_t s = perm[i];
        if (s < 0 || s >= src_rows) fail_out_of_range(OpTag::kInternal, s, src_rows);
        const Pack<T, VEC> p = load_pack<T, VEC>(src + s * src_stride + v * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += E::load(p.e[k]);
      }
      Pack<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.e[k] = E::store(mean ? acc[k] * inv_n : acc[k]);
      store_pack<T, VEC>(dst + v * VEC, o);
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
  const int vecs = static_cast<int>(cols / VEC);
  for (int64_t r = warp; r < rows; r += warps) {
    const T* row = x + r * stride;
    A ss = A(0);
    for (int v = lane; v < vecs; v += 32) {
      const Pack<T, VEC> p = load_pack<T, VEC>(row + v * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A e = E::load(p.e[k]);
        ss += e * e;
      }
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

// ---------------------------------------------------------------------------------
template <typename Unit>
bool aligned_for(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % sizeof(Unit)) == 0;
}

template <typename Unit, typename IndexT>
void launch_compose_copy(const ComposeRowsArgs& a, int64_t esize, cudaStream_t stream) {
  const int64_t units = a.cols * esize / int64_t(sizeof(Unit));
  const int l2 = lanes_log2_for(units);
  compose_copy_kernel<Unit, IndexT><<<grid_for(a.out_rows, l2), kThreads, 0, stream>>>(
      static_cast<Unit*>(a.out), a.out_rows, static_cast<int>(units),
      static_cast<const Unit*>(a.src), a.src_rows, a.src_stride * esize / int64_t(sizeof(Unit)),
      static_cast<const IndexT*>(a.map), a.negative_means_fill, static_cast<const Unit*>(a.fill),
      a.fill_stride * esize / int64_t(sizeof(Unit)), a.inverse, a.op, l2);
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
    auto go = [&](auto vec_tag, auto* idx_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      using IndexT = std::remove_pointer_t<decltype(idx_tag)>;
      const int l2 = lanes_log2_for(a.cols / VEC);
      compose_scaled_kernel<T, VEC, IndexT><<<grid_for(a.out_rows, l2), kThreads, 0, stream>>>(
          static_cast<T*>(a.out), a.out_rows, a.cols, static_cast<const T*>(a.src), a.src_rows,
          a.src_stride, static_cast<const IndexT*>(a.map), a.scale, a.op, l2);
    };
    using V16 = std::integral_constant<int, int(16 / sizeof(T))>;
    using V1 = std::integral_constant<int, 1>;
    const bool vec = vec16_ok<T>(a.cols, a.src_stride, a.src, a.out);
    if (a.map_is_int64) {
      vec ? go(V16{}, static_cast<int64_t*>(nullptr)) : go(V1{}, static_cast<int64_t*>(nullptr));
    } else {
      vec ? go(V16{}, static_cast<int32_t*>(nullptr)) : go(V1{}, static_cast<int32_t*>(nullptr));
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

void segment_reduce_rows(const SegmentReduceArgs& a, cudaStream_t stream) {
  if (a.out_rows <= 0 || a.cols <= 0) return;
  dispatch_dtype(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto go = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int l2 = lanes_log2_for(a.cols / VEC);
      segment_reduce_kernel<T, VEC><<<grid_for(a.out_rows, l2), kThreads, 0, stream>>>(
          static_cast<T*>(a.out), a.out_rows, a.cols, static_cast<const T*>(a.src), a.src_rows,
          a.src_stride, a.perm, a.perm_len, a.offsets, a.mean, l2);
    };
    if (vec16_ok<T>(a.cols, a.src_stride, a.src, a.out)) {
      go(std::integral_constant<int, int(16 / sizeof(T))>{});
    } else {
      go(std::integral_constant<int, 1>{});
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

void box_to_patch_mask(const BoxMaskArgs& a, cudaStream_t stream) {
  if (a.num_images <= 0) return;
  box_mask_kernel<<<static_cast<unsigned>(a.num_images), kThreads, 0, stream>>>(a);
}

}  // namespace cuda
}  // namespace tsparse
