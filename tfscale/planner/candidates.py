"""The ways a model could run on some devices: the planner's candidates.

A `Candidate` is one call of `tfscale.distribution(kind, **options)` the
planner may choose: one device, data parallelism over every device
(`mirrored`, or `multi_worker_mirrored` over several workers), or a DTensor
mesh `batch=d,model=m` for every factorisation `d * m` of the device count.
The planner only chooses among the kinds that exist; it never builds one.

Example:

```python
for c in candidates(4):
    print(c.description)
# one_device: 1 device
# mirrored: 4 devices, 4 replicas
# dtensor batch=4,model=1 (data_parallel): 4 replicas, weights replicated
# dtensor batch=2,model=2 (megatron): 2 replicas, weights split in 2
# dtensor batch=1,model=4 (megatron): 1 replica, weights split in 4
dist = tfscale.distribution(c.kind, **c.options)
```
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Optional

from tfscale.sharding import mesh as mesh_lib

__all__ = [
    "Candidate",
    "candidates",
]

# The `LayoutMap` presets the planner tries on a mesh (tfscale.sharding.layout_map.PRESETS).
DATA_PARALLEL = "data_parallel"
MEGATRON = "megatron"
MODEL_AXIS = "model"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One distribution the planner may choose.

    Attributes:
      kind: the `tfscale.distribution` kind, e.g. `"dtensor"`.
      options: keyword options for `tfscale.distribution(kind, **options)`.
      mesh: the mesh spec of a `"dtensor"` candidate (`"batch=2,model=2"`),
        else `None`.
      layout: the layout map preset of a `"dtensor"` candidate, else `None`.
      num_devices: devices the candidate computes on, over every worker.
      num_workers: worker processes taking part.
      description: one line for a plan's table.

    Example:

    ```python
    c = Candidate("mirrored", {"devices": 2}, None, None, 2, "mirrored: 2 devices")
    c.num_replicas   # 2
    ```
    """

    kind: str
    options: dict[str, Any] = dataclasses.field(hash=False)
    mesh: Optional[str]
    layout: Optional[str]
    num_devices: int
    description: str
    num_workers: int = 1

    def __post_init__(self) -> None:
        # A private copy, so that a caller's dict cannot change a candidate.
        object.__setattr__(self, "options", dict(self.options))

    @property
    def num_replicas(self) -> int:
        """Data-parallel replicas: the parts the global batch is split into."""
        if self.kind == "one_device":
            return 1
        if self.mesh is None:
            return self.num_devices
        spec = mesh_lib.MeshSpec.parse(self.mesh)
        axis = mesh_lib.batch_axis_of(spec.names, self.options.get("batch_axis"))
        return spec.axis_size(axis) if axis else 1

    @property
    def model_parallelism(self) -> int:
        """How many devices one replica's weights may be split over."""
        return self.num_devices // self.num_replicas if self.mesh else 1


def candidates(num_devices: int, num_workers: int = 1) -> tuple[Candidate, ...]:
    """Every candidate for `num_workers` workers of `num_devices` devices each.

    On one worker: `one_device`, then `mirrored` over all devices. On
    several: `multi_worker_mirrored` (the one-host kinds would train
    independent copies). Then `dtensor` meshes `batch=d,model=m` over all
    devices, `m` ascending: `data_parallel` at
    `m = 1` and `megatron` at `m > 1`. The other pairings are left out: at
    `m = 1` megatron splits nothing (it is data_parallel), and
    data_parallel at `m > 1` computes each replica's batch on `m` devices
    at once, at `m` times the per-device batch, which `m = 1` beats in
    memory and time.

    Args:
      num_devices: devices on each worker (`len(tfscale.local_devices())`).
      num_workers: worker processes, each with `num_devices` devices.

    Returns:
      The candidates, in the same order on every call; on one device,
      `one_device` alone.

    Raises:
      ValueError: for a count that is not a positive int, naming it.

    Example:

    ```python
    [c.description for c in candidates(2)]
    # ['one_device: 1 device', 'mirrored: 2 devices, 2 replicas',
    #  'dtensor batch=2,model=1 (data_parallel): 2 replicas, weights replicated',
    #  'dtensor batch=1,model=2 (megatron): 1 replica, weights split in 2']
    ```
    """
    _check_count("num_devices", num_devices)
    _check_count("num_workers", num_workers)
    total = num_devices * num_workers
    found: list[Candidate] = []
    if num_workers == 1:
        found.append(Candidate("one_device", {}, None, None, 1, "one_device: 1 device"))
        if total > 1:
            found.append(
                Candidate(
                    "mirrored",
                    {"devices": total},
                    None,
                    None,
                    total,
                    f"mirrored: {total} devices, {_replicas(total)}",
                )
            )
    else:
        found.append(
            Candidate(
                "multi_worker_mirrored",
                {},
                None,
                None,
                total,
                f"multi_worker_mirrored: {num_workers} workers x {num_devices} devices, "
                f"{_replicas(total)}",
                num_workers,
            )
        )
    if total > 1:  # a one-device mesh is one_device
        for model in (m for m in range(1, total + 1) if total % m == 0):
            found.append(_dtensor(total // model, model, num_workers))
    return tuple(found)


def _dtensor(batch: int, model: int, num_workers: int) -> Candidate:
    layout = DATA_PARALLEL if model == 1 else MEGATRON
    mesh = str(mesh_lib.MeshSpec((("batch", batch), (MODEL_AXIS, model))))
    weights = "weights replicated" if model == 1 else f"weights split in {model}"
    return Candidate(
        "dtensor",
        {"mesh": mesh, "layout_map": layout},
        mesh,
        layout,
        batch * model,
        f"dtensor {mesh} ({layout}): {_replicas(batch)}, {weights}",
        num_workers,
    )


def _replicas(count: int) -> str:
    return f"{count} replica" + ("" if count == 1 else "s")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}")
