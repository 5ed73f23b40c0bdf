#!/usr/bin/env bash
# CUDA QLoRA: orpo_local against TRL + bitsandbytes (bench/gpu_bench.py) on a GPU machine without internet.
#
#   bash bench/gpu.sh download                  # where pip reaches PyPI, in the repository: the wheels into .whl/
#   bash bench/gpu.sh [ARGS...]                 # on the GPU machine: install them and orpo_local into a scratch
#                                               # folder and run bench/gpu_bench.py ARGS, all inside 8 minutes
#   bash bench/gpu.sh --models llama-3-8b --json results.json
#
# The GPU machine has torch, transformers, peft and accelerate but not bitsandbytes, trl or the datasets
# package trl needs (with dill and multiprocess); WHEELS names the folder they travel in (default .whl,
# which git ignores). The pins are the versions this project's CPU tests run with.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"
PYTHON="${PYTHON:-python3}"
PINS=(bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

if [ "${1:-}" = download ]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
    platforms+=(--platform "$p")
  done
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$WHEELS" "${PINS[@]}"
  exit 0
fi

SITE="$(mktemp -d)"
if ! "$PYTHON" -c "import bitsandbytes, trl" 2>/dev/null; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "bitsandbytes and trl are not installed and $WHEELS/ holds no wheels: run 'bash bench/gpu.sh download'" \
         "where pip reaches PyPI and bring that folder along" >&2
    exit 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
fi
# orpo_local laid out as pyproject.toml's package-dir installs it: backends/ inside the package.
cp -r orpo_local "$SITE/orpo_local"
cp -r backends "$SITE/orpo_local/backends"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# gpu_bench.py stops its own work at --deadline-s (420 s); this is the backstop.
exec timeout 450 "$PYTHON" bench/gpu_bench.py "$@"
