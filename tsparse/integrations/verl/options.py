"""The flag: ``actor_rollout_ref.model.use_fused_kernels=True`` with
``actor_rollout_ref.model.fused_kernel_options.impl_backend=tsparse``, and tsparse's per-op
switches in the same dict.

Every key of ``fused_kernel_options`` is checked when the backend is ``tsparse``; an unknown
key or a bad value raises ``ValueError`` naming the full config key. verl itself only reads
``impl_backend`` from this dict (a free-form ``dict`` field of ``HFModelConfig``), so these
keys never collide with verl's.

==================  =========  ==============================================================
key                 default    what it swaps in (Liger-style: off = verl's own code path)
==================  =========  ==============================================================
``logprobs``        ``True``   log-probs and entropy in the model forward from tsparse's fused
                               ops (off: verl's ``logprobs_from_logits`` /
                               ``entropy_from_logits`` on the full logits)
``fused_linear``    ``True``   with ``logprobs``: ``fused_linear_logprobs`` on the last hidden
                               states and the LM-head weight, never a ``[T, V]`` logits tensor
                               (off: ``lm_head`` logits, then ``tsparse.ops.logprobs``)
``chunk_size``      ``None``   tokens per chunk of the fused linear path (``None``: the op's
                               default, ~512 MiB of logits per chunk)
``varlen``          ``True``   tsparse's packing where verl unpads / pads: ``unpad_input``,
                               ``pad_input``, ``index_first_axis`` (``verl.utils.attention_utils``
                               and the names ``verl.workers.utils.padding`` bound) and
                               ``no_padding_2_padding`` (the loss's response slicing)
``prune_visual``    ``True``   the visual-token pruning hook in the Qwen2.5-VL forward (after
                               the vision tower; boxes travel in ``multi_modal_inputs``)
``pruning``         see below  ``{fuse, fallback, margin, min_coverage}``: MUST equal what the
                               rollout pruned with (``configs/dualstream.yaml`` ``pruning``);
                               ``fuse`` is the fusion method's name (``none``, ``cosine_mean``,
                               ``nearest_kept``, ``summary``; ``true``/``false`` = ``cosine_mean``
                               /``none``)
``stream_loss``     ``True``   the engine publishes each micro-batch's stream ids and the
                               mini-batch's per-stream token counts to the ``tsparse_dualstream``
                               policy loss
``stream_weights``  ``[1, 1]`` ``w_s`` of the decoupled loss (localization, sparse)
==================  =========  ==============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from ...dualstream.config import PruningConfig

__all__ = ["BACKEND", "CONFIG_PREFIX", "TsparseOptions", "options_from_model_config"]

#: The value of ``fused_kernel_options.impl_backend`` that selects tsparse.
BACKEND = "tsparse"
#: Where the options live in verl's trainer config (used in error messages).
CONFIG_PREFIX = "actor_rollout_ref.model.fused_kernel_options"

_PRUNING_KEYS = ("fuse", "fallback", "margin", "min_coverage")


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{CONFIG_PREFIX}.{key}` must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class TsparseOptions:
    """The parsed ``fused_kernel_options`` of the tsparse backend (see the module docstring)."""

    logprobs: bool = True
    fused_linear: bool = True
    chunk_size: Optional[int] = None
    varlen: bool = True
    prune_visual: bool = True
    pruning: PruningConfig = field(default_factory=PruningConfig)
    stream_loss: bool = True
    stream_weights: tuple = (1.0, 1.0)

    @classmethod
    def from_dict(cls, data: Optional[Mapping]) -> "TsparseOptions":
        """Parses ``fused_kernel_options`` (``impl_backend`` must be ``tsparse``). Raises
        ``ValueError`` naming the full key for an unknown key or a bad value."""
        data = dict(data or {})
        backend = data.pop("impl_backend", None)
        if backend != BACKEND:
            raise ValueError(f"`{CONFIG_PREFIX}.impl_backend` must be {BACKEND!r} for tsparse's options, got {backend!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) {[f'{CONFIG_PREFIX}.{k}' for k in unknown]} for impl_backend={BACKEND}; "
                f"allowed: {['impl_backend'] + sorted(known)}"
            )
        kw: dict = {}
        for key in ("logprobs", "fused_linear", "varlen", "prune_visual", "stream_loss"):
            if key in data:
                kw[key] = _bool(data[key], key)
        if data.get("chunk_size") is not None:
            c = data["chunk_size"]
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"`{CONFIG_PREFIX}.chunk_size` must be a positive int or null, got {c!r}")
            kw["chunk_size"] = c
        if "pruning" in data:
            p = data["pruning"]
            if not isinstance(p, Mapping):
                raise ValueError(f"`{CONFIG_PREFIX}.pruning` must be a mapping {{{', '.join(_PRUNING_KEYS)}}}")
            bad = sorted(set(p) - set(_PRUNING_KEYS))
            if bad:
                raise ValueError(
                    f"unknown key(s) {[f'{CONFIG_PREFIX}.pruning.{k}' for k in bad]}; allowed: {list(_PRUNING_KEYS)} "
                    "(box_scope and padding_side are the rollout's: boxes reach the training forward per image)"
                )
            try:
                kw["pruning"] = PruningConfig(**dict(p))
            except ValueError as exc:
                raise ValueError(f"`{CONFIG_PREFIX}.pruning`: {exc}") from exc
        if "stream_weights" in data:
            w = data["stream_weights"]
            try:
                vals = tuple(float(x) for x in w)
            except TypeError as exc:
                raise ValueError(f"`{CONFIG_PREFIX}.stream_weights` must be a list of numbers, got {w!r}") from exc
            if len(vals) != 2 or not all(math.isfinite(v) and v >= 0 for v in vals):
                raise ValueError(
                    f"`{CONFIG_PREFIX}.stream_weights` must be two finite numbers >= 0 "
                    f"(localization, sparse), got {w!r}"
                )
            kw["stream_weights"] = vals
        return cls(**kw)


def options_from_model_config(model_config: Any) -> Optional[TsparseOptions]:
    """The tsparse options of a verl ``HFModelConfig`` (or anything with ``use_fused_kernels``
    and ``fused_kernel_options``), or ``None`` when the flag is off: ``use_fused_kernels`` is
    false or ``impl_backend`` is not ``tsparse``. Raises ``ValueError`` for bad options."""
    if not bool(getattr(model_config, "use_fused_kernels", False)):
        return None
    opts = getattr(model_config, "fused_kernel_options", None) or {}
    if not isinstance(opts, Mapping):
        try:  # an OmegaConf DictConfig
            from omegaconf import OmegaConf

            opts = OmegaConf.to_container(opts, resolve=True)
        except Exception as exc:  # pragma: no cover - verl always gives a dict
            raise ValueError(f"`{CONFIG_PREFIX}` must be a mapping, got {type(opts).__name__}") from exc
    if opts.get("impl_backend") != BACKEND:
        return None
    return TsparseOptions.from_dict(opts)
