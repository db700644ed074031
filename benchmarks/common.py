"""Timing, bandwidth anchors and the report table shared by tsparse's benchmarks.

Conventions (DEVELOPERS.md, "Kernels: how we work"):
* speed is reported as a ratio against a baseline measured in the same run
  (``ratio = baseline time / tsparse time``: > 1 means tsparse is faster);
* bandwidth as GB/s from an explicit byte model (bytes that must be read + written), and
  as a fraction of the copy bandwidth measured in the same run on the same device
  (``Tensor.copy_`` of a large buffer, counting read + write);
* on a GPU each timed call is preceded by an L2 flush (a write of a buffer larger than L2)
  and timed with CUDA events; on the CPU with ``time.perf_counter``. The median is reported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
import warnings
from typing import Callable, Optional

import torch

# --------------------------------------------------------------------------------------
# pytest-benchmark helpers (benchmarks/test_bench_*.py)
BENCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Waits for the GPU's queued work (nothing on the CPU), so a timed call includes it."""
    if BENCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def synced(fn: Callable) -> Callable:
    """``fn`` followed by :func:`sync`: what pytest-benchmark should time."""

    def wrapped():
        out = fn()
        sync()
        return out

    return wrapped


def count_host_syncs(fn: Callable[[], object]) -> int:
    """How many device->host synchronizations ``fn()`` makes (CUDA only), counted with
    torch's sync debug mode (one warning per sync)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# --------------------------------------------------------------------------------------
# Timing


class Timer:
    def __init__(self, device: torch.device, warmup: int = 3, iters: int = 10, flush_bytes: int = 256 << 20):
        self.device = torch.device(device)
        self.warmup = warmup
        self.iters = iters
        self.cuda = self.device.type == "cuda"
        self._flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device=self.device) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], setup: Optional[Callable[[], object]] = None) -> dict:
        """Median / min milliseconds of ``fn()``; ``setup()`` (untimed) runs before each call."""
        for _ in range(self.warmup):
            if setup is not None:
                setup()
            fn()
        self.sync()
        times = []
        for _ in range(self.iters):
            if setup is not None:
                setup()
            if self.cuda:
                self._flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times)}

    def peak_bytes(self, fn: Callable[[], object]) -> Optional[int]:
        """Peak extra device memory of one call (GPU only)."""
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - base


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-local ``copy_`` (read + write bytes), the anchor for bandwidth-bound ops."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    t = Timer(device, warmup=2, iters=8)(lambda: b.copy_(a))
    return 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device) -> float:
    """TFLOP/s of a large bf16 matmul (fp32 on the CPU), the anchor for compute-bound ops."""
    device = torch.device(device)
    if device.type == "cpu":
        n, dtype = 1024, torch.float32
    else:
        n, dtype = 8192, torch.bfloat16
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = Timer(device, warmup=2, iters=5)(lambda: a @ b)
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12


# --------------------------------------------------------------------------------------
# torch.compile baselines

COMPILE = {"enabled": False}  # set by report.py (--compile; default on a GPU)


def compiled(fn: Callable, *args):
    """``torch.compile(fn)`` bound to ``args`` as a zero-argument callable (compiled on the
    first call, which the Timer's warm-up absorbs), or None when compile baselines are off or
    compiling fails (e.g. no C++ toolchain for the CPU backend)."""
    if not COMPILE["enabled"]:
        return None
    try:
        cfn = torch.compile(fn, dynamic=False)
        cfn(*args)
    except Exception as exc:  # a baseline that cannot be built is reported, not fatal
        print(f"  torch.compile baseline unavailable: {type(exc).__name__}: {str(exc)[:120]}")
        return None
    return lambda: cfn(*args)


# --------------------------------------------------------------------------------------
# Report rows


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    tsparse_ms: float
    baseline: str
    baseline_ms: Optional[float]
    gbytes: Optional[float] = None  # byte model of the tsparse op (GB)
    tflop: Optional[float] = None  # FLOP model (TFLOP)
    peak_mb: Optional[float] = None
    note: str = ""

    @property
    def ratio(self) -> Optional[float]:
        if self.baseline_ms is None or self.tsparse_ms <= 0:
            return None
        return self.baseline_ms / self.tsparse_ms

    @property
    def gbps(self) -> Optional[float]:
        return None if self.gbytes is None else self.gbytes / (self.tsparse_ms * 1e-3)

    @property
    def tflops(self) -> Optional[float]:
        return None if self.tflop is None else self.tflop / (self.tsparse_ms * 1e-3)


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(rows: list[Row], copy_gbps: float, matmul_tflops: Optional[float]) -> str:
    head = ["op", "shape", "dtype", "tsparse ms", "baseline", "base ms", "ratio", "GB/s", "%copy", "TFLOP/s", "%mm", "peak MB", "note"]
    body = []
    for r in rows:
        pct_copy = None if r.gbps is None else 100 * r.gbps / copy_gbps
        pct_mm = None if (r.tflops is None or not matmul_tflops) else 100 * r.tflops / matmul_tflops
        body.append([
            r.op, r.shape, r.dtype, _fmt(r.tsparse_ms, ".4f"), r.baseline, _fmt(r.baseline_ms, ".4f"),
            _fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else ""), _fmt(r.gbps, ".1f"),
            _fmt(pct_copy, ".0f"), _fmt(r.tflops, ".1f"), _fmt(pct_mm, ".0f"), _fmt(r.peak_mb, ".1f"), r.note,
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def environment(device: torch.device) -> dict:
    import tsparse

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "tsparse": tsparse.build_info(),
        "python": platform.python_version(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu"] = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    else:
        env["cpu"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return env


def save_json(path: str, env: dict, anchors: dict, rows: list[Row]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {
        "environment": env,
        "anchors": anchors,
        "rows": [dict(dataclasses.asdict(r), ratio=r.ratio, gbps=r.gbps, tflops=r.tflops) for r in rows],
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
