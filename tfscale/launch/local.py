"""Starts a group of worker processes, each with its TF_CONFIG, and restarts it on failure.

The workers of one node are children of this process. The console shows the
output of the ranks in `log_ranks` (rank 0 by default), each line prefixed
with `[rank]`; every rank's output also goes to `<log_dir>/attempt<k>/rank<N>.log`
(k: the restart count, so a restart keeps the previous attempt's logs). A
line rewritten with carriage returns (a Keras progress bar) stays one line:
updated in place on a terminal, else printed once in its final state. When a
worker fails, the launcher names it (rank, pid, signal), shows its last lines
on stderr if the console did not show them, stops the survivors and starts
the whole group again (on fresh ports), so a training job resumes from its
last checkpoint; after `max_restarts` restarts a failure is final. SIGINT and
SIGTERM are forwarded to the workers.

Example:

```python
config = LaunchConfig(nproc_per_node=2, max_restarts=3, log_dir="/tmp/run/logs")
command = ["python", "-m", "tfscale.train", "--config=configs/default.py", "--workdir=/tmp/run",
           "--config.distribution.kind=multi_worker_mirrored"]
exit_code = launch(config, command)
```
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import threading
import time
from typing import Optional
from typing import Sequence
from typing import TextIO

from tfscale.launch import group
from tfscale.strategies import cluster as cluster_lib

__all__ = [
    "TAIL_LINES",
    "LaunchConfig",
    "launch",
    "parse_ranks",
    "rendezvous",
    "worker_addresses",
]

Ranks = group.Ranks
TAIL_LINES = group.TAIL_LINES


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
      log_ranks: global ranks whose output the console shows; None: all.
      log_dir: where every rank's output is written, as
        `attempt<k>/rank<N>.log`; None: a new temporary directory when some
        rank is not on the console, else no files.
      max_nodes: elastic launch (`--nnodes=MIN:MAX`, `nnodes` being MIN):
        nodes may join up to this many and leave down to `nnodes`; ranks
        come from the rendezvous at `master_addr` (`elastic.launch`), not
        `node_rank`. None: a fixed set of `nnodes` nodes.
      rendezvous_timeout_s: elastic: how long to wait for `nnodes` nodes.
      heartbeat_timeout_s: elastic: a node silent this long has left.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    node_hosts: tuple[str, ...] = ()
    master_addr: Optional[str] = None
    master_port: int = 29500
    max_restarts: int = 0
    stop_timeout_s: float = 10.0
    log_ranks: Ranks = (0,)
    log_dir: Optional[str] = None
    max_nodes: Optional[int] = None
    rendezvous_timeout_s: float = 300.0
    heartbeat_timeout_s: float = 10.0

    @property
    def elastic(self) -> bool:
        return self.max_nodes is not None

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(
                f"nproc_per_node must be >= 1. Received: nproc_per_node={self.nproc_per_node}"
            )
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank must be in [0, nnodes). Received: nnodes={self.nnodes}, "
                f"node_rank={self.node_rank}"
            )
        if self.elastic and (not self.master_addr or self.max_nodes < self.nnodes):
            raise ValueError(
                f"nnodes={self.nnodes}:{self.max_nodes} (elastic) needs master_addr and "
                f"MIN <= MAX. Received: master_addr={self.master_addr!r}"
            )
        if self.elastic and min(self.rendezvous_timeout_s, self.heartbeat_timeout_s) <= 0:
            raise ValueError(
                "rendezvous_timeout_s and heartbeat_timeout_s must be > 0. Received: "
                f"{self.rendezvous_timeout_s}, {self.heartbeat_timeout_s}"
            )
        if self.nnodes > 1 and not self.master_addr and len(self.node_hosts) != self.nnodes:
            raise ValueError(
                f"nnodes={self.nnodes} needs master_addr or one host per node in node_hosts. "
                f"Received: node_hosts={list(self.node_hosts)}"
            )
        if self.max_restarts < 0:
            raise ValueError(
                f"max_restarts must be >= 0. Received: max_restarts={self.max_restarts}"
            )
        world = (self.max_nodes or self.nnodes) * self.nproc_per_node
        if self.log_ranks is not None and not all(0 <= r < world for r in self.log_ranks):
            raise ValueError(
                f"log_ranks must be ranks in [0, {world}). "
                f"Received: log_ranks={list(self.log_ranks)}"
            )


def parse_ranks(value: str) -> Ranks:
    """`"all"` -> None (every rank); `"0,2"` -> (0, 2).

    Raises:
      ValueError: for anything else.
    """
    if value.strip() == "all":
        return None
    parts = [part.strip() for part in value.split(",")]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"log_ranks must be 'all' or comma-separated ranks. Received: {value!r}")
    return tuple(int(part) for part in parts)


def worker_addresses(config: LaunchConfig, node_hosts: Sequence[str] = ()) -> list[str]:
    """`host:port` of every worker of the job, by global rank.

    Args:
      config: the launch config.
      node_hosts: every node's host (default: `config.node_hosts`).
    """
    if config.nnodes == 1:
        return [f"127.0.0.1:{cluster_lib.free_port()}" for _ in range(config.nproc_per_node)]
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


def launch(
    config: LaunchConfig, command: Sequence[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Runs the worker group until it succeeds or the restart budget is spent.

    Args:
      config: the launch config.
      command: the worker command line.
      out: the console: the shown ranks' output and the launcher's news.
      err: where failures are reported, with the failed rank's last lines.

    Returns:
      0 when every worker of the last attempt exited 0, else the first
      failing worker's exit code (128 + signal for a signal).
    """
    if not command:
        raise ValueError("No command to launch: put it after `--`")
    stop = threading.Event()
    workers: list[group.Worker] = []
    console = group.Console(out, err, config.log_ranks)
    hosts = list(config.node_hosts)
    if config.nnodes > 1 and not hosts:
        hosts = rendezvous(config)
        console.say(f"rendezvous: nodes {hosts}")
    log_dir = group.make_log_dir(config.log_dir, config.log_ranks, console)
    with group.forwarding_signals(stop, workers):
        for attempt in range(config.max_restarts + 1):
            workers[:] = group.start(
                command,
                worker_addresses(config, hosts),
                config.node_rank * config.nproc_per_node,
                config.nproc_per_node,
                attempt,
                console,
                log_dir,
            )
            failed = group.wait(workers, config.stop_timeout_s)
            for worker in workers:
                worker.finish()
            if failed is None:
                return 0
            code = group.exit_code(workers[failed].process.returncode)
            if stop.is_set():
                return code
            group.report_failure(
                console,
                workers[failed],
                attempt,
                config.max_restarts,
                config.node_rank if config.nnodes > 1 else None,
            )
        return code
