"""A worker's stream of Python elements from the shards a dispatcher leases it.

For tests, simulations and Python-side consumers: training reads through
`tfscale.data.dispatched.DispatchedInput`, whose elements stay in tf.data.

Example:

```python
client = DispatcherClient("127.0.0.1:40123")
consumer = ShardConsumer(client, "train", "worker-0", readers.elements)
for count, element in enumerate(consumer, 1):
    ...                              # train on it
    consumer.report_consumed(count)  # a crash now loses nothing trained
```
"""

from __future__ import annotations

import itertools
import random
from typing import Callable
from typing import Iterable
from typing import Iterator
from typing import Optional
from typing import TypeVar

from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import feed as feed_lib
from tfscale.data.dispatcher import types

__all__ = [
    "ShardConsumer",
]

T = TypeVar("T")


class ShardConsumer:
    """A worker's stream of Python elements from leased shards, each shard once.

    For tests, simulations and Python-side consumers; training reads through
    `tfscale.data.dispatched.DispatchedInput`, whose elements stay in tf.data.
    Iterating walks a `LeaseFeed`'s slots, streams each shard with
    `read_fn(name)` (skipping the lease's offset), and reports a slot
    finished when the consumer asks for the element after its last. Closing
    the iterator early (or the process dying) gives the unfinished leases
    back, at the progress reported with `report_consumed`.

    With `shuffle_seed`, each shard's elements are shuffled (the whole shard
    in memory), the same way every time the shard is read in an epoch, so a
    shard resumed partway skips exactly the elements consumed before.

    Attributes:
      delivered, lost, per_epoch: as `LeaseFeed`'s, for the latest iterator.
    """

    def __init__(
        self,
        client: client_lib.DispatcherClient,
        job: str,
        worker: str,
        read_fn: Callable[[str], Iterable[T]],
        max_shards: int = 2,
        poll_s: float = 0.02,
        shuffle_seed: Optional[int] = None,
    ):
        self._client = client
        self._job = job
        self._worker = worker
        self._read_fn = read_fn
        self._max_shards = max_shards
        self._poll_s = poll_s
        self._shuffle_seed = shuffle_seed
        self._base = types.InputPosition()
        self._feed = self._new_feed()
        self._yielded = 0

    @property
    def delivered(self) -> list[tuple[int, str]]:
        return self._feed.delivered

    @property
    def lost(self) -> list[tuple[int, str]]:
        return self._feed.lost

    @property
    def per_epoch(self) -> dict[int, int]:
        return self._feed.per_epoch

    def __iter__(self) -> Iterator[T]:
        self._feed = feed = self._new_feed()
        self._yielded = 0
        slots = feed.slots()
        try:
            for slot in slots:
                count = 0
                for element in self._elements(slot):
                    self._yielded += 1
                    yield element
                    count += 1
                feed.finished(slot.id, count)
        finally:
            slots.close()

    def start_at(self, position: types.InputPosition) -> None:
        """Later iterators start at `position`, to which the job was (or is being) rewound.

        Their positions build on it, and they equalize the epochs from its
        epoch on only.
        """
        self._base = position

    def report_consumed(self, consumed: int, send: bool = False) -> None:
        """Training consumed the first `consumed` elements of the latest iterator."""
        self._feed.report_consumed(consumed, send)

    def position(
        self, consumed: int, base: Optional[types.InputPosition] = None
    ) -> types.InputPosition:
        """`LeaseFeed.position` of the latest iterator.

        Args:
          consumed: elements of the latest iterator that training consumed.
          base: the position that iterator started from; the one given to
            `start_at` if None.

        Raises:
          ValueError: for more elements than were yielded, or with equalize="drop".
        """
        if consumed > self._yielded:
            raise ValueError(
                f"consumed={consumed} is more than the elements yielded ({self._yielded})"
            )
        return self._feed.position(consumed, self._base if base is None else base)

    def consumed_ranges(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """`LeaseFeed.consumed_ranges` of the latest iterator: where elements came from."""
        return self._feed.consumed_ranges(start, stop)

    def _new_feed(self) -> feed_lib.LeaseFeed:
        return feed_lib.LeaseFeed(
            self._client,
            self._job,
            self._worker,
            self._max_shards,
            seed=self._shuffle_seed or 0,
            poll_s=self._poll_s,
            start_epoch=self._base.epoch,
        )

    def _elements(self, slot: feed_lib.Slot) -> Iterator[T]:
        elements: Iterable[T] = self._read_fn(slot.name)
        if self._shuffle_seed is not None:
            elements = list(elements)
            random.Random(f"{self._shuffle_seed}:{slot.epoch}:{slot.name}").shuffle(elements)
        if slot.repeat:
            elements = list(elements)
            elements = itertools.islice(itertools.cycle(elements), slot.count) if elements else ()
            yield from elements
            return
        stop = None if slot.count < 0 else slot.offset + slot.count
        yield from itertools.islice(elements, slot.offset, stop)
