"""The parts of the one-loan device check (profiling/device_check.sh) that can be proven without a
GPU: the scripts parse, the phases run in the order the loan needs, the per-test limit and log of
the pytest plugin work, and the results writer turns CPU-sized runs and canned tool outputs into
the one JSON object a later session commits (benchmarks/results/<date>-<device>.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILING = os.path.join(ROOT, "profiling")
sys.path.insert(0, PROFILING)

import device_results  # noqa: E402

SCRIPTS = ["device_check.sh", "run_sanitizer.sh", "run_ncu.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", os.path.join(PROFILING, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _plan(**env):
    """[(phase, its limit in seconds or None when skipped)] and the deadline, from PLAN_ONLY=1."""
    r = subprocess.run(["bash", os.path.join(PROFILING, "device_check.sh")], capture_output=True, text=True,
                       env=dict(os.environ, PLAN_ONLY="1", **env), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.strip()]
    plan = [(ln[1], None if ln[2] == "skipped" else int(ln[3].rstrip("s"))) for ln in lines if ln[0] == "phase"]
    assert lines[-1][0] == "deadline"
    return plan, int(lines[-1][1].rstrip("s"))


def test_phases_run_in_the_order_the_loan_needs():
    plan, deadline = _plan()
    assert [p for p, _ in plan] == ["build", "bench:grpo", "bench:visual_tokens", "bench:varlen", "tests",
                                    "sanitizer", "ncu", "bench:sparse_prefill"]
    assert deadline <= 570  # one call of ~9 minutes: the start and the hand-back fit in the 15-minute loan
    assert all(limit is not None and 0 < limit <= deadline for _, limit in plan)


def test_skip_and_only_select_phases_and_the_build_always_runs():
    plan, _ = _plan(SKIP="sanitizer ncu")
    assert [p for p, limit in plan if limit is None] == ["sanitizer", "ncu"]
    plan, _ = _plan(ONLY="tests")
    assert [p for p, limit in plan if limit is not None] == ["build", "tests"]
    plan, _ = _plan(ONLY="bench", SKIP="bench:grpo")
    assert [p for p, limit in plan if limit is not None] == ["build", "bench:visual_tokens", "bench:varlen",
                                                             "bench:sparse_prefill"]


def _run_pytest_with_deadline(tmp_path, body: str, limit: str, grace: str = "30"):
    test = tmp_path / "test_slow.py"
    test.write_text(textwrap.dedent(body))
    log = tmp_path / "tests.jsonl"
    env = dict(os.environ, PYTHONPATH=PROFILING + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TSPARSE_TEST_TIMEOUT=limit, TSPARSE_TEST_LOG=str(log), TSPARSE_TEST_HANG_GRACE=grace)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_deadline",
                        "--rootdir", str(tmp_path), "-c", os.devnull, str(test),
                        f"--junitxml={tmp_path / 'junit.xml'}"],
                       capture_output=True, text=True, env=env, timeout=120)
    records = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return r, records


def test_per_test_limit_fails_a_slow_test_and_the_run_goes_on(tmp_path):
    r, records = _run_pytest_with_deadline(tmp_path, """
        import time
        def test_slow():
            time.sleep(30)
        def test_fast():
            assert True
    """, limit="1")
    assert r.returncode == 1 and "exceeded the per-test limit of 1 s" in r.stdout
    outcome = {rec["nodeid"].split("::")[-1]: rec["outcome"] for rec in records if rec["when"] == "call"}
    assert outcome == {"test_slow": "failed", "test_fast": "passed"}
    summary = device_results.test_summary(str(tmp_path / "junit.xml"), None)
    assert (summary["passed"], summary["failed"], summary["source"]) == (1, 1, "junit")


def test_a_hung_test_is_recorded_and_the_process_ends(tmp_path):
    # SIGALRM blocked: the test cannot be interrupted (like a thread stuck in a CUDA sync); the
    # watchdog records it, dumps the stacks and ends pytest so the device check goes on.
    r, records = _run_pytest_with_deadline(tmp_path, """
        import signal, time
        def test_ok():
            pass
        def test_stuck():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
    """, limit="1", grace="1")
    assert r.returncode == 3 and "hung" in r.stderr
    assert not (tmp_path / "junit.xml").exists()
    summary = device_results.test_summary(str(tmp_path / "junit.xml"), str(tmp_path / "tests.jsonl"))
    assert summary["source"].startswith("per-test log")
    assert summary["passed"] == 1 and summary["failed"] == 1 and "hung" in summary["failures"][0]["message"]
    assert any(rec["outcome"] == "failed" and "test_stuck" in rec["nodeid"] for rec in records)


SANITIZER_LOG = """=== compute-sanitizer --tool memcheck ===
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at compose_copy_kernel+0x1a0 in visual_tokens_kernels.cu:127
========= ERROR SUMMARY: 1 error
=== memcheck exit code 1 ===
=== compute-sanitizer --tool racecheck ===
========= COMPUTE-SANITIZER
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
=== racecheck exit code 0 ===
"""

NCU_CSV = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","launch__registers_per_thread"
"","","","","","","","","","","","Mbyte","Mbyte","usecond","register/thread"
"0","1","python3","h100","void tsparse::cuda::(anonymous namespace)::compose_copy_kernel<uint4, long, unsigned int>(uint4 *, long, long)","1","7","(256, 1, 1)","(1056, 1, 1)","0","9.0","484","484","380.0","56"
'''

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3">
<testcase classname="python_tests.test_varlen_cuda" name="test_a"/>
<testcase classname="python_tests.test_varlen_cuda" name="test_b"><failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="python_tests.test_varlen_cuda" name="test_c"><skipped message="no"/></testcase>
</testsuite></testsuites>"""


def test_results_json_from_cpu_sized_runs(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    r = subprocess.run([sys.executable, "-m", "benchmarks.report", "--device", "cpu", "--size", "tiny", "--only",
                        "varlen", "--iters", "1", "--no-compile", "--json", str(bench / "varlen.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "sanitizer.log").write_text(SANITIZER_LOG)
    (tmp_path / "ncu.csv").write_text(NCU_CSV)
    (tmp_path / "phases.jsonl").write_text('{"phase": "build", "budget_s": 170, "seconds": 80, "rc": 0, "status": "ok"}\n')
    out = tmp_path / "results.json"
    assert device_results.main(["--out", str(out), "--bench", str(bench / "varlen.json"), str(bench / "missing.json"),
                                "--junit", str(tmp_path / "junit.xml"), "--sanitizer", str(tmp_path / "sanitizer.log"),
                                "--ncu", str(tmp_path / "ncu.csv"), "--phases", str(tmp_path / "phases.jsonl")]) == 0
    data = json.loads(out.read_text())
    for key in ("device_name", "torch", "cuda", "date", "rows", "tests", "sanitizer", "ncu", "phases"):
        assert key in data
    assert data["suggested_path"].startswith(f"benchmarks/results/{data['date']}-cpu")
    ops = {row["op"] for row in data["rows"]}
    assert "pack_varlen hidden" in ops and "pack_batch (ids+pos+labels)" in ops
    copy = data["benchmark_runs"][0]["copy_gbps"]
    for row in data["rows"]:
        assert row["tsparse_ms"] > 0 and row["baseline"] and row["copy_gbps"] == copy
        if row["gbps"] is not None:
            assert row["pct_copy"] == pytest.approx(100 * row["gbps"] / copy)
        if row["baseline_ms"] is not None:
            assert row["ratio"] == pytest.approx(row["baseline_ms"] / row["tsparse_ms"])
    assert "error" in data["benchmark_runs"][1]  # a missing family file is recorded, not fatal
    t = data["tests"]
    assert (t["passed"], t["failed"], t["skipped"], t["total"]) == (1, 1, 1, 3)
    assert t["failures"] == [{"test": "python_tests.test_varlen_cuda::test_b", "kind": "failure", "message": "assert 1 == 2"}]
    s = data["sanitizer"]
    assert s["tools"]["memcheck"] == {"errors": 1, "exit": 1} and s["tools"]["racecheck"] == {"errors": 0, "exit": 0}
    assert not s["clean"] and any("Invalid __global__ read" in f for f in s["findings"])
    k = data["ncu"]["kernels"][0]
    assert k["kernel"] == "compose_copy_kernel" and k["us"] == "380.0" and k["dram_gbps"] == "2547" and k["regs"] == "56"
    assert data["phases"][0]["phase"] == "build"


def test_results_json_without_any_tool_output(tmp_path):
    out = tmp_path / "results.json"
    assert device_results.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["sanitizer"] == {"ran": False} and data["ncu"] == {"ran": False}
    assert data["tests"]["total"] == 0 and data["tests"]["source"] is None
