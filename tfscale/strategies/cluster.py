"""Cluster discovery: which workers take part, and which one this process is.

Sources, tried in this order by `resolve("auto")`:

- `TF_CONFIG` (JSON): `{"cluster": {"worker": ["host:port", ...]}, "task":
  {"type": "worker", "index": i}}`, as TensorFlow defines it;
- Slurm: `SLURM_JOB_NODELIST` (e.g. `node[01-03],gpu7`), `SLURM_PROCID`,
  `SLURM_NTASKS`, `SLURM_NTASKS_PER_NODE`; ports from `TFSCALE_PORT`
  (default 29500) up, one per task on a node;
- Kubernetes Indexed Job: `JOB_COMPLETION_INDEX`, with `TFSCALE_NUM_WORKERS`,
  `TFSCALE_JOB_NAME` and `TFSCALE_SERVICE` (the headless Service): worker i
  is `<job>-<i>.<service>:<port>`;
- an explicit host list (`from_hosts`).

Example:

```python
cluster = resolve("auto")           # None on a single host without any of them
cluster.workers, cluster.task_index  # ('10.0.0.1:29500', '10.0.0.2:29500'), 1
os.environ["TF_CONFIG"] = json.dumps(cluster.tf_config())
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from typing import Any
from typing import Mapping
from typing import Optional
from typing import Sequence

__all__ = [
    "SOURCES",
    "Cluster",
    "expand_nodelist",
    "from_hosts",
    "from_kubernetes",
    "from_slurm",
    "from_tf_config",
    "free_port",
    "from_option",
    "resolve",
]

SOURCES = ("auto", "tf_config", "slurm", "kubernetes")
DEFAULT_PORT = 29500
_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The workers of a job and this process's place among them.

    Attributes:
      workers: `host:port` of each worker, by index; worker 0 is the chief.
      task_index: this process's index in `workers`.
    """

    workers: tuple[str, ...]
    task_index: int

    def __post_init__(self) -> None:
        if not self.workers:
            raise ValueError("A cluster needs at least one worker. Received: workers=()")
        for address in self.workers:
            if not _ADDRESS.match(address):
                raise ValueError(f"Worker addresses must be host:port. Received: {address!r}")
        if len(set(self.workers)) != len(self.workers):
            raise ValueError(f"Worker addresses must be distinct. Received: {list(self.workers)}")
        if not 0 <= self.task_index < len(self.workers):
            raise ValueError(
                f"task_index must be in [0, {len(self.workers)}). "
                f"Received: task_index={self.task_index}"
            )

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        return self.task_index == 0

    def tf_config(self) -> dict[str, Any]:
        """This process's TF_CONFIG."""
        return {
            "cluster": {"worker": list(self.workers)},
            "task": {"type": "worker", "index": self.task_index},
        }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for workers started on this machine).

    Example:

    ```python
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    ```
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def from_tf_config(value: Optional[str] = None) -> Optional[Cluster]:
    """The cluster in TF_CONFIG (`value`, else the environment); None if unset.

    A `chief` job, if present, becomes worker 0.

    Raises:
      ValueError: naming the TF_CONFIG field that is malformed.
    """
    raw = os.environ.get("TF_CONFIG", "") if value is None else value
    if not raw.strip():
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = _field(config, "cluster", dict, "TF_CONFIG")
    task = _field(config, "task", dict, "TF_CONFIG")
    jobs = {k: v for k, v in cluster.items() if k in ("chief", "worker")}
    unknown = sorted(set(cluster) - {"chief", "worker", "evaluator", "ps"})
    if unknown or "ps" in cluster:
        raise ValueError(
            "TF_CONFIG.cluster may hold chief and worker jobs (parameter servers are not "
            f"supported). Received jobs: {sorted(cluster)}"
        )
    for job, addresses in jobs.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError(
                f"TF_CONFIG.cluster.{job} must be a list of host:port. Received: {addresses!r}"
            )
    workers = list(jobs.get("chief", [])) + list(jobs.get("worker", []))
    task_type = _field(task, "type", str, "TF_CONFIG.task")
    index = _field(task, "index", int, "TF_CONFIG.task")
    if task_type not in jobs:
        raise ValueError(
            f"TF_CONFIG.task.type must be one of {sorted(jobs)}. Received: {task_type!r}"
        )
    if not 0 <= index < len(jobs[task_type]):
        raise ValueError(
            f"TF_CONFIG.task.index must be in [0, {len(jobs[task_type])}) for job {task_type!r}. "
            f"Received: {index}"
        )
    offset = len(jobs.get("chief", [])) if task_type == "worker" else 0
    return Cluster(tuple(workers), offset + index)


def from_slurm(env: Mapping[str, str] = os.environ) -> Optional[Cluster]:
    """The cluster of a Slurm step, one worker per task; None outside Slurm."""
    if "SLURM_PROCID" not in env or "SLURM_JOB_NODELIST" not in env:
        return None
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    ntasks = int(env.get("SLURM_NTASKS", len(hosts)))
    per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    port = int(env.get("TFSCALE_PORT", DEFAULT_PORT))
    workers = [f"{host}:{port + local}" for host in hosts for local in range(per_node)][:ntasks]
    return Cluster(tuple(workers), int(env["SLURM_PROCID"]))


def from_kubernetes(env: Mapping[str, str] = os.environ) -> Optional[Cluster]:
    """The cluster of a Kubernetes Indexed Job; None outside one.

    Raises:
      ValueError: when JOB_COMPLETION_INDEX is set but a TFSCALE_* variable is missing.
    """
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    missing = [
        k for k in ("TFSCALE_NUM_WORKERS", "TFSCALE_JOB_NAME", "TFSCALE_SERVICE") if k not in env
    ]
    if missing:
        raise ValueError(f"Kubernetes Indexed Job without {', '.join(missing)} in the environment")
    port = int(env.get("TFSCALE_PORT", DEFAULT_PORT))
    job, service = env["TFSCALE_JOB_NAME"], env["TFSCALE_SERVICE"]
    workers = tuple(f"{job}-{i}.{service}:{port}" for i in range(int(env["TFSCALE_NUM_WORKERS"])))
    return Cluster(workers, int(env["JOB_COMPLETION_INDEX"]))


def from_hosts(hosts: Sequence[str], task_index: int, port: int = DEFAULT_PORT) -> Cluster:
    """A cluster from an explicit host list; hosts without a port get `port`."""
    workers = tuple(h if ":" in h else f"{h}:{port}" for h in hosts)
    return Cluster(workers, task_index)


def resolve(source: str = "auto", env: Mapping[str, str] = os.environ) -> Optional[Cluster]:
    """The cluster from one source, or the first source found for `"auto"`.

    Raises:
      ValueError: for an unknown source, or a source named but absent.
    """
    readers = {
        "tf_config": lambda: from_tf_config(env.get("TF_CONFIG", "")),
        "slurm": lambda: from_slurm(env),
        "kubernetes": lambda: from_kubernetes(env),
    }
    if source == "auto":
        for read in readers.values():
            cluster = read()
            if cluster is not None:
                return cluster
        return None
    if source not in readers:
        raise ValueError(f"Unknown cluster source {source!r}. Valid sources: {', '.join(SOURCES)}")
    cluster = readers[source]()
    if cluster is None:
        raise ValueError(f"cluster={source!r}, but its environment variables are not set")
    return cluster


def from_option(cluster: str = "auto", task_index: Optional[int] = None) -> Optional[Cluster]:
    """The cluster a `cluster=` option names: a source in `SOURCES`, or a host list.

    Args:
      cluster: `"auto"` (TF_CONFIG, else Slurm, else a Kubernetes Indexed
        Job, else None), `"tf_config"`, `"slurm"`, `"kubernetes"`, or a
        comma-separated `host:port` list (with `task_index`).
      task_index: this process's index in an explicit host list.

    Raises:
      ValueError: for a task_index without a host list or the reverse.
    """
    if cluster in SOURCES:
        if task_index is not None:
            raise ValueError(
                f"task_index goes with an explicit host list, not cluster={cluster!r}. "
                f"Received: task_index={task_index}"
            )
        return resolve(cluster)
    if task_index is None:
        raise ValueError(f"An explicit host list needs task_index. Received: cluster={cluster!r}")
    return from_hosts([h.strip() for h in cluster.split(",") if h.strip()], task_index)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands a Slurm node list: `node[01-03,07],gpu5` -> node01 node02 node03 node07 gpu5."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            start, _, end = part.partition("-")
            width = len(start)
            for number in range(int(start), int(end or start) + 1):
                hosts.append(f"{prefix}{number:0{width}d}")
    if not hosts:
        raise ValueError(f"Empty or malformed SLURM_JOB_NODELIST: {nodelist!r}")
    return hosts


def _field(mapping: Any, name: str, kind: type, where: str) -> Any:
    if not isinstance(mapping, dict) or name not in mapping:
        raise ValueError(f"{where}.{name} is missing")
    value = mapping[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}.{name} must be a {kind.__name__}. Received: {value!r}")
    return value
