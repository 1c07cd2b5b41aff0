"""Replica processes on this host: start them, watch them, restart the ones that die.

`ReplicaProcesses` runs `tfscale-serve replica ...` N times (each on a free
port) and reads from each process's standard output the two lines it
prints once warm (`... listening on HOST:PORT`, `... rest on HOST:PORT`).
A process that exits is reported at once (`on_exit`: the router stops
sending to it), then started again after a back-off that doubles from
`restart_delay_s` (up to 30 s) while it keeps dying young; once ready it is
reported again (`on_ready`).

This module does not import TensorFlow: the replicas do.

Example:

```python
processes = ReplicaProcesses(
    ["--model=/tmp/tfscale/smoke"], count=2,
    on_ready=lambda name, target, rest: router.add_replica(name, target, rest),
    on_exit=router.mark_down,
)
processes.start()  # blocks until both are warm
```
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable
from typing import Optional
from typing import Sequence

from tfscale import processes

__all__ = [
    "ReplicaProcesses",
    "ReplicaStartError",
    "READY_LINE",
    "REST_LINE",
]

READY_LINE = "tfscale-serve replica listening on"
REST_LINE = "tfscale-serve replica rest on"
_MAX_RESTART_DELAY_S = 30.0
# A process that ran this long before dying starts the back-off over.
_STABLE_S = 60.0
_ADDRESS = re.compile(r"on (\S+:\d+)\s*$")

OnReady = Callable[[str, str, Optional[str]], None]
OnExit = Callable[[str], None]


class ReplicaStartError(RuntimeError):
    """A replica process exited or timed out before it was ready."""


@dataclasses.dataclass
class _Process:
    name: str
    popen: Optional[subprocess.Popen] = None
    target: Optional[str] = None
    rest_target: Optional[str] = None
    restarts: int = 0
    last_output: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=20)
    )


class ReplicaProcesses:
    """Runs and restarts `count` replica processes.

    Args:
      replica_args: flags for `tfscale-serve replica` besides `--name`,
        `--port` and `--rest_port` (e.g. `["--model=DIR", "--max_batch_size=32"]`).
      count: how many replicas.
      on_ready: called with (name, gRPC target, REST target) when a replica
        is ready, at the start and after each restart.
      on_exit: called with the name as soon as a replica's process exits.
      start_timeout_s: how long one replica may take to load and warm up.
      restart_delay_s: first back-off before a restart.
      env: environment of the processes (default: this one's).
    """

    def __init__(
        self,
        replica_args: Sequence[str],
        count: int,
        *,
        on_ready: OnReady,
        on_exit: OnExit,
        start_timeout_s: float = 300.0,
        restart_delay_s: float = 1.0,
        env: Optional[dict[str, str]] = None,
    ):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1. Received: count={count!r}")
        self._args = list(replica_args)
        self._on_ready = on_ready
        self._on_exit = on_exit
        self._start_timeout_s = start_timeout_s
        self._restart_delay_s = restart_delay_s
        self._env = dict(os.environ if env is None else env)
        self._env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self._processes = [_Process(f"replica-{i}") for i in range(count)]
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._processes]

    def pid(self, name: str) -> Optional[int]:
        """The process id of a replica (None while it is not running)."""
        process = self._by_name(name)
        return None if process.popen is None else process.popen.pid

    def restarts(self, name: str) -> int:
        return self._by_name(name).restarts

    def start(self) -> None:
        """Starts every replica and waits until all are ready (in parallel).

        Raises:
          ReplicaStartError: a replica died or timed out before it was ready;
            the message quotes its last output lines. The others are stopped.
        """
        # Each replica's whole life runs in one thread: the parent-death signal
        # of a child fires when the thread that started it ends.
        outcomes: list[Optional[ReplicaStartError]] = []
        ready = threading.Condition()

        def run(process: _Process) -> None:
            try:
                self._launch(process)
                error = None
            except ReplicaStartError as e:
                error = e
            with ready:
                outcomes.append(error)
                ready.notify_all()
            if error is None:
                self._watch(process)

        for process in self._processes:
            threading.Thread(
                target=run, args=(process,), name=f"replica-{process.name}", daemon=True
            ).start()
        with ready:
            ready.wait_for(lambda: len(outcomes) == len(self._processes))
        errors = [e for e in outcomes if e is not None]
        if errors:
            self.stop()
            raise errors[0]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops every replica: SIGTERM, then SIGKILL after `timeout_s`."""
        self._stopping.set()
        with self._lock:
            popens = [p.popen for p in self._processes if p.popen is not None]
        for popen in popens:
            if popen.poll() is None:
                popen.terminate()
        deadline = time.monotonic() + timeout_s
        for popen in popens:
            try:
                popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()

    def _by_name(self, name: str) -> _Process:
        for process in self._processes:
            if process.name == name:
                return process
        raise KeyError(f"No replica named {name!r}; the replicas are {self.names}")

    def _launch(self, process: _Process) -> None:
        """Starts the process and reads its output until both address lines came."""
        command = [
            sys.executable,
            "-m",
            "tfscale.serve.main",
            "replica",
            f"--name={process.name}",
            "--port=0",
            "--rest_port=0",
            *self._args,
        ]
        with self._lock:
            if self._stopping.is_set():
                raise ReplicaStartError(f"{process.name}: stopping")
            # Replicas die with the router (SIGTERM: they drain). Not a preexec_fn:
            # code between fork and exec can crash a child of this threaded process.
            process.popen = subprocess.Popen(
                processes.parent_death_prefix(signal.SIGTERM) + command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self._env,
            )
        popen = process.popen
        timer = threading.Timer(self._start_timeout_s, popen.kill)
        timer.start()
        try:
            for line in popen.stdout:
                process.last_output.append(line.rstrip())
                match = _ADDRESS.search(line)
                if line.startswith(READY_LINE) and match:
                    process.target = match.group(1)
                elif line.startswith(REST_LINE) and match:
                    process.rest_target = match.group(1)
                    break
        finally:
            timer.cancel()
        if process.rest_target is None or popen.poll() is not None:
            popen.wait()
            output = " | ".join(process.last_output) or "no output"
            raise ReplicaStartError(
                f"{process.name} exited with {popen.returncode} before it was ready: {output}"
            )
        # Keep draining its output (logs) so the pipe never fills and blocks it.
        threading.Thread(target=self._relay, args=(process, popen), daemon=True).start()
        logging.info("%s ready on %s (rest %s)", process.name, process.target, process.rest_target)
        self._on_ready(process.name, process.target, process.rest_target)

    @staticmethod
    def _relay(process: _Process, popen: subprocess.Popen) -> None:
        for line in popen.stdout:
            process.last_output.append(line.rstrip())
            sys.stderr.write(f"[{process.name}] {line}")

    def _watch(self, process: _Process) -> None:
        delay = self._restart_delay_s
        while True:
            started = time.monotonic()
            code = process.popen.wait()
            if self._stopping.is_set():
                return
            self._on_exit(process.name)
            logging.warning("%s exited with %s; restarting it in %.1f s", process.name, code, delay)
            if time.monotonic() - started > _STABLE_S:
                delay = self._restart_delay_s
            while True:
                if self._stopping.wait(delay):
                    return
                delay = min(2 * delay, _MAX_RESTART_DELAY_S)
                try:
                    process.restarts += 1
                    self._launch(process)
                    break
                except ReplicaStartError as e:
                    if self._stopping.is_set():
                        return
                    logging.warning("Restart of %s failed: %s", process.name, e)
