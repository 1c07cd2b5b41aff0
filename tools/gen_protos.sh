#!/usr/bin/env bash
# Regenerates the checked-in Python modules of the dispatcher protocol.
# Needs grpcio-tools (the `dev` extra). Usage: bash tools/gen_protos.sh [OUT_DIR]
# With OUT_DIR, writes there instead (tests/protos_test.py compares the two).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
out="${1:-.}"
"$python" -m grpc_tools.protoc \
  --proto_path=. \
  --python_out="$out" \
  --grpc_python_out="$out" \
  tfscale/data/dispatcher/dispatcher.proto
