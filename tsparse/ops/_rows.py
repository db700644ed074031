"""Fake kernels and autograd of the internal row ops that the public ops' backward formulas
and composites are built from (schemas in csrc/ops.cpp):

* ``compose_rows(src?, row_map, fill?, row_scale?)``:
  ``out[r] = row_map[r] >= 0 ? (src ? src[row_map[r]] * row_scale[row_map[r]] : 0) : (fill ? fill[r] : 0)``
* ``segment_reduce_rows(src, perm, offsets, mean)``:
  ``out[r] = sum (mean) of src[perm[offsets[r]:offsets[r + 1]]]``
* ``row_inv_norms(x, eps)``: ``1 / max(||x[r]||, eps)`` (float32; not differentiable)

Their backward formulas are made of the same ops, so every public op is twice
differentiable (gradgradcheck).
"""

from __future__ import annotations

import torch

from .. import _library  # noqa: F401
from . import _checks

_ops = torch.ops.tsparse


def segment_sum_by_key(values, keys, num_keys: int):
    """``out[k] = sum of values[i] with keys[i] == k`` for k in [0, num_keys); entries with a
    key outside that range are ignored. Deterministic (stable sort, fp32 accumulation)."""
    keys = keys.to(torch.int64)
    keys = torch.where((keys >= 0) & (keys < num_keys), keys, torch.full_like(keys, num_keys))
    sorted_keys, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(num_keys + 1, device=keys.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_keys, bounds)
    return _ops.segment_reduce_rows(values, perm, offsets, False)


@torch.library.register_fake("tsparse::compose_rows")
def _compose_rows_fake(src, row_map, fill, row_scale):
    _checks.fake_same_device("compose_rows", "row_map", row_map, ("src", "fill", "row_scale"), src=src, fill=fill,
                             row_scale=row_scale)
    ref = src if src is not None else fill
    if ref is None:
        raise ValueError("tsparse.compose_rows: at least one of `src` and `fill` must be given")
    _checks.fake_dims("compose_rows", src=(src, 2), row_map=(row_map, 1), fill=(fill, 2), row_scale=(row_scale, 1))
    return ref.new_empty((row_map.shape[0], ref.shape[1]))


@torch.library.register_fake("tsparse::segment_reduce_rows")
def _segment_reduce_rows_fake(src, perm, offsets, mean):
    _checks.fake_same_device("segment_reduce_rows", "src", src, perm=perm, offsets=offsets)
    _checks.fake_dims("segment_reduce_rows", src=(src, 2), perm=(perm, 1), offsets=(offsets, 1))
    if offsets.shape[0] < 1:
        raise ValueError("tsparse.segment_reduce_rows: `offsets` must be 1-D [rows + 1]")
    return src.new_empty((offsets.shape[0] - 1, src.shape[1]))


@torch.library.register_fake("tsparse::row_inv_norms")
def _row_inv_norms_fake(x, eps):
    _checks.fake_same_device("row_inv_norms", "x", x)
    _checks.fake_dims("row_inv_norms", x=(x, 2))
    return x.new_empty((x.shape[0],), dtype=torch.float32)


def _compose_setup(ctx, inputs, output):
    src, row_map, fill, row_scale = inputs
    ctx.src_rows = src.shape[0] if src is not None else 0
    ctx.has_src = src is not None
    ctx.has_fill = fill is not None
    ctx.save_for_backward(row_map, row_scale)


def _compose_backward(ctx, grad):
    row_map, row_scale = ctx.saved_tensors
    grad_src = grad_fill = None
    if ctx.has_src and ctx.needs_input_grad[0]:
        grad_src = segment_sum_by_key(grad, row_map, ctx.src_rows)
        if row_scale is not None:
            grad_src = grad_src * row_scale.to(grad_src.dtype)[:, None]
    if ctx.has_fill and ctx.needs_input_grad[2]:
        grad_fill = _ops.compose_rows(None, row_map, grad, None)
    return grad_src, None, grad_fill, None


torch.library.register_autograd("tsparse::compose_rows", _compose_backward, setup_context=_compose_setup)


def _segment_setup(ctx, inputs, output):
    src, perm, offsets, mean = inputs
    ctx.src_rows = src.shape[0]
    ctx.mean = bool(mean)
    ctx.save_for_backward(perm, offsets)


def _segment_backward(ctx, grad):
    perm, offsets = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    pos = torch.arange(perm.shape[0], device=perm.device, dtype=torch.int64)
    segment = torch.searchsorted(offsets, pos, right=True) - 1
    inside = (pos >= offsets[0]) & (pos < offsets[-1])
    segment = torch.where(inside, segment, torch.full_like(segment, -1))
    scale = None
    if ctx.mean:
        scale = (1.0 / offsets.diff().clamp_min(1).to(torch.float64)).to(torch.float32)
    per_position = _ops.compose_rows(grad, segment, None, scale)
    keys = torch.where(inside, perm, torch.full_like(perm, -1))
    return segment_sum_by_key(per_position, keys, ctx.src_rows), None, None, None


torch.library.register_autograd(
    "tsparse::segment_reduce_rows", _segment_backward, setup_context=_segment_setup
)
