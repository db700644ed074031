"""The record of every object tsparse replaced inside verl / transformers, and verl's originals.

:mod:`.patches` (which installs the swaps) and :mod:`.varlen` (whose drop-ins fall back to
verl's own functions) both need it; it lives here, below both, so neither imports the other
(``patches`` -> ``varlen`` and ``varlen`` -> ``swaps`` only). It imports nothing from tsparse.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MISSING", "ORIGINALS", "resolve", "current", "set_attr", "restore", "original"]

#: Stands for "the attribute was not in the owner's own ``__dict__``" (it was inherited).
MISSING = object()
#: ``(id(owner), name) -> (owner, name, original value or MISSING)``, in installation order.
ORIGINALS: dict = {}


def resolve(module: str, path: str) -> tuple[Any, str]:
    """``(owner, attribute name)`` of ``module`` + dotted ``path`` (``Class.method``)."""
    owner = importlib.import_module(module)
    parts = path.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, parts[-1]


def current(owner, name):
    """The owner's own value of ``name`` (a class: its ``__dict__`` entry), or :data:`MISSING`."""
    if isinstance(owner, type):
        return owner.__dict__.get(name, MISSING)
    return getattr(owner, name, MISSING)


def set_attr(owner, name: str, value) -> None:
    """Replaces ``owner.name`` with ``value``, recording the original the first time."""
    key = (id(owner), name)
    if key not in ORIGINALS:
        ORIGINALS[key] = (owner, name, current(owner, name))
    setattr(owner, name, value)


def restore(key) -> None:
    """Puts back the original recorded under ``key`` (an inherited one by deleting the override)."""
    owner, name, value = ORIGINALS.pop(key)
    if value is MISSING:
        if name in getattr(owner, "__dict__", {}):
            delattr(owner, name)
    else:
        setattr(owner, name, value)


def original(module: str, path: str):
    """verl's own object at a patch target (even while tsparse's replacement is installed)."""
    owner, name = resolve(module, path)
    rec = ORIGINALS.get((id(owner), name))
    if rec is not None:
        return rec[2] if rec[2] is not MISSING else getattr(owner, name)
    return getattr(owner, name)
