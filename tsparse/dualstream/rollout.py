"""Rollouts of the two streams with HF ``generate`` (sampling, G per group).

One training step of the dual-stream method (``shared/notes/method.md``) samples:

1. :func:`rollout_localization` - G localization responses per question from the DENSE
   prompt (every visual token), decoded and parsed into evidence boxes
   (:func:`~tsparse.dualstream.format.parse_boxes`; a response without a usable box makes
   its sparse prompt fall back, as ``configs/dualstream.yaml`` ``pruning.fallback`` says);
2. :func:`rollout_sparse` - for each localization response O_i, the sparse stream's prompt
   pruned to O_i's boxes (:func:`~tsparse.dualstream.pruning.sparse_stream_inputs`: token
   selection + fusion, original M-RoPE positions) and G' responses sampled from it.

Rows are ordered as :mod:`~tsparse.dualstream.advantages` expects: localization rows
question-major (row ``q * G + i``), sparse rows ``(q * G + i) * G' + j``.

Helpers shared with the trainer's log-prob forward: :class:`Responses` (ids, mask through
the first stop token, texts), :func:`batch_image_features`, :func:`take_samples` (any rows of
a processor batch, images following), :func:`dense_stream_inputs` (the identity pruning, so
both streams use one forward layout). Greedy inference and evaluation are :mod:`tsparse.infer`
and :mod:`tsparse.eval`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .._nvtx import nvtx_range
from .config import PruningConfig, StreamPrompt
from .format import parse_boxes
from .pruning import (
    _BATCH_KEYS,
    SparseInputs,
    _base_model,
    assemble_sparse_inputs,
    image_features,
    sparse_stream_inputs,
    take_samples,
)

__all__ = [
    "FULL_IMAGE",
    "GenerationOptions",
    "Responses",
    "stop_token_ids",
    "response_mask",
    "make_responses",
    "tokenize_targets",
    "batch_image_features",
    "take_samples",
    "dense_stream_inputs",
    "LocalizationRollout",
    "SparseRollout",
    "rollout_localization",
    "rollout_sparse",
    "phase",
]

#: A box covering the whole image: pruning to it (without fusion) is the identity.
FULL_IMAGE = ((0.0, 0.0, 1.0, 1.0),)


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings of one stream's rollout.

    ``max_new_tokens`` (>= 1); ``do_sample`` (``False``: greedy); ``temperature`` (> 0; the
    training log-probs use the same temperature, as verl does); ``top_p`` in (0, 1];
    ``top_k`` (0: off).
    """

    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive int, got {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"`do_sample` must be a bool, got {self.do_sample!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"`temperature` must be a finite number > 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` must be an int >= 0, got {self.top_k!r}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate`` (every sampling knob explicit, so a
        checkpoint's ``generation_config`` cannot silently change the rollout policy)."""
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None,
                    "top_p": None, "top_k": None}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "top_k": int(self.top_k)}


@dataclass
class Responses:
    """Generated (or target) responses of ``N`` rows.

    ``ids``: int64 ``[N, R]`` (right-padded); ``mask``: int64 ``[N, R]``, 1 on the response's
    tokens up to and including its first stop token (the whole row when it never stopped);
    ``texts``: the decoded responses (special tokens removed).
    """

    ids: Tensor
    mask: Tensor
    texts: list

    @property
    def lengths(self) -> Tensor:
        """int64 ``[N]``: tokens per response."""
        return self.mask.sum(1)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def __len__(self) -> int:
        return self.ids.shape[0]


def stop_token_ids(model, processor=None) -> list[int]:
    """The ids that end a response: the model's ``generation_config.eos_token_id`` (an int
    or a list), plus the tokenizer's EOS."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, (list, tuple)):
        ids += [int(e) for e in eos]
    tok = getattr(processor, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    out = sorted(set(ids))
    if not out:
        raise ValueError("no stop token: the model's generation_config has no eos_token_id")
    return out


def response_mask(ids: Tensor, stop_ids: Sequence[int]) -> Tensor:
    """int64 ``[N, R]``: 1 on each row's tokens up to and including its first stop token
    (``generate`` pads finished rows), all 1 on a row without a stop token (truncated)."""
    if ids.dim() != 2:
        raise ValueError(f"`ids` must be [N, R], got shape {tuple(ids.shape)}")
    stop = torch.zeros_like(ids, dtype=torch.bool)
    for s in stop_ids:
        stop |= ids == int(s)
    before = stop.to(torch.int64).cumsum(1) - stop.to(torch.int64)  # stops strictly before each column
    return (before == 0).to(torch.int64)


def make_responses(processor, ids: Tensor, stop_ids: Sequence[int]) -> Responses:
    """Generated ids ``[N, R]`` -> :class:`Responses` (mask through the first stop token;
    texts decoded from the masked tokens, special tokens removed)."""
    ids = ids.to(torch.int64)
    mask = response_mask(ids, stop_ids)
    rows = ids.cpu().tolist()
    lens = mask.sum(1).tolist()
    texts = [processor.decode(r[:n]) for r, n in zip(rows, lens)]
    return Responses(ids, mask, texts)


def tokenize_targets(processor, texts: Sequence[str], *, device=None) -> Responses:
    """Supervised targets -> right-padded :class:`Responses`: each text is tokenized and ends
    with the tokenizer's EOS (``<|im_end|>`` for Qwen), so the model learns to stop."""
    tok = processor.tokenizer
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the targets with")
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [int(tok.eos_token_id)] for t in texts]
    width = max((len(r) for r in rows), default=0)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[k, : len(r)] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return Responses(ids, mask, list(texts))


# --------------------------------------------------------------------------------------
def batch_image_features(model, batch: dict) -> Tensor:
    """``[N, D]`` merged visual tokens of every image in a processor batch (Qwen2.5-VL order;
    :func:`~tsparse.dualstream.pruning.image_features`), in the embeddings' dtype;
    differentiable when autograd is on. ``[0, D]`` when the batch has no image."""
    embed = _base_model(model).get_input_embeddings()
    if batch.get("pixel_values") is None:
        return embed.weight.new_zeros((0, embed.weight.shape[1]))
    return image_features(model, batch["pixel_values"], batch["image_grid_thw"]).to(embed.weight.dtype)


def dense_stream_inputs(model, batch: dict, *, image_embeds: Tensor) -> SparseInputs:
    """The DENSE stream's inputs in :class:`~tsparse.dualstream.pruning.SparseInputs` form:
    every visual token kept, with the model's own M-RoPE positions (what pruning to a
    full-image box without fusion gives - the dense-equivalence test of the pruning module -
    without computing a box mask). Both streams then share one forward layout
    (``inputs_embeds`` + 4-row positions, responses appended with
    :func:`~tsparse.dualstream.pruning.extend_sparse_inputs`)."""
    grid = batch.get("image_grid_thw")
    if grid is None:
        grid = torch.zeros((0, 3), dtype=torch.int64)
    keep_all = torch.ones(image_embeds.shape[0], dtype=torch.bool, device=image_embeds.device)
    return assemble_sparse_inputs(model, batch["input_ids"], batch.get("attention_mask"), grid, keep_all,
                                  image_embeds, padding_side="left")


def _prompt_tensors(batch: dict) -> dict:
    return {k: batch[k] for k in _BATCH_KEYS if k in batch}


def _generate_inputs(batch: dict, device: Optional[torch.device] = None) -> dict:
    """The prompt tensors for ``generate``, every one on ``device`` (default: the ids'),
    ``image_grid_thw`` included: HF's Qwen2.5-VL vision tower builds its rotary ids (and
    cu_seqlens) on the grid's device, so a grid left on the CPU fails against a GPU model."""
    out = _prompt_tensors(batch)
    dev = out["input_ids"].device if device is None else device
    return {k: v.to(dev) for k, v in out.items()}


class _Phase:
    """Times a phase (synchronizing CUDA at both ends so the time is the phase's own) and
    wraps it in an NVTX range (``TSPARSE_NVTX=1``)."""

    def __init__(self, name: str, timings: Optional[dict], device: torch.device):
        self.name, self.timings, self.device = name, timings, device
        self._nvtx = nvtx_range(name)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._nvtx.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        self._nvtx.__exit__(*exc)
        if self.timings is not None:
            self.timings[self.name] = self.timings.get(self.name, 0.0) + dt
        return False


def phase(name: str, timings: Optional[dict] = None, device: Union[str, torch.device] = "cpu") -> _Phase:
    """Context manager: adds the wall time of the block to ``timings[name]`` (CUDA
    synchronized at both ends) and marks it as an NVTX range ``name``."""
    return _Phase(name, timings, torch.device(device))


# --------------------------------------------------------------------------------------
@dataclass
class LocalizationRollout:
    """G localization responses per question.

    ``prompt``: the processor batch of the Q dense prompts (left-padded); ``image_embeds``:
    their visual features ``[N, D]`` (computed once, no grad; the sparse stream reuses them);
    ``responses``: ``Q * G`` rows, row ``q * G + i``; ``boxes``: the parsed boxes of each row.
    """

    prompt: dict
    image_embeds: Tensor
    group_size: int
    responses: Responses
    boxes: list
    timings: dict = field(default_factory=dict)

    @property
    def question_index(self) -> list[int]:
        """The question of each response row."""
        return [r // self.group_size for r in range(len(self.responses))]

    @property
    def box_rate(self) -> float:
        """Fraction of responses with at least one usable box."""
        return sum(1 for b in self.boxes if b.boxes) / max(len(self.boxes), 1)


@dataclass
class SparseRollout:
    """G' sparse responses per localization response.

    ``prompt``: the processor batch of the Q sparse prompts; ``parent_boxes``: the boxes of
    each localization row (``Q * G``); ``inputs``: the pruned prompts of those rows;
    ``responses``: ``Q * G * G'`` rows, row ``(q * G + i) * G' + j``.
    """

    prompt: dict
    parent_boxes: list
    parents_per_question: int
    inputs: SparseInputs
    group_size: int
    responses: Responses
    timings: dict = field(default_factory=dict)

    @property
    def parent_index(self) -> list[int]:
        """The localization row of each sparse response row."""
        return [r // self.group_size for r in range(len(self.responses))]

    @property
    def question_index(self) -> list[int]:
        return [r // (self.group_size * self.parents_per_question) for r in range(len(self.responses))]

    @property
    def keep_ratio(self) -> float:
        return self.inputs.keep_ratio

    @property
    def fallback_rate(self) -> float:
        f = self.inputs.fallback
        return float(f.float().mean()) if f.numel() else 0.0


@torch.no_grad()
def rollout_localization(
    model,
    processor,
    samples: Sequence[Any],
    prompt: StreamPrompt,
    options: GenerationOptions,
    *,
    group_size: int,
    max_boxes: Optional[int] = 4,
    device: Union[str, torch.device] = "cpu",
) -> LocalizationRollout:
    """Samples ``group_size`` localization responses per sample and parses their boxes.

    Args:
        model, processor: a Qwen2.5-VL model and its :class:`~tsparse.dualstream.models.VLProcessor`.
        samples: ``Q`` :class:`~tsparse.dualstream.data.VQASample` records.
        prompt: the localization stream's prompt (``configs/...`` ``prompts.localization``).
        options: sampling settings (greedy with ``do_sample=False``).
        group_size: G, responses per sample (rows repeat each sample consecutively).
        max_boxes: boxes kept per response by the parser (the strict format's limit).
        device: where the inputs go (the model's device).

    Timings (seconds) of ``encode``, ``vision`` (image features), ``generate`` and ``parse``
    are in ``.timings``.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}")
    device = torch.device(device)
    timings: dict = {}
    with phase("encode", timings, device):
        enc = processor.encode_samples(list(samples), prompt, device=device)
    with phase("vision", timings, device):
        feats = batch_image_features(model, enc)
    with phase("generate", timings, device):
        # From the features just computed (the dense stream's inputs_embeds): generate with
        # pixel_values would run the vision tower again on G copies of every image.
        dense = dense_stream_inputs(model, enc, image_embeds=feats)
        out = model.generate(**dense.model_inputs(), num_return_sequences=group_size, **options.generate_kwargs())
        ids = out.sequences if hasattr(out, "sequences") else out
    with phase("parse", timings, device):
        responses = make_responses(processor, ids, stop_token_ids(model, processor))
        boxes = [parse_boxes(t, max_boxes=max_boxes) for t in responses.texts]
    return LocalizationRollout(enc, feats, group_size, responses, boxes, timings)


@torch.no_grad()
def rollout_sparse(
    model,
    processor,
    samples: Sequence[Any],
    prompt: StreamPrompt,
    boxes: Sequence[Any],
    options: GenerationOptions,
    *,
    parents_per_question: int,
    group_size: int,
    pruning: Optional[PruningConfig] = None,
    image_embeds: Optional[Tensor] = None,
    device: Union[str, torch.device] = "cpu",
) -> SparseRollout:
    """Prunes the sparse prompt of every localization response to its boxes and samples
    ``group_size`` responses from each.

    Args:
        samples: the ``Q`` samples of the localization rollout.
        prompt: the sparse stream's prompt.
        boxes: ``Q * parents_per_question`` entries (a :class:`~tsparse.dualstream.format.BoxParse`,
            a list of boxes or ``None``), row ``q * G + i`` for localization response O_i of
            question q.
        parents_per_question: G.
        group_size: G', responses per localization response.
        pruning: token selection / fusion / fallback settings (``configs`` ``pruning``).
        image_embeds: the ``Q`` samples' visual features (e.g. :attr:`LocalizationRollout.image_embeds`;
            the same images), else computed here.

    Timings of ``encode``, ``vision`` (when computed), ``prune`` and ``generate``.
    """
    for name, v in (("parents_per_question", parents_per_question), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    q = len(samples)
    if len(boxes) != q * parents_per_question:
        raise ValueError(f"`boxes` has {len(boxes)} entries for {q} samples x {parents_per_question} parents")
    device = torch.device(device)
    base = _base_model(model)
    timings: dict = {}
    with phase("encode", timings, device):
        enc = processor.encode_samples(list(samples), prompt, device=device)
    if image_embeds is None:
        with phase("vision", timings, device):
            image_embeds = batch_image_features(model, enc)
    with phase("prune", timings, device):
        index = [r // parents_per_question for r in range(q * parents_per_question)]
        rows = take_samples(_prompt_tensors(enc), index, image_token_id=int(base.config.image_token_id),
                            merge_size=int(getattr(base.config.vision_config, "spatial_merge_size", 2)),
                            image_embeds=image_embeds)
        grid = rows.get("image_grid_thw", torch.zeros((0, 3), dtype=torch.int64))
        inputs = sparse_stream_inputs(model, rows["input_ids"], rows["attention_mask"], grid, list(boxes),
                                      image_embeds=rows.get("image_embeds", image_embeds[:0]), config=pruning,
                                      padding_side="left")
    with phase("generate", timings, device):
        out = model.generate(**inputs.model_inputs(), num_return_sequences=group_size, **options.generate_kwargs())
        ids = out.sequences if hasattr(out, "sequences") else out
        responses = make_responses(processor, ids, stop_token_ids(model, processor))
    return SparseRollout(enc, list(boxes), parents_per_question, inputs, group_size, responses, timings)
