"""Input through the shard dispatcher, as a `tf.data.Dataset`.

Example:

```python
from tfscale.data import dispatched
from tfscale.data.dispatcher import shards

ds = dispatched.dispatched_dataset(
    "127.0.0.1:40123", "train", shards.read,
    output_signature=tf.TensorSpec([], tf.int64), worker="worker-0")
for element in ds: ...
```
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable, Iterable, Optional

import tensorflow as tf

from tfscale.data.dispatcher import client as client_lib

__all__ = [
    "default_worker_name",
    "dispatched_dataset",
]


def default_worker_name() -> str:
    """`worker-<index>` from TF_CONFIG, else `<hostname>-<pid>`.

    A stable name keeps a worker's shard affinity (consistent_hash) across
    restarts.
    """
    task = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("task", {})
    if "index" in task:
        return f"{task.get('type', 'worker')}-{task['index']}"
    return f"{socket.gethostname()}-{os.getpid()}"


def dispatched_dataset(
    address: str,
    job: str,
    read_fn: Callable[[str], Iterable[Any]],
    *,
    output_signature: Any,
    worker: Optional[str] = None,
    max_shards: int = 2,
    auth_token: Optional[str] = None,
    tls_root_cert_file: Optional[str] = None,
) -> tf.data.Dataset:
    """A dataset of the elements of the shards the dispatcher leases to this worker.

    The worker registers, heartbeats from a background thread, leases up to
    `max_shards` shards at a time, reads each with `read_fn(shard_name)`, and
    hands a shard's elements on only after the dispatcher accepted its
    completion: a shard read twice (speculative backup, or an expired lease
    that was re-leased) reaches training once. The dataset ends when the
    job's last epoch is complete.

    Args:
      address: the dispatcher's `host:port`.
      job: the job name.
      read_fn: shard name -> its elements (e.g. `shards.read`).
      output_signature: `tf.TypeSpec`s of one element, as for
        `tf.data.Dataset.from_generator`.
      worker: this worker's stable name; `default_worker_name()` if None.
      max_shards: leases asked for per call.
      auth_token: the dispatcher's token, if it requires one.
      tls_root_cert_file: PEM root certificate for TLS.
    """
    name = worker or default_worker_name()

    def generate() -> Iterable[Any]:
        client = client_lib.DispatcherClient(
            address, auth_token=auth_token, tls_root_cert_file=tls_root_cert_file
        )
        try:
            yield from client_lib.ShardConsumer(client, job, name, read_fn, max_shards)
        finally:
            client.close()

    return tf.data.Dataset.from_generator(generate, output_signature=output_signature)
