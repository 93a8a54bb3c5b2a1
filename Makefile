# Every target bootstraps .venv on first use; later runs reuse it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: serve test lint format proto train clean bench loadtest soak nginx cluster cluster-load

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/gradserve serve $(ARGS)

test: lint nginx
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

# nginx for deploy/cluster.py: Debian's package, installed only when missing (root or sudo).
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  echo "installing nginx (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nginx; }

# N replicas (default 3) behind nginx until Ctrl-C: make cluster ARGS="--replicas 2 --xla off"
cluster: $(STAMP) nginx
	$(BIN)/python deploy/cluster.py $(ARGS)

# loadtest: 1 replica direct and via nginx, then 3 replicas via nginx, at concurrency 1,16,64
cluster-load: $(STAMP) nginx
	$(BIN)/python deploy/cluster.py --load $(ARGS)
