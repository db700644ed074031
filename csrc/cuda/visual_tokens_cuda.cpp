// Torch glue for the CUDA kernels of the visual-token op family: argument checks
// (shared with the CPU backend), allocation, device guard and stream, launch checks.
// Index VALUES are checked on the device (see launchers.h); no op here waits for the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../common/box_mask_plan.h"
#include "../common/checks.h"
#include "cuda_glue.h"
#include "../common/row_args.h"
#include "../common/row_ops.h"
#include "tsparse/launchers.h"

namespace tsparse {

std::tuple<at::Tensor, at::Tensor> box_to_patch_mask_cuda(
    const at::Tensor& boxes, const at::Tensor& box_offsets, const at::Tensor& image_grid_thw,
    int64_t num_tokens, bool pixel_coords, int64_t patch_size, int64_t merge_size, double margin,
    double min_coverage, bool keep_all_when_empty) {
  check_cuda(boxes, "box_to_patch_mask", "boxes");
  c10::cuda::CUDAGuard guard(boxes.device());
  // The per-image table: planned on the host into pinned memory and copied asynchronously when
  // `box_offsets` and `image_grid_thw` are on the CPU (as the HF processor returns them), or
  // planned on the device by one small kernel when either lives on the GPU. No host sync and no
  // pageable copy either way.
  const bool host_meta = box_offsets.device().is_cpu() && image_grid_thw.device().is_cpu();
  BoxMaskPlan plan;
  at::Tensor meta;
  if (host_meta) {
    plan = plan_box_mask(boxes, box_offsets, image_grid_thw, num_tokens, patch_size, merge_size, margin,
                         min_coverage, /*pinned=*/true);
    if (plan.num_images > 0) meta = plan.image_meta.to(boxes.device(), /*non_blocking=*/true);
  } else {
    plan = check_box_mask_args(boxes, box_offsets, image_grid_thw, num_tokens, patch_size, merge_size, margin,
                               min_coverage);
    if (plan.num_images > 0) {
      // CPU metadata beside GPU metadata: copied through a FRESH pinned buffer. (pin_memory()
      // returns a caller's already-pinned tensor itself, and the async copy would then read it
      // after the op returned, racing with the caller's next write to it.)
      auto on_device = [&](const at::Tensor& t) {
        if (!t.device().is_cpu()) return t.contiguous();
        at::Tensor staged = at::empty(t.sizes(), t.options().pinned_memory(true));
        staged.copy_(t);
        return staged.to(boxes.device(), /*non_blocking=*/true);
      };
      const at::Tensor grid = on_device(image_grid_thw);
      const at::Tensor offs = on_device(box_offsets);
      meta = at::empty({plan.num_images, 6}, boxes.options().dtype(at::kLong));
      cuda::BoxPlanArgs pa;
      pa.grid = grid.data_ptr();
      pa.grid_is_int64 = grid.scalar_type() == at::kLong;
      pa.offsets = offs.data_ptr();
      pa.offsets_is_int64 = offs.scalar_type() == at::kLong;
      pa.num_images = plan.num_images;
      pa.num_boxes = boxes.size(0);
      pa.num_tokens = num_tokens;
      pa.merge_size = merge_size;
      pa.image_meta = meta.data_ptr<int64_t>();
      cuda::box_mask_plan(pa, current_stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  at::Tensor keep = at::empty({num_tokens}, boxes.options().dtype(at::kBool));
  at::Tensor counts = at::empty({plan.num_images}, boxes.options().dtype(at::kInt));
  if (plan.num_images == 0) return {keep, counts};
  cuda::BoxMaskArgs a;
  a.boxes = plan.boxes.data_ptr<double>();
  a.image_meta = meta.data_ptr<int64_t>();
  a.num_images = plan.num_images;
  a.pixel_coords = pixel_coords;
  a.cell_px = plan.cell_px;
  a.margin = margin;
  a.min_coverage = min_coverage;
  a.keep_all_when_empty = keep_all_when_empty;
  a.keep = keep.data_ptr<bool>();
  a.kept_counts = counts.data_ptr<int32_t>();
  cuda::box_to_patch_mask(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {keep, counts};
}

std::tuple<at::Tensor, at::Tensor> gather_rows_cuda(const at::Tensor& x_in,
                                                    const at::Tensor& index_in,
                                                    bool build_inverse) {
  const GatherPrep p = prep_gather(x_in, index_in, build_inverse);
  c10::cuda::CUDAGuard guard(p.x.device());
  const int64_t n = p.x.size(0);
  at::Tensor inverse = at::empty({build_inverse ? n : 0}, p.x.options().dtype(at::kInt));
  at::Tensor out = at::empty({p.index.size(0), p.x.size(1)}, p.x.options());
  cuda::ComposeRowsArgs a;
  a.out = out.data_ptr();
  a.out_rows = out.size(0);
  a.cols = out.size(1);
  a.src = p.x.data_ptr();
  a.src_rows = n;
  a.src_stride = row_stride(p.x);
  a.map = p.index.data_ptr();
  a.map_is_int64 = p.index.scalar_type() == at::kLong;
  a.negative_means_fill = false;
  a.inverse = build_inverse ? inverse.data_ptr<int32_t>() : nullptr;
  a.elem_bytes = p.x.element_size();
  a.op = cuda::OpTag::kGatherTokens;
  cuda::compose_rows(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, inverse};
}

std::tuple<at::Tensor, at::Tensor> scatter_rows_cuda(const at::Tensor& src_in,
                                                     const at::Tensor& index_in, int64_t num_rows,
                                                     const c10::optional<at::Tensor>& fill_in) {
  const ScatterPrep p = prep_scatter(src_in, index_in, num_rows, fill_in);
  c10::cuda::CUDAGuard guard(p.src.device());
  at::Tensor inverse = at::empty({num_rows}, p.src.options().dtype(at::kInt));
  cuda::build_inverse(p.index.data_ptr(), p.index.scalar_type() == at::kLong, p.index.size(0),
                      inverse.data_ptr<int32_t>(), num_rows, cuda::OpTag::kScatterTokens,
                      current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor out = at::empty({num_rows, p.src.size(1)}, p.src.options());
  cuda::ComposeRowsArgs a;
  a.out = out.data_ptr();
  a.out_rows = num_rows;
  a.cols = out.size(1);
  a.src = p.src.data_ptr();
  a.src_rows = p.src.size(0);
  a.src_stride = row_stride(p.src);
  a.map = inverse.data_ptr();
  a.map_is_int64 = false;
  a.negative_means_fill = true;
  a.fill = p.fill.defined() ? p.fill.data_ptr() : nullptr;
  a.fill_stride = p.fill.defined() ? row_stride(p.fill) : 0;
  a.elem_bytes = p.src.element_size();
  a.op = cuda::OpTag::kScatterTokens;
  cuda::compose_rows(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, inverse};
}

at::Tensor compose_rows_cuda(const c10::optional<at::Tensor>& src_in, const at::Tensor& row_map_in,
                             const c10::optional<at::Tensor>& fill_in,
                             const c10::optional<at::Tensor>& row_scale) {
  const ComposePrep p = prep_compose(src_in, row_map_in, fill_in, row_scale);
  check_cuda(p.ref, "compose_rows", p.src.defined() ? "src" : "fill");
  c10::cuda::CUDAGuard guard(p.ref.device());
  at::Tensor out = at::empty({p.row_map.size(0), p.ref.size(1)}, p.ref.options());
  cuda::ComposeRowsArgs a;
  a.out = out.data_ptr();
  a.out_rows = out.size(0);
  a.cols = out.size(1);
  if (p.src.defined()) {
    a.src = p.src.data_ptr();
    a.src_rows = p.src.size(0);
    a.src_stride = row_stride(p.src);
  } else {
    // No source: every entry >= 0 yields a zero row, so any non-negative value is in range.
    a.src_rows = std::numeric_limits<int64_t>::max();
  }
  a.map = p.row_map.data_ptr();
  a.map_is_int64 = p.row_map.scalar_type() == at::kLong;
  a.negative_means_fill = true;
  if (p.fill.defined()) {
    a.fill = p.fill.data_ptr();
    a.fill_stride = row_stride(p.fill);
  }
  a.scale = p.scale.defined() ? p.scale.data_ptr<float>() : nullptr;
  a.elem_bytes = p.ref.element_size();
  if (a.scale != nullptr) a.dtype = cuda_dtype(p.ref.scalar_type());
  a.op = cuda::OpTag::kInternal;
  cuda::compose_rows(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor segment_reduce_rows_cuda(const at::Tensor& src_in, const at::Tensor& perm_in,
                                    const at::Tensor& offsets_in, bool mean) {
  const SegmentPrep p = prep_segment(src_in, perm_in, offsets_in);
  check_cuda(p.src, "segment_reduce_rows", "src");
  c10::cuda::CUDAGuard guard(p.src.device());
  const int64_t rows = p.offsets.size(0) - 1;
  at::Tensor out = at::empty({rows, p.src.size(1)}, p.src.options());
  cuda::SegmentReduceArgs a;
  a.out = out.data_ptr();
  a.out_rows = rows;
  a.cols = out.size(1);
  a.src = p.src.data_ptr();
  a.src_rows = p.src.size(0);
  a.src_stride = row_stride(p.src);
  a.perm = p.perm.data_ptr<int64_t>();
  a.perm_len = p.perm.size(0);
  a.offsets = p.offsets.data_ptr<int64_t>();
  a.mean = mean;
  a.dtype = cuda_dtype(p.src.scalar_type());
  // Partial sums of long segments (tsparse/segment_plan.h); empty when no segment can be split.
  const int64_t ws_bytes = cuda::segment_reduce_workspace_bytes(a.perm_len, a.cols, a.dtype);
  at::Tensor ws;
  if (ws_bytes > 0) {
    ws = at::empty({ws_bytes}, p.src.options().dtype(at::kByte));
    a.workspace = ws.data_ptr();
  }
  cuda::segment_reduce_rows(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor row_inv_norms_cuda(const at::Tensor& x_in, double eps) {
  check_rows(x_in, "row_inv_norms", "x");
  check_cuda(x_in, "row_inv_norms", "x");
  check_eps(eps, "row_inv_norms");
  const at::Tensor x = rows_view(x_in);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  cuda::row_inv_norms(x.data_ptr(), x.size(0), x.size(1), row_stride(x), cuda_dtype(x.scalar_type()),
                      eps, out.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_tokens_cuda(const at::Tensor& x,
                                                                const at::Tensor& keep,
                                                                at::IntArrayRef token_offsets,
                                                                at::IntArrayRef kept_counts) {
  check_cuda(x, "fuse_tokens", "x");
  c10::cuda::CUDAGuard guard(x.device());
  static const RowKernels kernels{&compose_rows_cuda, &segment_reduce_rows_cuda,
                                  &row_inv_norms_cuda};
  return fuse_tokens_impl(x, keep, c10::nullopt, token_offsets, kept_counts, kernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_tokens_nearest_cuda(const at::Tensor& x,
                                                                        const at::Tensor& keep,
                                                                        const at::Tensor& coords,
                                                                        at::IntArrayRef token_offsets,
                                                                        at::IntArrayRef kept_counts) {
  check_cuda(x, "fuse_tokens_nearest", "x");
  c10::cuda::CUDAGuard guard(x.device());
  static const RowKernels kernels{&compose_rows_cuda, &segment_reduce_rows_cuda,
                                  &row_inv_norms_cuda};
  return fuse_tokens_impl(x, keep, coords, token_offsets, kept_counts, kernels);
}
}  // namespace

TORCH_LIBRARY_IMPL(tsparse, CUDA, m) {
  m.impl("box_to_patch_mask", &box_to_patch_mask_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("compose_rows", &compose_rows_cuda);
  m.impl("segment_reduce_rows", &segment_reduce_rows_cuda);
  m.impl("row_inv_norms", &row_inv_norms_cuda);
  m.impl("fuse_tokens", &fuse_tokens_cuda);
  m.impl("fuse_tokens_nearest", &fuse_tokens_nearest_cuda);
}

}  // namespace tsparse
