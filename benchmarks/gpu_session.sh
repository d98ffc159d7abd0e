#!/usr/bin/env bash
# The device tool's command for one GPU lease (see benchmarks/gpu_session.py; prepare first, here:
# `python -m benchmarks.gpu_session prepare`; then run with carry [".whl", ".gpu-data"], timeout_s 600).
# Installs the carried wheels and this checkout (no network there), then runs every GPU step from outside the
# checkout, so that the installed package (with its kernels/ and adapters/ mapping) is the one imported.
set -u
R=$PWD
: "${OUT:?OUT must name the folder whose files come back}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_session.sh: installing the carried wheels failed (run 'prepare' here and carry .whl)"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation "$R" \
  || { echo "gpu_session.sh: installing romav2_plugin from $R failed"; exit 3; }
mkdir -p /tmp/gpu_session && ln -sfn "$R/benchmarks" /tmp/gpu_session/benchmarks
export PYTHONPATH=/tmp/gpu_session:/tmp/site
cd /tmp && exec python3 -m benchmarks.gpu_session run --out "$OUT" --budget-s "${GPU_SESSION_BUDGET_S:-480}" "$@"
