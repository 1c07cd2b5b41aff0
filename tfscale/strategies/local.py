"""One-host `tf.distribute` strategies: default, one device, mirrored.

Each builder validates its options and returns a ready strategy. The
distribution facade (`tfscale.distribution`) turns the builder's keyword
arguments into the kind's options, so a new option here is a new option there.

Example:

```python
from tfscale.strategies import local

strategy = local.mirrored(devices=2, all_reduce="reduce_to_one")
strategy.num_replicas_in_sync  # 2
```
"""

from __future__ import annotations

import itertools
from typing import Any
from typing import Optional
from typing import Sequence
from typing import Union

import tensorflow as tf

from tfscale import compat
from tfscale import devices as devices_lib
from tfscale.strategies import keras_paths

__all__ = [
    "ALL_REDUCE",
    "default",
    "mirrored",
    "one_device",
    "resolve_devices",
]

DeviceList = Union[None, int, str, Sequence[str]]

ALL_REDUCE = ("auto", "nccl", "hierarchical_copy", "reduce_to_one")


class _OneDeviceStrategy(keras_paths.KerasPathsMixin, tf.distribute.OneDeviceStrategy):
    """A `OneDeviceStrategy` with the Keras path fixes of `keras_paths`."""

    def __init__(self, device: str):
        super().__init__(device)
        self._keras_paths_init()


class _MirroredStrategy(keras_paths.KerasPathsMixin, tf.distribute.MirroredStrategy):
    """A `MirroredStrategy` whose collective keys no other strategy shares.

    It also has the Keras path fixes of `keras_paths`. Every stock
    `MirroredStrategy` starts its collective group keys at 1 and its
    instance keys at 100, so a second strategy over the same devices in
    one process reuses the first one's collective instances; when the second
    reduces tensors of other shapes, TensorFlow aborts with "Shape mismatch
    in the collective instance 100". A distinct key base per strategy keeps
    their collective groups apart.
    """

    _key_bases = itertools.count(1)

    def __init__(self, *args: Any, **kwargs: Any):
        compat.set_collective_key_base(self, next(self._key_bases) * 100_000)
        super().__init__(*args, **kwargs)
        self._keras_paths_init()


def default() -> tf.distribute.Strategy:
    """TensorFlow's default strategy: no distribution, the current device."""
    return tf.distribute.get_strategy()


def one_device(device: Optional[str] = None) -> tf.distribute.OneDeviceStrategy:
    """Places variables and computation on one device.

    Args:
      device: a device name such as `"/cpu:0"` or `"/gpu:1"`; the first GPU,
        else the first CPU, when `None`.
    """
    (name,) = resolve_devices([device] if device is not None else 1)
    return _OneDeviceStrategy(name)


def mirrored(
    devices: DeviceList = None, all_reduce: str = "auto"
) -> tf.distribute.MirroredStrategy:
    """Synchronous data parallelism over the devices of this host.

    Args:
      devices: device names, a comma-separated string of them, or a count
        (the first N logical GPUs, else CPUs). `None` takes every logical GPU,
        else every logical CPU; unlike `tf.distribute.MirroredStrategy()`,
        logical CPUs count as devices, so a CPU split by
        `tfscale.configure_devices` is used whole.
      all_reduce: `"auto"` (TensorFlow's choice), `"nccl"` (GPUs only),
        `"hierarchical_copy"` or `"reduce_to_one"`.
    """
    if all_reduce not in ALL_REDUCE:
        raise ValueError(
            f"all_reduce must be one of {', '.join(ALL_REDUCE)}. "
            f"Received: all_reduce={all_reduce!r}"
        )
    names = resolve_devices(devices)
    if all_reduce == "nccl" and any("GPU" not in n for n in names):
        raise ValueError(
            "all_reduce='nccl' needs GPU devices only. "
            f"Received: all_reduce='nccl', devices={names}"
        )
    return _MirroredStrategy(names, cross_device_ops=_cross_device_ops(all_reduce))


def resolve_devices(devices: DeviceList) -> list[str]:
    """Expands a device list option into full logical device names.

    Args:
      devices: `None` (all GPUs, else all CPUs), a count, a comma-separated
        string or a sequence of names.

    Returns:
      Canonical names such as `/job:localhost/replica:0/task:0/device:CPU:1`.

    Raises:
      ValueError: for a count larger than the devices present or a name that
        matches no logical device.
    """
    gpus = devices_lib.local_devices("GPU")
    preferred = gpus or devices_lib.local_devices("CPU")
    if devices is None:
        return preferred
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(preferred):
            raise ValueError(
                f"devices={devices} asks for more devices than this host has "
                f"({len(preferred)}: {preferred}). Split the CPU with "
                "tfscale.configure_devices(virtual_cpus=N) to simulate more."
            )
        return preferred[:devices]
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if not devices or not all(isinstance(d, str) for d in devices):
        raise ValueError(
            "devices must be None, a positive count, or device names. "
            f"Received: devices={devices!r}"
        )
    available = devices_lib.local_devices()
    return [_match_device(d, available) for d in devices]


def _match_device(name: str, available: list[str]) -> str:
    try:
        wanted = tf.DeviceSpec.from_string(name)
    except ValueError as e:
        raise ValueError(f"Malformed device name {name!r}: {e}") from None
    for candidate in available:
        spec = tf.DeviceSpec.from_string(candidate)
        if (spec.device_type or "").upper() == (wanted.device_type or "").upper() and (
            spec.device_index == (wanted.device_index or 0)
        ):
            return candidate
    raise ValueError(f"Device {name!r} not found. Available devices: {available}")


def _cross_device_ops(all_reduce: str) -> Optional[tf.distribute.CrossDeviceOps]:
    if all_reduce == "nccl":
        return tf.distribute.NcclAllReduce()
    if all_reduce == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    if all_reduce == "reduce_to_one":
        return tf.distribute.ReductionToOneDevice()
    return None
