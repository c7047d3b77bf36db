#!/usr/bin/env bash
# One prepared GPU check for an H100/H200 machine with no network: installs nothing,
# builds (or reuses) the fp16 graph, measures, and prints a short table last.
#   bash benchmarks/gpu_check.sh [--quick]
# Uses .venv when present (carried to the device), else the image's python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
# Nothing is installed on the device: lay the package out as the wheel does (openemploi/ with
# kernels/ and v1/ inside), as symlinks, and keep the repo root off sys.path (`-P`): its kernels/
# folder would shadow the `kernels` distribution transformers imports.
STAGE="$(mktemp -d)"
cp -rs "$PWD/server" "$STAGE/openemploi"
ln -s "$PWD/kernels" "$STAGE/openemploi/kernels"
ln -s "$PWD/proto/openemploi/v1" "$STAGE/openemploi/v1"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
exec timeout 290 "$PY" -P benchmarks/gpu_check.py "$@"
