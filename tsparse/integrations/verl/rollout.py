"""The dual-stream rollout on the actor model (HF ``generate``), in verl's sample layout.

Why not vLLM (verl 0.9.1's rollout). verl's vLLM server adapter
(``verl/workers/rollout/vllm_rollout/vllm_async_server.py``) sends
``TokensPrompt(prompt_token_ids, multi_modal_data={"image": <PIL images>})``: vLLM re-runs
the vision tower itself and derives every visual token's M-RoPE position from the full
``image_grid_thw``. Box-pruned tokens - a subset of the grid, fused, at their ORIGINAL
positions - cannot be expressed: vLLM's precomputed ``image_embeds`` input must cover the whole
grid, and its image-pruning work (PR 38888, RFC 45098: ``--image-pruning-rate`` by ViT
attention score, server-wide, not per-request boxes) is unmerged. SGLang and TRT-LLM adapters
take raw images too. So the sparse stream runs with HF ``generate`` on the actor's own module
(always the current weights, no weight sync), through
:func:`tsparse.dualstream.pruning.sparse_stream_inputs` + ``sparse_generate`` - the same
:func:`tsparse.ops.select_visual_tokens` call (same boxes, same options) that the training
forward's pruning hook (:mod:`.model_forward`) makes, so the policy is trained on the tokens
the rollout saw (tested: rollout teacher-forced log-probs == the engine's log-probs).

This module gives:

* :func:`hf_generation_context` - inside a verl worker, verl has replaced the Qwen2.5-VL model
  and attention forwards (and under ``impl_backend=tsparse`` the model forward returns log-probs,
  not logits); ``generate`` needs transformers' own forwards with their KV cache. The context
  puts transformers' originals (snapshotted before verl patches them: :func:`snapshot_originals`,
  called by the plugin) back for the duration of generation.
* :func:`dual_stream_rollout` - localization (G per question, dense), parse boxes, prune,
  sparse reasoning (G' per localization rollout), composite rewards with cross-feedback
  (:func:`tsparse.dualstream.rewards.score_dual_stream`), GRPO group uids
  (:func:`~.advantages.group_uid`), per-image box keys for the training forward.
* :func:`to_verl_batch` - the sequences as verl's engine batch (the TensorDict layout its v1
  agent loop writes: nested ``input_ids`` / ``position_ids`` (4 rows) / ``prompts`` /
  ``responses`` / masks, ``multi_modal_inputs`` per sample, ``rm_scores``), plus
  ``tsparse_stream`` and the group ``uid``.

Generation under FSDP with several ranks passes ``synced_gpus=True`` (every rank runs the
same number of forwards). Wiring this rollout into verl's v1 trainer loop (between replay-buffer
sampling and ``compute_log_prob``) is not part of this module; see the README (verl section).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ...dualstream.advantages import LOCALIZATION, SPARSE
from ...dualstream.config import MethodConfig, PruningConfig, load_method_config
from ...dualstream.data import VQASample, build_messages, load_images
from ...dualstream.format import parse_boxes
from ...dualstream.pruning import sparse_generate, sparse_stream_inputs
from ...dualstream.rewards import GroundTruth, score_dual_stream
from ...dualstream.rollout import _generate_inputs, batch_image_features, dense_stream_inputs
from .advantages import group_uid
from .losses import STREAM_FIELD

__all__ = [
    "SequenceRecord",
    "RolloutResult",
    "snapshot_originals",
    "hf_generation_context",
    "full_parameters",
    "SparseRequest",
    "SparseResult",
    "sparse_phase",
    "sparse_prompt_ids",
    "dual_stream_rollout",
    "sequence_record",
    "to_verl_batch",
]

# What verl's apply_monkey_patch replaces for Qwen2-VL-family models (transformers >= 4.54),
# plus the forward tsparse installs: restored for generation.
_GEN_TARGETS = (
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "forward"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel", "forward"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLAttention", "forward"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLForConditionalGeneration", "forward"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel", "forward"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLAttention", "forward"),
    ("transformers.integrations.flash_attention", None, "_flash_attention_forward"),
)
_ORIGINALS: dict = {}


def _owner(module: str, cls: Optional[str]):
    mod = importlib.import_module(module)
    return getattr(mod, cls) if cls else mod


def _is_foreign(fn) -> bool:
    mod = getattr(fn, "__module__", "") or ""
    return mod.startswith("verl.") or mod.startswith("tsparse.")


def snapshot_originals() -> None:
    """Records transformers' own forwards (before verl's ``apply_monkey_patch`` replaces them).
    Called by the plugin when verl's engine module loads; safe to call again (an attribute
    already replaced by verl or tsparse is not recorded)."""
    for module, cls, name in _GEN_TARGETS:
        key = (module, cls, name)
        if key in _ORIGINALS:
            continue
        try:
            owner = _owner(module, cls)
        except (ImportError, AttributeError):
            continue
        fn = owner.__dict__.get(name) if cls else getattr(owner, name, None)
        if fn is not None and not _is_foreign(fn):
            _ORIGINALS[key] = fn


@contextlib.contextmanager
def hf_generation_context():
    """Transformers' own Qwen2-VL-family forwards for the duration of the block (then whatever
    verl / tsparse had installed again). ``RuntimeError`` when a patched forward has no
    recorded original (the plugin was not loaded before verl patched the model)."""
    snapshot_originals()
    swapped = []
    try:
        for module, cls, name in _GEN_TARGETS:
            try:
                owner = _owner(module, cls)
            except (ImportError, AttributeError):
                continue
            current = owner.__dict__.get(name) if cls else getattr(owner, name, None)
            if current is None or not _is_foreign(current):
                continue
            orig = _ORIGINALS.get((module, cls, name))
            if orig is None:
                raise RuntimeError(
                    f"{cls or module}.{name} is patched ({current.__module__}) and transformers' original was not "
                    "recorded: load tsparse's verl plugin before verl builds the model (it snapshots the originals)"
                )
            setattr(owner, name, orig)
            swapped.append((owner, name, current))
        yield
    finally:
        for owner, name, current in reversed(swapped):
            setattr(owner, name, current)


@contextlib.contextmanager
def full_parameters(model):
    """The module's full (unsharded) parameters for the block: pruning runs the vision tower
    outside the root module's forward, where FSDP would hand out shards. FSDP2 modules
    (verl's ``actor.strategy=fsdp2``) are unsharded and resharded afterwards (collective: every
    rank must enter); a plain module is left as it is. FSDP1 (``strategy=fsdp``) is refused:
    its flat parameters are not usable outside a forward, and generating inside
    ``summon_full_params`` is not supported by PyTorch."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule = ()  # noqa: N806
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        raise NotImplementedError(
            "the rollout on the actor needs FSDP2: set actor_rollout_ref.actor.strategy=fsdp2 (FSDP1's flat "
            "parameters cannot serve generate outside its forward)"
        )
    fsdp2 = [m for m in model.modules() if FSDPModule and isinstance(m, FSDPModule)]
    if fsdp2 and fsdp2[0] is model:
        # FSDP2 decides which module is the root on the first forward; the vision tower runs
        # outside the root's forward here, so settle the root first (else a later root
        # forward fails with "requires running forward through the root module first").
        model._get_fsdp_state()._lazy_init()
    for m in fsdp2:
        m.unshard()
    try:
        yield
    finally:
        for m in reversed(fsdp2):
            m.reshard()


def _generate_kwargs(extra: dict) -> dict:
    kw = dict(extra)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        kw.setdefault("synced_gpus", True)  # FSDP: every rank runs the same number of forwards
    return kw


# --------------------------------------------------------------------------------------
@dataclass
class SequenceRecord:
    """One rollout sequence, everything verl's engine needs for it.

    ``prompt_ids`` / ``response_ids``: int64 1-D (the response ends at EOS, inclusive, or at
    the length limit). ``pixel_values`` / ``image_grid_thw``: this sample's images (the full
    images: the sparse stream's pruning happens in the forward, from ``boxes``).
    ``prune``: per image, 1 = pruned to ``boxes`` (the sparse stream), 0 = dense.
    ``boxes``: the localization rollout's parsed boxes (applied to every image of the sample).
    ``uid``: the GRPO group (:func:`~.advantages.group_uid`); ``question``: the question's uid.
    """

    prompt_ids: Tensor
    response_ids: Tensor
    pixel_values: Tensor
    image_grid_thw: Tensor
    stream: int
    uid: str
    question: str
    parent: int
    score: float
    terms: dict
    text: str
    boxes: tuple = ()
    keep_ratio: float = 1.0
    fallback: bool = False

    @property
    def prune(self) -> Tensor:
        flag = 1 if self.stream == SPARSE else 0
        return torch.full((self.image_grid_thw.shape[0],), flag, dtype=torch.int64)


@dataclass
class RolloutResult:
    """What :func:`dual_stream_rollout` returns: the sequences (localization ones first, then
    sparse ones, each q-major) and per-phase metrics."""

    records: list
    metrics: dict = field(default_factory=dict)

    def stream(self, s: int) -> list:
        return [r for r in self.records if r.stream == s]


def _trim_response(row: Tensor, eos_ids: set, pad_id: int) -> Tensor:
    ids = row.tolist()
    out = []
    for t in ids:
        out.append(t)
        if t in eos_ids:
            break
    while out and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    if not out:  # generate produced nothing usable: keep one pad token so the sequence is valid
        out = [pad_id]
    return torch.tensor(out, dtype=torch.int64)


def _eos_ids(model) -> set:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _pad_id(model) -> int:
    gc = getattr(model, "generation_config", None)
    pad = getattr(gc, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model.config, "text_config", model.config), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _split_images(batch: dict, merge: int, image_token_id: int) -> list[tuple[Tensor, Tensor]]:
    """Per sample ``(pixel_values rows, image_grid_thw rows)`` of a processor batch."""
    grid = batch["image_grid_thw"].to(torch.int64)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    tokens = (grid.prod(-1) // (merge * merge)).tolist()
    patches = grid.prod(-1).tolist()
    per_row = ((ids == image_token_id) & mask).sum(1).tolist()
    out, img, pix = [], 0, 0
    for n in per_row:
        start_img, start_pix, acc = img, pix, 0
        while acc < n:
            acc += tokens[img]
            pix += patches[img]
            img += 1
        out.append((batch["pixel_values"][start_pix:pix], grid[start_img:img]))
    return out


def _unpadded(ids: Tensor, mask: Tensor) -> Tensor:
    return ids[mask.bool()].to(torch.int64)


@dataclass
class SparseRequest:
    """One sparse-stream prompt to answer: the sparse prompt's DENSE ids (every
    ``<|image_pad|>``), its images' ``pixel_values`` / ``image_grid_thw`` and the boxes of the
    localization rollout it comes from."""

    prompt_ids: Tensor
    pixel_values: Tensor
    image_grid_thw: Tensor
    boxes: tuple = ()


@dataclass
class SparseResult:
    """G' responses of one :class:`SparseRequest` and what pruning kept."""

    responses: list
    keep_ratio: float
    fallback: bool
    kept_tokens: int
    visual_tokens: int


def sparse_phase(
    model,
    requests: Sequence[SparseRequest],
    *,
    pruning: PruningConfig,
    n_sparse: int,
    generate_kwargs: Optional[dict] = None,
    pad_token_id: Optional[int] = None,
) -> list:
    """The sparse-reasoning stream for a batch of requests: prune each prompt's visual tokens to
    its boxes (:func:`tsparse.dualstream.pruning.sparse_stream_inputs`, ``pruning`` options) and
    sample ``n_sparse`` responses each (``sparse_generate``), with transformers' own forwards and
    the full parameters (FSDP). Returns one :class:`SparseResult` per request, in order."""
    if not requests:
        return []
    device = next(model.parameters()).device
    pad = _pad_id(model) if pad_token_id is None else int(pad_token_id)
    eos = _eos_ids(model)
    width = max(r.prompt_ids.shape[0] for r in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(requests), width), dtype=torch.int64)
    for b, r in enumerate(requests):  # left padding, as generate wants
        n = r.prompt_ids.shape[0]
        ids[b, width - n:] = r.prompt_ids
        mask[b, width - n:] = 1
    grid = torch.cat([r.image_grid_thw.to(torch.int64) for r in requests])
    pixels = torch.cat([r.pixel_values for r in requests])
    kw = _generate_kwargs({"do_sample": True, **(generate_kwargs or {})})
    with torch.no_grad(), hf_generation_context(), full_parameters(model):
        sparse = sparse_stream_inputs(
            model, ids.to(device), mask.to(device), grid, [r.boxes for r in requests], pixel_values=pixels.to(device),
            config=pruning, padding_side="left", pad_token_id=pad,
        )
        new = sparse_generate(model, sparse, num_return_sequences=int(n_sparse), **kw)
    fell_back = torch.zeros(len(requests), dtype=torch.bool)
    kept = torch.zeros(len(requests), dtype=torch.int64)
    total = torch.zeros(len(requests), dtype=torch.int64)
    if sparse.fallback.numel():
        fell_back.index_put_((sparse.image_sample,), sparse.fallback, accumulate=True)
        kept.index_add_(0, sparse.image_sample, sparse.kept_counts)
        total.index_add_(0, sparse.image_sample, sparse.total_counts)
    out = []
    for b in range(len(requests)):
        # generate from inputs_embeds returns the new tokens only
        rows = new[b * n_sparse:(b + 1) * n_sparse]
        out.append(SparseResult(
            [_trim_response(row.cpu(), eos, pad) for row in rows],
            float(kept[b]) / float(total[b]) if int(total[b]) else 1.0, bool(fell_back[b]), int(kept[b]), int(total[b]),
        ))
    return out


def sparse_prompt_ids(processor, method: MethodConfig, question: str, image_grid_thw: Tensor) -> Tensor:
    """The sparse stream's prompt ids for a question whose images are already processed
    (``image_grid_thw``, e.g. from verl's ``multi_modal_inputs``): the chat of
    ``method.prompts.sparse``, each ``<|image_pad|>`` expanded to its image's token count."""
    n_img = int(image_grid_thw.shape[0])
    sample = VQASample("q", tuple(f"image{k}" for k in range(n_img)), question, "-")
    text = processor.apply_chat_template(build_messages(sample, method.prompts.sparse))
    counts = (image_grid_thw.to(torch.int64).prod(-1) // (processor.merge_size ** 2)).tolist()
    parts = text.split(processor.image_token)
    if len(parts) - 1 != n_img:
        raise ValueError(f"the sparse prompt has {len(parts) - 1} image placeholders for {n_img} images")
    expanded = parts[0] + "".join(processor.image_token * c + p for c, p in zip(counts, parts[1:]))
    ids = processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def dual_stream_rollout(
    model,
    processor,
    samples: Sequence[VQASample],
    *,
    method: Optional[MethodConfig] = None,
    n_localization: Optional[int] = None,
    n_sparse: Optional[int] = None,
    stage: int = 2,
    question_uids: Optional[Sequence[str]] = None,
    max_new_tokens: int = 256,
    generate_kwargs: Optional[dict] = None,
    localization_texts: Optional[Sequence[Sequence[str]]] = None,
    suppress_vision_tokens: bool = True,
) -> RolloutResult:
    """Two-stream rollout with HF ``generate`` on ``model`` (the actor's module, FSDP-wrapped
    or not).

    Args:
        model: a Qwen2.5-VL ``...ForConditionalGeneration`` (inside a verl worker: the engine's
            module; generation runs in :func:`hf_generation_context`).
        processor: a :class:`tsparse.dualstream.models.VLProcessor`.
        samples: the questions (ViTAR-16K records).
        method: prompts, reward weights, pruning and grouping (default ``configs/dualstream.yaml``).
        n_localization, n_sparse: G and G' (default: ``method.advantages``).
        stage: 1 = localization only (no sparse stream, no cross-feedback); 2 = both streams.
        question_uids: the GRPO uid of each question (default ``q<index>``).
        max_new_tokens: generation length limit per response.
        generate_kwargs: more ``generate`` arguments (``do_sample`` defaults to True).
        localization_texts: ``[Q][G]`` localization responses to use INSTEAD of generating
            them (e.g. warm-up targets with known boxes, to exercise the sparse stream of an
            untrained model); their ids are the tokenizer's encoding plus EOS.
        suppress_vision_tokens: never sample ``<|vision_start|>``, ``<|vision_end|>``,
            ``<|image_pad|>``, ``<|video_pad|>`` (a response holding one would no longer match
            its images in the training forward - verl's own ``_get_input_embeds`` raises on
            that). A trained VLM gives them ~0 probability; the sampling distribution differs
            from the trained one by exactly that mass.

    Returns a :class:`RolloutResult`; ``metrics``: ``time/localization``, ``time/sparse``
    (seconds), ``rollout/keep_ratio`` (kept / dense visual tokens of the sparse stream),
    ``rollout/fallback_rate``, ``rollout/box_parse_rate``, mean reward terms per stream.
    """
    method = method or load_method_config()
    if stage not in (1, 2):
        raise ValueError(f"`stage` must be 1 or 2, got {stage!r}")
    g = int(n_localization or method.advantages.localization_group_size)
    gp = int(n_sparse or method.advantages.sparse_group_size)
    samples = list(samples)
    q = len(samples)
    if q == 0:
        raise ValueError("`samples` is empty")
    uids = [str(u) for u in (question_uids or [f"q{i}" for i in range(q)])]
    if len(uids) != q:
        raise ValueError(f"`question_uids` has {len(uids)} entries for {q} samples")
    gen_kw = _generate_kwargs({"do_sample": True, **(generate_kwargs or {})})
    gen_kw["max_new_tokens"] = int(max_new_tokens)
    if suppress_vision_tokens:
        mcfg = model.config
        vision_ids = [getattr(mcfg, k, None) for k in ("vision_start_token_id", "vision_end_token_id",
                                                        "image_token_id", "video_token_id")]
        gen_kw["suppress_tokens"] = sorted({int(i) for i in vision_ids if i is not None} |
                                           set(gen_kw.get("suppress_tokens") or []))
    merge = int(processor.merge_size)
    image_token_id = int(processor.image_token_id)
    eos, pad = _eos_ids(model), _pad_id(model)
    max_boxes = method.format.max_boxes
    device = next(model.parameters()).device
    metrics: dict = {}

    # 1. Localization: G dense rollouts per question.
    t0 = time.perf_counter()
    loc = processor.encode_samples(samples, method.prompts.localization, padding_side="left")
    loc_imgs = _split_images(loc, merge, image_token_id)
    if localization_texts is None:
        with torch.no_grad(), hf_generation_context(), full_parameters(model):
            # From the image features, computed once (as the sparse stream does): generate with
            # pixel_values would run the vision tower again on G copies of every image.
            loc_dev = _generate_inputs(loc, device)
            dense = dense_stream_inputs(model, loc_dev, image_embeds=batch_image_features(model, loc_dev))
            out = sparse_generate(model, dense, num_return_sequences=g, **gen_kw)
        loc_resp = [_trim_response(row.cpu(), eos, pad) for row in out]
    else:
        if len(localization_texts) != q or any(len(row) != g for row in localization_texts):
            raise ValueError(f"`localization_texts` must be [Q][G] = [{q}][{g}] responses")
        tok = processor.tokenizer
        gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        end = (gc_eos[0] if isinstance(gc_eos, (list, tuple)) else gc_eos) if gc_eos is not None else pad
        loc_resp = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"] + [end], dtype=torch.int64)
                    for row in localization_texts for t in row]
    loc_texts = [processor.decode(r) for r in loc_resp]
    metrics["time/localization"] = time.perf_counter() - t0
    parses = [parse_boxes(t, max_boxes=max_boxes) for t in loc_texts]
    metrics["rollout/box_parse_rate"] = sum(bool(p) for p in parses) / len(parses)

    # 2. Sparse reasoning: G' rollouts per localization rollout, on the pruned tokens.
    sparse_resp: list = []
    sparse_info: list = []
    sp = None
    if stage == 2:
        t1 = time.perf_counter()
        sp = processor.encode_samples(samples, method.prompts.sparse, padding_side="left")
        sp_imgs = _split_images(sp, merge, image_token_id)
        requests = [
            SparseRequest(_unpadded(sp["input_ids"][i], sp["attention_mask"][i]), sp_imgs[i][0], sp_imgs[i][1],
                          tuple(parses[i * g + j].boxes))
            for i in range(q) for j in range(g)
        ]
        results = sparse_phase(model, requests, pruning=method.pruning, n_sparse=gp, generate_kwargs=gen_kw)
        for res in results:
            for resp in res.responses:
                sparse_resp.append(resp)
                sparse_info.append((res.keep_ratio, res.fallback))
        kept = sum(r.kept_tokens for r in results)
        total = sum(r.visual_tokens for r in results)
        metrics["rollout/keep_ratio"] = kept / total if total else 1.0
        metrics["rollout/fallback_rate"] = sum(r.fallback for r in results) / len(results)
        metrics["time/sparse"] = time.perf_counter() - t1

    # 3. Rewards with cross-feedback.
    loc_nested = [loc_texts[i * g:(i + 1) * g] for i in range(q)]
    sparse_texts = None
    if stage == 2:
        texts = [processor.decode(r) for r in sparse_resp]
        sparse_texts = [[texts[(i * g + j) * gp:(i * g + j + 1) * gp] for j in range(g)] for i in range(q)]
    gts = [GroundTruth.coerce(s) for s in samples]
    scores = score_dual_stream(loc_nested, gts, sparse_texts, weights=method.rewards, max_boxes=max_boxes)
    for name, s in (("localization", "localization"), ("sparse", "sparse")):
        for k, v in scores.mean_terms(s).items():
            metrics[f"reward/{name}/{k}"] = v

    # 4. Records.
    records = []
    for i in range(q):
        prompt = _unpadded(loc["input_ids"][i], loc["attention_mask"][i])
        pv, grid = loc_imgs[i]
        for j in range(g):
            k = i * g + j
            r = scores.localization[i][j]
            records.append(SequenceRecord(
                prompt, loc_resp[k], pv, grid, LOCALIZATION, group_uid(uids[i], LOCALIZATION), uids[i], j,
                float(r.score), r.terms(), loc_texts[k], tuple(parses[k].boxes),
            ))
    if stage == 2:
        for i in range(q):
            prompt = _unpadded(sp["input_ids"][i], sp["attention_mask"][i])
            pv, grid = sp_imgs[i]
            for j in range(g):
                for jj in range(gp):
                    k = (i * g + j) * gp + jj
                    r = scores.sparse[i][j][jj]
                    ratio, fell_back = sparse_info[k]
                    records.append(SequenceRecord(
                        prompt, sparse_resp[k], pv, grid, SPARSE,
                        group_uid(uids[i], SPARSE, j, sparse_group=method.advantages.sparse_group), uids[i], j,
                        float(r.score), r.terms(), sparse_texts[i][j][jj], tuple(parses[i * g + j].boxes),
                        ratio, fell_back,
                    ))
    return RolloutResult(records, metrics)


# --------------------------------------------------------------------------------------
def _position_ids(model, ids: Tensor, grid: Tensor, image_token_id: int) -> Tensor:
    """verl's 4-row position ids of one sequence: text positions, then M-RoPE (t, h, w) from
    the model's own ``get_rope_index`` on the full (dense) sequence."""
    base = model.model if hasattr(model, "model") and hasattr(model.model, "get_rope_index") else model
    ids2 = ids[None]
    mm = (ids2 == image_token_id).to(torch.int32)
    with torch.no_grad():
        pos3, _ = base.get_rope_index(ids2, mm, image_grid_thw=grid, attention_mask=torch.ones_like(ids2))
    return torch.cat([torch.arange(ids.shape[0], dtype=torch.int64)[None], pos3[:, 0].to("cpu", torch.int64)], 0)


def sequence_record(rec: SequenceRecord, model, image_token_id: int) -> dict:
    """One :class:`SequenceRecord` as verl's per-sample fields (what its v1 agent loop writes to
    the TransferQueue), plus ``tsparse_stream`` and the box keys of ``multi_modal_inputs``."""
    ids = torch.cat([rec.prompt_ids, rec.response_ids])
    r = rec.response_ids.shape[0]
    grid = rec.image_grid_thw.to(torch.int64)
    n_img = grid.shape[0]
    boxes = torch.tensor([list(b) for b in rec.boxes], dtype=torch.float32).reshape(-1, 4)
    if rec.stream == SPARSE:
        per_image = boxes.repeat(n_img, 1)  # box_scope "sample": the boxes apply to every image
        counts = torch.full((n_img,), boxes.shape[0], dtype=torch.int64)
    else:
        per_image = torch.zeros(0, 4)
        counts = torch.zeros(n_img, dtype=torch.int64)
    mm = {
        "pixel_values": rec.pixel_values,
        "image_grid_thw": grid,
        "images_seqlens": torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]),
        "tsparse_prune": rec.prune,
        "tsparse_box_counts": counts,
        "tsparse_boxes": per_image,
    }
    rm = torch.zeros(r, dtype=torch.float32)
    rm[-1] = rec.score
    return {
        "prompts": rec.prompt_ids,
        "responses": rec.response_ids,
        "response_mask": torch.ones(r, dtype=torch.int64),
        "loss_mask": torch.ones(r, dtype=torch.int64),
        "input_ids": ids,
        "position_ids": _position_ids(model, ids, grid, image_token_id),
        "rm_scores": rm,
        "multi_modal_inputs": mm,
        STREAM_FIELD: torch.tensor(rec.stream, dtype=torch.int64),
        "uid": rec.uid,
    }


def to_verl_batch(records: Sequence[SequenceRecord], model, image_token_id: int):
    """The sequences as a verl engine batch (``TensorDict``, batch size ``N``): jagged nested
    ``prompts``, ``responses``, ``response_mask``, ``loss_mask``, ``input_ids``, ``rm_scores``,
    ``position_ids`` (``[N, 4, j]``), ``multi_modal_inputs`` (one dict per sample),
    ``tsparse_stream`` ``[N]`` and ``uid`` (non-tensor)."""
    from tensordict import NonTensorStack, TensorDict

    rows = [sequence_record(r, model, image_token_id) for r in records]
    out: dict[str, Any] = {}
    for key in rows[0]:
        vals = [row[key] for row in rows]
        if key == STREAM_FIELD:
            out[key] = torch.stack(vals)
        elif key in ("multi_modal_inputs", "uid"):
            out[key] = NonTensorStack(*vals)
        else:
            out[key] = torch.nested.as_nested_tensor(vals, layout=torch.jagged)
    return TensorDict(out, batch_size=[len(rows)])
