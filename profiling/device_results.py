"""Collects one device check into ONE JSON object a later session commits as
``benchmarks/results/<YYYY-MM-DD>-<device>.json`` (issue 15's format).

    python profiling/device_results.py --out results.json --bench fam1.json fam2.json \\
        [--junit tests-junit.xml] [--tests-log tests.jsonl] [--sanitizer sanitizer.log] \\
        [--ncu ncu.csv] [--phases phases.jsonl]

Fields: ``device_name`` (torch.cuda.get_device_name(), or the CPU), ``torch``, ``cuda``, ``date``;
``rows``: per op and size the tsparse time, the baseline and its time, the ratio, GB/s and % of
the copy bandwidth measured in the same run (each benchmark family measures its own copy
anchor; ``copy_gbps`` says which); ``tests``: passed / failed / errors / skipped and each failure
(from the junit file, or from the plugin's per-test log when the run was killed before pytest
wrote it); ``sanitizer``: each tool's error count and its first findings; ``ncu``: one row per
profiled kernel (profiling/ncu_summary.py); ``phases``: what ran, how long, with which status.
Every input is optional: a missing file is recorded as such, never an exception.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def environment() -> dict:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        return {"device_name": None, "torch": None, "cuda": None, "error": f"torch: {exc}"}
    gpu = torch.cuda.is_available()
    env = {
        "device_name": torch.cuda.get_device_name(0) if gpu else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
    }
    if gpu:
        p = torch.cuda.get_device_properties(0)
        env["sm"] = f"sm_{p.major}{p.minor}"
        env["sms"] = p.multi_processor_count
        env["memory_gib"] = round(p.total_memory / 2**30, 1)
    try:
        sys.path.insert(0, os.path.dirname(HERE))  # this checkout's tsparse
        import tsparse

        env["tsparse"] = tsparse.build_info()
    except Exception as exc:  # noqa: BLE001
        env["tsparse"] = f"not importable: {exc}"
    return env


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (name or "unknown").lower()).strip("-")


def bench_rows(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """Rows of benchmarks.report JSON files, each with the copy anchor of its own run."""
    rows, runs = [], []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            runs.append({"file": os.path.basename(path), "error": str(exc)})
            continue
        anchors = data.get("anchors", {})
        copy = anchors.get("copy_gbps")
        runs.append({"file": os.path.basename(path), "copy_gbps": copy, "matmul_tflops": anchors.get("matmul_tflops"),
                     "size": anchors.get("size"), "rows": len(data.get("rows", []))})
        fam = os.path.splitext(os.path.basename(path))[0]
        for r in data.get("rows", []):
            gbps = r.get("gbps")
            rows.append({
                "family": fam, "op": r.get("op"), "shape": r.get("shape"), "dtype": r.get("dtype"),
                "tsparse_ms": r.get("tsparse_ms"), "baseline": r.get("baseline"), "baseline_ms": r.get("baseline_ms"),
                "ratio": r.get("ratio"), "gbytes": r.get("gbytes"), "gbps": gbps,
                "pct_copy": None if gbps is None or not copy else 100.0 * gbps / copy, "copy_gbps": copy,
                "tflops": r.get("tflops"), "peak_mb": r.get("peak_mb"), "note": r.get("note") or "",
            })
    return rows, runs


def test_summary(junit: Optional[str], log: Optional[str]) -> dict:
    out = {"source": None, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "total": 0, "failures": []}
    if junit and os.path.exists(junit):
        try:
            root = ET.parse(junit).getroot()
        except ET.ParseError as exc:
            out["junit_error"] = str(exc)
        else:
            out["source"] = "junit"
            for case in root.iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                out["total"] += 1
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is not None:
                    out["failed" if bad.tag == "failure" else "errors"] += 1
                    out["failures"].append({"test": name, "kind": bad.tag, "message": (bad.get("message") or "")[:300]})
                elif case.find("skipped") is not None:
                    out["skipped"] += 1
                else:
                    out["passed"] += 1
            return out
    if log and os.path.exists(log):
        out["source"] = "per-test log (no junit: the run was interrupted or killed)"
        final: dict[str, dict] = {}
        with open(log) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                prev = final.get(rec["nodeid"])
                if prev is None or prev["outcome"] == "passed":
                    final[rec["nodeid"]] = rec
        for nodeid, rec in final.items():
            out["total"] += 1
            if rec["outcome"] == "passed":
                out["passed"] += 1
            elif rec["outcome"] == "skipped":
                out["skipped"] += 1
            else:
                out["failed"] += 1
                out["failures"].append({"test": nodeid, "kind": rec.get("when"), "message": rec.get("message") or ""})
    return out


def sanitizer_summary(path: Optional[str]) -> dict:
    if not path or not os.path.exists(path):
        return {"ran": False}
    tools: dict[str, dict] = {}
    findings: list[str] = []
    tool = None
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"=== compute-sanitizer --tool (\w+)", line)
            if m:
                tool = m.group(1)
                tools[tool] = {"errors": None, "exit": None}
                continue
            m = re.match(r"=== (\w+) exit code (-?\d+)", line)
            if m:
                tools.setdefault(m.group(1), {})["exit"] = int(m.group(2))
                continue
            m = re.search(r"(ERROR|RACECHECK) SUMMARY: (\d+)", line)
            if m and tool:
                tools[tool]["errors"] = int(m.group(2))
                continue
            if line.startswith("========= ") and tool and len(findings) < 40:
                text = line[len("========= "):].strip()
                if text and not text.startswith(("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY")):
                    findings.append(f"{tool}: {text}")
    return {"ran": True, "tools": tools, "findings": findings,
            "clean": bool(tools) and all(t.get("errors") == 0 and t.get("exit") == 0 for t in tools.values())}


def ncu_summary_rows(path: Optional[str]) -> dict:
    if not path or not os.path.exists(path):
        return {"ran": False}
    sys.path.insert(0, HERE)
    import ncu_summary

    with open(path, errors="replace") as f:
        text = f.read()
    try:
        rows = ncu_summary.parse(text)
        table = ncu_summary.summarize(rows)
    except Exception as exc:  # noqa: BLE001 - a bad CSV is recorded
        return {"ran": True, "error": f"{type(exc).__name__}: {exc}"}
    keys = ["kernel", "us", "dram_gbps", "dram_pct", "sm_pct", "occ_achieved", "occ_theoretical", "regs",
            "local_bytes", "grid_x_block"]
    return {"ran": True, "kernels": [dict(zip(keys, r)) for r in table]}


def phases(path: Optional[str]) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def collect(args) -> dict:
    env = environment()
    rows, runs = bench_rows(args.bench or [])
    data = dict(env)
    data["suggested_path"] = f"benchmarks/results/{env.get('date', time.strftime('%Y-%m-%d'))}-{slug(env.get('device_name'))}.json"
    data["benchmark_runs"] = runs
    data["rows"] = rows
    data["tests"] = test_summary(args.junit, args.tests_log)
    data["sanitizer"] = sanitizer_summary(args.sanitizer)
    data["ncu"] = ncu_summary_rows(args.ncu)
    data["phases"] = phases(args.phases)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--bench", nargs="*", default=[])
    p.add_argument("--junit")
    p.add_argument("--tests-log")
    p.add_argument("--sanitizer")
    p.add_argument("--ncu")
    p.add_argument("--phases")
    args = p.parse_args(argv)
    data = collect(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, default=str)
    t = data["tests"]
    print(f"results: {args.out} ({len(data['rows'])} benchmark rows; tests {t['passed']} passed, {t['failed']} failed, "
          f"{t['errors']} errors, {t['skipped']} skipped; commit as {data['suggested_path']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
