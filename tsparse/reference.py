"""Pure-PyTorch references of every tsparse op.

Written for clarity, not speed: loops over images, plain indexing, fp64 geometry. The tests
compare the CPU and CUDA kernels with these on fresh random inputs, and the benchmarks use
them (and ``torch.compile`` of them) as baselines.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------
# Visual tokens


def box_to_patch_mask_ref(
    boxes: Tensor,
    box_offsets: Tensor,
    image_grid_thw: Tensor,
    *,
    coords: str = "normalized",
    patch_size: int = 14,
    merge_size: int = 2,
    margin: float = 0.0,
    min_coverage: float = 0.0,
    empty: str = "keep_all",
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`tsparse.ops.box_to_patch_mask` (same fp64 operations, one rounding
    each, so results agree bit for bit with the kernels)."""
    device = boxes.device
    b64 = boxes.detach().to(torch.float64).cpu()
    offs = [int(v) for v in box_offsets.reshape(-1).tolist()]
    keeps, counts = [], []
    cell_px = float(patch_size * merge_size)
    for i, (t, h, w) in enumerate(image_grid_thw.tolist()):
        hc, wc = h // merge_size, w // merge_size
        rows = torch.arange(hc, dtype=torch.float64).view(hc, 1)
        cols = torch.arange(wc, dtype=torch.float64).view(1, wc)
        slice_keep = torch.zeros(hc, wc, dtype=torch.bool)
        for x1, y1, x2, y2 in b64[offs[i] : offs[i + 1]].tolist():
            vals = torch.tensor([x1, y1, x2, y2], dtype=torch.float64)
            if not bool(torch.isfinite(vals).all()) or not (x2 > x1 and y2 > y1):
                continue
            if coords == "pixel":
                x1, x2, y1, y2 = (vals[[0, 2, 1, 3]] / cell_px).tolist()
            else:
                x1, x2 = (vals[[0, 2]] * float(wc)).tolist()
                y1, y2 = (vals[[1, 3]] * float(hc)).tolist()
            gx1 = min(max(x1 - margin, 0.0), float(wc))
            gy1 = min(max(y1 - margin, 0.0), float(hc))
            gx2 = min(max(x2 + margin, 0.0), float(wc))
            gy2 = min(max(y2 + margin, 0.0), float(hc))
            f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
            ox = torch.minimum(cols + 1.0, f64(gx2)) - torch.maximum(cols, f64(gx1))
            oy = torch.minimum(rows + 1.0, f64(gy2)) - torch.maximum(rows, f64(gy1))
            cover = torch.where((ox > 0) & (oy > 0), ox * oy, f64(0.0))
            slice_keep |= cover > min_coverage
        if not bool(slice_keep.any()) and empty == "keep_all":
            slice_keep[:] = True
        keeps.append(slice_keep.reshape(-1).repeat(t))
        counts.append(int(slice_keep.sum()) * t)
    keep = torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.bool)
    return keep.to(device), torch.tensor(counts, dtype=torch.int32, device=device)


def gather_tokens_ref(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` (autograd accumulates duplicate indices)."""
    return x[index.to(torch.int64)]


def scatter_tokens_ref(src: Tensor, index: Tensor, num_rows: int, fill: Optional[Tensor] = None) -> Tensor:
    """``out = fill (or zeros); out[index] = src`` (differentiable in src and fill)."""
    base = fill if fill is not None else src.new_zeros(num_rows, src.shape[1])
    return base.index_put((index.to(torch.int64),), src)


def fuse_assignment_ref(x: Tensor, keep: Tensor, token_offsets: Sequence[int], eps: float = 1e-8) -> Tensor:
    """Each row's output row under token fusion (int64 [N]), with similarities in fp64."""
    n = x.shape[0]
    assign = torch.full((n,), -1, dtype=torch.int64)
    xd = x.detach().to(torch.float64).cpu()
    kcpu = keep.cpu()
    out_row = 0
    for i in range(len(token_offsets) - 1):
        a, b = int(token_offsets[i]), int(token_offsets[i + 1])
        rows = torch.arange(a, b)
        kept = rows[kcpu[a:b]]
        dropped = rows[~kcpu[a:b]]
        if kept.numel() == 0:
            continue
        assign[kept] = torch.arange(out_row, out_row + kept.numel())
        if dropped.numel():
            xk, xdr = xd[kept], xd[dropped]
            nk = xk.norm(dim=1).clamp_min(eps)
            nd = xdr.norm(dim=1).clamp_min(eps)
            sim = (xdr @ xk.T) / nd[:, None] / nk[None, :]
            assign[dropped] = out_row + sim.argmax(dim=1)  # argmax: first (lowest) index on ties
        out_row += kept.numel()
    return assign.to(x.device)


def fuse_tokens_ref(
    x: Tensor, keep: Tensor, token_offsets: Sequence[int], assign: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`tsparse.ops.fuse_tokens`. With ``assign`` given, pools with that
    assignment (to compare pooling and gradients independently of near-tie argmax)."""
    if assign is None:
        assign = fuse_assignment_ref(x, keep, token_offsets)
    k = int(keep.sum())
    valid = assign >= 0
    idx = assign[valid]
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                       device=x.device)
    sums = sums.index_add(0, idx, x[valid].to(sums.dtype))
    counts = torch.bincount(idx, minlength=k).to(sums.dtype)
    y = (sums / counts.clamp_min(1)[:, None]).to(x.dtype)
    return y, assign


def select_visual_tokens_ref(
    image_embeds: Tensor, boxes: Tensor, box_offsets: Tensor, image_grid_thw: Tensor, *, fuse: bool = True,
    **mask_options,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`tsparse.ops.select_visual_tokens`: (embeds, kept index, keep)."""
    keep, _ = box_to_patch_mask_ref(boxes, box_offsets, image_grid_thw, **mask_options)
    keep = keep.to(image_embeds.device)
    index = keep.nonzero().reshape(-1)
    if not fuse:
        return image_embeds[index], index, keep
    m = mask_options.get("merge_size", 2)
    offsets = [0]
    for t, h, w in image_grid_thw.tolist():
        offsets.append(offsets[-1] + t * (h // m) * (w // m))
    y, _ = fuse_tokens_ref(image_embeds, keep, offsets)
    return y, index, keep


def fuse_tokens_eager(x: Tensor, keep: Tensor, token_offsets: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Straightforward eager-PyTorch token fusion on ``x``'s device (a per-image loop of
    normalize / matmul / argmax / index_add, fp32 math): the baseline the benchmarks compare
    :func:`tsparse.ops.fuse_tokens` with."""
    n, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assign = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    k = int(keep.sum())
    sums = torch.zeros(k, d, dtype=acc, device=x.device)
    counts = torch.zeros(k, dtype=acc, device=x.device)
    out_row = 0
    for i in range(len(token_offsets) - 1):
        a, b = int(token_offsets[i]), int(token_offsets[i + 1])
        xi = x[a:b].to(acc)
        ki = keep[a:b]
        kept = ki.nonzero().reshape(-1)
        nk = kept.numel()
        if nk == 0:
            continue
        dropped = (~ki).nonzero().reshape(-1)
        local = torch.empty(b - a, dtype=torch.int64, device=x.device)
        local[kept] = torch.arange(nk, device=x.device)
        if dropped.numel():
            xk = torch.nn.functional.normalize(xi[kept], dim=1, eps=1e-8)
            local[dropped] = (xi[dropped] @ xk.T).argmax(dim=1)
        rows = local + out_row
        assign[a:b] = rows
        sums.index_add_(0, rows, xi)
        counts.index_add_(0, rows, torch.ones(b - a, dtype=acc, device=x.device))
        out_row += nk
    return (sums / counts.clamp_min(1)[:, None]).to(x.dtype), assign


# --------------------------------------------------------------------------------------
# Variable-length packing


def pack_varlen_ref(x: Tensor, attention_mask: Tensor, keep: Optional[Tensor] = None):
    """Reference of :func:`tsparse.ops.pack_varlen` (nonzero + gather, as flash-attn / verl do):
    returns (values, indices, cu_seqlens, max_seqlen, seqlens)."""
    mask = attention_mask.bool()
    if keep is not None:
        mask = mask & keep
    seqlens = mask.sum(dim=-1, dtype=torch.int32)
    cu = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    b, l = mask.shape
    values = x.reshape(b * l, *x.shape[2:])[indices]
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return values, indices, cu, max_seqlen, seqlens


def unpack_varlen_ref(values: Tensor, indices: Tensor, batch: int, seqlen: int, fill=0) -> Tensor:
    """Reference of :func:`tsparse.ops.unpack_varlen` (full + index_put)."""
    out = values.new_full((batch * seqlen, *values.shape[1:]), fill)
    out = out.index_put((indices,), values)
    return out.reshape(batch, seqlen, *values.shape[1:])


def pack_batch_ref(input_ids: Tensor, attention_mask: Tensor, position_ids: Optional[Tensor] = None,
                   keep: Optional[Tensor] = None):
    """Reference of :func:`tsparse.ops.pack_batch`, written the way verl's remove-padding path
    does it: (ids [1, nnz], positions [C, 1, nnz] or [1, nnz], labels = roll(ids, -1), indices,
    cu_seqlens)."""
    ids, indices, cu, _, _ = pack_varlen_ref(input_ids, attention_mask, keep)
    ids = ids.reshape(1, -1)
    labels = torch.roll(ids, shifts=-1, dims=1)
    pos = None
    if position_ids is not None:
        if position_ids.dim() == 2:
            pos = position_ids.reshape(1, -1)[:, indices]
        else:
            pos = position_ids.reshape(position_ids.shape[0], -1)[:, indices].unsqueeze(1)
    return ids, pos, labels, indices, cu


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """What verl's ``prepare_fa2_from_position_ids`` derives inside attention: a new sequence
    starts wherever the (first row of the) packed position ids is 0."""
    p = position_ids[0] if position_ids.dim() == 3 else position_ids
    p = p.reshape(-1)
    starts = (p == 0).nonzero().reshape(-1).to(torch.int32)
    return torch.cat([starts, torch.tensor([p.numel()], dtype=torch.int32, device=p.device)])
