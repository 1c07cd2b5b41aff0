"""Logical devices: split physical CPUs and GPUs before TensorFlow initializes.

Simulating several devices on one machine is how tfscale runs (and tests)
multi-device code without accelerators: the CPU is split into N logical
CPUs, each of which a `MirroredStrategy` or a DTensor mesh treats as a device.
TensorFlow only accepts this before its runtime initializes, so
`configure_devices` must run at the start of the program.

Example:

```python
import tfscale

tfscale.configure_devices(virtual_cpus=4)
print(tfscale.local_devices("CPU"))  # ['/device:CPU:0', ..., '/device:CPU:3']
```
"""

from __future__ import annotations

import os
from typing import Optional

import tensorflow as tf

__all__ = [
    "DevicesAlreadyInitializedError",
    "accelerator_type",
    "configure_devices",
    "local_devices",
]


class DevicesAlreadyInitializedError(RuntimeError):
    """Raised when devices are configured after TensorFlow has initialized."""


def configure_devices(
    virtual_cpus: Optional[int] = None,
    virtual_gpus_per_gpu: Optional[int] = None,
    gpu_memory_limit_mb: Optional[int] = None,
) -> None:
    """Splits the physical devices into logical ones.

    Calling it again with the same arguments is a no-op, so every entry point
    of a program may call it.

    Args:
      virtual_cpus: number of logical CPUs to split the first physical CPU
        into; `None` leaves the CPU alone.
      virtual_gpus_per_gpu: number of logical GPUs per physical GPU; needs
        `gpu_memory_limit_mb` and a GPU.
      gpu_memory_limit_mb: memory of each logical GPU in MiB. Alone, it caps
        every physical GPU at one logical device of that size.

    It does not initialize TensorFlow (so a multi-worker strategy can still
    be created after it); `local_devices()` does.

    Raises:
      ValueError: for a count below 1, a GPU split without a memory limit,
        or GPU options on a machine without a GPU (nothing is configured).
      DevicesAlreadyInitializedError: if TensorFlow initialized its devices
        already with a different configuration.
    """
    _check_count("virtual_cpus", virtual_cpus)
    _check_count("virtual_gpus_per_gpu", virtual_gpus_per_gpu)
    _check_count("gpu_memory_limit_mb", gpu_memory_limit_mb)
    if virtual_gpus_per_gpu is not None and gpu_memory_limit_mb is None:
        raise ValueError(
            "virtual_gpus_per_gpu needs gpu_memory_limit_mb: TensorFlow requires "
            "a memory limit for each logical GPU. Received: "
            f"virtual_gpus_per_gpu={virtual_gpus_per_gpu}, gpu_memory_limit_mb=None"
        )
    plan = []
    if virtual_cpus is not None:
        cpu = tf.config.list_physical_devices("CPU")[0]
        plan.append((cpu, [tf.config.LogicalDeviceConfiguration()] * virtual_cpus))
    if gpu_memory_limit_mb is not None:
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            # Training on the CPU instead would be a silent change of hardware.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ValueError(
                "virtual_gpus_per_gpu and gpu_memory_limit_mb split a GPU, but TensorFlow "
                "finds none on this machine (tf.config.list_physical_devices('GPU') is empty"
                + ("" if visible is None else f"; CUDA_VISIBLE_DEVICES={visible!r}")
                + "). Drop them to run on the CPU, or use virtual_cpus=N to simulate devices. "
                f"Received: virtual_gpus_per_gpu={virtual_gpus_per_gpu}, "
                f"gpu_memory_limit_mb={gpu_memory_limit_mb}"
            )
        per_gpu = virtual_gpus_per_gpu or 1
        config = tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_limit_mb)
        plan.extend((gpu, [config] * per_gpu) for gpu in gpus)
    for device, logical in plan:
        try:
            tf.config.set_logical_device_configuration(device, logical)
        except RuntimeError:
            raise DevicesAlreadyInitializedError(
                _late_message(virtual_cpus, virtual_gpus_per_gpu, gpu_memory_limit_mb)
            ) from None


def accelerator_type() -> str:
    """`"GPU"` when this process can use a GPU, else `"CPU"`.

    Reads the visible physical devices, so it does not initialize
    TensorFlow's devices (DTensor's multi-client set-up must come first).
    """
    return "GPU" if tf.config.get_visible_devices("GPU") else "CPU"


def local_devices(device_type: Optional[str] = None) -> list[str]:
    """Names of the logical devices of this process, e.g. `/device:CPU:0`.

    This initializes TensorFlow's devices: call `configure_devices` first.

    Args:
      device_type: `"CPU"`, `"GPU"` or `None` for all.
    """
    return [d.name for d in tf.config.list_logical_devices(device_type)]


def _check_count(name: str, value: Optional[int]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _late_message(*args: Optional[int]) -> str:
    cpus = len(tf.config.list_logical_devices("CPU"))
    gpus = len(tf.config.list_logical_devices("GPU"))
    wanted = ", ".join(
        f"{k}={v}"
        for k, v in zip(("virtual_cpus", "virtual_gpus_per_gpu", "gpu_memory_limit_mb"), args)
        if v is not None
    )
    return (
        f"configure_devices({wanted}) came too late: TensorFlow already "
        f"initialized its devices ({cpus} logical CPU(s), {gpus} logical GPU(s)). "
        "Call tfscale.configure_devices at the start of the program, before "
        "any TensorFlow op, model or strategy is created."
    )
