"""Fused GRPO ops: log-probs from logits in one read, verl's GRPO loss with decoupled
per-stream aggregation, and fused linear variants that never materialize the logits.

* :func:`logprobs` - ``log_softmax(logits / T)[targets]`` (and the entropy) in one read of the
  logits; backward in one pass, optionally written into the logits' own storage. The drop-in
  for verl's ``logprobs_from_logits`` + ``entropy_from_logits``.
* :func:`grpo_loss` - verl 0.9.1's ``compute_policy_loss_vanilla`` + ``kl_penalty`` + entropy
  bonus per token, aggregated per stream (the paper's localization and sparse-reasoning
  streams are separate GRPO groups with their own normalization), plus verl's metrics.
* :func:`fused_linear_logprobs` / :func:`fused_linear_grpo_loss` - the same from the last
  hidden states and the LM-head weight, in chunks of tokens: memory O(chunk x V).

Math (``csrc/include/tsparse/grpo_math.h``, shared by the CPU and CUDA kernels): per row, an
online (max, sum exp, sum exp * z) log-sum-exp over ``z = logits / temperature`` in fp32
(fp64 for fp64 logits), kept in base 2 (one FFMA and one exp2 per logit on the GPU; error bound
in profiling/NOTES.md), so the row is read once and the entropy comes for free. The backward
writes ``dlogits = (g_logp * (onehot - p) + g_ent * dH/dz) / temperature`` in one pass from the
saved per-row statistics (row max, log normalizer, entropy): no [T, V] temporary.

Errors: bad arguments raise ``TypeError`` (dtype), ``ValueError`` (shape, device, value -
including a NaN or non-positive temperature) or ``IndexError`` (a target, stream or sequence id
out of range, on the CPU) naming the argument. On CUDA, target values are checked inside the
kernels (no host sync): a bad target aborts the kernel with a device-side error naming
``tsparse.logprobs``, like PyTorch's own indexing; stream and sequence ids are checked with
``torch._assert_async`` (also on the CPU inside ``torch.compile``, so ``fullgraph=True`` works:
a ``RuntimeError`` naming the argument). The CUDA context is unusable after such an error. A
meta tensor mixed with real ones is refused by every raw op (its fake kernel checks devices).

Autocast: every op here computes in the precision above inside an autocast region too (autocast
is off inside them). The fused linear ops first cast ``hidden`` and ``weight`` to the region's
dtype, as the ``nn.Linear`` LM head they replace would compute its logits there.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .. import _library  # noqa: F401  (loads tsparse._C: the torch.ops.tsparse schemas)
from .. import _C
from .._nvtx import annotate
from . import _checks

__all__ = [
    "logprobs",
    "grpo_loss",
    "fused_linear_logprobs",
    "fused_linear_grpo_loss",
    "GRPOLoss",
    "GRPOStreamMetrics",
    "LOSS_AGG_MODES",
    "KL_TYPES",
]

_ops = torch.ops.tsparse
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
#: more streams than this is taken for a mistake (stream ids must be small integers 0..S-1)
MAX_STREAMS = 64
_KL_BASE = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
KL_TYPES = _KL_BASE + tuple(k + "+" for k in _KL_BASE)
#: logits bytes per chunk of the fused linear ops when ``chunk_size`` is not given
DEFAULT_CHUNK_BYTES = 512 << 20


def _probe_clamp_edges() -> int:
    """The installed torch's clamp-gradient convention AT the bounds (bit 0: ``x == min``
    passes the gradient, bit 1: ``x == max`` does). It changed in 2026 (pytorch PR 191142: older
    releases pass it, torch 2.14 gives 0, the minimum-norm subgradient); following the
    installed torch keeps the fused loss's gradient equal to verl's autograd on every version."""
    with torch.inference_mode(False), torch.enable_grad():  # also when imported under no_grad
        x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(torch.clamp(x, 0.0, 1.0).sum(), x)
    return int(g[0].item() != 0) | (int(g[1].item() != 0) << 1)


CLAMP_EDGES = _probe_clamp_edges()


# --------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes for torch.compile / meta tensors).
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("tsparse::logprobs")
def _logprobs_fake(logits, targets, temperature, with_entropy):
    _checks.fake_same_device("logprobs", "logits", logits, targets=targets)
    _checks.fake_dims("logprobs", logits=(logits, 2), targets=(targets, 1))
    t = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    return (
        logits.new_empty((t,), dtype=acc),
        logits.new_empty((t,), dtype=acc),
        logits.new_empty((t,), dtype=acc),
        logits.new_empty((t if with_entropy else 0,), dtype=acc),
    )


@torch.library.register_fake("tsparse::logprobs_backward")
def _logprobs_backward_fake(logits, targets, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature):
    _checks.fake_same_device("logprobs_backward", "logits", logits, ("grad_logp", "grad_entropy"), targets=targets,
                             row_max=row_max, log_norm=log_norm, entropy=entropy, grad_logp=grad_logp,
                             grad_entropy=grad_entropy)
    _checks.fake_dims("logprobs_backward", logits=(logits, 2), targets=(targets, 1))
    return logits.new_empty(logits.shape)


@torch.library.register_fake("tsparse::logprobs_backward_")
def _logprobs_backward_inplace_fake(logits, targets, row_max, log_norm, entropy, grad_logp, grad_entropy,
                                    temperature):
    _checks.fake_same_device("logprobs_backward_", "logits", logits, ("grad_logp", "grad_entropy"), targets=targets,
                             row_max=row_max, log_norm=log_norm, entropy=entropy, grad_logp=grad_logp,
                             grad_entropy=grad_entropy)
    return None


@torch.library.register_fake("tsparse::grpo_token_terms")
def _grpo_token_terms_fake(logp, old_logp, advantages, ref_logp, is_weights, clip_low, clip_high,
                           clip_ratio_c, kl_type, clamp_edges):
    _checks.fake_same_device("grpo_token_terms", "logp", logp, ("ref_logp", "is_weights"), old_logp=old_logp,
                             advantages=advantages, ref_logp=ref_logp, is_weights=is_weights)
    _checks.fake_dims("grpo_token_terms", logp=(logp, 1))
    n = logp.shape[0]
    f = lambda: logp.new_empty((n,))  # noqa: E731
    return f(), f(), f(), logp.new_empty((n,), dtype=torch.uint8), f(), f(), f()


def _fused_outputs_fake(logits, with_entropy, entropy_coef):
    t = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    f = lambda: logits.new_empty((t,), dtype=acc)  # noqa: E731
    ent = logits.new_empty((t if (with_entropy or entropy_coef != 0) else 0,), dtype=acc)
    return f(), ent, f(), f(), f(), logits.new_empty((t,), dtype=torch.uint8)


def _fused_inputs_fake(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight):
    # The C++ glue names the public op (grpo_loss) in its messages; so do the fake kernels.
    op = "grpo_loss"
    _checks.fake_same_device(op, "logits", logits, ("ref_logp", "is_weights"), targets=targets, old_logp=old_logp,
                             advantages=advantages, ref_logp=ref_logp, is_weights=is_weights,
                             token_weight=token_weight)
    _checks.fake_dims(op, logits=(logits, 2), targets=(targets, 1), old_logp=(old_logp, 1),
                      advantages=(advantages, 1), ref_logp=(ref_logp, 1), is_weights=(is_weights, 1),
                      token_weight=(token_weight, 1))


@torch.library.register_fake("tsparse::grpo_loss_fused")
def _grpo_loss_fused_fake(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight, temperature,
                          clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges, kl_coef, entropy_coef,
                          with_entropy, with_grad, single_read):
    _fused_inputs_fake(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight)
    grad = logits.new_empty((logits.shape[0] if with_grad else 0, logits.shape[1]))
    return (*_fused_outputs_fake(logits, with_entropy, entropy_coef), grad)


@torch.library.register_fake("tsparse::grpo_loss_fused_")
def _grpo_loss_fused_inplace_fake(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight,
                                  temperature, clip_low, clip_high, clip_ratio_c, kl_type, clamp_edges, kl_coef,
                                  entropy_coef, with_entropy, single_read):
    _fused_inputs_fake(logits, targets, old_logp, advantages, ref_logp, is_weights, token_weight)
    return _fused_outputs_fake(logits, with_entropy, entropy_coef)


@torch.library.register_fake("tsparse::scale_rows_")
def _scale_rows_fake(x, scale):
    _checks.fake_same_device("scale_rows_", "x", x, scale=scale)
    _checks.fake_dims("scale_rows_", x=(x, 2))
    return None


# --------------------------------------------------------------------------------------
# Autograd.
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_cast(x, dtype: torch.dtype):
    """``x`` as an autocast region of ``dtype`` would feed it to a matmul: 16/32-bit floats
    cast, fp64 (and anything that is not a tensor) left alone."""
    return x.to(dtype) if isinstance(x, Tensor) and x.dtype in _AUTOCAST_CASTS and x.dtype != dtype else x


def _autocast_off(fn):
    """Runs a fused-linear Function's forward / backward with autocast off (the device type is
    taken from the forward's first tensor and kept on ``ctx`` for the backward), so the chunk
    matmuls, the in-place ``out=`` products and the statistics all stay in one dtype."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        dev = getattr(ctx, "device_type", None)
        if dev is None:
            dev = ctx.device_type = args[0].device.type
        if dev not in ("cpu", "cuda"):
            return fn(ctx, *args)
        with torch.autocast(dev, enabled=False):
            return fn(ctx, *args)

    return wrapper


def _fixed_precision(*, cast_linear: bool = False):
    """The GRPO ops compute in their documented precision (fp32 statistics from bf16 / fp16 /
    fp32 inputs, fp64 for fp64) whatever autocast region they are called in: autocast is off
    inside them, so neither their small [T]-sized matmuls nor the fused linear chunks are
    recast. With ``cast_linear`` (the fused linear ops) ``hidden`` and ``weight`` are first
    cast to the region's dtype (:func:`_autocast_cast`), as the ``nn.Linear`` the op replaces
    would compute its logits there; the op then runs in that one dtype, forward and backward
    alike (autograd carries the gradient back through the cast)."""

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else kwargs.get("logits", kwargs.get("hidden"))
            dev = first.device.type if isinstance(first, Tensor) else None
            if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
                return fn(*args, **kwargs)
            if cast_linear:
                bound = sig.bind(*args, **kwargs)
                a = bound.arguments
                dt = torch.get_autocast_dtype(dev)
                for name in ("hidden", "weight"):
                    if name in a:
                        a[name] = _autocast_cast(a[name], dt)
                args, kwargs = bound.args, bound.kwargs
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def _differentiable_once(backward):
    """Every backward here is differentiable once. With ``create_graph=True`` the gradients
    are correct and carry a node that raises if they are differentiated again, instead of the
    silently-zero second derivative the backward kernels (which have no derivative of their
    own) would give. Like ``torch.autograd.function.once_differentiable``, but it also marks
    gradients whose upstream gradients are constants (the dependence on the logits is through
    saved tensors). Sets ``ctx.create_graph`` for the backward; ``ctx.anchors`` (set by the
    backward) names the inputs the gradients depend on."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        ctx.create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not ctx.create_graph:
            return outputs
        tensors = [o for o in outputs if isinstance(o, Tensor)]
        if not tensors:
            return outputs
        # The error node also takes a zero-size slice of the saved inputs, so a second
        # differentiation with respect to them reaches it (and raises) instead of finding the
        # gradients unconnected to the graph.
        anchors = [t.narrow(0, 0, 0) for t in getattr(ctx, "anchors", ()) if t.requires_grad]
        err = torch._C._functions.DelayedError(
            b"tsparse: trying to differentiate twice a tsparse GRPO op; its backward is differentiable once",
            len(tensors) + len(anchors),
        )
        marked = err(*[o.detach().requires_grad_() for o in tensors], *anchors)
        marked = list(marked) if isinstance(marked, tuple) else [marked]
        return tuple(marked.pop(0) if isinstance(o, Tensor) else o for o in outputs)

    return wrapper


def _entropy_grad(g_ent, entropy, rows):
    """The entropy output is [0] when it was not computed; its gradient is then unused."""
    if g_ent is None or entropy.shape[0] != rows:
        return None
    return g_ent


def _logprobs_setup(ctx, inputs, output):
    logits, targets, temperature, with_entropy = inputs
    _, row_max, log_norm, entropy = output
    ctx.mark_non_differentiable(row_max, log_norm)
    ctx.temperature = float(temperature)
    ctx.save_for_backward(logits, targets, row_max, log_norm, entropy)


def _logprobs_backward(ctx, g_logp, _g_row_max, _g_log_norm, g_ent):
    logits, targets, row_max, log_norm, entropy = ctx.saved_tensors
    ctx.anchors = (logits,)
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    g_ent = _entropy_grad(g_ent, entropy, logits.shape[0])
    grad = _ops.logprobs_backward(logits, targets, row_max, log_norm, entropy, g_logp, g_ent, ctx.temperature)
    return grad, None, None, None


torch.library.register_autograd(
    "tsparse::logprobs", _differentiable_once(_logprobs_backward), setup_context=_logprobs_setup
)


def _can_write_logits(logits: Tensor) -> bool:
    if logits.dim() != 2:
        return False
    rows, cols = logits.shape
    inner_ok = cols <= 1 or logits.stride(1) == 1
    rows_ok = rows <= 1 or logits.stride(0) >= cols
    return inner_ok and rows_ok


# --------------------------------------------------------------------------------------
# In-place backward: the gradient may only overwrite memory that nothing else can observe.
#
# The write happens in backward, outside autograd's own in-place bookkeeping, so it is allowed
# only when, at that moment, the logits' memory is reachable through the logits alone:
#   * the logits are not a leaf, nor a view of a leaf (``leaf[:, :]``, ``leaf.view(...)``,
#     ``Parameter.reshape(...)``): torch's own rule for in-place ops (mark_dirty) refuses those;
#   * a view only when it spans its whole base (``out.squeeze(0)``: the base IS the logits in
#     another shape), that base is not a leaf and the caller holds no reference to it;
#   * no other tensor shares the storage (a detached alias, another view, or an output the
#     producing op saved for ITS backward - ``tanh``, ``exp``, ``softmax`` save their result);
#   * no other autograd node saved the logits themselves (it would read the gradient).
# The counts come from ``tsparse._C.alias_counts`` (reference counts read without taking one)
# and are compared with a baseline measured on this torch at first use (:func:`_exclusive_counts`),
# never hard-coded. Otherwise the backward returns a fresh gradient (always correct).
#
# grpo_loss(impl="single_read", inplace_backward=True) writes the gradient DURING THE FORWARD:
# the same rule is checked then, against a baseline of the same counts taken at that point
# (:func:`_exclusive_counts_forward`; the references differ from backward time, where the
# logits are unpacked from ctx.saved_tensors). A node that saves the logits LATER, or any read
# of the logits after the op returned, sees the gradient: that is the in-place contract. What
# the counts cannot see are references held only on the Python side (a saved-tensor hook that
# keeps the tensor object, torch.utils.checkpoint's inputs); the forward-time check therefore
# also refuses while saved-tensor hooks are active. After an in-place write the logits' Python
# object is marked (:func:`_mark_holds_grad`), so a later tsparse GRPO op on the same logits
# raises instead of reading the gradient as logits.
_PROBED: list = []


def _observers(t: Tensor) -> tuple:
    """(TensorImpl uses, storage uses, view base's TensorImpl uses, Python references to the view
    base): who else can reach ``t``'s memory. Compared only with :func:`_exclusive_counts`."""
    impl, storage, base_impl = _C.alias_counts(t)
    base_refs = -1
    if t._is_view():
        base = t._base
        base_refs = sys.getrefcount(base)
        del base
    return impl, storage, base_impl, base_refs


def _inplace_candidate(logits: Tensor) -> bool:
    """The forward-time part of the rule above (no counts: those are read when writing)."""
    if logits.grad_fn is None or not _can_write_logits(logits):
        return False  # a leaf's values belong to the user; an unwritable layout
    if logits._is_view():
        base = logits._base
        if base.grad_fn is None:
            return False  # a view of a leaf (or of a tensor that does not require grad)
        if base.data_ptr() != logits.data_ptr() or base.numel() != logits.numel():
            return False  # part of a larger tensor: the rest of it is someone else's
    return True


class _AliasProbe(torch.autograd.Function):
    """Records :func:`_observers` of its input at backward time, where and as the in-place
    backward reads them (saved with save_for_backward, unpacked from ctx.saved_tensors)."""

    @staticmethod
    def forward(ctx, x):
        ctx.candidate = _inplace_candidate(x)
        ctx.save_for_backward(x)
        return x.sum(dim=-1)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        _PROBED.append(_observers(x))
        return torch.zeros_like(x)


@functools.lru_cache(maxsize=None)
def _exclusive_counts() -> Optional[tuple]:
    """The observer counts of logits nothing else can reach - (plain non-leaf, whole view of a
    temporary non-leaf) - measured on this torch, or None when the counts cannot tell an
    observed tensor from an unobserved one (then the in-place backward is never used)."""

    def probe(make):
        with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.disable_saved_tensors_hooks(
            "tsparse: the in-place backward's alias baseline is measured without saved-tensor hooks"
        ):
            w = torch.zeros(1, 2, 3, requires_grad=True)
            x, keep = make(w)
            _AliasProbe.apply(x).sum().backward()
            del keep
        return _PROBED.pop()

    try:
        plain = probe(lambda w: (w[0] * 1.0, None))
        view = probe(lambda w: ((w * 1.0).squeeze(0), None))
        # Self-test: each kind of observer must show up, or the sensor is blind on this torch.
        alias = probe(lambda w: (lambda x: (x, x.detach()))(w[0] * 1.0))
        saved = probe(lambda w: (lambda x: (x, x.sin()))(w[0] * 1.0))
        kept_base = probe(lambda w: (lambda b: (b.squeeze(0), b))(w * 1.0))
    except Exception:  # pragma: no cover - a torch without the internals read here
        return None
    if alias == plain or saved == plain or kept_base == view or plain[3] != -1 or view[3] < 0:
        return None  # pragma: no cover
    return plain, view


# Measured once at import (like CLAMP_EDGES), outside any user context such as saved-tensor hooks.
_exclusive_counts()


def _unobserved(logits: Tensor) -> bool:
    """True when nothing but ``logits`` (as saved by the in-place Function) reaches its memory."""
    ref = _exclusive_counts()
    if ref is None:
        return False
    plain, view = ref
    return _observers(logits) == (view if logits._is_view() else plain)


@functools.lru_cache(maxsize=None)
def _exclusive_counts_forward() -> Optional[tuple]:
    """:func:`_exclusive_counts` for a check made in the forward, before the op runs (the
    caller's logits, no autograd Function holding them yet): (plain non-leaf, whole view of a
    temporary non-leaf), or None when the counts cannot tell an observed tensor from an
    unobserved one on this torch (then the single-read path never writes in place)."""

    def probe(make):
        with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.disable_saved_tensors_hooks(
            "tsparse: the in-place forward's alias baseline is measured without saved-tensor hooks"
        ):
            w = torch.zeros(1, 2, 3, requires_grad=True)
            x, keep = make(w)
            counts = _observers(x)
            del keep
        return counts

    try:
        plain = probe(lambda w: (w[0] * 1.0, None))
        view = probe(lambda w: ((w * 1.0).squeeze(0), None))
        # Self-test: each kind of observer must show up, or the sensor is blind on this torch.
        alias = probe(lambda w: (lambda x: (x, x.detach()))(w[0] * 1.0))
        saved = probe(lambda w: (lambda x: (x, x.sin()))(w[0] * 1.0))
        saved_out = probe(lambda w: (torch.tanh(w[0]), None))
        kept_base = probe(lambda w: (lambda b: (b.squeeze(0), b))(w * 1.0))
    except Exception:  # pragma: no cover - a torch without the internals read here
        return None
    if plain in (alias, saved, saved_out) or kept_base == view or plain[3] != -1 or view[3] < 0:
        return None  # pragma: no cover
    return plain, view


# Measured once at import, as the backward's baseline.
_exclusive_counts_forward()


def _saved_tensor_hooks_active() -> bool:
    """Default saved-tensor hooks are installed (their packed objects may hold tensors on the
    Python side, where the counts cannot see them)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
    except Exception:  # pragma: no cover - a torch without this internal: assume hooks
        return True


def _unobserved_in_forward(logits: Tensor) -> bool:
    """The rule above, checked in the forward of the single-read in-place path (the caller's
    own Python references to ``logits`` are allowed: after the op the logits hold the gradient)."""
    ref = _exclusive_counts_forward()
    if ref is None or _saved_tensor_hooks_active():
        return False
    plain, view = ref
    return _observers(logits) == (view if logits._is_view() else plain)


_HOLDS_GRAD = "_tsparse_holds_grad_at_version"


def _mark_holds_grad(logits: Tensor) -> None:
    """Marks a logits tensor whose memory now holds its gradient (at its current version)."""
    try:
        setattr(logits, _HOLDS_GRAD, logits._version)
    except Exception:  # pragma: no cover - a tensor type without a __dict__
        pass


def _check_not_overwritten(logits: Tensor, op: str) -> None:
    marked = getattr(logits, _HOLDS_GRAD, None)  # (inference tensors have no version: read only when marked)
    if marked is not None and marked == logits._version:
        raise ValueError(
            f"tsparse.{op}: `logits` hold their gradient, written into them by an earlier tsparse op with "
            "inplace_backward=True (grpo_loss(impl='single_read') writes it in the forward); compute everything "
            "that reads the logits before that call, or pass inplace_backward=False"
        )


class _LogprobsInplaceBackward(torch.autograd.Function):
    """:func:`logprobs` whose backward writes the gradient into the logits' own storage
    (flash-attn's ``inplace_backward``) when nothing else can observe that storage (the rule
    above, checked when the backward runs); otherwise it returns a fresh gradient. The write
    bumps the logits' version counter."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy):
        logp, row_max, log_norm, entropy = _ops.logprobs(logits, targets, temperature, with_entropy)
        ctx.mark_non_differentiable(row_max, log_norm)
        ctx.temperature = temperature
        ctx.save_for_backward(logits, targets, row_max, log_norm, entropy)
        return logp, row_max, log_norm, entropy

    @staticmethod
    @_differentiable_once
    def backward(ctx, g_logp, _g_row_max, _g_log_norm, g_ent):
        logits, targets, row_max, log_norm, entropy = ctx.saved_tensors
        ctx.anchors = (logits,)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g_ent = _entropy_grad(g_ent, entropy, logits.shape[0])
        if ctx.create_graph or not _can_write_logits(logits) or not _unobserved(logits):
            # create_graph=True (the logits are still needed), a layout we cannot overwrite, or
            # memory that something else can observe: a fresh gradient.
            grad = _ops.logprobs_backward(logits, targets, row_max, log_norm, entropy, g_logp, g_ent, ctx.temperature)
            return grad, None, None, None
        _ops.logprobs_backward_(logits, targets, row_max, log_norm, entropy, g_logp, g_ent, ctx.temperature)
        increment_version(logits)
        _mark_holds_grad(logits)
        return logits, None, None, None


# --------------------------------------------------------------------------------------
# Argument checks (the C++ side repeats every check that guards memory).
def _need_tensor(value, op: str, arg: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"tsparse.{op}: `{arg}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def _number(value, op: str, arg: str) -> float:
    """A real number (numpy scalars too; not a bool, a string or a tensor), as the other op families."""
    return _checks.number(value, op, arg)


def _check_temperature(temperature, op: str) -> float:
    t = _number(temperature, op, "temperature")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"tsparse.{op}: `temperature` must be a finite number > 0, got {temperature!r}")
    return t


def _check_per_token(value, t: int, device: torch.device, op: str, arg: str, kinds=("float",)) -> Tensor:
    value = _need_tensor(value, op, arg)
    ok = (
        ("float" in kinds and value.dtype.is_floating_point)
        or ("int" in kinds and value.dtype in (torch.int32, torch.int64))
        or ("bool" in kinds and value.dtype == torch.bool)
    )
    if not ok:
        want = " or ".join({"float": "floating", "int": "int32/int64", "bool": "bool"}[k] for k in kinds)
        raise TypeError(f"tsparse.{op}: `{arg}` must be {want}, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != t:
        raise ValueError(f"tsparse.{op}: `{arg}` must have shape [T] = [{t}], got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"tsparse.{op}: `{arg}` is on {value.device} but the logits are on {device}")
    return value


def _check_rows_targets(op: str, rows: Tensor, rows_arg: str, targets) -> Tensor:
    targets = _need_tensor(targets, op, "targets")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tsparse.{op}: `targets` must be int64 (or int32), got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != rows.shape[0]:
        raise ValueError(
            f"tsparse.{op}: `targets` must have shape [T] = [{rows.shape[0]}] (one per row of "
            f"`{rows_arg}`), got {tuple(targets.shape)}"
        )
    if targets.device != rows.device:
        raise ValueError(f"tsparse.{op}: `targets` is on {targets.device} but `{rows_arg}` is on {rows.device}")
    return targets


def _check_logits(op: str, logits, targets, temperature) -> tuple[Tensor, Tensor, float]:
    logits = _need_tensor(logits, op, "logits")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"tsparse.{op}: `logits` must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"tsparse.{op}: `logits` must be 2-D [T, V] with V >= 1, got {tuple(logits.shape)}")
    targets = _check_rows_targets(op, logits, "logits", targets)
    _check_not_overwritten(logits, op)
    return logits, targets, _check_temperature(temperature, op)


def _use_inplace(logits: Tensor, inplace_backward: bool) -> bool:
    if not inplace_backward or torch.compiler.is_compiling():
        return False  # torch.compile: the out-of-place backward (autograd.Function state is not traced)
    return bool(logits.requires_grad and torch.is_grad_enabled() and _inplace_candidate(logits))


def _logprobs_impl(logits, targets, temperature, with_entropy, inplace_backward):
    if _use_inplace(logits, inplace_backward):
        return _LogprobsInplaceBackward.apply(logits, targets, temperature, with_entropy)
    return _ops.logprobs(logits, targets, temperature, with_entropy)


# --------------------------------------------------------------------------------------
# logprobs
@annotate("logprobs")
@_fixed_precision()
def logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probabilities of the targets (and the entropy) from logits in one read.

    ``logp[t] = log_softmax(logits[t] / temperature)[targets[t]]`` and
    ``entropy[t] = -sum_j p_tj log p_tj``: verl's ``logprobs_from_logits`` and
    ``entropy_from_logits`` on temperature-scaled logits, in one fused op.

    Args:
        logits: ``[T, V]`` bfloat16 / float16 / float32 (float64 too, computed in fp64), any V
            >= 1 (up to 2^31 bytes per row); rows may be strided (a non-contiguous last
            dimension is copied once).
        targets: int64 (or int32) ``[T]``, values in ``[0, V)``, on the logits' device.
        temperature: finite, > 0 (verl divides the logits by it before the log-softmax).
        return_entropy: also compute the entropy (same pass; differentiable).
        inplace_backward: write the logits' gradient into the logits' own storage during
            backward (as flash-attn's cross entropy does) - no [T, V] allocation in backward.
            The write happens only where nothing else can observe that memory, checked when the
            backward runs: the logits are not a leaf nor a view of one (``leaf[:, :]``,
            ``Parameter.reshape(...)``); a view only if it spans its whole non-leaf base
            (``out.squeeze(0)``) and the caller holds no reference to that base; no other tensor
            shares the storage (a detached alias, another view, an output the producing op
            saved for its own backward - ``tanh``, ``exp``, ``softmax``); no other autograd node
            saved the logits; the backward builds no graph (``create_graph=False``); the rows
            are distinct memory with a contiguous last dimension. Otherwise (and always under
            ``torch.compile``) a fresh gradient is returned: same values, one [T, V] allocation.
            After an in-place backward the logits tensor holds its gradient (a later tsparse
            GRPO op on it raises ``ValueError``, until new values are written into it).

    Returns:
        ``(logp, entropy)``: float32 ``[T]`` (float64 for float64 logits); ``entropy`` is
        ``None`` unless ``return_entropy``. Differentiable in ``logits`` once (a second
        differentiation raises). Math in fp32 with an online (max, sum) log-sum-exp; no
        [T, V] fp32 temporary in forward or backward. No host sync.

    Raises:
        TypeError / ValueError naming the argument (dtype, shape, device, temperature NaN or
        <= 0); IndexError for a target out of range on the CPU (a device-side error on CUDA).
    """
    op = "logprobs"
    logits, targets, temperature = _check_logits(op, logits, targets, temperature)
    logp, _, _, entropy = _logprobs_impl(logits, targets, temperature, bool(return_entropy), inplace_backward)
    return logp, (entropy if return_entropy else None)


# --------------------------------------------------------------------------------------
# Per-token GRPO terms (autograd: d/d logp from the derivatives the kernel computed).
def _token_terms_setup(ctx, inputs, output):
    _pg, _kl, _ratio, flags, dpg, dkl, dratio = output
    ctx.mark_non_differentiable(flags, dpg, dkl, dratio)
    ctx.save_for_backward(inputs[0], dpg, dkl, dratio)


def _token_terms_backward(ctx, g_pg, g_kl, g_ratio, _g_flags, _g_dpg, _g_dkl, _g_dratio):
    logp, dpg, dkl, dratio = ctx.saved_tensors
    ctx.anchors = (logp,)
    grad = None
    if ctx.needs_input_grad[0]:
        for g, d in ((g_pg, dpg), (g_kl, dkl), (g_ratio, dratio)):
            if g is None:
                continue
            # A zero upstream gradient (masked token) contributes 0 even where the local
            # derivative is not finite (autograd's where() semantics in verl's masked sums).
            term = torch.where(g != 0, g * d, torch.zeros_like(d))
            grad = term if grad is None else grad + term
    return (grad,) + (None,) * 9


torch.library.register_autograd(
    "tsparse::grpo_token_terms", _differentiable_once(_token_terms_backward), setup_context=_token_terms_setup
)


# --------------------------------------------------------------------------------------
# GRPO loss
class GRPOStreamMetrics(NamedTuple):
    """Per-stream metrics, each a ``[S]`` tensor (no host sync; ``GRPOLoss.verl_metrics`` reads
    them). Names follow verl 0.9.1's ``ppo_loss``; a stream with no tokens reports 0."""

    pg_loss: Tensor  #: ``actor/pg_loss``: the stream's aggregated policy loss
    clipfrac: Tensor  #: ``actor/pg_clipfrac``: masked mean of (clipped surrogate > unclipped)
    clipfrac_lower: Tensor  #: ``actor/pg_clipfrac_lower``: dual-clip fraction (A < 0)
    ppo_kl: Tensor  #: ``actor/ppo_kl``: masked mean of -(clamped log ratio)
    kl: Optional[Tensor]  #: ``kl_loss``: aggregated KL penalty (None without ``ref_logp``)
    entropy: Optional[Tensor]  #: ``actor/entropy_loss``: aggregated entropy (None when not computed)
    tokens: Tensor  #: sum of the mask over the stream's tokens (its token count)


class GRPOLoss(NamedTuple):
    """What :func:`grpo_loss` and :func:`fused_linear_grpo_loss` return."""

    loss: Tensor  #: scalar ``sum_s w_s * agg_s(pg + kl_coef * kl - entropy_coef * entropy)``
    logp: Tensor  #: ``[T]`` log-prob of each target
    ratio: Tensor  #: ``[T]`` ``exp(clamp(logp - old_logp, -20, 20))``
    entropy: Optional[Tensor]  #: ``[T]`` when computed (``entropy_coef != 0`` or ``return_entropy``)
    kl: Optional[Tensor]  #: ``[T]`` KL penalty estimate when ``ref_logp`` is given
    metrics: GRPOStreamMetrics  #: per-stream metrics

    def verl_metrics(self, stream_names: Optional[Sequence[str]] = None) -> dict[str, float]:
        """verl-named metrics as floats (one device->host copy). With several streams each
        key gets a ``/<stream name>`` suffix (default names ``s0``, ``s1``, ...)."""
        m = self.metrics
        cols = {
            "actor/pg_loss": m.pg_loss,
            "actor/pg_clipfrac": m.clipfrac,
            "actor/pg_clipfrac_lower": m.clipfrac_lower,
            "actor/ppo_kl": m.ppo_kl,
            "actor/tokens": m.tokens,
        }
        if m.kl is not None:
            cols["kl_loss"] = m.kl
        if m.entropy is not None:
            cols["actor/entropy_loss"] = m.entropy
        keys = list(cols)
        values = torch.stack([cols[k].detach().to(torch.float64) for k in keys]).cpu().tolist()
        s = m.tokens.shape[0]
        names = list(stream_names) if stream_names is not None else [f"s{i}" for i in range(s)]
        out = {}
        for k, row in zip(keys, values):
            if s == 1 and stream_names is None:
                out[k] = row[0]
            else:
                for name, v in zip(names, row):
                    out[f"{k}/{name}"] = v
        return out


@dataclass
class _LossPlan:
    """Everything of the loss that does not depend on the logits (validated, on the device)."""

    acc: torch.dtype
    old_logp: Tensor
    advantages: Tensor
    ref_logp: Optional[Tensor]
    is_weights: Optional[Tensor]
    mask_w: Tensor  # [T] mask as weights (bool -> 0/1)
    valid: Tensor  # [T] bool: mask != 0
    onehot: Tensor  # [T, S] stream membership
    tok_w: Tensor  # [T] weight of each token in its stream's aggregate (mask * normalizer)
    loss_w: Tensor  # [T] tok_w * stream weight: d loss / d per-token loss
    tokens: Tensor  # [S] sum of the mask per stream
    clip_low: float
    clip_high: float
    clip_ratio_c: float
    kl_type: str
    kl_coef: float
    entropy_coef: float
    want_entropy: bool


def _check_value_range(values: Tensor, bound: int, op: str, arg: str) -> None:
    """Values must lie in [0, bound): checked on the host for CPU tensors (IndexError naming the
    bad value), on the device without a sync for GPU tensors and inside ``torch.compile``
    (``torch._assert_async``: traceable, so ``fullgraph=True`` compiles on the CPU too)."""
    if values.numel() == 0 or values.device.type == "meta":
        return
    if values.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= bound:
            bad = lo if lo < 0 else hi
            raise IndexError(f"tsparse.{op}: `{arg}` holds {bad}, out of range [0, {bound})")
        return
    _checks.check_on_device(((values >= 0) & (values < bound)).all(), op,
                            f"`{arg}` values must lie in [0, {bound})", IndexError)


def _stream_weights(stream_weights, op: str, device: torch.device, acc: torch.dtype) -> Tensor:
    if isinstance(stream_weights, Tensor):
        if stream_weights.dim() != 1 or not stream_weights.dtype.is_floating_point:
            raise ValueError(f"tsparse.{op}: `stream_weights` must be a 1-D floating tensor or a sequence of numbers")
        if device.type != "meta":
            _checks.not_meta(stream_weights, op, "stream_weights", "the logits hold data")
        return stream_weights.detach().to(device=device, dtype=acc)
    if isinstance(stream_weights, (str, bytes)) or not hasattr(stream_weights, "__iter__"):
        raise TypeError(
            f"tsparse.{op}: `stream_weights` must be a sequence of numbers or a 1-D floating tensor, got "
            f"{type(stream_weights).__name__}"
        )
    vals = []
    for w in stream_weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(
                f"tsparse.{op}: `stream_weights` must be a sequence of numbers, got {type(w).__name__} {w!r} in it"
            )
        if not math.isfinite(w):
            raise ValueError(f"tsparse.{op}: `stream_weights` must be finite, got {w!r}")
        vals.append(float(w))
    return torch.tensor(vals, dtype=acc).to(device, non_blocking=True)


def _plan_loss(
    op: str,
    t: int,
    device: torch.device,
    acc: torch.dtype,
    old_logp,
    advantages,
    mask,
    *,
    clip_low,
    clip_high,
    clip_ratio_c,
    ref_logp,
    kl_type,
    kl_coef,
    entropy_coef,
    stream,
    stream_weights,
    num_streams,
    loss_agg,
    seq_ids,
    is_weights,
    return_entropy,
    loss_scale_factor=None,
) -> _LossPlan:
    old_logp = _check_per_token(old_logp, t, device, op, "old_logp").detach().to(acc)
    advantages = _check_per_token(advantages, t, device, op, "advantages").detach().to(acc)
    mask = _check_per_token(mask, t, device, op, "mask", kinds=("bool", "float", "int")).detach()
    if ref_logp is not None:
        ref_logp = _check_per_token(ref_logp, t, device, op, "ref_logp").detach().to(acc)
    if is_weights is not None:
        is_weights = _check_per_token(is_weights, t, device, op, "is_weights").detach().to(acc)
    clip_low = _number(clip_low, op, "clip_low")
    clip_high = _number(clip_high, op, "clip_high")
    clip_ratio_c = _number(clip_ratio_c, op, "clip_ratio_c")
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"tsparse.{op}: `{name}` must be a finite number >= 0, got {v!r}")
    if not (math.isfinite(clip_ratio_c) and clip_ratio_c > 1):
        raise ValueError(f"tsparse.{op}: `clip_ratio_c` must be a finite number > 1, got {clip_ratio_c!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"tsparse.{op}: `kl_type` must be one of {list(KL_TYPES)}, got {kl_type!r}")
    kl_coef = _number(kl_coef, op, "kl_coef")
    entropy_coef = _number(entropy_coef, op, "entropy_coef")
    if not math.isfinite(kl_coef):
        raise ValueError(f"tsparse.{op}: `kl_coef` must be finite, got {kl_coef!r}")
    if not math.isfinite(entropy_coef):
        raise ValueError(f"tsparse.{op}: `entropy_coef` must be finite, got {entropy_coef!r}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError(f"tsparse.{op}: `ref_logp` is required when kl_coef != 0 (got kl_coef={kl_coef})")
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"tsparse.{op}: `loss_agg` must be one of {list(LOSS_AGG_MODES)}, got {loss_agg!r}")
    if loss_agg == "seq-mean-token-sum-norm":
        if loss_scale_factor is None:
            raise ValueError(
                f"tsparse.{op}: loss_agg='seq-mean-token-sum-norm' needs `loss_scale_factor` (verl's default is the "
                "padded response length, which a flat [T] batch does not have)"
            )
        loss_scale_factor = _number(loss_scale_factor, op, "loss_scale_factor")
        if not (math.isfinite(loss_scale_factor) and loss_scale_factor > 0):
            raise ValueError(f"tsparse.{op}: `loss_scale_factor` must be a finite number > 0, got {loss_scale_factor!r}")
    elif loss_scale_factor is not None:
        raise ValueError(
            f"tsparse.{op}: `loss_scale_factor` applies only to loss_agg='seq-mean-token-sum-norm' (got "
            f"loss_agg={loss_agg!r})"
        )
    if num_streams is not None and (isinstance(num_streams, bool) or not isinstance(num_streams, int)
                                    or not 1 <= num_streams <= MAX_STREAMS):
        raise ValueError(f"tsparse.{op}: `num_streams` must be an int in [1, {MAX_STREAMS}], got {num_streams!r}")
    seq_mode = loss_agg.startswith("seq-mean")
    if seq_mode:
        if seq_ids is None:
            raise ValueError(f"tsparse.{op}: loss_agg={loss_agg!r} needs `seq_ids` (the sequence of each token)")
        seq_ids = _check_per_token(seq_ids, t, device, op, "seq_ids", kinds=("int",)).to(torch.int64)
        _check_value_range(seq_ids, max(t, 1), op, "seq_ids")

    # Streams.
    weights_t = None
    if stream_weights is not None:
        weights_t = _stream_weights(stream_weights, op, device, acc)
        if not 1 <= weights_t.shape[0] <= MAX_STREAMS:
            raise ValueError(
                f"tsparse.{op}: `stream_weights` must have 1 to {MAX_STREAMS} entries, got {weights_t.shape[0]}"
            )
    if stream is None:
        s = 1
        if weights_t is not None and weights_t.shape[0] != 1:
            raise ValueError(f"tsparse.{op}: `stream_weights` has {weights_t.shape[0]} entries but `stream` is None (one stream)")
        if num_streams is not None and num_streams != 1:
            raise ValueError(f"tsparse.{op}: `num_streams` must be 1 (or None) when `stream` is None")
        sid = None
    else:
        sid = _check_per_token(stream, t, device, op, "stream", kinds=("int",)).to(torch.int64)
        if weights_t is not None:
            s = weights_t.shape[0]
            if num_streams is not None and num_streams != s:
                raise ValueError(f"tsparse.{op}: `num_streams`={num_streams} but `stream_weights` has {s} entries")
        elif num_streams is not None:
            s = num_streams
        else:
            # Read on the host: one device->host copy when `stream` lives on a GPU.
            _checks.not_meta(sid, op, "stream", "the number of streams is read from it on the host; pass "
                             "`num_streams` or `stream_weights`")
            s = int(sid.max()) + 1 if sid.numel() else 1
            if s < 1:
                raise IndexError(f"tsparse.{op}: `stream` holds negative values")
            if s > MAX_STREAMS:
                raise IndexError(
                    f"tsparse.{op}: `stream` holds {s - 1}: at most {MAX_STREAMS} streams (ids 0..S-1) are supported"
                )
        _check_value_range(sid, s, op, "stream")
    if weights_t is None:
        weights_t = torch.ones(s, dtype=acc, device=device)

    mask_w = mask.to(acc)
    valid = mask_w != 0
    if sid is None:
        onehot = torch.ones(t, 1, dtype=acc, device=device)
        sid_or_zero = torch.zeros(t, dtype=torch.int64, device=device)
    else:
        onehot = (sid[:, None] == torch.arange(s, device=device)[None, :]).to(acc)
        sid_or_zero = sid
    tokens = mask_w @ onehot  # [S]

    def per_token(per_stream: Tensor) -> Tensor:
        return per_stream.index_select(0, sid_or_zero)

    def safe_inv(v: Tensor) -> Tensor:
        return torch.where(v > 0, 1.0 / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))

    if loss_agg == "token-mean":
        norm = per_token(safe_inv(tokens))
    elif loss_agg == "token-sum":
        norm = torch.ones(t, dtype=acc, device=device)
    else:
        # (stream, sequence) pairs: counts of each, and sequences with tokens per stream.
        key = sid_or_zero * max(t, 1) + seq_ids
        counts = torch.zeros(s * max(t, 1), dtype=torch.float64, device=device)
        counts.index_add_(0, key, mask_w.to(torch.float64))
        nseq = (counts.view(s, max(t, 1)) > 0).sum(dim=1).to(acc)
        norm = per_token(safe_inv(nseq))
        if loss_agg == "seq-mean-token-mean":
            norm = norm / (counts.index_select(0, key).to(acc) + 1e-8)  # verl: / (count + 1e-8)
        elif loss_agg == "seq-mean-token-sum-norm":
            norm = norm / loss_scale_factor  # verl: seq-mean-token-sum / loss_scale_factor
    tok_w = mask_w * norm
    loss_w = tok_w * per_token(weights_t)
    return _LossPlan(
        acc=acc, old_logp=old_logp, advantages=advantages, ref_logp=ref_logp, is_weights=is_weights,
        mask_w=mask_w, valid=valid, onehot=onehot, tok_w=tok_w, loss_w=loss_w, tokens=tokens,
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, kl_type=kl_type,
        kl_coef=kl_coef, entropy_coef=entropy_coef, want_entropy=bool(return_entropy) or entropy_coef != 0,
    )


def _token_terms(plan: _LossPlan, logp: Tensor, rows: slice = slice(None)):
    ref = plan.ref_logp[rows] if plan.ref_logp is not None else None
    isw = plan.is_weights[rows] if plan.is_weights is not None else None
    return _ops.grpo_token_terms(
        logp, plan.old_logp[rows], plan.advantages[rows], ref, isw, plan.clip_low, plan.clip_high,
        plan.clip_ratio_c, plan.kl_type, CLAMP_EDGES,
    )


def _per_token_loss(plan: _LossPlan, pg: Tensor, kl: Tensor, entropy: Optional[Tensor], rows: slice = slice(None)):
    per_tok = pg
    if plan.ref_logp is not None and plan.kl_coef != 0:
        per_tok = per_tok + plan.kl_coef * kl
    if plan.entropy_coef != 0:
        per_tok = per_tok - plan.entropy_coef * entropy
    # verl's masked_sum: where(mask, v, 0) * mask (NaN at masked tokens does not leak).
    return torch.where(plan.valid[rows], per_tok, torch.zeros_like(per_tok))


def _stream_metrics(plan: _LossPlan, logp: Tensor, pg: Tensor, kl: Optional[Tensor], entropy: Optional[Tensor],
                    flags: Tensor) -> GRPOStreamMetrics:
    with torch.no_grad():
        zero = torch.zeros((), dtype=plan.acc, device=logp.device)

        def agg(v: Tensor) -> Tensor:
            return (plan.tok_w * torch.where(plan.valid, v.detach(), zero)) @ plan.onehot

        def masked_mean(v: Tensor) -> Tensor:  # verl_F.masked_mean: sum / (count + 1e-8)
            return ((plan.mask_w * torch.where(plan.valid, v.detach().to(plan.acc), zero)) @ plan.onehot) / (
                plan.tokens + 1e-8
            )

        neg_kl = -(logp.detach() - plan.old_logp).clamp(-20.0, 20.0)
        return GRPOStreamMetrics(
            pg_loss=agg(pg),
            clipfrac=masked_mean(flags & 1),
            clipfrac_lower=masked_mean((flags >> 1) & 1),
            ppo_kl=masked_mean(neg_kl),
            kl=agg(kl) if plan.ref_logp is not None else None,
            entropy=agg(entropy) if entropy is not None else None,
            tokens=plan.tokens,
        )


_LOSS_DOC_ARGS = """
        old_logp: ``[T]`` log-probs of the targets under the rollout (old) policy.
        advantages: ``[T]`` per-token advantages (GRPO: the sequence's normalized score).
        mask: ``[T]`` bool (or float weights, as verl's ``response_mask``): tokens in the loss.
        temperature: logits are divided by it (finite, > 0).
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        clip_ratio_c: dual-clip constant (> 1): for A < 0 the loss is at most ``-A * clip_ratio_c``.
            A value <= 1 raises ``ValueError`` (verl 0.9.1 asserts it: ``AssertionError``).
        ref_logp: ``[T]`` reference-policy log-probs for the KL penalty (optional).
        kl_type: ``k1``/``kl``, ``abs``, ``k2``/``mse``, ``k3``/``low_var_kl`` (with verl's clamps),
            each optionally with ``+`` (value of the estimator, gradient of k2).
        kl_coef: weight of the KL penalty (needs ``ref_logp`` when != 0).
        entropy_coef: weight of the entropy bonus (``- entropy_coef * entropy``).
        stream: int ``[T]`` stream of each token (e.g. 0 = localization, 1 = sparse reasoning);
            ``None``: one stream (verl's loss).
        stream_weights: ``w_s`` per stream (a sequence of finite numbers or a 1-D floating tensor;
            default all 1). Treated as constants.
        num_streams: number of streams (at most 64) when ``stream_weights`` is not given; if
            neither is given it is read from ``stream.max()`` on the host (a device sync on a GPU,
            and a graph break under ``torch.compile``: give one of them for ``fullgraph=True``).
        loss_agg: ``token-mean``, ``token-sum``, ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm``, ``seq-mean-token-mean`` (verl's ``agg_loss`` modes),
            applied to each stream over ITS OWN masked tokens.
        seq_ids: int ``[T]`` sequence of each token, values in ``[0, T)``; required by the
            ``seq-mean-*`` modes.
        loss_scale_factor: ``seq-mean-token-sum-norm`` divides the ``seq-mean-token-sum`` loss by
            it (finite, > 0; required by that mode, refused by the others). verl's default is the
            padded response length (``loss_mask.shape[-1]``), which a flat ``[T]`` batch does not
            have: pass it (e.g. the rollout's maximum response length).
        is_weights: ``[T]`` rollout importance weights multiplying the policy loss (optional).
        return_entropy: compute the entropy (for metrics) even when ``entropy_coef == 0``."""


def _with_loss_args(fn):
    """Shares the loss arguments' documentation between the two loss ops."""
    fn.__doc__ = fn.__doc__.replace("@LOSS_ARGS@", _LOSS_DOC_ARGS)
    return fn


#: ``impl`` values of :func:`grpo_loss`
GRPO_LOSS_IMPLS = ("two_pass", "single_read")


def _fused_args(plan: _LossPlan, targets: Tensor, token_weight: Tensor, temperature: float):
    use_kl = plan.ref_logp is not None and plan.kl_coef != 0
    return (
        targets, plan.old_logp, plan.advantages, plan.ref_logp, plan.is_weights, token_weight, temperature,
        plan.clip_low, plan.clip_high, plan.clip_ratio_c, plan.kl_type, CLAMP_EDGES,
        plan.kl_coef if use_kl else 0.0, plan.entropy_coef, plan.want_entropy,
    )


class _SingleReadGRPO(torch.autograd.Function):
    """grpo_loss(impl="single_read"): the forward computes the loss AND d loss / d logits (the
    per-token coefficients do not depend on the logits beyond each row's own statistics), into a
    separate buffer or, with ``inplace``, into the logits' own storage; the backward only scales
    it by the upstream gradient (``scale_rows_``: skipped on the device when it is 1)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, inplace, plan, token_weight):
        args = _fused_args(plan, targets, token_weight, temperature)
        ctx.inplace = inplace
        if inplace:
            logp, entropy, pg, kl, ratio, flags = _ops.grpo_loss_fused_(logits, *args, True)
            increment_version(logits)  # the logits now hold their gradient
            _mark_holds_grad(logits)
            grad = logits
        else:
            logp, entropy, pg, kl, ratio, flags, grad = _ops.grpo_loss_fused(logits, *args, True, True)
        ctx.grad = grad
        ctx.save_for_backward(logits)  # an anchor for create_graph (_differentiable_once)
        ent = entropy if plan.want_entropy else None
        loss = (plan.loss_w * _per_token_loss(plan, pg, kl, ent)).sum()
        ctx.mark_non_differentiable(logp, entropy, pg, kl, ratio, flags)
        return loss, logp, entropy, pg, kl, ratio, flags

    @staticmethod
    @_differentiable_once
    def backward(ctx, g_loss, *_unused):
        if ctx.grad is None:
            raise RuntimeError(
                "tsparse.grpo_loss(impl='single_read'): backward ran twice; the gradient is computed in "
                "forward and handed over once (call the op again for a second backward)"
            )
        grad, ctx.grad = ctx.grad, None
        ctx.anchors = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        _ops.scale_rows_(grad, g_loss.detach().reshape(1))
        if ctx.inplace:
            _mark_holds_grad(grad)  # scale_rows_ bumped the version
        return grad, None, None, None, None, None


def _grpo_loss_single_read(logits, targets, temperature, plan: _LossPlan, inplace_backward: bool):
    """(loss, logp, entropy, pg, kl, ratio, flags) of the single-read path."""
    token_weight = torch.where(plan.valid, plan.loss_w, torch.zeros_like(plan.loss_w))
    if logits.requires_grad and torch.is_grad_enabled():
        # The gradient is written in THIS forward: the alias rule is checked now (a separate
        # gradient buffer when anything else can observe the logits' memory).
        inplace = _use_inplace(logits, inplace_backward) and _unobserved_in_forward(logits)
        return _SingleReadGRPO.apply(logits, targets, temperature, inplace, plan, token_weight)
    logp, entropy, pg, kl, ratio, flags, _ = _ops.grpo_loss_fused(
        logits, *_fused_args(plan, targets, token_weight, temperature), False, True
    )
    ent = entropy if plan.want_entropy else None
    loss = (plan.loss_w * _per_token_loss(plan, pg, kl, ent)).sum()
    return loss, logp, entropy, pg, kl, ratio, flags


@annotate("grpo_loss")
@_with_loss_args
@_fixed_precision()
def grpo_loss(
    logits: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    ref_logp: Optional[Tensor] = None,
    kl_type: str = "low_var_kl",
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    stream: Optional[Tensor] = None,
    stream_weights: Optional[Union[Sequence[float], Tensor]] = None,
    num_streams: Optional[int] = None,
    loss_agg: str = "token-mean",
    seq_ids: Optional[Tensor] = None,
    loss_scale_factor: Optional[float] = None,
    is_weights: Optional[Tensor] = None,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    impl: str = "two_pass",
) -> GRPOLoss:
    """GRPO loss from logits, exactly verl 0.9.1's per-token math, aggregated per stream.

    Per token: ``ratio = exp(clamp(logp - old_logp, -20, 20))``; ``pg`` = verl's
    ``compute_policy_loss_vanilla`` (two clipped surrogates, dual clip for A < 0, times
    ``is_weights``); plus ``kl_coef * kl_penalty(logp, ref_logp, kl_type)`` and
    ``- entropy_coef * entropy``. Loss = ``sum_s w_s * agg_s(per-token loss)``, each stream
    aggregated over its own masked tokens, so one stream's token count or advantages never
    rescale the other's gradient. With ``stream=None`` this is verl's single-stream
    ``ppo_loss`` value (``pg_loss - entropy_coeff * entropy_loss + kl_loss_coef * kl_loss``).

    Args:
        logits, targets: as :func:`logprobs` (``[T, V]`` and ``[T]``).@LOSS_ARGS@
        inplace_backward: as :func:`logprobs`: the logits' gradient is written into the logits
            when nothing else can observe them (out of place under ``torch.compile``). With
            ``impl="single_read"`` the write happens already DURING THE FORWARD, under the same
            rule checked at that moment (not a leaf nor a view of one, no other view, base,
            detached alias or saved output on the memory, no other autograd node holding the
            logits, no saved-tensor hooks active); otherwise the gradient goes to a separate
            buffer, with the same values. Once the op returns the logits hold d loss / d logits
            (for an upstream gradient of 1; backward scales them in place): anything that
            reads the logits afterwards - an entropy or metric computed from them, another
            op, a node that saves them later - reads the gradient. Compute those before the
            call, or leave ``inplace_backward`` off. A tsparse GRPO op given such logits
            raises ``ValueError`` (until the caller writes new values into them).
        impl: ``"two_pass"`` (default) or ``"single_read"``. ``two_pass``: the forward reads the
            logits once, the backward reads them again and writes the gradient (6 B per bf16
            logit). ``single_read`` (experimental until measured on a GPU): the forward also
            computes d loss / d logits - on CUDA one thread-block cluster per row keeps the row
            in shared memory and writes the gradient in the same pass (4 B per bf16 logit); the
            backward only multiplies it by the upstream gradient, skipped on the device when
            that is 1 (no host sync). The gradient goes to a separate buffer allocated in the
            forward (one logits-sized tensor, held until backward) or, with
            ``inplace_backward``, into the logits. Rows the cluster cannot hold (float64 logits,
            rows over 8 x 200 KB, e.g. V > 819,200 bf16) and the CPU run the two-pass math in
            the same op, with results equal to ``two_pass``'s. Only ``loss`` is differentiable
            here: ``logp`` / ``entropy`` / ``kl`` are detached (they are differentiable with
            ``two_pass``). The gradient is rounded to the logits' dtype at upstream gradient 1
            and scaled afterwards: bf16 / fp32 see one extra rounding when the upstream is not 1
            (a power of two is exact), but float16 gradients below its smallest subnormal
            (6e-8: most of a softmax gradient at token-mean over many tokens) would be lost
            before a loss scaler (``torch.amp.GradScaler``) multiplies them, so float16 logits
            that need a gradient run ``two_pass`` (which folds the upstream gradient in before
            rounding).

    Returns:
        :class:`GRPOLoss` (loss, per-token logp / ratio / entropy / kl, per-stream metrics).
        The loss and the per-token outputs are float32 (float64 for float64 logits).

    Forward reads the logits once (:func:`logprobs`); the per-token math is one small kernel
    plus [T]-sized torch ops; backward computes the per-token gradients then writes the logits'
    gradient in ONE pass. ``old_logp``, ``advantages``, ``ref_logp``, ``is_weights`` and
    ``stream_weights`` are constants (detached). A stream (or the whole batch) with no masked
    token contributes 0 to the loss and reports 0 metrics (verl would divide 0 by 0). No host
    sync unless ``num_streams`` must be read from ``stream``.

    Where the result differs from verl's: a masked token (``mask == 0``) contributes exactly 0,
    to the loss and to the gradient, even when its inputs are not finite. With a NaN / inf
    advantage (or old log-prob, IS weight) on a masked token, verl 0.9.1's autograd multiplies
    the zero upstream gradient of ``masked_sum`` by the token's NaN local derivative: that
    token's log-prob gradient is NaN (and through the LM head every parameter's), and the
    ``seq-mean-*`` modes, which multiply by the mask instead of masking, also give a NaN loss.
    Here both stay finite (tested against verl itself).
    """
    op = "grpo_loss"
    if impl not in GRPO_LOSS_IMPLS:
        raise ValueError(f"tsparse.{op}: `impl` must be one of {list(GRPO_LOSS_IMPLS)}, got {impl!r}")
    logits, targets, temperature = _check_logits(op, logits, targets, temperature)
    t = logits.shape[0]
    plan = _plan_loss(
        op, t, logits.device, _acc_dtype(logits.dtype), old_logp, advantages, mask,
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, ref_logp=ref_logp, kl_type=kl_type,
        kl_coef=kl_coef, entropy_coef=entropy_coef, stream=stream, stream_weights=stream_weights,
        num_streams=num_streams, loss_agg=loss_agg, seq_ids=seq_ids, is_weights=is_weights,
        return_entropy=return_entropy, loss_scale_factor=loss_scale_factor,
    )
    # float16 gradients computed at upstream 1 underflow before a loss scaler could lift them:
    # two_pass applies the upstream gradient before rounding (see `impl` above).
    fp16_grad = logits.dtype == torch.float16 and logits.requires_grad and torch.is_grad_enabled()
    if impl == "single_read" and not fp16_grad:
        loss, logp, entropy, pg, kl, ratio, flags = _grpo_loss_single_read(logits, targets, temperature, plan,
                                                                           inplace_backward)
        entropy = entropy if plan.want_entropy else None
        metrics = _stream_metrics(plan, logp, pg, kl, entropy, flags)
        return GRPOLoss(loss, logp, ratio, entropy, kl if plan.ref_logp is not None else None, metrics)
    logp, _, _, entropy = _logprobs_impl(logits, targets, temperature, plan.want_entropy, inplace_backward)
    if not plan.want_entropy:
        entropy = None
    pg, kl, ratio, flags, _, _, _ = _token_terms(plan, logp)
    loss = (plan.loss_w * _per_token_loss(plan, pg, kl, entropy)).sum()
    metrics = _stream_metrics(plan, logp, pg, kl, entropy, flags)
    return GRPOLoss(loss, logp, ratio, entropy, kl if plan.ref_logp is not None else None, metrics)


# --------------------------------------------------------------------------------------
# Fused linear path: logits = hidden @ weight.T in chunks of tokens, never [T, V] at once.
def _check_accum_dtype(accum_dtype, op: str) -> Optional[torch.dtype]:
    if accum_dtype is None:
        return None
    if not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point:
        raise TypeError(
            f"tsparse.{op}: `accum_dtype` must be None or a floating torch.dtype (e.g. torch.float32), got "
            f"{accum_dtype!r}"
        )
    return accum_dtype


def _check_linear(op: str, hidden, weight, targets, temperature, chunk_size):
    hidden = _need_tensor(hidden, op, "hidden")
    weight = _need_tensor(weight, op, "weight")
    if hidden.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"tsparse.{op}: `hidden` must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"tsparse.{op}: `weight` has dtype {weight.dtype} but `hidden` has {hidden.dtype}")
    if hidden.dim() != 2:
        raise ValueError(f"tsparse.{op}: `hidden` must be 2-D [T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] < 1:
        raise ValueError(
            f"tsparse.{op}: `weight` must have shape [V, H] with H = {hidden.shape[1]} and V >= 1, "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"tsparse.{op}: `weight` is on {weight.device} but `hidden` is on {hidden.device}")
    targets = _check_rows_targets(op, hidden, "hidden", targets)
    temperature = _check_temperature(temperature, op)
    t, v = hidden.shape[0], weight.shape[0]
    if chunk_size is None:
        rows = max(1, DEFAULT_CHUNK_BYTES // (v * weight.element_size()))
        chunk = 1 << (rows.bit_length() - 1)  # a power of two: friendly GEMM shapes
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"tsparse.{op}: `chunk_size` must be a positive int, got {chunk_size!r}")
        chunk = chunk_size
    return hidden, weight, targets, temperature, max(1, min(chunk, max(t, 1)))


def _chunks(t: int, chunk: int):
    for c0 in range(0, t, chunk):
        yield slice(c0, min(t, c0 + chunk))


def _accumulate_weight_grad(grad_w: Tensor, dlogits: Tensor, h: Tensor) -> None:
    """grad_w [V, H] += dlogits^T [V, C] @ h [C, H] (one cuBLAS call, beta = 1)."""
    if grad_w.dtype == dlogits.dtype:
        grad_w.addmm_(dlogits.t(), h)
    else:  # a wider accumulator (accum_dtype=float32 for bf16 / fp16 weights)
        grad_w.addmm_(dlogits.t().to(grad_w.dtype), h.to(grad_w.dtype))


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk, accum_dtype):
        t = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        logp = hidden.new_empty((t,), dtype=acc)
        row_max = hidden.new_empty((t,), dtype=acc)
        log_norm = hidden.new_empty((t,), dtype=acc)
        entropy = hidden.new_empty((t if with_entropy else 0,), dtype=acc)
        for rows in _chunks(t, chunk):
            logits = hidden[rows] @ weight.t()  # [C, V]: the only V-wide buffer
            lp, rm, ln, en = _ops.logprobs(logits, targets[rows], temperature, with_entropy)
            logp[rows], row_max[rows], log_norm[rows] = lp, rm, ln
            if with_entropy:
                entropy[rows] = en
            del logits
        ctx.save_for_backward(hidden, weight, targets, row_max, log_norm, entropy)
        ctx.temperature, ctx.chunk, ctx.accum_dtype = temperature, chunk, accum_dtype
        return logp, entropy

    @staticmethod
    @_autocast_off
    @_differentiable_once
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, row_max, log_norm, entropy = ctx.saved_tensors
        ctx.anchors = (hidden, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 7
        g_ent = _entropy_grad(g_ent, entropy, hidden.shape[0])
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=ctx.accum_dtype or weight.dtype, device=weight.device) if need_w else None
        for rows in _chunks(hidden.shape[0], ctx.chunk):
            h = hidden[rows]
            dlogits = h @ weight.t()  # recomputed logits, overwritten by their gradient below
            _ops.logprobs_backward_(
                dlogits, targets[rows], row_max[rows], log_norm[rows], entropy[rows] if g_ent is not None else entropy,
                g_logp[rows] if g_logp is not None else None, g_ent[rows] if g_ent is not None else None,
                ctx.temperature,
            )
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[rows])
            if need_w:
                _accumulate_weight_grad(grad_w, dlogits, h)
            del dlogits
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


@annotate("fused_linear_logprobs")
@_fixed_precision(cast_linear=True)
def fused_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`logprobs` of ``logits = hidden @ weight.T`` without materializing the logits.

    Args:
        hidden: ``[T, H]`` last hidden states (bf16 / fp16 / fp32 / fp64).
        weight: ``[V, H]`` LM-head weight, same dtype and device.
        targets, temperature, return_entropy: as :func:`logprobs`.
        chunk_size: tokens per chunk (default: the largest power of two whose [chunk, V] logits
            fit in 512 MiB, e.g. 1024 for V = 152,064 bf16).
        accum_dtype: dtype of the weight-gradient accumulator (default: the weight's dtype, one
            cuBLAS ``addmm`` with beta = 1 per chunk; ``torch.float32`` accumulates bf16 / fp16
            chunks in fp32 at the cost of a [V, H] fp32 buffer and fp32 matmuls). A floating
            ``torch.dtype`` or None; anything else raises ``TypeError``.

    Memory: one [chunk, V] logits buffer at a time, plus O(T) statistics: never [T, V]. The
    backward recomputes each chunk's logits (one extra matmul per chunk), overwrites them with
    their gradient in place, then ``grad_hidden = dlogits @ weight`` and
    ``grad_weight += dlogits^T @ hidden``. Returns ``(logp, entropy | None)``, differentiable in
    ``hidden`` and ``weight``.
    """
    op = "fused_linear_logprobs"
    hidden, weight, targets, temperature, chunk = _check_linear(op, hidden, weight, targets, temperature, chunk_size)
    accum_dtype = _check_accum_dtype(accum_dtype, op)
    logp, entropy = _FusedLinearLogprobs.apply(hidden, weight, targets, temperature, bool(return_entropy), chunk, accum_dtype)
    return logp, (entropy if return_entropy else None)


class _FusedLinearGRPO(torch.autograd.Function):
    """Forward computes the loss AND its gradients chunk by chunk (the per-token gradient of the
    GRPO loss is known in forward: the aggregation weights do not depend on the logits), so each
    chunk's logits are computed once and overwritten by their gradient; backward only scales
    the stored gradients by the upstream scalar."""

    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, targets, temperature, chunk, accum_dtype, plan):
        t = hidden.shape[0]
        acc = plan.acc
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp = hidden.new_empty((t,), dtype=acc)
        ratio = hidden.new_empty((t,), dtype=acc)
        kl = hidden.new_empty((t,), dtype=acc)
        pg = hidden.new_empty((t,), dtype=acc)
        flags = hidden.new_empty((t,), dtype=torch.uint8)
        entropy = hidden.new_empty((t if plan.want_entropy else 0,), dtype=acc)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=accum_dtype or weight.dtype, device=weight.device) if need_w else None
        for rows in _chunks(t, chunk):
            h = hidden[rows]
            logits = h @ weight.t()
            lp, rm, ln, en = _ops.logprobs(logits, targets[rows], temperature, plan.want_entropy)
            c_pg, c_kl, c_ratio, c_flags, dpg, dkl, _ = _token_terms(plan, lp, rows)
            en_or_none = en if plan.want_entropy else None
            loss += (plan.loss_w[rows] * _per_token_loss(plan, c_pg, c_kl, en_or_none, rows)).sum()
            logp[rows], ratio[rows], kl[rows], pg[rows], flags[rows] = lp, c_ratio, c_kl, c_pg, c_flags
            if plan.want_entropy:
                entropy[rows] = en
            if need_h or need_w:
                # d loss / d per-token loss, then the chain rule as autograd would apply it.
                g_tok = torch.where(plan.valid[rows], plan.loss_w[rows], torch.zeros_like(lp))
                nz = g_tok != 0
                g_logp = torch.where(nz, g_tok * dpg, torch.zeros_like(lp))
                if plan.ref_logp is not None and plan.kl_coef != 0:
                    g_logp = g_logp + torch.where(nz, (plan.kl_coef * g_tok) * dkl, torch.zeros_like(lp))
                g_ent = -plan.entropy_coef * g_tok if plan.entropy_coef != 0 else None
                _ops.logprobs_backward_(logits, targets[rows], rm, ln, en, g_logp, g_ent, temperature)
                if need_h:
                    torch.mm(logits, weight, out=grad_h[rows])
                if need_w:
                    _accumulate_weight_grad(grad_w, logits, h)
            del logits
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        ctx.grads = (grad_h, grad_w)
        ctx.save_for_backward(hidden, weight)  # references only: anchors for create_graph
        ctx.mark_non_differentiable(logp, ratio, kl, pg, flags, entropy)
        return loss, logp, ratio, kl, pg, flags, entropy

    @staticmethod
    @_autocast_off
    @_differentiable_once
    def backward(ctx, g_loss, *_unused):
        if ctx.grads is None:
            raise RuntimeError(
                "tsparse.fused_linear_grpo_loss: backward ran twice; the gradients are computed in "
                "forward and handed over once (call the op again for a second backward)"
            )
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        ctx.anchors = ctx.saved_tensors
        # The upstream scalar stays in the loss's dtype (fp32 / fp64): rounded to bf16 it was off
        # by up to 2^-9 (1/3 -> 0.33398), and a loss scaler's 65536 overflowed float16 to inf.
        g = g_loss.detach()
        if grad_h is not None:
            grad_h.mul_(g)
        if grad_w is not None:
            grad_w.mul_(g)
        return grad_h, grad_w, None, None, None, None, None


@annotate("fused_linear_grpo_loss")
@_with_loss_args
@_fixed_precision(cast_linear=True)
def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    ref_logp: Optional[Tensor] = None,
    kl_type: str = "low_var_kl",
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    stream: Optional[Tensor] = None,
    stream_weights: Optional[Union[Sequence[float], Tensor]] = None,
    num_streams: Optional[int] = None,
    loss_agg: str = "token-mean",
    seq_ids: Optional[Tensor] = None,
    loss_scale_factor: Optional[float] = None,
    is_weights: Optional[Tensor] = None,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
) -> GRPOLoss:
    """:func:`grpo_loss` of ``logits = hidden @ weight.T`` without materializing the logits.

    Args:
        hidden: ``[T, H]`` last hidden states; weight: ``[V, H]`` LM-head weight (same dtype).
        targets: ``[T]``.@LOSS_ARGS@
        chunk_size, accum_dtype: as :func:`fused_linear_logprobs`.

    The per-token gradient of the loss does not depend on the logits beyond each token's own
    statistics, so the forward computes, per chunk of tokens: logits = one matmul, the fused
    log-prob kernel, the per-token terms and their gradients, the logits' gradient in place,
    then ``grad_hidden`` (one matmul) and ``grad_weight`` (one matmul, accumulated): three
    matmuls per chunk, like the unfused path, with memory O(chunk x V). Backward only scales the
    stored gradients by the upstream scalar (once: a second backward raises). Only ``loss`` is
    differentiable; the per-token outputs are detached.
    """
    op = "fused_linear_grpo_loss"
    hidden, weight, targets, temperature, chunk = _check_linear(op, hidden, weight, targets, temperature, chunk_size)
    accum_dtype = _check_accum_dtype(accum_dtype, op)
    plan = _plan_loss(
        op, hidden.shape[0], hidden.device, _acc_dtype(hidden.dtype), old_logp, advantages, mask,
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, ref_logp=ref_logp, kl_type=kl_type,
        kl_coef=kl_coef, entropy_coef=entropy_coef, stream=stream, stream_weights=stream_weights,
        num_streams=num_streams, loss_agg=loss_agg, seq_ids=seq_ids, is_weights=is_weights,
        return_entropy=return_entropy, loss_scale_factor=loss_scale_factor,
    )
    loss, logp, ratio, kl, pg, flags, entropy = _FusedLinearGRPO.apply(
        hidden, weight, targets, temperature, chunk, accum_dtype, plan
    )
    ent = entropy if plan.want_entropy else None
    metrics = _stream_metrics(plan, logp, pg, kl, ent, flags)
    return GRPOLoss(loss, logp, ratio, ent, kl if plan.ref_logp is not None else None, metrics)
