"""The replicas behind the request router: their health, load and outlier ejection.

A `ReplicaSet` tracks each replica's outstanding requests, a latency
estimate and its errors. An `OutlierDetector`, after Envoy's outlier
detection, ejects a replica after consecutive errors or when its latency
stands out from the others', for an ejection time that doubles with each
ejection in a streak, and never so many that fewer than
`1 - max_ejected_fraction` of the live replicas remain. Once the time is over
the replica gets one probe request: a good result returns it, a bad one
ejects it again for longer. A replica marked down (dead) is never chosen
until it is marked up (restarted), which gives it a fresh state.

Nothing here imports TensorFlow or gRPC, so the router process starts fast.

Example:

```python
replicas = ReplicaSet(["replica-0", "replica-1"])
ticket = replicas.start("replica-0")
replicas.finish(ticket, latency_s=0.012, ok=True)
replicas.mark_down("replica-1")     # never a candidate until mark_up
```
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import statistics
import threading
import time
from typing import Callable
from typing import ContextManager
from typing import Optional
from typing import Sequence

__all__ = [
    "Health",
    "NoReplicaAvailable",
    "OutlierDetector",
    "OutlierOptions",
    "ReplicaSet",
    "ReplicaStats",
    "Ticket",
]

ReplicaName = str
# Seconds, monotonic: `time.monotonic` or a fake one in tests.
Clock = Callable[[], float]

# Weight of the newest latency in a replica's moving average: the last ten or
# so requests count, so a replica that slows down stands out within a second.
_LATENCY_WEIGHT = 0.2


class NoReplicaAvailable(RuntimeError):
    """No replica can take a request: none exist, or all are down or ejected.

    Attributes:
      total: replicas in the set.
      down: replicas marked down.
      ejected: replicas ejected as outliers.
      next_probe_s: seconds until an ejected replica may be probed (None: none ejected).
    """

    def __init__(self, total: int, down: int, ejected: int, next_probe_s: Optional[float]) -> None:
        self.total = total
        self.down = down
        self.ejected = ejected
        self.next_probe_s = next_probe_s
        if not total:
            message = "No replica can take the request: the router has no replicas."
        else:
            message = (
                f"No replica can take the request: {total} replicas, "
                f"{down} down, {ejected} ejected"
            )
            if next_probe_s is not None:
                message += f" (the next probe in {next_probe_s:.1f} s)"
            message += "."
        super().__init__(message)


class Health(enum.StrEnum):
    """A replica's health: `up` (chosen), `ejected` (an outlier, until probed back), `down`."""

    UP = "up"
    EJECTED = "ejected"
    DOWN = "down"


@dataclasses.dataclass(frozen=True)
class ReplicaStats:
    """What policies and status readers see of one replica.

    Attributes:
      name: the replica's name (its address).
      health: up, ejected or down.
      outstanding: requests started and not finished.
      latency_s: moving average of its latencies in seconds (None: no sample yet).
      samples: latencies measured since it was added, restarted or returned.
      requests: requests finished since it was added or restarted.
      errors: of those, the failed ones.
      consecutive_errors: failures since its last success.
      ejections: ejections in its current streak (0: none).
      ejected_until: clock time its ejection ends (None unless ejected).
      ejection_reason: why it was last ejected: "errors", "latency" or "probe".
    """

    name: ReplicaName
    health: Health = Health.UP
    outstanding: int = 0
    latency_s: Optional[float] = None
    samples: int = 0
    requests: int = 0
    errors: int = 0
    consecutive_errors: int = 0
    ejections: int = 0
    ejected_until: Optional[float] = None
    ejection_reason: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Ticket:
    """One started request, to hand back to `finish`.

    Attributes:
      replica: the replica the request goes to.
      id: unique within its replica set.
      started: clock time the request started.
      probe: whether it probes an ejected replica.
    """

    replica: ReplicaName
    id: int
    started: float
    probe: bool = False


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"A replica name must be a non-empty string. Received: {name!r}")


@dataclasses.dataclass(frozen=True)
class OutlierOptions:
    """When a replica counts as an outlier, and for how long it is ejected.

    Attributes:
      consecutive_errors: failures in a row that eject a replica; >= 1.
      latency_factor: a replica whose latency estimate exceeds this many times
        the median of the other up replicas' is ejected; > 1 (`math.inf`: never).
      min_requests: latencies a replica (and each replica of that median)
        needs before its latency is judged; >= 1.
      min_latency_peers: other up replicas (each with `min_requests`
        latencies) needed to judge a replica's latency at all; >= 1. One
        peer's moving average is too noisy a yardstick: with two replicas
        under load, healthy ones stand out by 3x now and then and get ejected.
      base_ejection_s: the first ejection's length; each further ejection of a
        streak doubles it; > 0.
      max_ejection_s: the longest ejection; >= base_ejection_s. A replica back
        for this long starts a new streak.
      max_ejected_fraction: the most of the replicas that are not down that may
        be ejected at once; in [0, 1].
    """

    consecutive_errors: int = 5
    latency_factor: float = 3.0
    min_requests: int = 10
    min_latency_peers: int = 2
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0
    max_ejected_fraction: float = 0.5

    def __post_init__(self) -> None:
        for field in ("consecutive_errors", "min_requests", "min_latency_peers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an int >= 1. Received: {field}={value!r}")
        checks = (
            ("latency_factor", lambda v: v > 1.0, "> 1.0"),
            ("base_ejection_s", lambda v: 0.0 < v < math.inf, "finite and > 0"),
            (
                "max_ejection_s",
                lambda v: self.base_ejection_s <= v < math.inf,
                ">= base_ejection_s and finite",
            ),
            ("max_ejected_fraction", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        )
        for field, valid, expected in checks:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
                raise ValueError(f"{field} must be {expected}. Received: {field}={value!r}")


class OutlierDetector:
    """Judges replicas by their errors and latencies, and sizes their ejections.

    The detector holds no state: `ReplicaSet` keeps each replica's numbers and
    asks it, on every finished request, whether the replica stands out.

    Args:
      options: the thresholds (default: `OutlierOptions()`).

    Example:

    ```python
    detector = OutlierDetector(OutlierOptions(consecutive_errors=3))
    detector.verdict(ReplicaStats("a", consecutive_errors=3), peers=())  # 'errors'
    detector.ejection_s(3)  # 40.0: 10 s doubled twice
    ```
    """

    def __init__(self, options: Optional[OutlierOptions] = None) -> None:
        self._options = options if options is not None else OutlierOptions()

    @property
    def options(self) -> OutlierOptions:
        return self._options

    def __repr__(self) -> str:
        return f"OutlierDetector({self._options!r})"

    def verdict(self, replica: ReplicaStats, peers: Sequence[ReplicaStats]) -> Optional[str]:
        """Why `replica` should be ejected ("errors" or "latency"), or None.

        Args:
          replica: an up replica that just finished a request.
          peers: the other up replicas.
        """
        if replica.consecutive_errors >= self._options.consecutive_errors:
            return "errors"
        if replica.samples >= self._options.min_requests and self._slow(replica.latency_s, peers):
            return "latency"
        return None

    def probe_passed(self, latency_s: float, ok: bool, peers: Sequence[ReplicaStats]) -> bool:
        """Whether a probe's result returns its replica: a success, and not slow."""
        return ok and not self._slow(latency_s, peers)

    def may_eject(self, ejected: int, live: int) -> bool:
        """Whether one more of `live` replicas (not down) may join the `ejected` ones."""
        return ejected + 1 <= self._options.max_ejected_fraction * live

    def ejection_s(self, ejections: int) -> float:
        """The length of the `ejections`-th ejection of a streak (1-based)."""
        doublings = min(ejections - 1, 64)  # 2**64 times any base exceeds every cap
        return min(self._options.base_ejection_s * 2.0**doublings, self._options.max_ejection_s)

    def _slow(self, latency_s: Optional[float], peers: Sequence[ReplicaStats]) -> bool:
        judged = [
            p.latency_s
            for p in peers
            if p.latency_s is not None and p.samples >= self._options.min_requests
        ]
        if latency_s is None or len(judged) < self._options.min_latency_peers:
            return False
        return latency_s > self._options.latency_factor * statistics.median(judged)


@dataclasses.dataclass
class _Replica:
    """A replica's mutable state; `generation` changes when it dies or restarts."""

    name: ReplicaName
    health: Health = Health.UP
    generation: int = 0
    outstanding: int = 0
    latency_s: Optional[float] = None
    samples: int = 0
    requests: int = 0
    errors: int = 0
    consecutive_errors: int = 0
    ejections: int = 0
    ejected_until: Optional[float] = None
    ejection_reason: Optional[str] = None
    returned_at: Optional[float] = None
    probing: bool = False
    # `stats()` of the current state: a route reads every replica but changes one.
    snapshot: Optional[ReplicaStats] = dataclasses.field(default=None, repr=False)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name != "snapshot":
            object.__setattr__(self, "snapshot", None)

    def stats(self) -> ReplicaStats:
        if self.snapshot is None:
            self.snapshot = ReplicaStats(
                name=self.name,
                health=self.health,
                outstanding=self.outstanding,
                latency_s=self.latency_s,
                samples=self.samples,
                requests=self.requests,
                errors=self.errors,
                consecutive_errors=self.consecutive_errors,
                ejections=self.ejections,
                ejected_until=self.ejected_until,
                ejection_reason=self.ejection_reason,
            )
        return self.snapshot

    def restart(self, health: Health) -> None:
        """Forgets everything: the process died or was restarted."""
        fresh = _Replica(self.name, health=health, generation=self.generation + 1)
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(fresh, field.name))

    def record(self, latency_s: float, ok: bool) -> None:
        if self.latency_s is None:
            self.latency_s = latency_s
        else:
            self.latency_s += _LATENCY_WEIGHT * (latency_s - self.latency_s)
        self.samples += 1
        self.consecutive_errors = 0 if ok else self.consecutive_errors + 1


class ReplicaSet:
    """Replicas and their state: outstanding requests, latency, errors, health.

    Thread-safe: every method holds `lock`; hold it yourself to make several
    calls atomic (the router does, to choose and start together). Each request
    is `start`ed and then `finish`ed once (a ticket never finished stays
    counted as outstanding); finishing feeds the outlier detector. Requests
    still out when their replica is marked down or removed are not counted
    when they finish.

    Args:
      names: the initial replicas.
      detector: judges outliers (default: `OutlierDetector()`).
      clock: seconds, monotonic (default: `time.monotonic`).

    Raises:
      ValueError: for a name that is not a non-empty string, or repeated.

    Example:

    ```python
    replicas = ReplicaSet(["a", "b"])
    ticket = replicas.start("a")
    replicas.stats("a").outstanding  # 1
    replicas.finish(ticket, latency_s=0.02, ok=True)
    ```
    """

    def __init__(
        self,
        names: Sequence[ReplicaName] = (),
        detector: Optional[OutlierDetector] = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._detector = detector if detector is not None else OutlierDetector()
        self._clock = clock
        self._lock = threading.RLock()
        self._replicas: dict[ReplicaName, _Replica] = {}
        # Ticket id -> the replica and its generation when the request started.
        self._active: dict[int, tuple[_Replica, int]] = {}
        self._ids = itertools.count()
        self._version = 0
        for name in names:
            self.add(name)

    @property
    def lock(self) -> ContextManager[bool]:
        """The set's reentrant lock."""
        return self._lock

    @property
    def detector(self) -> OutlierDetector:
        return self._detector

    @property
    def version(self) -> int:
        """Counts the changes of membership (adds and removes)."""
        return self._version

    @property
    def names(self) -> tuple[ReplicaName, ...]:
        with self._lock:
            return tuple(self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def __contains__(self, name: object) -> bool:
        return name in self._replicas

    def __repr__(self) -> str:
        return f"ReplicaSet({list(self.names)!r}, detector={self._detector!r})"

    def add(self, name: ReplicaName) -> None:
        """Adds an up replica."""
        _check_name(name)
        with self._lock:
            if name in self._replicas:
                raise ValueError(f"Replica {name!r} is in the set already.")
            self._replicas[name] = _Replica(name)
            self._version += 1

    def remove(self, name: ReplicaName) -> None:
        """Removes a replica; its requests still out are not counted when they finish."""
        with self._lock:
            self._get(name)
            del self._replicas[name]
            self._version += 1

    def mark_down(self, name: ReplicaName) -> None:
        """The replica died: it is never chosen, from now on, until `mark_up`."""
        with self._lock:
            self._get(name).restart(Health.DOWN)

    def mark_up(self, name: ReplicaName) -> None:
        """A down replica was restarted: it is up with a fresh state. No-op unless down."""
        with self._lock:
            replica = self._get(name)
            if replica.health is Health.DOWN:
                replica.restart(Health.UP)

    def stats(self, name: ReplicaName) -> ReplicaStats:
        with self._lock:
            return self._get(name).stats()

    def status(self) -> tuple[ReplicaStats, ...]:
        """Every replica, in the order they were added."""
        with self._lock:
            return tuple(replica.stats() for replica in self._replicas.values())

    def candidates(self) -> tuple[ReplicaStats, ...]:
        """The up replicas: those a policy may choose."""
        with self._lock:
            return tuple(r.stats() for r in self._replicas.values() if r.health is Health.UP)

    def due_probe(self) -> Optional[ReplicaName]:
        """An ejected replica whose time is over and that has no probe out, or None."""
        with self._lock:
            now = self._clock()
            due = [r for r in self._replicas.values() if self._probe_due(r, now)]
            return min(due, key=lambda r: (r.ejected_until, r.name)).name if due else None

    def unavailable(self) -> NoReplicaAvailable:
        """The error that says why no replica can take a request now."""
        with self._lock:
            now = self._clock()
            ejected = [r for r in self._replicas.values() if r.health is Health.EJECTED]
            down = sum(r.health is Health.DOWN for r in self._replicas.values())
            waits = [max(0.0, r.ejected_until - now) for r in ejected]
            return NoReplicaAvailable(len(self), down, len(ejected), min(waits, default=None))

    def start(self, name: ReplicaName) -> Ticket:
        """Starts a request to `name`: up, or ejected and due a probe (the request probes it).

        Args:
          name: the replica.

        Returns:
          The ticket to `finish`.

        Raises:
          ValueError: for an unknown replica, a down one, or an ejected one not due a probe.
        """
        with self._lock:
            replica = self._get(name)
            now = self._clock()
            if replica.health is Health.DOWN:
                raise ValueError(f"Replica {name!r} is down: it takes no request.")
            probe = replica.health is Health.EJECTED
            if probe and not self._probe_due(replica, now):
                raise ValueError(
                    f"Replica {name!r} is ejected until {replica.ejected_until} "
                    f"(now {now}) or being probed: it takes no request."
                )
            replica.probing = probe
            replica.outstanding += 1
            ticket = Ticket(name, next(self._ids), now, probe)
            self._active[ticket.id] = (replica, replica.generation)
            return ticket

    def finish(self, ticket: Ticket, latency_s: Optional[float] = None, ok: bool = True) -> None:
        """Ends a request and lets the outlier detector judge its replica.

        Args:
          ticket: from `start`.
          latency_s: the request's latency (default: the clock's time since `start`).
          ok: whether it succeeded; a timeout is a failure.

        Raises:
          ValueError: for a negative or NaN latency, or a ticket not active
            (finished already, or from another set).
        """
        if latency_s is not None and not latency_s >= 0.0:
            raise ValueError(f"latency_s must be >= 0. Received: latency_s={latency_s!r}")
        with self._lock:
            replica, generation = self._active.pop(ticket.id, (None, None))
            if replica is None:
                raise ValueError(
                    f"Ticket {ticket.id} (replica {ticket.replica!r}) is not active: "
                    "finished already, or started by another replica set."
                )
            if replica.generation != generation or self._replicas.get(replica.name) is not replica:
                return  # the replica died or left since: its state starts afresh
            now = self._clock()
            latency_s = max(0.0, now - ticket.started) if latency_s is None else latency_s
            replica.outstanding -= 1
            replica.requests += 1
            replica.errors += not ok
            if ticket.probe:
                self._judge_probe(replica, latency_s, ok, now)
            elif replica.health is Health.UP:  # not a request that was out when it was ejected
                replica.record(latency_s, ok)
                self._judge(replica, now)

    def _get(self, name: ReplicaName) -> _Replica:
        replica = self._replicas.get(name)
        if replica is None:
            known = ", ".join(map(repr, itertools.islice(self._replicas, 8)))
            more = ", ..." if len(self._replicas) > 8 else ""
            raise ValueError(f"Unknown replica {name!r}. Known replicas: [{known}{more}]")
        return replica

    @staticmethod
    def _probe_due(replica: _Replica, now: float) -> bool:
        return (
            replica.health is Health.EJECTED
            and not replica.probing
            and replica.ejected_until <= now
        )

    def _peers(self, replica: _Replica) -> list[ReplicaStats]:
        return [
            r.stats() for r in self._replicas.values() if r is not replica and r.health is Health.UP
        ]

    def _judge(self, replica: _Replica, now: float) -> None:
        reason = self._detector.verdict(replica.stats(), self._peers(replica))
        if reason is None:
            return
        ejected = sum(r.health is Health.EJECTED for r in self._replicas.values())
        live = sum(r.health is not Health.DOWN for r in self._replicas.values())
        if not self._detector.may_eject(ejected, live):
            return
        recent = (
            replica.returned_at is not None
            and now - replica.returned_at < self._detector.options.max_ejection_s
        )
        self._eject(replica, replica.ejections + 1 if recent else 1, reason, now)

    def _judge_probe(self, replica: _Replica, latency_s: float, ok: bool, now: float) -> None:
        replica.probing = False
        if not self._detector.probe_passed(latency_s, ok, self._peers(replica)):
            self._eject(replica, replica.ejections + 1, "probe", now)
            return
        replica.health = Health.UP
        replica.ejected_until = None
        replica.returned_at = now
        # Judged afresh: the old average would eject a slow replica again at once.
        replica.latency_s = None
        replica.samples = 0
        replica.consecutive_errors = 0
        replica.record(latency_s, ok)

    def _eject(self, replica: _Replica, ejections: int, reason: str, now: float) -> None:
        replica.health = Health.EJECTED
        replica.ejections = ejections
        replica.ejected_until = now + self._detector.ejection_s(ejections)
        replica.ejection_reason = reason
