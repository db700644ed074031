// Box -> merged-token-cell geometry, shared by the CPU and CUDA kernels.
//
// No torch headers here: this file is included by .cu translation units.
//
// Geometry (Qwen2.5-VL, see shared/notes/qwen2_5_vl.md): image i has a patch grid
// (t, h, w) of `patch_size`-pixel patches; the vision merger fuses merge x merge
// patches, so the language model sees t * (h / merge) * (w / merge) tokens, t-major,
// then row-major over the (h / merge) x (w / merge) cell grid. One cell covers
// (patch_size * merge) pixels square of the RESIZED image.
//
// All arithmetic is done in double precision, one rounding per operation, in the
// same order on host and device (the device path uses explicitly rounded intrinsics
// so nvcc cannot contract a multiply and a subtract into an FMA). The pure-PyTorch
// reference (tsparse/reference.py) performs the same fp64 operations, so the CPU,
// CUDA and reference masks agree bit for bit, including on cell boundaries.
#pragma once

#include <cstdint>

#include "tsparse/host_device.h"

namespace tsparse {

// Rounded-to-nearest double ops that nvcc never fuses into an FMA.
TSPARSE_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

TSPARSE_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

TSPARSE_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

TSPARSE_HD double dmin(double a, double b) { return a < b ? a : b; }
TSPARSE_HD double dmax(double a, double b) { return a > b ? a : b; }

TSPARSE_HD bool is_finite(double v) {
  // NaN fails every comparison; +-inf fails the magnitude bound.
  return v == v && v <= 1.7976931348623157e308 && v >= -1.7976931348623157e308;
}

// A box expressed in merged-cell units of one image, already grown by the margin
// and clipped to [0, cells_w] x [0, cells_h]. `valid` is false for boxes that must be
// ignored (non-finite coordinate, x2 <= x1 or y2 <= y1 before growing).
struct CellBox {
  double x1, y1, x2, y2;
  bool valid;
};

// Per-image geometry, in merged cells.
struct ImageCells {
  int64_t t;        // temporal slices
  int64_t cells_h;  // h / merge
  int64_t cells_w;  // w / merge
};

// Converts one box to cell units.
//   pixel_coords == false: coordinates are fractions (0..1) of the image side:
//       cell = coord * cells_side
//   pixel_coords == true: coordinates are pixels of the resized image:
//       cell = coord / cell_px, cell_px = patch_size * merge_size
// Then each side is grown by `margin` cells and clipped to the image.
TSPARSE_HD CellBox box_to_cells(double x1, double y1, double x2, double y2,
                                bool pixel_coords, double cell_px,
                                const ImageCells& img, double margin) {
  CellBox b;
  b.valid = is_finite(x1) && is_finite(y1) && is_finite(x2) && is_finite(y2) &&
            x2 > x1 && y2 > y1;
  const double wc = static_cast<double>(img.cells_w);
  const double hc = static_cast<double>(img.cells_h);
  if (!b.valid) {
    b.x1 = b.y1 = b.x2 = b.y2 = 0.0;
    return b;
  }
  if (pixel_coords) {
    x1 = x1 / cell_px;
    x2 = x2 / cell_px;
    y1 = y1 / cell_px;
    y2 = y2 / cell_px;
  } else {
    x1 = mul_rn(x1, wc);
    x2 = mul_rn(x2, wc);
    y1 = mul_rn(y1, hc);
    y2 = mul_rn(y2, hc);
  }
  b.x1 = dmin(dmax(sub_rn(x1, margin), 0.0), wc);
  b.y1 = dmin(dmax(sub_rn(y1, margin), 0.0), hc);
  b.x2 = dmin(dmax(add_rn(x2, margin), 0.0), wc);
  b.y2 = dmin(dmax(add_rn(y2, margin), 0.0), hc);
  return b;
}

// Area of cell (row, col) covered by the box, as a fraction of the cell (cells are
// 1 x 1 in these units). 0 when they do not overlap or merely touch.
TSPARSE_HD double cell_coverage(const CellBox& b, int64_t row, int64_t col) {
  if (!b.valid) return 0.0;
  const double c0 = static_cast<double>(col);
  const double r0 = static_cast<double>(row);
  const double ox = sub_rn(dmin(c0 + 1.0, b.x2), dmax(c0, b.x1));
  if (!(ox > 0.0)) return 0.0;
  const double oy = sub_rn(dmin(r0 + 1.0, b.y2), dmax(r0, b.y1));
  if (!(oy > 0.0)) return 0.0;
  return mul_rn(ox, oy);
}

// A token is kept when some single box covers more than `min_coverage` of its cell.
TSPARSE_HD bool cell_is_kept(double coverage, double min_coverage) {
  return coverage > min_coverage;
}

}  // namespace tsparse
