# Two entry points on a fresh Debian/Ubuntu machine: `make distill` and `make test`.
# Both create .venv, install the package and make sure Fashion-MNIST is available.

VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST_DIR := /usr/share/datasets/fashion-mnist
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: setup data distill test test-fast lint format bench device-carry clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@python3 -m venv --help >/dev/null 2>&1 && python3 -c "import ensurepip" 2>/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv python3-pip; }
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[tfds,test]'
	touch $@

# Debian's dataset-fashion-mnist where apt-get can install it; otherwise run.py downloads the
# data with tensorflow-datasets on first use.
data:
	@if [ -d $(FMNIST_DIR) ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null && { $(SUDO) apt-get update -qq; \
	      $(SUDO) apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then \
	  echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist in $(FMNIST_DIR)"; \
	else echo "Fashion-MNIST: no Debian package here; tensorflow-datasets will download it"; fi

distill: setup data
	$(PY) run.py --config=$(CONFIG) --workdir=$(WORKDIR)
	@echo "results: $(WORKDIR)/ (distilled.npz, grid.png, accuracy.png, results.json, metrics.jsonl, tensorboard/)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two pytest-xdist workers: most of the suite's time is XLA compiling small programs, one core
# each; more workers than cores only add memory (each imports jax).
TEST_WORKERS ?= 2

test: setup data lint
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(TEST_WORKERS)

# The inner loop while editing: the suite without the tests marked slow (end-to-end runs,
# long trainings); `make test` stays the full gate.
test-fast: setup data
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: setup data
	$(PY) benchmarks/bench_coreset.py

# What a lent GPU machine lacks, for benchmarks/device_suite.sh: the ml-collections wheel
# (pure Python) in .whl/ and the Fashion-MNIST files in .data/ (both git-ignored; the device
# tool's `carry`).
device-carry: setup data
	rm -rf .whl && mkdir -p .whl .data/fashion-mnist
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl \
	  "ml-collections==$$($(PY) -c 'import importlib.metadata as m; print(m.version("ml-collections"))')"
	cp $(FMNIST_DIR)/*.gz .data/fashion-mnist/
	@du -sh .whl .data

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
