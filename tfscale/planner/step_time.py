"""Predicted seconds per training step of a Keras model under a candidate.

A step is compute plus communication on the most loaded device, scaled by
the kind's measured efficiency, plus the step's fixed cost, with the constants of a `Calibration` (`n` the
candidate's devices, `d` its data-parallel replicas, `m = n / d` its model
parallelism, `b` the per-replica batch, `R(n)` one device's matmul FLOP
rate and `B(n)` its elementwise bytes per second with `n` devices busy,
`AR(k, S)` one all-reduce of `S` bytes over `k` devices, `AG(k, S)` an
all-gather of a result of `S` bytes):

- **compute** `= 3 * b * sum_l(F_l / s_l) / R(n) + (3 * b * sum_l(2 E_l
  i_l / s_l) + U) / B(n)`. `F_l` is the forward FLOPs per example of a
  layer with a kernel (`flops.layer_costs`), tripled for the backward pass
  (gradients of inputs and of weights, a matmul each); `s_l = m` for a
  layer whose kernels the layout splits over the model axis, else 1 (every
  device of the replica computes it whole). The second term is the
  elementwise work, bound by memory: every layer's output (`E_l` elements
  of `i_l` bytes per example; activations, norms, bias adds, pooling) is
  read and written once per pass, and the optimizer's update moves `U =
  3 (P + G) + 12 S` bytes for the device's parameter, gradient and
  optimizer-state bytes `P`, `G`, `S` (Adam's update in Keras reads and
  writes each slot a dozen times; an approximation).
- **gradient sync** `= AR(d, sum_v bytes_v)` over the trainable variables
  `v`, each its per-device part (`d = 1`: none): one latency, as the
  gradients' all-reduces are independent of each other and are packed or
  overlap, unlike the activations' below, each of which the next layer
  waits for.
- **activation sync** (`m > 1`): `2 * AR(m, b * E_l * itemsize_l)` per
  row-parallel layer (its last kernel split on another dimension than the
  last: Megatron's MLP down-projection, the attention output projection):
  the forward all-reduce of its partial sums and the backward all-reduce
  of its column-parallel partner's input gradient; and `AG(m, b * E_l *
  itemsize_l)` per column-parallel layer (last kernel split on its last
  dimension) that feeds a layer which is not row-parallel (an embedding
  split on the hidden axis): its output is gathered.
- **overhead** `= base(k, n) + per_op(k, n) * ops`: what Keras, the step
  function and the executor cost per step beyond the arithmetic, for the
  kind's family `k` and the model's forward ops (`overhead`; measured by
  the calibration). On CPU it is most of a small model's step.

The step is `overhead + e(k, n) * (compute + gradient sync + activation
sync)`, `e` the family's efficiency: a reference model's measured
arithmetic time over the rates' prediction (replicas sharing cores, a
mesh's relayouts).

`AR` and `AG` come from the calibration (`Calibration.all_reduce_s`); the
concurrent groups of a mesh (`m` all-reduces over `d`, `d` over `m`) are
not charged for sharing links. The aim is to rank candidates, not to time
them to the millisecond.

Example:

```python
calibration = planner.calibrate()
for c in planner.candidates(4):
    print(c.description, predict(make_model, c, 64, calibration, optimizer="adam"))
```
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable
from typing import Optional

import keras

from tfscale.planner import calibration as calibration_lib
from tfscale.planner import candidates as candidates_lib
from tfscale.planner import flops as flops_lib
from tfscale.planner import memory as memory_lib
from tfscale.planner import profile as profile_lib
from tfscale.sharding import layout_map as layout_map_lib
from tfscale.sharding import mesh as mesh_lib

__all__ = [
    "StepTime",
    "predict",
]

# Forward plus backward: the backward pass does two matmuls per forward one.
PASSES = 3
# Bytes the optimizer's update moves per byte of parameters plus gradients,
# and per byte of optimizer state.
UPDATE_PASSES_WEIGHTS = 3
UPDATE_PASSES_STATE = 12


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one training step on the most loaded device.

    Attributes:
      compute: matmul arithmetic and elementwise memory traffic.
      gradient_sync: gradient all-reduces over the data-parallel replicas.
      activation_sync: all-reduces and all-gathers of layer outputs over the
        model axis.
      flops: matmul FLOPs per step on that device.
      overhead: the step's fixed cost (dispatch of its ops, `fit`'s loop).
      efficiency: how much slower than the rates the kind's steps compute
        (measured on a reference model); multiplies compute and
        communication in `total`.

    Example:

    ```python
    t = predict(make_model, candidate, 64, calibration)
    t.total, t.to_dict()
    ```
    """

    compute: float
    gradient_sync: float
    activation_sync: float
    flops: int
    overhead: float = 0.0
    efficiency: float = 1.0

    @property
    def communication(self) -> float:
        return self.gradient_sync + self.activation_sync

    @property
    def total(self) -> float:
        return self.overhead + self.efficiency * (self.compute + self.communication)

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "communication": self.communication,
            "total": self.total,
        }

    def __str__(self) -> str:
        return (
            f"{self.total * 1e3:.3f} ms per step: compute {self.compute * 1e3:.3f} ms, "
            f"gradient sync {self.gradient_sync * 1e3:.3f} ms, "
            f"activation sync {self.activation_sync * 1e3:.3f} ms, "
            f"overhead {self.overhead * 1e3:.3f} ms, efficiency {self.efficiency:.2f}"
        )


def predict(
    model_fn: Callable[[], keras.Model],
    candidate: candidates_lib.Candidate,
    global_batch_size: int,
    calibration: calibration_lib.Calibration,
    sample_input: Any = None,
    optimizer: profile_lib.OptimizerLike = None,
) -> StepTime:
    """Predicts the step time of training `model_fn()` under `candidate`.

    Args:
      model_fn: returns a built Keras model (built once on the host and
        cached, as for `memory.estimate`).
      candidate: one of `candidates.candidates(...)`.
      global_batch_size: examples per step over all replicas.
      calibration: this machine's rates.
      sample_input: an input batch, only read for a model without a layer
        graph (subclassed), whose FLOPs are then counted on its traced
        graph; without it such a model counts two FLOPs per parameter.
      optimizer: the optimizer whose update is counted (as for
        `memory.estimate`; `None`: the one `model_fn` compiles with).

    Returns:
      A `StepTime`.

    Raises:
      InfeasibleError (a ValueError): for a batch the replicas do not divide.
    """
    batch = memory_lib.per_replica_batch(candidate, global_batch_size)
    profile = profile_lib.model_profile(model_fn)
    layers = profile.layers or _whole_model(model_fn, profile, sample_input)
    split = _Split.of(candidate)
    n = candidate.num_devices
    flops = (
        PASSES * batch * sum(layer.flops // split.parts(layer) for layer in layers if layer.matmuls)
    )
    elementwise = (
        PASSES
        * batch
        * sum(
            2 * layer.output_elements * layer.output_itemsize // split.parts(layer)
            for layer in layers
        )
    )
    memory = memory_lib.estimate(model_fn, candidate, global_batch_size, optimizer)
    update = UPDATE_PASSES_WEIGHTS * (memory.parameters + memory.gradients)
    update += UPDATE_PASSES_STATE * memory.optimizer
    compute = flops / calibration.flops_per_s(n) + (
        elementwise + update
    ) / calibration.memory_bytes_per_s(n)
    replicas = candidate.num_replicas
    gradient_bytes = sum(split.local_bytes(v) for v in profile.variables if v.trainable)
    gradient_sync = calibration.all_reduce_s(replicas, gradient_bytes)
    ops = profile.forward_ops or _forward_ops(model_fn, profile, sample_input)
    family = calibration_lib.family(candidate.kind, candidate.model_parallelism)
    overhead = calibration.overhead(family, n)
    return StepTime(
        compute,
        gradient_sync,
        _activation_sync(layers, split, batch, calibration),
        flops,
        overhead.seconds(ops),
        overhead.efficiency,
    )


def _activation_sync(
    layers: tuple[flops_lib.LayerCost, ...],
    split: "_Split",
    batch: int,
    calibration: calibration_lib.Calibration,
) -> float:
    m = split.model_parallelism
    if m == 1:
        return 0.0
    row_parallel = {layer.name for layer in layers if split.row_parallel(layer)}
    seconds = 0.0
    for layer in layers:
        num_bytes = batch * layer.output_elements * layer.output_itemsize
        if layer.name in row_parallel:
            seconds += 2 * calibration.all_reduce_s(m, num_bytes)
        elif split.column_parallel(layer) and not set(layer.consumers) <= row_parallel:
            seconds += calibration.all_gather_s(m, num_bytes)
    return seconds


def _whole_model(
    model_fn: Callable[[], keras.Model], profile: profile_lib.ModelProfile, sample_input: Any
) -> tuple[flops_lib.LayerCost, ...]:
    """One cost for a model without a layer graph: nothing it holds counts as split."""
    if sample_input is not None:
        flops = flops_lib.traced_flops(profile_lib.host_model(model_fn), sample_input)
    else:
        flops = 2 * sum(_count(v.shape) for v in profile.variables if v.trainable)
    # Unmatchable paths: one per matmul, for the per-op cost; none is split.
    kernels = tuple(("", ()) for v in profile.variables if v.trainable and len(v.shape) >= 2)
    return (flops_lib.LayerCost(profile.name, flops, 0, 4, kernels),)


def _forward_ops(
    model_fn: Callable[[], keras.Model], profile: profile_lib.ModelProfile, sample_input: Any
) -> int:
    """Forward ops of a model without a layer graph: traced on the sample, else guessed.

    Without a sample, two ops per trainable variable (a Dense layer's matmul
    and bias add, over its kernel and bias).
    """
    if sample_input is not None:
        return flops_lib.forward_ops(profile_lib.host_model(model_fn), sample_input)
    return 2 * sum(1 for v in profile.variables if v.trainable)


@dataclasses.dataclass(frozen=True)
class _Split:
    """How a candidate's layout splits layers over its model axis."""

    model_parallelism: int
    layout_map: Optional[layout_map_lib.LayoutMap]
    axis_sizes: dict[str, int]

    @classmethod
    def of(cls, candidate: candidates_lib.Candidate) -> "_Split":
        if candidate.kind != "dtensor":
            return cls(1, None, {})
        spec = mesh_lib.MeshSpec.parse(candidate.options["mesh"])
        layout_map = layout_map_lib.LayoutMap.from_value(candidate.options.get("layout_map"))
        sizes = {name: spec.axis_size(name) for name in spec.names}
        return cls(candidate.model_parallelism, layout_map, sizes)

    def axes(self, path: str, shape: tuple[int, ...]) -> Optional[layout_map_lib.Axes]:
        if self.layout_map is None or not shape:
            return None
        axes = self.layout_map.axes_for(path, shape)
        if axes is None or all(self.axis_sizes.get(a, 1) == 1 for a in axes if a):
            return None
        return axes

    def parts(self, layer: flops_lib.LayerCost) -> int:
        """Devices the layer's work is split over: `m` when a layout splits a kernel of it."""
        split = any(self.axes(path, shape) for path, shape in layer.kernels)
        return self.model_parallelism if split else 1

    def row_parallel(self, layer: flops_lib.LayerCost) -> bool:
        axes = self._last_axes(layer)
        return axes is not None and any(axes[:-1]) and not axes[-1]

    def column_parallel(self, layer: flops_lib.LayerCost) -> bool:
        axes = self._last_axes(layer)
        return axes is not None and bool(axes[-1])

    def local_bytes(self, variable: profile_lib.VariableInfo) -> int:
        axes = self.axes(variable.path, variable.shape)
        if axes is None:
            return variable.num_bytes
        local = [d // self.axis_sizes.get(a, 1) if a else d for d, a in zip(variable.shape, axes)]
        return _count(local) * variable.itemsize

    def _last_axes(self, layer: flops_lib.LayerCost) -> Optional[layout_map_lib.Axes]:
        if not layer.kernels:
            return None
        return self.axes(*layer.kernels[-1])


def _count(shape: Any) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total
