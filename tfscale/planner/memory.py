"""Predicted bytes per device of a Keras model under a candidate, without running it.

Four parts, each per device:

- **parameters**: `model.weights` (trainable or not). Under `dtensor`, each
  variable's shard: the layout map's rule for its path splits each
  dimension by the size of its mesh axis (DTensor needs every split
  dimension divisible; a candidate where one is not cannot run the
  model). Elsewhere every device holds every variable.
- **gradients**: the trainable variables once more, laid out like them.
- **optimizer**: every variable of the optimizer, built on a host copy of
  the model (counters and learning rate, replicated; slots such as SGD's
  momentum, Adam's momentum and velocity, laid out like the model
  variable each was made from, as `DTensorStrategy` lays them out).
- **activations**: the approximation. The outputs of the model's layers
  (and its inputs) are kept for the backward pass, so it counts each
  layer's output once per example, times the per-replica batch, at the
  dtype its policy computes in (float32, or bfloat16/float16 under a
  mixed policy). Tensors inside a layer (attention scores, a fused
  activation's input) are not counted, nor are workspace and allocator
  slack. Under `dtensor`, a layer whose last kernel (or embedding table)
  is split on its last dimension has its output split the same way
  (megatron's column-parallel layers); the rest are replicated over the
  model axis.

Parameters and optimizer state equal what `tfscale.sharding.memory_report`
reports for the model built under the candidate.

Example:

```python
for c in candidates.candidates(4):
    print(c.description, estimate(make_model, c, global_batch_size=64, optimizer="adam"))
```
"""

from __future__ import annotations

import dataclasses
from typing import Callable
from typing import Optional
from typing import Sequence

import keras

from tfscale.planner import candidates as candidates_lib
from tfscale.planner import profile as profile_lib
from tfscale.sharding import layout_map as layout_map_lib
from tfscale.sharding import mesh as mesh_lib

__all__ = [
    "InfeasibleError",
    "MemoryEstimate",
    "estimate",
    "per_replica_batch",
]


class InfeasibleError(ValueError):
    """The candidate cannot run the model at this batch (a split that does not divide)."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes on one device (the most loaded one).

    Attributes:
      parameters: model variables.
      gradients: gradients of the trainable variables.
      optimizer: optimizer state.
      activations: layer outputs kept for the backward pass.
      per_replica_batch_size: the batch one replica computes on.

    Example:

    ```python
    e = estimate(make_model, candidate, global_batch_size=64, optimizer="adam")
    e.total, e.to_dict()
    ```
    """

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    per_replica_batch_size: int

    @property
    def total(self) -> int:
        """All four parts."""
        return self.parameters + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}

    def __str__(self) -> str:
        return (
            f"total {_size(self.total)} per device: parameters {_size(self.parameters)}, "
            f"gradients {_size(self.gradients)}, optimizer {_size(self.optimizer)}, "
            f"activations {_size(self.activations)} (batch {self.per_replica_batch_size})"
        )


def estimate(
    model_fn: Callable[[], keras.Model],
    candidate: candidates_lib.Candidate,
    global_batch_size: int,
    optimizer: profile_lib.OptimizerLike = None,
) -> MemoryEstimate:
    """Predicts the bytes per device of training `model_fn()` under `candidate`.

    The model is built once per `model_fn` on the host, with no
    distribution, and cached (`tfscale.planner.profile.clear_cache`).

    Args:
      model_fn: returns a built Keras model (compiled or not).
      candidate: one of `candidates.candidates(...)`, or any `dtensor`
        candidate with a `mesh` and `layout_map` option.
      global_batch_size: examples per step over all replicas.
      optimizer: a name, a serialized config or an instance; `None` for the
        optimizer `model_fn` compiled the model with (no state if none).

    Returns:
      A `MemoryEstimate`.

    Raises:
      InfeasibleError (a ValueError): when the candidate's replicas do not
        divide the global batch, or its layout splits a dimension that the
        mesh axis does not divide; the message names the value.
      ValueError: for a global batch that is not a positive int.
    """
    batch = per_replica_batch(candidate, global_batch_size)
    model = profile_lib.model_profile(model_fn)
    state = profile_lib.optimizer_profile(model_fn, optimizer)
    layouts = _Layouts.of(candidate)
    axes = {v.path: layouts.axes(v.path, v.shape) for v in model.variables}
    shapes = {v.path: v.shape for v in model.variables}

    def state_axes(v: profile_lib.VariableInfo) -> Optional[layout_map_lib.Axes]:
        # The strategy gives state its owner's layout when the ranks agree,
        # else looks up the state's own path in the layout map.
        if v.owner in shapes and len(shapes[v.owner]) == len(v.shape):
            return axes[v.owner]
        return layouts.axes(v.path, v.shape)

    parameters = [(v, layouts.local_bytes(v, axes[v.path])) for v in model.variables]
    return MemoryEstimate(
        parameters=sum(n for _, n in parameters),
        gradients=sum(n for v, n in parameters if v.trainable),
        optimizer=sum(layouts.local_bytes(v, state_axes(v)) for v in state),
        activations=sum(layouts.activation_bytes(a, batch) for a in model.activations),
        per_replica_batch_size=batch,
    )


def per_replica_batch(candidate: candidates_lib.Candidate, global_batch_size: int) -> int:
    """The examples one replica of `candidate` computes on per step.

    Raises:
      InfeasibleError: when the replicas do not divide the global batch.
      ValueError: for a global batch that is not a positive int.
    """
    if (
        isinstance(global_batch_size, bool)
        or not isinstance(global_batch_size, int)
        or global_batch_size < 1
    ):
        raise ValueError(
            f"global_batch_size must be a positive int. Received: global_batch_size="
            f"{global_batch_size!r}"
        )
    replicas = candidate.num_replicas
    if global_batch_size % replicas:
        raise InfeasibleError(
            f"global_batch_size must be a multiple of the {replicas} replicas of "
            f"{candidate.description!r}. Received: global_batch_size={global_batch_size}"
        )
    return global_batch_size // replicas


@dataclasses.dataclass(frozen=True)
class _Layouts:
    """How a candidate splits variables: a mesh and layout map, or nothing."""

    spec: Optional[mesh_lib.MeshSpec]
    layout_map: layout_map_lib.LayoutMap

    @classmethod
    def of(cls, candidate: candidates_lib.Candidate) -> "_Layouts":
        if candidate.kind != "dtensor":
            return cls(None, layout_map_lib.LayoutMap())
        return cls(
            mesh_lib.MeshSpec.parse(candidate.options["mesh"]),
            layout_map_lib.LayoutMap.from_value(candidate.options.get("layout_map")),
        )

    def axes(self, path: str, shape: tuple[int, ...]) -> Optional[layout_map_lib.Axes]:
        """The mesh axis of each dimension, None to replicate; checked as `layout_for` does.

        Raises:
          InfeasibleError: for a dimension the axis size does not divide.
          ValueError: for an axis the mesh lacks or an axis used twice.
        """
        if self.spec is None or not shape:
            return None
        axes = self.layout_map.axes_for(path, shape)
        if axes is None:
            return None
        used = [a for a in axes if a is not None]
        for dim, axis in zip(shape, axes):
            if axis is None:
                continue
            if axis not in self.spec.names:
                raise ValueError(
                    f"Variable {path!r} of shape {shape} is laid out {axes}, but mesh "
                    f"{self.spec} has no axis {axis!r}."
                )
            if used.count(axis) > 1:
                raise ValueError(
                    f"Variable {path!r} is laid out {axes}: mesh axis {axis!r} can split one "
                    "dimension only."
                )
            if dim % self.spec.axis_size(axis):
                raise InfeasibleError(
                    f"Variable {path!r} of shape {shape}: dimension {dim} is not divisible by "
                    f"mesh axis {axis!r} (size {self.spec.axis_size(axis)}) of mesh {self.spec}."
                )
        return axes

    def split(self, axis: Optional[str]) -> int:
        """Parts a dimension laid out on `axis` is split into."""
        return 1 if axis is None or self.spec is None else self.spec.axis_size(axis)

    def local_bytes(
        self, variable: profile_lib.VariableInfo, axes: Optional[layout_map_lib.Axes]
    ) -> int:
        """Bytes of the part of `variable` one device holds."""
        if axes is None:
            return variable.num_bytes
        local = [dim // self.split(axis) for dim, axis in zip(variable.shape, axes)]
        return _count(local) * variable.itemsize

    def activation_bytes(self, activation: profile_lib.ActivationInfo, batch: int) -> int:
        """Bytes of a layer output for `batch` examples on one device."""
        total = activation.elements * batch * activation.itemsize
        if activation.split_by is None or self.spec is None:
            return total
        axes = self.layout_map.axes_for(*activation.split_by)
        return -(-total // self.split(axes[-1] if axes else None))


def _count(shape: Sequence[int]) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"
