#!/usr/bin/env bash
# Builds tsparse against the OLDEST supported torch (2.8.0, pyproject's torch>=2.8) in a separate
# virtualenv, runs the op tests on it, and regenerates scripts/torch_api_manifest.json from it.
#   scripts/check_oldest_torch.sh [VENV]        (default VENV: /work/venvs/torch28, else .venv-torch28)
# Costs measured on the 2-core CPU machine: installing PyPI's torch 2.8.0 (a CUDA 12.8 build:
# 3.3 GB of wheels with its nvidia libraries, 6.5 GB installed) 407 s; the CPU build 88 s; the
# op tests 156 s (408 passed, 407 skipped). Too slow for every CI run; the manifest check in
# python_tests/test_torch_api.py runs there instead (README, "Building").
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.8.0}
VENV=${1:-$([ -d /work/venvs ] && echo /work/venvs/torch28 || echo .venv-torch28)}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
"$PY" -m pip install -q "torch==$TORCH_VERSION" numpy pytest "setuptools>=77" wheel pybind11 ninja
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$src"
(cd "$src" && TSPARSE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace)
(cd "$src" && "$PY" -m pytest -q -p no:cacheprovider python_tests/test_visual_tokens.py python_tests/test_varlen.py \
  python_tests/test_grpo.py)
"$PY" scripts/torch_api.py generate
