"""A consistent-hash ring of shards and virtual worker nodes, updated in place.

The `consistent_hash` policy keeps each shard with its worker across epochs;
this ring makes a change of the worker set cost only the shards that move.

Example:

```python
ring = HashRing(["a", "b", "c"], virtual_nodes=256)
ring.update(["worker-0", "worker-1"])
ring.owners          # the owner of each shard, by index
ring.update(["worker-0", "worker-1", "worker-2"])   # recomputes only worker-2's share
```
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Optional
from typing import Sequence

__all__ = [
    "HashRing",
    "stable_hash",
]

ShardIndex = int
WorkerName = str


def stable_hash(key: str) -> int:
    """A stable 64-bit hash; Python's `hash()` is salted per process."""
    data = key.encode("utf-8", "surrogatepass")  # names may hold lone surrogates
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _vnode_key(worker: WorkerName, replica: int) -> str:
    # Only digits follow the last NUL, so distinct (worker, replica) give distinct keys.
    return f"{worker}\x00{replica}"


class HashRing:
    """A consistent-hash ring of shards and virtual nodes, updated in place.

    A shard belongs to the worker of the first virtual node at or after the
    shard's hash (wrapping around); virtual nodes of equal hash are ordered by
    worker name. A join takes only the shards in the new virtual nodes'
    segments, a leave hands on only the leaving worker's shards: each
    membership change recomputes the owners of the shards that move, and
    counts them in `recomputed`.
    """

    def __init__(self, shard_names: Sequence[str], virtual_nodes: int) -> None:
        self._virtual_nodes = virtual_nodes
        hashes = [stable_hash(name) for name in shard_names]
        # Shard indices sorted by hash, and their hashes, for segment lookups.
        self._by_hash = sorted(range(len(hashes)), key=lambda shard: (hashes[shard], shard))
        self._sorted_hashes = [hashes[shard] for shard in self._by_hash]
        self._hashes = hashes
        self._nodes: list[tuple[int, WorkerName]] = []
        self.owners: list[Optional[WorkerName]] = [None] * len(hashes)
        self._owned: dict[WorkerName, set[ShardIndex]] = {}
        self.recomputed = 0

    @property
    def workers(self) -> frozenset[WorkerName]:
        return frozenset(self._owned)

    def update(self, workers: Sequence[WorkerName]) -> None:
        """Makes `workers` the ring's worker set, moving only the shards that change owner."""
        wanted = set(workers)
        for worker in sorted(self._owned.keys() - wanted):
            self._leave(worker)
        joining = sorted(wanted - self._owned.keys())
        if not self._owned and joining:  # every shard moves: place them all at once
            for worker in joining:
                self._owned[worker] = set()
                self._nodes.extend(self._vnodes(worker))
            self._nodes.sort()
            self._reassign(range(len(self.owners)))
            return
        for worker in joining:
            self._join(worker)

    def _vnodes(self, worker: WorkerName) -> list[tuple[int, WorkerName]]:
        return [(stable_hash(_vnode_key(worker, r)), worker) for r in range(self._virtual_nodes)]

    def _owner_of(self, shard: ShardIndex) -> WorkerName:
        i = bisect.bisect_left(self._nodes, (self._hashes[shard], ""))
        return self._nodes[i % len(self._nodes)][1]

    def _reassign(self, shards: Sequence[ShardIndex]) -> None:
        for shard in shards:
            old = self.owners[shard]
            new = self._owner_of(shard) if self._nodes else None
            self.recomputed += 1
            if old == new:
                continue
            if old is not None:
                self._owned[old].discard(shard)
            if new is not None:
                self._owned[new].add(shard)
            self.owners[shard] = new

    def _leave(self, worker: WorkerName) -> None:
        gone = set(self._vnodes(worker))
        self._nodes = [node for node in self._nodes if node not in gone]
        self._reassign(sorted(self._owned[worker]))
        del self._owned[worker]

    def _join(self, worker: WorkerName) -> None:
        self._owned[worker] = set()
        for node in self._vnodes(worker):
            bisect.insort(self._nodes, node)
        moved = set()
        for node in self._vnodes(worker):
            moved.update(self._segment(bisect.bisect_left(self._nodes, node)))
        self._reassign(sorted(moved))

    def _segment(self, i: int) -> list[ShardIndex]:
        """Shards whose hash lies in (hash of node i-1, hash of node i], wrapping."""
        low, high = self._nodes[i - 1][0], self._nodes[i][0]
        left = bisect.bisect_right(self._sorted_hashes, low)
        right = bisect.bisect_right(self._sorted_hashes, high)
        if low < high:
            return self._by_hash[left:right]
        if low == high:  # an equal-hash predecessor owns them still
            return []
        return self._by_hash[left:] + self._by_hash[:right]
