"""The processes of `faults.py`: trainers of both systems, tf.data service servers.

Roles (`--role`):

- `tfscale_trainer`: consumes a `tfscale-dispatcher` job through
  `ShardConsumer` (one lease at a time) and trains on it;
- `tfscale_pipeline_trainer`: the same job through the input pipeline that
  `tfscale-train` builds: `DispatchedInput(address, job, reader,
  max_shards=1, track_consumed=True).dataset`, read with a tf.data reader
  (`readers.ranges()`), batched and prefetched (`tf.data.AUTOTUNE`) ahead
  of the steps;
- `tfdata_consumer`: consumes a tf.data service `distributed_epoch` job
  (one split per shard, flat-mapped to the shard's ids) and trains on it;
- `tfdata_dispatcher`: a fault-tolerant `DispatchServer` journaling to
  `--work_dir` on `--port`, so that a restarted one resumes the job; with
  `--start_file`, a standby that has imported TensorFlow already and serves
  once that file exists (a restart then costs what a tfscale one does);
- `tfdata_worker`: a `WorkerServer` of that dispatcher.

A trainer takes `--batch` ids from its input, sleeps `--step_s` (the step's
compute), then appends one line `S <time> <id> ...` to `--out` with a single
flushed write: that write is the step's durable commit, and an id counts as
trained only once it is in such a complete line. A tfscale trainer (either
role) first tells the dispatcher how many ids it has trained in all
(`report_consumed(n, send=True)`: a heartbeat, answered before the line is
written), so a shard whose lease ends unfinished (the trainer was killed
after the line) is leased again at the offset training reached, not at its
start. A kill between that report and the line would lose the step's ids
instead (the harness kills right after a line). A tfscale trainer also
appends `L <time> <shard>` when it starts reading a leased shard (the
pipeline role once per shard name: a `tf.py_function` in its reader, run
when tf.data opens the shard).
The last line is `DONE <time>` at the end of the epoch, or `ERROR <time> <message>`.
The servers print `READY` once they serve.

  .venv/bin/python tools/bench/fault_worker.py --role=tfscale_trainer \\
      --address=127.0.0.1:40123 --job=audit --name=t0 --out=/tmp/t0.log
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from typing import Callable
from typing import Iterable
from typing import Optional
from typing import TextIO

from absl import app
from absl import flags

from tfscale.data import readers
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import consumer as consumer_lib

_ROLES = (
    "tfscale_trainer",
    "tfscale_pipeline_trainer",
    "tfdata_consumer",
    "tfdata_dispatcher",
    "tfdata_worker",
)

_ROLE = flags.DEFINE_enum("role", None, _ROLES, "What this process is.")
_ADDRESS = flags.DEFINE_string("address", None, "Dispatcher address, host:port.")
_JOB = flags.DEFINE_string("job", "audit", "Job name.")
_NAME = flags.DEFINE_string("name", None, "Trainer name (its dispatcher worker name).")
_OUT = flags.DEFINE_string("out", None, "Trainer log file.")
_BATCH = flags.DEFINE_integer("batch", 5, "Ids per training step.")
_STEP_S = flags.DEFINE_float("step_s", 0.1, "Simulated compute per step, seconds.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 48, "Shards (tfdata_consumer).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 20, "Ids per shard (tfdata_consumer).")
_PORT = flags.DEFINE_integer("port", 0, "Port (tfdata_dispatcher).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Journal directory (tfdata_dispatcher).")
_WORKER_TIMEOUT_MS = flags.DEFINE_integer(
    "worker_timeout_ms", 3000, "tf.data: a worker silent this long is dropped."
)
_HEARTBEAT_MS = flags.DEFINE_integer("heartbeat_ms", 750, "tf.data worker heartbeat interval.")
_START_FILE = flags.DEFINE_string(
    "start_file",
    None,
    "tfdata_dispatcher: import TensorFlow, print STANDBY, serve once this file exists.",
)


_LOG_LOCK = threading.Lock()  # the pipeline's reader logs from a tf.data thread


def _line(log: TextIO, text: str) -> None:
    with _LOG_LOCK:
        log.write(f"{text}\n")
        log.flush()


Report = Callable[[int], None]


def _train(
    ids: Iterable[int], log: TextIO, batch: int, step_s: float, report: Optional[Report] = None
) -> None:
    """Trains on `ids` in steps of `batch`, committing each step as one log line.

    `report(n)`, if given, runs after each step's compute and before its
    line, with `n` the ids trained in all so far.
    """
    stream = iter(ids)
    trained = 0
    while True:
        step = [int(i) for i in itertools.islice(stream, batch)]
        if not step:
            break
        time.sleep(step_s)
        trained += len(step)
        if report is not None:
            report(trained)
        _line(log, f"S {time.time():.6f} {' '.join(map(str, step))}")
    _line(log, f"DONE {time.time():.6f}")


def _logged_read(log: TextIO) -> Callable[[str], list[int]]:
    """`readers.elements` that first logs the time the shard's lease was taken up."""

    def read(name: str) -> list[int]:
        _line(log, f"L {time.time():.6f} {name}")
        return list(readers.elements(name))

    return read


def _report_sent(source) -> Report:
    """`source.report_consumed(n, send=True)`: the dispatcher has it when this returns."""
    return lambda consumed: source.report_consumed(consumed, send=True)


def _tfscale_ids(log: TextIO) -> tuple[Iterable[int], Report]:
    client = client_lib.DispatcherClient(_ADDRESS.value)
    consumer = consumer_lib.ShardConsumer(
        client, _JOB.value, _NAME.value, _logged_read(log), max_shards=1
    )
    return consumer, _report_sent(consumer)


def _logged_ranges(log: TextIO):
    """`readers.ranges()` that logs `L <time> <shard>` when tf.data opens a shard.

    The line comes from a `tf.py_function` that returns the name the range is
    built from, so it runs before the shard's first element. Only a shard
    name's first open is logged: `LeaseFeed` also hands out empty runs of
    the latest shard's name while it waits for leases, which read nothing.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    ranges = readers.ranges()
    seen: set[str] = set()
    lock = threading.Lock()

    def note(name: tf.Tensor) -> tf.Tensor:
        text = name.numpy().decode()
        with lock:
            first = text not in seen
            seen.add(text)
        if first:
            _line(log, f"L {time.time():.6f} {text}")
        return name

    def read(name: tf.Tensor) -> tf.data.Dataset:
        logged = tf.py_function(note, [name], tf.string)
        logged.set_shape([])
        return ranges(logged)

    return read


def _tfscale_pipeline_ids(log: TextIO) -> tuple[Iterable[int], Report]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from tfscale.data import dispatched  # pylint: disable=import-outside-toplevel

    source = dispatched.DispatchedInput(
        _ADDRESS.value,
        _JOB.value,
        _logged_ranges(log),
        worker=_NAME.value,
        max_shards=1,
        track_consumed=True,  # as tfscale-train: shards complete once trained, not prefetched
    )
    batches = source.dataset.batch(_BATCH.value).prefetch(tf.data.AUTOTUNE)
    return (int(i) for batch in batches for i in batch.numpy()), _report_sent(source)


def _tfdata_ids() -> Iterable[int]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    size = _SHARD_SIZE.value
    dataset = tf.data.Dataset.range(_NUM_SHARDS.value).flat_map(
        lambda shard: tf.data.Dataset.range(shard * size, (shard + 1) * size)
    )
    dataset = dataset.apply(
        tf.data.experimental.service.distribute(
            processing_mode="distributed_epoch",
            service=f"grpc://{_ADDRESS.value}",
            job_name=_JOB.value,
        )
    )
    return (element.numpy() for element in dataset)


def _serve_tfdata(role: str) -> None:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    service = tf.data.experimental.service
    if _START_FILE.value:
        print("STANDBY", flush=True)
        while not os.path.exists(_START_FILE.value):
            time.sleep(0.01)
    if role == "tfdata_dispatcher":
        server = service.DispatchServer(
            service.DispatcherConfig(
                port=_PORT.value,
                work_dir=_WORK_DIR.value,
                fault_tolerant_mode=True,
                worker_timeout_ms=_WORKER_TIMEOUT_MS.value,
            )
        )
    else:
        server = service.WorkerServer(
            service.WorkerConfig(
                dispatcher_address=_ADDRESS.value,
                worker_address="127.0.0.1:%port%",
                heartbeat_interval_ms=_HEARTBEAT_MS.value,
            )
        )
    print("READY", flush=True)
    server.join()


def main(argv: list[str]) -> None:
    del argv
    role = _ROLE.value
    if role in ("tfdata_dispatcher", "tfdata_worker"):
        _serve_tfdata(role)
        return
    with open(_OUT.value, "a") as log:
        try:
            report = None
            if role == "tfscale_trainer":
                ids, report = _tfscale_ids(log)
            elif role == "tfscale_pipeline_trainer":
                ids, report = _tfscale_pipeline_ids(log)
            else:
                ids = _tfdata_ids()
            _train(ids, log, _BATCH.value, _STEP_S.value, report)
        except Exception as e:  # pylint: disable=broad-except
            _line(log, f"ERROR {time.time():.6f} {type(e).__name__}: {str(e)[:300]!r}")
            sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    flags.mark_flag_as_required("role")
    app.run(main)
