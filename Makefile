# The README's two commands: `make demo` and `make test`. Both work as the first command on a fresh machine
# that has Python 3.11, git and make: they create .venv, install headlab from the lock, then run.
#
# Versions: constraints/lock.txt holds the exact version of every package the suite last passed with (all but
# torch, which is platform-specific and pinned in constraints/cpu.txt to the local 2.13.0 CPU wheel).
# pyproject.toml keeps the honest ranges that `pip install headlab` resolves in a user's own environment.
#   make lock          newest versions the index offers -> run the suite -> if it passes, write them to the lock
#   make test-latest   the suite against the newest versions (finds drift before a user does; lock untouched)
#   make test-oldest   the suite against the oldest transformers / transformer-lens pyproject.toml admits
# GPU machines: install CUDA torch first, then `make install CONSTRAINTS= LOCK=` (ranges, your torch kept).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP = $(PY) -m pip install --disable-pip-version-check -q
CONSTRAINTS ?= constraints/cpu.txt
LOCK ?= constraints/lock.txt
OLDEST := constraints/oldest.txt

.PHONY: demo test install install-dev browser-deps lint format bench bench-gpu lock test-latest test-oldest clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "headlab needs $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# with a lock: torch from CONSTRAINTS, every other package at its locked version, headlab itself, then a
# consistency check; without one (LOCK=): the ranges of pyproject.toml, resolved by pip
$(VENV)/.installed: $(PY) pyproject.toml $(LOCK) $(CONSTRAINTS)
ifeq ($(LOCK),)
	$(PIP) $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
else
	$(if $(CONSTRAINTS),$(PIP) -r $(CONSTRAINTS))
	$(PIP) --no-deps -r $(LOCK)
	$(PIP) --no-deps -e .
	$(PY) -m pip check
endif
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed

# the dashboard's browser test needs Debian's headless Chromium and its driver (skipped without them)
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver; \
		else echo "note: install chromium and chromium-driver (as root) to run the dashboard browser test"; fi; \
	fi

demo: $(VENV)/.installed
	$(VENV)/bin/headlab demo
	$(VENV)/bin/headlab report pope --out out/demo/report --interventions none,vhr,var

test: $(VENV)/.installed browser-deps
	$(PY) -m pytest -q

# a fresh virtualenv $(1) with the ranges of pyproject.toml under the constraint files $(2), then the suite
define suite_in_fresh_venv
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --disable-pip-version-check -q $(foreach c,$(2),-c $(c)) -e ".[dev]"
	$(1)/bin/python -m pip check
	$(1)/bin/python -m pip freeze --exclude-editable | grep -v '^torch==' > $(1)/versions.txt
	@echo "packages that differ from $(LOCK) (< lock, > this run):"; diff $(LOCK) $(1)/versions.txt | grep '^[<>] [^#]' || echo "  none"
	$(1)/bin/python -m pytest -q
endef

test-latest: browser-deps
	$(call suite_in_fresh_venv,.venv-latest,$(CONSTRAINTS))

test-oldest: browser-deps
	$(call suite_in_fresh_venv,.venv-oldest,$(CONSTRAINTS) $(OLDEST))

lock: test-latest
	{ echo "# Exact versions the whole suite last passed with (written by \`make lock\` on $$(date -u +%F), Python $$(.venv-latest/bin/python -c 'import platform; print(platform.python_version())'))."; \
	  echo "# \`make demo\` and \`make test\` install these; torch is pinned apart in constraints/cpu.txt."; \
	  cat .venv-latest/versions.txt; } > $(LOCK)
	@echo "wrote $(LOCK)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed
	$(PY) benchmarks/capture_memory.py && $(PY) benchmarks/store_io.py && $(PY) benchmarks/startup.py

# on a CUDA machine with CUDA torch installed (make install CONSTRAINTS= LOCK=): the Triton kernel's GPU
# tests, then its benchmark against SDPA flash and FlexAttention (writes benchmarks/results/fused_attention.*)
bench-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu tests/test_kernels_fused.py && $(PY) benchmarks/fused_attention.py

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest build *.egg-info .pytest_cache .ruff_cache
