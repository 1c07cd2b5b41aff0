"""Starts a group of worker processes, each with its TF_CONFIG, and restarts it on failure.

The workers of one node are children of this process; their output lines
are prefixed with `[rank]`. When a worker fails, the survivors are stopped
and the whole group starts again (on fresh ports), so a training job resumes
from its last checkpoint; after `max_restarts` restarts a failure is final.
SIGINT and SIGTERM are forwarded to the workers.

Example:

```python
config = LaunchConfig(nproc_per_node=2, max_restarts=3)
exit_code = launch(config, ["python", "-m", "tfscale.train", "--config=configs/default.py",
                            "--workdir=/tmp/run", "--config.distribution.kind=multi_worker_mirrored"])
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence, TextIO

__all__ = [
    "LaunchConfig",
    "launch",
    "rendezvous",
    "worker_addresses",
]


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How to launch the workers.

    Attributes:
      nproc_per_node: worker processes on each node.
      nnodes: nodes taking part.
      node_rank: this node's index.
      node_hosts: every node's host name or address, by rank; with nnodes > 1
        and none given, the nodes find each other through `master_addr`.
      master_addr: host of node 0, where the other nodes' launchers meet
        (rendezvous on `master_port`) when `node_hosts` is not given.
      master_port: with nnodes > 1, the rendezvous port; the worker of
        global rank r listens on master_port + 1 + r. One node: free ports.
      max_restarts: group restarts allowed after failures.
      stop_timeout_s: grace between SIGTERM and SIGKILL when stopping workers.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    node_hosts: tuple[str, ...] = ()
    master_addr: Optional[str] = None
    master_port: int = 29500
    max_restarts: int = 0
    stop_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1. Received: nproc_per_node={self.nproc_per_node}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank must be in [0, nnodes). Received: nnodes={self.nnodes}, "
                f"node_rank={self.node_rank}"
            )
        if self.nnodes > 1 and not self.master_addr and len(self.node_hosts) != self.nnodes:
            raise ValueError(
                f"nnodes={self.nnodes} needs master_addr or one host per node in node_hosts. "
                f"Received: node_hosts={list(self.node_hosts)}"
            )
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0. Received: max_restarts={self.max_restarts}")


def worker_addresses(config: LaunchConfig, node_hosts: Sequence[str] = ()) -> list[str]:
    """`host:port` of every worker of the job, by global rank.

    Args:
      config: the launch config.
      node_hosts: every node's host (default: `config.node_hosts`).
    """
    if config.nnodes == 1:
        return [f"127.0.0.1:{_free_port()}" for _ in range(config.nproc_per_node)]
    hosts = list(node_hosts or config.node_hosts)
    return [
        f"{host}:{config.master_port + 1 + node * config.nproc_per_node + local}"
        for node, host in enumerate(hosts)
        for local in range(config.nproc_per_node)
    ]


def rendezvous(config: LaunchConfig, timeout_s: float = 300.0) -> list[str]:
    """Every node's host, by rank, exchanged through node 0 at master_addr:master_port.

    Node 0 listens; every other node connects and says its rank; a node's
    host is the address node 0 sees it connect from (node 0's is
    master_addr). Every node gets the full list back.
    """
    if config.node_rank == 0:
        return _rendezvous_serve(config, timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((config.master_addr, config.master_port), timeout=5) as s:
                s.sendall(json.dumps({"node_rank": config.node_rank}).encode() + b"\n")
                return json.loads(s.makefile().readline())["hosts"]
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"No rendezvous at {config.master_addr}:{config.master_port} "
                    f"after {timeout_s:.0f}s (is node 0 up?)"
                ) from None
            time.sleep(0.5)


def _rendezvous_serve(config: LaunchConfig, timeout_s: float) -> list[str]:
    hosts: dict[int, str] = {0: config.master_addr}
    peers = []
    with socket.create_server((config.master_addr, config.master_port), reuse_port=False) as server:
        server.settimeout(timeout_s)
        while len(hosts) < config.nnodes:
            connection, (address, _) = server.accept()
            rank = json.loads(connection.makefile().readline())["node_rank"]
            if not 0 < rank < config.nnodes or rank in hosts:
                connection.close()
                raise ValueError(f"Rendezvous: unexpected node_rank={rank} from {address}")
            hosts[rank] = address
            peers.append(connection)
        ordered = [hosts[rank] for rank in range(config.nnodes)]
        for connection in peers:
            with connection:
                connection.sendall(json.dumps({"hosts": ordered}).encode() + b"\n")
    return ordered


def launch(config: LaunchConfig, command: Sequence[str], out: TextIO = sys.stdout) -> int:
    """Runs the worker group until it succeeds or the restart budget is spent.

    Returns:
      0 when every worker of the last attempt exited 0, else the first
      failing worker's exit code (128 + signal for a signal).
    """
    if not command:
        raise ValueError("No command to launch: put it after `--`")
    stop = threading.Event()
    group: list[subprocess.Popen] = []
    hosts = list(config.node_hosts)
    if config.nnodes > 1 and not hosts:
        hosts = rendezvous(config)
        _say(out, f"rendezvous: nodes {hosts}")

    def forward(signum: int, frame: object) -> None:
        stop.set()
        for process in group:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for attempt in range(config.max_restarts + 1):
            if attempt:
                _say(out, f"restarting the worker group ({attempt}/{config.max_restarts})")
            group[:] = _start(config, command, attempt, hosts, out)
            code = _wait(group, config.stop_timeout_s)
            if code == 0 or stop.is_set():
                return code
            _say(out, f"a worker failed with exit code {code}")
        return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start(
    config: LaunchConfig, command: Sequence[str], attempt: int, hosts: Sequence[str], out: TextIO
) -> list[subprocess.Popen]:
    workers = worker_addresses(config, hosts)
    group = []
    for local in range(config.nproc_per_node):
        rank = config.node_rank * config.nproc_per_node + local
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(tf_config),
            TFSCALE_RANK=str(rank),
            TFSCALE_LOCAL_RANK=str(local),
            TFSCALE_WORLD_SIZE=str(len(workers)),
            TFSCALE_RESTART=str(attempt),
        )
        # Lines reach the prefixer as they are printed, and none is lost in
        # a buffer when a failed group is stopped.
        env.setdefault("PYTHONUNBUFFERED", "1")
        process = subprocess.Popen(
            list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1,
        )
        threading.Thread(target=_prefix, args=(process, rank, out), daemon=True).start()
        group.append(process)
    return group


def _wait(group: list[subprocess.Popen], stop_timeout_s: float) -> int:
    """Waits until all exit 0, or one fails (then stops the others)."""
    while True:
        codes = [p.poll() for p in group]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _stop(group, stop_timeout_s)
            return _exit_code(failed[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


def _stop(group: list[subprocess.Popen], timeout_s: float) -> None:
    for process in group:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in group:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _prefix(process: subprocess.Popen, rank: int, out: TextIO) -> None:
    for line in process.stdout:
        out.write(f"[{rank}] {line}")
        out.flush()


def _say(out: TextIO, message: str) -> None:
    out.write(f"[tfscale-launch] {message}\n")
    out.flush()


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
