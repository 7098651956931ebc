# One command sets everything up on a fresh machine: `make test` (or `make demo`, `make bench`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every process the tests and the demo start (torchrun, launch's per-node commands) finds the venv's tools
# first: DeepSpeed JIT-builds a CPU op with `ninja`, and two different ninjas on PATH rebuild it each switch.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# One DeepSpeed op cache for every target and every process they start (tests, launch's nodes, demo, faults,
# bench): inside the venv, so `make clean` removes it with the build it belongs to. Two caches meant two
# JIT builds of the CPU comm op (minutes each) on a fresh machine; tests/conftest.py falls back to the same path.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
OPS_STAMP := $(VENV)/.ds_ops_built

.PHONY: install sysdeps test test-quick lint clean

# Debian packages the multi-node launch tests need (sshd + pdsh, a local SLURM cluster, network namespaces).
# Installed only when one is missing and only as root; elsewhere those tests skip with their reason.
SYSDEPS := slurm-wlm munge openssh-server openssh-client pdsh iproute2

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the dependency list or pins change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# DeepSpeed's shared-memory comm op (JIT-compiled with g++ and the venv's ninja), built once here rather than
# by the first test's ranks under its timeout. Rebuilt only with the install stamp (new DeepSpeed or torch):
# the old build is removed first, since torch reuses a cached .so whose sources did not change.
$(OPS_STAMP): $(STAMP)
	rm -rf $(TORCH_EXTENSIONS_DIR)
	OMP_NUM_THREADS=1 $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(OPS_STAMP)

install: $(OPS_STAMP)

sysdeps:
	@missing=$$(for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "sysdeps: not root or no apt-get; missing: $$missing (launch tests needing them will skip)"; exit 0; fi; \
	echo "sysdeps: installing $$missing"; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing

# Two pytest workers (pytest-xdist): one test at a time leaves a core idle during process starts and waits
# (SLURM, timeouts); tests/conftest.py keeps each test file (and the files sharing a session run) on one worker.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# One BLAS thread per process: the multi-process tests run 2+ ranks on 2 cores, and their accuracy
# thresholds were set with single-threaded (deterministic-order) numerics.
test: install sysdeps
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(XDIST)

# The in-process unit tests only (no torchrun, CLI, launcher or training run: tests/conftest.py marks those
# `slow`), for the edit-run loop; `make test` still runs everything. The same workers as `make test`.
test-quick: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" $(XDIST)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The whole pipeline on bundled real images (scikit-learn's digits), in minutes on a CPU: see README.md.
.PHONY: demo bench
demo: install
	$(BIN)/python scripts/demo.py

# Every benchmark in bench/ with settings this machine can run, then their ratios in one table.
bench: install
	$(BIN)/python scripts/bench_all.py

# The randomised, full-size fault suite (tests/faults/ scenarios, several trials each; tens of minutes),
# which rewrites docs/reliability.md. FAULTS_ARGS passes options, e.g. FAULTS_ARGS="--scenario preemption".
.PHONY: faults
faults: install sysdeps
	OMP_NUM_THREADS=1 $(BIN)/python bench/faults.py $(FAULTS_ARGS)
