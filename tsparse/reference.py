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


def nearest_assignment_ref(keep: Tensor, token_offsets: Sequence[int], coords: Tensor) -> Tensor:
    """Each row's output row when every dropped token joins the kept token of its image
    nearest in ``coords`` (squared Euclidean distance in fp64; ties: the lowest index)."""
    n = keep.shape[0]
    assign = torch.full((n,), -1, dtype=torch.int64)
    c = coords.detach().to(torch.float64).cpu()
    kcpu = keep.cpu()
    out_row = 0
    for i in range(len(token_offsets) - 1):
        a, b = int(token_offsets[i]), int(token_offsets[i + 1])
        rows = torch.arange(a, b)
        kept, dropped = rows[kcpu[a:b]], rows[~kcpu[a:b]]
        if kept.numel() == 0:
            continue
        assign[kept] = torch.arange(out_row, out_row + kept.numel())
        for r in dropped.tolist():
            d = ((c[kept] - c[r]) ** 2).sum(1)
            assign[r] = out_row + int(torch.nonzero(d == d.min())[0])  # the lowest index among ties
        out_row += kept.numel()
    return assign.to(keep.device)


def token_coords_ref(image_grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    """float64 [N, 3] (t, row, col) of every merged token, Qwen2.5-VL order (a plain loop)."""
    rows = []
    for t, h, w in image_grid_thw.tolist():
        for tt in range(t):
            for r in range(h // merge_size):
                for c in range(w // merge_size):
                    rows.append((tt, r, c))
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)


def summary_tokens_ref(x: Tensor, keep: Tensor, image_grid_thw: Tensor, merge_size: int = 2):
    """Reference of :func:`tsparse.ops.summary_tokens`: ``(y, assign, keep_out, is_summary)``,
    a plain per-image loop (the slot: the dropped cell nearest to the image centre in
    (t, row, col), ties the lowest index; its row the mean of the image's dropped rows)."""
    keep_out = keep.detach().cpu().clone()
    slots = {}
    start = 0
    for i, (t, h, w) in enumerate(image_grid_thw.tolist()):
        hh, ww = h // merge_size, w // merge_size
        n = t * hh * ww
        k = keep_out[start:start + n]
        if 0 < int(k.sum()) < n:
            best = None
            for j in range(n):
                if k[j]:
                    continue
                tt, r, c = j // (hh * ww), (j // ww) % hh, j % ww
                d = (tt - (t - 1) / 2) ** 2 + (r - (hh - 1) / 2) ** 2 + (c - (ww - 1) / 2) ** 2
                if best is None or d < best[0]:
                    best = (d, j)
            slots[i] = (start + best[1], list(range(start, start + n)))
        start += n
    for slot, _ in slots.values():
        keep_out[slot] = True
    kept_rows = keep_out.nonzero().reshape(-1).tolist()
    out_of = {r: o for o, r in enumerate(kept_rows)}
    assign = torch.full((keep.shape[0],), -1, dtype=torch.int64)
    for r in kept_rows:
        assign[r] = out_of[r]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc)[kept_rows].clone() if kept_rows else x.new_zeros(0, x.shape[1], dtype=acc)
    is_summary = torch.zeros(len(kept_rows), dtype=torch.bool)
    for slot, members in slots.values():
        dropped = [m for m in members if not bool(keep[m])]
        for m in dropped:
            assign[m] = out_of[slot]
        y[out_of[slot]] = x.to(acc)[dropped].mean(0)
        is_summary[out_of[slot]] = True
    dev = x.device
    return y.to(x.dtype), assign.to(dev), keep_out.to(dev), is_summary.to(dev)


def fuse_visual_tokens_ref(x: Tensor, keep: Tensor, image_grid_thw: Tensor, method: str, merge_size: int = 2):
    """Reference of :func:`tsparse.ops.fuse_visual_tokens`: ``(embeds, kept index, keep_out)``."""
    offsets = [0]
    for t, h, w in image_grid_thw.tolist():
        offsets.append(offsets[-1] + t * (h // merge_size) * (w // merge_size))
    if method == "summary":
        y, _, keep_out, _ = summary_tokens_ref(x, keep, image_grid_thw, merge_size)
        return y, keep_out.nonzero().reshape(-1), keep_out
    index = keep.nonzero().reshape(-1)
    if method == "none":
        return x[index], index, keep
    if method == "cosine_mean":
        y, _ = fuse_tokens_ref(x, keep, offsets)
    elif method == "nearest_kept":
        assign = nearest_assignment_ref(keep, offsets, token_coords_ref(image_grid_thw, merge_size))
        y, _ = fuse_tokens_ref(x, keep, offsets, assign=assign)
    else:
        raise ValueError(f"unknown fusion method {method!r}")
    return y, index, keep


def select_visual_tokens_ref(
    image_embeds: Tensor, boxes: Tensor, box_offsets: Tensor, image_grid_thw: Tensor, *, fuse=True,
    **mask_options,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`tsparse.ops.select_visual_tokens`: (embeds, kept index, keep).
    ``fuse``: a fusion method name, or True / False for cosine_mean / none."""
    keep, _ = box_to_patch_mask_ref(boxes, box_offsets, image_grid_thw, **mask_options)
    keep = keep.to(image_embeds.device)
    method = {True: "cosine_mean", False: "none"}.get(fuse, fuse)
    return fuse_visual_tokens_ref(image_embeds, keep, image_grid_thw, method, mask_options.get("merge_size", 2))


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
# GRPO. Written from verl 0.9.1's published math (verl/trainer/ppo/core_algos.py:
# compute_policy_loss_vanilla, kl_penalty, agg_loss; verl/workers/utils/losses.py: ppo_loss),
# not imported from verl. Plain autograd through torch ops; fp64 by default.


def logprobs_ref(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
    dtype: Optional[torch.dtype] = torch.float64,
) -> tuple[Tensor, Optional[Tensor]]:
    """Reference of :func:`tsparse.ops.logprobs`: ``log_softmax(logits / T)[targets]`` and the
    entropy ``-sum p log p`` (0 * log 0 = 0 for -inf logits), computed in ``dtype`` (``None``:
    the logits' dtype, what eager PyTorch GRPO code does after ``logits.float()``)."""
    z = (logits if dtype is None else logits.to(dtype)) / temperature
    lsm = torch.log_softmax(z, dim=-1)
    logp = lsm.gather(-1, targets.to(torch.int64)[:, None]).squeeze(-1)
    if not return_entropy:
        return logp, None
    p = lsm.exp()
    safe = torch.where(p > 0, lsm, torch.zeros_like(lsm))  # no 0 * -inf, no NaN gradient
    return logp, -(p * safe).sum(dim=-1)


def kl_penalty_ref(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """verl 0.9.1 ``kl_penalty``: k1/kl, abs, k2/mse, k3/low_var_kl (clamped), and the '+'
    straight-through variants (value of the estimator, gradient of k2)."""
    base = kl_type[:-1] if kl_type.endswith("+") else kl_type
    if base in ("kl", "k1"):
        fwd = logp - ref_logp
    elif base == "abs":
        fwd = (logp - ref_logp).abs()
    elif base in ("mse", "k2"):
        fwd = 0.5 * (logp - ref_logp).square()
    elif base in ("low_var_kl", "k3"):
        kl = torch.clamp(ref_logp - logp, min=-20, max=20)
        fwd = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    else:
        raise ValueError(f"unknown kl_type {kl_type!r}")
    if not kl_type.endswith("+") or kl_type in ("mse", "k2"):
        return fwd
    back = 0.5 * (logp - ref_logp).square()
    return back - back.detach() + fwd.detach()


def policy_loss_vanilla_ref(
    old_logp: Tensor, logp: Tensor, advantages: Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
    clip_ratio_c: float = 3.0, is_weights: Optional[Tensor] = None,
) -> dict:
    """Per-token part of verl 0.9.1 ``compute_policy_loss_vanilla``, line by line."""
    negative_approx_kl = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clipped = torch.gt(pg_losses2, pg_losses1)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    clipped_lower = torch.gt(clip_pg_losses1, pg_losses3) & (advantages < 0)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if is_weights is not None:
        pg_losses = pg_losses * is_weights
    return dict(pg=pg_losses, ratio=ratio, clipped=clipped, clipped_lower=clipped_lower,
                negative_approx_kl=negative_approx_kl)


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """verl_F.masked_sum: where(mask, v, 0) * mask, summed."""
    return (torch.where(mask != 0, values, torch.zeros_like(values)) * mask).sum()


def masked_mean_ref(values: Tensor, mask: Tensor) -> Tensor:
    """verl_F.masked_mean: masked sum / (mask sum + 1e-8)."""
    return _masked_sum(values, mask) / (mask.sum() + 1e-8)


def agg_loss_ref(loss: Tensor, mask: Tensor, mode: str, seq_ids: Optional[Tensor] = None,
                 loss_scale_factor: Optional[float] = None) -> Tensor:
    """verl 0.9.1 ``agg_loss`` (dp_size = 1) on flat tokens: ``seq_ids`` names each token's
    sequence (verl's rows); ``seq-mean-token-sum-norm`` divides ``seq-mean-token-sum`` by
    ``loss_scale_factor`` (verl's default, the padded width, does not exist for flat tokens).
    A selection with no tokens aggregates to 0 (verl: 0 / 0). Masked tokens never reach the
    result, even when not finite (``where``, as verl's ``masked_sum``)."""
    m = mask.to(loss.dtype)
    if mode == "token-mean":
        n = m.sum()
        return _masked_sum(loss, m) / n if float(n) != 0 else _masked_sum(loss, m) * 0
    if mode == "token-sum":
        return _masked_sum(loss, m)
    if mode not in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        raise ValueError(f"unknown loss_agg {mode!r}")
    total, nseq = _masked_sum(loss, m) * 0, 0
    for q in torch.unique(seq_ids).tolist():
        mq = m * (seq_ids == q).to(m.dtype)
        count = mq.sum()
        if float(count) <= 0:
            continue
        seq_loss = _masked_sum(loss, mq)
        if mode == "seq-mean-token-mean":
            seq_loss = seq_loss / (count + 1e-8)
        total = total + seq_loss
        nseq += 1
    total = total / nseq if nseq else total
    if mode == "seq-mean-token-sum-norm":
        total = total / loss_scale_factor
    return total


def grpo_loss_ref(
    logits: Tensor, targets: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
    temperature: float = 1.0, clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float = 3.0,
    ref_logp: Optional[Tensor] = None, kl_type: str = "low_var_kl", kl_coef: float = 0.0,
    entropy_coef: float = 0.0, stream: Optional[Tensor] = None, stream_weights: Optional[Sequence[float]] = None,
    num_streams: Optional[int] = None, loss_agg: str = "token-mean", seq_ids: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None, dtype: Optional[torch.dtype] = torch.float64,
    loss_scale_factor: Optional[float] = None,
) -> dict:
    """Reference of :func:`tsparse.ops.grpo_loss`: per stream s, verl's ``ppo_loss`` on the
    stream's masked tokens (``pg_loss - entropy_coef * entropy_loss + kl_coef * kl_loss``, each
    an ``agg_loss``), then ``loss = sum_s w_s * loss_s``. Returns a dict with ``loss``, the
    per-token ``logp``, ``ratio``, ``entropy``, ``kl`` and ``metrics``: per-stream ``[S]``
    tensors ``pg_loss``, ``clipfrac``, ``clipfrac_lower``, ``ppo_kl``, ``kl``, ``entropy``,
    ``tokens``."""
    logp, entropy = logprobs_ref(logits, targets, temperature=temperature, return_entropy=True, dtype=dtype)
    cd = logp.dtype
    old_logp, advantages = old_logp.to(cd), advantages.to(cd)
    pl = policy_loss_vanilla_ref(old_logp, logp, advantages, clip_low=clip_low, clip_high=clip_high,
                                 clip_ratio_c=clip_ratio_c,
                                 is_weights=None if is_weights is None else is_weights.to(cd))
    kld = kl_penalty_ref(logp, ref_logp.to(cd), kl_type) if ref_logp is not None else None
    m = mask.to(cd)
    if stream is None:
        stream = torch.zeros(logp.shape[0], dtype=torch.int64, device=logp.device)
        s_count = 1
    else:
        s_count = len(stream_weights) if stream_weights is not None else (num_streams or int(stream.max()) + 1)
    weights = list(stream_weights) if stream_weights is not None else [1.0] * s_count
    # Zero, on the graph, but never NaN: `logp.sum() * 0` is NaN when a (masked) row of the
    # logits is not finite, while the loss only reads the unmasked tokens.
    loss = _masked_sum(logp, torch.zeros_like(logp))
    metrics = {k: [] for k in ("pg_loss", "clipfrac", "clipfrac_lower", "ppo_kl", "kl", "entropy", "tokens")}
    for s in range(s_count):
        ms = m * (stream == s).to(cd)
        pg_s = agg_loss_ref(pl["pg"], ms, loss_agg, seq_ids, loss_scale_factor)
        ent_s = agg_loss_ref(entropy, ms, loss_agg, seq_ids, loss_scale_factor)
        loss_s = pg_s - entropy_coef * ent_s
        metrics["pg_loss"].append(pg_s.detach())
        metrics["entropy"].append(ent_s.detach())
        if kld is not None:
            kl_s = agg_loss_ref(kld, ms, loss_agg, seq_ids, loss_scale_factor)
            loss_s = loss_s + kl_s * kl_coef
            metrics["kl"].append(kl_s.detach())
        metrics["clipfrac"].append(masked_mean_ref(pl["clipped"].to(cd), ms).detach())
        metrics["clipfrac_lower"].append(masked_mean_ref(pl["clipped_lower"].to(cd), ms).detach())
        metrics["ppo_kl"].append(masked_mean_ref(-pl["negative_approx_kl"], ms).detach())
        metrics["tokens"].append(ms.sum().detach())
        loss = loss + weights[s] * loss_s
    per_stream = {k: (torch.stack(v) if v else None) for k, v in metrics.items()}
    return dict(loss=loss, logp=logp, ratio=pl["ratio"], entropy=entropy, kl=kld, metrics=per_stream)
