"""Wrapper overhead: Keras `fit` through tfscale against raw `tf.distribute`.

The same LeNet (`tfscale.train.models.build("lenet", ...)`, SGD 0.05 with
momentum 0.9, accuracy metric) is trained on the same in-memory digits
(`tfscale.data.synthetic.generate`, `.cache().repeat()`) over the same
logical CPUs two ways:

- `tfscale`: what `tfscale-train` does (`tfscale/train/lib.py` `_fit`):
  `tfscale.distribution("mirrored")`, `dist.distribute_dataset(...)` and the
  `tfscale.train.callbacks.Throughput` callback;
- `raw`: a stock `tf.distribute.MirroredStrategy` over the same device names,
  `strategy.experimental_distribute_dataset(ds.batch(..., drop_remainder=True)
  .prefetch(AUTOTUNE))` and no tfscale callback.

Both models are built, compiled and warmed up (traced) once. Each round then
runs `--steps` steps of each path in one `fit`, alternating which goes first,
so both see the same machine load. Throughput is the step-to-step cycle
time: a callback, first in the list, stamps `time.perf_counter()` at each
`on_train_batch_begin`, and steps/s is the number of whole cycles from the
second step's begin to the last step's begin over their wall time. Unlike
timing `on_train_batch_begin`..`end`, a cycle includes everything done per
step (the other callbacks' hooks, Keras's loop, fetching the input), which is
where a wrapper's overhead would sit; unlike whole-`fit` wall time, it leaves
out the per-`fit` setup and the first step (iterator creation, prefetch
fill), which `tfscale-train` pays once per run, not per step. Each path's
figure is the median over rounds of its steps/s; the ratio is the median over
rounds of tfscale/raw within the round, checked against `--target`.

  .venv/bin/python tools/bench/wrapper_overhead.py --out=/tmp/tfscale_bench/wrapper_overhead \\
      --rounds=7 --steps=50 --global_batch_size=128

A smoke run (well under a minute): `--rounds=2 --steps=5 --warmup_steps=3`.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/wrapper_overhead", "Output directory.")
_DEVICES = flags.DEFINE_integer("devices", 2, "Logical CPUs to split the CPU into.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Measurement rounds (medians are reported).")
_STEPS = flags.DEFINE_integer("steps", 50, "Steps per path per round (at least 3).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 5, "Steps of the warm-up fit of each path.")
_BATCH = flags.DEFINE_integer("global_batch_size", 128, "Global batch.")
_EXAMPLES = flags.DEFINE_integer("examples", 2048, "In-memory examples (cached, repeated).")
_TARGET = flags.DEFINE_float("target", 0.98, "Required tfscale/raw steps/s ratio.")

_PATHS = ("tfscale", "raw")


class _StepClock:
    """A Keras callback stamping the start of each training step."""

    def __init__(self):
        import keras  # pylint: disable=import-outside-toplevel

        outer = self

        # One stamp per step in both paths, so its own cost cancels in the ratio.
        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                outer.begins.append(time.perf_counter())

        self.callback = Callback()
        self.begins: list[float] = []

    def steps_per_sec(self) -> float:
        """Whole cycles from the second step's begin to the last one's, per second."""
        cycles = self.begins[1:]
        return (len(cycles) - 1) / (cycles[-1] - cycles[0])


def _data():
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from tfscale.data import synthetic  # pylint: disable=import-outside-toplevel

    images, labels = synthetic.generate(_EXAMPLES.value, seed=0)
    x = (images.astype(np.float32) / 255.0)[..., None]
    cached = tf.data.Dataset.from_tensor_slices((x, labels)).cache()
    # One full pass fills the cache; a fit that stops mid-pass would discard it.
    cached.reduce(np.int64(0), lambda count, _: count + 1)
    return cached.repeat()


def _compiled_model(scope):
    import keras  # pylint: disable=import-outside-toplevel

    from tfscale.train import models  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(0)
    with scope:
        model = models.build("lenet", (28, 28, 1), 10)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
            loss=models.loss("lenet"),
            metrics=["accuracy"],
        )
    return model


def _build(data) -> tuple[dict, list[str]]:
    """Both paths: name -> (model, distributed input, extra callbacks factory)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    import tfscale  # pylint: disable=import-outside-toplevel
    from tfscale.train import callbacks  # pylint: disable=import-outside-toplevel

    batch = _BATCH.value
    dist = tfscale.distribution("mirrored")
    devices = list(dist.devices)
    tfscale_model = _compiled_model(dist.scope())
    tfscale_input = dist.distribute_dataset(data, batch)

    strategy = tf.distribute.MirroredStrategy(devices=devices)
    raw_model = _compiled_model(strategy.scope())
    raw_input = strategy.experimental_distribute_dataset(
        data.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    )
    return {
        "tfscale": (tfscale_model, tfscale_input, lambda: [callbacks.Throughput(batch)]),
        "raw": (raw_model, raw_input, lambda: []),
    }, devices


def _fit(path: tuple, steps: int) -> float:
    model, batches, extra_callbacks = path
    clock = _StepClock()
    model.fit(
        batches,
        epochs=1,
        steps_per_epoch=steps,
        callbacks=[clock.callback, *extra_callbacks()],
        shuffle=False,
        verbose=0,
    )
    return clock.steps_per_sec()


def _plot(results: dict, path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    rounds = results["per_round"]
    x = [r["round"] for r in rounds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in zip(_PATHS, ("tab:blue", "tab:orange")):
        left.plot(
            x,
            [r[f"{name}_steps_per_sec"] for r in rounds],
            "o-",
            color=color,
            label=f"{name} (median {results['median_steps_per_sec'][name]:.1f})",
        )
    left.set_xlabel("round")
    left.set_ylabel("steps/s")
    left.set_title("Steps/s per round")
    left.legend()
    right.plot(
        x,
        [r["ratio"] for r in rounds],
        "o-",
        color="tab:green",
        label=f"tfscale/raw (median {results['median_ratio']:.3f})",
    )
    right.axhline(
        results["target"],
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"target {results['target']}",
    )
    right.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    right.set_xlabel("round")
    right.set_ylabel("steps/s ratio within the round")
    right.set_title("tfscale / raw")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(x)
    config = results["config"]
    fig.suptitle(
        f"lenet, mirrored over {config['devices']} logical CPUs, batch {config['global_batch_size']}, "
        f"{config['steps_per_round']} steps x {config['rounds']} rounds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    if _STEPS.value < 3:
        raise app.UsageError(f"--steps must be at least 3. Received: {_STEPS.value}")
    import tfscale  # pylint: disable=import-outside-toplevel

    tfscale.configure_devices(virtual_cpus=_DEVICES.value)
    paths, devices = _build(_data())
    for name in _PATHS:
        _fit(paths[name], max(_WARMUP.value, 3))  # trace and warm up
    print(f"devices: {devices}", flush=True)

    per_round = []
    for round_index in range(_ROUNDS.value):
        order = _PATHS if round_index % 2 == 0 else _PATHS[::-1]
        speed = {name: _fit(paths[name], _STEPS.value) for name in order}
        per_round.append(
            {
                "round": round_index + 1,
                "first": order[0],
                **{f"{name}_steps_per_sec": speed[name] for name in _PATHS},
                "ratio": speed["tfscale"] / speed["raw"],
            }
        )
        print(
            f"round {round_index + 1} ({order[0]} first): tfscale {speed['tfscale']:.1f}, "
            f"raw {speed['raw']:.1f} steps/s, ratio {per_round[-1]['ratio']:.3f}",
            flush=True,
        )

    medians = {
        name: statistics.median(r[f"{name}_steps_per_sec"] for r in per_round) for name in _PATHS
    }
    ratio = statistics.median(r["ratio"] for r in per_round)
    results = {
        "config": {
            "devices": _DEVICES.value,
            "device_names": devices,
            "model": "lenet",
            "global_batch_size": _BATCH.value,
            "examples": _EXAMPLES.value,
            "rounds": _ROUNDS.value,
            "steps_per_round": _STEPS.value,
            "warmup_steps": max(_WARMUP.value, 3),
            "measure": "steps/s over step-begin to step-begin cycles, first step excluded",
        },
        "per_round": per_round,
        "median_steps_per_sec": medians,
        "median_examples_per_sec": {n: s * _BATCH.value for n, s in medians.items()},
        "median_ratio": ratio,
        "target": _TARGET.value,
        "target_met": ratio >= _TARGET.value,
    }
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, os.path.join(_OUT.value, "wrapper_overhead.png"))
    print(f"{'path':10s} {'steps/s':>9s} {'examples/s':>11s}")
    for name in _PATHS:
        print(f"{name:10s} {medians[name]:>9.1f} {medians[name] * _BATCH.value:>11.0f}")
    verdict = "met" if results["target_met"] else "NOT met"
    print(f"tfscale/raw ratio (median of rounds) {ratio:.3f}: target >= {_TARGET.value} {verdict}")
    print(f"wrote {_OUT.value}/results.json and wrapper_overhead.png")


if __name__ == "__main__":
    app.run(main)
