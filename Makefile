# Two commands do all set-up on a fresh machine:
#   make demo   - install, then run the main example
#   make test   - install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench confounders text clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip byte-compiles what it installs on one core, about half the install's time: the packages
# are compiled afterward on every core instead (-j 0).  A few files of the packages' own test
# helpers need a newer Python and do not compile, under pip as here (hence "|| true").
install: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -r requirements-dev.txt
	$(BIN)/python -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true

demo: install
	$(BIN)/python examples/quickstart.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_nulls.py
	$(BIN)/python benchmarks/bench_family_nulls.py
	$(BIN)/python benchmarks/bench_gram_null.py
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/bench_threads.py
	$(BIN)/python benchmarks/bench_large_n.py
	$(BIN)/python benchmarks/bench_callback_overhead.py

confounders: install
	$(BIN)/python examples/confounders.py

text: install
	$(BIN)/python examples/text_reference.py

# what the examples write into the repository root (--out .): logs, figures, and end-of-fit
# reports (alignment_report*, wide_report*) of runs whose logger wrote them there
clean:
	rm -rf $(VENV) wandb lightning_logs mlruns mlflow.db alignment_out *.egg-info \
		alignment_curves.png alignment_heatmap.png text_alignment_*.png \
		alignment_report*.md alignment_report*.html alignment_report*.png wide_report*.png
