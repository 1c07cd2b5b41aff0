"""Restart time of a `tfscale-dispatcher` whose work_dir holds a long journal.

For `faults.py`. A journal of `--journal_records` records (a job, a worker,
then grant/completion pairs) is written in-process through `DispatcherCore`
and `Journal` (the dispatcher's own code, without fsync, so that writing it
is quick), in three work_dirs:

- `empty`: no journal; the cost of starting the process (Python, gRPC);
- `snapshots_off`: no snapshot; a restart replays every record;
- `snapshots_on`: a snapshot every `--snapshot_interval` records, the
  journal ending 2 records short of the next snapshot; a restart loads the
  newest snapshot and replays the records after it (the most it ever does).

Then `tfscale-dispatcher serve --work_dir=...` is started `--journal_repeats`
times per work_dir (the cases interleaved) and killed -9 once it listens.
`restart_s` is the time from starting the process to its printing
`tfscale-dispatcher listening on`; `recovery_s` is its median minus the
median of `empty`.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Optional

from absl import flags

from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import journal as journal_lib
from tfscale.data.dispatcher import shards
from tfscale.data.dispatcher import types

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CASES = ("empty", "snapshots_off", "snapshots_on")
# A snapshot interval no journal here reaches: snapshots off.
_NEVER = 2**62

_JOURNAL_RESTART = flags.DEFINE_bool(
    "journal_restart", True, "Also time dispatcher restarts with a long journal."
)
_JOURNAL_RECORDS = flags.DEFINE_integer(
    "journal_records", 200_000, "Records in the long journal.", lower_bound=2
)
_JOURNAL_REPEATS = flags.DEFINE_integer(
    "journal_repeats", 5, "Restarts timed per work_dir.", lower_bound=1
)


def write_journal(work_dir: str, records: int, snapshot_interval: int) -> dict:
    """Writes at least `records` journal records into `work_dir`; returns their counts."""
    journal = journal_lib.Journal(work_dir, fsync=False, snapshot_every=snapshot_interval)
    dispatcher = core.DispatcherCore(journal=journal)
    # Many epochs of few shards: grants never run out, the job state stays small.
    spec = types.JobSpec(
        name="audit", shards=tuple(shards.expand("range:1000:10")), num_epochs=types.MAX_EPOCHS
    )
    dispatcher.create_job(spec)
    dispatcher.register_worker("audit", "w0")
    written = 2
    # With snapshots, stop just short of the next one: the longest replay there is.
    short_of_snapshot = snapshot_interval - 2 if snapshot_interval <= records else 0
    while written < records or journal.records_since_snapshot < short_of_snapshot:
        (lease,) = dispatcher.acquire("audit", "w0", 1).leases
        dispatcher.complete("audit", "w0", lease.token)
        written += 2
    replayed = journal.records_since_snapshot
    journal.close()
    size = sum(os.path.getsize(os.path.join(work_dir, n)) for n in os.listdir(work_dir))
    return {"journal_records": written, "replayed_records": replayed, "work_dir_bytes": size}


def time_restart(work_dir: str, snapshot_interval: int, timeout_s: float = 120.0) -> float:
    """Seconds from starting `serve` on `work_dir` to its listening; then kills it -9."""
    env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="2")
    argv = ["-m", "tfscale.data.dispatcher", "serve", f"--work_dir={work_dir}"]
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, *argv, f"--snapshot_interval={snapshot_interval}"],
        cwd=_REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(timeout_s, process.kill)  # a hung start ends readline
    watchdog.start()
    try:
        line = process.stdout.readline()  # the line, or EOF once it died
        listening = time.monotonic() - started
        if "listening on" not in line:
            process.kill()
            tail = (process.stderr.read().strip().splitlines() or ["(empty)"])[-1]
            raise RuntimeError(f"serve --work_dir={work_dir} did not start: {tail[:300]}")
        return listening
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


def journal_restarts(snapshot_interval: int, scratch: str, quick: bool) -> Optional[dict]:
    """Times restarts per case (see the module docstring); None with --nojournal_restart."""
    if not _JOURNAL_RESTART.value:
        return None
    records = 2_000 if quick else _JOURNAL_RECORDS.value
    repeats = 1 if quick else _JOURNAL_REPEATS.value
    interval = min(snapshot_interval, records // 4) if quick else snapshot_interval
    intervals = {"empty": _NEVER, "snapshots_off": _NEVER, "snapshots_on": interval}
    results = {}
    for case in _CASES:
        work_dir = os.path.join(scratch, case)
        os.makedirs(work_dir)
        results[case] = {"snapshot_interval": None if intervals[case] == _NEVER else interval}
        if case == "empty":
            results[case].update(journal_records=0, replayed_records=0, work_dir_bytes=0)
        else:
            results[case].update(write_journal(work_dir, records, intervals[case]))
        results[case]["restart_s"] = []
    for _ in range(repeats):
        for case in _CASES:
            seconds = time_restart(os.path.join(scratch, case), intervals[case])
            results[case]["restart_s"].append(round(seconds, 3))
    baseline = statistics.median(results["empty"]["restart_s"])
    for row in results.values():
        row["median_restart_s"] = statistics.median(row["restart_s"])
        row["recovery_s"] = round(row["median_restart_s"] - baseline, 3)
    return results


def plot(results: dict, path: str) -> None:
    """Median restart time per case, with the records each restart replays."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, (case, row) in enumerate(results.items()):
        spread = [[row["median_restart_s"] - min(row["restart_s"])],
                  [max(row["restart_s"]) - row["median_restart_s"]]]  # fmt: skip
        ax.bar(x, row["median_restart_s"], 0.6, yerr=spread, color="tab:blue")
        note = f"{row['replayed_records']} replayed\nof {row['journal_records']}"
        ax.text(x, row["median_restart_s"], note, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), list(results))
    ax.margins(y=0.2)  # room for the notes above the bars
    ax.set_ylabel("process start -> listening, s (median, whiskers: min/max)")
    ax.set_title("tfscale-dispatcher restart with a long journal", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict) -> None:
    row_format = "{:14s} {:>9s} {:>9s} {:>10s} {:>10s} {:>11s}"
    print(row_format.format("journal", "records", "replayed", "MiB", "restart s", "recovery s"))
    for case, row in results.items():
        print(
            row_format.format(
                case,
                str(row["journal_records"]),
                str(row["replayed_records"]),
                f"{row['work_dir_bytes'] / 2**20:.1f}",
                f"{row['median_restart_s']:.3f}",
                f"{row['recovery_s']:.3f}",
            )
        )
