"""Tests of variable-length packing against pure-PyTorch references (tsparse/reference.py) and
against flash_attn.bert_padding's documented contract (written here, flash-attn not imported)."""

from __future__ import annotations

import random

import pytest
import torch
from torch.autograd import gradcheck

from tsparse import reference as ref
from tsparse.ops import pack_batch, pack_position_ids, pack_varlen, unpack_varlen
from tsparse.ops import varlen

PADDINGS = ["left", "right", "mixed", "empty_rows", "all_padding", "none"]


def random_mask(b: int, l: int, kind: str, dtype=torch.int64) -> torch.Tensor:
    m = torch.zeros(b, l, dtype=torch.bool)
    for i in range(b):
        n = random.randint(0, l)
        if kind == "left":
            m[i, l - n :] = True
        elif kind == "right":
            m[i, :n] = True
        elif kind == "mixed":
            m[i] = torch.rand(l) < 0.7
        elif kind == "empty_rows":
            if i % 2 == 0:
                m[i, : random.randint(0, l)] = True
        elif kind == "none":
            m[i] = True
    return m.to(dtype)


def random_keep(mask: torch.Tensor, whole_images: bool = False) -> torch.Tensor:
    """Drops runs of "visual tokens" inside the attended region (never a row's first token)."""
    b, l = mask.shape
    keep = torch.ones(b, l, dtype=torch.bool)
    for i in range(b):
        cols = mask[i].nonzero().reshape(-1).tolist()
        if len(cols) < 3:
            continue
        start = random.randint(1, len(cols) - 2)
        end = random.randint(start + 1, len(cols))
        span = cols[start:end]
        if whole_images:
            keep[i, span] = False
        else:
            keep[i, span] = torch.rand(len(span)) < 0.77
    return keep


def _values(b, l, trailing, dtype, device):
    if dtype == torch.int64:
        return torch.randint(0, 152064, (b, l, *trailing), device=device)
    return torch.randn(b, l, *trailing, device=device).to(dtype)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
@pytest.mark.parametrize("trailing", [(), (5,), (3, 4)])
def test_pack_unpack_matches_reference(device, padding, dtype, trailing):
    for use_keep in (False, True):
        b, l = random.randint(1, 6), random.randint(1, 37)
        mask = random_mask(b, l, padding).to(device)
        keep = random_keep(mask.cpu(), whole_images=random.random() < 0.5).to(device) if use_keep else None
        x = _values(b, l, trailing, dtype, device)
        p = pack_varlen(x, mask, keep=keep)
        v_ref, idx_ref, cu_ref, max_ref, seq_ref = ref.pack_varlen_ref(x, mask, keep)
        assert torch.equal(p.values, v_ref)
        assert torch.equal(p.indices, idx_ref) and p.indices.dtype == torch.int64
        assert torch.equal(p.cu_seqlens, cu_ref) and p.cu_seqlens.dtype == torch.int32
        assert torch.equal(p.seqlens, seq_ref) and p.seqlens.dtype == torch.int32
        assert p.max_seqlen == max_ref and isinstance(p.max_seqlen, int)
        # Round trip: unpack(pack(x)) == x where kept, fill elsewhere.
        kept = mask.bool() if keep is None else mask.bool() & keep
        fill = -7 if dtype == torch.int64 else 0.5
        back = unpack_varlen(p.values, p.indices, b, l, fill=fill)
        expect = torch.where(kept.reshape(b, l, *([1] * len(trailing))), x, torch.full_like(x, fill))
        assert torch.equal(back, expect)
        assert torch.equal(back, ref.unpack_varlen_ref(p.values, p.indices, b, l, fill))


def test_pack_b1_l1_and_all_padding(device):
    x = torch.randn(1, 1, 4, device=device)
    p = pack_varlen(x, torch.ones(1, 1, dtype=torch.bool, device=device))
    assert torch.equal(p.values, x[0]) and p.cu_seqlens.tolist() == [0, 1] and p.max_seqlen == 1
    p = pack_varlen(x, torch.zeros(1, 1, dtype=torch.bool, device=device))
    assert p.values.shape == (0, 4) and p.cu_seqlens.tolist() == [0, 0] and p.max_seqlen == 0
    x = torch.randn(3, 9, device=device)
    p = pack_varlen(x, torch.zeros(3, 9, dtype=torch.int32, device=device))
    assert p.values.shape == (0,) and p.cu_seqlens.tolist() == [0, 0, 0, 0]
    assert unpack_varlen(p.values, p.indices, 3, 9).abs().sum() == 0
    p = pack_varlen(torch.zeros(0, 5, device=device), torch.zeros(0, 5, dtype=torch.bool, device=device))
    assert p.values.shape == (0,) and p.cu_seqlens.tolist() == [0]


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32])
def test_mask_dtypes(device, mask_dtype):
    mask = random_mask(4, 20, "mixed").to(device)
    x = torch.randn(4, 20, 8, device=device)
    p = pack_varlen(x, mask.to(mask_dtype))
    assert torch.equal(p.values, ref.pack_varlen_ref(x, mask)[0])


def test_given_total_and_max_seqlen(device):
    mask = random_mask(5, 30, "mixed").to(device)
    x = torch.randn(5, 30, 6, device=device)
    n, longest = int(mask.sum()), int(mask.sum(1).max())
    p = pack_varlen(x, mask, total=n, max_seqlen=longest + 3)  # an upper bound is allowed
    assert torch.equal(p.values, ref.pack_varlen_ref(x, mask)[0]) and p.max_seqlen == longest + 3


def test_wrong_total_raises_on_cpu():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="total"):
        pack_varlen(torch.randn(2, 3), mask, total=5, max_seqlen=3)
    with pytest.raises(ValueError, match="total"):
        pack_varlen(torch.randn(2, 3), mask, total=7, max_seqlen=3)  # more than B * L


@pytest.mark.parametrize("cu", [[-4, -2, 2], [0, 1, 4], [0, 3, 4], [1, 3, 4]])
def test_inconsistent_cu_seqlens_raise_on_cpu(cu):
    # The raw op trusts no caller: a cu_seqlens that disagrees with the masks is an error, never
    # a write outside the outputs (the CUDA kernel traps on the same inputs: test_varlen_cuda.py).
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="cu_seqlens|total"):
        torch.ops.tsparse.varlen_pack(mask, None, torch.tensor(cu, dtype=torch.int32), cu[-1], None, None)


@pytest.mark.parametrize("inverse", [[1, 0, -1, -1], [0, 1, 1, -1], [-1, 0, -1, -1], [0, 1, 2, -1]])
def test_varlen_gather_rejects_an_inverse_that_does_not_invert_indices(inverse):
    # The backward scatters by `inverse`: a wrong one would silently misplace gradients.
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="inverse"):
        torch.ops.tsparse.varlen_gather(x, torch.tensor([0, 1]), torch.tensor(inverse, dtype=torch.int32))
    y = torch.ops.tsparse.varlen_gather(x, torch.tensor([2, 0]), torch.tensor([1, -1, 0, -1], dtype=torch.int32))
    assert torch.equal(y, x[[2, 0]])


def test_pack_gradcheck(device):
    mask = random_mask(3, 7, "mixed").to(device)
    keep = random_keep(mask.cpu()).to(device)
    x = torch.randn(3, 7, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(lambda t: pack_varlen(t, mask, keep=keep).values, (x,))
    p = pack_varlen(x.detach(), mask, keep=keep)
    v = p.values.clone().requires_grad_()
    assert gradcheck(lambda t: unpack_varlen(t, p.indices, 3, 7, fill=2.0), (v,))


def test_pack_backward_is_zero_outside_kept(device):
    mask = random_mask(4, 16, "left").to(device)
    x = torch.randn(4, 16, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
    p = pack_varlen(x, mask)
    g = torch.randn_like(p.values)
    (gx,) = torch.autograd.grad(p.values, x, g)
    (gx_ref,) = torch.autograd.grad(ref.pack_varlen_ref(x, mask)[0], x, g)
    assert torch.equal(gx, gx_ref)


@pytest.mark.parametrize("channels", [None, 3, 4])
@pytest.mark.parametrize("padding", ["left", "right", "mixed"])
def test_pack_batch_matches_verl_style_reference(device, channels, padding):
    b, l = random.randint(1, 6), random.randint(2, 40)
    mask = random_mask(b, l, padding).to(device)
    keep = random_keep(mask.cpu()).to(device)
    ids = torch.randint(0, 152064, (b, l), device=device)
    if channels is None:
        pos = torch.randint(0, 100, (b, l), device=device)
    else:
        pos = torch.randint(0, 100, (channels, b, l), device=device)
    emb = torch.randn(b, l, 16, device=device, dtype=torch.bfloat16)
    out = pack_batch(ids, mask, pos, keep=keep, inputs_embeds=emb)
    ids_r, pos_r, labels_r, idx_r, cu_r = ref.pack_batch_ref(ids, mask, pos, keep)
    assert torch.equal(out.input_ids, ids_r)
    assert torch.equal(out.labels, labels_r)
    assert torch.equal(out.position_ids, pos_r)
    assert torch.equal(out.indices, idx_r) and torch.equal(out.cu_seqlens, cu_r)
    assert torch.equal(out.inputs_embeds, ref.pack_varlen_ref(emb, mask, keep)[0].unsqueeze(0))
    assert torch.equal(pack_position_ids(pos, out.indices), pos_r)


def test_pack_batch_cu_seqlens_survive_position_derivation(device):
    """verl re-derives cu_seqlens inside Qwen2.5-VL attention from the packed positions
    (`position_ids[0] == 0` starts a sequence). With pruned visual tokens, each sequence's first
    kept token still has position 0, so that derivation must agree with our cu_seqlens - also
    when the first token of a row is followed directly by pruned image tokens and when a row
    keeps a single token."""
    b, l = 5, 24
    mask = torch.zeros(b, l, dtype=torch.int64)
    mask[0, 3:] = 1  # left padding
    mask[1, :17] = 1  # right padding
    mask[2, 5:6] = 1  # a single token
    mask[3, :] = 1
    mask[4, 2:20] = 1
    keep = torch.ones(b, l, dtype=torch.bool)
    keep[0, 4:12] = False  # an image right after the row's first token, pruned
    keep[3, 1:23] = False  # nearly everything pruned
    keep[4, 10:14] = False
    # verl 0.9.1: 4 rows, text positions first (0..n-1 over attended tokens), then M-RoPE t/h/w.
    text = (mask.cumsum(1) - 1).clamp_min(0) * mask
    mrope = torch.stack([text, text + 1, text + 2])  # any values; row 0 is what verl reads
    pos = torch.cat([text.unsqueeze(0), mrope]).to(device)
    out = pack_batch(torch.randint(0, 100, (b, l)).to(device), mask.to(device), pos, keep=keep.to(device))
    derived = ref.cu_seqlens_from_position_ids(out.position_ids)
    assert torch.equal(derived, out.cu_seqlens)
    # The first kept token of every row has position 0 (and no other token does).
    starts = out.cu_seqlens[:-1].long()
    assert (out.position_ids[0, 0, starts] == 0).all()
    assert int((out.position_ids[0, 0] == 0).sum()) == b


def test_pack_position_ids_shapes(device):
    mask = random_mask(3, 10, "mixed").to(device)
    p = pack_varlen(torch.zeros(3, 10, device=device), mask)
    pos3 = torch.randint(0, 50, (3, 3, 10), device=device)
    assert pack_position_ids(pos3, p.indices).shape == (3, 1, p.indices.numel())
    pos2 = torch.randint(0, 50, (3, 10), device=device)
    assert torch.equal(pack_position_ids(pos2, p.indices), pos2.reshape(1, -1)[:, p.indices])


# --------------------------------------------------------------------------------------
# flash_attn.bert_padding contract (from its documentation):
#   unpad_input(hidden_states (b, s, ...), attention_mask (b, s), unused_mask=None) ->
#     (hidden_states (total_nnz, ...), indices (total_nnz,), cu_seqlens (b + 1,) int32,
#      max_seqlen_in_batch: int, seqused (b,) int32)
#     total_nnz counts attention_mask + unused_mask; indices index the flattened (b * s);
#     seqused counts attention_mask only.
#   pad_input(hidden_states (total_nnz, ...), indices, batch, seqlen) -> (batch, seqlen, ...)
#   index_first_axis(input (n, ...), indices) -> input[indices]
def test_unpad_input_contract(device):
    b, s, h, d = 4, 13, 2, 8
    mask = random_mask(b, s, "mixed").to(device)
    x = torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16)
    out = varlen.unpad_input(x, mask)
    assert isinstance(out, tuple) and len(out) == 5
    hs, indices, cu, max_len, seqused = out
    flat = mask.flatten().nonzero().flatten()
    assert hs.shape == (int(mask.sum()), h, d) and hs.dtype == x.dtype
    assert torch.equal(indices, flat) and indices.dtype == torch.int64
    assert cu.dtype == torch.int32 and cu.shape == (b + 1,)
    assert torch.equal(cu, torch.nn.functional.pad(mask.sum(-1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)))
    assert isinstance(max_len, int) and max_len == int(mask.sum(-1).max())
    assert torch.equal(seqused, mask.sum(-1, dtype=torch.int32))
    assert torch.equal(hs, x.reshape(b * s, h, d)[flat])


def test_unpad_input_unused_mask(device):
    b, s = 3, 10
    mask = torch.zeros(b, s, dtype=torch.int64)
    unused = torch.zeros(b, s, dtype=torch.int64)
    mask[:, :4] = 1
    unused[:, 4:6] = 1
    x = torch.randn(b, s, 5, device=device)
    hs, indices, cu, max_len, seqused = varlen.unpad_input(x, mask.to(device), unused.to(device))
    assert hs.shape == (b * 6, 5) and cu.tolist() == [0, 6, 12, 18] and max_len == 6
    assert seqused.tolist() == [4, 4, 4] and seqused.dtype == torch.int32


def test_pad_input_and_index_first_axis_contract(device):
    b, s = 3, 7
    mask = random_mask(b, s, "right").to(device)
    x = torch.randn(b, s, 6, device=device, requires_grad=True)
    hs, indices, cu, max_len, _ = varlen.unpad_input(x, mask)
    padded = varlen.pad_input(hs, indices, b, s)
    assert padded.shape == (b, s, 6)
    assert torch.equal(padded, x.detach() * mask.unsqueeze(-1).to(x.dtype))
    picked = varlen.index_first_axis(x.reshape(b * s, 6), indices)
    assert torch.equal(picked, hs)
    picked.sum().backward()
    assert torch.equal(x.grad, mask.unsqueeze(-1).expand(b, s, 6).to(x.dtype))
    with pytest.raises(ValueError, match="input"):
        varlen.index_first_axis(torch.randn(5, device=device), indices[:1])


# --------------------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="attention_mask"):
        pack_varlen(x, torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        pack_varlen(x, [[1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="`x`"):
        pack_varlen(torch.randn(3, 3), torch.ones(2, 3))
    with pytest.raises(TypeError, match="keep"):
        pack_varlen(x, torch.ones(2, 3), keep=torch.ones(2, 3))
    with pytest.raises(ValueError, match="keep"):
        pack_varlen(x, torch.ones(2, 3), keep=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="input_ids"):
        pack_batch(torch.randn(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="position_ids"):
        pack_batch(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(3, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        unpack_varlen(torch.randn(2, 4), torch.tensor([0, 1]), -1, 3)
    with pytest.raises(ValueError, match="values"):
        unpack_varlen(torch.randn(3, 4), torch.tensor([0, 1]), 1, 3)
    with pytest.raises(IndexError, match="unpack_varlen: `indices`"):  # the caller's name, not the kernel's
        unpack_varlen(torch.randn(2, 4), torch.tensor([0, 9]), 2, 3)


def test_opcheck_varlen_ops(device):
    mask = random_mask(3, 9, "mixed").to(device)
    keep = random_keep(mask.cpu()).to(device)
    seqlens, cu = torch.ops.tsparse.varlen_seqlens(mask, keep)
    total = int(cu[-1])
    ids = torch.randint(0, 100, (3, 9), device=device)
    pos = torch.randint(0, 100, (4, 3, 9), device=device)
    indices, inverse, *_ = torch.ops.tsparse.varlen_pack(mask, keep, cu, total, ids, pos)
    x = torch.randn(27, 5, device=device, dtype=torch.float64, requires_grad=True)
    for op, args in [
        (torch.ops.tsparse.varlen_seqlens.default, (mask, keep)),
        (torch.ops.tsparse.varlen_seqlens.default, (mask.bool(), None)),
        (torch.ops.tsparse.varlen_pack.default, (mask, keep, cu, total, ids, pos)),
        (torch.ops.tsparse.varlen_pack.default, (mask, keep, cu, total, None, None)),
        (torch.ops.tsparse.varlen_gather.default, (x, indices, inverse)),
        (torch.ops.tsparse.varlen_gather.default, (x, indices, inverse, False)),
    ]:
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------
# Issue 12 step 4: the CUDA pack runs one block per (row, chunk of 512 tokens) and holds up to 4
# position rows in registers (more take a fallback loop); both backends must agree with the
# reference across chunk boundaries.
@pytest.mark.parametrize("l", [511, 512, 513, 1100])
@pytest.mark.parametrize("channels", [1, 4, 5])
def test_pack_batch_across_chunks_matches_reference(device, l, channels):
    b = 3
    mask = random_mask(b, l, "mixed").to(device)
    mask[0] = 1  # a full row: every chunk of it holds kept tokens
    keep = random_keep(mask.cpu()).to(device)
    ids = torch.randint(0, 152064, (b, l), device=device)
    pos = torch.randint(0, 4096, (channels, b, l), device=device)
    out = pack_batch(ids, mask, pos, keep=keep)
    ids_r, pos_r, labels_r, idx_r, cu_r = ref.pack_batch_ref(ids, mask, pos, keep)
    assert torch.equal(out.input_ids, ids_r) and torch.equal(out.labels, labels_r)
    assert torch.equal(out.position_ids, pos_r)
    assert torch.equal(out.indices, idx_r) and torch.equal(out.cu_seqlens, cu_r)
    total = out.input_ids.shape[1]
    indices, inverse, *_ = torch.ops.tsparse.varlen_pack(mask, keep, out.cu_seqlens, total, None, None)
    expect = torch.full((b * l,), -1, dtype=torch.int32)
    expect[idx_r.cpu()] = torch.arange(total, dtype=torch.int32)
    assert torch.equal(indices, idx_r) and torch.equal(inverse.cpu(), expect)


def test_varlen_gather_checks_only_a_callers_inverse():
    # The raw op checks the values of a caller's `inverse` by default; pack_varlen / pack_batch
    # pass varlen_pack's own (correct by construction) with check_inverse=False, which keeps the
    # shape / dtype / device checks only.
    x = torch.randn(4, 2)
    idx = torch.tensor([0, 1])
    wrong = torch.tensor([1, 0, -1, -1], dtype=torch.int32)
    with pytest.raises(ValueError, match="inverse"):
        torch.ops.tsparse.varlen_gather(x, idx, wrong)
    assert torch.equal(torch.ops.tsparse.varlen_gather(x, idx, wrong, False), x[[0, 1]])
    with pytest.raises(ValueError, match="inverse"):
        torch.ops.tsparse.varlen_gather(x, idx, torch.tensor([0, 1, -1], dtype=torch.int32), False)


def test_pack_varlen_does_not_recheck_its_own_inverse():
    # The value check is a handful of [B * L] / [nnz] ops (index_select, eq, ge, sum, all,
    # logical_and); pack_varlen's own maps skip it.
    mask = random_mask(4, 50, "mixed")
    x = torch.randn(4, 50, 8, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pack_varlen(x, mask)
    names = {e.name for e in prof.events()}
    assert "tsparse::varlen_gather" in names and "aten::logical_and" not in names
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        indices, inverse, *_ = torch.ops.tsparse.varlen_pack(mask, None, *torch.ops.tsparse.varlen_seqlens(mask, None)[1:],
                                                             int(mask.sum()), None, None)
        torch.ops.tsparse.varlen_gather(x.detach().reshape(200, 8), indices, inverse)
    assert "aten::logical_and" in {e.name for e in prof.events()}  # the raw op's default does check
