# refgw developer commands. `make run` and `make test` are the two commands of README.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install bench bench-growth bench-polling clean

$(BIN)/python:
	@$(PYTHON) -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)" || { echo "make: refgw needs Python >= 3.11 (set PYTHON=...)" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install  ## set up and run the gateway on 127.0.0.1:8080 (SQLite under var/)
	$(BIN)/refgw serve

test: install  ## set up and run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install  ## benchmark (see bench/README.md); DB=sqlite|postgresql
	$(BIN)/python bench/bench_store.py $(BENCH_ARGS)

bench-growth: install  ## cost growth: poll p99 and Bundles/s at 10k, 100k, 1M Tasks (PostgreSQL; see bench/README.md)
	$(BIN)/python bench/bench_store.py --db postgresql --sweep 10000,100000,1000000 --queries 300 --tx 20s $(BENCH_ARGS)

bench-polling: install  ## polling searches on 1M Tasks, PostgreSQL at $$REFGW_BENCH_POSTGRES_URL (see bench/README.md)
	$(BIN)/python bench/bench_polling.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
