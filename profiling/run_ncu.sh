#!/usr/bin/env bash
# Nsight Compute over tsparse's kernels only, at realistic shapes (profiling/kernel_cases.py --mode
# ncu: a warm-up, then one call of every op between cudaProfilerStart/Stop): kernels whose
# demangled name contains "tsparse::", at most NCU_LAUNCHES of them (default 40), clocks left
# alone (--clock-control none: the boost clocks a real run gets), the metrics
# profiling/ncu_summary.py reads. CSV to $1 (default ncu.csv), then the summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-ncu.csv}
PY=${PYTHON:-python3}
launches=${NCU_LAUNCHES:-40}
metrics=$("$PY" -c "import sys; sys.path.insert(0, 'profiling'); import ncu_summary as s; print(','.join(s.METRICS))")
ncu --clock-control none --target-processes all --profile-from-start off \
    --kernel-name-base demangled --kernel-name "regex:tsparse::" --launch-count "$launches" \
    --metrics "$metrics" --csv --page raw \
    "$PY" profiling/kernel_cases.py --mode ncu > "$out" 2> /tmp/tsparse_ncu.err
rc=$?
tail -5 /tmp/tsparse_ncu.err
"$PY" profiling/ncu_summary.py "$out" || true
exit $rc
