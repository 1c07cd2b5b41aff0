"""What every distribution kind offers: the abstract `Distribution`.

A kind (`"mirrored"`, `"dtensor"`, ...) is a subclass built by a factory
that `tfscale.distributions` registers under the kind's name. Code that
trains a model (`tfscale.train.lib`, a user's script) speaks only to this
interface, so a new kind plugs in without touching the others.

Example:

```python
class MyDistribution(Distribution):
    ...  # strategy, num_replicas_in_sync, devices, num_workers, is_chief,
         # distribute_dataset

dist = tfscale.distribution("mirrored")
per_replica = dist.per_replica_batch_size(64)
with dist.scope():
    model = make_model()
```
"""

from __future__ import annotations

import abc
import contextlib
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Mapping
from typing import Optional
from typing import Union

import tensorflow as tf

if TYPE_CHECKING:  # only for annotations: the memory report is the sharding package's
    import keras

    from tfscale.sharding import memory

__all__ = [
    "DatasetOrFn",
    "Distribution",
    "ShardPolicy",
]

DatasetOrFn = Union[tf.data.Dataset, Callable[[tf.distribute.InputContext], tf.data.Dataset]]
ShardPolicy = tf.data.experimental.AutoShardPolicy


class Distribution(abc.ABC):
    """A named way of running a Keras model over devices and workers.

    Built by `tfscale.distribution(kind, **options)`, not directly.

    Attributes:
      kind: the kind name, e.g. `"mirrored"`.
      options: the options the kind was built with.
      strategy: the `tf.distribute.Strategy` Keras runs under.
      num_replicas_in_sync: data-parallel replicas over all workers: the
        global batch is split into this many equal parts.
      devices: this worker's devices that take part.
      num_workers: worker processes taking part (1 on one host).
      is_chief: whether this worker writes checkpoints, logs and metrics.
    """

    def __init__(self, kind: str, options: Mapping[str, Any]):
        self._kind = kind
        self._options = dict(options)

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    @abc.abstractmethod
    def strategy(self) -> tf.distribute.Strategy: ...

    @property
    @abc.abstractmethod
    def num_replicas_in_sync(self) -> int: ...

    @property
    @abc.abstractmethod
    def devices(self) -> tuple[str, ...]: ...

    @property
    @abc.abstractmethod
    def num_workers(self) -> int: ...

    @property
    @abc.abstractmethod
    def is_chief(self) -> bool: ...

    @contextlib.contextmanager
    def scope(self) -> Iterator["Distribution"]:
        """Context in which models, optimizers and metrics are created."""
        with self.strategy.scope():
            yield self

    @abc.abstractmethod
    def distribute_dataset(
        self,
        dataset_or_fn: DatasetOrFn,
        global_batch_size: int,
        *,
        shard_policy: ShardPolicy = ShardPolicy.AUTO,
    ) -> Any:
        """Batches, shards and prefetches unbatched input for this distribution.

        Args:
          dataset_or_fn: an UNBATCHED `tf.data.Dataset` (kinds may also take
            a function of a `tf.distribute.InputContext`).
          global_batch_size: examples per step over all replicas.
          shard_policy: how a dataset is split among workers; `OFF` when
            each worker's dataset is already its own (e.g. leased from a
            dispatcher).

        Returns:
          An input `model.fit` accepts, whose every global batch holds
          `global_batch_size` examples (a final partial batch is dropped).

        Raises:
          ValueError: if the replica count does not divide the global batch.
        """

    def per_replica_batch_size(self, global_batch_size: int) -> int:
        """The batch each replica sees for a global batch.

        Raises:
          ValueError: if the global batch is not a positive multiple of the
            replica count.
        """
        return self._share(global_batch_size, self.num_replicas_in_sync, "replica(s)")

    def per_worker_batch_size(self, global_batch_size: int) -> int:
        """The examples each worker process reads per step.

        Raises:
          ValueError: if the global batch is not a positive multiple of the
            replica count, or the worker count does not divide it.
        """
        self.per_replica_batch_size(global_batch_size)
        return self._share(global_batch_size, self.num_workers, "worker(s)")

    def memory_report(self, model: "keras.Model") -> Optional["memory.MemoryReport"]:
        """Per-device bytes of `model`'s variables, for kinds that split them; else None."""
        del model
        return None

    def _share(self, global_batch_size: int, parts: int, what: str) -> int:
        if (
            isinstance(global_batch_size, bool)
            or not isinstance(global_batch_size, int)
            or global_batch_size < 1
            or global_batch_size % parts
        ):
            raise ValueError(
                f"global_batch_size must be a positive multiple of the {parts} {what} of this "
                f"{self._kind!r} distribution. Received: global_batch_size={global_batch_size!r}"
            )
        return global_batch_size // parts

    def __repr__(self) -> str:
        # The device options are shown resolved, as `devices`.
        options = ", ".join(
            f"{k}={v!r}" for k, v in sorted(self._options.items()) if k not in ("device", "devices")
        )
        return (
            f"Distribution(kind={self._kind!r}, replicas={self.num_replicas_in_sync}, "
            f"workers={self.num_workers}, devices={list(self.devices)}"
            + (f", {options}" if options else "")
            + ")"
        )
