# tsparse - the two commands for a fresh machine (see README):
#   make demo   creates .venv if missing, installs the pinned dependencies, builds, runs the main job:
#               the dual-stream trainer on the tiny model and synthetic scans (configs/demo.yaml)
#   make test   the same setup, then the whole test suite
# Other targets: make bench (benchmarks and the op report), make wheel (a wheel with the CUDA
# kernels), make build (incremental rebuild of tsparse._C), make sass (what the compiled kernels
# do, read from their SASS; no GPU needed), make lock (re-pin requirements/dev.lock),
# make oldest-torch (build + op tests on torch 2.8 in a separate venv, regenerates the torch API manifest).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tsparse-deps
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS
PYTEST_ARGS ?=
BENCH_ARGS ?=
SASS_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup build test demo bench sass wheel lock info clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Pinned, tested dependency set (torch 2.14.1 CUDA build, verl 0.9.1, transformers 5.10.4, ...).
# tsparse itself is installed editable without building; `make build` compiles tsparse._C in place.
$(STAMP): requirements/dev.lock pyproject.toml | $(PY)
	$(PIP) install --no-deps -r requirements/dev.lock
	TSPARSE_NO_EXT=1 $(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

# Incremental (ninja, objects in build/): CPU kernels always, CUDA kernels when torch has CUDA
# and nvcc is found (TSPARSE_CUDA=0 forces CPU-only; TORCH_CUDA_ARCH_LIST defaults to 9.0a).
build: setup
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest python_tests $(PYTEST_ARGS)

# The main job: stage 0 (format warm-up), stage 1 (localization GRPO) and stage 2 (sparse GRPO)
# on the tiny model, then the summary tables. Output in runs/demo (DEMO_ARGS: overrides, e.g.
# DEMO_ARGS="stages.warmup.steps=100 device=cpu").
demo: build
	$(PY) -m tsparse.train --config configs/demo.yaml $(DEMO_ARGS)

# Freed memory stays mapped during CPU benchmarks, so they time kernels, not page faults.
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=1099511627776 MALLOC_TRIM_THRESHOLD_=1099511627776
bench: build
	$(BENCH_ENV) $(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,max,rounds
	$(PY) -m benchmarks.report $(BENCH_ARGS)

# Per kernel of the built extension: registers, spills, shared memory, occupancy, load/store
# widths, MUFU and branch counts, SASS instructions per element of the hot loops, and the
# compile-time spec of every kernel family (profiling/sass_spec.py). SASS_ARGS: --json, --loops,
# --filter REGEX. Needs the CUDA kernels built in and the pinned cuobjdump/nvdisasm wheels.
sass: build
	$(PY) profiling/sass_report.py --check $(SASS_ARGS)

# A wheel with the CUDA kernels in it (fails if they cannot be built; TSPARSE_CUDA=0 for CPU-only).
wheel: setup
	TSPARSE_CUDA=$${TSPARSE_CUDA:-1} $(PIP) wheel --no-deps --no-build-isolation -w dist .
	$(PY) scripts/check_wheel.py dist/tsparse-*.whl

info: build
	$(PY) -m tsparse

lock:
	scripts/lock.sh

# The oldest supported torch (2.8.0, pyproject's torch>=2.8): a separate venv (VENV_OLDEST=...), a CPU-only
# build in a scratch copy, the op tests, then scripts/torch_api_manifest.json regenerated from it
# (python_tests/test_torch_api.py checks the code against that manifest on every test run).
.PHONY: oldest-torch
oldest-torch:
	scripts/check_oldest_torch.sh $(VENV_OLDEST)

clean:
	rm -rf build dist *.egg-info tsparse/_C*.so csrc/generated bench_results
