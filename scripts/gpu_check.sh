#!/usr/bin/env bash
# Exercise every CUDA path memtrack has with tiny random models and print a table of what ran, what it
# measured and what failed (scripts/gpu_check.py). Under 5 minutes; on a machine without a GPU it says
# "no GPU", runs the CPU references and exits 0. Extra args go to the script (e.g. --json out.json).
# Python: $PYTHON, else the set-up .venv ($MEMTRACK_VENV, default .venv), else python3. Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEMTRACK_VENV:-.venv}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY=python3; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MEMTRACK_NO_PROGRESS=1
exec timeout --kill-after=10 "${MEMTRACK_GPU_CHECK_TIMEOUT:-290}" "$PY" scripts/gpu_check.py "$@"
