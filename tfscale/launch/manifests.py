"""Cluster manifests for a multi-worker run: Kubernetes, Kubeflow TFJob, Slurm.

Each worker finds its peers from what the manifest sets up, through
`tfscale.strategies.cluster` (`cluster="auto"`):

- `kubernetes`: a headless Service plus an Indexed Job (no operator needed);
  pod i is `<name>-<i>.<name>` and gets JOB_COMPLETION_INDEX and TFSCALE_*;
- `tfjob`: a Kubeflow TFJob; the operator sets TF_CONFIG;
- `slurm`: an sbatch script; `srun` sets SLURM_PROCID and the node list.

Example:

```python
print(kubernetes(nnodes=4, image="registry/train:1", command=["tfscale-train", "..."]))
```
"""

from __future__ import annotations

import shlex
from typing import Any, Sequence

import yaml

from tfscale.strategies import cluster as cluster_lib

__all__ = [
    "FORMATS",
    "emit",
    "kubernetes",
    "slurm",
    "tfjob",
]

FORMATS = ("kubernetes", "tfjob", "slurm")


def kubernetes(
    nnodes: int, image: str, command: Sequence[str], name: str = "tfscale",
    port: int = cluster_lib.DEFAULT_PORT,
) -> str:
    """A headless Service and an Indexed Job of `nnodes` worker pods, as YAML."""
    _check(nnodes, image, command)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "clusterIP": "None",
            "selector": {"job-name": name},
            "ports": [{"name": "worker", "port": port}],
        },
    }
    env = {
        "TFSCALE_NUM_WORKERS": str(nnodes),
        "TFSCALE_JOB_NAME": name,
        "TFSCALE_SERVICE": name,
        "TFSCALE_PORT": str(port),
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": nnodes,
            "parallelism": nnodes,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "subdomain": name,
                    "restartPolicy": "Never",
                    "containers": [_container(image, command, port, env)],
                }
            },
        },
    }
    return yaml.safe_dump_all([service, job], sort_keys=False)


def tfjob(nnodes: int, image: str, command: Sequence[str], name: str = "tfscale") -> str:
    """A Kubeflow TFJob with `nnodes` workers, as YAML (the operator sets TF_CONFIG)."""
    _check(nnodes, image, command)
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {"name": name},
        "spec": {
            "tfReplicaSpecs": {
                "Worker": {
                    "replicas": nnodes,
                    "restartPolicy": "OnFailure",
                    "template": {
                        "spec": {"containers": [{**_container(image, command, None, {}), "name": "tensorflow"}]}
                    },
                }
            }
        },
    }
    return yaml.safe_dump(job, sort_keys=False)


def slurm(
    nnodes: int, command: Sequence[str], nproc_per_node: int = 1, name: str = "tfscale",
    time_limit: str = "01:00:00", port: int = cluster_lib.DEFAULT_PORT,
) -> str:
    """An sbatch script running one worker per task on `nnodes` nodes."""
    _check(nnodes, "-", command)
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name={name}",
            f"#SBATCH --nodes={nnodes}",
            f"#SBATCH --ntasks-per-node={nproc_per_node}",
            f"#SBATCH --time={time_limit}",
            "set -euo pipefail",
            "# Each task finds its peers from SLURM_JOB_NODELIST and SLURM_PROCID.",
            f"export TFSCALE_PORT={port}",
            f"srun {shlex.join(command)}",
            "",
        ]
    )


def emit(fmt: str, nnodes: int, image: str, command: Sequence[str], **kwargs: Any) -> str:
    """The manifest in format `fmt` (one of FORMATS)."""
    if fmt == "kubernetes":
        return kubernetes(nnodes, image, command, **kwargs)
    if fmt == "tfjob":
        return tfjob(nnodes, image, command, **kwargs)
    if fmt == "slurm":
        return slurm(nnodes, command, **kwargs)
    raise ValueError(f"Unknown manifest format {fmt!r}. Valid formats: {', '.join(FORMATS)}")


def _container(image: str, command: Sequence[str], port: Any, env: dict[str, str]) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "worker", "image": image, "command": list(command)}
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if port is not None:
        container["ports"] = [{"containerPort": port}]
    return container


def _check(nnodes: int, image: str, command: Sequence[str]) -> None:
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1. Received: nnodes={nnodes}")
    if not image:
        raise ValueError("A container image is needed: --image=IMAGE")
    if not command:
        raise ValueError("No command to run: put it after `--`")
