# Two commands do all set-up on a fresh machine:
#   make demo   - install, then run the main example
#   make test   - install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt

demo: install
	$(BIN)/python examples/quickstart.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_nulls.py

clean:
	rm -rf $(VENV) wandb lightning_logs *.egg-info
