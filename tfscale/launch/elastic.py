"""Elastic launch: `tfscale-launch --nnodes=MIN:MAX`, nodes joining and leaving a running job.

Every node's launcher joins a rendezvous at `master_addr:master_port`; the
launcher that can bind that address (the one on the master host, the first
started there) serves it. The rendezvous keeps the members, each kept alive
by a heartbeat, and numbers **rounds**: a round is the ordered list of
nodes that train together, at most MAX, first come first in. A new round
begins when

- MIN nodes are there (the first round, after `settle_s` for latecomers),
- a node joins while the round has fewer than MAX,
- a member leaves (its launcher stopped, or silent for `heartbeat_timeout_s`),
- a node reports a failed worker (a restart: counted against `max_restarts`;
  past it, the job ends on every node with that worker's exit code).

A round's member that leaves when fewer than MIN would be left ends the
round with none: the others stop their workers and wait for nodes again.

Every launcher learns the new round in its next heartbeat, stops its
workers (SIGTERM: a worker whose peers are all alive checkpoints at its next
step boundary; after a loss, SIGKILL follows within a second, as its
collectives wait on the lost peer), says it is ready, and once every node of the round is ready
starts them again with the round's ranks and world size
(`TF_CONFIG`, `TFSCALE_RANK`, `TFSCALE_WORLD_SIZE`; `TFSCALE_RESTART` is the
round number), so all nodes restart together, within a heartbeat and a
worker stop of the change. Training resumes from its latest checkpoint with
the config's resize rule. The worker of global rank r listens on
`master_port + 1 + r` of its node's host. A launcher that cannot see MIN
nodes within `rendezvous_timeout_s` fails, naming the nodes that are there.

Protocol: one JSON request per TCP connection, one JSON answer.

Example:

```python
config = local.LaunchConfig(nnodes=2, max_nodes=3, master_addr="10.0.0.1", master_port=29500)
exit_code = launch(config, ["tfscale-train", "--config=configs/default.py", "--workdir=/shared"])
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any
from typing import Optional
from typing import Sequence
from typing import TextIO

from tfscale.launch import group
from tfscale.launch import local

__all__ = [
    "Rendezvous",
    "RendezvousClient",
    "RendezvousTimeout",
    "Round",
    "launch",
]

# Seconds between a launcher's heartbeats while its workers run.
HEARTBEAT_S = 1.0
# Grace between SIGTERM and SIGKILL for workers whose round lost a node.
LOST_PEER_GRACE_S = 1.0


class RendezvousTimeout(TimeoutError):
    """The rendezvous did not gather MIN nodes in time; the message names who is there."""


@dataclasses.dataclass(frozen=True)
class Round:
    """The nodes that train together, in rank order.

    Attributes:
      number: rounds so far (0 first); a worker's TFSCALE_RESTART.
      nodes: node ids, in rank order.
      hosts: each node's host, in rank order.
    """

    number: int
    nodes: tuple[str, ...]
    hosts: tuple[str, ...]

    def rank(self, node: str) -> Optional[int]:
        """The node's rank in this round; `None` when it waits outside it (over MAX)."""
        return self.nodes.index(node) if node in self.nodes else None


@dataclasses.dataclass
class _Member:
    host: str
    joined: int  # arrival order
    last_seen: float


class Rendezvous:
    """The rendezvous server: members, heartbeats and rounds, on a listening socket.

    Args:
      address: host to bind.
      port: port to bind.
      min_nodes: nodes a round needs.
      max_nodes: nodes a round takes at most (later ones wait).
      heartbeat_timeout_s: a member silent this long has left.
      settle_s: after a change of members, how long to wait for more before
        starting a round.

    Raises:
      OSError: when the address cannot be bound (another launcher serves it).
    """

    def __init__(
        self,
        address: str,
        port: int,
        min_nodes: int,
        max_nodes: int,
        heartbeat_timeout_s: float = 10.0,
        settle_s: float = 2.0,
    ):
        if not 1 <= min_nodes <= max_nodes:
            raise ValueError(
                "nnodes needs 1 <= MIN <= MAX. Received: "
                f"min_nodes={min_nodes}, max_nodes={max_nodes}"
            )
        self._min = min_nodes
        self._max = max_nodes
        self._timeout = heartbeat_timeout_s
        self._settle = settle_s
        self._lock = threading.Lock()
        self._members: dict[str, _Member] = {}
        self._arrivals = 0
        self._changed = time.monotonic()
        self._round: Optional[Round] = None
        self._failures = 0
        self._aborted: Optional[int] = None
        self._done: set[str] = set()
        self._ready: set[str] = set()
        self._stop = threading.Event()
        self._server = socket.create_server((address, port))
        self._server.settimeout(0.2)
        self._threads = [
            threading.Thread(target=self._serve, name="rendezvous", daemon=True),
            threading.Thread(target=self._tick, name="rendezvous-rounds", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self._server.close()

    def state(self) -> dict[str, Any]:
        """What every answer carries: the round, failures, members, and who finished."""
        with self._lock:
            return self._state()

    # -- the server ---------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, (peer, _) = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    request = json.loads(connection.makefile().readline())
                    answer = self._handle(request, peer)
                except (OSError, ValueError, KeyError, TypeError) as e:
                    answer = {"error": f"{type(e).__name__}: {e}"}
                try:
                    connection.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    pass

    def _handle(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        op, node = request["op"], str(request["node"])
        with self._lock:
            now = time.monotonic()
            if op in ("join", "heartbeat"):
                if node not in self._members:
                    self._members[node] = _Member(request.get("host") or peer, self._arrivals, now)
                    self._arrivals += 1
                    self._changed = now
                self._members[node].last_seen = now
            elif op == "leave":
                if self._members.pop(node, None) is not None:
                    self._changed = now
            elif op == "abort":
                # A node gave up (its failures exceeded max_restarts): the job ends.
                self._aborted = int(request.get("code", 1))
            elif op == "failed":
                if self._round is not None and request.get("round") == self._round.number:
                    # A peer killed outright breaks the others' collectives before
                    # its heartbeats are missed: a member already silent for a few
                    # beats has left, and that is no failure to count.
                    silent = [
                        n
                        for n in self._round.nodes
                        if n in self._members and now - self._members[n].last_seen > 3 * HEARTBEAT_S
                    ]
                    for gone in silent:
                        del self._members[gone]
                        self._changed = now
                    if not silent:
                        self._failures += 1
                        self._new_round(self._round.nodes)
            elif op == "ready":
                # The node's workers of earlier rounds are gone: this round's may start.
                if self._round is not None and request.get("round") == self._round.number:
                    self._ready.add(node)
            elif op == "done":
                if self._round is not None and request.get("round") == self._round.number:
                    self._done.add(node)
            elif op != "status":
                raise ValueError(f"unknown op {op!r}")
            return self._state()

    def _tick(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                now = time.monotonic()
                gone = [n for n, m in self._members.items() if now - m.last_seen > self._timeout]
                for node in gone:
                    del self._members[node]
                    self._changed = now
                if self._done and self._round is not None:
                    continue  # the job finished: no new round
                wanted = tuple(sorted(self._members, key=lambda n: self._members[n].joined))
                wanted = wanted[: self._max]
                current = self._round.nodes if self._round is not None else None
                if wanted == current:
                    continue
                lost = current is not None and any(n not in self._members for n in current)
                settled = now - self._changed >= self._settle
                if len(wanted) >= self._min and (settled or lost):
                    self._new_round(wanted)
                elif lost and current:
                    # Too few left to train: an empty round stops every node's
                    # workers; they wait for a round that has them again.
                    self._new_round(())

    def _new_round(self, nodes: Sequence[str]) -> None:
        number = 0 if self._round is None else self._round.number + 1
        hosts = tuple(self._members[n].host for n in nodes)
        self._round = Round(number, tuple(nodes), hosts)
        self._done.clear()
        self._ready.clear()

    def _state(self) -> dict[str, Any]:
        members = sorted(self._members, key=lambda n: self._members[n].joined)
        state: dict[str, Any] = {
            "round": None,
            "failures": self._failures,
            "members": [[n, self._members[n].host] for n in members],
            "min_nodes": self._min,
            "done": sorted(self._done),
            "ready": sorted(self._ready),
            "aborted": self._aborted,
        }
        if self._round is not None:
            state["round"] = dataclasses.asdict(self._round)
        return state


class RendezvousClient:
    """One node's side: join, heartbeat, and report a failed or finished round.

    Args:
      address: the rendezvous host (`master_addr`).
      port: its port (`master_port`).
      node: this node's id, unique in the job.
      host: the address other nodes reach this node's workers at; default:
        the address the rendezvous sees the request come from.
    """

    def __init__(self, address: str, port: int, node: str, host: Optional[str] = None):
        self._address = (address, port)
        self.node = node
        self._host = host

    def call(self, op: str, timeout_s: float = 5.0, **fields: Any) -> dict[str, Any]:
        """Sends one request; the rendezvous's state back.

        Raises:
          OSError: when the rendezvous cannot be reached.
          RuntimeError: when it refused the request.
        """
        request = {"op": op, "node": self.node, "host": self._host, **fields}
        with socket.create_connection(self._address, timeout=timeout_s) as connection:
            connection.sendall(json.dumps(request).encode() + b"\n")
            line = connection.makefile().readline()
        if not line:
            raise OSError(f"the rendezvous at {self._address[0]}:{self._address[1]} hung up")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"rendezvous refused {op}: {answer['error']}")
        return answer

    def wait_for_round(
        self, after: int, timeout_s: float, stop: Optional[threading.Event] = None
    ) -> tuple[Optional[Round], dict[str, Any]]:
        """Heartbeats until a round numbered above `after` includes this node and may start.

        Call it with no workers running: it tells the rendezvous this node is
        ready for the round, and returns once every node of the round is.

        Returns:
          The round and the rendezvous's state; `(None, state)` when `stop`
          was set first or the job was aborted (`state["aborted"]`).

        Raises:
          RendezvousTimeout: after `timeout_s` without one, naming the members.
        """
        deadline = time.monotonic() + timeout_s
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return None, state
            try:
                state = self.call("heartbeat")
            except OSError:
                time.sleep(0.5)
                continue
            if state.get("aborted") is not None:
                return None, state
            found = state.get("round")
            if found is not None and found["number"] > after and self.node in found["nodes"]:
                # Workers start only once every node of the round has stopped its
                # old ones: a new worker must not reach an old coordination service.
                if self.node not in state["ready"]:
                    state = self.call("ready", round=found["number"])
                if set(found["nodes"]) <= set(state["ready"]):
                    return _round(found), state
            time.sleep(0.2)
        members = [f"{n} ({h})" for n, h in state.get("members", [])]
        need = state.get("min_nodes", "MIN")
        raise RendezvousTimeout(
            f"rendezvous at {self._address[0]}:{self._address[1]}: no round with this node "
            f"after {timeout_s:.0f}s; {len(members)} node(s) there, {need} needed: "
            f"{', '.join(members) or 'none (is the master node up?)'}"
        )


class _Heartbeat:
    """Heartbeats from a thread, so a launcher busy stopping its workers is not taken for gone.

    `state()` is the rendezvous's latest answer; `unreachable_s()` how long
    it has not answered.
    """

    def __init__(self, client: RendezvousClient):
        self._client = client
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}
        self._last_answer = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state

    def unreachable_s(self) -> float:
        with self._lock:
            return time.monotonic() - self._last_answer

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S * 3)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                state = self._client.call("heartbeat", timeout_s=HEARTBEAT_S * 2)
                with self._lock:
                    self._state = state
                    self._last_answer = time.monotonic()
            except (OSError, RuntimeError, ValueError):
                pass
            self._stop.wait(HEARTBEAT_S)


def node_id() -> str:
    """This launcher's id: host name and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _round(value: dict[str, Any]) -> Round:
    return Round(int(value["number"]), tuple(value["nodes"]), tuple(value["hosts"]))


def launch(
    config: local.LaunchConfig,
    command: Sequence[str],
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Runs this node's workers in every round it belongs to, until the job ends.

    Args:
      config: an elastic launch config (`config.max_nodes` set).
      command: the worker command line.
      out: the console.
      err: where failures are reported.

    Returns:
      0 when the workers of a round exited 0; a failing worker's exit code
      once the job's failures exceed `max_restarts`, or after SIGINT/SIGTERM.

    Raises:
      RendezvousTimeout: when no round including this node forms in
        `rendezvous_timeout_s`.
    """
    if not command:
        raise ValueError("No command to launch: put it after `--`")
    console = group.Console(out, err, config.log_ranks)
    server = _serve_if_master(config, console)
    client = RendezvousClient(config.master_addr, config.master_port, node_id())
    stop = threading.Event()
    workers: list[group.Worker] = []
    log_dir = group.make_log_dir(config.log_dir, config.log_ranks, console)
    last = -1
    heartbeat: Optional[_Heartbeat] = None
    try:
        with group.forwarding_signals(stop, workers):
            while True:
                found, state = client.wait_for_round(last, config.rendezvous_timeout_s, stop)
                if found is None:
                    aborted = state.get("aborted")
                    return aborted if aborted is not None else 128 + signal.SIGTERM
                last = found.number
                this = dataclasses.replace(
                    config,
                    nnodes=len(found.hosts),
                    node_rank=found.rank(client.node),
                    node_hosts=found.hosts,
                    max_nodes=None,
                    log_ranks=_shown(config, len(found.hosts)),
                )
                console.say(
                    f"round {found.number}: {len(found.hosts)} node(s) {list(found.hosts)}, "
                    f"this is node {this.node_rank}"
                )
                heartbeat = heartbeat or _Heartbeat(client)
                workers[:] = group.start(
                    command,
                    local.worker_addresses(this, found.hosts),
                    this.node_rank * this.nproc_per_node,
                    this.nproc_per_node,
                    found.number,
                    console,
                    log_dir,
                )
                outcome, failed = _watch(workers, heartbeat, found, config)
                for worker in workers:
                    worker.finish()
                if outcome == "done":
                    _finish(client, found, server, config)
                    return 0
                if outcome == "changed":
                    console.say(f"round {found.number} ended: the nodes changed; restarting")
                    continue
                if outcome == "aborted":
                    console.say(f"another node gave up (exit code {failed}); stopping", error=True)
                    return failed
                code = group.exit_code(failed.process.returncode)
                if stop.is_set():
                    return code
                restarts = state["failures"]
                group.report_failure(
                    console,
                    failed,
                    restarts,
                    config.max_restarts,
                    this.node_rank if this.nnodes > 1 else None,
                )
                op = "abort" if restarts >= config.max_restarts else "failed"
                try:
                    client.call(op, round=found.number, code=code)
                except (OSError, RuntimeError):
                    pass  # the next heartbeat finds out
                if op == "abort":
                    return code
    finally:
        if heartbeat is not None:
            heartbeat.close()
        try:
            client.call("leave", timeout_s=2.0)
        except (OSError, RuntimeError):
            pass
        if server is not None:
            server.close()


def _serve_if_master(config: local.LaunchConfig, console: group.Console) -> Optional[Rendezvous]:
    """The rendezvous, when this launcher can bind master_addr:master_port; else None."""
    try:
        server = Rendezvous(
            config.master_addr,
            config.master_port,
            config.nnodes,
            config.max_nodes,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
        )
    except OSError:
        return None  # another launcher serves it (or the address is not this host's)
    console.say(
        f"rendezvous on {config.master_addr}:{config.master_port}: "
        f"{config.nnodes} to {config.max_nodes} nodes"
    )
    return server


def _watch(
    workers: list[group.Worker], heartbeat: _Heartbeat, current: Round, config: local.LaunchConfig
) -> tuple[str, Any]:
    """Until the round ends here: ("done", None), ("failed", worker), ("changed", None)
    or ("aborted", exit code).

    A new round (nodes joined or left, or another node's worker failed), the
    job's end (a node gave up), or losing the rendezvous for
    `heartbeat_timeout_s`, stops this node's workers.
    """
    processes = [w.process for w in workers]
    while True:
        codes = [p.poll() for p in processes]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            group.stop(processes, config.stop_timeout_s)
            return "failed", workers[failed[0]]
        if all(c == 0 for c in codes):
            return "done", None
        state = heartbeat.state()
        # The thread's answer may predate this round: only a later round is news.
        later = state.get("round") or {}
        if state.get("aborted") is not None or later.get("number", -1) > current.number:
            # Workers that lost a peer are blocked in its collectives: no checkpoint
            # will come at a step boundary, so they get only a moment's grace.
            lost = state.get("aborted") is not None or not set(current.nodes) <= set(
                later.get("nodes", ())
            )
            grace = LOST_PEER_GRACE_S if lost else config.stop_timeout_s
            group.stop(processes, grace)
            if state.get("aborted") is not None:
                return "aborted", state["aborted"]
            return "changed", None
        if heartbeat.unreachable_s() > config.heartbeat_timeout_s:
            group.stop(processes, config.stop_timeout_s)
            raise RendezvousTimeout(
                f"lost the rendezvous at {config.master_addr}:{config.master_port} for "
                f"{config.heartbeat_timeout_s:.0f}s; stopped this node's workers"
            )
        time.sleep(0.1)


def _finish(
    client: RendezvousClient, found: Round, server: Optional[Rendezvous], config: local.LaunchConfig
) -> None:
    """Says this node finished; the master keeps serving until every node of the round has."""
    try:
        client.call("done", round=found.number)
    except (OSError, RuntimeError):
        return
    if server is None:
        return
    deadline = time.monotonic() + config.heartbeat_timeout_s + config.stop_timeout_s
    while time.monotonic() < deadline:
        if set(found.nodes) <= set(server.state()["done"]) | {client.node}:
            return
        time.sleep(0.2)


def _shown(config: local.LaunchConfig, nodes: int) -> local.Ranks:
    world = nodes * config.nproc_per_node
    if config.log_ranks is None:
        return None
    return tuple(r for r in config.log_ranks if r < world)
