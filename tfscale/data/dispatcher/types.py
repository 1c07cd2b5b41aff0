"""The dispatcher's vocabulary: jobs, shards, leases, positions, reports, errors, limits.

Plain frozen dataclasses shared by the core, the gRPC layer and clients. This
module imports nothing else of the dispatcher: every other module of it may
import this one, and its limits have one owner (training configs check
against them too).

Example:

```python
spec = JobSpec("train", (ShardSpec("/data/a.tfrecord", 1000),), policy="adaptive")
validate_spec(spec)
```
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = [
    "EQUALIZE",
    "POLICY_NAMES",
    "AcquireResult",
    "AlreadyExists",
    "DispatcherError",
    "DispatcherStatus",
    "EpochProgress",
    "FailedPrecondition",
    "InputPosition",
    "InvalidArgument",
    "JobSpec",
    "JobStatus",
    "Lease",
    "MAX_EPOCHS",
    "MAX_JOBS",
    "MAX_LEASE_TIMEOUT_S",
    "MAX_NAME_BYTES",
    "MAX_SHARDS_PER_CALL",
    "MAX_SHARDS_PER_JOB",
    "MAX_SHARD_SIZE",
    "MAX_WORKERS_PER_JOB",
    "NotFound",
    "Registration",
    "ResourceExhausted",
    "ShardSpec",
    "WorkerStatus",
    "describe",
    "validate_name",
    "validate_position",
    "validate_spec",
]

EQUALIZE = ("none", "pad", "drop")
# The shard policies (`policies.make_policy` builds them).
POLICY_NAMES = ("adaptive", "consistent_hash", "least_loaded", "round_robin")

# Limits that keep every count the dispatcher sums inside int64 and every reply
# inside gRPC's default 4 MiB: names and lists bound what one request may add,
# and jobs and workers bound what Status lists.
MAX_NAME_BYTES = 1024
MAX_SHARDS_PER_JOB = 1_000_000
MAX_SHARD_SIZE = 2**40
MAX_EPOCHS = 1_000_000
MAX_TOTAL_SIZE = 2**62  # sum of the shard sizes times num_epochs
MAX_LEASE_TIMEOUT_S = 86_400.0
MAX_JOBS = 1024
MAX_WORKERS_PER_JOB = 4096
# Shards one acquire may lease.
MAX_SHARDS_PER_CALL = 1024
_INT64 = (-(2**63), 2**63 - 1)


class DispatcherError(Exception):
    """Base of the errors a request can get; the servicer maps each to a code."""


class InvalidArgument(DispatcherError):
    """The request is malformed."""


class NotFound(DispatcherError):
    """The job does not exist."""


class FailedPrecondition(DispatcherError):
    """The request is out of order (not registered, stale lease, ...)."""


class AlreadyExists(DispatcherError):
    """A job of that name exists with a different spec."""


class ResourceExhausted(DispatcherError):
    """The request would exceed one of the dispatcher's limits (jobs, workers)."""


def describe(value: Any, limit: int = 64) -> str:
    """`repr(value)`, shortened so that an error message stays small."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value.encode())} bytes" if isinstance(value, str) else f"{len(text)} characters"
    return f"{text[:limit]}... ({size})"


def validate_name(kind: str, name: Any) -> None:
    """Raises InvalidArgument unless `name` is a non-empty str of at most MAX_NAME_BYTES."""
    if not isinstance(name, str):
        raise InvalidArgument(f"{kind} name must be a string. Received: {describe(name)}")
    if not name:
        raise InvalidArgument(f"{kind} name must not be empty")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"{kind} name must be at most {MAX_NAME_BYTES} bytes. Received: {size} bytes "
            f"({describe(name)})"
        )


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """One unit of input. Attributes: name (what the reader reads), size (load)."""

    name: str
    size: int = 1


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A dispatcher job.

    Attributes:
      name: job name.
      shards: the shards, visited once per epoch.
      policy: one of `POLICY_NAMES`.
      num_epochs: how many passes over the shards.
      seed: seeds each epoch's shard permutation.
      lease_timeout_s: a lease not renewed for this long expires.
      num_consumers: synchronous consumers whose element counts per epoch
        must be equal (0: no equalization); shard sizes must count elements.
      equalize: `"none"`, `"pad"` (consumers repeat elements up to the
        epoch's largest count) or `"drop"` (they hold back elements above
        the epoch's smallest count, dropping the excess at the epoch's end).
    """

    name: str
    shards: tuple[ShardSpec, ...]
    policy: str = "round_robin"
    num_epochs: int = 1
    seed: int = 0
    lease_timeout_s: float = 30.0
    num_consumers: int = 0
    equalize: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "JobSpec":
        shards = tuple(ShardSpec(**s) for s in value["shards"])
        return cls(**{**value, "shards": shards})


@dataclasses.dataclass(frozen=True)
class Lease:
    """A worker's right to read one shard in one epoch, until it expires."""

    job: str
    epoch: int
    shard_index: int
    shard_name: str
    size: int
    token: int
    worker: str
    speculative: bool = False
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class InputPosition:
    """Where training stands in a job's input.

    One consumer reads one shard at a time, so its position has at most one
    shard consumed in part; a group of synchronous consumers (each reading
    its own shards) has up to one per consumer. `union` joins the positions
    of a group's consumers taken at the same training step.

    Attributes:
      epoch: the epoch being consumed.
      done: shards of that epoch consumed in full (sorted).
      partials: `(shard, elements consumed)` of each shard consumed in part
        (sorted by shard).

    Example:

    ```python
    a = InputPosition(3, done=(0, 4), partials=((2, 10),))
    b = InputPosition(3, done=(1,), partials=((5, 7),))
    InputPosition.union([a, b])  # epoch 3, done (0, 1, 4), partials ((2, 10), (5, 7))
    ```
    """

    epoch: int = 0
    done: tuple[int, ...] = ()
    partials: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "done": list(self.done),
            "partials": [list(p) for p in self.partials],
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "InputPosition":
        partials = [tuple(p) for p in value.get("partials", ())]
        if value.get("partial"):  # written before a position could have several
            partials.append(tuple(value["partial"]))
        return cls(value["epoch"], tuple(value["done"]), tuple(sorted(partials)))

    @classmethod
    def union(cls, positions: "list[InputPosition]") -> "InputPosition":
        """The position of a group of consumers, from each one's at the same step.

        Each consumer's position holds the group's position before its own
        reads (where the group last started from) plus what it consumed
        since: a shard any of them finished is done, and one read in part
        stands at the furthest offset any of them reached.

        Raises:
          ValueError: for no positions, or positions in different epochs
            (consumers of one synchronous step read the same epoch).
        """
        if not positions:
            raise ValueError("InputPosition.union needs at least one position. Received: []")
        epochs = sorted({p.epoch for p in positions})
        if len(epochs) > 1:
            raise ValueError(
                "The consumers' positions must be in one epoch to be joined. Received: "
                f"epochs {epochs}"
            )
        done = set().union(*(p.done for p in positions))
        offsets: dict[int, int] = {}
        for position in positions:
            for shard, offset in position.partials:
                if shard not in done:
                    offsets[shard] = max(offsets.get(shard, 0), offset)
        return cls(epochs[0], tuple(sorted(done)), tuple(sorted(offsets.items())))


@dataclasses.dataclass(frozen=True)
class Registration:
    """What a worker learns when it joins a job.

    Attributes:
      lease_timeout_s: a lease not renewed for this long expires.
      num_epochs: the job's epochs.
      num_consumers: synchronous consumers to equalize (0: none).
      equalize: `"none"`, `"pad"` or `"drop"`.
      heartbeat_interval_s: heartbeat at least this often to keep the leases.
    """

    lease_timeout_s: float
    num_epochs: int
    num_consumers: int
    equalize: str
    heartbeat_interval_s: float


@dataclasses.dataclass(frozen=True)
class EpochProgress:
    """Committed element counts of an epoch's consumers.

    Attributes:
      finished: every shard of the epoch is complete.
      floor: the smallest count (0 until `num_consumers` workers registered).
      ceiling: the largest count.
      pad_shard: the name of a shard of the job, for a consumer that must
        pad the epoch without having read any shard.
    """

    finished: bool
    floor: int
    ceiling: int
    pad_shard: str = ""


@dataclasses.dataclass(frozen=True)
class AcquireResult:
    """Leases granted, or why none: the job ended, or retry after a while."""

    leases: tuple[Lease, ...] = ()
    end_of_job: bool = False
    retry_after_s: float = 0.0
    # Tokens to complete or release that were no longer active.
    rejected: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """Progress of one job.

    Attributes:
      name: the job's name.
      policy: its shard policy.
      epoch: the current epoch, 0-based; `num_epochs` once finished.
      num_epochs: the job's epochs.
      num_shards: shards per epoch.
      pending: shards of the current epoch neither leased nor completed.
      leased: shards of the current epoch under lease.
      completed: shards completed in the current epoch.
      finished: every epoch is done.
      grants: shard leases granted since the job was created.
    """

    name: str
    policy: str
    epoch: int
    num_epochs: int
    num_shards: int
    pending: int
    leased: int
    completed: int
    finished: bool
    grants: int


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    """One worker of one job.

    Attributes:
      job: the job's name.
      worker: the worker's name.
      live: it was heard from within the job's lease timeout.
      leases: leases it holds.
      outstanding: total size of the shards it holds leases on.
      completed_shards: shards it completed, over all epochs.
      completed_size: their total size.
      throughput: size units per second over its timed completions (0.0: unknown).
    """

    job: str
    worker: str
    live: bool
    leases: int
    outstanding: int
    completed_shards: int
    completed_size: int
    throughput: float


@dataclasses.dataclass(frozen=True)
class DispatcherStatus:
    """A dispatcher's jobs and workers, for `tfscale-dispatcher status`.

    Attributes:
      jobs: every job.
      workers: workers of every job, live ones first, at most a bounded number.
      omitted_workers: workers left out of `workers`.
      imbalance: max over mean of the size completed per live worker (1.0: balanced).
      uptime_s: seconds since the dispatcher started.

    Example:

    ```python
    status = client.status()
    [job.name for job in status.jobs if not job.finished]  # ['train']
    ```
    """

    jobs: tuple[JobStatus, ...] = ()
    workers: tuple[WorkerStatus, ...] = ()
    omitted_workers: int = 0
    imbalance: float = 1.0
    uptime_s: float = 0.0


def validate_position(spec: JobSpec, position: InputPosition) -> None:
    """Raises InvalidArgument for a position outside the job."""
    shards = range(len(spec.shards))
    partial = [shard for shard, _ in position.partials]
    bad = (
        not 0 <= position.epoch < spec.num_epochs
        or len(position.done) > len(shards)
        or not set(position.done) <= set(shards)
        or len(set(partial)) != len(partial)
        or any(
            shard not in shards
            or shard in position.done
            or not 0 <= offset <= spec.shards[shard].size
            for shard, offset in position.partials
        )
    )
    if bad:
        raise InvalidArgument(
            f"Input position {describe(position, limit=200)} is outside job {describe(spec.name)} "
            f"({len(spec.shards)} shards, {spec.num_epochs} epochs)"
        )


def _check_int(field: str, value: Any, low: int, high: int) -> None:
    if type(value) is not int:
        problem = f"be an int in [{low}, {high}]"
    elif value < low:
        problem = f"be >= {low}"
    elif value > high:
        problem = f"be <= {high}"
    else:
        return
    raise InvalidArgument(f"{field} must {problem}. Received: {field}={describe(value)}")


def validate_spec(spec: JobSpec) -> None:
    """Raises InvalidArgument for a malformed job spec, naming the field and the value."""
    validate_name("job", spec.name)
    if not spec.shards:
        raise InvalidArgument(f"job {describe(spec.name)} has no shards")
    if len(spec.shards) > MAX_SHARDS_PER_JOB:
        raise InvalidArgument(
            f"A job may have at most {MAX_SHARDS_PER_JOB} shards. Received: {len(spec.shards)} "
            f"shards in job {describe(spec.name)}"
        )
    for index, shard in enumerate(spec.shards):
        validate_name(f"shard {index}", shard.name)
        _check_int(f"shards[{index}].size", shard.size, 0, MAX_SHARD_SIZE)
    if len({s.name for s in spec.shards}) != len(spec.shards):
        raise InvalidArgument(f"job {describe(spec.name)}: shard names must be unique")
    _check_int("num_epochs", spec.num_epochs, 1, MAX_EPOCHS)
    total = sum(s.size for s in spec.shards) * spec.num_epochs
    if total > MAX_TOTAL_SIZE:
        raise InvalidArgument(
            f"The shard sizes times num_epochs must sum to at most 2**62. Received: {total} "
            f"(job {describe(spec.name)}, num_epochs={spec.num_epochs})"
        )
    _check_int("seed", spec.seed, *_INT64)
    timeout = spec.lease_timeout_s
    if (
        type(timeout) not in (int, float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_LEASE_TIMEOUT_S
    ):
        raise InvalidArgument(
            f"lease_timeout_s must be positive and finite, at most {MAX_LEASE_TIMEOUT_S:g}. "
            f"Received: lease_timeout_s={describe(timeout)}"
        )
    if spec.equalize not in EQUALIZE:
        raise InvalidArgument(
            f"equalize must be one of {', '.join(EQUALIZE)}. "
            f"Received: equalize={describe(spec.equalize)}"
        )
    _check_int("num_consumers", spec.num_consumers, 0, MAX_WORKERS_PER_JOB)
    if (spec.equalize != "none") != (spec.num_consumers > 0):
        raise InvalidArgument(
            "equalize needs num_consumers >= 1 and num_consumers needs equalize. Received: "
            f"num_consumers={spec.num_consumers}, equalize={spec.equalize!r}"
        )
    if spec.policy not in POLICY_NAMES:
        raise InvalidArgument(
            f"Unknown policy {describe(spec.policy)}. Valid policies: {', '.join(POLICY_NAMES)}"
        )
