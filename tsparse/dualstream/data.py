"""Data: ViTAR-16K-format JSON, the deterministic synthetic "scan" dataset in the same format,
and the chat messages of each stream.

ViTAR-16K format: a JSON list of records ``{"image_path": [...], "question": "<image>...
A) .. B) ..", "answer": "C", "bbox": [[x1, y1, x2, y2]]}`` with boxes normalized to 0-1 and
image paths relative to the JSON file. :func:`load_vitar_json` also takes ``image``/``images``
for the image field, ``boxes`` for ``bbox``, an optional ``options`` field (mapping, list, or a
string holding either or ``A. ...`` lines),
JSON Lines files, and keeps every other field in :attr:`VQASample.meta` (``dataset``,
``subset``, ...), so evaluation files in the common medical-VQA layout load too.

The synthetic dataset (:func:`generate_synthetic_scans`, :func:`ensure_synthetic_scans`;
settings in ``configs/data/synthetic_scans.yaml``) needs no download: grayscale "scans" with
a body outline, faint texture and one lesion-like blob (bright or dark, round or elongated,
three sizes, in one quadrant), one multiple-choice question per sample about the lesion, the
lesion's normalized box, and a one-sentence rationale (for warm-up targets). Every sample is
a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .config import StreamPrompt, load_yaml
from .format import format_localization_response, format_sparse_response

__all__ = [
    "VQASample",
    "parse_options",
    "load_vitar_json",
    "read_records",
    "check_image_file",
    "DroppedBoxesWarning",
    "load_images",
    "build_messages",
    "warmup_response",
    "SyntheticScanConfig",
    "render_synthetic_sample",
    "generate_synthetic_scans",
    "ensure_synthetic_scans",
]

PathLike = Union[str, os.PathLike]
IMAGE_PLACEHOLDER = "<image>"
_LETTERS = "ABCDEFGHIJ"


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQASample:
    """One question about one or more images.

    ``images``: absolute image paths, in order; ``question``: as in the file (``<image>``
    placeholders kept); ``answer``: the option letter or short answer; ``boxes``: normalized
    evidence boxes ``(x1, y1, x2, y2)`` (possibly empty); ``options``: option letter -> text
    (from the file's ``options`` field or parsed from the question; empty if none);
    ``meta``: every other field of the record.
    """

    id: str
    images: tuple[str, ...]
    question: str
    answer: str
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


_OPTION_LINE = re.compile(r"^\s*\(?([A-J])\s*[\).:]\s*(.+?)\s*$")
_OPTION_INLINE = re.compile(r"(?:^|\s)\(?([A-J])[\).:]\s+")


def parse_options(question: str) -> dict[str, str]:
    """Option letter -> text from a question, or ``{}`` when it has no options.

    Options are lines starting with ``A)``, ``A.``, ``A:`` or ``(A)``, or, failing that,
    inline markers ``A) ... B) ...`` on one line. Letters must run A, B, C, ... without gaps
    (at least two options); otherwise the question is taken to have none.
    """
    if not isinstance(question, str):
        raise TypeError(f"`question` must be a str, got {type(question).__name__}")
    found: list[tuple[str, str]] = []
    for line in question.splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            found.append((m.group(1), m.group(2)))
    if not _consecutive(found):
        found = []
        marks = list(_OPTION_INLINE.finditer(question))
        for k, m in enumerate(marks):
            end = marks[k + 1].start() if k + 1 < len(marks) else len(question)
            found.append((m.group(1), question[m.end():end].strip()))
        if not _consecutive(found):
            return {}
    return {k: v for k, v in found}


def _consecutive(found: Sequence[tuple[str, str]]) -> bool:
    return len(found) >= 2 and [k for k, _ in found] == list(_LETTERS[: len(found)]) and all(v for _, v in found)


def _record_boxes(value, where: str, invalid: str, dropped: Optional[list] = None) -> tuple:
    """The record's boxes; with ``invalid="drop"`` a bad box is skipped and ``(index, problem)``
    appended to ``dropped``."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: `bbox` must be a list of [x1, y1, x2, y2] boxes, got {type(value).__name__}")
    if len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        value = [value]  # one box written flat
    out = []
    for k, b in enumerate(value):
        problem = None
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in b
        ):
            problem = "is not 4 numbers"
        else:
            x1, y1, x2, y2 = (float(v) for v in b)
            if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in (x1, y1, x2, y2)):
                problem = "has a coordinate outside [0, 1] (boxes must be normalized)"
            elif not (x2 > x1 and y2 > y1):
                problem = "is empty or inverted"
        if problem:
            if invalid == "raise":
                raise ValueError(f"{where}: `bbox[{k}]` = {b!r} {problem}")
            if dropped is not None:
                dropped.append((k, problem))
            continue
        out.append(tuple(min(max(float(v), 0.0), 1.0) for v in b))
    return tuple(out)


def read_records(path: Path) -> list:
    """The records of a JSON list file, or of a JSON Lines file (``.jsonl``, one per line).

    ``ValueError`` naming the file (and the line) for a file that is empty, not UTF-8 text
    (binary), not valid JSON, or whose top level is not a list."""
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path}: the file is empty (expected a JSON list of records, or JSON Lines)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                         f"expected JSON or JSON Lines") from None
    if "\x00" in text:
        raise ValueError(f"{path}: a binary file (it holds NUL bytes); expected JSON or JSON Lines")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({_json_reason(e)})") from None
        return out
    try:
        data = json.loads(text)
    except ValueError as e:
        hint = " (one record per line? name the file .jsonl)" if "Extra data" in str(e) else ""
        raise ValueError(f"{path}: not valid JSON ({_json_reason(e)}){hint}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: the top level must be a JSON list of records, got {type(data).__name__}")
    return data


def _json_reason(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    return " ".join(str(e).split())


class DroppedBoxesWarning(UserWarning):
    """Ground-truth boxes skipped as invalid while reading a data file (``invalid_boxes="drop"``)."""


def check_image_file(path: str, where: str) -> None:
    """``FileNotFoundError`` when ``path`` is not a file, ``ValueError`` when it is not an image
    PIL can open (its header is read, not the pixels); both name ``where`` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {path!r} not found")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{where}: {path!r} is not an image PIL can read ({' '.join(str(e).split())})") from None


def load_vitar_json(
    path: PathLike,
    *,
    check_images: bool = True,
    invalid_boxes: str = "raise",
    limit: Optional[int] = None,
) -> list[VQASample]:
    """Reads a ViTAR-16K-format file (a JSON list, or JSON Lines when the name ends in
    ``.jsonl``) into :class:`VQASample` records.

    Args:
        path: the file. Relative image paths resolve against its folder.
        check_images: raise ``FileNotFoundError`` (naming the record and path) when an image
            file is missing, ``ValueError`` when it is not an image (its header is read: about
            0.3 ms per image on the project's CPU machine, ~5 s for ViTAR-16K).
        invalid_boxes: ``"raise"`` (default): a box that is not 4 finite numbers in [0, 1]
            with ``x1 < x2`` and ``y1 < y2`` raises ``ValueError`` naming the record;
            ``"drop"``: such boxes are skipped, counted, and reported in one
            :class:`DroppedBoxesWarning` (the count and the first few record ids). A ``bbox``
            that is not a list at all is an error either way.
        limit: read at most this many records (``None``: all).

    Required fields: ``question`` (str) and ``answer`` (str or number), and an image field
    (``image_path``, ``image`` or ``images``: a path or a list of paths, at least one). Errors
    name the record index and the field.
    """
    if invalid_boxes not in ("raise", "drop"):
        raise ValueError(f"`invalid_boxes` must be 'raise' or 'drop', got {invalid_boxes!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"`limit` must be a non-negative int or None, got {limit!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`path`: no such file {str(path)!r}")
    root = path.resolve().parent
    records = read_records(path)
    out = []
    dropped: list = []
    for i, rec in enumerate(records[:limit] if limit is not None else records):
        where = f"{path} record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: must be a JSON object, got {type(rec).__name__}")
        key = next((k for k in ("image_path", "image", "images") if k in rec), None)
        if key is None:
            raise ValueError(f"{where}: no image field (`image_path`, `image` or `images`)")
        imgs = rec[key]
        imgs = [imgs] if isinstance(imgs, str) else imgs
        if not isinstance(imgs, list) or not imgs or not all(isinstance(p, str) and p for p in imgs):
            raise ValueError(f"{where}: `{key}` must be a path or a non-empty list of paths, got {rec[key]!r}")
        paths = tuple(str(p if os.path.isabs(p) else (root / p)) for p in imgs)
        if check_images:
            for p in paths:
                check_image_file(p, where)
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}: `question` must be a non-blank str, got {q!r}")
        a = rec.get("answer")
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str) or not a.strip():
            raise ValueError(f"{where}: `answer` must be a non-blank str, got {a!r}")
        bkey = "bbox" if "bbox" in rec else "boxes"
        bad: list = []
        boxes = _record_boxes(rec.get(bkey), where, invalid_boxes, dropped=bad)
        opts = rec.get("options")
        if isinstance(opts, str):
            opts = _options_from_str(opts, where)
        if isinstance(opts, dict):
            options = {str(k).strip().upper(): str(v) for k, v in opts.items()}
        elif isinstance(opts, list):
            options = {_LETTERS[k]: str(v) for k, v in enumerate(opts[: len(_LETTERS)])}
        elif opts is None:
            options = parse_options(q)
        else:
            raise ValueError(f"{where}: `options` must be a mapping or a list, got {type(opts).__name__}")
        meta = {k: v for k, v in rec.items() if k not in (key, "question", "answer", bkey, "options", "id")}
        sid = str(rec.get("id", f"{path.stem}_{i}"))
        if bad:
            dropped.append((sid, bkey, bad))
        out.append(VQASample(sid, paths, q, a.strip(), boxes, options, meta))
    if dropped:
        n = sum(len(b) for _, _, b in dropped)
        first = ", ".join(f"{sid!r} ({key}[{b[0][0]}] {b[0][1]})" for sid, key, b in dropped[:3])
        warnings.warn(DroppedBoxesWarning(
            f"{path}: dropped {n} invalid box(es) in {len(dropped)} of {len(out)} records: {first}"
            f"{', ...' if len(dropped) > 3 else ''}"), stacklevel=2)
    return out


def _options_from_str(text: str, where: str):
    """An ``options`` field written as a string: a JSON / Python literal list or mapping (as some
    exports store it), or ``A. ...`` lines (as MedVLThinker-style files do)."""
    import ast

    s = text.strip()
    if not s:
        return None
    if s[0] in "[{":
        for parse in (json.loads, ast.literal_eval):
            try:
                v = parse(s)
            except (ValueError, SyntaxError):
                continue
            if isinstance(v, (list, dict)):
                return v
    found = parse_options(s)
    if not found:
        raise ValueError(f"{where}: `options` string is neither a list/mapping literal nor 'A. ...' lines: {text[:80]!r}")
    return found


def load_images(sample: VQASample) -> list:
    """The sample's images as RGB ``PIL.Image`` objects (fully loaded; files closed).
    ``ValueError`` naming the sample and file when one is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in sample.images:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            if isinstance(e, FileNotFoundError):
                raise FileNotFoundError(f"sample {sample.id!r}: image {p!r} not found") from None
            raise ValueError(f"sample {sample.id!r}: {p!r} is not a readable image ({' '.join(str(e).split())})") from None
    return out


def build_messages(sample: VQASample, prompt: StreamPrompt) -> list[dict]:
    """The chat messages of one stream for a sample, in the HF multimodal chat format.

    ``prompt.user`` with ``{question}`` replaced by the question; each ``<image>`` placeholder
    becomes an ``{"type": "image"}`` entry (in order). A question with no placeholder gets all
    its images first. The system message is omitted when ``prompt.system`` is empty (the
    model's chat template may then add its default). Render with the processor's
    ``apply_chat_template(messages, add_generation_prompt=True)``.

    Raises ``ValueError`` when the question has placeholders but not one per image.
    """
    if not isinstance(sample, VQASample):
        raise TypeError(f"`sample` must be a VQASample, got {type(sample).__name__}")
    if not isinstance(prompt, StreamPrompt):
        raise TypeError(f"`prompt` must be a StreamPrompt, got {type(prompt).__name__}")
    text = prompt.user.replace("{question}", sample.question)
    pieces = text.split(IMAGE_PLACEHOLDER)
    n_ph, n_img = len(pieces) - 1, len(sample.images)
    content: list[dict] = []
    if n_ph == 0:
        content += [{"type": "image"} for _ in range(n_img)]
        content.append({"type": "text", "text": text})
    elif n_ph == n_img:
        for k, piece in enumerate(pieces):
            if piece:
                content.append({"type": "text", "text": piece})
            if k < n_img:
                content.append({"type": "image"})
    else:
        raise ValueError(f"sample {sample.id!r}: the question has {n_ph} '<image>' placeholders for {n_img} images")
    messages = []
    if prompt.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
    messages.append({"role": "user", "content": content})
    return messages


def warmup_response(
    sample: VQASample, stream: str, *, reasoning: Optional[str] = None, decimals: int = 2
) -> str:
    """The supervised warm-up (stage 0) target of a sample in ``stream``'s format.

    ``<think>reasoning</think><box>[[...]]</box><answer>letter</answer>`` for
    ``"localization"`` (the sample's boxes; it must have at least one), ``<think>reasoning
    </think><answer>letter</answer>`` for ``"sparse"``. ``reasoning`` defaults to the sample's
    ``meta["rationale_<stream>"]`` when it has one, else ``meta["rationale"]`` (the synthetic
    dataset writes them); ``ValueError`` naming the sample when there is none, or when a
    localization target has no box.
    """
    if not isinstance(sample, VQASample):
        raise TypeError(f"`sample` must be a VQASample, got {type(sample).__name__}")
    text = reasoning if reasoning is not None else sample.meta.get(f"rationale_{stream}", sample.meta.get("rationale"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"sample {sample.id!r}: no `reasoning` given and no 'rationale' field")
    if stream == "localization":
        if not sample.boxes:
            raise ValueError(f"sample {sample.id!r} has no box for a localization target")
        return format_localization_response(text, sample.boxes, sample.answer, decimals=decimals)
    if stream == "sparse":
        return format_sparse_response(text, sample.answer)
    raise ValueError(f"`stream` must be 'localization' or 'sparse', got {stream!r}")


# --------------------------------------------------------------------------------------
# Synthetic scans
_QUESTION_TYPES = ("location", "intensity", "shape", "size")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
GENERATOR_VERSION = 3


@dataclass(frozen=True)
class SyntheticScanConfig:
    """Settings of the synthetic scan generator (``configs/data/synthetic_scans.yaml``).

    ``image_size``: pixels per side (>= 56; a multiple of 28 keeps Qwen's processor from
    resizing); ``images_per_sample``: 1 or 2 (a second contrast window of the same scan, same
    box); ``question_types``: a non-empty subset of location, intensity, shape, size;
    ``seed``; ``splits``: split name -> number of samples.

    Simplifications for a tiny model (all off by default; the embedded demo turns them on,
    ``configs/data/demo_scans.yaml``):

    * ``position_cue``: ``none`` (grayscale), ``image`` or ``lesion``: the image is RGB - the
      scan in red, the pixel's x coordinate as a ramp 0..255 in green, its y coordinate in
      blue, over the whole image (``image``) or only where the lesion is (``lesion``: the
      ramps weighted by the lesion's own soft mask, black elsewhere) - so visual tokens carry
      their absolute position in their pixels (Qwen2.5-VL's vision tower and language model
      see only relative positions: 2-D RoPE and M-RoPE).
    * ``option_order``: ``shuffled`` (each question's options in a random order) or
      ``fixed`` (always the same order per question type, so the answer letter is a fixed
      function of the lesion's attribute, one hop instead of two).
    * ``question_style``: ``full`` (``"In which region of the scan is the lesion located?"``,
      options such as ``"brighter than the surrounding tissue"``) or ``short`` (``"Where is the
      lesion?"``, one-word options: ``brighter``, ``wide``; about half the prompt tokens).
    * ``lesion_scale``: lesion radii times this (1.0: the sizes above; a lesion too large for
      its quadrant keeps its centre there). Larger lesions cover more visual tokens.
    * ``rationale``: ``sentence`` (``"A small bright round lesion in the upper left."``, every
      attribute), ``attribute`` (only the attribute the question asks about, e.g.
      ``"upper left"``: a short ``<think>`` block) or ``centre`` (the localization stream's
      ``<think>`` is the lesion's centre, ``"0.23, 0.41"`` - a reasoning step its box then
      builds on - and the sparse stream's the attribute; ``rationale_localization`` holds the
      former).
    """

    image_size: int = 224
    images_per_sample: int = 1
    question_types: tuple[str, ...] = _QUESTION_TYPES
    seed: int = 0
    splits: Mapping[str, int] = field(default_factory=lambda: {"train": 256, "val": 64})
    position_cue: str = "none"
    option_order: str = "shuffled"
    question_style: str = "full"
    lesion_scale: float = 1.0
    rationale: str = "sentence"

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 56:
            raise ValueError(f"`image_size` must be an int >= 56, got {self.image_size!r}")
        if self.images_per_sample not in (1, 2):
            raise ValueError(f"`images_per_sample` must be 1 or 2, got {self.images_per_sample!r}")
        qt = tuple(self.question_types)
        if not qt or any(q not in _QUESTION_TYPES for q in qt) or len(set(qt)) != len(qt):
            raise ValueError(f"`question_types` must be distinct names from {list(_QUESTION_TYPES)}, got {qt!r}")
        object.__setattr__(self, "question_types", qt)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.splits, Mapping):
            raise ValueError(f"`splits` must be a mapping name -> count, got {type(self.splits).__name__}")
        for name, n in self.splits.items():
            if name not in _SPLIT_CODES:
                raise ValueError(f"`splits`: unknown split {name!r}; allowed: {list(_SPLIT_CODES)}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"`splits.{name}` must be a non-negative int, got {n!r}")
        object.__setattr__(self, "splits", dict(self.splits))
        if self.position_cue not in ("none", "image", "lesion"):
            raise ValueError(f"`position_cue` must be 'none', 'image' or 'lesion', got {self.position_cue!r}")
        if self.option_order not in ("shuffled", "fixed"):
            raise ValueError(f"`option_order` must be 'shuffled' or 'fixed', got {self.option_order!r}")
        if isinstance(self.lesion_scale, bool) or not isinstance(self.lesion_scale, (int, float)) \
                or not 0.5 <= self.lesion_scale <= 2.0:
            raise ValueError(f"`lesion_scale` must be a number in [0.5, 2], got {self.lesion_scale!r}")
        object.__setattr__(self, "lesion_scale", float(self.lesion_scale))
        if self.question_style not in ("full", "short"):
            raise ValueError(f"`question_style` must be 'full' or 'short', got {self.question_style!r}")
        if self.rationale not in ("sentence", "attribute", "centre"):
            raise ValueError(f"`rationale` must be 'sentence', 'attribute' or 'centre', got {self.rationale!r}")

    @classmethod
    def load(cls, name_or_path: PathLike = "data/synthetic_scans", **overrides) -> "SyntheticScanConfig":
        """Reads the YAML config (unknown keys are an error), then applies ``overrides``."""
        data = {**load_yaml(name_or_path), **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"synthetic scan config: unknown key(s) {unknown}; allowed: {sorted(names)}")
        if "question_types" in data:
            data["question_types"] = tuple(data["question_types"])
        return cls(**data)

    def fingerprint(self) -> str:
        """A short hash of the settings and the generator version (names the output)."""
        blob = json.dumps({**dataclasses.asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_SIZES = {"small": (0.045, 0.06), "medium": (0.075, 0.09), "large": (0.11, 0.13)}
_SHAPES = {"round": (1.0, 1.0), "horizontally elongated": (1.4, 0.7), "vertically elongated": (0.7, 1.4)}
_INTENSITY = {"brighter": (0.33, 0.42), "darker": (-0.34, -0.27)}
_QUADRANTS = ("upper left", "upper right", "lower left", "lower right")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture: a random ``cells x cells`` grid, bilinearly upsampled."""
    from PIL import Image

    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _ellipse_weight(xx, yy, cx, cy, rx, ry, sharpness: float) -> np.ndarray:
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((d - 1.0) * sharpness, -60.0, 60.0)))


def render_synthetic_sample(index: int, cfg: SyntheticScanConfig, split: str = "train") -> tuple[list, dict]:
    """Renders sample ``index`` of ``split``: ``(images, record)``.

    ``images``: ``cfg.images_per_sample`` grayscale ``PIL.Image`` objects (mode ``"L"``,
    ``image_size`` square). ``record``: the ViTAR-format fields (``question``, ``answer``,
    ``bbox``) plus ``id``, ``question_type``, ``attributes`` (the lesion's quadrant,
    intensity, shape, size), ``rationale`` and ``dataset``; ``image_path`` is left for the
    writer. The lesion's box is the analytic extent of its ellipse (the half-intensity
    contour), normalized and rounded to 4 decimals. Deterministic in ``(cfg.seed, split,
    index)``.
    """
    from PIL import Image

    if split not in _SPLIT_CODES:
        raise ValueError(f"`split` must be one of {list(_SPLIT_CODES)}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"`index` must be a non-negative int, got {index!r}")
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index])
    s = cfg.image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5

    # Body: a large ellipse with soft edges and low-frequency texture, on a dark background.
    bx, by = s * (0.5 + rng.uniform(-0.02, 0.02)), s * (0.5 + rng.uniform(-0.02, 0.02))
    brx, bry = s * rng.uniform(0.45, 0.49), s * rng.uniform(0.44, 0.49)
    body = _ellipse_weight(xx, yy, bx, by, brx, bry, 25.0)
    tissue = 0.42 + rng.uniform(-0.04, 0.04) + 0.05 * _smooth_noise(rng, s, 6) + 0.02 * _smooth_noise(rng, s, 14)
    img = 0.04 + body * (tissue - 0.04)
    # Faint distractor structures (low contrast, never the answer).
    for _ in range(int(rng.integers(2, 5))):
        r = s * rng.uniform(0.03, 0.08)
        img += body * rng.uniform(-0.06, 0.06) * _ellipse_weight(xx, yy, s * rng.uniform(0.2, 0.8),
                                                                s * rng.uniform(0.2, 0.8), r, r, 4.0)

    # Lesion attributes, then a position entirely inside its quadrant.
    quadrant = _QUADRANTS[int(rng.integers(4))]
    intensity = ("brighter", "darker")[int(rng.integers(2))]
    shape = tuple(_SHAPES)[int(rng.integers(3))]
    size = tuple(_SIZES)[int(rng.integers(3))]
    r = s * rng.uniform(*_SIZES[size]) * cfg.lesion_scale
    rx, ry = r * _SHAPES[shape][0], r * _SHAPES[shape][1]
    pad = 0.03 * s
    left, top = quadrant.endswith("left"), quadrant.startswith("upper")
    x_lo, x_hi = (0.1 * s + rx, 0.5 * s - pad - rx) if left else (0.5 * s + pad + rx, 0.9 * s - rx)
    y_lo, y_hi = (0.1 * s + ry, 0.5 * s - pad - ry) if top else (0.5 * s + pad + ry, 0.9 * s - ry)
    # A lesion too large for its quadrant (lesion_scale > 1) keeps its centre in the quadrant.
    x_lo, x_hi = min(x_lo, x_hi), max(x_lo, x_hi)
    y_lo, y_hi = min(y_lo, y_hi), max(y_lo, y_hi)
    cx, cy = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
    amp = rng.uniform(*_INTENSITY[intensity])
    lesion = _ellipse_weight(xx, yy, cx, cy, rx, ry, 10.0)
    lesion_tex = 1.0 + 0.15 * _smooth_noise(rng, s, 10)
    img = img + amp * lesion * lesion_tex
    box = [round(max(cx - rx, 0.0) / s, 4), round(max(cy - ry, 0.0) / s, 4),
           round(min(cx + rx, s) / s, 4), round(min(cy + ry, s) / s, 4)]

    images = []
    for v in range(cfg.images_per_sample):
        view = img if v == 0 else np.clip((img - 0.15) * 1.7, 0.0, 1.0) ** 0.8  # a second window
        view = view + rng.normal(0.0, 0.02, size=view.shape).astype(np.float32)
        gray = (np.clip(view, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if cfg.position_cue != "none":  # red: the scan; green: x / s; blue: y / s (pixel centres)
            ramp = (np.arange(s, dtype=np.float32) + 0.5) / s
            gx, gy = np.broadcast_to(ramp[None, :], (s, s)), np.broadcast_to(ramp[:, None], (s, s))
            if cfg.position_cue == "lesion":
                gx, gy = gx * lesion, gy * lesion
            to8 = lambda a: (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # noqa: E731
            rgb = np.stack([gray, to8(gx), to8(gy)], -1)
            images.append(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB"))
        else:
            images.append(Image.fromarray(gray, mode="L"))

    qtype = cfg.question_types[int(rng.integers(len(cfg.question_types)))]
    if cfg.question_style == "full":
        stem, correct, choices = {
            "location": ("In which region of the scan is the lesion located?", quadrant, list(_QUADRANTS)),
            "intensity": ("How does the lesion appear compared with the surrounding tissue?",
                          f"{intensity} than the surrounding tissue",
                          ["brighter than the surrounding tissue", "darker than the surrounding tissue"]),
            "shape": ("What best describes the shape of the lesion?", shape, list(_SHAPES)),
            "size": ("How large is the lesion relative to the scan?", size, list(_SIZES)),
        }[qtype]
    else:  # short: the same questions in a few words
        short_shape = {"round": "round", "horizontally elongated": "wide", "vertically elongated": "tall"}
        stem, correct, choices = {
            "location": ("Where is the lesion?", quadrant, list(_QUADRANTS)),
            "intensity": ("Lesion intensity?", intensity, list(_INTENSITY)),
            "shape": ("Lesion shape?", short_shape[shape], list(short_shape.values())),
            "size": ("Lesion size?", size, list(_SIZES)),
        }[qtype]
    order = rng.permutation(len(choices))  # drawn in both modes: the scans do not depend on the mode
    if cfg.option_order == "shuffled":
        choices = [choices[k] for k in order]
    letter = _LETTERS[choices.index(correct)]
    placeholders = IMAGE_PLACEHOLDER * cfg.images_per_sample
    question = placeholders + "\n" + stem + "\n" + "\n".join(f"{_LETTERS[k]}) {c}" for k, c in enumerate(choices))
    shape_word = "round" if shape == "round" else shape.split()[0] + " elongated"
    if cfg.rationale == "sentence":
        rationale = f"A {size} {'bright' if intensity == 'brighter' else 'dark'} {shape_word} lesion in the {quadrant}."
    else:  # the asked attribute in a word or two (the option's own text in the short style)
        rationale = correct if cfg.question_style == "short" else {
            "location": quadrant, "intensity": "bright" if intensity == "brighter" else "dark",
            "shape": {"round": "round", "horizontally elongated": "wide", "vertically elongated": "tall"}[shape],
            "size": size}[qtype]
    # ``centre``: the localization stream reasons about WHERE (the lesion's centre, which its
    # box then builds on), the sparse stream about WHAT (the asked attribute).
    loc_rationale = f"{0.5 * (box[0] + box[2]):.2f}, {0.5 * (box[1] + box[3]):.2f}" \
        if cfg.rationale == "centre" else None
    record = {
        "id": f"{split}_{index:05d}",
        "question": question,
        "answer": letter,
        "bbox": [box],
        "question_type": qtype,
        "attributes": {"quadrant": quadrant, "intensity": intensity, "shape": shape, "size": size},
        "rationale": rationale,
        **({"rationale_localization": loc_rationale} if loc_rationale is not None else {}),
        "dataset": "synthetic_scans",
    }
    return images, record


def generate_synthetic_scans(
    out_dir: PathLike, cfg: Optional[SyntheticScanConfig] = None, *, splits: Optional[Mapping[str, int]] = None
) -> dict[str, Path]:
    """Writes the synthetic dataset: ``out_dir/<split>.json`` (ViTAR format, image paths
    relative to it) and ``out_dir/images/<split>_<index>_<view>.png``, plus
    ``out_dir/manifest.json`` (settings and fingerprint).

    Args:
        out_dir: the folder (created).
        cfg: generator settings; default ``configs/data/synthetic_scans.yaml``.
        splits: split name -> count, overriding ``cfg.splits``.

    Returns split name -> JSON path.
    """
    cfg = SyntheticScanConfig.load() if cfg is None else cfg
    if not isinstance(cfg, SyntheticScanConfig):
        raise TypeError(f"`cfg` must be a SyntheticScanConfig, got {type(cfg).__name__}")
    if splits is not None:
        cfg = dataclasses.replace(cfg, splits=dict(splits))
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in cfg.splits.items():
        records = []
        for i in range(n):
            images, rec = render_synthetic_sample(i, cfg, split)
            names = []
            for v, im in enumerate(images):
                name = f"images/{split}_{i:05d}_{v}.png"
                im.save(out / name, format="PNG")
                names.append(name)
            records.append({"image_path": names, **rec})
        p = out / f"{split}.json"
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
        tmp.replace(p)
        paths[split] = p
    manifest = {"fingerprint": cfg.fingerprint(), "generator_version": GENERATOR_VERSION,
                "config": dataclasses.asdict(cfg)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return paths


def ensure_synthetic_scans(
    root: PathLike, cfg: Optional[SyntheticScanConfig] = None, *, splits: Optional[Mapping[str, int]] = None
) -> dict[str, Path]:
    """The synthetic dataset under ``root/<fingerprint>/``, generated only when missing or
    incomplete (the folder name is the settings' fingerprint, so different settings never
    mix). Returns split name -> JSON path, as :func:`generate_synthetic_scans`."""
    cfg = SyntheticScanConfig.load() if cfg is None else cfg
    if splits is not None:
        cfg = dataclasses.replace(cfg, splits=dict(splits))
    out = Path(root) / cfg.fingerprint()
    manifest = out / "manifest.json"
    paths = {split: out / f"{split}.json" for split in cfg.splits}
    if manifest.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint") == cfg.fingerprint():
                return paths
        except ValueError:
            pass
    return generate_synthetic_scans(out, cfg)
