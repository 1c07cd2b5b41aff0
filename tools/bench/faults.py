"""Fault injection: ids that reach training twice or never, tfscale vs tf.data service.

One epoch over `--num_shards` shards of `--shard_size` unique ids is consumed
by `--trainers` training processes (`tools/bench/fault_worker.py`) while
faults are injected mid-epoch, in three setups (`--systems`):

- `tfscale`: a `tfscale-dispatcher serve --work_dir=...` subprocess (journal
  on, `--lease_timeout_s`); each trainer iterates a `ShardConsumer` (one
  lease at a time, `max_shards=1`) and takes each id when it trains on it.
- `tfscale-pipeline`: the same dispatcher, read as `tfscale-train` reads it:
  `DispatchedInput(address, job, reader, max_shards=1, track_consumed=True)
  .dataset.batch(B).prefetch(AUTOTUNE)` with a tf.data reader of
  `range:A:B` shards, so the input reads ahead of the steps.
- `tf.data` service, DYNAMIC sharding: a `DispatchServer` subprocess with a
  work_dir and `fault_tolerant_mode=True`, `--data_workers` `WorkerServer`
  subprocesses (heartbeat 750 ms, dropped after `worker_timeout_ms` = the
  lease timeout), and each trainer reads
  `range(num_shards).flat_map(shard -> its ids)` through
  `distribute("distributed_epoch", job_name=...)`: one split per shard.

In both tfscale setups, leases are committed at grant, and a shard is
completed only once the consumer asks for the element after its last and
training reported consuming that last element (the pipeline from the start,
`track_consumed`; `ShardConsumer` from its first report); the completion
rides on the next acquire, so a shard read ahead but not yet trained is
still leased. Before each step's commit (below), a tfscale trainer reports
to the dispatcher how many ids it has trained in all
(`report_consumed(n, send=True)`, a synchronous heartbeat), so a shard whose
lease ends unfinished (its trainer was killed) is leased again at the
offset training reached, not at its start: what the victim trained from it
is not trained again, and what its input had read ahead of training is read
again.

Scenarios (`--scenarios`):

- `trainer_kill`: SIGKILL of one trainer once `--kill_at` of the epoch's ids
  were trained and the victim's last committed step ends mid-shard (it holds
  work: a partly trained shard, plus whatever its input had prefetched);
- `dispatcher_restart`: SIGKILL of the dispatcher once `--restart_at` of the
  ids were trained, and a restart `--downtime_s` later on the same port and
  work_dir (tf.data's restarted dispatcher is a standby that imported
  TensorFlow beforehand, so both systems are down for about as long);
- `trainer_kill+dispatcher_restart`: both, in that order;
- `data_worker_kill` (tf.data only; tfscale has no separate reader tier):
  SIGKILL of one tf.data `WorkerServer` at `--kill_at`;
- `dispatcher_restarts` (tfscale only): `--restarts` SIGKILLs of the
  dispatcher, each followed `--downtime_s` later by a restart on the same
  port and work_dir, the k-th once k/(restarts+1) of the ids were trained;
  run it with a short `--lease_timeout_s` (2). Also reported: `restart_s`,
  the median time from starting a restarted dispatcher to its listening
  (its stdout is polled every 50 ms; `faults_restarts.py` times it finer).

Unless `--nojournal_restart`, `faults_restarts.py` also times the restart of
a dispatcher whose work_dir holds a long journal (`--journal_records`), with
snapshots off and every `--snapshot_interval` records.

What "reached training" means, the same for every setup: a trainer takes
`--batch` ids from its input, computes for `--step_s`, then commits the step
by appending one line holding the step's ids to its log with one flushed
write. An id reached training once per complete step line that holds it, in
the log of any trainer, killed or not: a killed trainer's steps up to its
last commit count; ids it had taken (or its input had read or prefetched)
but not committed do not. Then, over the epoch's ids, `duplicates` = sum of
(times trained - 1) over ids trained more than once and `missing` = ids
never trained. The target is 0 and 0.

Also reported: `relay_s` ("re-lease s" in the table, tfscale only): from the
kill of the trainer to the first read, by another trainer, of the last shard
the victim had started reading (trainers log the time of each shard read,
which directly follows its lease); `stall_s`: the longest time after the
first fault during which no trainer committed a step; `outcome`: `ok` when
every surviving trainer finished the epoch, `stalled` when one had not
`--timeout_s` after the last fault (it is then killed, its committed steps
still count, and `stall_s` is a lower bound), `error` when one failed. Each
figure is the median (and max) over `--repeats` runs, the cases interleaved.
All traffic is on 127.0.0.1.

  .venv/bin/python tools/bench/faults.py --out=/tmp/tfscale_bench/faults --repeats=5

Repeated restarts only:

  .venv/bin/python tools/bench/faults.py --systems=tfscale --scenarios=dispatcher_restarts \\
      --restarts=20 --lease_timeout_s=2 --repeats=1 --out=/tmp/tfscale_bench/faults_restarts

A smoke run (< 2 min: one run of the combined scenario per setup, 2 restarts,
24 shards, a short journal):

  .venv/bin/python tools/bench/faults.py --quick --out=/tmp/tfscale_bench/faults_quick
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable
from typing import Optional

import faults_restarts
from absl import app
from absl import flags

from tfscale.strategies import cluster

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WORKER = os.path.join(_REPO, "tools", "bench", "fault_worker.py")
_SYSTEMS = ("tfscale", "tfscale-pipeline", "tf.data")
_SCENARIOS = (
    "trainer_kill",
    "dispatcher_restart",
    "trainer_kill+dispatcher_restart",
    "data_worker_kill",
    "dispatcher_restarts",
)
_QUICK_SCENARIOS = ["trainer_kill+dispatcher_restart", "dispatcher_restarts"]

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/faults", "Output directory.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 5, "Runs per system and scenario (medians are reported)."
)
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke run: 1 repeat, 24 shards, the combined scenario, 2 restarts."
)
_SYSTEMS_FLAG = flags.DEFINE_list("systems", list(_SYSTEMS), f"Systems: {', '.join(_SYSTEMS)}.")
_SCENARIOS_FLAG = flags.DEFINE_list(
    "scenarios", list(_SCENARIOS), f"Scenarios: {', '.join(_SCENARIOS)}."
)
# One flag per `Settings` field, of the same name.
flags.DEFINE_integer("num_shards", 48, "Shards in the epoch.")
flags.DEFINE_integer("shard_size", 20, "Unique ids per shard.")
flags.DEFINE_integer("trainers", 3, "Training processes.")
flags.DEFINE_integer("data_workers", 2, "tf.data service WorkerServer processes.")
flags.DEFINE_integer("batch", 5, "Ids per training step.")
flags.DEFINE_float("step_s", 0.1, "Simulated compute per step.")
flags.DEFINE_float("lease_timeout_s", 3.0, "tfscale lease timeout = tf.data worker timeout.")
flags.DEFINE_string("policy", "round_robin", "tfscale shard policy.")
flags.DEFINE_float("kill_at", 0.25, "Fraction of the epoch trained when a process is killed.")
flags.DEFINE_float("restart_at", 0.5, "Fraction of the epoch trained when the dispatcher dies.")
flags.DEFINE_float("downtime_s", 1.0, "Seconds the dispatcher stays dead.")
flags.DEFINE_integer("restarts", 20, "Dispatcher restarts in the dispatcher_restarts scenario.")
flags.DEFINE_float("restore_grace_s", 10.0, "tfscale dispatcher --restore_grace_s.")
flags.DEFINE_integer("snapshot_interval", 10_000, "tfscale dispatcher --snapshot_interval.")
flags.DEFINE_float(
    "timeout_s", 30.0, "Seconds after the last fault before survivors count as stalled."
)
_KEEP_LOGS = flags.DEFINE_bool("keep_logs", False, "Keep every process's logs under --out/runs.")
_START_TIMEOUT_S = flags.DEFINE_float(
    "start_timeout_s", 60.0, "Seconds a server may take to start."
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One run's parameters.

    Attributes:
      num_shards: shards in the epoch.
      shard_size: unique ids per shard.
      trainers: training processes.
      data_workers: tf.data service workers.
      batch: ids per step.
      step_s: compute per step.
      lease_timeout_s: tfscale lease timeout, and tf.data's worker timeout.
      policy: tfscale shard policy.
      kill_at: epoch fraction at which a trainer or data worker dies.
      restart_at: epoch fraction at which the dispatcher dies.
      downtime_s: seconds before the dispatcher restarts.
      timeout_s: seconds after the last fault before survivors count as stalled.
      restarts: dispatcher restarts in the `dispatcher_restarts` scenario.
      restore_grace_s: tfscale's lifetime floor of a lease restored after a restart.
      snapshot_interval: tfscale journal records between snapshots.
    """

    num_shards: int
    shard_size: int
    trainers: int
    data_workers: int
    batch: int
    step_s: float
    lease_timeout_s: float
    policy: str
    kill_at: float
    restart_at: float
    downtime_s: float
    timeout_s: float
    restarts: int
    restore_grace_s: float
    snapshot_interval: int

    @property
    def num_ids(self) -> int:
        return self.num_shards * self.shard_size


@dataclasses.dataclass
class TrainerLog:
    """What one trainer's log says: committed steps, shard reads, how it ended."""

    steps: list[tuple[float, list[int]]] = dataclasses.field(default_factory=list)
    reads: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    done_at: Optional[float] = None
    error: Optional[str] = None

    @classmethod
    def read(cls, path: str) -> "TrainerLog":
        log = cls()
        if not os.path.exists(path):
            return log
        with open(path) as f:
            text = f.read()
        for line in text.split("\n")[:-1]:  # a line without its newline was never committed
            kind, stamp, *rest = line.split(" ", 2) + [""]
            if kind == "S":
                log.steps.append((float(stamp), [int(i) for i in rest[0].split()]))
            elif kind == "L":
                log.reads.append((float(stamp), rest[0]))
            elif kind == "DONE":
                log.done_at = float(stamp)
            elif kind == "ERROR":
                log.error = rest[0]
        return log


class Processes:
    """Subprocesses of one run, each logging to its own files; `close` kills all."""

    def __init__(self, run_dir: str):
        self._dir = run_dir
        self._running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="1")
        with (
            open(self.path(f"{name}.stdout"), "a") as out,
            open(self.path(f"{name}.stderr"), "a") as err,
        ):
            process = subprocess.Popen(
                [sys.executable, *argv], cwd=_REPO, env=env, stdout=out, stderr=err
            )
        self._running[name] = process
        return process

    def path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def wait_for_line(self, name: str, prefix: str, timeout_s: float) -> str:
        """The first stdout line of `name` starting with `prefix`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(self.path(f"{name}.stdout")) as f:
                for line in f.read().splitlines():
                    if line.startswith(prefix):
                        return line
            if self._running[name].poll() is not None:
                break
            time.sleep(0.05)
        with open(self.path(f"{name}.stderr")) as f:
            last = ([line for line in f.read().splitlines() if line.strip()] or ["(empty)"])[-1]
        raise RuntimeError(
            f"{name} did not print {prefix!r} in {timeout_s} s; stderr ends: {last[:300]}"
        )

    def kill(self, name: str) -> float:
        """SIGKILLs `name`; returns the time of the kill."""
        process = self._running.pop(name)
        killed_at = time.time()
        process.send_signal(signal.SIGKILL)
        process.wait()
        return killed_at

    def alive(self, name: str) -> bool:
        return name in self._running and self._running[name].poll() is None

    def close(self) -> None:
        for process in self._running.values():
            if process.poll() is None:
                process.kill()
            process.wait()
        self._running.clear()


def _argv(*head: str, **options: object) -> list[str]:
    return [*head, *(f"--{name}={value}" for name, value in options.items())]


class _System:
    """One system's servers and trainers inside a `Processes`."""

    trainer_role = ""

    def __init__(self, procs: Processes, settings: Settings):
        self.procs = procs
        self.settings = settings
        self.port = cluster.free_port()
        self.work_dir = procs.path("dispatcher_work_dir")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_dispatcher(self) -> None:
        raise NotImplementedError

    def prepare_restart(self) -> None:
        """Readies a restart ahead of time (tf.data: a standby that imported TensorFlow)."""

    def restart_dispatcher(self, name: str) -> None:
        """Starts dispatcher `name` on the same port and work_dir; returns once it serves."""
        raise NotImplementedError

    def start_data_workers(self) -> None:
        pass

    def start_trainers(self, names: list[str]) -> None:
        s = self.settings
        common = _argv(_WORKER, role=self.trainer_role, address=self.address, job="audit")
        common += _argv(batch=s.batch, step_s=s.step_s, num_shards=s.num_shards)
        for name in names:
            out = self.procs.path(f"{name}.log")
            self.procs.start(name, common + _argv(shard_size=s.shard_size, name=name, out=out))


class _Tfscale(_System):
    trainer_role = "tfscale_trainer"

    def start_dispatcher(self, name: str = "dispatcher") -> None:
        s = self.settings
        argv = _argv(
            "-m", "tfscale.data.dispatcher", "serve", port=self.port, work_dir=self.work_dir
        )
        argv += _argv(shards=f"range:{s.num_ids}:{s.shard_size}", job="audit", policy=s.policy)
        argv += _argv(num_epochs=1, lease_timeout_s=s.lease_timeout_s)
        argv += _argv(restore_grace_s=s.restore_grace_s, snapshot_interval=s.snapshot_interval)
        self.procs.start(name, argv)
        self.procs.wait_for_line(name, "tfscale-dispatcher listening on", _START_TIMEOUT_S.value)

    def restart_dispatcher(self, name: str) -> None:
        self.start_dispatcher(name)


class _TfscalePipeline(_Tfscale):
    trainer_role = "tfscale_pipeline_trainer"


class _TfData(_System):
    trainer_role = "tfdata_consumer"

    def start_dispatcher(self) -> None:
        self.procs.start("dispatcher", self._dispatcher_argv())
        self.procs.wait_for_line("dispatcher", "READY", _START_TIMEOUT_S.value)

    def prepare_restart(self) -> None:
        self.procs.start("restarted_dispatcher", self._dispatcher_argv(self._start_file))
        self.procs.wait_for_line("restarted_dispatcher", "STANDBY", _START_TIMEOUT_S.value)

    def restart_dispatcher(self, name: str) -> None:
        del name  # the standby of `prepare_restart`
        with open(self._start_file, "w"):
            pass
        self.procs.wait_for_line("restarted_dispatcher", "READY", _START_TIMEOUT_S.value)

    @property
    def _start_file(self) -> str:
        return self.procs.path("restart_now")

    def _dispatcher_argv(self, start_file: str = "") -> list[str]:
        timeout_ms = int(self.settings.lease_timeout_s * 1000)
        argv = _argv(_WORKER, role="tfdata_dispatcher", port=self.port, work_dir=self.work_dir)
        return argv + _argv(worker_timeout_ms=timeout_ms, start_file=start_file)

    def start_data_workers(self) -> None:
        names = [f"data_worker{i}" for i in range(self.settings.data_workers)]
        for name in names:
            self.procs.start(name, _argv(_WORKER, role="tfdata_worker", address=self.address))
        for name in names:
            self.procs.wait_for_line(name, "READY", _START_TIMEOUT_S.value)


def _make_system(name: str, procs: Processes, settings: Settings) -> _System:
    systems = {"tfscale": _Tfscale, "tfscale-pipeline": _TfscalePipeline, "tf.data": _TfData}
    if name not in systems:
        raise ValueError(f"Unknown system {name!r}. Valid systems: {', '.join(systems)}")
    return systems[name](procs, settings)


def _wait(condition: Callable[[], bool], going: Callable[[], bool], deadline: float) -> bool:
    """Polls `condition` until true (True), or until `going` is false or the deadline (False)."""
    while time.time() < deadline:
        if condition():
            return True
        if not going():
            return False
        time.sleep(0.02)
    return False


class _Run:
    """One run of one scenario on one system: start, inject faults, wait, audit."""

    def __init__(self, system: str, scenario: str, settings: Settings, run_dir: str):
        self.system_name = system
        self.scenario = scenario
        self.settings = settings
        self.procs = Processes(run_dir)
        self.system = _make_system(system, self.procs, settings)
        self.trainers = [f"trainer{i}" for i in range(settings.trainers)]
        self.victim = self.trainers[1 % len(self.trainers)]
        self.faults = set(scenario.split("+"))
        self.dispatcher = "dispatcher"
        self.events: dict[str, float] = {}
        self.restart_s: list[float] = []

    def logs(self) -> dict[str, TrainerLog]:
        return {name: TrainerLog.read(self.procs.path(f"{name}.log")) for name in self.trainers}

    def trained(self) -> int:
        return sum(len(ids) for log in self.logs().values() for _, ids in log.steps)

    def going(self) -> bool:
        return any(self.procs.alive(name) for name in self.trainers)

    def execute(self) -> dict:
        outcome = None
        try:
            self.system.start_dispatcher()
            self.system.start_data_workers()
            if "dispatcher_restart" in self.faults:
                self.system.prepare_restart()
            self.events["start"] = time.time()
            self.system.start_trainers(self.trainers)
            self._inject_faults()
            outcome = self._finish()
        except RuntimeError as e:
            outcome = f"error: {e}".splitlines()[0]
        finally:
            self.procs.close()
        return self._audit(outcome)

    def _inject_faults(self) -> None:
        s = self.settings
        deadline = time.time() + _START_TIMEOUT_S.value + s.timeout_s
        if "trainer_kill" in self.faults:
            if _wait(self._victim_holds_work, self.going, deadline):
                self.events["trainer_killed"] = self.procs.kill(self.victim)
        if "data_worker_kill" in self.faults:
            if _wait(lambda: self.trained() >= s.kill_at * s.num_ids, self.going, deadline):
                self.events["data_worker_killed"] = self.procs.kill("data_worker0")
        if "dispatcher_restart" in self.faults:
            if _wait(lambda: self.trained() >= s.restart_at * s.num_ids, self.going, deadline):
                self._restart_dispatcher("")
        if "dispatcher_restarts" in self.faults:
            for k in range(1, s.restarts + 1):
                due = k / (s.restarts + 1) * s.num_ids
                deadline = time.time() + _START_TIMEOUT_S.value + s.timeout_s
                if not _wait(lambda: self.trained() >= due, self.going, deadline):
                    break
                self._restart_dispatcher(f"_{k}")

    def _restart_dispatcher(self, suffix: str) -> None:
        """Kills the running dispatcher and starts `restarted_dispatcher<suffix>`."""
        self.events[f"dispatcher_killed{suffix}"] = self.procs.kill(self.dispatcher)
        time.sleep(self.settings.downtime_s)
        self.dispatcher = f"restarted_dispatcher{suffix}"
        started = time.time()
        self.system.restart_dispatcher(self.dispatcher)
        self.events[f"dispatcher_restarted{suffix}"] = time.time()
        self.restart_s.append(self.events[f"dispatcher_restarted{suffix}"] - started)

    def _victim_holds_work(self) -> bool:
        s = self.settings
        steps = self.logs()[self.victim].steps
        if not steps or self.trained() < s.kill_at * s.num_ids:
            return False
        return (steps[-1][1][-1] + 1) % s.shard_size != 0  # its last step ended mid-shard

    def _finish(self) -> str:
        survivors = [
            n for n in self.trainers if "trainer_killed" not in self.events or n != self.victim
        ]
        last_fault = max(self.events.values())
        _wait(
            lambda: not any(self.procs.alive(n) for n in survivors),
            lambda: True,
            last_fault + self.settings.timeout_s,
        )
        logs = self.logs()
        ended = [logs[n].done_at for n in survivors]
        self.events["end"] = max(ended) if None not in ended else time.time()
        errors = [f"{n}: {logs[n].error}" for n in survivors if logs[n].error]
        if errors:
            return "error: " + "; ".join(errors)
        unfinished = [n for n in survivors if logs[n].done_at is None]
        if unfinished:
            waited = time.time() - last_fault
            return (
                f"stalled: {', '.join(unfinished)} unfinished {waited:.0f} s after the last fault"
            )
        return "ok"

    def _audit(self, outcome: Optional[str]) -> dict:
        s = self.settings
        logs = self.logs()
        counts = collections.Counter(
            i for log in logs.values() for _, ids in log.steps for i in ids
        )
        duplicates = sum(c - 1 for i, c in counts.items() if 0 <= i < s.num_ids and c > 1)
        missing = sum(1 for i in range(s.num_ids) if counts[i] == 0)
        faults = {k: v for k, v in self.events.items() if k not in ("start", "end")}
        started = self.events.get("start", 0.0)  # the trainers' start; the servers were up
        expected = {
            "trainer_kill": 1,
            "dispatcher_restart": 2,
            "data_worker_kill": 1,
            "dispatcher_restarts": 2 * s.restarts,
        }
        wanted = sum(n for k, n in expected.items() if k in self.faults)
        return {
            "system": self.system_name,
            "scenario": self.scenario,
            "outcome": outcome if len(faults) >= wanted else f"{outcome}; a fault was not injected",
            "duplicates": duplicates,
            "missing": missing,
            "stray_ids": sum(c for i, c in counts.items() if not 0 <= i < s.num_ids),
            "relay_s": self._relay_s(logs),
            "stall_s": self._stall_s(logs, faults, self.events.get("end")),
            "epoch_s": self._epoch_s(logs),
            "restart_s": round(statistics.median(self.restart_s), 3) if self.restart_s else None,
            "trained_per_trainer": {
                n: sum(len(ids) for _, ids in log.steps) for n, log in logs.items()
            },
            "victim": self.victim if "trainer_killed" in self.events else None,
            "events_s": {k: round(v - started, 3) for k, v in faults.items()},
        }

    def _relay_s(self, logs: dict[str, TrainerLog]) -> Optional[float]:
        """Kill -> first read of the victim's shard by another trainer (tfscale)."""
        killed = self.events.get("trainer_killed")
        reads = [r for r in logs[self.victim].reads if killed and r[0] <= killed]
        if not reads:
            return None
        shard = reads[-1][1]
        others = [log for name, log in logs.items() if name != self.victim]
        again = [t for log in others for t, name in log.reads if name == shard and t > killed]
        return round(min(again) - killed, 3) if again else None

    @staticmethod
    def _stall_s(
        logs: dict[str, TrainerLog], faults: dict[str, float], end: Optional[float]
    ) -> Optional[float]:
        """The longest time without a committed step, from the first fault to the end."""
        if not faults or end is None:
            return None
        first = min(faults.values())
        times = sorted(t for log in logs.values() for t, _ in log.steps if t > first) + [end]
        return round(max(b - a for a, b in zip([first] + times, times)), 3)

    @staticmethod
    def _epoch_s(logs: dict[str, TrainerLog]) -> Optional[float]:
        times = [t for log in logs.values() for t, _ in log.steps]
        return round(max(times) - min(times), 3) if times else None


def _settings() -> Settings:
    settings = Settings(**{f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Settings)})
    if _QUICK.value:
        return dataclasses.replace(settings, num_shards=24, timeout_s=20.0, restarts=2)
    return settings


def _cases() -> list[tuple[str, str]]:
    systems = _SYSTEMS_FLAG.value
    scenarios = _QUICK_SCENARIOS if _QUICK.value else _SCENARIOS_FLAG.value
    for name, given, valid in (
        ("systems", systems, _SYSTEMS),
        ("scenarios", scenarios, _SCENARIOS),
    ):
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise app.UsageError(f"Unknown {name} {unknown}. Valid {name}: {', '.join(valid)}")
    return [
        (system, scenario)
        for scenario in scenarios
        for system in systems
        if not (scenario == "data_worker_kill" and system.startswith("tfscale"))
        # tf.data restarts into one standby prepared ahead, so it restarts once.
        and not (scenario == "dispatcher_restarts" and system == "tf.data")
    ]


def _stats(values: list) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values), "n": len(values)}


_METRICS = ("duplicates", "missing", "relay_s", "stall_s", "epoch_s", "restart_s")


def _summarize(runs: list[dict]) -> dict:
    summary = {}
    for run in runs:
        summary.setdefault(f"{run['system']} | {run['scenario']}", []).append(run)
    return {
        key: {
            "system": group[0]["system"],
            "scenario": group[0]["scenario"],
            "runs": len(group),
            "outcomes": dict(collections.Counter(r["outcome"].split(":")[0] for r in group)),
            **{metric: _stats([r[metric] for r in group]) for metric in _METRICS},
        }
        for key, group in summary.items()
    }


def _plot(summary: dict, path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    rows = list(summary.values())
    scenarios = list(dict.fromkeys(row["scenario"] for row in rows))
    systems = list(dict.fromkeys(row["system"] for row in rows))
    palette = {"tfscale": "tab:blue", "tfscale-pipeline": "tab:green", "tf.data": "tab:orange"}
    width = 0.8 / len(systems)
    panels = (
        ("duplicates", "extra copies of ids trained more than once"),
        ("missing", "ids never trained"),
        ("stall_s", "longest time without a training step after a fault, s"),
        ("relay_s", "trainer kill -> its shard leased again (tfscale), s"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, (metric, title) in zip(axes.flat, panels):
        for i, system in enumerate(systems):
            for x, scenario in enumerate(scenarios):
                row = summary.get(f"{system} | {scenario}")
                if row is None:
                    continue
                stats, at = row[metric], x + (i - (len(systems) - 1) / 2) * width
                median = stats["median"] if stats else 0
                high = stats["max"] - median if stats else 0
                label = system if x == 0 else None
                ax.bar(at, median, width, yerr=[[0], [high]], color=palette[system], label=label)
                stalled = row["outcomes"].get("stalled", 0)
                note = (
                    "n/a"
                    if stats is None
                    else f"{stalled}/{row['runs']} stalled" if stalled else ""
                )
                ax.text(at, median, note, ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(scenarios)), [s.replace("+", "+\n") for s in scenarios], fontsize=8)
        ax.set_title(f"{title} (median, whisker: max)", fontsize=9)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("One epoch with faults: tfscale vs tf.data service DYNAMIC sharding")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(stats: Optional[dict], digits: int = 0) -> str:
    if stats is None:
        return "-"
    return f"{stats['median']:.{digits}f} ({stats['max']:.{digits}f})"


def _print_table(summary: dict) -> None:
    row_format = "{:16s} {:31s} {:14s} {:>12s} {:>13s} {:>11s} {:>11s} {:>11s} {:>11s}"
    print(row_format.format("system", "scenario", "outcomes", "dup med(max)", "miss med(max)",
                            "re-lease s", "stall s", "epoch s", "restart s"))  # fmt: skip
    for row in summary.values():
        outcomes = ",".join(f"{k}:{v}" for k, v in row["outcomes"].items())
        times = [_cell(row[m], 1) for m in ("relay_s", "stall_s", "epoch_s", "restart_s")]
        counts = [_cell(row["duplicates"]), _cell(row["missing"])]
        print(row_format.format(row["system"], row["scenario"], outcomes, *counts, *times))


def main(argv: list[str]) -> None:
    del argv
    settings = _settings()
    cases = _cases()
    repeats = 1 if _QUICK.value else _REPEATS.value
    os.makedirs(_OUT.value, exist_ok=True)
    scratch = (
        os.path.join(_OUT.value, "runs")
        if _KEEP_LOGS.value
        else tempfile.mkdtemp(prefix="tfscale-faults-")
    )
    shutil.rmtree(scratch, ignore_errors=True)
    runs = []
    try:
        for repeat in range(repeats):
            for system, scenario in cases:  # interleaved, so every case sees the same machine load
                run_dir = os.path.join(scratch, f"{system}-{scenario}-{repeat}")
                os.makedirs(run_dir)
                result = _Run(system, scenario, settings, run_dir).execute()
                result["repeat"] = repeat
                runs.append(result)
                print(
                    f"[{repeat + 1}/{repeats}] {system:16s} {scenario:32s} "
                    f"dup={result['duplicates']:<4d} miss={result['missing']:<4d} "
                    f"re-lease={result['relay_s']} stall={result['stall_s']} "
                    f"restart={result['restart_s']} {result['outcome']}",
                    flush=True,
                )
        journal = faults_restarts.journal_restarts(
            settings.snapshot_interval, os.path.join(scratch, "journal"), _QUICK.value
        )
    finally:
        if not _KEEP_LOGS.value:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = _summarize(runs)
    results = {
        "settings": dataclasses.asdict(settings),
        "repeats": repeats,
        "summary": summary,
        "runs": runs,
        "journal_restart": journal,
    }
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(summary, os.path.join(_OUT.value, "faults.png"))
    _print_table(summary)
    if journal:
        faults_restarts.plot(journal, os.path.join(_OUT.value, "journal_restart.png"))
        faults_restarts.print_table(journal)
    print(f"wrote {_OUT.value}/results.json and its plots")


if __name__ == "__main__":
    app.run(main)
