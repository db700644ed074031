#!/usr/bin/env bash
# Nsight Compute over every tsparse kernel at realistic shapes (profiling/kernel_cases.py):
# one launch of each, clocks left alone (--clock-control none: the boost clocks a real run
# gets), the metrics profiling/ncu_summary.py reads, CSV to $1 (default ncu.csv).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-ncu.csv}
PY=${PYTHON:-python3}
metrics=$("$PY" -c "import sys; sys.path.insert(0, 'profiling'); import ncu_summary as s; print(','.join(s.METRICS))")
# Our kernels, plus cuBLAS GEMMs (the fusion's similarity matmul) for comparison.
regex='regex:(compose|segment_reduce|row_inv_norms|build_inverse|box_mask|seqlens|scan_kernel|pack_kernel|gemm|Kernel|sm90|grpo|logprob|lse)'
ncu --clock-control none --target-processes all --profile-from-start off \
    --kernel-name "$regex" --metrics "$metrics" --csv --page raw \
    "$PY" profiling/kernel_cases.py --mode ncu > "$out" 2> /tmp/tsparse_ncu.err
rc=$?
tail -5 /tmp/tsparse_ncu.err
"$PY" profiling/ncu_summary.py "$out" || true
exit $rc
