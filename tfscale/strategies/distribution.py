"""The tf.distribute kinds of `tfscale.distribution`: one `Distribution` over a strategy.

`"default"`, `"one_device"`, `"mirrored"` and `"multi_worker_mirrored"` are
each a `StrategyDistribution` around the strategy their builder returns.

Example:

```python
from tfscale.strategies import distribution
from tfscale.strategies import local

mirrored = distribution.kind("mirrored", local.mirrored)
dist = mirrored(devices=2)
with dist.scope():
    model = make_model()
model.fit(dist.distribute_dataset(unbatched_ds, global_batch_size=64))
```
"""

from __future__ import annotations

import inspect
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Union

import tensorflow as tf

from tfscale import compat
from tfscale.distribution_base import DatasetOrFn
from tfscale.distribution_base import Distribution
from tfscale.distribution_base import ShardPolicy

__all__ = [
    "StrategyDistribution",
    "kind",
]


class StrategyDistribution(Distribution):
    """A `Distribution` whose replicas are a `tf.distribute.Strategy`'s.

    Args:
      kind: the kind name.
      strategy: the strategy; its cluster resolver (if any) names the workers.
      options: the options the kind was built with.
    """

    def __init__(self, kind: str, strategy: tf.distribute.Strategy, options: Mapping[str, Any]):
        super().__init__(kind, options)
        self._strategy = strategy

    @property
    def strategy(self) -> tf.distribute.Strategy:
        return self._strategy

    @property
    def num_replicas_in_sync(self) -> int:
        return self._strategy.num_replicas_in_sync

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices of this worker that hold replicas (empty for the default strategy)."""
        try:
            return tuple(self._strategy.extended.worker_devices)
        except RuntimeError:  # the default strategy has no devices of its own
            return ()

    @property
    def num_workers(self) -> int:
        resolver = self._strategy.cluster_resolver
        if resolver is None:
            return 1
        spec = resolver.cluster_spec().as_dict()
        return max(1, sum(len(spec.get(job, ())) for job in ("chief", "worker")))

    @property
    def is_chief(self) -> bool:
        resolver = self._strategy.cluster_resolver
        if resolver is None or not resolver.cluster_spec().as_dict():
            return True
        task_type, task_id = resolver.task_type, resolver.task_id
        if task_type == "chief":
            return True
        has_chief = "chief" in resolver.cluster_spec().as_dict()
        return task_type == "worker" and task_id == 0 and not has_chief

    def distribute_dataset(
        self,
        dataset_or_fn: DatasetOrFn,
        global_batch_size: int,
        *,
        shard_policy: ShardPolicy = ShardPolicy.AUTO,
    ) -> Union[tf.data.Dataset, tf.distribute.DistributedDataset]:
        """Batches, shards and prefetches unbatched input for this distribution.

        Args:
          dataset_or_fn: an UNBATCHED `tf.data.Dataset`, or a function of a
            `tf.distribute.InputContext` returning one (the function then
            shards for its input pipeline itself, as in
            `distribute_datasets_from_function`).
          global_batch_size: examples per step over all replicas; each
            replica gets `global_batch_size / num_replicas_in_sync`.
          shard_policy: how a dataset is split among workers
            (`tf.data.experimental.AutoShardPolicy`); unused for a function.

        Returns:
          A dataset `model.fit` accepts. A final partial batch is dropped, so
          every replica sees the same batch shape at every step.

        Raises:
          ValueError: if the replica count does not divide the global batch.
          TypeError: for anything but a dataset or a function.
        """
        per_replica = self.per_replica_batch_size(global_batch_size)
        # No autotuning threads anywhere in the input: deleting an iterator
        # could wait for one for up to a minute (see compat).
        compat.disable_device_pipeline_autotune()
        if isinstance(dataset_or_fn, tf.data.Dataset):
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = shard_policy
            # AUTOTUNE parallelism then means the core count (map) or the
            # cycle length (interleave); prefetch buffers keep their own tuning.
            options.autotune.enabled = False
            dataset = dataset_or_fn.with_options(options)
            dataset = dataset.batch(global_batch_size, drop_remainder=True)
            return self._strategy.experimental_distribute_dataset(
                dataset.prefetch(tf.data.AUTOTUNE)
            )
        if not callable(dataset_or_fn):
            raise TypeError(
                "dataset_or_fn must be a tf.data.Dataset or a function of a "
                f"tf.distribute.InputContext. Received: {type(dataset_or_fn).__name__}"
            )

        def batched_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            dataset = dataset_or_fn(context)
            dataset = dataset.batch(per_replica, drop_remainder=True)
            return dataset.prefetch(tf.data.AUTOTUNE)

        return self._strategy.distribute_datasets_from_function(batched_fn)


def kind(name: str, builder: Callable[..., tf.distribute.Strategy]) -> Callable[..., Distribution]:
    """A kind's factory: `builder(**options)` wrapped in a `StrategyDistribution`.

    The factory has the builder's signature, so the registry can list and
    check its options.
    """

    def factory(**options: Any) -> Distribution:
        return StrategyDistribution(name, builder(**options), options)

    factory.__signature__ = inspect.signature(builder)  # type: ignore[attr-defined]
    factory.__doc__ = builder.__doc__
    return factory
