"""Qwen2.5-VL visual-token pruning: from a localization response's boxes to the sparse
reasoning stream's model inputs.

:func:`sparse_stream_inputs` takes the DENSE inputs of the sparse stream's prompt (what the
processor returns: ``input_ids``, ``attention_mask``, ``image_grid_thw`` and
``pixel_values`` or precomputed image embeddings) and the boxes, and returns a
:class:`SparseInputs`:

1. the image embeddings (the vision tower's merger output, Qwen2.5-VL token order) go through
   :func:`tsparse.ops.select_visual_tokens`: the tokens inside the boxes are kept and the
   dropped ones handled by the named fusion method ``fuse`` (``none``: removed;
   ``cosine_mean``: merged into their most similar kept token; ``nearest_kept``: into the
   spatially nearest kept token; ``summary``: pooled into one extra token per image that takes
   the place - column and original position - of the image's dropped token nearest its
   centre; see :mod:`tsparse.ops.visual_tokens`);
2. the pruned ``<|image_pad|>`` columns are removed from ``input_ids`` and the attention mask,
   and each row is re-padded (left by default, ready for ``generate``);
3. every kept token keeps its ORIGINAL 3-D M-RoPE position: the positions come from the
   model's own ``get_rope_index`` on the full sequence and are then indexed (so kept image
   tokens keep their (t, row, col) and the text after an image keeps its offset);
   ``rope_deltas`` are from the full sequence too (``max position + 1 - kept length``), so
   generated tokens continue at the dense sequence's next position;
4. the model is fed ``inputs_embeds`` (token embeddings of the kept ids with the kept visual
   embeddings placed at their columns) and ``position_ids`` (4 rows: text positions, then
   the 3 M-RoPE rows, the layout transformers' Qwen2.5-VL ``generate`` uses).

An image with no usable box keeps all its tokens (``fallback="full_image"``) or none
(``"drop_image"``). Several images per sample are supported; boxes are given per sample
(applying to each of its images: ``box_scope="sample"``) or per image.

With a box covering the whole image (any fusion method) the sparse inputs reproduce the dense
forward exactly (tested). Videos are not supported.

:func:`assemble_sparse_inputs` does steps 2-4 for any other choice of kept tokens (the pruning
baselines of :mod:`tsparse.vtp`); :func:`image_features` runs the vision tower once so both
streams can share a batch's visual tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..ops import box_to_patch_mask, scatter_tokens, select_visual_tokens
from .config import PruningConfig

__all__ = [
    "SparseInputs",
    "sparse_stream_inputs",
    "assemble_sparse_inputs",
    "image_features",
    "extend_sparse_inputs",
    "sparse_generate",
    "boxes_to_tensors",
    "repeat_samples",
    "take_samples",
]

# The processor-batch keys take_samples / repeat_samples carry (plus ``texts``).
_BATCH_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


@dataclass
class SparseInputs:
    """The sparse stream's model inputs and the bookkeeping of what was pruned.

    Shapes: ``B`` samples, ``L`` columns after pruning and re-padding, ``D`` hidden size,
    ``I`` images, ``N`` dense visual tokens.
    """

    input_ids: Tensor  #: int64 ``[B, L]``: kept token ids (``pad_token_id`` on padding)
    inputs_embeds: Tensor  #: ``[B, L, D]`` in the text embedding dtype; differentiable
    attention_mask: Tensor  #: int64 ``[B, L]``: 1 on real tokens
    position_ids: Tensor  #: int64 ``[3, B, L]``: original M-RoPE (t, h, w) positions, 0 on padding
    text_position_ids: Tensor  #: int64 ``[B, L]``: 0..n_b-1 over real tokens, 0 on padding
    rope_deltas: Tensor  #: int64 ``[B, 1]``: dense max position + 1 - n_b
    source_index: Tensor  #: int64 ``[B, L]``: column in the dense input (-1: padding/appended)
    visual_keep: Tensor  #: bool ``[N]``: which dense visual tokens were kept (Qwen order)
    kept_counts: Tensor  #: int64 ``[I]``: kept visual tokens per image (CPU)
    total_counts: Tensor  #: int64 ``[I]``: visual tokens per image (CPU)
    fallback: Tensor  #: bool ``[I]``: the image had no usable box (fallback applied) (CPU)
    image_sample: Tensor  #: int64 ``[I]``: the sample each image belongs to (CPU)
    prompt_length: int  #: ``L`` of the prompt part (before :func:`extend_sparse_inputs`)
    padding_side: str  #: ``"left"`` or ``"right"``

    def model_inputs(self) -> dict:
        """``inputs_embeds``, ``attention_mask`` and 4-row ``position_ids``
        (``[4, B, L]``: text positions, then t/h/w) for the model's forward or ``generate``."""
        return {
            "inputs_embeds": self.inputs_embeds,
            "attention_mask": self.attention_mask,
            "position_ids": torch.cat([self.text_position_ids[None], self.position_ids], dim=0),
        }

    @property
    def keep_ratio(self) -> float:
        """Kept / dense visual tokens over the whole batch (1.0 without images)."""
        total = int(self.total_counts.sum())
        return float(self.kept_counts.sum()) / total if total else 1.0

    def sample_keep_ratio(self) -> Tensor:
        """float32 ``[B]``: each sample's kept / dense visual tokens (1.0 without images)."""
        b = self.input_ids.shape[0]
        kept = torch.zeros(b, dtype=torch.float64).index_add_(0, self.image_sample, self.kept_counts.double())
        tot = torch.zeros(b, dtype=torch.float64).index_add_(0, self.image_sample, self.total_counts.double())
        return torch.where(tot > 0, kept / tot.clamp(min=1), torch.ones_like(tot)).float()


# --------------------------------------------------------------------------------------
def _base_model(model):
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "get_rope_index"):
        return base
    if hasattr(model, "get_rope_index"):
        return model
    raise TypeError(
        f"`model` must be a Qwen2.5-VL model (Qwen2_5_VLForConditionalGeneration or Qwen2_5_VLModel), "
        f"got {type(model).__name__}"
    )


def _as_box_tensor(value: Any, where: str) -> Tensor:
    """One entry of ``boxes`` -> float32 CPU ``[n, 4]`` (no validation of the values: the op
    ignores unusable boxes, which is what makes the fallback happen)."""
    if value is None:
        return torch.zeros(0, 4)
    if hasattr(value, "boxes") and not isinstance(value, Tensor):  # a BoxParse
        value = value.boxes
    if isinstance(value, Tensor):
        t = value.detach().to("cpu", torch.float32)
    else:
        rows = [list(b) for b in value]
        t = torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros(0, 4)
    if t.dim() == 1 and t.numel() == 4:
        t = t.view(1, 4)
    if t.dim() != 2 or t.shape[-1] != 4:
        raise ValueError(f"`{where}` must be boxes of shape [n, 4], got shape {tuple(t.shape)}")
    return t


def boxes_to_tensors(
    boxes: Sequence[Any],
    image_sample: Sequence[int],
    *,
    box_scope: str = "sample",
    num_samples: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample or per-image boxes -> ``(boxes [M, 4] float32, box_offsets [I + 1] int64)``
    (CPU, CSR over images) for :func:`tsparse.ops.select_visual_tokens`.

    Args:
        boxes: ``box_scope="sample"``: one entry per sample, applied to each of its images;
            ``"image"``: one entry per image. An entry is a sequence of ``(x1, y1, x2, y2)``,
            a ``[n, 4]`` tensor, a :class:`~tsparse.dualstream.format.BoxParse`, or ``None``
            (no box: the image falls back).
        image_sample: ``[I]`` the sample index of each image.
        box_scope: ``"sample"`` or ``"image"``.
        num_samples: the batch size ``B``; with ``box_scope="sample"`` ``boxes`` must have
            exactly ``B`` entries (default: as many as the highest sample index needs).
    """
    if box_scope not in ("sample", "image"):
        raise ValueError(f"`box_scope` must be 'sample' or 'image', got {box_scope!r}")
    image_sample = [int(s) for s in image_sample]
    if isinstance(boxes, Tensor) or isinstance(boxes, str):
        raise TypeError("`boxes` must be a sequence with one entry per sample (or per image)")
    boxes = list(boxes)
    if box_scope == "sample":
        need = (max(image_sample) + 1) if image_sample else 0
        if num_samples is not None and len(boxes) != num_samples:
            raise ValueError(f"`boxes` has {len(boxes)} entries for {num_samples} samples (box_scope='sample')")
        if len(boxes) < need:
            raise ValueError(f"`boxes` has {len(boxes)} entries but images belong to {need} samples")
        per_sample = [_as_box_tensor(b, f"boxes[{k}]") for k, b in enumerate(boxes)]
        per_image = [per_sample[s] for s in image_sample]
    else:
        if len(boxes) != len(image_sample):
            raise ValueError(f"`boxes` has {len(boxes)} entries for {len(image_sample)} images (box_scope='image')")
        per_image = [_as_box_tensor(b, f"boxes[{k}]") for k, b in enumerate(boxes)]
    offsets = [0]
    for t in per_image:
        offsets.append(offsets[-1] + t.shape[0])
    cat = torch.cat(per_image) if per_image else torch.zeros(0, 4)
    return cat, torch.tensor(offsets, dtype=torch.int64)


def _image_samples(img_mask: Tensor, counts: list[int]) -> list[int]:
    """Assigns images (in batch order) to samples by their token counts."""
    per_row = img_mask.sum(1).tolist()
    out, k = [], 0
    for b, n in enumerate(per_row):
        acc = 0
        while acc < n and k < len(counts):
            acc += counts[k]
            out.append(b)
            k += 1
        if acc != n:
            raise ValueError(
                f"`input_ids` row {b} has {n} image tokens, which does not match the images of "
                f"`image_grid_thw` (per-image tokens {counts})"
            )
    if k != len(counts):
        raise ValueError(f"`image_grid_thw` describes {len(counts)} images but `input_ids` holds only {k}")
    return out


def _resolve(config: Optional[PruningConfig], **overrides) -> PruningConfig:
    if config is None:
        config = PruningConfig()
    elif not isinstance(config, PruningConfig):
        raise TypeError(f"`config` must be a PruningConfig or None, got {type(config).__name__}")
    set_ = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **set_) if set_ else config


def _pad_token_id(model, pad_token_id: Optional[int]) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    for src in (getattr(model, "generation_config", None), getattr(getattr(model, "config", None), "text_config", None),
                getattr(model, "config", None)):
        v = getattr(src, "pad_token_id", None) if src is not None else None
        if isinstance(v, int):
            return v
    return 0


@torch.no_grad()
def _dense_positions(base, input_ids: Tensor, attention_mask: Tensor, grid: Tensor, image_token_id: int):
    mm = (input_ids == image_token_id).to(torch.int32)
    pos, _ = base.get_rope_index(input_ids, mm, image_grid_thw=grid, attention_mask=attention_mask)
    return pos.to(torch.int64)


def sparse_stream_inputs(
    model,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    image_grid_thw: Tensor,
    boxes: Sequence[Any],
    *,
    pixel_values: Optional[Tensor] = None,
    image_embeds: Optional[Tensor] = None,
    config: Optional[PruningConfig] = None,
    fuse: Union[bool, str, None] = None,
    fallback: Optional[str] = None,
    box_scope: Optional[str] = None,
    margin: Optional[float] = None,
    min_coverage: Optional[float] = None,
    padding_side: Optional[str] = None,
    pad_token_id: Optional[int] = None,
) -> SparseInputs:
    """Prunes the visual tokens of a Qwen2.5-VL batch to the boxes: the sparse stream's inputs.

    Args:
        model: a transformers ``Qwen2_5_VLForConditionalGeneration`` (or its ``.model``). Its
            config gives the image token id; its ``get_rope_index``, ``get_image_features``
            and input embeddings are used.
        input_ids: int ``[B, L]`` dense ids with ``<|image_pad|>`` expanded (processor output).
        attention_mask: ``[B, L]`` (1 real, 0 padding; any padding side) or ``None`` (all real).
        image_grid_thw: int ``[I, 3]`` patch grid of each image, in batch order (t must be 1).
        boxes: per sample (``box_scope="sample"``) or per image: normalized
            ``(x1, y1, x2, y2)`` boxes, see :func:`boxes_to_tensors`. Unusable boxes
            (non-finite, inverted, outside the image) are ignored; an image left with none
            falls back.
        pixel_values: the processor's ``pixel_values``; the vision tower runs on them (with
            autograd when enabled). Exactly one of ``pixel_values`` / ``image_embeds``.
        image_embeds: ``[N, D]`` precomputed merger outputs (e.g. reused from the localization
            stream's rollout), Qwen2.5-VL order.
        config: a :class:`~tsparse.dualstream.config.PruningConfig` (default: its defaults);
            the keyword arguments below override single fields of it.
        fuse: the fusion method (:data:`tsparse.ops.FUSION_METHODS`: ``"none"``,
            ``"cosine_mean"``, ``"nearest_kept"``, ``"summary"``; ``True``/``False`` mean
            ``"cosine_mean"``/``"none"``). With ``"summary"`` the kept counts include each
            pruned image's summary token.
        fallback: ``"full_image"`` or ``"drop_image"`` for an image without a usable box.
        box_scope: ``"sample"`` or ``"image"``.
        margin, min_coverage: as :func:`tsparse.ops.box_to_patch_mask`.
        padding_side: re-pad the pruned rows on the ``"left"`` (for ``generate``) or ``"right"``.
        pad_token_id: id written on padding (default: the model's ``pad_token_id``, else 0).

    Returns a :class:`SparseInputs`. ``inputs_embeds`` is differentiable in the vision tower's
    output and the token embeddings (fusion and the column moves are tsparse ops with autograd).

    Syncs: the host reads the per-image kept counts (one copy, inside
    ``select_visual_tokens``) and the per-row kept lengths (one copy) to size the outputs.

    Raises ``TypeError``/``ValueError`` naming the argument for bad shapes, dtypes, a token
    count that does not match ``image_grid_thw``, video tokens, or both/neither of
    ``pixel_values`` and ``image_embeds``.
    """
    base = _base_model(model)
    cfg = _resolve(config, fuse=fuse, fallback=fallback, box_scope=box_scope, margin=margin,
                   min_coverage=min_coverage, padding_side=padding_side)
    if (pixel_values is None) == (image_embeds is None):
        raise ValueError("pass exactly one of `pixel_values` and `image_embeds`")
    b = _check_batch(base, input_ids, attention_mask, image_grid_thw)
    input_ids, attention_mask, grid, counts, image_sample = b.input_ids, b.attention_mask, b.grid, b.counts, b.image_sample
    device, total, merge, patch = input_ids.device, sum(b.counts), b.merge, b.patch
    if image_embeds is None:
        image_embeds = image_features(model, pixel_values, grid)
    image_embeds = _check_image_embeds(base, image_embeds, total, device)

    # Boxes -> per-image CSR; which images have no usable box (host-side metadata only).
    box_cat, box_offsets = boxes_to_tensors(boxes, image_sample, box_scope=cfg.box_scope,
                                            num_samples=input_ids.shape[0])
    mask_opts = dict(patch_size=patch, merge_size=merge, margin=cfg.margin, min_coverage=cfg.min_coverage)
    if total:
        _, strict_counts = box_to_patch_mask(box_cat, box_offsets, grid, empty="drop_all", **mask_opts)
        fallback_flags = strict_counts.to(torch.int64) == 0
        sel = select_visual_tokens(
            image_embeds, box_cat, box_offsets, grid, fuse=cfg.fuse,
            empty="keep_all" if cfg.fallback == "full_image" else "drop_all", **mask_opts,
        )
        visual_keep, kept_embeds = sel.keep, sel.embeds
        kept_counts = sel.counts.to("cpu", torch.int64)
    else:
        fallback_flags = torch.zeros(0, dtype=torch.bool)
        visual_keep = torch.zeros(0, dtype=torch.bool, device=device)
        kept_embeds = image_embeds[:0]
        kept_counts = torch.zeros(0, dtype=torch.int64)

    return _assemble(
        base, model, input_ids, attention_mask, grid, visual_keep, kept_embeds, kept_counts,
        counts=counts, fallback=fallback_flags, image_sample=image_sample,
        padding_side=cfg.padding_side, pad_token_id=pad_token_id,
    )


def _assemble(
    base, model, input_ids: Tensor, attention_mask: Tensor, grid: Tensor, visual_keep: Tensor,
    kept_embeds: Tensor, kept_counts: Tensor, *, counts: list, fallback: Tensor, image_sample: list,
    padding_side: str, pad_token_id: Optional[int],
) -> SparseInputs:
    """The column removal, re-padding, original positions and embeddings shared by every way of
    choosing the kept visual tokens (inputs already validated)."""
    device = input_ids.device
    image_token_id = int(base.config.image_token_id)
    embed = base.get_input_embeddings()
    real = attention_mask.bool()
    img_mask = (input_ids == image_token_id) & real
    # Columns kept per row; their destinations after re-padding.
    keep_cols = real.clone()
    keep_cols[img_mask] = visual_keep.to(device)
    lengths = keep_cols.sum(1)
    n = lengths.tolist()  # sizes the output (one sync)
    b_sz = input_ids.shape[0]
    width = max(n) if n else 0
    rows, src = torch.nonzero_static(keep_cols, size=sum(n)).unbind(1) if sum(n) else (
        torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))
    rank = keep_cols.to(torch.int64).cumsum(1)[rows, src] - 1
    shift = (width - lengths) if padding_side == "left" else torch.zeros_like(lengths)
    dest = rank + shift[rows]

    pad_id = _pad_token_id(model, pad_token_id)
    out_ids = torch.full((b_sz, width), pad_id, dtype=torch.int64, device=device)
    out_ids[rows, dest] = input_ids[rows, src]
    out_mask = torch.zeros((b_sz, width), dtype=torch.int64, device=device)
    out_mask[rows, dest] = 1
    source_index = torch.full((b_sz, width), -1, dtype=torch.int64, device=device)
    source_index[rows, dest] = src
    # The grid stays on the host: get_rope_index reads its values as scalars (no device syncs).
    dense_pos = _dense_positions(base, input_ids, attention_mask, grid, image_token_id)
    out_pos = torch.zeros((3, b_sz, width), dtype=torch.int64, device=device)
    out_pos[:, rows, dest] = dense_pos[:, rows, src]
    text_pos = (out_mask.cumsum(1) - 1).clamp(min=0) * out_mask
    max_pos = dense_pos.masked_fill(~real[None], -1).amax(dim=(0, 2)) if input_ids.shape[1] else (
        torch.full((b_sz,), -1, dtype=torch.int64, device=device))
    rope_deltas = (max_pos + 1 - lengths).view(b_sz, 1)

    # Embeddings: the kept ids' token embeddings, kept visual rows placed at their columns
    # (visual tokens keep their order: row-major over the batch, as in the dense input).
    embeds = embed(out_ids)
    out_img = (out_ids == image_token_id) & out_mask.bool()
    if kept_embeds.shape[0]:
        flat_idx = torch.nonzero_static(out_img.reshape(-1), size=kept_embeds.shape[0]).reshape(-1)
        d = embeds.shape[-1]
        embeds = scatter_tokens(kept_embeds, flat_idx, b_sz * width, fill=embeds.reshape(-1, d)).view(b_sz, width, d)

    return SparseInputs(
        input_ids=out_ids,
        inputs_embeds=embeds,
        attention_mask=out_mask,
        position_ids=out_pos,
        text_position_ids=text_pos,
        rope_deltas=rope_deltas,
        source_index=source_index,
        visual_keep=visual_keep,
        kept_counts=kept_counts,
        total_counts=torch.tensor(counts, dtype=torch.int64),
        fallback=fallback,
        image_sample=torch.tensor(image_sample, dtype=torch.int64),
        prompt_length=width,
        padding_side=padding_side,
    )


@dataclass
class _Batch:
    input_ids: Tensor
    attention_mask: Tensor
    grid: Tensor  # CPU int64 [I, 3]
    counts: list  # visual tokens per image
    image_sample: list  # sample of each image
    merge: int
    patch: int


def _check_batch(base, input_ids, attention_mask, image_grid_thw) -> _Batch:
    """Validates a processor batch (argument names in the errors) and assigns images to samples."""
    mcfg = base.config
    image_token_id = int(mcfg.image_token_id)
    video_token_id = getattr(mcfg, "video_token_id", None)
    merge = int(getattr(mcfg.vision_config, "spatial_merge_size", 2))
    patch = int(getattr(mcfg.vision_config, "patch_size", 14))
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("`input_ids` must be an int32/int64 tensor of shape [B, L]")
    input_ids = input_ids.to(torch.int64)
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}")
    attention_mask = attention_mask.to(device=device, dtype=torch.int64)
    if not isinstance(image_grid_thw, Tensor) or image_grid_thw.dim() != 2 or image_grid_thw.shape[-1] != 3:
        raise ValueError("`image_grid_thw` must be an int tensor of shape [num_images, 3]")
    if image_grid_thw.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`image_grid_thw` must be int32 or int64, got {image_grid_thw.dtype}")
    grid = image_grid_thw.to("cpu", torch.int64)
    if grid.numel() and bool((grid[:, 0] != 1).any()):
        raise ValueError("`image_grid_thw`: t must be 1 for images (videos are not supported)")
    if video_token_id is not None and bool((input_ids == int(video_token_id)).any()):
        raise ValueError("`input_ids` holds video tokens; sparse_stream_inputs supports images only")
    img_mask = (input_ids == image_token_id) & attention_mask.bool()
    counts = (grid.prod(-1) // (merge * merge)).tolist()
    image_sample = _image_samples(img_mask.cpu(), counts)
    return _Batch(input_ids, attention_mask, grid, counts, image_sample, merge, patch)


def _check_image_embeds(base, image_embeds, total: int, device) -> Tensor:
    if not isinstance(image_embeds, Tensor) or image_embeds.dim() != 2 or image_embeds.shape[0] != total:
        shape = tuple(image_embeds.shape) if isinstance(image_embeds, Tensor) else type(image_embeds).__name__
        raise ValueError(f"`image_embeds` must have shape [N, D] with N = {total} (from `image_grid_thw`), got {shape}")
    return image_embeds.to(device=device, dtype=base.get_input_embeddings().weight.dtype)


def image_features(model, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
    """The vision tower's merged visual tokens ``[N, D]`` (Qwen2.5-VL order, images
    concatenated) for the processor's ``pixel_values`` and ``image_grid_thw``: what
    ``image_embeds`` takes, so a batch's images are encoded once and shared by both streams."""
    base = _base_model(model)
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 2:
        raise ValueError("`pixel_values` must be the processor's [num_patches, C] tensor")
    if not isinstance(image_grid_thw, Tensor) or image_grid_thw.dim() != 2 or image_grid_thw.shape[-1] != 3:
        raise ValueError("`image_grid_thw` must be an int tensor of shape [num_images, 3]")
    feats = base.get_image_features(pixel_values, image_grid_thw.to(pixel_values.device))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats


def assemble_sparse_inputs(
    model,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    image_grid_thw: Tensor,
    visual_keep: Tensor,
    kept_embeds: Tensor,
    *,
    padding_side: str = "left",
    pad_token_id: Optional[int] = None,
) -> SparseInputs:
    """The sparse stream's inputs for ANY choice of kept visual tokens (what
    :func:`sparse_stream_inputs` does after its box selection; the pruning baselines of
    :mod:`tsparse.vtp` use it with their own selections).

    Args:
        model, input_ids, attention_mask, image_grid_thw: as :func:`sparse_stream_inputs`.
        visual_keep: bool ``[N]`` over the dense visual tokens (Qwen2.5-VL order, images
            concatenated): which ones stay.
        kept_embeds: ``[K, D]`` the embeddings placed at the kept tokens, ``K =
            visual_keep.sum()``, in their order (gathered, fused or pooled rows).
        padding_side, pad_token_id: as :func:`sparse_stream_inputs`.

    The kept tokens keep their ORIGINAL M-RoPE positions and ``rope_deltas`` come from the
    full sequence, exactly as in :func:`sparse_stream_inputs`; ``fallback`` is all False.
    Raises ``ValueError``/``TypeError`` naming the argument for bad shapes or dtypes.
    """
    base = _base_model(model)
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
    b = _check_batch(base, input_ids, attention_mask, image_grid_thw)
    total = sum(b.counts)
    device = b.input_ids.device
    if not isinstance(visual_keep, Tensor) or visual_keep.dtype != torch.bool or visual_keep.shape != (total,):
        got = (visual_keep.dtype, tuple(visual_keep.shape)) if isinstance(visual_keep, Tensor) else type(visual_keep).__name__
        raise ValueError(f"`visual_keep` must be a bool tensor of shape [{total}] (the dense visual tokens), got {got}")
    visual_keep = visual_keep.to(device)
    kept_counts = torch.tensor(
        [int(c.sum()) for c in torch.split(visual_keep.cpu().to(torch.int64), b.counts)], dtype=torch.int64
    ) if total else torch.zeros(len(b.counts), dtype=torch.int64)
    k = int(kept_counts.sum())
    if not isinstance(kept_embeds, Tensor) or kept_embeds.dim() != 2 or kept_embeds.shape[0] != k:
        shape = tuple(kept_embeds.shape) if isinstance(kept_embeds, Tensor) else type(kept_embeds).__name__
        raise ValueError(f"`kept_embeds` must have shape [K, D] with K = {k} (kept tokens of `visual_keep`), got {shape}")
    kept_embeds = _check_image_embeds(base, kept_embeds, k, device)
    return _assemble(
        base, model, b.input_ids, b.attention_mask, b.grid, visual_keep, kept_embeds, kept_counts,
        counts=b.counts, fallback=torch.zeros(len(b.counts), dtype=torch.bool), image_sample=b.image_sample,
        padding_side=padding_side, pad_token_id=pad_token_id,
    )


def extend_sparse_inputs(
    model, sparse: SparseInputs, token_ids: Tensor, token_mask: Optional[Tensor] = None
) -> SparseInputs:
    """Appends tokens (e.g. generated responses) after the sparse prompt, for the training
    forward (log-probs of the response under the sparse stream).

    Args:
        model: the model whose input embeddings embed ``token_ids``.
        sparse: from :func:`sparse_stream_inputs` (or a previous extension).
        token_ids: int ``[B, R]``, right-padded.
        token_mask: ``[B, R]`` 1 on real tokens (default: all real). Real tokens must come
            first in each row.

    Returns a new :class:`SparseInputs` with ``L + R`` columns: appended token k (0-based) of
    row b sits at M-RoPE position ``p_b + 1 + k`` on all three rows, ``p_b`` the position of
    the row's last real token (exactly where ``generate`` puts its k-th new token, the dense
    sequence's continuation), and at text position ``n_b + k``; ``rope_deltas`` is unchanged
    and ``source_index`` is -1 on them. ``prompt_length`` is unchanged, so ``logits[:, prompt_length - 1 : -1]`` predict the
    appended tokens. Raises ``ValueError`` for bad shapes or a mask with a gap.
    """
    base = _base_model(model)
    if not isinstance(sparse, SparseInputs):
        raise TypeError(f"`sparse` must be a SparseInputs, got {type(sparse).__name__}")
    b_sz = sparse.input_ids.shape[0]
    if not isinstance(token_ids, Tensor) or token_ids.dim() != 2 or token_ids.shape[0] != b_sz:
        raise ValueError(f"`token_ids` must be an int tensor of shape [{b_sz}, R]")
    device = sparse.input_ids.device
    token_ids = token_ids.to(device=device, dtype=torch.int64)
    if token_mask is None:
        token_mask = torch.ones_like(token_ids)
    if not isinstance(token_mask, Tensor) or token_mask.shape != token_ids.shape:
        raise ValueError(f"`token_mask` must have the shape of `token_ids` {tuple(token_ids.shape)}")
    token_mask = token_mask.to(device=device, dtype=torch.int64)
    if token_mask.shape[1] > 1 and bool((token_mask[:, 1:] > token_mask[:, :-1]).any()):
        raise ValueError("`token_mask` must be right-padded (real tokens first in each row)")
    step = token_mask.cumsum(1)  # 1..k over real tokens
    width = sparse.attention_mask.shape[1]
    last_col = (width - 1 - sparse.attention_mask.flip(1).argmax(1)).clamp(min=0)
    last_pos = sparse.position_ids[0].gather(1, last_col[:, None])[:, 0]
    last_pos = torch.where(sparse.attention_mask.sum(1) > 0, last_pos, torch.full_like(last_pos, -1))
    new_pos = (last_pos[:, None] + step) * token_mask
    attention = torch.cat([sparse.attention_mask, token_mask], dim=1)
    embeds = torch.cat([sparse.inputs_embeds, base.get_input_embeddings()(token_ids)], dim=1)
    return dataclasses.replace(
        sparse,
        input_ids=torch.cat([sparse.input_ids, token_ids], dim=1),
        inputs_embeds=embeds,
        attention_mask=attention,
        position_ids=torch.cat([sparse.position_ids, new_pos[None].expand(3, -1, -1)], dim=2),
        text_position_ids=(attention.cumsum(1) - 1).clamp(min=0) * attention,
        source_index=torch.cat([sparse.source_index, torch.full_like(token_ids, -1)], dim=1),
    )


def sparse_generate(model, sparse: SparseInputs, **generate_kwargs) -> Tensor:
    """Samples responses from the sparse inputs with ``model.generate`` (KV cache; the M-RoPE
    positions continue from the dense sequence's next position).

    ``sparse`` must be left-padded. ``generate_kwargs`` go to ``generate``
    (``max_new_tokens``, ``do_sample``, ``num_return_sequences`` (rows repeat each sample
    consecutively), ``temperature``, ...). Returns the new token ids ``[B * num_return, R]``
    (padded with the generation config's pad id after EOS).
    """
    if not isinstance(sparse, SparseInputs):
        raise TypeError(f"`sparse` must be a SparseInputs, got {type(sparse).__name__}")
    if sparse.padding_side != "left" and bool((sparse.attention_mask[:, -1] == 0).any()):
        raise ValueError("`sparse` must be left-padded for generate (padding_side='left')")
    for key in ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "pixel_values"):
        if key in generate_kwargs:
            raise ValueError(f"`{key}` comes from `sparse`; do not pass it to sparse_generate")
    out = model.generate(**sparse.model_inputs(), **generate_kwargs)
    return out.sequences if hasattr(out, "sequences") else out


def take_samples(
    batch: dict,
    index: Sequence[int],
    *,
    image_token_id: int,
    merge_size: int = 2,
    image_embeds: Optional[Tensor] = None,
) -> dict:
    """Rows ``index`` of a processor batch (any order, repeats allowed), each with its images.

    Returns the same keys as ``batch`` (``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``; ``texts`` when present)
    plus ``image_embeds`` when given (``[N, D]`` features of ``batch``'s images, taken the
    same way; differentiable). Columns are not re-padded (a column of padding in every taken
    row stays). Raises ``ValueError`` for an unknown key or an index out of range.
    """
    unknown = sorted(set(batch) - set(_BATCH_KEYS) - {"texts"})
    if unknown:
        raise ValueError(f"`batch`: unknown key(s) {unknown}; allowed: {sorted(_BATCH_KEYS + ('texts',))}")
    ids = batch["input_ids"]
    n = ids.shape[0]
    index = [int(i) for i in index]
    if any(i < 0 or i >= n for i in index):
        raise ValueError(f"`index` must hold rows in [0, {n}), got {index}")
    rows = torch.tensor(index, dtype=torch.int64)
    out: dict = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            out[key] = batch[key][rows.to(batch[key].device)]
    if "texts" in batch:
        out["texts"] = [batch["texts"][i] for i in index]
    grid = batch.get("image_grid_thw")
    if grid is None:
        if image_embeds is not None and image_embeds.shape[0]:
            raise ValueError("`batch` has no image_grid_thw to split `image_embeds` by sample")
        return out
    grid_cpu = grid.to("cpu", torch.int64)
    mask = batch.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    counts = (grid_cpu.prod(-1) // (merge_size * merge_size)).tolist()
    owner = _image_samples(((ids == image_token_id) & real).cpu(), counts)
    patches = grid_cpu.prod(-1).tolist()

    def spans(sizes: list[int]) -> list[tuple[int, int]]:
        starts = [0] * n
        ends = [0] * n
        pos = 0
        first = [True] * n
        for size, o in zip(sizes, owner):
            if first[o]:
                starts[o] = pos
                first[o] = False
            pos += size
            ends[o] = pos
        return list(zip(starts, ends))

    def take(x: Tensor, sizes: list[int]) -> Tensor:
        sp = spans(sizes)
        parts = [x[sp[i][0]:sp[i][1]] for i in index]
        return torch.cat(parts) if parts else x[:0]

    out["image_grid_thw"] = take(grid, [1] * len(owner))
    if "pixel_values" in batch:
        out["pixel_values"] = take(batch["pixel_values"], patches)
    if image_embeds is not None:
        if image_embeds.dim() != 2 or image_embeds.shape[0] != sum(counts):
            raise ValueError(f"`image_embeds` must be [N, D] with N = {sum(counts)}, got {tuple(image_embeds.shape)}")
        out["image_embeds"] = take(image_embeds, counts)
    return out


def repeat_samples(
    batch: dict,
    repeats: int,
    *,
    image_token_id: int,
    merge_size: int = 2,
    image_embeds: Optional[Tensor] = None,
) -> dict:
    """Repeats every sample of a processor batch ``repeats`` times, consecutively (sample b
    becomes rows ``b * repeats ... b * repeats + repeats - 1``), images included - e.g. one
    sparse prompt per localization rollout before :func:`sparse_stream_inputs`.

    Args:
        batch: the processor's dict: ``input_ids`` ``[B, L]`` and optionally
            ``attention_mask``, ``mm_token_type_ids`` (repeated along dim 0),
            ``image_grid_thw`` ``[I, 3]`` and ``pixel_values`` ``[sum(t*h*w), C]`` (each
            sample's images / patch rows repeated), ``texts`` (a list, repeated). Other keys
            are an error.
        repeats: a positive int.
        image_token_id: the model's ``<|image_pad|>`` id (assigns images to samples).
        merge_size: the vision merger's spatial merge (2 for Qwen2.5-VL).
        image_embeds: optional ``[N, D]`` visual features of the batch; returned repeated the
            same way under ``"image_embeds"`` (saves running the vision tower per copy).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive int, got {repeats!r}")
    if batch.get("image_grid_thw") is None and (image_embeds is not None or "pixel_values" in batch):
        raise ValueError("`batch` has no image_grid_thw to split the images by sample")
    index = [b for b in range(batch["input_ids"].shape[0]) for _ in range(repeats)]
    return take_samples(batch, index, image_token_id=image_token_id, merge_size=merge_size,
                        image_embeds=image_embeds)


