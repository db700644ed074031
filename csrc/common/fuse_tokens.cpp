// Token fusion (the paper's "token fusion" step), backend-neutral: ATen ops for the
// batched similarity matmul and the bookkeeping, the backend's own row kernels for
// moving rows (padded gathers, deterministic segment means).
//
// Per image, every dropped token is merged into the kept token of the same image with
// the highest cosine similarity (ties: the lowest index); each output row is the mean of
// a kept token and the tokens merged into it.
//
// fuse_tokens_nearest is the same composite with another winner: the kept token NEAREST in
// given float64 coordinates (squared Euclidean distance; ties: the lowest index). Its scores
// are 2 <c_d, c_k> - ||c_k||^2 (the dropped row's own ||c_d||^2 is a per-row constant), exact
// for integer coordinates below 2^25, so ties are exact too.
//
// Data flow (D = hidden size, images processed in chunks bounded by kChunkBytes):
//   Xk [B, maxK, D]  kept rows of each image, zero-padded      (compose_rows)
//   Xd [B, maxD, D]  dropped rows of each image, zero-padded   (compose_rows)
//   S = Xd @ Xk^T    fp32 scores (fp64 for fp64 inputs)        (bmm, fp32 out)
//   j = argmax_k S[., k] / ||Xk[k]||  (padding masked)         -> assign
//   y[k] = mean of rows with assign == k, in row order          (segment_reduce_rows)
// The dropped row's own norm is a positive per-row constant, so it does not change the
// argmax and is not computed.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/nonzero_static.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#include "checks.h"
#include "row_ops.h"

namespace tsparse {

namespace {

constexpr const char* kOp = "fuse_tokens";
constexpr const char* kOpNearest = "fuse_tokens_nearest";
// Upper bound on the padded buffers and scores of one chunk of images, so the temporary
// memory stays bounded at realistic shapes. TSPARSE_FUSE_CHUNK_BYTES overrides it (tests
// use a tiny budget to exercise the chunked path).
constexpr int64_t kDefaultChunkBytes = int64_t(256) << 20;

int64_t chunk_bytes() {
  const char* env = std::getenv("TSPARSE_FUSE_CHUNK_BYTES");
  if (env == nullptr || *env == '\0') return kDefaultChunkBytes;
  const long long v = std::atoll(env);
  return v > 0 ? int64_t(v) : kDefaultChunkBytes;
}
constexpr double kNormEps = 1e-8;  // cosine similarity eps, as torch.nn.functional.cosine_similarity

// Small per-chunk tables go to the device in one copy. non_blocking: a pageable
// host->device copy is staged immediately and does not wait for the device.
at::Tensor to_device_longs(const std::vector<int64_t>& v, int64_t rows, const at::Device& device) {
  at::Tensor t = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  t = t.reshape({rows, -1});
  return device.is_cpu() ? t : t.to(device, /*non_blocking=*/true);
}

// [B, width] global row ids: rows[base[b] + j] for j < count[b], else -1.
at::Tensor padded_row_map(const at::Tensor& rows, const at::Tensor& base, const at::Tensor& count,
                          int64_t width) {
  const at::Tensor j =
      at::arange(width, at::TensorOptions().dtype(at::kLong).device(rows.device())).unsqueeze(0);
  const at::Tensor valid = j < count.unsqueeze(1);
  const at::Tensor pos = base.unsqueeze(1) + j;
  const at::Tensor safe = at::where(valid, pos, at::zeros_like(pos));
  return at::where(valid, rows.index_select(0, safe.reshape({-1})).reshape(pos.sizes()),
                   at::full_like(pos, -1));
}

// The caller's per-image kept counts size every buffer below, so they must be the mask's own:
// otherwise a dropped token could be merged across images or a kept one lost. Checked on the
// device with no host sync (an asynchronous device assert on CUDA, an eager check on CPU).
void check_counts_match(const at::Tensor& keep, at::IntArrayRef token_offsets,
                        at::IntArrayRef kept_counts, const char* op) {
  const int64_t num_images = int64_t(kept_counts.size());
  if (num_images == 0) return;
  const auto lopt = at::TensorOptions().dtype(at::kLong).device(keep.device());
  const at::Tensor csum = at::cat({at::zeros({1}, lopt), at::cumsum(keep, 0, at::kLong)});
  const at::Tensor offs = to_device_longs(token_offsets.vec(), 1, keep.device()).reshape({-1});
  const at::Tensor actual = csum.index_select(0, offs.slice(0, 1)) -
                            csum.index_select(0, offs.slice(0, 0, num_images));
  const at::Tensor given = to_device_longs(kept_counts.vec(), 1, keep.device()).reshape({-1});
  check_on_device(actual.eq(given).all(), op,
                  "`kept_counts` does not match the number of kept tokens of `keep` in each image");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_tokens_impl(
    const at::Tensor& x_in, const at::Tensor& keep, const c10::optional<at::Tensor>& coords_in,
    at::IntArrayRef token_offsets, at::IntArrayRef kept_counts, const RowKernels& k) {
  // The similarity matmul runs in the dtype this op documents (fp32 scores from bf16/fp16/
  // fp32 rows, fp64 for fp64), whatever autocast region the caller is in: an autocast-cast
  // bf16 bmm of fp32 rows changed assignments.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const char* op = coords_in.has_value() ? kOpNearest : kOp;
  check_rows(x_in, op, "x");
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, "tsparse.", op,
                   ": `keep` must be bool, got ", keep.scalar_type());
  TORCH_CHECK_VALUE(keep.dim() == 1 && keep.size(0) == x_in.size(0), "tsparse.", op,
                    ": `keep` must have shape [N] = [", x_in.size(0), "], got ", keep.sizes());
  check_same_device(keep, x_in, op, "keep", "x");
  const int64_t n = x_in.size(0);
  const int64_t d = x_in.size(1);
  const bool spatial = coords_in.has_value();
  if (spatial) {
    const at::Tensor& c = *coords_in;
    TORCH_CHECK_TYPE(c.scalar_type() == at::kDouble, "tsparse.", op,
                     ": `coords` must be float64, got ", c.scalar_type());
    TORCH_CHECK_VALUE(c.dim() == 2 && c.size(0) == n && c.size(1) >= 1, "tsparse.", op,
                      ": `coords` must have shape [N, C] with N = ", n, " and C >= 1, got ",
                      c.sizes());
    check_same_device(c, x_in, op, "coords", "x");
  }
  TORCH_CHECK_VALUE(token_offsets.size() >= 1, "tsparse.", op,
                    ": `token_offsets` must have num_images + 1 entries");
  const int64_t num_images = int64_t(token_offsets.size()) - 1;
  TORCH_CHECK_VALUE(token_offsets[0] == 0 && token_offsets[num_images] == n, "tsparse.", op,
                    ": `token_offsets` must start at 0 and end at N = ", n, ", got [",
                    token_offsets[0], ", ..., ", token_offsets[num_images], "]");
  TORCH_CHECK_VALUE(int64_t(kept_counts.size()) == num_images, "tsparse.", op,
                    ": `kept_counts` must have one entry per image (", num_images, "), got ",
                    kept_counts.size());
  std::vector<int64_t> kofs(size_t(num_images) + 1, 0), dofs(size_t(num_images) + 1, 0);
  for (int64_t i = 0; i < num_images; ++i) {
    const int64_t ni = token_offsets[i + 1] - token_offsets[i];
    TORCH_CHECK_VALUE(ni >= 0, "tsparse.", op, ": `token_offsets` must be non-decreasing");
    TORCH_CHECK_VALUE(kept_counts[i] >= 0 && kept_counts[i] <= ni, "tsparse.", op,
                      ": `kept_counts[", i, "]` = ", kept_counts[i], " is not in [0, ", ni, "]");
    kofs[size_t(i) + 1] = kofs[size_t(i)] + kept_counts[i];
    dofs[size_t(i) + 1] = dofs[size_t(i)] + (ni - kept_counts[i]);
  }
  const int64_t num_kept = kofs.back();
  const int64_t num_dropped = n - num_kept;
  check_counts_match(keep, token_offsets, kept_counts, op);

  const at::Tensor x = rows_view(x_in);
  const auto lopt = at::TensorOptions().dtype(at::kLong).device(x.device());
  // Rows of every kept / dropped token, ascending (so image by image).
  const at::Tensor kept_rows = at::nonzero_static(keep, num_kept, -1).reshape({-1});
  const at::Tensor dropped_rows = at::nonzero_static(keep.logical_not(), num_dropped, -1).reshape({-1});

  // assign (with one spare slot at index n that absorbs padding writes).
  at::Tensor assign_ext = at::full({n + 1}, -1, lopt);
  assign_ext.scatter_(0, kept_rows, at::arange(num_kept, lopt));

  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  // The rows the winner is chosen on: the tokens themselves (cosine) or their coordinates.
  const at::Tensor score_rows = spatial ? rows_view(*coords_in) : x;
  const int64_t width = score_rows.size(1);
  const int64_t esize = score_rows.element_size();
  const int64_t score_esize = score_rows.scalar_type() == at::kDouble ? 8 : 4;

  // Chunks of images that have both kept and dropped tokens.
  const int64_t budget = chunk_bytes();
  std::vector<int64_t> chunk;
  int64_t max_k = 0, max_d = 0;
  auto flush = [&]() {
    if (chunk.empty()) return;
    const int64_t b = int64_t(chunk.size());
    // Rows: kept base, kept count, dropped base, dropped count (one entry per image).
    std::vector<int64_t> table(size_t(4 * b));
    for (int64_t c = 0; c < b; ++c) {
      const size_t i = size_t(chunk[size_t(c)]);
      table[size_t(c)] = kofs[i];
      table[size_t(b + c)] = kofs[i + 1] - kofs[i];
      table[size_t(2 * b + c)] = dofs[i];
      table[size_t(3 * b + c)] = dofs[i + 1] - dofs[i];
    }
    const at::Tensor tab = to_device_longs(table, 4, x.device());
    const at::Tensor kbase = tab[0], kcnt = tab[1];
    const at::Tensor kmap = padded_row_map(kept_rows, kbase, kcnt, max_k);     // [B, maxK]
    const at::Tensor dmap = padded_row_map(dropped_rows, tab[2], tab[3], max_d);  // [B, maxD]
    at::Tensor scores;
    if (spatial) {
      // Nearest in coordinates: maximize 2 <c_d, c_k> - ||c_k||^2 (fp64; padding rows are zeros
      // and masked below).
      const at::Tensor ck = k.compose_rows(score_rows, kmap.reshape({-1}), c10::nullopt, c10::nullopt);
      const at::Tensor cd = k.compose_rows(score_rows, dmap.reshape({-1}), c10::nullopt, c10::nullopt);
      const at::Tensor sq = ck.mul(ck).sum(-1).reshape({b, 1, max_k});
      scores = at::bmm(cd.reshape({b, max_d, width}), ck.reshape({b, max_k, width}).transpose(1, 2));
      scores.mul_(2.0).sub_(sq);
    } else {
      const at::Tensor xk = k.compose_rows(x, kmap.reshape({-1}), c10::nullopt, c10::nullopt);
      const at::Tensor xd = k.compose_rows(x, dmap.reshape({-1}), c10::nullopt, c10::nullopt);
      const at::Tensor inv_norm = k.row_inv_norms(xk, kNormEps).reshape({b, 1, max_k});
      at::Tensor xk3 = xk.reshape({b, max_k, d});
      at::Tensor xd3 = xd.reshape({b, max_d, d});
      if (half && x.is_cuda()) {
        scores = at::bmm(xd3, xk3.transpose(1, 2), at::kFloat);
      } else if (half) {
        scores = at::bmm(xd3.to(at::kFloat), xk3.to(at::kFloat).transpose(1, 2));
      } else {
        scores = at::bmm(xd3, xk3.transpose(1, 2));
      }
      scores.mul_(inv_norm.to(scores.scalar_type()));
    }
    const at::Tensor kcount = kcnt.reshape({b, 1, 1});
    const at::Tensor col = at::arange(max_k, lopt).reshape({1, 1, max_k});
    scores.masked_fill_(col >= kcount, -std::numeric_limits<double>::infinity());
    // Local winner; clamped so even NaN/inf rows can only pick a real kept token.
    at::Tensor j = at::minimum(scores.argmax(-1), kcount.reshape({b, 1}) - 1);  // [B, maxD]
    const at::Tensor out_row = kbase.reshape({b, 1}) + j;
    const at::Tensor target = at::where(dmap >= 0, dmap, at::full_like(dmap, n));
    assign_ext.scatter_(0, target.reshape({-1}), out_row.reshape({-1}));
    chunk.clear();
    max_k = max_d = 0;
  };
  for (int64_t i = 0; i < num_images; ++i) {
    const int64_t ki = kofs[size_t(i) + 1] - kofs[size_t(i)];
    const int64_t di = dofs[size_t(i) + 1] - dofs[size_t(i)];
    if (ki == 0 || di == 0) continue;
    const int64_t nk = std::max(max_k, ki), nd = std::max(max_d, di);
    const int64_t b = int64_t(chunk.size()) + 1;
    const int64_t bytes = b * ((nk + nd) * width * esize + nk * nd * score_esize);
    if (!chunk.empty() && bytes > budget) flush();
    chunk.push_back(i);
    max_k = std::max(max_k, ki);
    max_d = std::max(max_d, di);
  }
  flush();

  const at::Tensor assign = assign_ext.narrow(0, 0, n);
  // Members of output row r, in row order: a stable sort by assign (-1s first).
  auto sorted = at::sort(assign, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& keys = std::get<0>(sorted);
  const at::Tensor& perm = std::get<1>(sorted);
  const at::Tensor offsets = at::searchsorted(keys, at::arange(num_kept + 1, lopt));
  const at::Tensor y = k.segment_reduce_rows(x, perm, offsets, /*mean=*/true);
  const at::Tensor counts = offsets.narrow(0, 1, num_kept) - offsets.narrow(0, 0, num_kept);
  const at::Tensor inv_count = at::reciprocal(counts.to(at::kFloat));
  return {y, assign.clone(), inv_count};
}

}  // namespace tsparse
