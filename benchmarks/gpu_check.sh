#!/usr/bin/env bash
# One prepared GPU check for an H100/H200 machine with no network: installs nothing,
# builds (or reuses) the fp16 graph, measures, and prints a short table last.
#   bash benchmarks/gpu_check.sh [--quick]
# Uses .venv when present (carried to the device), else the image's python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD:$PWD/proto${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
exec timeout 290 "$PY" benchmarks/gpu_check.py "$@"
