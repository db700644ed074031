#!/usr/bin/env python3
"""Keeps tsparse on the torch API of its oldest supported release (torch 2.8).

Two verbs:

``generate`` - run with the OLDEST supported torch (a separate venv, e.g.
``/work/venvs/torch28/bin/python scripts/torch_api.py generate``): reads every torch name the
repository uses and writes ``scripts/torch_api_manifest.json`` from that torch itself:

* Python: for each module or class on the way to a used name (``torch``, ``torch.library``,
  ``torch.nn.functional``, ``torch.Tensor``, ...) its ``dir()`` in that torch, plus
  ``dir(torch.Tensor)`` and ``dir(torch.nn.Module)`` (methods called on objects the code does
  not name statically);
* C++: every ``at::`` / ``c10::`` / ``torch::`` name and ``TORCH_`` / ``AT_`` / ``C10_`` macro the
  sources use, each found in that torch's headers, plus the method names declared in its
  ``TensorBody.h`` / ``TensorBase.h``.

A used name that this torch does not have is an error (the code needs a newer torch), and so
is a file that cannot be generated from a real install: the manifest is never written by hand.

``check`` (the default; ``python_tests/test_torch_api.py`` runs it with whatever torch is
installed): every torch name used now must be in the manifest - a name whose parent is
catalogued must be in that parent's 2.8 ``dir()``; a method called on anything that the current
torch's ``Tensor`` / ``nn.Module`` has but 2.8's did not is flagged; a C++ name or macro not
verified against 2.8, or a Tensor method call in C++ that 2.8's headers do not declare, fails.
A failure means: the code uses something newer than torch 2.8 (add a fallback), or a torch name
whose 2.8 status is not recorded yet (rerun ``generate`` with torch 2.8). The static check
cannot see keyword arguments or behaviour; that is what building and running the suite on
torch 2.8 once per change of the torch-facing code is for (README, "Building").
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path(__file__).resolve().parent / "torch_api_manifest.json"
PY_DIRS = ("tsparse", "python_tests", "benchmarks", "scripts", "profiling")
PY_FILES = ("setup.py",)
CPP_DIRS = ("csrc",)
CPP_SUFFIXES = (".cpp", ".h", ".cu", ".cuh", ".hpp")
# Attribute names checked against these classes wherever they are used (the receiver's type is
# not known statically): a method the installed torch added after the manifest's torch (names of
# Python builtins' methods, e.g. list.index, are left out).
METHOD_CLASSES = ("torch.Tensor", "torch.nn.Module")
_CPP_NAME = re.compile(r"\b(?:at|c10|torch)::((?:[A-Za-z_]\w*::)*[A-Za-z_]\w*)")
_CPP_MACRO = re.compile(r"\b((?:TORCH|AT|C10)_[A-Z0-9_]+)\b")
_CPP_MEMBER_CALL = re.compile(r"(?:\.|->)\s*([A-Za-z_]\w*)\s*(?:<[^<>()]*>)?\s*\(")
_CPP_DECL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
_TOKEN = re.compile(r"\b[A-Za-z_]\w*\b")


# --------------------------------------------------------------------------------------
# Reading the repository
def python_files(root: Path = ROOT) -> list[Path]:
    out = [root / f for f in PY_FILES if (root / f).is_file()]
    for d in PY_DIRS:
        out += sorted(p for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)
    return out


def cpp_files(root: Path = ROOT) -> list[Path]:
    out = []
    for d in CPP_DIRS:
        out += sorted(p for p in (root / d).rglob("*") if p.suffix in CPP_SUFFIXES and "generated" not in p.parts)
    return out


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> torch dotted path, from every import in the file (function-level too)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    if a.asname:
                        out[a.asname] = a.name
                    else:
                        out["torch"] = "torch"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "torch" or node.module.startswith("torch.")):
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _chain(node: ast.AST) -> Optional[list[str]]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def python_uses(files: Iterable[Path]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(paths, attrs)``: torch dotted path -> ``file:line`` places, and every attribute name
    used anywhere -> places (for the method check)."""
    paths: dict[str, list[str]] = {}
    attrs: dict[str, list[str]] = {}
    for f in files:
        text = f.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(f))
        alias = _aliases(tree)
        rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
        inner = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                inner.add(id(node.value))
                attrs.setdefault(node.attr, []).append(f"{rel}:{node.lineno}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in inner:
                parts = _chain(node)
                if parts and parts[0] in alias:
                    full = alias[parts[0]] + ("." + ".".join(parts[1:]) if len(parts) > 1 else "")
                    paths.setdefault(full, []).append(f"{rel}:{node.lineno}")
        for full in set(alias.values()):  # what the imports themselves name
            paths.setdefault(full, []).append(f"{rel}:import")
    return paths, attrs


def _strip_cpp_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def cpp_uses(files: Iterable[Path]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(names, member_calls)``: namespaced names (each ``::`` component) and macros -> places;
    member-call names (``x.name(``, ``x->name(``) -> places."""
    names: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for f in files:
        rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
        for n, line in enumerate(_strip_cpp_comments(f.read_text(encoding="utf-8")).splitlines(), 1):
            for m in _CPP_NAME.finditer(line):
                for part in m.group(1).split("::"):
                    names.setdefault(part, []).append(f"{rel}:{n}")
            for m in _CPP_MACRO.finditer(line):
                names.setdefault(m.group(1), []).append(f"{rel}:{n}")
            for m in _CPP_MEMBER_CALL.finditer(line):
                members.setdefault(m.group(1), []).append(f"{rel}:{n}")
    return names, members


# --------------------------------------------------------------------------------------
# The installed torch
def _resolve(path: str):
    import importlib

    import torch  # noqa: F401

    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for k, p in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, p)
        except AttributeError:
            try:
                obj = importlib.import_module(".".join(parts[: k + 1]))
            except ImportError:
                raise AttributeError(path) from None
    return obj


def _catalogued(obj) -> bool:
    import types

    return isinstance(obj, (types.ModuleType, type))


def _is_dynamic(path: str) -> bool:
    """``torch.ops.<namespace>...``: operator namespaces filled at run time (tsparse's own ops)."""
    return path.startswith("torch.ops.")


def _include_root() -> Path:
    from torch.utils.cpp_extension import include_paths

    return Path(include_paths()[0])


def _header_tokens(root: Path) -> set[str]:
    tokens: set[str] = set()
    for sub in ("ATen", "c10", "torch"):
        for p in (root / sub).rglob("*.h"):
            tokens.update(_TOKEN.findall(p.read_text(encoding="utf-8", errors="replace")))
    return tokens


def _tensor_methods(root: Path) -> set[str]:
    out: set[str] = set()
    for name in ("TensorBody.h", "TensorBase.h"):
        p = root / "ATen" / "core" / name
        if p.is_file():
            out.update(_CPP_DECL.findall(_strip_cpp_comments(p.read_text(encoding="utf-8", errors="replace"))))
    return out


# --------------------------------------------------------------------------------------
def generate(out: Path = MANIFEST) -> int:
    import torch

    paths, _ = python_uses(python_files())
    objects: dict[str, object] = {}
    missing = []
    # First resolve everything (importing submodules such as torch.utils.cpp_extension, which
    # then appear in their parent's dir() as they do for the code), then catalogue.
    for path in sorted(paths):
        where = paths[path][0]
        if _is_dynamic(path):
            path = "torch.ops"
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            try:
                obj = _resolve(prefix)
            except AttributeError:
                missing.append(f"{prefix} (used at {where})")
                break
            if not _catalogued(obj):
                break
            objects[prefix] = obj
    catalog = {name: sorted(set(dir(obj))) for name, obj in sorted(objects.items())}
    for cls in METHOD_CLASSES:
        catalog.setdefault(cls, sorted(set(dir(_resolve(cls)))))
    root = _include_root()
    tokens = _header_tokens(root)
    names, _ = cpp_uses(cpp_files())
    missing += [f"C++ {n} (used at {where[0]})" for n, where in sorted(names.items()) if n not in tokens]
    if missing:
        print(f"torch {torch.__version__} lacks what the code uses:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    manifest = {
        "generated_by": "scripts/torch_api.py generate",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "python": catalog,
        "cpp_names": sorted(names),
        "cpp_tensor_methods": sorted(_tensor_methods(root)),
    }
    out.write_text(json.dumps(manifest, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}: torch {torch.__version__}, {len(catalog)} modules/classes, "
          f"{len(names)} C++ names")
    return 0


def check(manifest_path: Path = MANIFEST, py_files: Optional[list] = None, cc_files: Optional[list] = None,
          current_torch: bool = True) -> list[str]:
    """The problems (empty: the code uses nothing newer than the manifest's torch)."""
    man = json.loads(manifest_path.read_text(encoding="utf-8"))
    base = man["torch"]
    cat = {k: set(v) for k, v in man["python"].items()}
    problems = []
    paths, attrs = python_uses(python_files() if py_files is None else py_files)
    for path, where in sorted(paths.items()):
        if _is_dynamic(path):
            path = "torch.ops"
        parts = path.split(".")
        for k in range(1, len(parts)):
            parent, name = ".".join(parts[:k]), parts[k]
            if parent not in cat:
                if current_torch:
                    try:
                        obj = _resolve(parent)
                    except AttributeError:
                        obj = None
                    if obj is not None and _catalogued(obj):
                        problems.append(f"{where[0]}: {path}: `{parent}` is not in the manifest (torch {base}); "
                                        f"rerun `scripts/torch_api.py generate` with torch {base}")
                break
            if name not in cat[parent] and f"{parent}.{name}" not in cat:
                problems.append(f"{where[0]}: {path}: torch {base} has no `{parent}.{name}`")
                break
    if current_torch:
        builtin = set().union(*(dir(t) for t in (object, list, dict, str, tuple, set, bytes, int, float)))
        for cls in METHOD_CLASSES:
            newer = set(dir(_resolve(cls))) - cat.get(cls, set()) - builtin
            for name in sorted(newer & set(attrs)):
                if not name.startswith("__"):
                    problems.append(f"{attrs[name][0]}: .{name}: a `{cls}` attribute torch {base} does not have "
                                    f"(if it is not called on a {cls.split('.')[-1]}, rename it)")
    names, members = cpp_uses(cpp_files() if cc_files is None else cc_files)
    known = set(man["cpp_names"])
    for n, where in sorted(names.items()):
        if n not in known:
            problems.append(f"{where[0]}: C++ `{n}` is not verified against torch {base}: rerun "
                            f"`scripts/torch_api.py generate` with torch {base}")
    if current_torch:
        old_methods = set(man["cpp_tensor_methods"])
        newer = _tensor_methods(_include_root()) - old_methods
        for n in sorted(newer & set(members)):
            problems.append(f"{members[n][0]}: C++ .{n}(): a Tensor method torch {base}'s headers do not declare")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("verb", nargs="?", default="check", choices=["check", "generate"])
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    args = p.parse_args(argv)
    if args.verb == "generate":
        return generate(args.manifest)
    problems = check(args.manifest)
    for line in problems:
        print(line)
    man = json.loads(args.manifest.read_text(encoding="utf-8"))
    print(f"torch API check against torch {man['torch']}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
