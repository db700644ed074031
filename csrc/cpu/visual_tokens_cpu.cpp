// CPU kernels of the visual-token op family. The box geometry is the same
// __host__ __device__ code the CUDA kernel runs (tsparse/box_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../common/box_mask_plan.h"
#include "../common/checks.h"
#include "../common/row_args.h"
#include "../common/row_ops.h"
#include "tsparse/box_math.h"
#include "tsparse/segment_plan.h"

namespace tsparse {

namespace {

constexpr int64_t kRowGrain = 64;  // rows per parallel_for task

// Reads an int32/int64 index tensor as int64 values.
struct IndexReader {
  const int32_t* i32 = nullptr;
  const int64_t* i64 = nullptr;
  explicit IndexReader(const at::Tensor& t) {
    if (t.scalar_type() == at::kInt) {
      i32 = t.data_ptr<int32_t>();
    } else {
      i64 = t.data_ptr<int64_t>();
    }
  }
  int64_t operator[](int64_t i) const { return i32 ? int64_t(i32[i]) : i64[i]; }
};

// Checks every index against [0, bound) and, when `inverse` is given (bound int32 entries,
// preset to -1), records inverse[index[m]] = m, rejecting duplicates.
void check_and_invert(const at::Tensor& index, int64_t bound, int32_t* inverse, const char* op,
                      const char* arg) {
  const IndexReader idx(index);
  const int64_t m_rows = index.size(0);
  for (int64_t m = 0; m < m_rows; ++m) {
    const int64_t s = idx[m];
    TORCH_CHECK_INDEX(s >= 0 && s < bound, "tsparse.", op, ": `", arg, "[", m, "]` = ", s,
                      " is out of range [0, ", bound, ")");
    if (inverse != nullptr) {
      TORCH_CHECK_VALUE(inverse[s] == -1, "tsparse.", op, ": `", arg, "` holds ", s,
                        " more than once (at ", inverse[s], " and ", m,
                        "), but unique indices were promised");
      inverse[s] = static_cast<int32_t>(m);
    }
  }
}

// out[r] = map[r] >= 0 ? (src ? src[map[r]] * scale : 0) : (fill ? fill[r] : 0)
void compose_into(at::Tensor& out, const at::Tensor* src, const IndexReader& map,
                  const at::Tensor* fill, const float* scale) {
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t esize = out.element_size();
  const size_t row_bytes = size_t(cols * esize);
  char* o = static_cast<char*>(out.data_ptr());
  const char* s = src ? static_cast<const char*>(src->data_ptr()) : nullptr;
  const int64_t s_stride = src ? row_stride(*src) * esize : 0;
  const char* f = fill ? static_cast<const char*>(fill->data_ptr()) : nullptr;
  const int64_t f_stride = fill ? row_stride(*fill) * esize : 0;
  if (scale == nullptr) {
    at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t m = map[r];
        char* dst = o + r * int64_t(row_bytes);
        if (m >= 0) {
          if (s) {
            std::memcpy(dst, s + m * s_stride, row_bytes);
          } else {
            std::memset(dst, 0, row_bytes);
          }
        } else if (f) {
          std::memcpy(dst, f + r * f_stride, row_bytes);
        } else {
          std::memset(dst, 0, row_bytes);
        }
      }
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "compose_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t m = map[r];
        scalar_t* dst = reinterpret_cast<scalar_t*>(o + r * int64_t(row_bytes));
        if (m < 0) {
          std::memset(dst, 0, row_bytes);
          continue;
        }
        const scalar_t* row = reinterpret_cast<const scalar_t*>(s + m * s_stride);
        const acc_t sc = static_cast<acc_t>(scale[m]);
        for (int64_t c = 0; c < cols; ++c) {
          dst[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) * sc);
        }
      }
    });
  });
}

}  // namespace

// ---------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> box_to_patch_mask_cpu(
    const at::Tensor& boxes, const at::Tensor& box_offsets, const at::Tensor& image_grid_thw,
    int64_t num_tokens, bool pixel_coords, int64_t patch_size, int64_t merge_size, double margin,
    double min_coverage, bool keep_all_when_empty) {
  const BoxMaskPlan plan = plan_box_mask(boxes, box_offsets, image_grid_thw, num_tokens,
                                         patch_size, merge_size, margin, min_coverage);
  at::Tensor keep = at::empty({num_tokens}, boxes.options().dtype(at::kBool));
  at::Tensor counts = at::empty({plan.num_images}, boxes.options().dtype(at::kInt));
  bool* k = keep.data_ptr<bool>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  const double* bx = plan.boxes.data_ptr<double>();
  const int64_t* meta = plan.image_meta.data_ptr<int64_t>();
  at::parallel_for(0, plan.num_images, 1, [&](int64_t b, int64_t e) {
    std::vector<CellBox> cb;
    for (int64_t i = b; i < e; ++i) {
      const int64_t* mi = meta + i * 6;
      const ImageCells img{mi[0], mi[1], mi[2]};
      bool* ki = k + mi[3];
      cb.clear();
      for (int64_t j = mi[4]; j < mi[5]; ++j) {
        const double* p = bx + j * 4;
        const CellBox c = box_to_cells(p[0], p[1], p[2], p[3], pixel_coords, plan.cell_px, img,
                                       margin);
        if (c.valid) cb.push_back(c);
      }
      const int64_t per_slice = img.cells_h * img.cells_w;
      int64_t kept = 0;
      for (int64_t row = 0; row < img.cells_h; ++row) {
        for (int64_t col = 0; col < img.cells_w; ++col) {
          bool on = false;
          for (const CellBox& c : cb) {
            if (cell_is_kept(cell_coverage(c, row, col), min_coverage)) {
              on = true;
              break;
            }
          }
          ki[row * img.cells_w + col] = on;
          kept += on ? 1 : 0;
        }
      }
      const bool all = kept == 0 && keep_all_when_empty;
      if (all) std::memset(ki, 1, size_t(per_slice));
      for (int64_t t = 1; t < img.t; ++t) std::memcpy(ki + t * per_slice, ki, size_t(per_slice));
      cnt[i] = static_cast<int32_t>(all ? img.t * per_slice : img.t * kept);
    }
  });
  return {keep, counts};
}

// ---------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> gather_rows_cpu(const at::Tensor& x_in,
                                                   const at::Tensor& index_in,
                                                   bool build_inverse) {
  const GatherPrep p = prep_gather(x_in, index_in, build_inverse);
  const int64_t n = p.x.size(0);
  at::Tensor inverse = build_inverse ? at::full({n}, -1, p.x.options().dtype(at::kInt))
                                     : at::empty({0}, p.x.options().dtype(at::kInt));
  check_and_invert(p.index, n, build_inverse ? inverse.data_ptr<int32_t>() : nullptr,
                   "gather_tokens", "index");
  at::Tensor out = at::empty({p.index.size(0), p.x.size(1)}, p.x.options());
  compose_into(out, &p.x, IndexReader(p.index), nullptr, nullptr);
  return {out, inverse};
}

std::tuple<at::Tensor, at::Tensor> scatter_rows_cpu(const at::Tensor& src_in,
                                                    const at::Tensor& index_in, int64_t num_rows,
                                                    const c10::optional<at::Tensor>& fill_in) {
  const ScatterPrep p = prep_scatter(src_in, index_in, num_rows, fill_in);
  at::Tensor inverse = at::full({num_rows}, -1, p.src.options().dtype(at::kInt));
  check_and_invert(p.index, num_rows, inverse.data_ptr<int32_t>(), "scatter_tokens", "index");
  at::Tensor out = at::empty({num_rows, p.src.size(1)}, p.src.options());
  compose_into(out, &p.src, IndexReader(inverse), p.fill.defined() ? &p.fill : nullptr, nullptr);
  return {out, inverse};
}

at::Tensor compose_rows_cpu(const c10::optional<at::Tensor>& src_in, const at::Tensor& row_map_in,
                            const c10::optional<at::Tensor>& fill_in,
                            const c10::optional<at::Tensor>& row_scale) {
  const ComposePrep p = prep_compose(src_in, row_map_in, fill_in, row_scale);
  const int64_t rows = p.row_map.size(0);
  const IndexReader map(p.row_map);
  if (p.src.defined()) {
    // Entries >= 0 must address `src`; negative ones select `fill` (or zero).
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK_INDEX(map[r] < p.src.size(0), "tsparse.compose_rows: `row_map[", r, "]` = ",
                        map[r], " is out of range for `src` with ", p.src.size(0), " rows");
    }
  }
  at::Tensor out = at::empty({rows, p.ref.size(1)}, p.ref.options());
  compose_into(out, p.src.defined() ? &p.src : nullptr, map, p.fill.defined() ? &p.fill : nullptr,
               p.scale.defined() ? p.scale.data_ptr<float>() : nullptr);
  return out;
}

at::Tensor segment_reduce_rows_cpu(const at::Tensor& src_in, const at::Tensor& perm_in,
                                   const at::Tensor& offsets_in, bool mean) {
  constexpr const char* op = "segment_reduce_rows";
  const SegmentPrep p = prep_segment(src_in, perm_in, offsets_in);
  const at::Tensor& src = p.src;
  const int64_t rows = p.offsets.size(0) - 1;
  const int64_t cols = src.size(1);
  const int64_t* off = p.offsets.data_ptr<int64_t>();
  const int64_t* pm = p.perm.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(off[r] >= 0 && off[r + 1] >= off[r] && off[r + 1] <= p.perm.size(0),
                      "tsparse.", op, ": `offsets` must be non-decreasing within [0, ",
                      p.perm.size(0), "]");
  }
  if (rows > 0) {
    for (int64_t i = off[0]; i < off[rows]; ++i) {
      TORCH_CHECK_INDEX(pm[i] >= 0 && pm[i] < src.size(0), "tsparse.", op, ": `perm[", i,
                        "]` = ", pm[i], " is out of range [0, ", src.size(0), ")");
    }
  }
  at::Tensor out = at::empty({rows, cols}, src.options());
  if (rows == 0 || cols == 0) return out;
  const int64_t stride = row_stride(src);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(static_cast<size_t>(cols));
      std::vector<acc_t> part(static_cast<size_t>(cols));
      // acc += src[perm[i]] for i in [i0, i1), in member order
      auto add_members = [&](std::vector<acc_t>& into, int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t* row = s + pm[i] * stride;
          for (int64_t c = 0; c < cols; ++c) into[size_t(c)] += static_cast<acc_t>(row[c]);
        }
      };
      for (int64_t r = b; r < e; ++r) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if (!segment_is_split(off[r], off[r + 1])) {
          add_members(acc, off[r], off[r + 1]);
        } else {
          // The CUDA kernels' order (tsparse/segment_plan.h): pieces cut at multiples of
          // kSegmentPiece, each summed from zero, then added in order.
          for (int64_t i = off[r]; i < off[r + 1];) {
            const int64_t j = segment_piece_end(i, off[r + 1]);
            std::fill(part.begin(), part.end(), acc_t(0));
            add_members(part, i, j);
            for (int64_t c = 0; c < cols; ++c) acc[size_t(c)] += part[size_t(c)];
            i = j;
          }
        }
        const int64_t n = off[r + 1] - off[r];
        const acc_t inv_n = (mean && n > 0) ? acc_t(1) / static_cast<acc_t>(n) : acc_t(1);
        scalar_t* dst = o + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          dst[c] = static_cast<scalar_t>(mean ? acc[size_t(c)] * inv_n : acc[size_t(c)]);
        }
      }
    });
  });
  return out;
}

at::Tensor row_inv_norms_cpu(const at::Tensor& x_in, double eps) {
  constexpr const char* op = "row_inv_norms";
  check_rows(x_in, op, "x");
  check_eps(eps, op);
  const at::Tensor x = rows_view(x_in);
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const int64_t stride = row_stride(x);
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        acc_t ss = acc_t(0);
        const scalar_t* row = p + r * stride;
        for (int64_t c = 0; c < cols; ++c) {
          const acc_t v = static_cast<acc_t>(row[c]);
          ss += v * v;
        }
        const double nrm = std::sqrt(static_cast<double>(ss));
        o[r] = static_cast<float>(1.0 / (nrm > eps ? nrm : eps));
      }
    });
  });
  return out;
}

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_tokens_cpu(const at::Tensor& x,
                                                               const at::Tensor& keep,
                                                               at::IntArrayRef token_offsets,
                                                               at::IntArrayRef kept_counts) {
  static const RowKernels kernels{&compose_rows_cpu, &segment_reduce_rows_cpu, &row_inv_norms_cpu};
  return fuse_tokens_impl(x, keep, c10::nullopt, token_offsets, kept_counts, kernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_tokens_nearest_cpu(const at::Tensor& x,
                                                                       const at::Tensor& keep,
                                                                       const at::Tensor& coords,
                                                                       at::IntArrayRef token_offsets,
                                                                       at::IntArrayRef kept_counts) {
  static const RowKernels kernels{&compose_rows_cpu, &segment_reduce_rows_cpu, &row_inv_norms_cpu};
  return fuse_tokens_impl(x, keep, coords, token_offsets, kept_counts, kernels);
}
}  // namespace

TORCH_LIBRARY_IMPL(tsparse, CPU, m) {
  m.impl("box_to_patch_mask", &box_to_patch_mask_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("compose_rows", &compose_rows_cpu);
  m.impl("segment_reduce_rows", &segment_reduce_rows_cpu);
  m.impl("row_inv_norms", &row_inv_norms_cpu);
  m.impl("fuse_tokens", &fuse_tokens_cpu);
  m.impl("fuse_tokens_nearest", &fuse_tokens_nearest_cpu);
}

}  // namespace tsparse
