# Every target bootstraps .venv on first use; later runs reuse it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: serve test lint format proto train clean bench loadtest soak

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/gradserve serve $(ARGS)

test: lint
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: $(STAMP)
	$(BIN)/python protos/generate.py

train: $(STAMP)
	$(BIN)/gradserve train

clean:
	rm -rf $(VENV) build *.egg-info

bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

loadtest: $(STAMP)
	$(BIN)/gradserve loadtest $(ARGS)

soak: $(STAMP)
	$(BIN)/python bench/soak.py $(ARGS)
