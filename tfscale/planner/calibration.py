"""What this machine's devices do per second: the step-time model's constants.

A `Calibration` holds, for each number `N` of devices used at once that
was measured (each divisor of the device count), one device's matmul rate, its elementwise memory rate and the all-reduce cost over the `N`
(`DeviceRates`), and for each kind family on the device counts the
candidates use, a training step's cost beyond its arithmetic
(`StepOverhead`). `measure.calibrate` measures them once per machine and
caches them as JSON under `~/.cache/tfscale/calibration-<fingerprint>.json`,
the fingerprint naming the device type and count, the accelerator or CPU
model and the TensorFlow version.

Example:

```python
calibration = planner.calibrate()         # measured once per machine, then read from the cache
calibration.flops_per_s(4)                # per device, 4 devices busy
calibration.all_reduce_s(4, 1 << 20)      # one 1 MiB all-reduce over 4 devices
calibration.overhead(family("mirrored"), 4).seconds(units=200)   # Keras's own cost per step
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
from typing import Any
from typing import Optional
from typing import Sequence

import tensorflow as tf

from tfscale.strategies import local

__all__ = [
    "FAMILIES",
    "Calibration",
    "DeviceRates",
    "StepOverhead",
    "cache_path",
    "family",
    "fingerprint",
    "read_cache",
    "write_cache",
]

# The calibration file's format; a cached file of another version is measured again.
VERSION = 3
# Kind families whose steps cost differently beyond their arithmetic: the
# dispatch path of one device, of MirroredStrategy's replicas, of a DTensor
# mesh that only splits the batch, and of one that also splits the model.
FAMILIES = ("one_device", "mirrored", "dtensor", "dtensor_model")
_FALLBACKS = {
    "one_device": ("one_device",),
    "mirrored": ("mirrored",),
    "dtensor": ("dtensor", "mirrored"),
    "dtensor_model": ("dtensor_model", "dtensor", "mirrored"),
}


def family(kind: str, model_parallelism: int = 1) -> str:
    """The family of a kind: `multi_worker_mirrored` is `mirrored`'s; a mesh with a model axis `dtensor_model`.

    Raises:
      ValueError: for a kind with no family (`default`, `tpu`).
    """
    if kind == "multi_worker_mirrored":
        return "mirrored"
    if kind == "dtensor" and model_parallelism > 1:
        return "dtensor_model"
    if kind not in FAMILIES:
        raise ValueError(
            f"No step overhead is measured for kind {kind!r}. Valid kinds: one_device, "
            "mirrored, multi_worker_mirrored, dtensor"
        )
    return kind


@dataclasses.dataclass(frozen=True)
class DeviceRates:
    """What one device achieves while `num_devices` devices work at once.

    Attributes:
      num_devices: devices busy at once.
      flops_per_s: matmul FLOPs per second of one device.
      memory_bytes_per_s: bytes one device's elementwise ops read and write
        per second.
      all_reduce_alpha_s: latency of one all-reduce over the `num_devices`
        (0 for one device).
      all_reduce_beta_s: seconds per byte of one all-reduce over them.

    Example:

    ```python
    DeviceRates(2, 20e9, 5e9, 1e-4, 1e-9)
    ```
    """

    num_devices: int
    flops_per_s: float
    memory_bytes_per_s: float
    all_reduce_alpha_s: float
    all_reduce_beta_s: float

    def __post_init__(self) -> None:
        if self.num_devices < 1 or self.flops_per_s <= 0 or self.memory_bytes_per_s <= 0:
            raise ValueError(
                "DeviceRates needs num_devices >= 1, flops_per_s > 0 and memory_bytes_per_s > 0. "
                f"Received: num_devices={self.num_devices}, flops_per_s={self.flops_per_s}, "
                f"memory_bytes_per_s={self.memory_bytes_per_s}"
            )
        if min(self.all_reduce_alpha_s, self.all_reduce_beta_s) < 0:
            raise ValueError(f"DeviceRates times must be non-negative. Received: {self}")


@dataclasses.dataclass(frozen=True)
class StepOverhead:
    """What a training step costs under one kind family beyond the model's arithmetic.

    Attributes:
      family: one of `FAMILIES` (see `family`).
      num_devices: devices the kind spans.
      base_s: seconds per step whatever the model.
      per_unit_s: seconds per op of the model's forward pass.
      efficiency: measured over predicted arithmetic (compute and
        communication) of a reference model under the family: how much
        slower than the rates alone its steps compute.

    Example:

    ```python
    StepOverhead("mirrored", 2, 2e-3, 5e-5).seconds(units=30)   # 3.5e-3 s
    ```
    """

    family: str
    num_devices: int
    base_s: float
    per_unit_s: float
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"StepOverhead.family must be one of {', '.join(FAMILIES)}. "
                f"Received: {self.family!r}"
            )
        if self.num_devices < 1 or min(self.base_s, self.per_unit_s) < 0 or self.efficiency <= 0:
            raise ValueError(
                "StepOverhead needs num_devices >= 1, non-negative times and efficiency > 0. "
                f"Received: {self}"
            )

    def seconds(self, units: int) -> float:
        """The fixed cost of a step of a model of `units` units."""
        return self.base_s + self.per_unit_s * units


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Measured device rates of one machine, by number of devices busy.

    Attributes:
      fingerprint: what the rates were measured on (see `fingerprint`).
      device_type: `"CPU"` or `"GPU"`.
      rates: one `DeviceRates` per measured device count, ascending.
      overheads: the step overhead of each kind family measured
        (`StepOverhead`); none: steps cost their arithmetic only.
      info: how it was measured (TF version, CPU model, seconds taken);
        not used by the model.

    Counts between the measured ones use the nearest measured count below;
    counts above the largest keep its total compute rate (the devices share
    what the largest set shared) and scale its all-reduce as a ring does.

    Example:

    ```python
    calibration = Calibration.from_dict(
        {"fingerprint": "test", "device_type": "CPU",
         "rates": [{"num_devices": 1, "flops_per_s": 1e10, "memory_bytes_per_s": 1e10,
                    "all_reduce_alpha_s": 0, "all_reduce_beta_s": 0}]})
    calibration.flops_per_s(1)   # 1e10
    ```
    """

    fingerprint: str
    device_type: str
    rates: tuple[DeviceRates, ...]
    overheads: tuple[StepOverhead, ...] = ()
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

    def memory_bytes_per_s(self, num_devices: int) -> float:
        """Bytes one device's elementwise ops move per second while `num_devices` work."""
        rates = self._rates(num_devices)
        if num_devices > self.rates[-1].num_devices:
            return rates.memory_bytes_per_s * rates.num_devices / num_devices
        return rates.memory_bytes_per_s

    def overhead(self, family_name: str, num_devices: int) -> StepOverhead:
        """The step overhead of a kind family (see `family`) on `num_devices`.

        The measurement of the family on the nearest device count at or
        below `num_devices` (else above); an unmeasured `dtensor_model`
        takes `dtensor`'s, an unmeasured `dtensor` `mirrored`'s; none
        measured: no overhead, efficiency 1.
        """
        for name in _FALLBACKS[family_name]:
            measured = [o for o in self.overheads if o.family == name]
            if measured:
                below = [o for o in measured if o.num_devices <= num_devices]
                if below:
                    return max(below, key=lambda o: o.num_devices)
                return min(measured, key=lambda o: o.num_devices)
        return StepOverhead(family_name, num_devices, 0.0, 0.0)

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
            "overheads": [dataclasses.asdict(o) for o in self.overheads],
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
                tuple(StepOverhead(**o) for o in value.get("overheads", ())),
                dict(value.get("info", {})),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                "A calibration dict needs fingerprint, device_type and rates (num_devices, "
                "flops_per_s, memory_bytes_per_s, all_reduce_alpha_s, all_reduce_beta_s). "
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
    return hashlib.sha256(json.dumps(machine(names), sort_keys=True).encode()).hexdigest()[:16]


def cache_path(devices: Optional[Sequence[str]] = None, cache_dir: Optional[str] = None) -> str:
    """`<cache_dir>/calibration-<fingerprint>.json`; default dir `~/.cache/tfscale`."""
    directory = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "tfscale")
    return os.path.join(directory, f"calibration-{fingerprint(devices)}.json")


def read_cache(path: str) -> Optional[Calibration]:
    """The calibration cached at `path`; `None` when missing, unreadable or of another version."""
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("version") == VERSION:
            return Calibration.from_dict(cached)
    except (OSError, ValueError):
        pass  # measured again
    return None


def write_cache(path: str, calibration: Calibration) -> None:
    """Writes `calibration` to `path` (a temporary file, then renamed: readers never see half)."""
    _write_json(path, calibration.to_dict())


def machine(names: Sequence[str]) -> dict[str, Any]:
    """What the calibration of `names` depends on: device type and count, model, TF version."""
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
