"""A worker's lease bookkeeping: which shard runs to read, and what is due back.

`LeaseFeed` turns a dispatcher job into a stream of `Slot`s, each a run of
one shard's elements to read (from an offset, up to a count) or a run of
padding. It touches only names, tokens and counts: whoever reads the slots
(a tf.data pipeline in `tfscale.data.dispatched`, or
`consumer.ShardConsumer` for Python elements) reports back with `finished(slot_id, count)` once the
consumer has taken the element after a slot's last, and `report_consumed(n)`
once training has consumed the first `n` elements.

Leases are claimed at grant: committed for a streaming reader (it hands
elements on as it reads, so no other reader may race it for the shard), or
completed for equalized consumers (they wait for each other at epoch ends,
so none may hold a shard while it waits). Each acquire carries the
completions, releases and progress that are due (one round trip per grant);
the heartbeat thread settles them when no acquire has for a while, and
reports how far training consumed into each leased shard, so a shard whose
worker dies is leased again at that offset: nothing trained is trained twice.

Example:

```python
feed = LeaseFeed(client, "train", "worker-0")
for slot in feed.slots():
    elements = read(slot.name)[slot.offset:][:slot.count]
    ...                                   # hand them on
    feed.finished(slot.id, len(elements))  # after the last was taken
```
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Iterable
from typing import Iterator
from typing import Optional

import grpc
from absl import logging

from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import hash_ring
from tfscale.data.dispatcher import types

__all__ = [
    "LeaseFeed",
    "Slot",
]

# Due completions wait at most this long for an acquire to carry them.
_SETTLE_AFTER_S = 0.5
# Training that reported no progress for three of its usual report intervals
# (within these bounds) while no lease comes is waiting for input (see
# `LeaseFeed._unblock_training`).
_MIN_STARVED_S = 0.05
_MAX_STARVED_S = 2.0
_SLOT_IDS = itertools.count(1)
# A closing feed gives its leases back if the dispatcher answers within this
# long; otherwise they expire there (a dispatcher that is gone for good must
# not hold up the iterator's deletion).
_CLOSE_TIMEOUT_S = 5.0  # unique in the process: readers route by id


class _Closed(Exception):
    """The feed was closed while it waited for an epoch to end."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """A run of elements to read.

    Attributes:
      id: unique in the process, increasing in a feed's order.
      name: the shard's name.
      epoch: the epoch the run belongs to.
      shard: the shard's index in the job; None for padding.
      offset: elements of the shard to skip first.
      count: elements to take after those; -1 for all.
      repeat: cycle the shard's elements (padding).
      seed: a per-(job seed, epoch, shard) seed, for readers that shuffle.
    """

    id: int
    name: str
    epoch: int
    shard: Optional[int]
    offset: int = 0
    count: int = -1
    repeat: bool = False
    seed: int = 0


@dataclasses.dataclass
class _Run:
    """A yielded slot, for positions and progress: its lease and its count once known."""

    slot: Slot
    token: int  # 0: nothing to complete (padding, or completed at grant)
    count: Optional[int] = None  # elements handed on, once finished


class LeaseFeed:
    """The slots of the shards a dispatcher leases to one worker.

    Args:
      client: a `DispatcherClient`.
      job: the job's name.
      worker: this worker's stable name.
      max_shards: leases asked for per acquire (the next ones are asked for
        while the current ones are read).
      seed: mixed into each slot's `seed`.
      track_consumed: complete a shard only once training reported
        (`report_consumed`) that it consumed the shard's last element, not
        when the consumer takes it (a prefetch buffer may hold it); a crash
        then loses nothing. Training must report, or its shards never
        complete.

    Attributes:
      delivered: (epoch, shard name) of each shard completed, in order.
      lost: the same for shards handed on whose lease was lost before they
        were completed (heartbeats failed for a whole lease timeout): they
        may reach training again through another lease.
      per_epoch: elements handed on in each epoch, padding included.
    """

    def __init__(
        self,
        client: client_lib.DispatcherClient,
        job: str,
        worker: str,
        max_shards: int = 2,
        seed: int = 0,
        poll_s: float = 0.02,
        track_consumed: bool = False,
        start_epoch: int = 0,
    ):
        self._client = client
        self._job = job
        self._worker = worker
        self._max_shards = max_shards
        self._seed = seed
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._runs: list[_Run] = []  # every slot yielded, in order
        self._by_id: dict[int, _Run] = {}
        self._due: list[int] = []  # tokens to complete
        # (elements handed on up to a finished run's end, its token), until
        # training reports it consumed them
        self._awaiting: list[tuple[int, int]] = []
        self._handed_on = 0
        self._consumed_at = time.monotonic()
        self._report_gap = _MAX_STARVED_S / 3  # between training's reports (an average)
        self._reporting = track_consumed
        self._due_since = 0.0
        self._consumed = 0
        self._unfinished: dict[int, types.Lease] = {}  # token -> lease not yet completed
        self._equalize = "none"
        self._epoch = start_epoch
        self._sizes: dict[int, int] = collections.defaultdict(int)  # epoch -> my leased size
        self._yielded: dict[int, int] = collections.defaultdict(int)  # epoch -> elements yielded
        self._held: list[tuple[types.Lease, int]] = []  # drop: (lease, elements already yielded)
        self._latest: Optional[Slot] = None  # pad: the latest nonempty shard run
        self._yielded_total = 0  # elements of the runs yielded, padding included
        self._trained = False  # training reported consuming an element
        self._largest = 0  # the most elements a lease had to read
        self._stop = threading.Event()
        # Held while leasing: `close` waits for an acquire in flight.
        self._acquiring = threading.Lock()
        self.delivered: list[tuple[int, str]] = []
        self.lost: list[tuple[int, str]] = []
        self.per_epoch: dict[int, int] = {}

    # --- the reader's side ---------------------------------------------------

    def slots(self) -> Iterator[Slot]:
        """Registers, heartbeats, and yields slots until the job ends.

        Closing the generator (or `close()`) gives the unfinished leases back.
        """
        registration = self._client.register_worker(self._job, self._worker)
        self._equalize = registration.equalize if registration.num_consumers else "none"
        claim = "commit" if self._equalize == "none" else "complete"
        # Equalized consumers lease one shard at a time (see `_ahead`), so
        # that one of them does not take two the others then lack.
        max_shards = self._max_shards if self._equalize == "none" else 1
        beat = threading.Thread(
            target=self._heartbeat, args=(registration.heartbeat_interval_s,), daemon=True
        )
        beat.start()
        try:
            while True:
                if self._held:  # drop: no more shards while holding some back
                    yield from self._wait_held()
                    continue
                if self._ahead():  # equalized: leave the next shards to the others
                    time.sleep(self._poll_s)
                    idle = self._idle_slot()
                    if idle is not None:
                        yield idle
                    continue
                with self._acquiring:
                    if self._stop.is_set():  # closed: lease nothing more
                        return
                    result = self._acquire(max_shards, claim)
                if result.end_of_job:
                    yield from self._close_epochs(registration.num_epochs)
                    return
                if not result.leases:
                    yield from self._release_held()
                    self._unblock_training()
                    time.sleep(result.retry_after_s)
                    idle = self._idle_slot()
                    if idle is not None:
                        yield idle
                    continue
                yield from self._close_epochs(result.leases[0].epoch)  # one epoch per grant
                for lease in result.leases:
                    yield from self._slots_of(lease)
        except _Closed:
            return
        finally:
            self.close()

    def finished(self, slot_id: int, count: int) -> None:
        """The consumer took the element after slot `slot_id`'s last; it had `count`.

        The slot's shard is completed then, or with `track_consumed` (or
        after the first `report_consumed`), once training consumed its last
        element.
        """
        with self._lock:
            run = self._by_id.pop(slot_id, None)
            if run is None:
                return
            run.count = count
            self._handed_on += count
            epoch = run.slot.epoch
            self.per_epoch[epoch] = self.per_epoch.get(epoch, 0) + count
            if count and run.slot.shard is not None:
                self._latest = run.slot
            if run.token:
                self._awaiting.append((self._handed_on, run.token))
                self._settle_consumed()

    def report_consumed(self, consumed: int, send: bool = False) -> None:
        """Training consumed the first `consumed` elements handed on.

        From the first report on, a shard completes once training consumed
        its last element. The next heartbeat (or acquire) tells the
        dispatcher; with `send`, a heartbeat tells it now (before, say, the
        step is recorded as done: a crash in between then repeats nothing).
        """
        with self._lock:
            self._reporting = True
            if consumed > self._consumed:
                self._trained = True
                now = time.monotonic()
                gap = min(now - self._consumed_at, _MAX_STARVED_S)
                self._report_gap = gap if not self._consumed else 0.8 * self._report_gap + 0.2 * gap
                self._consumed = consumed
                self._consumed_at = now
            self._settle_consumed()
        if send:
            self._client.heartbeat(self._job, self._worker, self._progress())

    def _unblock_training(self) -> None:
        """Completes the runs training waits on, when no lease comes.

        With `track_consumed`, an epoch's last shard completes once training
        consumed its last element, but a batch holding it may need elements
        of the next epoch, which the dispatcher leases once the epoch is
        complete. When training has reported nothing new for a while and no
        lease comes, its runs handed on are completed as taken (a crash
        right then may lose that one batch in the making).
        """
        with self._lock:
            # Silent for a few of its usual report intervals: training waits.
            starved = min(max(3 * self._report_gap, _MIN_STARVED_S), _MAX_STARVED_S)
            if self._awaiting and time.monotonic() - self._consumed_at > starved:
                self._due.extend(token for _, token in self._awaiting)
                self._awaiting = []

    def _settle_consumed(self) -> None:
        """Moves the runs training is done with to the completions due (lock held)."""
        while self._awaiting and (not self._reporting or self._awaiting[0][0] <= self._consumed):
            if not self._due:
                self._due_since = time.monotonic()
            self._due.append(self._awaiting.pop(0)[1])

    def position(
        self, consumed: int, base: types.InputPosition = types.InputPosition()
    ) -> types.InputPosition:
        """The input position after the first `consumed` elements handed on.

        Args:
          consumed: elements of this feed that training consumed.
          base: the position this feed started from (after a rewind).

        Raises:
          ValueError: with `equalize="drop"` (held-back elements make the
            stream's order differ from the shards'), or for more elements
            than were handed on.
        """
        if self._equalize == "drop":
            raise ValueError("Input positions are not tracked with equalize='drop'")
        epoch, done, partials = base.epoch, set(base.done), dict(base.partials)
        remaining = consumed
        for run, take in self._walk(consumed):
            remaining -= take
            slot = run.slot
            if slot.epoch > epoch:  # padding too: a consumer may only pad an epoch
                epoch, done, partials = slot.epoch, set(), {}
            if slot.shard is None:  # padding
                continue
            if take == run.count:
                done.add(slot.shard)
                partials.pop(slot.shard, None)
            else:
                partials[slot.shard] = slot.offset + take
        if remaining > 0:
            raise ValueError(f"consumed={consumed} is more than the elements handed on")
        return types.InputPosition(epoch, tuple(sorted(done)), tuple(sorted(partials.items())))

    def consumed_ranges(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """Where elements `start` to `stop` (exclusive) handed on came from.

        Returns:
          `(epoch, shard, first, stop)` element ranges of shards, in the
          order handed on, padding left out.

        Raises:
          ValueError: for a bad span, or more elements than were handed on.
        """
        if not 0 <= start <= stop:
            raise ValueError(f"Expected 0 <= start <= stop. Received: start={start}, stop={stop}")
        ranges, offset = [], 0
        for run, take in self._walk(stop):
            lo, hi = max(start, offset), offset + take
            slot = run.slot
            if hi > lo and slot.shard is not None:
                first = slot.offset + lo - offset
                ranges.append((slot.epoch, slot.shard, first, first + hi - lo))
            offset = hi
        if offset < stop:
            raise ValueError(f"stop={stop} is more than the elements handed on ({offset})")
        return ranges

    def close(self) -> None:
        """Stops leasing and heartbeats; settles what is due, gives unfinished leases back.

        Once it returns, this feed acquires no lease (an acquire in flight
        is waited for), so a rewind after it is not undone by this feed.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        with self._acquiring:
            pass
        with self._lock:
            unfinished = sorted(self._unfinished)
        if not unfinished:
            return
        try:
            timeout_s = min(_CLOSE_TIMEOUT_S, self._client.unavailable_timeout_s)
            self._acquire(0, release=unfinished, unavailable_timeout_s=timeout_s)
        except (grpc.RpcError, types.DispatcherError):
            pass  # Nobody to give them to: they expire there, at their progress.

    # --- internals -------------------------------------------------------------

    def _walk(self, consumed: int) -> Iterator[tuple[_Run, int]]:
        """(run, elements of it consumed) for the runs the first `consumed` elements span."""
        remaining = consumed
        with self._lock:
            runs = list(self._runs)
        for run in runs:
            if remaining <= 0:
                return
            # A run not finished yet holds every element after the finished ones.
            take = remaining if run.count is None else min(run.count, remaining)
            remaining -= take
            yield run, take

    def _progress(self) -> dict[int, int]:
        """token -> absolute offset trained, for the leases not yet completed."""
        progress = {}
        with self._lock:
            consumed = self._consumed
        for run, take in self._walk(consumed):
            if run.token and take > 0:
                progress[run.token] = run.slot.offset + take
        with self._lock:
            return {t: o for t, o in progress.items() if t in self._unfinished}

    def _acquire(
        self,
        max_shards: int,
        claim: str = "none",
        release: Iterable[int] = (),
        unavailable_timeout_s: Optional[float] = None,
    ):
        """An acquire carrying the due completions and the progress; books its reply."""
        with self._lock:
            due, self._due = self._due, []
            release = [t for t in release if t not in due]
        progress = self._progress()
        result = self._client.acquire(
            self._job,
            self._worker,
            max_shards,
            claim=claim,
            complete=due,
            release=release,
            progress=progress,
            unavailable_timeout_s=unavailable_timeout_s,
        )
        rejected = set(result.rejected)
        with self._lock:
            for token in [*due, *release]:
                lease = self._unfinished.pop(token, None)
                if lease is None:
                    continue
                if token in rejected:
                    logging.warning(
                        "Shard %s: its lease %d was lost before the shard was completed",
                        lease.shard_name,
                        token,
                    )
                    self.lost.append((lease.epoch, lease.shard_name))
                elif token in due:
                    self.delivered.append((lease.epoch, lease.shard_name))
        return result

    def _ahead(self) -> bool:
        """Equalized, once training reports: a shard's worth yielded but not trained.

        Equalized leases complete at grant, so a consumer that leased ahead
        of its training would take shards its peers (started a moment
        later, or resumed) then lack, and they would pad with repeated
        elements instead; it asks for more once training is less than a
        shard behind. An iterator that training never reports on (one that
        only peeks at a batch) is not held back: nothing would release it.
        """
        with self._lock:
            if self._equalize == "none" or not self._trained or not self._largest:
                return False
            return self._yielded_total - self._consumed >= self._largest

    def _idle_slot(self) -> Optional[Slot]:
        """An empty run, while runs handed out are unfinished.

        A reader that waits for its next slot before it hands on the elements
        of those it holds (tf.data's interleave refills a finished slot
        first) would otherwise wait for completions that need those elements
        taken. An empty run of the latest shard's name reads nothing.
        """
        with self._lock:
            if not self._by_id or not self._runs:
                return None
            latest = self._runs[-1].slot
            slot = Slot(next(_SLOT_IDS), latest.name, latest.epoch, None, 0, 0)
            self._by_id[slot.id] = _Run(slot, 0)
        return slot

    def _shard_seed(self, epoch: int, name: str) -> int:
        return hash_ring.stable_hash(f"{self._seed}:{epoch}:{name}") & (2**62 - 1)

    def _slot(self, lease: types.Lease, offset: int, count: int, token: int) -> Slot:
        seed = self._shard_seed(lease.epoch, lease.shard_name)
        slot = Slot(
            next(_SLOT_IDS),
            lease.shard_name,
            lease.epoch,
            lease.shard_index,
            offset,
            count,
            seed=seed,
        )
        run = _Run(slot, token)
        with self._lock:
            self._runs.append(run)
            self._by_id[slot.id] = run
            self._yielded[lease.epoch] += max(count, 0)
            self._yielded_total += max(count, 0)
            self._largest = max(self._largest, lease.size - lease.offset)
        return slot

    def _slots_of(self, lease: types.Lease) -> Iterator[Slot]:
        if self._equalize == "none":
            with self._lock:
                self._unfinished[lease.token] = lease
            yield self._slot(lease, lease.offset, -1, lease.token)
            return
        # Completed at grant; sizes count elements (the dispatcher checks).
        self.delivered.append((lease.epoch, lease.shard_name))
        self._sizes[lease.epoch] += lease.size - lease.offset
        if self._equalize == "pad":
            yield self._slot(lease, lease.offset, lease.size - lease.offset, 0)
            return
        self._held.append((lease, 0))
        yield from self._release_held()

    def _release_held(self, final: Optional[types.EpochProgress] = None) -> Iterator[Slot]:
        """drop: yields held elements up to the smallest consumer count."""
        if not self._held:
            return
        progress = final or self._client.epoch_progress(self._job, self._epoch)
        allowed = progress.floor - self._yielded[self._epoch]
        while self._held and allowed > 0:
            lease, used = self._held[0]
            take = min(lease.size - lease.offset - used, allowed)
            yield self._slot(lease, lease.offset + used, take, 0)
            allowed -= take
            if used + take == lease.size - lease.offset:
                self._held.pop(0)
            else:
                self._held[0] = (lease, used + take)

    def _wait_held(self) -> Iterator[Slot]:
        """drop: yields held elements as the floor rises; closes the epoch once it ends."""
        if self._stop.is_set():
            raise _Closed()
        progress = self._client.epoch_progress(self._job, self._epoch)
        if progress.finished:
            yield from self._close_epochs(self._epoch + 1)
            return
        count = len(self._held)
        yield from self._release_held(progress)
        if len(self._held) == count:
            time.sleep(self._poll_s)

    def _close_epochs(self, until: int) -> Iterator[Slot]:
        """Equalizes and closes every epoch before `until`."""
        while self._epoch < until:
            if self._equalize != "none":
                progress = self._wait_finished(self._epoch)
                if self._equalize == "drop":
                    yield from self._release_held(progress)
                else:
                    yield from self._pad(progress)
            self._held = []
            self._epoch += 1

    def _pad(self, progress: types.EpochProgress) -> Iterator[Slot]:
        """pad: repeats the latest shard read up to the epoch's largest count.

        A consumer that read no shard yet (a resumed group can have more
        consumers than shards left in an epoch) pads with the dispatcher's
        `pad_shard`.
        """
        count = progress.ceiling - self._sizes[self._epoch]
        if count <= 0:
            return
        latest = self._latest_shard()
        if latest is not None:
            name, seed = latest.name, latest.seed
        else:
            name, seed = progress.pad_shard, self._shard_seed(self._epoch, progress.pad_shard)
        slot = Slot(next(_SLOT_IDS), name, self._epoch, None, 0, count, True, seed)
        with self._lock:
            run = _Run(slot, 0)
            self._runs.append(run)
            self._by_id[slot.id] = run
            self._yielded_total += count
        yield slot

    def _latest_shard(self) -> Optional[Slot]:
        """The latest shard run with elements (handed on, or at least sized so)."""
        with self._lock:
            if self._latest is not None:
                return self._latest
            for run in reversed(self._runs):
                if run.slot.shard is not None and run.slot.count != 0:
                    return run.slot
        return None

    def _wait_finished(self, epoch: int) -> types.EpochProgress:
        while not self._stop.is_set():
            progress = self._client.epoch_progress(self._job, epoch)
            if progress.finished:
                return progress
            time.sleep(self._poll_s)
        raise _Closed()

    def _heartbeat(self, interval_s: float) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(min(interval_s, _SETTLE_AFTER_S)):
            try:
                with self._lock:
                    overdue = self._due and time.monotonic() - self._due_since > _SETTLE_AFTER_S
                if overdue:
                    self._acquire(0)
                elif time.monotonic() - last_beat >= interval_s:
                    self._client.heartbeat(self._job, self._worker, self._progress())
                else:
                    continue
                last_beat = time.monotonic()
            except (grpc.RpcError, types.DispatcherError):
                pass  # The next acquire reports a lasting failure.
