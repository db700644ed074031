// Host-side preparation of box_to_patch_mask, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tsparse {

struct BoxMaskPlan {
  at::Tensor boxes;       // float64 [num_boxes, 4], contiguous, on the boxes' device
  at::Tensor image_meta;  // int64 [num_images, 6] on the CPU: (t, cells_h, cells_w,
                          // token_offset, box_begin, box_end); undefined from check_box_mask_args
  int64_t num_images = 0;
  double cell_px = 28.0;
};

// Every check of box_to_patch_mask that needs no VALUE of `box_offsets` / `image_grid_thw`
// (dtypes, shapes, devices, the scalar arguments, the zero-image case). The CUDA op plans on the
// device after this when the metadata lives on the GPU (launchers.h: box_mask_plan).
BoxMaskPlan check_box_mask_args(const at::Tensor& boxes, const at::Tensor& box_offsets,
                                const at::Tensor& image_grid_thw, int64_t num_tokens,
                                int64_t patch_size, int64_t merge_size, double margin,
                                double min_coverage);

// check_box_mask_args, then the values (errors name the image and the entry) and the per-image
// table, built on the host in pinned memory when `pinned` (the CUDA op copies it to the GPU
// asynchronously). `box_offsets` and `image_grid_thw` are read on the host: when they live on a
// GPU they are copied to the CPU first, which waits for the device (the CPU op only).
BoxMaskPlan plan_box_mask(const at::Tensor& boxes, const at::Tensor& box_offsets,
                          const at::Tensor& image_grid_thw, int64_t num_tokens,
                          int64_t patch_size, int64_t merge_size, double margin,
                          double min_coverage, bool pinned = false);

}  // namespace tsparse
