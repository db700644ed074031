"""Models and processors: the embedded tiny random Qwen2.5-VL, its offline byte-level
tokenizer, and the processor that turns chat text and images into model inputs, for the tiny
model and for any local Qwen2.5-VL-family checkpoint (Lingshu-7B, Qwen2.5-VL-7B, ...).

* :func:`build_tiny` - model + processor from ``configs/models/tiny_qwen2_5_vl.yaml``, no
  download. The tokenizer (:func:`build_tiny_tokenizer`, the ``tokenizers`` library) is
  byte-level (ids 0-255), then Qwen2.5's 22 special tokens in Qwen's order
  (id = real id - 151643 + 256), then the format tags as single tokens. The model's config
  carries the remapped ids (``image_token_id``, ``vision_start_token_id``, ...); code here
  and in :mod:`tsparse.dualstream.pruning` reads ids from the config, never hard-codes them.
* :class:`VLProcessor` - transformers' own processor (``AutoProcessor`` of a checkpoint; for
  the tiny model the real ``Qwen2_5_VLProcessor`` built from its tokenizer, transformers'
  Qwen2-VL image processor configured by the config's ``image_processor`` section - PIL backend
  by default - and its chat template), wrapped with what tsparse's callers share: one stream's
  prompts from samples, tensors on a device, fixed dtypes, the vision token ids. The processing
  itself (chat template, ``smart_resize``, 14-px patches, ``<|image_pad|>`` expansion) is
  transformers'.
* :func:`load_model_and_processor` - ``"tiny"`` or a local checkpoint path (``--model PATH``).

transformers is imported when these functions run, not when this module is imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .config import load_yaml

__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "QWEN_SPECIAL_TOKEN_BASE_ID",
    "byte_level_alphabet",
    "build_tiny_tokenizer",
    "build_tiny_model",
    "build_tiny",
    "VLProcessor",
    "load_model_and_processor",
    "vision_token_ids",
]

PathLike = Union[str, os.PathLike]

#: Qwen2.5's special tokens in id order; the first has id 151643 in the real vocabulary.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
QWEN_SPECIAL_TOKEN_BASE_ID = 151643
TINY_CONFIG = "models/tiny_qwen2_5_vl"


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map (printable bytes map to themselves, the other 68 to
    characters from U+0100 on): the alphabet of a byte-level tokenizer without merges."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _tiny_config(cfg: Union[None, PathLike, Mapping]) -> dict:
    if cfg is None:
        return load_yaml(TINY_CONFIG)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return load_yaml(cfg)


def _section(cfg: Mapping, name: str) -> dict:
    sec = cfg.get(name)
    if not isinstance(sec, Mapping):
        raise ValueError(f"tiny model config: `{name}` must be a mapping, got {type(sec).__name__}")
    return dict(sec)


def build_tiny_tokenizer(cfg: Union[None, PathLike, Mapping] = None):
    """The tiny model's tokenizer, built offline with the ``tokenizers`` library.

    Args:
        cfg: the tiny model config (a mapping, a YAML path/name; default
            ``configs/models/tiny_qwen2_5_vl.yaml``): ``tokenizer.format_tags`` (added as
            single, non-special tokens after the special tokens), ``tokenizer.coordinate_tokens``
            (``d`` in 1..3, or null/0 for none: the strings ``0.0..0`` .. ``1.0..0`` with ``d``
            decimals are added as single tokens after the tags, so a box coordinate is one
            token, not ``d + 2`` bytes) and ``chat_template``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``eos_token`` ``<|im_end|>``,
    ``pad_token`` ``<|endoftext|>`` and the chat template. Any text round-trips through
    encode/decode (byte-level: no unknown tokens).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = _tiny_config(cfg)
    tcfg = _section(cfg, "tokenizer")
    tags = list(tcfg.get("format_tags", []))
    if not all(isinstance(t, str) and t for t in tags) or len(set(tags)) != len(tags):
        raise ValueError(f"tiny model config: `tokenizer.format_tags` must be distinct non-empty strings, got {tags!r}")
    coord = tcfg.get("coordinate_tokens") or 0
    if isinstance(coord, bool) or not isinstance(coord, int) or not 0 <= coord <= 3:
        raise ValueError(f"tiny model config: `tokenizer.coordinate_tokens` must be null or an int in 0..3, got {coord!r}")
    template = cfg.get("chat_template")
    if not isinstance(template, str) or not template.strip():
        raise ValueError("tiny model config: `chat_template` must be a non-empty Jinja string")
    alphabet = byte_level_alphabet()
    vocab = {ch: b for b, ch in alphabet.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    if tags:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    if coord:
        scale = 10**coord
        tok.add_tokens([AddedToken(f"{k / scale:.{coord}f}", special=False, normalized=False)
                        for k in range(scale + 1)])
    for k, t in enumerate(QWEN_SPECIAL_TOKENS):  # the remapping the docs promise
        assert tok.token_to_id(t) == 256 + k, (t, tok.token_to_id(t))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )
    return fast


def vision_token_ids(tokenizer) -> dict[str, int]:
    """``{"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"}``
    looked up in ``tokenizer`` by Qwen's token strings; ``ValueError`` if one is missing."""
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    out = {}
    for key, tok in names.items():
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"`tokenizer` has no {tok} token (not a Qwen2-VL-family tokenizer)")
        out[key] = int(i)
    return out


def build_tiny_model(
    tokenizer,
    cfg: Union[None, PathLike, Mapping] = None,
    *,
    seed: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` (eval mode) for ``tokenizer``.

    Args:
        tokenizer: from :func:`build_tiny_tokenizer`; its special-token ids go into the config.
        cfg: the tiny model config (``text``, ``vision``, ``tokenizer.vocab_multiple``,
            ``seed``, ``image_processor.patch_size/merge_size/temporal_patch_size``).
        seed: weight seed (default ``cfg["seed"]``); the global RNG state is left as it was.
        dtype: parameter dtype.

    The vocabulary is ``len(tokenizer)`` padded up to a multiple of
    ``tokenizer.vocab_multiple``; ``generation_config`` stops at ``<|im_end|>`` or
    ``<|endoftext|>`` and pads with ``<|endoftext|>``.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = _tiny_config(cfg)
    text = _section(cfg, "text")
    vision = _section(cfg, "vision")
    ip = _section(cfg, "image_processor")
    mult = int(_section(cfg, "tokenizer").get("vocab_multiple", 64))
    if mult < 1:
        raise ValueError(f"tiny model config: `tokenizer.vocab_multiple` must be >= 1, got {mult}")
    vocab = -(-len(tokenizer) // mult) * mult
    ids = vision_token_ids(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    mrope = list(text.pop("mrope_section", [2, 3, 3]))
    theta = float(text.pop("rope_theta", 1e6))
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if sum(mrope) * 2 != head_dim:
        raise ValueError(f"tiny model config: `text.mrope_section` {mrope} must sum to head_dim / 2 = {head_dim // 2}")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
            rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": mrope},
            **text,
        ),
        vision_config=dict(
            out_hidden_size=text["hidden_size"],
            patch_size=int(ip.get("patch_size", 14)),
            spatial_merge_size=int(ip.get("merge_size", 2)),
            temporal_patch_size=int(ip.get("temporal_patch_size", 2)),
            **vision,
        ),
        **ids,
    )
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    coord_init = _section(cfg, "tokenizer").get("coordinate_init", "random")
    if coord_init not in ("random", "ordinal"):
        raise ValueError(f"tiny model config: `tokenizer.coordinate_init` must be random or ordinal, got {coord_init!r}")
    # The model is initialized on the CPU: seed only the CPU generator inside the fork.
    # (torch.manual_seed would also re-seed every CUDA generator, which fork_rng(devices=[])
    # does not restore: a GPU run's sampling would then follow this seed, not the run's.)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    if coord_init == "ordinal":
        _ordinal_coordinate_init(model, tokenizer)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    return model


def coordinate_token_values(tokenizer) -> dict[int, float]:
    """``{token id: value}`` of the tokenizer's single-token box coordinates
    (``tokenizer.coordinate_tokens``; ``{}`` when it has none)."""
    out = {}
    for tok, i in tokenizer.get_vocab().items():
        if len(tok) >= 3 and tok[0] in "01" and tok[1] == "." and tok[2:].isdigit() and float(tok) <= 1.0:
            out[int(i)] = float(tok)
    return out


@torch.no_grad()
def _ordinal_coordinate_init(model, tokenizer) -> None:
    """"Number sense" for the coordinate tokens of a random tiny model (a pretrained VLM has it,
    a random one starts with 101 unrelated symbols): in the first two dimensions, each
    coordinate token's input embedding is ``0.05 * (2v - 1, 1)`` - its value, readable by a
    linear map - and its LM-head row ``(2v, -v^2)``, so ``logit(v) = 2 v h_0 - v^2 h_1`` peaks at
    ``v = h_0 / h_1``: the model points at a value by writing it linearly into its last hidden
    state. All other weights keep transformers' random initialization."""
    values = coordinate_token_values(tokenizer)
    if not values:
        raise ValueError("`tokenizer.coordinate_init: ordinal` needs `tokenizer.coordinate_tokens`")
    ids = torch.tensor(sorted(values), dtype=torch.int64)
    v = torch.tensor([values[int(i)] for i in ids], dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    emb[ids, 0] = (0.05 * (2 * v - 1)).to(emb.dtype)
    emb[ids, 1] = 0.05
    head[ids] = 0.0
    head[ids, 0] = (2 * v).to(head.dtype)
    head[ids, 1] = (-(v**2)).to(head.dtype)


def inputs_to_device(out: dict, device: Optional[Union[str, torch.device]]) -> dict:
    """Moves the model inputs of an encoded batch (``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``, ``pixel_values``; ``image_grid_thw`` stays on the CPU) to ``device``
    in place (nothing when ``device`` is None) and returns ``out``."""
    if device is not None:
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values"):
            if key in out:
                out[key] = out[key].to(device)
    return out


# --------------------------------------------------------------------------------------
class VLProcessor:
    """Chat text + images -> Qwen2.5-VL model inputs, through transformers' own processor.

    All processing is done by ``processor`` (the checkpoint's ``AutoProcessor``, e.g.
    ``Qwen2_5_VLProcessor``: the chat template, the image processor's ``smart_resize`` and
    patching into ``pixel_values`` + ``image_grid_thw``, and the expansion of each
    ``<|image_pad|>`` into ``t*h*w / merge_size**2`` tokens), so a checkpoint is processed
    exactly as its authors' code does. This class adds what tsparse's callers share: the batch
    of one stream's prompts from samples (:meth:`encode_samples`), tensors on a device, fixed
    dtypes, and the ids of the vision tokens.

    Args:
        processor: a transformers processor of the Qwen2-VL family (it has ``tokenizer``,
            ``image_processor`` with ``merge_size``, a chat template, and expands image tokens).
    """

    def __init__(self, processor):
        ip = getattr(processor, "image_processor", None)
        if getattr(ip, "merge_size", None) is None or getattr(processor, "tokenizer", None) is None:
            raise ValueError(f"`processor` must be a Qwen2-VL-family processor with a tokenizer and an image processor "
                             f"that has merge_size, got {type(processor).__name__}")
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"`processor` ({type(processor).__name__}) has no chat template")
        self.hf = processor
        ids = vision_token_ids(processor.tokenizer)
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = ids["image_token_id"]
        self.vision_start_token_id = ids["vision_start_token_id"]
        self.vision_end_token_id = ids["vision_end_token_id"]

    @property
    def tokenizer(self):
        return self.hf.tokenizer

    @property
    def image_processor(self):
        return self.hf.image_processor

    @property
    def chat_template(self) -> str:
        return self.hf.chat_template

    @property
    def merge_size(self) -> int:
        return int(self.hf.image_processor.merge_size)

    # -- text ----------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> str:
        """Renders chat messages (HF multimodal format, see
        :func:`tsparse.dualstream.data.build_messages`) to text, one ``<|image_pad|>`` per image."""
        return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Token ids (a list or 1-D tensor) -> text, special tokens dropped by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def batch_decode(self, ids, *, skip_special_tokens: bool = True) -> list[str]:
        """Rows of token ids -> texts."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    # -- text + images -------------------------------------------------------------------
    def __call__(
        self,
        texts: Sequence[str],
        images: Optional[Sequence[Sequence[Any]]] = None,
        *,
        padding_side: str = "left",
        device: Optional[Union[str, torch.device]] = None,
    ) -> dict:
        """Tokenizes a batch with the transformers processor (which expands each
        ``<|image_pad|>`` to its image's token count).

        Args:
            texts: ``B`` rendered chats; text ``b`` holds one ``<|image_pad|>`` per image in
                ``images[b]``, in order.
            images: ``B`` lists of images (``PIL.Image``; any mode, converted to RGB), or
                ``None`` when no text has an image.
            padding_side: ``"left"`` (for generation) or ``"right"``.
            device: where the tensors go (default CPU; ``image_grid_thw`` stays on the CPU,
                as pruning reads it on the host).

        Returns a dict: ``input_ids`` int64 ``[B, L]``, ``attention_mask`` int64 ``[B, L]``,
        ``mm_token_type_ids`` int32 ``[B, L]`` (1 on image tokens), and when there are images
        ``pixel_values`` float32 ``[num_patches, 3 * temporal_patch_size * patch_size**2]`` and
        ``image_grid_thw`` int64 ``[num_images, 3]`` (images in batch order).

        Raises ``ValueError`` naming the text whose placeholder count does not match its images.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("`texts` must be a sequence of str")
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
        texts = list(texts)
        if images is None:
            images = [[] for _ in texts]
        images = [list(im) for im in images]
        if len(images) != len(texts):
            raise ValueError(f"`images` has {len(images)} entries for {len(texts)} texts")
        flat = []
        for b, (t, ims) in enumerate(zip(texts, images)):
            n = t.count(self.image_token)
            if n != len(ims):
                raise ValueError(f"`texts[{b}]` has {n} {self.image_token} placeholders for {len(ims)} images")
            flat += [im.convert("RGB") if hasattr(im, "convert") else im for im in ims]
        enc = self.hf(text=texts, images=flat or None, padding=True, padding_side=padding_side,
                      return_tensors="pt", add_special_tokens=False, return_mm_token_type_ids=False)
        ids = enc["input_ids"].to(torch.int64)
        out: dict = {}
        if flat:
            out["pixel_values"] = enc["pixel_values"]
            out["image_grid_thw"] = enc["image_grid_thw"].to(torch.int64)
        out["input_ids"] = ids
        out["attention_mask"] = enc["attention_mask"].to(torch.int64)
        out["mm_token_type_ids"] = (ids == self.image_token_id).to(torch.int32)
        return inputs_to_device(out, device)

    def encode_samples(
        self,
        samples: Sequence[Any],
        prompt: Any,
        *,
        padding_side: str = "left",
        device: Optional[Union[str, torch.device]] = None,
    ) -> dict:
        """One stream's prompts for a batch of samples: :func:`~tsparse.dualstream.data.build_messages`
        with ``prompt`` (a :class:`~tsparse.dualstream.config.StreamPrompt`), the chat template
        with the generation prompt, the images loaded, then :meth:`__call__`. Returns its dict
        plus ``"texts"`` (the rendered prompts, before image-token expansion)."""
        from .data import build_messages, load_images

        texts = [self.apply_chat_template(build_messages(s, prompt)) for s in samples]
        out = self(texts, [load_images(s) for s in samples], padding_side=padding_side, device=device)
        out["texts"] = texts
        return out

    @property
    def image_backend(self) -> str:
        """``"pil"`` or ``"torchvision"``: which of transformers' two image processor backends
        this processor uses (their resampling and float rounding differ slightly)."""
        return "pil" if type(self.image_processor).__name__.endswith("Pil") else "torchvision"

    # -- persistence ---------------------------------------------------------------------
    def save_pretrained(self, path: PathLike) -> None:
        """The transformers processor's own ``save_pretrained`` (tokenizer, image and video
        processor configs, chat template), plus ``tsparse_processor.json`` recording the image
        backend (transformers does not record it: ``AutoProcessor`` picks torchvision when it is
        installed), so :meth:`from_pretrained` processes the folder as the run that saved it."""
        self.hf.save_pretrained(str(path))
        (Path(path) / PROCESSOR_FILE).write_text(json.dumps({"image_backend": self.image_backend}), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: PathLike) -> "VLProcessor":
        """transformers' ``AutoProcessor.from_pretrained(path, local_files_only=True)`` of a local
        folder (a Qwen2.5-VL-family checkpoint, or :meth:`save_pretrained` output): a checkpoint
        is processed exactly as transformers processes it. One addition: the image backend a
        tsparse checkpoint records (``tsparse_processor.json``; PIL for a ``tsparse.train``
        checkpoint of an earlier version, recognised by its ``tsparse_method.yaml``) is the one
        loaded, so a trained model sees the pixels it was trained on. A processor without a chat template takes its
        tokenizer's."""
        from transformers import AutoImageProcessor, AutoProcessor

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"`path`: {str(path)!r} is not a folder")
        proc = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        backend = _recorded_image_backend(path)
        if backend is not None and backend != ("pil" if type(proc.image_processor).__name__.endswith("Pil")
                                               else "torchvision"):
            proc.image_processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True,
                                                                      backend=backend)
        if not getattr(proc, "chat_template", None) and getattr(getattr(proc, "tokenizer", None), "chat_template", None):
            proc.chat_template = proc.tokenizer.chat_template
        return cls(proc)


PROCESSOR_FILE = "tsparse_processor.json"
_IMAGE_BACKENDS = {"pil": "Qwen2VLImageProcessorPil", "torchvision": "Qwen2VLImageProcessor"}


def _recorded_image_backend(path: Path) -> Optional[str]:
    """The image backend a tsparse checkpoint recorded, or ``None`` (transformers' choice)."""
    try:
        if (path / PROCESSOR_FILE).is_file():
            backend = json.loads((path / PROCESSOR_FILE).read_text(encoding="utf-8")).get("image_backend")
            return backend if backend in _IMAGE_BACKENDS else None
        if (path / "tsparse_method.yaml").is_file():
            return "pil"  # a tsparse.train checkpoint from before this record: its processor was PIL-only
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _tiny_processor(cfg: Mapping, tokenizer):
    """transformers' ``Qwen2_5_VLProcessor`` of the tiny model, built from the config: the
    tiny tokenizer; transformers' Qwen2-VL image processor with every key of the config's
    ``image_processor`` section as its settings, ``backend`` (``pil``: ``Qwen2VLImageProcessorPil``,
    the default; ``torchvision``: ``Qwen2VLImageProcessor``) choosing the class; a
    ``Qwen2VLVideoProcessor`` with the same patching (``patch_size``, ``temporal_patch_size``,
    ``merge_size``); and ``chat_template``."""
    import transformers

    ip_cfg = _section(cfg, "image_processor")
    backend = ip_cfg.pop("backend", "pil")
    if backend not in _IMAGE_BACKENDS:
        raise ValueError(f"tiny model config: `image_processor.backend` must be one of {sorted(_IMAGE_BACKENDS)}, "
                         f"got {backend!r}")
    image_processor = getattr(transformers, _IMAGE_BACKENDS[backend])(**ip_cfg)
    video_processor = transformers.Qwen2VLVideoProcessor(
        **{k: ip_cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size") if k in ip_cfg})
    return transformers.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            video_processor=video_processor, chat_template=cfg["chat_template"])


def build_tiny(
    cfg: Union[None, PathLike, Mapping] = None,
    *,
    seed: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
):
    """``(model, processor)``: the tiny random Qwen2.5-VL and its :class:`VLProcessor`, from
    ``configs/models/tiny_qwen2_5_vl.yaml`` (or ``cfg``). Offline; deterministic in ``seed``."""
    cfg = _tiny_config(cfg)
    tok = build_tiny_tokenizer(cfg)
    model = build_tiny_model(tok, cfg, seed=seed, dtype=dtype)
    return model, VLProcessor(_tiny_processor(cfg, tok))


def load_model_and_processor(
    model: Optional[PathLike] = "tiny",
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    seed: Optional[int] = None,
    tiny_config: Union[None, PathLike, Mapping] = None,
):
    """``(model, processor)`` for ``--model``: ``"tiny"``/``None`` builds the embedded tiny
    model (:func:`build_tiny`); a folder loads a local Qwen2.5-VL-family checkpoint
    (``Qwen2_5_VLForConditionalGeneration.from_pretrained(..., local_files_only=True)`` and
    :meth:`VLProcessor.from_pretrained`), e.g. Lingshu-7B or a checkpoint saved by the trainer.

    Args:
        dtype: parameter dtype (default float32 for the tiny model, the checkpoint's own
            ``torch_dtype`` otherwise).
        device: where to put the model (default: left on the CPU).
        seed: the tiny model's weight seed (ignored for checkpoints).

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a checkpoint whose
    ``model_type`` is not ``qwen2_5_vl``. Returns the model in eval mode.
    """
    if model is None or (isinstance(model, str) and model == "tiny"):
        m, proc = build_tiny(tiny_config, seed=seed, dtype=dtype or torch.float32)
    else:
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"`model`: {str(model)!r} is neither 'tiny' nor a local checkpoint folder")
        mtype = AutoConfig.from_pretrained(path, local_files_only=True).model_type
        if mtype != "qwen2_5_vl":
            raise ValueError(f"`model`: {str(model)!r} is a {mtype!r} checkpoint; tsparse.dualstream needs qwen2_5_vl")
        kwargs = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        m = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs).eval()
        proc = VLProcessor.from_pretrained(path)
    if device is not None:
        m = m.to(device)
    return m, proc
