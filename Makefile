# A newcomer's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint chaos outage fuzz soak evaluate clean

$(BIN)/segment-worker: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/segment-worker
	$(BIN)/segment-worker demo

lint: $(BIN)/segment-worker
	$(BIN)/ruff check worker schemas config tests
	$(BIN)/ruff format --check worker schemas config tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

chaos: $(BIN)/segment-worker  ## the full chaos test: 50k events, SIGKILL three times
	CHAOS_EVENTS=50000 $(BIN)/python -m pytest -q tests/test_chaos.py

outage: $(BIN)/segment-worker  ## Redis down for 20 s mid-stream; the broker crashed and down 20 s
	OUTAGE_SECONDS=20 $(BIN)/python -m pytest -q tests/test_outages.py

fuzz: $(BIN)/segment-worker  ## 100k fuzzed records mixed into a stream
	FUZZ_MESSAGES=100000 $(BIN)/python -m pytest -q tests/test_fuzz.py

evaluate: $(BIN)/segment-worker  ## segment quality and drift response, 20k users, 3M events (~6-10 min)
	$(BIN)/segment-worker evaluate

soak: $(BIN)/segment-worker  ## 10 minutes at 2,000 events/s, ~1M distinct users: RSS must plateau
	SOAK_SECONDS=600 SOAK_RATE=2000 SOAK_CACHE=200000 $(BIN)/python -m pytest -q -s tests/test_soak.py
