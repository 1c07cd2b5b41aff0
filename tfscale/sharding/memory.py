"""How many bytes of parameters and optimizer state each device holds.

`memory_report(model)` lists every model variable and optimizer variable
with its full size and the size of the part one device holds: for a
variable split over mesh axes, its shard (the layout's local shape); for an
ordinary or mirrored variable, the whole of it.

Example:

```python
report = tfscale.sharding.memory_report(model)
print(report)                      # a table, by variable, with totals
report.per_device_bytes            # parameters + optimizer state on one device
```
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Optional

import keras
import numpy as np

__all__ = [
    "MemoryReport",
    "VariableMemory",
    "memory_report",
]

PARAMETER = "parameter"
OPTIMIZER = "optimizer"


@dataclasses.dataclass(frozen=True)
class VariableMemory:
    """One variable's bytes.

    Attributes:
      path: the Keras variable path.
      kind: `"parameter"` (a model weight) or `"optimizer"` (optimizer state).
      shape: the full shape.
      layout: per dimension, the mesh axis it is split over or `None`.
      full_bytes: bytes of the whole variable.
      per_device_bytes: bytes one device holds.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    layout: tuple[Optional[str], ...]
    full_bytes: int
    per_device_bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of a model's parameters and optimizer state.

    Attributes:
      variables: one entry per variable, parameters first.
      mesh: the mesh the variables are laid out on (e.g. `"batch=2,model=2"`),
        or `""` for unsharded variables.
    """

    variables: tuple[VariableMemory, ...]
    mesh: str

    def _sum(self, field: str, kind: Optional[str] = None) -> int:
        return sum(getattr(v, field) for v in self.variables if kind is None or v.kind == kind)

    @property
    def parameter_bytes(self) -> int:
        """Parameter bytes on one device."""
        return self._sum("per_device_bytes", PARAMETER)

    @property
    def optimizer_bytes(self) -> int:
        """Optimizer-state bytes on one device."""
        return self._sum("per_device_bytes", OPTIMIZER)

    @property
    def per_device_bytes(self) -> int:
        """Parameters and optimizer state on one device."""
        return self._sum("per_device_bytes")

    @property
    def full_bytes(self) -> int:
        """Parameters and optimizer state of the whole model, unsplit."""
        return self._sum("full_bytes")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mesh": self.mesh,
            "parameter_bytes": self.parameter_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "per_device_bytes": self.per_device_bytes,
            "full_bytes": self.full_bytes,
            "variables": [dataclasses.asdict(v) for v in self.variables],
        }

    def __str__(self) -> str:
        rows = [("variable", "shape", "layout", "full", "per device")]
        for v in self.variables:
            layout = "(" + ", ".join(a or "-" for a in v.layout) + ")"
            rows.append(
                (v.path, str(v.shape), layout, _size(v.full_bytes), _size(v.per_device_bytes))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in rows
        ]
        mesh = f" on mesh {self.mesh}" if self.mesh else ""
        lines.append(
            f"per device{mesh}: parameters {_size(self.parameter_bytes)}, optimizer state "
            f"{_size(self.optimizer_bytes)}, total {_size(self.per_device_bytes)} "
            f"(unsplit: {_size(self.full_bytes)})"
        )
        return "\n".join(lines)


def memory_report(model: keras.Model, *, build_optimizer: bool = True) -> MemoryReport:
    """Per-device bytes of `model`'s variables and its optimizer's state.

    Args:
      model: a built Keras model, sharded or not.
      build_optimizer: create the optimizer's state first if it is not built
        yet (Keras creates it at the first step), in the model's
        distribution scope, so the report shows what training will hold.

    Returns:
      A `MemoryReport`; `print` it for a table.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and build_optimizer and not optimizer.built:
        with model.distribute_strategy.scope():
            optimizer.build(model.trainable_variables)
    entries = [_entry(v, PARAMETER) for v in model.weights]
    if optimizer is not None and optimizer.built:
        entries += [_entry(v, OPTIMIZER) for v in optimizer.variables]
    meshes = {m for m in (_mesh_spec(v) for v in model.weights) if m}
    return MemoryReport(tuple(entries), ", ".join(sorted(meshes)))


def _entry(variable: keras.Variable, kind: str) -> VariableMemory:
    shape = tuple(int(d) for d in variable.shape)
    itemsize = np.dtype(variable.dtype).itemsize
    layout = getattr(variable.value, "layout", None)
    if layout is None:
        axes: tuple[Optional[str], ...] = (None,) * len(shape)
        local = shape
    else:
        axes = tuple(None if s == "unsharded" else s for s in layout.sharding_specs)
        local = tuple(int(d) for d in layout.local_shape_from_global_shape(list(shape)))
    return VariableMemory(
        path=variable.path,
        kind=kind,
        shape=shape,
        layout=axes,
        full_bytes=int(np.prod(shape, dtype=np.int64)) * itemsize,
        per_device_bytes=int(np.prod(local, dtype=np.int64)) * itemsize,
    )


def _mesh_spec(variable: keras.Variable) -> str:
    layout = getattr(variable.value, "layout", None)
    if layout is None:
        return ""
    mesh = layout.mesh
    return ",".join(f"{name}={mesh.dim_size(name)}" for name in mesh.dim_names)


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"
