"""The planner against reality: every candidate run for real, on a suite of models.

For each device count in `--device_counts` a worker process splits the CPU
into that many logical devices, reads (or measures once) the calibration,
and for each model of the suite:

1. plans it (`tfscale.planner.plan`, global batch `--global_batch_size`,
   Adam), timing the call: the plan's time includes building the model
   once on the host;
2. builds every eligible candidate (`tfscale.distribution(kind,
   **options)`, the model in its scope, Adam) and trains each on the same
   random batches, in rounds: a round runs `--steps` steps of every
   candidate in turn, the order rotating, so every candidate sees the same
   machine load; a candidate's measured step time is the median over
   rounds of its median step;
3. reads each candidate's parameter + optimizer bytes per device from
   `tfscale.sharding.memory_report` beside the plan's prediction.

Reported per (model, device count): the plan's **regret** (the chosen
candidate's measured step time over the fastest measured candidate's),
whether the plan chose the fastest, the **rank agreement** (the share of
candidate pairs whose measured times differ by more than `--tie` that
the prediction orders the same way; and whether the predicted order is the
measured order outright), the prediction's error per candidate, and whether
the predicted bytes equal the memory report's. Targets (issue): regret <=
1.10 in >= 90% of cases, ranking in the measured order in >= 80%, planning
< 2 s per model after calibration, calibration < 30 s.

  .venv/bin/python tools/bench/planner.py --out=/tmp/tfscale_bench/planner \\
      --device_counts=2,4,8 --rounds=3 --steps=10
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any
from typing import Callable

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/planner", "Output directory.")
_DEVICE_COUNTS = flags.DEFINE_list("device_counts", ["2", "4", "8"], "Logical CPU counts.")
_MODELS = flags.DEFINE_list("models", None, "Models of the suite to run (default: all).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Measurement rounds (medians are reported).")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per candidate per round.")
_BATCH = flags.DEFINE_integer("global_batch_size", 64, "Global batch (divisible by 8).")
_TIE = flags.DEFINE_float(
    "tie", 0.10, "Measured times within this fraction of each other count as a tie."
)
_WORKER = flags.DEFINE_integer("worker_devices", 0, "Internal: run one device count here.")
_WORKER_OUT = flags.DEFINE_string("worker_out", "", "Internal: the worker's JSON.")


# --- the suite ------------------------------------------------------------------------------


def _suite() -> dict[str, tuple[Callable[[], Any], tuple[int, ...], str, int]]:
    """name -> (model_fn, input shape, input dtype, classes)."""
    import keras  # pylint: disable=import-outside-toplevel

    from tfscale.train import models  # pylint: disable=import-outside-toplevel

    def mlp(name: str, inputs: int, widths: list[int]) -> Callable[[], Any]:
        def build():
            x = inp = keras.Input((inputs,))
            for i, w in enumerate(widths):
                x = keras.layers.Dense(w, activation="relu", name=f"{name}_{i}")(x)
            return keras.Model(inp, keras.layers.Dense(10, name="head")(x), name=name)

        return build

    def embedding_heavy():
        inp = keras.Input((32,), dtype="int32")
        x = keras.layers.Embedding(50_000, 128, name="token")(inp)
        x = keras.layers.GlobalAveragePooling1D()(x)
        x = keras.layers.Dense(256, activation="relu", name="fc1")(x)
        return keras.Model(inp, keras.layers.Dense(10, name="head")(x), name="embedding_heavy")

    def config_model(name: str, shape: tuple[int, ...], **kwargs: Any) -> Callable[[], Any]:
        return lambda: models.build(name, shape, 10, **kwargs)

    return {
        "lenet": (config_model("lenet", (28, 28, 1)), (28, 28, 1), "float32", 10),
        "convnet": (config_model("convnet", (28, 28, 1)), (28, 28, 1), "float32", 10),
        "transformer": (
            config_model(
                "transformer", (28, 28, 1), model_dim=64, num_heads=4, mlp_dim=128, num_layers=2
            ),
            (28, 28, 1),
            "float32",
            10,
        ),
        "wide_transformer": (
            config_model(
                "transformer", (16, 16, 1), model_dim=256, num_heads=8, mlp_dim=1024, num_layers=2
            ),
            (16, 16, 1),
            "float32",
            10,
        ),
        "wide_mlp": (mlp("wide_mlp", 784, [2048, 2048]), (784,), "float32", 10),
        "deep_narrow": (mlp("deep_narrow", 64, [64] * 24), (64,), "float32", 10),
        "tiny_mlp": (mlp("tiny_mlp", 32, [32]), (32,), "float32", 10),
        "embedding_heavy": (embedding_heavy, (32,), "int32", 10),
    }


def _loss(name: str):
    import keras  # pylint: disable=import-outside-toplevel

    from tfscale.train import models  # pylint: disable=import-outside-toplevel

    if name in ("lenet", "convnet", "transformer", "wide_transformer"):
        return models.loss("transformer" if name == "wide_transformer" else name)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(shape: tuple[int, ...], dtype: str, classes: int):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    count = _BATCH.value * 8
    if dtype == "int32":
        x = rng.integers(0, 50_000, (count, *shape)).astype("int32")
    else:
        x = rng.random((count, *shape), dtype="float32")
    y = rng.integers(0, classes, count).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()


# --- the worker: one device count -----------------------------------------------------------


def _worker(num_devices: int, out: str) -> None:
    import keras  # pylint: disable=import-outside-toplevel

    import tfscale  # pylint: disable=import-outside-toplevel
    from tfscale import planner  # pylint: disable=import-outside-toplevel
    from tfscale.planner import calibration as calibration_lib  # pylint: disable=C0415
    from tfscale.planner import overhead  # pylint: disable=import-outside-toplevel

    tfscale.configure_devices(virtual_cpus=num_devices)
    cached = os.path.exists(calibration_lib.cache_path())
    start = time.perf_counter()
    calibration = planner.calibrate()
    result: dict[str, Any] = {
        "devices": num_devices,
        "calibration": calibration.to_dict(),
        "calibration_cached": cached,
        "calibration_s": time.perf_counter() - start,
        "models": {},
    }
    suite = _suite()
    for name in _MODELS.value or list(suite):
        model_fn, shape, dtype, classes = suite[name]
        start = time.perf_counter()
        plan = planner.plan(
            model_fn, global_batch_size=_BATCH.value, optimizer="adam", calibration=calibration
        )
        plan_s = time.perf_counter() - start
        data = _data(shape, dtype, classes)
        built = {}
        for row in plan.rows:
            if not row.eligible:
                continue
            c = row.candidate
            dist = tfscale.distribution(c.kind, **c.options)
            keras.utils.set_random_seed(0)
            with dist.scope():
                model = model_fn()
                model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_loss(name))
            report = tfscale.sharding.memory_report(model)
            batches = dist.distribute_dataset(data, _BATCH.value)
            model.fit(batches, epochs=1, steps_per_epoch=3, verbose=0)  # trace and warm up
            built[c.description] = (row, model, batches, report)
        medians: dict[str, list[float]] = {d: [] for d in built}
        names = list(built)
        for r in range(_ROUNDS.value):
            for d in names[r % len(names) :] + names[: r % len(names)]:
                _, model, batches, _ = built[d]
                timer = overhead.StepTimer()
                model.fit(
                    batches,
                    epochs=1,
                    steps_per_epoch=_STEPS.value,
                    verbose=0,
                    callbacks=[timer],
                )
                medians[d].append(statistics.median(timer.times[1:] or timer.times))
        rows = {}
        for d, (row, _, _, report) in built.items():
            predicted_bytes = row.memory.parameters + row.memory.optimizer
            measured_bytes = report.parameter_bytes + report.optimizer_bytes
            rows[d] = {
                "kind": row.candidate.kind,
                "options": dict(row.candidate.options),
                "measured_step_s": statistics.median(medians[d]),
                "predicted_step_s": row.step_time.total,
                "predicted": row.step_time.to_dict(),
                "predicted_parameter_optimizer_bytes": predicted_bytes,
                "measured_parameter_optimizer_bytes": measured_bytes,
                "predicted_total_bytes": row.memory.total,
            }
        result["models"][name] = {
            "plan_s": plan_s,
            "chosen": plan.chosen.description,
            "candidates": rows,
            "ineligible": {r.candidate.description: r.reason for r in plan.rows if not r.eligible},
            "table": plan.table(),
        }
        line = ", ".join(
            f"{d.split(':')[0]} {v['measured_step_s'] * 1e3:.1f}/{v['predicted_step_s'] * 1e3:.1f}"
            for d, v in rows.items()
        )
        print(f"[{num_devices} devices] {name}: plan {plan_s:.2f} s; measured/predicted ms: {line}")
        print(f"  chose {plan.chosen.description}", flush=True)
        del built
        keras.backend.clear_session()
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)


# --- the summary ----------------------------------------------------------------------------


def _case(model: dict[str, Any], tie: float) -> dict[str, Any]:
    rows = model["candidates"]
    best = min(rows, key=lambda d: rows[d]["measured_step_s"])
    chosen = model["chosen"]
    regret = rows[chosen]["measured_step_s"] / rows[best]["measured_step_s"]
    pairs = agree = 0
    for a, b in itertools.combinations(rows, 2):
        ma, mb = rows[a]["measured_step_s"], rows[b]["measured_step_s"]
        if abs(ma - mb) <= tie * min(ma, mb):
            continue  # a measured tie: no order to agree with
        pairs += 1
        pa, pb = rows[a]["predicted_step_s"], rows[b]["predicted_step_s"]
        agree += (ma < mb) == (pa < pb)
    errors = [r["predicted_step_s"] / r["measured_step_s"] for r in rows.values()]
    return {
        "chosen": chosen,
        "fastest": best,
        "regret": regret,
        "chose_fastest": regret <= 1.0 + tie,
        "ranked_pairs": pairs,
        "pairs_in_measured_order": agree,
        "ranks_in_measured_order": agree == pairs,
        "predicted_over_measured": errors,
        "bytes_match": all(
            r["predicted_parameter_optimizer_bytes"] == r["measured_parameter_optimizer_bytes"]
            for r in rows.values()
        ),
        "plan_s": model["plan_s"],
    }


def _summary(workers: list[dict[str, Any]], tie: float) -> dict[str, Any]:
    cases = {
        f"{name}@{w['devices']}": _case(model, tie)
        for w in workers
        for name, model in w["models"].items()
    }
    values = list(cases.values())
    regrets = [c["regret"] for c in values]
    within = sum(r <= 1.10 for r in regrets) / len(regrets)
    ranked = sum(c["ranks_in_measured_order"] for c in values) / len(values)
    pairs = sum(c["ranked_pairs"] for c in values)
    agreeing = sum(c["pairs_in_measured_order"] for c in values)
    plan_s = max(c["plan_s"] for c in values)
    calibration_s = (
        max(w["calibration_s"] for w in workers if not w["calibration_cached"])
        if any(not w["calibration_cached"] for w in workers)
        else None
    )
    errors = [e for c in values for e in c["predicted_over_measured"]]
    return {
        "cases": cases,
        "regret_median": statistics.median(regrets),
        "regret_max": max(regrets),
        "share_regret_within_1_10": within,
        "share_chose_fastest": sum(c["chose_fastest"] for c in values) / len(values),
        "share_ranked_in_measured_order": ranked,
        "pair_agreement": agreeing / pairs if pairs else None,
        "predicted_over_measured_median": statistics.median(errors),
        "predicted_over_measured_range": [min(errors), max(errors)],
        "bytes_match_all": all(c["bytes_match"] for c in values),
        "plan_s_max": plan_s,
        "calibration_s_max": calibration_s,
        "targets": {
            "regret_within_1_10_in_90_percent": within >= 0.9,
            "ranked_in_measured_order_in_80_percent": ranked >= 0.8,
            "bytes_match": all(c["bytes_match"] for c in values),
            "plan_under_2_s": plan_s < 2.0,
            "calibration_under_30_s": calibration_s is None or calibration_s < 30.0,
        },
    }


def _plot(workers: list[dict[str, Any]], summary: dict[str, Any], path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(summary["cases"])
    left.bar(range(len(names)), [summary["cases"][n]["regret"] for n in names], color="tab:blue")
    left.axhline(1.10, color="tab:red", linestyle="--", linewidth=1, label="target 1.10")
    left.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    left.set_ylabel("chosen / fastest measured step time")
    left.set_title("Regret of the plan per (model, devices)")
    left.legend()
    for w, marker in zip(workers, "os^vD"):
        measured, predicted = [], []
        for model in w["models"].values():
            for row in model["candidates"].values():
                measured.append(row["measured_step_s"] * 1e3)
                predicted.append(row["predicted_step_s"] * 1e3)
        right.scatter(measured, predicted, marker=marker, label=f"{w['devices']} devices", s=18)
    lims = [0.1, 1e4]
    right.plot(lims, lims, color="gray", linestyle="--", linewidth=1)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("measured ms per step")
    right.set_ylabel("predicted ms per step")
    right.set_title("Every candidate: predicted vs measured")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        _worker(_WORKER.value, _WORKER_OUT.value)
        return
    if _BATCH.value % 8:
        raise app.UsageError(f"--global_batch_size must divide by 8. Received: {_BATCH.value}")
    os.makedirs(_OUT.value, exist_ok=True)
    workers = []
    for count in [int(c) for c in _DEVICE_COUNTS.value]:
        out = os.path.join(_OUT.value, f"worker-{count}.json")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            f"--worker_devices={count}",
            f"--worker_out={out}",
            f"--rounds={_ROUNDS.value}",
            f"--steps={_STEPS.value}",
            f"--global_batch_size={_BATCH.value}",
        ]
        if _MODELS.value:
            command.append(f"--models={','.join(_MODELS.value)}")
        subprocess.run(command, check=True)
        with open(out, encoding="utf-8") as f:
            workers.append(json.load(f))
    summary = _summary(workers, _TIE.value)
    results = {
        "global_batch_size": _BATCH.value,
        "rounds": _ROUNDS.value,
        "steps_per_round": _STEPS.value,
        "tie": _TIE.value,
        "summary": summary,
        "workers": workers,
    }
    with open(os.path.join(_OUT.value, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    _plot(workers, summary, os.path.join(_OUT.value, "planner.png"))
    print(f"{'case':24s} {'regret':>7s}  {'pairs':>7s}  chosen / fastest")
    for name, case in summary["cases"].items():
        print(
            f"{name:24s} {case['regret']:7.2f}  {case['pairs_in_measured_order']:>3d}/"
            f"{case['ranked_pairs']:<3d}  {case['chosen']} / {case['fastest']}"
        )
    keys = [k for k in summary if k not in ("cases",)]
    for key in keys:
        print(f"{key}: {summary[key]}")
    print(f"wrote {_OUT.value}/results.json and planner.png")


if __name__ == "__main__":
    app.run(main)
