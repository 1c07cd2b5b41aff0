"""Cluster manifests for a multi-worker run: Kubernetes, Kubeflow TFJob, Slurm, Marathon.

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
  and a failed step runs again up to `max_restarts` times;
- `marathon`: a Marathon group (Mesos, a retired platform: for existing
  installations) of one app per worker, each with a fixed host port
  (`port + rank`) and its own TF_CONFIG naming every worker by its Mesos-DNS
  name, `worker-<i>-<name>.marathon.mesos`; Marathon restarts a failed task
  (with backoff), and a finished one too: remove the group when done.

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
import json
import posixpath
import re
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
    "marathon",
    "slurm",
    "tfjob",
    "workdir_of",
]

FORMATS = ("kubernetes", "tfjob", "slurm", "marathon")

Document = dict[str, Any]

_VOLUME = "workdir"
# A Marathon app id segment without dots, which Mesos-DNS would turn into '-'.
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_MEMORY_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MEMORY_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


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

    def to_marathon(self) -> Document:
        """A Marathon app's `cpus`, `mem` (MiB), `disk` and `gpus`.

        Unset: 1 CPU and 4 GiB; Marathon's own default, 128 MiB, does not hold TensorFlow.
        """
        cpus = _cpus(self.cpu) if self.cpu is not None else 1.0
        mem = _mebibytes(self.memory) if self.memory is not None else 4096.0
        return {"cpus": cpus, "mem": mem, "disk": 0, "gpus": self.gpus}


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
    env = {**_worker_env(nnodes, port), "TFSCALE_JOB_NAME": name, "TFSCALE_SERVICE": name}
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
    env = _worker_env(nnodes, port)
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
    _check(nnodes, None, command, max_restarts, image_required=False)
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


def marathon(
    nnodes: int,
    image: Optional[str],
    command: Sequence[str],
    name: str = "tfscale",
    port: int = cluster_lib.DEFAULT_PORT,
    max_restarts: int = 0,
    storage: Storage = Storage(),
    resources: Resources = Resources(),
    dns_domain: str = "marathon.mesos",
) -> str:
    """A Marathon group `/<name>` of one app per worker, as JSON.

    App `/<name>/worker-<i>` runs one instance, so worker i keeps its place
    across restarts: at host port `port + i` (`requirePorts`, host
    networking), with a TF_CONFIG that names every worker by its Mesos-DNS
    name (`worker-<i>-<name>.<dns_domain>`). Marathon applies constraints
    within an app, so `hostname UNIQUE` keeps a rank's instances apart, but
    two ranks may share an agent (their ports differ). A failed task is
    started again after a growing delay, without a limit; one rank never
    runs twice at once (an upgrade stops before it starts).

    Args:
      nnodes: workers (apps).
      image: a Docker image to run the command in; None: on the agent itself.
      command: the worker command line.
      name: the group's id; lowercase letters, digits and '-'.
      port: worker 0's port, which the agents must offer (a Mesos agent
        offers 31000-32000 by default).
      max_restarts: must be 0: Marathon has no restart limit.
      storage: only `mount_path` applies: with an image, the agents' path
        (a shared file system) mounted at the same path in the container;
        default: the command's `--workdir`.
      resources: each task's `cpus`, `mem` and `gpus`.
      dns_domain: the Mesos-DNS domain of Marathon's tasks.

    Raises:
      ValueError: for a name that is not a DNS label, ports past 65535,
        `max_restarts`, a Kubernetes claim, or a `--workdir` outside the mount.
    """
    _check(nnodes, image, command, max_restarts, image_required=False)
    if max_restarts:
        raise ValueError(
            "Marathon restarts a failed task without a limit: drop --max_restarts with "
            f"--emit=marathon. Received: max_restarts={max_restarts}"
        )
    if storage.claim is not None or storage.storage_class is not None:
        raise ValueError(
            "--emit=marathon mounts a path of the agents (--mount_path), not a claim. "
            f"Received: volume_claim={storage.claim}, storage_class={storage.storage_class}"
        )
    last = f"worker-{nnodes - 1}-{name}"
    if not _DNS_LABEL.match(name) or len(last) > 63:
        raise ValueError(
            "The name must be lowercase letters, digits and '-', and worker-<i>-<name> a DNS "
            f"label (at most 63 characters). Received: name={name!r}, nnodes={nnodes}"
        )
    if not 0 < port <= 65536 - nnodes:
        raise ValueError(
            f"Ports port..port+nnodes-1 must be in [1, 65535]. Received: port={port}, "
            f"nnodes={nnodes}"
        )
    mount_path = _mount_path(storage, command)
    workers = tuple(f"worker-{i}-{name}.{dns_domain}:{port + i}" for i in range(nnodes))
    apps = [
        _marathon_app(f"/{name}/worker-{i}", image, command, port + i, resources, mount_path)
        for i in range(nnodes)
    ]
    for i, app in enumerate(apps):
        tf_config = cluster_lib.Cluster(workers, i).tf_config()
        app["env"] = {"TF_CONFIG": json.dumps(tf_config), **_worker_env(nnodes, port)}
    return json.dumps({"id": f"/{name}", "apps": apps}, indent=2) + "\n"


def emit(fmt: str, nnodes: int, image: str, command: Sequence[str], **kwargs: Any) -> str:
    """The manifest in format `fmt` (one of FORMATS)."""
    if fmt == "kubernetes":
        return kubernetes(nnodes, image, command, **kwargs)
    if fmt == "tfjob":
        return tfjob(nnodes, image, command, **kwargs)
    if fmt == "slurm":
        return slurm(nnodes, command, **kwargs)
    if fmt == "marathon":
        return marathon(nnodes, image, command, **kwargs)
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
    mount_path = _mount_path(storage, command)
    if mount_path is None:
        return None, None
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


def _mount_path(storage: Storage, command: Sequence[str]) -> Optional[str]:
    """Where the workdir's volume is mounted (None: no `--workdir`, no `mount_path`).

    Raises:
      ValueError: for a relative `--workdir`, or one outside the mount path.
    """
    workdir = workdir_of(command)
    mount_path = storage.mount_path or workdir
    if mount_path is None:
        return None
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
    return mount_path


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


def _marathon_app(
    app_id: str,
    image: Optional[str],
    command: Sequence[str],
    port: int,
    resources: Resources,
    mount_path: Optional[str],
) -> Document:
    app: Document = {
        "id": app_id,
        "cmd": shlex.join(command),
        "instances": 1,
        **resources.to_marathon(),
        "portDefinitions": [{"port": port, "protocol": "tcp", "name": "worker"}],
        "requirePorts": True,
        "constraints": [["hostname", "UNIQUE"]],
        # TensorFlow's server listens once the strategy is built, after imports and
        # start-up; a task that stops listening later is killed and started again.
        "healthChecks": [
            {
                "protocol": "MESOS_TCP",
                "portIndex": 0,
                "gracePeriodSeconds": 600,
                "intervalSeconds": 30,
                "timeoutSeconds": 10,
                "maxConsecutiveFailures": 3,
            }
        ],
        "backoffSeconds": 10,
        "backoffFactor": 1.5,
        "maxLaunchDelaySeconds": 300,
        # Kill before start: two tasks of one rank would both join the collectives.
        "upgradeStrategy": {"minimumHealthCapacity": 0, "maximumOverCapacity": 0},
    }
    if image:
        app["container"] = {
            # Marathon gives GPUs to the Mesos containerizer only, which runs Docker images too.
            "type": "MESOS" if resources.gpus else "DOCKER",
            "docker": {"image": image},
        }
        if mount_path is not None:
            volume = {"containerPath": mount_path, "hostPath": mount_path, "mode": "RW"}
            app["container"]["volumes"] = [volume]
    return app


def _worker_env(nnodes: int, port: int) -> dict[str, str]:
    """The environment every emitted worker gets, besides its way to find its peers."""
    return {"TFSCALE_NUM_WORKERS": str(nnodes), "TFSCALE_PORT": str(port), "PYTHONUNBUFFERED": "1"}


def _cpus(value: str) -> float:
    """Kubernetes CPUs ("8", "1.5", "500m") as a number of CPUs."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", value)
    if match is None:
        raise ValueError(f"cpu must be a number of CPUs or millicores. Received: cpu={value!r}")
    return float(match.group(1)) / (1000 if match.group(2) else 1)


def _mebibytes(value: str) -> float:
    """A Kubernetes memory quantity ("32Gi", "512Mi", "4G", bytes) in MiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kKMGT]?)", value)
    if match is None:
        raise ValueError(f"memory must be like 32Gi or 512Mi. Received: memory={value!r}")
    number, unit = match.groups()
    return float(number) * _MEMORY_UNITS[unit] / 2**20


def _check(
    nnodes: int,
    image: Optional[str],
    command: Sequence[str],
    max_restarts: int,
    image_required: bool = True,
) -> None:
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1. Received: nnodes={nnodes}")
    if image_required and not image:
        raise ValueError("A container image is needed: --image=IMAGE")
    if not command:
        raise ValueError("No command to run: put it after `--`")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0. Received: max_restarts={max_restarts}")
