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

import codecs
import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator
from typing import Optional
from typing import Sequence
from typing import TextIO

from tfscale import processes
from tfscale.strategies import cluster as cluster_lib

__all__ = [
    "TAIL_LINES",
    "LaunchConfig",
    "launch",
    "parse_ranks",
    "rendezvous",
    "worker_addresses",
]

Ranks = Optional[tuple[int, ...]]

# Lines of a failed worker that the console did not show, printed on stderr.
TAIL_LINES = 40
_CONTROL = re.compile(r"([\r\n\b])")
_CLEAR_LINE = "\r\x1b[K"


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
    group: list[_Worker] = []
    console = _Console(out, err, config.log_ranks)
    hosts = list(config.node_hosts)
    if config.nnodes > 1 and not hosts:
        hosts = rendezvous(config)
        console.say(f"rendezvous: nodes {hosts}")
    log_dir = _log_dir(config, console)
    with _forwarding_signals(stop, group):
        for attempt in range(config.max_restarts + 1):
            group[:] = _start(config, command, attempt, hosts, console, log_dir)
            failed = _wait([w.process for w in group], config.stop_timeout_s)
            for worker in group:
                worker.finish()
            if failed is None:
                return 0
            code = _exit_code(group[failed].process.returncode)
            if stop.is_set():
                return code
            _report(console, config, group[failed], attempt)
        return code


def _log_dir(config: LaunchConfig, console: "_Console") -> Optional[str]:
    """Where every rank's output goes (made, and said on the console); None: nowhere."""
    log_dir = config.log_dir
    if log_dir is None and config.log_ranks is not None:
        log_dir = tempfile.mkdtemp(prefix="tfscale-launch-")
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        console.say(
            f"console: {_ranks_text(config.log_ranks)}; every rank's output: "
            f"{log_dir}/attempt<k>/rank<N>.log"
        )
    return log_dir


@contextlib.contextmanager
def _forwarding_signals(stop: threading.Event, group: list["_Worker"]) -> Iterator[None]:
    """While inside: SIGINT and SIGTERM set `stop` and go on to the group's live workers."""

    def forward(signum: int, frame: object) -> None:
        stop.set()
        for worker in group:
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start(
    config: LaunchConfig,
    command: Sequence[str],
    attempt: int,
    hosts: Sequence[str],
    console: _Console,
    log_dir: Optional[str],
) -> list[_Worker]:
    workers = worker_addresses(config, hosts)
    group = []
    for local in range(config.nproc_per_node):
        rank = config.node_rank * config.nproc_per_node + local
        tf_config = cluster_lib.Cluster(tuple(workers), rank).tf_config()
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(tf_config),
            TFSCALE_RANK=str(rank),
            TFSCALE_LOCAL_RANK=str(local),
            TFSCALE_WORLD_SIZE=str(len(workers)),
            TFSCALE_RESTART=str(attempt),
        )
        # Output reaches the console as it is printed, and none is lost in a
        # buffer when a failed group is stopped.
        env.setdefault("PYTHONUNBUFFERED", "1")
        # A launcher killed with SIGKILL must not leave workers holding its ports
        # (SIGKILL: a worker's SIGTERM checkpoint can wait forever on lost peers).
        process = subprocess.Popen(
            processes.parent_death_prefix(signal.SIGKILL) + list(command),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,
        )
        log = os.path.join(log_dir, f"attempt{attempt}", f"rank{rank}.log") if log_dir else None
        group.append(_Worker(process, rank, local, console, log))
    return group


def _wait(processes: list[subprocess.Popen], stop_timeout_s: float) -> Optional[int]:
    """Waits until all exit 0 (None), or one fails: stops the others, returns its index."""
    while True:
        codes = [p.poll() for p in processes]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            _stop(processes, stop_timeout_s)
            return failed[0]
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.1)


def _stop(processes: list[subprocess.Popen], timeout_s: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _report(console: _Console, config: LaunchConfig, worker: _Worker, attempt: int) -> None:
    """Says which worker failed, how, and what happens next; shows its last lines if hidden."""
    node = f"node {config.node_rank}, " if config.nnodes > 1 else ""
    verdict = (
        f"restarting the worker group (restart {attempt + 1} of {config.max_restarts})"
        if attempt < config.max_restarts
        else f"giving up after {attempt} of {config.max_restarts} restarts"
    )
    who = f"rank {worker.rank} ({node}local rank {worker.local_rank}, pid {worker.process.pid})"
    lines = [f"{who} failed with {_describe(worker.process.returncode)}; {verdict}"]
    if not console.shows(worker.rank):
        where = f" (all of it: {worker.log_path})" if worker.log_path else ""
        lines.append(f"last {len(worker.tail)} lines of rank {worker.rank}{where}:")
    console.say("\n".join(lines), error=True)
    if not console.shows(worker.rank):
        console.write_error("".join(f"[{worker.rank}] {line}\n" for line in worker.tail))


class _Worker:
    """One worker process and the thread that carries its output to the console and its log."""

    def __init__(
        self,
        process: subprocess.Popen,
        rank: int,
        local_rank: int,
        console: _Console,
        log_path: Optional[str],
    ) -> None:
        self.process = process
        self.rank = rank
        self.local_rank = local_rank
        self.log_path = log_path
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._console = console
        self._log: Optional[TextIO] = None
        if log_path:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            self._log = open(log_path, "w", encoding="utf-8")
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def finish(self, timeout_s: float = 5.0) -> None:
        """Waits for the last output and closes the log.

        Not forever: a grandchild of the worker may hold the pipe open.
        """
        self._thread.join(timeout_s)
        if self._log is not None and not self._thread.is_alive():
            self._log.close()

    def _pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffer = _LineBuffer()
        live = self._console.tty and self._console.shows(self.rank)
        while True:
            chunk = self.process.stdout.read(65536)
            for line in buffer.feed(decoder.decode(chunk, final=not chunk)):
                self._line(line)
            if not chunk:
                break
            if live and buffer.pending:
                self._console.partial(self.rank, buffer.pending)
        if buffer.pending:
            self._line(buffer.pending)
        self.process.stdout.close()

    def _line(self, line: str) -> None:
        self.tail.append(line)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        if self._console.shows(self.rank):
            self._console.line(self.rank, line)


class _LineBuffer:
    """Cuts text into lines as a terminal shows them: `\\r` restarts the line, `\\b` erases."""

    def __init__(self) -> None:
        self.pending = ""
        self._carriage = False

    def feed(self, text: str) -> list[str]:
        """Takes more text; returns the lines it completed."""
        lines = []
        for piece in _CONTROL.split(text):
            if piece == "\n":
                lines.append(self.pending)
                self.pending, self._carriage = "", False
            elif piece == "\r":
                self._carriage = True
            elif piece == "\b":
                if not self._carriage:
                    self.pending = self.pending[:-1]
            elif piece:
                if self._carriage:
                    self.pending, self._carriage = "", False
                self.pending += piece
        return lines


class _Console:
    """The launcher's terminal, shared by the workers' threads and the launcher.

    On a terminal, one unfinished line (the latest progress bar) is kept at
    the bottom and rewritten in place; other output is written above it.
    """

    def __init__(self, out: TextIO, err: TextIO, ranks: Ranks) -> None:
        self.tty = _isatty(out)
        self._out = out
        self._err = err
        self._ranks = None if ranks is None else frozenset(ranks)
        self._lock = threading.Lock()
        self._live: Optional[tuple[int, str]] = None

    def shows(self, rank: int) -> bool:
        return self._ranks is None or rank in self._ranks

    def line(self, rank: int, text: str) -> None:
        with self._lock:
            # The rank's finished line takes the place of its live one.
            ends_live = self._live is not None and self._live[0] == rank
            self._write(self._out, f"[{rank}] {text}\n", redraw=not ends_live)
            if ends_live:
                self._live = None

    def partial(self, rank: int, text: str) -> None:
        with self._lock:
            self._live = (rank, text)
            self._out.write(f"{_CLEAR_LINE}[{rank}] {text}")
            self._out.flush()

    def say(self, message: str, error: bool = False) -> None:
        """A message from the launcher, `[tfscale-launch]` before each line."""
        text = "".join(f"[tfscale-launch] {line}\n" for line in message.splitlines())
        with self._lock:
            self._write(self._err if error else self._out, text)

    def write_error(self, text: str) -> None:
        with self._lock:
            self._write(self._err, text)

    def _write(self, stream: TextIO, text: str, redraw: bool = True) -> None:
        """Writes above the live line: clears it, writes, draws it again."""
        if self._live is not None:
            self._out.write(_CLEAR_LINE)
            self._out.flush()
        stream.write(text)
        stream.flush()
        if self._live is not None and redraw:
            self._out.write(f"[{self._live[0]}] {self._live[1]}")
            self._out.flush()


def _ranks_text(ranks: Ranks) -> str:
    if ranks is None:
        return "all ranks"
    return f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}"


def _describe(returncode: int) -> str:
    """`exit code 137 (killed by SIGKILL)`, from a Popen return code."""
    if returncode < 0:
        return f"exit code {128 - returncode} (killed by {_signal_name(-returncode)})"
    if returncode > 128 and _signal_name(returncode - 128).startswith("SIG"):
        return f"exit code {returncode} (128 + {_signal_name(returncode - 128)})"
    return f"exit code {returncode}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code
