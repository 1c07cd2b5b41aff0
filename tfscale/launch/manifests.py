"""Cluster manifests for a multi-worker run: Kubernetes, Kubeflow TFJob, Slurm.

Each worker finds its peers from what the manifest sets up, through
`tfscale.strategies.cluster` (`cluster="auto"`):

- `kubernetes`: a PersistentVolumeClaim for the workdir (unless an existing
  claim is named), a headless Service and an Indexed Job (no operator
  needed); pod i is `<name>-<i>.<name>` and gets JOB_COMPLETION_INDEX and
  TFSCALE_*; each worker's pod is replaced up to `max_restarts` times
  (`backoffLimitPerIndex`, Kubernetes >= 1.29);
- `tfjob`: a Kubeflow TFJob; the operator sets TF_CONFIG from the
  `tfjob-port` container port; workers restart in place (`OnFailure`);
- `slurm`: an sbatch script; `srun` sets SLURM_PROCID and the node list,
  and a failed step runs again up to `max_restarts` times.

A worker that fails stops the collective ops of the others, which fail
too, so one failure uses one restart of every worker; the workdir on the
claim keeps the checkpoints the restarted workers resume from.

Example:

```python
print(kubernetes(nnodes=4, image="registry/train:1", max_restarts=3,
                 command=["tfscale-train", "--workdir=/out", "..."],
                 resources=Resources(cpu="8", memory="32Gi", gpus=1)))
```
"""

from __future__ import annotations

import dataclasses
import posixpath
import shlex
from typing import Any
from typing import Optional
from typing import Sequence

import yaml

from tfscale.strategies import cluster as cluster_lib

__all__ = [
    "FORMATS",
    "Resources",
    "Storage",
    "emit",
    "kubernetes",
    "slurm",
    "tfjob",
    "workdir_of",
]

FORMATS = ("kubernetes", "tfjob", "slurm")

Document = dict[str, Any]

_VOLUME = "workdir"


@dataclasses.dataclass(frozen=True)
class Storage:
    """The volume that holds the workdir in Kubernetes manifests.

    Attributes:
      claim: an existing PersistentVolumeClaim to mount; None: emit a claim
        named `<name>-workdir`.
      size: the emitted claim's size.
      storage_class: the emitted claim's storage class; None: the cluster's
        default. Every worker mounts the claim (ReadWriteMany).
      mount_path: where the claim is mounted; None: the command's `--workdir`.
    """

    claim: Optional[str] = None
    size: str = "10Gi"
    storage_class: Optional[str] = None
    mount_path: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mount_path is not None and not posixpath.isabs(self.mount_path):
            raise ValueError(
                f"mount_path must be an absolute path. Received: mount_path={self.mount_path!r}"
            )


@dataclasses.dataclass(frozen=True)
class Resources:
    """What each worker pod asks for (requests equal limits).

    Attributes:
      cpu: CPUs, e.g. "8" or "500m"; None: unset.
      memory: memory, e.g. "32Gi"; None: unset.
      gpus: `nvidia.com/gpu` per worker.
    """

    cpu: Optional[str] = None
    memory: Optional[str] = None
    gpus: int = 0

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0. Received: gpus={self.gpus}")

    def to_kubernetes(self) -> Document:
        """The container's `resources`, empty when nothing is asked for."""
        amounts = {"cpu": self.cpu, "memory": self.memory, "nvidia.com/gpu": self.gpus or None}
        amounts = {k: str(v) for k, v in amounts.items() if v is not None}
        return {"requests": amounts, "limits": dict(amounts)} if amounts else {}


def kubernetes(
    nnodes: int,
    image: str,
    command: Sequence[str],
    name: str = "tfscale",
    port: int = cluster_lib.DEFAULT_PORT,
    max_restarts: int = 0,
    storage: Storage = Storage(),
    resources: Resources = Resources(),
) -> str:
    """A claim for the workdir, a headless Service and an Indexed Job of `nnodes` pods, as YAML.

    Args:
      nnodes: worker pods.
      image: their container image.
      command: the worker command line.
      name: the Job's and the Service's name.
      port: the port each worker listens on.
      max_restarts: replacements of each worker's pod after failures.
      storage: the workdir's volume.
      resources: each pod's resources.

    Raises:
      ValueError: for a missing image or command, or a `--workdir` outside
        the mounted volume.
    """
    _check(nnodes, image, command, max_restarts)
    claim, volume = _volume(name, storage, command)
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
        "PYTHONUNBUFFERED": "1",
    }
    port_spec = {"name": "worker", "containerPort": port}
    container = _container("worker", image, command, port_spec, env, resources, volume)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": nnodes,
            "parallelism": nnodes,
            "backoffLimitPerIndex": max_restarts,
            "maxFailedIndexes": 0,
            # Where backoffLimitPerIndex is unknown (Kubernetes < 1.29), the same
            # budget for the whole Job.
            "backoffLimit": max_restarts * nnodes,
            "template": {"spec": _pod(container, volume, restart_policy="Never", subdomain=name)},
        },
    }
    return yaml.safe_dump_all([d for d in (claim, service, job) if d], sort_keys=False)


def tfjob(
    nnodes: int,
    image: str,
    command: Sequence[str],
    name: str = "tfscale",
    port: int = cluster_lib.DEFAULT_PORT,
    max_restarts: int = 0,
    storage: Storage = Storage(),
    resources: Resources = Resources(),
) -> str:
    """A Kubeflow TFJob with `nnodes` workers (the operator sets TF_CONFIG), as YAML.

    Args and Raises: as `kubernetes`; the Job's `runPolicy.backoffLimit`
    counts the restarts of all workers, `max_restarts` of each.
    """
    _check(nnodes, image, command, max_restarts)
    claim, volume = _volume(name, storage, command)
    env = {"TFSCALE_NUM_WORKERS": str(nnodes), "TFSCALE_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    # The operator reads the port named tfjob-port into TF_CONFIG.
    port_spec = {"name": "tfjob-port", "containerPort": port}
    container = _container("tensorflow", image, command, port_spec, env, resources, volume)
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {"name": name},
        "spec": {
            "runPolicy": {"backoffLimit": max_restarts * nnodes},
            "tfReplicaSpecs": {
                "Worker": {
                    "replicas": nnodes,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": _pod(container, volume)},
                }
            },
        },
    }
    return yaml.safe_dump_all([d for d in (claim, job) if d], sort_keys=False)


def slurm(
    nnodes: int,
    command: Sequence[str],
    nproc_per_node: int = 1,
    name: str = "tfscale",
    time_limit: str = "01:00:00",
    port: int = cluster_lib.DEFAULT_PORT,
    max_restarts: int = 0,
    gpus: int = 0,
) -> str:
    """An sbatch script running one worker per task on `nnodes` nodes.

    A failed task ends the step (`--kill-on-bad-exit`), and the step runs
    again, up to `max_restarts` times, with TFSCALE_RESTART set; the workdir
    is expected on a shared file system.
    """
    _check(nnodes, "-", command, max_restarts)
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0. Received: gpus={gpus}")
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name={name}",
            f"#SBATCH --nodes={nnodes}",
            f"#SBATCH --ntasks-per-node={nproc_per_node}",
            *([f"#SBATCH --gpus-per-task={gpus}"] if gpus else []),
            f"#SBATCH --time={time_limit}",
            "set -uo pipefail",
            "# Each task finds its peers from SLURM_JOB_NODELIST and SLURM_PROCID.",
            f"export TFSCALE_PORT={port}",
            f"for TFSCALE_RESTART in $(seq 0 {max_restarts}); do",
            "  export TFSCALE_RESTART",
            f"  srun --kill-on-bad-exit=1 {shlex.join(command)}",
            "  code=$?",
            '  [ "$code" -eq 0 ] && exit 0',
            f'  echo "[tfscale] attempt $((TFSCALE_RESTART + 1)) of {max_restarts + 1} failed'
            ' with exit code $code" >&2',
            "done",
            'exit "$code"',
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


def workdir_of(command: Sequence[str]) -> Optional[str]:
    """The value of `--workdir` in a command line (`--workdir=D` or `--workdir D`), else None."""
    for i, arg in enumerate(command):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
    return None


def _volume(
    name: str, storage: Storage, command: Sequence[str]
) -> tuple[Optional[Document], Optional[Document]]:
    """The claim to emit (None for an existing one) and the volume to mount (None: none)."""
    workdir = workdir_of(command)
    mount_path = storage.mount_path or workdir
    if mount_path is None:
        return None, None
    mount_path = posixpath.normpath(mount_path)
    if not posixpath.isabs(mount_path):
        raise ValueError(
            f"--workdir must be an absolute path in the pod. Received: --workdir={workdir}"
        )
    if workdir is not None and not _inside(workdir, mount_path):
        raise ValueError(
            f"--workdir must be inside the volume mounted at {mount_path}, or checkpoints die "
            f"with the pod. Received: --workdir={workdir}"
        )
    claim_name = storage.claim or f"{name}-{_VOLUME}"
    volume = {"name": _VOLUME, "claimName": claim_name, "mountPath": mount_path}
    if storage.claim is not None:
        return None, volume
    spec: Document = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class:
        spec["storageClassName"] = storage.storage_class
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim_name},
        "spec": spec,
    }
    return claim, volume


def _inside(path: str, directory: str) -> bool:
    path = posixpath.normpath(path)
    return posixpath.isabs(path) and posixpath.commonpath([path, directory]) == directory


def _pod(
    container: Document,
    volume: Optional[Document],
    restart_policy: Optional[str] = None,
    subdomain: Optional[str] = None,
) -> Document:
    pod: Document = {}
    if subdomain is not None:
        pod["subdomain"] = subdomain
    if restart_policy is not None:
        pod["restartPolicy"] = restart_policy
    pod["containers"] = [container]
    if volume is not None:
        claim = {"claimName": volume["claimName"]}
        pod["volumes"] = [{"name": volume["name"], "persistentVolumeClaim": claim}]
    return pod


def _container(
    name: str,
    image: str,
    command: Sequence[str],
    port: Document,
    env: dict[str, str],
    resources: Resources,
    volume: Optional[Document],
) -> Document:
    container: Document = {
        "name": name,
        "image": image,
        "command": list(command),
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [port],
    }
    if resources.to_kubernetes():
        container["resources"] = resources.to_kubernetes()
    if volume is not None:
        container["volumeMounts"] = [{"name": volume["name"], "mountPath": volume["mountPath"]}]
    return container


def _check(nnodes: int, image: str, command: Sequence[str], max_restarts: int) -> None:
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1. Received: nnodes={nnodes}")
    if not image:
        raise ValueError("A container image is needed: --image=IMAGE")
    if not command:
        raise ValueError("No command to run: put it after `--`")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0. Received: max_restarts={max_restarts}")
