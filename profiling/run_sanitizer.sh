#!/usr/bin/env bash
# compute-sanitizer over tsparse's kernels only (small shapes, forward + backward of every op,
# profiling/kernel_cases.py --mode sanitize): memcheck (out-of-bounds / misaligned accesses, leaks
# of device allocations), then racecheck (shared-memory hazards) if the time left allows
# (DEADLINE_S: seconds this script may take, default 300). Kernels of torch / cuBLAS are not
# instrumented (a kernel-name filter on "tsparse"), which keeps the run short.
# Writes both logs to $1 (default sanitizer.log); exit 1 on any finding.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-sanitizer.log}
PY=${PYTHON:-python3}
budget=${DEADLINE_S:-300}
T0=$(date +%s)
: > "$log"
# The filter option was --filter kns=... in older releases, --kernel-name kns=... in newer ones.
if compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name"; then
  filter=(--kernel-name kns=tsparse)
else
  filter=(--filter kns=tsparse)
fi
status=0
for tool in memcheck racecheck; do
  used=$(( $(date +%s) - T0 ))
  if [[ $tool == racecheck ]] && (( used * 2 > budget )); then
    echo "=== compute-sanitizer --tool racecheck skipped: memcheck took ${used}s of ${budget}s ===" >> "$log"
    echo "racecheck skipped (time)"
    continue
  fi
  echo "=== compute-sanitizer --tool $tool ===" >> "$log"
  compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 1 --print-limit 20 \
      "$PY" profiling/kernel_cases.py --mode sanitize >> "$log" 2>&1
  rc=$?
  echo "=== $tool exit code $rc ===" >> "$log"
  [ $rc -ne 0 ] && status=1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|exit code" "$log" | tail -2
done
exit $status
