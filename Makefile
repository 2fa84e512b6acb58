# Every target creates .venv itself when it is missing: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean vectors lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install -q --python $(BIN)/python -c requirements.lock -e '.[dev,analytics,spark,ml]'
	$(BIN)/python scripts/build_java.py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts examples
	$(BIN)/ruff format --check src tests benchmarks scripts examples
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -n 2

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_crypto.py
	$(BIN)/python benchmarks/bench_attestation.py
	$(BIN)/python benchmarks/bench_broker.py
	$(BIN)/python benchmarks/bench_analytics.py
	$(BIN)/python benchmarks/bench_tpch.py

vectors: $(STAMP)
	$(BIN)/python scripts/make_eml_vectors.py

# Re-pin after changing dependencies in pyproject.toml (never run implicitly: a fresh clone installs the lock).
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(BIN)/python -m pip install -q uv==$(UV_VERSION); }
	$(BIN)/uv pip compile -q --python-version 3.11 --extra dev --extra analytics --extra spark --extra ml pyproject.toml -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist src/enclaveml/analytics/jars
