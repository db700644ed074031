"""Verifiable rewards of the two streams, each a small pure function, and their composition.

Terms (each in [0, 1]):

* :func:`format_reward` - 1 when the response passes the stream's strict format check.
* :func:`iou_reward` - the IoU of the UNION of the predicted boxes with the union of the
  ground-truth boxes (exact areas in continuous 0-1 coordinates); 0 with no usable predicted
  box (or no ground-truth box). Extra boxes add their area to the union, so a set of fixed
  boxes that ignores the image cannot raise it (:func:`best_match_iou`, the earlier
  per-ground-truth best match, could be raised by spreading up to ``max_boxes`` boxes).
* :func:`sparsity_reward` - ``1 - area(union of predicted boxes)`` (the fraction of the image the
  boxes prune away), paid only in proportion to the accuracy of the answer made from the kept
  tokens (the sparse rollouts' mean accuracy when they ran, else the response's own); 0 without
  a usable box.
* :func:`accuracy_reward` - 1 when the ``<answer>`` matches: an option letter (alone, in
  parentheses, or followed by ``)``/``.``/``:``, any case; or the option's text) for
  multiple-choice questions, a normalized short answer otherwise (:func:`normalize_text`).
  ViTAR's scorer upper-cases the answer and compares its FIRST character with the letter; we
  accept the same letter forms but require the letter to stand alone, so ``"Cardiomegaly"``
  is not read as ``"C"``.
* :func:`cross_feedback_accuracy` - the other stream's accuracy (method note): a localization
  rollout O_i gets the mean accuracy of its sparse rollouts O'_{i,j}; a sparse rollout
  O'_{i,j} gets the accuracy of O_i.

Composites (:func:`localization_reward`, :func:`sparse_reward`, :func:`score_dual_stream`)
weight the terms with :class:`~tsparse.dualstream.config.RewardWeights` (defaults in
``configs/dualstream.yaml``; the paper gives none, they are ours). :func:`compute_score` is
the same as a verl custom reward function (by file path: ``tsparse/dualstream/reward_fn.py``).

Pure Python; no torch.
"""

from __future__ import annotations

import functools
import json
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from .config import RewardWeights, load_method_config
from .format import STREAMS, check_format, extract_answer, parse_boxes

__all__ = [
    "GroundTruth",
    "RewardBreakdown",
    "DualStreamScores",
    "box_iou",
    "union_area",
    "disjoint_cells",
    "union_iou",
    "best_match_iou",
    "format_reward",
    "iou_reward",
    "sparsity_reward",
    "normalize_text",
    "parse_choice",
    "accuracy_reward",
    "cross_feedback_accuracy",
    "localization_reward",
    "sparse_reward",
    "score_dual_stream",
    "compute_score",
]

_LETTERS = "ABCDEFGHIJ"


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroundTruth:
    """What a response is scored against.

    ``answer``: the option letter (``"C"``) or a short answer; ``boxes``: normalized evidence
    boxes (may be empty); ``options``: option letter -> option text (empty when unknown or not
    multiple choice).
    """

    answer: str
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"`answer` must be a non-blank str, got {self.answer!r}")
        boxes = []
        for i, b in enumerate(self.boxes):
            try:
                vals = tuple(float(v) for v in b)
            except (TypeError, ValueError):
                raise ValueError(f"`boxes[{i}]` must be 4 numbers, got {b!r}") from None
            if len(vals) != 4:
                raise ValueError(f"`boxes[{i}]` must be 4 numbers, got {b!r}")
            boxes.append(vals)
        object.__setattr__(self, "boxes", tuple(boxes))
        if not isinstance(self.options, Mapping):
            raise ValueError(f"`options` must be a mapping letter -> text, got {type(self.options).__name__}")
        object.__setattr__(self, "options", {str(k).strip().upper(): str(v) for k, v in self.options.items()})

    @classmethod
    def coerce(cls, value: Any, extra_info: Optional[Mapping] = None) -> "GroundTruth":
        """Builds a ground truth from what datasets and verl carry.

        ``value``: a :class:`GroundTruth`; an object with ``answer``/``boxes``/``options``
        attributes (a :class:`~tsparse.dualstream.data.VQASample`); a mapping with ``answer``
        and optionally ``bbox``/``boxes`` and ``options``; a JSON string of such a mapping; or
        the answer string itself. Missing boxes/options are taken from ``extra_info`` (same
        keys) when given. ``ValueError`` when no answer can be found.
        """
        if isinstance(value, GroundTruth):
            return value
        extra = dict(extra_info or {})
        if hasattr(value, "answer") and not isinstance(value, (str, Mapping)):
            return cls(value.answer, tuple(getattr(value, "boxes", ())), dict(getattr(value, "options", {}) or {}))
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("{"):
                try:
                    value = json.loads(s)
                except ValueError:
                    raise ValueError(f"`ground_truth` looks like JSON but does not parse: {value[:80]!r}") from None
            else:
                value = {"answer": value}
        if not isinstance(value, Mapping):
            raise ValueError(f"`ground_truth` must be a str, mapping or GroundTruth, got {type(value).__name__}")
        if "answer" not in value:
            raise ValueError(f"`ground_truth` has no 'answer' (keys: {sorted(value)})")
        boxes = value.get("bbox", value.get("boxes"))
        if boxes is None:
            boxes = extra.get("bbox", extra.get("boxes"))
        options = value.get("options")
        if options is None:
            options = extra.get("options")
        return cls(str(value["answer"]), tuple(_as_box_list(boxes)), _as_options(options))


def _as_box_list(boxes) -> list:
    if boxes is None:
        return []
    if hasattr(boxes, "tolist"):  # numpy arrays (verl parquet)
        boxes = boxes.tolist()
    boxes = list(boxes)
    if len(boxes) == 4 and all(isinstance(v, (int, float)) for v in boxes):
        return [boxes]  # a single box written flat
    return [list(b.tolist() if hasattr(b, "tolist") else b) for b in boxes]


def _as_options(options) -> dict:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k): str(v) for k, v in options.items()}
    if hasattr(options, "tolist"):
        options = options.tolist()
    if isinstance(options, (list, tuple)):
        return {_LETTERS[i]: str(v) for i, v in enumerate(options[: len(_LETTERS)])}
    raise ValueError(f"`options` must be a mapping or a list, got {type(options).__name__}")


# --------------------------------------------------------------------------------------
# Terms
def format_reward(text: str, stream: str, *, max_boxes: int = 4) -> float:
    """1.0 when ``text`` passes the strict format of ``stream`` (``"localization"``: think,
    1..``max_boxes`` boxes, answer; ``"sparse"``: think, answer), else 0.0.
    See :func:`tsparse.dualstream.format.check_format`."""
    return 1.0 if check_format(text, stream, max_boxes=max_boxes).ok else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0.0 when either has no
    positive area or a non-finite coordinate. ``ValueError`` unless both have 4 numbers."""
    if len(a) != 4 or len(b) != 4:
        raise ValueError(f"boxes must have 4 coordinates, got {len(a)} and {len(b)}")
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    if not all(math.isfinite(v) for v in (ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)):
        return 0.0
    area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
    area_b = max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
    if area_a <= 0.0 or area_b <= 0.0:
        return 0.0
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    inter = max(iw, 0.0) * max(ih, 0.0)
    return inter / (area_a + area_b - inter)


def _usable(boxes: Sequence[Sequence[float]], arg: str) -> list[tuple[float, float, float, float]]:
    """The boxes of positive area with finite coordinates (others are ignored, as the parser
    and :func:`box_iou` ignore them). ``ValueError`` for a box without 4 coordinates."""
    out = []
    for i, b in enumerate(boxes):
        if len(b) != 4:
            raise ValueError(f"`{arg}[{i}]` must have 4 coordinates, got {len(b)}")
        x1, y1, x2, y2 = (float(v) for v in b)
        if all(math.isfinite(v) for v in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1:
            out.append((x1, y1, x2, y2))
    return out


def _union_measure(pred: list, gt: list) -> tuple[float, float, float, float]:
    """Exact ``(area(P), area(G), area(P & G), area(P | G))`` of two unions of axis-aligned
    boxes, by coordinate compression: the box edges cut the plane into cells, each cell is
    inside a union or not as a whole."""
    xs = sorted({v for b in pred + gt for v in (b[0], b[2])})
    ys = sorted({v for b in pred + gt for v in (b[1], b[3])})
    a_p = a_g = a_i = a_u = 0.0
    for xi in range(len(xs) - 1):
        x0, x1 = xs[xi], xs[xi + 1]
        cx = 0.5 * (x0 + x1)
        col_p = [b for b in pred if b[0] <= cx <= b[2]]
        col_g = [b for b in gt if b[0] <= cx <= b[2]]
        if not col_p and not col_g:
            continue
        for yi in range(len(ys) - 1):
            y0, y1 = ys[yi], ys[yi + 1]
            cy = 0.5 * (y0 + y1)
            in_p = any(b[1] <= cy <= b[3] for b in col_p)
            in_g = any(b[1] <= cy <= b[3] for b in col_g)
            if in_p or in_g:
                area = (x1 - x0) * (y1 - y0)
                a_u += area
                a_p += area if in_p else 0.0
                a_g += area if in_g else 0.0
                a_i += area if (in_p and in_g) else 0.0
    return a_p, a_g, a_i, a_u


def disjoint_cells(boxes: Sequence[Sequence[float]]) -> list[tuple[float, float, float, float]]:
    """The union of ``boxes`` as disjoint rectangles (the cells of the boxes' own coordinate
    grid that lie inside the union, merged along each column), so the intersection of any box
    with the union is the sum of its intersections with these cells. Boxes without positive
    area or with a non-finite coordinate are ignored."""
    bs = _usable(boxes, "boxes")
    xs = sorted({v for b in bs for v in (b[0], b[2])})
    ys = sorted({v for b in bs for v in (b[1], b[3])})
    out = []
    for xi in range(len(xs) - 1):
        cx = 0.5 * (xs[xi] + xs[xi + 1])
        col = [b for b in bs if b[0] <= cx <= b[2]]
        start = None
        for yi in range(len(ys) - 1):
            cy = 0.5 * (ys[yi] + ys[yi + 1])
            inside = any(b[1] <= cy <= b[3] for b in col)
            if inside and start is None:
                start = ys[yi]
            if not inside and start is not None:
                out.append((xs[xi], start, xs[xi + 1], ys[yi]))
                start = None
        if start is not None:
            out.append((xs[xi], start, xs[xi + 1], ys[-1]))
    return out


def union_area(boxes: Sequence[Sequence[float]], *, clip: bool = True) -> float:
    """Exact area of the union of ``(x1, y1, x2, y2)`` boxes (overlaps counted once), each box
    first clipped to the unit square when ``clip`` (then the value is the fraction of the image
    the boxes cover). Boxes without positive area or with a non-finite coordinate are ignored."""
    bs = _usable(boxes, "boxes")
    if clip:
        bs = [(min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0), min(max(x2, 0.0), 1.0), min(max(y2, 0.0), 1.0))
              for x1, y1, x2, y2 in bs]
        bs = [b for b in bs if b[2] > b[0] and b[3] > b[1]]
    return _union_measure(bs, [])[0] if bs else 0.0


def union_iou(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """IoU of the union of ``pred_boxes`` with the union of ``gt_boxes``:
    ``area(P & G) / area(P | G)`` with ``P``, ``G`` the unions (exact, continuous coordinates,
    overlaps counted once). For one box each it equals :func:`box_iou`. 0.0 when either set
    holds no box of positive area."""
    p = _usable(pred_boxes, "pred_boxes")
    g = _usable(gt_boxes, "gt_boxes")
    if not p or not g:
        return 0.0
    _, _, inter, union = _union_measure(p, g)
    return inter / union if union > 0 else 0.0


def best_match_iou(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """The earlier IoU term, kept for comparison: mean over ground-truth boxes of the best IoU
    with any predicted box. Extra predicted boxes never lower it, so fixed boxes spread over the
    image raise it without looking (4 fixed boxes scored 0.27 on the synthetic scans against
    0.10 for the best single fixed box); :func:`iou_reward` uses :func:`union_iou` instead."""
    gts = list(gt_boxes)
    preds = [p for p in pred_boxes if box_iou(p, p) > 0.0]
    if not gts or not preds:
        return 0.0
    return sum(max(box_iou(g, p) for p in preds) for g in gts) / len(gts)


def iou_reward(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """The IoU term: :func:`union_iou` of the predicted boxes against the ground-truth boxes.

    Every predicted box adds its area to the union, so a box that misses the evidence lowers
    the reward, and no set of fixed boxes beats the best single fixed box by spreading out
    (tested on the synthetic scans against grids of 1..max_boxes boxes). 0.0 when
    ``pred_boxes`` holds no box of positive area (the parser's usable boxes are) or
    ``gt_boxes`` is empty (a sample without boxes: the term is then constant in its GRPO group
    and moves no advantage).
    """
    return union_iou(pred_boxes, gt_boxes)


def sparsity_reward(pred_boxes: Sequence[Sequence[float]], answer_accuracy: float) -> float:
    """The optional sparsity term: ``(1 - union_area(pred_boxes)) * answer_accuracy``, where
    ``answer_accuracy`` in [0, 1] is the accuracy of the answer given from the kept tokens (the
    mean over the sparse rollouts pruned to these boxes, or the response's own answer when no
    sparse stream ran). Smaller boxes pay only when the answer from them is right, so the term
    cannot be earned by a tiny box that prunes the evidence away. 0.0 without a usable box.
    ``ValueError`` for an accuracy outside [0, 1]."""
    if isinstance(answer_accuracy, bool) or not isinstance(answer_accuracy, (int, float)) \
            or not 0.0 <= answer_accuracy <= 1.0:
        raise ValueError(f"`answer_accuracy` must be a number in [0, 1], got {answer_accuracy!r}")
    if not _usable(pred_boxes, "pred_boxes"):
        return 0.0
    return (1.0 - min(union_area(pred_boxes), 1.0)) * float(answer_accuracy)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_text(text: str) -> str:
    """Short-answer normalization: lower case, punctuation to spaces, articles (a, an, the)
    removed, whitespace collapsed. ``TypeError`` for a non-str."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    t = text.lower().translate(_PUNCT)
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


_CHOICE_PREFIX = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*)", re.IGNORECASE
)
_LETTER_ALONE = re.compile(r"^[\(\[]?\s*([A-Ja-j])\s*[\)\]]?\s*[\.:]?\s*$")
_LETTER_MARKED = re.compile(r"^[\(\[]\s*([A-Ja-j])\s*[\)\]]\s*(.*)$|^([A-Ja-j])\s*[\)\.:]\s*(.*)$", re.DOTALL)
_LETTER_SPACE = re.compile(r"^([A-Ja-j])\s+(.+)$", re.DOTALL)


def parse_choice(answer: str, options: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The option letter an answer names, upper case, or ``None``.

    Accepted (after stripping quotes, ``*`` and a prefix such as ``"Answer:"`` or ``"The
    answer is"``): a lone letter A-J in any case, optionally in parentheses/brackets or
    followed by ``.``/``:`` (``"c"``, ``"(C)"``, ``"C."``); a letter marked with ``)``, ``.``,
    ``:`` or parentheses followed by text (``"C) Cardiomegaly"``, ``"(c) ..."``); a letter and a
    space followed by that option's own text (needs ``options``); or, with ``options``, the
    text of exactly one option (normalized with :func:`normalize_text`). A word that merely
    starts with a letter (``"Cardiomegaly"``, ``"a lesion"``) names no option.
    """
    if not isinstance(answer, str):
        raise TypeError(f"`answer` must be a str, got {type(answer).__name__}")
    a = answer.strip().strip("*`'\" \t\n")
    a = _CHOICE_PREFIX.sub("", a).strip().strip("*`'\" ")
    m = _LETTER_ALONE.match(a)
    if m:
        return m.group(1).upper()
    m = _LETTER_MARKED.match(a)
    if m:
        return (m.group(1) or m.group(3)).upper()
    opts = {str(k).upper(): normalize_text(str(v)) for k, v in (options or {}).items()}
    m = _LETTER_SPACE.match(a)
    if m and opts.get(m.group(1).upper()) == normalize_text(m.group(2)) != "":
        return m.group(1).upper()
    if opts:
        na = normalize_text(a)
        hits = [k for k, v in opts.items() if v and v == na]
        if len(hits) == 1:
            return hits[0]
    return None


def _is_choice_letter(answer: str) -> bool:
    return len(answer.strip()) == 1 and answer.strip().upper() in _LETTERS


def accuracy_reward(text: str, answer: str, options: Optional[Mapping[str, str]] = None) -> float:
    """1.0 when the response's ``<answer>`` matches ``answer``, else 0.0 (also when the
    response has no complete ``<answer>...</answer>`` block).

    ``answer`` a single letter A-J (any case): multiple choice, compared through
    :func:`parse_choice` (``options`` lets the option text count too). Otherwise a short
    answer: equal after :func:`normalize_text`. ``ValueError`` for a blank ``answer``.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"`answer` must be a non-blank str, got {answer!r}")
    pred = extract_answer(text)
    if pred is None:
        return 0.0
    if _is_choice_letter(answer):
        return 1.0 if parse_choice(pred, options) == answer.strip().upper() else 0.0
    return 1.0 if normalize_text(pred) == normalize_text(answer) and normalize_text(answer) else 0.0


def cross_feedback_accuracy(other_accuracies: Union[float, Sequence[float]]) -> float:
    """The cross-feedback term: the mean of the other stream's accuracies (a single value for a
    sparse rollout's parent, the G sparse children's values for a localization rollout).
    ``ValueError`` for an empty sequence or values outside [0, 1]."""
    vals = [other_accuracies] if isinstance(other_accuracies, (int, float)) else list(other_accuracies)
    if not vals:
        raise ValueError("`other_accuracies` must not be empty")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"`other_accuracies` values must be numbers in [0, 1], got {v!r}")
    return float(sum(vals)) / len(vals)


# --------------------------------------------------------------------------------------
# Composites
@dataclass(frozen=True)
class RewardBreakdown:
    """One response's reward and its terms. ``iou`` and ``sparsity`` are ``None`` for the
    sparse stream; ``cross_accuracy`` is ``None`` when the other stream was not run (then its
    weight does not apply). ``boxes``: the parsed boxes (localization); ``box_reason``: why none
    were found."""

    stream: str
    score: float
    format: float
    accuracy: float
    iou: Optional[float] = None
    cross_accuracy: Optional[float] = None
    boxes: tuple = ()
    box_reason: Optional[str] = None
    sparsity: Optional[float] = None

    def terms(self) -> dict:
        """The numeric terms and the score, every key present (missing terms as 0.0), so rows
        of one stream line up for logging and for verl's reward_extra_info."""
        return {
            "score": self.score,
            "format": self.format,
            "iou": 0.0 if self.iou is None else self.iou,
            "accuracy": self.accuracy,
            "cross_accuracy": 0.0 if self.cross_accuracy is None else self.cross_accuracy,
            "sparsity": 0.0 if self.sparsity is None else self.sparsity,
        }


def _weights(weights: Optional[Union[RewardWeights, Mapping]]) -> RewardWeights:
    if weights is None:
        return default_reward_weights()
    if isinstance(weights, RewardWeights):
        return weights
    if isinstance(weights, Mapping):
        return RewardWeights.from_dict(weights)
    raise TypeError(f"`weights` must be a RewardWeights, a mapping or None, got {type(weights).__name__}")


@functools.lru_cache(maxsize=1)
def _default_config():
    return load_method_config()


def default_reward_weights() -> RewardWeights:
    """The reward weights of ``configs/dualstream.yaml`` (read once)."""
    return _default_config().rewards


def _max_boxes(max_boxes: Optional[int]) -> int:
    return _default_config().format.max_boxes if max_boxes is None else max_boxes


def localization_reward(
    text: str,
    ground_truth: Any,
    *,
    cross_accuracy: Optional[float] = None,
    weights: Optional[Union[RewardWeights, Mapping]] = None,
    max_boxes: Optional[int] = None,
) -> RewardBreakdown:
    """Reward of a localization response: ``w_format * format + w_iou * IoU + w_accuracy *
    accuracy + w_cross * cross_accuracy + w_sparsity * sparsity`` (cross only when
    ``cross_accuracy`` is given: the mean accuracy of this rollout's sparse rollouts; sparsity
    = :func:`sparsity_reward` gated by that mean, or by the response's own accuracy without
    it). Boxes for the IoU and the sparsity come from the tolerant parser (at most
    ``max_boxes``). ``ground_truth``: anything
    :meth:`GroundTruth.coerce` takes. ``weights`` and ``max_boxes`` (the strict format's
    limit too) default to ``configs/dualstream.yaml``."""
    gt = GroundTruth.coerce(ground_truth)
    max_boxes = _max_boxes(max_boxes)
    w = _weights(weights).localization
    fmt = format_reward(text, "localization", max_boxes=max_boxes)
    parsed = parse_boxes(text, max_boxes=max_boxes)
    iou = iou_reward(parsed.boxes, gt.boxes)
    acc = accuracy_reward(text, gt.answer, gt.options)
    cross = None if cross_accuracy is None else cross_feedback_accuracy(cross_accuracy)
    sparsity = sparsity_reward(parsed.boxes, acc if cross is None else cross)
    score = w["format"] * fmt + w["iou"] * iou + w["accuracy"] * acc + w["sparsity"] * sparsity
    if cross is not None:
        score += w["cross_accuracy"] * cross
    return RewardBreakdown("localization", score, fmt, acc, iou, cross, parsed.boxes, parsed.reason, sparsity)


def sparse_reward(
    text: str,
    ground_truth: Any,
    *,
    cross_accuracy: Optional[float] = None,
    weights: Optional[Union[RewardWeights, Mapping]] = None,
) -> RewardBreakdown:
    """Reward of a sparse-reasoning response: ``w_format * format + w_accuracy * accuracy +
    w_cross * cross_accuracy`` (the last only when ``cross_accuracy`` - the accuracy of the
    localization rollout this one was pruned from - is given)."""
    gt = GroundTruth.coerce(ground_truth)
    w = _weights(weights).sparse
    fmt = format_reward(text, "sparse")
    acc = accuracy_reward(text, gt.answer, gt.options)
    cross = None if cross_accuracy is None else cross_feedback_accuracy(cross_accuracy)
    score = w["format"] * fmt + w["accuracy"] * acc
    if cross is not None:
        score += w["cross_accuracy"] * cross
    return RewardBreakdown("sparse", score, fmt, acc, None, cross)


@dataclass(frozen=True)
class DualStreamScores:
    """Rewards of one batch of questions.

    ``localization[q][i]``: breakdown of localization rollout O_i of question q;
    ``sparse[q][i][j]``: of sparse rollout O'_{i,j} (empty lists when no sparse stream ran).
    """

    localization: list
    sparse: list

    def localization_scores(self) -> list:
        """``[Q][G]`` floats."""
        return [[r.score for r in row] for row in self.localization]

    def sparse_scores(self) -> list:
        """``[Q][G][G']`` floats."""
        return [[[r.score for r in kids] for kids in row] for row in self.sparse]

    def mean_terms(self, stream: str) -> dict:
        """Mean of each term (and the score) over the stream's rollouts (empty dict if none)."""
        if stream == "localization":
            rows = [r for row in self.localization for r in row]
        elif stream == "sparse":
            rows = [r for row in self.sparse for kids in row for r in kids]
        else:
            raise ValueError(f"`stream` must be one of {list(STREAMS)}, got {stream!r}")
        if not rows:
            return {}
        keys = rows[0].terms().keys()
        return {k: sum(r.terms()[k] for r in rows) / len(rows) for k in keys}


def score_dual_stream(
    localization_texts: Sequence[Sequence[str]],
    ground_truths: Sequence[Any],
    sparse_texts: Optional[Sequence[Sequence[Sequence[str]]]] = None,
    *,
    weights: Optional[Union[RewardWeights, Mapping]] = None,
    max_boxes: Optional[int] = None,
) -> DualStreamScores:
    """Scores a batch of two-level rollouts with cross-feedback.

    Args:
        localization_texts: ``[Q][G]`` decoded localization responses O_i per question.
        ground_truths: ``[Q]`` ground truths (anything :meth:`GroundTruth.coerce` takes).
        sparse_texts: ``[Q][G][G']`` decoded sparse responses O'_{i,j} (``G'`` may differ
            from ``G`` but is the same everywhere), or ``None`` (stage 1: no sparse stream;
            no cross-feedback term).
        weights, max_boxes: as :func:`localization_reward`.

    With sparse rollouts, O_i's cross-feedback is the mean accuracy of O'_{i,1..G'} and
    O'_{i,j}'s is the accuracy of O_i. Raises ``ValueError`` when the nesting does not match.
    """
    w = _weights(weights)
    q = len(localization_texts)
    if len(ground_truths) != q:
        raise ValueError(f"`ground_truths` has {len(ground_truths)} entries for {q} questions")
    gts = [GroundTruth.coerce(g) for g in ground_truths]
    if sparse_texts is not None and len(sparse_texts) != q:
        raise ValueError(f"`sparse_texts` has {len(sparse_texts)} entries for {q} questions")
    sparse_g = None
    if sparse_texts is not None:
        for qi in range(q):
            if len(sparse_texts[qi]) != len(localization_texts[qi]):
                raise ValueError(
                    f"`sparse_texts[{qi}]` has {len(sparse_texts[qi])} groups for "
                    f"{len(localization_texts[qi])} localization rollouts"
                )
            for i, kids in enumerate(sparse_texts[qi]):
                if sparse_g is None:
                    sparse_g = len(kids)
                if len(kids) != sparse_g or sparse_g == 0:
                    raise ValueError(
                        f"`sparse_texts[{qi}][{i}]` has {len(kids)} rollouts; every group needs the same "
                        f"positive number ({sparse_g})"
                    )
    loc_acc = [[accuracy_reward(t, gts[qi].answer, gts[qi].options) for t in row]
               for qi, row in enumerate(localization_texts)]
    sparse_out: list = []
    if sparse_texts is not None:
        for qi, row in enumerate(sparse_texts):
            sparse_out.append([
                [sparse_reward(t, gts[qi], cross_accuracy=loc_acc[qi][i], weights=w) for t in kids]
                for i, kids in enumerate(row)
            ])
    loc_out = []
    for qi, row in enumerate(localization_texts):
        out_row = []
        for i, t in enumerate(row):
            cross = None
            if sparse_texts is not None:
                cross = cross_feedback_accuracy([r.accuracy for r in sparse_out[qi][i]])
            out_row.append(localization_reward(t, gts[qi], cross_accuracy=cross, weights=w, max_boxes=max_boxes))
        loc_out.append(out_row)
    return DualStreamScores(loc_out, sparse_out)


# --------------------------------------------------------------------------------------
def compute_score(
    data_source: Optional[str],
    solution_str: str,
    ground_truth: Any,
    extra_info: Optional[Mapping] = None,
    **kwargs,
) -> dict:
    """verl custom reward function (``reward.custom_reward_function.path`` =
    ``tsparse/dualstream/reward_fn.py`` or ``pkg://tsparse.dualstream.rewards``,
    ``name=compute_score``): the composite reward of one response.

    Args:
        data_source: the dataset name (recorded by verl; not used for scoring).
        solution_str: the decoded response.
        ground_truth: the answer string, a mapping ``{"answer", "bbox"/"boxes", "options"}``,
            or its JSON string.
        extra_info: optional mapping: ``stream`` (``"localization"``, the default, or
            ``"sparse"``), ``cross_accuracy`` (the other stream's accuracy when known),
            ``bbox``/``options`` when not in ``ground_truth``.
        **kwargs: ``weights`` (a mapping like ``configs/dualstream.yaml``'s ``rewards``),
            ``max_boxes`` (default: ``format.max_boxes`` of the config), ``stream`` (overrides
            ``extra_info``).

    Returns ``{"score", "format", "iou", "accuracy", "cross_accuracy", "sparsity"}`` (floats;
    terms not computed are 0.0), as verl's reward managers expect. ``ValueError`` for an unknown stream.
    """
    extra = dict(extra_info or {})
    stream = kwargs.get("stream", extra.get("stream", "localization"))
    if stream not in STREAMS:
        raise ValueError(f"`stream` must be one of {list(STREAMS)}, got {stream!r}")
    gt = GroundTruth.coerce(ground_truth, extra)
    cross = extra.get("cross_accuracy")
    weights = kwargs.get("weights")
    if stream == "localization":
        res = localization_reward(solution_str, gt, cross_accuracy=cross, weights=weights,
                                  max_boxes=kwargs.get("max_boxes"))
    else:
        res = sparse_reward(solution_str, gt, cross_accuracy=cross, weights=weights)
    return {k: float(v) for k, v in res.terms().items()}
