// Argument validation of the varlen ops, shared by the CPU and CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/index_select.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <limits>

#include "checks.h"

namespace tsparse {

constexpr const char* kPackOp = "pack_varlen";

// The attention mask as one of the kernels' mask types (bool, int32, int64), contiguous.
// Other dtypes (uint8, float, ...) are compared with zero once.
inline at::Tensor varlen_mask(const at::Tensor& attention_mask) {
  TORCH_CHECK_VALUE(attention_mask.dim() == 2, "tsparse.", kPackOp,
                    ": `attention_mask` must be 2-D [B, L], got shape ", attention_mask.sizes());
  TORCH_CHECK_VALUE(attention_mask.numel() <= std::numeric_limits<int32_t>::max(), "tsparse.",
                    kPackOp, ": `attention_mask` has ", attention_mask.numel(),
                    " tokens; cu_seqlens are int32, so at most 2^31 - 1 are supported");
  // One CUDA block per row (grid.x): B is bounded even when L == 0 leaves numel at 0.
  TORCH_CHECK_VALUE(attention_mask.size(0) <= std::numeric_limits<int32_t>::max(), "tsparse.",
                    kPackOp, ": `attention_mask` has ", attention_mask.size(0),
                    " rows; at most 2^31 - 1 are supported");
  const auto t = attention_mask.scalar_type();
  if (t == at::kBool || t == at::kInt || t == at::kLong) return attention_mask.contiguous();
  TORCH_CHECK_TYPE(!attention_mask.is_complex(), "tsparse.", kPackOp,
                   ": `attention_mask` must be bool or a real number type, got ", t);
  return attention_mask.ne(0);
}

inline at::Tensor varlen_keep(const c10::optional<at::Tensor>& keep, const at::Tensor& mask) {
  if (!keep.has_value()) return at::Tensor();
  TORCH_CHECK_TYPE(keep->scalar_type() == at::kBool, "tsparse.", kPackOp,
                   ": `keep` must be bool, got ", keep->scalar_type());
  TORCH_CHECK_VALUE(keep->sizes() == mask.sizes(), "tsparse.", kPackOp,
                    ": `keep` must have the shape of `attention_mask` ", mask.sizes(), ", got ",
                    keep->sizes());
  check_same_device(*keep, mask, kPackOp, "keep", "attention_mask");
  return keep->contiguous();
}

struct VarlenPackPrep {
  at::Tensor mask, keep, cu_seqlens, ids, pos;  // ids: int64 [B, L]; pos: int64 [C, B, L]
  int64_t batch = 0, seqlen = 0, channels = 0;
};

inline VarlenPackPrep prep_varlen_pack(const at::Tensor& attention_mask,
                                       const c10::optional<at::Tensor>& keep,
                                       const at::Tensor& cu_seqlens, int64_t total,
                                       const c10::optional<at::Tensor>& input_ids,
                                       const c10::optional<at::Tensor>& position_ids) {
  VarlenPackPrep p;
  p.mask = varlen_mask(attention_mask);
  p.keep = varlen_keep(keep, p.mask);
  p.batch = p.mask.size(0);
  p.seqlen = p.mask.size(1);
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, "tsparse.", kPackOp,
                   ": `cu_seqlens` must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) == p.batch + 1, "tsparse.", kPackOp,
                    ": `cu_seqlens` must have shape [B + 1] = [", p.batch + 1, "], got ",
                    cu_seqlens.sizes());
  check_same_device(cu_seqlens, p.mask, kPackOp, "cu_seqlens", "attention_mask");
  p.cu_seqlens = cu_seqlens.contiguous();
  TORCH_CHECK_VALUE(total >= 0 && total <= p.batch * p.seqlen, "tsparse.", kPackOp, ": `total` = ",
                    total, " must be in [0, B * L = ", p.batch * p.seqlen, "]");
  if (input_ids.has_value()) {
    TORCH_CHECK_TYPE(!at::isFloatingType(input_ids->scalar_type()) && !input_ids->is_complex() &&
                         input_ids->scalar_type() != at::kBool,
                     "tsparse.", kPackOp, ": `input_ids` must be an integer tensor, got ",
                     input_ids->scalar_type());
    TORCH_CHECK_VALUE(input_ids->sizes() == p.mask.sizes(), "tsparse.", kPackOp,
                      ": `input_ids` must have the shape of `attention_mask` ", p.mask.sizes(),
                      ", got ", input_ids->sizes());
    check_same_device(*input_ids, p.mask, kPackOp, "input_ids", "attention_mask");
    p.ids = input_ids->to(at::kLong).contiguous();
  }
  if (position_ids.has_value()) {
    const at::Tensor& q = *position_ids;
    TORCH_CHECK_TYPE(!at::isFloatingType(q.scalar_type()) && !q.is_complex() && q.scalar_type() != at::kBool,
                     "tsparse.", kPackOp, ": `position_ids` must be an integer tensor, got ", q.scalar_type());
    const bool flat = q.dim() == 2 && q.size(0) == p.batch && q.size(1) == p.seqlen;
    const bool rows = q.dim() == 3 && q.size(1) == p.batch && q.size(2) == p.seqlen;
    TORCH_CHECK_VALUE(flat || rows, "tsparse.", kPackOp,
                      ": `position_ids` must have shape [B, L] or [C, B, L] with [B, L] = ",
                      p.mask.sizes(), ", got ", q.sizes());
    check_same_device(q, p.mask, kPackOp, "position_ids", "attention_mask");
    p.pos = (flat ? q.unsqueeze(0) : q).to(at::kLong).contiguous();
    p.channels = p.pos.size(0);
  }
  return p;
}

// varlen_gather's `inverse` ([N] int32: packed row of each input row, -1 if dropped) is what its
// backward scatters by. Its shape, dtype and device are always checked; its VALUES only when a
// caller passes it (check_inverse = true, the default of the raw op): pack_varlen / pack_batch
// hand over varlen_pack's own output, which is the inverse of `indices` by construction, and
// skip the value check (a few [N]/[M] passes and an async assert per call).
inline void check_varlen_inverse_shape(const at::Tensor& x, const at::Tensor& inverse) {
  TORCH_CHECK_VALUE(inverse.dim() == 1 && inverse.scalar_type() == at::kInt && inverse.size(0) == x.size(0),
                    "tsparse.", kPackOp, ": `inverse` must be int32 [B * L] = [", x.size(0), "]");
  check_same_device(inverse, x, kPackOp, "inverse", "x");
}

// The values: it must be exactly the inverse of `indices` ([M], already range-checked by the
// gather): inverse[indices[p]] == p for every p, and no other entry >= 0. Checked without a host
// sync on CUDA (check_on_device).
inline void check_varlen_inverse(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& inverse) {
  check_varlen_inverse_shape(x, inverse);
  const int64_t m = indices.size(0);
  const at::Tensor back = inverse.index_select(0, indices.to(at::kLong));
  const at::Tensor ok = back.eq(at::arange(m, inverse.options())).all().logical_and(
      inverse.ge(0).sum().eq(m));
  check_on_device(ok, kPackOp,
                  "`inverse` is not the inverse map of `indices` (inverse[indices[p]] must be p, "
                  "every other entry -1)");
}

}  // namespace tsparse
