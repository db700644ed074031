"""Variable-length packing for flash attention: padded ``[B, L, ...]`` batches to one packed
``[nnz, ...]`` sequence with ``cu_seqlens``, pruning-aware, with M-RoPE position ids, and no
hidden host syncs.

* :func:`pack_varlen` / :func:`unpack_varlen` - any tensor ``[B, L, ...]`` (ids, hidden states,
  labels, masks), differentiable.
* :func:`pack_position_ids` - ``[C, B, L]`` (M-RoPE: C = 3; verl 0.9.1: C = 4) or ``[B, L]``
  positions to ``[C, 1, nnz]`` / ``[1, nnz]``, keeping each kept token's ORIGINAL position.
* :func:`pack_batch` - the common case in one pass: ids, position ids and the rolled next-token
  labels (``torch.roll(ids, -1)`` on the packed sequence, as verl does), plus optionally the
  input embeddings, with the ``cu_seqlens`` flash attention needs.
* :func:`unpad_input`, :func:`pad_input`, :func:`index_first_axis` - drop-ins with
  ``flash_attn.bert_padding``'s signatures and return tuples.

The kept set is ``attention_mask & keep`` (``keep`` removes e.g. pruned visual tokens); packing
is row-major in ``(b, l)`` order; empty rows give zero-length segments.

Host syncs: the packed length ``total`` and ``max_seqlen`` are output sizes / Python ints. Pass
both (e.g. known on the host from the box counts) and an op makes NO host sync; otherwise it
reads both with exactly ONE device->host copy. ``max_seqlen`` may be an upper bound (flash
attention only needs one) but never below the longest row; ``total`` must be exact - on CUDA a
wrong ``total`` or a too-small ``max_seqlen`` aborts with a device-side error, on the CPU they
raise ``ValueError``. Meta tensors work only where no value is read on the host (``total`` and
``max_seqlen`` given); elsewhere they are refused by name.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _library  # noqa: F401  (loads the torch.ops.tsparse schemas)
from .._nvtx import annotate
from . import _checks
from . import _rows  # noqa: F401  (autograd of the row ops used below)
from .visual_tokens import gather_tokens, scatter_tokens

__all__ = [
    "Packed",
    "PackedBatch",
    "pack_varlen",
    "unpack_varlen",
    "pack_position_ids",
    "pack_batch",
    "unpad_input",
    "pad_input",
    "index_first_axis",
]

_ops = torch.ops.tsparse


class Packed(NamedTuple):
    """What :func:`pack_varlen` returns."""

    values: Tensor  #: ``[nnz, ...]`` kept rows in row-major ``(b, l)`` order
    indices: Tensor  #: int64 ``[nnz]`` into the flattened ``B * L``
    cu_seqlens: Tensor  #: int32 ``[B + 1]``
    max_seqlen: int  #: longest packed row (or the caller's upper bound)
    seqlens: Tensor  #: int32 ``[B]``


class PackedBatch(NamedTuple):
    """What :func:`pack_batch` returns (verl's packed layout: a batch of one)."""

    input_ids: Tensor  #: int64 ``[1, nnz]``
    position_ids: Optional[Tensor]  #: int64 ``[C, 1, nnz]`` (or ``[1, nnz]`` for 2-D input)
    labels: Tensor  #: int64 ``[1, nnz]``: ``torch.roll(input_ids, -1, dims=1)``
    inputs_embeds: Optional[Tensor]  #: ``[1, nnz, H]`` when ``inputs_embeds`` was given
    indices: Tensor  #: int64 ``[nnz]``
    cu_seqlens: Tensor  #: int32 ``[B + 1]``
    max_seqlen: int
    seqlens: Tensor  #: int32 ``[B]``


# --------------------------------------------------------------------------------------
# Fake kernels and autograd
@torch.library.register_fake("tsparse::varlen_seqlens")
def _varlen_seqlens_fake(attention_mask, keep):
    _checks.fake_same_device("pack_varlen", "attention_mask", attention_mask, ("keep",), keep=keep)
    _checks.fake_dims("pack_varlen", attention_mask=(attention_mask, 2), keep=(keep, 2))
    b = attention_mask.shape[0]
    return (attention_mask.new_empty((b,), dtype=torch.int32), attention_mask.new_empty((b + 1,), dtype=torch.int32))


@torch.library.register_fake("tsparse::varlen_pack")
def _varlen_pack_fake(attention_mask, keep, cu_seqlens, total, input_ids, position_ids):
    _checks.fake_same_device("pack_varlen", "attention_mask", attention_mask, ("keep", "input_ids", "position_ids"),
                             keep=keep, cu_seqlens=cu_seqlens,
                             input_ids=input_ids, position_ids=position_ids)
    _checks.fake_dims("pack_varlen", attention_mask=(attention_mask, 2), cu_seqlens=(cu_seqlens, 1))
    b, l = attention_mask.shape
    n_ids = total if input_ids is not None else 0
    channels = 0 if position_ids is None else (1 if position_ids.dim() == 2 else position_ids.shape[0])
    new = attention_mask.new_empty
    return (
        new((total,), dtype=torch.int64),
        new((b * l,), dtype=torch.int32),
        new((n_ids,), dtype=torch.int64),
        new((n_ids,), dtype=torch.int64),
        new((channels, total), dtype=torch.int64),
    )


@torch.library.register_fake("tsparse::varlen_gather")
def _varlen_gather_fake(x, indices, inverse, check_inverse=True):
    _checks.fake_same_device("pack_varlen", "x", x, indices=indices, inverse=inverse)
    _checks.fake_dims("pack_varlen", x=(x, 2), indices=(indices, 1), inverse=(inverse, 1))
    return x.new_empty((indices.shape[0], x.shape[1]))


def _varlen_gather_setup(ctx, inputs, output):
    inverse = inputs[2]
    ctx.save_for_backward(inverse)


def _varlen_gather_backward(ctx, grad):
    (inverse,) = ctx.saved_tensors
    # ONE kernel writes every row of the padded gradient: the packed row or zeros.
    return _ops.compose_rows(grad, inverse, None, None), None, None, None


torch.library.register_autograd(
    "tsparse::varlen_gather", _varlen_gather_backward, setup_context=_varlen_gather_setup
)


# --------------------------------------------------------------------------------------
# Planning: seqlens, cu_seqlens, total, max_seqlen (the only place a sync can happen)
def _check_mask(attention_mask, keep, op: str = "pack_varlen"):
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"tsparse.{op}: `attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"tsparse.{op}: `attention_mask` must be 2-D [B, L], got shape {tuple(attention_mask.shape)}")
    if attention_mask.is_complex():
        raise TypeError(f"tsparse.{op}: `attention_mask` must be bool or a real number type, got {attention_mask.dtype}")
    if keep is not None and not isinstance(keep, Tensor):
        raise TypeError(f"tsparse.{op}: `keep` must be a bool tensor or None, got {type(keep).__name__}")


def _host_int(value, op: str, arg: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"tsparse.{op}: `{arg}` must be a non-negative int (below 2^63) or None, got {value!r}")
    return int(value)


def _plan(attention_mask: Tensor, keep: Optional[Tensor], total: Optional[int], max_seqlen: Optional[int],
          op: str = "pack_varlen"):
    _check_mask(attention_mask, keep, op)
    total = _host_int(total, op, "total")
    bound = _host_int(max_seqlen, op, "max_seqlen")
    seqlens, cu_seqlens = _ops.varlen_seqlens(attention_mask, keep)
    if total is None or bound is None:
        # The one device->host copy: the packed length and the longest row together.
        _checks.not_meta(attention_mask, op, "attention_mask",
                         "the packed length and longest row are read on the host; pass `total` and `max_seqlen`")
        if seqlens.numel():
            pair = torch.stack([cu_seqlens[-1], seqlens.max()]).tolist()
        else:
            pair = [0, 0]
        total = pair[0] if total is None else total
        if bound is not None and pair[1] > bound:
            raise ValueError(
                f"tsparse.{op}: `max_seqlen` = {bound} but the longest kept row has {pair[1]} tokens "
                "(max_seqlen may be an upper bound, never below)"
            )
        max_seqlen = pair[1] if bound is None else bound
    else:
        # Both given: no host read. The caller's bound is checked where the values live (eager on
        # the CPU, an asynchronous device assert on CUDA), as `total` is inside varlen_pack.
        if seqlens.numel():
            _checks.check_on_device(
                seqlens.max() <= bound, op,
                f"`max_seqlen` = {bound} is below the longest kept row (max_seqlen may be an upper bound, never below)",
            )
        max_seqlen = bound
    return seqlens, cu_seqlens, total, max_seqlen


def _flat_rows(x: Tensor, b: int, l: int, op: str, arg: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"tsparse.{op}: `{arg}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] != b or x.shape[1] != l:
        raise ValueError(f"tsparse.{op}: `{arg}` must have shape [B, L, ...] with [B, L] = [{b}, {l}], got {tuple(x.shape)}")
    return x.reshape(b * l, math.prod(x.shape[2:]))


def _check_indices(indices, op: str, arg: str, device: torch.device, bound: Optional[int] = None) -> Tensor:
    """1-D int32/int64 on ``device``; on the CPU also the values against [0, bound) (the kernels
    check them again; this names the caller's argument)."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"tsparse.{op}: `{arg}` must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tsparse.{op}: `{arg}` must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"tsparse.{op}: `{arg}` must be 1-D, got shape {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"tsparse.{op}: `{arg}` is on {indices.device} but the values are on {device}")
    if bound is not None and indices.numel() and indices.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= bound:
            raise IndexError(f"tsparse.{op}: `{arg}` holds {lo if lo < 0 else hi}, out of range [0, {bound})")
    return indices


# --------------------------------------------------------------------------------------
# Public ops
@annotate("pack_varlen")
def pack_varlen(
    x: Tensor,
    attention_mask: Tensor,
    *,
    keep: Optional[Tensor] = None,
    total: Optional[int] = None,
    max_seqlen: Optional[int] = None,
) -> Packed:
    """Packs the kept tokens of ``x`` into one variable-length sequence.

    Args:
        x: ``[B, L, ...]`` any dtype (ids, hidden states, labels, masks).
        attention_mask: ``[B, L]`` bool or int (nonzero = token); left, right or arbitrary padding.
        keep: optional bool ``[B, L]``, further removing tokens (pruned visual tokens).
        total: the number of kept tokens, if known on the host (must be exact).
        max_seqlen: the longest kept row, or an upper bound, if known on the host. A bound
            below the longest kept row is an error: ``ValueError`` on the CPU, a device-side
            assert on CUDA (checked there, without a host sync, like ``total``).

    Returns a :class:`Packed`. ``values`` is differentiable (float ``x``); its backward is ONE
    kernel writing every row of the ``[B, L, ...]`` gradient (the packed row or zeros).
    Syncs: none with ``total`` and ``max_seqlen`` given; otherwise exactly one.
    """
    return _pack(x, attention_mask, keep, total, max_seqlen, "pack_varlen", "x")


def _pack(x, attention_mask, keep, total, max_seqlen, op: str, x_arg: str) -> Packed:
    with _checks.renamed_errors(op, ("pack_varlen",), {"x": x_arg}):
        seqlens, cu_seqlens, total, max_seqlen = _plan(attention_mask, keep, total, max_seqlen, op)
        b, l = attention_mask.shape
        rows = _flat_rows(x, b, l, op, x_arg)
        if rows.device != attention_mask.device:
            raise ValueError(f"tsparse.{op}: `{x_arg}` is on {rows.device} but `attention_mask` is on "
                             f"{attention_mask.device}")
        indices, inverse, _, _, _ = _ops.varlen_pack(attention_mask, keep, cu_seqlens, total, None, None)
        values = _ops.varlen_gather(rows, indices, inverse, False)  # varlen_pack's own maps: no value check
    return Packed(values.reshape(total, *x.shape[2:]), indices, cu_seqlens, max_seqlen, seqlens)


@annotate("unpack_varlen")
def unpack_varlen(values: Tensor, indices: Tensor, batch: int, seqlen: int, *, fill=0) -> Tensor:
    """The inverse of :func:`pack_varlen`: ``[nnz, ...]`` back to ``[batch, seqlen, ...]``.

    Positions not in ``indices`` get ``fill`` (a number or a 0-d tensor, default 0, e.g. ``-100``
    for labels or a pad id; it must fit ``values``' dtype). ``indices`` (int32 / int64) must be
    unique and in ``[0, batch * seqlen)`` (as :func:`pack_varlen` returns them). One kernel
    writes every output row once. Differentiable in ``values``. No host sync.
    """
    return _unpack(values, indices, batch, seqlen, fill, "unpack_varlen", "values")


def _check_fill(fill, values: Tensor, op: str):
    if isinstance(fill, Tensor):
        if fill.dim() != 0:
            raise ValueError(f"tsparse.{op}: `fill` must be a number or a 0-d tensor, got shape {tuple(fill.shape)}")
        _checks.not_meta(fill, op, "fill", "its value is read on the host")
        return fill
    if not isinstance(fill, (bool, int, float)):
        raise TypeError(f"tsparse.{op}: `fill` must be a number, got {type(fill).__name__} {fill!r}")
    if values.dtype == torch.bool and not isinstance(fill, bool) and fill not in (0, 1):
        raise ValueError(f"tsparse.{op}: `fill` = {fill!r} does not fit `values`' dtype bool")
    if not values.dtype.is_floating_point and not values.dtype.is_complex and values.dtype != torch.bool:
        info = torch.iinfo(values.dtype)
        integral = not isinstance(fill, float) or (math.isfinite(fill) and fill.is_integer())
        if not integral or not info.min <= fill <= info.max:
            raise ValueError(f"tsparse.{op}: `fill` = {fill!r} does not fit `values`' dtype {values.dtype}")
    return fill


def _unpack(values, indices, batch, seqlen, fill, op: str, values_arg: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"tsparse.{op}: `{values_arg}` must be a torch.Tensor, got {type(values).__name__}")
    for name, v in (("batch", batch), ("seqlen", seqlen)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"tsparse.{op}: `{name}` must be a non-negative int, got {v!r}")
    n = batch * seqlen
    if n >= 2**63:
        raise ValueError(f"tsparse.{op}: `batch` * `seqlen` = {n} rows is too many (2^63 at most)")
    _check_indices(indices, op, "indices", values.device, bound=n)
    if values.dim() < 1 or values.shape[0] != indices.shape[0]:
        raise ValueError(
            f"tsparse.{op}: `{values_arg}` [nnz, ...] and `indices` [nnz] must agree, got {tuple(values.shape)} and "
            f"{tuple(indices.shape)}"
        )
    fill = _check_fill(fill, values, op)
    trailing = values.shape[1:]
    rows = values.reshape(values.shape[0], math.prod(trailing))
    with _checks.renamed_errors(op, ("scatter_tokens",), {"src": values_arg, "index": "indices"}):
        if isinstance(fill, Tensor) or fill != 0:
            fill_row = torch.full((1, rows.shape[1]), fill, dtype=values.dtype, device=values.device)
            out = scatter_tokens(rows, indices, n, fill=fill_row.expand(n, rows.shape[1]))
        else:
            out = scatter_tokens(rows, indices, n)
    return out.reshape(batch, seqlen, *trailing)


def pack_position_ids(position_ids: Tensor, indices: Tensor) -> Tensor:
    """Packs position ids with the ``indices`` of :func:`pack_varlen` / :func:`pack_batch`.

    ``position_ids`` ``[C, B, L]`` (Qwen2.5-VL M-RoPE: C = 3; verl 0.9.1: C = 4, a text row
    first) -> ``[C, 1, nnz]``; ``[B, L]`` -> ``[1, nnz]``. Each kept token keeps its ORIGINAL
    position (computed on the full, unpruned sequence). No host sync.
    """
    op = "pack_position_ids"
    if not isinstance(position_ids, Tensor):
        raise TypeError(f"tsparse.{op}: `position_ids` must be a torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dim() not in (2, 3):
        raise ValueError(f"tsparse.{op}: `position_ids` must be [B, L] or [C, B, L], got {tuple(position_ids.shape)}")
    flat = position_ids.dim() == 2
    _check_indices(indices, op, "indices", position_ids.device, bound=math.prod(position_ids.shape[-2:]))
    rows = position_ids.reshape(1 if flat else position_ids.shape[0], math.prod(position_ids.shape[-2:]))
    # Position ids are a few int64 rows: gather them as [B*L, C] rows with the row kernel.
    with _checks.renamed_errors(op, ("gather_tokens",), {"x": "position_ids", "index": "indices"}):
        packed = gather_tokens(rows.t(), indices).t()
    return packed.contiguous() if flat else packed.unsqueeze(1).contiguous()


@annotate("pack_batch")
def pack_batch(
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Optional[Tensor] = None,
    *,
    keep: Optional[Tensor] = None,
    total: Optional[int] = None,
    max_seqlen: Optional[int] = None,
    inputs_embeds: Optional[Tensor] = None,
) -> PackedBatch:
    """Packs a padded micro-batch the way verl's remove-padding path does, in one pass.

    Args:
        input_ids: int ``[B, L]``.
        attention_mask: ``[B, L]`` bool or int.
        position_ids: optional int ``[C, B, L]`` (M-RoPE) or ``[B, L]``; each kept token keeps
            its original position.
        keep: optional bool ``[B, L]`` (pruned visual tokens are False). Keep each sequence's
            first token: verl derives ``cu_seqlens`` inside attention from the packed text
            positions (``position_ids == 0`` starts a sequence).
        total, max_seqlen: as :func:`pack_varlen` (both given: no host sync).
        inputs_embeds: optional ``[B, L, H]`` packed too (differentiable).

    One kernel computes the packed ids, the position rows, the labels
    (``torch.roll(ids, -1)``: the next KEPT token; the last wraps to the first, as in verl)
    and the index maps; ``inputs_embeds`` is one more pass of the row-gather kernel.
    """
    op = "pack_batch"
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"tsparse.{op}: `input_ids` must be a torch.Tensor, got {type(input_ids).__name__}")
    if position_ids is not None and not isinstance(position_ids, Tensor):
        raise TypeError(f"tsparse.{op}: `position_ids` must be a torch.Tensor or None, got {type(position_ids).__name__}")
    with _checks.renamed_errors(op, ("pack_varlen",), {"x": "inputs_embeds"}):
        seqlens, cu_seqlens, total, max_seqlen = _plan(attention_mask, keep, total, max_seqlen, op)
        b, l = attention_mask.shape
        rows = None
        if inputs_embeds is not None:
            rows = _flat_rows(inputs_embeds, b, l, op, "inputs_embeds")
            if rows.device != attention_mask.device:
                raise ValueError(f"tsparse.{op}: `inputs_embeds` is on {rows.device} but `attention_mask` is on "
                                 f"{attention_mask.device}")
        indices, inverse, ids, labels, pos = _ops.varlen_pack(
            attention_mask, keep, cu_seqlens, total, input_ids, position_ids
        )
        packed_pos = None
        if position_ids is not None:
            packed_pos = pos if position_ids.dim() == 2 else pos.unsqueeze(1)
        embeds = None
        if rows is not None:
            embeds = _ops.varlen_gather(rows, indices, inverse, False).reshape(1, total, *inputs_embeds.shape[2:])
    return PackedBatch(
        ids.unsqueeze(0), packed_pos, labels.unsqueeze(0), embeds, indices, cu_seqlens, max_seqlen, seqlens
    )


# --------------------------------------------------------------------------------------
# flash_attn.bert_padding drop-ins (same signatures and return tuples)
def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Optional[Tensor] = None):
    """Drop-in for ``flash_attn.bert_padding.unpad_input``.

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)``, bool / int, 1 means valid and 0 means not valid.
        unused_mask: ``(batch, seqlen)``, bool / int, 1 means the element is allocated but unused.

    Returns ``(hidden_states (total_nnz, ...), indices (total_nnz,), cu_seqlens (batch + 1,),
    max_seqlen_in_batch (int), seqused (batch,))`` where ``total_nnz`` counts the tokens selected
    in ``attention_mask + unused_mask`` and ``seqused`` those in ``attention_mask`` alone.
    One host sync (flash-attn's makes two: ``nonzero`` and ``.item()``).
    """
    op = "unpad_input"
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"tsparse.{op}: `hidden_states` must be a torch.Tensor, got {type(hidden_states).__name__}")
    _check_mask(attention_mask, None, op)
    if unused_mask is not None:
        if not isinstance(unused_mask, Tensor):
            raise TypeError(f"tsparse.{op}: `unused_mask` must be a torch.Tensor or None, got {type(unused_mask).__name__}")
        if unused_mask.shape != attention_mask.shape:
            raise ValueError(
                f"tsparse.{op}: `unused_mask` must have the shape of `attention_mask` {tuple(attention_mask.shape)}, "
                f"got {tuple(unused_mask.shape)}"
            )
        if unused_mask.is_complex():
            raise TypeError(f"tsparse.{op}: `unused_mask` must be bool or a real number type, got {unused_mask.dtype}")
        if unused_mask.device != attention_mask.device:
            raise ValueError(
                f"tsparse.{op}: `unused_mask` is on {unused_mask.device} but `attention_mask` is on {attention_mask.device}"
            )
        selected = (attention_mask != 0) | (unused_mask != 0)
        seqused = (attention_mask != 0).sum(dim=-1, dtype=torch.int32)
    else:
        selected = attention_mask
        seqused = None
    p = _pack(hidden_states, selected, None, None, None, op, "hidden_states")
    return p.values, p.indices, p.cu_seqlens, p.max_seqlen, (p.seqlens if seqused is None else seqused)


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Drop-in for ``flash_attn.bert_padding.pad_input``: ``(total_nnz, ...)`` ->
    ``(batch, seqlen, ...)`` with zeros where no row was given. No host sync."""
    return _unpack(hidden_states, indices, batch, seqlen, 0, "pad_input", "hidden_states")


def index_first_axis(input: Tensor, indices: Tensor) -> Tensor:  # noqa: A002 (flash-attn's name)
    """Drop-in for ``flash_attn.bert_padding.index_first_axis``: ``input[indices]`` along the first
    axis of a tensor with at least 2 dims; the backward writes the dense gradient in one kernel.
    ``indices`` must be unique (as ``unpad_input`` returns them). No host sync."""
    op = "index_first_axis"
    if not isinstance(input, Tensor):
        raise TypeError(f"tsparse.{op}: `input` must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"tsparse.{op}: `input` must be a tensor with at least 2 dims, got shape {tuple(input.shape)}")
    _check_indices(indices, op, "indices", input.device, bound=input.shape[0])
    rows = input.reshape(input.shape[0], math.prod(input.shape[1:]))
    with _checks.renamed_errors(op, ("gather_tokens",), {"x": "input", "index": "indices"}):
        return gather_tokens(rows, indices).reshape(indices.shape[0], *input.shape[1:])
