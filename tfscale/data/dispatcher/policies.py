"""Shard assignment policies of the dispatcher, behind one small interface.

The dispatcher core asks the job's policy, on every acquire, which pending
shards (and, for speculation, which in-flight shards) to grant the
requesting worker. Policies see a read-only `PolicyView` and return a
`Selection`; the core validates it and does all state changes.

Policies, by name (`make_policy(name)`):

- `"round_robin"`: the shard of permutation rank r belongs to live worker
  `r % len(live_workers)`; a worker gets its own pending shards first and,
  once those are gone, steals other workers' pending shards so that a slow or
  dead worker does not stall the epoch.
- `"least_loaded"`: least connections weighted by shard size. Pending shards go
  largest first, and only while the requester stays within one (largest) shard
  of the least-loaded other worker; an idle requester always gets one.
- `"consistent_hash"`: consistent hashing of shard names onto a ring of
  virtual worker nodes. The same worker set gives the same owners in every
  epoch and process, so workers keep their shards (and their caches); a
  join or leave moves (and recomputes) only its share; it never steals.
- `"adaptive"`: throughput-weighted. A worker of unknown speed gets one small
  shard (a probe); faster workers get more and larger shards; a slower one
  gets only shards it can finish before the others would finish the rest;
  once nothing is pending, an idle fast worker may get one speculative backup
  of the in-flight shard that a slow holder would finish last.

Example:

```python
policy = make_policy("round_robin")
selection = policy.select(view, max_shards=2)
selection.shards  # e.g. (0, 3)
```
"""

from __future__ import annotations

import abc
import dataclasses
import math
import statistics
from typing import Mapping
from typing import Optional
from typing import Sequence
from typing import Union

from tfscale.data.dispatcher import hash_ring

__all__ = [
    "POLICIES",
    "Adaptive",
    "ConsistentHash",
    "InFlight",
    "LeastLoaded",
    "Policy",
    "PolicyView",
    "RoundRobin",
    "Selection",
    "make_policy",
]

ShardIndex = int
WorkerName = str
# Shard name -> owning worker name.
Assignment = dict[str, WorkerName]

# Ring points per worker of `consistent_hash`: at 20k shards and 64 workers the
# shares lie within 0.84 and 1.16 of the mean (standard deviation 8%).
DEFAULT_VIRTUAL_NODES = 256


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A shard leased and not yet completed in the current epoch.

    Attributes:
      shard: shard index.
      worker: the worker holding the (primary) lease.
      since: clock time the lease was granted.
      has_backup: whether a speculative backup lease exists already.
    """

    shard: int
    worker: str
    since: float
    has_backup: bool


@dataclasses.dataclass(frozen=True)
class PolicyView:
    """What a policy may look at when a worker asks for shards.

    Attributes:
      worker: the requesting worker's name.
      live_workers: live worker names, in registration order.
      pending: shards neither leased nor done this epoch: shards given back
        (released, expired) first, then the epoch's (seeded, permuted) order.
        Read-only; policies should look at a bounded prefix where they can,
        as it may hold a whole epoch's shards.
      order: shard index -> its rank in this epoch's permutation (all shards).
      names: shard index -> shard name (stable across epochs and restarts);
        the same object for the job's lifetime.
      sizes: shard index -> size (elements or bytes; the load unit).
      outstanding: worker -> total size of the shards it holds leases on.
      throughput: worker -> measured size units per second (0.0: unknown).
      in_flight: the leased, not yet completed shards.
      epoch: the current epoch (0-based).
      now: the core's clock.
    """

    worker: str
    live_workers: tuple[str, ...]
    pending: Sequence[int]
    order: Mapping[int, int]
    names: Union[Sequence[str], Mapping[int, str]]
    sizes: Union[Sequence[int], Mapping[int, int]]
    outstanding: Mapping[str, int]
    throughput: Mapping[str, float]
    in_flight: tuple[InFlight, ...]
    epoch: int
    now: float


@dataclasses.dataclass(frozen=True)
class Selection:
    """A policy's answer.

    Attributes:
      shards: pending shard indices to lease to the worker (at most k).
      backups: in-flight shard indices to lease speculatively as well.
    """

    shards: tuple[int, ...] = ()
    backups: tuple[int, ...] = ()


class Policy(abc.ABC):
    """Chooses which shards a requesting worker gets.

    Attributes:
      name: the policy's name in `POLICIES`.
      steals: whether any requester gets a pending shard while some are
        pending (the dispatcher then balances equalized consumers by
        holding back the one that leased most).
    """

    name: str = ""
    steals: bool = True

    @abc.abstractmethod
    def select(self, view: PolicyView, max_shards: int) -> Selection:
        """Returns at most `max_shards` pending shards (plus backups) for `view.worker`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_max_shards(max_shards: int) -> None:
    if max_shards < 0:
        raise ValueError(f"max_shards must be >= 0. Received: max_shards={max_shards}")


# Size-ordered policies pick among this many pending shards at the head of the
# (random) permutation: a bounded random sample, so a request costs the same
# for a hundred shards or a million.
WINDOW = 256


def _window(view: PolicyView, max_shards: int) -> Sequence[ShardIndex]:
    return view.pending[: max(WINDOW, 8 * max_shards)]


def _largest_first(view: PolicyView, shards: Sequence[ShardIndex]) -> list[ShardIndex]:
    """`shards` by size, largest first; ties in permutation order."""
    return sorted(shards, key=lambda shard: (-view.sizes[shard], view.order[shard]))


def _smallest_first(view: PolicyView, shards: Sequence[ShardIndex]) -> list[ShardIndex]:
    """`shards` by size, smallest first; ties in permutation order."""
    return sorted(shards, key=lambda shard: (view.sizes[shard], view.order[shard]))


class RoundRobin(Policy):
    """Deals the epoch's shards to live workers in turn, with work stealing.

    The shard of permutation rank r is owned by `live_workers[r % len(live_workers)]`.
    A worker gets its own pending shards first, in permutation order; when it
    has none left it takes other workers' pending shards, again in permutation
    order, so a slow or dead worker does not stall the epoch.

    Example:

    ```python
    policy = RoundRobin()
    # live_workers=("w0", "w1"), pending ranks 0..3: w0 owns ranks 0 and 2.
    policy.select(view_for_w0, max_shards=1).shards  # (shard of rank 0,)
    ```
    """

    name = "round_robin"

    def select(self, view: PolicyView, max_shards: int) -> Selection:
        _check_max_shards(max_shards)
        own = []
        others = []
        for shard in view.pending:  # already in permutation order
            if len(own) >= max_shards:
                break
            if self._owner(view, shard) == view.worker:
                own.append(shard)
            elif len(others) < max_shards:
                others.append(shard)
        return Selection(shards=tuple((own + others)[:max_shards]))

    @staticmethod
    def _owner(view: PolicyView, shard: ShardIndex) -> Optional[WorkerName]:
        if not view.live_workers:
            return None
        return view.live_workers[view.order[shard] % len(view.live_workers)]


class LeastLoaded(Policy):
    """Least connections, weighted by shard size.

    Pending shards are granted largest first (ties in permutation order) while
    the requester's outstanding load, including this selection, stays within
    the least-loaded other live worker's load plus the largest pending shard:
    nobody gets more than one shard ahead. A requester with no outstanding
    load always gets its first shard, so idle workers cannot starve.

    Example:

    ```python
    policy = LeastLoaded()
    # outstanding={"w0": 0, "w1": 30}, pending sizes {0: 10, 1: 50, 2: 20}:
    # w0 is idle, so it gets shard 1; 50 + 20 <= 30 + 50 lets shard 2 follow,
    # and 70 + 10 <= 80 shard 0 as well.
    policy.select(view_for_w0, max_shards=3).shards  # (1, 2, 0)
    ```
    """

    name = "least_loaded"

    def select(self, view: PolicyView, max_shards: int) -> Selection:
        _check_max_shards(max_shards)
        if not view.pending:
            return Selection()
        load = view.outstanding.get(view.worker, 0)
        candidates = _window(view, max_shards)
        limit = self._load_limit(view, candidates)
        granted = []
        for shard in _largest_first(view, candidates):
            if len(granted) >= max_shards:
                break
            size = view.sizes[shard]
            idle_first = not granted and load == 0
            if not idle_first and limit is not None and load + size > limit:
                break
            granted.append(shard)
            load += size
        return Selection(shards=tuple(granted))

    @staticmethod
    def _load_limit(view: PolicyView, candidates: Sequence[ShardIndex]) -> Optional[int]:
        """The most load the requester may hold; None when it is the only live worker."""
        others = [w for w in view.live_workers if w != view.worker]
        if not others:
            return None
        least = min(view.outstanding.get(w, 0) for w in others)
        return least + max(view.sizes[shard] for shard in candidates)


class ConsistentHash(Policy):
    """Consistent hashing of shard names onto a ring of virtual worker nodes.

    Each worker places `virtual_nodes` points on a 64-bit ring (stable hashes
    of its name); a shard belongs to the worker of the first point at or
    after its name's hash. The assignment depends only on the shard names
    and the live worker set, so it is the same in every epoch and process.
    When a worker joins, it takes only shards from the segments its points
    split; when one leaves, only its own shards move, each to the next point
    on the ring. Only those moved shards are recomputed, so a membership
    change costs the moved share, not the whole job. More virtual nodes
    even out the shares (about `1 / sqrt(virtual_nodes)` relative spread). A
    worker gets only its own pending shards: this policy never steals.

    Args:
      virtual_nodes: ring points per worker; >= 1.

    Raises:
      ValueError: for fewer than one virtual node.

    Example:

    ```python
    policy = ConsistentHash(virtual_nodes=128)
    owners = policy.assignment(["a", "b", "c", "d"], ["worker-0", "worker-1"])
    sorted(owners)  # ['a', 'b', 'c', 'd']
    ```
    """

    name = "consistent_hash"
    steals = False

    def __init__(self, virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        if not (isinstance(virtual_nodes, int) and virtual_nodes >= 1):
            raise ValueError(
                f"virtual_nodes must be an int >= 1. Received: virtual_nodes={virtual_nodes!r}"
            )
        self._virtual_nodes = virtual_nodes
        self._ring: Optional[hash_ring.HashRing] = None
        # The `view.names` the ring was built for: held, so that its id is not reused.
        self._ring_names: Optional[Union[Sequence[str], Mapping[int, str]]] = None

    @property
    def virtual_nodes(self) -> int:
        return self._virtual_nodes

    @property
    def recomputed(self) -> int:
        """Shard owners computed so far by `select` (a measure of its work)."""
        return self._ring.recomputed if self._ring is not None else 0

    def __repr__(self) -> str:
        return f"ConsistentHash(virtual_nodes={self._virtual_nodes})"

    def assignment(self, shard_names: Sequence[str], workers: Sequence[WorkerName]) -> Assignment:
        """Maps every shard name to its owning worker.

        Args:
          shard_names: the names of all shards of the epoch (distinct).
          workers: the worker names (order does not matter).

        Returns:
          A new dict: shard name -> worker name.

        Raises:
          ValueError: when `workers` is empty but `shard_names` is not.
        """
        if shard_names and not workers:
            raise ValueError(
                f"Cannot assign {len(shard_names)} shards to no workers. Received: workers=()"
            )
        ring = hash_ring.HashRing(shard_names, self._virtual_nodes)
        ring.update(workers)
        return dict(zip(shard_names, ring.owners))

    def select(self, view: PolicyView, max_shards: int) -> Selection:
        _check_max_shards(max_shards)
        if not view.pending or view.worker not in view.live_workers:
            return Selection()
        owners = self._shard_owners(view)
        own = []
        for shard in view.pending:  # already in permutation order
            if len(own) >= max_shards:
                break
            if owners[shard] == view.worker:
                own.append(shard)
        return Selection(shards=tuple(own))

    def _shard_owners(self, view: PolicyView) -> list[Optional[WorkerName]]:
        """Owner by shard index; a change of live workers moves only their share."""
        if view.names is not self._ring_names:
            names = [view.names[shard] for shard in range(len(view.names))]
            self._ring = hash_ring.HashRing(names, self._virtual_nodes)
            self._ring_names = view.names
        if self._ring.workers != frozenset(view.live_workers):
            self._ring.update(view.live_workers)
        return self._ring.owners


class Adaptive(Policy):
    """Throughput-weighted assignment with speculative backups.

    While shards are pending, a requester of unknown throughput gets the
    smallest pending shard: it may be the slow one, and a slow worker that
    starts an epoch with the largest shard sets its end. A requester of known
    throughput gets `max(1, round(max_shards * throughput / max_throughput))`
    shards, largest first if its throughput is at least the median of the live
    workers' known throughputs, smallest first otherwise; a requester at least
    `min_throughput_ratio` times slower than the fastest live worker, while
    some worker holds leases, only gets shards it would finish within the
    horizon `(pending + outstanding size) / sum of known throughputs`, the
    time the live workers need for the rest at their speeds (and nothing, for
    now, if no pending shard is that small). Once nothing is pending and
    `speculation` is on, an idle requester may get one backup lease: among the
    in-flight shards without a backup, held by others, and whose holder is at
    least `min_throughput_ratio` times slower (or of unknown speed while the
    requester's is known), the one with the latest estimated finish
    `since + size / throughput(holder)`. A holder of unknown throughput counts
    as the slowest known worker.

    Args:
      speculation: whether to grant backup leases at the end of an epoch.
      min_throughput_ratio: how much faster than the holder the requester must be
        to get a backup of its shard; >= 1.0.

    Raises:
      ValueError: for a `min_throughput_ratio` below 1.0.

    Example:

    ```python
    policy = Adaptive(speculation=True, min_throughput_ratio=1.5)
    selection = policy.select(view, max_shards=4)
    selection.shards, selection.backups  # e.g. ((7, 2, 5, 1), ())
    ```
    """

    name = "adaptive"

    def __init__(self, speculation: bool = True, min_throughput_ratio: float = 1.5) -> None:
        if not min_throughput_ratio >= 1.0:
            raise ValueError(
                "min_throughput_ratio must be >= 1.0. "
                f"Received: min_throughput_ratio={min_throughput_ratio}"
            )
        self._speculation = bool(speculation)
        self._min_throughput_ratio = float(min_throughput_ratio)

    @property
    def speculation(self) -> bool:
        return self._speculation

    @property
    def min_throughput_ratio(self) -> float:
        return self._min_throughput_ratio

    def __repr__(self) -> str:
        return (
            f"Adaptive(speculation={self._speculation}, "
            f"min_throughput_ratio={self._min_throughput_ratio})"
        )

    def select(self, view: PolicyView, max_shards: int) -> Selection:
        _check_max_shards(max_shards)
        if view.pending:
            return Selection(shards=self._weighted(view, max_shards))
        if self._speculation and view.outstanding.get(view.worker, 0) == 0:
            backup = self._backup(view)
            if backup is not None:
                return Selection(backups=(backup,))
        return Selection()

    @staticmethod
    def _known(view: PolicyView) -> list[float]:
        """Known (positive) throughputs of the live workers."""
        speeds = (view.throughput.get(worker, 0.0) for worker in view.live_workers)
        return [speed for speed in speeds if speed > 0]

    def _weighted(self, view: PolicyView, max_shards: int) -> tuple[ShardIndex, ...]:
        own = view.throughput.get(view.worker, 0.0)
        known = self._known(view)
        window = _window(view, max_shards)
        if own <= 0:
            return tuple(_smallest_first(view, window)[: min(1, max_shards)])
        fastest = max(known + [own])
        count = max(1, round(max_shards * own / fastest))
        large_first = own >= statistics.median(known + [own])
        shards = (_largest_first if large_first else _smallest_first)(view, window)
        # Only a clearly slower worker is held to the horizon, and only while
        # some worker holds work: synchronous consumers (whose speeds are
        # alike) and an epoch whose workers all wait must still get shards.
        busy = any(view.outstanding.get(w, 0) > 0 for w in view.live_workers)
        if own * self._min_throughput_ratio <= fastest and busy:
            horizon_s = self._remaining(view, window) / sum(known)
            shards = [s for s in shards if view.sizes[s] / own <= horizon_s]
        return tuple(shards[: min(count, max_shards)])

    @staticmethod
    def _remaining(view: PolicyView, window: Sequence[ShardIndex]) -> float:
        """Size of the pending shards (estimated from the window, in bounded
        time) plus what the live workers hold."""
        pending = sum(view.sizes[shard] for shard in window) * len(view.pending) / len(window)
        return pending + sum(view.outstanding.get(w, 0) for w in view.live_workers)

    def _backup(self, view: PolicyView) -> Optional[ShardIndex]:
        own = view.throughput.get(view.worker, 0.0)
        known = self._known(view)
        slowest = min(known) if known else 0.0
        best = None
        best_key = None
        for lease in view.in_flight:
            if lease.has_backup or lease.worker == view.worker:
                continue
            holder = view.throughput.get(lease.worker, 0.0)
            if not self._faster_enough(own, holder):
                continue
            speed = holder if holder > 0 else slowest
            finish = lease.since + view.sizes[lease.shard] / speed if speed > 0 else math.inf
            key = (finish, -view.order[lease.shard])
            if best_key is None or key > best_key:
                best, best_key = lease.shard, key
        return best

    def _faster_enough(self, own: float, holder: float) -> bool:
        if own <= 0:
            return False
        return holder <= 0 or own >= self._min_throughput_ratio * holder


POLICIES: dict[str, type[Policy]] = {
    policy.name: policy for policy in (Adaptive, ConsistentHash, LeastLoaded, RoundRobin)
}


def make_policy(name: str) -> Policy:
    """Returns a new policy of the given name, with default options.

    Args:
      name: one of `POLICIES`: "adaptive", "consistent_hash", "least_loaded",
        "round_robin".

    Returns:
      The policy.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in POLICIES:
        raise ValueError(f"Unknown policy '{name}'. Valid policies: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()
