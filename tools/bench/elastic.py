"""Elastic training 2 -> 3 -> 2 nodes: how fast training resumes after a node joins and leaves.

Three "nodes" on this host, each a `tfscale-launch --nnodes=2:3` process
with one `tfscale-train` worker (`multi_worker_mirrored`, one logical CPU,
the default config's 24,000 examples): nodes A and B start; after
`--epochs_per_phase` epochs, node C starts (a join); after as many more at
3 nodes and 3/4 of a step-checkpoint interval, node C's launcher is killed
with SIGKILL (a leave that only missed heartbeats reveal). For each change
the script times, from the event:

- `round_s`: until node A's launcher starts the new round's workers;
- `fit_start_s`: until rank 0 begins an epoch in the new round (the model
  built, the checkpoint restored);
- `resume_s`: until rank 0 finished its first step in the new round (the
  input skipped to the checkpoint's position, the step compiled: training
  has resumed);
- `steps_lost`: the step where the old round's workers stopped minus the
  step the new round restored. For the join, the stop is their agreed
  SIGTERM checkpoint (target: 0 lost). For the kill -9 it is the last step
  rank 0 logged before the new round (the workers log every step,
  `--config.training.log_every_steps=1`: after the kill no step completes,
  its all-reduce lacks a worker), and the new round restores the latest
  step checkpoint (target: at most `--checkpoint_every_steps` lost).

With `--input=dispatcher` (the default), the workers read the train split's
16 shards through a `tfscale-dispatcher` process on this host: each
restart rewinds the job to the checkpoint's position, joined over the
workers that wrote it, and re-balances the rest over the new members.

At the end it reads `metrics.json`: every configured epoch trained once
(the history has each epoch), the global batch kept
(`--config.training.resize=keep_global_batch`), the workers of the last
run, and with the dispatcher the input audit (`input_audit`: the ledger of
the element ranges that trained the final model; per epoch of the job, 0
duplicated and 0 missing elements and shards). Target (issue): training
resumes within 20 s of each change.
The scenario runs `--repeats` times (3); `results.json` has the medians and
every run's figures (`runs`), each run's node logs are in `run<k>/`.

  .venv/bin/python tools/bench/elastic.py --out=/tmp/tfscale_bench/elastic
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/elastic", "Output directory.")
_EPOCHS = flags.DEFINE_integer("epochs", 12, "Epochs to train (250 steps each).")
_EPOCHS_PER_PHASE = flags.DEFINE_integer(
    "epochs_per_phase", 3, "Epochs trained at each size before the next change."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_float(
    "heartbeat_timeout_s", 5.0, "The launchers' --heartbeat_timeout_s (a killed node's delay)."
)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every_steps", 50, "Step checkpoints: what a kill -9 loses at most."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs; the figures are their medians.")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", 0, "Steps per epoch (0: the whole train split, 250 steps)."
)
_TIMEOUT = flags.DEFINE_float("timeout_s", 600.0, "Give up after this long.")
_INPUT = flags.DEFINE_enum(
    "input",
    "dispatcher",
    ["dispatcher", "plain"],
    "dispatcher: the shards leased by a tfscale-dispatcher process; plain: every worker "
    "reads the seeded stream.",
)

# Rank 0's progress line, `step N: ...` (`--config.training.log_every_steps`).
_STEP_LINE = r"\] step (\d+): "
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET_S = 20.0


class _Node:
    """One launcher process; its console lines, timestamped, as they come."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]):
        self.name = name
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), line.rstrip()))

    def last_epoch(self) -> int:
        """The last epoch rank 0 began, from its `Epoch k/E` lines (0: none yet)."""
        with self._lock:
            epochs = [
                int(line.split("Epoch ", 1)[1].split("/", 1)[0])
                for _, line in self.lines
                if line.startswith("[0] Epoch ")
            ]
        return max(epochs, default=0)

    def wait_for_epoch(self, epoch: int, timeout_s: float) -> None:
        """Waits until rank 0 began `epoch` (or the node exited)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.last_epoch() >= epoch:
                return
            time.sleep(0.1)

    def wait_for_step(self, step: int, after: float, timeout_s: float) -> None:
        """Waits until rank 0 logged `step` or a later one (its `step N:` lines)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            latest = self.step(_STEP_LINE, after, time.monotonic() + 1, last=True)
            if latest is not None and latest >= step:
                return
            time.sleep(0.05)

    def wait_for(self, text: str, after: float, timeout_s: float) -> float:
        """The time of the first line containing `text` printed after `after`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                for at, line in self.lines:
                    if at >= after and text in line:
                        return at
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        tail = "\n".join(line for _, line in self.lines[-30:])
        raise RuntimeError(f"node {self.name}: no line with {text!r} in time; last lines:\n{tail}")

    def step(self, pattern: str, after: float, before: float, last: bool) -> Optional[int]:
        """The step in rank 0's first (or last) line matching `pattern` between the times."""
        with self._lock:
            found = [
                int(match.group(1))
                for at, line in self.lines
                if after <= at < before and line.startswith("[0] ")
                for match in [re.search(pattern, line)]
                if match
            ]
        if not found:
            return None
        return found[-1] if last else found[0]


def _change(
    a: "_Node",
    event_at: float,
    round_number: int,
    timeout_s: float,
    restores: bool = True,
    killed: bool = False,
) -> dict:
    """Times one change: a first start (`restores=False`), a join, or a kill -9 (`killed`)."""
    started = a.wait_for(f"round {round_number}:", event_at, timeout_s)
    fit_started = a.wait_for("[0] Epoch ", started, timeout_s)
    # The first step after the restore done (the input skipped, the step compiled).
    resumed = a.wait_for("Resumed training: step", started, timeout_s) if restores else fit_started
    # Where the old round's workers stopped (a SIGTERM checkpoint: none after a
    # kill -9) and the step the new round restored.
    if killed:  # no checkpoint at the stop: the last step logged before the round
        stopped = a.step(_STEP_LINE, 0.0, started, last=True)
    else:
        stopped = a.step(r"stopped after step (\d+)", event_at, started, last=True)
    restored = a.step(r"Restored .*\(step (\d+)\)", started, resumed + 1e-3, last=False)
    return {
        "round_s": started - event_at,
        "fit_start_s": fit_started - event_at,
        "resume_s": resumed - event_at,
        "stopped_step": stopped,
        "restored_step": restored,
        "steps_lost": None if stopped is None or restored is None else stopped - restored,
    }


def main(argv: list[str]) -> None:
    del argv
    sys.path.insert(0, REPO)
    os.makedirs(_OUT.value, exist_ok=True)
    runs = []
    for repeat in range(_REPEATS.value):
        run_dir = os.path.join(_OUT.value, f"run{repeat}")
        os.makedirs(run_dir, exist_ok=True)
        runs.append(_run_once(run_dir))
    medians = {
        change: {
            key: _median([run[change][key] for run in runs])
            for key in ("round_s", "fit_start_s", "resume_s")
        }
        for change in ("first_start", "join", "leave")
    }
    results = {
        "epochs": _EPOCHS.value,
        "heartbeat_timeout_s": _HEARTBEAT_TIMEOUT.value,
        "checkpoint_every_steps": _CHECKPOINT_EVERY.value,
        "repeats": len(runs),
        # Medians over the runs; each run's figures under "runs".
        **medians,
        "runs": runs,
        "targets": {
            # On the medians; `runs_within_20_s` counts the runs that met it.
            "resume_within_20_s": max(medians["join"]["resume_s"], medians["leave"]["resume_s"])
            <= TARGET_S,
            "runs_within_20_s": sum(run["targets"]["resume_within_20_s"] for run in runs),
            "every_epoch_trained_once": all(
                run["targets"]["every_epoch_trained_once"] for run in runs
            ),
            "exit_codes_zero": all(run["targets"]["exit_codes_zero"] for run in runs),
            "join_loses_no_step": all(run["targets"]["join_loses_no_step"] for run in runs),
            "kill_loses_at_most_an_interval": all(
                run["targets"]["kill_loses_at_most_an_interval"] for run in runs
            ),
        },
    }
    if _INPUT.value == "dispatcher":
        results["targets"]["input_audit_exact"] = all(
            run["targets"]["input_audit_exact"] for run in runs
        )
    results["input"] = _INPUT.value
    with open(os.path.join(_OUT.value, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    _plot(results, os.path.join(_OUT.value, "elastic.png"))
    print(json.dumps(results["targets"]))
    print(f"wrote {_OUT.value}/results.json and elastic.png")


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _run_once(out: str) -> dict:
    """One 2 -> 3 -> 2 run; its logs go to `out`."""
    from tfscale.strategies import cluster  # pylint: disable=import-outside-toplevel

    workdir = tempfile.mkdtemp(prefix="elastic-", dir=out)
    port = cluster.free_port()
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    dispatcher = None
    if _INPUT.value == "dispatcher":
        dispatcher = subprocess.Popen(
            [sys.executable, "-m", "tfscale.data.dispatcher", "serve"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    launch = [
        sys.executable,
        "-m",
        "tfscale.launch",
        "--nnodes=2:3",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        f"--heartbeat_timeout_s={_HEARTBEAT_TIMEOUT.value}",
        "--max_restarts=3",
        "--log_ranks=0",
        "--",
        sys.executable,
        "-m",
        "tfscale.train",
        "--config=configs/default.py",
        "--config.data.max_eval_examples=960",
        f"--workdir={workdir}",
        "--config.distribution.kind=multi_worker_mirrored",
        "--config.devices.virtual_cpus=1",
        f"--config.training.epochs={_EPOCHS.value}",
        "--config.training.verbose=2",
        "--config.training.resize=keep_global_batch",
        f"--config.training.checkpoint_every_steps={_CHECKPOINT_EVERY.value}",
        # A line per step: the step a kill -9 stopped at is in the log.
        "--config.training.log_every_steps=1",
        # Divisible by 2 and by 3 workers: kept at every size.
        "--config.training.global_batch_size=96",
    ]
    if _STEPS_PER_EPOCH.value:
        launch.append(f"--config.training.steps_per_epoch={_STEPS_PER_EPOCH.value}")
    if dispatcher is not None:
        address = dispatcher.stdout.readline().split()[-1]
        launch.append(f"--config.data.dispatcher.address={address}")
    nodes: list[_Node] = []
    timeout = _TIMEOUT.value
    try:
        start = time.monotonic()
        a = _Node("A", launch, env)
        nodes.append(a)
        # A serves the rendezvous and joins first: rank 0 is A's worker, on A's console.
        a.wait_for("rendezvous on", start, timeout)
        time.sleep(1.0)
        nodes.append(_Node("B", launch, env))
        first = _change(a, start, 0, timeout, restores=False)
        print(f"2 nodes: training after {first['resume_s']:.1f} s", flush=True)
        a.wait_for_epoch(_EPOCHS_PER_PHASE.value, timeout)

        joined = time.monotonic()
        c = _Node("C", launch, env)
        nodes.append(c)
        join = _change(a, joined, 1, timeout)
        print(
            f"join: new round after {join['round_s']:.1f} s, training after "
            f"{join['resume_s']:.1f} s; stopped after step {join['stopped_step']}, "
            f"restored step {join['restored_step']}",
            flush=True,
        )
        a.wait_for_epoch(a.last_epoch() + _EPOCHS_PER_PHASE.value, timeout)
        # Mid-way between two step checkpoints: 3/4 of an interval is lost.
        epoch_began = time.monotonic()
        at_epoch = a.step(_STEP_LINE, 0.0, epoch_began, last=True) or 0
        a.wait_for_step(at_epoch + (3 * _CHECKPOINT_EVERY.value) // 4, epoch_began, timeout)

        c.process.send_signal(signal.SIGKILL)
        left = time.monotonic()
        leave = _change(a, left, 2, timeout, killed=True)
        print(
            f"leave (SIGKILL): new round after {leave['round_s']:.1f} s, training after "
            f"{leave['resume_s']:.1f} s; last step {leave['stopped_step']}, restored step "
            f"{leave['restored_step']}",
            flush=True,
        )
        codes = [n.process.wait(timeout=timeout) for n in nodes[:2]]
        total_s = time.monotonic() - start
    finally:
        if dispatcher is not None:
            dispatcher.kill()
        for node in nodes:
            if node.process.poll() is None:
                node.process.kill()
            with open(os.path.join(out, f"node-{node.name}.log"), "w") as f:
                f.writelines(f"{at - start:9.3f} {line}\n" for at, line in node.lines)
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    epochs = [h["epoch"] for h in metrics["history"]]
    results = {
        "first_start": first,
        "join": join,
        "leave": leave,
        "exit_codes": codes,
        "total_s": total_s,
        "history_epochs": epochs,
        "global_batch_size": metrics["global_batch_size"],
        "last_run_workers": metrics.get("workers"),
        "resumed_from_epoch": metrics.get("resumed_from_epoch"),
        "targets": {
            "resume_within_20_s": max(join["resume_s"], leave["resume_s"]) <= TARGET_S,
            "every_epoch_trained_once": epochs == list(range(1, _EPOCHS.value + 1)),
            "exit_codes_zero": codes == [0, 0],
            # The join's SIGTERM checkpoint is where the next round starts.
            "join_loses_no_step": join["steps_lost"] == 0,
            # A kill -9 loses at most the steps since the last step checkpoint.
            "kill_loses_at_most_an_interval": leave["steps_lost"] is not None
            and 0 <= leave["steps_lost"] <= _CHECKPOINT_EVERY.value,
        },
    }
    audit = metrics.get("input_audit")
    if audit is not None:
        results["input_audit"] = audit
        results["targets"]["input_audit_exact"] = all(
            e["duplicated_elements"] == e["missing_elements"] == 0
            and e["duplicated_shards"] == e["missing_shards"] == 0
            for e in audit["epochs"]
        ) and bool(audit["epochs"])
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def _plot(results: dict, path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    names = ["join (2 -> 3)", "leave, SIGKILL (3 -> 2)"]
    rounds = [results["join"]["round_s"], results["leave"]["round_s"]]
    resumes = [results["join"]["resume_s"], results["leave"]["resume_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], rounds, width=0.4, label="new round started")
    ax.bar([i + 0.2 for i in x], resumes, width=0.4, label="training resumed")
    ax.axhline(TARGET_S, color="tab:red", linestyle="--", linewidth=1, label="target 20 s")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("seconds after the change")
    ax.set_title(
        f"Elastic launch on one host, heartbeat timeout {results['heartbeat_timeout_s']:.0f} s "
        f"(median of {results['repeats']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
