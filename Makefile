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
	$(BIN)/uv pip install -q --python $(BIN)/python -c requirements.lock -e '.[dev,analytics,spark,ml,serving]'
	$(BIN)/python scripts/build_java.py
	touch $(STAMP)

# The unchanged TF Serving client (tensorflow-serving-api pulls in all of TensorFlow) lives in its
# own venv so TensorFlow never shadows the protos the server imports; only the interop test uses it.
# enclaveml itself is installed there too (--no-deps), for the SavedModel runtime tests.
TFCLIENT := $(VENV)/tfclient
TFSTAMP := $(TFCLIENT)/.installed

$(TFSTAMP): $(STAMP) requirements-tfclient.lock
	test -x $(TFCLIENT)/bin/python || $(PYTHON) -m venv $(TFCLIENT)
	$(BIN)/uv pip install -q --python $(TFCLIENT)/bin/python -r requirements-tfclient.lock
	$(BIN)/uv pip install -q --python $(TFCLIENT)/bin/python --no-deps -e .
	$(BIN)/uv pip install -q --python $(TFCLIENT)/bin/python -c requirements.lock cryptography pyjwt cbor2 filelock
	touch $(TFSTAMP)

install: $(STAMP) $(TFSTAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts examples
	$(BIN)/ruff format --check src tests benchmarks scripts examples
	$(BIN)/mypy

test: lint $(TFSTAMP)
	$(BIN)/pytest -n 2

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_crypto.py
	$(BIN)/python benchmarks/bench_attestation.py
	$(BIN)/python benchmarks/bench_broker.py
	$(BIN)/python benchmarks/bench_analytics.py
	$(BIN)/python benchmarks/bench_tpch.py
	$(BIN)/python benchmarks/bench_serving.py

vectors: $(STAMP)
	$(BIN)/python scripts/make_eml_vectors.py

# Re-pin after changing dependencies in pyproject.toml (never run implicitly: a fresh clone installs the lock).
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(BIN)/python -m pip install -q uv==$(UV_VERSION); }
	echo "tensorflow-serving-api==2.21.0" | $(BIN)/uv pip compile -q --python-version 3.11 - -o requirements-tfclient.lock
	$(BIN)/uv pip compile -q --python-version 3.11 --extra dev --extra analytics --extra spark --extra ml --extra serving pyproject.toml -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist src/enclaveml/analytics/jars
