#!/usr/bin/env bash
# compute-sanitizer over every tsparse kernel (small shapes, forward + backward of each op):
# memcheck (out-of-bounds / misaligned accesses, leaks of device allocations) and racecheck
# (shared-memory hazards). Writes both logs to $1 (default sanitizer.log); exit 1 on any finding.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-sanitizer.log}
PY=${PYTHON:-python3}
: > "$log"
status=0
for tool in memcheck racecheck; do
  echo "=== compute-sanitizer --tool $tool ===" >> "$log"
  compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$PY" profiling/kernel_cases.py --mode sanitize >> "$log" 2>&1
  rc=$?
  echo "=== $tool exit code $rc ===" >> "$log"
  [ $rc -ne 0 ] && status=1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|exit code" "$log" | tail -2
done
exit $status
