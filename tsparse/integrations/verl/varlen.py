"""tsparse's varlen packing where verl unpads and pads (the ``varlen`` switch).

* ``unpad_input`` / ``pad_input`` / ``index_first_axis``: :mod:`tsparse.ops.varlen`'s
  ``flash_attn.bert_padding`` drop-ins (same signatures and tuples; one host sync in
  ``unpad_input`` instead of flash-attn's two, one-kernel gather / scatter backwards).
* :func:`no_padding_2_padding`: verl's response slicing of the packed model output
  (``verl/workers/utils/padding.py``; the policy loss calls it on the log-probs and entropy of
  every micro-batch). verl loops over the sequences in Python (``F.pad`` + ``torch.stack``,
  a host sync per sequence for the slice bounds); this builds the gather index on the device
  and moves the response rows with one tsparse gather and one ``unpack_varlen`` (both with
  one-kernel backwards). Host syncs: none when the batch carries verl's ``max_response_len``
  (it does after ``left_right_2_no_padding``), else one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops import gather_tokens, unpack_varlen
from ...ops.varlen import index_first_axis, pad_input, unpad_input
from .swaps import original

__all__ = ["unpad_input", "pad_input", "index_first_axis", "no_padding_2_padding"]


def no_padding_2_padding(tensor: Tensor, data) -> Tensor:
    """Drop-in for ``verl.workers.utils.padding.no_padding_2_padding``: the response part of a
    packed per-token output, ``[bsz, max_response_len, *]`` (right-padded with zeros), shifted
    left by one token (position ``t`` of the model output predicts token ``t + 1``).

    Args:
        tensor: a nested tensor ``[bsz, j, *]`` or ``[total_nnz, *]`` packed values.
        data: the micro-batch (``prompts`` and ``responses`` nested; ``max_response_len``
            optional). Non-nested batches go to verl's own implementation.

    Raises ``ValueError`` when the packed length does not match the prompts + responses; an
    empty prompt fails a device-side assert (verl asserts the same on the host).
    """
    from verl.utils import tensordict_utils as tu

    prompt_ids = data["prompts"]
    response_ids = data["responses"]
    if not (prompt_ids.is_nested and response_ids.is_nested):
        return _original_no_padding_2_padding()(tensor, data)
    values = tensor.values() if tensor.is_nested else tensor
    device = values.device
    prompt_lens = prompt_ids.offsets().diff().to(device)
    resp_off = response_ids.offsets().to(device)
    resp_lens = resp_off.diff()
    if prompt_lens.numel():
        # verl asserts the same (its slicing assumes a prompt token before each response).
        torch._assert_async((prompt_lens > 0).all(), "no_padding_2_padding: every sequence needs a prompt token")
    bsz = resp_lens.shape[0]
    total_resp = int(response_ids.values().shape[0])  # host-known: no sync
    total_tokens = int(prompt_ids.values().shape[0]) + total_resp
    if total_tokens != values.shape[0]:
        raise ValueError(
            f"no_padding_2_padding: packed output has {values.shape[0]} rows, prompts + responses have {total_tokens}"
        )
    max_response_len = tu.get_non_tensor_data(data=data, key="max_response_len", default=-1)
    if max_response_len is None or max_response_len < 0:
        max_response_len = int(resp_lens.max()) if bsz else 0  # the one host sync
    seq_end = (prompt_lens + resp_lens).cumsum(0)
    # Response token k of sequence b comes from packed row seq_end[b] - resp_len[b] - 1 + k.
    row_of = torch.repeat_interleave(torch.arange(bsz, device=device), resp_lens, output_size=total_resp)
    k = torch.arange(total_resp, device=device) - resp_off[:-1].index_select(0, row_of)
    src = (seq_end - resp_lens - 1).index_select(0, row_of) + k
    dest = row_of * max_response_len + k
    trailing = values.shape[1:]
    rows = values.reshape(values.shape[0], -1)
    picked = gather_tokens(rows, src, unique_index=True)
    out = unpack_varlen(picked, dest, bsz, max_response_len)
    return out.reshape(bsz, max_response_len, *trailing)


def _original_no_padding_2_padding():
    """verl's own function, even while the patch is installed."""
    return original("verl.workers.utils.padding", "no_padding_2_padding")
