// CPU kernels of variable-length packing (same semantics as csrc/cuda/varlen_kernels.cu).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "../common/row_ops.h"
#include "../common/varlen_args.h"

namespace tsparse {

namespace {

// Calls f(is_kept) with a per-element predicate over the flattened [B, L] masks.
template <typename F>
void with_kept(const at::Tensor& mask, const at::Tensor& keep, F&& f) {
  const bool* k = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  auto run = [&](auto* m) {
    f([m, k](int64_t i) { return m[i] != 0 && (k == nullptr || k[i]); });
  };
  switch (mask.scalar_type()) {
    case at::kInt: run(mask.data_ptr<int32_t>()); break;
    case at::kLong: run(mask.data_ptr<int64_t>()); break;
    default: run(mask.data_ptr<bool>()); break;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_seqlens_cpu(const at::Tensor& attention_mask,
                                                      const c10::optional<at::Tensor>& keep_in) {
  const at::Tensor mask = varlen_mask(attention_mask);
  const at::Tensor keep = varlen_keep(keep_in, mask);
  const int64_t b = mask.size(0), l = mask.size(1);
  at::Tensor seqlens = at::empty({b}, mask.options().dtype(at::kInt));
  at::Tensor cu = at::empty({b + 1}, mask.options().dtype(at::kInt));
  int32_t* s = seqlens.data_ptr<int32_t>();
  with_kept(mask, keep, [&](auto kept) {
    at::parallel_for(0, b, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        int32_t c = 0;
        for (int64_t j = 0; j < l; ++j) c += kept(r * l + j) ? 1 : 0;
        s[r] = c;
      }
    });
  });
  int32_t* c = cu.data_ptr<int32_t>();
  c[0] = 0;
  for (int64_t r = 0; r < b; ++r) c[r + 1] = c[r] + s[r];
  return {seqlens, cu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_pack_cpu(
    const at::Tensor& attention_mask, const c10::optional<at::Tensor>& keep,
    const at::Tensor& cu_seqlens, int64_t total, const c10::optional<at::Tensor>& input_ids,
    const c10::optional<at::Tensor>& position_ids) {
  const VarlenPackPrep p = prep_varlen_pack(attention_mask, keep, cu_seqlens, total, input_ids, position_ids);
  const int64_t b = p.batch, l = p.seqlen;
  const int32_t* cu = p.cu_seqlens.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(int64_t(cu[b]) == total, "tsparse.", kPackOp, ": `total` = ", total,
                    " but the masks keep ", cu[b], " tokens");
  const auto lopt = p.mask.options().dtype(at::kLong);
  at::Tensor indices = at::empty({total}, lopt);
  at::Tensor inverse = at::empty({b * l}, p.mask.options().dtype(at::kInt));
  at::Tensor ids_out = at::empty({p.ids.defined() ? total : 0}, lopt);
  at::Tensor labels = at::empty({p.ids.defined() ? total : 0}, lopt);
  at::Tensor pos_out = at::empty({p.channels, total}, lopt);
  int64_t* idx = indices.data_ptr<int64_t>();
  int32_t* inv = inverse.data_ptr<int32_t>();
  const int64_t* ids = p.ids.defined() ? p.ids.data_ptr<int64_t>() : nullptr;
  int64_t* ids_o = ids ? ids_out.data_ptr<int64_t>() : nullptr;
  int64_t* lab = ids ? labels.data_ptr<int64_t>() : nullptr;
  const int64_t* pos = p.pos.defined() ? p.pos.data_ptr<int64_t>() : nullptr;
  int64_t* pos_o = pos_out.data_ptr<int64_t>();
  const int64_t plane = b * l;
  with_kept(p.mask, p.keep, [&](auto kept) {
    // Rows must agree with cu_seqlens (checked per row before writing, so a wrong
    // cu_seqlens can never write out of bounds).
    std::vector<int32_t> counts(static_cast<size_t>(b));
    at::parallel_for(0, b, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        int32_t c = 0;
        for (int64_t j = 0; j < l; ++j) c += kept(r * l + j) ? 1 : 0;
        counts[size_t(r)] = c;
      }
    });
    TORCH_CHECK_VALUE(cu[0] == 0, "tsparse.", kPackOp, ": `cu_seqlens[0]` must be 0");
    for (int64_t r = 0; r < b; ++r) {
      TORCH_CHECK_VALUE(cu[r + 1] - cu[r] == counts[size_t(r)], "tsparse.", kPackOp,
                        ": `cu_seqlens` does not match the masks at row ", r);
    }
    at::parallel_for(0, b, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        int64_t q = cu[r];
        for (int64_t j = 0; j < l; ++j) {
          const int64_t i = r * l + j;
          if (!kept(i)) {
            inv[i] = -1;
            continue;
          }
          idx[q] = i;
          inv[i] = static_cast<int32_t>(q);
          if (ids) {
            ids_o[q] = ids[i];
            lab[q == 0 ? total - 1 : q - 1] = ids[i];  // torch.roll(ids, -1)
          }
          for (int64_t c = 0; c < p.channels; ++c) pos_o[c * total + q] = pos[c * plane + i];
          ++q;
        }
      }
    });
  });
  return {indices, inverse, ids_out, labels, pos_out};
}

at::Tensor varlen_gather_cpu(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& inverse,
                             bool check_inverse) {
  at::Tensor y = std::get<0>(gather_rows_cpu(x, indices, /*build_inverse=*/false));  // checks indices
  check_varlen_inverse_shape(x, inverse);
  if (check_inverse) check_varlen_inverse(x, indices, inverse);  // a caller's; not varlen_pack's own
  return y;
}

TORCH_LIBRARY_IMPL(tsparse, CPU, m) {
  m.impl("varlen_seqlens", &varlen_seqlens_cpu);
  m.impl("varlen_pack", &varlen_pack_cpu);
  m.impl("varlen_gather", &varlen_gather_cpu);
}

}  // namespace tsparse
