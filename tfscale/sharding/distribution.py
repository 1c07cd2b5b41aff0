"""The `"dtensor"` kind of `tfscale.distribution`: a model laid out on a mesh.

Example:

```python
tfscale.configure_devices(virtual_cpus=4)
dist = tfscale.distribution("dtensor", mesh="batch=2,model=2", layout_map="megatron")
with dist.scope():
    model = make_model()
    model.compile(optimizer="adam", loss="mse")
print(dist.memory_report(model))
model.fit(dist.distribute_dataset(unbatched_ds, global_batch_size=64), epochs=2)
```
"""

from __future__ import annotations

from typing import Any
from typing import Optional

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfscale.distribution_base import DatasetOrFn
from tfscale.distribution_base import Distribution
from tfscale.distribution_base import ShardPolicy
from tfscale.sharding import clients
from tfscale.sharding import layout_map as layout_map_lib
from tfscale.sharding import memory
from tfscale.sharding import mesh as mesh_lib
from tfscale.sharding import strategy as strategy_lib
from tfscale.strategies import cluster as cluster_lib

__all__ = [
    "DTensorDistribution",
    "dtensor_distribution",
]


class DTensorDistribution(Distribution):
    """A `Distribution` whose variables are split over a DTensor mesh.

    Data-parallel replicas are the positions along the mesh's batch axis:
    `num_replicas_in_sync` is its size (1 for a mesh without one).
    """

    def __init__(
        self,
        strategy: strategy_lib.DTensorStrategy,
        spec: mesh_lib.MeshSpec,
        options: dict[str, Any],
    ):
        super().__init__("dtensor", options)
        self._strategy = strategy
        self._spec = spec

    @property
    def strategy(self) -> strategy_lib.DTensorStrategy:
        return self._strategy

    @property
    def mesh(self) -> dtensor.Mesh:
        return self.strategy.mesh

    @property
    def mesh_spec(self) -> mesh_lib.MeshSpec:
        return self._spec

    @property
    def layout_map(self) -> layout_map_lib.LayoutMap:
        return self.strategy.layout_map

    @property
    def num_replicas_in_sync(self) -> int:
        axis = self.strategy.batch_axis
        return self.mesh.dim_size(axis) if axis else 1

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self.mesh.local_devices())

    @property
    def num_workers(self) -> int:
        return dtensor.num_clients() if clients.is_multi_client() else 1

    @property
    def is_chief(self) -> bool:
        return not clients.is_multi_client() or dtensor.client_id() == 0

    def per_worker_batch_size(self, global_batch_size: int) -> int:
        """The examples each client reads per step.

        Clients whose devices hold the same batch-axis positions read the
        same examples, so a client reads its group's share.
        """
        self.per_replica_batch_size(global_batch_size)
        groups = strategy_lib.InputSplit.of(self.mesh, self.strategy.batch_axis).num_groups
        return self._share(global_batch_size, groups, "client group(s)")

    def distribute_dataset(
        self,
        dataset_or_fn: DatasetOrFn,
        global_batch_size: int,
        *,
        shard_policy: ShardPolicy = ShardPolicy.AUTO,
    ) -> strategy_lib.DTensorBatches:
        """Batches an unbatched dataset into DTensors split on the batch axis.

        Every global batch holds the same elements as a one-device run's
        batch. In a multi-client mesh, the clients whose devices hold
        different batch-axis positions read different parts: every
        `n`-th element, unless `shard_policy` is OFF (the dataset is
        already this client's, e.g. leased from a dispatcher).

        Raises:
          ValueError: if the batch axis size does not divide the global
            batch, or if `shard_policy` is OFF while clients must read the
            same data (the mesh splits a replica over several clients).
          TypeError: for anything but a `tf.data.Dataset`.
        """
        self.per_worker_batch_size(global_batch_size)
        if not isinstance(dataset_or_fn, tf.data.Dataset):
            raise TypeError(
                "A dtensor distribution takes an unbatched tf.data.Dataset. "
                f"Received: {type(dataset_or_fn).__name__}"
            )
        dataset = dataset_or_fn
        split = strategy_lib.InputSplit.of(self.mesh, self.strategy.batch_axis)
        if shard_policy == ShardPolicy.OFF:
            if split.num_groups != self.num_workers:
                raise ValueError(
                    f"Mesh {self._spec} puts the same batch-axis positions on several of its "
                    f"{self.num_workers} clients, which must then read the same data; "
                    "shard_policy=OFF (each client's own data, e.g. from a dispatcher) needs a "
                    f"mesh whose {self.strategy.batch_axis or 'batch'} axis has a multiple of "
                    f"{self.num_workers} positions, laid out first."
                )
        elif split.num_groups > 1:
            dataset = dataset.shard(split.num_groups, split.group)
        return strategy_lib.DTensorBatches(dataset, self.strategy, global_batch_size)

    def memory_report(self, model: keras.Model) -> memory.MemoryReport:
        """`tfscale.sharding.memory_report(model)`."""
        return memory.memory_report(model)


def dtensor_distribution(
    mesh: str,
    layout_map: layout_map_lib.LayoutMapLike = None,
    batch_axis: Optional[str] = None,
    cluster: str = "auto",
    task_index: Optional[int] = None,
) -> DTensorDistribution:
    """Builds the `"dtensor"` distribution.

    Args:
      mesh: the mesh spec, e.g. `"batch=2,model=2"`; it must span exactly
        the devices there are (over every worker in a multi-client job).
      layout_map: a `tfscale.LayoutMap`, a preset name (`"data_parallel"`,
        `"megatron"`), rules, or a `keras.distribution.LayoutMap`; default:
        every variable replicated.
      batch_axis: the mesh axis input batches are split over; default
        `"batch"` when the mesh has that axis, else none (every device sees
        the whole batch). A name the mesh lacks is an error.
      cluster: where the workers come from, as for `"multi_worker_mirrored"`;
        several workers make a multi-client mesh.
      task_index: this process's index in an explicit host list.

    Raises:
      ValueError: for a bad mesh spec, layout map, or device count.
    """
    spec = mesh_lib.MeshSpec.parse(mesh)
    rules = layout_map_lib.LayoutMap.from_value(layout_map)
    missing = sorted(rules.mesh_axes - set(spec.names))
    if missing:
        raise ValueError(
            f"The layout map splits over mesh axes {missing} that mesh {spec} does not have. "
            f"Mesh axes: {', '.join(spec.names)}"
        )
    batch_axis = mesh_lib.batch_axis_of(spec.names, batch_axis)
    multi_client = clients.initialize(cluster_lib.from_option(cluster, task_index))
    built = mesh_lib.build_mesh(spec, multi_client=multi_client)
    options = {"mesh": str(spec), "layout_map": layout_map}
    if batch_axis is not None:
        options["batch_axis"] = batch_axis
    if cluster != "auto":
        options.update(cluster=cluster, task_index=task_index)
    return DTensorDistribution(
        strategy_lib.DTensorStrategy(built, rules, batch_axis), spec, options
    )
