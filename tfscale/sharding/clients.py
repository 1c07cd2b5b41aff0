"""DTensor's multi-client setup from the cluster tfscale already knows.

A mesh that spans several worker processes (one client each) needs the
DTensor system initialized in every process before TensorFlow starts:
each client's gRPC address (`DTENSOR_JOBS`), its index (`DTENSOR_CLIENT_ID`)
and the job name. `initialize` sets them from a `Cluster` (TF_CONFIG as
`tfscale-launch` writes it, Slurm, Kubernetes or a host list), so a mesh
over the devices of all workers is one call away.

Example:

```python
cluster = cluster_lib.resolve("auto")     # e.g. from tfscale-launch's TF_CONFIG
clients.initialize(cluster)               # before TensorFlow initializes
mesh = build_mesh("batch=2,model=2", multi_client=True)
```
"""

from __future__ import annotations

import os
from typing import Optional

from tensorflow.experimental import dtensor

from tfscale import compat
from tfscale import devices as devices_lib
from tfscale.strategies import cluster as cluster_lib
from tfscale.strategies import exit_barrier

__all__ = [
    "initialize",
    "is_multi_client",
]

_JOB_NAME = "worker"


def is_multi_client() -> bool:
    """Whether this process is one client of several in an initialized DTensor system."""
    return compat.dtensor_initialized() and dtensor.num_clients() > 1


def initialize(cluster: Optional[cluster_lib.Cluster], device_type: Optional[str] = None) -> bool:
    """Initializes DTensor's multi-client system for a cluster of several workers.

    A cluster of one worker (or None) needs nothing and returns False.
    Calling it again after a successful initialization is a no-op.

    Args:
      cluster: the workers; each worker's address is its DTensor client's
        gRPC address, and its index the client id.
      device_type: `"CPU"` or `"GPU"`; default: GPU if the machine has one.

    Returns:
      Whether the mesh spans several clients.

    Raises:
      DevicesAlreadyInitializedError: if TensorFlow has initialized already
        (the multi-client system must come first).
    """
    if cluster is None or cluster.num_workers == 1:
        return False
    if compat.dtensor_initialized():
        return dtensor.num_clients() > 1
    if device_type is None:
        device_type = devices_lib.accelerator_type()
    os.environ["DTENSOR_JOBS"] = ",".join(cluster.workers)
    os.environ["DTENSOR_CLIENT_ID"] = str(cluster.task_index)
    os.environ["DTENSOR_JOB_NAME"] = _JOB_NAME
    try:
        dtensor.initialize_accelerator_system(device_type)
    except ValueError as e:
        if "initialized" not in str(e):
            raise
        raise devices_lib.DevicesAlreadyInitializedError(
            "A multi-client dtensor distribution must be created before TensorFlow "
            f"initializes (before any op runs). Cause: {e}"
        ) from None
    # Client 0 leads the collectives: if it exited as soon as its own part of
    # the last collective was done, a slower client could still need it.
    exit_barrier.register("tfscale_exit")
    return True
