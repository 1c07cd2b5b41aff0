"""Balance under skew: epoch makespan over the ideal, one worker 4x slower.

Four workers of speeds 1, 1, 1 and 0.25 (`--speeds`) process one epoch of
`--elements` elements, split into 64 or 256 shards (`--shard_counts`) of
equal sizes or of Zipf sizes: the shard of rank k gets a share of the
elements proportional to 1/k^s (`--zipf_exponent`, at least one element
each), and the ranks are dealt to shard indices by a permutation seeded with
`--seed`; both size kinds have the same total. A worker of speed s spends
`--cost_ms` / s per element. For each case, the makespan (first element
received to last element processed) is divided by the ideal,
`elements * cost / sum(speeds)`, for:

- `static`: tf.data auto-shard FILE: worker w reads shards w, w+4, w+8, ...
- `tf_data_service`: an in-process `tf.data.experimental.service` dispatcher
  and one tf.data worker per simulated worker; the dataset is the shard
  list (one split per shard) flat-mapped to the shard's elements, and each
  simulated worker is a consumer of the same `distributed_epoch` job with
  `max_outstanding_requests=--service_outstanding`. There the shards go to
  the tf.data workers (all equally fast) and the skew is on the consumer
  side: consumers pull elements from the shared job, so a slow trainer just
  takes fewer elements, one at a time.
- `tfscale/<policy>`: tfscale's dispatcher on loopback (memory only, a new
  server per run), one `ShardConsumer` per simulated worker, leasing up to
  `--max_shards` shards per acquire (tfscale-train's default when unset);
  the worker is both the shard's reader and its consumer, so the unit of
  balance is the shard. Workers register before the clock starts, and each
  repetition uses its own epoch permutation (job seed = repetition).

The worker threads start in an order shuffled per repetition: the first to
ask for work gets the first pick (e.g. the largest shard).

Timing: every worker is a thread with a virtual clock. An element that took
w seconds to arrive ends w + cost/speed after the previous one ended, and
the thread sleeps until then: sleep overshoot and Python overhead do not add
up over thousands of elements, while waiting for data (RPCs, polling, an
empty queue) does. `max_lag_ms` in results.json says how far the threads
fell behind their clocks (the machine being too busy). `work_ratio` is the
makespan that the per-worker element counts alone imply, without idle time
or transport overhead.

  .venv/bin/python tools/bench/balance_skew.py --out=/tmp/tfscale_bench/balance_skew \\
      --elements=3072 --cost_ms=1.0 --shard_counts=64,256 --repeats=5
  .venv/bin/python tools/bench/balance_skew.py --quick   # smoke test, under a minute
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import statistics
import threading
import time
from typing import Callable
from typing import Iterable
from typing import Optional

from absl import app
from absl import flags

from tfscale.data import readers
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import consumer as consumer_lib
from tfscale.data.dispatcher import policies
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import types
from tfscale.train import config as train_config

Sizes = list[int]
Source = Callable[[], Iterable[int]]

STATIC = "static"
SERVICE = "tf_data_service"
POLICY_METHODS = tuple(f"tfscale/{name}" for name in sorted(policies.POLICIES))
ADAPTIVE = "tfscale/adaptive"
METHODS = (STATIC, SERVICE) + POLICY_METHODS
SIZE_KINDS = ("equal", "zipf")

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/balance_skew", "Output directory.")
_SPEEDS = flags.DEFINE_list("speeds", ["1", "1", "1", "0.25"], "Relative speed of each worker.")
_ELEMENTS = flags.DEFINE_integer("elements", 3072, "Elements per epoch (all shards together).")
_COST_MS = flags.DEFINE_float("cost_ms", 1.0, "Milliseconds per element at speed 1.")
_SHARD_COUNTS = flags.DEFINE_list("shard_counts", ["64", "256"], "Shard counts to measure.")
_ZIPF = flags.DEFINE_float("zipf_exponent", 1.0, "Zipf exponent s of the skewed shard sizes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds which shard index gets which Zipf size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Runs per method and case (medians are reported).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Methods, of {', '.join(METHODS)}.")
_MAX_SHARDS = flags.DEFINE_integer(
    "max_shards", None, "Shards per acquire; tfscale-train's data.dispatcher.max_shards if unset."
)
_OUTSTANDING = flags.DEFINE_integer(
    "service_outstanding", 1, "max_outstanding_requests of each tf.data service consumer."
)
_TARGET = flags.DEFINE_float("target", 1.10, "Target makespan / ideal of tfscale/adaptive.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: --repeats=1 --elements=1024 unless given.")


@dataclasses.dataclass
class _Trace:
    """What one simulated worker did in one run (perf_counter seconds)."""

    ids: list[int] = dataclasses.field(default_factory=list)
    first: float = math.inf  # when its first element arrived
    end: float = 0.0  # its virtual clock after its last element
    waited: float = 0.0  # time spent waiting for elements
    max_lag: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Case:
    """One shard layout. Attributes: shard count, size kind, sizes, first element ids."""

    num_shards: int
    kind: str
    sizes: tuple[int, ...]
    starts: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.num_shards} {self.kind}"

    def shard_range(self, shard: int) -> range:
        return range(self.starts[shard], self.starts[shard] + self.sizes[shard])


def _zipf_sizes(count: int, total: int, exponent: float, seed: int) -> Sizes:
    """1 + a Zipf share (largest remainder) of `total - count`, ranks in seeded order."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(count)]
    spare = total - count
    exact = [spare * w / sum(weights) for w in weights]
    by_rank = [math.floor(x) for x in exact]
    for rank in sorted(range(count), key=lambda r: by_rank[r] - exact[r])[: spare - sum(by_rank)]:
        by_rank[rank] += 1
    ranks = list(range(count))
    random.Random(seed).shuffle(ranks)
    return [1 + by_rank[rank] for rank in ranks]


def _make_case(num_shards: int, kind: str, total: int, exponent: float, seed: int) -> _Case:
    if not 1 <= num_shards <= total:
        raise ValueError(f"Shard counts must be in [1, elements={total}]. Received: {num_shards}")
    if kind == "equal":
        sizes = [total // num_shards + (shard < total % num_shards) for shard in range(num_shards)]
    else:
        sizes = _zipf_sizes(num_shards, total, exponent, seed)
    starts = tuple(itertools.accumulate([0] + sizes[:-1]))
    return _Case(num_shards, kind, tuple(sizes), starts)


def _consume(elements: Iterable[int], seconds_per_element: float, trace: _Trace) -> None:
    """Processes `elements` at one worker's speed on its virtual clock."""
    iterator = iter(elements)
    clock = time.perf_counter()
    while True:
        asked = time.perf_counter()
        try:
            element = next(iterator)
        except StopIteration:
            break
        got = time.perf_counter()
        trace.first = min(trace.first, got)
        trace.max_lag = max(trace.max_lag, asked - clock)
        trace.waited += got - asked
        clock += got - asked + seconds_per_element
        trace.ids.append(int(element))
        delay = clock - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    trace.end = clock


def _run_workers(
    sources: list[Source], speeds: list[float], cost_s: float, seed: int
) -> list[_Trace]:
    """One thread per worker: open its source, wait for the others, consume it.

    The threads start in a seeded random order: the last one to reach the
    barrier tends to run (and ask for work) first.
    """
    traces = [_Trace() for _ in sources]
    barrier = threading.Barrier(len(sources))
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            elements = sources[index]()
            barrier.wait()
            _consume(elements, cost_s / speeds[index], traces[index])
        except BaseException as e:  # pylint: disable=broad-except
            errors.append(e)
            barrier.abort()

    order = list(range(len(sources)))
    random.Random(seed).shuffle(order)
    threads = [threading.Thread(target=work, args=(i,), name=f"worker-{i}") for i in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]
    return traces


def _static_sources(case: _Case, workers: int) -> list[Source]:
    def source(worker: int) -> Source:
        mine = range(worker, case.num_shards, workers)
        return lambda: itertools.chain.from_iterable(case.shard_range(s) for s in mine)

    return [source(w) for w in range(workers)]


class _DataService:
    """An in-process tf.data service: a dispatcher and `workers` tf.data workers."""

    def __init__(self, workers: int, max_outstanding: int):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        service = tf.data.experimental.service
        self._tf = tf
        self._max_outstanding = max_outstanding
        self._dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
        address = self._dispatcher.target.split("://")[-1]
        # Frequent heartbeats: the workers learn of each new job quickly.
        config = service.WorkerConfig(dispatcher_address=address, heartbeat_interval_ms=100)
        self._workers = [service.WorkerServer(config) for _ in range(workers)]
        self._jobs = itertools.count()

    def sources(self, case: _Case, consumers: int) -> list[Source]:
        """One dataset per consumer, all on one new `distributed_epoch` job."""
        tf = self._tf
        starts = tf.constant(case.starts, tf.int64)
        sizes = tf.constant(case.sizes, tf.int64)
        job = f"bench-{next(self._jobs)}"  # a finished job's name would end at once
        datasets = []
        for _ in range(consumers):
            dataset = tf.data.Dataset.from_tensor_slices(tf.range(case.num_shards, dtype=tf.int64))
            dataset = dataset.flat_map(
                lambda i: tf.data.Dataset.range(starts[i], starts[i] + sizes[i])
            )
            datasets.append(
                dataset.apply(
                    tf.data.experimental.service.distribute(
                        "distributed_epoch",
                        self._dispatcher.target,
                        job_name=job,
                        max_outstanding_requests=self._max_outstanding,
                    )
                )
            )
        return [lambda d=d: iter(d) for d in datasets]


def _run_dispatcher(
    policy: str, case: _Case, speeds: list[float], cost_s: float, max_shards: int, seed: int
) -> list[_Trace]:
    specs = tuple(
        types.ShardSpec(f"range:{start}:{start + size}", size)
        for start, size in zip(case.starts, case.sizes)
    )
    with server_lib.server_context(server_lib.ServerConfig()) as server:
        clients = [client_lib.DispatcherClient(server.target) for _ in speeds]
        try:
            clients[0].create_job(types.JobSpec("bench", specs, policy=policy, seed=seed))
            names = [f"worker-{i}" for i in range(len(speeds))]
            for client, name in zip(clients, names):
                client.register_worker("bench", name)
            sources = [
                lambda c=c, n=n: consumer_lib.ShardConsumer(
                    c, "bench", n, readers.elements, max_shards=max_shards
                )
                for c, n in zip(clients, names)
            ]
            return _run_workers(sources, speeds, cost_s, seed)
        finally:
            for client in clients:
                client.close()


def _summarize(traces: list[_Trace], case: _Case, speeds: list[float], cost_s: float) -> dict:
    total = sum(case.sizes)
    ideal = total * cost_s / sum(speeds)
    busy = [t for t in traces if t.ids]
    makespan = max(t.end for t in busy) - min(t.first for t in busy)
    counts = [len(t.ids) for t in traces]
    return {
        "ratio": makespan / ideal,
        "makespan_s": makespan,
        "work_ratio": max(c / s for c, s in zip(counts, speeds)) * cost_s / ideal,
        "counts": counts,
        "exactly_once": sorted(i for t in traces for i in t.ids) == list(range(total)),
        "waited_s": [t.waited for t in traces],
        "max_lag_ms": max(t.max_lag for t in traces) * 1e3,
    }


def _plot(results: dict, path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    cases = list(results["cases"])
    methods = results["methods"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(13, 4.8))
    for m, method in enumerate(methods):
        rows = [results["cases"][c]["methods"][method] for c in cases]
        median = [r["ratio_median"] for r in rows]
        low = [r["ratio_median"] - min(r["ratios"]) for r in rows]
        high = [max(r["ratios"]) - r["ratio_median"] for r in rows]
        x = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(x, median, width, yerr=[low, high], capsize=2, label=method)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="ideal")
    ax.axhline(
        results["target"],
        color="red",
        linestyle=":",
        linewidth=1.2,
        label=f"target {results['target']:.2f}x",
    )
    ax.set_xticks(range(len(cases)), [f"{c} shards" for c in cases])
    ax.set_ylabel("makespan / ideal (median; bars: min-max)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(
        f"Balance under skew: speeds {','.join(_SPEEDS.value)}, {results['elements']} elements, "
        f"{results['cost_ms']} ms/element, {results['repeats']} repeats"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_tables(results: dict) -> None:
    cases = list(results["cases"])
    header = f"{'method':26s}" + "".join(f"{c:>20s}" for c in cases)
    print(f"median makespan / ideal (work_ratio: from element counts alone)\n{header}")
    for method in results["methods"]:
        rows = [results["cases"][c]["methods"][method] for c in cases]
        cells = "".join(
            f"{r['ratio_median']:>11.2f}x ({r['work_ratio_median']:.2f}x)" for r in rows
        )
        print(f"{method:26s}{cells}")
    print(f"elements per worker (median run)\n{header}")
    for method in results["methods"]:
        rows = [results["cases"][c]["methods"][method] for c in cases]
        counts = ["/".join(map(str, r["counts_median_run"])) for r in rows]
        print(f"{method:26s}" + "".join(f"{c:>20s}" for c in counts))


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every run shares (flags with --quick applied)."""

    repeats: int
    elements: int
    speeds: tuple[float, ...]
    cost_s: float
    methods: tuple[str, ...]
    max_shards: int


def _setup() -> _Setup:
    quick = _QUICK.value
    speeds = tuple(float(s) for s in _SPEEDS.value)
    if not speeds or min(speeds) <= 0:
        raise ValueError(f"--speeds must be positive. Received: {_SPEEDS.value}")
    unknown = sorted(set(_METHODS.value) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown --methods {unknown}. Valid methods: {', '.join(METHODS)}")
    return _Setup(
        repeats=1 if quick and not flags.FLAGS["repeats"].present else _REPEATS.value,
        elements=1024 if quick and not flags.FLAGS["elements"].present else _ELEMENTS.value,
        speeds=speeds,
        cost_s=_COST_MS.value / 1e3,
        methods=tuple(m for m in METHODS if m in _METHODS.value),
        max_shards=_MAX_SHARDS.value or train_config.base_config().data.dispatcher.max_shards,
    )


def _run_once(
    method: str, case: _Case, setup: _Setup, service: Optional[_DataService], repeat: int
) -> dict:
    speeds = list(setup.speeds)
    if method == STATIC:
        traces = _run_workers(_static_sources(case, len(speeds)), speeds, setup.cost_s, repeat)
    elif method == SERVICE:
        traces = _run_workers(service.sources(case, len(speeds)), speeds, setup.cost_s, repeat)
    else:
        policy = method.split("/", 1)[1]
        traces = _run_dispatcher(policy, case, speeds, setup.cost_s, setup.max_shards, repeat)
    run = _summarize(traces, case, speeds, setup.cost_s)
    if not run["exactly_once"]:
        print(f"WARNING: {method} on {case.name}: elements lost or repeated", flush=True)
    return run


def _measure(cases: list[_Case], setup: _Setup) -> dict[tuple[str, str], list[dict]]:
    """Every method on every case, `repeats` times, in rotating order."""
    service = None
    if SERVICE in setup.methods:
        service = _DataService(len(setup.speeds), _OUTSTANDING.value)
    methods = list(setup.methods)
    runs: dict[tuple[str, str], list[dict]] = {(c.name, m): [] for c in cases for m in methods}
    for repeat in range(setup.repeats):
        for case_index, case in enumerate(cases):
            shift = (repeat + case_index) % len(methods)  # every method runs early and late
            for method in methods[shift:] + methods[:shift]:
                runs[(case.name, method)].append(_run_once(method, case, setup, service, repeat))
            ratios = ", ".join(f"{m} {runs[(case.name, m)][-1]['ratio']:.2f}x" for m in methods)
            print(f"repeat {repeat + 1}/{setup.repeats} {case.name}: {ratios}", flush=True)
    return runs


def _method_summary(done: list[dict]) -> dict:
    ratios = [r["ratio"] for r in done]
    middle = sorted(range(len(done)), key=lambda i: ratios[i])[(len(done) - 1) // 2]
    return {
        "ratio_median": statistics.median(ratios),
        "work_ratio_median": statistics.median(r["work_ratio"] for r in done),
        "counts_median_run": done[middle]["counts"],
        "ratios": ratios,
        "runs": done,
    }


def _results(cases: list[_Case], setup: _Setup, runs: dict[tuple[str, str], list[dict]]) -> dict:
    results = {
        "speeds": list(setup.speeds),
        "elements": setup.elements,
        "cost_ms": _COST_MS.value,
        "zipf_exponent": _ZIPF.value,
        "seed": _SEED.value,
        "repeats": setup.repeats,
        "max_shards": setup.max_shards,
        "service_max_outstanding_requests": _OUTSTANDING.value,
        "target": _TARGET.value,
        "methods": list(setup.methods),
        "cases": {},
    }
    for case in cases:
        results["cases"][case.name] = {
            "num_shards": case.num_shards,
            "sizes": list(case.sizes),
            "methods": {m: _method_summary(runs[(case.name, m)]) for m in setup.methods},
        }
    if ADAPTIVE in setup.methods:
        cells = results["cases"].values()
        worst = max(entry["methods"][ADAPTIVE]["ratio_median"] for entry in cells)
        results["adaptive_worst_ratio"] = worst
        results["target_met"] = worst <= _TARGET.value
    return results


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tf.data service logs every server config
    setup = _setup()
    cases = [
        _make_case(int(n), kind, setup.elements, _ZIPF.value, _SEED.value)
        for n in _SHARD_COUNTS.value
        for kind in SIZE_KINDS
    ]
    results = _results(cases, setup, _measure(cases, setup))
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, os.path.join(_OUT.value, "balance_skew.png"))
    _print_tables(results)
    if "target_met" in results:
        verdict = "met" if results["target_met"] else "NOT met"
        print(
            f"target {ADAPTIVE} <= {_TARGET.value:.2f}x ideal in every case: {verdict} "
            f"(worst median {results['adaptive_worst_ratio']:.2f}x)"
        )
    print(f"wrote {_OUT.value}/results.json and balance_skew.png")


if __name__ == "__main__":
    app.run(main)
