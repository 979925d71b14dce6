# flashvl-edge: the README's commands. Each target creates its own virtual environment (.venv)
# unless one is already active.

ifdef VIRTUAL_ENV
PY    := $(VIRTUAL_ENV)/bin/python
STAMP := $(VIRTUAL_ENV)/.flashvl-edge-installed
else
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.flashvl-edge-installed
endif
FLASHVL := $(PY) -m flashvl_edge.main

.PHONY: setup test test-gpu demo clean
.DEFAULT_GOAL := test

setup: $(STAMP)

# torch is installed first and pinned exactly: an unpinned torch pulls gigabytes of CUDA wheels.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

test: setup
	$(PY) -m pytest -q

# The TensorRT parity suite: runs on a machine with an NVIDIA GPU and TensorRT, skips elsewhere.
test-gpu: setup
	$(PY) -m pytest -q -m trt

demo: setup
	$(FLASHVL) export tiny-static --out build/demo/tiny-static --force
	$(FLASHVL) verify build/demo/tiny-static --against tiny-static

clean:
	rm -rf build .pytest_cache
