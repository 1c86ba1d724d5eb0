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
# MuJoCo's EGL renderer cannot initialise in a process where SAPIEN (ManiSkill) has already loaded its
# renderer ("gladLoadGL error"), so the LIBERO-style suite's tests run in a pytest process of their own.
.venv/bin/python -m pytest tests/sim/test_libero_style.py tests/sim/test_vla_libero.py "$@"
exec .venv/bin/python -m pytest --ignore=tests/sim/test_libero_style.py --ignore=tests/sim/test_vla_libero.py "$@"
