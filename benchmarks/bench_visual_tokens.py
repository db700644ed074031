"""Benchmarks of the visual-token ops against their PyTorch baselines.

Realistic size ("full", the default on a GPU): Qwen2.5-VL-7B hidden 3584, 64 images of a
1008 x 1008 picture (grid 1 x 72 x 72 -> 1296 merged tokens each), one evidence box of
0.877 x 0.877 of the image per image (77% of its area; 81% of the tokens are kept, since every
partly covered cell is), bf16. The box mask is also
timed for 256 images. "cpu" (the default on the CPU) uses 8 images so a run takes seconds.

Byte models (what a perfect kernel must move; GB/s and %copy are computed from these, by the
functions in BYTE_MODELS below, which python_tests/test_bench_models.py checks against the bytes of
real inputs and outputs):
  gather fwd      read M*D*e + write M*D*e
  gather bwd      read M*D*e (grad) + write N*D*e (dense grad, every row written once)
  scatter fwd     read M*D*e (src) + read (N-M)*D*e (fill) + write N*D*e
  scatter zeros   read M*D*e (src) + write N*D*e
  fuse fwd        read N*D*e + write K*D*e  (the similarity matmul is extra compute)
  fuse bwd        read K*D*e + write N*D*e
  select fuse=False  the gather: read M*D*e + write M*D*e (the mask is ~N bytes)
  select fuse=True   the fusion: read N*D*e + write K*D*e (K = M: one output row per kept token)
At the "full" size (N = 82,944 tokens, M = 67,501 kept: 81%, as any partly covered cell is kept)
one gather moves 0.97 GB, not the 117 MB of the anchors' 8,192-row example: compare rates (GB/s,
% of copy), not times.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from tsparse import reference as ref
from tsparse.ops import (
    FUSION_METHODS,
    box_to_patch_mask,
    fuse_tokens,
    gather_tokens,
    scatter_tokens,
    select_visual_tokens,
)

from .common import Row, Timer, compiled

SIZES = {
    # images, grid side (patches), hidden, images for the mask benchmark
    "full": dict(images=64, side=72, hidden=3584, mask_images=256),
    "cpu": dict(images=8, side=72, hidden=3584, mask_images=64),
    "tiny": dict(images=2, side=16, hidden=64, mask_images=8),
}
KEEP_SIDE = math.sqrt(0.77)  # one box of this side (fraction of the image) keeps ~77% of tokens

# Bytes each op must move (N source rows, M gathered / kept rows, K fused rows, D columns, e bytes).
BYTE_MODELS: dict[str, Callable[..., int]] = {
    "gather fwd": lambda n, m, k, d, e: 2 * m * d * e,
    "gather bwd": lambda n, m, k, d, e: m * d * e + n * d * e,
    "scatter fwd": lambda n, m, k, d, e: m * d * e + (n - m) * d * e + n * d * e,
    "scatter zeros": lambda n, m, k, d, e: m * d * e + n * d * e,
    "fuse fwd": lambda n, m, k, d, e: n * d * e + k * d * e,
    "fuse bwd": lambda n, m, k, d, e: k * d * e + n * d * e,
    "select fuse=False": lambda n, m, k, d, e: 2 * m * d * e,
    "select fuse=True": lambda n, m, k, d, e: n * d * e + m * d * e,
}


def gbytes(op: str, n: int, m: int, k: int, d: int, e: int) -> float:
    return BYTE_MODELS[op](n, m, k, d, e) / 1e9


def make_inputs(device, images: int, side: int, hidden: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, side, side]] * images, dtype=torch.int64)
    xy = torch.rand(images, 2, generator=g) * (1 - KEEP_SIDE)
    boxes = torch.cat([xy, xy + KEEP_SIDE], dim=1).to(device)
    box_offsets = torch.arange(images + 1, dtype=torch.int64)
    n = images * (side // 2) ** 2
    x = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
    return grid, boxes, box_offsets, x


def _mask_boxes(device, images: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (images,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    nb = int(offsets[-1])
    lo = torch.rand(nb, 2, generator=g) * 0.7
    boxes = torch.cat([lo, lo + 0.05 + torch.rand(nb, 2, generator=g) * 0.25], dim=1).to(device)
    return boxes, offsets


def run(device: torch.device, size: str, timer: Timer, log: Callable[[str], None] = print,
        rows_out: Optional[list] = None) -> list[Row]:
    """The family's rows; appended to ``rows_out`` as they are measured when it is given, so a
    run interrupted mid-family (a phase deadline of profiling/device_check.sh) keeps them."""
    cfg = SIZES[size]
    device = torch.device(device)
    rows: list[Row] = rows_out if rows_out is not None else []
    images, side, hidden = cfg["images"], cfg["side"], cfg["hidden"]
    grid, boxes, box_offsets, x = make_inputs(device, images, side, hidden)
    n, d = x.shape
    e = x.element_size()
    dt = str(x.dtype).replace("torch.", "")

    # ---- box_to_patch_mask: one launch for the whole batch --------------------------
    mi = cfg["mask_images"]
    mgrid = torch.tensor([[1, side, side]] * mi, dtype=torch.int64)
    mboxes, moffs = _mask_boxes(device, mi)
    t_ours = timer(lambda: box_to_patch_mask(mboxes, moffs, mgrid))
    t_ref = Timer(device, warmup=1, iters=3)(lambda: ref.box_to_patch_mask_ref(mboxes, moffs, mgrid))
    rows.append(Row("box_to_patch_mask", f"{mi} imgs x {(side // 2) ** 2} tok", "bool", t_ours["median_ms"],
                    "reference (py loop)", t_ref["median_ms"], note=f"{t_ours['median_ms'] * 1e3:.1f} us"))
    log(f"  box_to_patch_mask: {t_ours['median_ms'] * 1e3:.1f} us")

    keep, counts = box_to_patch_mask(boxes, box_offsets, grid)
    index = keep.nonzero().reshape(-1)
    m = index.numel()
    shape = f"N={n} M={m} D={d}"

    # ---- gather forward ---------------------------------------------------------------
    gb = gbytes("gather fwd", n, m, m, d, e)
    t_ours = timer(lambda: gather_tokens(x, index))
    for name, fn in [
        ("index_select", lambda: x.index_select(0, index)),
        ("x[index]", lambda: x[index]),
        ("torch.gather", lambda: torch.gather(x, 0, index[:, None].expand(-1, d))),
        ("torch.compile x[index]", compiled(lambda a, i: a[i], x, index)),
    ]:
        if fn is not None:
            rows.append(Row("gather_tokens fwd", shape, dt, t_ours["median_ms"], name, timer(fn)["median_ms"], gbytes=gb))
    log("  gather fwd done")

    # ---- gather backward (unique indices: one dense kernel) ----------------------------
    xg = x.detach().requires_grad_()
    y_ours = gather_tokens(xg, index)
    y_ref = xg[index]
    y_sel = xg.index_select(0, index)
    grad = torch.randn_like(y_ours)
    gb = gbytes("gather bwd", n, m, m, d, e)
    t_ours = timer(lambda: torch.autograd.grad(y_ours, xg, grad, retain_graph=True))
    peak = timer.peak_bytes(lambda: torch.autograd.grad(y_ours, xg, grad, retain_graph=True))
    for name, y in [("autograd x[index]", y_ref), ("autograd index_select", y_sel)]:
        t_b = timer(lambda: torch.autograd.grad(y, xg, grad, retain_graph=True))
        rows.append(Row("gather_tokens bwd", shape, dt, t_ours["median_ms"], name, t_b["median_ms"], gbytes=gb,
                        peak_mb=None if peak is None else peak / 2**20))
    # The backward a compiler would emit for x[index]: a dense zero-filled scatter.
    cbwd = compiled(lambda g, i: torch.zeros(n, d, dtype=g.dtype, device=g.device).index_put((i,), g, accumulate=True),
                    grad, index)
    if cbwd is not None:
        rows.append(Row("gather_tokens bwd", shape, dt, t_ours["median_ms"], "torch.compile zeros+index_put",
                        timer(cbwd)["median_ms"], gbytes=gb))
    del y_ours, y_ref, y_sel, grad
    log("  gather bwd done")

    # ---- scatter forward (with fill) ---------------------------------------------------
    src = x[index].contiguous()
    gb = gbytes("scatter fwd", n, m, m, d, e)
    t_ours = timer(lambda: scatter_tokens(src, index, n, fill=x))
    for name, fn in [
        ("index_put", lambda: x.index_put((index,), src)),
        ("clone+index_copy_", lambda: x.clone().index_copy_(0, index, src)),
        ("torch.compile index_put", compiled(lambda a, i, s_: a.index_put((i,), s_), x, index, src)),
    ]:
        if fn is None:
            continue
        rows.append(Row("scatter_tokens fwd", shape, dt, t_ours["median_ms"], name, timer(fn)["median_ms"], gbytes=gb))
    zeros_t = timer(lambda: scatter_tokens(src, index, n))
    rows.append(Row("scatter_tokens fwd (zeros)", shape, dt, zeros_t["median_ms"], "zeros+index_copy_",
                    timer(lambda: torch.zeros_like(x).index_copy_(0, index, src))["median_ms"],
                    gbytes=gbytes("scatter zeros", n, m, m, d, e)))
    del src
    log("  scatter done")

    # ---- token fusion ----------------------------------------------------------------
    offsets = [int(v) for v in torch.arange(images + 1) * (side // 2) ** 2]
    kept_counts = counts.tolist()
    k = sum(kept_counts)
    gb = gbytes("fuse fwd", n, m, k, d, e)
    t_ours = timer(lambda: fuse_tokens(x, keep, offsets, kept_counts=kept_counts))
    # The similarity matmul alone (what fusion must at least cost in compute).
    kmax = max(kept_counts)
    dmax = max(o2 - o1 - c for o1, o2, c in zip(offsets, offsets[1:], kept_counts))
    a = torch.randn(images, max(dmax, 1), d, device=device).to(x.dtype)
    b = torch.randn(images, d, kmax, device=device).to(x.dtype)
    if device.type == "cuda":
        mm = lambda: torch.bmm(a, b, out_dtype=torch.float32)  # noqa: E731
    else:
        af, bf = a.float(), b.float()
        mm = lambda: torch.bmm(af, bf)  # noqa: E731
    t_mm = timer(mm)
    flop = 2 * sum((o2 - o1 - c) * c for o1, o2, c in zip(offsets, offsets[1:], kept_counts)) * d / 1e12
    eager_timer = Timer(device, warmup=1, iters=max(3, timer.iters // 3))
    t_eager = eager_timer(lambda: ref.fuse_tokens_eager(x, keep, offsets))
    peak = timer.peak_bytes(lambda: fuse_tokens(x, keep, offsets, kept_counts=kept_counts))
    rows.append(Row("fuse_tokens fwd", shape + f" K={k}", dt, t_ours["median_ms"], "eager torch (loop)",
                    t_eager["median_ms"], gbytes=gb, tflop=flop, peak_mb=None if peak is None else peak / 2**20,
                    note=f"matmul alone {t_mm['median_ms']:.3f} ms = {100 * t_mm['median_ms'] / t_ours['median_ms']:.0f}% of fuse"))
    xf = x.detach().requires_grad_()
    yf, _ = fuse_tokens(xf, keep, offsets, kept_counts=kept_counts)
    gy = torch.randn_like(yf)
    t_bwd = timer(lambda: torch.autograd.grad(yf, xf, gy, retain_graph=True))
    ye, _ = ref.fuse_tokens_eager(xf, keep, offsets)
    t_bwd_e = timer(lambda: torch.autograd.grad(ye, xf, gy, retain_graph=True))
    rows.append(Row("fuse_tokens bwd", shape + f" K={k}", dt, t_bwd["median_ms"], "autograd eager torch",
                    t_bwd_e["median_ms"], gbytes=gbytes("fuse bwd", n, m, k, d, e)))
    del a, b, xf, yf, gy, ye
    log("  fuse done")

    # ---- the composition users call, one row per fusion method ---------------------------
    for fuse in FUSION_METHODS:
        t_sel = timer(lambda: select_visual_tokens(x, boxes, box_offsets, grid, fuse=fuse))
        # the references of the spatial methods are per-token Python loops: small sizes only
        slow_ref = fuse != "none" and (size == "full" or fuse in ("nearest_kept", "summary"))
        t_sel_ref = None if slow_ref else Timer(device, warmup=1, iters=3)(
            lambda: ref.select_visual_tokens_ref(x, boxes, box_offsets, grid, fuse=fuse))
        rows.append(Row(f"select_visual_tokens fuse={fuse}", shape, dt, t_sel["median_ms"],
                        "reference" if t_sel_ref else "-", t_sel_ref["median_ms"] if t_sel_ref else None,
                        gbytes=gbytes(f"select fuse={fuse}", n, m, m, d, e)))
    log("  select done")
    return rows
