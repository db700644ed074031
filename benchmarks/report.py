"""Runs every op family's benchmark on the current device and prints one table.

    python -m benchmarks.report [--device cpu|cuda] [--size cpu|full|tiny] [--json PATH]

Each row: op, shape, dtype, tsparse time, a baseline measured in the same run, ratio
(baseline / tsparse: > 1 means tsparse is faster), GB/s from the op's byte model and its
fraction of the copy bandwidth measured in this run, TFLOP/s and fraction of the measured
matmul rate where the op computes, peak extra memory (GPU). Results also go to JSON.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

import torch

from . import bench_grpo, bench_sparse_prefill, bench_varlen, bench_visual_tokens
from .common import COMPILE, Timer, environment, format_table, measure_copy_bandwidth, measure_matmul_tflops, save_json

FAMILIES = {
    "visual_tokens": bench_visual_tokens.run,
    "varlen": bench_varlen.run,
    "grpo": bench_grpo.run,
    "sparse_prefill": bench_sparse_prefill.run,  # tiny model; the 7B-shaped case: --size 7b of that module
}


# On the CPU, glibc returns large freed buffers to the OS, so every call's output is
# page-faulted in afresh and that dominates the timings (measured here: a 60 MB gather
# took ~37 ms with fresh pages, ~5 ms with reused ones, for tsparse and PyTorch alike).
# Keeping freed memory mapped makes CPU rows measure the kernels.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _reexec_with_malloc_env(argv) -> None:
    if all(k in os.environ for k in _MALLOC_ENV):
        return
    env = dict(os.environ, **_MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.report", *argv], env)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default=None, help="cpu | full | tiny (default: full on a GPU, cpu on the CPU)")
    p.add_argument("--only", default=None, help="comma-separated op families: " + ",".join(FAMILIES))
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    p.add_argument("--json", default="bench_results/report.json")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="add torch.compile baselines (default on a GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        _reexec_with_malloc_env(argv)
    elif device.index is not None:
        torch.cuda.set_device(device)  # the timers record on the current device's stream
    size = args.size or ("full" if device.type == "cuda" else "cpu")
    iters = args.iters or (20 if device.type == "cuda" else 5)
    COMPILE["enabled"] = device.type == "cuda" if args.compile is None else args.compile
    env = environment(device)
    print(f"tsparse benchmark report - {env['date']}")
    print(f"  device: {env.get('gpu') or env.get('cpu')}; torch {env['torch']}; size={size}")
    copy = measure_copy_bandwidth(device)
    mm = measure_matmul_tflops(device)
    if device.type == "cpu":
        print("  CPU: freed memory stays mapped (MALLOC_MMAP_THRESHOLD_), so timings exclude page faults")
    print(f"  measured copy bandwidth: {copy:.1f} GB/s (read + write); matmul: {mm:.1f} TFLOP/s")
    timer = Timer(device, warmup=3, iters=iters)
    rows = []
    families = args.only.split(",") if args.only else list(FAMILIES)
    failed = []
    for fam in families:
        print(f"[{fam}]", flush=True)
        done = []  # rows a family has finished (kept if the run is interrupted mid-family)
        try:
            run = FAMILIES[fam]
            # families that accept rows_out append each row as it is measured (partial results survive)
            kw = {"rows_out": done} if "rows_out" in inspect.signature(run).parameters else {}
            rows += run(device, size, timer, log=lambda s: print(s, flush=True), **kw)
        except KeyboardInterrupt:  # a phase deadline (SIGINT): keep and write what was measured
            rows += done
            failed.append(f"{fam} (interrupted)")
            print("  INTERRUPTED: writing the rows measured so far", flush=True)
            break
        except Exception as exc:  # one family's failure must not lose the others' rows
            rows += done
            failed.append(fam)
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
    print()
    print(format_table(rows, copy, mm))
    save_json(args.json, env, {"copy_gbps": copy, "matmul_tflops": mm, "size": size}, rows)
    print(f"\nJSON: {os.path.abspath(args.json)}")
    if failed:
        print(f"failed families: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
