#!/usr/bin/env bash
# Create .venv (or $MEMTRACK_VENV) with the pinned dev/CI requirements and memtrack installed editable.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEMTRACK_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "memtrack setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.memtrack-setup-$(sha256sum requirements/dev.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch first, alone and pinned, so nothing else can pick a different build
  "$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install --quiet -r requirements/dev.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  touch "$stamp"
fi
