#!/usr/bin/env bash
# Sets up .venv and runs the test suite with pytest, except the `long` tests
# (several processes, many models; see tests/conftest.py): CI runs those
# under bazel. `bash tools/test.sh -m long` runs only them, `-m ""` all.
# pytest exits 5 when it collects no test: with `set -e` that fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
.venv/bin/python -m pytest tests -m "not long" "$@"
