"""The policy's log-probs on both streams and the decoupled dual-stream GRPO objective,
computed with tsparse's fused ops.

Forward layout (one for both streams): a response row is its prompt - dense for the
localization stream (:func:`~tsparse.dualstream.rollout.dense_stream_inputs`), pruned to its
parent's boxes for the sparse stream (:func:`~tsparse.dualstream.pruning.sparse_stream_inputs`,
token selection + fusion recomputed from the CURRENT visual features, so the vision tower and
the fusion get gradients) - with the response appended
(:func:`~tsparse.dualstream.pruning.extend_sparse_inputs`: the dense sequence's M-RoPE
continuation, exactly where ``generate`` put each token). :func:`response_hidden` runs the
language model once and keeps the last hidden state of each position that predicts a
response token, ``[T, H]`` over the batch's masked response tokens (row-major).

Loss (:func:`policy_loss`): ``tsparse.ops.fused_linear_grpo_loss(hidden, lm_head.weight,
...)`` (never materializes the ``[T, V]`` logits; or ``grpo_loss`` on explicit logits with
``fused_linear=False``) with per-token ``stream`` ids (0 = localization, 1 = sparse): each
stream is aggregated over ITS OWN tokens and weighted by ``stream_weights``, so one stream's
token count or advantages never rescale the other's gradient (the method's decoupled
gradients). :func:`micro_batch_stream_weights` keeps that exact when a batch is split into
micro-batches (each stream normalized by its count over the whole batch).
:func:`token_logprobs` gives the old-policy / reference log-probs with the same ops; the
supervised warm-up uses it as its loss (:func:`sft_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .advantages import LOCALIZATION, SPARSE
from .config import PruningConfig
from .format import STREAMS
from .pruning import SparseInputs, _base_model, extend_sparse_inputs, sparse_stream_inputs
from .rollout import Responses, batch_image_features, dense_stream_inputs, take_samples

__all__ = [
    "LossSettings",
    "question_features",
    "stream_forward_inputs",
    "response_hidden",
    "lm_head_weight",
    "token_logprobs",
    "policy_loss",
    "sft_loss",
    "aggregation_counts",
    "micro_batch_stream_weights",
]

_LOSS_AGG = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum")
_KL_TYPES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "kl+", "abs+", "k2+", "mse+", "k3+",
             "low_var_kl+")


def _num(value, where: str, *, lo: float = -math.inf, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{where}` must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo):
        raise ValueError(f"`{where}` must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LossSettings:
    """The GRPO objective's settings (verl 0.9.1's names in brackets).

    ``clip_low``/``clip_high`` (``clip_ratio_low/high``): the ratio is clipped to
    ``[1 - clip_low, 1 + clip_high]``; ``clip_ratio_c``: dual clip (> 1); ``kl_coef``
    (``kl_loss_coef``) with ``kl_type`` (``kl_loss_type``), needing a reference policy when
    > 0; ``entropy_coef`` (``entropy_coeff``); ``loss_agg`` (``loss_agg_mode``), applied to
    each stream over its own tokens; ``stream_weights``: ``{localization, sparse}`` weights
    of the two streams' aggregated losses; ``fused_linear``: compute the loss from the hidden
    states and the LM head in token chunks (``fused_linear_grpo_loss``) instead of from
    materialized logits (``grpo_loss``); ``chunk_size``: tokens per chunk (``None``: the op's
    default).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float = 3.0
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    stream_weights: Mapping[str, float] = field(default_factory=lambda: {"localization": 1.0, "sparse": 1.0})
    fused_linear: bool = True
    chunk_size: Optional[int] = None

    def __post_init__(self):
        _num(self.clip_low, "loss.clip_low", lo=0.0)
        _num(self.clip_high, "loss.clip_high", lo=0.0)
        _num(self.clip_ratio_c, "loss.clip_ratio_c", lo=1.0, lo_open=True)
        _num(self.kl_coef, "loss.kl_coef", lo=0.0)
        _num(self.entropy_coef, "loss.entropy_coef")
        if self.kl_type not in _KL_TYPES:
            raise ValueError(f"`loss.kl_type` must be one of {list(_KL_TYPES)}, got {self.kl_type!r}")
        if self.loss_agg not in _LOSS_AGG:
            raise ValueError(f"`loss.loss_agg` must be one of {list(_LOSS_AGG)}, got {self.loss_agg!r}")
        if not isinstance(self.stream_weights, Mapping):
            raise ValueError(f"`loss.stream_weights` must be a mapping {{localization, sparse}}, got "
                             f"{type(self.stream_weights).__name__}")
        unknown = sorted(set(self.stream_weights) - set(STREAMS))
        if unknown:
            raise ValueError(f"`loss.stream_weights`: unknown stream(s) {unknown}; allowed: {list(STREAMS)}")
        w = {s: _num(self.stream_weights.get(s, 1.0), f"loss.stream_weights.{s}", lo=0.0) for s in STREAMS}
        object.__setattr__(self, "stream_weights", w)
        if not isinstance(self.fused_linear, bool):
            raise ValueError(f"`loss.fused_linear` must be a bool, got {self.fused_linear!r}")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"`loss.chunk_size` must be a positive int or null, got {self.chunk_size!r}")

    def weights(self) -> list[float]:
        """``[w_localization, w_sparse]`` (stream id order)."""
        return [self.stream_weights[s] for s in STREAMS]


# --------------------------------------------------------------------------------------
def question_features(model, prompt: dict, questions: Sequence[int]) -> Tensor:
    """Visual features ``[N, D]`` of the images of prompt rows ``questions`` (in that order),
    with autograd when it is on. Both streams of a step see the same images, so one call
    can serve the localization and the sparse rows of a micro-batch
    (:func:`stream_forward_inputs` ``features=``)."""
    base = _base_model(model)
    sub = take_samples({k: v for k, v in prompt.items() if k != "texts"}, list(questions),
                       image_token_id=int(base.config.image_token_id),
                       merge_size=int(getattr(base.config.vision_config, "spatial_merge_size", 2)))
    return batch_image_features(model, sub)


def stream_forward_inputs(
    model,
    prompt: dict,
    question_index: Sequence[int],
    responses: Responses,
    *,
    boxes: Optional[Sequence] = None,
    pruning: Optional[PruningConfig] = None,
    features: Optional[tuple] = None,
) -> SparseInputs:
    """Training-forward inputs of response rows: each row's prompt (``prompt`` row
    ``question_index[r]``) - dense when ``boxes`` is ``None``, else pruned to ``boxes[r]``
    with ``pruning`` - and its response appended.

    ``features``: ``(questions, feats)`` - the visual features of prompt rows ``questions``
    (:func:`question_features`, covering every row's question); default: computed here for
    the rows' distinct questions. Either way they carry autograd when it is on, so the
    vision tower and the token fusion (recomputed from these CURRENT features) get
    gradients. Returns the extended :class:`~tsparse.dualstream.pruning.SparseInputs`
    (``prompt_length`` = the prompt part).
    """
    base = _base_model(model)
    q_index = [int(q) for q in question_index]
    if len(q_index) != len(responses):
        raise ValueError(f"`question_index` has {len(q_index)} rows for {len(responses)} responses")
    if boxes is not None and len(boxes) != len(q_index):
        raise ValueError(f"`boxes` has {len(boxes)} rows for {len(q_index)} responses")
    kw = dict(image_token_id=int(base.config.image_token_id),
              merge_size=int(getattr(base.config.vision_config, "spatial_merge_size", 2)))
    if features is None:
        unique = sorted(set(q_index))
        feats = question_features(model, prompt, unique)
    else:
        unique, feats = list(features[0]), features[1]
        missing = sorted(set(q_index) - set(unique))
        if missing:
            raise ValueError(f"`features` has no features for prompt row(s) {missing}")
    sub = take_samples({k: v for k, v in prompt.items() if k != "texts"}, unique, **kw)
    local = {q: k for k, q in enumerate(unique)}
    rows = take_samples(sub, [local[q] for q in q_index], image_embeds=feats, **kw)
    rows_embeds = rows.pop("image_embeds", feats[:0])
    if boxes is None:
        inputs = dense_stream_inputs(model, rows, image_embeds=rows_embeds)
    else:
        grid = rows.get("image_grid_thw", torch.zeros((0, 3), dtype=torch.int64))
        inputs = sparse_stream_inputs(model, rows["input_ids"], rows["attention_mask"], grid, list(boxes),
                                      image_embeds=rows_embeds, config=pruning, padding_side="left")
    return extend_sparse_inputs(model, inputs, responses.ids.to(inputs.input_ids.device),
                                responses.mask.to(inputs.input_ids.device))


def response_hidden(model, inputs: SparseInputs, response_mask: Tensor) -> Tensor:
    """Last hidden states ``[T, H]`` at the positions that predict the response tokens
    (``response_mask`` ``[B, R]``, row-major over its ones), from one language-model forward
    over ``inputs`` (from :func:`stream_forward_inputs`)."""
    base = _base_model(model)
    out = base(**inputs.model_inputs(), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    lp = inputs.prompt_length
    r = response_mask.shape[1]
    if inputs.input_ids.shape[1] != lp + r:
        raise ValueError(f"`inputs` has {inputs.input_ids.shape[1]} columns; expected prompt {lp} + response {r}")
    h = hidden[:, lp - 1: lp - 1 + r]
    return h[response_mask.to(h.device).bool()]


def lm_head_weight(model) -> Tensor:
    """The output projection ``[V, H]`` (``model.lm_head.weight``; tied embeddings too)."""
    head = getattr(model, "lm_head", None) or model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError("the model needs a bias-free LM head (`lm_head`) for the fused loss")
    return head.weight


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    fused_linear: bool = True,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """float32 ``[T]`` log-probs of ``targets`` under ``hidden @ weight.T / temperature``,
    with ``tsparse.ops.fused_linear_logprobs`` (no ``[T, V]`` logits) or ``tsparse.ops.logprobs``
    on materialized logits. Differentiable."""
    from ..ops import fused_linear_logprobs, logprobs

    if fused_linear:
        logp, _ = fused_linear_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size)
    else:
        logp, _ = logprobs(F.linear(hidden, weight), targets, temperature=temperature)
    return logp


def policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    stream: Tensor,
    settings: LossSettings,
    *,
    temperature: float = 1.0,
    stream_weights: Optional[Sequence[float]] = None,
    seq_ids: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    return_entropy: bool = False,
):
    """The decoupled dual-stream GRPO loss of ``T`` response tokens (``tsparse.ops.GRPOLoss``).

    Args:
        hidden: ``[T, H]`` last hidden states predicting the tokens (:func:`response_hidden`).
        weight: ``[V, H]`` the LM head (:func:`lm_head_weight`).
        targets: int64 ``[T]`` the response tokens.
        old_logp: ``[T]`` their log-probs under the rollout policy; advantages: ``[T]``.
        stream: int64 ``[T]``: 0 localization, 1 sparse.
        settings: clipping, KL, entropy, aggregation, stream weights, fused or not.
        temperature: the rollout's sampling temperature.
        stream_weights: overrides ``settings.weights()`` (e.g. :func:`micro_batch_stream_weights`).
        seq_ids: int64 ``[T]`` sequence of each token (values in ``[0, T)``), needed by the
            ``seq-mean-*`` aggregations.
        ref_logp: ``[T]`` reference log-probs (``settings.kl_coef > 0``).
    """
    from ..ops import fused_linear_grpo_loss, grpo_loss

    if settings.kl_coef > 0 and ref_logp is None:
        raise ValueError("`ref_logp` is required when loss.kl_coef > 0")
    weights = list(settings.weights() if stream_weights is None else stream_weights)
    mask = torch.ones_like(targets, dtype=torch.bool)
    kw = dict(temperature=temperature, clip_low=settings.clip_low, clip_high=settings.clip_high,
              clip_ratio_c=settings.clip_ratio_c, ref_logp=ref_logp if settings.kl_coef > 0 else None,
              kl_type=settings.kl_type, kl_coef=settings.kl_coef, entropy_coef=settings.entropy_coef,
              stream=stream, stream_weights=weights, loss_agg=settings.loss_agg,
              seq_ids=seq_ids if settings.loss_agg.startswith("seq-") else None, return_entropy=return_entropy)
    if settings.fused_linear:
        return fused_linear_grpo_loss(hidden, weight, targets, old_logp, advantages, mask,
                                      chunk_size=settings.chunk_size, **kw)
    return grpo_loss(F.linear(hidden, weight), targets, old_logp, advantages, mask, **kw)


def sft_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    stream: Tensor,
    *,
    stream_weights: Sequence[float] = (1.0, 1.0),
    fused_linear: bool = True,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, dict]:
    """The warm-up's supervised loss: ``sum_s w_s * mean over stream s's tokens of
    -log p(target)`` (each stream normalized by its own token count, as the RL loss) with
    tsparse's log-prob op. ``stream_weights`` may carry micro-batch scaling. Returns
    ``(loss, {stream name: float mean NLL})``."""
    logp = token_logprobs(hidden, weight, targets, fused_linear=fused_linear, chunk_size=chunk_size)
    loss = logp.new_zeros(())
    metrics = {}
    for sid, name in ((LOCALIZATION, "localization"), (SPARSE, "sparse")):
        sel = stream == sid
        n = int(sel.sum())
        if n == 0:
            continue
        nll = -logp[sel].mean()
        loss = loss + float(stream_weights[sid]) * nll
        metrics[name] = float(nll.detach())
    return loss, metrics


def aggregation_counts(loss_agg: str, token_counts: Sequence[int], seq_counts: Sequence[int]) -> list[float]:
    """What each stream's aggregate divides by: tokens (``token-mean``), sequences
    (``seq-mean-*``) or nothing (``token-sum``: 1 per call, additive)."""
    if loss_agg == "token-mean":
        return [float(c) for c in token_counts]
    if loss_agg.startswith("seq-mean"):
        return [float(c) for c in seq_counts]
    if loss_agg == "token-sum":
        return [1.0 for _ in token_counts]
    raise ValueError(f"`loss_agg` must be one of {list(_LOSS_AGG)}, got {loss_agg!r}")


def micro_batch_stream_weights(
    base_weights: Sequence[float],
    loss_agg: str,
    micro_tokens: Sequence[int],
    micro_seqs: Sequence[int],
    total_tokens: Sequence[int],
    total_seqs: Sequence[int],
) -> list[float]:
    """Stream weights for one micro-batch such that the micro-batches' gradients sum to the
    whole batch's: stream s's aggregate over the micro-batch is rescaled by
    ``count_micro / count_total`` (tokens for ``token-mean``, sequences for ``seq-mean-*``,
    1 for ``token-sum``), so each stream stays normalized by its own count over the batch.
    A stream absent from the micro-batch gets weight 0."""
    micro = aggregation_counts(loss_agg, micro_tokens, micro_seqs)
    total = aggregation_counts(loss_agg, total_tokens, total_seqs)
    out = []
    for w, m, t, mt in zip(base_weights, micro, total, micro_tokens):
        if loss_agg == "token-sum":
            out.append(float(w) if mt > 0 else 0.0)
        else:
            out.append(float(w) * m / t if t > 0 and mt > 0 else 0.0)
    return out
