"""`plan`: the candidate a model should train under, and why.

Every candidate for the devices (`candidates.candidates`) gets a predicted
per-device memory (`memory.estimate`) and step time (`step_time.predict`).
A candidate that cannot run the model (a split that does not divide) or
whose memory exceeds the budget is marked and never chosen; of the rest,
the fastest predicted wins, ties going to the earlier candidate (fewer
moving parts: `one_device`, then `mirrored`, then meshes by model axis).

Example:

```python
result = plan(make_model, global_batch_size=64, optimizer="adam")
print(result.table())
dist = tfscale.distribution(result.chosen.kind, **result.chosen.options)
```
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from typing import Any
from typing import Callable
from typing import Optional

import keras
import tensorflow as tf

from tfscale.planner import calibration as calibration_lib
from tfscale.planner import candidates as candidates_lib
from tfscale.planner import measure
from tfscale.planner import memory as memory_lib
from tfscale.planner import profile as profile_lib
from tfscale.planner import step_time as step_time_lib
from tfscale.strategies import local

__all__ = [
    "Plan",
    "Row",
    "plan",
]

ModelFn = Callable[[], keras.Model]


@dataclasses.dataclass(frozen=True)
class Row:
    """One candidate as the plan judged it.

    Attributes:
      candidate: the candidate.
      memory: predicted bytes per device; `None` when infeasible.
      step_time: predicted step time; `None` when infeasible.
      feasible: whether the candidate can run the model at this batch.
      within_budget: whether its memory fits the budget (False when
        infeasible).
      reason: why it cannot be chosen (empty when it can).
    """

    candidate: candidates_lib.Candidate
    memory: Optional[memory_lib.MemoryEstimate]
    step_time: Optional[step_time_lib.StepTime]
    feasible: bool
    within_budget: bool
    reason: str = ""

    @property
    def eligible(self) -> bool:
        return self.feasible and self.within_budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.candidate.description,
            "kind": self.candidate.kind,
            "options": _jsonable(self.candidate.options),
            "feasible": self.feasible,
            "within_budget": self.within_budget,
            "reason": self.reason,
            "memory": self.memory.to_dict() if self.memory else None,
            "step_time": self.step_time.to_dict() if self.step_time else None,
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen candidate and every candidate's predictions.

    Attributes:
      chosen: the candidate to train under.
      rows: every candidate considered, in candidate order.
      global_batch_size: the batch planned for.
      memory_budget: bytes per device a candidate may use; `None`: no limit.
      calibration: the rates the step times were predicted with.

    Example:

    ```python
    result = plan(make_model, global_batch_size=64)
    result.chosen.kind, result.chosen_row.step_time.total
    print(result.table())
    metrics["plan"] = result.to_dict()
    ```
    """

    chosen: candidates_lib.Candidate
    rows: tuple[Row, ...]
    global_batch_size: int
    memory_budget: Optional[int]
    calibration: calibration_lib.Calibration

    @property
    def chosen_row(self) -> Row:
        return next(r for r in self.rows if r.candidate == self.chosen)

    def table(self) -> str:
        """The rows as aligned text, one per candidate; reasons as numbered notes below.

        A row's step time is `overhead + efficiency * (compute + comm)`.
        """
        header = ("candidate", "params", "grads", "optimizer", "activations", "total/device")
        header += ("step ms", "compute", "comm", "overhead", "efficiency", "")
        lines = [header]
        notes: list[str] = []
        for row in self.rows:
            lines.append(_cells(row, row.candidate == self.chosen, notes))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [
            "  ".join(
                cell.ljust(w) if i in (0, len(header) - 1) else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths))
            ).rstrip()
            for line in lines
        ]
        budget = "none" if self.memory_budget is None else _size(self.memory_budget)
        text.append(
            f"global batch {self.global_batch_size}, memory budget {budget} per device, "
            f"calibration {self.calibration.fingerprint}"
        )
        text.extend(f"[{i}] {note}" for i, note in enumerate(notes, 1))
        return "\n".join(text)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values (for `metrics.json`)."""
        row = self.chosen_row
        return {
            "chosen": {
                "description": self.chosen.description,
                "kind": self.chosen.kind,
                "options": _jsonable(self.chosen.options),
                "predicted_step_time_s": row.step_time.total if row.step_time else None,
                "predicted_bytes_per_device": row.memory.total if row.memory else None,
            },
            "global_batch_size": self.global_batch_size,
            "memory_budget": self.memory_budget,
            "calibration": self.calibration.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
        }


def plan(
    model_fn: ModelFn,
    *,
    global_batch_size: int,
    devices: local.DeviceList = None,
    memory_budget: Optional[int] = None,
    sample_input: Any = None,
    optimizer: profile_lib.OptimizerLike = None,
    calibration: Optional[calibration_lib.Calibration] = None,
) -> Plan:
    """Predicts every candidate for `devices` and chooses the fastest that fits.

    Args:
      model_fn: returns a built Keras model (compiled or not); called once,
        on the host, outside any distribution scope.
      global_batch_size: examples per step over all replicas.
      devices: the devices to plan for, as the `mirrored` kind takes them
        (`None`: every GPU, else every logical CPU; a count; names). The
        candidates use the first `len(devices)` devices; a `dtensor` mesh
        must span every local device, so plan for all of them to build it.
      memory_budget: bytes a device may hold; default: the GPU's memory
        when known (a logical GPU's limit, or `nvidia-smi`), else no limit.
      sample_input: an input batch, read only for a model without a layer
        graph (subclassed) to count its FLOPs.
      optimizer: a name, config or instance; `None`: the one `model_fn`
        compiles with (no state if none).
      calibration: the device rates; default: `calibrate(devices)` (cached).

    Returns:
      The `Plan`; the same for the same arguments and calibration.

    Raises:
      ValueError: when no candidate can run the model within the budget,
        naming the smallest need per device and the budget (or each
        candidate's reason); for a bad global batch or budget.

    Example:

    ```python
    result = plan(make_model, global_batch_size=64, memory_budget=8 << 30)
    print(result.table())
    ```
    """
    _check_budget(memory_budget)
    names = local.resolve_devices(devices)
    if calibration is None:
        calibration = measure.calibrate(names)
    if memory_budget is None:
        memory_budget = _device_memory(names)
    rows = tuple(
        _row(model_fn, c, global_batch_size, memory_budget, optimizer, calibration, sample_input)
        for c in candidates_lib.candidates(len(names))
    )
    eligible = [r for r in rows if r.eligible]
    if not eligible:
        raise ValueError(_nothing_fits(rows, memory_budget))
    best = min(range(len(eligible)), key=lambda i: (eligible[i].step_time.total, i))
    return Plan(eligible[best].candidate, rows, global_batch_size, memory_budget, calibration)


def _row(
    model_fn: ModelFn,
    candidate: candidates_lib.Candidate,
    global_batch_size: int,
    memory_budget: Optional[int],
    optimizer: profile_lib.OptimizerLike,
    calibration: calibration_lib.Calibration,
    sample_input: Any,
) -> Row:
    try:
        memory = memory_lib.estimate(model_fn, candidate, global_batch_size, optimizer)
        step = step_time_lib.predict(
            model_fn, candidate, global_batch_size, calibration, sample_input, optimizer
        )
    except memory_lib.InfeasibleError as e:
        return Row(candidate, None, None, False, False, str(e))
    if memory_budget is not None and memory.total > memory_budget:
        reason = (
            f"needs {_size(memory.total)} per device, over the budget of {_size(memory_budget)}"
        )
        return Row(candidate, memory, step, True, False, reason)
    return Row(candidate, memory, step, True, True)


def _nothing_fits(rows: tuple[Row, ...], memory_budget: Optional[int]) -> str:
    feasible = [r for r in rows if r.feasible]
    if not feasible:
        reasons = "; ".join(f"{r.candidate.description}: {r.reason}" for r in rows)
        return f"No candidate can run the model: {reasons}"
    smallest = min(feasible, key=lambda r: r.memory.total)
    return (
        f"No candidate fits the memory budget of {memory_budget} bytes "
        f"({_size(memory_budget)}) per device: the smallest need is {smallest.memory.total} "
        f"bytes ({_size(smallest.memory.total)}) per device, under "
        f"{smallest.candidate.description!r} ({smallest.memory}). Use more devices, a smaller "
        "global batch, or a larger budget."
    )


def _cells(row: Row, chosen: bool, notes: list[str]) -> tuple[str, ...]:
    if row.memory is None or row.step_time is None:
        notes.append(row.reason)
        empty = ("-",) * 10
        return (row.candidate.description, *empty, f"infeasible [{len(notes)}]")
    m, t = row.memory, row.step_time
    if chosen:
        status = "chosen"
    elif not row.within_budget:
        notes.append(row.reason)
        status = f"over budget [{len(notes)}]"
    else:
        status = ""
    return (
        row.candidate.description,
        _size(m.parameters),
        _size(m.gradients),
        _size(m.optimizer),
        _size(m.activations),
        _size(m.total),
        f"{t.total * 1e3:.3f}",
        f"{t.compute * 1e3:.3f}",
        f"{t.communication * 1e3:.3f}",
        f"{t.overhead * 1e3:.3f}",
        f"{t.efficiency:.2f}",
        status,
    )


def _check_budget(memory_budget: Optional[int]) -> None:
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(
            f"memory_budget must be a positive int of bytes. Received: memory_budget="
            f"{memory_budget!r}"
        )


def _device_memory(names: list[str]) -> Optional[int]:
    """The smallest GPU's memory in bytes; `None` on CPU or when unknown."""
    if any((tf.DeviceSpec.from_string(n).device_type or "").upper() != "GPU" for n in names):
        return None
    physical = tf.config.list_physical_devices("GPU")
    limits = [
        c.memory_limit
        for gpu in physical
        for c in (tf.config.get_logical_device_configuration(gpu) or [])
        if c.memory_limit
    ]
    if limits:
        return min(limits) << 20
    return _nvidia_smi_memory()


def _nvidia_smi_memory() -> Optional[int]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return min(int(line) for line in out.split()) << 20
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
        for k, v in options.items()
    }


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"
