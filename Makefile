# edgewatch developer entry points. Every target installs what it needs first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench model soak clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	@touch $(STAMP)

## install: .venv with the agent, the train extra (CPU torch) and dev tools
install: $(STAMP)

## demo: simulator on a pty with a fault, the agent on models/default, alerts to console + local mosquitto
demo: install
	@bash scripts/demo.sh

## test: ruff, then the whole pytest suite (starts its own mosquitto brokers)
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## bench: every performance figure next to its reference; rewrites docs/benchmarks.md
bench: install
	$(BIN)/edgewatch bench --out docs/benchmarks.md --json bench.json

## model: regenerate models/default from a fixed-seed simulator recording
model: install
	$(BIN)/python -m training.default_model --out models/default

## soak: the long reliability runs (kill -9 x50, 100k generated inputs), about 10 minutes on 2 cores
soak: install
	$(BIN)/pytest -q -s tests/soak_crash.py tests/soak_input.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
