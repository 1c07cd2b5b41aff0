"""What this machine's devices do per second: the step-time model's constants.

A micro benchmark, run once per machine and cached, measures for `N` = 1,
2, 4, 8 (up to the device count, and the count itself) devices used at
once:

- **compute**: a chain of `K` square float32 matmuls on each of the `N`
  devices, all in one `tf.function` so that they run concurrently, for a
  tiny and a large size `s`. Per device, a matmul takes `t(s) = overhead +
  2 s^3 / rate`, solved for the two: `flops_per_s` is the rate one device
  achieves while all `N` compute (logical CPUs share the cores, so `N`
  devices do not do `N` times the work of one), `matmul_overhead_s` the
  fixed cost of one op.
- **all-reduce**: a chain of `K` all-reduces (a `MirroredStrategy` over
  the `N` devices, the collective the `mirrored` kind uses) for a few
  message sizes `S` in bytes: `t(S) = alpha + beta * S`, fit by least
  squares. `alpha` (seconds) and `beta` (seconds per byte) are for the whole
  collective over `N` devices; in a ring model they would be `2 (N - 1)`
  link latencies and `2 (N - 1) / N` of the link's time per byte, but
  logical devices on one host follow no such law, so each `N` is measured.

The function call's own overhead is timed apart and taken off; of a few
calls the fastest counts. The result
is cached as JSON under `~/.cache/tfscale/calibration-<fingerprint>.json`,
the fingerprint naming the device type and count, the accelerator or CPU
model and the TensorFlow version.

Example:

```python
calibration = calibrate()                 # measured once (< 30 s), then read from the cache
calibration.flops_per_s(4)                # per device, 4 devices busy
calibration.all_reduce_s(4, 1 << 20)      # one 1 MiB all-reduce over 4 devices
Calibration.from_dict(calibration.to_dict()) == calibration   # True
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfscale.strategies import local

__all__ = [
    "Calibration",
    "DeviceRates",
    "cache_path",
    "calibrate",
    "fingerprint",
]

# The calibration file's format; a cached file of another version is measured again.
VERSION = 1
DEVICE_COUNTS = (1, 2, 4, 8)
# A tiny matmul (its time is the op's overhead) and a large one (its time is arithmetic).
MATMUL_SIZES = (32, 384)
ALL_REDUCE_BYTES = (4 << 10, 256 << 10, 2 << 20)
CHAIN = 4  # ops per timed call
REPEATS = 5  # timed calls per point; the fastest counts (others' load only slows)


@dataclasses.dataclass(frozen=True)
class DeviceRates:
    """What one device achieves while `num_devices` devices work at once.

    Attributes:
      num_devices: devices busy at once.
      flops_per_s: matmul FLOPs per second of one device.
      matmul_overhead_s: the fixed cost of one matmul op.
      all_reduce_alpha_s: latency of one all-reduce over the `num_devices`
        (0 for one device).
      all_reduce_beta_s: seconds per byte of one all-reduce over them.

    Example:

    ```python
    DeviceRates(2, 20e9, 1e-5, 1e-4, 1e-9)
    ```
    """

    num_devices: int
    flops_per_s: float
    matmul_overhead_s: float
    all_reduce_alpha_s: float
    all_reduce_beta_s: float

    def __post_init__(self) -> None:
        if self.num_devices < 1 or self.flops_per_s <= 0:
            raise ValueError(
                "DeviceRates needs num_devices >= 1 and flops_per_s > 0. Received: "
                f"num_devices={self.num_devices}, flops_per_s={self.flops_per_s}"
            )
        if min(self.matmul_overhead_s, self.all_reduce_alpha_s, self.all_reduce_beta_s) < 0:
            raise ValueError(f"DeviceRates times must be non-negative. Received: {self}")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Measured device rates of one machine, by number of devices busy.

    Attributes:
      fingerprint: what the rates were measured on (see `fingerprint`).
      device_type: `"CPU"` or `"GPU"`.
      rates: one `DeviceRates` per measured device count, ascending.
      info: how it was measured (TF version, CPU model, seconds taken);
        not used by the model.

    Counts between the measured ones use the nearest measured count below;
    counts above the largest keep its total compute rate (the devices share
    what the largest set shared) and scale its all-reduce as a ring does.

    Example:

    ```python
    calibration = Calibration.from_dict(
        {"fingerprint": "test", "device_type": "CPU",
         "rates": [{"num_devices": 1, "flops_per_s": 1e10, "matmul_overhead_s": 0,
                    "all_reduce_alpha_s": 0, "all_reduce_beta_s": 0}]})
    calibration.flops_per_s(1)   # 1e10
    ```
    """

    fingerprint: str
    device_type: str
    rates: tuple[DeviceRates, ...]
    info: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        rates = tuple(sorted(self.rates, key=lambda r: r.num_devices))
        if not rates or rates[0].num_devices != 1:
            counts = [r.num_devices for r in rates]
            raise ValueError(
                f"A calibration needs the rates of one device. Received: device counts {counts}"
            )
        object.__setattr__(self, "rates", rates)

    def flops_per_s(self, num_devices: int) -> float:
        """Matmul FLOPs per second of one device while `num_devices` compute."""
        rates = self._rates(num_devices)
        if num_devices > self.rates[-1].num_devices:
            return rates.flops_per_s * rates.num_devices / num_devices
        return rates.flops_per_s

    def matmul_overhead_s(self, num_devices: int) -> float:
        """The fixed cost of one matmul while `num_devices` compute."""
        return self._rates(num_devices).matmul_overhead_s

    def all_reduce_s(self, num_devices: int, num_bytes: float) -> float:
        """Seconds of one all-reduce of `num_bytes` over `num_devices` (0 on one device).

        Raises:
          ValueError: for several devices when no all-reduce was measured.
        """
        if num_devices <= 1:
            return 0.0
        rates = self._rates(num_devices)
        known = rates.num_devices
        if known < 2:
            raise ValueError(
                f"This calibration measured no all-reduce (device counts "
                f"{[r.num_devices for r in self.rates]}). Received: num_devices={num_devices}"
            )
        # A ring: 2 (n - 1) latencies, 2 (n - 1) / n of the bytes per device.
        latency = (num_devices - 1) / (known - 1)
        per_byte = ((num_devices - 1) / num_devices) / ((known - 1) / known)
        return rates.all_reduce_alpha_s * latency + rates.all_reduce_beta_s * per_byte * num_bytes

    def all_gather_s(self, num_devices: int, num_bytes: float) -> float:
        """Seconds to gather `num_bytes` (the whole result) over `num_devices`.

        A ring all-gather is the second half of a ring all-reduce.
        """
        return self.all_reduce_s(num_devices, num_bytes) / 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "device_type": self.device_type,
            "rates": [dataclasses.asdict(r) for r in self.rates],
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "Calibration":
        """The calibration `to_dict` wrote.

        Raises:
          ValueError: for a dict of another format, naming what is missing.
        """
        try:
            return cls(
                str(value["fingerprint"]),
                str(value["device_type"]),
                tuple(DeviceRates(**r) for r in value["rates"]),
                dict(value.get("info", {})),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                "A calibration dict needs fingerprint, device_type and rates (num_devices, "
                "flops_per_s, matmul_overhead_s, all_reduce_alpha_s, all_reduce_beta_s). "
                f"Received: {value!r} ({type(e).__name__}: {e})"
            ) from None

    def _rates(self, num_devices: int) -> DeviceRates:
        below = [r for r in self.rates if r.num_devices <= num_devices]
        return below[-1]

    def __repr__(self) -> str:
        counts = ",".join(str(r.num_devices) for r in self.rates)
        return (
            f"Calibration(fingerprint={self.fingerprint!r}, device_type={self.device_type!r}, "
            f"num_devices=[{counts}])"
        )


def fingerprint(devices: Optional[Sequence[str]] = None) -> str:
    """A short hash of what calibration results depend on.

    The device type and count, the accelerator's or the CPU's model name and
    the TensorFlow version.
    """
    names = local.resolve_devices(devices)
    return hashlib.sha256(json.dumps(_machine(names), sort_keys=True).encode()).hexdigest()[:16]


def cache_path(devices: Optional[Sequence[str]] = None, cache_dir: Optional[str] = None) -> str:
    """`<cache_dir>/calibration-<fingerprint>.json`; default dir `~/.cache/tfscale`."""
    directory = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "tfscale")
    return os.path.join(directory, f"calibration-{fingerprint(devices)}.json")


def calibrate(
    devices: Optional[Sequence[str]] = None,
    force: bool = False,
    cache_dir: Optional[str] = None,
) -> Calibration:
    """This machine's calibration: read from the cache, else measured and cached.

    Args:
      devices: the devices to measure, as the `mirrored` kind takes them
        (`None`: every GPU, else every logical CPU).
      force: measure even when a cached calibration exists.
      cache_dir: where calibrations are cached (default `~/.cache/tfscale`).

    Returns:
      The `Calibration`, with rates for 1, 2, 4, 8 and `len(devices)`
      devices (those up to `len(devices)`).

    Example:

    ```python
    tfscale.configure_devices(virtual_cpus=4)
    calibrate().flops_per_s(4)
    ```
    """
    names = local.resolve_devices(devices)
    path = cache_path(names, cache_dir)
    if not force and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                cached = json.load(f)
            if cached.get("version") == VERSION:
                return Calibration.from_dict(cached)
        except (OSError, ValueError):
            pass  # an unreadable cache is measured again
    calibration = _measure(names)
    _write_json(path, calibration.to_dict())
    return calibration


def _measure(names: list[str]) -> Calibration:
    start = time.perf_counter()
    counts = sorted({n for n in DEVICE_COUNTS if n <= len(names)} | {len(names)})
    rates = []
    for n in counts:
        flops, overhead = _matmul_rate(names[:n])
        alpha, beta = _all_reduce_cost(names[:n]) if n > 1 else (0.0, 0.0)
        rates.append(DeviceRates(n, flops, overhead, alpha, beta))
    machine = _machine(names)
    info = {**machine, "seconds": round(time.perf_counter() - start, 2)}
    return Calibration(fingerprint(names), machine["device_type"], tuple(rates), info)


def _matmul_rate(names: list[str]) -> tuple[float, float]:
    """`(flops_per_s, overhead_s)` of one device's matmul while all `names` compute."""

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
    per_s, overhead = _fit(points)
    if per_s <= 0:  # noise swamped the difference: the large size alone
        flops, seconds = points[-1]
        return flops / max(seconds, 1e-9), 0.0
    return 1.0 / per_s, overhead


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


def _machine(names: list[str]) -> dict[str, Any]:
    device_type = (tf.DeviceSpec.from_string(names[0]).device_type or "CPU").upper()
    model = _cpu_model()
    if device_type == "GPU":
        physical = tf.config.list_physical_devices("GPU")
        details = tf.config.experimental.get_device_details(physical[0]) if physical else {}
        model = str(details.get("device_name", "GPU"))
    return {
        "device_type": device_type,
        "num_devices": len(names),
        "model": model,
        "tensorflow": tf.__version__,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_json(path: str, value: dict[str, Any]) -> None:
    """Written to a temporary file then renamed: a reader never sees half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
