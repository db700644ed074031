"""NVTX ranges around tsparse ops and pipeline phases, off unless ``TSPARSE_NVTX=1``.

The switch is read once, at import. When off, :func:`annotate` returns the function
unchanged and :func:`nvtx_range` is a no-op context manager, so disabled ranges cost
nothing. When on, ranges go through the ``nvtx`` package (``pip install tsparse[profile]``)
or, without it, through ``torch.cuda.nvtx``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

ENABLED = os.environ.get("TSPARSE_NVTX", "0").strip() not in ("", "0", "false", "off")
_DOMAIN = "tsparse"


def _backend():
    try:
        import nvtx  # type: ignore

        return ("nvtx", nvtx)
    except ImportError:
        import torch

        return ("torch", torch.cuda.nvtx)


_KIND, _MOD = _backend() if ENABLED else (None, None)


@contextlib.contextmanager
def _range(name: str):
    if _KIND == "nvtx":
        with _MOD.annotate(name, domain=_DOMAIN):
            yield
    else:
        _MOD.range_push(f"{_DOMAIN}:{name}")
        try:
            yield
        finally:
            _MOD.range_pop()


def nvtx_range(name: str):
    """Context manager: an NVTX range named ``name`` when enabled, else nothing."""
    return _range(name) if ENABLED else contextlib.nullcontext()


def annotate(name: str) -> Callable[[F], F]:
    """Decorator: wraps the function in an NVTX range when enabled (identity otherwise)."""

    def deco(fn: F) -> F:
        if not ENABLED:
            return fn

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with _range(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
