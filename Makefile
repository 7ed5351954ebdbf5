# Esplanade. On a fresh Debian 12 machine, as root:
#   make demo   installs what it needs and runs the main job
#   make test   installs what it needs and runs the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp covers the C hot loop too: an editable install compiles it only at install time.
ESPFAST_SOURCES := $(wildcard services/dataplane/esplanade/dataplane/fastpath/csrc/*.[ch]) hatch_build.py
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt $(ESPFAST_SOURCES) | sha1sum | cut -c1-12)

.PHONY: demo test test-fallback bench lint typecheck proto docs chart-docs venv system-packages clean

system-packages:
	./scripts/install-system-packages.sh

$(STAMP): pyproject.toml constraints.txt $(ESPFAST_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lib services

proto: $(STAMP)
	$(BIN)/python proto/generate.py

docs: $(STAMP) chart-docs
	$(BIN)/esplanade config docs > docs/configuration.md

chart-docs: $(STAMP)
	$(BIN)/python scripts/chart_values_table.py

vm-kernel:
	./tests/vm/setup_vm.sh

test: system-packages vm-kernel venv lint
	$(BIN)/pytest
	$(MAKE) test-fallback

# The dataplane suite again with the compiled ESP loop unimportable: the pure-Python hot path
# must pass it alone (machines without a compiler get that path). tests/dataplane/fastpath
# tests the compiled module itself.
test-fallback: venv
	PYTHONPATH=tests/fallback_lane $(BIN)/pytest -q tests/dataplane -m "not vm" --ignore=tests/dataplane/fastpath

demo: system-packages venv
	$(BIN)/python -m demo

bench: system-packages venv
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
