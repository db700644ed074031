// Raw-pointer launchers for tsparse's CUDA kernels.
//
// The .cu files that implement these include no torch headers (see
// shared/notes/build.md: a .cu with ATen headers takes ~25x longer to compile).
// Torch glue (argument checks, allocation, streams) lives in csrc/cuda/*_cuda.cpp.
// Every launcher returns immediately for empty work and never launches a
// zero-sized grid. Callers check cudaGetLastError() afterwards.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tsparse {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Which public op a kernel runs for: only used to name the op in device-side error
// messages (out-of-range or duplicate indices abort the kernel with a device-side assert,
// TSPARSE_DEVICE_FAIL, like PyTorch's own index asserts; see tsparse/ops/visual_tokens.py).
enum class OpTag : int32_t {
  kGatherTokens = 0,
  kScatterTokens = 1,
  kFuseTokens = 2,
  kInternal = 3,
};

// out[r, :] for r in [0, out_rows):
//   s = map[r]
//   s >= 0:  src ? src[s, :] * (scale ? scale[s] : 1) : 0     (s >= src_rows is an error)
//   s <  0:  negative_means_fill ? (fill ? fill[r, :] : 0) : error
// When `inverse` is non-null (src_rows int32 entries; the launcher presets them to -1),
// the kernel records inverse[s] = r for every r (a second r for the same s is an error:
// the caller promised unique indices).
// `out` is contiguous [out_rows, cols]; src / fill rows are `*_stride` elements apart
// (inner dimension contiguous).
struct ComposeRowsArgs {
  void* out = nullptr;
  int64_t out_rows = 0;
  int64_t cols = 0;
  const void* src = nullptr;
  int64_t src_rows = 0;
  int64_t src_stride = 0;
  const void* map = nullptr;
  bool map_is_int64 = true;
  bool negative_means_fill = false;
  const void* fill = nullptr;
  int64_t fill_stride = 0;
  const float* scale = nullptr;
  int32_t* inverse = nullptr;
  int64_t elem_bytes = 4;            // element size: the copy path moves bytes, any dtype
  DType dtype = DType::kFloat32;     // element type: used by the scaled path (floating only)
  OpTag op = OpTag::kInternal;
};
void compose_rows(const ComposeRowsArgs& args, cudaStream_t stream);

// inverse[index[m]] = m for m in [0, m_rows); inverse (n_rows int32) is first set to -1.
// Out-of-range and duplicate indices are errors.
void build_inverse(const void* index, bool index_is_int64, int64_t m_rows, int32_t* inverse,
                   int64_t n_rows, OpTag op, cudaStream_t stream);

// out[r, :] = sum_{i in [offsets[r], offsets[r+1])} src[perm[i], :]  (divided by the count when
// `mean`; rows with no members are zero). Accumulates in fp32 (fp64 for fp64 data) in a fixed
// order (tsparse/segment_plan.h: segments longer than kSegmentPiece members are summed in
// pieces by many CTAs, then the pieces in order), so the result is deterministic and equal to
// the CPU kernel's. offsets: int64 [out_rows + 1]; perm: int64. `workspace`: at least
// segment_reduce_workspace_bytes(perm_len, cols, dtype) bytes of device memory, 16-byte
// aligned (may be null when that is 0).
struct SegmentReduceArgs {
  void* out = nullptr;
  int64_t out_rows = 0;
  int64_t cols = 0;
  const void* src = nullptr;
  int64_t src_rows = 0;
  int64_t src_stride = 0;
  const int64_t* perm = nullptr;
  int64_t perm_len = 0;              // offsets must lie in [0, perm_len]
  const int64_t* offsets = nullptr;
  bool mean = false;
  DType dtype = DType::kFloat32;
  void* workspace = nullptr;
};
int64_t segment_reduce_workspace_bytes(int64_t perm_len, int64_t cols, DType dtype);
void segment_reduce_rows(const SegmentReduceArgs& args, cudaStream_t stream);

// out[r] = 1 / max(||x[r, :]||_2, eps), accumulated in fp32 (fp64 for fp64 data, stored as fp32).
void row_inv_norms(const void* x, int64_t rows, int64_t cols, int64_t stride, DType dtype,
                   double eps, float* out, cudaStream_t stream);

// Box -> merged-token mask, one block per image, one launch for the whole batch.
//   boxes:      double [num_boxes, 4] (x1, y1, x2, y2), contiguous
//   image_meta: int64 [num_images, 6] = (t, cells_h, cells_w, token_offset, box_begin, box_end)
//   keep:       bool [num_tokens] (every token of every image is written)
//   kept_counts:int32 [num_images]
struct BoxMaskArgs {
  const double* boxes = nullptr;
  const int64_t* image_meta = nullptr;
  int64_t num_images = 0;
  bool pixel_coords = false;
  double cell_px = 28.0;
  double margin = 0.0;
  double min_coverage = 0.0;
  bool keep_all_when_empty = true;
  bool* keep = nullptr;
  int32_t* kept_counts = nullptr;
};
void box_to_patch_mask(const BoxMaskArgs& args, cudaStream_t stream);

// The per-image table above, computed on the device (one small kernel) from an
// `image_grid_thw` [num_images, 3] and `box_offsets` [num_images + 1] that live on the GPU, so
// box_to_patch_mask never copies them to the host. Invalid values (non-positive or
// non-multiple-of-merge grids, decreasing offsets, offsets that do not span the boxes, a
// `num_tokens` that does not match) abort with a device-side assert.
struct BoxPlanArgs {
  const void* grid = nullptr;     // int32 / int64 [num_images, 3], contiguous
  bool grid_is_int64 = true;
  const void* offsets = nullptr;  // int32 / int64 [num_images + 1], contiguous
  bool offsets_is_int64 = true;
  int64_t num_images = 0;
  int64_t num_boxes = 0;
  int64_t num_tokens = 0;
  int64_t merge_size = 2;
  int64_t* image_meta = nullptr;  // out: int64 [num_images, 6]
};
void box_mask_plan(const BoxPlanArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tsparse
