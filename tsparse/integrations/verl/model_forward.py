"""The model forward installed by ``impl_backend=tsparse``: log-probs and entropy from
tsparse's fused ops, and the visual-token pruning hook for Qwen2.5-VL / Qwen2-VL.

verl's FSDP engine, with ``use_fused_kernels=True``, calls the model with
``temperature``, ``return_dict`` and (packed inputs) ``shift_labels`` and reads
``output.log_probs`` / ``output.entropy`` (``[1, nnz]`` packed, ``[B, L]`` padded). For its
own backends verl installs ``forward_with_torch_backend`` / ``..._triton_backend``
(``verl/models/transformers/qwen2_vl.py``); for ``tsparse`` it prints "Skipping monkey patch"
and tsparse installs :func:`qwen2_vl_forward_tsparse` (VL models) or
:func:`causal_lm_forward_tsparse` (text LMs) instead, with the same contract.

Pruning (``prune_visual``, packed inputs only). Boxes travel in each sample's
``multi_modal_inputs``, which verl's ``extract_multi_modal_inputs`` concatenates over the
micro-batch in image order (the order of ``image_grid_thw``) and passes to the forward:

* ``tsparse_prune`` int ``[I]``: 1 = prune this image to its boxes, 0 = keep all its tokens
  (dense samples, e.g. the localization stream);
* ``tsparse_box_counts`` int ``[I]``: boxes of each image;
* ``tsparse_boxes`` float ``[sum(counts), 4]``: normalized ``(x1, y1, x2, y2)``.

After the vision tower, the pruned images' tokens go through
:func:`tsparse.ops.select_visual_tokens` (the rollout's options: ``fuse``, ``fallback``,
``margin``, ``min_coverage``), the dropped ``<|image_pad|>`` rows leave the packed sequence
(:func:`tsparse.ops.pack_varlen` with ``keep``) and the 4-row position ids
(:func:`tsparse.ops.pack_position_ids`: every kept token keeps the ORIGINAL M-RoPE position
verl computed on the full sequence), the language model runs on the kept tokens only, and the
log-probs / entropy of the kept positions are scattered back to the full ``nnz``
(:func:`tsparse.ops.unpack_varlen`), because verl computed labels, response offsets and
nested-tensor offsets on the full sequence before the model ran. Pruned positions are prompt
(image) tokens, outside every response mask; their log-prob and entropy are 0. Each
sequence's first token (text position 0) is kept - verl derives ``cu_seqlens`` from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...ops import pack_position_ids, pack_varlen, select_visual_tokens, unpack_varlen
from .options import TsparseOptions

__all__ = [
    "PRUNE_KEYS",
    "PruneStats",
    "qwen2_vl_forward_tsparse",
    "causal_lm_forward_tsparse",
    "last_prune_stats",
]

#: The ``multi_modal_inputs`` keys that carry the boxes (popped before the model sees kwargs).
PRUNE_KEYS = ("tsparse_prune", "tsparse_box_counts", "tsparse_boxes")


@dataclass
class PruneStats:
    """What the last pruned forward did (for metrics and tests)."""

    tokens_in: int  #: packed tokens before pruning
    tokens_to_lm: int  #: packed tokens the language model saw
    visual_tokens: int  #: visual tokens of the micro-batch
    visual_kept: int  #: visual tokens kept (pruned images' kept + dense images' all)
    kept_index: Tensor  #: int64 ``[tokens_to_lm]``: packed position of each token the LM saw


_LAST_STATS: list = [None]


def last_prune_stats() -> Optional[PruneStats]:
    """The :class:`PruneStats` of the last pruned forward in this process (``None`` if none)."""
    return _LAST_STATS[0]


def _options(model) -> TsparseOptions:
    opts = getattr(model, "_tsparse_options", None)
    return opts if isinstance(opts, TsparseOptions) else TsparseOptions()


def _rolled_labels(input_ids: Optional[Tensor], labels: Optional[Tensor], shift_labels: Optional[Tensor]) -> Tensor:
    # As verl's forward_with_torch_backend (issue #6068): the engine's labels win.
    if shift_labels is not None:
        return shift_labels
    if labels is not None:
        return torch.roll(labels, shifts=-1, dims=-1)
    if input_ids is not None:
        return torch.roll(input_ids, shifts=-1, dims=-1)
    raise RuntimeError("tsparse forward: one of `shift_labels`, `labels` or `input_ids` is required")


def _through_module(module, fn, *args):
    """``fn(module.weight, *args)`` called THROUGH ``module`` (its forward temporarily ``fn``):
    under FSDP2 verl shards ``lm_head`` as its own unit, so its weight is only a full tensor
    inside its own forward, and only a forward call registers the hooks that reduce-scatter
    the weight's gradient. A plain module is called directly."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()  # noqa: N806
    if not (FSDPModule and isinstance(module, FSDPModule)):
        return fn(module.weight, *args)
    module.forward = lambda *a: fn(module.weight, *a)
    try:
        return module(*args)
    finally:
        del module.forward


def _token_logprobs(model, hidden: Tensor, labels: Tensor, temperature: float, opts: TsparseOptions):
    """``(logp [T], entropy [T])`` float32 of ``hidden [T, D]`` under the LM head."""
    labels = labels.to(torch.int64)
    if opts.logprobs and opts.fused_linear:
        from ...ops import fused_linear_logprobs

        def fused(weight, h, y):
            if h.dtype != weight.dtype:
                h = h.to(weight.dtype)
            return fused_linear_logprobs(
                h, weight, y, temperature=float(temperature), return_entropy=True, chunk_size=opts.chunk_size
            )

        return _through_module(model.lm_head, fused, hidden, labels)
    logits = model.lm_head(hidden)
    if opts.logprobs:
        from ...ops import logprobs

        return logprobs(logits, labels, temperature=float(temperature), return_entropy=True)
    # verl's own math (the logprobs switch off): scale, then its log-softmax and entropy.
    import verl.utils.torch_functional as verl_F

    if float(temperature) != 1.0:
        logits = logits / float(temperature)
    return verl_F.logprobs_from_logits(logits, labels), verl_F.entropy_from_logits(logits)


def _ppo_output(log_probs: Tensor, entropy: Tensor):
    from verl.models.transformers.qwen2_vl import Qwen2VLCausalLMOutputForPPO

    return Qwen2VLCausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, hidden_states=None)


def _prune_requested(prune: Optional[Tensor], opts: TsparseOptions) -> bool:
    if prune is None or prune.numel() == 0:
        return False
    return bool(prune.detach().to("cpu").any())


def _check_prune_inputs(prune: Tensor, counts: Optional[Tensor], boxes: Optional[Tensor], num_images: int) -> None:
    if counts is None or boxes is None:
        raise ValueError(
            "tsparse pruning: `multi_modal_inputs` carries `tsparse_prune` but not `tsparse_box_counts` and "
            "`tsparse_boxes` (every sample with images needs all three)"
        )
    if prune.dim() != 1 or prune.shape[0] != num_images or counts.shape != prune.shape:
        raise ValueError(
            f"tsparse pruning: `tsparse_prune` {tuple(prune.shape)} and `tsparse_box_counts` {tuple(counts.shape)} "
            f"must have one entry per image ({num_images} in `image_grid_thw`); every sample with images must "
            "carry the tsparse keys in its multi_modal_inputs (0 = dense)"
        )
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != int(counts.sum()):
        raise ValueError(
            f"tsparse pruning: `tsparse_boxes` must be [sum(tsparse_box_counts), 4] = [{int(counts.sum())}, 4], "
            f"got {tuple(boxes.shape)}"
        )


def _pruned_language_model(
    model,
    input_ids: Tensor,
    position_ids: Tensor,
    pixel_values: Tensor,
    image_grid_thw: Tensor,
    prune: Tensor,
    counts: Tensor,
    boxes: Tensor,
    opts: TsparseOptions,
    kwargs: dict,
):
    """Packed ``[1, nnz]`` inputs -> ``(hidden [nnz', D], kept_index [nnz'])`` with the pruned
    images' dropped tokens removed before the language model."""
    from verl.models.transformers.qwen2_vl import process_position_ids
    from verl.utils.transformers_compat import unpack_visual_output

    base = model.model
    cfg = model.config
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or position_ids is None or position_ids.dim() != 3:
        raise ValueError(
            "tsparse pruning needs verl's packed inputs (input_ids [1, nnz], position_ids [4, 1, nnz]): "
            "set actor_rollout_ref.model.use_remove_padding=True"
        )
    grid = image_grid_thw.to("cpu", torch.int64)
    merge = int(getattr(cfg.vision_config, "spatial_merge_size", 2))
    patch = int(getattr(cfg.vision_config, "patch_size", 14))
    num_images = grid.shape[0]
    prune_cpu = prune.detach().to("cpu", torch.int64).reshape(-1)
    counts_cpu = counts.detach().to("cpu", torch.int64).reshape(-1)
    _check_prune_inputs(prune_cpu, counts_cpu, boxes, num_images)

    embed = base.get_input_embeddings()
    device = input_ids.device
    inputs_embeds = embed(input_ids)  # [1, nnz, D]
    image_embeds, _ = unpack_visual_output(base.visual(pixel_values.type(base.visual.dtype), grid_thw=image_grid_thw))
    image_embeds = image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
    tokens_per_image = (grid.prod(-1) // (merge * merge)).tolist()
    n_visual = sum(tokens_per_image)
    img_pos = torch.nonzero(input_ids[0] == int(cfg.image_token_id)).reshape(-1)
    if img_pos.numel() != n_visual or image_embeds.shape[0] != n_visual:
        raise ValueError(
            f"tsparse pruning: {img_pos.numel()} <|image_pad|> tokens, {image_embeds.shape[0]} image features and "
            f"{n_visual} tokens from image_grid_thw do not agree"
        )

    # Per-image rows of the visual features; the pruned images go through select_visual_tokens.
    starts = [0]
    for c in tokens_per_image:
        starts.append(starts[-1] + c)
    pruned_imgs = [i for i in range(num_images) if prune_cpu[i] != 0]
    keep_visual = torch.ones(n_visual, dtype=torch.bool, device=device)
    visual_rows = image_embeds
    if pruned_imgs:
        box_starts = [0]
        for c in counts_cpu.tolist():
            box_starts.append(box_starts[-1] + c)
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in pruned_imgs]).to(device)
        sub_boxes = torch.cat([boxes[box_starts[i]: box_starts[i + 1]].to("cpu", torch.float32) for i in pruned_imgs])
        sub_off = [0]
        for i in pruned_imgs:
            sub_off.append(sub_off[-1] + int(counts_cpu[i]))
        p = opts.pruning
        sel = select_visual_tokens(
            image_embeds.index_select(0, rows), sub_boxes, torch.tensor(sub_off, dtype=torch.int64), grid[pruned_imgs],
            fuse=p.fuse, empty="keep_all" if p.fallback == "full_image" else "drop_all",
            patch_size=patch, merge_size=merge, margin=p.margin, min_coverage=p.min_coverage,
        )
        keep_visual[rows] = sel.keep.to(device)
        # Kept rows of the pruned images get their (fused) embeddings; other rows unchanged.
        kept_rows = rows[sel.index.to(device)]
        visual_rows = image_embeds.index_copy(0, kept_rows, sel.embeds.to(image_embeds.dtype))

    mask = torch.zeros_like(inputs_embeds, dtype=torch.bool)
    mask[0, img_pos] = True
    inputs_embeds = inputs_embeds.masked_scatter(mask, visual_rows)

    keep = torch.ones_like(input_ids, dtype=torch.bool)
    keep[0, img_pos] = keep_visual
    ones = torch.ones_like(input_ids, dtype=torch.bool)
    packed = pack_varlen(inputs_embeds, ones, keep=keep)  # one host sync: the kept length
    kept_index = packed.indices
    kept_pos = pack_position_ids(position_ids, kept_index)  # [4, 1, nnz']
    starts_before = int((position_ids[0, 0] == 0).sum())
    starts_after = int((kept_pos[0, 0] == 0).sum())
    if starts_before != starts_after:  # cannot happen for image tokens; guards verl's cu_seqlens
        raise RuntimeError("tsparse pruning dropped a sequence's first token (text position 0)")

    kwargs = dict(kwargs)
    kwargs.pop("attention_mask", None)
    out = base.language_model(
        input_ids=None,
        inputs_embeds=packed.values.unsqueeze(0),
        position_ids=process_position_ids(kept_pos),
        attention_mask=None,
        **kwargs,
    )
    _LAST_STATS[0] = PruneStats(
        tokens_in=int(input_ids.shape[1]), tokens_to_lm=int(kept_index.numel()), visual_tokens=n_visual,
        visual_kept=int(keep_visual.sum()), kept_index=kept_index.detach(),
    )
    return out[0][0], kept_index


def qwen2_vl_forward_tsparse(
    self,
    input_ids: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    shift_labels: Optional[Tensor] = None,
    tsparse_prune: Optional[Tensor] = None,
    tsparse_box_counts: Optional[Tensor] = None,
    tsparse_boxes: Optional[Tensor] = None,
    **kwargs,
):
    """Qwen2.5-VL / Qwen2-VL forward under ``impl_backend=tsparse`` (installed on the model
    class). Returns verl's ``Qwen2VLCausalLMOutputForPPO`` with ``log_probs`` and ``entropy``
    shaped like ``input_ids`` (float32)."""
    opts = _options(self)
    kwargs.pop("return_dict", None)
    rolled = _rolled_labels(input_ids, labels, shift_labels)
    if opts.prune_visual and _prune_requested(tsparse_prune, opts):
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("tsparse pruning supports images only; this micro-batch carries videos")
        pixel_values = kwargs.pop("pixel_values", None)
        image_grid_thw = kwargs.pop("image_grid_thw", None)
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("tsparse pruning: `tsparse_prune` is set but the micro-batch has no pixel_values")
        kwargs.pop("video_grid_thw", None)
        kwargs.pop("pixel_values_videos", None)
        position_ids = kwargs.pop("position_ids", None)
        hidden, kept = _pruned_language_model(
            self, input_ids, position_ids, pixel_values, image_grid_thw, tsparse_prune, tsparse_box_counts,
            tsparse_boxes, opts, kwargs,
        )
        lp, ent = _token_logprobs(self, hidden, rolled[0].index_select(0, kept), temperature, opts)
        n = input_ids.shape[1]
        log_probs = unpack_varlen(lp, kept, 1, n)
        entropy = unpack_varlen(ent, kept, 1, n)
        return _ppo_output(log_probs, entropy)
    if not opts.prune_visual and _prune_requested(tsparse_prune, opts):  # else already asked above
        raise ValueError(
            "this micro-batch asks for pruned images (multi_modal_inputs.tsparse_prune) but "
            "actor_rollout_ref.model.fused_kernel_options.prune_visual is false: the policy would train on "
            "tokens the rollout did not see"
        )
    from verl.models.transformers.qwen2_vl import qwen2_vl_forward

    outputs = qwen2_vl_forward(self, input_ids, **kwargs)
    hidden = outputs[0]
    shape = hidden.shape[:-1]
    lp, ent = _token_logprobs(self, hidden.reshape(-1, hidden.shape[-1]), rolled.reshape(-1), temperature, opts)
    return _ppo_output(lp.view(shape), ent.view(shape))


def causal_lm_forward_tsparse(
    self,
    input_ids: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    shift_labels: Optional[Tensor] = None,
    **kwargs,
):
    """Text-only causal LM forward under ``impl_backend=tsparse`` (``model.model`` +
    ``model.lm_head``, as verl's ``dense_common`` backends assume). No pruning."""
    opts = _options(self)
    kwargs.pop("return_dict", None)
    for key in PRUNE_KEYS:
        kwargs.pop(key, None)
    rolled = _rolled_labels(input_ids, labels, shift_labels)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    hidden = outputs[0]
    shape = hidden.shape[:-1]
    lp, ent = _token_logprobs(self, hidden.reshape(-1, hidden.shape[-1]), rolled.reshape(-1), temperature, opts)
    return _ppo_output(lp.view(shape), ent.view(shape))
