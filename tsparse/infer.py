"""Token-sparse inference: localize -> parse boxes -> prune -> answer from the sparse sequence.

:class:`TokenSparseInference` runs the dual-stream method's inference on a Qwen2.5-VL-family
model with HF ``generate`` (CPU or one GPU), batched:

1. preprocess: chat prompts of both streams (``configs/dualstream.yaml``) and the images;
2. vision: the vision tower runs ONCE per batch (:func:`~tsparse.dualstream.pruning.image_features`);
   both streams reuse its merged visual tokens;
3. localize (``mode="sparse"``, ``boxes="generated"``): the localization stream answers with
   every visual token, greedy, with a named localization prompt (``localization_prompt``):
   ``full`` - the method's own prompt (reasoning, ``<box>[[x1, y1, x2, y2], ...]</box>``,
   answer) - or a shorter one such as ``box_only`` (``configs/eval.yaml``: asked for the boxes
   only, the response begun with ``<box>`` and stopped at ``</box>``); its boxes are read by
   the tolerant :func:`~tsparse.dualstream.format.parse_boxes`;
4. prune: :func:`tsparse.vtp.prune_visual_tokens` - the boxes' tokens through
   ``select_visual_tokens`` with the fusion method ``fuse`` (``none``, ``cosine_mean``,
   ``nearest_kept``, ``summary``; an image without a usable box keeps all its tokens), or a
   baseline at a requested keep ratio, or nothing (``mode="dense"``); kept tokens keep their
   ORIGINAL M-RoPE positions;
5. answer: greedy ``generate`` on the sparse inputs (``answer="generate"``), or the option letter
   with the highest next-token likelihood after ``choice_prefix`` (``answer="choice"``).

Each :class:`InferenceResult` has the response, the extracted answer, the boxes (and why none),
the keep ratio and kept/total tokens per image, the answer prompt's length and its dense length
(text included), the localization stream's prompt and generated token counts, and the batch's
per-phase timings
(``preprocess``, ``vision``, ``localize`` (+ its prefill), ``prune``, ``prefill`` (time to the
first answer token, measured inside ``generate`` by a streamer), ``decode``, ``total``; ms,
CUDA-synchronized at phase boundaries).

Boxes can also be given directly (``boxes=``), taken from the data (``boxes="oracle"``) or
parsed from supplied localization responses (``localization_texts=``), so a run is reproducible
without the localization stream (the tiny random model of the tests cannot localize).

vLLM is not used for the sparse stream: its Qwen2.5-VL takes images as ``pixel_values`` or as
``image_embeds`` + ``image_grid_thw`` and derives the M-RoPE positions from the grid
(``get_mrope_input_positions``: t*(h/2)*(w/2) placeholders per image on the full grid); its one
built-in pruning path (EVS, ``video_pruning_rate``, which carries recomputed positions in extra
embedding channels) serves videos with its own retention rule. Pruned image embeddings with their
original positions cannot be fed without patching its model class (README, "Inference and
evaluation"); vLLM is not installed in this environment either.

``python -m tsparse.infer`` runs one question (the first synthetic scan by default) and prints
the answer, boxes, keep ratio and timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .dualstream.config import MethodConfig, StreamPrompt, _check_keys, load_method_config, load_yaml
from ._cli import ArgumentParser, UsageError
from ._cli import run as run_cli
from .dualstream.data import VQASample, check_image_file, load_images, parse_options
from .dualstream.format import extract_answer, parse_boxes
from .dualstream.pruning import SparseInputs, extend_sparse_inputs, image_features, sparse_generate
from .dualstream.rewards import parse_choice
from .ops.visual_tokens import FUSION_METHODS, fusion_method
from .vtp import BASELINES, image_seed, prune_visual_tokens

__all__ = [
    "LocalizationPrompt",
    "InferenceConfig",
    "InferenceResult",
    "PreparedBatch",
    "TokenSparseInference",
    "parse_mode",
    "load_eval_config",
    "as_sample",
    "main",
]

_LETTERS = "ABCDEFGHIJ"
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------
def parse_mode(mode: str) -> tuple[str, Optional[str]]:
    """``"dense"`` -> ``("dense", None)``, ``"sparse"`` -> ``("sparse", None)``,
    ``"baseline:fastv"`` -> ``("baseline", "fastv")``. ``ValueError`` for anything else."""
    if mode in ("dense", "sparse"):
        return mode, None
    if isinstance(mode, str) and mode.startswith("baseline:") and mode.split(":", 1)[1] in BASELINES:
        return "baseline", mode.split(":", 1)[1]
    raise ValueError(f"`mode` must be 'dense', 'sparse' or 'baseline:<{'|'.join(BASELINES)}>', got {mode!r}")


#: The built-in localization prompt: the method config's own (``prompts.localization``).
FULL_PROMPT = "full"


@dataclass(frozen=True)
class LocalizationPrompt:
    """A named localization prompt for inference (``configs/eval.yaml``,
    ``inference.localization_prompts.<name>``).

    ``system`` / ``user``: the chat's system text and user template (with ``{question}``);
    ``None`` keeps the method config's localization prompt. ``response_prefix``: text written
    after the chat template's assistant header, which the model continues (e.g. ``"<box>"``);
    it is part of the localization text that is parsed. ``stop``: a row stops generating once
    its text (prefix + generated) contains this string (``None``: at EOS or the token limit).
    ``max_new_tokens``: a cap on the localization stream's tokens with this prompt (the limit is
    the smaller of it and ``localization_max_new_tokens``; ``None``: no cap of its own), which
    bounds what a model that does not follow the prompt can cost."""

    system: Optional[str] = None
    user: Optional[str] = None
    response_prefix: str = ""
    stop: Optional[str] = None
    max_new_tokens: Optional[int] = None

    def __post_init__(self):
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"`system` must be a str or null, got {self.system!r}")
        if self.user is not None and (not isinstance(self.user, str) or "{question}" not in self.user):
            raise ValueError(f"`user` must be null or a str containing '{{question}}', got {self.user!r}")
        if not isinstance(self.response_prefix, str):
            raise ValueError(f"`response_prefix` must be a str, got {self.response_prefix!r}")
        if self.stop is not None and (not isinstance(self.stop, str) or not self.stop):
            raise ValueError(f"`stop` must be a non-empty str or null, got {self.stop!r}")
        if self.stop is not None and self.stop in self.response_prefix:
            raise ValueError(f"`stop` {self.stop!r} occurs in `response_prefix` {self.response_prefix!r}")
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool) or not isinstance(
                self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"`max_new_tokens` must be a positive int or null, got {self.max_new_tokens!r}")

    def stream_prompt(self, method_prompt: StreamPrompt) -> StreamPrompt:
        """The chat prompt: this prompt's texts over the method config's localization prompt."""
        return StreamPrompt(system=method_prompt.system if self.system is None else self.system,
                            user=method_prompt.user if self.user is None else self.user)


@dataclass(frozen=True)
class InferenceConfig:
    """Inference settings (``configs/eval.yaml``, section ``inference``).

    ``mode``: ``dense``, ``sparse`` or ``baseline:<name>``. ``boxes``: where the sparse mode's
    boxes come from - ``generated`` (the localization stream) or ``oracle`` (the sample's own
    boxes). ``fuse``: the sparse mode's fusion method (``none``, ``cosine_mean``,
    ``nearest_kept``, ``summary``; ``true``/``false`` = ``cosine_mean``/``none``; ``None``: the
    method config's ``pruning.fuse``). ``baseline_fuse``: the fusion method of the tokens a
    baseline drops (``none`` = dropped, as published). ``keep_ratio``: baselines' ratio when no
    per-image counts are given. ``answer``: ``generate`` or ``choice``; ``choice_prefix``:
    written after the prompt before the letter is scored. ``max_new_tokens`` /
    ``localization_max_new_tokens``: greedy generation lengths. ``localization_prompt``: the
    named localization prompt (``full``: the method config's own; else a key of
    ``localization_prompts``, a mapping of name -> :class:`LocalizationPrompt` or its dict).
    ``fastv_layer``: FastV's ranking layer (``None``: its default). ``seed``: the random
    baseline's seed. ``batch_size``: samples per batch.
    """

    mode: str = "sparse"
    boxes: str = "generated"
    fuse: Union[bool, str, None] = None
    baseline_fuse: Union[bool, str] = "none"
    keep_ratio: Optional[float] = None
    answer: str = "generate"
    choice_prefix: str = "<think>\n</think>\n<answer>"
    max_new_tokens: int = 512
    localization_max_new_tokens: int = 512
    localization_prompt: str = FULL_PROMPT
    localization_prompts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fastv_layer: Optional[int] = None
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self):
        parse_mode(self.mode)
        if self.boxes not in ("generated", "oracle"):
            raise ValueError(f"`boxes` must be 'generated' or 'oracle', got {self.boxes!r}")
        if self.fuse is not None:
            object.__setattr__(self, "fuse", fusion_method(self.fuse, "fuse"))
        object.__setattr__(self, "baseline_fuse", fusion_method(self.baseline_fuse, "baseline_fuse"))
        if not isinstance(self.localization_prompts, Mapping):
            raise ValueError(f"`localization_prompts` must be a mapping of name -> prompt, got "
                             f"{type(self.localization_prompts).__name__}")
        prompts = {}
        for name, value in self.localization_prompts.items():
            if not isinstance(name, str) or not name or name == FULL_PROMPT:
                raise ValueError(f"`localization_prompts`: {name!r} is not a usable name ('{FULL_PROMPT}' is the "
                                 "method config's own prompt)")
            if isinstance(value, LocalizationPrompt):
                prompts[name] = value
                continue
            _check_keys(value, LocalizationPrompt, f"localization_prompts.{name}")
            try:
                prompts[name] = LocalizationPrompt(**dict(value))
            except ValueError as e:
                raise ValueError(f"`localization_prompts.{name}`: {e}") from None
        object.__setattr__(self, "localization_prompts", prompts)
        if self.localization_prompt != FULL_PROMPT and self.localization_prompt not in prompts:
            raise ValueError(f"`localization_prompt` must be one of {[FULL_PROMPT] + sorted(prompts)}, "
                             f"got {self.localization_prompt!r}")
        if self.keep_ratio is not None and (isinstance(self.keep_ratio, bool) or not isinstance(
                self.keep_ratio, (int, float)) or not 0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"`keep_ratio` must be in (0, 1] or null, got {self.keep_ratio!r}")
        if self.answer not in ("generate", "choice"):
            raise ValueError(f"`answer` must be 'generate' or 'choice', got {self.answer!r}")
        if not isinstance(self.choice_prefix, str):
            raise ValueError(f"`choice_prefix` must be a str, got {self.choice_prefix!r}")
        for name in ("max_new_tokens", "localization_max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if self.fastv_layer is not None and (isinstance(self.fastv_layer, bool) or not isinstance(
                self.fastv_layer, int) or self.fastv_layer < 0):
            raise ValueError(f"`fastv_layer` must be a non-negative int or null, got {self.fastv_layer!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}")

    def named_localization_prompt(self, name: Optional[str] = None) -> Optional[LocalizationPrompt]:
        """The :class:`LocalizationPrompt` called ``name`` (default: ``localization_prompt``);
        ``None`` for ``full`` (the method config's own prompt, no prefix, no stop)."""
        name = self.localization_prompt if name is None else name
        if name == FULL_PROMPT:
            return None
        if name not in self.localization_prompts:
            raise ValueError(f"`localization_prompt` must be one of {[FULL_PROMPT] + sorted(self.localization_prompts)}, "
                             f"got {name!r}")
        return self.localization_prompts[name]

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "inference") -> "InferenceConfig":
        """Builds the config from a mapping; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"`{where}`: unknown key(s) {unknown}; allowed: {sorted(names)}")
        try:
            return cls(**dict(data))
        except ValueError as e:
            raise ValueError(f"`{where}`: {e}") from None


def load_eval_config(name_or_path: Optional[PathLike] = None) -> dict:
    """``configs/eval.yaml`` (or the given file) as a dict with ``inference`` (an
    :class:`InferenceConfig`), ``eval`` and ``embedded`` (dicts). Unknown sections are an error."""
    data = load_yaml("eval" if name_or_path is None else name_or_path)
    unknown = sorted(set(data) - {"inference", "eval", "embedded"})
    if unknown:
        raise ValueError(f"eval config: unknown section(s) {unknown}; allowed: ['embedded', 'eval', 'inference']")
    allowed = {"eval": {"modes", "keep_ratio", "out_root", "skip_open"},
               "embedded": {"samples", "image_size", "boxes", "answer", "batch_size"}}
    out = {"inference": InferenceConfig.from_dict(data.get("inference") or {})}
    for sec, keys in allowed.items():
        d = data.get(sec) or {}
        if not isinstance(d, Mapping):
            raise ValueError(f"`{sec}` must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - keys)
        if unknown:
            raise ValueError(f"`{sec}`: unknown key(s) {unknown}; allowed: {sorted(keys)}")
        out[sec] = dict(d)
    for m in out["eval"].get("modes", []):
        parse_mode(m)
    k = out["eval"].get("keep_ratio", "match")
    if k != "match" and (isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1):
        raise ValueError(f"`eval.keep_ratio` must be 'match' or a number in (0, 1], got {k!r}")
    return out


# --------------------------------------------------------------------------------------
@dataclass
class InferenceResult:
    """One sample's inference (``to_dict`` for JSON).

    ``response``: the answer stream's text (for ``answer="choice"``: ``choice_prefix`` + the
    letter + ``</answer>``); ``answer``: the content of its last ``<answer>`` block (``None``
    without one); ``choice``: the option letter it names (``None`` if none); ``option_probs``:
    ``answer="choice"`` only, softmax over the options' letter logits. ``localization``: the
    localization stream's text (when it ran); ``boxes`` / ``box_source`` / ``box_reason``: the
    boxes used for pruning, where they came from (``generated``, ``given``, ``oracle``,
    ``localization_text``) and why none (``None`` when there are some). ``keep_ratio``: kept /
    dense visual tokens of the sample; ``kept_tokens`` / ``visual_tokens`` / ``fallback``: per
    image. ``prompt_tokens``: the answer prompt's length after pruning; ``dense_prompt_tokens``:
    the same prompt with every visual token (so ``prompt_tokens / dense_prompt_tokens`` is the
    whole-sequence length ratio, text included); ``new_tokens``: answer tokens generated.
    ``localization_prompt``: the named localization prompt used (``None`` when the stream did
    not run); ``localization_prompt_tokens`` / ``localization_new_tokens``: its prompt length and
    the tokens it generated (0 when it did not run). ``timings``: the BATCH's phases in ms
    (shared by its ``batch_size`` samples; ``batch`` numbers the batch within the run).
    """

    id: str
    mode: str
    response: str
    answer: Optional[str]
    choice: Optional[str]
    boxes: list
    box_source: Optional[str]
    box_reason: Optional[str]
    keep_ratio: float
    kept_tokens: list
    visual_tokens: list
    fallback: list
    prompt_tokens: int
    new_tokens: int
    timings: dict
    batch: int
    batch_size: int
    localization: Optional[str] = None
    option_probs: Optional[dict] = None
    dense_prompt_tokens: int = 0
    localization_prompt: Optional[str] = None
    localization_prompt_tokens: int = 0
    localization_new_tokens: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


@dataclass
class PreparedBatch:
    """What :meth:`TokenSparseInference.prepare_batch` returns: the answer stream's
    ``sparse`` inputs (pruned per ``mode``), the boxes used per sample with their source and
    reason, the localization responses (``None`` where the stream did not run) with their prompt
    and generated token counts, the dense answer-prompt lengths, the phase timings so far (ms),
    the start time (``time.perf_counter``) and the batch number."""

    mode: str
    samples: list
    sparse: SparseInputs
    boxes: list
    box_sources: list
    box_reasons: list
    localization: list
    timings: dict
    t_start: float
    batch: int
    dense_prompt_tokens: list = dataclasses.field(default_factory=list)
    localization_prompt: Optional[str] = None
    localization_prompt_tokens: list = dataclasses.field(default_factory=list)
    localization_new_tokens: list = dataclasses.field(default_factory=list)


def as_sample(item: Any, index: int = 0) -> tuple[VQASample, Optional[list]]:
    """A question for :class:`TokenSparseInference`: a :class:`VQASample` (images loaded from
    its paths), or a mapping ``{"question", "images" (paths or PIL images), "id"?, "answer"?,
    "options"?, "boxes"?}``. Returns ``(sample, images or None)``; ``ValueError`` naming the
    field that is missing or wrong."""
    if isinstance(item, VQASample):
        return item, None
    if not isinstance(item, Mapping):
        raise TypeError(f"a question must be a VQASample or a mapping, got {type(item).__name__}")
    q = item.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"question {index}: `question` must be a non-blank str")
    imgs = item.get("images", item.get("image"))
    imgs = [imgs] if isinstance(imgs, (str, os.PathLike)) or hasattr(imgs, "convert") else imgs
    if not isinstance(imgs, (list, tuple)) or not imgs:
        raise ValueError(f"question {index}: `images` must be one or more paths or PIL images")
    loaded, names = [], []
    for k, im in enumerate(imgs):
        if isinstance(im, (str, os.PathLike)):
            from PIL import Image

            if not os.path.isfile(im):
                raise FileNotFoundError(f"question {index}: image {str(im)!r} not found")
            with Image.open(im) as f:
                loaded.append(f.convert("RGB"))
            names.append(str(im))
        elif hasattr(im, "convert"):
            loaded.append(im.convert("RGB"))
            names.append(f"<image {k}>")
        else:
            raise ValueError(f"question {index}: `images[{k}]` must be a path or a PIL image")
    opts = item.get("options")
    if isinstance(opts, (list, tuple)):
        opts = {_LETTERS[i]: str(v) for i, v in enumerate(opts[: len(_LETTERS)])}
    options = dict(opts) if isinstance(opts, Mapping) else parse_options(q)
    boxes = tuple(tuple(float(v) for v in b) for b in (item.get("boxes") or ()))
    sample = VQASample(str(item.get("id", index)), tuple(names), q, str(item.get("answer", "")), boxes, options, {})
    return sample, loaded


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


class _FirstToken:
    """A ``generate`` streamer that records when the first new token exists (the prefill's end):
    ``generate`` puts the prompt first, then every new token (``.cpu()`` synchronizes)."""

    def __init__(self):
        self.calls = 0
        self.first: Optional[float] = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


class _StopOnText:
    """A ``generate`` stopping criterion: a row is done once the decoded tail of its new tokens
    contains ``stop`` (the tail is long enough for any token split of ``stop``: every token
    decodes to at least one character, or to nothing for a skipped special token, so the
    last ``len(stop) + 2`` tokens hold a just-completed ``stop``). Rows stay done."""

    def __init__(self, processor, stop: str):
        self.processor = processor
        self.stop = stop
        self.tail = len(stop) + 2
        self.done: Optional[torch.Tensor] = None
        self.stopped_at: list = []  # per row: new tokens when it stopped (None: did not)

    def __call__(self, input_ids, scores=None, **kwargs):
        b = input_ids.shape[0]
        if self.done is None or self.done.shape[0] != b:
            self.done = torch.zeros(b, dtype=torch.bool)
            self.stopped_at = [None] * b
        tails = input_ids[:, -self.tail:].tolist()
        for i, row in enumerate(tails):
            if not self.done[i] and self.stop in self.processor.decode(row, skip_special_tokens=False):
                self.done[i] = True
                self.stopped_at[i] = int(input_ids.shape[1])
        return self.done.to(input_ids.device).clone()


class TokenSparseInference:
    """The dual-stream method's inference pipeline (see the module docs).

    Args:
        model: a transformers ``Qwen2_5_VLForConditionalGeneration`` (eval mode; any device).
        processor: its :class:`~tsparse.dualstream.models.VLProcessor`.
        method: the method config (prompts of both streams, format limits, pruning); default
            ``configs/dualstream.yaml``.
        config: an :class:`InferenceConfig` (default: ``configs/eval.yaml``'s ``inference``).
    """

    def __init__(self, model, processor, *, method: Optional[MethodConfig] = None,
                 config: Optional[InferenceConfig] = None):
        if not hasattr(model, "generate") or not hasattr(getattr(model, "model", None), "get_rope_index"):
            raise TypeError(f"`model` must be a Qwen2.5-VL ForConditionalGeneration model, got {type(model).__name__}")
        if not hasattr(processor, "encode_samples") or not hasattr(processor, "tokenizer"):
            raise TypeError(f"`processor` must be a tsparse VLProcessor, got {type(processor).__name__}")
        if method is not None and not isinstance(method, MethodConfig):
            raise TypeError(f"`method` must be a MethodConfig or None, got {type(method).__name__}")
        if config is not None and not isinstance(config, InferenceConfig):
            raise TypeError(f"`config` must be an InferenceConfig or None, got {type(config).__name__}")
        self.model = model
        self.processor = processor
        self.method = method if method is not None else load_method_config()
        self.config = config if config is not None else load_eval_config()["inference"]
        self.device = _device_of(model)
        self._batches = 0

    # -- helpers ---------------------------------------------------------------------------
    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _encode(self, samples, images, stream: str, named: Optional[LocalizationPrompt] = None) -> dict:
        from .dualstream.data import build_messages

        prompt = self.method.prompts.for_stream(stream)
        suffix = ""
        if named is not None:
            prompt, suffix = named.stream_prompt(prompt), named.response_prefix
        texts = [self.processor.apply_chat_template(build_messages(s, prompt)) + suffix for s in samples]
        return self.processor(texts, images, padding_side="left", device=self.device)

    def _generate(self, sparse: SparseInputs, max_new_tokens: int, extra: Optional[Mapping],
                  stop: Optional[str] = None) -> tuple:
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
        crit = None
        if stop is not None:
            from transformers import StoppingCriteriaList

            crit = _StopOnText(self.processor, stop)
            kwargs["stopping_criteria"] = StoppingCriteriaList([crit])
        kwargs.update(dict(extra or {}))
        clock = _FirstToken()
        t0 = self._now()
        ids = sparse_generate(self.model, sparse, streamer=clock, **kwargs)
        t1 = self._now()
        first = clock.first if clock.first is not None else t1
        counts = self._new_tokens(ids)
        if crit is not None and crit.stopped_at:  # a stopped row generated exactly up to its stop string
            counts = [a if a is not None else c for a, c in zip(crit.stopped_at, counts)]
        return ids, (first - t0) * 1e3, (t1 - first) * 1e3, counts

    def _new_tokens(self, ids: torch.Tensor) -> list[int]:
        stops = self.model.generation_config.eos_token_id
        stops = set(stops if isinstance(stops, (list, tuple)) else [stops]) - {None}
        pad = self.model.generation_config.pad_token_id
        out = []
        for row in ids.tolist():
            n = 0
            for t in row:
                n += 1
                if t in stops:
                    break
            while n and row[n - 1] == pad and pad not in stops:
                n -= 1
            out.append(n)
        return out

    def _letter_ids(self) -> dict:
        tok = self.processor.tokenizer
        out = {}
        for letter in _LETTERS:
            ids = tok(letter, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"answer='choice' needs each option letter to be one token; {letter!r} is {ids}")
            out[letter] = ids[0]
        return out

    # -- the pipeline -----------------------------------------------------------------------
    @torch.no_grad()
    def prepare_batch(
        self,
        questions: Sequence[Any],
        *,
        boxes: Optional[Sequence[Any]] = None,
        localization_texts: Optional[Sequence[str]] = None,
        keep_counts: Optional[Sequence[Sequence[int]]] = None,
        keep_ratio: Optional[float] = None,
        mode: Optional[str] = None,
        localization_generate_kwargs: Optional[Mapping] = None,
    ) -> "PreparedBatch":
        """Steps 1-4 (preprocess, vision, localize, prune) for one batch: the answer stream's
        :class:`~tsparse.dualstream.pruning.SparseInputs` and how they were made. Arguments as
        :meth:`run_batch`."""
        cfg = self.config
        mode = cfg.mode if mode is None else mode
        kind, baseline = parse_mode(mode)
        items = [as_sample(q, i) for i, q in enumerate(questions)]
        if not items:
            raise ValueError("`questions` is empty")
        samples = [s for s, _ in items]
        b = len(samples)
        for name, value in (("boxes", boxes), ("localization_texts", localization_texts), ("keep_counts", keep_counts)):
            if value is not None and len(value) != b:
                raise ValueError(f"`{name}` has {len(value)} entries for {b} questions")
        if kind != "sparse" and (boxes is not None or localization_texts is not None):
            raise ValueError(f"`boxes`/`localization_texts` apply to mode='sparse', not {mode!r}")
        if boxes is not None and localization_texts is not None:
            raise ValueError("pass at most one of `boxes` and `localization_texts`")
        if kind != "baseline" and (keep_counts is not None or keep_ratio is not None):
            raise ValueError(f"`keep_counts`/`keep_ratio` apply to baselines, not {mode!r}")
        if keep_counts is not None and keep_ratio is not None:
            raise ValueError("pass at most one of `keep_counts` and `keep_ratio`")
        keep_ratio = cfg.keep_ratio if keep_ratio is None else keep_ratio
        if kind == "baseline" and keep_counts is None and keep_ratio is None:
            raise ValueError(f"mode={mode!r} needs `keep_counts`, `keep_ratio` or config.keep_ratio")
        batch_no = self._batches
        self._batches += 1
        timings = {k: 0.0 for k in ("preprocess_ms", "vision_ms", "localize_ms", "localize_prefill_ms",
                                    "prune_ms", "prefill_ms", "decode_ms", "total_ms")}

        t_start = self._now()
        images = [im if im is not None else load_images(s) for s, im in items]
        ans = self._encode(samples, images, "sparse")
        t = self._now()
        timings["preprocess_ms"] = (t - t_start) * 1e3
        if "image_grid_thw" not in ans:
            raise ValueError("every question needs at least one image")
        grid = ans["image_grid_thw"]
        emb = image_features(self.model, ans["pixel_values"], grid)
        t2 = self._now()
        timings["vision_ms"] = (t2 - t) * 1e3

        # Boxes for the sparse mode.
        loc_texts: list = [None] * b
        box_list: list = [[] for _ in range(b)]
        sources: list = [None] * b
        reasons: list = [None] * b
        loc_prompt_name: Optional[str] = None
        loc_prompt_tokens: list = [0] * b
        loc_new_tokens: list = [0] * b
        if kind == "sparse":
            max_boxes = self.method.format.max_boxes
            if boxes is not None:
                box_list = [[list(map(float, x)) for x in (bx.boxes if hasattr(bx, "boxes") else (bx or []))]
                            for bx in boxes]
                sources = ["given"] * b
                reasons = [None if bl else "no box given" for bl in box_list]
            elif localization_texts is not None or cfg.boxes == "generated":
                if localization_texts is None:
                    t_pre = self._now()
                    loc_prompt_name = cfg.localization_prompt
                    named = cfg.named_localization_prompt()
                    loc = self._encode(samples, images, "localization", named)
                    if not torch.equal(loc["image_grid_thw"], grid):
                        raise RuntimeError("the two streams' image grids differ (the processor is not deterministic)")
                    dense_loc = prune_visual_tokens(self.model, loc["input_ids"], loc["attention_mask"], grid,
                                                    method="dense", image_embeds=emb)
                    limit = cfg.localization_max_new_tokens
                    if named is not None and named.max_new_tokens is not None:
                        limit = min(limit, named.max_new_tokens)
                    ids, pre_ms, _, loc_new_tokens = self._generate(
                        dense_loc, limit, localization_generate_kwargs,
                        stop=named.stop if named is not None else None)
                    timings["localize_ms"] = (self._now() - t_pre) * 1e3
                    timings["localize_prefill_ms"] = pre_ms
                    prefix = named.response_prefix if named is not None else ""
                    loc_texts = [prefix + t for t in self.processor.batch_decode(ids)]
                    loc_prompt_tokens = [int(v) for v in loc["attention_mask"].sum(1).tolist()]
                    src = "generated"
                else:
                    loc_texts = [str(x) for x in localization_texts]
                    src = "localization_text"
                for i, text in enumerate(loc_texts):
                    parsed = parse_boxes(text, max_boxes=max_boxes)
                    box_list[i] = [list(x) for x in parsed.boxes]
                    sources[i], reasons[i] = src, parsed.reason
            else:  # oracle
                box_list = [[list(x) for x in s.boxes] for s in samples]
                sources = ["oracle"] * b
                reasons = [None if bl else "the sample has no box" for bl in box_list]

        # Prune.
        t3 = self._now()
        fkw: dict = {}
        if kind == "dense":
            method = "dense"
        elif kind == "sparse":
            method = "grounded"
            fkw = {"boxes": [bl if bl else None for bl in box_list], "fuse": cfg.fuse}
        else:
            method = baseline
            fkw = {"fuse": cfg.baseline_fuse, "fastv_layer": cfg.fastv_layer}
            if keep_counts is not None:
                fkw["keep_counts"] = [int(k) for ks in keep_counts for k in ks]
            else:
                fkw["keep_ratio"] = keep_ratio
            if baseline == "random":
                fkw["seeds"] = [image_seed(cfg.seed, s.id, j) for s, ims in zip(samples, images) for j in range(len(ims))]
        sparse = prune_visual_tokens(self.model, ans["input_ids"], ans["attention_mask"], grid, method=method,
                                     image_embeds=emb, config=self.method.pruning, **fkw)
        timings["prune_ms"] = (self._now() - t3) * 1e3
        dense_len = [int(v) for v in ans["attention_mask"].sum(1).tolist()]
        return PreparedBatch(mode, samples, sparse, box_list, sources, reasons, loc_texts, timings, t_start, batch_no,
                             dense_len, loc_prompt_name, loc_prompt_tokens, loc_new_tokens)

    @torch.no_grad()
    def run_batch(
        self,
        questions: Sequence[Any],
        *,
        boxes: Optional[Sequence[Any]] = None,
        localization_texts: Optional[Sequence[str]] = None,
        keep_counts: Optional[Sequence[Sequence[int]]] = None,
        keep_ratio: Optional[float] = None,
        mode: Optional[str] = None,
        localization_generate_kwargs: Optional[Mapping] = None,
        generate_kwargs: Optional[Mapping] = None,
    ) -> list[InferenceResult]:
        """Runs one batch through the pipeline.

        Args:
            questions: samples (see :func:`as_sample`), processed together.
            boxes: ``mode="sparse"``: per-sample boxes to prune to (skips the localization
                stream); entries as :func:`~tsparse.dualstream.pruning.boxes_to_tensors` takes.
            localization_texts: ``mode="sparse"``: per-sample localization responses whose
                parsed boxes prune (skips generating them).
            keep_counts: baselines: per sample, the kept count of each of its images (e.g.
                what the grounded run kept).
            keep_ratio: baselines without ``keep_counts``: the ratio kept of every image
                (default ``config.keep_ratio``).
            mode: overrides ``config.mode``.
            localization_generate_kwargs / generate_kwargs: extra ``generate`` arguments for
                the localization / answer stream (e.g. ``logits_processor``); greedy by default.

        Returns one :class:`InferenceResult` per question, in order. Raises ``ValueError``
        naming the argument when per-sample arguments do not match the questions or do not
        apply to the mode.
        """
        prep = self.prepare_batch(questions, boxes=boxes, localization_texts=localization_texts,
                                  keep_counts=keep_counts, keep_ratio=keep_ratio, mode=mode,
                                  localization_generate_kwargs=localization_generate_kwargs)
        cfg, samples, sparse, timings = self.config, prep.samples, prep.sparse, prep.timings
        b = len(samples)

        # Answer.
        option_probs: list = [None] * b
        if cfg.answer == "generate":
            ids, pre_ms, dec_ms, new_tokens = self._generate(sparse, cfg.max_new_tokens, generate_kwargs)
            timings["prefill_ms"], timings["decode_ms"] = pre_ms, dec_ms
            responses = self.processor.batch_decode(ids)
        else:
            prefix = self.processor.tokenizer(cfg.choice_prefix, add_special_tokens=False)["input_ids"]
            letters = self._letter_ids()
            t5 = self._now()
            ext = extend_sparse_inputs(self.model, sparse, torch.tensor([prefix] * b, dtype=torch.int64)) \
                if prefix else sparse
            logits = self.model(**ext.model_inputs(), logits_to_keep=1, use_cache=False).logits[:, -1].float()
            responses = []
            for i, s in enumerate(samples):
                opts = sorted(k for k in (s.options or {}) if k in letters)
                if not opts:
                    responses.append("")
                    continue
                lg = torch.stack([logits[i, letters[k]] for k in opts])
                option_probs[i] = {k: round(p, 6) for k, p in zip(opts, lg.softmax(0).tolist())}
                responses.append(f"{cfg.choice_prefix}{opts[int(torch.argmax(lg))]}</answer>")
            timings["prefill_ms"] = (self._now() - t5) * 1e3
            new_tokens = [0] * b
        timings["total_ms"] = (self._now() - prep.t_start) * 1e3

        # Per-sample bookkeeping.
        kept, total = sparse.kept_counts.tolist(), sparse.total_counts.tolist()
        fb, owner = sparse.fallback.tolist(), sparse.image_sample.tolist()
        prompt_len = sparse.attention_mask.sum(1).tolist()
        results = []
        for i, s in enumerate(samples):
            k_i = [k for k, o in zip(kept, owner) if o == i]
            n_i = [n for n, o in zip(total, owner) if o == i]
            ans_text = extract_answer(responses[i])
            results.append(InferenceResult(
                id=s.id, mode=prep.mode, response=responses[i], answer=ans_text,
                choice=parse_choice(ans_text, s.options) if ans_text is not None else None,
                boxes=prep.boxes[i], box_source=prep.box_sources[i], box_reason=prep.box_reasons[i],
                keep_ratio=(sum(k_i) / sum(n_i)) if sum(n_i) else 1.0, kept_tokens=k_i, visual_tokens=n_i,
                fallback=[bool(f) for f, o in zip(fb, owner) if o == i],
                prompt_tokens=int(prompt_len[i]), new_tokens=int(new_tokens[i]),
                timings={k: round(v, 3) for k, v in timings.items()}, batch=prep.batch, batch_size=b,
                localization=prep.localization[i], option_probs=option_probs[i],
                dense_prompt_tokens=int(prep.dense_prompt_tokens[i]), localization_prompt=prep.localization_prompt,
                localization_prompt_tokens=int(prep.localization_prompt_tokens[i]),
                localization_new_tokens=int(prep.localization_new_tokens[i]),
            ))
        return results

    def run(self, questions: Sequence[Any], **kwargs) -> list[InferenceResult]:
        """:meth:`run_batch` over ``questions`` in batches of ``config.batch_size``; per-sample
        arguments (``boxes``, ``localization_texts``, ``keep_counts``) are split alongside."""
        questions = list(questions)
        bs = self.config.batch_size
        out: list[InferenceResult] = []
        for lo in range(0, len(questions), bs):
            part = {k: (list(v)[lo:lo + bs] if k in ("boxes", "localization_texts", "keep_counts") and v is not None
                        else v) for k, v in kwargs.items()}
            out += self.run_batch(questions[lo:lo + bs], **part)
        return out


# --------------------------------------------------------------------------------------
def default_data_root() -> Path:
    """Where the embedded synthetic dataset is generated: ``$TSPARSE_CACHE/synthetic_scans``
    (default ``~/.cache/tsparse``)."""
    return Path(os.environ.get("TSPARSE_CACHE", Path.home() / ".cache" / "tsparse")) / "synthetic_scans"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (embedded random model) or a local Qwen2.5-VL checkpoint")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: the checkpoint's (tiny: float32)")
    p.add_argument("--config", default=None, help="eval config (default configs/eval.yaml)")
    p.add_argument("--method-config", default=None, help="method config (default: the tsparse_method.yaml a tsparse.train checkpoint carries, else configs/dualstream.yaml)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (torch.set_num_threads)")


def _positive(value, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be >= 1, got {value}")


def _check_keep_ratio(value, flag: str = "--keep-ratio") -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise UsageError(f"{flag} must be in (0, 1], got {value:g}")


def _check_modes(modes: Sequence[str], flag: str = "--mode") -> None:
    for m in modes:
        try:
            parse_mode(m)
        except ValueError:
            raise UsageError(f"{flag}: unknown mode {m!r}; use dense, sparse or "
                             f"baseline:<{'|'.join(BASELINES)}>") from None


def _check_model_args(args) -> None:
    """Checks the flags of :func:`_add_model_args` before anything is loaded: ``--model`` is
    ``tiny`` or a folder, ``--device`` parses and (CUDA) is usable, ``--threads`` >= 1."""
    if args.model not in (None, "tiny") and not Path(args.model).is_dir():
        raise UsageError(f"--model: {args.model!r} is neither 'tiny' nor a local checkpoint folder")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device: {args.device!r} is not a device (cpu, cuda or cuda:N)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: no CUDA device is usable here "
                                 f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use --device cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
        elif dev.type != "cpu":
            raise UsageError(f"--device: {args.device!r} is not supported (cpu, cuda or cuda:N)")
    _positive(args.threads, "--threads")


def _load(args):
    from .dualstream.models import load_model_and_processor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, proc = load_model_and_processor(args.model, dtype=_DTYPES.get(args.dtype), device=device)
    return model, proc


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m tsparse.infer``: one question through the pipeline; prints the result. A user's
    mistake prints one line on stderr naming it and returns 2 (``--debug``: the traceback)."""
    return run_cli(_main, argv, "python -m tsparse.infer")


def _check_infer_args(args) -> None:
    _check_model_args(args)
    if args.mode is not None:
        _check_modes([args.mode])
    _check_keep_ratio(args.keep_ratio)
    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.localization_max_new_tokens, "--localization-max-new-tokens")
    if args.index < 0:
        raise UsageError(f"--index must be >= 0, got {args.index}")
    for path in args.image or ():
        check_image_file(path, "--image")
    if args.data is not None and not Path(args.data).is_file():
        raise UsageError(f"--data: no such file {args.data!r}")


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="python -m tsparse.infer", description=__doc__.split("\n\n")[0])
    _add_model_args(p)
    p.add_argument("--image", action="append", default=None, help="an image path (repeat for several)")
    p.add_argument("--question", default=None, help="the question (options as 'A) ...' lines)")
    p.add_argument("--data", default=None, help="a ViTAR-format / eval JSON file; with --index, its sample")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--mode", default=None, help="dense | sparse | baseline:<random|pool|fastv|divprune>")
    p.add_argument("--boxes", default=None,
                   help="generated | oracle | a JSON list of boxes, e.g. '[[0.1, 0.2, 0.5, 0.6]]'")
    p.add_argument("--localization", default=None, help="a localization response to take the boxes from")
    p.add_argument("--keep-ratio", type=float, default=None, help="baselines: fraction of each image's tokens kept")
    p.add_argument("--fuse", dest="fuse", action="store_true", default=None)
    p.add_argument("--no-fuse", dest="fuse", action="store_false")
    p.add_argument("--answer", default=None, choices=["generate", "choice"])
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--localization-max-new-tokens", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--fusion", default=None, choices=list(FUSION_METHODS),
                   help="the sparse mode's fusion method (default: pruning.fuse of the method config)")
    p.add_argument("--localization-prompt", default=None,
                   help="named localization prompt: full (the method's own) or one under inference.localization_prompts "
                        "of the eval config, e.g. box_only")
    args = p.parse_args(argv)
    _check_infer_args(args)

    ecfg = load_eval_config(args.config)
    known_prompts = [FULL_PROMPT] + sorted(ecfg["inference"].localization_prompts)
    if args.localization_prompt is not None and args.localization_prompt not in known_prompts:
        p.error(f"--localization-prompt: unknown prompt {args.localization_prompt!r}; known: {known_prompts}")
    over = {k: v for k, v in {
        "mode": args.mode, "fuse": args.fusion if args.fusion is not None else args.fuse,
        "localization_prompt": args.localization_prompt, "keep_ratio": args.keep_ratio, "answer": args.answer,
        "max_new_tokens": args.max_new_tokens, "localization_max_new_tokens": args.localization_max_new_tokens,
        "batch_size": 1,
    }.items() if v is not None}
    given_boxes = None
    if args.boxes in ("generated", "oracle"):
        over["boxes"] = args.boxes
    elif args.boxes is not None:
        try:
            given_boxes = [json.loads(args.boxes)]
        except ValueError:
            given_boxes = None
        if given_boxes is None or not isinstance(given_boxes[0], list):
            p.error("--boxes must be 'generated', 'oracle' or a JSON list of [x1, y1, x2, y2] boxes")
    cfg = dataclasses.replace(ecfg["inference"], **over)
    if parse_mode(cfg.mode)[0] == "baseline" and cfg.keep_ratio is None:
        p.error("a baseline needs --keep-ratio")

    if args.image or args.question:
        if not (args.image and args.question):
            p.error("--image and --question go together")
        question: Any = {"question": args.question, "images": args.image}
    else:
        from .dualstream.data import ensure_synthetic_scans, load_vitar_json

        path = args.data or ensure_synthetic_scans(default_data_root())["val"]
        samples = load_vitar_json(path, limit=args.index + 1)
        if args.index >= len(samples):
            p.error(f"--index {args.index}: {path} has {len(samples)} samples")
        question = samples[args.index]

    model, proc = _load(args)
    from .dualstream.config import method_config_for_model

    method = method_config_for_model(None if args.model in (None, "tiny") else args.model, args.method_config)
    pipe = TokenSparseInference(model, proc, method=method, config=cfg)
    res = pipe.run_batch([question], boxes=given_boxes,
                         localization_texts=[args.localization] if args.localization is not None else None)[0]
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return 0
    print(f"mode: {res.mode}   model: {args.model}   device: {pipe.device}")
    if res.localization is not None:
        print(f"localization ({res.localization_prompt} prompt, {res.localization_new_tokens} tokens): "
              f"{res.localization[:400]!r}")
    if res.mode == "sparse":
        print(f"boxes ({res.box_source}): {res.boxes if res.boxes else 'none - ' + str(res.box_reason)}")
    kept = ", ".join(f"{k}/{n}" for k, n in zip(res.kept_tokens, res.visual_tokens))
    fb = " (fallback: full image)" if any(res.fallback) else ""
    print(f"visual tokens kept: {kept}  keep ratio {res.keep_ratio:.3f}{fb}")
    print(f"response: {res.response[:400]!r}")
    print(f"answer: {res.answer!r}   option: {res.choice}")
    print("timings (ms): " + "  ".join(f"{k[:-3]} {v:.1f}" for k, v in res.timings.items() if v or k == "total_ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
