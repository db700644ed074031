"""The verl integration's modules import without a cycle: the graph of relative imports inside
``tsparse.integrations.verl`` (module-level AND function-level ones, which hide a cycle until a
function runs) has none, and each of ``varlen``, ``patches`` and ``swaps`` imported FIRST in a
fresh interpreter works, including the path that used to close the cycle (``varlen``'s
fallback to verl's own ``no_padding_2_padding``)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tsparse

PKG = Path(tsparse.__file__).parent / "integrations" / "verl"
ROOT = Path(tsparse.__file__).parent.parent


def _import_graph() -> dict[str, set[str]]:
    mods = {p.stem for p in PKG.glob("*.py")}
    graph = {}
    for p in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsparse.integrations.verl."):
                deps.add(node.module.split(".")[3])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[3] for a in node.names if a.name.startswith("tsparse.integrations.verl.")}
        graph[p.stem] = {d for d in deps if d in mods and d != p.stem}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = 1
        for d in sorted(graph.get(node, ())):
            if state.get(d) == 1:
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert {"patches", "varlen", "swaps"} <= set(graph)
    assert "patches" not in graph["varlen"] and "varlen" in graph["patches"]
    assert _cycles(graph) == []
    # The checker itself finds a cycle when there is one (patches -> varlen -> patches).
    assert _cycles({**graph, "varlen": graph["varlen"] | {"patches"}}) != []


@pytest.mark.parametrize("first", ["varlen", "patches", "swaps"])
def test_each_module_imports_first_in_a_fresh_interpreter(first):
    code = (
        "import importlib, sys\n"
        f"m = importlib.import_module('tsparse.integrations.verl.{first}')\n"
        "from tsparse.integrations.verl import varlen, patches, swaps\n"
        "assert patches.original is swaps.original and patches.resolve is swaps.resolve\n"
        f"if {first == 'varlen'} and importlib.util.find_spec('verl') is not None:\n"
        "    import verl.workers.utils.padding as pad\n"
        "    assert varlen._original_no_padding_2_padding() is pad.no_padding_2_padding\n"
        "print('ok', sorted(k for k in sys.modules if k.startswith('tsparse.integrations.verl.')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", "import importlib.util\n" + code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


def test_swaps_record_and_restore():
    from tsparse.integrations.verl import swaps

    class Owner:
        def f(self):
            return "orig"

    class Child(Owner):
        pass

    swaps.set_attr(Child, "f", lambda self: "new")
    swaps.set_attr(Owner, "f", lambda self: "new-owner")
    try:
        assert Child().f() == "new" and Owner().f() == "new-owner"
        assert swaps.ORIGINALS[(id(Child), "f")][2] is swaps.MISSING  # inherited, not Child's own
    finally:
        swaps.restore((id(Owner), "f"))
        swaps.restore((id(Child), "f"))
    assert "f" not in Child.__dict__ and Child().f() == "orig" and Owner().f() == "orig"

