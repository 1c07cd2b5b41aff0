"""DTensor sharding: per-device memory and step time against `mirrored`.

The transformer classifier of `configs/transformer.py` (or `--model_dim` etc.)
is built once per setup on the same logical devices:

- `mirrored` over all devices (every device holds the whole model),
- `dtensor` with the `megatron` layout on meshes `batch=B,model=M` for each
  model-axis size M in `--model_sizes` (B = devices / M),

and trained on the same random batches. Per-device bytes come from
`tfscale.sharding.memory_report` (parameters + Adam state). Step times are
measured in rounds: each round runs `--steps` steps of every setup in turn
(the order rotates), so every setup sees the same machine load; each
setup's figure is the median over rounds of its median step time, and each
ratio the median over rounds of the ratio within the round.

  .venv/bin/python tools/bench/dtensor_sharding.py --out=/tmp/tfscale_bench/dtensor \\
      --devices=4 --model_sizes=1,2,4 --rounds=5 --steps=20
"""

from __future__ import annotations

import json
import os
import statistics

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/dtensor_sharding", "Output directory.")
_DEVICES = flags.DEFINE_integer("devices", 4, "Logical devices (CPUs, or GPUs with --gpu).")
_GPU = flags.DEFINE_bool("gpu", False, "Split the first GPU into --devices logical GPUs.")
_GPU_MEMORY = flags.DEFINE_integer("gpu_memory_mb", 8192, "Memory of each logical GPU (--gpu).")
_MODEL_SIZES = flags.DEFINE_list("model_sizes", ["1", "2", "4"], "Model-axis sizes to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Measurement rounds (medians are reported).")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per setup per round.")
_BATCH = flags.DEFINE_integer("global_batch_size", 64, "Global batch.")
_MODEL_DIM = flags.DEFINE_integer("model_dim", 64, "Transformer width.")
_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_MLP_DIM = flags.DEFINE_integer("mlp_dim", 128, "MLP width.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Transformer blocks.")


def _setups(devices: int, model_sizes: list[int]) -> list[tuple[str, str, dict]]:
    setups = [("mirrored", "mirrored", {})]
    for m in model_sizes:
        if devices % m:
            raise ValueError(f"--model_sizes must divide --devices={devices}. Received: {m}")
        b = devices // m
        mesh = f"batch={b},model={m}" if b > 1 else f"model={m}"
        setups.append((f"dtensor {mesh}", "dtensor", {"mesh": mesh, "layout_map": "megatron"}))
    return setups


def _build(kind: str, options: dict):
    import keras  # pylint: disable=import-outside-toplevel

    import tfscale  # pylint: disable=import-outside-toplevel
    from tfscale.train import models  # pylint: disable=import-outside-toplevel

    dist = tfscale.distribution(kind, **options)
    keras.utils.set_random_seed(0)
    with dist.scope():
        model = models.build(
            "transformer",
            (28, 28, 1),
            10,
            model_dim=_MODEL_DIM.value,
            num_heads=_HEADS.value,
            mlp_dim=_MLP_DIM.value,
            num_layers=_LAYERS.value,
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=models.loss("transformer"))
    return dist, model


def _data():
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    count = _BATCH.value * _STEPS.value
    x = rng.random((count, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, count).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()


def _plot(results: dict, path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    names = list(results["setups"])
    memory = [results["setups"][n]["per_device_bytes"] / 1024 for n in names]
    ratio = [results["setups"][n]["step_time_ratio_vs_mirrored"] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, memory, color="tab:blue")
    left.set_ylabel("KiB per device (parameters + Adam state)")
    left.set_title("Per-device memory")
    right.bar(names, ratio, color="tab:orange")
    right.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    right.set_ylabel("step time / mirrored step time (median)")
    right.set_title("Step time vs mirrored, same devices")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(
        f"transformer d={_MODEL_DIM.value} mlp={_MLP_DIM.value} layers={_LAYERS.value}, "
        f"{_DEVICES.value} logical {'GPUs' if _GPU.value else 'CPUs'}, batch {_BATCH.value}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    import tfscale  # pylint: disable=import-outside-toplevel
    from tfscale.planner import overhead  # pylint: disable=import-outside-toplevel

    if _GPU.value:
        tfscale.configure_devices(
            virtual_gpus_per_gpu=_DEVICES.value, gpu_memory_limit_mb=_GPU_MEMORY.value
        )
    else:
        tfscale.configure_devices(virtual_cpus=_DEVICES.value)
    setups = _setups(_DEVICES.value, [int(m) for m in _MODEL_SIZES.value])
    data = _data()
    built = {}
    for name, kind, options in setups:
        dist, model = _build(kind, options)
        report = tfscale.sharding.memory_report(model)
        batches = dist.distribute_dataset(data, _BATCH.value)
        model.fit(batches, epochs=1, steps_per_epoch=3, verbose=0)  # trace and warm up
        built[name] = (model, batches, report)
        print(
            f"{name}: {report.per_device_bytes} B per device (unsplit {report.full_bytes} B)",
            flush=True,
        )

    medians: dict[str, list[float]] = {name: [] for name, _, _ in setups}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in setups}
    for round_index in range(_ROUNDS.value):
        order = setups[round_index % len(setups) :] + setups[: round_index % len(setups)]
        this_round = {}
        for name, _, _ in order:
            model, batches, _ = built[name]
            timer = overhead.StepTimer()
            model.fit(
                batches,
                epochs=1,
                steps_per_epoch=_STEPS.value,
                verbose=0,
                callbacks=[timer],
            )
            this_round[name] = statistics.median(timer.times[1:])
        for name in this_round:
            medians[name].append(this_round[name])
            ratios[name].append(this_round[name] / this_round["mirrored"])
        print(
            f"round {round_index + 1}: "
            + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in this_round.items()),
            flush=True,
        )

    results = {
        "devices": _DEVICES.value,
        "device_type": "GPU" if _GPU.value else "CPU",
        "model": {
            "model_dim": _MODEL_DIM.value,
            "num_heads": _HEADS.value,
            "mlp_dim": _MLP_DIM.value,
            "num_layers": _LAYERS.value,
        },
        "global_batch_size": _BATCH.value,
        "rounds": _ROUNDS.value,
        "steps_per_round": _STEPS.value,
        "setups": {},
    }
    for name, kind, options in setups:
        report = built[name][2]
        results["setups"][name] = {
            "kind": kind,
            **options,
            "per_device_bytes": report.per_device_bytes,
            "parameter_bytes": report.parameter_bytes,
            "optimizer_bytes": report.optimizer_bytes,
            "full_bytes": report.full_bytes,
            "step_time_ms": statistics.median(medians[name]) * 1e3,
            "step_time_ratio_vs_mirrored": statistics.median(ratios[name]),
        }
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, os.path.join(_OUT.value, "dtensor_sharding.png"))
    print(f"{'setup':28s} {'per device':>12s} {'step ms':>9s} {'vs mirrored':>12s}")
    for name, row in results["setups"].items():
        print(
            f"{name:28s} {row['per_device_bytes']:>10d} B {row['step_time_ms']:>9.2f} "
            f"{row['step_time_ratio_vs_mirrored']:>11.2f}x"
        )
    print(f"wrote {_OUT.value}/results.json and dtensor_sharding.png")


if __name__ == "__main__":
    app.run(main)
