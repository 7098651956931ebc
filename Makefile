# One command sets everything up on a fresh machine: `make test` (or `make demo`, `make bench`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the dependency list or pins change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

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
