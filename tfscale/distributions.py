"""The distribution facade: one object from one kind name.

`tfscale.distribution(kind, **options)` hides which TensorFlow machinery a
kind uses. Callers only see `scope()`, `distribute_dataset(...)`,
`num_replicas_in_sync`, `is_chief` and `strategy`, so switching from one
device to many is a change of the kind string.

Example:

```python
import tfscale

tfscale.configure_devices(virtual_cpus=2)
dist = tfscale.distribution("mirrored")
with dist.scope():
    model = keras.Sequential([keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss="mse")
model.fit(dist.distribute_dataset(unbatched_ds, global_batch_size=64), epochs=2)
```
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import tensorflow as tf

from tfscale.strategies import local
from tfscale.strategies import multi_worker

__all__ = [
    "Distribution",
    "DatasetOrFn",
    "distribution",
    "kind_options",
    "kinds",
]

DatasetOrFn = Union[tf.data.Dataset, Callable[[tf.distribute.InputContext], tf.data.Dataset]]
_ShardPolicy = tf.data.experimental.AutoShardPolicy


class Distribution:
    """A named way of running a Keras model over devices and workers.

    Built by `tfscale.distribution(kind, **options)`, not directly.

    Attributes:
      kind: the kind name, e.g. `"mirrored"`.
      options: the options the kind was built with.
      strategy: the underlying `tf.distribute.Strategy`.
    """

    def __init__(self, kind: str, strategy: tf.distribute.Strategy, options: Mapping[str, Any]):
        self._kind = kind
        self._strategy = strategy
        self._options = dict(options)

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def strategy(self) -> tf.distribute.Strategy:
        return self._strategy

    @property
    def num_replicas_in_sync(self) -> int:
        return self._strategy.num_replicas_in_sync

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices of this worker that hold replicas (empty for "default")."""
        if self._kind == "default":
            return ()
        return tuple(self._strategy.extended.worker_devices)

    @property
    def num_workers(self) -> int:
        """Number of worker processes taking part (1 on a single host)."""
        resolver = self._strategy.cluster_resolver
        if resolver is None:
            return 1
        spec = resolver.cluster_spec().as_dict()
        return max(1, sum(len(spec.get(job, ())) for job in ("chief", "worker")))

    @property
    def is_chief(self) -> bool:
        """Whether this worker writes checkpoints, logs and metrics."""
        resolver = self._strategy.cluster_resolver
        if resolver is None or not resolver.cluster_spec().as_dict():
            return True
        task_type, task_id = resolver.task_type, resolver.task_id
        if task_type == "chief":
            return True
        has_chief = "chief" in resolver.cluster_spec().as_dict()
        return task_type == "worker" and task_id == 0 and not has_chief

    @contextlib.contextmanager
    def scope(self) -> Iterator["Distribution"]:
        """Context in which models, optimizers and metrics are created."""
        with self._strategy.scope():
            yield self

    def distribute_dataset(
        self,
        dataset_or_fn: DatasetOrFn,
        global_batch_size: int,
        *,
        shard_policy: _ShardPolicy = _ShardPolicy.AUTO,
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
        """
        per_replica = self.per_replica_batch_size(global_batch_size)
        _no_device_pipeline_autotune()
        if isinstance(dataset_or_fn, tf.data.Dataset):
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = shard_policy
            # No autotuning thread: see `_no_device_pipeline_autotune`.
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

    def per_replica_batch_size(self, global_batch_size: int) -> int:
        """The batch each replica sees for a global batch.

        Raises:
          ValueError: if the global batch is not a positive multiple of the
            replica count.
        """
        replicas = self.num_replicas_in_sync
        if (
            isinstance(global_batch_size, bool)
            or not isinstance(global_batch_size, int)
            or global_batch_size < 1
            or global_batch_size % replicas
        ):
            raise ValueError(
                f"global_batch_size must be a positive multiple of the "
                f"{replicas} replica(s) of this {self._kind!r} distribution. "
                f"Received: global_batch_size={global_batch_size!r}"
            )
        return global_batch_size // replicas

    def __repr__(self) -> str:
        # The device options are shown resolved, as `devices`.
        options = ", ".join(
            f"{k}={v!r}"
            for k, v in sorted(self._options.items())
            if k not in ("device", "devices")
        )
        return (
            f"Distribution(kind={self._kind!r}, replicas={self.num_replicas_in_sync}, "
            f"workers={self.num_workers}, devices={list(self.devices)}"
            + (f", {options}" if options else "")
            + ")"
        )


def _no_device_pipeline_autotune() -> None:
    """Turns tf.data autotuning off in the per-device pipelines of distributed iterators.

    Deleting a tf.data iterator whose autotuning ("model") thread is asleep
    can block for the rest of that thread's optimization period, which
    doubles up to 60 s: the destructor cancels the thread and joins it, but
    `Model::OptimizeLoop` is woken before `CancellationManager::IsCancelled()`
    turns true (callbacks run first), so it may sleep again. Keras deletes
    the training iterator when `fit` returns, so `evaluate` started 2-99 s
    late. `distribute_dataset` turns autotuning off in the input pipeline;
    the `MultiDeviceIterator` that feeds each device builds one more
    pipeline per device (a fixed one-element prefetch: nothing to tune) with
    default options, where no public API reaches, so its builder is wrapped
    here, once. `tests/teardown_test.py` checks both on a live iterator.
    """
    from tensorflow.python.data.ops import multi_device_iterator_ops  # pylint: disable=import-outside-toplevel

    create = multi_device_iterator_ops._create_device_dataset  # pylint: disable=protected-access
    if getattr(create, "tfscale_no_autotune", False):
        return

    def create_without_autotune(*args: Any, **kwargs: Any) -> tf.data.Dataset:
        options = tf.data.Options()
        options.autotune.enabled = False
        return create(*args, **kwargs).with_options(options)

    create_without_autotune.tfscale_no_autotune = True  # type: ignore[attr-defined]
    multi_device_iterator_ops._create_device_dataset = create_without_autotune  # pylint: disable=protected-access


def _strategy_kind(kind: str, builder: Callable[..., tf.distribute.Strategy]) -> Callable[..., Distribution]:
    def factory(**options: Any) -> Distribution:
        return Distribution(kind, builder(**options), options)

    factory.__signature__ = inspect.signature(builder)  # type: ignore[attr-defined]
    return factory


def _dtensor(
    mesh: str,
    layout_map: Any = None,
    batch_axis: Optional[str] = None,
    cluster: str = "auto",
    task_index: Optional[int] = None,
) -> Distribution:
    # Imported on use: the sharding package builds on this module.
    from tfscale.sharding import distribution as sharding_distribution  # pylint: disable=import-outside-toplevel

    return sharding_distribution.dtensor_distribution(mesh, layout_map, batch_axis, cluster, task_index)


_KINDS: dict[str, Callable[..., Distribution]] = {
    "default": _strategy_kind("default", local.default),
    "one_device": _strategy_kind("one_device", local.one_device),
    "mirrored": _strategy_kind("mirrored", local.mirrored),
    "multi_worker_mirrored": _strategy_kind(
        "multi_worker_mirrored", multi_worker.multi_worker_mirrored
    ),
    "dtensor": _dtensor,
}


def kinds() -> tuple[str, ...]:
    """The valid kind names."""
    return tuple(sorted(_KINDS))


def kind_options(kind: str) -> tuple[str, ...]:
    """The option names `distribution(kind, ...)` takes.

    Raises:
      ValueError: for an unknown kind, listing the valid ones.
    """
    return tuple(inspect.signature(_factory(kind)).parameters)


def _factory(kind: str) -> Callable[..., Distribution]:
    factory = _KINDS.get(kind)
    if factory is None:
        raise ValueError(f"Unknown distribution kind {kind!r}. Valid kinds: {', '.join(kinds())}")
    return factory


def distribution(kind: str = "default", **options: Any) -> Distribution:
    """Builds the distribution of the given kind.

    Args:
      kind: one of `kinds()`: `"default"`, `"one_device"` (option `device`),
        `"mirrored"` (options `devices`, `all_reduce`),
        `"multi_worker_mirrored"` (options `communication`, `cluster`,
        `task_index`), `"dtensor"` (options `mesh`, `layout_map`,
        `batch_axis`, `cluster`, `task_index`; see
        `tfscale.sharding.distribution.dtensor_distribution`).
      **options: options of that kind.

    Returns:
      A `Distribution`.

    Raises:
      ValueError: for an unknown kind or option, listing the valid ones, or
        a bad option value.

    Example:

    ```python
    dist = tfscale.distribution("mirrored", devices=2, all_reduce="reduce_to_one")
    dist = tfscale.distribution("dtensor", mesh="batch=2,model=2", layout_map="megatron")
    ```
    """
    factory = _factory(kind)
    parameters = inspect.signature(factory).parameters
    valid = tuple(parameters)
    missing = [n for n, p in parameters.items() if p.default is p.empty and n not in options]
    if missing:
        raise ValueError(
            f"Distribution kind {kind!r} needs option(s) {', '.join(missing)}. "
            f"Received: {', '.join(sorted(options)) or '(none)'}"
        )
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} for distribution kind {kind!r}. "
            f"Valid options: {', '.join(valid) or '(none)'}"
        )
    return factory(**options)
