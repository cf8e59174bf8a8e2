# make demo: run the main job on SmolLM2-135M (shipped in a package, no downloads).
# make test: lint, format check and the test suite.
# Both create or reuse .venv. torch==2.13.0 (the CPU build on this machine's disk) is installed
# first, only when the venv has no torch: with VENV_FLAGS=--system-site-packages a user's own CUDA
# torch is kept.
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.qlora-installed

.PHONY: install demo test lint bench
install: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0 triton==3.7.1
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps -r requirements-assets.txt
	touch $(STAMP)

demo: install
	$(VENV)/bin/qlora-compile demo --out demo_out

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the suite on both cores of the reference machine: each test file runs whole in one worker, so a
# file's shared fixtures (compiled models) are built once
PYTEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

bench: install
	$(PY) benchmarks/bench_format.py
