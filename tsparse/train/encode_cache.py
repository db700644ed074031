"""The trainer's prompt cache: each sample's stream prompt is rendered, tokenized and its images
preprocessed ONCE, then batches are collated from the cached rows.

Training revisits the same samples every epoch (the demo's warm-up sees each scan ~8 times), and
the processor's work - the chat template, PNG decoding, Qwen's resize / normalize / patchify -
was a quarter of a warm-up step on the 2-core CPU. :class:`CachedEncoder` wraps a processor with
``encode_samples`` (:class:`~tsparse.dualstream.models.VLProcessor` or anything with the same
contract) and returns exactly what ``processor.encode_samples(samples, prompt)`` returns
(tested): the rows padded to the batch's longest with the tokenizer's pad id on
``padding_side``, images in batch order. Everything else is delegated to the processor.

Memory: one sample's rows (a few hundred int64 ids) per stream prompt, and its images' pixel
values once for both streams (float32; 1.2 MB for a 224-px image, 24 MB for a 1008-px one).
``max_bytes`` bounds the pixel cache (least recently used dropped first); the trainer turns the
cache on with ``data.prompt_cache_mb`` (the demo: 1024; off by default).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import torch

from ..dualstream.models import inputs_to_device

__all__ = ["CachedEncoder"]

_ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


class CachedEncoder:
    """``encode_samples`` with a per-sample cache (see the module docs).

    Args:
        processor: the processor to wrap (its ``encode_samples`` computes cache misses, one
            sample at a time).
        max_bytes: most bytes of pixel values kept (``None``: no bound).
    """

    def __init__(self, processor, *, max_bytes: Optional[int] = 1 << 30):
        if not hasattr(processor, "encode_samples") or not hasattr(processor, "tokenizer"):
            raise TypeError(f"`processor` must have encode_samples and a tokenizer, got {type(processor).__name__}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"`max_bytes` must be a non-negative int or None, got {max_bytes!r}")
        self.processor = processor
        self.max_bytes = max_bytes
        self.pixel_bytes = 0
        self._rows: dict = {}
        self._pixels: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str):  # tokenizer, decode, batch_decode, image_processor, ...
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)

    def _pad_id(self) -> int:
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        return int(pad)

    def _one(self, sample, prompt) -> tuple[dict, Any]:
        images = tuple(getattr(sample, "images", ()))
        key = (getattr(sample, "id", None), images, getattr(sample, "question", None),
               getattr(prompt, "system", None), getattr(prompt, "user", None))
        row = self._rows.get(key)
        pix = self._pixels.get(images) if images else None
        if row is not None and (not images or pix is not None):
            self.hits += 1
            if images:
                self._pixels.move_to_end(images)
            return row, pix
        self.misses += 1
        enc = self.processor.encode_samples([sample], prompt, padding_side="left")
        real = enc["attention_mask"][0].bool()
        row = {k: enc[k][0][real].cpu() for k in _ROW_KEYS if k in enc}
        row["texts"] = enc["texts"][0]
        self._rows[key] = row
        if "pixel_values" in enc:
            pix = (enc["pixel_values"].cpu(), enc["image_grid_thw"].cpu())
            self._pixels[images] = pix
            self.pixel_bytes += pix[0].numel() * pix[0].element_size()
            while self.max_bytes is not None and self.pixel_bytes > self.max_bytes and len(self._pixels) > 1:
                _, old = self._pixels.popitem(last=False)
                self.pixel_bytes -= old[0].numel() * old[0].element_size()
        return row, pix

    def encode_samples(
        self,
        samples: Sequence[Any],
        prompt: Any,
        *,
        padding_side: str = "left",
        device: Optional[Union[str, torch.device]] = None,
    ) -> dict:
        """As the processor's ``encode_samples`` (same keys, values and padding)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
        samples = list(samples)
        if not samples:
            raise ValueError("`samples` must not be empty")
        parts = [self._one(s, prompt) for s in samples]
        width = max(int(r["input_ids"].numel()) for r, _ in parts)
        pad = self._pad_id()
        out: dict = {}
        for key in _ROW_KEYS:
            if key not in parts[0][0]:
                continue
            fill = pad if key == "input_ids" else 0
            rows = []
            for r, _ in parts:
                v = r[key]
                filler = torch.full((width - v.numel(),), fill, dtype=v.dtype)
                rows.append(torch.cat([filler, v] if padding_side == "left" else [v, filler]))
            out[key] = torch.stack(rows)
        pix = [p for _, p in parts if p is not None]
        if pix:
            out["pixel_values"] = torch.cat([p[0] for p in pix])
            out["image_grid_thw"] = torch.cat([p[1] for p in pix])
        inputs_to_device(out, device)
        out["texts"] = [r["texts"] for r, _ in parts]
        return out
