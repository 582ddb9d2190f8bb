# The README's two commands: `make demo` and `make test`. Both work as the first command on a fresh machine
# that has Python 3.11, git and make: they create .venv, install headlab, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP = $(PY) -m pip install --disable-pip-version-check -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# CPU-only machines pin torch to the local 2.13.0 CPU wheel; GPU users: `make install CONSTRAINTS=`.
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: demo test install install-dev browser-deps lint format bench bench-gpu clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "headlab needs $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints/cpu.txt
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# the dashboard's browser test needs Debian's headless Chromium and its driver (skipped without them)
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver; \
		else echo "note: install chromium and chromium-driver (as root) to run the dashboard browser test"; fi; \
	fi

demo: $(VENV)/.installed
	$(VENV)/bin/headlab demo
	$(VENV)/bin/headlab report pope --out out/demo/report --interventions none,vhr,var

test: $(VENV)/.installed-dev browser-deps
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed
	$(PY) benchmarks/capture_memory.py && $(PY) benchmarks/store_io.py

# on a CUDA machine with CUDA torch installed (make install CONSTRAINTS=): the Triton kernel's GPU tests,
# then its benchmark against SDPA flash and FlexAttention (writes benchmarks/results/fused_attention.*)
bench-gpu: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m gpu tests/test_kernels_fused.py && $(PY) benchmarks/fused_attention.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
