"""Serving throughput and latency: one replica with and without batching, N behind the router.

A closed-loop gRPC client (C threads, each sending one batch-1 `Predict` of
the project's lenet, random weights saved as `.keras`, and waiting for the
answer) drives, for each C in `--concurrency`, these setups (`--setups`):

- `single_nobatching`: one `tfscale-serve replica --nobatching` (TF
  Serving's default shape: each request runs alone on its gRPC thread);
- `single_batching`: one replica with dynamic batching;
- `router_<policy>`: `--replicas` batching replicas behind `tfscale-serve
  --replica_addresses=...`, for each of the four policies;
- `slow_<policy>`: the same with one replica `--slowdown=5` (`--slowdown`),
  for least_loaded, round_robin and power_of_two.

Per (setup, C): throughput, client-side p50/p90/p99 latency and, apart, the
replica's `tfscale-queue-ms` and `tfscale-compute-ms` (trailing metadata;
"other" = latency - queue - compute: gRPC, protos, the router hop); each
replica's share of the answers (`tfscale-replica`); the replicas a router
ejected or marked down (its `Status` before and after); the CPU cores used
by the client, the servers and anything else (`other_cpu_cores`: figures
compare only on an otherwise idle machine). Each client thread sends its
own `tfscale-route-key`, as a session would (the requests are identical
bytes: without a key `consistent_hash` sends all of them to one replica).

Each round starts every server once (setups share replicas of the same
shape; the slow setups swap the last normal replica for the slowed one),
loads each replica for 0.5 s, then measures each C in turn, the setups in
an order rotated per round: `--warmup_s` of load, then `--seconds`
measured. Servers are killed at the end of the round, on exit and on
Ctrl-C. Figures are medians over `--rounds`. One client process
(`--client_procs`) is enough: on 2 cores it used ~0.2 cores at the highest
throughput, and two served no more.

  .venv/bin/python tools/bench/serving.py     # ~15 min: 9 setups x 4 C x 3 rounds
  .venv/bin/python tools/bench/serving.py --quick --out=/tmp/tfscale_bench/serving

Writes `<--out>/serving.json` (`--json_name`: config, per_round, medians,
summary) and `<--out>/serving.png`, and prints a markdown table.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_POLICIES = ("round_robin", "least_loaded", "consistent_hash", "power_of_two")
_SETUPS = ("single_nobatching", "single_batching", *(f"router_{p}" for p in _POLICIES),
           *(f"slow_{p}" for p in ("least_loaded", "round_robin", "power_of_two")))  # fmt: skip
_QUICK = {"rounds": 1, "seconds": 1.0, "warmup_s": 0.3, "concurrency": ["1", "4"],
          "setups": ["single_nobatching", "single_batching", "slow_least_loaded"]}  # fmt: skip
_PREDICT = "/tensorflow.serving.PredictionService/Predict"
_ROUTE_KEY = "tfscale-route-key"  # tfscale.serve.proxy.ROUTE_KEY
_TIMING_KEYS = ("tfscale-queue-ms", "tfscale-compute-ms")  # tfscale.serve.replica's
_SLOW = "replica-slow"
_TICK = os.sysconf("SC_CLK_TCK")

_OUT = flags.DEFINE_string("out", os.path.join(_REPO, "tools/bench/results"), "Output directory.")
_JSON_NAME = flags.DEFINE_string("json_name", "serving.json", "Results file name under --out.")
flags.DEFINE_integer("rounds", 3, "Rounds (medians are reported).", lower_bound=1)
flags.DEFINE_float("seconds", 5.0, "Measured seconds per (setup, concurrency).")
flags.DEFINE_float("warmup_s", 1.0, "Seconds of load before each measurement.")
flags.DEFINE_list("concurrency", ["1", "4", "16", "64"], "Client threads (closed loop).")
flags.DEFINE_list("setups", list(_SETUPS), f"Setups: {', '.join(_SETUPS)}.")
_REPLICAS = flags.DEFINE_integer("replicas", 2, "Replicas behind the router.", lower_bound=2)
_SLOWDOWN = flags.DEFINE_float("slowdown", 5.0, "--slowdown of the slowed replica.")
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 32, "Replicas' --max_batch_size.")
_MAX_QUEUE_DELAY_MS = flags.DEFINE_float("max_queue_delay_ms", 2.0, "--max_queue_delay_ms.")
_CLIENT_PROCS = flags.DEFINE_integer("client_procs", 1, "Client processes.", lower_bound=1)
_START_TIMEOUT_S = flags.DEFINE_float("start_timeout_s", 180.0, "Seconds a server may take.")
_LOGS = flags.DEFINE_string("logs", None, "Keep the servers' logs in this directory.")
_QUICK_FLAG = flags.DEFINE_bool("quick", False, f"Smoke run: {_QUICK} (unless given).")


def _value(name: str):
    flag = flags.FLAGS[name]
    return _QUICK[name] if _QUICK_FLAG.value and name in _QUICK and not flag.present else flag.value


def _client_process(conn, request: bytes) -> None:
    """Runs points on command: `(target, threads, first_thread, start_at, warmup_s, seconds)`."""
    import grpc  # pylint: disable=import-outside-toplevel

    try:
        while (command := conn.recv()) is not None:
            target, threads, first, start_at, warmup_s, seconds = command
            begin, end = start_at + warmup_s, start_at + warmup_s + seconds
            channel = grpc.insecure_channel(target)
            stub = channel.unary_unary(_PREDICT)  # bytes in, bytes out: no proto work here
            samples, errors = [[] for _ in range(threads)], []

            def loop(i: int) -> None:
                metadata = ((_ROUTE_KEY, f"client-{first + i}"),)
                time.sleep(max(0.0, start_at - time.monotonic()))
                while (sent := time.monotonic()) < end:
                    try:
                        _, call = stub.with_call(request, timeout=60, metadata=metadata)
                        if begin <= (done := time.monotonic()) <= end:
                            samples[i].append((done - sent, call.trailing_metadata()))
                    except grpc.RpcError as e:
                        if begin <= time.monotonic() <= end:
                            errors.append(f"{e.code().name}: {e.details()}")

            cpu = sum(os.times()[:2])
            workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            cores = (sum(os.times()[:2]) - cpu) / (time.monotonic() - start_at)
            channel.close()
            rows = [(t, dict(meta or ())) for per_thread in samples for t, meta in per_thread]
            conn.send((rows, errors, cores))
    except (KeyboardInterrupt, EOFError):
        pass


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle so far (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # all but idle and iowait


class Clients:
    """`--client_procs` processes; `run` splits C threads between them, returns a point."""

    def __init__(self, procs: int, request: bytes):
        context = multiprocessing.get_context("spawn")  # no inherited gRPC or TF state
        self._procs = []
        for _ in range(procs):
            parent, child = context.Pipe()
            process = context.Process(target=_client_process, args=(child, request), daemon=True)
            process.start()
            self._procs.append((process, parent))

    def run(self, target: str, c: int, warmup_s: float, seconds: float, servers) -> dict:
        start_at, first = time.monotonic() + 0.3, 0
        active = self._procs[:c]
        for k, (_, conn) in enumerate(active):
            threads = c // len(active) + (k < c % len(active))
            conn.send((target, threads, first, start_at, warmup_s, seconds))
            first += threads
        time.sleep(max(0.0, start_at + warmup_s - time.monotonic()))
        cpu = (servers.cpu_s(), _machine_busy_s())
        time.sleep(max(0.0, start_at + warmup_s + seconds - time.monotonic()))
        server, machine = (
            (b - a) / seconds for a, b in zip(cpu, (servers.cpu_s(), _machine_busy_s()))
        )
        results = [conn.recv() for _, conn in active]
        rows = [row for r in results for row in r[0]]
        point = _point(rows, [e for r in results for e in r[1]], seconds)
        point["client_cpu_cores"] = client = sum(r[2] for r in results)
        point["server_cpu_cores"], point["other_cpu_cores"] = server, machine - server - client
        return point

    def close(self) -> None:
        for process, conn in self._procs:
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def _point(rows: list, errors: list, seconds: float) -> dict:
    import numpy as np  # pylint: disable=import-outside-toplevel

    point = {"requests": len(rows), "errors": len(errors), "first_error": errors[:1]}
    point["throughput_rps"] = len(rows) / seconds
    if not rows:
        return point
    meta = [m for _, m in rows]
    latency = np.array([latency_s * 1e3 for latency_s, _ in rows])
    queue, compute = (np.array([float(m.get(k, "nan")) for m in meta]) for k in _TIMING_KEYS)
    for q in (50, 90, 99):
        point[f"p{q}_ms"] = float(np.percentile(latency, q))
    for name, values in (("queue", queue), ("compute", compute)):
        point[f"{name}_p50_ms"] = float(np.nanpercentile(values, 50))
        point[f"{name}_p99_ms"] = float(np.nanpercentile(values, 99))
    point["other_p50_ms"] = float(np.nanpercentile(latency - queue - compute, 50))
    names = [m.get("tfscale-replica", "?") for m in meta]
    point["replica_share"] = {n: names.count(n) / len(rows) for n in sorted(set(names))}
    return point


class Servers:
    """Server subprocesses, each logging to files in `log_dir`; `close` kills all."""

    def __init__(self, log_dir: str):
        self._dir = log_dir
        self._running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="2")
        with (
            open(os.path.join(self._dir, f"{name}.out"), "w") as out,
            open(os.path.join(self._dir, f"{name}.err"), "w") as err,
        ):
            self._running[name] = subprocess.Popen(
                [sys.executable, "-m", "tfscale.serve.main", *args],
                cwd=_REPO,
                env=env,
                stdout=out,
                stderr=err,
                # PR_SET_PDEATHSIG: killed with the benchmark, even by SIGKILL (Linux)
                preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGKILL),
            )

    def address(self, name: str, prefix: str) -> str:
        """HOST:PORT from the `prefix HOST:PORT` line `name` prints once ready."""
        deadline = time.monotonic() + _START_TIMEOUT_S.value
        while time.monotonic() < deadline:
            with open(os.path.join(self._dir, f"{name}.out")) as f:
                lines = [line for line in f.read().splitlines() if line.startswith(prefix)]
            if lines:
                return lines[0].split()[-1]
            if self._running[name].poll() is not None:
                with open(os.path.join(self._dir, f"{name}.err")) as f:
                    raise RuntimeError(f"{name} exited: {f.read()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {_START_TIMEOUT_S.value} s")

    def cpu_s(self) -> float:
        """User + system CPU seconds of every server so far (/proc/PID/stat)."""
        total = 0.0
        for process in self._running.values():
            try:
                with open(f"/proc/{process.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / _TICK
            except (OSError, IndexError, ValueError):
                pass
        return total

    def close(self) -> None:
        for process in self._running.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for process in self._running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._running.clear()


def _start_round(servers: Servers, setups: list[str], model: str) -> tuple[dict, dict]:
    """Starts what `setups` need: returns setup -> address, and address -> replica name."""
    n = _REPLICAS.value
    normal = [f"replica-{i}" for i in range(n)]
    members = {"single_nobatching": ["nobatching"], "single_batching": normal[:1]}
    members.update({f"router_{p}": normal for p in _POLICIES})
    members.update({f"slow_{p}": normal[: n - 1] + [_SLOW] for p in _POLICIES})
    batching = [
        f"--max_batch_size={_MAX_BATCH_SIZE.value}",
        f"--max_queue_delay_ms={_MAX_QUEUE_DELAY_MS.value}",
    ]
    extra = {"nobatching": ["--nobatching"], _SLOW: [*batching, f"--slowdown={_SLOWDOWN.value}"]}
    replicas = list(dict.fromkeys(r for s in setups for r in members[s]))
    for name in replicas:
        base = ["replica", f"--model={model}", "--port=0", "--rest_port=-1", f"--name={name}"]
        servers.start(name, base + extra.get(name, batching))
    address = {r: servers.address(r, "tfscale-serve replica listening on") for r in replicas}
    routers = [s for s in setups if not s.startswith("single_")]
    for setup in routers:
        targets = ",".join(address[r] for r in members[setup])
        policy = f"--policy={setup.split('_', 1)[1]}"
        servers.start(
            f"router-{setup}",
            [f"--replica_addresses={targets}", policy, "--port=0", "--rest_port=-1"]
            + ["--watch_interval_s=0"],
        )
    targets = {s: address[members[s][0]] for s in setups if s.startswith("single_")}
    for setup in routers:
        targets[setup] = servers.address(f"router-{setup}", "tfscale-serve listening on")
    return targets, {a: r for r, a in address.items()}


def _router_status(target: str, names: dict[str, str]) -> dict:
    """Replica name -> [routing health, ejections in its streak] (the router's admin `Status`)."""
    import grpc  # pylint: disable=import-outside-toplevel

    from tfscale.serve import admin  # pylint: disable=import-outside-toplevel

    with grpc.insecure_channel(target) as channel:
        replicas = admin.call(channel, "Status", timeout_s=10.0)["replicas"]
    return {names.get(r["name"], r["name"]): [r["health"], r["ejections"]] for r in replicas}


def _model_and_request(directory: str) -> tuple[str, bytes]:
    """The lenet with random weights saved as .keras, and one serialized batch-1 request."""
    import keras  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel

    from tfscale.train import models  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(0)
    path = os.path.join(directory, "lenet.keras")
    models.build("lenet", (28, 28, 1), 10).save(path)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "default"
    image = np.random.default_rng(0).random((1, 28, 28, 1), dtype=np.float32)
    request.inputs["input"].CopyFrom(tf.make_tensor_proto(image))
    return path, request.SerializeToString()


def _ejected(before: dict, after: dict) -> list[str]:
    """Replicas not up at the start or the end of a point, or ejected in between."""
    was = {n: before.get(n, v) for n, v in after.items()}
    return [n for n, v in after.items() if {v[0], was[n][0]} != {"up"} or v[1] > was[n][1]]


def _print_point(setup: str, c: int, p: dict) -> None:
    cores = ", ".join(f"{k} {p[f'{k}_cpu_cores']:.2f}" for k in ("server", "client", "other"))
    print(
        f"  {setup:24s} C={c:<3d} {p['throughput_rps']:7.1f} req/s "
        f"p50={p.get('p50_ms', 0):6.2f} p99={p.get('p99_ms', 0):7.2f} ms; cores: {cores}; "
        f"errors={p['errors']} {p.get('replica_share', '')} {p.get('ejected', '')}",
        flush=True,
    )


def _round(clients: Clients, setups: list[str], levels: list[int], model: str, index: int):
    """Starts the servers, measures every (setup, C) point, kills the servers."""
    logs = os.path.join(_LOGS.value or os.path.dirname(model), f"round{index}")
    os.makedirs(logs, exist_ok=True)
    servers, started = Servers(logs), time.monotonic()
    try:
        targets, names = _start_round(servers, setups, model)
        for address in names:  # the first requests on a replica's new threads are slow
            clients.run(address, min(16, max(levels)), 0.0, 0.5, servers)
        print(f"round {index + 1}: servers up in {time.monotonic() - started:.0f} s", flush=True)
        order = setups[index % len(setups) :] + setups[: index % len(setups)]
        measured = {s: {} for s in setups}
        for c in levels:
            for setup in order:
                target, router = targets[setup], not setup.startswith("single_")
                before = _router_status(target, names) if router else {}
                p = clients.run(target, c, _value("warmup_s"), _value("seconds"), servers)
                if router:
                    p["ejected"] = _ejected(before, _router_status(target, names))
                measured[setup][str(c)] = p
                _print_point(setup, c, p)
        return measured
    finally:
        servers.close()


def _medians(points: list[dict]) -> dict:
    out = {}
    for key in points[0]:
        values = [p[key] for p in points if key in p]
        if key == "replica_share":
            names = sorted({n for v in values for n in v})
            out[key] = {n: statistics.median(v.get(n, 0.0) for v in values) for n in names}
        elif key == "ejected":
            out["ejected_rounds"] = {n: sum(n in v for v in values) for n in {*sum(values, [])}}
        elif values and all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
    return out


def _summary(per_round: list[dict], medians: dict, levels: list[int]) -> dict:
    def ratio(a: str, b: str) -> dict:
        return {
            str(c): statistics.median(
                r[a][str(c)]["throughput_rps"] / max(r[b][str(c)]["throughput_rps"], 1e-9)
                for r in per_round
            )
            for c in levels
        }

    summary = {
        "peak_throughput_rps": {s: max(m[str(c)]["throughput_rps"] for c in levels)
                                for s, m in medians.items()},  # fmt: skip
        "errors": sum(p["errors"] for r in per_round for s in r.values() for p in s.values()),
    }
    if {"single_batching", "single_nobatching"} <= set(medians):
        summary["batching_over_nobatching"] = ratio("single_batching", "single_nobatching")
    if "single_batching" in medians:
        summary["over_single_batching"] = {
            s: ratio(s, "single_batching") for s in medians if not s.startswith("single_")
        }
    summary["slow_replica_share"] = {
        s: {str(c): m[str(c)].get("replica_share", {}).get(_SLOW, 0.0) for c in levels}
        for s, m in medians.items()
        if s.startswith("slow_")
    }
    return summary


def _plot(medians: dict, levels: list[int], path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    slow = [s for s in medians if s.startswith("slow_")]
    fig, axes = plt.subplots(1, 3 if slow else 2, figsize=(17 if slow else 12, 4.8))
    styles = {"single": "--", "router": "-", "slow": ":"}
    for setup, by_c in medians.items():
        style = dict(linestyle=styles[setup.split("_")[0]], marker="o", label=setup)
        axes[0].plot(levels, [by_c[str(c)]["throughput_rps"] for c in levels], **style)
        axes[1].plot(levels, [by_c[str(c)].get("p99_ms", float("nan")) for c in levels], **style)
    for setup in slow:
        shares = [medians[setup][str(c)].get("replica_share", {}).get(_SLOW, 0.0) for c in levels]
        axes[2].plot(levels, shares, marker="o", label=setup)
    if slow:
        axes[2].axhline(1 / _REPLICAS.value, color="gray", linestyle="--", label="1 / replicas")
        axes[2].set_ylim(-0.02, 1.02)
    titles = ("throughput, requests/s", "p99 latency, ms (log)", f"share served by {_SLOW}")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients (closed loop, batch 1)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle("tfscale-serve, lenet on CPU: medians over rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(name: str) -> str:
    return name.replace("replica-", "")


def _table(medians: dict, levels: list[int], rounds: int) -> str:
    lines = [
        "| setup | C | req/s | p50 ms | p90 ms | p99 ms | queue p50 | compute p50 | other p50 "
        "| errors | share (ejected or down: rounds) |",
        "|" + "---|" * 11,
    ]
    for setup, by_c in medians.items():
        for c in levels:
            p = {"errors": 0, **by_c[str(c)]}
            keys = ("p50_ms", "p90_ms", "p99_ms", "queue_p50_ms", "compute_p50_ms", "other_p50_ms")
            cells = [f"{p['throughput_rps']:.0f}"] + [f"{p.get(k, float('nan')):.2f}" for k in keys]
            share = " ".join(f"{_short(n)}:{v:.0%}" for n, v in p.get("replica_share", {}).items())
            ejected = [f"{_short(n)} {k}/{rounds}" for n, k in p.get("ejected_rounds", {}).items()]
            share += f" (ejected: {', '.join(sorted(ejected))})" if ejected else ""
            lines.append(f"| {setup} | {c} | {' | '.join(cells)} | {p['errors']:g} | {share} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    setups = [s for s in _SETUPS if s in _value("setups")]  # in the canonical order
    unknown = sorted(set(_value("setups")) - set(_SETUPS))
    if unknown or not setups:
        raise app.UsageError(f"Unknown setups {unknown}. Valid: {', '.join(_SETUPS)}")
    levels, rounds = [int(c) for c in _value("concurrency")], _value("rounds")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` kills servers
    scratch, clients = tempfile.mkdtemp(prefix="tfscale-serving-"), None
    try:
        model, request = _model_and_request(scratch)
        clients = Clients(_CLIENT_PROCS.value, request)
        per_round = [_round(clients, setups, levels, model, i) for i in range(rounds)]
    finally:
        if clients is not None:
            clients.close()
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {s: {str(c): _medians([r[s][str(c)] for r in per_round]) for c in levels}
               for s in setups}  # fmt: skip
    flag_names = ("replicas", "slowdown", "max_batch_size", "max_queue_delay_ms", "client_procs")
    config = {name: _value(name) for name in ("rounds", "seconds", "warmup_s")}
    config.update({name: flags.FLAGS[name].value for name in flag_names})
    config.update(
        setups=setups, concurrency=levels, cpu_count=os.cpu_count(), quick=_QUICK_FLAG.value
    )
    config["model"] = "lenet (tfscale.train.models), random weights, .keras; batch-1 float32"
    results = {"config": config, "per_round": per_round, "medians": medians}
    results["summary"] = _summary(per_round, medians, levels)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, _JSON_NAME.value), "w") as f:
        json.dump(results, f, indent=2)
    _plot(medians, levels, os.path.join(_OUT.value, "serving.png"))
    print(_table(medians, levels, rounds))
    print(json.dumps(results["summary"], indent=2))
    print(f"wrote {_OUT.value}/{_JSON_NAME.value} and serving.png")


if __name__ == "__main__":
    app.run(main)
