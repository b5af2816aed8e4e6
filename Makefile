# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint

# torch is installed first, pinned to the CPU build that lies on these machines (a bare `pip install
# torch` would pull a multi-GB CUDA build); the package's own `torch>=2.13` is then already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[reference,dev,serve,ray]'
	touch $@

# TensorRT's type stubs, fixed for mypy, outside the venv: `import tensorrt` keeps failing honestly.
TYPINGS := .typings/tensorrt/__init__.pyi
$(TYPINGS): tools/tensorrt_stubs.py | $(STAMP)
	$(BIN)/python tools/tensorrt_stubs.py .typings

demo: $(STAMP)
	$(BIN)/dgrt demo

test: $(STAMP) $(TYPINGS)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy --config-file mypy-tensorrt.ini
	$(BIN)/python -m pytest -q

lint: $(STAMP) $(TYPINGS)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy --config-file mypy-tensorrt.ini
