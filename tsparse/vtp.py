"""Visual-token pruning (VTP) for Qwen2.5-VL behind one interface: tsparse's grounded pruning
and the usual baselines at a matched keep ratio.

:func:`prune_visual_tokens` turns a dense batch (processor output + the vision tower's merged
visual tokens) into the sparse stream's :class:`~tsparse.dualstream.pruning.SparseInputs` with
one of these methods (``shared/notes/anchors.md`` says where each published method prunes):

* ``"dense"`` - keeps every token (the reference every ratio is measured against).
* ``"grounded"`` - tsparse's method: the tokens inside the localization stream's boxes
  (:func:`~tsparse.dualstream.pruning.sparse_stream_inputs`: ``select_visual_tokens`` with the
  named fusion method, fallback to the full image). Its keep ratio is whatever the boxes cover.
* ``"random"`` - a uniformly random subset of each image's tokens (seeded per image).
* ``"pool"`` - uniform spatial pooling: the image's token grid cut into ``k`` near-equal blocks
  on a regular lattice; each block becomes one token (the mean of its tokens) at the position of
  its centre cell. Exactly 2 x 2 average pooling at ratio 1/4 on an even grid; any ``k`` works
  (a fixed stride only reaches ratios 1/s^2).
* ``"fastv"`` - FastV-style: tokens ranked by the attention the last prompt token pays them at an
  early decoder layer (mean over heads), top ``k`` per image. The dense prefix runs through the
  model's own decoder layers up to that layer (a forward pre-hook stops the forward there); the
  ranking layer's query/key projections and M-RoPE are the model's own modules.
* ``"divprune"`` - DivPrune-style: greedy max-min diversity on the visual embeddings (cosine
  distance): the first token is the one farthest from its nearest neighbour, each next one the
  token farthest from the selected set.

Every baseline keeps EXACTLY the requested number of tokens of each image (``keep_ratio`` ->
``round(ratio * n)`` clamped to ``[1, n]``, or explicit ``keep_counts``), and every method keeps
the ORIGINAL M-RoPE positions of the kept tokens (positions from the full sequence, then
indexed; :func:`~tsparse.dualstream.pruning.assemble_sparse_inputs`). One difference from the
published methods is deliberate, so that all of them answer from the same kind of sequence:
FastV prunes inside the LLM (its first layers see every token); here its ranking is a
selection pass and the answer pass, like every other method's, is a sparse sequence from the
first layer on. Pruning happens after the vision tower (DivPrune's and VisionZip's place), on
the merger's output. Baselines drop the unselected tokens by default; ``fuse=<method>`` handles
them with one of tsparse's fusion methods instead (:data:`tsparse.ops.FUSION_METHODS`; ``True``
= ``cosine_mean``; not for ``pool``, which has its own merge).
"""

from __future__ import annotations

import math
import zlib
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .dualstream.config import PruningConfig
from .dualstream.pruning import SparseInputs, _base_model, assemble_sparse_inputs, sparse_stream_inputs
from .ops import fuse_visual_tokens, fusion_method

__all__ = [
    "PRUNING_METHODS",
    "BASELINES",
    "keep_counts_for_ratio",
    "select_random",
    "select_pool",
    "select_divprune",
    "fastv_scores",
    "select_top_scores",
    "prune_visual_tokens",
    "image_seed",
]

#: Baselines that keep a requested number of tokens per image.
BASELINES = ("random", "pool", "fastv", "divprune")
#: Every method :func:`prune_visual_tokens` takes.
PRUNING_METHODS = ("dense", "grounded") + BASELINES


# --------------------------------------------------------------------------------------
# How many tokens
def keep_counts_for_ratio(token_counts: Sequence[int], keep_ratio: float) -> list[int]:
    """Per-image kept counts for a keep ratio: ``round(keep_ratio * n)`` clamped to ``[1, n]``
    (round half to even, as Python's ``round``). ``ValueError`` unless ``0 < keep_ratio <= 1``."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"`keep_ratio` must be a number in (0, 1], got {keep_ratio!r}")
    out = []
    for n in token_counts:
        n = int(n)
        out.append(0 if n == 0 else min(max(int(round(keep_ratio * n)), 1), n))
    return out


def _check_counts(keep_counts: Sequence[int], token_counts: Sequence[int]) -> list[int]:
    if isinstance(keep_counts, Tensor):
        keep_counts = keep_counts.tolist()
    keep_counts = list(keep_counts)
    if len(keep_counts) != len(token_counts):
        raise ValueError(f"`keep_counts` has {len(keep_counts)} entries for {len(token_counts)} images")
    out = []
    for i, (k, n) in enumerate(zip(keep_counts, token_counts)):
        if isinstance(k, bool) or not isinstance(k, int) or not (min(1, n) <= k <= n):
            raise ValueError(f"`keep_counts[{i}]` must be an int in [1, {n}] (the image's tokens), got {k!r}")
        out.append(k)
    return out


def _offsets(counts: Sequence[int]) -> list[int]:
    off = [0]
    for c in counts:
        off.append(off[-1] + int(c))
    return off


def image_seed(seed: int, key: str, image: int = 0) -> int:
    """A per-image seed from a run seed and a sample key (stable across batchings)."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{key}/{image}".encode())) % (2**63)


# --------------------------------------------------------------------------------------
# Selections (bool masks over the dense visual tokens, Qwen2.5-VL order)
def select_random(token_counts: Sequence[int], keep_counts: Sequence[int], seeds: Sequence[int],
                  device: Union[str, torch.device, None] = None) -> Tensor:
    """Uniformly random ``keep_counts[i]`` of image i's ``token_counts[i]`` tokens, drawn with a
    CPU generator seeded by ``seeds[i]`` (the same choice on any device). Returns bool ``[N]``."""
    keep_counts = _check_counts(keep_counts, token_counts)
    seeds = list(seeds)
    if len(seeds) != len(token_counts):
        raise ValueError(f"`seeds` has {len(seeds)} entries for {len(token_counts)} images")
    parts = []
    for n, k, s in zip(token_counts, keep_counts, seeds):
        g = torch.Generator().manual_seed(int(s))
        m = torch.zeros(int(n), dtype=torch.bool)
        m[torch.randperm(int(n), generator=g)[:k]] = True
        parts.append(m)
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
    return out.to(device) if device is not None else out


def _lattice(rows: int, cols: int, k: int) -> tuple[int, int, Tensor]:
    """A ``gh x gw`` block lattice over a rows x cols grid with ``gh * gw >= k`` blocks, close
    to square blocks; returns ``(gh, gw, kept)``: ``kept`` bool ``[gh * gw]`` (raster order)
    drops the ``gh * gw - k`` surplus blocks evenly."""
    gh = min(max(int(round(math.sqrt(k * rows / cols))), 1), rows)
    gw = min(-(-k // gh), cols)
    while gh * gw < k:  # gw hit the column count: more lattice rows
        gh += 1
        gw = min(-(-k // gh), cols)
    kept = torch.ones(gh * gw, dtype=torch.bool)
    extra = gh * gw - k
    if extra:
        kept[((torch.arange(extra, dtype=torch.float64) + 0.5) * (gh * gw) / extra).floor().long()] = False
    return gh, gw, kept


def select_pool(image_embeds: Tensor, image_grid_thw: Tensor, keep_counts: Sequence[int], *,
                merge_size: int = 2) -> tuple[Tensor, Tensor]:
    """Uniform spatial pooling to exactly ``keep_counts[i]`` tokens per image.

    The image's ``H x W`` token grid (``H = h / merge``) is cut into a ``gh x gw`` lattice of
    near-equal blocks (block row i holds rows ``[i H // gh, (i + 1) H // gh)``, columns alike),
    ``gh * gw >= k`` as close to square blocks as the grid allows; surplus blocks (``gh * gw - k``)
    are dropped evenly in raster order. Each kept block is represented by its centre cell
    (``(lo + hi) // 2`` in each direction; the pooled token takes that cell's original
    position) and carries the MEAN of its block's tokens; the tokens of a dropped
    block join the nearest kept centre (ties: the lowest). With ``k = H W / 4`` on an even grid
    this is exactly 2 x 2 average pooling. Returns ``(keep bool [N], embeds [K, D])``, rows in
    the kept tokens' order. Images only (t must be 1).
    """
    grid = image_grid_thw.to("cpu", torch.int64)
    if grid.dim() != 2 or grid.shape[-1] != 3 or (grid.numel() and bool((grid[:, 0] != 1).any())):
        raise ValueError("`image_grid_thw` must be [num_images, 3] with t = 1")
    shapes = [(int(h) // merge_size, int(w) // merge_size) for _, h, w in grid.tolist()]
    counts = [a * b for a, b in shapes]
    if image_embeds.dim() != 2 or image_embeds.shape[0] != sum(counts):
        raise ValueError(f"`image_embeds` must be [N, D] with N = {sum(counts)}, got {tuple(image_embeds.shape)}")
    keep_counts = _check_counts(keep_counts, counts)
    off = _offsets(counts)
    keeps, rows_out = [], []
    for i, ((hh, ww), k) in enumerate(zip(shapes, keep_counts)):
        gh, gw, kept_block = _lattice(hh, ww, k)
        tok = torch.arange(hh * ww)
        tr, tc = tok // ww, tok % ww
        rb = torch.arange(gh + 1) * hh // gh  # block row bounds: block i has rows [rb[i], rb[i+1])
        cb = torch.arange(gw + 1) * ww // gw
        block = torch.bucketize(tr, rb[1:], right=True) * gw + torch.bucketize(tc, cb[1:], right=True)
        br, bc = (rb[:-1] + rb[1:]) // 2, (cb[:-1] + cb[1:]) // 2  # centre cells
        centre = (br[:, None] * ww + bc[None, :]).reshape(-1)[kept_block]  # ascending token index
        slot = torch.full((gh * gw,), -1, dtype=torch.int64)
        slot[kept_block] = torch.arange(k)
        assign = slot[block]
        lost = assign < 0
        if bool(lost.any()):  # tokens of dropped blocks: the nearest kept centre
            cr, cc = (centre // ww).double(), (centre % ww).double()
            d = (tr[lost, None].double() - cr[None]) ** 2 + (tc[lost, None].double() - cc[None]) ** 2
            assign[lost] = d.argmin(dim=1)  # first minimum: the lowest centre
        m = torch.zeros(hh * ww, dtype=torch.bool)
        m[centre] = True
        keeps.append(m)
        x = image_embeds[off[i]:off[i + 1]]
        a = assign.to(x.device)
        acc = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, a, x.float())
        num = torch.zeros(k, dtype=torch.float32, device=x.device).index_add_(
            0, a, torch.ones(a.numel(), dtype=torch.float32, device=x.device))
        rows_out.append((acc / num[:, None]).to(x.dtype))
    keep = (torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.bool)).to(image_embeds.device)
    embeds = torch.cat(rows_out) if rows_out else image_embeds[:0]
    return keep, embeds


def select_divprune(image_embeds: Tensor, token_counts: Sequence[int], keep_counts: Sequence[int]) -> Tensor:
    """DivPrune-style greedy max-min diversity per image on cosine distance ``1 - cos``: the
    first pick is the token whose nearest neighbour is farthest, each next pick the token
    farthest from the picked set (ties: lowest index). Returns bool ``[N]``."""
    token_counts = [int(n) for n in token_counts]
    if image_embeds.dim() != 2 or image_embeds.shape[0] != sum(token_counts):
        raise ValueError(f"`image_embeds` must be [N, D] with N = {sum(token_counts)}, got {tuple(image_embeds.shape)}")
    keep_counts = _check_counts(keep_counts, token_counts)
    off = _offsets(token_counts)
    keep = torch.zeros(sum(token_counts), dtype=torch.bool, device=image_embeds.device)
    for i, (n, k) in enumerate(zip(token_counts, keep_counts)):
        if n == 0:
            continue
        x = torch.nn.functional.normalize(image_embeds[off[i]:off[i + 1]].float(), dim=-1)
        dist = 1.0 - x @ x.T
        if n == 1:
            keep[off[i]] = True
            continue
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        nearest = dist.masked_fill(eye, float("inf")).amin(dim=1)
        picked = torch.zeros(n, dtype=torch.bool, device=x.device)
        first = int(torch.argmax(nearest))
        picked[first] = True
        mind = dist[first].clone()
        for _ in range(k - 1):
            j = int(torch.argmax(mind.masked_fill(picked, -float("inf"))))
            picked[j] = True
            mind = torch.minimum(mind, dist[j])
        keep[off[i]:off[i + 1]] = picked
    return keep


def select_top_scores(scores: Tensor, token_counts: Sequence[int], keep_counts: Sequence[int]) -> Tensor:
    """The ``keep_counts[i]`` highest-scoring tokens of each image (ties: lowest index).
    ``scores`` float ``[N]``. Returns bool ``[N]``."""
    token_counts = [int(n) for n in token_counts]
    if scores.dim() != 1 or scores.shape[0] != sum(token_counts):
        raise ValueError(f"`scores` must be [N] with N = {sum(token_counts)}, got {tuple(scores.shape)}")
    keep_counts = _check_counts(keep_counts, token_counts)
    off = _offsets(token_counts)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for i, k in enumerate(keep_counts):
        s = scores[off[i]:off[i + 1]].double()
        # stable descending sort: equal scores keep index order
        order = torch.sort(-s, stable=True).indices[:k]
        keep[off[i] + order] = True
    return keep


class _StopForward(Exception):
    pass


@torch.no_grad()
def fastv_scores(model, dense: SparseInputs, layer: int) -> Tensor:
    """FastV's ranking signal: the attention weight the LAST real prompt token pays each visual
    token inside decoder layer ``layer`` (0-based), averaged over heads.

    Args:
        model: the Qwen2.5-VL model.
        dense: the DENSE inputs (every visual token kept, e.g. from
            :func:`~tsparse.dualstream.pruning.assemble_sparse_inputs` with all tokens).
        layer: the decoder layer whose attention ranks the tokens (FastV prunes after layer
            K = 2 with the attention computed in the layer before, i.e. ``layer = 1``).

    Runs the model's own language model on the dense prefix up to ``layer`` (a pre-hook on that
    layer captures its input and stops the forward), then that layer's own input norm, q/k
    projections and M-RoPE for the last query; softmax over the real keys (the last token sees
    every earlier token, so only padding is masked). Returns float32 ``[N]`` over the dense
    visual tokens in Qwen2.5-VL order (rows of the batch in order).
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_multimodal_rotary_pos_emb

    base = _base_model(model)
    lm = base.language_model
    layers = lm.layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"`layer` must be an int in [0, {len(layers) - 1}] (the model's decoder layers), got {layer!r}")
    if not bool(dense.visual_keep.all()):
        raise ValueError("`dense` must keep every visual token (FastV ranks the dense sequence)")
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]
        raise _StopForward

    handle = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        inputs = dense.model_inputs()
        lm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
           position_ids=inputs["position_ids"], use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    h = captured["hidden"]
    cos, sin = captured["rope"]
    blk = layers[layer]
    attn = blk.self_attn
    mask = dense.attention_mask.bool()
    b_sz, width, _ = h.shape
    last = (width - 1 - mask.flip(1).to(torch.int64).argmax(1)).clamp(min=0)  # last real column
    rows = torch.arange(b_sz, device=h.device)
    x = blk.input_layernorm(h)
    hd = attn.head_dim
    n_heads, n_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    q = attn.q_proj(x[rows, last][:, None]).view(b_sz, 1, n_heads, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b_sz, width, n_kv, hd).transpose(1, 2)
    section = attn.config.rope_parameters["mrope_section"]
    q, _ = apply_multimodal_rotary_pos_emb(q, q, _at(cos, rows, last), _at(sin, rows, last), section)
    k, _ = apply_multimodal_rotary_pos_emb(k, k, cos, sin, section)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2))[:, :, 0] * attn.scaling  # [B, H, L]
    scores = scores.masked_fill(~mask[:, None, :], -float("inf"))
    weights = scores.softmax(dim=-1).mean(dim=1)  # [B, L]
    img = (dense.input_ids == int(base.config.image_token_id)) & mask
    return weights[img]


def _at(t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``t[..., rows, cols, :]`` keeping a length-1 sequence axis: M-RoPE tables ``[3, B, L, hd]``
    or ``[B, L, hd]`` at one column per row."""
    if t.dim() == 4:
        return t[:, rows, cols][:, :, None]
    return t[rows, cols][:, None]


# --------------------------------------------------------------------------------------
def prune_visual_tokens(
    model,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    image_grid_thw: Tensor,
    *,
    method: str,
    image_embeds: Tensor,
    boxes: Optional[Sequence] = None,
    keep_ratio: Optional[float] = None,
    keep_counts: Optional[Sequence[int]] = None,
    fuse: Union[bool, str, None] = None,
    config: Optional[PruningConfig] = None,
    fastv_layer: Optional[int] = None,
    seeds: Optional[Sequence[int]] = None,
    padding_side: Optional[str] = None,
    pad_token_id: Optional[int] = None,
) -> SparseInputs:
    """The sparse stream's inputs for a batch, pruned by ``method`` (see the module docs).

    Args:
        model: a transformers Qwen2.5-VL model.
        input_ids, attention_mask, image_grid_thw: the DENSE prompt batch (processor output,
            ``<|image_pad|>`` expanded).
        method: one of :data:`PRUNING_METHODS`.
        image_embeds: ``[N, D]`` the batch's merged visual tokens
            (:func:`~tsparse.dualstream.pruning.image_features`).
        boxes: ``"grounded"`` only: per-sample boxes (see ``sparse_stream_inputs``).
        keep_ratio / keep_counts: baselines only, exactly one: a ratio in (0, 1] applied to
            each image, or the kept count of each image (e.g. matched to what the grounded
            method kept for the same image).
        fuse: the fusion method of the dropped tokens (:data:`tsparse.ops.FUSION_METHODS`;
            ``True``/``False`` = ``"cosine_mean"``/``"none"``): ``"grounded"``: default
            ``config.fuse``; baselines: default ``"none"`` (dropped, as published), else
            :func:`tsparse.ops.fuse_visual_tokens` on the baseline's selection (not for
            ``"pool"``). With ``"summary"`` each pruned image gets one summary token on top of
            its kept count.
        config: the :class:`~tsparse.dualstream.config.PruningConfig` (grounded's mask
            options and fallback; ``padding_side`` for all methods).
        fastv_layer: ``"fastv"``: the ranking layer (default 1, see :func:`fastv_scores`;
            the last layer when the model has fewer).
        seeds: ``"random"``: one seed per image (default 0, 1, 2, ...; see :func:`image_seed`).
        padding_side, pad_token_id: override ``config.padding_side`` / the model's pad id.

    Returns a :class:`~tsparse.dualstream.pruning.SparseInputs`: kept tokens at their
    ORIGINAL M-RoPE positions. ``ValueError`` naming the argument for an unknown method,
    arguments that do not apply to it, or bad counts.
    """
    if method not in PRUNING_METHODS:
        raise ValueError(f"`method` must be one of {list(PRUNING_METHODS)}, got {method!r}")
    cfg = config if config is not None else PruningConfig()
    if not isinstance(cfg, PruningConfig):
        raise TypeError(f"`config` must be a PruningConfig or None, got {type(cfg).__name__}")
    side = padding_side if padding_side is not None else cfg.padding_side
    if method == "grounded":
        if keep_ratio is not None or keep_counts is not None:
            raise ValueError("`keep_ratio`/`keep_counts` do not apply to method='grounded' (the boxes decide)")
        if boxes is None:
            raise ValueError("method='grounded' needs `boxes` (one entry per sample)")
        return sparse_stream_inputs(model, input_ids, attention_mask, image_grid_thw, boxes,
                                    image_embeds=image_embeds, config=cfg, fuse=fuse, padding_side=side,
                                    pad_token_id=pad_token_id)
    if boxes is not None:
        raise ValueError(f"`boxes` apply to method='grounded' only, not {method!r}")
    base = _base_model(model)
    merge = int(getattr(base.config.vision_config, "spatial_merge_size", 2))
    grid = image_grid_thw.to("cpu", torch.int64) if isinstance(image_grid_thw, Tensor) else image_grid_thw
    if not isinstance(grid, Tensor) or grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError("`image_grid_thw` must be an int tensor of shape [num_images, 3]")
    token_counts = (grid.prod(-1) // (merge * merge)).tolist()
    if not isinstance(image_embeds, Tensor) or image_embeds.dim() != 2 or image_embeds.shape[0] != sum(token_counts):
        shape = tuple(image_embeds.shape) if isinstance(image_embeds, Tensor) else type(image_embeds).__name__
        raise ValueError(f"`image_embeds` must be [N, D] with N = {sum(token_counts)}, got {shape}")

    def assemble(keep: Tensor, embeds: Tensor) -> SparseInputs:
        return assemble_sparse_inputs(model, input_ids, attention_mask, image_grid_thw, keep, embeds,
                                      padding_side=side, pad_token_id=pad_token_id)

    fusion = "none" if fuse is None else fusion_method(fuse)
    if method == "dense":
        if keep_ratio is not None or keep_counts is not None or fusion != "none":
            raise ValueError("method='dense' keeps every token: no `keep_ratio`, `keep_counts` or `fuse`")
        return assemble(torch.ones(sum(token_counts), dtype=torch.bool, device=image_embeds.device), image_embeds)

    if (keep_ratio is None) == (keep_counts is None):
        raise ValueError(f"method={method!r} needs exactly one of `keep_ratio` and `keep_counts`")
    counts = keep_counts_for_ratio(token_counts, keep_ratio) if keep_ratio is not None else _check_counts(
        keep_counts, token_counts)
    if method == "pool":
        if fusion != "none":
            raise ValueError("`fuse` does not apply to method='pool' (pooling merges spatially)")
        keep, embeds = select_pool(image_embeds, grid, counts, merge_size=merge)
        return assemble(keep, embeds)
    if method == "random":
        s = list(range(len(token_counts))) if seeds is None else list(seeds)
        keep = select_random(token_counts, counts, s, device=image_embeds.device)
    elif method == "divprune":
        keep = select_divprune(image_embeds, token_counts, counts)
    else:  # fastv
        n_layers = len(base.language_model.layers)
        layer = min(1, n_layers - 1) if fastv_layer is None else fastv_layer
        dense = assemble(torch.ones(sum(token_counts), dtype=torch.bool, device=image_embeds.device), image_embeds)
        keep = select_top_scores(fastv_scores(model, dense, layer), token_counts, counts)
    sel = fuse_visual_tokens(image_embeds, keep, grid, fuse=fusion, kept_counts=counts, merge_size=merge)
    return assemble(sel.keep, sel.embeds)
