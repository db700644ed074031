"""Summarizes an Nsight Compute CSV (``ncu --csv --page raw --metrics ...``) into one row per
kernel launch: duration, achieved DRAM bandwidth (and % of peak), achieved / theoretical
occupancy, registers per thread, local-memory traffic (register spills) and grid/block.

    python profiling/ncu_summary.py ncu.csv [--markdown]

The metric names requested by profiling/run_ncu.sh are listed in METRICS; a metric missing
from the CSV (older ncu, other GPU) is shown as "-".
"""

from __future__ import annotations

import argparse
import csv
import io
import sys

METRICS = [
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__maximum_warps_per_active_cycle_pct",
    "launch__registers_per_thread",
    "launch__block_size",
    "launch__grid_size",
    "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum",
    "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum",
]

_SCALE = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "nsecond": 1e-9, "usecond": 1e-6,
          "msecond": 1e-3, "second": 1.0}


def _num(text: str):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def parse(text: str) -> list[dict]:
    """Rows of the raw page: dicts of metric -> (value in base units, or the raw string)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    reader = list(csv.reader(io.StringIO("\n".join(lines))))
    header = reader[0]
    rows = reader[1:]
    units = {}
    if rows and rows[0] and rows[0][0] == "":  # the units row
        units = dict(zip(header, rows[0]))
        rows = rows[1:]
    out = []
    for r in rows:
        d = {}
        for key, val in zip(header, r):
            v = _num(val)
            unit = units.get(key, "")
            if v is not None and unit in _SCALE:
                v *= _SCALE[unit]
            d[key] = v if v is not None else val
        out.append(d)
    return out


def short_name(name: str) -> str:
    """``void ns::(anonymous namespace)::kernel<T, U>(args)`` -> ``kernel``."""
    n = name.strip()
    if n.endswith(")"):  # drop the parameter list (the last balanced parenthesized group)
        depth = 0
        for i in range(len(n) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(n[i], 0)
            if depth == 0:
                n = n[:i]
                break
    out, depth = [], 0  # drop template arguments
    for ch in n:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    n = "".join(out).split("::")[-1].split()[-1] if "".join(out).strip() else name
    return n[:48]


def summarize(rows: list[dict]) -> list[list[str]]:
    table = []
    for d in rows:
        t = d.get("gpu__time_duration.sum")
        rd, wr = d.get("dram__bytes_read.sum"), d.get("dram__bytes_write.sum")
        gbps = (rd + wr) / t / 1e9 if isinstance(t, float) and isinstance(rd, float) and isinstance(wr, float) and t > 0 else None
        spill = [d.get("l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum"), d.get("l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum")]
        spill_b = sum(s for s in spill if isinstance(s, float)) if any(isinstance(s, float) for s in spill) else None
        short = short_name(str(d.get("Kernel Name", "?")))

        def f(key, spec):
            v = d.get(key)
            return format(v, spec) if isinstance(v, float) else "-"

        table.append([
            short,
            f"{t * 1e6:.1f}" if isinstance(t, float) else "-",
            f"{gbps:.0f}" if gbps is not None else "-",
            f("dram__throughput.avg.pct_of_peak_sustained_elapsed", ".0f"),
            f("sm__throughput.avg.pct_of_peak_sustained_elapsed", ".0f"),
            f("sm__warps_active.avg.pct_of_peak_sustained_active", ".0f"),
            f("sm__maximum_warps_per_active_cycle_pct", ".0f"),
            f("launch__registers_per_thread", ".0f"),
            f"{spill_b:.0f}" if spill_b is not None else "-",
            f"{f('launch__grid_size', '.0f')}x{f('launch__block_size', '.0f')}",
        ])
    return table


HEAD = ["kernel", "us", "GB/s", "%dram", "%sm", "occ%", "theo occ%", "regs", "spill B", "grid x block"]


def render(table, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in table]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(HEAD, *table)] if table else [len(h) for h in HEAD]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(HEAD), fmt(["-" * w for w in widths])] + [fmt(r) for r in table])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("csv")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    with open(args.csv, errors="replace") as f:
        rows = parse(f.read())
    if not rows:
        print("ncu_summary: no kernel rows in", args.csv)
        return 1
    print(render(summarize(rows), args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
