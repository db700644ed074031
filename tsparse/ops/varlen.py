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
attention only needs one); ``total`` must be exact - on CUDA a wrong ``total`` aborts the kernel
with a device-side error, on the CPU it raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _library  # noqa: F401  (loads the torch.ops.tsparse schemas)
from .._nvtx import annotate
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
    b = attention_mask.shape[0]
    return (attention_mask.new_empty((b,), dtype=torch.int32), attention_mask.new_empty((b + 1,), dtype=torch.int32))


@torch.library.register_fake("tsparse::varlen_pack")
def _varlen_pack_fake(attention_mask, keep, cu_seqlens, total, input_ids, position_ids):
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
def _check_mask(attention_mask, keep):
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"tsparse.pack_varlen: `attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"tsparse.pack_varlen: `attention_mask` must be 2-D [B, L], got shape {tuple(attention_mask.shape)}")
    if keep is not None and not isinstance(keep, Tensor):
        raise TypeError(f"tsparse.pack_varlen: `keep` must be a bool tensor or None, got {type(keep).__name__}")


def _plan(attention_mask: Tensor, keep: Optional[Tensor], total: Optional[int], max_seqlen: Optional[int]):
    _check_mask(attention_mask, keep)
    seqlens, cu_seqlens = _ops.varlen_seqlens(attention_mask, keep)
    if total is None or max_seqlen is None:
        # The one device->host copy: the packed length and the longest row together.
        if seqlens.numel():
            pair = torch.stack([cu_seqlens[-1], seqlens.max()]).tolist()
        else:
            pair = [0, 0]
        total = pair[0] if total is None else total
        max_seqlen = pair[1] if max_seqlen is None else max_seqlen
    if not isinstance(total, int) or isinstance(total, bool):
        raise TypeError(f"tsparse.pack_varlen: `total` must be an int or None, got {type(total).__name__}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"tsparse.pack_varlen: `max_seqlen` must be a non-negative int or None, got {max_seqlen!r}")
    return seqlens, cu_seqlens, int(total), int(max_seqlen)


def _flat_rows(x: Tensor, b: int, l: int, op: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"tsparse.{op}: `x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] != b or x.shape[1] != l:
        raise ValueError(f"tsparse.{op}: `x` must have shape [B, L, ...] with [B, L] = [{b}, {l}], got {tuple(x.shape)}")
    return x.reshape(b * l, math.prod(x.shape[2:]))


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
        max_seqlen: the longest kept row, or an upper bound, if known on the host.

    Returns a :class:`Packed`. ``values`` is differentiable (float ``x``); its backward is ONE
    kernel writing every row of the ``[B, L, ...]`` gradient (the packed row or zeros).
    Syncs: none with ``total`` and ``max_seqlen`` given; otherwise exactly one.
    """
    seqlens, cu_seqlens, total, max_seqlen = _plan(attention_mask, keep, total, max_seqlen)
    b, l = attention_mask.shape
    rows = _flat_rows(x, b, l, "pack_varlen")
    indices, inverse, _, _, _ = _ops.varlen_pack(attention_mask, keep, cu_seqlens, total, None, None)
    values = _ops.varlen_gather(rows, indices, inverse, False)  # varlen_pack's own maps: no value check
    return Packed(values.reshape(total, *x.shape[2:]), indices, cu_seqlens, max_seqlen, seqlens)


@annotate("unpack_varlen")
def unpack_varlen(values: Tensor, indices: Tensor, batch: int, seqlen: int, *, fill=0) -> Tensor:
    """The inverse of :func:`pack_varlen`: ``[nnz, ...]`` back to ``[batch, seqlen, ...]``.

    Positions not in ``indices`` get ``fill`` (a number, default 0, e.g. ``-100`` for labels or a
    pad id). ``indices`` must be unique and in ``[0, batch * seqlen)`` (as :func:`pack_varlen`
    returns them). One kernel writes every output row once. Differentiable in ``values``.
    No host sync.
    """
    op = "unpack_varlen"
    if not isinstance(values, Tensor):
        raise TypeError(f"tsparse.{op}: `values` must be a torch.Tensor, got {type(values).__name__}")
    if not isinstance(indices, Tensor):
        raise TypeError(f"tsparse.{op}: `indices` must be a torch.Tensor, got {type(indices).__name__}")
    if values.dim() < 1 or indices.dim() != 1 or values.shape[0] != indices.shape[0]:
        raise ValueError(
            f"tsparse.{op}: `values` [nnz, ...] and `indices` [nnz] must agree, got {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    for name, v in (("batch", batch), ("seqlen", seqlen)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"tsparse.{op}: `{name}` must be a non-negative int, got {v!r}")
    trailing = values.shape[1:]
    rows = values.reshape(values.shape[0], math.prod(trailing))
    n = batch * seqlen
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
    if not isinstance(position_ids, Tensor) or not isinstance(indices, Tensor):
        raise TypeError(f"tsparse.{op}: `position_ids` and `indices` must be tensors")
    if position_ids.dim() not in (2, 3):
        raise ValueError(f"tsparse.{op}: `position_ids` must be [B, L] or [C, B, L], got {tuple(position_ids.shape)}")
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tsparse.{op}: `indices` must be a 1-D int32/int64 tensor")
    flat = position_ids.dim() == 2
    rows = position_ids.reshape(1 if flat else position_ids.shape[0], math.prod(position_ids.shape[-2:]))
    # Position ids are a few int64 rows: gather them as [B*L, C] rows with the row kernel.
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
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"tsparse.pack_batch: `input_ids` must be a torch.Tensor, got {type(input_ids).__name__}")
    seqlens, cu_seqlens, total, max_seqlen = _plan(attention_mask, keep, total, max_seqlen)
    b, l = attention_mask.shape
    indices, inverse, ids, labels, pos = _ops.varlen_pack(
        attention_mask, keep, cu_seqlens, total, input_ids, position_ids
    )
    packed_pos = None
    if position_ids is not None:
        packed_pos = pos if position_ids.dim() == 2 else pos.unsqueeze(1)
    embeds = None
    if inputs_embeds is not None:
        rows = _flat_rows(inputs_embeds, b, l, "pack_batch")
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
    if unused_mask is not None:
        selected = attention_mask.bool() | unused_mask.bool()
        seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    else:
        selected = attention_mask
        seqused = None
    p = pack_varlen(hidden_states, selected)
    return p.values, p.indices, p.cu_seqlens, p.max_seqlen, (p.seqlens if seqused is None else seqused)


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Drop-in for ``flash_attn.bert_padding.pad_input``: ``(total_nnz, ...)`` ->
    ``(batch, seqlen, ...)`` with zeros where no row was given. No host sync."""
    return unpack_varlen(hidden_states, indices, batch, seqlen)


def index_first_axis(input: Tensor, indices: Tensor) -> Tensor:  # noqa: A002 (flash-attn's name)
    """Drop-in for ``flash_attn.bert_padding.index_first_axis``: ``input[indices]`` along the first
    axis of a tensor with at least 2 dims; the backward writes the dense gradient in one kernel.
    ``indices`` must be unique (as ``unpad_input`` returns them). No host sync."""
    if not isinstance(input, Tensor) or input.dim() < 2:
        raise ValueError("tsparse.index_first_axis: `input` must be a tensor with at least 2 dims")
    rows = input.reshape(input.shape[0], math.prod(input.shape[1:]))
    return gather_tokens(rows, indices).reshape(indices.shape[0], *input.shape[1:])
