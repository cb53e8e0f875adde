# Two entry points (see README): `make demo` sets up and runs the default workflow on the
# built-in phantom; `make test` sets up and runs the test suite. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: setup demo test lint clean

$(BIN)/sraseg: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev,slurm]'
	touch $@

setup: $(BIN)/sraseg

demo: setup
	$(BIN)/snakemake --snakefile workflow/Snakefile --configfile config/config.yaml --cores $(CORES)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/snakemake --snakefile workflow/Snakefile --configfile config/config.yaml --lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakemake --snakefile workflow/Snakefile --lint

clean:
	rm -rf results resources .snakemake
