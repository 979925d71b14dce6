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

.PHONY: setup test test-gpu gpu-check demo clean
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

# The TensorRT suite (tests/test_trt_gpu.py): real engines for the tiny bundles, ORT/TRT parity, and the
# TensorRT behaviour the CPU tests check against stand-ins (errors from status codes, engine limits, the
# extend profile, fp16 KV, no allocation per token). For a machine with an NVIDIA GPU and TensorRT: there a
# missing TensorRT or GPU fails the run instead of skipping it (-rs lists any skip and why).
test-gpu: setup
	FLASHVL_REQUIRE_TRT=1 $(PY) -m pytest -q -rs -m trt tests/test_trt_gpu.py

# ONNX Runtime CUDA parity (fp16 on the GPU vs fp32 on the CPU) and speed of the tiny and full-size static
# presets, one JSON (build/gpu-check/gpu_check.json) and a table: scripts/gpu_check.py. For a machine with
# an NVIDIA GPU; it builds its own venv (build/gpu-venv, pinned onnxruntime-gpu), so it does not need setup.
# Without a GPU it exits 2 with one line. Extra options: make gpu-check GPU_CHECK_ARGS="--reuse-bundles".
gpu-check:
	python3 scripts/gpu_check.py $(GPU_CHECK_ARGS)

# Export the random-init tiny-static preset and chat about a real photo (answer + metrics).
demo: setup
	$(FLASHVL) export tiny-static --out build/demo/tiny-static --force
	$(PY) scripts/demo.py build/demo/tiny-static

clean:
	rm -rf build .pytest_cache

# ---- engines: export -> (calibrate, for int8) -> TensorRT build, with real file dependencies.
# make engines MODEL=<checkpoint dir|preset> PRECISION=fp16|int8 OUT=<dir>
# Each stage's manifest.json is the target (written last by that stage), so re-running redoes only what
# changed: a newer checkpoint file re-exports; a newer FP bundle re-calibrates; engines are rebuilt when
# the bundle they are built from changed. Without TensorRT the build stage prints one line saying what is
# missing and how to get it, and make stops there (exit 2) with the ONNX bundle(s) in place.
MODEL     ?= tiny-static
PRECISION ?= fp16
OUT       ?= build/engines/$(notdir $(MODEL))-$(PRECISION)
CALIB_LLM ?= int8
BUILD_ARGS ?=
# a checkpoint directory's files are the export's prerequisites; a preset has none but the code
MODEL_FILES := $(if $(wildcard $(MODEL)/*),$(wildcard $(MODEL)/*),)
ENGINE_SRC := $(if $(filter int8,$(PRECISION)),$(OUT)/int8,$(OUT)/fp)

.PHONY: engines
engines: $(OUT)/engines.stamp

$(OUT)/fp/manifest.json: $(MODEL_FILES) | setup
	$(FLASHVL) export $(MODEL) --out $(OUT)/fp --force --quiet

$(OUT)/int8/manifest.json: $(OUT)/fp/manifest.json
	$(FLASHVL) calibrate $(OUT)/fp --out $(OUT)/int8 --vision int8 --llm $(CALIB_LLM) --force --quiet

$(OUT)/engines.stamp: $(ENGINE_SRC)/manifest.json
	$(FLASHVL) build $(ENGINE_SRC) --precision $(PRECISION) $(BUILD_ARGS)
	@touch $@
