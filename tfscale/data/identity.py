"""A dispatcher worker's name, from the cluster this process belongs to.

The name registers a worker with the shard dispatcher. It must be stable
across restarts (it keeps a worker's shard affinity and lets a resumed run
rewind its own position) and unique among a job's consumers. It comes from,
in this order:

- `TFSCALE_WORKER_NAME`, if set: used as is (non-empty, at most 128
  characters, no whitespace);
- TF_CONFIG: `<task type>-<task index>`, e.g. `chief-0` or `worker-2`, the
  task as TF_CONFIG names it;
- Slurm or a Kubernetes Indexed Job (see `tfscale.strategies.cluster`):
  `worker-<task index>`, i.e. `SLURM_PROCID` or `JOB_COMPLETION_INDEX`;
- no cluster at all (a single process): `worker-0`.

This module does not import TensorFlow.

Example:

```python
from tfscale.data import identity

identity.worker_name()                              # e.g. "worker-3" under Slurm
identity.worker_name({"SLURM_JOB_NODELIST": "n[1-4]", "SLURM_PROCID": "3"})  # "worker-3"
identity.worker_name({"TFSCALE_WORKER_NAME": "eval-a"})                      # "eval-a"
```
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from tfscale.strategies import cluster as cluster_lib

__all__ = [
    "ENV_VAR",
    "MAX_LENGTH",
    "worker_name",
]

ENV_VAR = "TFSCALE_WORKER_NAME"
MAX_LENGTH = 128


def worker_name(env: Mapping[str, str] = os.environ, cluster: str = "auto") -> str:
    """This task's stable, unique name among the workers of its cluster.

    Args:
      env: the environment to read (`os.environ` by default).
      cluster: the cluster source, as for `tfscale.strategies.cluster.resolve`:
        `"auto"` (TF_CONFIG, else Slurm, else a Kubernetes Indexed Job, else
        none), `"tf_config"`, `"slurm"` or `"kubernetes"`.

    Returns:
      `TFSCALE_WORKER_NAME` if set; else `<type>-<index>` from TF_CONFIG's
      task; else `worker-<task_index>` of the resolved cluster; else
      `worker-0`.

    Raises:
      ValueError: for an invalid `TFSCALE_WORKER_NAME`, an unknown `cluster`,
        a named source whose variables are not set, or a malformed
        environment (e.g. a partial Kubernetes Indexed Job environment).
    """
    if ENV_VAR in env:
        return _validated(env[ENV_VAR])
    resolved = cluster_lib.resolve(cluster, env)
    if resolved is None:
        return "worker-0"
    if cluster in ("auto", "tf_config") and env.get("TF_CONFIG", "").strip():
        # resolve() tried TF_CONFIG first and parsed it, so its task is valid.
        # The Cluster folds a chief into worker 0; the name keeps the task type.
        task = json.loads(env["TF_CONFIG"])["task"]
        return f"{task['type']}-{task['index']}"
    return f"worker-{resolved.task_index}"


def _validated(name: str) -> str:
    if not name or len(name) > MAX_LENGTH or any(c.isspace() for c in name):
        raise ValueError(
            f"{ENV_VAR} must be a non-empty name of at most {MAX_LENGTH} characters "
            f"without whitespace. Received: {ENV_VAR}={name!r}"
        )
    return name
