// Row layout of the fused GRPO row kernels: how a row of logits is split into a scalar head,
// 16-byte vectors and a scalar tail, which thread owns which element, and how the single-read
// kernel splits a row over the CTAs of a thread-block cluster. __host__ __device__ and free of
// torch: the CUDA kernels, the host launchers and the CPU test op `_grpo_row_layout` (which the
// emulation tests in python_tests/test_grpo_device_math.py use) all run THIS code.
#pragma once

#include <cstdint>

#if !defined(TSPARSE_HD)
#if defined(__CUDACC__)
#define TSPARSE_HD __host__ __device__ __forceinline__
#else
#define TSPARSE_HD inline
#endif
#endif

namespace tsparse {
namespace grpo {

// A row of `cols` elements of `elem` bytes starting `misalign` bytes past a 16-byte boundary
// (a multiple of elem): [0, head) scalars, nvec 16-byte vectors, [tail0, cols) scalars.
// head < 16 / elem and ntail < 16 / elem, so a row group of >= 8 threads covers each with one
// scalar per thread (lanes [0, head) and [0, ntail)).
struct RowSplit {
  int head;
  int nvec;
  int tail0;
  int ntail;
};

TSPARSE_HD RowSplit split_row(int misalign, int cols, int elem) {
  const int per_vec = 16 / elem;
  int head = misalign == 0 ? 0 : (16 - misalign) / elem;
  if (head > cols) head = cols;
  const int nvec = (cols - head) / per_vec;
  const int tail0 = head + nvec * per_vec;
  return {head, nvec, tail0, cols - tail0};
}

// The vector holding element j (head <= j < tail0).
TSPARSE_HD int vector_of(const RowSplit& s, int j, int elem) { return (j - s.head) / (16 / elem); }

// The lane of a row group of `group` threads that reads and writes element j in the two-pass
// kernels: lane j of the head, lane j - tail0 of the tail, and vector v is handled by lane
// v % group (every loop steps by the group size).
TSPARSE_HD int owner_lane(const RowSplit& s, int j, int elem, int group) {
  if (j < s.head) return j;
  if (j >= s.tail0) return j - s.tail0;
  return vector_of(s, j, elem) % group;
}

// ---------------------------------------------------------------------------------------
// Single-read kernel (csrc/cuda/grpo_fused_kernels.cu): one cluster of `ctas` CTAs per row, each
// CTA keeping a contiguous slice of the row's vectors in shared memory.
constexpr int kClusterMaxCtas = 8;  // the portable cluster size limit
// Shared memory: an H100 SM has 228 KB (233,472 B) of which each resident CTA also takes 1 KB
// (reserved) plus its static shared memory (<= kClusterStaticSmem: the reduction slots). Three
// resident CTAs per SM need slices of at most 233,472 / 3 - 1,024 - 512 = 76,288 B: the
// reference row (V = 152,064 bf16, 4 CTAs: 76,032 B) fits; larger slices leave 2 CTAs per SM.
constexpr int kSmemPerSm = 233472;
constexpr int kSmemReservedPerCta = 1024;
constexpr int kClusterStaticSmem = 512;
constexpr int kClusterSliceTargetBytes = kSmemPerSm / 3 - kSmemReservedPerCta - kClusterStaticSmem;
constexpr int kClusterSliceMaxBytes = 200 * 1024;  // the opt-in limit is 227 KB per CTA
constexpr int kClusterSmallThreads = 128;            // slices of <= kClusterSmallVecs vectors
constexpr int kClusterSmallVecs = 1024;
constexpr int kClusterThreads = 512;

struct ClusterPlan {
  bool ok;         // false: the row does not fit (fp64 logits, or more than 8 x 200 KB): two-pass
  int ctas;        // CTAs per row (1, 2, 4 or 8)
  int threads;     // threads per CTA
  int slice_vecs;  // vectors per CTA (the last CTA may hold fewer)
  int smem_bytes;  // dynamic shared memory per CTA (slice_vecs * 16)
};

// Rows of `cols` elements of `elem` bytes: the smallest power-of-two cluster whose slices fit
// kClusterSliceTargetBytes, else (8 CTAs) up to kClusterSliceMaxBytes; wider rows and fp64 are
// not planned (the caller runs the two-pass path). The row's head / tail scalars live in
// registers, not in the slice, so the plan holds for every misalignment.
TSPARSE_HD ClusterPlan plan_cluster(int64_t cols, int elem) {
  ClusterPlan p{false, 0, 0, 0, 0};
  if (elem != 2 && elem != 4) return p;
  const int64_t nvec = cols * elem / 16;  // an upper bound of every misalignment's nvec
  int ctas = 1;
  while (ctas < kClusterMaxCtas && (nvec + ctas - 1) / ctas * 16 > kClusterSliceTargetBytes) ctas *= 2;
  const int64_t slice = (nvec + ctas - 1) / ctas;
  if (slice * 16 > kClusterSliceMaxBytes) return p;
  p.ok = true;
  p.ctas = ctas;
  p.slice_vecs = static_cast<int>(slice < 1 ? 1 : slice);
  p.threads = p.slice_vecs <= kClusterSmallVecs ? kClusterSmallThreads : kClusterThreads;
  p.smem_bytes = p.slice_vecs * 16;
  return p;
}

// Vectors [begin, end) of the row held by CTA `rank` of the cluster (contiguous slices of
// slice_vecs; the last ones may be short or empty).
struct Slice {
  int begin;
  int end;
};

TSPARSE_HD Slice cluster_slice(int nvec, int slice_vecs, int rank) {
  int b = rank * slice_vecs;
  int e = b + slice_vecs;
  if (b > nvec) b = nvec;
  if (e > nvec) e = nvec;
  return {b, e};
}

// Which CTA rank and thread of the single-read kernel write element j: the head belongs to rank
// 0, the tail to the last rank (thread j - tail0), vector v to the rank whose slice holds it,
// thread (v - begin) % threads.
struct Owner {
  int rank;
  int thread;
};

TSPARSE_HD Owner cluster_owner(const RowSplit& s, const ClusterPlan& p, int j, int elem) {
  if (j < s.head) return {0, j};
  if (j >= s.tail0) return {p.ctas - 1, j - s.tail0};
  const int v = vector_of(s, j, elem);
  const int rank = v / p.slice_vecs;
  return {rank, (v - rank * p.slice_vecs) % p.threads};
}

}  // namespace grpo
}  // namespace tsparse
