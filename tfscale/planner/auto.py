"""The `"auto"` kind: `tfscale.distribution("auto", model_fn=..., global_batch_size=...)`.

It plans (`plan.plan`) and builds the chosen candidate's distribution
through the registry's own builder, which `tfscale.distributions` passes
in (`factory(build)`), so the planner never imports the registry. The
result behaves as the chosen distribution (same kind, options, strategy,
scope, memory report) and carries the `plan`, for the run's log and
`metrics.json`.

Example:

```python
dist = tfscale.distribution("auto", model_fn=make_model, global_batch_size=64)
print(dist.plan.table())
with dist.scope():
    model = make_model()
```
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Optional

import keras
import tensorflow as tf

from tfscale.distribution_base import DatasetOrFn
from tfscale.distribution_base import Distribution
from tfscale.distribution_base import ShardPolicy
from tfscale.planner import calibration as calibration_lib
from tfscale.planner import plan as plan_lib
from tfscale.planner import profile as profile_lib
from tfscale.strategies import local

if TYPE_CHECKING:  # annotations only
    from tfscale.sharding import memory

__all__ = [
    "PlannedDistribution",
    "factory",
]

Build = Callable[..., Distribution]


class PlannedDistribution(Distribution):
    """The distribution a plan chose, with the plan.

    Its kind and options are the chosen candidate's (`metrics.json` names
    what ran); every call goes to that distribution, other attributes too
    (a `dtensor` choice's `mesh`, `layout_map`).

    Example:

    ```python
    dist = tfscale.distribution("auto", model_fn=make_model, global_batch_size=64)
    dist.kind, dist.plan.chosen.description, dist.distribution
    ```
    """

    def __init__(self, plan: plan_lib.Plan, distribution: Distribution):
        super().__init__(distribution.kind, distribution.options)
        self._plan = plan
        self._distribution = distribution

    @property
    def plan(self) -> plan_lib.Plan:
        return self._plan

    @property
    def distribution(self) -> Distribution:
        """The chosen candidate's distribution."""
        return self._distribution

    @property
    def strategy(self) -> tf.distribute.Strategy:
        return self._distribution.strategy

    @property
    def num_replicas_in_sync(self) -> int:
        return self._distribution.num_replicas_in_sync

    @property
    def devices(self) -> tuple[str, ...]:
        return self._distribution.devices

    @property
    def num_workers(self) -> int:
        return self._distribution.num_workers

    @property
    def is_chief(self) -> bool:
        return self._distribution.is_chief

    @contextlib.contextmanager
    def scope(self) -> Iterator[Distribution]:
        with self._distribution.scope():
            yield self

    def distribute_dataset(
        self,
        dataset_or_fn: DatasetOrFn,
        global_batch_size: int,
        *,
        shard_policy: ShardPolicy = ShardPolicy.AUTO,
    ) -> Any:
        return self._distribution.distribute_dataset(
            dataset_or_fn, global_batch_size, shard_policy=shard_policy
        )

    def per_replica_batch_size(self, global_batch_size: int) -> int:
        return self._distribution.per_replica_batch_size(global_batch_size)

    def per_worker_batch_size(self, global_batch_size: int) -> int:
        return self._distribution.per_worker_batch_size(global_batch_size)

    def memory_report(self, model: keras.Model) -> Optional["memory.MemoryReport"]:
        return self._distribution.memory_report(model)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._distribution, name)

    def __repr__(self) -> str:
        return f"{self._distribution!r} (planned: {self._plan.chosen.description})"


def factory(build: Build) -> Callable[..., PlannedDistribution]:
    """The `"auto"` kind's factory, building the chosen candidate with `build`.

    Args:
      build: `tfscale.distributions.distribution`: `build(kind, **options)`.

    Returns:
      The factory the registry calls with the kind's options (its signature
      lists them).
    """

    def auto(
        model_fn: Callable[[], keras.Model],
        global_batch_size: int,
        memory_budget: Optional[int] = None,
        optimizer: profile_lib.OptimizerLike = None,
        devices: local.DeviceList = None,
        sample_input: Any = None,
        calibration: Optional[calibration_lib.Calibration] = None,
    ) -> PlannedDistribution:
        """Plans over the local devices and builds the chosen distribution.

        Args: as `tfscale.planner.plan`.

        Raises:
          ValueError: when no candidate fits (see `plan`).
        """
        chosen = plan_lib.plan(
            model_fn,
            global_batch_size=global_batch_size,
            devices=devices,
            memory_budget=memory_budget,
            sample_input=sample_input,
            optimizer=optimizer,
            calibration=calibration,
        )
        return PlannedDistribution(chosen, build(chosen.chosen.kind, **chosen.chosen.options))

    return auto
