#!/usr/bin/env bash
# Formats the tree with the pinned black and isort (pyproject.toml has their
# settings); `--check` changes nothing and fails on a file that would change.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(tfscale tests tools configs)
if [ "${1:-}" = "--check" ]; then
  .venv/bin/isort --check-only --quiet "${paths[@]}"
  .venv/bin/black --check --quiet "${paths[@]}"
else
  .venv/bin/isort --quiet "${paths[@]}"
  .venv/bin/black --quiet "${paths[@]}"
fi
