"""The dispatcher's vocabulary: jobs, shards, leases, positions, errors.

Plain frozen dataclasses shared by the core, the gRPC layer and clients.

Example:

```python
spec = JobSpec("train", (ShardSpec("/data/a.tfrecord", 1000),), policy="adaptive")
validate_spec(spec)
```
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from tfscale.data.dispatcher import policies as policies_lib

__all__ = [
    "EQUALIZE",
    "AcquireResult",
    "AlreadyExists",
    "DispatcherError",
    "EpochProgress",
    "FailedPrecondition",
    "InputPosition",
    "InvalidArgument",
    "JobSpec",
    "Lease",
    "MAX_EPOCHS",
    "MAX_JOBS",
    "MAX_LEASE_TIMEOUT_S",
    "MAX_NAME_BYTES",
    "MAX_SHARDS_PER_JOB",
    "MAX_SHARD_SIZE",
    "MAX_WORKERS_PER_JOB",
    "NotFound",
    "Registration",
    "ResourceExhausted",
    "ShardSpec",
    "describe",
    "validate_name",
    "validate_position",
    "validate_spec",
]

EQUALIZE = ("none", "pad", "drop")

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
      policy: a name of `policies_lib.POLICIES`.
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
    """Where a consumer's training stands in a job's input.

    Attributes:
      epoch: the epoch being consumed.
      done: shards of that epoch consumed in full.
      partial: `(shard, elements consumed)` of a shard consumed in part.
    """

    epoch: int = 0
    done: tuple[int, ...] = ()
    partial: Optional[tuple[int, int]] = None

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done": list(self.done),
                "partial": list(self.partial) if self.partial else None}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "InputPosition":
        partial = value.get("partial")
        return cls(value["epoch"], tuple(value["done"]), tuple(partial) if partial else None)


@dataclasses.dataclass(frozen=True)
class Registration:
    """What a worker learns when it joins a job."""

    lease_timeout_s: float
    num_epochs: int
    num_consumers: int
    equalize: str


@dataclasses.dataclass(frozen=True)
class EpochProgress:
    """Committed element counts of an epoch's consumers.

    Attributes:
      finished: every shard of the epoch is complete.
      floor: the smallest count (0 until `num_consumers` workers registered).
      ceiling: the largest count.
    """

    finished: bool
    floor: int
    ceiling: int


@dataclasses.dataclass(frozen=True)
class AcquireResult:
    """Leases granted, or why none: the job ended, or retry after a while."""

    leases: tuple[Lease, ...] = ()
    end_of_job: bool = False
    retry_after_s: float = 0.0
    # Tokens to complete or release that were no longer active.
    rejected: tuple[int, ...] = ()


def validate_position(spec: JobSpec, position: InputPosition) -> None:
    """Raises InvalidArgument for a position outside the job."""
    shards = range(len(spec.shards))
    bad = (
        not 0 <= position.epoch < spec.num_epochs
        or len(position.done) > len(shards)
        or not set(position.done) <= set(shards)
        or (position.partial is not None and (
            position.partial[0] not in shards
            or position.partial[0] in position.done
            or not 0 <= position.partial[1] <= spec.shards[position.partial[0]].size
        ))
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
    if spec.policy not in policies_lib.POLICIES:
        raise InvalidArgument(
            f"Unknown policy {describe(spec.policy)}. Valid policies: "
            f"{', '.join(sorted(policies_lib.POLICIES))}"
        )
