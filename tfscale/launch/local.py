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
    "worker_addresses",
]


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How to launch the workers.

    Attributes:
      nproc_per_node: worker processes on each node.
      nnodes: nodes taking part.
      node_rank: this node's index.
      node_hosts: every node's host name or address, by rank (needed when
        nnodes > 1; one node: loopback).
      master_port: first port of the workers on each node when nnodes > 1
        (worker r of a node listens on master_port + r); one node: free ports.
      max_restarts: group restarts allowed after failures.
      stop_timeout_s: grace between SIGTERM and SIGKILL when stopping workers.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    node_hosts: tuple[str, ...] = ()
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
        if self.nnodes > 1 and len(self.node_hosts) != self.nnodes:
            raise ValueError(
                f"nnodes={self.nnodes} needs one host per node in node_hosts. "
                f"Received: node_hosts={list(self.node_hosts)}"
            )
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0. Received: max_restarts={self.max_restarts}")


def worker_addresses(config: LaunchConfig) -> list[str]:
    """`host:port` of every worker of the job, by global rank."""
    if config.nnodes == 1:
        return [f"127.0.0.1:{_free_port()}" for _ in range(config.nproc_per_node)]
    return [
        f"{host}:{config.master_port + local}"
        for host in config.node_hosts
        for local in range(config.nproc_per_node)
    ]


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
            group[:] = _start(config, command, attempt, out)
            code = _wait(group, config.stop_timeout_s)
            if code == 0 or stop.is_set():
                return code
            _say(out, f"a worker failed with exit code {code}")
        return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start(
    config: LaunchConfig, command: Sequence[str], attempt: int, out: TextIO
) -> list[subprocess.Popen]:
    workers = worker_addresses(config)
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
