"""One node's worker processes: started with their environment, watched, stopped.

`start` runs the command once per local rank with its TF_CONFIG and
`TFSCALE_*` variables, through `setpriv --pdeathsig` so a killed launcher
leaves no worker behind. Each `Worker` carries its output, line by line, to
the `Console` (the ranks it shows, each line prefixed with `[rank]`) and to
`<log_dir>/attempt<k>/rank<N>.log`. A line rewritten with carriage returns
(a Keras progress bar) stays one line: updated in place on a terminal, else
printed once in its final state. `forwarding_signals` passes SIGINT and
SIGTERM on to the workers; `stop` terminates them, then kills what is left;
`report_failure` names a failed worker (rank, pid, signal) and shows its
last lines if the console did not. The fixed-size launcher (`local`) and
the elastic one (`elastic`) both run their groups with these.

Example:

```python
console = group.Console(sys.stdout, sys.stderr, ranks=(0,))
workers = group.start(command, ["127.0.0.1:2223", "127.0.0.1:2224"], first_rank=0,
                      nproc=2, attempt=0, console=console, log_dir=None)
failed = group.wait(workers, stop_timeout_s=10)  # None: every worker exited 0
```
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
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
    "Console",
    "Ranks",
    "Worker",
    "exit_code",
    "forwarding_signals",
    "make_log_dir",
    "report_failure",
    "start",
    "stop",
    "wait",
]

Ranks = Optional[tuple[int, ...]]

# Lines of a failed worker that the console did not show, printed on stderr.
TAIL_LINES = 40
_CONTROL = re.compile(r"([\r\n\b])")
_CLEAR_LINE = "\r\x1b[K"


def make_log_dir(log_dir: Optional[str], ranks: Ranks, console: "Console") -> Optional[str]:
    """Where every rank's output goes (made, and said on the console); None: nowhere.

    Without `log_dir`, a temporary directory when the console hides some ranks.
    """
    if log_dir is None and ranks is not None:
        log_dir = tempfile.mkdtemp(prefix="tfscale-launch-")
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        console.say(
            f"console: {_ranks_text(ranks)}; every rank's output: "
            f"{log_dir}/attempt<k>/rank<N>.log"
        )
    return log_dir


@contextlib.contextmanager
def forwarding_signals(stop: threading.Event, group: list["Worker"]) -> Iterator[None]:
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


def start(
    command: Sequence[str],
    addresses: Sequence[str],
    first_rank: int,
    nproc: int,
    attempt: int,
    console: "Console",
    log_dir: Optional[str],
) -> list["Worker"]:
    """Starts this node's `nproc` workers, global ranks `first_rank` on.

    Args:
      command: the worker command line.
      addresses: every worker's `host:port` of the job, by global rank.
      first_rank: the global rank of this node's first worker.
      nproc: workers on this node.
      attempt: the restart count (`TFSCALE_RESTART`; the logs' `attempt<k>`).
      console: where the shown ranks' output goes.
      log_dir: where every rank's output goes (None: nowhere).
    """
    group = []
    for local in range(nproc):
        rank = first_rank + local
        tf_config = cluster_lib.Cluster(tuple(addresses), rank).tf_config()
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(tf_config),
            TFSCALE_RANK=str(rank),
            TFSCALE_LOCAL_RANK=str(local),
            TFSCALE_WORLD_SIZE=str(len(addresses)),
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
        group.append(Worker(process, rank, local, console, log))
    return group


def wait(group: list["Worker"], stop_timeout_s: float) -> Optional[int]:
    """Waits until all exit 0 (None), or one fails: stops the others, returns its index."""
    processes_ = [w.process for w in group]
    while True:
        codes = [p.poll() for p in processes_]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            stop(processes_, stop_timeout_s)
            return failed[0]
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.1)


def stop(processes_: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM to each live process; SIGKILL to those still running after `timeout_s`."""
    for process in processes_:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes_:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def report_failure(
    console: "Console",
    worker: "Worker",
    attempt: int,
    max_restarts: int,
    node_rank: Optional[int] = None,
) -> None:
    """Says which worker failed, how, and what happens next; shows its last lines if hidden.

    Args:
      console: the launcher's console.
      worker: the failed worker.
      attempt: the restarts so far.
      max_restarts: the restart budget.
      node_rank: this node's rank, named when the job has several nodes.
    """
    node = f"node {node_rank}, " if node_rank is not None else ""
    verdict = (
        f"restarting the worker group (restart {attempt + 1} of {max_restarts})"
        if attempt < max_restarts
        else f"giving up after {attempt} of {max_restarts} restarts"
    )
    who = f"rank {worker.rank} ({node}local rank {worker.local_rank}, pid {worker.process.pid})"
    lines = [f"{who} failed with {_describe(worker.process.returncode)}; {verdict}"]
    if not console.shows(worker.rank):
        where = f" (all of it: {worker.log_path})" if worker.log_path else ""
        lines.append(f"last {len(worker.tail)} lines of rank {worker.rank}{where}:")
    console.say("\n".join(lines), error=True)
    if not console.shows(worker.rank):
        console.write_error("".join(f"[{worker.rank}] {line}\n" for line in worker.tail))


class Worker:
    """One worker process and the thread that carries its output to the console and its log."""

    def __init__(
        self,
        process: subprocess.Popen,
        rank: int,
        local_rank: int,
        console: "Console",
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


class Console:
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


def exit_code(code: int) -> int:
    """A Popen return code as a shell exit status (128 + N for signal N)."""
    return 128 - code if code < 0 else code
