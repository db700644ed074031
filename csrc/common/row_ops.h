// Backend entry points of the row-movement ops, declared once so the backend-neutral
// composite (token fusion) and the schema registrations can share them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace tsparse {

// ---- CPU (csrc/cpu/visual_tokens_cpu.cpp) ----
std::tuple<at::Tensor, at::Tensor> box_to_patch_mask_cpu(
    const at::Tensor& boxes, const at::Tensor& box_offsets, const at::Tensor& image_grid_thw,
    int64_t num_tokens, bool pixel_coords, int64_t patch_size, int64_t merge_size, double margin,
    double min_coverage, bool keep_all_when_empty);
std::tuple<at::Tensor, at::Tensor> gather_rows_cpu(const at::Tensor& x, const at::Tensor& index,
                                                   bool build_inverse);
std::tuple<at::Tensor, at::Tensor> scatter_rows_cpu(const at::Tensor& src, const at::Tensor& index,
                                                    int64_t num_rows,
                                                    const c10::optional<at::Tensor>& fill);
at::Tensor compose_rows_cpu(const c10::optional<at::Tensor>& src, const at::Tensor& row_map,
                            const c10::optional<at::Tensor>& fill,
                            const c10::optional<at::Tensor>& row_scale);
at::Tensor segment_reduce_rows_cpu(const at::Tensor& src, const at::Tensor& perm,
                                   const at::Tensor& offsets, bool mean);
at::Tensor row_inv_norms_cpu(const at::Tensor& x, double eps);

// ---- CUDA (csrc/cuda/visual_tokens_cuda.cpp), only when built with CUDA ----
std::tuple<at::Tensor, at::Tensor> box_to_patch_mask_cuda(
    const at::Tensor& boxes, const at::Tensor& box_offsets, const at::Tensor& image_grid_thw,
    int64_t num_tokens, bool pixel_coords, int64_t patch_size, int64_t merge_size, double margin,
    double min_coverage, bool keep_all_when_empty);
std::tuple<at::Tensor, at::Tensor> gather_rows_cuda(const at::Tensor& x, const at::Tensor& index,
                                                    bool build_inverse);
std::tuple<at::Tensor, at::Tensor> scatter_rows_cuda(const at::Tensor& src,
                                                     const at::Tensor& index, int64_t num_rows,
                                                     const c10::optional<at::Tensor>& fill);
at::Tensor compose_rows_cuda(const c10::optional<at::Tensor>& src, const at::Tensor& row_map,
                             const c10::optional<at::Tensor>& fill,
                             const c10::optional<at::Tensor>& row_scale);
at::Tensor segment_reduce_rows_cuda(const at::Tensor& src, const at::Tensor& perm,
                                    const at::Tensor& offsets, bool mean);
at::Tensor row_inv_norms_cuda(const at::Tensor& x, double eps);

// ---- Backend-neutral composite (csrc/common/fuse_tokens.cpp) ----
// The kernels a backend lends to the composite.
struct RowKernels {
  at::Tensor (*compose_rows)(const c10::optional<at::Tensor>&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&);
  at::Tensor (*segment_reduce_rows)(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
  at::Tensor (*row_inv_norms)(const at::Tensor&, double);
};

// coords: nullopt -> the most cosine-similar kept token (fuse_tokens); float64 [N, C] -> the
// kept token nearest in those coordinates (fuse_tokens_nearest).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_tokens_impl(const at::Tensor& x,
                                                                const at::Tensor& keep,
                                                                const c10::optional<at::Tensor>& coords,
                                                                at::IntArrayRef token_offsets,
                                                                at::IntArrayRef kept_counts,
                                                                const RowKernels& kernels);

}  // namespace tsparse
