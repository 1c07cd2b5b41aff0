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
    "NotFound",
    "Registration",
    "ShardSpec",
    "validate_position",
    "validate_spec",
]

EQUALIZE = ("none", "pad", "drop")


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


def validate_position(spec: JobSpec, position: InputPosition) -> None:
    """Raises InvalidArgument for a position outside the job."""
    shards = range(len(spec.shards))
    bad = (
        not 0 <= position.epoch < spec.num_epochs
        or not set(position.done) <= set(shards)
        or (position.partial is not None and (
            position.partial[0] not in shards
            or position.partial[0] in position.done
            or not 0 <= position.partial[1] < max(spec.shards[position.partial[0]].size, 1)
        ))
    )
    if bad:
        raise InvalidArgument(
            f"Input position {position} is outside job {spec.name!r} "
            f"({len(spec.shards)} shards, {spec.num_epochs} epochs)"
        )


def validate_spec(spec: JobSpec) -> None:
    """Raises InvalidArgument for a malformed job spec."""
    if not spec.name:
        raise InvalidArgument("job name must not be empty")
    if not spec.shards:
        raise InvalidArgument(f"job {spec.name!r} has no shards")
    names = [s.name for s in spec.shards]
    if len(set(names)) != len(names) or not all(names):
        raise InvalidArgument(f"job {spec.name!r}: shard names must be unique and non-empty")
    if any(s.size < 0 for s in spec.shards):
        raise InvalidArgument(f"job {spec.name!r}: shard sizes must be >= 0")
    if spec.num_epochs < 1:
        raise InvalidArgument(f"num_epochs must be >= 1. Received: num_epochs={spec.num_epochs}")
    if not spec.lease_timeout_s > 0:
        raise InvalidArgument(
            f"lease_timeout_s must be positive. Received: lease_timeout_s={spec.lease_timeout_s}"
        )
    if spec.equalize not in EQUALIZE:
        raise InvalidArgument(
            f"equalize must be one of {', '.join(EQUALIZE)}. Received: equalize={spec.equalize!r}"
        )
    if spec.num_consumers < 0 or (spec.equalize != "none") != (spec.num_consumers > 0):
        raise InvalidArgument(
            "equalize needs num_consumers >= 1 and num_consumers needs equalize. Received: "
            f"num_consumers={spec.num_consumers}, equalize={spec.equalize!r}"
        )
    if spec.policy not in policies_lib.POLICIES:
        raise InvalidArgument(
            f"Unknown policy {spec.policy!r}. Valid policies: {', '.join(sorted(policies_lib.POLICIES))}"
        )
