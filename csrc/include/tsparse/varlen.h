// Raw-pointer launchers for the variable-length packing kernels (no torch headers).
//
// A padded batch [B, L] with a kept set `mask & keep` (attention mask, optionally minus
// pruned visual tokens) is packed row-major into [total] positions:
//   seqlens[b]      = kept tokens of row b                      (int32 [B])
//   cu_seqlens[b]   = sum of seqlens[0:b]                        (int32 [B + 1])
//   indices[p]      = b * L + l of packed position p             (int64 [total])
//   inverse[b*L+l]  = its packed position, or -1 when not kept   (int32 [B * L])
// and, in the same pass, optional int64 per-token streams:
//   ids_out[p] = ids[b, l];  labels[(p - 1) mod total] = ids[b, l]  (torch.roll(ids, -1))
//   pos_out[c, p] = pos[c, b, l]  for each of C position rows (M-RoPE: 3, verl: 4)
// Every kernel checks that cu_seqlens[B] == total before writing anything (a caller-given
// `total` that does not match the masks aborts the kernel with a device-side error).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tsparse {
namespace cuda {

enum class MaskType : int32_t { kBool = 0, kInt32 = 1, kInt64 = 2 };

struct VarlenArgs {
  const void* mask = nullptr;  // [B, L] contiguous, nonzero = attended
  MaskType mask_type = MaskType::kBool;
  const bool* keep = nullptr;  // [B, L] contiguous, optional
  int64_t batch = 0;
  int64_t seqlen = 0;
  int32_t* seqlens = nullptr;     // [B]
  int32_t* cu_seqlens = nullptr;  // [B + 1]
};

// seqlens and cu_seqlens (two small kernels: per-row counts, then one block scans them).
void varlen_seqlens(const VarlenArgs& a, cudaStream_t stream);

struct VarlenPackArgs {
  VarlenArgs base;                // mask, keep, batch, seqlen, cu_seqlens (input here)
  int64_t total = 0;
  int64_t* indices = nullptr;     // [total]
  int32_t* inverse = nullptr;     // [B * L]
  const int64_t* ids = nullptr;   // [B, L], optional
  int64_t* ids_out = nullptr;     // [total]
  int64_t* labels_out = nullptr;  // [total]
  const int64_t* pos = nullptr;   // [C, B, L], optional
  int64_t channels = 0;
  int64_t* pos_out = nullptr;     // [C, total]
  int32_t* chunk_counts = nullptr;  // workspace: int32 [B * varlen_pack_chunks(L)]
  int64_t chunks = 0;             // set by varlen_pack
};

// Chunks of kRowThreads (512) tokens per row the pack grid uses (at least 1).
int64_t varlen_pack_chunks(int64_t seqlen);

// A (chunks, B) grid: one kernel counts each chunk's kept tokens into `chunk_counts`, then
// one block per chunk ranks its kept tokens (the row's earlier chunks + block-wide prefix
// sums) and writes every output stream; no block waits for another.
void varlen_pack(const VarlenPackArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace tsparse
