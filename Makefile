# Set-up and entry points. `make run` runs the main job, `make test` the test suite;
# both create the virtual environment first if it is missing or out of date.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup profiles run test test-fast lint clean pretrain publish-phantom

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

# The released phantom model (variant phantom-ct): its recipe, config/pretrain/phantom.yaml, run by the workflow in a
# folder of its own (it resumes there: hours on 2 CPU cores, minutes on a GPU).
PRETRAIN_DIR ?= pretrain/phantom
PRETRAIN_MODELS := results/models/autoencoder.pt results/models/diffusion_unet.pt results/models/controlnet.pt

pretrain: setup
	mkdir -p $(PRETRAIN_DIR)/config
	cp config/pretrain/phantom.yaml $(PRETRAIN_DIR)/config/config.yaml
	$(BIN)/snakemake --profile profiles/local --snakefile $(CURDIR)/Snakefile --directory $(PRETRAIN_DIR) \
		--config catalog=$(CURDIR)/config/datasets.yaml -- $(PRETRAIN_MODELS)

# Its quality on its own generation (benchmarks/phantom_model.py, in PRETRAIN_DIR/quality), then the checkpoints,
# model card, figures and montage into the package (maisi/data/weights/phantom-ct) and the weights catalog.
publish-phantom: setup
	$(BIN)/python benchmarks/phantom_model.py --pretrain-dir $(PRETRAIN_DIR) --out $(PRETRAIN_DIR)/quality
	$(BIN)/python -m maisi.release.model publish --workdir $(PRETRAIN_DIR) --quality $(PRETRAIN_DIR)/quality/phantom_model.json \
		--montage $(PRETRAIN_DIR)/quality/results/generated/montage.png

lint: setup
	$(BIN)/ruff check .
	$(BIN)/python tests/helpers/lint_workflow.py

test: lint
	$(BIN)/python -m pytest -q -ra

# The edit loop's lane: ruff and the unit tests, no workflow run.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra tests/unit

clean:
	rm -rf results resources logs .snakemake
