#!/usr/bin/env bash
# One prepared run on the GPU machine: build against ITS torch, run the CUDA tests, a
# compute-sanitizer pass (memcheck + racecheck) over every kernel, the benchmark report and
# Nsight Compute summaries; write everything under $OUT, print a short summary last.
#
# From a session lent a GPU (device tool), with the CUTLASS wheel carried in .whl/ (see
# profiling/NOTES.md for the recipe):
#     run(command="bash profiling/device_check.sh", carry=[".whl"], timeout_s=540)
# Locally (no GPU) it stops after the build with a clear message.
#
# Files under $OUT (the device tool returns at most 8, two folders deep):
#   summary.txt    environment, build line, test counts, sanitizer verdicts, ncu table, bench table
#   build.log      compiler output            tests.log    pytest output (CUDA tests)
#   sanitizer.log  memcheck + racecheck       bench.txt    benchmark report
#   report.json    benchmark rows (JSON)      ncu.csv / ncu.err  Nsight Compute raw metrics
# Budget (per-phase timeouts, overridable): build ~90 s on 16 cores, tests 120 s, sanitizer
# 2 x 60 s, benchmarks 150 s, ncu 60 s: under 8 minutes in all.
# Optional phases (EXTRA, off by default): EXTRA=prefill7b times the sparse stream's prefill on a
# random Qwen2.5-VL-7B-shaped model (bf16, ~16 GB) at keep 1.0 / 0.77 / 0.5 / 0.25
# (benchmarks/bench_sparse_prefill.py --size 7b; PREFILL7B_TIMEOUT, default 180 s), written to
# prefill7b.json and the summary. Within the 8-file limit, run it as
#     run(command="SKIP='sanitizer ncu' EXTRA=prefill7b bash profiling/device_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
T0=$(date +%s)
PY=${PYTHON:-python3}
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$summary"; }

# Phase budgets (seconds); overridable for a rerun that only needs part of the work.
TEST_TIMEOUT=${TEST_TIMEOUT:-120}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-130}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
NCU_TIMEOUT=${NCU_TIMEOUT:-60}
PREFILL7B_TIMEOUT=${PREFILL7B_TIMEOUT:-180}
SKIP=${SKIP:-}   # e.g. SKIP="sanitizer ncu" for a rerun that needs only part of the work
EXTRA=${EXTRA:-} # optional phases: "prefill7b"

say "device_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || echo "no nvidia-smi"; } | tee -a "$summary"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$summary"

# Carried wheels (CUTLASS headers; optional baselines such as Liger-Kernel), pure Python.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tsparse_site .whl/*.whl \
    && export PYTHONPATH=/tmp/tsparse_site${PYTHONPATH:+:$PYTHONPATH} \
    && say "installed carried wheels: $(ls .whl | tr '\n' ' ')"
fi

# ---- build against this machine's torch ------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
rm -f tsparse/_C*.so
if ! TSPARSE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  say "BUILD FAILED (tail of build.log follows)"
  tail -40 "$OUT/build.log" | tee -a "$summary"
  exit 1
fi
grep -E "^tsparse: built" "$OUT/build.log" | tee -a "$summary"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -m tsparse 2>&1 | tee -a "$summary"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no usable GPU here: stopping after the build"
  exit 2
fi

rc_tests=0; rc_san=0; rc_bench=0; rc_ncu=0; rc_prefill=0
# ---- CUDA tests (the CPU variants ran in CI; -m cuda selects the GPU ones) ---------------
if [[ " $SKIP " != *" tests "* ]]; then
say "CUDA tests (timeout ${TEST_TIMEOUT}s)"
timeout "$TEST_TIMEOUT" "$PY" -m pytest python_tests -m cuda -q -p no:cacheprovider \
  --junitxml="$OUT/tests-junit.xml" > "$OUT/tests.log" 2>&1
rc_tests=$?
tail -5 "$OUT/tests.log" | tee -a "$summary"
"$PY" - "$OUT/tests-junit.xml" <<'PY' 2>&1 | tee -a "$summary"
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as exc:
    print("tests: no junit report:", exc); sys.exit()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = lambda k: sum(int(s.get(k, 0)) for s in suites)
print(f"tests: {n('tests')} collected, {n('failures')} failed, {n('errors')} errors, {n('skipped')} skipped")
for case in root.iter("testcase"):
    for bad in list(case.findall("failure")) + list(case.findall("error")):
        print("  FAILED", case.get("classname"), case.get("name"), "-", (bad.get("message") or "")[:160])
PY
rm -f "$OUT/tests-junit.xml"  # its content is in summary.txt; keep the file count low
fi

# ---- compute-sanitizer: memcheck + racecheck over every kernel (small shapes) ------------
if [[ " $SKIP " != *" sanitizer "* ]]; then
  if command -v compute-sanitizer > /dev/null; then
    say "compute-sanitizer (timeout ${SANITIZER_TIMEOUT}s)"
    timeout "$SANITIZER_TIMEOUT" bash profiling/run_sanitizer.sh "$OUT/sanitizer.log" 2>&1 | tee -a "$summary"
    rc_san=${PIPESTATUS[0]}
    say "sanitizer rc=$rc_san (0: no findings)"
  else
    say "compute-sanitizer not found: skipped"
  fi
fi

# ---- benchmarks -----------------------------------------------------------------------
if [[ " $SKIP " != *" bench "* ]]; then
say "benchmarks (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" -m benchmarks.report --device cuda --size full --json "$OUT/report.json" \
  > "$OUT/bench.txt" 2>&1
rc_bench=$?
[ $rc_bench -ne 0 ] && say "benchmarks exited with $rc_bench (see bench.txt)"
fi

# ---- Nsight Compute: one launch of each kernel at realistic shapes ------------------------
if [[ " $SKIP " != *" ncu "* ]]; then
  if command -v ncu > /dev/null; then
    say "ncu (timeout ${NCU_TIMEOUT}s)"
    timeout "$NCU_TIMEOUT" bash profiling/run_ncu.sh "$OUT/ncu.csv" 2>&1 | tee -a "$summary"
    rc_ncu=${PIPESTATUS[0]}
  else
    say "ncu not found: skipped"
  fi
fi

# ---- optional: sparse prefill on a 7B-shaped random model ---------------------------------
if [[ " $EXTRA " == *" prefill7b "* ]]; then
  say "prefill7b: 7B-shaped random Qwen2.5-VL, prefill vs keep ratio (timeout ${PREFILL7B_TIMEOUT}s)"
  timeout "$PREFILL7B_TIMEOUT" "$PY" -m benchmarks.bench_sparse_prefill --size 7b --device cuda \
    --json "$OUT/prefill7b.json" 2>&1 | tee -a "$summary"
  rc_prefill=${PIPESTATUS[0]}
  say "prefill7b rc=$rc_prefill"
fi

say "done: tests rc=$rc_tests sanitizer rc=$rc_san bench rc=$rc_bench ncu rc=$rc_ncu prefill7b rc=$rc_prefill"
echo
[ -f "$OUT/bench.txt" ] && sed -n '/^op /,$p' "$OUT/bench.txt" | tee -a "$summary"
exit $(( rc_tests != 0 || rc_san != 0 || rc_bench != 0 || rc_prefill != 0 ))
