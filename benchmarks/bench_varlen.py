"""Benchmarks of variable-length packing against the reference path verl uses today
(flash_attn.bert_padding / verl's fallback: nonzero + gather; pad via zeros + index_put).

Sizes ("full", the default on a GPU): a verl-like micro-batch of B = 64 sequences of L = 4096,
hidden 3584 bf16, 20-40% right padding per row, a 1296-token image per row with 23% of its
tokens pruned (`keep`): nnz = 166,111 kept tokens, so one pack of the hidden states moves
2.38 GB (read + write) - ten times the 235 MB of the anchors' 16k-token example: compare rates
(GB/s, % of copy), not times. "cpu": B = 8, L = 2048. Byte models (byte_model() below; checked
against real tensors by python_tests/test_bench_models.py):
  pack hidden      read nnz*H*e + write nnz*H*e
  unpack hidden    read nnz*H*e + write B*L*H*e
  pack backward    read nnz*H*e + write B*L*H*e
  micro-batch      the hidden pack, plus per kept token: read its id and C position ids, write its
                   id, label, index and C positions (8 B each); plus per padded slot: read the
                   mask and keep, write the inverse map (4 B)
`syncs` (GPU only) counts device->host synchronizations of one call (torch sync debug mode).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tsparse import reference as ref
from tsparse.ops import pack_batch, pack_varlen, unpack_varlen

from .common import Row, Timer, compiled, count_host_syncs

SIZES = {
    "full": dict(batch=64, seqlen=4096, hidden=3584, image=1296),
    "cpu": dict(batch=8, seqlen=2048, hidden=3584, image=1296),
    "tiny": dict(batch=4, seqlen=256, hidden=64, image=64),
}


def make_masks(g: torch.Generator, batch: int, seqlen: int, image: int):
    """The attention mask (20-40% right padding) and the keep mask (23% of a 1296-token image
    pruned) of a micro-batch, drawn first from `g` (make_batch goes on with the same generator)."""
    pad = (torch.rand(batch, generator=g) * 0.2 + 0.2) * seqlen  # 20-40% padding
    lengths = (seqlen - pad).long()
    ar = torch.arange(seqlen)
    mask = (ar[None, :] < lengths[:, None]).long()
    keep = torch.ones(batch, seqlen, dtype=torch.bool)
    img_start = 16
    img_end = min(img_start + image, seqlen)
    keep[:, img_start:img_end] = torch.rand(batch, img_end - img_start, generator=g) >= 0.23
    return mask, keep


def make_batch(device, batch: int, seqlen: int, hidden: int, image: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask, keep = make_masks(g, batch, seqlen, image)
    ids = torch.randint(0, 152064, (batch, seqlen), generator=g)
    text = (mask.cumsum(1) - 1).clamp_min(0) * mask
    pos = torch.stack([text, text, text, text])
    x = torch.randn(batch, seqlen, hidden, generator=g).to(torch.bfloat16)
    to = lambda t: t.to(device)  # noqa: E731
    return to(mask), to(keep), to(ids), to(pos), to(x)


def byte_model(op: str, *, b: int, l: int, nnz: int, h: int = 0, e: int = 2, channels: int = 0,
               mask_bytes: int = 8, keep_bytes: int = 1) -> int:
    """Bytes an op must move (see the module docstring)."""
    if op == "pack hidden":
        return 2 * nnz * h * e
    if op in ("unpack hidden", "pack backward"):
        return nnz * h * e + b * l * h * e
    if op == "micro-batch":  # everything pack_batch reads and writes, hidden included when h > 0
        per_token = 8 * (1 + channels) + 8 * (3 + channels)  # read id + C pos; write id, label, index, C pos
        per_slot = mask_bytes + keep_bytes + 4  # read mask + keep, write inverse (int32)
        return 2 * nnz * h * e + nnz * per_token + b * l * per_slot
    raise KeyError(op)


def count_syncs(device: torch.device, fn: Callable[[], object]):
    """Host syncs of ``fn`` on a GPU; ``None`` on the CPU (nothing to count)."""
    return count_host_syncs(fn) if device.type == "cuda" else None


def _verl_style_pack(ids, mask, pos, x, keep):
    """What verl's remove-padding path does, with the kept set folded into the mask."""
    m = mask.bool() & keep
    idx = torch.nonzero(m.flatten(), as_tuple=False).flatten()
    _ = m.sum(-1, dtype=torch.int32).max().item()  # max_seqlen_in_batch
    b, l = m.shape
    ids_p = ids.reshape(-1)[idx].unsqueeze(0)
    labels = torch.roll(ids_p, shifts=-1, dims=1)
    pos_p = pos.reshape(pos.shape[0], -1)[:, idx].unsqueeze(1)
    hid = x.reshape(b * l, -1)[idx]
    return ids_p, labels, pos_p, hid


def run(device: torch.device, size: str, timer: Timer, log: Callable[[str], None] = print,
        rows_out: Optional[list] = None) -> list[Row]:
    """The family's rows; appended to ``rows_out`` as they are measured when it is given, so a
    run interrupted mid-family (a phase deadline of profiling/device_check.sh) keeps them."""
    cfg = SIZES[size]
    device = torch.device(device)
    mask, keep, ids, pos, x = make_batch(device, **cfg)
    b, l, h = x.shape
    e = x.element_size()
    kept = mask.bool() & keep
    total, longest = int(kept.sum()), int(kept.sum(1).max())
    dt = "bfloat16"
    shape = f"B={b} L={l} H={h} nnz={total}"
    rows: list[Row] = rows_out if rows_out is not None else []

    # pack hidden states (no sync: total and max_seqlen known on the host)
    ours = lambda: pack_varlen(x, mask, keep=keep, total=total, max_seqlen=longest)  # noqa: E731
    base = lambda: ref.pack_varlen_ref(x, mask, keep)  # noqa: E731
    t_o, t_b = timer(ours), timer(base)
    syncs = (count_syncs(device, ours), count_syncs(device, base))
    gb_pack = byte_model("pack hidden", b=b, l=l, nnz=total, h=h, e=e) / 1e9
    rows.append(Row("pack_varlen hidden", shape, dt, t_o["median_ms"], "nonzero + gather", t_b["median_ms"],
                    gbytes=gb_pack, note=_syncs_note(syncs)))
    t_o1 = timer(lambda: pack_varlen(x, mask, keep=keep))
    rows.append(Row("pack_varlen hidden (1 sync)", shape, dt, t_o1["median_ms"], "nonzero + gather", t_b["median_ms"],
                    gbytes=gb_pack))
    log("  pack done")

    # unpack (pad) hidden states
    p = pack_varlen(x, mask, keep=keep, total=total, max_seqlen=longest)
    vals, idx = p.values.contiguous(), p.indices
    t_o = timer(lambda: unpack_varlen(vals, idx, b, l))
    t_b = timer(lambda: ref.unpack_varlen_ref(vals, idx, b, l))
    gb_unpack = byte_model("unpack hidden", b=b, l=l, nnz=total, h=h, e=e) / 1e9
    rows.append(Row("unpack_varlen hidden", shape, dt, t_o["median_ms"], "zeros + index_put", t_b["median_ms"],
                    gbytes=gb_unpack))
    cfn = compiled(lambda v, i: ref.unpack_varlen_ref(v, i, b, l), vals, idx)
    if cfn is not None:
        rows.append(Row("unpack_varlen hidden", shape, dt, t_o["median_ms"], "torch.compile zeros+index_put",
                        timer(cfn)["median_ms"], gbytes=gb_unpack))
    log("  unpack done")

    # pack backward (dense gradient in one kernel)
    xg = x.detach().requires_grad_()
    y_o = pack_varlen(xg, mask, keep=keep, total=total, max_seqlen=longest).values
    y_b = ref.pack_varlen_ref(xg, mask, keep)[0]
    g = torch.randn_like(y_o)
    t_o = timer(lambda: torch.autograd.grad(y_o, xg, g, retain_graph=True))
    t_b = timer(lambda: torch.autograd.grad(y_b, xg, g, retain_graph=True))
    rows.append(Row("pack_varlen bwd", shape, dt, t_o["median_ms"], "autograd x[idx]", t_b["median_ms"],
                    gbytes=byte_model("pack backward", b=b, l=l, nnz=total, h=h, e=e) / 1e9))
    del xg, y_o, y_b, g
    log("  backward done")

    # the whole micro-batch: ids + 4 position rows + labels + hidden
    ours = lambda: pack_batch(ids, mask, pos, keep=keep, total=total, max_seqlen=longest, inputs_embeds=x)  # noqa: E731
    base = lambda: _verl_style_pack(ids, mask, pos, x, keep)  # noqa: E731
    t_o, t_b = timer(ours), timer(base)
    syncs = (count_syncs(device, ours), count_syncs(device, base))
    streams = dict(b=b, l=l, nnz=total, channels=pos.shape[0], mask_bytes=mask.element_size())
    gb = byte_model("micro-batch", h=h, e=e, **streams) / 1e9
    rows.append(Row("pack_batch (ids+pos+labels+hidden)", shape, dt, t_o["median_ms"], "verl-style torch",
                    t_b["median_ms"], gbytes=gb, note=_syncs_note(syncs)))
    cfn = compiled(_verl_style_pack, ids, mask, pos, x, keep)
    if cfn is not None:
        rows.append(Row("pack_batch (ids+pos+labels+hidden)", shape, dt, t_o["median_ms"],
                        "torch.compile verl-style", timer(cfn)["median_ms"], gbytes=gb))
    t_o = timer(lambda: pack_batch(ids, mask, pos, keep=keep, total=total, max_seqlen=longest))
    t_b = timer(lambda: _verl_style_pack(ids, mask, pos, x[:, :, :0], keep))
    rows.append(Row("pack_batch (ids+pos+labels)", shape, "int64", t_o["median_ms"], "verl-style torch",
                    t_b["median_ms"], gbytes=byte_model("micro-batch", h=0, **streams) / 1e9))
    log("  pack_batch done")
    return rows


def _syncs_note(syncs) -> str:
    ours, base = syncs
    return "" if ours is None else f"syncs/call: tsparse {ours}, baseline {base}"
