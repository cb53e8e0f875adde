# Two entry points (see README): `make demo` sets up and runs the default workflow on the
# built-in phantom; `make test` sets up and runs the test suite. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: setup demo test lint docs-check clean

$(BIN)/sraseg: pyproject.toml requirements/constraints.txt requirements/standin.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev,slurm]'
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/standin.txt
	touch $@

setup: $(BIN)/sraseg

# Rules call `python -m sraseg`: the venv's python must come first on PATH.
RUN := PATH="$(abspath $(BIN)):$$PATH"
SNAKEMAKE := $(RUN) $(BIN)/snakemake --snakefile workflow/Snakefile

demo: setup
	$(SNAKEMAKE) --configfile config/config.yaml --cores $(CORES)
	$(SNAKEMAKE) --configfile config/config.yaml --report results/phantom/report/report.html

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(SNAKEMAKE) --lint
	HF_HUB_OFFLINE=1 $(RUN) $(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(SNAKEMAKE) --lint

# Broken relative links, missing heading anchors and named repository files that do not exist
# in README.md, CONTRIBUTING.md, config/README.md, docs/ and benchmarks/ (seconds, no workflow run).
docs-check: setup
	$(BIN)/python -m pytest tests/test_docs.py -q

clean:
	rm -rf results resources .snakemake
