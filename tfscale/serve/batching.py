"""Dynamic batching of a serving replica: merge requests, pad, run once, split back.

Requests (dicts of arrays whose first axis is the batch) wait in a bounded
queue. A batch thread merges them in arrival order until the next one would
exceed `max_batch_size` or the oldest has waited `max_queue_delay_ms`, pads the
merged rows up to the smallest of `allowed_batch_sizes` that holds them (so a
compiled `run_fn` sees few distinct shapes), runs `run_fn` once, drops the
padding and hands each request its own rows through a `Future`.

Refusals are raised by `submit` at once (`QueueFull`, `InvalidRequest`,
`RequestTooLarge`, `DeadlineExceeded`, `BatcherClosed`); outcomes after
acceptance arrive through the future (`DeadlineExceeded`, the error of
`run_fn`, `BatcherClosed`). The gRPC servicer maps these errors to status
codes; this module knows nothing of gRPC.

Example:

```python
def run_fn(inputs):
    return {"y": model(inputs["x"], training=False).numpy()}

options = BatchingOptions(max_batch_size=16, max_queue_delay_ms=2.0)
with DynamicBatcher(run_fn, options) as batcher:
    future = batcher.submit({"x": np.ones((3, 8), np.float32)})
    outputs = future.result()  # {"y": array of 3 rows}
```
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Optional

import numpy as np

__all__ = [
    "BatcherClosed",
    "BatcherStats",
    "BatchingError",
    "BatchingOptions",
    "DeadlineExceeded",
    "DynamicBatcher",
    "InvalidRequest",
    "OnBatch",
    "QueueFull",
    "RequestTiming",
    "RequestTooLarge",
    "RunFn",
    "Signature",
    "timing",
]

Arrays = dict[str, np.ndarray]
# Computes one batch: every input and output has the batch on its first axis.
RunFn = Callable[[Arrays], Mapping[str, Any]]
# Called once per batch: (rows, padded rows, oldest request's queue wait s, run_fn s).
OnBatch = Callable[[int, int, float, float], None]
# Input name -> (dtype, shape without the batch axis; None in it matches any size).
Signature = Mapping[str, tuple[Any, tuple[Optional[int], ...]]]
Clock = Callable[[], float]

_LOG = logging.getLogger(__name__)


class BatchingError(Exception):
    """Base of the errors a request can get; the servicer maps each to a code."""


class QueueFull(BatchingError):
    """`max_queue_size` requests are already waiting (RESOURCE_EXHAUSTED)."""


class InvalidRequest(BatchingError):
    """The request's inputs are malformed or do not match the signature."""


class RequestTooLarge(InvalidRequest):
    """The request has more rows than one batch may hold."""


class DeadlineExceeded(BatchingError):
    """The request's deadline passed before its batch ran; it was not computed."""


class BatcherClosed(BatchingError):
    """The batcher is closed: it accepts no request and ran or failed the queued ones."""


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}. Received: {name}={value!r}")


def _default_sizes(max_batch_size: int) -> tuple[int, ...]:
    powers = tuple(2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size)
    return powers + (max_batch_size,)


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """How a `DynamicBatcher` forms batches.

    Attributes:
      max_batch_size: Most rows one batch (and so one request) may hold.
      max_queue_delay_ms: Longest time the oldest queued request waits for
        others to join it; 0 runs whatever is queued as soon as a batch thread
        is free.
      allowed_batch_sizes: Increasing sizes ending at `max_batch_size`; a
        batch is padded up to the smallest that holds it. Default: the powers
        of two below `max_batch_size`, then `max_batch_size` (filled in at
        construction: `dataclasses.replace` of `max_batch_size` needs
        `allowed_batch_sizes=None` too).
      max_queue_size: Most requests waiting at once; `submit` raises
        `QueueFull` beyond it.
      num_batch_threads: Threads forming and running batches concurrently.

    Example:

    ```python
    BatchingOptions(max_batch_size=12)  # allowed_batch_sizes=(1, 2, 4, 8, 12)
    ```
    """

    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    allowed_batch_sizes: Optional[tuple[int, ...]] = None
    max_queue_size: int = 1024
    num_batch_threads: int = 1

    def __post_init__(self):
        _check_int("max_batch_size", self.max_batch_size, 1)
        delay = self.max_queue_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < 1e9:
            raise ValueError(
                "max_queue_delay_ms must be a finite number >= 0. "
                f"Received: max_queue_delay_ms={delay!r}"
            )
        _check_int("max_queue_size", self.max_queue_size, 1)
        _check_int("num_batch_threads", self.num_batch_threads, 1)
        sizes = self.allowed_batch_sizes
        if sizes is None:
            sizes = _default_sizes(self.max_batch_size)
        elif not isinstance(sizes, (tuple, list)) or not sizes:
            raise ValueError(
                "allowed_batch_sizes must be a non-empty tuple. "
                f"Received: allowed_batch_sizes={sizes!r}"
            )
        sizes = tuple(sizes)
        ints = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
        increasing = all(a < b for a, b in zip(sizes, sizes[1:]))
        if not ints or not increasing or sizes[-1] != self.max_batch_size:
            raise ValueError(
                "allowed_batch_sizes must be increasing ints >= 1 ending at max_batch_size="
                f"{self.max_batch_size}. Received: allowed_batch_sizes={sizes!r}"
            )
        object.__setattr__(self, "allowed_batch_sizes", sizes)


@dataclasses.dataclass(frozen=True)
class BatcherStats:
    """Counters of a `DynamicBatcher` since it started, for a metrics exporter.

    Attributes:
      requests: Requests accepted by `submit`.
      batches: Batches given to `run_fn` (failed ones included).
      rows: Request rows given to `run_fn`.
      padded_rows: Padding rows added to reach an allowed batch size.
      expired: Requests whose deadline passed, at `submit` or in the queue.
      rejected: Requests refused with `QueueFull`.
      failed: Requests failed by an error of `run_fn` or of its outputs.
      cancelled: Requests whose future was cancelled while queued.
      queue_depth: Requests waiting now.
    """

    requests: int = 0
    batches: int = 0
    rows: int = 0
    padded_rows: int = 0
    expired: int = 0
    rejected: int = 0
    failed: int = 0
    cancelled: int = 0
    queue_depth: int = 0


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """Where one request's time went, for latency reports that keep queue and compute apart.

    Attributes:
      queue_s: Seconds from `submit` until its batch started.
      compute_s: Seconds its batch spent in `run_fn`.
      batch_rows: Rows of its batch, before padding.
      padded_rows: Rows of its batch, padding included.
    """

    queue_s: float
    compute_s: float
    batch_rows: int
    padded_rows: int


def timing(future: concurrent.futures.Future) -> Optional[RequestTiming]:
    """The timing of a request whose batch ran (None if it never ran).

    Example:

    ```python
    future = batcher.submit({"x": x})
    future.result()
    timing(future).queue_s
    ```
    """
    return getattr(future, _TIMING_ATTRIBUTE, None)


_TIMING_ATTRIBUTE = "_tfscale_timing"


@dataclasses.dataclass(eq=False)
class _Request:
    inputs: Arrays
    rows: int
    key: tuple  # what must agree for requests to be merged
    deadline: Optional[float]
    enqueued_at: float
    future: concurrent.futures.Future


def _describe(array: np.ndarray) -> str:
    return f"dtype={array.dtype.name}, shape={tuple(array.shape)}"


def _to_arrays(inputs: Any) -> Arrays:
    """The request's inputs as arrays sharing a first axis of at least one row."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise InvalidRequest(f"inputs must be a non-empty dict of arrays. Received: {inputs!r:.80}")
    arrays = {}
    for name, value in inputs.items():
        array = np.asarray(value)
        if not isinstance(name, str) or array.ndim == 0:
            raise InvalidRequest(
                f"Each input must be named by a str and have a batch axis. "
                f"Received: {name!r} with {_describe(array)}"
            )
        arrays[name] = array
    rows = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise InvalidRequest(f"Inputs must share a batch size of at least 1. Received: {rows}")
    return arrays


def _normalize_signature(signature: Signature) -> dict[str, tuple[np.dtype, tuple]]:
    normalized = {}
    for name, spec in signature.items():
        try:
            dtype, shape = spec
            # tf.DType is accepted through its numpy twin, without importing TensorFlow.
            dtype = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
            shape = tuple(None if d is None else int(d) for d in shape)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"signature entries must be (dtype, shape without the batch axis). "
                f"Received: {name!r}: {spec!r} ({e})"
            ) from None
        normalized[name] = (dtype, shape)
    return normalized


def _check_signature(arrays: Arrays, signature: dict[str, tuple[np.dtype, tuple]]) -> None:
    if set(arrays) != set(signature):
        raise InvalidRequest(f"Input names must be {sorted(signature)}. Received: {sorted(arrays)}")
    for name, (dtype, shape) in signature.items():
        array = arrays[name]
        dims = array.shape[1:]
        if (
            array.dtype != dtype
            or len(dims) != len(shape)
            or any(want is not None and want != got for want, got in zip(shape, dims))
        ):
            raise InvalidRequest(
                f"Input {name!r} must have dtype={dtype.name}, shape=(batch, "
                f"{', '.join('None' if d is None else str(d) for d in shape)}). "
                f"Received: {_describe(array)}"
            )


def _merge(requests: list[_Request], padding: int) -> Arrays:
    """One batch from the requests' rows, padded by repeating the last row."""
    if len(requests) == 1 and not padding:
        return requests[0].inputs
    merged = {}
    for name in requests[0].inputs:
        parts = [r.inputs[name] for r in requests]
        if padding:
            parts.append(np.repeat(parts[-1][-1:], padding, axis=0))
        merged[name] = np.concatenate(parts)
    return merged


def _split(outputs: Any, requests: list[_Request], padded_size: int) -> list[Arrays]:
    """Each request's rows of `run_fn`'s outputs, the padding dropped."""
    if not isinstance(outputs, Mapping):
        raise TypeError(f"run_fn must return a dict of arrays. Received: {type(outputs).__name__}")
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    for name, array in arrays.items():
        if array.ndim == 0 or array.shape[0] != padded_size:
            raise ValueError(
                f"run_fn output {name!r} must have {padded_size} rows (the padded batch). "
                f"Received: {_describe(array)}"
            )
    results, start = [], 0
    for request in requests:
        stop = start + request.rows
        results.append({name: array[start:stop] for name, array in arrays.items()})
        start = stop
    return results


class DynamicBatcher:
    """Merges concurrent requests into padded batches and runs each once.

    A request larger than `max_batch_size` is refused (`RequestTooLarge`), not
    split. Requests are merged only with requests whose inputs agree in names,
    dtypes and non-batch dims; one that differs waits for a batch of its own
    kind (the oldest queued request always starts the next batch). With a
    `signature`, a request that does not match it is refused at `submit`.

    A request whose deadline passes while queued is failed with
    `DeadlineExceeded` (a waiting batch thread wakes for it) and never reaches
    `run_fn`. An exception of `run_fn` fails every request of its batch and the
    batcher keeps serving. `close()` runs what is queued by default.

    Example:

    ```python
    batcher = DynamicBatcher(lambda inputs: {"y": inputs["x"] * 2}, BatchingOptions())
    future = batcher.submit({"x": np.arange(3.0)}, deadline=time.monotonic() + 0.5)
    print(future.result()["y"])  # [0. 2. 4.]
    batcher.close()
    ```
    """

    def __init__(
        self,
        run_fn: RunFn,
        options: Optional[BatchingOptions] = None,
        *,
        signature: Optional[Signature] = None,
        on_batch: Optional[OnBatch] = None,
        clock: Clock = time.monotonic,
    ):
        """Starts the batch threads.

        Args:
          run_fn: Computes a batch: dict of arrays in, dict of arrays (or
            tensors) with as many rows out.
          options: How batches are formed; default `BatchingOptions()`.
          signature: Input name -> (dtype, shape without the batch axis);
            requests that do not match are refused at `submit`.
          on_batch: Called by a batch thread after each batch, before its
            futures are resolved, with (rows, padded rows, queue wait of the
            oldest request in s, `run_fn` time in s); keep it quick. Its errors
            are logged and ignored.
          clock: Seconds, consistent with `time.monotonic()` (deadlines are on
            this clock); injectable for tests.

        Raises:
          ValueError: If `options` is not a `BatchingOptions` or `signature` is malformed.
        """
        options = BatchingOptions() if options is None else options
        if not isinstance(options, BatchingOptions):
            raise ValueError(f"options must be a BatchingOptions. Received: {options!r}")
        self._run_fn = run_fn
        self._options = options
        self._signature = None if signature is None else _normalize_signature(signature)
        self._on_batch = on_batch
        self._clock = clock
        self._delay_s = options.max_queue_delay_ms / 1000.0
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[_Request] = collections.deque()
        self._stats = BatcherStats()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"tfscale-batcher-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def options(self) -> BatchingOptions:
        """The options the batcher was built with."""
        return self._options

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed

    def __repr__(self) -> str:
        return f"DynamicBatcher(options={self._options!r}, closed={self._closed})"

    def submit(
        self, inputs: Mapping[str, np.ndarray], deadline: Optional[float] = None
    ) -> concurrent.futures.Future:
        """Queues one request of one or more rows; never blocks.

        Args:
          inputs: Input name -> array whose first axis is the request's rows;
            not copied, so leave the arrays unchanged until the future is done.
          deadline: Absolute time (of the clock, `time.monotonic()` by
            default) after which the request must not be computed.

        Returns:
          A future of the request's outputs: output name -> its rows. It fails
          with `DeadlineExceeded`, the error of `run_fn`, or `BatcherClosed`
          (closed without draining). Cancelling it while queued drops the request.

        Raises:
          InvalidRequest: If the inputs are malformed or do not match the signature.
          RequestTooLarge: If the request has more than `max_batch_size` rows.
          DeadlineExceeded: If `deadline` has already passed.
          QueueFull: If `max_queue_size` requests are waiting.
          BatcherClosed: If `close()` was called.
        """
        arrays = _to_arrays(inputs)
        if self._signature is not None:
            _check_signature(arrays, self._signature)
        rows = next(iter(arrays.values())).shape[0]
        if rows > self._options.max_batch_size:
            raise RequestTooLarge(
                f"A request may have at most max_batch_size={self._options.max_batch_size} rows. "
                f"Received: {rows} rows"
            )
        key = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in arrays.items()))
        with self._cond:
            if self._closed:
                raise BatcherClosed("The batcher is closed and accepts no request.")
            now = self._clock()
            if deadline is not None and deadline <= now:
                self._count(expired=1)
                raise DeadlineExceeded(f"The deadline passed {now - deadline:.6f} s before submit.")
            if len(self._queue) >= self._options.max_queue_size:
                self._count(rejected=1)
                raise QueueFull(
                    f"The queue holds max_queue_size={self._options.max_queue_size} requests."
                )
            future = concurrent.futures.Future()
            self._queue.append(_Request(arrays, rows, key, deadline, now, future))
            self._count(requests=1)
            self._cond.notify()
        return future

    def stats(self) -> BatcherStats:
        """The counters so far and the current queue depth."""
        with self._cond:
            return dataclasses.replace(self._stats, queue_depth=len(self._queue))

    def close(self, drain: bool = True) -> None:
        """Stops accepting requests and joins the batch threads; safe to call twice.

        Args:
          drain: If True, the queued requests are run (without waiting for the
            queue delay); if False, their futures fail with `BatcherClosed`.
        """
        with self._cond:
            self._closed = True
            dropped = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
        for request in dropped:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(BatcherClosed("The batcher closed before the run."))
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _count(self, **increments: int) -> None:
        changes = {k: getattr(self._stats, k) + v for k, v in increments.items()}
        self._stats = dataclasses.replace(self._stats, **changes)

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> Optional[list[_Request]]:
        """Waits for a ready batch; None once closed and drained."""
        while True:
            with self._cond:
                now = self._clock()
                expired = self._take_dead(now)
                if not expired:
                    if not self._queue and self._closed:
                        return None
                    batch, wait_s = self._take_batch(now)
                    if batch:
                        return batch
                    self._cond.wait(wait_s)
                    continue
            for request in expired:
                request.future.set_exception(
                    DeadlineExceeded("The deadline passed while the request was queued.")
                )

    def _take_dead(self, now: float) -> list[_Request]:
        """Removes cancelled and expired requests; returns the expired ones, now running."""
        expired, alive, cancelled = [], collections.deque(), 0
        for request in self._queue:
            if request.deadline is not None and request.deadline <= now:
                if request.future.set_running_or_notify_cancel():
                    expired.append(request)
                else:
                    cancelled += 1
            elif request.future.cancelled():
                cancelled += 1
            else:
                alive.append(request)
        if len(alive) != len(self._queue):
            self._queue = alive
            self._count(expired=len(expired), cancelled=cancelled)
        return expired

    def _take_batch(self, now: float) -> tuple[list[_Request], Optional[float]]:
        """The ready batch, or ([], seconds to wait before it may be)."""
        if not self._queue:
            return [], None
        head = self._queue[0]
        chosen, rows, full = [], 0, False
        for request in self._queue:
            if request.key != head.key:
                continue
            if rows + request.rows > self._options.max_batch_size:
                full = True
                break
            chosen.append(request)
            rows += request.rows
        full = full or rows == self._options.max_batch_size
        ready_at = head.enqueued_at + self._delay_s
        if not (full or self._closed or now >= ready_at):
            deadlines = [r.deadline for r in self._queue if r.deadline is not None]
            return [], min([ready_at] + deadlines) - now
        taken = set(map(id, chosen))
        self._queue = collections.deque(r for r in self._queue if id(r) not in taken)
        if self._queue:  # another idle thread may start the next batch
            self._cond.notify()
        running = [r for r in chosen if r.future.set_running_or_notify_cancel()]
        self._count(cancelled=len(chosen) - len(running))
        if not running:  # all cancelled: look again
            return [], 0.0
        return running, None

    def _run(self, requests: list[_Request]) -> None:
        rows = sum(r.rows for r in requests)
        sizes = self._options.allowed_batch_sizes
        padded = sizes[bisect.bisect_left(sizes, rows)]
        start = self._clock()
        try:
            results = _split(self._run_fn(_merge(requests, padded - rows)), requests, padded)
            error = None
        except Exception as e:  # pylint: disable=broad-except
            results, error = None, e
        compute_s = self._clock() - start
        with self._cond:
            self._count(batches=1, rows=rows, padded_rows=padded - rows)
            if error is not None:
                self._count(failed=len(requests))
        if self._on_batch is not None:
            try:
                self._on_batch(rows, padded, start - requests[0].enqueued_at, compute_s)
            except Exception:  # pylint: disable=broad-except
                _LOG.exception("on_batch raised; the batch's requests are unaffected")
        for i, request in enumerate(requests):
            queue_s = start - request.enqueued_at
            setattr(
                request.future, _TIMING_ATTRIBUTE, RequestTiming(queue_s, compute_s, rows, padded)
            )
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(results[i])
