"""Dispatcher control plane: shards granted per second and acquire latency.

A `tfscale-dispatcher serve` subprocess (journal on: fsync per request, or
off: memory only) serves a job of many small shards; N client threads each
loop acquire(k) -> complete every lease. Reports, per (clients, k, journal),
the median over repetitions of grants/s and of the p50/p99 acquire latency.

  .venv/bin/python tools/bench/dispatcher_grant_rate.py --out=/tmp/bench_grants \\
      --clients=1,4,16,64 --shards_per_call=1,8 --seconds=3 --repeats=5
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags

from tfscale.data.dispatcher import client as client_lib

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/dispatcher_grant_rate", "Output directory.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "4", "16", "64"], "Concurrent clients.")
_K = flags.DEFINE_list("shards_per_call", ["1", "8"], "Shards asked per acquire.")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Measured time per run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repetitions (medians are reported).")


def _serve(journal: bool) -> tuple[subprocess.Popen, str]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    work_dir = tempfile.mkdtemp(prefix="grant-bench-") if journal else ""
    process = subprocess.Popen(
        [sys.executable, "-m", "tfscale.data.dispatcher", "serve", f"--work_dir={work_dir}",
         "--shards=range:200000:10", "--num_epochs=1000", "--lease_timeout_s=600", "--job=bench"],
        cwd=repo,
        env=dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return process, process.stdout.readline().split()[-1]


def _client_loop(address, name, k, stop, grants, latencies):
    client = client_lib.DispatcherClient(address)
    client.register_worker("bench", name)
    while not stop.is_set():
        start = time.perf_counter()
        result = client.acquire("bench", name, k)
        latencies.append(time.perf_counter() - start)
        grants.append(len(result.leases))
        for lease in result.leases:
            client.complete("bench", name, lease.token)
    client.close()


def _run(address: str, clients: int, k: int, seconds: float, tag: str) -> dict[str, float]:
    stop = threading.Event()
    grants: list[int] = []
    latencies: list[float] = []
    threads = [
        threading.Thread(target=_client_loop, args=(address, f"{tag}-{i}", k, stop, grants, latencies))
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # warm up: channels, registration
    grants.clear()
    latencies.clear()
    start = time.perf_counter()
    time.sleep(seconds)
    granted, measured = sum(grants), sorted(latencies)
    elapsed = time.perf_counter() - start
    stop.set()
    for thread in threads:
        thread.join()
    return {
        "grants_per_s": granted / elapsed,
        "p50_ms": 1000 * measured[len(measured) // 2],
        "p99_ms": 1000 * measured[min(len(measured) - 1, int(0.99 * len(measured)))],
    }


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    rows = []
    for journal in (True, False):
        process, address = _serve(journal)
        try:
            for clients in map(int, _CLIENTS.value):
                for k in map(int, _K.value):
                    runs = [
                        _run(address, clients, k, _SECONDS.value, f"j{journal}c{clients}k{k}r{r}")
                        for r in range(_REPEATS.value)
                    ]
                    row = {"journal": journal, "clients": clients, "shards_per_call": k}
                    for key in runs[0]:
                        row[key] = statistics.median(run[key] for run in runs)
                    rows.append(row)
                    print(
                        f"journal={'on ' if journal else 'off'} clients={clients:>3} k={k}: "
                        f"{row['grants_per_s']:8.0f} grants/s, acquire p50 {row['p50_ms']:.2f} ms, "
                        f"p99 {row['p99_ms']:.2f} ms",
                        flush=True,
                    )
        finally:
            process.terminate()
            process.wait()
    with open(os.path.join(_OUT.value, "dispatcher_grant_rate.json"), "w") as f:
        json.dump({"repeats": _REPEATS.value, "seconds": _SECONDS.value, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
