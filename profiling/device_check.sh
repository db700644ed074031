#!/usr/bin/env bash
# One prepared run on the GPU machine, fit for ONE 15-minute loan (one call of ~9 minutes, the
# build included; the machine's start and hand-back take the rest). Builds against the machine's
# own Python + torch (3.12 + 2.11 + cu130 on the device image), then, in this order (priority):
#   bench:grpo           the GRPO benchmark (realistic size), first: the numbers issue 12 needs most
#   bench:visual_tokens  the visual-token benchmark
#   bench:varlen         the varlen benchmark
#   tests                the CUDA tests (pytest -m cuda): a per-test limit; at the phase deadline
#                        pytest gets SIGINT, so its junit file and failure list are still written
#   sanitizer            compute-sanitizer memcheck (+ racecheck if time is left) on tsparse's
#                        kernels only (small shapes)
#   ncu                  Nsight Compute on tsparse's kernels only, at most NCU_LAUNCHES launches
#   bench:sparse_prefill the tiny-model prefill benchmark, only if time is left
# and writes everything under $OUT, with results.json last: ONE object a later session commits as
# benchmarks/results/<date>-<device>.json (profiling/device_results.py: device, torch, cuda, date,
# benchmark rows with ratio, GB/s and % of the copy measured in the same run, the test summary,
# the sanitizer's findings, the ncu summary, what each phase did).
#
#     run(command="bash profiling/device_check.sh", timeout_s=570)      # nothing to carry
#
# Nothing is carried: the build needs only the machine's torch, nvcc and ninja. The CUTLASS wheel
# is needed only if a source includes CUTLASS/CuTe headers (none does today); then carry it in
# .whl/ (profiling/NOTES.md) and this script installs it, else it says so and stops.
#
#   DEADLINE=540          seconds for the whole run (phases get min(their own limit, what is left))
#   SKIP="sanitizer ncu"  phases to skip;  ONLY="tests"  run only these phases (the build always runs)
#   PLAN_ONLY=1           print the phase plan and exit (used by the CPU tests)
#   EXTRA="prefill7b compile"  optional: the 7B-shaped prefill; torch.compile baselines
# Locally (no GPU) it stops after the build with a clear message (exit 2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device_out}
T0=$(date +%s)
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
RESERVE=${RESERVE:-15}           # kept for writing results.json
SKIP=${SKIP:-}
ONLY=${ONLY:-}
EXTRA=${EXTRA:-}
NCU_LAUNCHES=${NCU_LAUNCHES:-40}
TEST_LIMIT=${TEST_LIMIT:-90}     # per test, seconds
BENCH_ITERS=${BENCH_ITERS:-10}

# phase name : its own limit in seconds, in priority order
PHASES=(
  "build:170"
  "bench:grpo:110"
  "bench:visual_tokens:60"
  "bench:varlen:60"
  "tests:120"
  "sanitizer:60"
  "ncu:45"
  "bench:sparse_prefill:40"
)

summary="$OUT/summary.txt"
phase_log="$OUT/phases.jsonl"
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$summary"; }
left() { echo $(( DEADLINE - RESERVE - ($(date +%s) - T0) )); }
budget() { local l; l=$(left); (( l < $1 )) && echo "$l" || echo "$1"; }
wanted() {
  local name=$1
  [[ " $SKIP " == *" $name "* || " $SKIP " == *" ${name%%:*} "* ]] && return 1
  [[ -z "$ONLY" || "$name" == build ]] && return 0
  [[ " $ONLY " == *" $name "* || " $ONLY " == *" ${name%%:*} "* ]]
}
record() {  # phase, budget, seconds, rc, status
  printf '{"phase": "%s", "budget_s": %s, "seconds": %s, "rc": %s, "status": "%s"}\n' "$1" "$2" "$3" "$4" "$5" >> "$phase_log"
}

if [[ -n "${PLAN_ONLY:-}" ]]; then
  total=0
  for p in "${PHASES[@]}"; do
    name=${p%:*}; lim=${p##*:}
    wanted "$name" || { echo "phase $name skipped"; continue; }
    echo "phase $name limit ${lim}s"
    total=$(( total + lim ))
  done
  echo "deadline ${DEADLINE}s reserve ${RESERVE}s sum-of-limits ${total}s"
  exit 0
fi

mkdir -p "$OUT"
: > "$summary"
: > "$phase_log"
say "device_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), deadline ${DEADLINE}s"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || echo "no nvidia-smi"; } | tee -a "$summary"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$summary"

# ---- CUTLASS: only when a source includes it ------------------------------------------------
if grep -rqE '#include *[<"](cutlass|cute)/' csrc 2>/dev/null; then
  if compgen -G ".whl/nvidia_cutlass*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tsparse_site .whl/nvidia_cutlass*.whl \
      && export PYTHONPATH=/tmp/tsparse_site${PYTHONPATH:+:$PYTHONPATH} && say "installed the carried CUTLASS wheel"
  else
    say "a source includes CUTLASS/CuTe headers but .whl/nvidia_cutlass*.whl was not carried (profiling/NOTES.md)"
    exit 1
  fi
fi

# ---- build against this machine's torch ----------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
rm -f tsparse/_C*.so
t=$(budget 170); s=$(date +%s)
if ! TSPARSE_CUDA=1 timeout "$t" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  record build "$t" $(( $(date +%s) - s )) 1 failed
  say "BUILD FAILED (tail of build.log follows)"
  tail -40 "$OUT/build.log" | tee -a "$summary"
  exit 1
fi
record build "$t" $(( $(date +%s) - s )) 0 ok
grep -E "^tsparse: built" "$OUT/build.log" | tee -a "$summary"
export PYTHONPATH=$PWD:$PWD/profiling${PYTHONPATH:+:$PYTHONPATH}
"$PY" -m tsparse 2>&1 | tail -3 | tee -a "$summary"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no usable GPU here: stopping after the build"
  exit 2
fi

BENCH_DIR=$OUT/bench
mkdir -p "$BENCH_DIR"
compile_flag="--no-compile"
[[ " $EXTRA " == *" compile "* ]] && compile_flag="--compile"
status=0

run_bench() {  # family, limit
  local fam=$1 t s rc
  t=$(budget "$2")
  if (( t < 15 )); then record "bench:$fam" "$t" 0 0 "skipped (deadline)"; say "bench $fam skipped (deadline)"; return; fi
  say "bench $fam (limit ${t}s)"
  s=$(date +%s)
  timeout -s INT -k 10 "$t" "$PY" -m benchmarks.report --device cuda --size full --only "$fam" --iters "$BENCH_ITERS" \
    $compile_flag --json "$BENCH_DIR/$fam.json" >> "$OUT/bench.txt" 2>&1
  rc=$?
  record "bench:$fam" "$t" $(( $(date +%s) - s )) "$rc" "$([[ $rc == 0 ]] && echo ok || echo "rc $rc")"
  (( rc != 0 )) && { say "  $fam exited with $rc (see bench.txt)"; status=1; }
}

run_tests() {
  local t s rc plugin=""
  t=$(budget "$1")
  if (( t < 20 )); then record tests "$t" 0 0 "skipped (deadline)"; say "tests skipped (deadline)"; return; fi
  # a per-test limit: pytest-timeout when the image has it, else the dependency-free plugin
  if "$PY" -c "import pytest_timeout" 2> /dev/null; then
    plugin="--timeout=$TEST_LIMIT --timeout-method=signal -p pytest_deadline"
  else
    plugin="-p pytest_deadline"
    export TSPARSE_TEST_TIMEOUT=$TEST_LIMIT
  fi
  export TSPARSE_TEST_LOG=$OUT/tests.jsonl
  : > "$TSPARSE_TEST_LOG"
  say "CUDA tests (limit ${t}s, ${TEST_LIMIT}s per test)"
  s=$(date +%s)
  timeout -s INT -k 20 "$t" "$PY" -m pytest python_tests -m cuda -q -p no:cacheprovider $plugin \
    --junitxml="$OUT/tests-junit.xml" > "$OUT/tests.log" 2>&1
  rc=$?
  record tests "$t" $(( $(date +%s) - s )) "$rc" "$([[ $rc == 0 ]] && echo ok || echo "rc $rc")"
  tail -4 "$OUT/tests.log" | tee -a "$summary"
  (( rc != 0 )) && status=1
}

run_sanitizer() {
  local t s rc
  t=$(budget "$1")
  if ! command -v compute-sanitizer > /dev/null; then record sanitizer 0 0 0 "not installed"; say "compute-sanitizer not found"; return; fi
  if (( t < 20 )); then record sanitizer "$t" 0 0 "skipped (deadline)"; say "sanitizer skipped (deadline)"; return; fi
  say "compute-sanitizer on tsparse kernels (limit ${t}s)"
  s=$(date +%s)
  DEADLINE_S=$t timeout -s INT -k 10 "$t" bash profiling/run_sanitizer.sh "$OUT/sanitizer.log" 2>&1 | tee -a "$summary"
  rc=${PIPESTATUS[0]}
  record sanitizer "$t" $(( $(date +%s) - s )) "$rc" "$([[ $rc == 0 ]] && echo clean || echo "rc $rc")"
  (( rc != 0 )) && status=1
}

run_ncu() {
  local t s rc
  t=$(budget "$1")
  if ! command -v ncu > /dev/null; then record ncu 0 0 0 "not installed"; say "ncu not found"; return; fi
  if (( t < 20 )); then record ncu "$t" 0 0 "skipped (deadline)"; say "ncu skipped (deadline)"; return; fi
  say "ncu on tsparse kernels (limit ${t}s, at most $NCU_LAUNCHES launches)"
  s=$(date +%s)
  NCU_LAUNCHES=$NCU_LAUNCHES timeout -s INT -k 10 "$t" bash profiling/run_ncu.sh "$OUT/ncu.csv" 2>&1 | tee -a "$summary"
  rc=${PIPESTATUS[0]}
  record ncu "$t" $(( $(date +%s) - s )) "$rc" "$([[ $rc == 0 ]] && echo ok || echo "rc $rc")"
}

for p in "${PHASES[@]}"; do
  name=${p%:*}; lim=${p##*:}
  [[ $name == build ]] && continue
  if ! wanted "$name"; then record "$name" 0 0 0 skipped; continue; fi
  case $name in
    bench:*) run_bench "${name#bench:}" "$lim" ;;
    tests) run_tests "$lim" ;;
    sanitizer) run_sanitizer "$lim" ;;
    ncu) run_ncu "$lim" ;;
  esac
done

if [[ " $EXTRA " == *" prefill7b "* ]]; then
  t=$(budget 180); s=$(date +%s)
  say "prefill7b (limit ${t}s)"
  timeout -s INT -k 10 "$t" "$PY" -m benchmarks.bench_sparse_prefill --size 7b --device cuda --json "$OUT/prefill7b.json" >> "$OUT/bench.txt" 2>&1
  rc=$?
  record prefill7b "$t" $(( $(date +%s) - s )) "$rc" "$([[ $rc == 0 ]] && echo ok || echo "rc $rc")"
fi

# ---- one results file ------------------------------------------------------------------------
"$PY" profiling/device_results.py --out "$OUT/results.json" --bench "$BENCH_DIR"/*.json \
  --junit "$OUT/tests-junit.xml" --tests-log "$OUT/tests.jsonl" --sanitizer "$OUT/sanitizer.log" \
  --ncu "$OUT/ncu.csv" --phases "$phase_log" 2>&1 | tee -a "$summary"
say "done (status $status)"
[ -s "$OUT/bench.txt" ] && sed -n '/^op /,/^JSON/p' "$OUT/bench.txt" | grep -v "^JSON" >> "$summary"
exit $status
