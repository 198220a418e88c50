# Set-up is part of every target: `make quickstart` and `make test` each install what they need on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
# torch==2.13.0 is a CPU build where a local wheel is configured (as on our CI machines) and a CUDA build from PyPI
# elsewhere. Override to pick another build, e.g. `make install TORCH="torch==2.13.0 --index-url ..."`.
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin
PYTEST_ARGS ?= -m "not slow"

.PHONY: install quickstart test test-slow test-all lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) -e ".[dev]"
	touch $@

quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/litune fit --config configs/quickstart.yaml
	$(BIN)/litune generate --checkpoint "$$(ls -d runs/*-quickstart | tail -n 1)" \
		--prompt "def" --max-length 96 --num-return-sequences 2 --do-sample --top-k 40 --temperature 0.8

test: install
	$(BIN)/ruff check src tests bench
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# The slow suite alone (CI runs `make test` and then this): what `make test` leaves out.
test-slow: PYTEST_ARGS = -m slow
test-slow: test

test-all: PYTEST_ARGS =
test-all: test
