#!/usr/bin/env bash
# Install everything (incl. test tools) into .venv, then lint and run the default test suite.
#   bash scripts/test.sh                 # default suite (fast; slow tests excluded)
#   bash scripts/test.sh -m slow         # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
echo "[test] ruff check"
.venv/bin/ruff check .
echo "[test] pytest"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest "$@"
