"""Dispatcher control plane: grants per second and acquire latency, against tf.data service.

tfscale: each run starts a fresh `tfscale-dispatcher serve` subprocess (journal
on: fsync before each answer; off: memory only) whose job has `--splits`
shards; N client threads each loop over grants of k shards, in one of two
shapes (`--grant_modes`):

- `one_trip` (the headline figure; what `LeaseFeed` does): one Acquire per
  grant, `acquire(k, claim="commit", complete=<the previous grant's
  tokens>)`: the leases are committed at grant and the previous grant's
  completions ride on the same round trip (1 RPC per k grants);
- `per_call` (the old shape, kept for comparison): `acquire(k)`, then one
  Complete RPC per lease (1 + k RPCs per k grants).

After a 0.5 s warm-up, grants/s and the p50/p99 acquire latency are
measured over `--seconds`.

tf.data service: each run starts, in a helper subprocess (this script with
`--tf_data_helper`), a fresh `DispatchServer` (journal on: `fault_tolerant_mode`
with a work_dir) and N `WorkerServer`s, and one consumer iterates
`Dataset.range(splits).batch(256)` distributed with
`processing_mode="distributed_epoch"` (dynamic sharding). `range` makes every
element one split and each split is one `GetSplit` RPC from a worker to the
dispatcher, so there the workers are the dispatcher's clients: a "client" is a
`WorkerServer`. Batching on the workers keeps the consumer's own traffic
negligible. Splits/s is `splits` over the time from creating the iterator to
the last split's arrival at the consumer; it includes starting the job, so it
errs low, in tfscale's favour. A tf.data split needs no completion RPC; a
tfscale grant's completion rides on the next acquire (`one_trip`) or costs
its own RPC (`per_call`, k=8: 1 acquire + 8 completes per 8 grants).

Each repetition visits every (journal, clients) cell and runs tfscale in
each mode at each k and tf.data service back to back (which goes first
alternates), so all see the same machine load. Reported: medians over
repetitions; per cell, the ratio tfscale grants/s at the largest k (8) /
tf.data service splits/s for each mode (median of the per-repetition
ratios; target >= 10x, judged on `one_trip`), and the p99 acquire latency at
the most clients (64), journal on, largest k, `one_trip` (target < 10 ms).

The README's figures:

  .venv/bin/python tools/bench/dispatcher_grant_rate.py \\
      --out=/tmp/tfscale_bench/dispatcher_grant_rate --clients=1,4,16,64 \\
      --shards_per_call=1,8 --seconds=1.5 --repeats=5 --splits=20000

Smoke test (under a minute):

  .venv/bin/python tools/bench/dispatcher_grant_rate.py --out=/tmp/tfscale_bench/grant_rate_quick \\
      --clients=1,64 --shards_per_call=8 --seconds=1 --repeats=1 --splits=5000
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
from typing import Iterator

from absl import app
from absl import flags

from tfscale.data.dispatcher import client as client_lib

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/dispatcher_grant_rate", "Output directory.")
_CLIENTS = flags.DEFINE_list(
    "clients", ["1", "4", "16", "64"], "Concurrent clients (tf.data: workers)."
)
_K = flags.DEFINE_list("shards_per_call", ["1", "8"], "Shards asked per acquire.")
ONE_TRIP = "one_trip"
PER_CALL = "per_call"
MODES = (ONE_TRIP, PER_CALL)
_MODE_LABELS = {
    ONE_TRIP: "1 round trip (acquire + claim + piggybacked completes)",
    PER_CALL: "per call (old: acquire, then k completes)",
}
_MODES = flags.DEFINE_list(
    "grant_modes",
    list(MODES),
    f"tfscale grant shapes, of {', '.join(MODES)} (the first given is the headline).",
)
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Measured time per tfscale run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repetitions (medians are reported).")
_SPLITS = flags.DEFINE_integer(
    "splits", 20_000, "Shards of the tfscale job = splits of the tf.data job."
)
_TF_DATA_HELPER = flags.DEFINE_bool(
    "tf_data_helper", False, "Internal: serve tf.data service runs."
)

Row = dict[str, Any]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ENV = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="3")
_JOB = "bench"
_WARM_UP_S = 0.5
_TF_DATA_BATCH = 256
_RESULT = "RESULT "
_RATIO_TARGET = 10.0
_P99_TARGET_MS = 10.0


# --- tfscale -------------------------------------------------------------------


@contextlib.contextmanager
def _tfscale_server(journal: bool, splits: int) -> Iterator[str]:
    """Yields the address of a fresh dispatcher serving `splits` shards of 10 elements."""
    with tempfile.TemporaryDirectory(prefix="grant-bench-") as work_dir:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tfscale.data.dispatcher",
                "serve",
                f"--work_dir={work_dir if journal else ''}",
                f"--shards=range:{10 * splits}:10",
                "--num_epochs=1000",
                "--lease_timeout_s=600",
                f"--job={_JOB}",
            ],
            cwd=_REPO,
            env=_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"tfscale-dispatcher exited with {process.wait()} before listening"
                )
            yield line.split()[-1]
        finally:
            process.terminate()
            process.wait()


def _client_loop(
    address: str,
    name: str,
    k: int,
    mode: str,
    stop: threading.Event,
    grants: list[int],
    latencies: list[float],
    rejected: list[int],
) -> None:
    client = client_lib.DispatcherClient(address)
    client.register_worker(_JOB, name)
    due: list[int] = []  # one_trip: the previous grant's tokens, completed by the next acquire
    while not stop.is_set():
        start = time.perf_counter()
        if mode == ONE_TRIP:
            result = client.acquire(_JOB, name, k, claim="commit", complete=due)
        else:
            result = client.acquire(_JOB, name, k)
        latencies.append(time.perf_counter() - start)
        grants.append(len(result.leases))
        rejected.append(len(result.rejected))
        if mode == ONE_TRIP:
            due = [lease.token for lease in result.leases]
        else:
            for lease in result.leases:
                client.complete(_JOB, name, lease.token)
    client.close()


def _tfscale_run(journal: bool, clients: int, k: int, mode: str) -> dict[str, float]:
    """Grants/s and acquire latency of `clients` threads on a fresh dispatcher."""
    with _tfscale_server(journal, _SPLITS.value) as address:
        stop = threading.Event()
        grants: list[int] = []
        latencies: list[float] = []
        rejected: list[int] = []
        threads = [
            threading.Thread(
                target=_client_loop,
                args=(address, f"c{i}", k, mode, stop, grants, latencies, rejected),
            )
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        time.sleep(_WARM_UP_S)  # channels, registration
        grants.clear()
        latencies.clear()
        start = time.perf_counter()
        time.sleep(_SECONDS.value)
        granted, measured = sum(grants), sorted(latencies)
        elapsed = time.perf_counter() - start
        stop.set()
        for thread in threads:
            thread.join()
    return {
        "grants_per_s": granted / elapsed,
        "p50_ms": 1000 * measured[len(measured) // 2],
        "p99_ms": 1000 * measured[min(len(measured) - 1, int(0.99 * len(measured)))],
        "rejected": sum(rejected),  # completions the dispatcher refused: should be 0
    }


# --- tf.data service -------------------------------------------------------------


class _TfDataService:
    """tf.data service runs, each in a fresh cluster inside one helper subprocess.

    Args:
      log_path: where the helper's stderr goes.
    """

    def __init__(self, log_path: str):
        self._log = open(log_path, "w")
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--tf_data_helper"],
            cwd=_REPO,
            env=_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._read()  # TensorFlow imported: later runs do not share the machine with that

    def run(self, workers: int, journal: bool, splits: int) -> dict[str, float]:
        request = {"workers": workers, "journal": journal, "splits": splits}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        return self._read()

    def close(self) -> None:
        # Killed, not asked to stop: workers of past runs may still be shutting down.
        self._process.kill()
        self._process.wait()
        self._log.close()

    def _read(self) -> dict[str, Any]:
        for line in self._process.stdout:
            if line.startswith(_RESULT):
                return json.loads(line[len(_RESULT) :])
        raise RuntimeError(f"The tf.data service helper exited; see {self._log.name}")


def _tf_data_helper() -> None:
    """The helper's loop: one JSON request per stdin line, one result per stdout line."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    print(_RESULT + "{}", flush=True)
    stopping = threading.Thread()
    stopping.start()
    for line in sys.stdin:
        stopping.join()  # The last cluster, stopped while tfscale ran, slows a new one down.
        result, cluster = _tf_data_run(tf, **json.loads(line))
        print(_RESULT + json.dumps(result), flush=True)
        stopping = threading.Thread(target=_stop, args=cluster)
        stopping.start()


def _tf_data_run(
    tf: Any, workers: int, journal: bool, splits: int
) -> tuple[dict[str, float], tuple]:
    """Splits/s of one `distributed_epoch` pass over `range(splits)` on a fresh cluster.

    Returns:
      The result, and the (dispatcher, workers, work_dir) to hand to `_stop`.
    """
    service = tf.data.experimental.service
    work_dir = tempfile.mkdtemp(prefix="tf-data-bench-")
    dispatcher = service.DispatchServer(
        service.DispatcherConfig(
            fault_tolerant_mode=journal, work_dir=work_dir if journal else None
        )
    )
    address = dispatcher.target.split("://")[-1]
    servers = [
        service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
        for _ in range(workers)
    ]
    dataset = (
        tf.data.Dataset.range(splits)
        .batch(_TF_DATA_BATCH)
        .apply(service.distribute("distributed_epoch", dispatcher.target, job_name=_JOB))
    )
    start = time.perf_counter()
    received, first, last = 0, None, None
    iterator = iter(dataset)
    for batch in iterator:
        last = time.perf_counter()
        first = first or last
        received += int(batch.shape[0])
        if received >= splits:
            break  # Do not wait for the end-of-sequence round trips.
    del iterator  # Ends the job's reads before its workers stop.
    result = {
        "splits_per_s": splits / (last - start),
        "first_element_s": first - start,
        "splits": received,
    }
    return result, (dispatcher, servers, work_dir)


def _stop(dispatcher: Any, workers: list[Any], work_dir: str) -> None:
    """Stops the workers (together: 64 take seconds, nearly all idle), then the dispatcher."""
    # pylint: disable=protected-access
    stoppers = [threading.Thread(target=worker._stop) for worker in workers]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    dispatcher._stop()
    shutil.rmtree(work_dir, ignore_errors=True)


# --- report -----------------------------------------------------------------------


def _median_row(keys: dict[str, Any], runs: list[dict[str, float]]) -> Row:
    row = dict(keys)
    for key in runs[0]:
        row[key] = statistics.median(run[key] for run in runs)
    row["runs"] = runs
    return row


def _targets(
    tfscale: list[Row], ratios: list[Row], k: int, clients: int, mode: str
) -> dict[str, Any]:
    ratio_values = [row["ratio"] for row in ratios if row["mode"] == mode]
    p99 = next(
        r["p99_ms"]
        for r in tfscale
        if r["journal"]
        and r["clients"] == clients
        and r["shards_per_call"] == k
        and r["mode"] == mode
    )
    return {
        "mode": mode,
        "ratio_target": _RATIO_TARGET,
        "ratio_shards_per_call": k,
        "ratio_min": min(ratio_values),
        "ratio_max": max(ratio_values),
        "ratio_met": min(ratio_values) >= _RATIO_TARGET,
        "p99_target_ms": _P99_TARGET_MS,
        "p99_clients": clients,
        "p99_shards_per_call": k,
        "p99_journal_ms": p99,
        "p99_met": p99 < _P99_TARGET_MS,
    }


def _plot(results: dict[str, Any], path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, (rate, tail) = plt.subplots(1, 2, figsize=(14, 7))
    series = [
        (m, k)
        for m in results["config"]["grant_modes"]
        for k in results["config"]["shards_per_call"]
    ]
    colors = {key: f"C{i}" for i, key in enumerate(series)}
    for journal, style in ((True, "-"), (False, "--")):
        label = "journal on" if journal else "journal off"
        for (mode, k), color in colors.items():
            rows = [
                r
                for r in results["tfscale"]
                if r["journal"] == journal and r["shards_per_call"] == k and r["mode"] == mode
            ]
            clients = [r["clients"] for r in rows]
            name = f"tfscale k={k} {_MODE_LABELS[mode]}, {label}"
            rate.plot(
                clients,
                [r["grants_per_s"] for r in rows],
                style,
                color=color,
                marker="o",
                label=name,
            )
            tail.plot(
                clients, [r["p99_ms"] for r in rows], style, color=color, marker="o", label=name
            )
        rows = [r for r in results["tf_data_service"] if r["journal"] == journal]
        rate.plot(
            [r["clients"] for r in rows],
            [r["splits_per_s"] for r in rows],
            style,
            marker="s",
            color="black",
            label=f"tf.data service splits/s, {label}",
        )
    tail.axhline(_P99_TARGET_MS, color="red", linestyle=":", linewidth=1, label="target")
    rate.set_ylabel("grants/s (tf.data service: splits/s)")
    rate.set_title("Throughput, median over repetitions")
    tail.set_ylabel("p99 acquire latency (ms)")
    tail.set_yscale("log")
    tail.set_title("tfscale acquire latency, p99")
    for ax in (rate, tail):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["config"]["clients"], [str(c) for c in results["config"]["clients"]])
        ax.set_xlabel("clients (tf.data service: workers)")
    # One legend for both panels, below them (the throughput panel has every series).
    handles, labels = rate.get_legend_handles_labels()
    target = tail.get_legend_handles_labels()
    fig.legend(
        handles + target[0][-1:], labels + target[1][-1:], loc="lower center", ncol=2, fontsize=7
    )
    config = results["config"]
    fig.suptitle(
        f"{config['splits']} splits, {config['repeats']} repetitions, {config['cpus']} CPUs"
    )
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


_SHORT = {ONE_TRIP: "1trip", PER_CALL: "percall"}


def _print_table(results: dict[str, Any]) -> None:
    ks = results["config"]["shards_per_call"]
    modes = results["config"]["grant_modes"]
    kr = results["targets"]["ratio_shards_per_call"]
    print("; ".join(f"{_SHORT[m]}: {_MODE_LABELS[m]}" for m in modes))
    header = f"{'journal':8s}{'clients':>8s}"
    for mode in modes:
        for k in ks:
            header += f" | {f'{_SHORT[mode]} k={k} grants/s':>22s} {'p50 ms':>7s} {'p99 ms':>7s}"
    header += f" | {'tf.data splits/s':>16s}"
    for mode in modes:
        header += f" | {f'{_SHORT[mode]} k={kr} / tf.data':>21s}"
    print(header)
    tfscale = {
        (r["journal"], r["clients"], r["shards_per_call"], r["mode"]): r for r in results["tfscale"]
    }
    tf_data = {(r["journal"], r["clients"]): r for r in results["tf_data_service"]}
    ratios = {(r["journal"], r["clients"], r["mode"]): r for r in results["ratios"]}
    for journal, clients in tf_data:
        line = f"{'on' if journal else 'off':8s}{clients:>8d}"
        for mode in modes:
            for k in ks:
                row = tfscale[journal, clients, k, mode]
                line += (
                    f" | {row['grants_per_s']:>22.0f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f}"
                )
        line += f" | {tf_data[journal, clients]['splits_per_s']:>16.0f}"
        for mode in modes:
            line += f" | {ratios[journal, clients, mode]['ratio']:>20.2f}x"
        print(line)
    t = results["targets"]
    print(
        f"target: tfscale {t['mode']} k={kr} grants/s / tf.data service splits/s >= "
        f"{t['ratio_target']:.0f}x: "
        f"{t['ratio_min']:.2f}x..{t['ratio_max']:.2f}x -> {_verdict(t['ratio_met'])}"
    )
    print(
        f"target: p99 acquire at {t['p99_clients']} clients, journal on, {t['mode']}, "
        f"k={t['p99_shards_per_call']} < {t['p99_target_ms']:.0f} ms: "
        f"{t['p99_journal_ms']:.2f} ms -> {_verdict(t['p99_met'])}"
    )
    rejected = sum(run["rejected"] for r in results["tfscale"] for run in r["runs"])
    if rejected:
        print(f"WARNING: the dispatcher rejected {rejected} completions (expected none)")


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


# --- main ---------------------------------------------------------------------------


class _Runs:
    """Every run's figures, per (journal, clients) cell, filled one repetition at a time."""

    def __init__(self, clients: list[int], ks: list[int], modes: list[str]):
        self.ks = ks
        self.modes = modes
        self.ratio_k = 8 if 8 in ks else max(ks)
        self.cells = [(journal, c) for journal in (True, False) for c in clients]
        self.tfscale: dict[tuple[bool, int, int, str], list] = {
            (j, c, k, m): [] for j, c in self.cells for m in modes for k in ks
        }
        self.tf_data: dict[tuple[bool, int], list] = {cell: [] for cell in self.cells}
        self.ratios: dict[tuple[bool, int, str], list] = {
            (j, c, m): [] for j, c in self.cells for m in modes
        }

    def measure(self, repeat: int, tf_data: _TfDataService) -> None:
        """Runs each cell's tfscale and tf.data service runs back to back."""
        for journal, clients in self.cells:
            steps = [("tfscale", k, m) for m in self.modes for k in self.ks]
            steps.append(("tf.data", 0, ""))
            if repeat % 2:  # Neither always runs first.
                steps = steps[-1:] + steps[:-1]
            for kind, k, mode in steps:
                if kind == "tfscale":
                    run = _tfscale_run(journal, clients, k, mode)
                    self.tfscale[journal, clients, k, mode].append(run)
                else:
                    run = tf_data.run(clients, journal, _SPLITS.value)
                    self.tf_data[journal, clients].append(run)
            self._report(repeat, journal, clients)

    def _report(self, repeat: int, journal: bool, clients: int) -> None:
        splits_per_s = self.tf_data[journal, clients][-1]["splits_per_s"]
        granted = {
            (m, k): self.tfscale[journal, clients, k, m][-1] for m in self.modes for k in self.ks
        }
        for mode in self.modes:
            ratio = granted[mode, self.ratio_k]["grants_per_s"] / splits_per_s
            self.ratios[journal, clients, mode].append({"ratio": ratio})
        figures = ", ".join(
            f"{_SHORT[m]} k={k} {g['grants_per_s']:.0f} grants/s p99 {g['p99_ms']:.2f} ms"
            for (m, k), g in granted.items()
        )
        print(
            f"repeat {repeat + 1} journal={'on ' if journal else 'off'} clients={clients:>3}: "
            f"{figures}; tf.data service {splits_per_s:.0f} splits/s",
            flush=True,
        )

    def results(self) -> dict[str, Any]:
        clients = sorted({c for _, c in self.cells})
        results = {
            "config": {
                "clients": clients,
                "shards_per_call": self.ks,
                "grant_modes": self.modes,
                "grant_mode_labels": {m: _MODE_LABELS[m] for m in self.modes},
                "seconds": _SECONDS.value,
                "repeats": _REPEATS.value,
                "splits": _SPLITS.value,
                "tf_data_batch": _TF_DATA_BATCH,
                "cpus": os.cpu_count(),
            },
            "tfscale": [
                _median_row({"journal": j, "clients": c, "shards_per_call": k, "mode": m}, runs)
                for (j, c, k, m), runs in self.tfscale.items()
            ],
            "tf_data_service": [
                _median_row({"journal": j, "clients": c}, runs)
                for (j, c), runs in self.tf_data.items()
            ],
            "ratios": [
                _median_row(
                    {"journal": j, "clients": c, "shards_per_call": self.ratio_k, "mode": m}, runs
                )
                for (j, c, m), runs in self.ratios.items()
            ],
        }
        results["targets"] = _targets(
            results["tfscale"], results["ratios"], self.ratio_k, max(clients), self.modes[0]
        )
        return results


def main(argv: list[str]) -> None:
    del argv
    if _TF_DATA_HELPER.value:
        _tf_data_helper()
        return
    modes = list(dict.fromkeys(_MODES.value))
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise app.UsageError(f"Unknown --grant_modes {unknown}. Valid: {', '.join(MODES)}")
    runs = _Runs([int(c) for c in _CLIENTS.value], [int(k) for k in _K.value], modes)
    os.makedirs(_OUT.value, exist_ok=True)
    tf_data = _TfDataService(os.path.join(_OUT.value, "tf_data_service.log"))
    try:
        for repeat in range(_REPEATS.value):
            runs.measure(repeat, tf_data)
    finally:
        tf_data.close()
    results = runs.results()
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    _plot(results, os.path.join(_OUT.value, "dispatcher_grant_rate.png"))
    _print_table(results)
    print(f"wrote {_OUT.value}/results.json and dispatcher_grant_rate.png")


if __name__ == "__main__":
    app.run(main)
