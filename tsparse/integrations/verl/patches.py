"""Swapping tsparse into verl 0.9.1, Liger-style: every swap is a named switch, off means
verl's own object is left in place, and :func:`unpatch` restores every original.

:func:`apply_tsparse_to_verl` is the explicit API (``logprobs``, ``varlen``, ``prune_visual``,
``stream_loss`` booleans, as Liger's ``apply_liger_kernel_to_*``). In a verl run the flag
(``use_fused_kernels=True`` + ``fused_kernel_options.impl_backend=tsparse``) calls it from
the engine: verl 0.9.1 gives a third-party ``impl_backend`` no hook of its own (it prints
"Skipping monkey patch" and builds the model unchanged), so the plugin installs ONE dispatch
point, :func:`build_module_dispatch` around ``FSDPEngine._build_module``, which runs verl's
original and then - only when that engine's model config carries the flag - applies the swaps
to the built model. With the flag off the dispatcher returns verl's result untouched and no
swap target is modified (:data:`PATCH_TARGETS`, tested object by object).

What each switch replaces (process-wide; verl builds the actor and reference engines in
the same worker process from the same model config):

* model forward (installed whenever the backend is ``tsparse``, because verl's engine then
  expects the forward to return ``log_probs``/``entropy``): ``forward`` of the built model's
  class - ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` get
  :func:`~.model_forward.qwen2_vl_forward_tsparse` (its ``logprobs`` and ``prune_visual``
  parts follow the switches), other causal LMs
  :func:`~.model_forward.causal_lm_forward_tsparse`.
* ``varlen``: ``verl.utils.attention_utils.{unpad_input, pad_input, index_first_axis}``,
  ``verl.workers.utils.padding.{unpad_input, index_first_axis, no_padding_2_padding}`` and
  ``verl.workers.utils.losses.no_padding_2_padding`` (:mod:`.varlen`).
* ``stream_loss``: ``FSDPEngineWithLMHead.forward_backward_batch`` (per-stream global token
  counts of the mini-batch, all-reduced over data-parallel ranks) and
  ``FSDPEngineWithLMHead.forward_step`` (the micro-batch's stream ids) feed the
  ``tsparse_dualstream`` policy loss; both pass through when the batch has no
  ``tsparse_stream`` field.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import torch

from .options import BACKEND, TsparseOptions, options_from_model_config
from .swaps import MISSING, ORIGINALS, original, resolve, restore, set_attr

__all__ = [
    "PATCH_TARGETS",
    "VARLEN_TARGETS",
    "DISPATCH_TARGET",
    "apply_tsparse_to_verl",
    "apply_to_model",
    "unpatch",
    "is_patched",
    "patched_targets",
    "original",
    "resolve",
    "build_module_dispatch",
    "install_dispatcher",
    "uninstall_dispatcher",
]

logger = logging.getLogger(__name__)

_ENGINE = "verl.workers.engine.fsdp.transformer_impl"
_QWEN25 = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
_QWEN2 = "transformers.models.qwen2_vl.modeling_qwen2_vl"

#: The ``varlen`` switch's targets.
VARLEN_TARGETS: tuple = (
    ("verl.utils.attention_utils", "unpad_input"),
    ("verl.utils.attention_utils", "pad_input"),
    ("verl.utils.attention_utils", "index_first_axis"),
    ("verl.workers.utils.padding", "unpad_input"),
    ("verl.workers.utils.padding", "index_first_axis"),
    ("verl.workers.utils.padding", "no_padding_2_padding"),
    ("verl.workers.utils.losses", "no_padding_2_padding"),
)
#: Every ``(module, attribute path)`` a switch of the flag may replace.
PATCH_TARGETS: tuple = VARLEN_TARGETS + (
    (_ENGINE, "FSDPEngineWithLMHead.forward_backward_batch"),
    (_ENGINE, "FSDPEngineWithLMHead.forward_step"),
    (_QWEN25, "Qwen2_5_VLForConditionalGeneration.forward"),
    (_QWEN2, "Qwen2VLForConditionalGeneration.forward"),
)
#: The one attribute the plugin's registration replaces (the dispatcher; see the module doc).
DISPATCH_TARGET = (_ENGINE, "FSDPEngine._build_module")

_ACTIVE: dict = {"options": None}


def patched_targets() -> list[tuple[str, str]]:
    """The ``(owner name, attribute)`` pairs currently replaced by tsparse (dispatcher included)."""
    out = []
    for owner, name, _ in ORIGINALS.values():
        out.append((getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner))), name))
    return out


def is_patched() -> bool:
    """True while any swap of the flag is installed (the dispatcher alone does not count)."""
    return _ACTIVE["options"] is not None


# --------------------------------------------------------------------------------------
# Engine hooks of the ``stream_loss`` switch.
def _per_stream_counts(data, device) -> Optional[tuple]:
    from .losses import NUM_STREAMS, STREAM_FIELD

    if STREAM_FIELD not in data.keys():
        return None
    stream = data[STREAM_FIELD].reshape(-1).to(device=device, dtype=torch.int64)
    mask = data["loss_mask"] if "loss_mask" in data.keys() else data["response_mask"]
    if getattr(mask, "is_nested", False):
        off = mask.offsets().to(device)
        vals = mask.values().to(device=device, dtype=torch.float64)
        row = torch.repeat_interleave(torch.arange(stream.shape[0], device=device), off.diff(), output_size=vals.shape[0])
        per_row = torch.zeros(stream.shape[0], dtype=torch.float64, device=device).index_add_(0, row, vals)
    else:
        per_row = mask.to(device=device, dtype=torch.float64).sum(-1)
    tokens = torch.zeros(NUM_STREAMS, dtype=torch.float64, device=device).index_add_(0, stream, per_row)
    seqs = torch.zeros(NUM_STREAMS, dtype=torch.float64, device=device).index_add_(0, stream, (per_row > 0).double())
    return tokens, seqs


def _make_forward_backward_batch(orig: Callable) -> Callable:
    from .losses import stream_context

    @functools.wraps(orig)
    def forward_backward_batch(self, data, loss_function, forward_only=False):
        opts = _ACTIVE["options"]
        counts = None
        if opts is not None and opts.stream_loss and not forward_only:
            from verl.utils.device import get_device_id

            counts = _per_stream_counts(data, get_device_id())
        if counts is None:
            return orig(self, data, loss_function, forward_only)
        tokens, seqs = counts
        both = torch.stack([tokens, seqs])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.SUM, group=self.get_data_parallel_group())
        with stream_context(tokens=both[0], sequences=both[1], weights=opts.stream_weights):
            return orig(self, data, loss_function, forward_only)

    forward_backward_batch.__tsparse__ = True
    return forward_backward_batch


def _make_forward_step(orig: Callable) -> Callable:
    from .losses import STREAM_FIELD, stream_context

    @functools.wraps(orig)
    def forward_step(self, micro_batch, loss_function, forward_only):
        opts = _ACTIVE["options"]
        if opts is None or not opts.stream_loss or STREAM_FIELD not in micro_batch.keys():
            return orig(self, micro_batch, loss_function, forward_only)
        with stream_context(stream=micro_batch[STREAM_FIELD].reshape(-1)):
            return orig(self, micro_batch, loss_function, forward_only)

    forward_step.__tsparse__ = True
    return forward_step


# --------------------------------------------------------------------------------------
def _model_class(model) -> type:
    """The model's own class (FSDP2 wraps it in a generated ``FSDP<Name>`` subclass)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(model)
    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(model)  # pragma: no cover


def _model_forward_for(model) -> tuple[type, Callable]:
    from . import model_forward

    cls = _model_class(model)
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in ("qwen2_5_vl", "qwen2_vl"):
        return cls, model_forward.qwen2_vl_forward_tsparse
    if hasattr(model, "model") and hasattr(model, "lm_head") and not hasattr(getattr(model, "config", None), "vision_config"):
        return cls, model_forward.causal_lm_forward_tsparse
    raise ValueError(
        f"impl_backend={BACKEND}: unsupported model {cls.__name__} (model_type={mtype!r}); supported: Qwen2.5-VL / "
        "Qwen2-VL, and text causal LMs with .model and .lm_head"
    )


def _dispatching_forward(cls: type, tsparse_forward: Callable) -> Callable:
    """The class forward while tsparse is swapped in: tsparse's for models built under the flag
    (they carry ``_tsparse_options``), the forward the class had before (verl's) for any other
    instance of the class in the process."""

    @functools.wraps(tsparse_forward)
    def forward(self, *args, **kwargs):
        if isinstance(getattr(self, "_tsparse_options", None), TsparseOptions):
            return tsparse_forward(self, *args, **kwargs)
        rec = ORIGINALS.get((id(cls), "forward"))
        orig = rec[2] if rec is not None and rec[2] is not MISSING else None
        if orig is None:
            raise RuntimeError(f"tsparse: no original forward recorded for {cls.__name__}")
        return orig(self, *args, **kwargs)

    forward.__tsparse__ = True
    return forward


def apply_to_model(model, options: TsparseOptions) -> None:
    """Installs tsparse's forward on ``type(model)`` and stores ``options`` on ``model`` (other
    instances of the class keep the class's previous forward)."""
    cls, fwd = _model_forward_for(model)
    current = cls.__dict__.get("forward")
    if not getattr(current, "__tsparse__", False):
        key = (id(cls), "forward")
        if key in ORIGINALS:  # verl re-patched the class since: that is the forward to fall back to
            ORIGINALS[key] = (cls, "forward", current if current is not None else MISSING)
        set_attr(cls, "forward", _dispatching_forward(cls, fwd))
    model._tsparse_options = options


def apply_tsparse_to_verl(
    model=None,
    *,
    logprobs: bool = True,
    varlen: bool = True,
    prune_visual: bool = True,
    stream_loss: bool = True,
    options: Optional[TsparseOptions] = None,
) -> TsparseOptions:
    """Swaps tsparse into verl (process-wide). Each switch off leaves verl's objects in place.

    Args:
        model: the HF model the engine built (its class gets tsparse's forward); ``None``
            installs only the module-level swaps (``varlen``, ``stream_loss``).
        logprobs, varlen, prune_visual, stream_loss: the switches (see the module docstring);
            ignored when ``options`` is given.
        options: a full :class:`~.options.TsparseOptions` (what the flag parses).

    Calling it again with the same options is a no-op; with different options it raises
    ``RuntimeError`` (call :func:`unpatch` first). Returns the options in force.
    """
    if options is None:
        options = TsparseOptions(logprobs=logprobs, varlen=varlen, prune_visual=prune_visual, stream_loss=stream_loss)
    if not isinstance(options, TsparseOptions):
        raise TypeError(f"`options` must be a TsparseOptions, got {type(options).__name__}")
    active = _ACTIVE["options"]
    if active is not None and active != options:
        raise RuntimeError(f"tsparse is already swapped into verl with {active}; call unpatch() before {options}")
    if active is None:
        if options.varlen:
            from . import varlen as tv

            # Import every target module BEFORE replacing anything: a module imported later
            # would bind the already-replaced name (losses.py imports padding's
            # no_padding_2_padding) and its "original" would be tsparse's.
            targets = [resolve(module, path) for module, path in VARLEN_TARGETS]
            for owner, name in targets:
                set_attr(owner, name, getattr(tv, name))
        if options.stream_loss:
            owner, _ = resolve(_ENGINE, "FSDPEngineWithLMHead.forward_step")
            set_attr(owner, "forward_backward_batch", _make_forward_backward_batch(owner.forward_backward_batch))
            set_attr(owner, "forward_step", _make_forward_step(owner.forward_step))
        _ACTIVE["options"] = options
    if model is not None:
        apply_to_model(model, options)
    return options


def unpatch() -> None:
    """Restores every object tsparse replaced (the flag's swaps; not the plugin's dispatcher)."""
    dispatch_key = _dispatch_key()
    for key in reversed(list(ORIGINALS)):
        if key != dispatch_key:
            restore(key)
    _ACTIVE["options"] = None


# --------------------------------------------------------------------------------------
# The dispatcher (installed by the plugin at registration).
def _dispatch_key():
    import sys

    mod = sys.modules.get(_ENGINE)
    if mod is None:
        return None
    return (id(mod.FSDPEngine), "_build_module")


def build_module_dispatch(orig: Callable) -> Callable:
    """Wraps ``FSDPEngine._build_module``: verl builds the model, then - when the engine's
    model config carries the flag - tsparse swaps in (value-head models are left alone)."""

    @functools.wraps(orig)
    def _build_module(self):
        module = orig(self)
        options = options_from_model_config(getattr(self, "model_config", None))
        if options is None:
            return module
        if getattr(self.model_config, "model_type", "language_model") != "language_model":
            logger.warning("impl_backend=%s: leaving the %s model unchanged", BACKEND, self.model_config.model_type)
            return module
        if options.prune_visual and not getattr(self, "use_remove_padding", True):
            logger.warning(
                "impl_backend=%s: prune_visual needs use_remove_padding=True; micro-batches asking for pruning "
                "will raise", BACKEND,
            )
        apply_tsparse_to_verl(module, options=options)
        print(f"tsparse: impl_backend={BACKEND} swapped into {type(module).__name__} ({options})")
        return module

    _build_module.__tsparse_dispatch__ = True
    return _build_module


def install_dispatcher() -> bool:
    """Installs :func:`build_module_dispatch` (idempotent). Returns True if installed now."""
    from .rollout import snapshot_originals

    snapshot_originals()  # transformers' forwards, before verl's apply_monkey_patch replaces them
    owner, name = resolve(*DISPATCH_TARGET)
    current = owner.__dict__[name]
    if getattr(current, "__tsparse_dispatch__", False):
        return False
    set_attr(owner, name, build_module_dispatch(current))
    return True


def uninstall_dispatcher() -> None:
    """Removes the dispatcher (restores verl's ``FSDPEngine._build_module``)."""
    key = _dispatch_key()
    if key is not None and key in ORIGINALS:
        restore(key)
