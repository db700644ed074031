#!/usr/bin/env bash
# One prepared run on the GPU machine: build against ITS torch, run the CUDA tests and the
# GPU benchmarks, write everything under $OUT, print a short summary last.
#
# From a session lent a GPU (device tool), with the CUTLASS wheel carried in .whl/ (see
# profiling/NOTES.md for the recipe):
#     run(command="bash profiling/device_check.sh", carry=[".whl"], timeout_s=540)
# Locally (no GPU) it stops after the build with a clear message.
#
# Files under $OUT (the device tool returns at most 8, two folders deep):
#   summary.txt  environment, build line, test counts, the benchmark tables
#   build.log    compiler output          tests.log        pytest output (CUDA tests)
#   bench.txt    visual-token report      report.json      its rows (JSON)
#   bench_grpo.txt  GRPO report           report_grpo.json its rows (JSON)
# Budget: build ~1-2 min (16 cores), tests ~1-2 min, benchmarks 2 x <= 2.5 min: inside 8 min.
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
TEST_TIMEOUT=${TEST_TIMEOUT:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
GRPO_BENCH_TIMEOUT=${GRPO_BENCH_TIMEOUT:-150}

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

# ---- CUDA tests (the CPU variants ran in CI; -m cuda selects the GPU ones) ---------------
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

# ---- benchmarks (one report per op family, each with its own time budget) --------------
say "benchmarks: visual tokens (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" -m benchmarks.report --device cuda --size full --only visual_tokens \
  --json "$OUT/report.json" > "$OUT/bench.txt" 2>&1
rc_bench=$?
[ $rc_bench -ne 0 ] && say "visual-token benchmarks exited with $rc_bench (see bench.txt)"
say "benchmarks: grpo (timeout ${GRPO_BENCH_TIMEOUT}s)"
timeout "$GRPO_BENCH_TIMEOUT" "$PY" -m benchmarks.report --device cuda --size full --only grpo \
  --json "$OUT/report_grpo.json" > "$OUT/bench_grpo.txt" 2>&1
rc_grpo=$?
[ $rc_grpo -ne 0 ] && say "grpo benchmarks exited with $rc_grpo (see bench_grpo.txt)"

say "done: tests rc=$rc_tests bench rc=$rc_bench grpo bench rc=$rc_grpo"
echo
sed -n '/^op /,$p' "$OUT/bench.txt" | tee -a "$summary"
sed -n '/^op /,$p' "$OUT/bench_grpo.txt" | tee -a "$summary"
exit $(( rc_tests != 0 || rc_bench != 0 || rc_grpo != 0 ))
