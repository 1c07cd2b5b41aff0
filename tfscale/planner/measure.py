"""The micro benchmarks that measure a `Calibration`, and `calibrate`, which caches it.

Run once per machine and device count (20-45 s on 2 to 8 CPU devices) and
cached; for each `N` that divides the device count (the candidates compute
on one device or all, and a mesh all-reduces over the devices of an axis),
`N` devices used at once:

- **compute**: a chain of `K` square float32 matmuls on each of the `N`
  devices, all in one `tf.function` so that they run concurrently, for a
  tiny and a large size `s`. Per device, a matmul takes `t(s) = c + 2 s^3
  / rate`, solved for the two: `flops_per_s` is the rate one device
  achieves while all `N` compute (logical CPUs share the cores, so `N`
  devices do not do `N` times the work of one).
- **memory**: a chain of `K` elementwise ops on a 32 MiB tensor per
  device: `memory_bytes_per_s` is one device's rate of bytes read plus
  written while all `N` work, which bounds the layers without a matmul
  and the optimizer's update.
- **all-reduce**: a chain of `K` all-reduces (a `MirroredStrategy` over
  the `N` devices, the collective the `mirrored` kind uses) for a few
  message sizes `S` in bytes: `t(S) = alpha + beta * S`, fit by least
  squares. `alpha` (seconds) and `beta` (seconds per byte) are for the whole
  collective over `N` devices; in a ring model they would be `2 (N - 1)`
  link latencies and `2 (N - 1) / N` of the link's time per byte, but
  logical devices on one host follow no such law, so each `N` is measured.
- **step overhead**: what a Keras training step costs beyond its
  arithmetic, per kind family, on the device counts the candidates use
  (`overhead.measure`).

The function call's own overhead is timed apart and taken off; of a few
calls the fastest counts.

Example:

```python
tfscale.configure_devices(virtual_cpus=4)
calibration = calibrate()                 # measured once, then read from the cache
calibrate(force=True)                     # measured again
```
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfscale.planner import calibration as calibration_lib
from tfscale.planner import overhead as overhead_lib
from tfscale.strategies import local

__all__ = [
    "calibrate",
]

# A tiny matmul (its time is the op's overhead) and a large one (its time is arithmetic).
MATMUL_SIZES = (32, 384)
ALL_REDUCE_BYTES = (4 << 10, 256 << 10, 2 << 20)
MEMORY_ELEMENTS = 8 << 20  # float32: 32 MiB per device, beyond the caches
CHAIN = 4  # ops per timed call
REPEATS = 5  # timed calls per point; the fastest counts (others' load only slows)


def calibrate(
    devices: Optional[Sequence[str]] = None,
    force: bool = False,
    cache_dir: Optional[str] = None,
) -> calibration_lib.Calibration:
    """This machine's calibration: read from the cache, else measured and cached.

    Args:
      devices: the devices to measure, as the `mirrored` kind takes them
        (`None`: every GPU, else every logical CPU).
      force: measure even when a cached calibration exists.
      cache_dir: where calibrations are cached (default `~/.cache/tfscale`).

    Returns:
      The `Calibration`, with rates for each count of devices that divides
      `len(devices)`, and the step overhead of each kind family.

    Example:

    ```python
    tfscale.configure_devices(virtual_cpus=4)
    calibrate().flops_per_s(4)
    ```
    """
    names = local.resolve_devices(devices)
    path = calibration_lib.cache_path(names, cache_dir)
    cached = None if force else calibration_lib.read_cache(path)
    if cached is not None:
        return cached
    calibration = _measure(names)
    calibration_lib.write_cache(path, calibration)
    return calibration


def _measure(names: list[str]) -> calibration_lib.Calibration:
    start = time.perf_counter()
    # The candidates compute on one device or all of them, and all-reduce
    # over groups of any size that divides the count (a mesh's axes).
    counts = [d for d in range(1, len(names) + 1) if len(names) % d == 0]
    rates = []
    for n in counts:
        flops = _matmul_rate(names[:n])
        memory = _memory_rate(names[:n])
        alpha, beta = _all_reduce_cost(names[:n]) if n > 1 else (0.0, 0.0)
        rates.append(calibration_lib.DeviceRates(n, flops, memory, alpha, beta))
    machine = calibration_lib.machine(names)
    rated = calibration_lib.Calibration(
        calibration_lib.fingerprint(names), machine["device_type"], tuple(rates)
    )
    overheads = overhead_lib.measure(names, rated)
    info = {**machine, "seconds": round(time.perf_counter() - start, 2)}
    return dataclasses.replace(rated, overheads=overheads, info=info)


def _matmul_rate(names: list[str]) -> float:
    """FLOPs per second of one device's matmuls while all `names` compute."""

    def chain(pairs: list) -> list:
        outputs = []
        for name, (x, w) in zip(names, pairs):
            with tf.device(name):
                for _ in range(CHAIN):
                    x = tf.matmul(x, w)
                outputs.append(x[0, 0])
        return outputs

    def empty(pairs: list) -> list:
        outputs = []
        for name, (x, _) in zip(names, pairs):
            with tf.device(name):
                outputs.append(x[0, 0])
        return outputs

    # Traced once for any size (a trace costs more than the timing).
    timed = tf.function(chain, reduce_retracing=True)
    baseline = tf.function(empty, reduce_retracing=True)
    points = []
    for size in MATMUL_SIZES:
        operands = []
        for name in names:
            with tf.device(name):
                # Scaled so that the chain's values neither grow nor vanish.
                w = tf.random.normal((size, size), seed=1) / np.sqrt(size)
                operands.append((tf.identity(w), tf.identity(w)))
        seconds = _timed(timed, operands) - _timed(baseline, operands)
        points.append((2.0 * size**3, max(seconds, 0.0) / CHAIN))
    per_s, _ = _fit(points)
    if per_s <= 0:  # noise swamped the difference: the large size alone
        flops, seconds = points[-1]
        return flops / max(seconds, 1e-9)
    return 1.0 / per_s


def _memory_rate(names: list[str]) -> float:
    """Bytes per second one device's elementwise ops read and write while all `names` work."""

    def chain(values: list) -> list:
        outputs = []
        for name, x in zip(names, values):
            with tf.device(name):
                for _ in range(CHAIN):
                    x = x * 0.5 + 1.0  # two ops, each reading and writing the tensor
                outputs.append(x[0])
        return outputs

    def empty(values: list) -> list:
        outputs = []
        for name, x in zip(names, values):
            with tf.device(name):
                outputs.append(x[0])
        return outputs

    values = []
    for name in names:
        with tf.device(name):
            values.append(tf.ones((MEMORY_ELEMENTS,), tf.float32))
    seconds = _timed(tf.function(chain), values) - _timed(tf.function(empty), values)
    moved = CHAIN * 2 * 2 * MEMORY_ELEMENTS * 4
    return moved / max(seconds, 1e-9)


def _all_reduce_cost(names: list[str]) -> tuple[float, float]:
    """Least-squares `(alpha_s, beta_s)` of one all-reduce over `names`."""
    strategy = local.mirrored(devices=names)
    scale = 1.0 / len(names)

    def reduce_chain(x: tf.Tensor) -> tf.Tensor:
        context = tf.distribute.get_replica_context()
        for _ in range(CHAIN):
            x = context.all_reduce(tf.distribute.ReduceOp.SUM, x) * scale
        return x[0]

    def empty(x: tf.Tensor) -> tf.Tensor:
        return x[0]

    # Collectives take fixed shapes: one trace per size. The call's own cost
    # barely depends on the size: timed once.
    baseline = None
    points = []
    for num_bytes in ALL_REDUCE_BYTES:
        values = strategy.experimental_distribute_values_from_function(
            lambda _: tf.ones((num_bytes // 4,), tf.float32)
        )
        if baseline is None:
            baseline = _timed(tf.function(lambda v: strategy.run(empty, args=(v,))), values)
        timed = tf.function(lambda v: strategy.run(reduce_chain, args=(v,)))
        points.append((float(num_bytes), max(_timed(timed, values) - baseline, 0.0) / CHAIN))
    beta, alpha = _fit(points)
    return max(alpha, 0.0), max(beta, 0.0)


def _timed(fn: Callable[[Any], Any], arg: Any) -> float:
    """Fewest seconds of `fn(arg)` over `REPEATS` calls after a warm-up call (which traces it).

    The fastest call is the one least slowed by other processes' load.
    """
    _block(fn(arg))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        _block(fn(arg))
        times.append(time.perf_counter() - start)
    return min(times)


def _block(result: Any) -> None:
    for t in tf.nest.flatten(result, expand_composites=True):
        np.asarray(t)  # waits for the value


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares `y = slope * x + intercept`; the intercept is clamped at 0."""
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), max(float(intercept), 0.0)
