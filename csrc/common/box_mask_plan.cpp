#include "box_mask_plan.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace tsparse {

namespace {

constexpr const char* kOp = "box_to_patch_mask";

at::Tensor host_int64(const at::Tensor& t) {
  // .to() on a CUDA tensor waits for the device: documented in the Python wrapper.
  return t.to(at::kCPU).to(at::kLong).contiguous();
}

}  // namespace

BoxMaskPlan check_box_mask_args(const at::Tensor& boxes, const at::Tensor& box_offsets,
                                const at::Tensor& image_grid_thw, int64_t num_tokens,
                                int64_t patch_size, int64_t merge_size, double margin,
                                double min_coverage) {
  TORCH_CHECK_TYPE(at::isFloatingType(boxes.scalar_type()), "tsparse.", kOp,
                   ": `boxes` must be a floating tensor, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "tsparse.", kOp,
                    ": `boxes` must have shape [num_boxes, 4] (x1, y1, x2, y2), got ",
                    boxes.sizes());
  TORCH_CHECK_TYPE(box_offsets.scalar_type() == at::kInt || box_offsets.scalar_type() == at::kLong,
                   "tsparse.", kOp, ": `box_offsets` must be int32 or int64, got ",
                   box_offsets.scalar_type());
  TORCH_CHECK_VALUE(box_offsets.dim() == 1, "tsparse.", kOp,
                    ": `box_offsets` must be 1-D [num_images + 1], got shape ", box_offsets.sizes());
  TORCH_CHECK_TYPE(
      image_grid_thw.scalar_type() == at::kInt || image_grid_thw.scalar_type() == at::kLong,
      "tsparse.", kOp, ": `image_grid_thw` must be int32 or int64, got ",
      image_grid_thw.scalar_type());
  TORCH_CHECK_VALUE(image_grid_thw.dim() == 2 && image_grid_thw.size(1) == 3, "tsparse.", kOp,
                    ": `image_grid_thw` must have shape [num_images, 3] (t, h, w), got ",
                    image_grid_thw.sizes());
  const int64_t num_images = image_grid_thw.size(0);
  TORCH_CHECK_VALUE(box_offsets.size(0) == num_images + 1, "tsparse.", kOp,
                    ": `box_offsets` must have num_images + 1 = ", num_images + 1,
                    " entries (one more than `image_grid_thw` has rows), got ",
                    box_offsets.size(0));
  for (const auto* t : {&box_offsets, &image_grid_thw}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() || t->device() == boxes.device(), "tsparse.", kOp,
                      ": `", t == &box_offsets ? "box_offsets" : "image_grid_thw", "` is on ",
                      t->device(), "; it must be on the CPU or on `boxes`' device (",
                      boxes.device(), ")");
  }
  TORCH_CHECK_VALUE(patch_size >= 1, "tsparse.", kOp, ": `patch_size` must be >= 1, got ",
                    patch_size);
  TORCH_CHECK_VALUE(merge_size >= 1, "tsparse.", kOp, ": `merge_size` must be >= 1, got ",
                    merge_size);
  TORCH_CHECK_VALUE(std::isfinite(margin) && margin >= 0.0, "tsparse.", kOp,
                    ": `margin` must be a finite number >= 0 (in cells), got ", margin);
  TORCH_CHECK_VALUE(std::isfinite(min_coverage) && min_coverage >= 0.0 && min_coverage < 1.0,
                    "tsparse.", kOp, ": `min_coverage` must be in [0, 1), got ", min_coverage);
  TORCH_CHECK_VALUE(num_tokens >= 0, "tsparse.", kOp, ": `num_tokens` must be >= 0, got ", num_tokens);
  if (num_images == 0) {  // decidable without reading any value
    TORCH_CHECK_VALUE(boxes.size(0) == 0, "tsparse.", kOp, ": `box_offsets[-1]` must equal the number of boxes (",
                      boxes.size(0), "), but there are no images");
    TORCH_CHECK_VALUE(num_tokens == 0, "tsparse.", kOp, ": `num_tokens` = ", num_tokens,
                      " but `image_grid_thw` describes 0 merged tokens");
  }
  BoxMaskPlan plan;
  plan.boxes = boxes.to(at::kDouble).contiguous();
  plan.num_images = num_images;
  plan.cell_px = static_cast<double>(patch_size) * static_cast<double>(merge_size);
  return plan;
}

BoxMaskPlan plan_box_mask(const at::Tensor& boxes, const at::Tensor& box_offsets,
                          const at::Tensor& image_grid_thw, int64_t num_tokens,
                          int64_t patch_size, int64_t merge_size, double margin,
                          double min_coverage, bool pinned) {
  BoxMaskPlan plan = check_box_mask_args(boxes, box_offsets, image_grid_thw, num_tokens, patch_size,
                                         merge_size, margin, min_coverage);
  const int64_t num_images = plan.num_images;
  const at::Tensor grid = host_int64(image_grid_thw);
  const at::Tensor offs = host_int64(box_offsets);
  const int64_t* g = grid.data_ptr<int64_t>();
  const int64_t* o = offs.data_ptr<int64_t>();
  const int64_t num_boxes = boxes.size(0);
  TORCH_CHECK_VALUE(o[0] == 0, "tsparse.", kOp, ": `box_offsets[0]` must be 0, got ", o[0]);
  TORCH_CHECK_VALUE(o[num_images] == num_boxes, "tsparse.", kOp,
                    ": `box_offsets[-1]` must equal the number of boxes (", num_boxes, "), got ",
                    o[num_images]);

  at::Tensor meta = at::empty({num_images, 6}, at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
  int64_t* m = meta.data_ptr<int64_t>();
  int64_t tokens = 0;
  for (int64_t i = 0; i < num_images; ++i) {
    const int64_t t = g[i * 3 + 0], h = g[i * 3 + 1], w = g[i * 3 + 2];
    TORCH_CHECK_VALUE(t >= 1 && h >= 1 && w >= 1, "tsparse.", kOp, ": `image_grid_thw[", i,
                      "]` = (", t, ", ", h, ", ", w, ") must be positive");
    TORCH_CHECK_VALUE(h % merge_size == 0 && w % merge_size == 0, "tsparse.", kOp,
                      ": `image_grid_thw[", i, "]` = (", t, ", ", h, ", ", w,
                      "): h and w must be multiples of merge_size = ", merge_size);
    TORCH_CHECK_VALUE(o[i + 1] >= o[i], "tsparse.", kOp,
                      ": `box_offsets` must be non-decreasing, but box_offsets[", i + 1, "] = ",
                      o[i + 1], " < box_offsets[", i, "] = ", o[i]);
    const int64_t hc = h / merge_size, wc = w / merge_size;
    TORCH_CHECK_VALUE(hc <= (int64_t(1) << 30) / wc && t <= (int64_t(1) << 30) / (hc * wc),
                      "tsparse.", kOp, ": `image_grid_thw[", i, "]` describes too many tokens");
    m[i * 6 + 0] = t;
    m[i * 6 + 1] = hc;
    m[i * 6 + 2] = wc;
    m[i * 6 + 3] = tokens;
    m[i * 6 + 4] = o[i];
    m[i * 6 + 5] = o[i + 1];
    tokens += t * hc * wc;
  }
  TORCH_CHECK_VALUE(num_tokens == tokens, "tsparse.", kOp, ": `num_tokens` = ", num_tokens,
                    " but `image_grid_thw` describes ", tokens, " merged tokens (sum of t*h*w / ",
                    merge_size * merge_size, ")");

  plan.image_meta = meta;
  return plan;
}

}  // namespace tsparse
