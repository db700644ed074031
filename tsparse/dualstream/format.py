"""The two streams' output formats: a strict checker (format reward), a tolerant parser
(pruning), the answer extractor (accuracy) and the writers (warm-up targets, tests).

Localization stream (all visual tokens; reasoning, evidence boxes, answer)::

    <think>...</think><box>[[x1, y1, x2, y2], ...]</box><answer>C</answer>

Sparse-reasoning stream (the pruned visual tokens; reasoning and answer)::

    <think>...</think><answer>C</answer>

Boxes are normalized to 0-1 of the image side (``x`` across, ``y`` down), independent of the
processor's resizing (``shared/notes/qwen2_5_vl.md``). Whitespace between the blocks is
allowed; nothing else may come before, between or after them in the strict format.

Pure Python (``re`` and ``json``); no torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

__all__ = [
    "STREAMS",
    "Box",
    "FormatCheck",
    "BoxParse",
    "check_format",
    "check_localization_format",
    "check_sparse_format",
    "parse_boxes",
    "extract_answer",
    "extract_think",
    "format_boxes",
    "format_localization_response",
    "format_sparse_response",
]

#: Stream names, in the order of their ids (0 = localization, 1 = sparse reasoning).
STREAMS = ("localization", "sparse")

Box = tuple[float, float, float, float]

_TAGS = ("think", "box", "answer")
_ANY_TAG = re.compile(r"</?\s*(?:think|box|answer)\s*>", re.IGNORECASE)
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX4 = re.compile(
    r"[\[(]\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*[\])]"
)
_LOC_STRICT = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<box>(?P<box>.*?)</box>\s*<answer>(?P<answer>.*?)</answer>\s*\Z",
    re.DOTALL,
)
_SPARSE_STRICT = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL
)
_ANSWER = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
_THINK = re.compile(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", re.IGNORECASE | re.DOTALL)
_BOX_OPEN = re.compile(r"<\s*box\s*>", re.IGNORECASE)
_BOX_CLOSE = re.compile(r"<\s*/\s*box\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)


def _need_str(value, arg: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{arg}` must be a str, got {type(value).__name__}")
    return value


def _need_max_boxes(max_boxes) -> int:
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1:
        raise ValueError(f"`max_boxes` must be a positive int, got {max_boxes!r}")
    return max_boxes


# --------------------------------------------------------------------------------------
# Strict checker (the format reward)
@dataclass(frozen=True)
class FormatCheck:
    """Result of a strict format check: ``ok`` and, when not ok, the first reason why."""

    ok: bool
    reason: Optional[str] = None

    def __bool__(self) -> bool:  # ``if check_format(...)`` reads naturally
        return self.ok


def _box_problem(box, i: int) -> Optional[str]:
    if not isinstance(box, list) or len(box) != 4:
        return f"box {i} is not a list of 4 numbers"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return f"box {i} has a non-numeric coordinate"
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return f"box {i} has a non-finite coordinate"
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        return f"box {i} has a coordinate outside [0, 1]"
    if not (x2 > x1 and y2 > y1):
        return f"box {i} is empty or inverted (need x1 < x2 and y1 < y2)"
    return None


def _check_blocks(think: str, answer: str) -> Optional[str]:
    if not think.strip():
        return "empty <think> block"
    if _ANY_TAG.search(think):
        return "a tag inside the <think> block"
    if not answer.strip():
        return "empty <answer> block"
    if _ANY_TAG.search(answer):
        return "a tag inside the <answer> block"
    return None


def check_localization_format(text: str, *, max_boxes: int = 4) -> FormatCheck:
    """Strict check of a localization-stream response.

    The whole text (surrounding whitespace aside) must be ``<think>T</think>`` ``<box>B</box>``
    ``<answer>A</answer>`` in that order, each tag exactly once, lower case, where ``T`` and
    ``A`` are non-blank and hold no tag, and ``B`` is a JSON list of 1 to ``max_boxes`` boxes
    ``[x1, y1, x2, y2]`` of finite numbers in [0, 1] with ``x1 < x2`` and ``y1 < y2``.

    Args:
        text: the decoded response (special tokens such as ``<|im_end|>`` removed).
        max_boxes: most boxes allowed (a positive int).

    Returns a :class:`FormatCheck`. Raises ``TypeError``/``ValueError`` for a non-str ``text``
    or a bad ``max_boxes``.
    """
    _need_str(text, "text")
    max_boxes = _need_max_boxes(max_boxes)
    m = _LOC_STRICT.match(text)
    if m is None:
        return FormatCheck(False, "not <think>...</think><box>...</box><answer>...</answer>")
    problem = _check_blocks(m["think"], m["answer"])
    if problem:
        return FormatCheck(False, problem)
    if _ANY_TAG.search(m["box"]):
        return FormatCheck(False, "a tag inside the <box> block")
    try:
        boxes = json.loads(m["box"])
    except (ValueError, RecursionError):
        return FormatCheck(False, "the <box> block is not valid JSON")
    if not isinstance(boxes, list) or not boxes:
        return FormatCheck(False, "the <box> block is not a non-empty list of boxes")
    if len(boxes) > max_boxes:
        return FormatCheck(False, f"{len(boxes)} boxes (at most {max_boxes} allowed)")
    for i, box in enumerate(boxes):
        problem = _box_problem(box, i)
        if problem:
            return FormatCheck(False, problem)
    return FormatCheck(True)


def check_sparse_format(text: str) -> FormatCheck:
    """Strict check of a sparse-reasoning response: exactly ``<think>T</think>``
    ``<answer>A</answer>`` (surrounding whitespace aside), ``T`` and ``A`` non-blank and
    without tags. Returns a :class:`FormatCheck`; ``TypeError`` for a non-str ``text``."""
    _need_str(text, "text")
    m = _SPARSE_STRICT.match(text)
    if m is None:
        return FormatCheck(False, "not <think>...</think><answer>...</answer>")
    problem = _check_blocks(m["think"], m["answer"])
    if problem:
        return FormatCheck(False, problem)
    return FormatCheck(True)


def check_format(text: str, stream: str, *, max_boxes: int = 4) -> FormatCheck:
    """:func:`check_localization_format` or :func:`check_sparse_format` by ``stream``
    (``"localization"`` or ``"sparse"``; anything else is a ``ValueError``)."""
    if stream == "localization":
        return check_localization_format(text, max_boxes=max_boxes)
    if stream == "sparse":
        return check_sparse_format(text)
    raise ValueError(f"`stream` must be one of {list(STREAMS)}, got {stream!r}")


# --------------------------------------------------------------------------------------
# Tolerant parser (pruning)
@dataclass(frozen=True)
class BoxParse:
    """What :func:`parse_boxes` found.

    ``boxes``: the usable boxes, normalized ``(x1, y1, x2, y2)``, in the order written.
    ``reason``: why no box is usable (``None`` when ``boxes`` is non-empty).
    ``source``: ``"box_tag"`` (inside ``<box>``), ``"text"`` (a ``[[...]]`` list outside
    any ``<box>`` tag, after the reasoning) or ``None``.
    ``dropped``: ``(raw coordinates, why)`` for each candidate box that was not usable.
    """

    boxes: tuple[Box, ...]
    reason: Optional[str]
    source: Optional[str]
    dropped: tuple[tuple[tuple[float, ...], str], ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.boxes)


def _clean_box(raw: Sequence[float], tolerance: float) -> tuple[Optional[Box], str]:
    if not all(math.isfinite(v) for v in raw):
        return None, "non-finite coordinate"
    if any(v < -tolerance or v > 1.0 + tolerance for v in raw):
        return None, "coordinate outside [0, 1] (pixel or 0-1000 boxes are not normalized)"
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in raw)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if not (x2 > x1 and y2 > y1):
        return None, "zero area"
    return (x1, y1, x2, y2), ""


def parse_boxes(text: str, *, max_boxes: Optional[int] = None, tolerance: float = 0.05) -> BoxParse:
    """Tolerant box parser: the evidence boxes of a localization response, for pruning.

    Looks inside the LAST ``<box>`` tag (case and spacing of the tag ignored; a missing
    ``</box>`` runs to the next tag or the end of the text). Without any ``<box>`` tag it looks
    after the reasoning (after the last ``</think>``, or the whole text when there is none)
    for boxes written as a bracketed list. A candidate box is any ``[a, b, c, d]`` or
    ``(a, b, c, d)`` of four numbers. Repairs: coordinates up to ``tolerance`` outside [0, 1]
    are clipped; swapped corners are reordered. Dropped: non-finite coordinates, coordinates
    further outside [0, 1] (pixel or 0-1000 boxes), boxes of zero area after clipping, and
    boxes beyond the first ``max_boxes`` usable ones (``None``: no limit).

    Args:
        text: the decoded response.
        max_boxes: keep at most this many usable boxes (a positive int or ``None``).
        tolerance: how far outside [0, 1] a coordinate may be and still be clipped (>= 0).

    Returns a :class:`BoxParse` whose ``reason`` says why no box was found, e.g.
    ``"no <box> tag and no box list after the reasoning"``, ``"empty <box> tag"``,
    ``"no [x1, y1, x2, y2] box in the <box> tag"`` or ``"no usable box: ..."``.
    Raises ``TypeError``/``ValueError`` for a non-str ``text``, bad ``max_boxes`` or
    ``tolerance``.
    """
    _need_str(text, "text")
    if max_boxes is not None:
        max_boxes = _need_max_boxes(max_boxes)
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"`tolerance` must be a finite number >= 0, got {tolerance!r}")

    opens = list(_BOX_OPEN.finditer(text))
    if opens:
        start = opens[-1].end()
        close = _BOX_CLOSE.search(text, start)
        nxt = _ANY_TAG.search(text, start)
        end = close.start() if close else (nxt.start() if nxt else len(text))
        region, source = text[start:end], "box_tag"
        if not region.strip():
            return BoxParse((), "empty <box> tag", source)
        where = "in the <box> tag"
    else:
        closes = list(_THINK_CLOSE.finditer(text))
        region = text[closes[-1].end():] if closes else text
        region = _ANSWER.sub(" ", region)
        source = "text"
        where = "after the reasoning"
    candidates = [tuple(float(v) for v in m.groups()) for m in _BOX4.finditer(region)]
    if not candidates:
        if source == "text":
            return BoxParse((), "no <box> tag and no box list after the reasoning", None)
        return BoxParse((), f"no [x1, y1, x2, y2] box {where}", source)
    boxes: list[Box] = []
    dropped: list[tuple[tuple[float, ...], str]] = []
    for raw in candidates:
        box, why = _clean_box(raw, float(tolerance))
        if box is None:
            dropped.append((raw, why))
        elif max_boxes is not None and len(boxes) >= max_boxes:
            dropped.append((raw, f"more than max_boxes={max_boxes}"))
        else:
            boxes.append(box)
    if not boxes:
        whys = sorted({why for _, why in dropped})
        return BoxParse((), "no usable box: " + "; ".join(whys), source, tuple(dropped))
    return BoxParse(tuple(boxes), None, source, tuple(dropped))


# --------------------------------------------------------------------------------------
# Answer and reasoning extraction
def extract_answer(text: str) -> Optional[str]:
    """The stripped content of the LAST ``<answer>...</answer>`` block (tag case and spacing
    ignored), or ``None`` when there is no complete block. ``TypeError`` for a non-str."""
    _need_str(text, "text")
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def extract_think(text: str) -> Optional[str]:
    """The stripped content of the FIRST ``<think>...</think>`` block, or ``None``."""
    _need_str(text, "text")
    m = _THINK.search(text)
    return m.group(1).strip() if m else None


# --------------------------------------------------------------------------------------
# Writers (warm-up targets and tests); their output passes the strict checks.
def format_boxes(boxes: Sequence[Sequence[float]], *, decimals: int = 2) -> str:
    """``[[x1, y1, x2, y2], ...]`` with each coordinate rounded to ``decimals`` places.

    Raises ``ValueError`` when ``boxes`` is empty, a box is not 4 finite numbers in [0, 1]
    with ``x1 < x2`` and ``y1 < y2`` after rounding, or ``decimals`` is not in 1..6.
    """
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 1 <= decimals <= 6:
        raise ValueError(f"`decimals` must be an int in 1..6, got {decimals!r}")
    boxes = [list(b) for b in boxes]
    if not boxes:
        raise ValueError("`boxes` must hold at least one box")
    parts = []
    for i, b in enumerate(boxes):
        if len(b) != 4:
            raise ValueError(f"`boxes[{i}]` must have 4 coordinates, got {len(b)}")
        r = [round(float(v), decimals) for v in b]
        problem = _box_problem(r, i)
        if problem:
            raise ValueError(f"`boxes[{i}]` = {b} after rounding to {decimals} decimals: {problem}")
        parts.append("[" + ", ".join(f"{v:.{decimals}f}" for v in r) + "]")
    return "[" + ", ".join(parts) + "]"


def _need_block(value, arg: str) -> str:
    _need_str(value, arg)
    if not value.strip() or _ANY_TAG.search(value):
        raise ValueError(f"`{arg}` must be non-blank text without <think>/<box>/<answer> tags, got {value!r}")
    return value.strip()


def format_localization_response(
    reasoning: str, boxes: Sequence[Sequence[float]], answer: str, *, decimals: int = 2
) -> str:
    """``<think>reasoning</think><box>[[...]]</box><answer>answer</answer>`` (passes
    :func:`check_localization_format` for up to 4 boxes). ``ValueError`` on blank text, tags
    in the text, or bad boxes (see :func:`format_boxes`)."""
    reasoning = _need_block(reasoning, "reasoning")
    answer = _need_block(answer, "answer")
    return f"<think>{reasoning}</think><box>{format_boxes(boxes, decimals=decimals)}</box><answer>{answer}</answer>"


def format_sparse_response(reasoning: str, answer: str) -> str:
    """``<think>reasoning</think><answer>answer</answer>`` (passes :func:`check_sparse_format`)."""
    reasoning = _need_block(reasoning, "reasoning")
    answer = _need_block(answer, "answer")
    return f"<think>{reasoning}</think><answer>{answer}</answer>"
