"""Learning rates for a global batch: scaling rules and warmup.

A learning rate tuned at a reference batch size is scaled to the global
batch of a distributed run: linearly (Goyal et al., 2017) or by the square
root (common for adaptive optimizers), optionally reached by a linear warmup.

Example:

```python
lr = schedules.scaled_learning_rate(
    0.01, reference_batch_size=64, global_batch_size=256, rule="linear",
    warmup_steps=100)  # a Warmup schedule: 0.01 -> 0.04 over 100 steps
optimizer = keras.optimizers.SGD(learning_rate=lr)
```
"""

from __future__ import annotations

import math
from typing import Any
from typing import Union

import keras

__all__ = [
    "RULES",
    "Warmup",
    "scale_learning_rate",
    "scaled_learning_rate",
]

RULES = ("linear", "sqrt", "none")
LearningRate = Union[float, keras.optimizers.schedules.LearningRateSchedule]


def scale_learning_rate(
    base_learning_rate: float, reference_batch_size: int, global_batch_size: int, rule: str
) -> float:
    """Scales a learning rate tuned at `reference_batch_size` to the global batch.

    Raises:
      ValueError: for an unknown rule or a non-positive batch size or rate.
    """
    if rule not in RULES:
        raise ValueError(f"Unknown scaling rule {rule!r}. Valid rules: {', '.join(RULES)}")
    for name, value in (
        ("reference_batch_size", reference_batch_size),
        ("global_batch_size", global_batch_size),
        ("base_learning_rate", base_learning_rate),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be positive. Received: {name}={value!r}")
    ratio = global_batch_size / reference_batch_size
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
    return base_learning_rate * factor


@keras.saving.register_keras_serializable(package="tfscale")
class Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from `initial_learning_rate` to `target_learning_rate`.

    After `warmup_steps` steps the rate stays at `target_learning_rate`.

    Example:

    ```python
    schedule = Warmup(0.1, 0.4, warmup_steps=10)
    float(schedule(5))  # 0.25
    ```
    """

    def __init__(
        self, initial_learning_rate: float, target_learning_rate: float, warmup_steps: int
    ):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1. Received: warmup_steps={warmup_steps}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.target_learning_rate = float(target_learning_rate)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: Any) -> Any:
        ops = keras.ops
        fraction = ops.minimum(ops.cast(step, "float32") / self.warmup_steps, 1.0)
        delta = self.target_learning_rate - self.initial_learning_rate
        return self.initial_learning_rate + fraction * delta

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "target_learning_rate": self.target_learning_rate,
            "warmup_steps": self.warmup_steps,
        }


def scaled_learning_rate(
    base_learning_rate: float,
    reference_batch_size: int,
    global_batch_size: int,
    rule: str = "linear",
    warmup_steps: int = 0,
) -> LearningRate:
    """The scaled rate, as a `Warmup` schedule when `warmup_steps > 0`.

    The warmup starts at the unscaled `base_learning_rate` (the rate known to
    be stable) and ends at the scaled one.
    """
    target = scale_learning_rate(base_learning_rate, reference_batch_size, global_batch_size, rule)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0. Received: warmup_steps={warmup_steps}")
    if warmup_steps == 0:
        return target
    return Warmup(base_learning_rate, target, warmup_steps)
