"""A CPU emulation of the fused GRPO row kernels' arithmetic (csrc/cuda/grpo_kernels.cu, the
two-pass forward; csrc/cuda/grpo_fused_kernels.cu, the single-read cluster kernel), used by
test_grpo_device_math.py to check the accuracy bound of profiling/NOTES.md ("Accuracy of the row
kernels") without a GPU.

What is emulated, operation by operation in float32 (numpy, every result rounded to fp32):
  * the row layout: tsparse._C.grpo_row_layout, i.e. grpo_layout.h, the code the kernels run
    (scalar head / 16-byte vectors / scalar tail, the cluster's slices);
  * each thread's loop (grpo_device.cuh stream_vectors): full trips of kUnroll vectors, then
    single vectors; per batch the raw maximum (bf16x2 max = NaN-ignoring), lse_raise_max, the
    per-element FFMA x * c - base (one rounding: the product is exact in float64), exp2 through
    a model of MUFU.EX2 (ex2.approx.ftz: <= 2 ulp, flushed to 0 below 2^-126), per-vector partial
    sums, then pairwise, then into the state;
  * the reductions: warp butterflies (xor 16 .. 1), the CTA's warp-0 merge of the warps' states,
    the cluster's rank-order merge (single read), each with grpo_math.h lse_merge;
  * the finish: log2 through a model of log2f (<= 1 ulp), entropy and the target's log-prob.
The ex2 / log2 error models take a mode: "up" / "down" (every result off by the documented
maximum, the same sign: the worst case for the sums) or "rand" (uniform within it).
Where nvcc may contract a multiply and an add into one FFMA, the emulation rounds twice (the
larger error): the bound it checks covers both.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from tsparse import _C

F32 = np.float32
F64 = np.float64
LOG2E = 1.44269504088896340736
LN2 = 0.693147180559945309417
U = 2.0**-24  # fp32 unit roundoff
EX2_REL = 2.0**-22  # MUFU.EX2: 2 ulp (CUDA Programming Guide, exp2f / ex2.approx: 2 ulp)
MIN_LOG2 = F32(-256.0)


def _source_constants() -> dict:
    """The kernels' launch constants, read from the CUDA sources (so the emulation follows them)."""
    root = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
    out = {}
    for fname, names in (("grpo_kernels.cu", ("kUnroll", "kWarpRowMaxCols", "kMidThreads", "kMidRowMaxCols",
                                              "kWideThreads")),
                         ("grpo_fused_kernels.cu", ("kUnroll",))):
        text = open(os.path.join(root, fname)).read()
        for n in names:
            m = re.search(r"constexpr int " + n + r" = (\d+);", text)
            assert m, f"{n} not found in {fname}"
            out[(fname, n)] = int(m.group(1))
    return out


CONST = _source_constants()


@dataclass
class Model:
    mode: str = "rand"  # "up", "down", "rand", "exact"
    seed: int = 0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def _factor(self, shape, rel):
        if self.mode == "up":
            return 1.0 + rel
        if self.mode == "down":
            return 1.0 - rel
        if self.mode == "exact":
            return 1.0
        return 1.0 + rel * self.rng.uniform(-1.0, 1.0, size=shape)

    def ex2(self, t):
        t = np.asarray(t, dtype=F32)
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.exp2(t.astype(F64)) * self._factor(t.shape, EX2_REL)
        v = np.where(v < 2.0**-126, 0.0, v)  # .ftz: denormal results flush to 0
        return v.astype(F32)

    def log2(self, a):
        a = np.asarray(a, dtype=F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            exact = np.log2(a.astype(F64))
        r = exact.astype(F32)
        if self.mode == "exact":
            return r
        up = np.nextafter(r, F32(np.inf))
        down = np.nextafter(r, F32(-np.inf))
        if self.mode == "up":
            return np.where(np.isfinite(r), up, r)
        if self.mode == "down":
            return np.where(np.isfinite(r), down, r)
        pick = self.rng.integers(0, 3, size=r.shape)
        return np.where(np.isfinite(r), np.choose(pick, [down, r, up]), r)


def r32(x):
    return np.asarray(x, dtype=F64).astype(F32)


def fma32(a, b, c):
    """fma(a, b, c) rounded once to fp32 (a * b is exact in float64)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return (np.asarray(a, F32).astype(F64) * np.asarray(b, F32).astype(F64) + np.asarray(c, F32).astype(F64)).astype(F32)


def mul32(a, b):
    with np.errstate(invalid="ignore", over="ignore"):
        return r32(np.asarray(a, F32).astype(F64) * np.asarray(b, F32).astype(F64))


def add32(a, b):
    with np.errstate(invalid="ignore", over="ignore"):
        return r32(np.asarray(a, F32).astype(F64) + np.asarray(b, F32).astype(F64))


class State:
    def __init__(self, n):
        self.m = np.full(n, -np.inf, F32)
        self.a = np.zeros(n, F32)
        self.b = np.zeros(n, F32)

    def take(self, idx):
        s = State(0)
        s.m, s.a, s.b = self.m[idx], self.a[idx], self.b[idx]
        return s


def offset_base(m):
    return np.where(m == -np.inf, F32(0), m).astype(F32)


def raise_max(st: State, m_new, mdl: Model, active):
    m = np.fmax(st.m, m_new).astype(F32)
    with np.errstate(invalid="ignore"):
        d = add32(st.m, -offset_base(m))
    f = mdl.ex2(d)
    b = mul32(add32(st.b, mul32(st.a, np.fmax(d, MIN_LOG2))), f)
    a = mul32(st.a, f)
    st.m = np.where(active, m, st.m).astype(F32)
    st.a = np.where(active, a, st.a).astype(F32)
    st.b = np.where(active, b, st.b).astype(F32)


def add_scalars(st: State, x0, x1, c, mdl: Model):
    raise_max(st, mul32(np.fmax(x0, x1), c), mdl, np.ones(st.m.shape, bool))
    base = offset_base(st.m)
    for x in (x0, x1):
        t = fma32(x, c, -base)
        e = mdl.ex2(t)
        st.a = add32(st.a, e)
        st.b = add32(st.b, mul32(e, np.fmax(t, MIN_LOG2)))


def add_batch(st: State, xs, c, mdl: Model, active, with_ent=True):
    """xs: [lanes, N, kElems] raw logits (fp32 values) of the lanes' N vectors."""
    lanes, n, _ = xs.shape
    with np.errstate(invalid="ignore"):
        bm = np.fmax.reduce(xs.reshape(lanes, -1), axis=1).astype(F32)
    raise_max(st, mul32(bm, c), mdl, active)
    base = offset_base(st.m)[:, None, None]
    t = fma32(xs, c, -base)
    e = mdl.ex2(t)
    tb = np.fmax(t, MIN_LOG2)
    a_k = e[:, :, 0]
    b_k = mul32(e[:, :, 0], tb[:, :, 0])
    for i in range(1, xs.shape[2]):
        a_k = add32(a_k, e[:, :, i])
        b_k = fma32(e[:, :, i], tb[:, :, i], b_k)
    s = 1
    a_k, b_k = list(a_k.T), list(b_k.T)
    while s < n:
        for k in range(0, n - s, 2 * s):
            a_k[k] = add32(a_k[k], a_k[k + s])
            b_k[k] = add32(b_k[k], b_k[k + s])
        s *= 2
    st.a = np.where(active, add32(st.a, a_k[0]), st.a).astype(F32)
    if with_ent:
        st.b = np.where(active, add32(st.b, b_k[0]), st.b).astype(F32)


def stream_vectors(st: State, vecs, nvec, group, unroll, c, mdl: Model, with_ent=True):
    """vecs: [nvec, kElems]; lane l handles vectors l, l + group, ... as stream_vectors does."""
    lanes = np.arange(group)
    full = np.maximum(0, (nvec - (unroll - 1) * group - lanes + unroll * group - 1) // (unroll * group))
    full = np.where(lanes + (unroll - 1) * group < nvec, full, 0)
    for k in range(int(full.max()) if group else 0):
        active = k < full
        v0 = lanes + k * unroll * group
        idx = np.stack([v0 + j * group for j in range(unroll)], axis=1)
        idx = np.where(active[:, None], idx, 0)
        add_batch(st, vecs[idx] if nvec else np.zeros((group, unroll, 8), F32), c, mdl, active, with_ent)
    v = lanes + full * unroll * group
    while True:
        active = v < nvec
        if not active.any():
            break
        idx = np.where(active, v, 0)
        add_batch(st, vecs[idx][:, None, :], c, mdl, active, with_ent)
        v = v + group


def merge(x: State, y: State, mdl: Model) -> State:
    m = np.fmax(x.m, y.m).astype(F32)
    r = State(m.shape[0])
    r.m = m.copy()
    for s in (x, y):
        present = s.m != -np.inf
        with np.errstate(invalid="ignore"):
            d = add32(s.m, -m)
        f = mdl.ex2(np.where(present, d, F32(0)))
        ra = add32(r.a, mul32(s.a, f))
        rb = add32(r.b, mul32(add32(s.b, mul32(s.a, np.fmax(d, MIN_LOG2))), f))
        r.a = np.where(present, ra, r.a).astype(F32)
        r.b = np.where(present, rb, r.b).astype(F32)
    nan = np.isnan(x.a) | np.isnan(y.a)
    r.a = np.where(nan, add32(x.a, y.a), r.a).astype(F32)
    r.b = np.where(nan, add32(x.a, y.a), r.b).astype(F32)
    empty = (m == -np.inf) & ~nan
    r.m = np.where(empty, F32(-np.inf), r.m).astype(F32)
    r.a = np.where(empty, F32(0), r.a).astype(F32)
    r.b = np.where(empty, F32(0), r.b).astype(F32)
    return r


def warp_merge(st: State, mdl: Model) -> State:
    """Butterfly over each group of 32 consecutive lanes (every lane ends with the warp's sum)."""
    n = st.m.shape[0]
    lane = np.arange(n)
    for o in (16, 8, 4, 2, 1):
        st = merge(st, st.take(lane ^ o), mdl)
    return st


def cta_merge(st: State, threads: int, mdl: Model) -> State:
    st = warp_merge(st, mdl)
    warps = threads // 32
    red = st.take(np.arange(warps) * 32)
    w0 = State(32)
    w0.m[:warps], w0.a[:warps], w0.b[:warps] = red.m, red.a, red.b
    return warp_merge(w0, mdl).take(np.array([0]))


def finish(st: State, x_t, c, mdl: Model):
    L = mdl.log2(st.a)
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = mul32(F32(LN2), add32(L, -r32(st.b.astype(F64) / st.a.astype(F64))))
        logp = mul32(F32(LN2), add32(fma32(x_t, c, -st.m), -L))
    return float(logp[0]), float(ent[0]), float(st.m[0]), float(L[0])


def _row_parts(x, misalign_bytes, elem, group, target):
    lay = _C.grpo_row_layout(len(x), elem, misalign_bytes, group, target)
    per = 16 // elem
    h, nvec, t0 = lay["head"], lay["nvec"], lay["tail0"]
    vecs = x[h:t0].reshape(nvec, per) if nvec else np.zeros((0, per), F32)
    return lay, vecs


def two_pass_forward(x, target, temperature, misalign_bytes=0, elem=2, mdl: Model = None):
    """The two-pass forward kernel's (logp, entropy, row_max, log_norm) for one row x (fp32 values)."""
    mdl = mdl or Model()
    x = np.asarray(x, F32)
    cols = len(x)
    unroll = CONST[("grpo_kernels.cu", "kUnroll")]
    if cols <= CONST[("grpo_kernels.cu", "kWarpRowMaxCols")]:
        group, threads = 32, 32
    elif cols <= CONST[("grpo_kernels.cu", "kMidRowMaxCols")]:
        group = threads = CONST[("grpo_kernels.cu", "kMidThreads")]
    else:
        group = threads = CONST[("grpo_kernels.cu", "kWideThreads")]
    c = r32(LOG2E / temperature)
    lay, vecs = _row_parts(x, misalign_bytes, elem, group, target)
    st = State(group)
    lanes = np.arange(group)
    x0 = np.where(lanes < lay["head"], x[np.minimum(lanes, cols - 1)], -np.inf).astype(F32)
    x1 = np.where(lanes < lay["ntail"], x[np.minimum(lay["tail0"] + lanes, cols - 1)], -np.inf).astype(F32)
    add_scalars(st, x0, x1, c, mdl)
    stream_vectors(st, vecs, lay["nvec"], group, unroll, c, mdl)
    st = warp_merge(st, mdl).take(np.array([0])) if threads == 32 else cta_merge(st, threads, mdl)
    return finish(st, x[target], c, mdl)


def cluster_forward(x, target, temperature, misalign_bytes=0, elem=2, mdl: Model = None):
    """The single-read cluster kernel's (logp, entropy, row_max, log_norm) for one row."""
    mdl = mdl or Model()
    x = np.asarray(x, F32)
    cols = len(x)
    unroll = CONST[("grpo_fused_kernels.cu", "kUnroll")]
    lay0 = _C.grpo_row_layout(cols, elem, misalign_bytes, 512, target)
    assert lay0["cluster_ok"]
    threads, ctas = lay0["threads"], lay0["ctas"]
    c = r32(LOG2E / temperature)
    lay, vecs = _row_parts(x, misalign_bytes, elem, threads, target)
    lanes = np.arange(threads)
    states = []
    for rank, (b, e) in enumerate(lay["slices"]):
        st = State(threads)
        head = lay["head"] if rank == 0 else 0
        ntail = lay["ntail"] if rank == ctas - 1 else 0
        x0 = np.where(lanes < head, x[np.minimum(lanes, cols - 1)], -np.inf).astype(F32)
        x1 = np.where(lanes < ntail, x[np.minimum(lay["tail0"] + lanes, cols - 1)], -np.inf).astype(F32)
        add_scalars(st, x0, x1, c, mdl)
        stream_vectors(st, vecs[b:e], e - b, threads, unroll, c, mdl)
        states.append(cta_merge(st, threads, mdl))
    row = State(1)
    for s in states:
        row = merge(row, s, mdl)
    return finish(row, x[target], c, mdl)


def reduction_depth(cols, elem, kernel: str) -> tuple[int, int]:
    """(R, levels): the most batches one thread folds in (its trips, single vectors and the
    scalar step) and the merge levels above it, for the bound of profiling/NOTES.md."""
    unroll = CONST[("grpo_kernels.cu", "kUnroll")]
    if kernel == "cluster":
        lay = _C.grpo_row_layout(cols, elem, 0, 512, 0)
        threads, nvec = lay["threads"], lay["slice_vecs"]
        levels = int(math.log2(threads)) + lay["ctas"]
    else:
        threads = 32 if cols <= 4096 else (128 if cols <= 32768 else 512)
        nvec = cols * elem // 16
        levels = int(math.log2(threads))
    per_thread = -(-nvec // threads)
    r = per_thread // unroll + per_thread % unroll + 1
    return r, levels


def logp_entropy_bound(x, target, temperature, cols, elem, kernel: str):
    """The accuracy bound of profiling/NOTES.md for one row, from the exact (fp64) row."""
    x64 = np.asarray(x, F64)
    finite = np.isfinite(x64)
    xmax = x64[finite].max()
    tau = np.where(finite, (x64 - xmax) * LOG2E / temperature, -np.inf)  # exact base-2 offsets
    p = np.exp2(tau - np.log2(np.exp2(tau).sum()))
    ep_tau = float(np.sum(np.where(p > 0, p * np.abs(np.where(finite, tau, 0)), 0)))
    tau_t = abs(float(tau[target])) if np.isfinite(tau[target]) else math.inf
    L = abs(float(np.log2(np.exp2(tau).sum())))
    r, levels = reduction_depth(cols, elem, kernel)
    eps_a = EX2_REL + (7 + 2 + r) * U + r * (EX2_REL + U) + levels * (EX2_REL + 3 * U)
    logp = LN2 * (tau[target] - np.log2(np.exp2(tau).sum()))
    scale = LN2 * 2 * U * (tau_t + ep_tau) * 1.01
    b_logp = scale + 1.01 * eps_a + LN2 * 2 * U * L + 2 * U * abs(logp) + 1e-12
    ent = float(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)))
    b_ent = LN2 * (eps_a / LN2 + 2 * U * L + 2 * U * ep_tau + ep_tau * (2 * eps_a + 4 * U)) + 2 * U * ent + 1e-12
    return b_logp, b_ent
