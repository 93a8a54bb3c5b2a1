# Every target bootstraps .venv on first use; later runs reuse it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: serve test lint format proto train clean bench bench-swap bench-backends perf-analyzer \
	device-bundle device-rehearsal loadtest soak nginx chromium docs docs-serve \
	promtool \
	cluster cluster-load \
	image image-host image-test explain-demo

# The container image: name and tag live in deploy/image.env (the k8s manifests use the same).
include deploy/image.env
VARIANT ?= cpu
TENSORFLOW_cpu := tensorflow==2.21.*
TENSORFLOW_gpu := tensorflow[and-cuda]==2.21.*
TENSORFLOW := $(TENSORFLOW_$(VARIANT))
IMAGE := $(IMAGE_NAME):$(IMAGE_TAG)$(if $(filter gpu,$(VARIANT)),-gpu)
BASE_IMAGE ?= localhost/debian-python:bookworm
WHEELS := build/wheels/$(VARIANT)
# Every file of every package folder (setup.py names the folders), so that a change anywhere
# in them rebuilds gradserve's wheel.
PACKAGE_SOURCES := pyproject.toml setup.py $(shell find protos wire server client -type f \
	-not -path '*/__pycache__/*')

$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/gradserve serve $(ARGS)

test: lint nginx promtool chromium
	$(BIN)/python -m pytest $(ARGS)

# The documentation site (mkdocs.yml; the reference pages are generated from the code at each
# build). The variables silence the tools' notices about their successors.
DOCS_ENV := DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1
docs: $(STAMP)
	$(DOCS_ENV) $(BIN)/mkdocs build --strict --site-dir build/site

docs-serve: $(STAMP)
	$(DOCS_ENV) $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: $(STAMP)
	$(BIN)/python protos/generate.py

train: $(STAMP)
	$(BIN)/gradserve train

# serves the bundled digits model, explains a few digits, writes docs/explanations.png
explain-demo: $(STAMP)
	$(BIN)/python demo/explain_demo.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Wheels built on the host with its pip configuration; the image installs only these
# (--no-index), so its build needs no network. Dependencies (rebuilt when pyproject.toml
# changes) and gradserve itself (rebuilt when its code changes) are apart, so that a code
# change rebuilds only the image's small last layer.
$(WHEELS)/.complete: pyproject.toml | $(STAMP)
	@test -n "$(TENSORFLOW)" || { echo "VARIANT must be cpu or gpu"; exit 1; }
	$(BIN)/python -m pip wheel --quiet -w $(WHEELS) '.[server]' '$(TENSORFLOW)'
	rm -f $(WHEELS)/gradserve-*.whl
	touch $@

build/wheels/app/.complete: $(PACKAGE_SOURCES) | $(STAMP)
	rm -rf build/wheels/app
	$(BIN)/python -m pip wheel --quiet --no-deps -w build/wheels/app .
	touch $@

# podman, runc and mmdebstrap, and the local base image: each only when missing.
image-host:
	deploy/image/prepare-host.sh $(BASE_IMAGE)

# make image [VARIANT=gpu] [BASE_IMAGE=python:3.11-slim]
image: export CONTAINERS_CONF = $(CURDIR)/deploy/image/containers.conf
image: image-host $(WHEELS)/.complete build/wheels/app/.complete
	@start=$$(date +%s); \
	podman build --network host --build-arg BASE=$(BASE_IMAGE) --build-arg WHEELS=$(WHEELS) \
	  --build-arg TENSORFLOW='$(TENSORFLOW)' --build-arg VERSION=$(IMAGE_TAG) \
	  --tag $(IMAGE) --file Dockerfile . && \
	echo "built $(IMAGE) in $$(( $$(date +%s) - start )) s: \
	$$(podman image inspect --format '{{.Size}}' $(IMAGE) | awk '{printf "%.0f MB", $$1 / 1e6}')"

# Runs the image and checks it from the host: health, a gradient, SIGTERM drain, exit 0.
image-test: export CONTAINERS_CONF = $(CURDIR)/deploy/image/containers.conf
image-test: image
	$(BIN)/python deploy/image/check_image.py $(IMAGE)

# perf_analyzer (the independent load generator `make bench` uses where it runs): the files
# of the last tritonclient wheel that carries it, the CUDA runtime library it links (no GPU
# needed) and libb64 (Debian package libb64-0d, unpacked beside them, so that no system
# install is needed). Kept apart from the venv: that wheel pins numpy<2 and protobuf<5.
PERF_ANALYZER_DIR := build/perf_analyzer
$(PERF_ANALYZER_DIR)/bin/perf_analyzer: | $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --target $(PERF_ANALYZER_DIR) \
		tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.*

$(PERF_ANALYZER_DIR)/lib/libb64.so.0d:
	rm -rf build/debs && mkdir -p build/debs $(@D)
	cd build/debs && apt-get download libb64-0d 2>/dev/null
	dpkg -x build/debs/libb64-0d_*.deb build/debs/libb64
	cp build/debs/libb64/usr/lib/x86_64-linux-gnu/libb64.so.0d $@

perf-analyzer: $(PERF_ANALYZER_DIR)/bin/perf_analyzer $(PERF_ANALYZER_DIR)/lib/libb64.so.0d

# What the accelerator machine lacks, to carry there (bench/device.sh, docs/benchmarks.md):
# Python 3.12 wheels of the packages it does not have, at this venv's versions, and
# perf_analyzer with its libraries.
device-bundle: perf-analyzer
	$(BIN)/python bench/device_bundle.py build/device

# bench/device.sh here, on the CPU, with TensorFlow hidden as on the accelerator machine.
device-rehearsal: $(STAMP)
	-$(MAKE) --no-print-directory perf-analyzer
	PYTHONPATH=bench/no_tensorflow DEVICE_PYTHON=$(BIN)/python OUT=build/device-rehearsal \
		bash bench/device.sh --frontends 1,2 --budget 240 $(ARGS)

# Best effort: without perf_analyzer the bench says so and uses gradserve loadtest alone.
bench: $(STAMP)
	-$(MAKE) --no-print-directory perf-analyzer
	$(BIN)/python bench/run.py $(ARGS)
	$(BIN)/python bench/swap.py
	$(BIN)/python bench/backends.py

# TensorFlow and JAX side by side: engine ceilings, servers under perf_analyzer, start-up.
bench-backends: $(STAMP)
	-$(MAKE) --no-print-directory perf-analyzer
	$(BIN)/python bench/backends.py $(ARGS)

bench-swap: $(STAMP)
	$(BIN)/python bench/swap.py $(ARGS)

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

# Chromium for the explorer page's browser tests (Playwright drives it): Debian's package,
# installed only when missing (root or sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# promtool, to check and unit-test deploy/prometheus/alerts.yml: Debian's prometheus package,
# downloaded and unpacked into build/ (no root needed). Where apt-get is missing, the tests
# check the rules with their own parser only, and say so.
PROMTOOL := build/promtool/usr/bin/promtool
promtool: $(PROMTOOL)
$(PROMTOOL):
	@mkdir -p build/promtool && cd build/promtool && \
	  { apt-get download prometheus >/dev/null 2>&1 && dpkg -x prometheus_*.deb . && \
	    rm -rf prometheus_*.deb usr/bin/prometheus usr/share; } || echo "promtool unavailable: alerts checked by parser only"

# N replicas (default 3) behind nginx until Ctrl-C: make cluster ARGS="--replicas 2 --xla off"
cluster: $(STAMP) nginx
	$(BIN)/python deploy/cluster.py $(ARGS)

# loadtest: 1 replica direct and via nginx, then 3 replicas via nginx, at concurrency 1,16,64
cluster-load: $(STAMP) nginx
	$(BIN)/python deploy/cluster.py --load $(ARGS)
