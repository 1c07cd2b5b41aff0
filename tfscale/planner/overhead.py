"""What a Keras training step costs beyond its arithmetic, measured per kind family.

A small model's step is mostly not FLOPs: `fit` calls the step function,
the input iterator hands over a batch, and the executor dispatches every
op of the forward pass, the backward pass and the optimizer update, once
per replica. On CPU that is tens of microseconds per op and milliseconds
per step, more than the arithmetic of a LeNet. And a step under several
replicas or a mesh computes slower than the device rates alone say: the
replicas' ops interleave on shared cores, and a mesh adds relayouts.

So a step under a kind family (`calibration.family`) on `n` devices is
predicted as `base_s + per_unit_s * ops + efficiency * arithmetic`, with
`ops` the model's forward ops (`flops.forward_ops`) and `arithmetic` the
rates' prediction (`step_time`). `measure` fits the constants per family
on probe models, each trained with `fit` for a few steps after a warm-up:

- `base_s` and `per_unit_s`: chains of 1 and of `PROBE_LAYERS` `Dense(8)`
  layers, whose arithmetic is negligible: two step times, two unknowns;
- `efficiency`: a reference encoder (`REFERENCE`: attention, norms and a
  GELU MLP, named so that the `megatron` layout splits it) at a fixed
  global batch: its measured step, less the first two terms, over its
  predicted arithmetic, relative to the same ratio on one device (whose
  efficiency is 1 by definition: the rates were measured there). What is
  left is how much slower the family computes than its devices' rates
  say: replicas interleaving on shared cores, a mesh's relayouts.

Example:

```python
rated = Calibration("x", "CPU", measured_rates)      # the rates, no overheads yet
for o in measure(local.resolve_devices(None), rated):
    print(o.family, o.num_devices, o.seconds(units=240), o.efficiency)
```
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any
from typing import Optional
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfscale.distribution_base import Distribution
from tfscale.planner import calibration as calibration_lib
from tfscale.planner import candidates as candidates_lib
from tfscale.planner import flops as flops_lib
from tfscale.planner import step_time as step_time_lib
from tfscale.sharding import distribution as sharding_distribution
from tfscale.strategies import distribution as strategy_distribution
from tfscale.strategies import local

__all__ = [
    "PROBE_LAYERS",
    "REFERENCE",
    "StepTimer",
    "measure",
]

# Layers of the larger dispatch probe (the smaller has one).
PROBE_LAYERS = 6
_PROBE_WIDTH = 8
# The reference encoder: tokens, width, MLP width, blocks, global batch.
REFERENCE = {"tokens": 16, "width": 128, "mlp": 512, "blocks": 1, "global_batch": 32}
_WARMUP_STEPS = 2
_TIMED_STEPS = {"probe": 10, "reference": 4}
# An efficiency outside this range is a failed measurement (noise), not a property.
_EFFICIENCY_RANGE = (0.25, 20.0)


def measure(
    names: Sequence[str], rated: calibration_lib.Calibration
) -> tuple[calibration_lib.StepOverhead, ...]:
    """Measures each family's overhead and efficiency on the devices the candidates use.

    The candidates for `n` devices use one device (`one_device`) or all `n`
    (the others), so `one_device` is measured on `names[0]` and, for `n >
    1`, `mirrored` on all of `names`, and `dtensor` (a `batch=n` mesh) and
    `dtensor_model` (`model=n`, `megatron` layout; its dispatch constants
    are `dtensor`'s) when `names` are every local device (a mesh spans
    them all; else `Calibration.overhead` falls back to `mirrored`'s).

    Args:
      names: the devices, as `local.resolve_devices` gives them.
      rated: the device rates just measured, which predict the reference
        model's arithmetic.

    Returns:
      One `StepOverhead` per family measured.
    """
    names = list(names)
    n = len(names)
    one = _measure(candidates_lib.candidates(1)[0], names, rated, 1.0)
    # The reference's measured over predicted arithmetic on one device.
    unit = one.efficiency
    found = [dataclasses.replace(one, efficiency=1.0)]
    if n == 1:
        return tuple(found)
    every = candidates_lib.candidates(n)
    found.append(_measure(every[1], names, rated, unit))  # mirrored
    if n == len(local.resolve_devices(None)):
        mesh = _measure(every[2], names, rated, unit)  # batch=n, data_parallel
        found.append(mesh)
        split = every[-1]  # batch=1,model=n, megatron
        efficiency = _efficiency(split, names, rated, mesh, unit)
        found.append(dataclasses.replace(mesh, family="dtensor_model", efficiency=efficiency))
    return tuple(found)


def _measure(
    candidate: candidates_lib.Candidate,
    names: list[str],
    rated: calibration_lib.Calibration,
    unit: float,
) -> calibration_lib.StepOverhead:
    dist = _distribution(candidate, names)
    points = []
    for layers in (1, PROBE_LAYERS):
        seconds = _step_seconds(dist, lambda: _probe(layers), candidate.num_replicas * 8, "probe")
        points.append((flops_lib.forward_ops(_probe(layers)), seconds))
    (u0, t0), (u1, t1) = points
    per_unit = max((t1 - t0) / (u1 - u0), 0.0)
    family = calibration_lib.family(candidate.kind, candidate.model_parallelism)
    dispatch = calibration_lib.StepOverhead(
        family, candidate.num_devices, max(t0 - per_unit * u0, 0.0), per_unit
    )
    return dataclasses.replace(
        dispatch, efficiency=_efficiency(candidate, names, rated, dispatch, unit, dist)
    )


def _efficiency(
    candidate: candidates_lib.Candidate,
    names: list[str],
    rated: calibration_lib.Calibration,
    dispatch: calibration_lib.StepOverhead,
    unit: float,
    dist: Optional[Distribution] = None,
) -> float:
    """The reference's measured step, less dispatch, over its predicted arithmetic, per `unit`."""
    dist = dist or _distribution(candidate, names)
    batch = REFERENCE["global_batch"]
    measured = _step_seconds(dist, _reference, batch, "reference")
    predicted = step_time_lib.predict(_reference, candidate, batch, rated, optimizer="adam")
    arithmetic = predicted.compute + predicted.communication
    ratio = (measured - dispatch.seconds(flops_lib.forward_ops(_reference()))) / arithmetic / unit
    low, high = _EFFICIENCY_RANGE
    return min(max(ratio, low), high)


def _distribution(candidate: candidates_lib.Candidate, names: list[str]) -> Distribution:
    if candidate.kind == "one_device":
        return strategy_distribution.kind("one_device", local.one_device)(device=names[0])
    if candidate.kind == "mirrored":
        return strategy_distribution.kind("mirrored", local.mirrored)(devices=names)
    return sharding_distribution.dtensor_distribution(**candidate.options)


def _step_seconds(dist: Distribution, model_fn: Any, global_batch: int, which: str) -> float:
    """Median seconds of a training step of `model_fn()` under `dist` (after a warm-up)."""
    with dist.scope():
        model = model_fn()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = np.ones((global_batch * 2, *model.input_shape[1:]), np.float32)
    y = np.ones((global_batch * 2, *model.output_shape[1:]), np.float32)
    batches = dist.distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).repeat(), global_batch
    )
    model.fit(batches, epochs=1, steps_per_epoch=_WARMUP_STEPS, verbose=0)
    timer = StepTimer()
    steps = _TIMED_STEPS[which]
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return statistics.median(timer.times)


def _probe(layers: int) -> keras.Model:
    inputs = x = keras.Input((_PROBE_WIDTH,))
    for i in range(layers):
        x = keras.layers.Dense(_PROBE_WIDTH, name=f"probe_{i}")(x)
    return keras.Model(inputs, x, name=f"probe_{layers}")


def _reference() -> keras.Model:
    """A pre-norm encoder; its layer names match the `megatron` layout's rules."""
    layers = keras.layers
    width = REFERENCE["width"]
    inputs = x = keras.Input((REFERENCE["tokens"], width))
    for i in range(REFERENCE["blocks"]):
        h = layers.LayerNormalization(name=f"block{i}_norm1")(x)
        h = layers.MultiHeadAttention(8, width // 8, name=f"block{i}_attention")(h, h)
        x = layers.Add()([x, h])
        h = layers.LayerNormalization(name=f"block{i}_norm2")(x)
        h = layers.Dense(REFERENCE["mlp"], activation="gelu", name=f"block{i}_mlp_up")(h)
        x = layers.Add()([x, layers.Dense(width, name=f"block{i}_mlp_down")(h)])
    return keras.Model(inputs, x, name="reference")


class StepTimer(keras.callbacks.Callback):
    """A Keras callback keeping each training step's wall time, in seconds.

    Example:

    ```python
    timer = StepTimer()
    model.fit(batches, steps_per_epoch=20, callbacks=[timer])
    statistics.median(timer.times[1:])
    ```
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.times.append(time.perf_counter() - self._start)
