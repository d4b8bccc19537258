# edgewatch developer entry points. Every target installs what it needs first.
# python3.11 when there is one, else python3 (checked to be >= 3.11 below)
PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3.11)
# extra pip options for the install, e.g. PIP_OPTS="--extra-index-url <PyTorch's CPU wheel index>" (README)
PIP_OPTS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GW_STAMP := $(VENV)/.installed-gateway

.PHONY: install demo test lint bench model soak clean

VENV_OK := $(VENV)/.created

$(VENV_OK):
	@command -v $(PY) >/dev/null 2>&1 || { echo "need Python >= 3.11 on PATH (python3.11 or python3)"; exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PY) is older than 3.11"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@touch $(VENV_OK)

# Everything: the agent, the train extra and the dev tools (make test, bench, model).
$(STAMP): pyproject.toml $(VENV_OK)
	$(BIN)/pip install -q $(PIP_OPTS) -e '.[train,dev]'
	@touch $(STAMP)

# The gateway part only (no torch, no scikit-learn): what `make demo` needs.
$(GW_STAMP): pyproject.toml $(VENV_OK)
	$(BIN)/pip install -q $(PIP_OPTS) -e .
	@touch $(GW_STAMP)

## install: .venv with the agent, the train extra (torch 2.13.0; see README for the CPU build) and dev tools
install: $(STAMP)

## demo: simulator on a pty with a fault, the agent on models/default (gateway install: no torch), alerts to console + local mosquitto
demo: $(GW_STAMP)
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
