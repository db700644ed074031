// Torch glue of the varlen CUDA kernels: checks (shared with the CPU), allocation, launch.
// No op here waits for the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../common/row_ops.h"
#include "cuda_glue.h"
#include "../common/varlen_args.h"
#include "tsparse/varlen.h"

namespace tsparse {

namespace {

cuda::VarlenArgs base_args(const at::Tensor& mask, const at::Tensor& keep) {
  cuda::VarlenArgs a;
  a.mask = mask.data_ptr();
  a.mask_type = mask.scalar_type() == at::kInt    ? cuda::MaskType::kInt32
                : mask.scalar_type() == at::kLong ? cuda::MaskType::kInt64
                                                  : cuda::MaskType::kBool;
  a.keep = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  a.batch = mask.size(0);
  a.seqlen = mask.size(1);
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_seqlens_cuda(const at::Tensor& attention_mask,
                                                       const c10::optional<at::Tensor>& keep_in) {
  check_cuda(attention_mask, kPackOp, "attention_mask");
  c10::cuda::CUDAGuard guard(attention_mask.device());
  const at::Tensor mask = varlen_mask(attention_mask);
  const at::Tensor keep = varlen_keep(keep_in, mask);
  at::Tensor seqlens = at::empty({mask.size(0)}, mask.options().dtype(at::kInt));
  at::Tensor cu = at::empty({mask.size(0) + 1}, mask.options().dtype(at::kInt));
  cuda::VarlenArgs a = base_args(mask, keep);
  a.seqlens = seqlens.data_ptr<int32_t>();
  a.cu_seqlens = cu.data_ptr<int32_t>();
  cuda::varlen_seqlens(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {seqlens, cu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_pack_cuda(
    const at::Tensor& attention_mask, const c10::optional<at::Tensor>& keep,
    const at::Tensor& cu_seqlens, int64_t total, const c10::optional<at::Tensor>& input_ids,
    const c10::optional<at::Tensor>& position_ids) {
  check_cuda(attention_mask, kPackOp, "attention_mask");
  c10::cuda::CUDAGuard guard(attention_mask.device());
  const VarlenPackPrep p = prep_varlen_pack(attention_mask, keep, cu_seqlens, total, input_ids, position_ids);
  const auto lopt = p.mask.options().dtype(at::kLong);
  at::Tensor indices = at::empty({total}, lopt);
  at::Tensor inverse = at::empty({p.batch * p.seqlen}, p.mask.options().dtype(at::kInt));
  at::Tensor ids_out = at::empty({p.ids.defined() ? total : 0}, lopt);
  at::Tensor labels = at::empty({p.ids.defined() ? total : 0}, lopt);
  at::Tensor pos_out = at::empty({p.channels, total}, lopt);
  // Workspace of the (chunks, B) grid: each chunk's kept-token count.
  at::Tensor chunk_counts = at::empty({p.batch * cuda::varlen_pack_chunks(p.seqlen)}, p.mask.options().dtype(at::kInt));
  cuda::VarlenPackArgs a;
  a.base = base_args(p.mask, p.keep);
  a.base.cu_seqlens = p.cu_seqlens.data_ptr<int32_t>();
  a.total = total;
  a.indices = indices.data_ptr<int64_t>();
  a.inverse = inverse.data_ptr<int32_t>();
  a.chunk_counts = chunk_counts.data_ptr<int32_t>();
  if (p.ids.defined()) {
    a.ids = p.ids.data_ptr<int64_t>();
    a.ids_out = ids_out.data_ptr<int64_t>();
    a.labels_out = labels.data_ptr<int64_t>();
  }
  if (p.pos.defined()) {
    a.pos = p.pos.data_ptr<int64_t>();
    a.channels = p.channels;
    a.pos_out = pos_out.data_ptr<int64_t>();
  }
  cuda::varlen_pack(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {indices, inverse, ids_out, labels, pos_out};
}

at::Tensor varlen_gather_cuda(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& inverse,
                              bool check_inverse) {
  check_cuda(x, kPackOp, "x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = std::get<0>(gather_rows_cuda(x, indices, /*build_inverse=*/false));  // checks indices
  check_varlen_inverse_shape(x, inverse);
  if (check_inverse) check_varlen_inverse(x, indices, inverse);  // a caller's; not varlen_pack's own
  return y;
}

TORCH_LIBRARY_IMPL(tsparse, CUDA, m) {
  m.impl("varlen_seqlens", &varlen_seqlens_cuda);
  m.impl("varlen_pack", &varlen_pack_cuda);
  m.impl("varlen_gather", &varlen_gather_cuda);
}

}  // namespace tsparse
