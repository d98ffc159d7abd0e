#!/usr/bin/env bash
# The one prepared command of a GPU session (device machine: H100 or H200, no network):
#
#   bash benchmarks/gpu_run.sh [BUDGET_S] [--only STEPS]     # default budget 540 s
#
# run from the repository root through the `run` tool with carry [".whl"] and timeout_s 600. It
# 1. links romav2_plugin/kernels and romav2_plugin/adapters (git-ignored symlinks, not carried);
# 2. installs the carried wheels (.whl/: romav2==2.0.1, romatch, loguru, kornia, kornia_rs, fused-local-corr;
#    see docs/benchmarks.md) into /tmp/site, no index, no dependencies;
# 3. runs `python -m benchmarks.gpu_suite` with the budget, results into $OUT/results (or benchmarks/results),
#    step logs into $OUT/work/logs, the kernel cache and autotuner choices into $OUT/cache.
# Training is left out unless .tiny-data/train exists (pass --only ... to choose steps).
set -u -o pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-540}
shift $(( $# > 0 ? 1 : 0 ))
[ -e romav2_plugin/kernels ] || ln -s ../kernels romav2_plugin/kernels
[ -e romav2_plugin/adapters ] || ln -s ../adapters romav2_plugin/adapters
PY=python3
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "gpu_run: installing the carried wheels failed; the steps that need them will say so"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BASE=${OUT:-$PWD/runs/gpu_run}
mkdir -p "$BASE"
export ROMAV2_PLUGIN_CACHE="$BASE/cache"
RESULTS=${OUT:+$OUT/results}
RESULTS=${RESULTS:-$PWD/benchmarks/results}
# throughput (base, ours vs official) is left out: the compare step measures the same rows beside RoMa and LoFTR
ONLY=(--only kernels,profile,parity,compare,latency,levers)
[ -d .tiny-data/train ] && ONLY=()
[ $# -gt 0 ] && ONLY=("$@")
$PY -c "import torch, timm, kornia, cuda.bindings; print('torch', torch.__version__, torch.cuda.get_device_name(0))" \
    || echo "gpu_run: a dependency is missing (above); the suite records the steps that fail"
$PY -m benchmarks.gpu_suite --budget-s "$BUDGET" --out "$RESULTS" --work "$BASE/work" "${ONLY[@]}" 2>&1 \
    | tee "$BASE/gpu_suite.log"
