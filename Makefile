# `make demo` and `make test` set everything up on first use: a .venv with the
# package installed in editable mode and its dev tools.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench notebooks clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/captum-paramsal demo

lint: $(STAMP)
	$(PY) -m ruff check captum_paramsal tests benchmarks tutorials

# everything, lint included: what CI runs (.ci/run)
test: lint
	$(PY) -m pytest -q

# the tests not marked slow (tests/conftest.py names the files marked from there); the summary
# line says how many were left out
test-fast: lint
	$(PY) -m pytest -q -rs -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_saliency.py && $(PY) benchmarks/bench_stats.py && $(PY) benchmarks/bench_input_saliency.py \
	  && $(PY) benchmarks/bench_spade.py

# run the tutorials and write their outputs into the committed notebooks
notebooks: $(STAMP)
	$(PY) tutorials/run_notebooks.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
