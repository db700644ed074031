"""The trainer's before/after check: greedy dual-stream inference (:mod:`tsparse.infer`) on a
few validation samples, scored with the method's own rewards.

Each sample goes through :class:`tsparse.infer.TokenSparseInference` in ``sparse`` mode - the
localization stream writes its reasoning, boxes and answer with every visual token, the boxes
prune the sparse prompt (token selection + fusion, fallback to the full image), the sparse
stream answers - and both responses are scored by
:func:`~tsparse.dualstream.rewards.score_dual_stream` (strict format, IoU, accuracy), so the
numbers mean what the training rewards mean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..dualstream.config import MethodConfig
from ..dualstream.rewards import score_dual_stream

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Means over ``n`` samples. ``loc_format``: strict localization-format rate;
    ``box_rate``: localization responses with a usable box; ``iou``: the IoU reward;
    ``loc_accuracy``; ``sparse_format`` / ``sparse_accuracy``: of the answer from the pruned
    tokens; ``keep_ratio``: kept / dense visual tokens; ``fallback_rate``: images without a
    usable box (kept whole); ``sparse_length``: answer tokens; ``seconds``: wall time."""

    n: int
    loc_format: float
    box_rate: float
    iou: float
    loc_accuracy: float
    sparse_format: float
    sparse_accuracy: float
    keep_ratio: float
    fallback_rate: float
    sparse_length: float
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate(
    model,
    processor,
    samples: Sequence[Any],
    method: MethodConfig,
    *,
    max_new_tokens_localization: int,
    max_new_tokens_sparse: int,
    batch_size: int = 16,
) -> EvalResult:
    """Greedy localization -> boxes -> pruned greedy answer on ``samples``, scored with
    ``method``'s rewards. ``ValueError`` for no samples."""
    from ..infer import InferenceConfig, TokenSparseInference

    samples = list(samples)
    if not samples:
        raise ValueError("`samples` must not be empty")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        pipe = TokenSparseInference(model, processor, method=method, config=InferenceConfig(
            mode="sparse", boxes="generated", answer="generate", max_new_tokens=max_new_tokens_sparse,
            localization_max_new_tokens=max_new_tokens_localization, batch_size=batch_size))
        results = pipe.run(samples)
    finally:
        model.train(was_training)
    scores = score_dual_stream([[r.localization or ""] for r in results], samples,
                               [[[r.response]] for r in results], weights=method.rewards,
                               max_boxes=method.format.max_boxes)
    loc = [row[0] for row in scores.localization]
    sp = [row[0][0] for row in scores.sparse]
    n = len(samples)
    kept = sum(sum(r.kept_tokens) for r in results)
    total = sum(sum(r.visual_tokens) for r in results)
    images = sum(len(r.fallback) for r in results)
    return EvalResult(
        n=n,
        loc_format=sum(r.format for r in loc) / n,
        box_rate=sum(1 for r in loc if r.boxes) / n,
        iou=sum(r.iou or 0.0 for r in loc) / n,
        loc_accuracy=sum(r.accuracy for r in loc) / n,
        sparse_format=sum(r.format for r in sp) / n,
        sparse_accuracy=sum(r.accuracy for r in sp) / n,
        keep_ratio=kept / total if total else 1.0,
        fallback_rate=sum(sum(r.fallback) for r in results) / images if images else 0.0,
        sparse_length=sum(r.new_tokens for r in results) / n,
        seconds=time.perf_counter() - t0,
    )
