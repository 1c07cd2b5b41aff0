"""Device meshes from a one-line spec: `"batch=2,model=2"`.

A mesh names the axes a model is laid out over. `MeshSpec.parse` reads the
spec (axis names and sizes, in order, the last axis varying fastest over the
devices); `build_mesh` checks it against the devices and makes the DTensor
mesh, over this process's devices or, in a multi-client job, over the
devices of every worker.

Example:

```python
spec = MeshSpec.parse("batch=2,model=2")
spec.size            # 4
mesh = build_mesh(spec)   # needs 4 local devices, e.g. 4 logical CPUs
```
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional
from typing import Sequence

import tensorflow as tf
from tensorflow.experimental import dtensor

from tfscale import devices as devices_lib

__all__ = [
    "BATCH_AXIS",
    "MeshSpec",
    "batch_axis_of",
    "build_mesh",
]

BATCH_AXIS = "batch"

_AXIS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def batch_axis_of(axis_names: Sequence[str], batch_axis: Optional[str] = None) -> Optional[str]:
    """The mesh axis input batches are split over.

    Args:
      axis_names: the mesh's axis names.
      batch_axis: an axis name, or None for the default: `"batch"` when the
        mesh has that axis, else none (every device sees the whole batch).

    Raises:
      ValueError: for a name the mesh lacks (a misspelling must not mean
        "no batch splitting").

    Example:

    ```python
    batch_axis_of(["batch", "model"])           # "batch"
    batch_axis_of(["model"])                    # None
    batch_axis_of(["data", "model"], "data")    # "data"
    ```
    """
    names = tuple(axis_names)
    if batch_axis is None:
        return BATCH_AXIS if BATCH_AXIS in names else None
    if not isinstance(batch_axis, str) or batch_axis not in names:
        raise ValueError(
            f"batch_axis must be an axis of the mesh ({', '.join(names)}). "
            f"Received: batch_axis={batch_axis!r}"
        )
    return batch_axis


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Named mesh axes and their sizes.

    Attributes:
      axes: `(name, size)` pairs in order; the last axis varies fastest over
        the device list.

    Example:

    ```python
    MeshSpec.parse("batch=2,model=2").axes   # (("batch", 2), ("model", 2))
    ```
    """

    axes: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not self.axes:
            raise ValueError(f"A mesh needs at least one axis. Received: axes={self.axes!r}")
        names = [name for name, _ in self.axes]
        for name, size in self.axes:
            if not isinstance(name, str) or not _AXIS_NAME.match(name):
                raise ValueError(
                    f"Mesh axis names must be identifiers. Received: {name!r} in {self}"
                )
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(
                    f"Mesh axis sizes must be positive ints. Received: {name}={size!r} in {self}"
                )
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Mesh axis names must be unique. Received: {self} repeats {duplicates}"
            )

    @classmethod
    def parse(cls, spec: "str | MeshSpec") -> "MeshSpec":
        """Reads `"name=size,name=size"` (spaces allowed); a MeshSpec passes through.

        Raises:
          ValueError: naming the bad part of the spec.
        """
        if isinstance(spec, MeshSpec):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f'A mesh spec is a string like "batch=2,model=2". Received: {spec!r}')
        axes = []
        for part in spec.split(","):
            name, sep, size = (s.strip() for s in part.partition("="))
            if not sep or not size.isdigit():
                raise ValueError(
                    f'Each mesh axis is NAME=SIZE, as in "batch=2,model=2". '
                    f"Received: {part.strip()!r} in {spec!r}"
                )
            axes.append((name, int(size)))
        return cls(tuple(axes))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def size(self) -> int:
        """Number of devices the mesh spans."""
        total = 1
        for _, size in self.axes:
            total *= size
        return total

    def axis_size(self, name: str) -> int:
        """Size of an axis; 1 for an axis the mesh does not have."""
        return dict(self.axes).get(name, 1)

    def __str__(self) -> str:
        return ",".join(f"{name}={size}" for name, size in self.axes)


def build_mesh(
    spec: "str | MeshSpec",
    devices: Optional[Sequence[str]] = None,
    *,
    multi_client: bool = False,
) -> dtensor.Mesh:
    """Makes the DTensor mesh of a spec, checked against the devices.

    Args:
      spec: a `MeshSpec` or its string form.
      devices: local device names to lay the mesh over; default: all local
        devices of the preferred type (GPU, else CPU). Single-client only.
      multi_client: lay the mesh over every client's devices; the DTensor
        multi-client system must be initialized (see `tfscale.sharding.clients`).

    Returns:
      A `dtensor.Mesh` whose axes are the spec's.

    Raises:
      ValueError: when the mesh does not need exactly the devices there are,
        e.g. "mesh batch=3,model=2 needs 6 devices, found 4".
    """
    spec = MeshSpec.parse(spec)
    if multi_client:
        device_type = devices_lib.accelerator_type()
        found = dtensor.num_global_devices(device_type)
        _check_count(spec, found, f"{device_type} device(s) over {dtensor.num_clients()} clients")
        return dtensor.create_distributed_mesh(list(spec.axes), device_type=device_type)
    if devices is None:
        device_type = devices_lib.accelerator_type()
        devices = [d.name for d in tf.config.list_logical_devices(device_type)]
    _check_count(spec, len(devices), "")
    return dtensor.create_mesh(list(spec.axes), devices=list(devices))


def _check_count(spec: MeshSpec, found: int, what: str) -> None:
    if spec.size != found:
        where = f" ({what})" if what else ""
        raise ValueError(
            f"mesh {spec} needs {spec.size} devices, found {found}{where}. "
            "Change the mesh or the devices (e.g. config.devices.virtual_cpus)."
        )
