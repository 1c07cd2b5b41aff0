"""The GPU benchmark's runs (started by `tools/bench/gpu.sh`).

Runs `tfscale-train` for:

- the seed CNN (`configs/default.py`, network (a)) and the transformer
  (`configs/transformer.py`), each under `mirrored` on 1 GPU with mixed
  precision off (`float32`) and on (`mixed_float16`);
- the transformer sharded with DTensor (`configs/transformer_dtensor.py`,
  layout `megatron`, mesh `model=2`) over 2 logical GPUs split from the
  one GPU, and, for the ratio, `mirrored` over the same 2 logical GPUs,

and writes one JSON with each run's examples/s, median step time, eval
accuracy and wall time, plus the ratios mixed/float32 and dtensor/mirrored.
Every run has a time limit, and runs that would overrun `--budget_s` are
skipped and marked so: the whole script stays within 8 minutes.

  bash tools/bench/gpu.sh /tmp/tfscale_bench/gpu
  TFSCALE_BENCH_ALLOW_CPU=1 bash tools/bench/gpu.sh /tmp/gpu_dry --epochs=1 --max_train_examples=2048
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any
from typing import Optional

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/gpu", "Output directory (gpu.json).")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs per run.")
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", None, "Limit on train examples per run.")
_BUDGET_S = flags.DEFINE_float(
    "budget_s", 450.0, "Total seconds for all runs; later runs are skipped."
)
_RUN_TIMEOUT_S = flags.DEFINE_float("run_timeout_s", 150.0, "Seconds one run may take.")
_LOGICAL_GPU_MB = flags.DEFINE_integer(
    "logical_gpu_memory_mb", 16384, "Memory of each of the 2 logical GPUs."
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_gpu() -> bool:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        check=False,
    )
    return probe.returncode == 0 and probe.stdout.strip().splitlines()[-1:] != ["0"]


def _runs(gpu: bool) -> list[tuple[str, str, list[str]]]:
    one = ["--config.distribution.kind=mirrored", "--config.distribution.devices=1"]
    if gpu:
        one.append("--config.devices.virtual_cpus=1")
        two_devices = [
            "--config.devices.virtual_cpus=1",
            "--config.devices.virtual_gpus_per_gpu=2",
            f"--config.devices.gpu_memory_limit_mb={_LOGICAL_GPU_MB.value}",
        ]
    else:
        two_devices = ["--config.devices.virtual_cpus=2"]
    runs = []
    for model, config in (("cnn", "configs/default.py"), ("transformer", "configs/transformer.py")):
        for precision in ("float32", "mixed_float16"):
            runs.append(
                (
                    f"{model} mirrored 1 device {precision}",
                    config,
                    [*one, f"--config.training.precision={precision}"],
                )
            )
    runs.append(
        (
            "transformer mirrored 2 logical devices float32",
            "configs/transformer.py",
            [*two_devices, "--config.distribution.kind=mirrored"],
        )
    )
    runs.append(
        (
            "transformer dtensor model=2 float32",
            "configs/transformer_dtensor.py",
            [*two_devices, "--config.distribution.mesh=model=2"],
        )
    )
    return runs


def _train(config: str, overrides: list[str], timeout: float) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="tfscale-gpu-bench-")
    args = [
        sys.executable,
        "-m",
        "tfscale.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.training.epochs={_EPOCHS.value}",
        "--config.training.verbose=2",
        *overrides,
    ]
    if _MAX_TRAIN.value:
        args.append(f"--config.data.max_train_examples={_MAX_TRAIN.value}")
    start = time.perf_counter()
    try:
        done = subprocess.run(
            args,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"status": f"failed (exit {done.returncode})", "stderr_tail": done.stderr[-2000:]}
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    return {
        "status": "ok",
        "wall_s": wall,
        "examples_per_sec": metrics["throughput"]["examples_per_sec"],
        "step_time_ms": metrics["throughput"]["step_time_ms"],
        "eval_accuracy": metrics["eval"]["accuracy"],
        "devices": metrics["devices"],
        "memory_per_device_bytes": (metrics.get("memory") or {}).get("per_device_bytes"),
    }


def _ratio(results: dict[str, Any], a: str, b: str, field: str) -> Optional[float]:
    ra, rb = results.get(a, {}), results.get(b, {})
    if ra.get("status") != "ok" or rb.get("status") != "ok" or not rb.get(field):
        return None
    return ra[field] / rb[field]


def main(argv: list[str]) -> None:
    del argv
    gpu = _has_gpu()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name, config, overrides in _runs(gpu):
        left = _BUDGET_S.value - (time.perf_counter() - started)
        if left < 30:
            results[name] = {"status": "skipped: time budget spent"}
        else:
            results[name] = _train(config, overrides, min(_RUN_TIMEOUT_S.value, left))
        row = results[name]
        print(
            f"{name:48s} {row['status']:>10s} "
            + (
                f"{row['examples_per_sec']:9.0f} ex/s  {row['step_time_ms']:7.2f} ms/step  "
                f"acc {row['eval_accuracy']:.3f}"
                if row["status"] == "ok"
                else ""
            ),
            flush=True,
        )
    summary = {
        "gpu": gpu,
        "epochs": _EPOCHS.value,
        "total_s": time.perf_counter() - started,
        "runs": results,
        "ratios": {
            "cnn mixed_float16 / float32 step time": _ratio(
                results,
                "cnn mirrored 1 device mixed_float16",
                "cnn mirrored 1 device float32",
                "step_time_ms",
            ),
            "transformer mixed_float16 / float32 step time": _ratio(
                results,
                "transformer mirrored 1 device mixed_float16",
                "transformer mirrored 1 device float32",
                "step_time_ms",
            ),
            "transformer dtensor model=2 / mirrored 2 logical step time": _ratio(
                results,
                "transformer dtensor model=2 float32",
                "transformer mirrored 2 logical devices float32",
                "step_time_ms",
            ),
        },
    }
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "gpu.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for name, ratio in summary["ratios"].items():
        print(f"{name}: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    print(f"wrote {_OUT.value}/gpu.json in {summary['total_s']:.0f} s (GPU: {gpu})")


if __name__ == "__main__":
    app.run(main)
