#!/usr/bin/env bash
# One prepared run on the GPU machine: build against ITS torch, run the CUDA tests, a
# compute-sanitizer pass (memcheck + racecheck) over every kernel, the benchmark report of
# every op family and Nsight Compute summaries; write everything under $OUT, print a short
# summary last.
#
# From a session lent a GPU (device tool), with the CUTLASS wheel carried in .whl/ (see
# profiling/NOTES.md for the recipe):
#     run(command="bash profiling/device_check.sh", carry=[".whl"], timeout_s=540)
# Locally (no GPU) it stops after the build with a clear message.
#
# Files under $OUT (the device tool returns at most 8, two folders deep):
#   summary.txt    environment, build line, test counts, sanitizer verdicts, ncu table, bench tables
#   build.log      compiler output            tests.log    pytest output (CUDA tests)
#   sanitizer.log  memcheck + racecheck       bench.txt    benchmark report(s), one per family
#   report.json    all families' rows (JSON)  ncu.csv      Nsight Compute raw metrics
#   prefill7b.json (only with EXTRA=prefill7b)
#
# Time: the whole run keeps to DEADLINE seconds (default 480 = 8 min); each phase gets
# min(its own timeout, what is left), and phases that no longer fit are skipped and said so.
# Order = priority: build, tests, sanitizer, benchmarks (family by family), ncu, extras.
#   SKIP="tests sanitizer bench ncu"   skip phases (a rerun that needs only part of the work)
#   FAMILIES="visual_tokens grpo ..."  benchmark families (default: all in benchmarks/report.py)
#   EXTRA="compile prefill7b"          optional: torch.compile baselines (slow to compile);
#                                      sparse prefill on a random Qwen2.5-VL-7B-shaped model
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
T0=$(date +%s)
PY=${PYTHON:-python3}
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$summary"; }

DEADLINE=${DEADLINE:-480}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-110}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-90}       # per family
NCU_TIMEOUT=${NCU_TIMEOUT:-60}
PREFILL7B_TIMEOUT=${PREFILL7B_TIMEOUT:-180}
SKIP=${SKIP:-}
EXTRA=${EXTRA:-}
# Seconds a phase may use: its own timeout, capped by what is left of the deadline.
budget() { local left=$(( DEADLINE - ($(date +%s) - T0) )); (( left < $1 )) && echo "$left" || echo "$1"; }
want() { [[ " $SKIP " != *" $1 "* ]]; }

say "device_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), deadline ${DEADLINE}s"
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
if want tests; then
  t=$(budget "$TEST_TIMEOUT")
  xdist=""
  "$PY" -c "import xdist" 2> /dev/null && xdist="-n 4"
  say "CUDA tests (timeout ${t}s${xdist:+, $xdist})"
  timeout "$t" "$PY" -m pytest python_tests -m cuda -q -p no:cacheprovider $xdist \
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
if want sanitizer; then
  if command -v compute-sanitizer > /dev/null; then
    t=$(budget "$SANITIZER_TIMEOUT")
    say "compute-sanitizer (timeout ${t}s)"
    timeout "$t" bash profiling/run_sanitizer.sh "$OUT/sanitizer.log" 2>&1 | tee -a "$summary"
    rc_san=${PIPESTATUS[0]}
    say "sanitizer rc=$rc_san (0: no findings; 124: timed out)"
  else
    say "compute-sanitizer not found: skipped"
  fi
fi

# ---- benchmarks: one report per family (own timeout), rows merged into report.json --------
if want bench; then
  fams=${FAMILIES:-$("$PY" -c "from benchmarks.report import FAMILIES; print(' '.join(FAMILIES))")}
  compile_flag="--no-compile"
  [[ " $EXTRA " == *" compile "* ]] && compile_flag="--compile"
  : > "$OUT/bench.txt"
  mkdir -p /tmp/tsparse_bench
  for fam in $fams; do
    t=$(budget "$BENCH_TIMEOUT")
    if (( t < 20 )); then say "benchmarks: $fam skipped (deadline)"; continue; fi
    say "benchmarks: $fam (timeout ${t}s, $compile_flag)"
    timeout "$t" "$PY" -m benchmarks.report --device cuda --size full --only "$fam" $compile_flag \
      --json "/tmp/tsparse_bench/$fam.json" >> "$OUT/bench.txt" 2>&1
    rc=$?
    (( rc != 0 )) && { say "  $fam exited with $rc (see bench.txt)"; rc_bench=$rc; }
  done
  "$PY" - "$OUT/report.json" /tmp/tsparse_bench/*.json <<'PY'
import json, sys
merged = None
for path in sys.argv[2:]:
    with open(path) as f:
        d = json.load(f)
    if merged is None:
        merged = d
    else:
        merged["rows"] += d["rows"]
if merged is not None:
    with open(sys.argv[1], "w") as f:
        json.dump(merged, f, indent=2)
PY
fi

# ---- Nsight Compute: one launch of each kernel at realistic shapes ------------------------
if want ncu; then
  t=$(budget "$NCU_TIMEOUT")
  if ! command -v ncu > /dev/null; then
    say "ncu not found: skipped"
  elif (( t < 20 )); then
    say "ncu skipped (deadline)"
  else
    say "ncu (timeout ${t}s)"
    timeout "$t" bash profiling/run_ncu.sh "$OUT/ncu.csv" 2>&1 | tee -a "$summary"
    rc_ncu=${PIPESTATUS[0]}
  fi
fi

# ---- optional: sparse prefill on a 7B-shaped random model ---------------------------------
if [[ " $EXTRA " == *" prefill7b "* ]]; then
  t=$(budget "$PREFILL7B_TIMEOUT")
  say "prefill7b: 7B-shaped random Qwen2.5-VL, prefill vs keep ratio (timeout ${t}s)"
  timeout "$t" "$PY" -m benchmarks.bench_sparse_prefill --size 7b --device cuda \
    --json "$OUT/prefill7b.json" 2>&1 | tee -a "$summary"
  rc_prefill=${PIPESTATUS[0]}
  say "prefill7b rc=$rc_prefill"
fi

say "done: tests rc=$rc_tests sanitizer rc=$rc_san bench rc=$rc_bench ncu rc=$rc_ncu prefill7b rc=$rc_prefill"
echo
# The benchmark tables (one per family) close the summary.
[ -s "$OUT/bench.txt" ] && sed -n '/^op /,/^JSON/p' "$OUT/bench.txt" | grep -v "^JSON" | tee -a "$summary"
exit $(( rc_tests != 0 || rc_san != 0 || rc_bench != 0 || rc_prefill != 0 ))
