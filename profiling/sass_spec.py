"""The compile-time properties each tsparse kernel's design relies on, as one table.

One ``Family`` per kernel family (a regex over the short demangled names that
profiling/sass_report.py prints). python_tests/test_sass.py turns every (family, property)
pair into a test against the built extension, and ``sass_report.py --check`` prints the same
verdicts. To add a family (the GRPO kernels, a new op), append a row to ``FAMILIES``; nothing
else changes.

Properties (a family checks those it sets):
  block        the launcher's block size; must equal the kernel's ``__launch_bounds__`` (the
               report's block column, which occupancy is computed at).
  min_ctas     the intended occupancy: registers and shared memory must let at least this many
               CTAs of ``block`` threads reside on one sm_90 SM.
  no_local     no LDL / STL inside any loop that touches global memory (spills or stack arrays
               in a hot loop). Always checked.
  wide_loads   the hot loop's global loads are 128-bit, except at most ``narrow_per_wide``
               narrower loads (indices) per 128-bit load.
  wide_stores  every global store of the kernel's main body is a 128-bit STG (no narrower
               STG, no generic ST; the failure subroutines are left out).
  hot_order    in one trip of the hot loop, every global load is issued before the first store.
  main_order   the same on the kernel's main path (one trip of the outermost storing loop, or the
               straight-line code when nothing loops; see sass_report.main_path_stats).
  max_ipe      the hot loop's SASS instructions per element (see sass_report for how elements
               per trip are derived) must not exceed this.
  wide_loop_stores  every innermost loop that stores to global memory and loads nothing narrower
               than 128 bits stores only 128-bit (the 16-byte row paths; a documented element-wise
               fallback loop, whose loads are narrow too, is left out).
  cluster_barriers  the kernel arrives at and waits on thread-block-cluster barriers
               (UCGABAR_ARV / UCGABAR_WAIT, at least twice each: publish the CTAs' shared state,
               then keep every CTA's shared memory alive until the cluster's remote reads are done).
The hot loop is the report's (the innermost loop with the most 128-bit loads per trip) unless
``hot_loop`` names it: a regex searched in the source text of each loop's back-edge line (the
report reads it through the line info), e.g. ``r"i < end"`` for ``for (...; i < end; ++i)``.

A property the kernel does not meet YET goes in ``gaps`` with the measured "before" value and
the step that fixes it: its test is an expected failure (``xfail(strict=True)``), so it starts
to fail - and the gap must be removed - the moment the code meets the target. The bar is never
lowered to make a test pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

PROPERTIES = ("block", "min_ctas", "no_local", "wide_loads", "wide_stores", "hot_order", "main_order", "max_ipe",
              "wide_loop_stores", "cluster_barriers")

# 16-byte instantiations of the dtype-templated row kernels: VEC * sizeof(T) == 16.
_VEC16 = r"(__nv_bfloat16, 8|__half, 8|float, 4|double, 2)"


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str                     # re.search over the short kernel name
    why: str
    block: Optional[int] = None
    min_ctas: Optional[int] = None
    wide_loads: bool = False
    narrow_per_wide: float = 0.0
    wide_stores: bool = False
    hot_order: bool = False
    main_order: bool = False
    max_ipe: Optional[float] = None
    hot_loop: Optional[str] = None   # regex on the hot loop's source line (default: the report's pick)
    wide_loop_stores: bool = False
    cluster_barriers: bool = False
    gaps: dict = field(default_factory=dict)   # property -> "before: ...; fixed by ..."

    def checked(self) -> list[str]:
        out = []
        if self.block is not None:
            out.append("block")
        if self.min_ctas is not None:
            out.append("min_ctas")
        out.append("no_local")
        for p in ("wide_loads", "wide_stores", "hot_order", "main_order"):
            if getattr(self, p):
                out.append(p)
        if self.max_ipe is not None:
            out.append("max_ipe")
        for p in ("wide_loop_stores", "cluster_barriers"):
            if getattr(self, p):
                out.append(p)
        return out


FAMILIES: list[Family] = [
    # ---- visual tokens: row movers (csrc/cuda/visual_tokens_kernels.cu) -------------------------
    Family(
        "row copy 16 B", r"^compose_copy_kernel<uint4, ",
        "gather / scatter / unique-index gather backward: bf16 rows of D = 3584 move as 16-byte units, "
        "4 in flight per lane, all 4 loads before the stores; 4 CTAs of 256 threads = 64 KB in flight per "
        "SM (anchors: 32-128 KB); 32-bit in-row offsets: one IMAD.WIDE.U32 per access, <= 32 instructions "
        "per 64-byte lane trip (the 64-bit offsets of the first build took 88: 2.75 per bf16 element)",
        block=256, min_ctas=4, wide_loads=True, wide_stores=True, hot_order=True, max_ipe=1.0),
    Family(
        "row copy, any width", r"^compose_copy_kernel<",
        "the narrower units (8/4/2/1 B) of the same copy: sliced or odd-width rows",
        block=256, min_ctas=4),
    Family(
        "scaled rows 16 B", rf"^compose_scaled_kernel<{_VEC16}, ",
        "token-fusion backward: out[r] = src[map[r]] * scale; 16-byte loads, fp32 scale, each 16-byte result "
        "built as one uint4 and stored by one STG.E.128 (the first build split it into four 32-bit STG.E)",
        block=256, min_ctas=4, wide_loads=True, wide_stores=True, hot_order=True),
    Family(
        "segment reduce 16 B", rf"^segment_(reduce|pieces)_kernel<{_VEC16}, ",
        "fusion pooling / non-unique gather backward: fp32 sums of 16-byte packs over a segment's members, "
        "one int64 member index per pack, 4 members' indices checked together and their packs loaded "
        "before any is added; long segments summed in pieces by many CTAs (segment_plan.h); 16-byte results "
        "and fp32 partials stored as whole uint4s",
        block=256, min_ctas=4, wide_loads=True, narrow_per_wide=1.0, wide_stores=True,
        hot_loop=r"i \+ M <= i1"),
    Family(
        "row norms 16 B", rf"^row_inv_norms_kernel<{_VEC16}>",
        "fusion similarity: one warp per row, 16-byte loads, a shuffle reduction",
        block=256, min_ctas=4, wide_loads=True),
    Family(
        "row kernels, any width",
        r"^(compose_scaled|segment_reduce|segment_pieces|row_inv_norms|build_inverse)_kernel<",
        "every instantiation: the launch bound the launchers use, no local memory in a loop",
        block=256, min_ctas=4),
    Family(
        "box mask", r"^box_mask_kernel",
        "one CTA of 256 threads per image; boxes staged in shared memory",
        block=256, min_ctas=2),
    Family(
        "box plan", r"^box_plan_kernel<",
        "the per-image table planned on the device when the metadata lives on the GPU: one block",
        block=1024, min_ctas=1),
    # ---- varlen (csrc/cuda/varlen_kernels.cu) ------------------------------------------------------
    Family(
        "varlen pack", r"^pack_kernel<",
        "a (chunks, B) grid, one thread per token: mask, keep, id and up to 4 position rows read, then "
        "indices / inverse / ids / labels / positions written; every load is issued before the first store "
        "(restrict-qualified locals; the first build loaded the position rows after the index stores)",
        block=512, min_ctas=2, main_order=True),
    Family(
        "varlen counts", r"^(seqlens_kernel<|chunk_counts_kernel<|scan_kernel)",
        "per-row and per-chunk counts (512 threads) and the single-block scan (1024 threads)",
        min_ctas=1),
    # ---- GRPO (csrc/cuda/grpo_kernels.cu, grpo_fused_kernels.cu; issue 12 steps 2 and 3) ----------
    Family(
        "grpo forward 16-bit, wide rows", r"^logprobs_fwd_cta_kernel<(__nv_bfloat16|__half), 512, ",
        "log-probs (+ entropy) in one read, V > 32,768: branch-free online log-sum-exp in base 2 (one FFMA "
        "x * c - m, one ex2.approx.ftz per logit), 4 x 16 B in flight per thread, 3 CTAs of 512 threads per SM "
        "(96 KB in flight); issue 12: <= 10 SASS instructions per element (5.0, 7.1 with the entropy)",
        block=512, min_ctas=3, wide_loads=True, max_ipe=10.0),
    Family(
        "grpo forward 16-bit, mid rows", r"^logprobs_fwd_cta_kernel<(__nv_bfloat16|__half), 128, ",
        "the same loop for V <= 32,768 (128-thread CTAs, 12 per SM)",
        block=128, min_ctas=12, wide_loads=True, max_ipe=10.0),
    Family(
        "grpo forward 16-bit, warp rows", r"^logprobs_fwd_warp_kernel<(__nv_bfloat16|__half), ",
        "the same loop for V <= 4,096 (a warp per row, 8 rows per 256-thread CTA)",
        block=256, min_ctas=6, wide_loads=True, max_ipe=10.0),
    Family(
        "grpo forward fp32", r"^logprobs_fwd_(cta|warp)_kernel<float, ",
        "fp32 logits: the same loop, 4 logits per 16-byte load",
        min_ctas=3, wide_loads=True, max_ipe=10.0),
    Family(
        "grpo backward 16-bit", r"^logprobs_bwd_(cta|warp)_kernel<(__nv_bfloat16|__half)",
        "d loss / d logits in one read + one write, optionally in place: branch-free (no compare per element: "
        "the target's owner rewrites it), 16-byte loads and stores on the row path (6.0 instructions per "
        "element, 8.0 with an entropy gradient); the element-wise loop for differently aligned in/out rows "
        "is the documented fallback",
        min_ctas=3, wide_loads=True, wide_loop_stores=True, hot_order=True, max_ipe=10.0),
    Family(
        "grpo backward fp32", r"^logprobs_bwd_(cta|warp)_kernel<float",
        "the same for fp32 logits",
        min_ctas=3, wide_loads=True, wide_loop_stores=True, hot_order=True, max_ipe=10.0),
    Family(
        "grpo single-read cluster 16-bit", r"^grpo_loss_cluster_kernel<(__nv_bfloat16|__half), 512, ",
        "single-read grpo_loss: one thread-block cluster per row, the row kept in shared memory "
        "(LDG.E.128 -> STS.128 while folding the state; LDS.128 -> STG.E.128 for the gradient), row "
        "statistics merged through distributed shared memory between two cluster barriers; 3 CTAs/SM "
        "(40 registers; the reference row's 76,032 B dynamic slices fit 3 per SM: grpo_layout.h)",
        block=512, min_ctas=3, wide_loads=True, wide_loop_stores=True, cluster_barriers=True, max_ipe=10.0),
    Family(
        "grpo single-read cluster, small rows and fp32", r"^grpo_loss_cluster_kernel<",
        "every instantiation (128-thread CTAs for slices <= 16 KB; fp32 logits at 64 registers)",
        min_ctas=2, wide_loads=True, wide_loop_stores=True, cluster_barriers=True, max_ipe=10.0),
    Family(
        "grpo upstream scale", r"^scale_rows_kernel<",
        "the single-read backward: x *= g, skipped on the device when g == 1; 16-byte loads and stores",
        block=256, min_ctas=8, wide_loads=True, wide_loop_stores=True, hot_order=True),
    Family(
        "grpo fp64 rows (tests only)", r"^logprobs_(fwd|bwd)_(cta|warp)_kernel<double",
        "fp64 logits exist for reference-precision tests: compiled with the registers they need (no "
        "launch-bound minimum), so nothing spills inside a loop",
        min_ctas=1),
    Family(
        "grpo token kernels", r"^grpo_token(_grads)?_kernel<",
        "one thread per token (per-token terms, two-pass coefficients)",
        block=256, min_ctas=4),
]


def families_for(name: str) -> list[Family]:
    return [f for f in FAMILIES if re.search(f.pattern, name)]


def _hot(k, family: Optional[Family] = None):
    if family is not None and family.hot_loop:
        for lp in k.loops:
            if lp.get("code") and re.search(family.hot_loop, lp["code"]):
                return lp
        return None
    return k.hot if isinstance(k.hot, dict) else None


def check(family: Family, prop: str, kernels: list) -> tuple[bool, str]:
    """(ok, detail) of one property over every kernel of one family. `kernels` are
    sass_report.Kernel objects (or anything with the same attributes)."""
    ks = [k for k in kernels if re.search(family.pattern, k.name)]
    if not ks:
        return False, f"no kernel matches {family.pattern!r} (renamed or not built?)"
    bad = []
    for k in ks:
        hot = _hot(k, family)
        if prop in ("wide_loads", "hot_order", "max_ipe") and hot is None:
            bad.append(f"{k.name}: no hot loop" + (f" whose source line matches {family.hot_loop!r}"
                                                   if family.hot_loop else " (no loop touches global memory)"))
            continue
        if prop == "block":
            if k.block != family.block:
                bad.append(f"{k.name}: __launch_bounds__ {k.block}, launcher uses {family.block}")
        elif prop == "min_ctas":
            ctas = (k.occ or {}).get("ctas", 0)
            if ctas < family.min_ctas:
                bad.append(f"{k.name}: {ctas} CTAs/SM at {k.regs} registers, {k.smem} B shared "
                           f"(limited by {(k.occ or {}).get('limiter')}), want >= {family.min_ctas}")
        elif prop == "no_local":
            for lp in k.loops:
                if lp["ldl"] or lp["stl"]:
                    bad.append(f"{k.name}: {lp['ldl']} LDL + {lp['stl']} STL in the loop at {lp['src']}")
        elif prop == "wide_loads":
            if hot is None or not hot["ldg"].get("128"):
                bad.append(f"{k.name}: no 128-bit load in the hot loop ({hot and hot['src']})")
            else:
                wide = hot["ldg"]["128"]
                narrow = sum(v for w, v in hot["ldg"].items() if w != "128")
                if narrow > family.narrow_per_wide * wide:
                    bad.append(f"{k.name}: {narrow} narrow loads per {wide} 128-bit loads in the loop at {hot['src']}")
        elif prop == "wide_stores":
            narrow = {w: v for w, v in k.totals["stg"].items() if w != "128" and v}
            generic = k.totals.get("st") or {}
            if narrow or generic or not k.totals["stg"].get("128"):
                bad.append(f"{k.name}: global stores by width {k.totals['stg']}"
                           f"{f', generic stores {generic}' if generic else ''} (want only 128-bit STG)")
        elif prop == "hot_order":
            if hot is None or not hot["loads_before_stores"]:
                bad.append(f"{k.name}: a load follows a store in the hot loop ({hot and hot['src']})")
        elif prop == "main_order":
            if not k.main.get("loads_before_stores", False):
                bad.append(f"{k.name}: a load follows a store on the main path ({k.main.get('scope')})")
        elif prop == "max_ipe":
            ipe = hot and hot.get("instr_per_elem")
            if ipe is None or ipe > family.max_ipe:
                bad.append(f"{k.name}: {ipe} instructions/element in the loop at {hot and hot['src']}, "
                           f"want <= {family.max_ipe}")
        elif prop == "wide_loop_stores":
            stored = 0
            for lp in k.loops:
                if not lp["stg"] or any(w != "128" and v for w, v in lp["ldg"].items()):
                    continue
                stored += 1
                narrow = {w: v for w, v in lp["stg"].items() if w != "128" and v}
                if narrow:
                    bad.append(f"{k.name}: stores by width {lp['stg']} in the loop at {lp['src']} (want only 128-bit)")
            if not stored:
                bad.append(f"{k.name}: no loop stores to global memory")
        elif prop == "cluster_barriers":
            arv, wait = k.totals.get("cga_arv", 0), k.totals.get("cga_wait", 0)
            if arv < 2 or wait < 2:
                bad.append(f"{k.name}: {arv} UCGABAR_ARV / {wait} UCGABAR_WAIT (want >= 2 each)")
        else:
            raise ValueError(f"unknown property {prop!r}")
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        return False, "; ".join(bad[:3]) + more
    return True, f"{len(ks)} kernels"


def check_all(kernels: list) -> list[dict]:
    """Every (family, property) verdict: status ok / gap (a known, recorded gap that still fails) /
    FAIL (an unexpected failure) / fixed (a recorded gap that now passes: remove it from `gaps`)."""
    out = []
    for fam in FAMILIES:
        for prop in fam.checked():
            ok, detail = check(fam, prop, kernels)
            if prop in fam.gaps:
                status = "fixed" if ok else "gap"
                detail = detail if ok else f"{detail} [{fam.gaps[prop]}]"
            else:
                status = "ok" if ok else "FAIL"
            out.append({"family": fam.name, "property": prop, "status": status, "detail": detail})
    return out


def uncovered(kernels: list) -> list[str]:
    """Kernels no family describes (only the universal no_local rule of the report applies)."""
    return [k.name for k in kernels if not families_for(k.name)]
