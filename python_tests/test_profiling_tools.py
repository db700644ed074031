"""The profiling kit's pieces that can run without a GPU: the Nsight Compute CSV summary and the
kernel-case driver (which falls back to the CPU here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "profiling"))

import ncu_summary  # noqa: E402

SAMPLE = '''==PROF== Connected to process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","launch__registers_per_thread","sm__warps_active.avg.pct_of_peak_sustained_active","l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum","launch__grid_size","launch__block_size"
"","","","","","","","","","","","Mbyte","Mbyte","usecond","register/thread","%","byte","",""
"0","4242","python3","h100","void tsparse::cuda::(anonymous namespace)::compose_copy_kernel<uint4, long>(uint4 *, long, int)","1","7","(256, 1, 1)","(1056, 1, 1)","0","9.0","60.33","59.67","40.0","40","81.5","0","1056","256"
"1","4242","python3","h100","box_mask_kernel(tsparse::cuda::BoxMaskArgs)","1","7","(256, 1, 1)","(256, 1, 1)","0","9.0","0.1","0.3","n/a","30","50","0","256","256"
'''


def test_ncu_summary_parses_raw_csv():
    rows = ncu_summary.parse(SAMPLE)
    assert len(rows) == 2
    assert rows[0]["gpu__time_duration.sum"] == pytest.approx(40e-6)
    assert rows[0]["dram__bytes_read.sum"] == pytest.approx(60.33e6)
    table = ncu_summary.summarize(rows)
    assert table[0][0] == "compose_copy_kernel"
    assert table[0][1] == "40.0"  # microseconds
    assert table[0][2] == "3000"  # (60.33 + 59.67) MB / 40 us in GB/s
    assert table[0][7] == "40" and table[0][8] == "0" and table[0][9] == "1056x256"
    assert table[1][1] == "-" and table[1][2] == "-"  # a non-numeric duration is shown as missing
    assert "compose_copy_kernel" in ncu_summary.render(table, markdown=True)


def test_kernel_cases_run_without_gpu():
    # The child imports the tsparse of this checkout (not whichever one is installed).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "profiling", "kernel_cases.py"), "--mode", "sanitize"],
                         capture_output=True, text=True, check=True, env=env).stdout
    assert "kernel_cases:" in out and "ran pack_batch" in out
