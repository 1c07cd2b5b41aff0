#!/usr/bin/env bash
# GPU benchmark for a machine with one NVIDIA GPU; finishes within 8 minutes.
#
#   bash tools/bench/gpu.sh [OUT_DIR] [flags of tools/bench/gpu_runs.py]
#
# Trains the seed CNN and the transformer under `mirrored` on 1 GPU with mixed
# precision off and on, and the transformer sharded with DTensor over 2 logical
# GPUs (against `mirrored` on the same 2), then writes OUT_DIR/gpu.json
# (default /tmp/tfscale_bench/gpu). Needs the README setup (.venv with a
# TensorFlow that sees the GPU; set PYTHON to use another interpreter).
# Without a GPU it stops, unless TFSCALE_BENCH_ALLOW_CPU=1 (a dry run of the
# same steps on the CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-/tmp/tfscale_bench/gpu}"
shift || true
PYTHON="${PYTHON:-.venv/bin/python}"
if ! nvidia-smi -L >/dev/null 2>&1 && [[ "${TFSCALE_BENCH_ALLOW_CPU:-0}" != 1 ]]; then
  echo "gpu.sh: no NVIDIA GPU found (nvidia-smi -L failed); TFSCALE_BENCH_ALLOW_CPU=1 runs it on the CPU" >&2
  exit 2
fi
exec timeout 480 "$PYTHON" tools/bench/gpu_runs.py --out="$OUT" "$@"
