#!/usr/bin/env bash
# Every GPU row of docs/benchmarks.md in one go, each benchmark under its own time limit so one
# failure leaves the others' results:  bash bench/gpu.sh [OUT_DIR]   (default: bench_gpu/)
# On a machine without diffusers/omegaconf, put their wheels in .whl/ first (docs/benchmarks.md).
set -u
out=${1:-bench_gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
run() {  # run NAME LIMIT_S COMMAND...: output to OUT/NAME.txt, status at its end
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}
run precision 90 python3 bench/precision.py
run step 220 python3 bench/step.py
run authors 120 python3 bench/authors_cost.py
run monitor 150 python3 bench/monitor.py
