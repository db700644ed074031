// Host-side preparation of box_to_patch_mask, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tsparse {

struct BoxMaskPlan {
  at::Tensor boxes;       // float64 [num_boxes, 4], contiguous, on the boxes' device
  at::Tensor image_meta;  // int64 [num_images, 6] on the CPU: (t, cells_h, cells_w,
                          // token_offset, box_begin, box_end)
  int64_t num_images = 0;
  double cell_px = 28.0;
};

// Validates every argument of box_to_patch_mask and builds the per-image table.
// `box_offsets` and `image_grid_thw` are read on the host: when they live on a GPU
// they are copied to the CPU first, which waits for the device (one sync each).
BoxMaskPlan plan_box_mask(const at::Tensor& boxes, const at::Tensor& box_offsets,
                          const at::Tensor& image_grid_thw, int64_t num_tokens,
                          int64_t patch_size, int64_t merge_size, double margin,
                          double min_coverage);

}  // namespace tsparse
