// Argument validation and preparation of the row ops, shared by the CPU and CUDA glue
// so both backends reject exactly the same inputs with the same messages. Checks that
// need the index VALUES (range, uniqueness) are backend-specific: the CPU scans them on
// the host, the CUDA kernels check them on the device.
#pragma once

#include <ATen/core/Tensor.h>
#include <limits>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "checks.h"

namespace tsparse {

struct GatherPrep {
  at::Tensor x;      // rows view
  at::Tensor index;  // contiguous
};

inline GatherPrep prep_gather(const at::Tensor& x, const at::Tensor& index, bool build_inverse) {
  constexpr const char* op = "gather_tokens";
  check_rows(x, op, "x", /*any_dtype=*/true);
  check_index_tensor(index, op, "index");
  check_same_device(index, x, op, "index", "x");
  if (build_inverse) check_int32_rows(index.size(0), op, "index");
  return {rows_view(x), index.contiguous()};
}

struct ScatterPrep {
  at::Tensor src;    // rows view
  at::Tensor index;  // contiguous
  at::Tensor fill;   // rows view, or undefined
};

inline ScatterPrep prep_scatter(const at::Tensor& src, const at::Tensor& index, int64_t num_rows,
                                const c10::optional<at::Tensor>& fill) {
  constexpr const char* op = "scatter_tokens";
  check_rows(src, op, "src", /*any_dtype=*/true);
  check_index_tensor(index, op, "index");
  check_same_device(index, src, op, "index", "src");
  TORCH_CHECK_VALUE(index.size(0) == src.size(0), "tsparse.", op, ": `index` has ", index.size(0),
                    " entries but `src` has ", src.size(0), " rows");
  TORCH_CHECK_VALUE(num_rows >= 0, "tsparse.", op, ": `num_rows` must be >= 0, got ", num_rows);
  // The [num_rows, D] output and the int32 inverse [num_rows]: their byte counts must fit in
  // int64 (torch's own message would be "Storage size calculation overflowed").
  const int64_t row_bytes = src.size(1) * static_cast<int64_t>(src.element_size()) + 4;
  TORCH_CHECK_VALUE(num_rows <= std::numeric_limits<int64_t>::max() / row_bytes, "tsparse.", op, ": `num_rows` = ",
                    num_rows, " is too large: the [num_rows, ", src.size(1),
                    "] output and its int32 row map would need more than 2^63 bytes");
  check_int32_rows(src.size(0), op, "src");
  ScatterPrep p{rows_view(src), index.contiguous(), at::Tensor()};
  if (fill.has_value()) {
    check_rows(*fill, op, "fill", /*any_dtype=*/true);
    check_same_device(*fill, src, op, "fill", "src");
    TORCH_CHECK_TYPE(fill->scalar_type() == src.scalar_type(), "tsparse.", op,
                     ": `fill` has dtype ", fill->scalar_type(), " but `src` has ",
                     src.scalar_type());
    TORCH_CHECK_VALUE(fill->size(0) == num_rows && fill->size(1) == src.size(1), "tsparse.", op,
                      ": `fill` must have shape [num_rows, D] = [", num_rows, ", ", src.size(1),
                      "], got ", fill->sizes());
    p.fill = rows_view(*fill);
  }
  return p;
}

struct ComposePrep {
  at::Tensor src;      // rows view, or undefined
  at::Tensor row_map;  // contiguous
  at::Tensor fill;     // rows view, or undefined
  at::Tensor scale;    // float32 contiguous, or undefined
  at::Tensor ref;      // src if given, else fill: dtype, D and device of the output
};

inline ComposePrep prep_compose(const c10::optional<at::Tensor>& src, const at::Tensor& row_map,
                                const c10::optional<at::Tensor>& fill,
                                const c10::optional<at::Tensor>& row_scale) {
  constexpr const char* op = "compose_rows";
  TORCH_CHECK_VALUE(src.has_value() || fill.has_value(), "tsparse.", op,
                    ": at least one of `src` and `fill` must be given");
  check_index_tensor(row_map, op, "row_map");
  ComposePrep p;
  p.row_map = row_map.contiguous();
  const bool copy_only = !row_scale.has_value();
  if (src.has_value()) {
    check_rows(*src, op, "src", copy_only);
    check_same_device(row_map, *src, op, "row_map", "src");
    p.src = rows_view(*src);
  }
  if (fill.has_value()) {
    check_rows(*fill, op, "fill", copy_only);
    check_same_device(row_map, *fill, op, "row_map", "fill");
    TORCH_CHECK_VALUE(fill->size(0) == row_map.size(0), "tsparse.", op,
                      ": `fill` must have one row per `row_map` entry (", row_map.size(0),
                      "), got ", fill->size(0));
    if (p.src.defined()) {
      TORCH_CHECK_TYPE(fill->scalar_type() == p.src.scalar_type(), "tsparse.", op,
                       ": `fill` and `src` must have the same dtype");
      TORCH_CHECK_VALUE(fill->size(1) == p.src.size(1), "tsparse.", op,
                        ": `fill` and `src` must have the same D");
    }
    p.fill = rows_view(*fill);
  }
  if (row_scale.has_value()) {
    TORCH_CHECK_VALUE(p.src.defined() && !p.fill.defined(), "tsparse.", op,
                      ": `row_scale` needs `src` and no `fill`");
    TORCH_CHECK_TYPE(row_scale->scalar_type() == at::kFloat, "tsparse.", op,
                     ": `row_scale` must be float32");
    TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == p.src.size(0), "tsparse.",
                      op, ": `row_scale` must have one entry per `src` row");
    check_same_device(*row_scale, p.src, op, "row_scale", "src");
    p.scale = row_scale->contiguous();
  }
  p.ref = p.src.defined() ? p.src : p.fill;
  return p;
}

struct SegmentPrep {
  at::Tensor src;      // rows view
  at::Tensor perm;     // int64 contiguous
  at::Tensor offsets;  // int64 contiguous, [rows + 1]
};

inline SegmentPrep prep_segment(const at::Tensor& src, const at::Tensor& perm,
                                const at::Tensor& offsets) {
  constexpr const char* op = "segment_reduce_rows";
  check_rows(src, op, "src");
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong, "tsparse.", op, ": `perm` must be int64");
  TORCH_CHECK_VALUE(perm.dim() == 1, "tsparse.", op, ": `perm` must be 1-D");
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "tsparse.", op,
                   ": `offsets` must be int64");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1, "tsparse.", op,
                    ": `offsets` must be 1-D [rows + 1]");
  check_same_device(perm, src, op, "perm", "src");
  check_same_device(offsets, src, op, "offsets", "src");
  return {rows_view(src), perm.contiguous(), offsets.contiguous()};
}

}  // namespace tsparse
