#!/usr/bin/env bash
# Set up (once) and run the offline CPU demo: memtrack demo --out demo/  (extra args are passed on)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MEMTRACK_VENV:-.venv}"
out="demo"
if [ "$#" -eq 0 ]; then set -- --out "$out" --overwrite; fi
exec "$VENV/bin/memtrack" demo "$@"
