#!/usr/bin/env bash
# Set up (once) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MEMTRACK_VENV:-.venv}"
# The browser tests need Debian's chromium + chromedriver; install them when we can (root, apt).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "memtrack test: could not install chromium; browser tests will be skipped" >&2
  else
    echo "memtrack test: chromium/chromedriver not found; browser tests will be skipped" >&2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MEMTRACK_NO_PROGRESS=1
exec "$VENV/bin/python" -m pytest -q "$@"
