"""Input throughput: elements/s and consumer peak RSS, plain tf.data vs tfscale vs tf.data service.

Consumer processes (1 or 2, `--consumers`) each read one full epoch of TFRecord
files, batched by 128 (`--batch_size`), through one of three cases
(`--cases`):

- `plain`: plain tf.data on the files, consumer i of n reading `files[i::n]`:
  `from_tensor_slices(files).interleave(TFRecordDataset, cycle_length=4,
  num_parallel_calls=AUTOTUNE).map(parse, num_parallel_calls=AUTOTUNE)`.
- `tfscale`: a fresh `tfscale-dispatcher serve` subprocess per run (one job,
  `--shards` = the files' glob, one epoch, `--policy`, journal in a temporary
  `--work_dir` unless `--nojournal`); each consumer reads
  `dispatched.DispatchedInput(address, job, readers.tfrecord(parse),
  worker=f"c{i}", cycle_length=4).dataset`.
- `tfdata_service`: tf.data service with DYNAMIC sharding: a `DispatchServer`
  and 2 `WorkerServer`s (`--service_workers`) in one server subprocess (this
  script with `--role=service`, started once, so their memory is not the
  consumers'; workers heartbeat every 100 ms so they see a new job at once);
  every run is a new job that all its consumers share, reading
  `from_tensor_slices(files).interleave(TFRecordDataset...).map(parse...)`
  through `distribute(processing_mode=ShardingPolicy.DYNAMIC)`: the splits
  are the files.

on two datasets (`--datasets`):

- `synthetic`: tfscale's embedded synthetic train shards (16 files, 24000
  28x28x1 digits, `records.parse_fn((28, 28, 1))` decodes the images).
- `large`: `--large_files` (8) files of `--large_file_mb` (200) MB of
  `--record_kb` (3) KB records (`tf.train.Example`: a random `payload` of bytes
  and an int64 `id`; parse = `parse_single_example`, nothing decoded),
  written once into `--data_dir` and kept (a manifest says what is there).

Every consumer is a subprocess (this script with `--role=consumer`): it
imports TensorFlow, builds its pipeline, says READY and waits; once all of a
run's consumers are ready they are told to go together. A consumer times from
its first batch to its end of input (time to first batch, from "go", is
reported apart: it holds job start-up, leasing, the first reads), counts
elements from the batch shapes, and reports its peak RSS in MB (VmHWM: its
ru_maxrss would start at the parent's peak, which survives fork and exec).
A run's elements/s is the consumers' summed elements over the wall time from
the first consumer's first batch to the last consumer's end; its peak RSS is
the largest consumer's. Each run also checks that the consumers together got
exactly one epoch's element count.

Round r runs every case once: per (dataset, consumers) group, the cases back
to back in an order rotated by r, so each case runs early and late. Reported:
per case, the median elements/s over rounds and the max peak RSS; per group,
the medians of the per-round ratios tfscale/plain and tfscale/tfdata_service
(absolute rates are noisy, ratios of neighbouring runs less so) and the peak
RSS difference tfscale - plain (MB: the max peaks' difference; results.json
also has it per round). The files are read once before the first round, so
every case reads from the page cache. A run that fails or outlasts
`--run_timeout_s` is recorded with its error and the others go on; the script
then exits with 1.

Writes `<--out>/results.json` (config, datasets, every round's raw figures per
run and per consumer, summary), `<--out>/input_throughput.png` (grouped bars:
elements/s and peak RSS per case) and `<--out>/logs/` (each process's stderr).

  .venv/bin/python tools/bench/input_throughput.py --out=/tmp/tfscale_bench/input_throughput \\
      --rounds=5 --consumers=1,2 --datasets=synthetic,large
  .venv/bin/python tools/bench/input_throughput.py --quick   # smoke test, ~2 minutes:
      # 1 round, large = 2 files of 20 MB (in <--data_dir>_quick unless --data_dir is given)
  .venv/bin/python tools/bench/input_throughput.py --quick --cases=plain,tfdata_service
"""

from __future__ import annotations

import glob
import json
import os
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
from typing import Optional

_STARTED = time.monotonic()  # a consumer's start-up time counts from here

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

PLAIN = "plain"
TFSCALE = "tfscale"
SERVICE = "tfdata_service"
CASES = (PLAIN, TFSCALE, SERVICE)
SYNTHETIC = "synthetic"
LARGE = "large"
DATASETS = (SYNTHETIC, LARGE)

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/input_throughput", "Output directory.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds; each runs every case once.", lower_bound=1)
_CONSUMERS = flags.DEFINE_list("consumers", ["1", "2"], "Consumer process counts.")
_CASES = flags.DEFINE_list("cases", list(CASES), f"Cases, of {', '.join(CASES)}.")
_DATASETS = flags.DEFINE_list("datasets", list(DATASETS), f"Datasets, of {', '.join(DATASETS)}.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Consumer batch size.", lower_bound=1)
_CYCLE_LENGTH = flags.DEFINE_integer(
    "cycle_length", 4, "Files read at once by each reader (all cases).", lower_bound=1
)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Cache of the synthetic shards; synthetic.default_cache_dir() if unset."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "/tmp/tfscale_bench/large_shards", "Where the large dataset is written and kept."
)
_LARGE_FILES = flags.DEFINE_integer("large_files", 8, "Files of the large dataset.", lower_bound=1)
_LARGE_FILE_MB = flags.DEFINE_integer(
    "large_file_mb", 200, "MB (MiB) per file of the large dataset.", lower_bound=1
)
_RECORD_KB = flags.DEFINE_integer(
    "record_kb", 3, "KB (KiB) of payload per record of the large dataset.", lower_bound=1
)
_POLICY = flags.DEFINE_string("policy", "adaptive", "tfscale dispatcher --policy.")
_JOURNAL = flags.DEFINE_bool(
    "journal", True, "tfscale dispatcher with a journal (--work_dir) or memory only."
)
_MAX_SHARDS = flags.DEFINE_integer(
    "max_shards", None, "DispatchedInput max_shards; its default if unset.", lower_bound=1
)
_SERVICE_WORKERS = flags.DEFINE_integer(
    "service_workers", 2, "tf.data service WorkerServers.", lower_bound=1
)
_RUN_TIMEOUT_S = flags.DEFINE_float(
    "run_timeout_s", 900.0, "Limit of one run, start to end (--quick: 180 unless given)."
)
_QUICK = flags.DEFINE_bool(
    "quick",
    False,
    "Smoke test: --rounds=1 --large_files=2 --large_file_mb=20 --run_timeout_s=180 unless given.",
)
_ROLE = flags.DEFINE_enum(
    "role", "main", ["main", "consumer", "service"], "Internal: what this process is."
)
_SPEC = flags.DEFINE_string("spec", None, "Internal: the consumer's JSON spec.")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ENV = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="3")
_JOB = "bench"
_READY = "READY"
_RESULT = "RESULT "
_MB = 1 << 20
_START_TIMEOUT_S = 300.0  # import TensorFlow and build a pipeline, on a loaded machine
_PR_SET_PDEATHSIG = 1
# The tfscale-dispatcher console script, made to die with this process.
_DISPATCHER_SHIM = (
    "import ctypes, signal, sys; "
    f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGKILL); "
    "sys.argv[0] = 'tfscale-dispatcher'; "
    "from tfscale.data.dispatcher.main import run_main; run_main()"
)
_LARGE_PATTERN = "large-*-of-*.tfrecord"
_MANIFEST = "manifest.json"
_TFRECORD_FRAMING = 16  # length (8) + its CRC (4) + the data's CRC (4)


# --- child processes ------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when `parent` ends; exits if it already has."""
    try:
        import ctypes  # pylint: disable=import-outside-toplevel

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


class _Child:
    """A subprocess whose stdout lines are read by a thread, so waits can time out.

    Every child is in `_Child.live` until it is stopped; `stop_all` kills them.
    """

    live: set["_Child"] = set()

    def __init__(self, argv: list[str], log_path: str, name: str):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "a")
        self._log.write(f"=== {time.strftime('%H:%M:%S')} {name}\n")
        self._log.flush()
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self.process = subprocess.Popen(
            argv,
            cwd=_REPO,
            env=_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        _Child.live.add(self)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str, timeout_s: float) -> str:
        """The rest of the first stdout line starting with `prefix`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"{self.name}: no {prefix.strip()!r} line within {timeout_s:.0f} s; "
                    f"see {self.log_path}"
                ) from None
            if line is None:
                code = self.process.wait()
                raise RuntimeError(
                    f"{self.name} exited with {code} before printing {prefix.strip()!r}: "
                    f"{self._log_tail()}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def send(self, text: str) -> None:
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self, terminate_first: bool = False) -> None:
        """Ends the process (SIGTERM first if asked, SIGKILL after 5 s) and reaps it."""
        if self.process.poll() is None:
            if terminate_first:
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            if self.process.poll() is None:
                self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()
        _Child.live.discard(self)

    def _log_tail(self, lines: int = 8) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            tail = [line.rstrip() for line in f.readlines()[-lines:]]
        return " | ".join(tail) + f" (log: {self.log_path})"

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.live):
            child.stop()


# --- consumer role --------------------------------------------------------------------


def _parse_fn(kind: str) -> Any:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if kind == SYNTHETIC:
        from tfscale.data import records  # pylint: disable=import-outside-toplevel

        return records.parse_fn((28, 28, 1))
    features = {
        "payload": tf.io.FixedLenFeature([], tf.string),
        "id": tf.io.FixedLenFeature([], tf.int64),
    }
    return lambda serialized: tf.io.parse_single_example(serialized, features)


def _files_pipeline(tf: Any, files: list[str], parse: Any, cycle_length: int) -> Any:
    autotune = tf.data.AUTOTUNE
    return (
        tf.data.Dataset.from_tensor_slices(files)
        .interleave(tf.data.TFRecordDataset, cycle_length=cycle_length, num_parallel_calls=autotune)
        .map(parse, num_parallel_calls=autotune)
    )


def _consumer(spec: dict[str, Any]) -> None:
    """Builds the case's pipeline, says READY, waits for "go", reads one epoch, reports."""
    _die_with_parent(spec["parent"])
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    parse = _parse_fn(spec["dataset"])
    case, index, cycle_length = spec["case"], spec["index"], spec["cycle_length"]
    if case == PLAIN:
        files = spec["files"][index :: spec["count"]]
        dataset = _files_pipeline(tf, files, parse, cycle_length)
    elif case == TFSCALE:
        # pylint: disable=import-outside-toplevel
        from tfscale.data import dispatched
        from tfscale.data import readers

        kwargs: dict[str, Any] = {"worker": f"c{index}", "cycle_length": cycle_length}
        if spec["max_shards"]:
            kwargs["max_shards"] = spec["max_shards"]
        source = dispatched.DispatchedInput(
            spec["address"], spec["job"], readers.tfrecord(parse), **kwargs
        )
        dataset = source.dataset
    else:
        service = tf.data.experimental.service
        dataset = _files_pipeline(tf, spec["files"], parse, cycle_length).apply(
            service.distribute(
                processing_mode=service.ShardingPolicy.DYNAMIC,
                service=spec["address"],
                job_name=spec["job"],
            )
        )
    dataset = dataset.batch(spec["batch_size"])
    ready = time.monotonic()
    print(_READY, flush=True)
    if not sys.stdin.readline():  # the parent went away
        os._exit(1)
    go = time.monotonic()
    elements, first, batches = 0, None, 0
    for batch in dataset:
        if first is None:
            first = time.monotonic()
        elements += int(tf.nest.flatten(batch)[0].shape[0])
        batches += 1
    end = time.monotonic()
    result = {
        "elements": elements,
        "batches": batches,
        "go_t": go,
        "first_batch_t": first if first is not None else end,
        "end_t": end,
        "seconds": end - (first if first is not None else end),
        "first_batch_s": (first if first is not None else end) - go,
        "startup_s": ready - _STARTED,
        "peak_rss_mb": _peak_rss_mb(),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(_RESULT + json.dumps(result), flush=True)
    os._exit(0)  # TensorFlow's and gRPC's teardown is not measured and can be slow


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, else ru_maxrss.

    On Linux, ru_maxrss survives fork and exec: a child's starts at its
    parent's peak (this script's, TensorFlow imported). VmHWM is the peak of
    the process's own address space, which exec replaced.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _service(workers: int, parent: int) -> None:
    """The tf.data service's servers; prints READY <target>, serves until stdin closes."""
    _die_with_parent(parent)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = "127.0.0.1:" + dispatcher.target.rsplit(":", 1)[-1]
    config = service.WorkerConfig(
        dispatcher_address=address, worker_address="127.0.0.1:%port%", heartbeat_interval_ms=100
    )
    servers = [service.WorkerServer(config) for _ in range(workers)]
    print(f"{_READY} grpc://{address}", flush=True)
    sys.stdin.read()
    del servers
    os._exit(0)


# --- datasets -------------------------------------------------------------------------


def _synthetic() -> dict[str, Any]:
    from tfscale.data import synthetic  # pylint: disable=import-outside-toplevel

    files = sorted(synthetic.ensure_shards(cache_dir=_CACHE_DIR.value, split="train"))
    pattern = os.path.join(os.path.dirname(files[0]), f"{synthetic.NAME}-train.tfrecord-*")
    return {
        "files": files,
        "glob": pattern,
        "elements": synthetic.SPLITS["train"][0],
        "bytes": sum(os.path.getsize(f) for f in files),
    }


def _large(data_dir: str, num_files: int, file_mb: int, record_kb: int) -> dict[str, Any]:
    """The large dataset in `data_dir`, written unless its manifest matches the files there."""
    config = {"files": num_files, "file_mb": file_mb, "record_kb": record_kb, "version": 1}
    manifest_path = os.path.join(data_dir, _MANIFEST)
    names = [f"large-{i:05d}-of-{num_files:05d}.tfrecord" for i in range(num_files)]
    paths = [os.path.join(data_dir, name) for name in names]
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest["config"] == config and all(
            os.path.getsize(p) == manifest["sizes"][n] for n, p in zip(names, paths)
        ):
            return _large_info(data_dir, paths, manifest)
    except (OSError, ValueError, KeyError):
        pass
    os.makedirs(data_dir, exist_ok=True)
    old = glob.glob(os.path.join(data_dir, _LARGE_PATTERN)) + glob.glob(
        os.path.join(data_dir, "*.tmp")
    )
    need = num_files * file_mb * _MB
    free = shutil.disk_usage(data_dir).free + sum(os.path.getsize(p) for p in old)
    if free < need + 256 * _MB:
        sys.exit(
            f"input_throughput: not enough free disk space for the large dataset in {data_dir}: "
            f"it needs {need / _MB:.0f} MB (+256 MB spare), {free / _MB:.0f} MB are free. "
            "Lower --large_files/--large_file_mb, or pass another --data_dir."
        )
    for path in old + [manifest_path]:
        if os.path.exists(path):
            os.remove(path)
    print(f"writing the large dataset: {num_files} x {file_mb} MB into {data_dir}", flush=True)
    start = time.monotonic()
    manifest = {"config": config, "sizes": {}, "records": {}}
    next_id = 0
    for name, path in zip(names, paths):
        records = _write_large_file(path + ".tmp", next_id, file_mb * _MB, record_kb * 1024)
        os.rename(path + ".tmp", path)
        manifest["sizes"][name] = os.path.getsize(path)
        manifest["records"][name] = records
        next_id += records
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.rename(manifest_path + ".tmp", manifest_path)
    print(f"  written in {time.monotonic() - start:.1f} s", flush=True)
    return _large_info(data_dir, paths, manifest)


def _write_large_file(path: str, first_id: int, file_bytes: int, payload_bytes: int) -> int:
    """Records of one random payload (the same for all) and increasing ids; returns the count."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    payload = np.random.default_rng(first_id).bytes(payload_bytes)
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                "payload": tf.train.Feature(bytes_list=tf.train.BytesList(value=[payload])),
                "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
            }
        )
    )
    ids = example.features.feature["id"].int64_list.value
    ids[0] = first_id + file_bytes  # a typical id's varint length
    count = max(1, file_bytes // (len(example.SerializeToString()) + _TFRECORD_FRAMING))
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(first_id, first_id + count):
            ids[0] = i
            writer.write(example.SerializeToString())
    return count


def _large_info(data_dir: str, paths: list[str], manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "files": paths,
        "glob": os.path.join(data_dir, _LARGE_PATTERN),
        "elements": sum(manifest["records"].values()),
        "bytes": sum(manifest["sizes"].values()),
        "config": manifest["config"],
    }


def _warm_page_cache(files: list[str]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(16 * _MB):
                pass


# --- runs -----------------------------------------------------------------------------


class _Bench:
    """Runs cases; holds the tf.data service server subprocess if needed."""

    def __init__(self, out: str, datasets: dict[str, dict[str, Any]], run_timeout_s: float):
        self.datasets = datasets
        self.run_timeout_s = run_timeout_s
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.service_address: Optional[str] = None

    def start_service(self) -> None:
        child = _Child(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--role=service",
                f"--service_workers={_SERVICE_WORKERS.value}",
                f"--spec={json.dumps({'parent': os.getpid()})}",
            ],
            os.path.join(self.logs, "tfdata_service_server.log"),
            "tf.data service server",
        )
        self.service_address = child.expect(_READY, _START_TIMEOUT_S)

    def run(self, dataset: str, consumers: int, case: str, round_index: int) -> dict[str, Any]:
        """One run: its figures, or {"error": ...}."""
        row: dict[str, Any] = {"dataset": dataset, "consumers": consumers, "case": case}
        children: list[_Child] = []
        work_dir = None
        try:
            info = self.datasets[dataset]
            spec: dict[str, Any] = {
                "parent": os.getpid(),
                "dataset": dataset,
                "case": case,
                "count": consumers,
                "batch_size": _BATCH_SIZE.value,
                "cycle_length": _CYCLE_LENGTH.value,
                "max_shards": _MAX_SHARDS.value,
                "files": info["files"],
                "job": _JOB,
            }
            if case == PLAIN and len(info["files"]) < consumers:
                raise ValueError(f"{consumers} consumers need as many files; {dataset} has fewer")
            if case == TFSCALE:
                work_dir = tempfile.mkdtemp(prefix="input-bench-dispatcher-")
                spec["address"] = self._start_dispatcher(info, work_dir, children)
            elif case == SERVICE:
                spec["address"] = self.service_address
                spec["job"] = f"bench-r{round_index}-{dataset}-{consumers}"
            deadline = time.monotonic() + self.run_timeout_s
            for i in range(consumers):
                spec["index"] = i
                name = f"{dataset}-{consumers}-{case}-c{i}"
                children.append(
                    _Child(
                        [
                            sys.executable,
                            os.path.abspath(__file__),
                            "--role=consumer",
                            f"--spec={json.dumps(spec)}",
                        ],
                        os.path.join(self.logs, f"{name}.log"),
                        f"consumer {name} (round {round_index + 1})",
                    )
                )
            consumer_children = children[-consumers:]
            for child in consumer_children:
                child.expect(_READY, _START_TIMEOUT_S)
            for child in consumer_children:
                child.send("go\n")
            reports = []
            for child in consumer_children:
                reports.append(json.loads(child.expect(_RESULT, deadline - time.monotonic())))
                child.wait(max(1.0, deadline - time.monotonic()))
        except Exception as e:  # pylint: disable=broad-except
            row["error"] = f"{type(e).__name__}: {e}"
            return row
        finally:
            for child in reversed(children):
                child.stop(terminate_first=child is children[0] and case == TFSCALE)
            if work_dir:
                shutil.rmtree(work_dir, ignore_errors=True)
        elements = sum(r["elements"] for r in reports)
        seconds = max(r["end_t"] for r in reports) - min(r["first_batch_t"] for r in reports)
        row.update(
            elements=elements,
            seconds=seconds,
            elements_per_s=elements / seconds if seconds > 0 else 0.0,
            first_batch_s=max(r["first_batch_s"] for r in reports),
            peak_rss_mb=max(r["peak_rss_mb"] for r in reports),
            complete=elements == info["elements"],
            per_consumer=[
                {
                    k: r[k]
                    for k in (
                        "elements",
                        "seconds",
                        "first_batch_s",
                        "startup_s",
                        "peak_rss_mb",
                        "ru_maxrss_mb",
                    )
                }
                for r in reports
            ],
        )
        return row

    def _start_dispatcher(self, info: dict[str, Any], work_dir: str, children: list) -> str:
        argv = [
            sys.executable,
            "-c",
            _DISPATCHER_SHIM,
            "serve",
            "--host=127.0.0.1",
            "--port=0",
            f"--shards={info['glob']}",
            f"--job={_JOB}",
            "--num_epochs=1",
            f"--policy={_POLICY.value}",
            f"--work_dir={work_dir if _JOURNAL.value else ''}",
        ]
        child = _Child(
            argv, os.path.join(self.logs, "tfscale_dispatcher.log"), "tfscale-dispatcher"
        )
        children.append(child)
        return child.expect("tfscale-dispatcher listening on", _START_TIMEOUT_S)


# --- report ---------------------------------------------------------------------------


def _summary(rounds: list[dict[str, Any]], groups: list[tuple[str, int]], cases: list[str]) -> dict:
    def runs_of(dataset: str, consumers: int, case: str) -> list[Optional[dict]]:
        found = []
        for r in rounds:
            run = next(
                x
                for x in r["runs"]
                if (x["dataset"], x["consumers"], x["case"]) == (dataset, consumers, case)
            )
            found.append(None if "error" in run else run)
        return found

    cells, ratios = [], []
    for dataset, consumers in groups:
        per_case = {case: runs_of(dataset, consumers, case) for case in cases}
        for case, runs in per_case.items():
            done = [r for r in runs if r]
            cell: dict[str, Any] = {
                "dataset": dataset,
                "consumers": consumers,
                "case": case,
                "rounds_ok": len(done),
                "rounds_failed": len(runs) - len(done),
            }
            if done:
                rates = [r["elements_per_s"] for r in done]
                cell.update(
                    elements_per_s_median=statistics.median(rates),
                    elements_per_s_min=min(rates),
                    elements_per_s_max=max(rates),
                    first_batch_s_median=statistics.median(r["first_batch_s"] for r in done),
                    peak_rss_mb_max=max(r["peak_rss_mb"] for r in done),
                    all_complete=all(r["complete"] for r in done),
                )
            cells.append(cell)
        ratio: dict[str, Any] = {"dataset": dataset, "consumers": consumers}
        if TFSCALE in per_case:
            ours = per_case[TFSCALE]
            for other, key in (
                (PLAIN, "tfscale_over_plain"),
                (SERVICE, "tfscale_over_tfdata_service"),
            ):
                if other in per_case:
                    values = [
                        a["elements_per_s"] / b["elements_per_s"]
                        for a, b in zip(ours, per_case[other])
                        if a and b and b["elements_per_s"] > 0
                    ]
                    ratio[key + "_rounds"] = values
                    ratio[key] = statistics.median(values) if values else None
            if PLAIN in per_case:
                peaks = [[r["peak_rss_mb"] for r in per_case[c] if r] for c in (TFSCALE, PLAIN)]
                ratio["rss_tfscale_minus_plain_mb"] = (
                    max(peaks[0]) - max(peaks[1]) if all(peaks) else None
                )
                ratio["rss_tfscale_minus_plain_mb_rounds"] = [
                    a["peak_rss_mb"] - b["peak_rss_mb"]
                    for a, b in zip(ours, per_case[PLAIN])
                    if a and b
                ]
        ratios.append(ratio)
    return {"cells": cells, "ratios": ratios}


def _fmt(value: Optional[float], spec: str, width: int, suffix: str = "") -> str:
    """`value` with `spec` ("+.0f") and `suffix`, right-aligned in `width`; "-" if None."""
    return ("-" if value is None else format(value, spec) + suffix).rjust(width)


def _print_tables(results: dict[str, Any]) -> None:
    print(
        f"\n{'dataset':10s}{'consumers':>10s}  {'case':16s}{'elements/s':>12s}"
        f"{'(min..max)':>22s}{'1st batch s':>13s}{'peak RSS MB':>13s}  epoch"
    )
    for cell in results["summary"]["cells"]:
        head = f"{cell['dataset']:10s}{cell['consumers']:>10d}  {cell['case']:16s}"
        if not cell["rounds_ok"]:
            print(f"{head}{'FAILED':>12s}  (every round; see errors in results.json)")
            continue
        span = f"{cell['elements_per_s_min']:.0f}..{cell['elements_per_s_max']:.0f}"
        failed = f", {cell['rounds_failed']} rounds FAILED" if cell["rounds_failed"] else ""
        print(
            f"{head}{cell['elements_per_s_median']:>12.0f}{span:>22s}"
            f"{cell['first_batch_s_median']:>13.2f}{cell['peak_rss_mb_max']:>13.0f}  "
            f"{'ok' if cell['all_complete'] else 'WRONG COUNT'}{failed}"
        )
    ratios = [r for r in results["summary"]["ratios"] if len(r) > 2]
    if ratios:
        print(
            "\nelements/s ratios: median of the per-round ratios; "
            "RSS: max peak of tfscale - max peak of plain"
            f"\n{'dataset':10s}{'consumers':>10s}"
            f"{'tfscale/plain':>16s}{'tfscale/tfdata_service':>24s}{'RSS tfscale-plain MB':>22s}"
        )
        for r in ratios:
            print(
                f"{r['dataset']:10s}{r['consumers']:>10d}"
                f"{_fmt(r.get('tfscale_over_plain'), '.2f', 16, 'x')}"
                f"{_fmt(r.get('tfscale_over_tfdata_service'), '.2f', 24, 'x')}"
                f"{_fmt(r.get('rss_tfscale_minus_plain_mb'), '+.0f', 22)}"
            )


def _plot(results: dict[str, Any], path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    config = results["config"]
    datasets, cases, consumer_counts = config["datasets"], config["cases"], config["consumers"]
    cells = {(c["dataset"], c["consumers"], c["case"]): c for c in results["summary"]["cells"]}
    fig, axes = plt.subplots(
        2, len(datasets), figsize=(5.5 * len(datasets) + 1, 7.5), squeeze=False
    )
    width = 0.8 / len(cases)
    for d, dataset in enumerate(datasets):
        rate_ax, rss_ax = axes[0][d], axes[1][d]
        for c, case in enumerate(cases):
            x = [i + (c - (len(cases) - 1) / 2) * width for i in range(len(consumer_counts))]
            rows = [cells[(dataset, n, case)] for n in consumer_counts]
            median = [r.get("elements_per_s_median", 0.0) for r in rows]
            low = [m - r.get("elements_per_s_min", m) for m, r in zip(median, rows)]
            high = [r.get("elements_per_s_max", m) - m for m, r in zip(median, rows)]
            rate_ax.bar(x, median, width, yerr=[low, high], capsize=2, label=case, color=f"C{c}")
            rss = [r.get("peak_rss_mb_max", 0.0) for r in rows]
            rss_ax.bar(x, rss, width, label=case, color=f"C{c}")
        info = results["datasets"][dataset]
        rate_ax.set_title(
            f"{dataset}: {len(info['files'])} files, {info['elements']} elements, "
            f"{info['bytes'] / _MB:.0f} MB"
        )
        for ax in (rate_ax, rss_ax):
            ax.set_xticks(
                range(len(consumer_counts)), [f"{n} consumer(s)" for n in consumer_counts]
            )
        rate_ax.set_ylabel("elements/s (median; bars: min-max)")
        rss_ax.set_ylabel("consumer peak RSS, MB (max)")
        rate_ax.legend(fontsize=8)
    fig.suptitle(
        f"Input throughput, batch {config['batch_size']}, {config['rounds']} round(s), "
        f"{config['cpus']} CPUs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------


def _quick_default(flag: Any, quick_value: Any) -> Any:
    return quick_value if _QUICK.value and not flags.FLAGS[flag.name].present else flag.value


def _choices(flag: Any, valid: tuple[str, ...]) -> list[str]:
    unknown = sorted(set(flag.value) - set(valid))
    if unknown or not flag.value:
        raise app.UsageError(
            f"--{flag.name}: expected some of {', '.join(valid)}. Got: {flag.value}"
        )
    return [v for v in valid if v in flag.value]


def _measure(bench: _Bench, groups: list[tuple[str, int]], cases: list[str], rounds: int) -> list:
    all_rounds = []
    for r in range(rounds):
        runs = []
        for g, (dataset, consumers) in enumerate(groups):
            shift = (r + g) % len(cases)
            for case in cases[shift:] + cases[:shift]:
                run = bench.run(dataset, consumers, case, r)
                runs.append(run)
                if "error" in run:
                    figures = f"FAILED: {run['error']}"
                else:
                    figures = (
                        f"{run['elements_per_s']:.0f} elements/s ({run['elements']} in "
                        f"{run['seconds']:.2f} s), first batch {run['first_batch_s']:.2f} s, "
                        f"peak RSS {run['peak_rss_mb']:.0f} MB"
                        + ("" if run["complete"] else " WRONG ELEMENT COUNT")
                    )
                print(
                    f"round {r + 1}/{rounds} {dataset} x{consumers} {case}: {figures}", flush=True
                )
        all_rounds.append({"round": r, "runs": runs})
    return all_rounds


def _main() -> int:
    cases = _choices(_CASES, CASES)
    dataset_names = _choices(_DATASETS, DATASETS)
    consumer_counts = sorted({int(n) for n in _CONSUMERS.value})
    if not consumer_counts or consumer_counts[0] < 1:
        raise app.UsageError(f"--consumers must be positive. Got: {_CONSUMERS.value}")
    rounds = _quick_default(_ROUNDS, 1)
    data_dir = _DATA_DIR.value
    if _QUICK.value and not flags.FLAGS["data_dir"].present:
        data_dir = data_dir.rstrip("/") + "_quick"
    out = _OUT.value
    os.makedirs(out, exist_ok=True)
    datasets: dict[str, dict[str, Any]] = {}
    if SYNTHETIC in dataset_names:
        datasets[SYNTHETIC] = _synthetic()
    if LARGE in dataset_names:
        datasets[LARGE] = _large(
            data_dir,
            _quick_default(_LARGE_FILES, 2),
            _quick_default(_LARGE_FILE_MB, 20),
            _RECORD_KB.value,
        )
    for info in datasets.values():
        found = sorted(glob.glob(info["glob"]))
        if found != sorted(info["files"]):
            raise RuntimeError(
                f"The glob {info['glob']} matches {len(found)} files, not the dataset's"
            )
        _warm_page_cache(info["files"])
    groups = [(d, n) for d in dataset_names for n in consumer_counts]
    bench = _Bench(out, datasets, _quick_default(_RUN_TIMEOUT_S, 180.0))
    if SERVICE in cases:
        bench.start_service()
    measured = _measure(bench, groups, cases, rounds)
    results = {
        "config": {
            "rounds": rounds,
            "cases": cases,
            "datasets": dataset_names,
            "consumers": consumer_counts,
            "batch_size": _BATCH_SIZE.value,
            "cycle_length": _CYCLE_LENGTH.value,
            "policy": _POLICY.value,
            "journal": _JOURNAL.value,
            "max_shards": _MAX_SHARDS.value,
            "service_workers": _SERVICE_WORKERS.value,
            "quick": _QUICK.value,
            "cpus": os.cpu_count(),
        },
        "datasets": datasets,
        "rounds": measured,
        "summary": _summary(measured, groups, cases),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    _plot(results, os.path.join(out, "input_throughput.png"))
    _print_tables(results)
    failed = [run for r in measured for run in r["runs"] if "error" in run]
    print(f"\nwrote {out}/results.json and input_throughput.png (consumer logs: {out}/logs)")
    if failed:
        print(f"{len(failed)} run(s) FAILED, e.g. {failed[0]['case']}: {failed[0]['error']}")
        return 1
    return 0


def _on_sigterm(signum: int, frame: Any) -> None:
    del frame
    sys.exit(128 + signum)  # unwinds through the finally that stops the subprocesses


def main(argv: list[str]) -> None:
    del argv
    if _ROLE.value == "consumer":
        _consumer(json.loads(_SPEC.value))
        return
    if _ROLE.value == "service":
        _service(_SERVICE_WORKERS.value, json.loads(_SPEC.value)["parent"])
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = _main()
    finally:
        _Child.stop_all()
    sys.exit(code)


if __name__ == "__main__":
    app.run(main)
