"""Input through the shard dispatcher, as a `tf.data.Dataset` whose elements stay in tf.data.

The leases flow beside the elements: a `LeaseFeed` (Python, per shard)
yields the runs of shards to read; tf.data reads them with the user's
`reader`, several shards at once (a parallel interleave with a cycle length
and a bounded buffer per shard), and hands their elements on in the runs'
order, one shard after another, so that a count of consumed elements maps
to a position in the shards. After each run's last element comes a marker
that never leaves the pipeline: when the consumer asks past it, one Python
call books the shard finished (its completion rides on the next acquire).

Example:

```python
from tfscale.data import dispatched
from tfscale.data import readers

source = dispatched.DispatchedInput(
    "127.0.0.1:40123", "train", readers.records((28, 28, 1)), worker="worker-0")
for element in source.dataset: ...
source.report_consumed(1000)           # training consumed 1000 elements
position = source.position(consumed=1000)  # save it with the checkpoint
```
"""

from __future__ import annotations

import threading
from typing import Any
from typing import Optional

import tensorflow as tf

from tfscale import compat
from tfscale.data import identity
from tfscale.data import passes
from tfscale.data import readers as readers_lib
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import feed as feed_lib
from tfscale.data.dispatcher import types

__all__ = [
    "DispatchedInput",
    "default_worker_name",
]

# One shard at a time in the output (elements of a shard are consecutive).
_WHOLE_SHARD = 2**62
# Elements of fixed shapes move between the shard readers and the parse in
# batches of this many.
_READ_BATCH = 64


def default_worker_name() -> str:
    """This task's stable name from the resolved cluster (`identity.worker_name()`)."""
    return identity.worker_name()


class DispatchedInput:
    """Elements of the shards a dispatcher leases to this worker, as a dataset.

    Each iteration of `dataset` registers the worker, heartbeats from a
    background thread, leases shards `max_shards` at a time (each acquire
    carries the completions due and asks for the next leases while the
    current shards are read), and reads up to `cycle_length` shards at once
    with `reader(name)`, each buffering at most `buffer_elements` elements
    ahead. A shard counts for its epoch once the consumer asked past its
    last element; an iterator closed early gives its shards back. The
    dataset ends with the job's last epoch.

    `report_consumed(n)` tells the dispatcher (with the heartbeats) how far
    training got: a shard whose lease ends unfinished (this worker died) is
    leased again at that offset. `position(n)` is where training stands after
    `n` elements, for a checkpoint; `rewind(position)` moves the job back
    to it before a resumed run (for a group of consumers: one rewinds with
    `group=True`, the others `start_at(position)`).

    Args:
      address: the dispatcher's `host:port`.
      job: the job name.
      reader: shard name (a scalar `tf.string` tensor) -> `tf.data.Dataset`
        (see `tfscale.data.readers`).
      worker: this worker's stable name; `default_worker_name()` if None.
      max_shards: leases asked for per acquire.
      cycle_length: shards read at once.
      buffer_elements: elements each shard being read may buffer.
      shuffle_buffer: shuffle each shard's elements through a buffer of this
        many, seeded per (seed, epoch, shard), so a shard read again in an
        epoch comes out in the same order (0: no shuffle).
      seed: seeds the per-shard shuffles.
      track_consumed: complete a shard once training reported consuming its
        last element (`report_consumed`), not once the pipeline handed it
        on: elements in a prefetch buffer are not lost with a crash.
      auth_token: the dispatcher's token, if it requires one.
      tls_root_cert_file: PEM root certificate for TLS.

    Raises:
      ValueError: for a non-positive `max_shards`, `cycle_length` or
        `buffer_elements`, or a negative `shuffle_buffer`.
    """

    def __init__(
        self,
        address: str,
        job: str,
        reader: readers_lib.Reader,
        *,
        worker: Optional[str] = None,
        max_shards: int = 2,
        cycle_length: int = 4,
        buffer_elements: int = 256,
        shuffle_buffer: int = 0,
        seed: int = 0,
        track_consumed: bool = False,
        auth_token: Optional[str] = None,
        tls_root_cert_file: Optional[str] = None,
    ):
        for name, value, low in (
            ("max_shards", max_shards, 1),
            ("cycle_length", cycle_length, 1),
            ("buffer_elements", buffer_elements, 1),
            ("shuffle_buffer", shuffle_buffer, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}. Received: {name}={value!r}")
        self.worker = worker or default_worker_name()
        self.job = job
        self._client = client_lib.DispatcherClient(
            address, auth_token=auth_token, tls_root_cert_file=tls_root_cert_file
        )
        self._reader = reader
        self._max_shards = max_shards
        self._cycle_length = cycle_length
        self._buffer_elements = buffer_elements
        self._shuffle_buffer = shuffle_buffer
        self._seed = seed
        self._track_consumed = track_consumed
        self._base = types.InputPosition()
        self._lock = threading.Lock()
        self._feeds: dict[int, feed_lib.LeaseFeed] = {}  # slot id -> its feed
        self._ends: dict[int, int] = {}  # feed id -> stream index of its latest marker
        self._latest: Optional[feed_lib.LeaseFeed] = None
        self.dataset = self._build()

    def rewind(
        self, position: types.InputPosition, group: bool = False, num_consumers: int = 0
    ) -> None:
        """Moves the job back to `position`; later iterators start there.

        The latest iterator's feed is closed first, so that it leases
        nothing after the rewind. With `group`, the job is rewound for all
        its `num_consumers` consumers (see `DispatcherCore.rewind`): each
        of the others calls `start_at(position)`, and waits until this call
        returned before it iterates.
        """
        self.close()
        self._client.register_worker(self.job, self.worker)
        self._client.rewind(
            self.job, self.worker, position, group=group, num_consumers=num_consumers
        )
        self._base = position

    def start_at(self, position: types.InputPosition) -> None:
        """Later iterators start at `position`, to which another consumer rewinds the job."""
        self.close()
        self._base = position

    def report_consumed(self, consumed: int, send: bool = False) -> None:
        """Training consumed the first `consumed` elements of the latest iterator.

        Heartbeats carry it to the dispatcher; `send` does at once.
        """
        if self._latest is not None:
            self._latest.report_consumed(consumed, send)

    def position(self, consumed: int) -> types.InputPosition:
        """The position after `consumed` elements of the latest iterator."""
        if self._latest is None:
            return self._base
        return self._latest.position(consumed, self._base)

    def consumed_ranges(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """`LeaseFeed.consumed_ranges` of the latest iterator ([] before the first)."""
        if self._latest is None:
            return []
        return self._latest.consumed_ranges(start, stop)

    def close(self) -> None:
        """Ends the latest iterator's leases: completes what was taken, gives the rest back.

        A shard partly consumed goes back at the offset last reported with
        `report_consumed` (its start if none). Deleting the iterator does the
        same, once TensorFlow finalizes it.
        """
        if self._latest is not None:
            self._latest.close()

    @property
    def feed(self) -> Optional[feed_lib.LeaseFeed]:
        """The latest iterator's lease feed (its delivered / lost shards)."""
        return self._latest

    # --- the pipeline -------------------------------------------------------------

    def _build(self) -> tf.data.Dataset:
        signature = (
            tf.TensorSpec([], tf.int64),  # slot id
            tf.TensorSpec([], tf.string),  # shard name
            tf.TensorSpec([], tf.int64),  # offset
            tf.TensorSpec([], tf.int64),  # count (-1: all)
            tf.TensorSpec([], tf.bool),  # repeat
            tf.TensorSpec([], tf.int64),  # seed
        )
        slots = tf.data.Dataset.from_generator(self._slots, output_signature=signature)
        self._batched = False  # set when `_open` is traced
        # Several shards read at once, each with a bounded buffer, handed on
        # whole and in lease order.
        runs = compat.ordered_parallel_interleave(
            slots,
            self._open,
            cycle_length=self._cycle_length,
            block_length=_WHOLE_SHARD,
            buffer_output_elements=max(1, -(-self._buffer_elements // _READ_BATCH)),
        )
        batched = self._batched

        # Elements handed on so far, after each (batch of) element(s).
        def count(total, tagged):
            total += _size(tagged, batched)
            return total, (total, tagged)

        counted = runs.scan(tf.constant(0, tf.int64), count)
        elements = counted.filter(self._keep).map(lambda total, tagged: tagged[0])
        if batched:
            elements = elements.unbatch()
        parse = getattr(self._reader, "parse", None)
        if parse is not None:
            elements = elements.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return elements

    def _slots(self):
        """The generator behind the slots dataset: one `LeaseFeed` per iterator."""
        feed = feed_lib.LeaseFeed(
            self._client,
            self.job,
            self.worker,
            self._max_shards,
            seed=self._seed,
            track_consumed=self._track_consumed,
            start_epoch=self._base.epoch,
        )
        self._latest = feed
        with self._lock:
            self._ends[id(feed)] = 0
        try:
            for slot in feed.slots():
                with self._lock:
                    self._feeds[slot.id] = feed
                yield (slot.id, slot.name, slot.offset, slot.count, slot.repeat, slot.seed)
        finally:
            feed.close()

    def _open(self, slot_id, name, offset, count, repeat, seed) -> tf.data.Dataset:
        """One run's elements, tagged (elements, False, id), then a marker (empty, True, id).

        Elements of fixed shapes travel in batches of `_READ_BATCH` (the
        tagging costs per batch, not per element); the marker is then an
        empty batch.
        """
        read = getattr(self._reader, "read", self._reader)
        body = read(name)
        if self._shuffle_buffer:
            body = passes.seeded_shuffle(body, self._shuffle_buffer, seed)
        body = body.repeat(tf.where(repeat, tf.constant(-1, tf.int64), 1)).skip(offset).take(count)
        spec = body.element_spec
        self._batched = all(
            isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined()
            for s in tf.nest.flatten(spec)
        )
        if self._batched:
            body = body.batch(_READ_BATCH)
            spec = body.element_spec
        flags = tf.data.Dataset.from_tensors((False, slot_id)).repeat()
        tagged = tf.data.Dataset.zip((body, flags)).map(lambda e, f: (e, f[0], f[1]))
        marker = tf.data.Dataset.from_tensors((_dummy(spec), True, slot_id))
        return tagged.concatenate(marker)

    def _keep(self, total: tf.Tensor, tagged: tuple) -> tf.Tensor:
        _, is_marker, slot_id = tagged
        return tf.cond(
            is_marker,
            lambda: tf.py_function(self._finished, [slot_id, total], tf.bool),
            lambda: tf.constant(True),
        )

    def _finished(self, slot_id: tf.Tensor, total: tf.Tensor) -> bool:
        """At a run's marker: the consumer asked past its last element."""
        slot_id, total = int(slot_id), int(total)
        with self._lock:
            feed = self._feeds.pop(slot_id, None)
            if feed is None:
                return False
            count = total - self._ends[id(feed)]
            self._ends[id(feed)] = total
        feed.finished(slot_id, count)
        return False


def _size(tagged: tuple, batched: bool) -> tf.Tensor:
    """Elements in one tagged item: a batch's rows, else 1 (0 for a marker)."""
    elements, is_marker, _ = tagged
    if batched:
        return tf.shape(tf.nest.flatten(elements)[0], out_type=tf.int64)[0]
    return tf.where(is_marker, tf.constant(0, tf.int64), 1)


def _dummy(spec: Any) -> Any:
    """A placeholder element of `spec` (zeros; unknown dimensions, a batch's too, are 0)."""

    def zeros(s: Any) -> tf.Tensor:
        if not isinstance(s, tf.TensorSpec):
            raise TypeError(
                "Dispatched readers must yield dense tensors (nests of tf.TensorSpec). "
                f"Received an element spec with {s}"
            )
        if s.shape.rank is None:
            return tf.zeros([], s.dtype)
        return tf.zeros([d if d is not None else 0 for d in s.shape.as_list()], s.dtype)

    return tf.nest.map_structure(zeros, spec)
