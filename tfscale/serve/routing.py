"""Replica choice of the request router: policies, replica health, outlier ejection.

A `Router` sends each request to one replica of a `ReplicaSet`, chosen by a
`RoutingPolicy` (the same words as the dispatcher's shard policies):

- `"round_robin"`: the up replicas in turn, by name.
- `"least_loaded"`: the replica with the fewest outstanding requests; ties in
  turn, by name.
- `"consistent_hash"`: a request key keeps to its replica (cache affinity), as
  in gRPC's `ring_hash`; keyless requests go to the least loaded replica.
- `"power_of_two"`: two distinct random replicas, the one with the shorter
  queue, as in Ray Serve.

The set tracks each replica's outstanding requests, a latency estimate and its
errors. An `OutlierDetector`, after Envoy's outlier detection, ejects a replica
after consecutive errors or when its latency stands out from the others', for
an ejection time that doubles with each ejection in a streak, and never so many
that fewer than `1 - max_ejected_fraction` of the live replicas remain. Once the
time is over the replica gets one probe request: a good result returns it, a
bad one ejects it again for longer. A replica marked down (dead) is never
chosen until it is marked up (restarted), which gives it a fresh state.

Nothing here imports TensorFlow or gRPC, so the router process starts fast.

Example:

```python
router = Router(["replica-0", "replica-1", "replica-2"], policy="least_loaded")
with router.request(key="user-17") as replica:
    send(replica, payload)          # an exception counts as an error
ticket = router.route()             # or by hand
router.finish(ticket, latency_s=0.012, ok=True)
router.mark_down("replica-1")       # never chosen again until mark_up
```
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import itertools
import random
import time
from typing import Iterable
from typing import Iterator
from typing import Optional
from typing import Sequence
from typing import Union

from tfscale.data.dispatcher import hash_ring
from tfscale.serve.replicas import Clock
from tfscale.serve.replicas import OutlierDetector
from tfscale.serve.replicas import OutlierOptions
from tfscale.serve.replicas import ReplicaName
from tfscale.serve.replicas import ReplicaSet
from tfscale.serve.replicas import ReplicaStats
from tfscale.serve.replicas import Ticket

__all__ = [
    "POLICIES",
    "ConsistentHash",
    "LeastLoaded",
    "PowerOfTwo",
    "RoundRobin",
    "Router",
    "RoutingPolicy",
    "make_policy",
]

POLICIES = ("round_robin", "least_loaded", "consistent_hash", "power_of_two")

# Ring points per replica of `consistent_hash`, as for the dispatcher's workers.
DEFAULT_VIRTUAL_NODES = 256


def _check_candidates(candidates: Sequence[ReplicaStats]) -> None:
    if not candidates:
        raise ValueError("choose() needs at least one candidate replica. Received: none")


def _after(last: Optional[ReplicaName], names: Iterable[ReplicaName]) -> ReplicaName:
    """The first of `names` after `last` in name order, wrapping around."""
    names = list(names)
    later = [name for name in names if last is not None and name > last]
    return min(later or names)


class RoutingPolicy(abc.ABC):
    """Chooses the replica of a request among the candidates.

    The router calls a policy under its lock: a policy needs no lock of its own.
    """

    name: str = ""

    def update(self, members: Sequence[ReplicaName]) -> None:
        """Told every replica of the set, whatever its health, when the set changes."""

    @abc.abstractmethod
    def choose(self, candidates: Sequence[ReplicaStats], key: Optional[str] = None) -> ReplicaName:
        """Returns the name of one of `candidates` (non-empty, all up) for a request.

        Args:
          candidates: the replicas that may take the request.
          key: the request's affinity key, if any.

        Raises:
          ValueError: for no candidates.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RoundRobin(RoutingPolicy):
    """The candidates in turn, in name order: each gets the request after its predecessor.

    Example:

    ```python
    policy = RoundRobin()
    [policy.choose(candidates) for _ in range(4)]  # ['a', 'b', 'c', 'a']
    ```
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._last: Optional[ReplicaName] = None

    def choose(self, candidates: Sequence[ReplicaStats], key: Optional[str] = None) -> ReplicaName:
        _check_candidates(candidates)
        self._last = _after(self._last, (c.name for c in candidates))
        return self._last


class LeastLoaded(RoutingPolicy):
    """The candidate with the fewest outstanding requests; ties in turn, in name order.

    Example:

    ```python
    policy = LeastLoaded()
    policy.choose([ReplicaStats("a", outstanding=3), ReplicaStats("b", outstanding=1)])  # 'b'
    ```
    """

    name = "least_loaded"

    def __init__(self) -> None:
        self._last: Optional[ReplicaName] = None

    def choose(self, candidates: Sequence[ReplicaStats], key: Optional[str] = None) -> ReplicaName:
        _check_candidates(candidates)
        fewest = min(c.outstanding for c in candidates)
        self._last = _after(self._last, (c.name for c in candidates if c.outstanding == fewest))
        return self._last


class _Ring:
    """Replicas' virtual nodes on a 64-bit ring, walked from a key's hash.

    The dispatcher's `HashRing` places a fixed set of shards; requests bring
    arbitrary keys and must walk past ineligible replicas, so this ring keeps
    only the points. It places them as `HashRing` does (`stable_hash` of
    name, NUL, index), so a replica sits where a worker of its name would.
    """

    def __init__(self, virtual_nodes: int) -> None:
        self._virtual_nodes = virtual_nodes
        self._nodes: list[tuple[int, ReplicaName]] = []
        self.members: frozenset[ReplicaName] = frozenset()

    def update(self, members: Iterable[ReplicaName]) -> None:
        wanted = frozenset(members)
        if wanted == self.members:
            return
        kept = [node for node in self._nodes if node[1] in wanted]
        joining = sorted(wanted - self.members)
        points = itertools.product(joining, range(self._virtual_nodes))
        new = [(hash_ring.stable_hash(f"{name}\x00{i}"), name) for name, i in points]
        self._nodes = sorted(kept + new)
        self.members = wanted

    def walk(self, key: str) -> Iterator[ReplicaName]:
        """Owners of the points at and after the key's hash, once round the ring."""
        start = bisect.bisect_left(self._nodes, (hash_ring.stable_hash(key), ""))
        for i in range(len(self._nodes)):
            yield self._nodes[(start + i) % len(self._nodes)][1]


class ConsistentHash(RoutingPolicy):
    """A request key keeps to its replica: consistent hashing on a ring of virtual nodes.

    Each replica places `virtual_nodes` points on a 64-bit ring; a key goes to
    the replica of the first point at or after its hash that belongs to a
    candidate. Adding or removing a replica moves only about 1/N of the keys;
    the keys of an ejected or down replica go to the next replica on the ring
    and come back when it does. Requests without a key go to `fallback`.

    Args:
      virtual_nodes: ring points per replica; >= 1.
      fallback: the policy of keyless requests (default: `LeastLoaded()`).

    Raises:
      ValueError: for fewer than one virtual node.

    Example:

    ```python
    policy = ConsistentHash(virtual_nodes=128)
    policy.choose(candidates, key="user-17")  # the same replica every time
    ```
    """

    name = "consistent_hash"

    def __init__(
        self,
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        fallback: Optional[RoutingPolicy] = None,
    ) -> None:
        if (
            isinstance(virtual_nodes, bool)
            or not isinstance(virtual_nodes, int)
            or virtual_nodes < 1
        ):
            raise ValueError(
                f"virtual_nodes must be an int >= 1. Received: virtual_nodes={virtual_nodes!r}"
            )
        self._ring = _Ring(virtual_nodes)
        self._fallback = fallback if fallback is not None else LeastLoaded()
        self._virtual_nodes = virtual_nodes

    @property
    def virtual_nodes(self) -> int:
        return self._virtual_nodes

    @property
    def fallback(self) -> RoutingPolicy:
        return self._fallback

    def __repr__(self) -> str:
        return f"ConsistentHash(virtual_nodes={self._virtual_nodes}, fallback={self._fallback!r})"

    def update(self, members: Sequence[ReplicaName]) -> None:
        self._ring.update(members)
        self._fallback.update(members)

    def choose(self, candidates: Sequence[ReplicaStats], key: Optional[str] = None) -> ReplicaName:
        _check_candidates(candidates)
        if key is None:
            return self._fallback.choose(candidates, key)
        eligible = {c.name for c in candidates}
        if not eligible <= self._ring.members:  # a caller that never called update()
            self._ring.update(self._ring.members | eligible)
        return next(name for name in self._ring.walk(key) if name in eligible)


class PowerOfTwo(RoutingPolicy):
    """Two distinct random candidates, the one with fewer outstanding requests.

    Ties go to the lower latency estimate (none yet counts as lowest, so a new
    replica gets tried), then to the first drawn. One candidate is chosen
    without drawing.

    Args:
      rng: the random source (default: a fresh `random.Random()`); seed it in tests.

    Example:

    ```python
    policy = PowerOfTwo(rng=random.Random(0))
    policy.choose(candidates)  # the shorter queue of two random replicas
    ```
    """

    name = "power_of_two"

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def choose(self, candidates: Sequence[ReplicaStats], key: Optional[str] = None) -> ReplicaName:
        _check_candidates(candidates)
        if len(candidates) == 1:
            return candidates[0].name
        drawn = [candidates[i] for i in self._rng.sample(range(len(candidates)), 2)]
        return min(drawn, key=lambda c: (c.outstanding, c.latency_s or 0.0)).name


_POLICY_TYPES: dict[str, type[RoutingPolicy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "consistent_hash": ConsistentHash,
    "power_of_two": PowerOfTwo,
}


def make_policy(name: str) -> RoutingPolicy:
    """Returns a new routing policy of the given name, with default options.

    Args:
      name: one of `POLICIES`: "round_robin", "least_loaded", "consistent_hash",
        "power_of_two".

    Returns:
      The policy.

    Raises:
      ValueError: for an unknown name.
    """
    if not isinstance(name, str) or name not in _POLICY_TYPES:
        raise ValueError(f"Unknown routing policy {name!r}. Valid policies: {', '.join(POLICIES)}")
    return _POLICY_TYPES[name]()


class Router:
    """Routes requests to replicas: a policy over the set's up replicas, with probing.

    `route` first gives an ejected replica whose time is over its one probe
    request (whatever the key); otherwise the policy chooses among the up
    replicas. Choosing and starting happen under the set's lock, so
    concurrent requests see each other's outstanding counts.

    Args:
      replicas: the initial replica names.
      policy: a `RoutingPolicy` or one of `POLICIES` (default: "power_of_two").
      options: outlier detection thresholds (default: `OutlierOptions()`).
      clock: seconds, monotonic (default: `time.monotonic`).

    Raises:
      ValueError: for an unknown policy name or a bad replica name.

    Example:

    ```python
    router = Router(["10.0.0.1:8500", "10.0.0.2:8500"], policy="consistent_hash")
    with router.request(key=session_id) as replica:
        response = call(replica, request)
    ```
    """

    def __init__(
        self,
        replicas: Sequence[ReplicaName] = (),
        policy: Union[str, RoutingPolicy] = "power_of_two",
        options: Optional[OutlierOptions] = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._policy = make_policy(policy) if not isinstance(policy, RoutingPolicy) else policy
        self._replicas = ReplicaSet(replicas, OutlierDetector(options), clock)
        self._policy_version: Optional[int] = None

    @property
    def policy(self) -> RoutingPolicy:
        return self._policy

    @property
    def replicas(self) -> ReplicaSet:
        return self._replicas

    def __repr__(self) -> str:
        return f"Router({list(self._replicas.names)!r}, policy={self._policy!r})"

    def add(self, name: ReplicaName) -> None:
        self._replicas.add(name)

    def remove(self, name: ReplicaName) -> None:
        self._replicas.remove(name)

    def mark_down(self, name: ReplicaName) -> None:
        """The replica died: no request goes to it from now on, until `mark_up`."""
        self._replicas.mark_down(name)

    def mark_up(self, name: ReplicaName) -> None:
        """The replica was restarted: it takes requests again, with a fresh state."""
        self._replicas.mark_up(name)

    def status(self) -> tuple[ReplicaStats, ...]:
        return self._replicas.status()

    def route(self, key: Optional[str] = None) -> Ticket:
        """Chooses a replica for a request and starts it there.

        Args:
          key: the request's affinity key (used by "consistent_hash").

        Returns:
          The ticket to `finish`; `ticket.replica` is the chosen replica.

        Raises:
          NoReplicaAvailable: when every replica is down or ejected, or none exist.
        """
        with self._replicas.lock:
            if self._policy_version != self._replicas.version:
                self._policy.update(self._replicas.names)
                self._policy_version = self._replicas.version
            probe = self._replicas.due_probe()
            if probe is not None:
                return self._replicas.start(probe)
            candidates = self._replicas.candidates()
            if not candidates:
                raise self._replicas.unavailable()
            return self._replicas.start(self._policy.choose(candidates, key))

    def finish(self, ticket: Ticket, latency_s: Optional[float] = None, ok: bool = True) -> None:
        """Ends a request; see `ReplicaSet.finish`."""
        self._replicas.finish(ticket, latency_s, ok)

    @contextlib.contextmanager
    def request(self, key: Optional[str] = None) -> Iterator[ReplicaName]:
        """Routes a request and yields its replica; an exception in the block counts
        as a failure (and propagates), the latency is the block's time on the clock."""
        ticket = self.route(key)
        ok = False
        try:
            yield ticket.replica
            ok = True
        finally:
            self._replicas.finish(ticket, ok=ok)
