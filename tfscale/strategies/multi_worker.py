"""Synchronous data parallelism across worker processes, working with Keras 3.

Stock `tf.distribute.MultiWorkerMirroredStrategy` breaks Keras 3's `fit`
(TF 2.21 / Keras 3.15; keras#20585, tensorflow#72388, ray#47464) in two
places, both in how Keras calls `strategy.reduce`:

1. `TensorFlowTrainer._maybe_symbolic_build` reduces a whole data batch, a
   nest of per-replica values, and the collective strategy's `reduce`
   handles only single values: "Attempt to convert a value (PerReplica...)".
2. Keras's per-replica metric reduction asks for a MEAN over `axis=0` of
   scalars: "Invalid reduction dimension 0 for input with 0 dimensions".

The strategy built here differs from the stock one only in `reduce`, which
maps over nests and reduces scalars across replicas only. Keras and
TensorFlow stay untouched, and code that does not use tfscale's strategy is
not affected.

Example:

```python
strategy = multi_worker.multi_worker_mirrored(communication="ring")
```
"""

from __future__ import annotations

from typing import Any
from typing import Optional

import tensorflow as tf

from tfscale.strategies import cluster as cluster_lib
from tfscale.strategies import exit_barrier
from tfscale.strategies import keras_paths

__all__ = [
    "COMMUNICATION",
    "multi_worker_mirrored",
]

COMMUNICATION = {
    "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}


class _KerasMultiWorkerMirroredStrategy(
    keras_paths.KerasPathsMixin, tf.distribute.MultiWorkerMirroredStrategy
):
    """`MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3 passes it.

    It also has the Keras path fixes of `keras_paths`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._keras_paths_init()

    def reduce(self, reduce_op: Any, value: Any, axis: Optional[int]) -> Any:
        if _is_nest(value):
            return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
        if axis is not None and _rank(value) == 0:
            axis = None  # a scalar per replica: reduce across replicas only
        return super().reduce(reduce_op, value, axis)


def multi_worker_mirrored(
    communication: str = "auto", cluster: str = "auto", task_index: Optional[int] = None
) -> tf.distribute.MultiWorkerMirroredStrategy:
    """Synchronous training over the devices of several worker processes.

    Args:
      communication: collective implementation: `"auto"`, `"ring"` (gRPC) or
        `"nccl"` (GPUs).
      cluster: where the workers come from: `"auto"` (TF_CONFIG, else Slurm,
        else a Kubernetes Indexed Job, else this process alone),
        `"tf_config"`, `"slurm"`, `"kubernetes"`, or a comma-separated
        `host:port` list (with `task_index`).
      task_index: this process's index in an explicit host list.

    Raises:
      ValueError: for an unknown communication, `"nccl"` on a worker without
        a GPU, a malformed cluster, or a task_index without a host list.
    """
    if communication not in COMMUNICATION:
        raise ValueError(
            f"communication must be one of {', '.join(COMMUNICATION)}. "
            f"Received: communication={communication!r}"
        )
    if communication == "nccl" and not tf.config.list_physical_devices("GPU"):
        # NCCL collectives on CPU tensors fail only at the first step, obscurely.
        raise ValueError(
            "communication='nccl' needs GPUs, and this worker has none "
            "(tf.config.list_physical_devices('GPU') is empty). Use 'auto' or 'ring'. "
            "Received: communication='nccl'"
        )
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=COMMUNICATION[communication]
    )
    workers = cluster_lib.from_option(cluster, task_index)
    if workers is None:
        return _KerasMultiWorkerMirroredStrategy(communication_options=options)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": list(workers.workers)}),
        task_type="worker",
        task_id=workers.task_index,
        rpc_layer="grpc",
    )
    strategy = _KerasMultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )
    if workers.num_workers > 1:
        exit_barrier.register("tfscale_mwms_exit")
    return strategy


def _is_nest(value: Any) -> bool:
    if isinstance(value, (tf.distribute.DistributedValues, tf.Tensor, tf.Variable)):
        return False
    return tf.nest.is_nested(value)


def _rank(value: Any) -> Optional[int]:
    sample = value.values[0] if isinstance(value, tf.distribute.DistributedValues) else value
    shape = getattr(sample, "shape", None)
    return None if shape is None else shape.rank
