"""The benchmarks' byte models (GB/s and % of copy are computed from them): each must equal the
bytes of the real inputs an op reads and the outputs it writes, counted here from tensors, and the
realistic "full" sizes must be what RESULTS.md says they are."""

from __future__ import annotations

import torch

from benchmarks import bench_varlen, bench_visual_tokens
from tsparse.ops import fuse_tokens, gather_tokens, pack_batch, pack_varlen, scatter_tokens, select_visual_tokens, unpack_varlen


def test_varlen_byte_models_match_the_tensors_an_op_touches():
    b, l, h, c = 4, 300, 16, 4
    mask, keep, ids, pos, x = bench_varlen.make_batch("cpu", batch=b, seqlen=l, hidden=h, image=64)
    kept = mask.bool() & keep
    nnz = int(kept.sum())
    e = x.element_size()
    out = pack_batch(ids, mask, pos, keep=keep, inputs_embeds=x)
    _, inverse, *_ = torch.ops.tsparse.varlen_pack(mask, keep, out.cu_seqlens, nnz, ids, pos)
    reads = mask.nbytes + keep.nbytes + ids[kept].nbytes + pos[:, kept].nbytes + x[kept].nbytes
    writes = (out.input_ids.nbytes + out.labels.nbytes + out.position_ids.nbytes + out.indices.nbytes
              + out.inputs_embeds.nbytes + inverse.nbytes)
    model = bench_varlen.byte_model("micro-batch", b=b, l=l, nnz=nnz, h=h, e=e, channels=c,
                                    mask_bytes=mask.element_size())
    assert model == reads + writes
    no_hidden = bench_varlen.byte_model("micro-batch", b=b, l=l, nnz=nnz, h=0, channels=c, mask_bytes=8)
    assert no_hidden == reads + writes - x[kept].nbytes - out.inputs_embeds.nbytes

    p = pack_varlen(x, mask, keep=keep)
    assert bench_varlen.byte_model("pack hidden", b=b, l=l, nnz=nnz, h=h, e=e) == x[kept].nbytes + p.values.nbytes
    dense = unpack_varlen(p.values, p.indices, b, l)
    assert bench_varlen.byte_model("unpack hidden", b=b, l=l, nnz=nnz, h=h, e=e) == p.values.nbytes + dense.nbytes
    assert bench_varlen.byte_model("pack backward", b=b, l=l, nnz=nnz, h=h, e=e) == p.values.nbytes + x.nbytes


def test_the_full_varlen_micro_batch_moves_gigabytes_not_the_anchor_example():
    # B = 64, L = 4096, H = 3584 bf16: the benchmark's "full" size (masks only: no 1.9 GB tensor here)
    cfg = bench_varlen.SIZES["full"]
    mask, keep = bench_varlen.make_masks(torch.Generator().manual_seed(0), cfg["batch"], cfg["seqlen"], cfg["image"])
    nnz = int((mask.bool() & keep).sum())
    assert nnz == 166_111
    pack = bench_varlen.byte_model("pack hidden", b=64, l=4096, nnz=nnz, h=cfg["hidden"], e=2)
    assert 2.35e9 < pack < 2.42e9  # ~10x the anchors' 235 MB (one 16k x 3584 bf16 hidden state)
    batch = bench_varlen.byte_model("micro-batch", b=64, l=4096, nnz=nnz, h=cfg["hidden"], e=2, channels=4)
    assert batch - pack == nnz * 96 + 64 * 4096 * 13  # ids / labels / indices / 4 position rows, masks, inverse


def test_visual_token_byte_models_match_the_tensors_an_op_touches():
    grid, boxes, offsets, x = bench_visual_tokens.make_inputs("cpu", images=3, side=16, hidden=24)
    n, d = x.shape
    e = x.element_size()
    sel = select_visual_tokens(x, boxes, offsets, grid, fuse=False)
    idx = sel.index
    m = idx.numel()
    model = lambda op, k=m: bench_visual_tokens.BYTE_MODELS[op](n, m, k, d, e)  # noqa: E731
    y = gather_tokens(x, idx)
    assert model("gather fwd") == x[idx].nbytes + y.nbytes
    assert model("select fuse=False") == x[idx].nbytes + sel.embeds.nbytes
    assert model("gather bwd") == y.nbytes + x.nbytes  # the gradient of y read, a dense [N, D] written
    s = scatter_tokens(y, idx, n, fill=x)
    not_scattered = torch.ones(n, dtype=torch.bool)
    not_scattered[idx] = False
    assert model("scatter fwd") == y.nbytes + x[not_scattered].nbytes + s.nbytes
    assert model("scatter zeros") == y.nbytes + s.nbytes
    keep = torch.zeros(n, dtype=torch.bool)
    keep[idx] = True
    token_offsets = [i * n // 3 for i in range(4)]
    fused, _ = fuse_tokens(x, keep, token_offsets)
    k = fused.shape[0]
    assert model("fuse fwd", k) == x.nbytes + fused.nbytes
    assert model("fuse bwd", k) == fused.nbytes + x.nbytes
    sel_f = select_visual_tokens(x, boxes, offsets, grid, fuse=True)
    assert model("select fuse=True") == x.nbytes + sel_f.embeds.nbytes
