"""The SASS report (profiling/sass_report.py) and the compile-time spec of every kernel family
(profiling/sass_spec.py).

Two kinds of tests:
* the report's parser on canned nvdisasm text (always run): loop detection by back-edges,
  innermost loops, access widths, per-element counts, occupancy arithmetic;
* the spec against the BUILT extension: one test per (family, property). They need tsparse's
  CUDA kernels compiled in and cuobjdump + nvdisasm (the pinned dev wheels), and skip with the
  reason otherwise. A property a kernel does not meet yet is an expected failure with its
  "before" value (strict: the test fails once the code meets it, until the gap is removed).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

import tsparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "profiling"))

import sass_report  # noqa: E402
import sass_spec  # noqa: E402

# ---------------------------------------------------------------------------------------------
# A hand-written kernel in nvdisasm -g's format: a grid-stride row loop (.L_x_1) around an inner
# column loop (.L_x_3) with two 128-bit loads, a split store, an exp; a second innermost loop
# (.L_x_5) that only stores zeros 16 bytes at a time; a spill restore in the outer loop and a
# failure subroutine ($...fail) with its own STL and a backward branch that is not a loop of the
# kernel's main body.
CANNED = r"""
	.target	sm_90a
//--------------------- .text._Z6kernelI13__nv_bfloat16Li8EEvPT_ --------------------------
	.section	.text._Z6kernelI13__nv_bfloat16Li8EEvPT_,"ax",@progbits
	.align	128
_Z6kernelI13__nv_bfloat16Li8EEvPT_:
	//## File "/repo/csrc/cuda/k.cu", line 10
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   STL [R1], R0 ;
.L_x_1:
	//## File "/repo/csrc/cuda/k.cu", line 12
        /*0030*/                   LDG.E.64.CONSTANT R2, desc[UR4][R4.64] ;
        /*0040*/                   BSSY B0, `(.L_x_2) ;
        /*0050*/                   ISETP.GE.AND P0, PT, R2, RZ, PT ;
.L_x_3:
	//## File "/repo/csrc/cuda/k.cu", line 14
        /*0060*/                   LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*0070*/               @P1 LDG.E.EF.128 R12, desc[UR4][R6.64+0x200] ;
	//## File "/usr/local/cuda/targets/x86_64-linux/include/cuda_bf16.hpp", line 585
        /*0080*/                   IMAD.U32 R16, R8, 0x10000, RZ ;
        /*0090*/                   MUFU.EX2 R17, R16 ;
        /*00a0*/                   NOP ;
	//## File "/repo/csrc/cuda/k.cu", line 15
        /*00b0*/                   STG.E desc[UR4][R10.64], R17 ;
        /*00c0*/                   STG.E desc[UR4][R10.64+0x4], R17 ;
        /*00d0*/                   ISETP.GE.AND P0, PT, R3, R2, PT ;
	//## File "/repo/csrc/cuda/k.cu", line 13
        /*00e0*/              @!P0 BRA `(.L_x_3) ;
.L_x_2:
        /*00f0*/                   BSYNC B0 ;
.L_x_5:
	//## File "/repo/csrc/cuda/k.cu", line 20
        /*0100*/                   STG.E.128 desc[UR4][R10.64], RZ ;
        /*0110*/                   STG.E.128 desc[UR4][R10.64+0x200], RZ ;
        /*0120*/                   IADD3 R3, R3, 0x20, RZ ;
        /*0130*/               @P2 BRA `(.L_x_5) ;
        /*0140*/                   LDL R0, [R1] ;
        /*0150*/                   MUFU.RCP R9, R8 ;
	//## File "/repo/csrc/cuda/k.cu", line 12
        /*0160*/               @P3 BRA `(.L_x_1) ;
        /*0170*/                   CALL.REL.NOINC `($_Z6kernelI13__nv_bfloat16Li8EEvPT_$fail) ;
        /*0180*/                   EXIT ;
$_Z6kernelI13__nv_bfloat16Li8EEvPT_$fail:
.L_x_9:
        /*0190*/                   STL [R1+0x8], R2 ;
        /*01a0*/               @P0 BRA `(.L_x_9) ;
        /*01b0*/                   RET.REL.NODEC R20 `(_Z6kernelI13__nv_bfloat16Li8EEvPT_) ;
.L_x_10:
        /*01c0*/                   BRA `(.L_x_10);
        /*01d0*/                   NOP;
//--------------------- .nv.info._Z6kernelI13__nv_bfloat16Li8EEvPT_ --------------------------
	.section	.nv.info._Z6kernelI13__nv_bfloat16Li8EEvPT_,"",@"SHT_CUDA_INFO"
	.align	4
	//----- nvinfo : EIATTR_MAXREG_COUNT
	.align		4
        /*0000*/ 	.byte	0x03, 0x1b
        /*0002*/ 	.short	0x00ff
	//----- nvinfo : EIATTR_MAX_THREADS
	.align		4
.L_473:
        /*0004*/ 	.byte	0x04, 0x05
        /*0006*/ 	.short	(.L_475 - .L_474)
.L_474:
        /*0008*/ 	.word	0x00000100
        /*000c*/ 	.word	0x00000001
        /*0010*/ 	.word	0x00000001
//--------------------- .nv.constant0._Z6kernelI13__nv_bfloat16Li8EEvPT_ --------------------------
	.section	.nv.constant0._Z6kernelI13__nv_bfloat16Li8EEvPT_,"a",@progbits
	.align	4
"""
MANGLED = "_Z6kernelI13__nv_bfloat16Li8EEvPT_"
NAME = "kernel<__nv_bfloat16, 8>"


def _canned_kernel():
    code, info, labels = sass_report.parse_functions(CANNED)
    assert list(code) == [MANGLED]
    return sass_report.analyze_function(NAME, MANGLED, "k", code[MANGLED], labels[MANGLED], info[MANGLED],
                                        {"REG": 40, "STACK": 24, "SHARED": 0, "LOCAL": 0})


def test_parser_reads_instructions_labels_sources_and_launch_bounds():
    code, info, labels = sass_report.parse_functions(CANNED)
    instrs = code[MANGLED]
    assert [i.op for i in instrs[:3]] == ["LDC", "S2R", "STL"]
    assert labels[MANGLED][".L_x_3"] == 0x60 and labels[MANGLED][".L_x_5"] == 0x100
    pred = next(i for i in instrs if i.addr == 0x70)
    assert pred.pred == "@P1" and pred.op == "LDG.E.EF.128"
    assert next(i for i in instrs if i.addr == 0x90).src == ("/usr/local/cuda/targets/x86_64-linux/include/cuda_bf16.hpp", 585)
    assert [i.sub for i in instrs if i.addr >= 0x180] == [False, True, True, True, True, True]
    assert info[MANGLED]["EIATTR_MAX_THREADS"] == [256, 1, 1]


@pytest.mark.parametrize("op, bits", [("LDG.E", 32), ("LDG.E.128.CONSTANT", 128), ("STG.E.64", 64),
                                      ("LDG.E.U8.CONSTANT", 8), ("LDG.E.S16", 16), ("LDG.E.LTC128B.128", 128),
                                      ("LDG.E.LTC128B", 32)])
def test_access_width(op, bits):
    assert sass_report.access_width(op) == bits


def test_loops_found_by_back_edges_nested_and_innermost():
    code, _, labels = sass_report.parse_functions(CANNED)
    loops = sass_report.find_loops(code[MANGLED], labels[MANGLED])
    spans = {(lp.label, lp.head, lp.end, lp.innermost) for lp in loops}
    # .L_x_10 branches to itself (a trap loop in the subroutine area): a loop, but no memory access
    assert spans == {(".L_x_1", 0x30, 0x160, False), (".L_x_3", 0x60, 0xE0, True), (".L_x_5", 0x100, 0x130, True),
                     (".L_x_9", 0x190, 0x1A0, True), (".L_x_10", 0x1C0, 0x1C0, True)}
    src = {lp.label: lp.src for lp in loops}
    assert src[".L_x_3"] == "k.cu:13" and src[".L_x_1"] == "k.cu:12"


def test_kernel_analysis_counts_per_element_and_picks_the_streaming_loop():
    k = _canned_kernel()
    assert k.block == 256 and k.elem_bytes == 2
    assert k.occ == {"ctas": 6, "warps": 48, "pct": 75.0, "limiter": "regs"}
    hot = k.hot
    assert hot["label"] == ".L_x_3"  # 128-bit loads win over the larger 128-bit store count of .L_x_5
    # body 0x60..0xe0: 9 instructions, the NOP not counted; 2 x 16 B loads of bf16 = 16 elements
    assert hot["instr"] == 8 and hot["elems_per_trip"] == 16 and hot["instr_per_elem"] == 0.5
    assert hot["ldg"] == {"128": 2} and hot["stg"] == {"32": 2} and hot["mufu"] == {"EX2": 1}
    assert hot["loads_before_stores"] and hot["elems_basis"] == "128-bit loads"
    zero = next(lp for lp in k.loops if lp["label"] == ".L_x_5")
    assert zero["elems_per_trip"] == 16 and zero["elems_basis"] == "128-bit stores" and zero["instr_per_elem"] == 0.25
    # loops without global memory (.L_x_9 in the subroutine, .L_x_10) are not listed
    assert {lp["label"] for lp in k.loops} == {".L_x_3", ".L_x_5"}
    # kernel totals leave the failure subroutine out; LDL/STL inside loops: the LDL of the row
    # loop and the STL of the subroutine's loop (every loop counts, the main body's or not)
    assert k.totals["stg"] == {"32": 2, "128": 2} and k.totals["ldg"] == {"64": 1, "128": 2}
    assert k.totals["mufu"] == {"EX2": 1, "RCP": 1} and k.totals["bssy"] == 1 and k.totals["bra"] == 3
    assert k.totals["stl"] == 1 and k.totals["ldl"] == 1 and k.ldl_stl_in_loops == 2
    # main path = one trip of the row loop: its LDG.64 and 128-bit loads come before the first store
    assert k.main["scope"] == "loop k.cu:12" and k.main["loads_before_stores"]


BRANCHY = r"""
//--------------------- .text._Z1gPf --------------------------
	.section	.text._Z1gPf,"ax",@progbits
_Z1gPf:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   BSSY B0, `(.L_x_3) ;
        /*0030*/               @P0 BRA `(.L_x_2) ;
        /*0040*/                   FMUL R4, R4, R4 ;
        /*0050*/                   FMUL R5, R5, R5 ;
        /*0060*/                   FMUL R6, R6, R6 ;
        /*0070*/                   MUFU.EX2 R7, R7 ;
        /*0080*/                   BRA `(.L_x_3) ;
.L_x_2:
        /*0090*/                   FADD R4, R4, R4 ;
.L_x_3:
        /*00a0*/                   BSYNC B0 ;
        /*00b0*/               @P1 EXIT ;
        /*00c0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00d0*/               @P2 BRA `(.L_x_9) ;
        /*00e0*/               @P3 BRA `(.L_x_1) ;
        /*00f0*/                   EXIT ;
.L_x_9:
        /*0100*/                   BRA `(.L_x_9);
"""


def test_per_trip_count_follows_the_longest_path_not_both_sides_of_a_branch():
    code, info, labels = sass_report.parse_functions(BRANCHY)
    instrs = code["_Z1gPf"]
    loops = sass_report.find_loops(instrs, labels["_Z1gPf"])
    lp = next(lp for lp in loops if lp.label == ".L_x_1")
    assert (lp.head, lp.end, lp.innermost) == (0x10, 0xE0, True)
    st = sass_report.loop_stats(instrs, lp, 4, labels["_Z1gPf"])
    # body: 14 instructions; longest trip: LDG, BSSY, @P0 BRA, 3 FMUL, MUFU, BRA, BSYNC, @P1 EXIT,
    # STG, @P2 BRA, @P3 BRA = 13 (the one-instruction else side is skipped)
    assert st["body_instr"] == 14 and st["instr"] == 13
    assert st["elems_per_trip"] == 4 and st["instr_per_elem"] == 3.25 and st["mufu"] == {"EX2": 1}
    path = sass_report.longest_path([i for i in instrs if 0x10 <= i.addr <= 0xE0], 0x10, labels["_Z1gPf"])
    assert [i.addr for i in path] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0]


DIVERGENT = r"""
//--------------------- .text._Z1hPf --------------------------
	.section	.text._Z1hPf,"ax",@progbits
_Z1hPf:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, R2, PT ;
        /*0030*/              @!P0 BRA `(.L_x_1) ;
        /*0040*/                   BRA.DIV UR4, `(.L_x_9) ;
.L_x_2:
        /*0050*/                   SHFL.BFLY PT, R3, R2, 0x10, 0x1f ;
.L_x_3:
        /*0060*/                   STG.E desc[UR4][R4.64], R3 ;
        /*0070*/                   EXIT ;
.L_x_9:
        /*0080*/                   WARPSYNC.ALL ;
        /*0090*/                   SHFL.BFLY PT, R3, R2, 0x10, 0x1f ;
        /*00a0*/                   BRA `(.L_x_3) ;
"""


def test_a_divergence_fallback_that_jumps_back_is_not_a_loop():
    # BRA.DIV's out-of-line path rejoins the main code with a backward BRA; .L_x_3 does not
    # dominate it (it is reached from .L_x_9 without passing .L_x_3), so it is no loop. The
    # .L_x_1 back-edge is a real one.
    code, _, labels = sass_report.parse_functions(DIVERGENT)
    loops = sass_report.find_loops(code["_Z1hPf"], labels["_Z1hPf"])
    assert [(lp.label, lp.head, lp.end) for lp in loops] == [(".L_x_1", 0x10, 0x30)]
    main = sass_report.main_path_stats(code["_Z1hPf"], loops)
    assert main["scope"] == "outside loops" and main["stg"] == {"32": 1} and main["loads_before_stores"]


def test_loads_after_a_store_are_flagged():
    text = CANNED.replace("        /*00b0*/                   STG.E desc[UR4][R10.64], R17 ;",
                          "        /*00b0*/                   LDG.E R18, desc[UR4][R10.64] ;")
    text = text.replace("        /*0070*/               @P1 LDG.E.EF.128 R12, desc[UR4][R6.64+0x200] ;",
                        "        /*0070*/               @P1 STG.E.128 desc[UR4][R6.64+0x200], R12 ;")
    code, info, labels = sass_report.parse_functions(text)
    k = sass_report.analyze_function(NAME, MANGLED, "k", code[MANGLED], labels[MANGLED], info[MANGLED], {"REG": 32})
    assert k.hot["label"] == ".L_x_3" and not k.hot["loads_before_stores"] and not k.main["loads_before_stores"]
    assert k.hot["elems_per_trip"] == 8  # one 128-bit load left


@pytest.mark.parametrize("block, regs, smem, ctas, limiter", [
    (512, 40, 1420, 3, "regs"),      # the GRPO forward: ~3 CTAs/SM at 40 registers (profiling/NOTES.md)
    (512, 63, 1088, 2, "regs"),      # varlen pack: 2 CTAs/SM at 63 registers
    (256, 32, 0, 8, "warps"),        # full occupancy
    (256, 60, 0, 4, "regs"),         # 60 -> 64 registers per thread after the 256-register warp unit
    (1024, 28, 1156, 2, "warps"),
    (128, 31, 100_000, 2, "smem"),   # 2 x (100,000 + 1 KB reserved) of 228 KB
    (32, 16, 0, 32, "ctas"),
])
def test_occupancy_matches_the_sm90_limits(block, regs, smem, ctas, limiter):
    occ = sass_report.occupancy(block, regs, smem)
    assert occ["ctas"] == ctas and occ["limiter"] == limiter


def test_names_and_element_sizes():
    full = ("void tsparse::cuda::(anonymous namespace)::compose_copy_kernel<uint4, long>(uint4*, long, int, "
            "uint4 const*, long, long, long const*, bool, uint4 const*, long, int*, tsparse::cuda::OpTag, int)")
    assert sass_report.short_name(full) == "compose_copy_kernel<uint4, long>"
    assert sass_report.template_args("f<a, b<c, d>, 8>(x)") == ["a", "b<c, d>", "8"]
    assert sass_report.element_bytes("compose_copy_kernel<uint4, long>") == 2
    assert sass_report.element_bytes("segment_reduce_kernel<float, 4>") == 4
    assert sass_report.element_bytes("logprobs_fwd_cta_kernel<double, 512>") == 8
    assert sass_report.element_bytes("box_mask_kernel") is None


def test_res_usage_parser():
    text = """
Resource usage:
 Common:
  GLOBAL:705 CONSTANT[4]:144
 Function _Z1fv:
  REG:60 STACK:32 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z1gv:
  REG:24 STACK:0 SHARED:1088 LOCAL:8 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    res = sass_report.parse_res_usage(text)
    assert res["_Z1fv"]["REG"] == 60 and res["_Z1fv"]["STACK"] == 32
    assert res["_Z1gv"]["SHARED"] == 1088 and res["_Z1gv"]["LOCAL"] == 8


def test_table_and_spec_checks_on_the_canned_kernel():
    k = _canned_kernel()
    text = sass_report.table([k], loops=True)
    assert NAME in text and "k.cu:13" in text and "0.5" in text
    fam = sass_spec.Family("canned", r"^kernel<", "test", block=256, min_ctas=6, wide_loads=True,
                           wide_stores=True, hot_order=True, max_ipe=0.5)
    verdict = {p: sass_spec.check(fam, p, [k]) for p in fam.checked()}
    assert verdict["block"][0] and verdict["min_ctas"][0] and verdict["wide_loads"][0] and verdict["max_ipe"][0]
    assert verdict["hot_order"][0]
    assert not verdict["wide_stores"][0] and "'32': 2" in verdict["wide_stores"][1]
    # the LDL restores a register in the row loop (not innermost) and the STL sits in the
    # subroutine's loop (no global access): neither is in a listed loop
    assert verdict["no_local"][0]
    strict = sass_spec.Family("canned", r"^kernel<", "test", min_ctas=7, max_ipe=0.4)
    assert not sass_spec.check(strict, "min_ctas", [k])[0] and not sass_spec.check(strict, "max_ipe", [k])[0]
    assert not sass_spec.check(sass_spec.Family("none", r"^nothing", "test"), "no_local", [k])[0]


def test_no_local_flags_a_spill_inside_a_streaming_loop():
    text = CANNED.replace("        /*00d0*/                   ISETP.GE.AND P0, PT, R3, R2, PT ;",
                          "        /*00d0*/                   LDL R3, [R1+0x4] ;")
    code, info, labels = sass_report.parse_functions(text)
    k = sass_report.analyze_function(NAME, MANGLED, "k", code[MANGLED], labels[MANGLED], info[MANGLED], {"REG": 32})
    ok, detail = sass_spec.check(sass_spec.Family("canned", r"^kernel<", "test"), "no_local", [k])
    assert not ok and "k.cu:13" in detail


def test_wide_loop_stores_and_cluster_barriers_on_the_canned_kernel():
    """The two properties the GRPO rows add: a loop whose loads are all 128-bit must store 128-bit
    too (the canned streaming loop stores two 32-bit STG.E: flagged; the store-only zero fill is
    fine), and a cluster kernel must arrive at and wait on at least two cluster barriers."""
    fam = sass_spec.Family("canned", r"^kernel<", "test", wide_loop_stores=True, cluster_barriers=True)
    assert fam.checked() == ["no_local", "wide_loop_stores", "cluster_barriers"]
    k = _canned_kernel()
    ok, detail = sass_spec.check(fam, "wide_loop_stores", [k])
    assert not ok and "'32': 2" in detail and "k.cu:13" in detail
    ok, detail = sass_spec.check(fam, "cluster_barriers", [k])
    assert not ok and "0 UCGABAR_ARV / 0 UCGABAR_WAIT" in detail
    text = CANNED
    for a, b in (("STG.E desc[UR4][R10.64], R17", "STG.E.128 desc[UR4][R10.64], R16"),
                 ("STG.E desc[UR4][R10.64+0x4], R17", "STG.E.128 desc[UR4][R10.64+0x10], R16"),
                 ("S2R R0, SR_TID.X", "UCGABAR_ARV"), ("IADD3 R3, R3, 0x20, RZ", "UCGABAR_WAIT"),
                 ("MUFU.RCP R9, R8", "UCGABAR_ARV"), ("LDC R1, c[0x0][0x28]", "UCGABAR_WAIT")):
        assert a in text
        text = text.replace(a, b)
    code, info, labels = sass_report.parse_functions(text)
    k2 = sass_report.analyze_function(NAME, MANGLED, "k", code[MANGLED], labels[MANGLED], info[MANGLED], {"REG": 32})
    assert k2.totals["cga_arv"] == 2 and k2.totals["cga_wait"] == 2
    assert sass_spec.check(fam, "wide_loop_stores", [k2])[0]
    assert sass_spec.check(fam, "cluster_barriers", [k2])[0]


def test_report_degrades_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TSPARSE_NVDISASM", str(tmp_path / "missing-nvdisasm"))
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"not an ELF")
    assert sass_report.main(["--lib", str(fake)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sass_report: ")
    monkeypatch.delenv("TSPARSE_NVDISASM")
    try:
        sass_report.find_tool("cuobjdump"), sass_report.find_tool("nvdisasm")
    except sass_report.ReportError:
        return  # without the tools the first message is the only one to check
    assert sass_report.main(["--lib", str(fake)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device code" in err[0]


# ---------------------------------------------------------------------------------------------
# The spec against the built extension
def _built_kernels():
    if not tsparse.build_info().get("cuda_kernels"):
        pytest.skip("tsparse was built without CUDA kernels (CPU-only torch or TSPARSE_CUDA=0): no SASS to read")
    try:
        sass_report.find_tool("cuobjdump")
        sass_report.find_tool("nvdisasm")
    except sass_report.ReportError as exc:
        pytest.skip(str(exc))
    lib = os.path.join(os.path.dirname(tsparse.__file__))
    libs = [os.path.join(lib, f) for f in os.listdir(lib) if f.startswith("_C") and f.endswith(".so")]
    return sass_report.analyze(max(libs, key=os.path.getmtime))


@pytest.fixture(scope="module")
def kernels():
    return _built_kernels()


def _spec_cases():
    for fam in sass_spec.FAMILIES:
        for prop in fam.checked():
            marks = []
            if prop in fam.gaps:
                marks.append(pytest.mark.xfail(strict=True, reason=fam.gaps[prop]))
            yield pytest.param(fam, prop, marks=marks, id=f"{fam.name}-{prop}".replace(" ", "_"))


@pytest.mark.parametrize("family, prop", list(_spec_cases()))
def test_kernel_spec(kernels, family, prop):
    ok, detail = sass_spec.check(family, prop, kernels)
    assert ok, f"{family.name}: {prop}: {detail}"


def test_every_kernel_is_found_and_has_its_launch_bound(kernels):
    names = {k.name for k in kernels}
    for want in ("compose_copy_kernel<uint4, long, unsigned int>", "pack_kernel<bool>", "box_mask_kernel",
                 "segment_reduce_kernel<__nv_bfloat16, 8, unsigned int>"):
        assert want in names
    assert all(k.block for k in kernels), [k.name for k in kernels if not k.block]
    # the spec names the segment reduction's member loop as its hot loop (not the piece loop)
    seg = next(k for k in kernels if k.name == "segment_reduce_kernel<__nv_bfloat16, 8, unsigned int>")
    assert seg.hot_from.startswith("spec") and "i + M <= i1" in seg.hot["code"]


def test_report_json_has_every_kernel(kernels, capsys):
    assert sass_report.main(["--json", "--filter", "compose_copy"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {k["name"] for k in data["kernels"]} == {k.name for k in kernels if "compose_copy" in k.name}
    assert any(c["property"] == "wide_stores" for c in data["checks"])
