"""What the compiled CUDA code of tsparse does, read from the built extension's SASS.

    python profiling/sass_report.py                 # one table row per tsparse kernel
    python profiling/sass_report.py --loops         # ... plus every innermost loop with a global access
    python profiling/sass_report.py --json          # everything as JSON (kernels, loops, spec checks)
    python profiling/sass_report.py --check         # the compile-time spec (profiling/sass_spec.py):
                                                    # exit 1 when a property fails unexpectedly
    python profiling/sass_report.py --filter compose --lib path/to/_C.so
    make sass                                       # the same, after an incremental build

No GPU is needed: the machine code is the evidence (../shared/notes/sass.md says what to look
for). The report runs ``cuobjdump -xelf all`` on ``tsparse/_C*.so``, then ``nvdisasm -g`` (SASS
with source lines and the per-kernel ``.nv.info`` attributes) on each cubin and
``cuobjdump -res-usage`` for registers / stack / shared memory. Both tools come from the pinned
wheels ``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm`` (requirements/dev.lock), found
through the installed distributions' file lists; a CUDA toolkit's own copies (``$CUDA_HOME/bin``)
are the fallback, never another package's (triton ships private copies). ``TSPARSE_CUOBJDUMP`` /
``TSPARSE_NVDISASM`` override the paths.

Per kernel (demangled, ``tsparse::cuda::(anonymous namespace)::`` dropped):
  block     threads per block = the kernel's ``__launch_bounds__`` (``EIATTR_MAX_THREADS`` in the
            cubin). Every tsparse launcher launches with exactly its kernel's launch bound
            (kThreads / kRowThreads / THREADS template argument ...); profiling/sass_spec.py
            repeats the intended block size per family and the tests compare the two.
  regs, stack (frame bytes), local (spill bytes), smem (static shared bytes): cuobjdump -res-usage.
  occ       theoretical occupancy on sm_90 at that block size (CTAs/SM and warps %): the
            limits of cuda_occupancy.h for CC 9.0 (64 warps, 32 CTAs, 64 K registers in four
            sub-partitions allocated per warp in 256-register units, 228 KB shared memory with
            1 KB reserved per CTA).
  LDG / STG global loads / stores by width (8/16/32/64/128 bits; generic LD / ST, which the
            compiler emits when it cannot prove a pointer global, are counted apart and in
            the load/store order, and a spec asking for 128-bit stores rejects them); LDL / STL local memory (the
            stack: spills or stack arrays) in the kernel and inside loops; MUFU by kind; BSSY and
            BRA counts (divergent control flow).
  loops     found by their back-edges: a BRA whose target label lies at or before it; the body is
            [label, last back-edge]. Innermost loops (no other loop inside) that touch global
            memory are listed; the "hot" loop is the one moving the most 128-bit accesses per
            trip (ties: the largest body).
  instr/trip  instructions on the longest path through one trip of the loop (head to back-edge,
            forward branches followed, the longer side of an if/else taken, paths into a failure
            call left out): the whole body when it is branch-free, and what one trip executes at
            most when the body holds two versions of a computation (JSON: body_instr is the
            plain body count).
  instr/elem  instructions per trip / elements per trip, where elements per trip =
            (128-bit global loads in the body x 16 B) / element size - or the 128-bit stores
            when the loop loads nothing that wide (a store-only zero fill). The element size is
            the kernel's data type (first template argument: bf16/fp16 2 B, fp32 4, fp64 8); the
            byte-moving copy kernels (``compose_copy_kernel<uint4, ...>``) are counted per bf16
            element (2 B), the dtype they move in practice. A loop without 128-bit accesses gets
            instructions per trip only. Accesses on the path count (predicated ones as executed:
            an upper bound of the work per trip); NOPs are not counted.

Exit status: 0 (report printed; with --check: no unexpected spec failure), 1 (--check found
one), 2 (nothing to read: the extension is missing or has no CUDA code, or a tool is missing;
one line on stderr says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# sm_90 (H100 / H200) per-SM limits, as cuda_occupancy.h uses them for compute capability 9.0.
SM90 = dict(max_warps=64, max_ctas=32, regs=65536, reg_unit=256, sub_partitions=4, max_regs=255,
            smem=233472, smem_reserved=1024, smem_unit=128, warp=32)


class ReportError(RuntimeError):
    """Nothing to report (missing extension, no CUDA code, missing tool): one line for the user."""


def occupancy(block: int, regs: int, smem: int = 0, limits: dict = SM90) -> dict:
    """Theoretical resident CTAs per SM and warp occupancy for one kernel on sm_90."""
    w = limits["warp"]
    warps = -(-block // w)
    if block <= 0 or warps > limits["max_warps"] or regs > limits["max_regs"]:
        return {"ctas": 0, "warps": 0, "pct": 0.0, "limiter": "block" if regs <= limits["max_regs"] else "regs"}
    by = {"warps": limits["max_warps"] // warps, "ctas": limits["max_ctas"]}
    if regs > 0:
        per_warp = -(-regs * w // limits["reg_unit"]) * limits["reg_unit"]
        per_sub = (limits["regs"] // limits["sub_partitions"]) // per_warp
        by["regs"] = (per_sub * limits["sub_partitions"]) // warps
    per_cta_smem = -(-(smem + limits["smem_reserved"]) // limits["smem_unit"]) * limits["smem_unit"]
    by["smem"] = limits["smem"] // per_cta_smem
    limiter = min(by, key=lambda k: by[k])
    ctas = by[limiter]
    return {"ctas": ctas, "warps": ctas * warps, "pct": 100.0 * ctas * warps / limits["max_warps"],
            "limiter": limiter}


# ---------------------------------------------------------------------------------------------
# SASS parsing (pure text: tested on canned snippets without any tool)
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:\{\s*)?(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[^:\s]+):\s*$")
_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_SECTION_TEXT = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_SECTION_INFO = re.compile(r"^\s*\.section\s+\.nv\.info\.([^,\s]+)")
_SECTION_ANY = re.compile(r"^\s*\.section\s+")
_ATTR = re.compile(r"//----- nvinfo : (EIATTR_[A-Z0-9_]+)")
_WORD = re.compile(r"\.word\s+0x([0-9a-f]+)")

_WIDTH_TOKENS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


@dataclass
class Instr:
    addr: int
    op: str             # full opcode with modifiers, e.g. LDG.E.128.CONSTANT
    pred: str           # "@P0" / "@!P1" / ""
    args: str
    src: Optional[tuple[str, int]] = None  # (file basename, line) from nvdisasm -g
    sub: bool = False   # inside a local subroutine ($...: the noinline failure paths)

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]


def access_width(op: str) -> int:
    """Bits moved by one global/local/shared load or store (LDG.E.128 -> 128, LDG.E -> 32)."""
    for tok in op.split(".")[1:]:
        if tok in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[tok]
    return 32


@dataclass
class Loop:
    head: int           # address of the loop's label
    end: int            # address of its last back-edge
    label: str
    src: Optional[str] = None     # "file.cu:line"
    code: Optional[str] = None    # that line's text, when the source is here
    stats: dict = field(default_factory=dict)
    innermost: bool = True

    def contains(self, other: "Loop") -> bool:
        return self.head <= other.head and other.end <= self.end and (self.head, self.end) != (other.head, other.end)


def parse_functions(text: str) -> tuple[dict[str, list[Instr]], dict[str, dict[str, list[int]]], dict[str, dict[str, int]]]:
    """nvdisasm output -> ({mangled: instructions}, {mangled: {attr: words}}, {mangled: {label: addr}})."""
    code: dict[str, list[Instr]] = {}
    info: dict[str, dict[str, list[int]]] = {}
    labels: dict[str, dict[str, int]] = {}
    cur_code = cur_info = None
    attr = None
    src = None
    sub = False
    pending: list[str] = []
    for line in text.splitlines():
        m = _SECTION_TEXT.match(line)
        if m:
            cur_code, cur_info, attr, src, sub = m.group(1), None, None, None, False
            code[cur_code], labels[cur_code], pending = [], {}, []
            continue
        m = _SECTION_INFO.match(line)
        if m:
            cur_code, cur_info, attr = None, m.group(1), None
            info.setdefault(cur_info, {})
            continue
        if _SECTION_ANY.match(line):
            cur_code = cur_info = attr = None
            continue
        if cur_info is not None:
            m = _ATTR.search(line)
            if m:
                attr = m.group(1)
                info[cur_info].setdefault(attr, [])
                continue
            m = _WORD.search(line)
            if m and attr is not None:
                info[cur_info][attr].append(int(m.group(1), 16))
            continue
        if cur_code is None:
            continue
        m = _LINE.match(line)
        if m:
            src = (m.group(1), int(m.group(2)))
            continue
        m = _LABEL.match(line)
        if m:
            if m.group(1).startswith("$"):
                sub = True
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            ins = Instr(int(m.group(1), 16), m.group(3), (m.group(2) or "").strip(), m.group(4).strip(), src, sub)
            for lab in pending:
                labels[cur_code][lab] = ins.addr
            pending = []
            code[cur_code].append(ins)
    return code, info, labels


def _project_file(path: str) -> bool:
    return "/csrc/" in path.replace(os.sep, "/") or not os.path.isabs(path)


def loop_source(instrs: list[Instr], lp: Loop) -> Optional[tuple[str, int]]:
    """(file, line) of a loop: its back-edge's source line when that is tsparse's own code, else
    the last line of tsparse's code in the body (a back-edge inlined from a CUDA header)."""
    body = [i for i in instrs if lp.head <= i.addr <= lp.end and i.src]
    for ins in reversed(body):
        if _project_file(ins.src[0]):
            return ins.src
    return body[-1].src if body else None


_SOURCE_CACHE: dict[str, Optional[list[str]]] = {}


def source_line(path: str, line: int) -> Optional[str]:
    """The text of a source line named by the line info (None when the file is not here: an
    extension built elsewhere). Paths are tried as recorded, then under this repository."""
    if path not in _SOURCE_CACHE:
        lines = None
        cands = [path]
        if "/csrc/" in path:
            cands.append(os.path.join(ROOT, "csrc", path.split("/csrc/", 1)[1]))
        for cand in cands:
            try:
                with open(cand, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
                break
            except OSError:
                continue
        _SOURCE_CACHE[path] = lines
    lines = _SOURCE_CACHE[path]
    if lines is None or not 1 <= line <= len(lines):
        return None
    return lines[line - 1].strip()


_BRANCH = ("BRA", "JMP", "BRX")
_ENDS = ("EXIT", "RET", "BRX", "JMP")


def dominators(instrs: list[Instr], labels: dict[str, int]) -> tuple[list[int], list[set[int]]]:
    """Basic blocks of a function (the index of each instruction's block) and each block's
    dominators. Every block without a predecessor (the entry, the local subroutines that CALL
    reaches) hangs off one virtual root, so a block dominated only through the root is dominated
    by no real block."""
    n = len(instrs)
    targets = {a for a in labels.values()}
    lead = [False] * n
    for k, ins in enumerate(instrs):
        if k == 0 or ins.addr in targets:
            lead[k] = True
        if ins.base in _BRANCH or ins.base in _ENDS:
            if k + 1 < n:
                lead[k + 1] = True
    block_of, starts = [0] * n, []
    for k in range(n):
        if lead[k]:
            starts.append(k)
        block_of[k] = len(starts) - 1
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    nb = len(starts)
    succ: list[set[int]] = [set() for _ in range(nb)]
    for b in range(nb):
        last = (starts[b + 1] if b + 1 < nb else n) - 1
        ins = instrs[last]
        falls = True
        if ins.base in _BRANCH:
            t = _TARGET.search(ins.args)
            if t and t.group(1) in labels and labels[t.group(1)] in index:
                succ[b].add(block_of[index[labels[t.group(1)]]])
            # unconditional: no predicate, no predicate operand (`BRA P1, target`), not BRA.DIV
            falls = bool(ins.pred) or "," in ins.args.split("`")[0] or ".DIV" in ins.op or ins.base != "BRA"
            if ins.base in ("JMP", "BRX"):
                falls = bool(ins.pred)
        elif ins.base in ("EXIT", "RET"):
            falls = bool(ins.pred)
        if falls and b + 1 < nb:
            succ[b].add(b + 1)
    preds: list[set[int]] = [set() for _ in range(nb)]
    for b in range(nb):
        for c in succ[b]:
            preds[c].add(b)
    root = nb  # virtual
    roots = {b for b in range(nb) if not preds[b]} | {0}
    full = set(range(nb + 1))
    dom: list[set[int]] = [set(full) for _ in range(nb)]
    for b in roots:
        dom[b] = {b, root}
    changed = True
    while changed:
        changed = False
        for b in range(nb):
            if b in roots:
                continue
            ps = [dom[p] for p in preds[b]]
            new = set.intersection(*ps) | {b} if ps else {b, root}
            if new != dom[b]:
                dom[b], changed = new, True
    return block_of, dom


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Loops by back-edge: a branch to a label at or before the branch whose block that label's
    block dominates (a natural loop; the out-of-line fallback of a divergent shuffle, BRA.DIV,
    jumps back into the main code without being a loop). Back-edges to the same label merge into
    one loop [label, last back-edge]; a loop with no other loop inside is innermost."""
    by_head: dict[int, Loop] = {}
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    block_of, dom = dominators(instrs, labels) if instrs else ([], [])
    for k, ins in enumerate(instrs):
        if ins.base not in _BRANCH:
            continue
        t = _TARGET.search(ins.args)
        if not t or t.group(1) not in labels:
            continue
        head = labels[t.group(1)]
        if head > ins.addr or head not in index:
            continue
        if block_of[index[head]] not in dom[block_of[k]]:
            continue
        lp = by_head.get(head)
        if lp is None:
            by_head[head] = Loop(head, ins.addr, t.group(1))
        elif ins.addr > lp.end:
            lp.end = ins.addr
    loops = sorted(by_head.values(), key=lambda lp: (lp.head, -lp.end))
    for lp in loops:
        where = loop_source(instrs, lp)
        if where:
            lp.src = f"{os.path.basename(where[0])}:{where[1]}"
            lp.code = source_line(where[0], where[1])
    for lp in loops:
        lp.innermost = not any(lp.contains(o) for o in loops)
    return loops


def count(instrs: Iterable[Instr]) -> dict:
    """Counts of what a stretch of SASS does (the same keys for a kernel and for a loop body)."""
    c = {"instr": 0, "ldg": {}, "stg": {}, "ld": {}, "st": {}, "atom": 0, "lds": 0, "sts": 0, "ldl": 0, "stl": 0,
         "mufu": {}, "bssy": 0, "bra": 0, "bar": 0, "cga_arv": 0, "cga_wait": 0, "first_stg": None,
         "last_ldg": None}
    for i, ins in enumerate(instrs):
        b = ins.base
        if b == "NOP":
            continue
        c["instr"] += 1
        if b == "LDG":
            w = str(access_width(ins.op))
            c["ldg"][w] = c["ldg"].get(w, 0) + 1
            c["last_ldg"] = c["instr"]
        elif b == "STG":
            w = str(access_width(ins.op))
            c["stg"][w] = c["stg"].get(w, 0) + 1
            if c["first_stg"] is None:
                c["first_stg"] = c["instr"]
        elif b in ("LD", "ST"):  # generic-address accesses (the compiler lost the global space)
            w = str(access_width(ins.op))
            key = b.lower()
            c[key][w] = c[key].get(w, 0) + 1
            if b == "LD":
                c["last_ldg"] = c["instr"]
            elif c["first_stg"] is None:
                c["first_stg"] = c["instr"]
        elif b in ("ATOMG", "RED", "REDG", "ATOM"):
            c["atom"] += 1
        elif b == "LDS":
            c["lds"] += 1
        elif b == "STS":
            c["sts"] += 1
        elif b == "LDL":
            c["ldl"] += 1
        elif b == "STL":
            c["stl"] += 1
        elif b == "MUFU":
            k = ins.op.split(".")[1] if "." in ins.op else "?"
            c["mufu"][k] = c["mufu"].get(k, 0) + 1
        elif b == "BSSY":
            c["bssy"] += 1
        elif b in ("BRA", "BRX", "JMP"):
            c["bra"] += 1
        elif b == "BAR":
            c["bar"] += 1
        elif b == "UCGABAR_ARV":  # barrier.cluster.arrive (thread-block cluster)
            c["cga_arv"] += 1
        elif b == "UCGABAR_WAIT":  # barrier.cluster.wait
            c["cga_wait"] += 1
    return c


_ELEM_BYTES = {"__nv_bfloat16": 2, "__half": 2, "float": 4, "double": 8}
_COPY_UNITS = {"uint4", "uint2", "unsigned int", "unsigned short", "unsigned char"}


def template_args(name: str) -> list[str]:
    """Top-level template arguments of a demangled kernel name ('f<a, b<c>, d>(...)' -> [a, b<c>, d])."""
    head = name.split("(", 1)[0]
    if "<" not in head:
        return []
    body = head[head.index("<") + 1: head.rindex(">")]
    out, depth, cur = [], 0, ""
    for ch in body:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def element_bytes(name: str) -> Optional[int]:
    """The data element size a kernel's per-element counts use (see the module docstring)."""
    args = template_args(name)
    if not args:
        return None
    if args[0] in _ELEM_BYTES:
        return _ELEM_BYTES[args[0]]
    if args[0] in _COPY_UNITS:
        return 2  # byte movers: counted per bf16 element
    return None


def longest_path(body: list[Instr], head: int, labels: dict[str, int]) -> list[Instr]:
    """The instructions of the longest path through one trip of an innermost loop: from its head
    to a back-edge, following fall-throughs and forward branches inside the body (a branch out of
    the body, an EXIT or a CALL - tsparse calls only its noinline failure reporters, which trap -
    ends a path that does not trip again). For a branch-free body this is the whole body; with an
    if/else inside (e.g. two versions of an element computation) it takes the longer side instead
    of both, so it is what one trip executes at most."""
    n = len(body)
    index = {ins.addr: k for k, ins in enumerate(body)}
    best: list[Optional[tuple[int, int]]] = [None] * n   # (instructions so far, predecessor index)
    best[0] = (0 if body[0].base == "NOP" else 1, -1)
    end_at, end_len = None, -1
    for k, ins in enumerate(body):
        if best[k] is None:
            continue
        succ = []
        b = ins.base
        if b in ("BRA", "JMP"):
            t = _TARGET.search(ins.args)
            taddr = labels.get(t.group(1)) if t else None
            if taddr == head:
                if best[k][0] > end_len:
                    end_at, end_len = k, best[k][0]
            elif taddr is not None and taddr in index and taddr > ins.addr:
                succ.append(index[taddr])
            if ins.pred:
                succ.append(k + 1)
        elif b in ("EXIT", "RET", "BRX"):
            if ins.pred:
                succ.append(k + 1)
        elif b == "CALL":
            # a call inside a tsparse loop is a failure reporter (printf, then trap): not a trip
            if ins.pred:
                succ.append(k + 1)
        else:
            succ.append(k + 1)
        for j in succ:
            if j < n:
                cand = best[k][0] + (0 if body[j].base == "NOP" else 1)
                if best[j] is None or cand > best[j][0]:
                    best[j] = (cand, k)
    if end_at is None:
        return body
    path, k = [], end_at
    while k >= 0:
        path.append(body[k])
        k = best[k][1]
    return path[::-1]


def loop_stats(instrs: list[Instr], lp: Loop, elem: Optional[int], labels: Optional[dict[str, int]] = None) -> dict:
    body = [i for i in instrs if lp.head <= i.addr <= lp.end]
    c = count(body)
    path = longest_path(body, lp.head, labels or {})
    pc = count(path)
    c["body_instr"] = c["instr"]
    c["instr"] = pc["instr"]           # per trip: the longest path (== the body without inner branches)
    c["path_bra"] = pc["bra"]
    wide_ld = pc["ldg"].get("128", 0)
    wide_st = pc["stg"].get("128", 0)
    per_trip = None
    basis = None
    if elem and wide_ld:
        per_trip, basis = wide_ld * 16 // elem, "128-bit loads"
    elif elem and wide_st:
        per_trip, basis = wide_st * 16 // elem, "128-bit stores"
    c["elems_per_trip"] = per_trip
    c["elems_basis"] = basis
    c["instr_per_elem"] = round(c["instr"] / per_trip, 2) if per_trip else None
    c["loads_before_stores"] = (c["first_stg"] is None or c["last_ldg"] is None
                                or c["last_ldg"] < c["first_stg"])
    return c


def short_name(demangled: str) -> str:
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    s = s.replace("tsparse::cuda::(anonymous namespace)::", "").replace("tsparse::cuda::", "")
    # drop the parameter list (the template arguments stay)
    depth = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return s[:i]
    return s


@dataclass
class Kernel:
    name: str                   # short demangled name
    mangled: str
    cubin: str
    block: Optional[int] = None
    regs: int = 0
    stack: int = 0
    local: int = 0
    smem: int = 0
    occ: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    loops: list = field(default_factory=list)   # innermost loops touching global memory
    hot: Optional[dict] = None
    hot_from: str = "heuristic"                  # or "spec (<family>)": sass_spec names the loop
    main: dict = field(default_factory=dict)      # load/store order on the main path
    ldl_stl_in_loops: int = 0
    elem_bytes: Optional[int] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def analyze_function(name: str, mangled: str, cubin: str, instrs: list[Instr], labels: dict[str, int],
                     info: dict[str, list[int]], res: dict[str, int]) -> Kernel:
    k = Kernel(name=name, mangled=mangled, cubin=cubin)
    mt = info.get("EIATTR_MAX_THREADS")
    if mt:
        k.block = mt[0] * (mt[1] if len(mt) > 1 else 1) * (mt[2] if len(mt) > 2 else 1)
    k.regs, k.stack, k.local, k.smem = res.get("REG", 0), res.get("STACK", 0), res.get("LOCAL", 0), res.get("SHARED", 0)
    if k.block:
        k.occ = occupancy(k.block, k.regs, k.smem)
    main = [i for i in instrs if not i.sub]
    k.totals = count(main)
    k.totals["sub_instr"] = len(instrs) - len(main)
    k.elem_bytes = element_bytes(name)
    loops = find_loops(instrs, labels)
    # LDL/STL inside any loop (nested loops overlap: each instruction counts once)
    in_loop = [i for i in instrs if any(lp.head <= i.addr <= lp.end for lp in loops)]
    k.ldl_stl_in_loops = sum(1 for i in in_loop if i.base in ("LDL", "STL"))
    for lp in loops:
        if not lp.innermost:
            continue
        st = loop_stats(instrs, lp, k.elem_bytes, labels)
        if not st["ldg"] and not st["stg"]:
            continue
        k.loops.append({"label": lp.label, "src": lp.src, "code": lp.code, "head": lp.head, "end": lp.end, **st})
    if k.loops:
        # streaming loops first (128-bit loads), then 128-bit stores (a zero fill), then any access
        def weight(lp):
            return (lp["ldg"].get("128", 0), lp["stg"].get("128", 0),
                    sum(lp["ldg"].values()) + sum(lp["stg"].values()), lp["instr"])
        k.hot = max(k.loops, key=weight)
    k.main = main_path_stats(instrs, loops)
    return k


def main_path_stats(instrs: list[Instr], loops: list[Loop]) -> dict:
    """Load/store order on the kernel's main path: the code outside every loop when it stores to
    global memory (a one-thread-per-item kernel; a rare fallback loop stays out), else the body
    of the first outermost loop that stores (one trip of a grid-stride or chunk loop, nested
    loops included). Failure subroutines are left out."""
    main = [i for i in instrs if not i.sub]
    stores = ("STG", "ST")
    flat = [i for i in main if not any(lp.head <= i.addr <= lp.end for lp in loops)]
    body, scope = flat, "outside loops"
    if not any(i.base in stores for i in flat):
        for lp in (lp for lp in loops if not any(o.contains(lp) for o in loops)):
            inside = [i for i in main if lp.head <= i.addr <= lp.end]
            if any(i.base in stores for i in inside):
                body, scope = inside, f"loop {lp.src or lp.label}"
                break
    c = count(body)
    return {"scope": scope, "instr": c["instr"], "ldg": c["ldg"], "stg": c["stg"],
            "loads_before_stores": c["first_stg"] is None or c["last_ldg"] is None or c["last_ldg"] < c["first_stg"]}


# ---------------------------------------------------------------------------------------------
# Tools and the extension
def find_tool(name: str) -> str:
    """cuobjdump / nvdisasm: the pinned nvidia-cuda-<name> wheel, else a CUDA toolkit's copy."""
    env = os.environ.get(f"TSPARSE_{name.upper()}")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise ReportError(f"TSPARSE_{name.upper()}={env} is not an executable")
    try:
        dist = importlib.metadata.distribution(f"nvidia-cuda-{name}")
        for f in dist.files or []:
            if str(f).endswith(f"bin/{name}"):
                p = str(dist.locate_file(f))
                if os.access(p, os.X_OK):
                    return p
    except importlib.metadata.PackageNotFoundError:
        pass
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home:
            p = os.path.join(home, "bin", name)
            if os.access(p, os.X_OK):
                return p
    raise ReportError(f"{name} not found: install the dev extra (pip install nvidia-cuda-{name}==13.2.86, "
                      f"pinned in requirements/dev.lock) or set TSPARSE_{name.upper()}")


def find_extension(root: str = ROOT) -> str:
    libs = sorted(glob.glob(os.path.join(root, "tsparse", "_C*.so")) + glob.glob(os.path.join(root, "tsparse", "_C*.pyd")))
    if not libs:
        raise ReportError(f"no built extension under {os.path.join(root, 'tsparse')} (run `make build`)")
    return max(libs, key=os.path.getmtime)


def _run(cmd: list[str], cwd: Optional[str] = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise ReportError(f"{os.path.basename(cmd[0])} failed on {cmd[-1]}: "
                          f"{(r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else r.returncode}")
    return r.stdout


def demangle(names: list[str]) -> dict[str, str]:
    exe = shutil.which("c++filt")
    if not exe or not names:
        return {n: n for n in names}
    r = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    if r.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


_RES = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RES_VALS = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = _RES.match(line)
        if m:
            cur = m.group(1).rstrip(":")
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in _RES_VALS.findall(line)}
            cur = None
    return out


def analyze(lib: Optional[str] = None, name_filter: Optional[str] = None) -> list[Kernel]:
    lib = lib or find_extension()
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if lib.endswith(".cubin"):  # one compiled translation unit (nvcc -cubin): a quick look while editing
        cubins = [lib]
    else:
        listing = subprocess.run([cuobjdump, "-lelf", lib], capture_output=True, text=True)
        cubins = re.findall(r"ELF file\s+\d+:\s+(\S+\.cubin)", listing.stdout)
    if not cubins:
        raise ReportError(f"{os.path.basename(lib)} has no CUDA device code (built without CUDA: "
                          "TSPARSE_CUDA=0 or a CPU-only torch); nothing to report")
    kernels: list[Kernel] = []
    with tempfile.TemporaryDirectory(prefix="tsparse_sass_") as tmp:
        if not lib.endswith(".cubin"):
            _run([cuobjdump, "-xelf", "all", os.path.abspath(lib)], cwd=tmp)
        for cubin in cubins:
            path = cubin if lib.endswith(".cubin") else os.path.join(tmp, cubin)
            if not os.path.exists(path):
                raise ReportError(f"cuobjdump did not extract {cubin} from {lib}")
            res = parse_res_usage(_run([cuobjdump, "-res-usage", path]))
            code, info, labels = parse_functions(_run([nvdisasm, "-g", path]))
            names = demangle(list(code))
            for mangled, instrs in code.items():
                full = names.get(mangled, mangled)
                if "tsparse" not in full:
                    continue
                name = short_name(full)
                if name_filter and not re.search(name_filter, name):
                    continue
                kernels.append(analyze_function(name, mangled, os.path.basename(cubin).split(".")[0], instrs, labels[mangled],
                                                info.get(mangled, {}), res.get(mangled, {})))
    _hot_from_spec(kernels)
    kernels.sort(key=lambda k: (k.cubin, k.name))
    return kernels


def _hot_from_spec(kernels: list[Kernel]) -> None:
    """A family of profiling/sass_spec.py may name its hot loop (hot_loop: a regex on the loop's
    source line); the report then shows that loop instead of its own pick."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sass_spec

    for k in kernels:
        for fam in sass_spec.families_for(k.name):
            if fam.hot_loop:
                named = [lp for lp in k.loops if lp.get("code") and re.search(fam.hot_loop, lp["code"])]
                if named:
                    k.hot = named[0]
                    k.hot_from = f"spec ({fam.name})"
                break


# ---------------------------------------------------------------------------------------------
# Output
def _widths(d: dict) -> str:
    return "/".join(str(d.get(w, 0)) for w in ("8", "16", "32", "64", "128"))


def _mufu(d: dict) -> str:
    return ",".join(f"{k}{v}" for k, v in sorted(d.items())) or "-"


def table(kernels: list[Kernel], loops: bool = False) -> str:
    hdr = ["kernel", "blk", "regs", "stack", "spill", "smem", "CTA/SM", "occ%", "LDG 8/16/32/64/128",
           "STG 8/16/32/64/128", "MUFU", "BSSY", "BRA", "LDL+STL (loop)", "hot loop", "instr/trip", "elem/trip",
           "instr/elem", "ld<st"]
    rows = []
    for k in kernels:
        t, h = k.totals, k.hot or {}
        rows.append([
            k.name, str(k.block or "?"), str(k.regs), str(k.stack), str(k.local), str(k.smem),
            str(k.occ.get("ctas", "-")), f"{k.occ['pct']:.0f}" if k.occ else "-",
            _widths(t["ldg"]), _widths(t["stg"]), _mufu(t["mufu"]), str(t["bssy"]), str(t["bra"]),
            f"{t['ldl'] + t['stl']} ({k.ldl_stl_in_loops})",
            h.get("src") or "-", str(h.get("instr", "-")), str(h.get("elems_per_trip") or "-"),
            str(h.get("instr_per_elem") or "-"), ("yes" if h.get("loads_before_stores") else "no") if h else "-",
        ])
        if loops:
            for lp in k.loops:
                rows.append([
                    f"  loop {lp['src'] or lp['label']}", "", "", "", "", "", "", "",
                    _widths(lp["ldg"]), _widths(lp["stg"]), _mufu(lp["mufu"]), str(lp["bssy"]), str(lp["bra"]),
                    str(lp["ldl"] + lp["stl"]), lp["label"], str(lp["instr"]), str(lp["elems_per_trip"] or "-"),
                    str(lp["instr_per_elem"] or "-"), "yes" if lp["loads_before_stores"] else "no",
                ])
    widths = [max(len(r[i]) for r in rows + [hdr]) for i in range(len(hdr))]
    fmt = lambda r: "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
    return "\n".join([fmt(hdr), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--lib", help="the extension to read (default: the newest tsparse/_C*.so), or one .cubin")
    p.add_argument("--filter", help="regex on the kernel name")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--loops", action="store_true", help="list every innermost loop that touches global memory")
    p.add_argument("--check", action="store_true", help="check the compile-time spec (profiling/sass_spec.py)")
    a = p.parse_args(argv)
    try:
        kernels = analyze(a.lib, a.filter)
    except ReportError as exc:
        print(f"sass_report: {exc}", file=sys.stderr)
        return 2
    checks = []
    if a.check or a.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import sass_spec

        checks = sass_spec.check_all(kernels)
    if a.json:
        print(json.dumps({"lib": os.path.basename(a.lib or find_extension()), "sm": "sm_90a",
                          "kernels": [k.as_dict() for k in kernels], "checks": checks}, indent=1))
    else:
        print(table(kernels, loops=a.loops))
    if a.check:
        bad = [c for c in checks if c["status"] in ("FAIL", "fixed")]
        if not a.json:
            print()
            for c in checks:
                print(f"{c['status']:5}  {c['family']:24} {c['property']:11} {c['detail']}")
            free = sass_spec.uncovered(kernels)
            if free:
                print(f"no spec family for {len(free)} kernels: {', '.join(sorted(set(free))[:6])}"
                      f"{' ...' if len(set(free)) > 6 else ''}")
            print(f"spec: {sum(c['status'] == 'ok' for c in checks)} ok, "
                  f"{sum(c['status'] == 'gap' for c in checks)} known gaps, "
                  f"{sum(c['status'] == 'FAIL' for c in checks)} failed, "
                  f"{sum(c['status'] == 'fixed' for c in checks)} gaps now met (remove them from sass_spec.py)")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
