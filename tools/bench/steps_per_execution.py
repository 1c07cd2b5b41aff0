"""Steps per second at Keras's `steps_per_execution` 1, 4 and 16: tfscale vs one-device Keras.

`compile(steps_per_execution=N)` runs N training steps per compiled call,
which saves Python and dispatch overhead per step: the main speed knob for
small models. Stock `tf.distribute.MirroredStrategy` fails with N > 1 on two
or more replicas (keras-team/keras#19246); tfscale's `mirrored` runs it.

For each model (the lenet of `configs/default.py`, the transformer of
`configs/transformer.py`) and each N, two paths train on the same in-memory
digits (`synthetic.generate`, `.cache().repeat()`) with the same global
batch:

- `mirrored`: `tfscale.distribution("mirrored")` over `--devices` logical
  CPUs, `dist.distribute_dataset(...)`;
- `one_device`: stock Keras with no strategy, the same batches.

Every model is built, compiled and warmed up (traced) first. Each round then
times one `fit` of `--steps` steps per (path, N), in an order that rotates
by round so that all see the same machine load; steps/s is steps over the
fit's wall time. Figures are medians over rounds; ratios are taken within a
round (mirrored / one_device at the same N; N / 1 within a path).

  .venv/bin/python tools/bench/steps_per_execution.py --out=/tmp/tfscale_bench/spe \\
      --rounds=7 --steps=64

A smoke run: `--rounds=1 --steps=16 --models=lenet --values=1,4 --examples=256`.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/steps_per_execution", "Output directory.")
_DEVICES = flags.DEFINE_integer("devices", 2, "Logical CPUs for `mirrored`.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Measurement rounds (medians are reported).")
_STEPS = flags.DEFINE_integer("steps", 64, "Steps per timed fit (a multiple of every value).")
_BATCH = flags.DEFINE_integer("global_batch_size", 128, "Global batch.")
_EXAMPLES = flags.DEFINE_integer("examples", 2048, "In-memory examples (cached, repeated).")
_MODELS = flags.DEFINE_list("models", ["lenet", "transformer"], "Models: lenet, transformer.")
_VALUES = flags.DEFINE_list("values", ["1", "4", "16"], "steps_per_execution values.")

_PATHS = ("mirrored", "one_device")
# The models of configs/default.py and configs/transformer.py.
_MODEL_KWARGS = {
    "lenet": {},
    "transformer": {"model_dim": 64, "num_heads": 4, "mlp_dim": 128, "num_layers": 2},
}


def _data():
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from tfscale.data import synthetic  # pylint: disable=import-outside-toplevel

    images, labels = synthetic.generate(_EXAMPLES.value, seed=0)
    x = (images.astype(np.float32) / 255.0)[..., None]
    cached = tf.data.Dataset.from_tensor_slices((x, labels)).cache()
    cached.reduce(np.int64(0), lambda count, _: count + 1)  # fills the cache
    return cached.repeat()


def _compiled(name: str, steps_per_execution: int, scope):
    import keras  # pylint: disable=import-outside-toplevel

    from tfscale.train import models  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(0)
    with scope:
        model = models.build(name, (28, 28, 1), 10, **_MODEL_KWARGS[name])
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
            loss=models.loss(name),
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution,
        )
    return model


def _fit(model, batches, steps: int) -> float:
    start = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    return steps / (time.perf_counter() - start)


def _plot(results: dict, path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    models = list(results["median_steps_per_sec"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, name in zip(axes[0], models):
        figures = results["median_steps_per_sec"][name]
        values = list(figures["mirrored"])
        for offset, name_of_path in zip((-0.2, 0.2), _PATHS):
            ax.bar(
                [i + offset for i in range(len(values))],
                [figures[name_of_path][v] for v in values],
                width=0.4,
                label=name_of_path,
            )
        ax.set_xticks(range(len(values)), [f"N={v}" for v in values])
        ax.set_ylabel("steps/s (median)")
        ax.set_title(f"{name}, global batch {results['config']['global_batch_size']}")
        ax.legend()
    fig.suptitle(
        f"steps_per_execution N: mirrored over {results['config']['devices']} logical CPUs "
        "vs one device"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    del argv
    values = [int(v) for v in _VALUES.value]
    if any(_STEPS.value % v for v in values):
        raise app.UsageError(f"--steps={_STEPS.value} must be a multiple of every value {values}")
    unknown = sorted(set(_MODELS.value) - set(_MODEL_KWARGS))
    if unknown:
        raise app.UsageError(f"Unknown models {unknown}; valid: {sorted(_MODEL_KWARGS)}")

    import contextlib  # pylint: disable=import-outside-toplevel

    import tfscale  # pylint: disable=import-outside-toplevel

    tfscale.configure_devices(virtual_cpus=_DEVICES.value)
    dist = tfscale.distribution("mirrored")
    data = _data()
    batch = _BATCH.value
    runs = {}  # (model, path, N) -> (model, input)
    for name in _MODELS.value:
        for n in values:
            runs[(name, "mirrored", n)] = (
                _compiled(name, n, dist.scope()),
                dist.distribute_dataset(data, batch),
            )
            runs[(name, "one_device", n)] = (
                _compiled(name, n, contextlib.nullcontext()),
                data.batch(batch, drop_remainder=True).prefetch(2),
            )
    for key, (model, batches) in runs.items():
        _fit(model, batches, max(values) * 2)  # traces and fills the pipelines
        print("warmed up", key, flush=True)

    order = list(runs)
    per_round = []
    for round_index in range(_ROUNDS.value):
        shift = round_index % len(order)
        measured = {}
        for key in order[shift:] + order[:shift]:
            measured[key] = _fit(*runs[key], _STEPS.value)
        per_round.append(measured)
        print(f"round {round_index + 1}: " + ", ".join(f"{k}={v:.1f}" for k, v in measured.items()))

    def median(fn) -> float:
        return statistics.median(fn(r) for r in per_round)

    results = {
        "config": {
            "devices": _DEVICES.value,
            "rounds": _ROUNDS.value,
            "steps": _STEPS.value,
            "global_batch_size": batch,
            "examples": _EXAMPLES.value,
            "values": values,
            "models": _MODELS.value,
        },
        "per_round": [
            [
                {"model": k[0], "path": k[1], "steps_per_execution": k[2], "steps_per_sec": v}
                for k, v in r.items()
            ]
            for r in per_round
        ],
        "median_steps_per_sec": {
            name: {
                path: {str(n): median(lambda r: r[(name, path, n)]) for n in values}
                for path in _PATHS
            }
            for name in _MODELS.value
        },
        "median_mirrored_over_one_device": {
            name: {
                str(n): median(lambda r: r[(name, "mirrored", n)] / r[(name, "one_device", n)])
                for n in values
            }
            for name in _MODELS.value
        },
        "median_speedup_over_n1": {
            name: {
                path: {
                    str(n): median(lambda r: r[(name, path, n)] / r[(name, path, values[0])])
                    for n in values
                }
                for path in _PATHS
            }
            for name in _MODELS.value
        },
    }
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, os.path.join(_OUT.value, "steps_per_execution.png"))
    print(json.dumps({k: results[k] for k in list(results)[3:]}, indent=2))


if __name__ == "__main__":
    app.run(main)
