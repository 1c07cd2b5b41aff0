"""Input through the shard dispatcher, as a `tf.data.Dataset`.

Example:

```python
from tfscale.data import dispatched
from tfscale.data.dispatcher import shards

data = dispatched.DispatchedInput(
    "127.0.0.1:40123", "train", shards.read,
    output_signature=tf.TensorSpec([], tf.int64), worker="worker-0")
for element in data.dataset: ...
position = data.position(consumed=1000)  # save it with the checkpoint
```
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Optional

import tensorflow as tf

from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import core

__all__ = [
    "DispatchedInput",
    "default_worker_name",
    "dispatched_dataset",
]


def default_worker_name() -> str:
    """`<type>-<index>` of this task from TF_CONFIG, else `worker-0`.

    The name must be stable across restarts (it keeps a worker's shard
    affinity and lets a resumed run rewind its own position) and unique
    among a job's consumers: processes without TF_CONFIG that share a job
    must each pass their own `worker`.
    """
    task = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("task", {})
    return f"{task.get('type', 'worker')}-{task.get('index', 0)}"


class DispatchedInput:
    """Elements of the shards a dispatcher leases to this worker, as a dataset.

    The worker registers, heartbeats from a background thread, leases up to
    `max_shards` shards at a time, reads each with `read_fn(shard_name)`,
    commits it before handing its elements on (a shard read twice, by a
    speculative backup or after an expired lease, reaches training once),
    and completes it after its last element was taken. Iterators closed
    early give their shards back. The dataset ends with the job's last epoch.

    `position(consumed)` is where training stands after consuming that many
    elements of the latest iterator, for saving with a checkpoint;
    `rewind(position)` moves the job back to it before a resumed run
    (single-consumer jobs).

    Args:
      address: the dispatcher's `host:port`.
      job: the job name.
      read_fn: shard name -> its elements (e.g. `shards.read`).
      output_signature: `tf.TypeSpec`s of one element, as for
        `tf.data.Dataset.from_generator`.
      worker: this worker's stable name; `default_worker_name()` if None.
      max_shards: leases asked for per call.
      shuffle_seed: shuffle each shard's elements (the same way on every read).
      auth_token: the dispatcher's token, if it requires one.
      tls_root_cert_file: PEM root certificate for TLS.
    """

    def __init__(
        self,
        address: str,
        job: str,
        read_fn: Callable[[str], Iterable[Any]],
        *,
        output_signature: Any,
        worker: Optional[str] = None,
        max_shards: int = 2,
        shuffle_seed: Optional[int] = None,
        auth_token: Optional[str] = None,
        tls_root_cert_file: Optional[str] = None,
    ):
        self.worker = worker or default_worker_name()
        self.job = job
        self._client = client_lib.DispatcherClient(
            address, auth_token=auth_token, tls_root_cert_file=tls_root_cert_file
        )
        self._read_fn = read_fn
        self._max_shards = max_shards
        self._shuffle_seed = shuffle_seed
        self._base = core.InputPosition()
        self._latest: Optional[client_lib.ShardConsumer] = None
        self.dataset = tf.data.Dataset.from_generator(
            self._generate, output_signature=output_signature
        )

    def rewind(self, position: core.InputPosition) -> None:
        """Moves the job back to `position`; later iterators start there."""
        self._client.register_worker(self.job, self.worker)
        self._client.rewind(self.job, self.worker, position)
        self._base = position

    def position(self, consumed: int) -> core.InputPosition:
        """The position after `consumed` elements of the latest iterator."""
        if self._latest is None:
            return self._base
        return self._latest.position(consumed, self._base)

    def _generate(self) -> Iterable[Any]:
        consumer = client_lib.ShardConsumer(
            self._client, self.job, self.worker, self._read_fn, self._max_shards,
            shuffle_seed=self._shuffle_seed,
        )
        self._latest = consumer
        yield from consumer


def dispatched_dataset(
    address: str, job: str, read_fn: Callable[[str], Iterable[Any]], **kwargs: Any
) -> tf.data.Dataset:
    """`DispatchedInput(address, job, read_fn, **kwargs).dataset`."""
    return DispatchedInput(address, job, read_fn, **kwargs).dataset
