#!/usr/bin/env bash
# GPU check: the `gpu` tests (tests/inference/test_gpu.py) and a short GPU generation benchmark
# (benchmarks/gpu_generation.py -> benchmarks/results/gpu_check.json), within 8 minutes.
# On a machine without CUDA it prints that the tests were skipped, and why, and exits 0.
#
#   benchmarks/gpu_check.sh            # from the repository root; PYTHON overrides the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    reason=$("$PYTHON" -c 'import torch; print("this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device")')
    # The tests still run, to show each one skipping with its reason.
    timeout 120 "$PYTHON" -m pytest -q -rs -m gpu tests/inference/test_gpu.py -p no:cacheprovider || true
    echo "gpu_check: SKIPPED: no CUDA device on this machine ($reason); the gpu tests skipped and no benchmark ran"
    exit 0
fi

"$PYTHON" -c 'import torch; print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")'
status=0
# the tests: at most 5 minutes; the benchmark: at most 3
timeout 300 "$PYTHON" -m pytest -q -rs -m gpu tests/inference/test_gpu.py -p no:cacheprovider || status=$?
timeout 180 "$PYTHON" benchmarks/gpu_generation.py || status=$?
exit "$status"
