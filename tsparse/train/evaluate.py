"""The trainer's before/after check: greedy dual-stream inference (:mod:`tsparse.infer`) on a
few validation samples, scored with the method's own rewards.

Each sample goes through :class:`tsparse.infer.TokenSparseInference` in ``sparse`` mode - the
localization stream writes its reasoning, boxes and answer with every visual token, the boxes
prune the sparse prompt (token selection + fusion, fallback to the full image), the sparse
stream answers - and both responses are scored by
:func:`~tsparse.dualstream.rewards.score_dual_stream` (strict format, IoU, accuracy), so the
numbers mean what the training rewards mean. The same checkpoint also answers the sparse
stream's prompt with EVERY visual token (``dense`` mode: ``dense_accuracy``), the comparison
the method's claim is about: the answer from the grounded tokens against the answer from all.

:func:`baselines` gives what needs no model on the same samples: the best single fixed box
(IoU, by exhaustive search over a grid), chance and majority-answer accuracy.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..dualstream.config import MethodConfig
from ..dualstream.rewards import disjoint_cells, score_dual_stream

__all__ = ["EvalResult", "evaluate", "baselines", "fixed_box_search"]


@dataclass(frozen=True)
class EvalResult:
    """Means over ``n`` samples. ``loc_format``: strict localization-format rate;
    ``box_rate``: localization responses with a usable box; ``iou``: the IoU reward;
    ``loc_accuracy``; ``sparse_format`` / ``sparse_accuracy``: of the answer from the pruned
    tokens; ``keep_ratio``: kept / dense visual tokens; ``fallback_rate``: images without a
    usable box (kept whole); ``sparse_length``: answer tokens; ``dense_format`` /
    ``dense_accuracy``: the same checkpoint answering the sparse stream's prompt with every
    visual token kept (``None`` when not run); ``seconds``: wall time."""

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
    dense_format: Any = None
    dense_accuracy: Any = None

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
    dense: bool = True,
) -> EvalResult:
    """Greedy localization -> boxes -> pruned greedy answer on ``samples``, scored with
    ``method``'s rewards; with ``dense``, also the greedy answer to the same prompt from every
    visual token. ``ValueError`` for no samples."""
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
        dense_results = pipe.run(samples, mode="dense") if dense else None
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
    dense_fmt = dense_acc = None
    if dense_results is not None:
        ds = score_dual_stream([[""] for _ in dense_results], samples, [[[r.response]] for r in dense_results],
                               weights=method.rewards, max_boxes=method.format.max_boxes)
        dense_fmt = sum(row[0][0].format for row in ds.sparse) / n
        dense_acc = sum(row[0][0].accuracy for row in ds.sparse) / n
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
        dense_format=dense_fmt,
        dense_accuracy=dense_acc,
    )


def fixed_box_search(gt_boxes: Sequence[Sequence[Sequence[float]]], *, step: float = 0.05) -> tuple[float, tuple]:
    """The best single FIXED box for a set of samples: every box whose corners lie on the grid
    ``0, step, 2 step, ..., 1`` (``x1 < x2``, ``y1 < y2``; 44,100 boxes at 0.05) is scored
    against every sample's ground-truth boxes with the IoU reward (IoU against the union of
    the sample's boxes, exact: the union is cut into disjoint cells), averaged over the samples
    (a sample without boxes scores 0, as the reward gives it). Returns ``(mean IoU, box)`` of
    the best; ``(0.0, ())`` for no samples. ``ValueError`` unless ``1 / step`` is a whole
    number."""
    k = round(1.0 / step)
    if k < 1 or abs(k * step - 1.0) > 1e-9:
        raise ValueError(f"`step` must divide 1, got {step!r}")
    n = len(gt_boxes)
    if n == 0:
        return 0.0, ()
    grid = np.linspace(0.0, 1.0, k + 1)
    lo, hi = np.triu_indices(k + 1, 1)
    x1, x2 = grid[lo], grid[hi]
    # candidates: every (x-interval, y-interval) pair
    cx1, cy1 = np.repeat(x1, len(x1)), np.tile(x1, len(x1))
    cx2, cy2 = np.repeat(x2, len(x2)), np.tile(x2, len(x2))
    area = (cx2 - cx1) * (cy2 - cy1)
    total = np.zeros_like(area)
    for boxes in gt_boxes:
        cells = disjoint_cells(boxes)
        if not cells:
            continue
        inter = np.zeros_like(area)
        g_area = 0.0
        for gx1, gy1, gx2, gy2 in cells:
            iw = np.clip(np.minimum(cx2, gx2) - np.maximum(cx1, gx1), 0.0, None)
            ih = np.clip(np.minimum(cy2, gy2) - np.maximum(cy1, gy1), 0.0, None)
            inter += iw * ih
            g_area += (gx2 - gx1) * (gy2 - gy1)
        total += inter / (area + g_area - inter)
    best = int(np.argmax(total))
    box = tuple(round(float(v), 6) for v in (cx1[best], cy1[best], cx2[best], cy2[best]))
    return float(total[best] / n), box


def baselines(samples: Sequence[Any], *, step: float = 0.05) -> dict:
    """What needs no model, on the samples an evaluation used:

    * ``fixed_box_iou`` / ``fixed_box``: the best single fixed box (:func:`fixed_box_search`,
      corners on a ``step`` grid) - the IoU a localizer that ignores the image can reach;
    * ``chance_accuracy``: the mean of ``1 / number of options`` (0 for a sample without
      options);
    * ``majority_accuracy`` / ``majority_answer``: always answering the most frequent answer;
    * ``question_majority_accuracy``: answering each distinct question text with its most
      frequent answer - the best any image-blind answerer does on these samples.
    """
    samples = list(samples)
    n = len(samples)
    if n == 0:
        return {"n": 0}
    iou, box = fixed_box_search([list(s.boxes) for s in samples], step=step)
    answers = [str(s.answer).strip().upper() for s in samples]
    top, count = collections.Counter(answers).most_common(1)[0]
    by_question = collections.defaultdict(collections.Counter)
    for s, a in zip(samples, answers):
        by_question[s.question][a] += 1
    blind = sum(c.most_common(1)[0][1] for c in by_question.values())
    chance = sum(1.0 / len(s.options) if s.options else 0.0 for s in samples) / n
    return {"n": n, "fixed_box_iou": iou, "fixed_box": list(box), "fixed_box_grid": step,
            "chance_accuracy": chance, "majority_accuracy": count / n, "majority_answer": top,
            "question_majority_accuracy": blind / n}
