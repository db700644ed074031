"""Argument checks shared by the Python doorway of every op family (the C++ side repeats every
check that guards memory; these name the user's argument and cover what the C++ kernels never
see: Python scalars, meta tensors, fake kernels).

* :func:`number` - a real number argument (``bool``, strings and tensors are rejected).
* :func:`fake_same_device` - called by every fake kernel: a call that mixes a meta tensor with
  real ones is dispatched to the fake kernel (the Meta key wins), which must then refuse it
  instead of returning uninitialised memory on the real tensors' device.
* :func:`not_meta` - values a public op reads on the host cannot come from a meta tensor.
* :func:`check_on_device` - a verdict computed on the inputs' device: eager on the CPU, an
  asynchronous device assert on CUDA and under ``torch.compile`` (no host sync, traceable), as
  ``check_on_device`` in ``csrc/common/checks.h``.
* :func:`renamed_errors` - a composite reports its own op and argument names, not those of
  the row kernels it is built from.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "need_tensor", "number", "fake_same_device", "fake_dims", "not_meta", "check_on_device", "is_meta", "renamed_errors",
]


def need_tensor(value, op: str, arg: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"tsparse.{op}: `{arg}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def number(value, op: str, arg: str, *, finite: bool = False, minimum: Optional[float] = None) -> float:
    """``value`` as a float: a real number (int, float, numpy scalar; not a bool, a string or a
    tensor), optionally finite and ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"tsparse.{op}: `{arg}` must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if finite and not math.isfinite(v):
        raise ValueError(f"tsparse.{op}: `{arg}` must be a finite number, got {value!r}")
    if minimum is not None and not v >= minimum:
        raise ValueError(f"tsparse.{op}: `{arg}` must be >= {minimum:g}, got {value!r}")
    return v


def is_meta(t) -> bool:
    return isinstance(t, Tensor) and t.device.type == "meta"


def fake_same_device(op: str, ref_arg: str, ref: Tensor, optional: tuple = (),
                     **others: Optional[Tensor]) -> None:
    """Every other tensor argument of a raw op on ``ref``'s device; None only for the arguments
    named in ``optional`` (the dispatcher lets None through for a required ``Tensor``)."""
    if not isinstance(ref, Tensor):
        raise TypeError(f"tsparse.{op}: `{ref_arg}` must be a tensor, got {type(ref).__name__}")
    for arg, t in others.items():
        if t is None and arg not in optional:
            raise TypeError(f"tsparse.{op}: `{arg}` must be a tensor, got None")
        if t is None or t.device == ref.device:
            continue
        extra = ""
        if t.device.type == "meta" or ref.device.type == "meta":
            extra = " (a meta tensor cannot be mixed with tensors that hold data)"
        raise ValueError(
            f"tsparse.{op}: `{arg}` is on {t.device} but `{ref_arg}` is on {ref.device}; they must be on "
            f"the same device{extra}"
        )


def fake_dims(op: str, **named) -> None:
    """``name=(tensor, ndim)``: the ranks the real kernels check, so a fake kernel fails with the
    same kind of message instead of an IndexError on ``shape[1]`` (None: an absent optional)."""
    for arg, (t, nd) in named.items():
        if t is not None and t.dim() != nd:
            raise ValueError(f"tsparse.{op}: `{arg}` must be {nd}-D, got shape {tuple(t.shape)}")


def not_meta(t: Tensor, op: str, arg: str, why: str) -> None:
    if t.device.type == "meta":
        raise ValueError(f"tsparse.{op}: `{arg}` is a meta tensor; meta tensors are not supported here ({why})")


def check_on_device(ok: Tensor, op: str, what: str, exc: type = ValueError) -> None:
    """``ok`` (a bool scalar computed on the inputs' device) must be True: checked eagerly on
    the CPU (raises ``exc``), with ``torch._assert_async`` on CUDA and inside ``torch.compile``
    (no host sync; on CUDA the error surfaces at the next synchronization and leaves the
    context unusable, like PyTorch's own index checks); nothing to check on meta tensors."""
    if ok.device.type == "meta":
        return
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise exc(f"tsparse.{op}: {what}")
        return
    torch._assert_async(ok, f"tsparse.{op}: {what}")


@contextlib.contextmanager
def renamed_errors(op: str, inner_ops: tuple, args: dict):
    """Errors raised inside the block by the inner ops ``inner_ops`` (messages start with
    ``tsparse.<inner>:`` and quote arguments as `` `name` `` or `` `name[i]` ``) are re-raised
    naming the caller's op and arguments (``args``: inner name -> the caller's name), so a
    drop-in such as ``pad_input`` reports ``indices``, not the row kernel's ``index``."""
    try:
        yield
    except (TypeError, ValueError, IndexError) as exc:
        msg = str(exc)
        new = msg
        for inner in inner_ops:
            new = new.replace(f"tsparse.{inner}:", f"tsparse.{op}:")
        if new == msg:
            raise
        for inner_arg, outer_arg in args.items():
            new = re.sub(rf"`{re.escape(inner_arg)}(?=[`\[])", f"`{outer_arg}", new)
        raise type(exc)(new) from None
