# Set-up and entry points. `make run` runs the main job, `make test` the test suite;
# both create the virtual environment first if it is missing or out of date.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup profiles run test lint clean

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# The local and slurm profiles by name (snakemake --profile slurm): links in Snakemake's profile folder.
profiles: setup
	$(BIN)/python -m maisi.profiles install

run: setup
	$(BIN)/snakemake --profile profiles/local all

lint: setup
	$(BIN)/ruff check .
	$(BIN)/python tests/helpers/lint_workflow.py

test: lint
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf results resources logs .snakemake
