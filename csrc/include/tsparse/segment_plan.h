// How a segment reduction splits long segments, shared by the CPU and CUDA kernels so both
// sum in exactly the same order (and agree bit for bit).
//
// segment_reduce_rows sums, per output row r, the source rows perm[i] for i in
// [offsets[r], offsets[r + 1]) (a "segment" of perm positions). A segment of at most
// kSegmentPiece members is summed directly, in member order. A longer one (a uniform
// background can send hundreds of dropped tokens to one kept token) is cut at the multiples
// of kSegmentPiece in perm positions into pieces; each piece is summed in member order
// starting from zero (fp32, fp64 for fp64 data), and the pieces are added in order:
//   sum = ((0 + piece_0) + piece_1) + ...
// On CUDA the pieces are summed by many CTAs in parallel into a workspace (two slots per
// chunk of kSegmentPiece positions: the piece that continues a segment begun in an earlier
// chunk, and the first piece of a long segment that begins in this chunk), then the row
// kernel adds them in that fixed order: deterministic, and the same order as the CPU's.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TSPARSE_SEG_HD __host__ __device__ __forceinline__
#else
#define TSPARSE_SEG_HD inline
#endif

namespace tsparse {

// Members per piece. Smaller pieces spread a long segment over more CTAs (its tail latency
// ~ members / kSegmentPiece round trips); the CUDA workspace is 2 * ceil(perm_len / P) rows
// of D accumulators (1/8 of a bf16 source's bytes at P = 32), allocated per call.
constexpr int64_t kSegmentPiece = 32;

TSPARSE_SEG_HD bool segment_is_split(int64_t beg, int64_t end) { return end - beg > kSegmentPiece; }

TSPARSE_SEG_HD int64_t segment_chunks(int64_t perm_len) {
  return perm_len > 0 ? (perm_len + kSegmentPiece - 1) / kSegmentPiece : 0;
}

// End of the piece that starts at perm position `pos` of a split segment ending at `end`.
TSPARSE_SEG_HD int64_t segment_piece_end(int64_t pos, int64_t end) {
  const int64_t next = (pos / kSegmentPiece + 1) * kSegmentPiece;
  return next < end ? next : end;
}

// Workspace slot of the piece of a split segment [beg, end) that lies in chunk c:
// 2c + 1 for its first piece (beg is in chunk c), 2c for a later piece.
TSPARSE_SEG_HD int64_t segment_slot(int64_t chunk, bool first) { return 2 * chunk + (first ? 1 : 0); }

// Accumulator rows the CUDA workspace needs (0 when no segment can be split).
TSPARSE_SEG_HD int64_t segment_workspace_rows(int64_t perm_len) {
  return perm_len > kSegmentPiece ? 2 * segment_chunks(perm_len) : 0;
}

}  // namespace tsparse
